//! The FLAME announcement's web demo, in Rust: upload a video in the
//! browser and watch thumbnails appear while it uploads, each made by a
//! runner, a short-lived copy of this very app.
//!
//! ```text
//! scripts/demo                       # installs what is missing, then runs this
//! cargo run --release -p flame-examples --bin web_thumbnails [-- --once]
//! ```
//!
//! The upload streams to a runner as it arrives (the parent keeps no copy
//! of the file); the runner cuts a thumbnail every few seconds with ffmpeg,
//! inserts a row per thumbnail into PostgreSQL through the app's own
//! connection pool (app state, as the seed's `Repo.insert_all` does), and
//! sends each thumbnail back the moment it exists; the parent pushes it to
//! the page over server-sent events, along with the pool's runners as they
//! boot, work, idle down and leave. Runners are this binary started by
//! flame: they never start the web server.
//!
//! `--once` uploads generated sample videos to the app over HTTP, prints
//! what happens, checks the thumbnails and rows, waits for the pool to idle
//! back to zero and exits (0 when all went well).
//!
//! Settings, from the environment:
//!
//! | variable | default |
//! |---|---|
//! | `LISTEN` | `127.0.0.1:8080` (another free port when taken) |
//! | `DATABASE_URL` | a private PostgreSQL, started and stopped with the app |
//! | `NATS_URL` | a private nats-server, started and stopped with the app |
//! | `THUMBS_MAX` | 3 runners at most |
//! | `THUMBS_CONCURRENCY` | 1 upload per runner at a time |
//! | `THUMBS_IDLE_SECS` | 10 (3 with `--once`): a runner idle this long leaves |
//! | `THUMBS_EVERY` | a thumbnail every 2 seconds of video |
//! | `THUMBS_SHARED` | `1`: one pool shared by every parent on the NATS server |
//! | `FLAME_BACKEND` | `local`: runners are child processes; `docker`: containers of this app's image, made from the parent's own container (its networks and variables; see the README's "Running on Docker") |

mod once;
mod panel;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State as AxumState};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use bytes::{Bytes, BytesMut};
use flame::{State, Stream};
use flame_examples::video::{self, Db, Thumbnail};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Cuts a thumbnail every `every` seconds out of `video` while it arrives,
/// stores a row for each, and sends each back as it is made. Runs on a
/// runner.
#[flame::remote]
async fn thumbnails(
    State(db): State<Db>,
    video: Stream<Bytes>,
    job: String,
    every: u32,
) -> Stream<Thumbnail> {
    Stream::try_new(video::cut_thumbnails(db, video, job, every))
}

/// The pool's name.
const POOL: &str = "thumbs";

/// Chunks of an upload sent to the runner: at most this size.
const CHUNK: usize = 128 * 1024;

/// The settings (see the module's docs).
#[derive(Debug, Clone, Serialize)]
struct Settings {
    pool: &'static str,
    max: usize,
    concurrency: usize,
    idle_secs: u64,
    every: u32,
    shared: bool,
}

impl Settings {
    fn from_env(once: bool) -> anyhow::Result<Settings> {
        fn var<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
            match std::env::var(name) {
                Ok(v) if !v.is_empty() => v
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{name}={v} is not a valid value")),
                _ => Ok(default),
            }
        }
        Ok(Settings {
            pool: POOL,
            max: var("THUMBS_MAX", 3usize)?.max(1),
            concurrency: var("THUMBS_CONCURRENCY", 1usize)?.max(1),
            idle_secs: var("THUMBS_IDLE_SECS", if once { 3u64 } else { 10 })?,
            every: var("THUMBS_EVERY", 2u32)?.max(1),
            shared: matches!(
                std::env::var("THUMBS_SHARED").as_deref(),
                Ok("1" | "true" | "yes")
            ),
        })
    }
}

/// What the page is told, as one server-sent event.
#[derive(Debug, Clone)]
struct PageEvent {
    name: &'static str,
    data: String,
}

