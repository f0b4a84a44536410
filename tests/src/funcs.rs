//! Remote functions the tests call. Registered in both the test binaries and
//! the runner app.

use std::time::Duration;

use flame::State;
use serde::{Deserialize, Serialize};

/// Returns its argument.
#[flame::remote]
pub async fn echo(data: Vec<u8>) -> Vec<u8> {
    data
}

/// `data` reversed, or an error for empty data: a `Vec<u8>` argument and
/// a `Result<Vec<u8>, _>` result, which travel as blocks of bytes.
#[flame::remote]
pub fn reversed(data: Vec<u8>, tag: u8) -> Result<Vec<u8>, String> {
    if data.is_empty() {
        return Err(format!("nothing to reverse (tag {tag})"));
    }
    let mut data = data;
    data.reverse();
    Ok(data)
}

/// The part of `data` from `from` on, or an error past its end: a `Bytes`
/// argument and a `Result<Bytes, _>` result, which decode as slices of
/// the message they came in.
#[flame::remote]
pub async fn tail(data: bytes::Bytes, from: usize) -> Result<bytes::Bytes, String> {
    if from > data.len() {
        return Err(format!("{from} is past the end ({})", data.len()));
    }
    Ok(data.slice(from..))
}

/// Blocks its thread for `ms` (a plain function that may block).
#[flame::remote]
pub fn nap(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

/// Logs `text` at WARN with a field `n = 7` (tests/tests/runner_logs.rs).
#[flame::remote]
pub async fn log_line(text: String) {
    tracing::warn!(n = 7, "{text}");
}

/// Adds two numbers (a plain, non-async function).
#[flame::remote]
pub fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// Where a call ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Whereabouts {
    /// Process id of the runner.
    pub pid: u32,
    /// The runner's id.
    pub runner: String,
}

/// Reports where it ran.
#[flame::remote]
pub async fn whereabouts() -> Whereabouts {
    Whereabouts {
        pid: std::process::id(),
        runner: flame::parent().map(|p| p.runner_id).unwrap_or_default(),
    }
}

/// An error of the app's own, carried back to the caller intact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppError {
    /// Refused input.
    Invalid(String),
}

/// Fails with the app's own error for negative input.
#[flame::remote]
pub async fn checked_sqrt(x: f64) -> Result<f64, AppError> {
    if x < 0.0 {
        Err(AppError::Invalid(format!("{x} is negative")))
    } else {
        Ok(x.sqrt())
    }
}

/// Panics with the given message (on the runtime).
#[flame::remote]
pub async fn explode(message: String) -> u32 {
    panic!("{message}");
}

/// Panics with the given message (on the blocking pool).
#[flame::remote]
pub fn explode_blocking(message: String) -> u32 {
    panic!("{message}");
}

/// Sleeps, then writes `path` (if not empty) so tests can tell whether the
/// work ran to the end.
#[flame::remote]
pub async fn sleep_then_mark(ms: u64, path: String) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    if !path.is_empty() {
        std::fs::write(&path, b"done").expect("write marker");
    }
    ms
}

/// Writes `contents` to `path`: the effect a cast test waits for.
#[flame::remote]
pub async fn write_file(path: String, contents: String) {
    std::fs::write(&path, contents).expect("write file");
}

/// Returns `n` bytes.
#[flame::remote]
pub async fn bytes_of(n: usize) -> Vec<u8> {
    vec![7u8; n]
}

/// A value that refuses to be serialized.
#[derive(Debug, Deserialize)]
pub struct Unserializable;

impl Serialize for Unserializable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("Unserializable refuses"))
    }
}

/// Returns a value that cannot be encoded.
#[flame::remote]
pub async fn unencodable() -> Unserializable {
    Unserializable
}

/// Takes a value that cannot be encoded.
#[flame::remote]
pub async fn takes_unserializable(_v: Unserializable) {}

/// Burns CPU without awaiting: counts primes below `n`.
#[flame::remote]
pub fn count_primes(n: u64) -> u64 {
    (2..n)
        .filter(|&k| (2..).take_while(|d| d * d <= k).all(|d| k % d != 0))
        .count() as u64
}

