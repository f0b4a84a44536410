//! flame's benchmark. Prints a table comparing flame calls with raw async-nats
//! request/reply on the same server in the same run (these machines are
//! noisy, so ratios mean more than absolute numbers).
//!
//! ```text
//! cargo run --release -p flame-bench            # full run
//! cargo run --release -p flame-bench -- --quick # smoke run
//! cargo run --release -p flame-bench -- --single --runs 3 # one caller's view
//! ```
//!
//! The baseline echo responders are separate processes, like runners, so
//! both sides pay the same process hops.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use futures::StreamExt;
use serde_bytes::ByteBuf;
use tokio::io::{AsyncBufReadExt, BufReader};

mod cpu;
mod single;

/// Echoes its argument. `ByteBuf` makes serde encode the bytes as one blob
/// (a plain `Vec<u8>` is encoded element by element).
#[flame::remote]
async fn echo(data: ByteBuf) -> ByteBuf {
    data
}

/// Echoes a plain `Vec<u8>`, as users write it.
#[flame::remote]
async fn echo_vec(data: Vec<u8>) -> Vec<u8> {
    data
}

/// Echoes its argument, as a plain (blocking-pool) function.
#[flame::remote]
fn echo_plain(data: ByteBuf) -> ByteBuf {
    data
}

/// Echoes `bytes::Bytes`.
#[flame::remote]
async fn echo_bytes(data: Bytes) -> Bytes {
    data
}

