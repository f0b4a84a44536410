//! `--single [--runs N]`: what one caller feels, each measure against its
//! raw async-nats baseline taken in the same round, repeated for N rounds
//! (3 unless given) so the table shows the median and the spread.
//!
//! Rows: sequential p50 at 100 B, 10 KiB and 512 KiB; throughput with one
//! caller; cold start from a fresh pool (min 0, max 1, call to result,
//! local backend) against a raw echo process's spawn to its first reply;
//! an idle runner's resident memory after load against a raw echo
//! responder's after the same load; stream throughput both ways against
//! raw publish.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_bytes::ByteBuf;

use crate::{
    echo, echo_bytes, echo_vec, pid, print_rows, rss_kib, spawn_raw_echo, status_kib, streams,
    throughput, Row,
};

/// Sequential calls per round for the small payloads (the 512 KiB row
/// makes a fifth of these).
const SEQUENTIAL: usize = 2000;
/// How long each throughput measure runs.
const THROUGHPUT_FOR: Duration = Duration::from_secs(3);
/// Fresh pools booted per round for the cold start.
const COLD_RUNS: usize = 10;
/// MiB streamed each way per round.
const STREAM_MIB: u64 = 512;
/// The rest before reading an idle process's memory.
const IDLE_REST: Duration = Duration::from_secs(3);

/// One round's measures: (raw, flame) per row, in the row's unit.
struct Round {
    values: Vec<(f64, f64)>,
}

/// What a row shows: its name, its unit, whether higher is better, and the
/// target for flame against raw.
struct RowSpec {
    name: &'static str,
    unit: &'static str,
    target: &'static str,
}

const ROWS: &[RowSpec] = &[
    RowSpec {
        name: "sequential p50, 100 B",
        unit: "µs",
        target: "≤ 1.05x",
    },
    RowSpec {
        name: "throughput, 1 caller",
        unit: "/s",
        target: "≥ 0.97x",
    },
    RowSpec {
        name: "sequential p50, 10 KiB (Bytes)",
        unit: "µs",
        target: "≤ 1.05x",
    },
    RowSpec {
        name: "sequential p50, 512 KiB (Bytes)",
        unit: "µs",
        target: "≤ 1.1x",
    },
    RowSpec {
        name: "sequential p50, 512 KiB (Vec<u8>)",
        unit: "µs",
        target: "",
    },
    RowSpec {
        name: "cold start p50: fresh pool (min 0, max 1), call to result (raw: spawn an echo process, first reply)",
        unit: "ms",
        target: "≤ 5 ms",
    },
    RowSpec {
        name: "idle resident memory after load (raw: echo responder)",
        unit: "MB",
        target: "≤ 10 MB",
    },
    RowSpec {
        name: "of which anonymous (heap, stacks; the rest is the binary's pages)",
        unit: "MB",
        target: "",
    },
    RowSpec {
        name: "stream parent → runner, 128 KiB chunks (raw: publish)",
        unit: "MB/s",
        target: "≥ 1.0x",
    },
    RowSpec {
        name: "stream runner → parent, 128 KiB chunks (raw: publish)",
        unit: "MB/s",
        target: "≥ 1.0x",
    },
];

/// Runs `runs` rounds and prints the table.
pub(crate) async fn run(flame: &flame::Flame, runs: usize) -> anyhow::Result<()> {
    let url = flame.nats_url().to_string();
    let mut rounds = Vec::new();
    for i in 0..runs {
        eprintln!("round {} of {runs}...", i + 1);
        rounds.push(round(flame, &url, i).await?);
    }
    let mut rows: Vec<Row> = Vec::new();
    for (r, spec) in ROWS.iter().enumerate() {
        let raw: Vec<f64> = rounds.iter().map(|x| x.values[r].0).collect();
        let fl: Vec<f64> = rounds.iter().map(|x| x.values[r].1).collect();
        let ratios: Vec<f64> = rounds
            .iter()
            .map(|x| x.values[r].1 / x.values[r].0)
            .collect();
        let show = |v: &[f64]| {
            if v.iter().all(|x| x.is_nan()) {
                "-".to_string()
            } else {
                format!("{} {}", spread(v, 1), spec.unit)
            }
        };
        let vs = if raw.iter().all(|x| x.is_nan()) {
            format!("target {}", spec.target)
        } else if spec.unit == "ms" {
            format!("{}x (target {} for flame)", spread(&ratios, 2), spec.target)
        } else if spec.target.is_empty() {
            format!("{}x", spread(&ratios, 2))
        } else {
            format!("{}x (target {})", spread(&ratios, 2), spec.target)
        };
        rows.push((spec.name.to_string(), show(&raw), show(&fl), vs));
    }
    println!(
        "{runs} rounds; each cell: median [min–max] over the rounds, ratios taken within each round\n"
    );
    print_rows(rows);
    Ok(())
}

