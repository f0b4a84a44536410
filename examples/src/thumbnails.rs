//! The flame demo: CPU-heavy rendering wrapped in calls.
//!
//! Renders tiles of the Mandelbrot set at full resolution and shrinks each to
//! a small ASCII thumbnail, the way a video app would cut thumbnails out of
//! frames. Each tile runs on a runner: a copy of this very program, booted on
//! demand. The table shows which runner process rendered which tile.
//!
//! Run it with no NATS server given, and it starts a private one:
//!
//! ```text
//! cargo run --release -p flame-examples --bin thumbnails
//! ```
//!
//! Set `NATS_URL` to use your own server (then `nats micro ls` shows the
//! runners while it runs).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Which part of the plane a tile covers, and at what resolution.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tile {
    pub index: usize,
    pub center: (f64, f64),
    pub span: f64,
    pub size: u32,
}

/// A rendered tile, shrunk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Thumbnail {
    pub index: usize,
    pub rows: Vec<String>,
    pub rendered_by_pid: u32,
    pub runner: String,
    pub millis: u64,
}

const THUMB_W: u32 = 24;
const THUMB_H: u32 = 10;

/// Renders a tile at full size (CPU-heavy, no awaits) and shrinks it.
#[flame::remote]
pub fn render_thumbnail(tile: Tile) -> Thumbnail {
    let started = Instant::now();
    let n = tile.size;
    let mut iters = vec![0u32; (n * n) as usize];
    for y in 0..n {
        for x in 0..n {
            let cx = tile.center.0 + (x as f64 / n as f64 - 0.5) * tile.span;
            let cy = tile.center.1 + (y as f64 / n as f64 - 0.5) * tile.span;
            let (mut zx, mut zy, mut i) = (0.0f64, 0.0f64, 0u32);
            while zx * zx + zy * zy < 4.0 && i < 200 {
                let t = zx * zx - zy * zy + cx;
                zy = 2.0 * zx * zy + cy;
                zx = t;
                i += 1;
            }
            iters[(y * n + x) as usize] = i;
        }
    }
    // Box-filter down to the thumbnail and map brightness to characters.
    let shades = [' ', '.', ':', '-', '=', '+', '*', '#', '%', '@'];
    let (bw, bh) = (n / THUMB_W, n / THUMB_H);
    let rows = (0..THUMB_H)
        .map(|ty| {
            (0..THUMB_W)
                .map(|tx| {
                    let mut sum = 0u64;
                    for y in ty * bh..(ty + 1) * bh {
                        for x in tx * bw..(tx + 1) * bw {
                            sum += iters[(y * n + x) as usize] as u64;
                        }
                    }
                    let avg = sum as f64 / (bw * bh) as f64 / 200.0;
                    shades[((avg.sqrt() * 9.0).round() as usize).min(9)]
                })
                .collect()
        })
        .collect();
    Thumbnail {
        index: tile.index,
        rows,
        rendered_by_pid: std::process::id(),
        runner: flame::parent().map(|p| p.runner_id).unwrap_or_default(),
        millis: started.elapsed().as_millis() as u64,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "flame_nats=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    // The flame part: two lines. In a runner, init() serves and never returns.
    let flame = flame::init().await?;
    let runners = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(4);
    let pool = flame
        .pool("thumbnails")
        .max(runners)
        .max_concurrency(1)
        .idle_shutdown_after(Duration::from_secs(10))
        .start()
        .await?;

    println!("parent pid {} on {}", std::process::id(), flame.nats_url());
    println!("rendering 8 tiles of 1200x1200 on up to {runners} runners...\n");
    let started = Instant::now();
    let tiles: Vec<Tile> = (0..8)
        .map(|i| Tile {
            index: i,
            center: (-0.75 + 0.35 * (i as f64 - 3.5) / 3.5, 0.1 * (i % 2) as f64),
            span: 1.2,
            size: 1200,
        })
        .collect();
    // Start every call at once; the pool boots runners to take them.
    let calls: Vec<_> = tiles
        .into_iter()
        .map(|tile| {
            let pool = pool.clone();
            tokio::spawn(async move { flame::call!(pool, render_thumbnail(tile)).await })
        })
        .collect();
    let mut thumbs = Vec::new();
    for call in calls {
        thumbs.push(call.await??);
    }
    let wall = started.elapsed();

    for t in &thumbs {
        println!(
            "tile {}  runner {}  pid {}  {} ms",
            t.index,
            &t.runner[..8.min(t.runner.len())],
            t.rendered_by_pid,
            t.millis
        );
        for row in &t.rows {
            println!("    |{row}|");
        }
    }

    // Inline form: the listed variable travels; the block runs on a runner.
    let cpu_ms: Vec<u64> = thumbs.iter().map(|t| t.millis).collect();
    let summary = flame::call!(pool, |cpu_ms: Vec<u64>| -> String {
        let total: u64 = cpu_ms.iter().sum();
        format!(
            "{} tiles, {total} ms of rendering, summed on pid {}",
            cpu_ms.len(),
            std::process::id()
        )
    })
    .await?;

    let pids: std::collections::BTreeSet<u32> = thumbs.iter().map(|t| t.rendered_by_pid).collect();
    println!("\n{summary}");
    println!(
        "wall time {:?} across {} runner processes {:?} (parent {})",
        wall,
        pids.len(),
        pids,
        std::process::id()
    );
    pool.shutdown().await;
    Ok(())
}
