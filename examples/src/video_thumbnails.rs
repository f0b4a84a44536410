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

use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flame::{State, Stream};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The app's database: a connection pool, built once in `main` in parent
/// and runners alike.
#[derive(Clone)]
struct Db(deadpool_postgres::Pool);

impl Db {
    fn connect(url: &str) -> anyhow::Result<Db> {
        let config: tokio_postgres::Config = url.parse()?;
        let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
        Ok(Db(deadpool_postgres::Pool::builder(manager)
            .max_size(4)
            .build()?))
    }
}

/// One thumbnail, as the runner sends it back.
#[derive(Debug, Serialize, Deserialize)]
struct Thumbnail {
    /// Position in the video, in seconds.
    at_secs: u32,
    /// The JPEG.
    jpeg: Bytes,
    /// The runner that made it.
    runner: String,
}

/// Cuts a thumbnail every `every` seconds out of `video` while it arrives,
/// and stores a row for each. Runs on a runner.
#[flame::remote]
async fn thumbnails(
    State(db): State<Db>,
    video: Stream<Bytes>,
    name: String,
    every: u32,
) -> Stream<Thumbnail> {
    Stream::try_new(cut_thumbnails(db, video, name, every))
}

fn cut_thumbnails(
    db: Db,
    mut video: Stream<Bytes>,
    name: String,
    every: u32,
) -> impl futures::Stream<Item = Result<Thumbnail, String>> + Send {
    let runner = flame::parent().map(|p| p.runner_id).unwrap_or_default();
    async_stream(move |tx| async move {
        let mut ffmpeg = tokio::process::Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-i", "pipe:0"])
            .args(["-vf", &format!("fps=1/{every},scale=160:-1")])
            .args(["-f", "image2pipe", "-c:v", "mjpeg", "pipe:1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!("cannot run ffmpeg on the runner ({e}); install it: apt-get install ffmpeg")
            })?;
        let mut stdin = ffmpeg.stdin.take().expect("piped");
        let mut stdout = ffmpeg.stdout.take().expect("piped");
        // Feed ffmpeg as the video arrives...
        let feeding = tokio::spawn(async move {
            while let Some(chunk) = video.next().await {
                let chunk = chunk.map_err(|e| e.to_string())?;
                if stdin.write_all(&chunk).await.is_err() {
                    break; // ffmpeg stopped reading; its exit says why
                }
            }
            Ok::<(), String>(())
        });
        // ...and send each JPEG back the moment ffmpeg writes it.
        let client = db.0.get().await.map_err(|e| format!("database: {e}"))?;
        let mut jpegs = JpegSplitter::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut index = 0u32;
        loop {
            let n = stdout.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            for jpeg in jpegs.push(&buf[..n]) {
                let at_secs = index * every;
                index += 1;
                client
                    .execute(
                        "INSERT INTO thumbnails (video, at_secs, bytes, made_by) VALUES ($1, $2, $3, $4)",
                        &[&name, &(at_secs as i32), &(jpeg.len() as i32), &runner],
                    )
                    .await
                    .map_err(|e| format!("database: {e}"))?;
                let thumb = Thumbnail {
                    at_secs,
                    jpeg,
                    runner: runner.clone(),
                };
                if tx.send(Ok(thumb)).await.is_err() {
                    return Ok(()); // the caller stopped reading
                }
            }
        }
        feeding.await.map_err(|e| e.to_string())??;
        let status = ffmpeg.wait().await.map_err(|e| e.to_string())?;
        if !status.success() {
            let mut err = String::new();
            if let Some(mut stderr) = ffmpeg.stderr.take() {
                let _ = stderr.read_to_string(&mut err).await;
            }
            return Err(format!("ffmpeg failed ({status}): {}", err.trim()));
        }
        Ok(())
    })
}

/// A stream fed by a task through a channel: the task's `Err` becomes the
/// stream's last item.
fn async_stream<T, F, Fut>(body: F) -> impl futures::Stream<Item = Result<T, String>> + Send
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, String>>) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let work = body(tx.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = work.await {
            let _ = tx.send(Err(e)).await;
        }
    });
    let guard = AbortOnDrop(task);
    futures::stream::poll_fn(move |cx| {
        let _ = &guard;
        rx.poll_recv(cx)
    })
}

/// Stops the producing task when the stream is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Cuts a byte stream of concatenated JPEGs (ffmpeg's image2pipe) into
/// images, at the end-of-image marker.
#[derive(Default)]
struct JpegSplitter {
    pending: Vec<u8>,
}

impl JpegSplitter {
    fn push(&mut self, data: &[u8]) -> Vec<Bytes> {
        self.pending.extend_from_slice(data);
        let mut images = Vec::new();
        let mut start = 0;
        let mut i = 1;
        while i < self.pending.len() {
            if self.pending[i - 1] == 0xFF && self.pending[i] == 0xD9 {
                images.push(Bytes::copy_from_slice(&self.pending[start..=i]));
                start = i + 1;
                i += 2;
            } else {
                i += 1;
            }
        }
        self.pending.drain(..start);
        images
    }
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
        None => make_test_video(work.path()).await?,
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
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS thumbnails (id serial PRIMARY KEY, video text NOT NULL, \
         at_secs int NOT NULL, bytes int NOT NULL, made_by text NOT NULL)",
    )
    .await?;

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
            flame::PoolEvent::GrowEnd { result: Ok(()), .. } => println!("runner ready"),
            flame::PoolEvent::GrowEnd {
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

/// A 20-second 320x240 test video (ffmpeg's testsrc), as MPEG-TS so that it
/// can be read from a pipe.
async fn make_test_video(dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("testsrc.ts");
    let status = tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-f", "lavfi"])
        .args(["-i", "testsrc=duration=20:size=320x240:rate=25"])
        .args(["-c:v", "mpeg2video", "-q:v", "4", "-f", "mpegts"])
        .arg(&path)
        .status()
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot run ffmpeg ({e}); install it: apt-get install ffmpeg")
        })?;
    anyhow::ensure!(status.success(), "ffmpeg could not make a test video");
    Ok(path)
}