/// Sleeps, standing in for a piece of work.
#[flame::remote]
async fn work(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// One flame call of `echo`: the operation every flame measure repeats.
async fn echo_once(pool: flame::Pool, payload: Vec<u8>) -> anyhow::Result<()> {
    flame::call!(pool, echo(ByteBuf::from(payload))).await?;
    Ok(())
}

/// Reads a byte stream to its end; returns the bytes read and this
/// runner's peak resident memory in KiB.
#[flame::remote]
async fn swallow(mut data: flame::Stream<Bytes>) -> Result<(u64, u64), String> {
    let mut n = 0u64;
    while let Some(chunk) = data.next().await {
        n += chunk.map_err(|e| e.to_string())?.len() as u64;
    }
    Ok((n, peak_rss_kib()))
}

/// Sends `count` chunks of `size` bytes.
#[flame::remote]
async fn gush(count: u64, size: usize) -> flame::Stream<Bytes> {
    let chunk = Bytes::from(vec![0x5Au8; size]);
    flame::Stream::new(futures::stream::iter(
        (0..count).map(move |_| chunk.clone()),
    ))
}

/// Peak resident memory of this process in KiB (`VmHWM`).
fn peak_rss_kib() -> u64 {
    proc_status_kib("VmHWM:")
}

/// Resident memory of this process in KiB (`VmRSS`).
fn own_rss_kib() -> u64 {
    proc_status_kib("VmRSS:")
}

/// A field of this process's `/proc/self/status` in KiB (0 if unreadable).
fn proc_status_kib(field: &str) -> u64 {
    status_kib(std::process::id(), field).unwrap_or(0)
}

/// A child that sends back every message it gets.
#[flame::remote]
async fn echo_child(mut inbox: flame::Stream<ByteBuf>, out: flame::Sender<ByteBuf>) {
    while let Some(Ok(message)) = inbox.next().await {
        if out.send(message).await.is_err() {
            break;
        }
    }
}

/// Process id of the runner.
#[flame::remote]
async fn pid() -> u32 {
    std::process::id()
}

struct Settings {
    sequential: usize,
    throughput_for: Duration,
    cold_runs: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("raw-echo") {
        return raw_echo(&args[1], &args[2]).await;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Runners are this binary too: in a runner, init() serves and exits.
    let flame = flame::init().await?;
    if args.first().map(String::as_str) == Some("shared-parent") {
        return shared_parent(&flame, &args[1], args[2].parse()?, args[3].parse()?).await;
    }
    START_TICKS.get_or_init(cpu::machine_ticks);
    let quick = args.iter().any(|a| a == "--quick");
    // `--profile-call <bytes> [--vec]`: sequential `echo_bytes` calls of
    // that size (`echo_vec` with `--vec`) for 10 s on one runner (to attach
    // a profiler to).
    if let Some(at) = args.iter().position(|a| a == "--profile-call") {
        let size: usize = args.get(at + 1).and_then(|n| n.parse().ok()).unwrap_or(100);
        let pool = flame.pool("bench").min(1).max(1).start().await?;
        let data = Bytes::from(vec![0xABu8; size]);
        let vec = args.iter().any(|a| a == "--vec");
        return ten_seconds_of(|| async {
            if vec {
                flame::call!(pool, echo_vec(data.to_vec())).await?;
            } else {
                flame::call!(pool, echo_bytes(data.clone())).await?;
            }
            Ok(())
        })
        .await;
    }
    // `--profile-raw <bytes>`: the same loop against a raw async-nats echo
    // process (the baseline, for the same profiler).
    if let Some(at) = args.iter().position(|a| a == "--profile-raw") {
        let size: usize = args.get(at + 1).and_then(|n| n.parse().ok()).unwrap_or(100);
        let url = flame.nats_url().to_string();
        let _echo = spawn_raw_echo(&url, "bench.profile").await?;
        let raw = async_nats::connect(url.as_str()).await?;
        let data = Bytes::from(vec![0xABu8; size]);
        return ten_seconds_of(|| async {
            raw.request("bench.profile", data.clone()).await?;
            Ok(())
        })
        .await;
    }
    // `--profile-cold <n>`: n cold starts in a row (to attach a profiler).
    if let Some(at) = args.iter().position(|a| a == "--profile-cold") {
        let n: usize = args.get(at + 1).and_then(|n| n.parse().ok()).unwrap_or(20);
        let mut cold = Vec::new();
        for i in 0..n {
            let pool = flame.pool(format!("cold-{i}")).max(1).start().await?;
            let t = Instant::now();
            flame::call!(pool, echo(ByteBuf::from(vec![1u8; 100]))).await?;
            cold.push(t.elapsed());
            pool.shutdown().await;
        }
        cold.sort();
        println!("cold start p50 {:?}", cold[n / 2]);
        return Ok(());
    }
    // `--compare <bytes> [--calls N]`: one size's sequential row, quickly.
    if let Some(at) = args.iter().position(|a| a == "--compare") {
        let size: usize = args.get(at + 1).and_then(|n| n.parse().ok()).unwrap_or(100);
        let calls = args
            .iter()
            .position(|a| a == "--calls")
            .and_then(|at| args.get(at + 1)?.parse().ok())
            .unwrap_or(2000)
            .max(1);
        return single::compare(&flame, size, calls).await;
    }
    // `--single [--runs N]`: one caller's measures, N rounds (3 by default).
    if args.iter().any(|a| a == "--single") {
        let runs = args
            .iter()
            .position(|a| a == "--runs")
            .and_then(|at| args.get(at + 1)?.parse().ok())
            .unwrap_or(3);
        return single::run(&flame, runs).await;
    }
    // `--profile-flame-throughput [callers]`: only the flame throughput
    // phase (64 callers unless given), for 10 s (to attach a profiler to).
    if let Some(at) = args.iter().position(|a| a == "--profile-flame-throughput") {
        let callers: usize = args.get(at + 1).and_then(|n| n.parse().ok()).unwrap_or(64);
        let pool = flame
            .pool("bench")
            .min(2)
            .max(2)
            .max_concurrency(64)
            .start()
            .await?;
        let payload = vec![0xABu8; 100];
        let rate = throughput(callers, Duration::from_secs(10), move |_| {
            echo_once(pool.clone(), payload.clone())
        })
        .await?;
        println!("flame throughput {rate:.0}/s");
        return Ok(());
    }
    let s = if quick {
        Settings {
            sequential: 300,
            throughput_for: Duration::from_millis(500),
            cold_runs: 3,
        }
    } else {
        Settings {
            sequential: 5000,
            throughput_for: Duration::from_secs(3),
            cold_runs: 15,
        }
    };
    let url = flame.nats_url().to_string();
    // `--payloads`: only the payload-size rows.
    if args.iter().any(|a| a == "--payloads") {
        let _echo = spawn_raw_echo(&url, "bench.raw.echo.0").await?;
        let raw = async_nats::connect(&url).await?;
        let mut rows = Vec::new();
        payload_rows(&mut rows, &payload_latencies(&flame, &raw, &s).await?);
        print_rows(rows);
        return Ok(());
    }
    eprintln!(
        "benchmarking on {url} ({})",
        if quick { "quick" } else { "full" }
    );
    let payload = vec![0xABu8; 100];
    let mut rows: Vec<Row> = Vec::new();

    // Baseline: raw request/reply to echo processes.
    let raw = async_nats::connect(&url).await?;
    let _echoes = [
        spawn_raw_echo(&url, "bench.raw.echo.0").await?,
        spawn_raw_echo(&url, "bench.raw.echo.1").await?,
    ];
    eprintln!("raw sequential...");
    let raw_seq = sequential(s.sequential, || {
        let raw = raw.clone();
        let p = Bytes::from(payload.clone());
        async move {
            raw.request("bench.raw.echo.0", p).await?;
            Ok(())
        }
    })
    .await?;
    // flame: a warm pool of 2 runners.
    let pool = flame
        .pool("bench")
        .min(2)
        .max(2)
        .max_concurrency(64)
        .start()
        .await?;
    eprintln!("flame sequential...");
    let fl_seq = sequential(s.sequential, || echo_once(pool.clone(), payload.clone())).await?;
    eprintln!("throughput at 1, 8, 64 and 256 callers...");
    let nats_pids = cpu::children_named("nats-server");
    let echo_pids: Vec<u32> = _echoes.iter().filter_map(|c| c.id()).collect();
    let runner_pids: Vec<u32> = pool
        .runners()
        .iter()
        .filter_map(|r| r.handle.as_deref()?.strip_prefix("pid ")?.parse().ok())
        .collect();
    let me = std::process::id();
    let mut loads = Vec::new();
    for callers in [1usize, 8, 64, 256] {
        let (raw2, payload2) = (raw.clone(), payload.clone());
        let pids: Vec<u32> = [me]
            .iter()
            .chain(&nats_pids)
            .chain(&echo_pids)
            .copied()
            .collect();
        let (raw_rate, raw_cpu) = throughput_cpu(
            callers,
            s.throughput_for,
            move |i| {
                let raw = raw2.clone();
                let p = Bytes::from(payload2.clone());
                async move {
                    raw.request(format!("bench.raw.echo.{}", i % 2), p).await?;
                    Ok(())
                }
            },
            &pids,
        )
        .await?;
        let (pool2, payload2) = (pool.clone(), payload.clone());
        let pids: Vec<u32> = [me]
            .iter()
            .chain(&nats_pids)
            .chain(&runner_pids)
            .copied()
            .collect();
        let (flame_rate, flame_cpu) = throughput_cpu(
            callers,
            s.throughput_for,
            move |_| echo_once(pool2.clone(), payload2.clone()),
            &pids,
        )
        .await?;
        let (pool2, payload2) = (pool.clone(), payload.clone());
        let plain_rate = throughput(callers, s.throughput_for, move |_| {
            let pool = pool2.clone();
            let p = ByteBuf::from(payload2.clone());
            async move {
                flame::call!(pool, echo_plain(p)).await?;
                Ok(())
            }
        })
        .await?;
        loads.push(Load {
            callers,
            raw: raw_rate,
            flame: flame_rate,
            plain: plain_rate,
            // parent, nats-server(s), then the two responders or runners.
            raw_cpu: split_cpu(&raw_cpu, nats_pids.len()),
            flame_cpu: split_cpu(&flame_cpu, nats_pids.len()),
        });
    }

    // `--load`: only the sequential and throughput rows (to iterate on).
    let only_load = args.iter().any(|a| a == "--load");

    // Idle runner memory, after the load above and a moment of rest.
    let runner_pid = flame::call!(pool, pid()).await?;
    tokio::time::sleep(Duration::from_secs(if quick { 1 } else { 3 })).await;
    let rss_kib = rss_kib(runner_pid)?;
    pool.shutdown().await;

    if only_load {
        let mut rows = Vec::new();
        latency_rows(&mut rows, &raw_seq, &fl_seq);
        load_rows(&mut rows, &loads);
        print_rows(rows);
        return Ok(());
    }

    // Cold start: empty pool, first call (process spawn included).
    eprintln!("cold starts...");
    let mut cold = Vec::new();
    for i in 0..s.cold_runs {
        let pool = flame.pool(format!("cold-{i}")).max(1).start().await?;
        let t = Instant::now();
        flame::call!(pool, echo(ByteBuf::from(payload.clone()))).await?;
        cold.push(t.elapsed());
        pool.shutdown().await;
    }
    cold.sort();
    let cold_p50 = cold[cold.len() / 2];

    eprintln!("scale up and down...");
    let mut elastic_runs = Vec::new();
    for i in 0..if quick { 1 } else { 3 } {
        elastic_runs.push(scale_up_and_down(&flame, i).await?);
    }
    elastic_runs.sort_by_key(|e| e.coordination);
    let el = &elastic_runs[elastic_runs.len() / 2];

    eprintln!("streams...");
    let st = streams(&flame, &url, if quick { 64 } else { 1024 }).await?;

    eprintln!("child message round trips...");
    let child_rt = child_round_trip(&flame, s.sequential).await?;

    eprintln!("payload sizes...");
    let payloads = payload_latencies(&flame, &raw, &s).await?;
    eprintln!("burst with and without hot start...");
    let burst_cold = burst_p99(&flame, false).await?;
    let burst_hot = burst_p99(&flame, true).await?;
    eprintln!("map over 10,000 items...");
    let (map_time, loop_time) = map_against_loop(&flame).await?;

    eprintln!("shared pool: 1 parent, then 4 parents...");
    let shared_secs = if quick { 1 } else { 3 };
    let one = shared_throughput(&url, "bench-shared-1", 1, shared_secs).await?;
    let four = shared_throughput(&url, "bench-shared-4", 4, shared_secs).await?;
    eprintln!("scaler failover...");
    let failover = scaler_failover(&flame, &url).await?;

    let us = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
    latency_rows(&mut rows, &raw_seq, &fl_seq);
    load_rows(&mut rows, &loads);
    rows.push((
        format!("cold start p50 (spawn to result, {} runs)", cold.len()),
        "-".into(),
        format!("{:.1} ms", cold_p50.as_secs_f64() * 1e3),
        "target < 150 ms".into(),
    ));
    rows.push((
        "idle runner resident memory".into(),
        "-".into(),
        format!("{:.1} MB", rss_kib as f64 / 1024.0),
        "target < 20 MB".into(),
    ));

    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    rows.push((
        format!(
            "scale-up: burst of {} calls ({} ms each), 0 to {} runners",
            ELASTIC_CALLS, ELASTIC_WORK_MS, ELASTIC_MAX
        ),
        "-".into(),
        format!(
            "{} (boots {}, work {ELASTIC_WORK_MS} ms)",
            ms(el.all_served),
            ms(el.slowest_boot)
        ),
        format!("coordination {} (target < 100 ms)", ms(el.coordination)),
    ));
    rows.push((
        format!(
            "scale-down: last call to pool at min (idle_shutdown_after {} ms)",
            ELASTIC_IDLE.as_millis()
        ),
        "-".into(),
        ms(el.back_at_min),
        format!("target ≤ {}", ms(ELASTIC_IDLE + Duration::from_secs(1))),
    ));

    rows.push((
        "shared pool throughput, 64 callers per parent, 2 runners".into(),
        format!("1 parent: {one:.0}/s"),
        format!("4 parents: {four:.0}/s"),
        format!("{:.2}x of 1 parent", four / one),
    ));
    rows.push((
        "scaler failover: leader killed to first boot by the new one".into(),
        "-".into(),
        ms(failover),
        format!("target ≤ 1 heartbeat ({} ms)", SHARED_HEARTBEAT.as_millis()),
    ));

    payload_rows(&mut rows, &payloads);
    rows.push((
        "burst of 16 calls on a busy pool (work 50 ms): p99 without / with hot_start(0.5)".into(),
        ms(burst_cold),
        ms(burst_hot),
        ratio(burst_hot.as_secs_f64(), burst_cold.as_secs_f64(), "< 1x"),
    ));
    rows.push((
        "10,000 calls (100 B): loop of 128 callers / pool.map, 128 in flight".into(),
        ms(loop_time),
        ms(map_time),
        ratio(map_time.as_secs_f64(), loop_time.as_secs_f64(), "≤ 1.1x"),
    ));
    rows.push((
        "place_child message round trip p50 (100 B, sequential)".into(),
        us(raw_seq.p50),
        us(child_rt.p50),
        ratio(
            child_rt.p50.as_secs_f64(),
            raw_seq.p50.as_secs_f64(),
            "≤ 1.2x",
        ),
    ));
    let mbs = |r: f64| format!("{r:.0} MB/s");
    rows.push((
        "stream parent → runner, 128 KiB chunks".into(),
        mbs(st.raw),
        mbs(st.to_runner),
        ratio(st.to_runner, st.raw, "≥ 0.8x"),
    ));
    rows.push((
        "stream runner → parent, 128 KiB chunks".into(),
        mbs(st.raw),
        mbs(st.to_parent),
        ratio(st.to_parent, st.raw, "≥ 0.8x"),
    ));
    rows.push((
        format!("peak resident memory, {} MiB streamed to a runner", st.mib),
        "-".into(),
        format!(
            "runner {:.1} MB peak, parent +{:.1} MB",
            st.runner_peak_kib as f64 / 1024.0,
            st.parent_growth_kib as f64 / 1024.0
        ),
        "target: a few MB, whatever the size".into(),
    ));

    print_rows(rows);
    Ok(())
}

type Row = (String, String, String, String);

fn print_rows(rows: Vec<Row>) {
    println!("| measure | raw async-nats | flame | flame vs raw |");
    println!("|---|---|---|---|");
    for (a, b, c, d) in rows {
        println!("| {a} | {b} | {c} | {d} |");
    }
    // A noisy neighbour shows as steal time: rows mean little when high.
    let steal = cpu::steal_since(*START_TICKS.get_or_init(cpu::machine_ticks));
    println!("\nsteal time during the run: {steal:.1}% of CPU time");
}

/// The machine's CPU ticks when the run started.
static START_TICKS: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();

fn payload_rows(rows: &mut Vec<Row>, payloads: &[PayloadLatency]) {
    let us = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
    for p in payloads {
        rows.push((
            format!("{} sequential p50: Vec<u8> / Bytes", p.label),
            us(p.raw),
            format!("{} / {}", us(p.vec), us(p.bytes)),
            format!(
                "{} / {}",
                ratio(p.vec.as_secs_f64(), p.raw.as_secs_f64(), ""),
                ratio(p.bytes.as_secs_f64(), p.raw.as_secs_f64(), "≤ 1.2x")
            ),
        ));
    }
}

fn latency_rows(rows: &mut Vec<Row>, raw_seq: &Latency, fl_seq: &Latency) {
    let us = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
    rows.push((
        "warm call p50 (100 B, sequential)".into(),
        us(raw_seq.p50),
        us(fl_seq.p50),
        ratio(
            fl_seq.p50.as_secs_f64(),
            raw_seq.p50.as_secs_f64(),
            "≤ 1.1x",
        ),
    ));
    rows.push((
        "warm call p99 (100 B, sequential)".into(),
        us(raw_seq.p99),
        us(fl_seq.p99),
        ratio(fl_seq.p99.as_secs_f64(), raw_seq.p99.as_secs_f64(), ""),
    ));
}

fn load_rows(rows: &mut Vec<Row>, loads: &[Load]) {
    for l in loads {
        let target = if l.callers >= 64 { "≥ 1.0x" } else { "" };
        rows.push((
            format!("throughput, {} callers over 2 runners", l.callers),
            format!("{:.0}/s", l.raw),
            format!("{:.0}/s", l.flame),
            ratio(l.flame, l.raw, target),
        ));
        rows.push((
            format!(
                "throughput, {} callers, plain (blocking-pool) function",
                l.callers
            ),
            format!("{:.0}/s", l.raw),
            format!("{:.0}/s", l.plain),
            ratio(l.plain, l.raw, ""),
        ));
    }
    for l in loads.iter().filter(|l| l.callers != 8) {
        let show = |c: &[f64; 3]| {
            format!(
                "{:.0} µs (parent {:.0}, nats-server {:.0}, responders {:.0})",
                c.iter().sum::<f64>(),
                c[0],
                c[1],
                c[2]
            )
        };
        rows.push((
            format!("CPU per call at {} callers (all processes)", l.callers),
            show(&l.raw_cpu),
            show(&l.flame_cpu),
            ratio(
                l.flame_cpu.iter().sum::<f64>(),
                l.raw_cpu.iter().sum::<f64>(),
                "",
            ),
        ));
    }
}

const SHARED_HEARTBEAT: Duration = Duration::from_millis(1500);

/// A parent process of a shared pool (this binary, `shared-parent`): prints
/// `ready`, and with `secs` > 0 measures 64 callers for that long and prints
/// `rate <calls per second>`; then stays a parent until stdin closes.
async fn shared_parent(
    flame: &flame::Flame,
    pool: &str,
    min: usize,
    secs: u64,
) -> anyhow::Result<()> {
    let pool = flame
        .pool(pool)
        .shared(true)
        .min(min)
        .max(2)
        .max_concurrency(64)
        .heartbeat(SHARED_HEARTBEAT)
        .start()
        .await?;
    println!("ready");
    if secs > 0 {
        let payload = vec![0xABu8; 100];
        let rate = throughput(64, Duration::from_secs(secs), move |_| {
            echo_once(pool.clone(), payload.clone())
        })
        .await?;
        println!("rate {rate:.0}");
    }
    let mut line = String::new();
    let _ = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await;
    Ok(())
}

/// Starts a `shared-parent` process of this binary; returns it and its
/// output lines.
async fn spawn_shared_parent(
    url: &str,
    pool: &str,
    min: usize,
    secs: u64,
) -> anyhow::Result<(
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
)> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["shared-parent", pool, &min.to_string(), &secs.to_string()])
        .env(flame::env::NATS_URL, url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    match tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await {
        Ok(Ok(Some(l))) if l == "ready" => Ok((child, lines)),
        other => bail!("shared parent did not start: {other:?}"),
    }
}

/// Sum of the rates of `parents` parent processes on one shared pool.
async fn shared_throughput(
    url: &str,
    pool: &str,
    parents: usize,
    secs: u64,
) -> anyhow::Result<f64> {
    let mut procs = Vec::new();
    for _ in 0..parents {
        procs.push(spawn_shared_parent(url, pool, 2, secs).await?);
    }
    let mut total = 0.0;
    for (_, lines) in &mut procs {
        let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
            .await??
            .context("parent exited")?;
        total += line
            .strip_prefix("rate ")
            .and_then(|r| r.parse::<f64>().ok())
            .with_context(|| format!("unexpected line {line}"))?;
    }
    // Closing stdin ends them.
    for (mut child, _) in procs {
        drop(child.stdin.take());
        child.wait().await?;
    }
    Ok(total)
}

/// Kills the scaler (a parent process, with its runners) and times how long
/// until this process, the other parent, boots a runner as the new scaler.
async fn scaler_failover(flame: &flame::Flame, url: &str) -> anyhow::Result<Duration> {
    let (mut leader, _lines) = spawn_shared_parent(url, "bench-failover", 1, 0).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let pool = flame
        .pool("bench-failover")
        .shared(true)
        .min(1)
        .max(2)
        .max_concurrency(64)
        .heartbeat(SHARED_HEARTBEAT)
        .on_grow_start(move |_| {
            let _ = tx.send(Instant::now());
        })
        .start()
        .await?;
    // The leader and its runner, killed together (as when a machine dies).
    let leader_pid = leader.id().context("leader pid")?;
    let runners = children_of(leader_pid);
    let killed = Instant::now();
    for pid in std::iter::once(leader_pid).chain(runners) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
    leader.wait().await?;
    let booted = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .context("no new scaler booted a runner within 60 s")?
        .context("hook dropped")?;
    pool.shutdown().await;
    Ok(booted.duration_since(killed))
}

/// Pids of the live children of a process.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    stat.rsplit(')')
                        .next()?
                        .split_whitespace()
                        .nth(1)?
                        .parse()
                        .ok()
                })
                == Some(pid)
        })
        .collect()
}

