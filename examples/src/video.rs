//! Thumbnails of a video, as the FLAME announcement makes them: ffmpeg cuts
//! a thumbnail every few seconds out of a video while it arrives, and a row
//! per thumbnail goes into PostgreSQL through the app's own connection pool.
//!
//! The two video demos (`video_thumbnails` in a terminal, `web_thumbnails`
//! in a browser) wrap [`cut_thumbnails`] in a `#[flame::remote]` function of
//! their own, so that it runs on a runner.

use std::process::Stdio;

use bytes::Bytes;
use flame::Stream;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The table the thumbnails' rows go to.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS thumbnails (id serial PRIMARY KEY, \
     video text NOT NULL, at_secs int NOT NULL, bytes int NOT NULL, made_by text NOT NULL)";

/// The app's database: a connection pool, built once in `main` in parent
/// and runners alike.
#[derive(Clone)]
pub struct Db(pub deadpool_postgres::Pool);

impl Db {
    /// A pool of at most 4 connections to `url` (connected lazily).
    pub fn connect(url: &str) -> anyhow::Result<Db> {
        let config: tokio_postgres::Config = url.parse()?;
        let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
        Ok(Db(deadpool_postgres::Pool::builder(manager)
            .max_size(4)
            .build()?))
    }
}

/// Creates the thumbnails table if it is missing. Several parents may do
/// this at once (replicas of a web app): an advisory lock keeps their
/// `CREATE TABLE IF NOT EXISTS` from racing.
pub async fn create_schema(client: &tokio_postgres::Client) -> anyhow::Result<()> {
    client
        .batch_execute(&format!(
            "SELECT pg_advisory_lock(7215); {SCHEMA}; SELECT pg_advisory_unlock(7215);"
        ))
        .await?;
    Ok(())
}

/// One thumbnail, as the runner sends it back.
#[derive(Debug, Serialize, Deserialize)]
pub struct Thumbnail {
    /// Position in the video, in seconds.
    pub at_secs: u32,
    /// The JPEG.
    pub jpeg: Bytes,
    /// The runner that made it.
    pub runner: String,
}

/// Cuts a thumbnail every `every` seconds out of `video` while it arrives,
/// inserts a row per thumbnail (`video` column: `name`) and yields each
/// thumbnail the moment ffmpeg has written it. Meant to run on a runner:
/// `made_by` is the runner's id.
pub fn cut_thumbnails(
    db: Db,
    mut video: Stream<Bytes>,
    name: String,
    every: u32,
) -> impl futures::Stream<Item = Result<Thumbnail, String>> + Send {
    let runner = flame::parent().map(|p| p.runner_id).unwrap_or_default();
    async_stream(move |tx| async move {
        let every = every.max(1);
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
        let mut feeding = AbortOnDrop(feeding);
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
        // The video itself failed to arrive (the upload broke off).
        feeding.join().await.map_err(|e| e.to_string())??;
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
/// stream's last item, and dropping the stream stops the task.
pub fn async_stream<T, F, Fut>(body: F) -> impl futures::Stream<Item = Result<T, String>> + Send
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

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    /// Waits for the task (which is still aborted if this wait is).
    async fn join(&mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Cuts a byte stream of concatenated JPEGs (ffmpeg's image2pipe) into
/// images, at the end-of-image marker.
#[derive(Debug, Default)]
pub struct JpegSplitter {
    pending: Vec<u8>,
}

impl JpegSplitter {
    /// Adds `data`; returns the images it completed.
    pub fn push(&mut self, data: &[u8]) -> Vec<Bytes> {
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

/// The ffmpeg arguments of a `seconds`-long 320x240 test video (ffmpeg's
/// `testsrc`, with its running clock) as MPEG-TS, which can be read from a
/// pipe. `realtime` makes ffmpeg write it at playback speed, the way a
/// long upload arrives.
fn test_video_args(seconds: u32, realtime: bool) -> Vec<String> {
    let mut args: Vec<String> = ["-hide_banner", "-loglevel", "error"]
        .map(String::from)
        .to_vec();
    if realtime {
        args.push("-re".into());
    }
    args.extend(
        [
            "-f",
            "lavfi",
            "-i",
            &format!("testsrc=duration={seconds}:size=320x240:rate=25"),
            "-c:v",
            "mpeg2video",
            "-q:v",
            "4",
            "-f",
            "mpegts",
        ]
        .map(String::from),
    );
    args
}

/// Writes a `seconds`-long test video (see [`sample_video`]) to
/// `dir/testsrc.ts`.
pub async fn make_test_video(
    dir: &std::path::Path,
    seconds: u32,
) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("testsrc.ts");
    let status = tokio::process::Command::new("ffmpeg")
        .args(test_video_args(seconds, false))
        .arg("-y")
        .arg(&path)
        .status()
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot run ffmpeg ({e}); install it: apt-get install ffmpeg")
        })?;
    anyhow::ensure!(status.success(), "ffmpeg could not make a test video");
    Ok(path)
}

/// A `seconds`-long test video made on the fly: ffmpeg's `testsrc` as
/// MPEG-TS, read from ffmpeg's output as it is made (nothing is written to
/// disk). With `realtime` it comes at playback speed. ffmpeg is killed when
/// the reader is dropped.
pub fn sample_video(seconds: u32, realtime: bool) -> anyhow::Result<SampleVideo> {
    let mut child = tokio::process::Command::new("ffmpeg")
        .args(test_video_args(seconds, realtime))
        .arg("pipe:1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!("cannot run ffmpeg ({e}); install it: apt-get install ffmpeg")
        })?;
    let stdout = child.stdout.take().expect("piped");
    Ok(SampleVideo {
        _child: child,
        stdout,
    })
}

/// A test video as ffmpeg makes it: an [`tokio::io::AsyncRead`].
#[derive(Debug)]
pub struct SampleVideo {
    _child: tokio::process::Child,
    stdout: tokio::process::ChildStdout,
}

impl tokio::io::AsyncRead for SampleVideo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stdout).poll_read(cx, buf)
    }
}