impl PageEvent {
    fn new(name: &'static str, data: &impl Serialize) -> PageEvent {
        PageEvent {
            name,
            data: serde_json::to_string(data).expect("serializable"),
        }
    }
}

/// The web app's state.
#[derive(Clone)]
struct App {
    settings: Arc<Settings>,
    pool: flame::Pool,
    db: Db,
    events: broadcast::Sender<PageEvent>,
    panel: Arc<panel::Panel>,
    jobs: Arc<AtomicU64>,
    /// This parent's uploads waiting for a runner.
    waiting: Arc<AtomicUsize>,
    /// Short id of this parent, to tell the jobs of several apart.
    parent: String,
    /// Cancelled when the app stops: ends the event streams.
    stopping: CancellationToken,
}

/// One upload's progress, as the page is told it.
#[derive(Debug, Clone, Serialize)]
struct JobEvent {
    job: String,
    name: String,
    status: &'static str,
    thumbnails: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// One thumbnail, as the page is told it.
#[derive(Debug, Serialize)]
struct ThumbEvent<'a> {
    job: &'a str,
    index: usize,
    at_secs: u32,
    runner: &'a str,
    bytes: usize,
    /// Since the upload started.
    ms: u128,
    /// The JPEG as a data URL.
    src: String,
}

/// What an upload returns when it is done.
#[derive(Debug, Serialize, Deserialize)]
struct JobSummary {
    job: String,
    name: String,
    thumbnails: usize,
    runners: Vec<String>,
    secs: f64,
}

impl App {
    fn send(&self, event: PageEvent) {
        let _ = self.events.send(event);
    }

    /// An upload starts (`true`) or stops (`false`) waiting for a runner:
    /// tells the page how many wait.
    fn upload_waits(&self, waits: bool) {
        let now = if waits {
            self.waiting.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            self.waiting.fetch_sub(1, Ordering::SeqCst) - 1
        };
        let status = panel::StatusView { waiting: now };
        self.panel.set_status(status);
        self.send(PageEvent::new("pool", &status));
    }

    /// Streams `video` to a runner and relays its thumbnails to the page.
    async fn process(&self, name: String, video: Stream<Bytes>) -> Result<JobSummary, String> {
        let n = self.jobs.fetch_add(1, Ordering::Relaxed) + 1;
        let job = format!("{}-{n}", self.parent);
        let mut progress = JobEvent {
            job: job.clone(),
            name: name.clone(),
            status: "started",
            thumbnails: 0,
            secs: None,
            error: None,
        };
        self.send(PageEvent::new("job", &progress));
        let started = Instant::now();
        let result = self.relay(&job, video, started, &mut progress).await;
        progress.secs = Some(started.elapsed().as_secs_f64());
        match &result {
            Ok(_) => progress.status = "done",
            Err(e) => {
                progress.status = "failed";
                progress.error = Some(e.clone());
            }
        }
        self.send(PageEvent::new("job", &progress));
        let runners = result?;
        Ok(JobSummary {
            job,
            name,
            thumbnails: progress.thumbnails,
            runners,
            secs: started.elapsed().as_secs_f64(),
        })
    }

    async fn relay(
        &self,
        job: &str,
        video: Stream<Bytes>,
        started: Instant,
        progress: &mut JobEvent,
    ) -> Result<Vec<String>, String> {
        let every = self.settings.every;
        // Waiting from now until a runner took the upload (it answers with
        // the stream of thumbnails at once).
        self.upload_waits(true);
        let call = flame::call!(self.pool, thumbnails(video, job.to_string(), every)).await;
        self.upload_waits(false);
        let mut thumbs = call.map_err(|e| e.to_string())?;
        let mut runners = Vec::new();
        while let Some(thumb) = thumbs.next().await {
            let thumb = thumb.map_err(|e| e.to_string())?;
            if !runners.contains(&thumb.runner) {
                runners.push(thumb.runner.clone());
            }
            let src = format!(
                "data:image/jpeg;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(&thumb.jpeg)
            );
            self.send(PageEvent::new(
                "thumb",
                &ThumbEvent {
                    job,
                    index: progress.thumbnails,
                    at_secs: thumb.at_secs,
                    runner: &thumb.runner,
                    bytes: thumb.jpeg.len(),
                    ms: started.elapsed().as_millis(),
                    src,
                },
            ));
            progress.thumbnails += 1;
        }
        Ok(runners)
    }
}