/// Calls running at once in this process right now, and the most ever.
static RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static PEAK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Sleeps `ms` and returns how many `counted_sleep` calls this runner
/// process ever ran at once: a count kept on the runner side.
#[flame::remote]
pub async fn counted_sleep(ms: u64) -> Peak {
    use std::sync::atomic::Ordering;
    let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
    PEAK.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    RUNNING.fetch_sub(1, Ordering::SeqCst);
    Peak {
        pid: std::process::id(),
        peak: PEAK.load(Ordering::SeqCst),
    }
}

/// What [`counted_sleep()`] reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peak {
    /// Process id of the runner.
    pub pid: u32,
    /// Most `counted_sleep` calls the runner ever ran at once.
    pub peak: usize,
}

/// `x * x`, except that it panics for every `x` with `x % 7 == 3`: a
/// function that fails for some items of a `map`.
#[flame::remote]
pub async fn square_unless_3_mod_7(x: u64) -> u64 {
    if x % 7 == 3 {
        panic!("{x} is 3 mod 7");
    }
    x * x
}

/// Allocates `mb` MiB and touches every page; returns `mb`. Under a
/// memory limit smaller than that, the runner runs out of memory.
#[flame::remote]
pub fn allocate_mb(mb: usize) -> usize {
    let block = vec![1u8; mb << 20];
    std::hint::black_box(&block);
    block.len() >> 20
}

/// A per-runner sequence number: the order in which calls reached it.
#[flame::remote]
pub async fn next_seq() -> u64 {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
}

/// Writes `path` as soon as it starts, then sleeps `ms`: tests wait for the
/// file to know the work is running.
#[flame::remote]
pub async fn mark_then_sleep(path: String, ms: u64) -> u32 {
    // Written whole, then renamed: a test never reads a half-written file.
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, std::process::id().to_string()).expect("write marker");
    std::fs::rename(&tmp, &path).expect("rename marker");
    tokio::time::sleep(Duration::from_millis(ms)).await;
    std::process::id()
}

/// Environment variable naming a file whose existence keeps idle runners up
/// (see [`may_idle_down()`]).
pub const KEEP_FILE_ENV: &str = "FLAME_TEST_KEEP_FILE";

/// Idle check for tests: stay up while the file named by [`KEEP_FILE_ENV`]
/// exists. Each time it is asked it appends a line to that name plus
/// `.asked`, so tests can see it was consulted.
#[flame::remote]
pub async fn may_idle_down() -> bool {
    use std::io::Write;
    let Ok(path) = std::env::var(KEEP_FILE_ENV) else {
        return true;
    };
    let mut asked = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(format!("{path}.asked"))
        .expect("open .asked");
    writeln!(asked, "asked").expect("append");
    !std::path::Path::new(&path).exists()
}