/// `--compare <bytes> [--calls N]`: only the sequential row of one size,
/// raw and flame in turns, N calls each (2000 unless given) in each of 3
/// rounds: a quick check of one change to the call path.
pub(crate) async fn compare(flame: &flame::Flame, size: usize, calls: usize) -> anyhow::Result<()> {
    let url = flame.nats_url().to_string();
    let subject = "bench.compare";
    let _echo = spawn_raw_echo(&url, subject).await?;
    let raw = async_nats::connect(url.as_str()).await?;
    let pool = flame.pool("bench-compare").min(1).max(1).start().await?;
    let data = Bytes::from(vec![0xABu8; size]);
    let mut ratios = Vec::new();
    for _ in 0..3 {
        let [r, f] = raw_and_bytes(calls, &raw, subject, &pool, &data).await?;
        println!(
            "{size} B: raw p50 {:.1} µs, flame p50 {:.1} µs, {:.3}x",
            r.as_secs_f64() * 1e6,
            f.as_secs_f64() * 1e6,
            f.as_secs_f64() / r.as_secs_f64()
        );
        ratios.push(f.as_secs_f64() / r.as_secs_f64());
    }
    println!("flame vs raw: {}x", spread(&ratios, 3));
    pool.shutdown().await;
    Ok(())
}

/// `median [min–max]` of `v`, with `digits` decimals.
fn spread(v: &[f64], digits: usize) -> String {
    let mut s: Vec<f64> = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let median = s[s.len() / 2];
    format!(
        "{median:.digits$} [{:.digits$}–{:.digits$}]",
        s[0],
        s[s.len() - 1]
    )
}