#[derive(Debug, Deserialize)]
struct UploadQuery {
    name: Option<String>,
}

/// `POST /upload?name=clip.mp4`, the video as the body: streamed to a
/// runner as it arrives.
async fn upload(
    AxumState(app): AxumState<App>,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Response {
    let name = q.name.filter(|n| !n.is_empty()).unwrap_or("video".into());
    let video = Stream::try_new(Coalesce::new(body.into_data_stream()));
    respond(app.process(name, video).await)
}

#[derive(Debug, Deserialize)]
struct SampleQuery {
    seconds: Option<u32>,
    realtime: Option<bool>,
}

/// `POST /sample?seconds=20&realtime=true`: a test video made by ffmpeg
/// on the parent as it streams to the runner (at playback speed with
/// `realtime`, the way a long upload arrives).
async fn sample(AxumState(app): AxumState<App>, Query(q): Query<SampleQuery>) -> Response {
    let seconds = q.seconds.unwrap_or(20).clamp(1, 600);
    let realtime = q.realtime.unwrap_or(true);
    let reader = match video::sample_video(seconds, realtime) {
        Ok(r) => r,
        Err(e) => return respond(Err(e.to_string())),
    };
    let name = format!("sample ({seconds} s test video)");
    respond(app.process(name, Stream::from_reader(reader)).await)
}

fn respond(result: Result<JobSummary, String>) -> Response {
    match result {
        Ok(summary) => Json(summary).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

/// `GET /events`: the page's server-sent events: `hello` (the settings),
/// then `runner` (the runners panel), `pool` (its counts), `job` and
/// `thumb`.
async fn event_stream(AxumState(app): AxumState<App>) -> impl IntoResponse {
    // Subscribe before the snapshot, so that no change falls in between
    // (the page takes a repeated event in its stride).
    let rx = app.events.subscribe();
    let mut first = vec![PageEvent::new("hello", &*app.settings)];
    first.extend(
        app.panel
            .snapshot()
            .iter()
            .map(|e| PageEvent::new("runner", e)),
    );
    first.extend(app.panel.status().map(|s| PageEvent::new("pool", &s)));
    let live = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(event) => return Some((event, rx)),
                // A slow page misses some events rather than slowing others.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let stream = futures::stream::iter(first)
        .chain(live)
        .take_until(app.stopping.clone().cancelled_owned())
        .map(|e| Ok::<_, std::convert::Infallible>(Event::default().event(e.name).data(e.data)));
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[derive(Debug, Serialize)]
struct Row {
    at_secs: i32,
    bytes: i32,
    made_by: String,
}

/// `GET /api/jobs/{job}/rows`: the job's rows in PostgreSQL.
async fn rows(AxumState(app): AxumState<App>, Path(job): Path<String>) -> Response {
    let rows = async {
        let client = app.db.0.get().await.map_err(|e| e.to_string())?;
        client
            .query(
                "SELECT at_secs, bytes, made_by FROM thumbnails WHERE video = $1 ORDER BY at_secs",
                &[&job],
            )
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    match rows {
        Ok(rows) => Json(
            rows.iter()
                .map(|r| Row {
                    at_secs: r.get(0),
                    bytes: r.get(1),
                    made_by: r.get(2),
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

/// `GET /`: the page, with the settings filled in.
async fn page(AxumState(app): AxumState<App>) -> Html<String> {
    let s = &app.settings;
    let mode = if s.shared {
        "shared by every parent on the NATS server"
    } else {
        "this parent's own"
    };
    Html(
        include_str!("page.html")
            .replace("{{POOL}}", s.pool)
            .replace("{{MAX}}", &s.max.to_string())
            .replace("{{CONCURRENCY}}", &s.concurrency.to_string())
            .replace("{{IDLE}}", &s.idle_secs.to_string())
            .replace("{{EVERY}}", &s.every.to_string())
            .replace("{{MODE}}", mode)
            .replace("{{PARENT}}", &app.parent),
    )
}

/// Turns an HTTP body's frames (often a few KiB) into chunks of up to
/// [`CHUNK`] bytes: what is there goes on at once, nothing waits for more.
struct Coalesce<S> {
    inner: S,
    /// Read but not sent yet (less than a chunk, or the tail of a big frame).
    rest: Bytes,
    done: bool,
}

impl<S> Coalesce<S> {
    fn new(inner: S) -> Self {
        Coalesce {
            inner,
            rest: Bytes::new(),
            done: false,
        }
    }
}

impl<S, E> futures::Stream for Coalesce<S>
where
    S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.rest.len() >= CHUNK {
            return Poll::Ready(Some(Ok(this.rest.split_to(CHUNK))));
        }
        let mut buf = BytesMut::from(&std::mem::take(&mut this.rest)[..]);
        while !this.done {
            match this.inner.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    buf.extend_from_slice(&frame);
                    if buf.len() >= CHUNK {
                        let mut all = buf.freeze();
                        let chunk = all.split_to(CHUNK);
                        this.rest = all;
                        return Poll::Ready(Some(Ok(chunk)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => this.done = true,
                Poll::Pending if buf.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        Poll::Ready((!buf.is_empty()).then(|| Ok(buf.freeze())))
    }
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Parent and runners both run this. The database URL reaches runners
    // in DATABASE_URL (set below for the pool's runners).
    let database_url = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty());
    let app_builder = |url: &str| -> anyhow::Result<flame::FlameBuilder> {
        Ok(flame::FlameBuilder::new().state(Db::connect(url)?))
    };
    // A runner serves here and exits: it never starts the web server.
    app_builder(
        database_url
            .as_deref()
            .unwrap_or("postgres://unused@127.0.0.1:1/none"),
    )?
    .serve_if_runner()
    .await?;

    let args: Vec<String> = std::env::args().skip(1).collect();
    let once = args.iter().any(|a| a == "--once");
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: web_thumbnails [--once [--uploads N]]  (settings: see the source's docs)");
        return Ok(());
    }
    let uploads: usize = match args.iter().position(|a| a == "--uploads") {
        Some(i) => args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("--uploads takes a number"))?,
        None => 2,
    };
    let settings = Arc::new(Settings::from_env(once)?);

    let (_pg, database_url) = match database_url {
        Some(url) => (None, url),
        None => {
            let pg = tokio::task::spawn_blocking(flame_examples::postgres::PgServer::start).await?;
            let url = pg.url();
            println!("started a private PostgreSQL (set DATABASE_URL to use your own)");
            (Some(pg), url)
        }
    };
    let db = Db::connect(&database_url)?;
    video::create_schema(&*db.0.get().await?).await?;

    let flame = app_builder(&database_url)?.connect().await?;
    let builder = flame
        .pool(POOL)
        .max(settings.max)
        .max_concurrency(settings.concurrency)
        .shared(settings.shared)
        // A video of any length: a call lasts as long as its upload.
        .timeout(Duration::from_secs(3600))
        .idle_shutdown_after(Duration::from_secs(settings.idle_secs))
        .shutdown_timeout(Duration::from_secs(10));
    let builder = with_backend(builder, &database_url)?;
    // Subscribed before the pool starts: the panel misses no runner.
    let pool_events = panel::pool_events(flame.client(), POOL).await?;
    let pool = builder.start().await?;

    let (events, _) = broadcast::channel(1024);
    let app = App {
        settings: settings.clone(),
        pool: pool.clone(),
        db,
        events,
        panel: Arc::default(),
        jobs: Arc::default(),
        waiting: Arc::default(),
        parent: flame.parent_id()[..8].to_string(),
        stopping: CancellationToken::new(),
    };
    // The runners panel: the pool's events, loads included.
    let relay = {
        let app = app.clone();
        let pool = pool.clone();
        tokio::spawn(async move {
            let show = |event: panel::RunnerEvent| {
                app.panel.apply(&event);
                app.send(PageEvent::new("runner", &event));
            };
            for event in panel::present(&pool) {
                show(event);
            }
            let mut pool_events = std::pin::pin!(pool_events);
            while let Some(message) = pool_events.next().await {
                if let Some(event) = panel::runner_event(&message) {
                    show(event);
                }
            }
        })
    };

    let router = Router::new()
        .route("/", get(page))
        .route("/events", get(event_stream))
        .route("/upload", post(upload))
        .route("/sample", post(sample))
        .route("/api/jobs/{job}/rows", get(rows))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::disable())
        .with_state(app.clone());
    let listener = bind(once).await?;
    let addr = listener.local_addr()?;
    let url = format!("http://{}/", display_addr(addr));
    println!(
        "pool `{}`: at most {} runners, {} upload(s) each, idle after {} s{}",
        settings.pool,
        settings.max,
        settings.concurrency,
        settings.idle_secs,
        if settings.shared { ", shared" } else { "" }
    );
    let server = {
        let stopping = app.stopping.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stopping.cancelled_owned())
                .await
        })
    };

    let outcome = if once {
        let result = once::run(&url, uploads, &settings).await;
        app.stopping.cancel();
        result
    } else {
        println!("open {url}  (Ctrl-C stops the demo)");
        shutdown_signal().await;
        println!("stopping");
        app.stopping.cancel();
        Ok(())
    };
    let _ = server.await;
    pool.shutdown().await;
    relay.abort();
    flame.close().await;
    outcome
}

/// The pool's backend, as `FLAME_BACKEND` says: child processes (`local`,
/// the default) or containers of this app's image (`docker`). Either way
/// runners get the database's URL.
fn with_backend(
    pool: flame::PoolBuilder,
    database_url: &str,
) -> anyhow::Result<flame::PoolBuilder> {
    Ok(match std::env::var("FLAME_BACKEND").as_deref() {
        Ok("" | "local") | Err(_) => {
            pool.backend(flame::LocalBackend::new().env("DATABASE_URL", database_url))
        }
        Ok("docker") => pool.backend(
            flame::docker::DockerBackend::builder()
                .env("DATABASE_URL", database_url)
                .build()?,
        ),
        Ok(other) => anyhow::bail!("FLAME_BACKEND={other}: expected `local` or `docker`"),
    })
}

/// `LISTEN`, else 127.0.0.1:8080, else (taken) any free port; `--once`
/// takes any free port.
async fn bind(once: bool) -> anyhow::Result<tokio::net::TcpListener> {
    if once {
        return Ok(tokio::net::TcpListener::bind("127.0.0.1:0").await?);
    }
    if let Ok(listen) = std::env::var("LISTEN") {
        if !listen.is_empty() {
            return tokio::net::TcpListener::bind(&listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"));
        }
    }
    match tokio::net::TcpListener::bind("127.0.0.1:8080").await {
        Ok(l) => Ok(l),
        Err(e) => {
            println!("127.0.0.1:8080 is taken ({e}): using another port");
            Ok(tokio::net::TcpListener::bind("127.0.0.1:0").await?)
        }
    }
}

/// An address to put in a URL: the unspecified address as 127.0.0.1.
fn display_addr(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// Ctrl-C or SIGTERM (`docker stop`).
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