/// Waits until `path` exists (checking every 10 ms), for at most `limit_ms`;
/// returns whether it appeared. Lets a test hold a slot as long as it likes.
#[flame::remote]
pub async fn wait_for_file(path: String, limit_ms: u64) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(limit_ms);
    while tokio::time::Instant::now() < deadline {
        if std::path::Path::new(&path).exists() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// The value of an environment variable on the runner.
#[flame::remote]
pub async fn env_var(name: String) -> Option<String> {
    std::env::var(name).ok()
}

/// Inline-block call sites. They live in this shared library because an
/// inline block is registered where it is written, and the runner app must
/// have it too (in a real app, parent and runner are one binary).
pub mod inline {
    use flame::{Error, Pool};

    /// Joins words on a runner with an inline block capturing two variables.
    pub async fn join_remotely(
        pool: &Pool,
        words: Vec<String>,
        sep: String,
    ) -> Result<(String, u32), Error> {
        flame::call!(pool, |words: Vec<String>, sep: String| -> (String, u32) {
            (words.join(&sep), std::process::id())
        })
        .await
    }

    /// An async inline block that awaits.
    pub async fn sleep_remotely(pool: &Pool, ms: u64) -> Result<u64, Error> {
        flame::call!(pool, async |ms: u64| -> u64 {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            ms
        })
        .await
    }

    /// An inline block with no captures and no return value.
    pub async fn nothing(pool: &Pool) -> Result<(), Error> {
        flame::call!(pool, || {}).await
    }

    /// An inline block returning its own error type.
    pub async fn at_most_two(pool: &Pool, n: u32) -> Result<Result<u32, String>, Error> {
        flame::call!(pool, |n: u32| -> Result<u32, String> {
            if n > 2 {
                Err(format!("{n} is too many"))
            } else {
                Ok(n)
            }
        })
        .await
    }

    /// An inline block taking the app's database as state.
    pub async fn insert_inline(pool: &Pool, extra: String) -> Result<Result<u64, String>, Error> {
        flame::call!(pool, state(db: super::Db), async |extra: String| -> Result<u64, String> {
            db.insert(&[extra], "inline").await
        })
        .await
    }

    /// A plain inline block taking state beside a shipped argument.
    pub async fn greeting_plus(pool: &Pool, x: usize) -> Result<usize, Error> {
        flame::call!(pool, state(g: super::Greeting), |x: usize| -> usize { g.0.len() + x }).await
    }

    /// An inline cast writing a file.
    pub fn write_later(pool: &Pool, path: String) -> Result<(), Error> {
        flame::cast!(pool, |path: String| {
            std::fs::write(path, "inline").unwrap();
        })
    }
}

/// A value whose decoding panics on the string `"boom"`: crafted argument
/// bytes that make a `Deserialize` impl panic on the runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Touchy(pub String);

impl<'de> Deserialize<'de> for Touchy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "boom" {
            panic!("Touchy cannot bear `boom`");
        }
        Ok(Touchy(s))
    }
}

/// Takes a [`Touchy`] (on the runtime).
#[flame::remote]
pub async fn touchy(t: Touchy) -> String {
    t.0
}

/// Takes a [`Touchy`] (on the blocking pool).
#[flame::remote]
pub fn touchy_blocking(t: Touchy) -> String {
    t.0
}

/// Environment variable naming the file [`slow_idle_check()`] appends to.
pub const SLOW_CHECK_FILE_ENV: &str = "FLAME_TEST_SLOW_CHECK_FILE";

/// A slow idle check that always says stay up: appends `start` to the file
/// named by [`SLOW_CHECK_FILE_ENV`], sleeps 900 ms, appends `end`.
#[flame::remote]
pub async fn slow_idle_check() -> bool {
    use std::io::Write;
    let append = |line: &str| {
        if let Ok(path) = std::env::var(SLOW_CHECK_FILE_ENV) {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("open slow check file");
            writeln!(f, "{line}").expect("append");
        }
    };
    append("start");
    tokio::time::sleep(Duration::from_millis(900)).await;
    append("end");
    false
}

/// Environment variable with the PostgreSQL URL the test app's [`Db`] uses.
pub const PG_URL_ENV: &str = "FLAME_TEST_PG_URL";

/// The test app's database: a pool of connections to `FLAME_TEST_PG_URL`,
/// built once in `main` (parent and runner alike) and handed to flame as
/// state. Connections are made on first use, so the many tests without
/// PostgreSQL never connect.
#[derive(Clone)]
pub struct Db(pub deadpool_postgres::Pool);

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Db")
    }
}

impl Db {
    /// A pool for the URL in [`PG_URL_ENV`], or for an address where no
    /// server listens when it is not set.
    pub fn from_env() -> Db {
        let url = std::env::var(PG_URL_ENV)
            .unwrap_or_else(|_| "postgres://nobody@127.0.0.1:1/none".to_string());
        let config: tokio_postgres::Config = url.parse().expect("a PostgreSQL URL");
        let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(4)
            .build()
            .expect("a connection pool");
        Db(pool)
    }