async fn round(flame: &flame::Flame, url: &str, i: usize) -> anyhow::Result<Round> {
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mut values = Vec::new();
    let echo_proc = spawn_raw_echo(url, &format!("bench.single.{i}")).await?;
    let subject = format!("bench.single.{i}");
    let raw = async_nats::connect(url).await?;
    let pool = flame
        .pool(format!("bench-single-{i}"))
        .min(1)
        .max(1)
        .start()
        .await?;

    eprintln!("  sequential 100 B, throughput...");
    // Sequential 100 B, then one caller's throughput.
    let small = Bytes::from(vec![0xABu8; 100]);
    let raw_req = |p: Bytes| {
        let (raw, s) = (raw.clone(), subject.clone());
        async move {
            raw.request(s, p).await?;
            anyhow::Ok(())
        }
    };
    let [raw_seq, fl_seq] = interleaved(
        SEQUENTIAL,
        || raw_req(small.clone()),
        || {
            let (pool, p) = (pool.clone(), ByteBuf::from(small.to_vec()));
            async move {
                flame::call!(pool, echo(p)).await?;
                Ok(())
            }
        },
    )
    .await?;
    values.push((us(raw_seq), us(fl_seq)));
    let (raw2, p2, s2) = (raw.clone(), small.clone(), subject.clone());
    let raw_rate = throughput(1, THROUGHPUT_FOR, move |_| {
        let (raw, p, s) = (raw2.clone(), p2.clone(), s2.clone());
        async move {
            raw.request(s, p).await?;
            Ok(())
        }
    })
    .await?;
    let (pool2, p2) = (pool.clone(), small.clone());
    let fl_rate = throughput(1, THROUGHPUT_FOR, move |_| {
        let (pool, p) = (pool2.clone(), ByteBuf::from(p2.to_vec()));
        async move {
            flame::call!(pool, echo(p)).await?;
            Ok(())
        }
    })
    .await?;
    values.push((raw_rate, fl_rate));

    eprintln!("  payloads...");
    // Larger payloads: Bytes both sides, then a plain Vec<u8> for flame
    // (made for each call, as a caller would).
    for size in [10usize << 10, 512 << 10] {
        let data = Bytes::from(vec![0xABu8; size]);
        let n = if size > 100_000 {
            SEQUENTIAL / 5
        } else {
            SEQUENTIAL
        };
        let [raw_l, bytes_l] = raw_and_bytes(n, &raw, &subject, &pool, &data).await?;
        values.push((us(raw_l), us(bytes_l)));
        if size > 100_000 {
            let [raw_l, vec_l] = interleaved(
                n,
                || raw_req(data.clone()),
                || {
                    let (pool, d) = (pool.clone(), data.to_vec());
                    async move {
                        flame::call!(pool, echo_vec(d)).await?;
                        Ok(())
                    }
                },
            )
            .await?;
            values.push((us(raw_l), us(vec_l)));
        }
    }

    eprintln!("  idle memory...");
    // Both responders have served the same calls: rest, then read memory.
    let runner_pid = flame::call!(pool, pid()).await?;
    tokio::time::sleep(IDLE_REST).await;
    let echo_pid = echo_proc.id().unwrap_or(0);
    let runner_mb = rss_kib(runner_pid)? as f64 / 1024.0;
    let echo_mb = rss_kib(echo_pid)? as f64 / 1024.0;
    let runner_anon_mb = status_kib(runner_pid, "RssAnon:")? as f64 / 1024.0;
    let echo_anon_mb = status_kib(echo_pid, "RssAnon:")? as f64 / 1024.0;
    pool.shutdown().await;
    drop(echo_proc);

    eprintln!("  cold starts...");
    // Cold start: a fresh pool, its first call (process spawn included);
    // raw: a fresh echo process (this binary, with nothing but an
    // async-nats client), from its spawn to its first reply.
    let mut cold = Vec::new();
    let mut raw_cold = Vec::new();
    for k in 0..COLD_RUNS {
        let subject = format!("bench.cold.{i}.{k}");
        let t = Instant::now();
        let echo = spawn_raw_echo(url, &subject).await?;
        raw.request(subject, Bytes::from(vec![0xABu8; 100])).await?;
        raw_cold.push(t.elapsed());
        drop(echo);
        let pool = flame
            .pool(format!("bench-cold-{i}-{k}"))
            .max(1)
            .start()
            .await?;
        let t = Instant::now();
        flame::call!(pool, echo(ByteBuf::from(vec![0xABu8; 100]))).await?;
        cold.push(t.elapsed());
        pool.shutdown().await;
    }
    cold.sort();
    raw_cold.sort();
    let ms = |v: &[Duration]| v[v.len() / 2].as_secs_f64() * 1e3;
    values.push((ms(&raw_cold), ms(&cold)));
    values.push((echo_mb, runner_mb));
    values.push((echo_anon_mb, runner_anon_mb));

    eprintln!("  streams...");
    let st = streams(flame, url, STREAM_MIB).await?;
    values.push((st.raw, st.to_runner));
    values.push((st.raw, st.to_parent));
    Ok(Round { values })
}

/// p50 latencies of `n` raw requests of `data` to the echo on `subject`
/// and `n` flame calls of `echo_bytes` with it, taken in turns.
async fn raw_and_bytes(
    n: usize,
    raw: &async_nats::Client,
    subject: &str,
    pool: &flame::Pool,
    data: &Bytes,
) -> anyhow::Result<[Duration; 2]> {
    interleaved(
        n,
        || {
            let (raw, s, d) = (raw.clone(), subject.to_string(), data.clone());
            async move {
                raw.request(s, d).await?;
                anyhow::Ok(())
            }
        },
        || {
            let (pool, d) = (pool.clone(), data.clone());
            async move {
                flame::call!(pool, echo_bytes(d)).await?;
                Ok(())
            }
        },
    )
    .await
}

/// p50 latencies of `n` calls of `a` and `n` of `b`, taken in turns (after
/// a fifth as many of each to warm up), so that both see the same moments
/// of a noisy machine.
async fn interleaved<A, FA, B, FB>(n: usize, mut a: A, mut b: B) -> anyhow::Result<[Duration; 2]>
where
    A: FnMut() -> FA,
    FA: std::future::Future<Output = anyhow::Result<()>>,
    B: FnMut() -> FB,
    FB: std::future::Future<Output = anyhow::Result<()>>,
{
    for _ in 0..n / 5 {
        a().await?;
        b().await?;
    }
    let (mut ta, mut tb) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let t = Instant::now();
        a().await?;
        ta.push(t.elapsed());
        let t = Instant::now();
        b().await?;
        tb.push(t.elapsed());
    }
    ta.sort();
    tb.sort();
    Ok([ta[n / 2], tb[n / 2]])
}
