//! The flow of the FLAME announcement, in Rust: the parent streams a video
//! to a runner, the runner cuts thumbnails with ffmpeg as the video
//! arrives, sends each one back the moment it exists, and inserts a row per
//! thumbnail into PostgreSQL through the app's own database pool.
//!
//! ```text
//! cargo run --release -p flame-examples --bin video_thumbnails [VIDEO] [SECONDS_BETWEEN]
//! ```
//!
//! With no video given it makes a 20-second test video with ffmpeg's
//! `testsrc`. It needs `ffmpeg` (Debian: `apt-get install ffmpeg`) and
//! PostgreSQL: `DATABASE_URL`, or else a private server it starts and
//! stops itself (`initdb` and `postgres` on PATH or in
//! /usr/lib/postgresql/*/bin; Debian: `apt-get install postgresql`). NATS
//! is `NATS_URL`, or else a private nats-server.
//!
//! The video goes through a pipe into ffmpeg, so it must be streamable:
//! MPEG-TS, Matroska/WebM, or MP4 with its index at the front
//! (`ffmpeg -i in.mp4 -movflags +faststart out.mp4`).

use std::time::{Duration, Instant};

use bytes::Bytes;
use flame::{State, Stream};
use flame_examples::video::{self, Db, Thumbnail};
use futures::StreamExt;

/// Cuts a thumbnail every `every` seconds out of `video` while it arrives,
/// and stores a row for each. Runs on a runner.
#[flame::remote]
async fn thumbnails(
    State(db): State<Db>,
    video: Stream<Bytes>,
    name: String,
    every: u32,
) -> Stream<Thumbnail> {
    Stream::try_new(video::cut_thumbnails(db, video, name, every))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    // Parent and runners both run this; the database URL reaches runners in
    // DATABASE_URL (set below for the runners of the pool).
    let database_url = std::env::var("DATABASE_URL").ok();
    let app = |url: &str| -> anyhow::Result<flame::FlameBuilder> {
        Ok(flame::FlameBuilder::new().state(Db::connect(url)?))
    };
    // A runner serves here and exits; only the parent goes on.
    app(database_url
        .as_deref()
        .unwrap_or("postgres://unused@127.0.0.1:1/none"))?
    .serve_if_runner()
    .await?;

    let args: Vec<String> = std::env::args().skip(1).collect();
    let every: u32 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let work = tempfile::tempdir()?;
    let video = match args.first() {
        Some(path) => std::path::PathBuf::from(path),
        None => video::make_test_video(work.path(), 20).await?,
    };
    let (_pg, database_url) = match database_url {
        Some(url) => (None, url),
        None => {
            let pg = tokio::task::spawn_blocking(flame_examples::postgres::PgServer::start).await?;
            let url = pg.url();
            println!("started a private PostgreSQL (set DATABASE_URL to use your own)");
            (Some(pg), url)
        }
    };
    let (db, connection) = tokio_postgres::connect(&database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    video::create_schema(&db).await?;

    let flame = app(&database_url)?.connect().await?;
    let backend = flame::LocalBackend::new().env("DATABASE_URL", &database_url);
    let pool = flame
        .pool("thumbs")
        .max(2)
        .timeout(Duration::from_secs(300))
        .idle_shutdown_after(Duration::from_secs(5))
        .backend(backend)
        // Show the wait for a runner as it happens.
        .on_grow_start(|e| println!("booting a runner ({} in the pool)", e.runners()))
        .on_grow_end(|e| match e {
            flame::PoolChange::GrowEnd { result: Ok(()), .. } => println!("runner ready"),
            flame::PoolChange::GrowEnd {
                result: Err(err), ..
            } => {
                println!("runner failed to boot: {err}")
            }
            _ => {}
        })
        .start()
        .await?;

    let name = video
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "video".into());
    let size = tokio::fs::metadata(&video).await?.len();
    println!(
        "streaming {name} ({:.1} MB) to a runner, a thumbnail every {every} s",
        size as f64 / 1e6
    );
    let started = Instant::now();
    let file = tokio::fs::File::open(&video).await?;
    let mut thumbs = flame::call!(
        pool,
        thumbnails(Stream::from_reader(file), name.clone(), every)
    )
    .await?;
    let mut count = 0;
    while let Some(thumb) = thumbs.next().await {
        let thumb = thumb?;
        count += 1;
        let path = work.path().join(format!("thumb-{:04}.jpg", thumb.at_secs));
        tokio::fs::write(&path, &thumb.jpeg).await?;
        println!(
            "{:>7.3} s  thumbnail at {:>3} s  {:>6} bytes  made by runner {}",
            started.elapsed().as_secs_f64(),
            thumb.at_secs,
            thumb.jpeg.len(),
            &thumb.runner[..8.min(thumb.runner.len())]
        );
    }
    println!(
        "{count} thumbnails in {:.2} s; rows in PostgreSQL:",
        started.elapsed().as_secs_f64()
    );
    for row in db
        .query(
            "SELECT at_secs, bytes, made_by FROM thumbnails WHERE video = $1 ORDER BY at_secs",
            &[&name],
        )
        .await?
    {
        let (at, bytes, by): (i32, i32, String) = (row.get(0), row.get(1), row.get(2));
        println!(
            "  {name}  at {at:>3} s  {bytes:>6} bytes  by {}",
            &by[..8.min(by.len())]
        );
    }
    anyhow::ensure!(count > 0, "no thumbnails were made");
    pool.shutdown().await;
    flame.close().await;
    Ok(())
}