    /// Inserts `names` into `thumbnails`, returning how many rows went in.
    pub async fn insert(&self, names: &[String], made_by: &str) -> Result<u64, String> {
        let client = self.0.get().await.map_err(|e| e.to_string())?;
        let mut rows = 0;
        for name in names {
            rows += client
                .execute(
                    "INSERT INTO thumbnails (name, made_by) VALUES ($1, $2)",
                    &[name, &made_by],
                )
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(rows)
    }
}

/// Inserts rows through the app's own database pool, on the runner.
#[flame::remote]
pub async fn insert_thumbnails(State(db): State<Db>, names: Vec<String>) -> Result<u64, String> {
    let runner = flame::parent().map(|p| p.runner_id).unwrap_or_default();
    db.insert(&names, &runner).await
}

/// A plain (blocking) function that takes state among shipped arguments.
#[flame::remote]
pub fn greet(prefix: String, State(greeting): State<Greeting>, name: String) -> String {
    format!("{prefix}{}, {name}", greeting.0)
}

/// The test app's second piece of state.
#[derive(Debug, Clone)]
pub struct Greeting(pub String);

/// Streams as arguments and results.
pub mod streams {
    use bytes::Bytes;
    use flame::Stream;
    use futures::StreamExt;

    /// Works through `steps` steps of `ms` each, reporting each one on
    /// `progress` as it is done; returns the number of steps.
    #[flame::remote]
    pub async fn with_progress(steps: u32, ms: u64, progress: flame::Sender<String>) -> u32 {
        for step in 1..=steps {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            let _ = progress.send(format!("step {step} of {steps}")).await;
        }
        steps
    }

    /// Writes a byte stream into a new file `name` in `dir` with
    /// `tokio::io::copy`, and returns its size: no glue, the way local
    /// code is written (`into_reader`, and `?` on io errors).
    #[flame::remote]
    pub async fn save_to(
        data: Stream<Bytes>,
        dir: String,
        name: String,
    ) -> Result<u64, flame::RemoteError> {
        let mut file = tokio::fs::File::create(std::path::Path::new(&dir).join(name)).await?;
        let size = tokio::io::copy(&mut data.into_reader(), &mut file).await?;
        Ok(size)
    }

    /// Reads a byte stream to its end: its length and the sum of its bytes,
    /// or the error that ended it.
    #[flame::remote]
    pub async fn count_bytes(mut data: Stream<Bytes>) -> Result<(u64, u64), String> {
        let (mut len, mut sum) = (0u64, 0u64);
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            len += chunk.len() as u64;
            sum = chunk.iter().fold(sum, |s, b| s.wrapping_add(*b as u64));
        }
        Ok((len, sum))
    }

    /// The numbers 1 to `n`, made as they are read.
    #[flame::remote]
    pub async fn numbers(n: u32) -> Stream<u32> {
        Stream::new(futures::stream::iter(1..=n))
    }

    /// Upper-cases a byte stream as it flows through.
    #[flame::remote]
    pub async fn upper(data: Stream<Bytes>) -> Stream<Bytes> {
        Stream::try_new(data.map(|chunk| chunk.map(|c| Bytes::from(c.to_ascii_uppercase()))))
    }

    /// The numbers 1 to `n`, then an error instead of `n + 1`.
    #[flame::remote]
    pub async fn numbers_then_error(n: u32) -> Stream<u32> {
        let items = (1..=n + 1).map(move |i| {
            if i <= n {
                Ok(i)
            } else {
                Err(format!("gave up after {n}"))
            }
        });
        Stream::try_new(futures::stream::iter(items))
    }

