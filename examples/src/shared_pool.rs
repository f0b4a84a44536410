//! One pool, many parents: several copies of an app (think: web servers
//! behind a load balancer) share one pool of runners through NATS.
//!
//! The program starts three parent processes of itself. Each hashes some
//! blocks of data on the shared pool `hashing`; the pool's limits (at most 3
//! runners of 2 calls each) hold for all parents together, and one parent,
//! elected through the KV bucket, boots and retires runners for everyone.
//!
//! ```text
//! cargo run --release -p flame-examples --bin shared_pool
//! ```
//!
//! With no `NATS_URL` it starts a private nats-server and hands its URL to
//! the parents, with a `FLAME_SECRET` made up for the run (unless one is
//! set) so that their calls are signed. With your own server, watch the pool while it runs:
//! `nats kv watch flame-hashing`, `nats micro ls`, `nats sub 'flame.>'`.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

/// Hashes a block of `size` bytes derived from `seed`, many rounds over
/// (CPU-heavy, no awaits). Returns the digest and the runner's pid.
#[flame::remote]
pub fn hash_block(seed: u64, size: usize) -> (u64, u32) {
    let mut data: Vec<u8> = (0..size).map(|i| (seed as usize + i) as u8).collect();
    let mut h: u64 = 0xcbf29ce484222325;
    for round in 0..200 {
        for b in &mut data {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
            *b = (h >> (round % 56)) as u8;
        }
    }
    (h, std::process::id())
}

const PARENTS: usize = 3;
const BLOCKS_PER_PARENT: u64 = 12;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Runners are this binary too: in a runner, init() serves and exits.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("parent") {
        let flame = flame::init().await?;
        return parent(flame, args[1].parse()?).await;
    }

    // The launcher: a NATS server for everyone, then the parents.
    let _server;
    let url = match std::env::var(flame::env::NATS_URL) {
        Ok(url) if !url.is_empty() => url,
        _ => {
            let server = flame::embedded::NatsServer::start()?;
            let url = server.url();
            _server = server;
            url
        }
    };
    // The parents of a shared pool sign their calls with a key derived from
    // a secret they all have (FLAME_SECRET): one made up for this run,
    // unless you set your own.
    let secret = std::env::var(flame::env::SECRET)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    println!("{PARENTS} parents share the pool `hashing` on {url}");
    let started = Instant::now();
    let mut children = Vec::new();
    for n in 0..PARENTS {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["parent", &n.to_string()])
            .env(flame::env::NATS_URL, &url)
            .env(flame::env::SECRET, &secret)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().expect("piped");
        children.push((
            child,
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    println!("{line}");
                }
            }),
        ));
    }
    for (mut child, printer) in children {
        let status = child.wait().await?;
        printer.await?;
        anyhow::ensure!(status.success(), "a parent failed: {status}");
    }
    println!("all parents done in {:?}", started.elapsed());
    Ok(())
}

async fn parent(flame: flame::Flame, n: usize) -> anyhow::Result<()> {
    let pool = flame
        .pool("hashing")
        .shared(true)
        .max(3)
        .max_concurrency(2)
        .idle_shutdown_after(Duration::from_secs(2))
        .start()
        .await?;
    let calls: Vec<_> = (0..BLOCKS_PER_PARENT)
        .map(|i| {
            let pool = pool.clone();
            let seed = n as u64 * 1000 + i;
            tokio::spawn(async move { flame::call!(pool, hash_block(seed, 200_000)).await })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let (digest, pid) = call.await??;
        println!(
            "parent {n} (pid {:>6}): block {i:>2} -> {digest:016x} on runner pid {pid}",
            std::process::id()
        );
    }
    pool.shutdown().await;
    Ok(())
}