const ELASTIC_MAX: usize = 4;
const ELASTIC_CONCURRENCY: usize = 4;
const ELASTIC_CALLS: usize = ELASTIC_MAX * ELASTIC_CONCURRENCY;
const ELASTIC_WORK_MS: u64 = 200;
const ELASTIC_IDLE: Duration = Duration::from_millis(1000);

struct Elastic {
    /// Burst start to the last result.
    all_served: Duration,
    /// The boot phase: first boot asked for to last runner ready.
    slowest_boot: Duration,
    /// What the pool added beyond booting and the work itself.
    coordination: Duration,
    /// Last result to every runner gone.
    back_at_min: Duration,
}

/// Drives an empty pool to max with a burst that needs every slot, then
/// waits for it to idle back to zero.
async fn scale_up_and_down(flame: &flame::Flame, run: usize) -> anyhow::Result<Elastic> {
    use std::sync::Mutex;
    let boots: Arc<Mutex<(Vec<Instant>, Vec<Instant>)>> = Arc::default();
    let (b1, b2) = (boots.clone(), boots.clone());
    let pool = flame
        .pool(format!("elastic-{run}"))
        .max(ELASTIC_MAX)
        .max_concurrency(ELASTIC_CONCURRENCY)
        .idle_shutdown_after(ELASTIC_IDLE)
        .on_grow_start(move |_| b1.lock().unwrap().0.push(Instant::now()))
        .on_grow_end(move |_| b2.lock().unwrap().1.push(Instant::now()))
        .start()
        .await?;
    let t = Instant::now();
    let calls: Vec<_> = (0..ELASTIC_CALLS)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { flame::call!(pool, work(ELASTIC_WORK_MS)).await })
        })
        .collect();
    for c in calls {
        c.await??;
    }
    let all_served = t.elapsed();
    let done = Instant::now();
    let (starts, ends) = boots.lock().unwrap().clone();
    if starts.len() != ELASTIC_MAX || ends.len() != ELASTIC_MAX {
        bail!(
            "expected {ELASTIC_MAX} boots, saw {} started and {} ended",
            starts.len(),
            ends.len()
        );
    }
    // Boots overlap: count the boot phase from the first boot asked for to
    // the last runner ready. Coordination is everything else beyond the
    // work itself: before the first boot, and from the last runner ready to
    // the last result.
    let first_start = starts.iter().min().copied().unwrap_or(t);
    let last_end = ends.iter().max().copied().unwrap_or(t);
    let slowest_boot = last_end.saturating_duration_since(first_start);
    let coordination = first_start.saturating_duration_since(t)
        + done
            .saturating_duration_since(last_end)
            .saturating_sub(Duration::from_millis(ELASTIC_WORK_MS));
    let limit = ELASTIC_IDLE * 10;
    loop {
        let s = pool.status();
        if s.ready + s.booting + s.draining == 0 {
            break;
        }
        if done.elapsed() > limit {
            bail!("the pool did not idle down within {limit:?}: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let back_at_min = done.elapsed();
    pool.shutdown().await;
    Ok(Elastic {
        all_served,
        slowest_boot,
        coordination,
        back_at_min,
    })
}

fn ratio(flame: f64, raw: f64, target: &str) -> String {
    let r = flame / raw;
    if target.is_empty() {
        format!("{r:.2}x")
    } else {
        format!("{r:.2}x (target {target})")
    }
}

/// Sequential p50 of one payload size: raw request/reply, and flame with a
/// `Vec<u8>` and with `Bytes`.
struct PayloadLatency {
    label: String,
    raw: Duration,
    vec: Duration,
    bytes: Duration,
}

async fn payload_latencies(
    flame: &flame::Flame,
    raw: &async_nats::Client,
    s: &Settings,
) -> anyhow::Result<Vec<PayloadLatency>> {
    let pool = flame.pool("bench-payload").min(1).max(1).start().await?;
    let mut out = Vec::new();
    for (label, size) in [
        ("100 B", 100usize),
        ("10 KiB", 10 << 10),
        ("512 KiB", 512 << 10),
    ] {
        let data = Bytes::from(vec![0xABu8; size]);
        let n = if size > 100_000 {
            (s.sequential / 25).max(20)
        } else {
            (s.sequential / 5).max(50)
        };
        let raw_l = sequential(n, || {
            let (raw, p) = (raw.clone(), data.clone());
            async move {
                raw.request("bench.raw.echo.0", p).await?;
                Ok(())
            }
        })
        .await?;
        let vec_l = sequential(n, || {
            let (pool, d) = (pool.clone(), data.to_vec());
            async move {
                flame::call!(pool, echo_vec(d)).await?;
                Ok(())
            }
        })
        .await?;
        let bytes_l = sequential(n, || {
            let (pool, d) = (pool.clone(), data.clone());
            async move {
                flame::call!(pool, echo_bytes(d)).await?;
                Ok(())
            }
        })
        .await?;
        out.push(PayloadLatency {
            label: label.into(),
            raw: raw_l.p50,
            vec: vec_l.p50,
            bytes: bytes_l.p50,
        });
    }
    pool.shutdown().await;
    Ok(out)
}

/// p99 latency of a burst of 16 calls (50 ms of work each) on a pool of
/// up to 4 runners of 8 slots whose one runner is already 6/8 busy: the
/// burst needs more runners. With hot start the second one is up already.
async fn burst_p99(flame: &flame::Flame, hot: bool) -> anyhow::Result<Duration> {
    let mut builder = flame
        .pool(if hot {
            "bench-burst-hot"
        } else {
            "bench-burst-cold"
        })
        .min(1)
        .max(4)
        .max_concurrency(8);
    if hot {
        builder = builder.hot_start(0.5);
    }
    let pool = builder.start().await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let steady: Vec<_> = (0..6)
        .map(|_| {
            let (pool, stop) = (pool.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    flame::call!(pool, work(50)).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    // Let the steady load (and a hot start) settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let burst: Vec<_> = (0..16)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                flame::call!(pool, work(50)).await?;
                anyhow::Ok(t.elapsed())
            })
        })
        .collect();
    let mut times = Vec::new();
    for b in burst {
        times.push(b.await??);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in steady {
        s.await??;
    }
    pool.shutdown().await;
    times.sort();
    Ok(times[times.len() * 99 / 100])
}

/// 10,000 calls through `pool.map` with 128 in flight, against a loop of
/// 128 callers sharing the same 10,000 calls.
async fn map_against_loop(flame: &flame::Flame) -> anyhow::Result<(Duration, Duration)> {
    const CALLS: usize = 10_000;
    const IN_FLIGHT: usize = 128;
    let pool = flame
        .pool("bench-map")
        .min(2)
        .max(2)
        .max_concurrency(64)
        .start()
        .await?;
    let payload = vec![0xABu8; 100];
    let t = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let callers: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (pool, next, payload) = (pool.clone(), next.clone(), payload.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < CALLS {
                    flame::call!(pool, echo_vec(payload.clone())).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for c in callers {
        c.await??;
    }
    let loop_time = t.elapsed();
    let t = Instant::now();
    let ok = pool
        .map::<echo_vec, _>((0..CALLS).map(|_| (payload.clone(),)), IN_FLIGHT)
        .filter(|r| futures::future::ready(r.is_ok()))
        .count()
        .await;
    let map_time = t.elapsed();
    anyhow::ensure!(ok == CALLS, "{} of {CALLS} mapped calls failed", CALLS - ok);
    pool.shutdown().await;
    Ok((map_time, loop_time))
}

struct Latency {
    p50: Duration,
    p99: Duration,
}

/// Throughput at one number of callers, and CPU per call at it.
struct Load {
    callers: usize,
    raw: f64,
    flame: f64,
    plain: f64,
    /// µs per call: parent, nats-server, responders (raw echoes or runners).
    raw_cpu: [f64; 3],
    flame_cpu: [f64; 3],
}

/// CPU per call of [parent, servers..., responders...] as [parent,
/// servers, responders].
fn split_cpu(per_pid: &[f64], servers: usize) -> [f64; 3] {
    let parent = per_pid.first().copied().unwrap_or(0.0);
    let server = per_pid.iter().skip(1).take(servers).sum();
    let responders = per_pid.iter().skip(1 + servers).sum();
    [parent, server, responders]
}

async fn sequential<F, Fut>(n: usize, mut op: F) -> anyhow::Result<Latency>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    for _ in 0..n / 5 {
        op().await?;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        op().await?;
        samples.push(t.elapsed());
    }
    samples.sort();
    Ok(Latency {
        p50: samples[n / 2],
        p99: samples[n * 99 / 100],
    })
}

/// Requests per second with `callers` concurrent loops for `dur` (after a
/// short warm-up).
async fn throughput<F, Fut>(callers: usize, dur: Duration, op: F) -> anyhow::Result<f64>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    Ok(throughput_cpu(callers, dur, op, &[]).await?.0)
}

/// [`throughput`], and the CPU time each of `pids` spent per request
/// meanwhile, in microseconds.
async fn throughput_cpu<F, Fut>(
    callers: usize,
    dur: Duration,
    op: F,
    pids: &[u32],
) -> anyhow::Result<(f64, Vec<f64>)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..callers)
        .map(|i| {
            let (op, done, counting, stop) =
                (op.clone(), done.clone(), counting.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    op(i).await?;
                    if counting.load(Ordering::Relaxed) {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                anyhow::Ok(())
            })
        })
        .collect();
    tokio::time::sleep(dur / 5).await;
    counting.store(true, Ordering::Relaxed);
    let cpu_before: Vec<u64> = pids.iter().map(|p| cpu::cpu_us(*p)).collect();
    let t = Instant::now();
    tokio::time::sleep(dur).await;
    let n = done.load(Ordering::Relaxed);
    let elapsed = t.elapsed();
    let cpu_after: Vec<u64> = pids.iter().map(|p| cpu::cpu_us(*p)).collect();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    let per_call = cpu_before
        .iter()
        .zip(&cpu_after)
        .map(|(b, a)| a.saturating_sub(*b) as f64 / n.max(1) as f64)
        .collect();
    Ok((n as f64 / elapsed.as_secs_f64(), per_call))
}