    /// Numbers without end; writes `marker` when the stream is dropped on
    /// the runner (its reader went away).
    #[flame::remote]
    pub async fn endless(marker: String) -> Stream<u64> {
        struct OnDrop(String);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                let _ = std::fs::write(&self.0, "dropped");
            }
        }
        let guard = OnDrop(marker);
        Stream::new(futures::stream::iter(0u64..).map(move |i| {
            let _ = &guard;
            i
        }))
    }

    /// `n` numbers, then the runner process dies.
    #[flame::remote]
    pub async fn numbers_then_die(n: u32) -> Stream<u32> {
        Stream::new(futures::stream::iter(1..=n + 1).map(move |i| {
            if i > n {
                std::process::exit(9);
            }
            i
        }))
    }

    /// Reads two chunks of a stream and stops reading.
    #[flame::remote]
    pub async fn read_two(mut data: Stream<Bytes>) -> u64 {
        let mut n = 0;
        for _ in 0..2 {
            if let Some(Ok(chunk)) = data.next().await {
                n += chunk.len() as u64;
            }
        }
        n
    }

    /// One item of `size` bytes.
    #[flame::remote]
    pub async fn one_big_item(size: usize) -> Stream<Bytes> {
        Stream::new(futures::stream::iter([Bytes::from(vec![7u8; size])]))
    }

    /// Reads one chunk of `data`, sends this runner's pid on `pid`, then
    /// waits a minute holding `data` unread.
    #[flame::remote]
    pub async fn hold_stream(mut data: Stream<Bytes>, pid: flame::Sender<u32>) -> u64 {
        let first = data.next().await;
        let _ = pid.send(std::process::id()).await;
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        first.map_or(0, |c| c.map_or(0, |c| c.len() as u64))
    }
}

/// Children: long-lived work on a runner, talking over channels.
pub mod children {
    use std::time::Duration;

    use flame::{Sender, Stream};
    use futures::StreamExt;
    use serde::{Deserialize, Serialize};

    /// What a [`counter()`] child is told.
    #[derive(Debug, Serialize, Deserialize)]
    pub enum CounterMsg {
        /// Add to the total (reported on the events channel).
        Add(u64),
        /// A request: the total is sent back on the given channel.
        Get(Sender<u64>),
        /// End, returning the total.
        Stop,
    }

    /// Counts what it is sent, from `start`; reports each addition on
    /// `events`; answers `Get`; returns the total at `Stop` (or when its
    /// inbox ends).
    #[flame::remote]
    pub async fn counter(mut inbox: Stream<CounterMsg>, events: Sender<String>, start: u64) -> u64 {
        let mut total = start;
        while let Some(msg) = inbox.next().await {
            match msg {
                Ok(CounterMsg::Add(n)) => {
                    total += n;
                    let _ = events.send(format!("added {n}, total {total}")).await;
                }
                Ok(CounterMsg::Get(reply)) => {
                    let _ = reply.send(total).await;
                }
                Ok(CounterMsg::Stop) | Err(_) => break,
            }
        }
        total
    }

    /// Sends its pid, then 0, 1, 2, ... every 50 ms on `ticks` until the
    /// receiver is gone; writes `marker` when it is dropped (stopped).
    #[flame::remote]
    pub async fn ticker(ticks: Sender<u32>, marker: String) -> u32 {
        struct OnDrop(String);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                let _ = std::fs::write(&self.0, "dropped");
            }
        }
        let _guard = OnDrop(marker);
        if ticks.send(std::process::id()).await.is_err() {
            return 0;
        }
        let mut i = 0;
        while ticks.send(i).await.is_ok() {
            i += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        i
    }

    /// Ends `events` with an error at once.
    #[flame::remote]
    pub async fn gives_up(events: Sender<String>) -> u32 {
        events.fail("child gave up").await;
        0
    }

    /// Holds `inbox` for `ms` without reading it; returns how many messages
    /// it then finds waiting.
    #[flame::remote]
    pub async fn never_reads(mut inbox: Stream<u32>, ms: u64) -> u32 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let mut n = 0;
        while let Ok(Some(Ok(_))) =
            tokio::time::timeout(Duration::from_millis(200), inbox.next()).await
        {
            n += 1;
        }
        n
    }

    /// Sends 0, 1, 2, ... on `out`, which nobody reads, until a send waits
    /// for `wait_ms`; returns how many sends completed.
    #[flame::remote]
    pub async fn floods(out: Sender<u32>, wait_ms: u64) -> u32 {
        let mut sent = 0;
        while sent < 1000 {
            match tokio::time::timeout(Duration::from_millis(wait_ms), out.send(sent)).await {
                Ok(Ok(())) => sent += 1,
                _ => break,
            }
        }
        sent
    }

    /// Panics after a moment.
    #[flame::remote]
    pub async fn breaks_down() -> u32 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        panic!("the child broke down");
    }
}