/// A raw echo responder in its own process, killed on drop.
async fn spawn_raw_echo(url: &str, subject: &str) -> anyhow::Result<tokio::process::Child> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["raw-echo", url, subject])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    match tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await {
        Ok(Ok(Some(l))) if l == "ready" => Ok(child),
        other => bail!("raw echo did not start: {other:?}"),
    }
}

async fn raw_echo(url: &str, subject: &str) -> anyhow::Result<()> {
    let client = async_nats::connect(url).await?;
    let mut sub = client.subscribe(subject.to_string()).await?;
    client.flush().await?;
    println!("ready");
    while let Some(msg) = sub.next().await {
        if let Some(reply) = msg.reply {
            client.publish(reply, msg.payload).await?;
        }
    }
    Ok(())
}

/// Runs `call` one after another for 10 s (for a profiler to attach to)
/// and prints the time a call took.
async fn ten_seconds_of<F, Fut>(mut call: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(10) {
        call().await?;
        n += 1;
    }
    println!("{:.0} µs a call", 10e6 / n as f64);
    Ok(())
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmRSS:")
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS:`, `RssAnon:`, ...).
fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Stream measures.
struct StreamMeasures {
    /// Raw NATS publish of the same chunks to a subscriber, MB/s.
    raw: f64,
    to_runner: f64,
    to_parent: f64,
    mib: u64,
    runner_peak_kib: u64,
    parent_growth_kib: u64,
}

/// Streams `mib` MiB in 128 KiB chunks each way, beside raw NATS publish of
/// the same chunks to a subscriber on another connection.
async fn streams(flame: &flame::Flame, url: &str, mib: u64) -> anyhow::Result<StreamMeasures> {
    const CHUNK: usize = 128 * 1024;
    let count = mib * 1024 * 1024 / CHUNK as u64;
    let mb = (count * CHUNK as u64) as f64 / 1e6;

    // Raw: publish everything, the subscriber counts it in. A subscriber
    // that falls too far behind loses chunks (the server drops messages for
    // slow consumers): that attempt is thrown away, not waited on forever.
    let chunk = Bytes::from(vec![0x5Au8; CHUNK]);
    let mut raw = None;
    for _ in 0..3 {
        if let Some(secs) = raw_publish_secs(url, count, chunk.clone()).await? {
            raw = Some(mb / secs);
            break;
        }
        eprintln!("  the raw subscriber lost chunks (a slow consumer); measuring again");
    }
    let raw = raw.context("the raw subscriber lost chunks in 3 attempts")?;

    // A fresh runner, so that its peak memory is this transfer's.
    let pool = flame.pool("bench-stream").max(1).start().await?;
    let data = flame::Stream::new(futures::stream::iter(
        (0..count).map(move |_| chunk.clone()),
    ));
    let before = own_rss_kib();
    let peak = Arc::new(AtomicU64::new(before));
    let sampling = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                peak.fetch_max(own_rss_kib(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let started = Instant::now();
    let (bytes, runner_peak_kib) = flame::call!(pool, swallow(data))
        .await?
        .map_err(anyhow::Error::msg)?;
    let to_runner = mb / started.elapsed().as_secs_f64();
    anyhow::ensure!(
        bytes == count * CHUNK as u64,
        "the runner read {bytes} bytes"
    );
    sampling.abort();
    let parent_growth_kib = peak.load(Ordering::Relaxed).saturating_sub(before);

    let started = Instant::now();
    let mut back = flame::call!(pool, gush(count, CHUNK)).await?;
    let mut n = 0u64;
    while let Some(chunk) = back.next().await {
        n += chunk?.len() as u64;
    }
    let to_parent = mb / started.elapsed().as_secs_f64();
    anyhow::ensure!(n == count * CHUNK as u64, "the parent read {n} bytes");
    pool.shutdown().await;
    Ok(StreamMeasures {
        raw,
        to_runner,
        to_parent,
        mib,
        runner_peak_kib,
        parent_growth_kib,
    })
}

/// Seconds to publish `count` copies of `chunk` to a subscriber on another
/// connection until it has them all; `None` when it lost some (nothing
/// came for 5 s).
async fn raw_publish_secs(url: &str, count: u64, chunk: Bytes) -> anyhow::Result<Option<f64>> {
    let publisher = async_nats::connect(url).await?;
    let reader = async_nats::ConnectOptions::new()
        .subscription_capacity(64 * 1024)
        .connect(url)
        .await?;
    let mut sub = reader.subscribe("bench.raw.stream").await?;
    reader.flush().await?;
    let started = Instant::now();
    let counting = tokio::spawn(async move {
        let mut n = 0;
        while n < count {
            match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
                Ok(Some(_)) => n += 1,
                Ok(None) | Err(_) => break,
            }
        }
        n
    });
    for _ in 0..count {
        publisher.publish("bench.raw.stream", chunk.clone()).await?;
    }
    tokio::time::timeout(Duration::from_secs(10), publisher.flush())
        .await
        .context("the raw publisher's flush took over 10 s")??;
    let got = counting.await?;
    Ok((got == count).then(|| started.elapsed().as_secs_f64()))
}

/// Round trips of a 100-byte message to a child and back, one at a time.
async fn child_round_trip(flame: &flame::Flame, n: usize) -> anyhow::Result<Latency> {
    let pool = flame.pool("bench-child").max(1).start().await?;
    let (to_child, inbox) = flame::channel::<ByteBuf>();
    let (out, mut from_child) = flame::channel::<ByteBuf>();
    let child = flame::place_child!(pool, echo_child(inbox, out))?;
    let payload = ByteBuf::from(vec![0xABu8; 100]);
    // Warm up.
    for _ in 0..100 {
        to_child.send(payload.clone()).await?;
        from_child.next().await.context("the child ended")??;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        to_child.send(payload.clone()).await?;
        from_child.next().await.context("the child ended")??;
        samples.push(t.elapsed());
    }
    samples.sort();
    drop(child);
    pool.shutdown().await;
    Ok(Latency {
        p50: samples[n / 2],
        p99: samples[n * 99 / 100],
    })
}
