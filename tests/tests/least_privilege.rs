//! Least privilege: pools run on a nats-server started from the repository's
//! `deploy/nats/least-privilege.conf`, parents and runners connecting as
//! different users with only the permissions flame documents. A user of
//! another account sees nothing; wrong credentials and missing permissions
//! give typed errors that say why (for runners: at boot, reported by the
//! pool), without the secret.
//!
//! "Missing permission" cases start the server from that same file with one
//! permission line taken out (written to the test's own directory), which
//! also shows that the line is needed.
//!
//! The file grants exactly the one documented list of permissions
//! (PROTOCOL.md, section 9.1): [`the_config_grants_exactly_the_documented_list`]
//! reads both and compares them, so that neither can drift.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use flame::embedded::NatsServer;
use flame::{CallOptions, Error, Flame, LocalBackend, PoolChange, Stream};
use flame_tests::funcs::streams::{count_bytes, numbers};
use flame_tests::funcs::{add, write_file};
use flame_tests::harness::{builder, init_tracing, runner_backend, wait_for, HookLog};
use futures::StreamExt;

/// The configuration under test, as shipped.
const CONFIG: &str = flame_tests::nats_config::LEAST_PRIVILEGE_CONFIG;

/// The protocol, whose section 9.1 is the one list of permissions.
const PROTOCOL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md");

/// The pool the configuration is written for.
const POOL: &str = "thumbs";

const LONG: Duration = Duration::from_secs(60);

/// A nats-server started from the configuration (or a copy with lines
/// taken out), with fresh passwords.
struct Secured {
    server: NatsServer,
    parent_password: String,
    runner_password: String,
    operator_password: String,
    outsider_password: String,
    /// The server's log.
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// Which block of the configuration a line is taken out of.
#[derive(Clone, Copy)]
enum Block {
    ParentPublish,
    ParentSubscribe,
    RunnerPublish,
    RunnerSubscribe,
    OperatorPublish,
    OperatorSubscribe,
}

impl Secured {
    /// The configuration as shipped.
    fn start() -> Secured {
        Secured::without(&[])
    }

    /// The configuration without the given lines, each in its block.
    fn without(lines: &[(Block, &str)]) -> Secured {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let mut config = std::fs::read_to_string(CONFIG).unwrap();
        let path = if lines.is_empty() {
            std::path::PathBuf::from(CONFIG)
        } else {
            for (block, line) in lines {
                config = take_out(&config, *block, line);
            }
            let path = dir.path().join("least-privilege.conf");
            std::fs::write(&path, &config).unwrap();
            path
        };
        let password = || uuid::Uuid::new_v4().simple().to_string();
        let (parent_password, runner_password, operator_password, outsider_password) =
            (password(), password(), password(), password());
        let log = dir.path().join("nats-server.log");
        let server = NatsServer::builder()
            .arg("-c")
            .arg(path.to_string_lossy())
            .arg("-l")
            .arg(log.to_string_lossy())
            .env("FLAME_PARENT_PASSWORD", &parent_password)
            .env("FLAME_RUNNER_PASSWORD", &runner_password)
            .env("FLAME_OPERATOR_PASSWORD", &operator_password)
            .env("OUTSIDER_PASSWORD", &outsider_password)
            .start()
            .expect("nats-server starts from the config");
        Secured {
            server,
            parent_password,
            runner_password,
            operator_password,
            outsider_password,
            log,
            _dir: dir,
        }
    }

    /// The permission violations the server logged so far.
    fn violations(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("Violation"))
            .map(str::to_string)
            .collect()
    }

    /// A parent connected as `flame-parent`.
    async fn parent(&self) -> Flame {
        let password = self.parent_password.clone();
        builder()
            .nats_url(self.server.url())
            .nats_options(move |o| o.user_and_password("flame-parent".into(), password.clone()))
            .init()
            .await
            .expect("the parent connects as flame-parent")
    }

    /// Runners connecting as `user` with `password`, with nothing else of
    /// the parent's environment: only what the backend passes on is used.
    fn runners_as(&self, user: &str, password: &str) -> LocalBackend {
        runner_backend()
            .clear_env(true)
            .env("NATS_USER", user)
            .env("NATS_PASSWORD", password)
    }

    /// Runners connecting as `flame-runner`.
    fn runners(&self) -> LocalBackend {
        self.runners_as("flame-runner", &self.runner_password)
    }

    /// A plain client, and what the server refuses it.
    async fn client(&self, user: &str, password: &str) -> (async_nats::Client, Refusals) {
        let refusals = Refusals::default();
        let seen = refusals.clone();
        let client =
            async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
                .event_callback(move |event| {
                    if let async_nats::Event::ServerError(e) = event {
                        seen.0.lock().unwrap().push(e.to_string());
                    }
                    async {}
                })
                .connect(self.server.url())
                .await
                .expect("a plain client connects");
        (client, refusals)
    }
}

/// `config` without `line` (compared trimmed, quotes included) in `block`.
fn take_out(config: &str, block: Block, line: &str) -> String {
    let (section, list) = match block {
        Block::ParentPublish => ("PARENT_PERMISSIONS", "publish"),
        Block::ParentSubscribe => ("PARENT_PERMISSIONS", "subscribe"),
        Block::RunnerPublish => ("RUNNER_PERMISSIONS", "publish"),
        Block::RunnerSubscribe => ("RUNNER_PERMISSIONS", "subscribe"),
        Block::OperatorPublish => ("OPERATOR_PERMISSIONS", "publish"),
        Block::OperatorSubscribe => ("OPERATOR_PERMISSIONS", "subscribe"),
    };
    flame_tests::nats_config::without_line(config, section, list, line)
}

/// Server errors a plain client was sent.
#[derive(Debug, Clone, Default)]
struct Refusals(Arc<Mutex<Vec<String>>>);

impl Refusals {
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Waits until the server has refused something on `subject`.
    async fn wait_for(&self, subject: &str) {
        let quoted = format!("\"{subject}\"");
        wait_for(&format!("a refusal of {subject}"), LONG, || {
            let found = self.all().iter().any(|e| e.contains(&quoted));
            async move { found.then_some(()) }
        })
        .await;
    }
}

/// Everything a client of another account receives while `work` runs,
/// up to a marker of its own published afterwards (so the subscription
/// demonstrably works and the server delivered whatever it had).
async fn seen_by_outsider<F: std::future::Future<Output = ()>>(
    secured: &Secured,
    work: F,
) -> Vec<String> {
    let (outsider, _) = secured.client("outsider", &secured.outsider_password).await;
    let mut all = outsider.subscribe(">").await.unwrap();
    outsider.flush().await.unwrap();
    work.await;
    let marker = format!("outsider.marker.{}", uuid::Uuid::new_v4().simple());
    outsider
        .publish(marker.clone(), Bytes::new())
        .await
        .unwrap();
    outsider.flush().await.unwrap();
    let mut seen = Vec::new();
    loop {
        let msg = tokio::time::timeout(LONG, all.next())
            .await
            .expect("the outsider's own marker arrives")
            .expect("the subscription stays open");
        if msg.subject.as_str() == marker {
            return seen;
        }
        seen.push(msg.subject.to_string());
    }
}

/// Calls, a cast and streams both ways on `pool`.
async fn exercise(pool: &flame::Pool) {
    assert_eq!(flame::call!(pool, add(2, 3)).await.unwrap(), 5);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cast-ran");
    let p = path.to_string_lossy().into_owned();
    flame::cast!(pool, write_file(p, "from a cast".into())).unwrap();
    wait_for("the cast's file", LONG, || {
        let done = std::fs::read_to_string(&path).ok();
        async move { done }
    })
    .await;
    // Runner to parent.
    let got: Vec<u32> = flame::call!(pool, numbers(300))
        .await
        .unwrap()
        .map(|n| n.unwrap())
        .collect()
        .await;
    assert_eq!(got, (1..=300).collect::<Vec<_>>());
    // Parent to runner.
    let chunks: Vec<Bytes> = (0..40u8).map(|i| Bytes::from(vec![i; 4096])).collect();
    let sum = chunks
        .iter()
        .flat_map(|c| c.iter())
        .fold(0u64, |s, b| s + *b as u64);
    let counted = flame::call!(
        pool,
        count_bytes(Stream::new(futures::stream::iter(chunks)))
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(counted, (40 * 4096, sum));
}

/// Waits until a runner of the pool left it (idled down).
async fn idled_down(hooks: &HookLog) {
    wait_for("a runner to idle down", LONG, || {
        let gone = hooks
            .events()
            .iter()
            .any(|e| matches!(e, PoolChange::Shrink { .. }));
        async move { gone.then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn a_private_pool_runs_with_least_privilege_users() {
    let secured = Secured::start();
    let seen = seen_by_outsider(&secured, async {
        let flame = secured.parent().await;
        let hooks = HookLog::default();
        let pool = hooks
            .attach(flame.pool(POOL))
            .backend(secured.runners())
            .max(2)
            .timeout(LONG)
            // Pings, then `leave` and `stopping`, within the test.
            .heartbeat(Duration::from_millis(200))
            .idle_shutdown_after(Duration::from_secs(1))
            .start()
            .await
            .unwrap();
        exercise(&pool).await;
        idled_down(&hooks).await;
        pool.shutdown().await;
        flame.close().await;
    })
    .await;
    assert!(seen.is_empty(), "another account saw {seen:?}");
    assert_eq!(secured.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn a_shared_pool_runs_with_least_privilege_users() {
    let secured = Secured::start();
    let seen = seen_by_outsider(&secured, async {
        let (first, second) = (secured.parent().await, secured.parent().await);
        let hooks = HookLog::default();
        let shared = |flame: &Flame| {
            hooks
                .attach(flame.pool(POOL))
                .shared(true)
                .backend(secured.runners())
                .max(2)
                .timeout(LONG)
                // Lease renewals, `alive`, then `retire` within the test.
                .heartbeat(Duration::from_millis(300))
                .idle_shutdown_after(Duration::from_secs(1))
        };
        let a = shared(&first).start().await.unwrap();
        let b = shared(&second).start().await.unwrap();
        exercise(&a).await;
        exercise(&b).await;
        idled_down(&hooks).await;
        b.shutdown().await;
        a.shutdown().await;
        first.close().await;
        second.close().await;
    })
    .await;
    assert!(seen.is_empty(), "another account saw {seen:?}");
    assert_eq!(secured.violations(), Vec::<String>::new());
}

/// The shipped permissions are tight: each user is refused what flame does
/// not need (and, being refused in order after what it needs, is refused
/// nothing else).
#[tokio::test]
async fn each_user_may_do_only_what_flame_needs() {
    let secured = Secured::start();

    let (runner, refusals) = secured
        .client("flame-runner", &secured.runner_password)
        .await;
    let mut subs = Vec::new();
    for allowed in [
        "flame.thumbs.runner.r1",
        "flame.thumbs.runner.r1.cancel",
        "flame.thumbs.runner.r1.control",
        "$SRV.PING",
        "$SRV.INFO.flame-thumbs",
        "$SRV.STATS.flame-thumbs.id1",
        "_INBOX.flame-thumbs.abc.*",
    ] {
        subs.push(runner.subscribe(allowed).await.unwrap());
    }
    let mut denied = Vec::new();
    for refused in [
        "flame.thumbs.parent.p1.*",
        "_INBOX.abc.*",
        "flame.other.runner.r1",
        "$KV.flame-thumbs.>",
    ] {
        subs.push(runner.subscribe(refused).await.unwrap());
        refusals.wait_for(refused).await;
        denied.push(refused);
    }
    for refused in [
        "flame.thumbs.runner.r2",
        "$KV.flame-thumbs.scaler",
        "$JS.API.STREAM.DELETE.KV_flame-thumbs",
        "flame.other.parent.p1.ready",
    ] {
        runner.publish(refused, Bytes::new()).await.unwrap();
        refusals.wait_for(refused).await;
        denied.push(refused);
    }
    assert_eq!(refusals.all().len(), denied.len(), "{:?}", refusals.all());

    let (parent, refusals) = secured
        .client("flame-parent", &secured.parent_password)
        .await;
    for allowed in ["flame.thumbs.parent.p1.*", "_INBOX.abc.*"] {
        subs.push(parent.subscribe(allowed).await.unwrap());
    }
    subs.push(
        parent
            .queue_subscribe("flame.thumbs.alive", "parents".into())
            .await
            .unwrap(),
    );
    let mut denied = Vec::new();
    for refused in [
        "flame.thumbs.runner.r1",
        "flame.other.parent.p1.*",
        "$SRV.PING",
    ] {
        subs.push(parent.subscribe(refused).await.unwrap());
        refusals.wait_for(refused).await;
        denied.push(refused);
    }
    for refused in ["flame.thumbs.parent.p1.ready", "flame.other.runner.r1"] {
        parent.publish(refused, Bytes::new()).await.unwrap();
        refusals.wait_for(refused).await;
        denied.push(refused);
    }
    assert_eq!(refusals.all().len(), denied.len(), "{:?}", refusals.all());
}

/// Starts a private pool that waits for one runner of `backend`, which
/// must fail; returns the error and how long it took.
async fn failed_start(flame: &Flame, backend: LocalBackend) -> (Error, Duration) {
    let started = tokio::time::Instant::now();
    let err = flame
        .pool(POOL)
        .backend(backend)
        .min(1)
        .max(1)
        .boot_timeout(LONG)
        .start()
        .await
        .expect_err("the runner cannot start");
    (err, started.elapsed())
}

/// The boot failure's reason, checked to be quick and to carry no secret.
fn boot_reason(err: &Error, took: Duration, secret: &str) -> String {
    // Fast: the runner said why and exited; its failsafe (20 s) and the
    // boot timeout (60 s) played no part.
    assert!(took < Duration::from_secs(15), "took {took:?}: {err}");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(secret), "{shown}");
    match err {
        Error::BootFailed { pool, reason, .. } => {
            assert_eq!(pool, POOL);
            assert!(reason.contains("exited with code 1"), "{reason}");
            reason.clone()
        }
        other => panic!("expected BootFailed, got {other:?}"),
    }
}

#[tokio::test]
async fn runners_with_bad_credentials_fail_their_boot_saying_so() {
    let secured = Secured::start();
    let flame = secured.parent().await;

    let wrong = format!("{}-wrong", secured.runner_password);
    let (err, took) = failed_start(&flame, secured.runners_as("flame-runner", &wrong)).await;
    let reason = boot_reason(&err, took, &wrong);
    assert!(reason.contains("authorization violation"), "{reason}");

    let (err, took) = failed_start(&flame, secured.runners_as("nobody", &wrong)).await;
    let reason = boot_reason(&err, took, &wrong);
    assert!(reason.contains("authorization violation"), "{reason}");

    // A call waiting for a runner gets the same reason, at its own
    // deadline, long before the boot timeout.
    let pool = flame
        .pool(POOL)
        .backend(secured.runners_as("nobody", &wrong))
        .max(1)
        .boot_timeout(LONG)
        .timeout(Duration::from_secs(4))
        .start()
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let err = flame::call!(pool, add(1, 1)).await.unwrap_err();
    let reason = boot_reason(&err, started.elapsed(), &wrong);
    assert!(reason.contains("authorization violation"), "{reason}");
}

/// Asserts that `err` is a `PermissionDenied` whose reason contains
/// `names`.
fn assert_permission_denied(err: &Error, names: &str) {
    match err {
        Error::PermissionDenied { reason } => assert!(reason.contains(names), "{reason}"),
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
}

/// A private pool whose runners lack the permission `line` of `block`
/// fails to start with the runner's reason, which must contain `names`.
async fn boot_refused_without(block: Block, line: &str, names: &str) {
    let secured = Secured::without(&[(block, line)]);
    let flame = secured.parent().await;
    let (err, took) = failed_start(&flame, secured.runners()).await;
    let reason = boot_reason(&err, took, &secured.runner_password);
    assert!(reason.contains(names), "{reason}");
}

#[tokio::test]
async fn a_runner_without_its_subscriptions_fails_its_boot_naming_the_subject() {
    boot_refused_without(
        Block::RunnerSubscribe,
        "flame.thumbs.runner.*",
        "Permissions Violation for Subscription to \"flame.thumbs.runner.",
    )
    .await;
}

#[tokio::test]
async fn a_runner_that_may_not_report_fails_its_boot_naming_the_subject() {
    boot_refused_without(
        Block::RunnerPublish,
        "flame.thumbs.parent.*.*",
        "Permissions Violation for Publish to \"flame.thumbs.parent.",
    )
    .await;
}

#[tokio::test]
async fn a_shared_pool_runner_without_its_lease_permission_fails_naming_it() {
    let secured = Secured::without(&[(Block::RunnerPublish, "$KV.flame-thumbs.runners.*")]);
    let flame = secured.parent().await;
    let hooks = HookLog::default();
    let pool = hooks
        .attach(flame.pool(POOL))
        .shared(true)
        .heartbeat(Duration::from_millis(500))
        .backend(secured.runners())
        .max(1)
        .boot_timeout(LONG)
        .timeout(LONG)
        .start()
        .await
        .unwrap();
    // A call makes the scaler boot a runner, which cannot mark its lease
    // ready: the boot fails with the runner's reason, long before the
    // boot timeout.
    let call = tokio::spawn({
        let pool = pool.clone();
        async move { flame::call!(pool, add(1, 1)).await }
    });
    let started = tokio::time::Instant::now();
    let err = wait_for("a failed boot", LONG, || {
        let found = hooks.events().iter().find_map(|e| match e {
            PoolChange::GrowEnd { result: Err(e), .. } => Some(e.clone()),
            _ => None,
        });
        async move { found }
    })
    .await;
    let reason = boot_reason(&err, started.elapsed(), &secured.runner_password);
    assert!(
        reason.contains("Permissions Violation for Publish to \"$KV.flame-thumbs.runners."),
        "{reason}"
    );
    // Callers waiting for a runner end with that reason at their deadline,
    // not a bare timeout: in the scaler's parent, and in another parent of
    // the pool, which learns it from the failed runner's lease.
    let other = secured.parent().await;
    let other_pool = other
        .pool(POOL)
        .shared(true)
        .heartbeat(Duration::from_millis(500))
        .backend(secured.runners())
        .max(1)
        .boot_timeout(LONG)
        .start()
        .await
        .unwrap();
    for (who, pool) in [
        ("the scaler's parent", &pool),
        ("another parent", &other_pool),
    ] {
        let started = tokio::time::Instant::now();
        let err = pool
            .call_with::<add>((1, 1), CallOptions::new().timeout(Duration::from_secs(8)))
            .await
            .unwrap_err();
        let reason = boot_reason(&err, started.elapsed(), &secured.runner_password);
        assert!(
            reason.contains("Permissions Violation for Publish to \"$KV.flame-thumbs.runners."),
            "{who}: {reason}"
        );
    }
    call.abort();
    other_pool.shutdown().await;
    pool.shutdown().await;
}

#[tokio::test]
async fn a_runner_of_another_account_says_nobody_listens() {
    let secured = Secured::start();
    let flame = secured.parent().await;
    let started = tokio::time::Instant::now();
    let err = flame
        .pool(POOL)
        .backend(secured.runners_as("outsider", &secured.outsider_password))
        .min(1)
        .max(1)
        .failsafe_timeout(Duration::from_secs(3))
        .boot_timeout(LONG)
        .start()
        .await
        .expect_err("the runner cannot reach its parent");
    let reason = boot_reason(&err, started.elapsed(), &secured.outsider_password);
    assert!(
        reason.contains("nobody listens on flame.thumbs.parent."),
        "{reason}"
    );
}

#[tokio::test]
async fn parents_with_bad_credentials_or_missing_permissions_get_clear_errors() {
    let secured = Secured::start();
    for user in ["flame-parent", "nobody"] {
        let err = builder()
            .nats_url(secured.server.url())
            .nats_options(|o| o.user_and_password(user.into(), "wrong-pw".into()))
            .connect_timeout(Duration::from_secs(5))
            .init()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NatsUnreachable { .. }), "{err:?}");
        let shown = format!("{err} {err:?}");
        assert!(err.to_string().contains("authorization violation"), "{err}");
        assert!(!shown.contains("wrong-pw"), "{shown}");
    }

    // Pools the parent's user has no permissions for: the event
    // subscription (private) or the bucket (shared) is refused.
    let flame = secured.parent().await;
    let err = flame
        .pool("other")
        .backend(secured.runners())
        .start()
        .await
        .unwrap_err();
    assert_permission_denied(&err, "Subscription to \"flame.other.parent.");
    let err = flame
        .pool("elsewhere")
        .shared(true)
        .backend(secured.runners())
        .start()
        .await
        .unwrap_err();
    assert_permission_denied(&err, "KV_flame-elsewhere");
    // The pool it may use still works.
    let pool = flame
        .pool(POOL)
        .backend(secured.runners())
        .max(1)
        .timeout(LONG)
        .start()
        .await
        .unwrap();
    assert_eq!(flame::call!(pool, add(20, 22)).await.unwrap(), 42);
    pool.shutdown().await;
}

/// Starts the pool (`shared` or not) with a parent that lacks the
/// permission `line` of `block`; the error it fails with.
async fn start_refused(without: (Block, &str), shared: bool) -> Error {
    let secured = Secured::without(&[without]);
    let flame = secured.parent().await;
    flame
        .pool(POOL)
        .shared(shared)
        .backend(secured.runners())
        .start()
        .await
        .unwrap_err()
}

#[tokio::test]
async fn a_parent_without_its_event_subscription_gets_a_permission_error() {
    let err = start_refused((Block::ParentSubscribe, "flame.thumbs.parent.*.*"), false).await;
    assert_permission_denied(&err, "Subscription to \"flame.thumbs.parent.");
}

#[tokio::test]
async fn a_parent_that_may_not_create_the_bucket_gets_a_permission_error() {
    let err = start_refused((Block::ParentPublish, "$JS.API.INFO"), true).await;
    assert_permission_denied(&err, "Publish to \"$JS.API.INFO\"");
}

#[tokio::test]
async fn a_parent_that_may_not_publish_calls_gets_a_permission_error_not_a_timeout() {
    let secured = Secured::without(&[(Block::ParentPublish, "flame.thumbs.runner.>")]);
    let flame = secured.parent().await;
    let pool = flame
        .pool(POOL)
        .backend(secured.runners())
        .max(1)
        .boot_timeout(LONG)
        .timeout(LONG)
        .start()
        .await
        .unwrap();
    // The runner boots (nothing the parent publishes to it is needed for
    // that); the call to it is refused by the server.
    let started = tokio::time::Instant::now();
    let err = flame::call!(pool, add(1, 1)).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(20), "{err}");
    assert_permission_denied(&err, "Publish to \"flame.thumbs.runner.");
    pool.shutdown().await;
}

/// One permission: who (`parent`, `runner`, `operator`), what
/// (`publish`, `subscribe`, `allow_responses`) and the subject (for
/// `allow_responses`: `true`), for the pool [`POOL`].
type Permission = (String, String, String);

/// The one documented list: the table of PROTOCOL.md, section 9.1, with
/// `<pool>` = [`POOL`].
fn documented_permissions() -> std::collections::BTreeSet<Permission> {
    let protocol = std::fs::read_to_string(PROTOCOL).unwrap();
    let section = protocol
        .split("\n### 9.1 Permissions\n")
        .nth(1)
        .expect("PROTOCOL.md has a section 9.1 Permissions");
    let mut list = std::collections::BTreeSet::new();
    for line in section.lines().skip_while(|l| !l.starts_with("| user |")) {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (who, may, subject) = (cells[1], cells[2], cells[3]);
        if who == "user" || who.starts_with("---") {
            continue;
        }
        assert!(
            ["parent", "runner", "operator"].contains(&who)
                && ["publish", "subscribe", "allow_responses"].contains(&may),
            "a row of PROTOCOL.md 9.1 this test cannot read: {line}"
        );
        let subject = subject.trim_matches('`').replace("<pool>", POOL);
        list.insert((who.to_string(), may.to_string(), subject));
    }
    assert!(list.len() > 20, "too few rows read: {list:?}");
    list
}

/// What a configuration grants its three flame users.
fn granted_permissions(config: &str) -> std::collections::BTreeSet<Permission> {
    let mut list = std::collections::BTreeSet::new();
    let (mut who, mut may) = (None, None);
    for line in config.lines() {
        let t = line.split('#').next().unwrap().trim();
        if let Some(block) = t.strip_suffix("_PERMISSIONS: {") {
            who = Some(block.to_ascii_lowercase());
        } else if who.is_some() && (t == "publish: {" || t == "subscribe: {") {
            may = Some(t.trim_end_matches(": {").to_string());
        } else if t == "}" && may.is_some() {
            may = None;
        } else if t == "}" {
            who = None;
        } else if let (Some(w), Some("true")) = (&who, t.strip_prefix("allow_responses: ")) {
            list.insert((w.clone(), "allow_responses".into(), "true".into()));
        } else if let (Some(w), Some(m)) = (&who, &may) {
            if let Some(subject) = t.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
                list.insert((w.clone(), m.clone(), subject.to_string()));
            } else {
                assert!(
                    t.is_empty() || t == "allow: [" || t == "]",
                    "a line of the configuration this test cannot read: {line}"
                );
            }
        }
    }
    list
}

/// The shipped configuration grants exactly the documented list, no line
/// more or less, so that the tests below (which run on that file) test
/// the list that users read.
#[test]
fn the_config_grants_exactly_the_documented_list() {
    let documented = documented_permissions();
    let granted = granted_permissions(&std::fs::read_to_string(CONFIG).unwrap());
    let missing: Vec<_> = documented.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&documented).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "deploy/nats/least-privilege.conf and PROTOCOL.md 9.1 differ:\n\
         documented but not granted: {missing:#?}\ngranted but not documented: {extra:#?}"
    );
    for who in ["parent", "runner", "operator"] {
        assert!(documented.iter().any(|(w, _, _)| w == who), "no {who} rows");
    }
}

/// The `flame` command as `flame-operator` (or `user`) on the secured
/// server, with none of the machine's NATS variables.
fn operator_command(
    secured: &Secured,
    user: &str,
    password: &str,
    args: &[&str],
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(flame_tests::harness::flame_cli());
    cmd.arg("--server")
        .arg(secured.server.url())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for var in ["NATS_URL", "NATS_CREDS", "NATS_NKEY", "NATS_TOKEN"] {
        cmd.env_remove(var);
    }
    cmd.env("NATS_USER", user).env("NATS_PASSWORD", password);
    cmd
}

/// Runs `flame args..` as `flame-operator` to its end: exit code, stdout,
/// stderr.
async fn operator(secured: &Secured, args: &[&str]) -> (Option<i32>, String, String) {
    let cmd = operator_command(secured, "flame-operator", &secured.operator_password, args);
    finished(cmd, args).await
}

async fn finished(
    mut cmd: tokio::process::Command,
    args: &[&str],
) -> (Option<i32>, String, String) {
    let out = tokio::time::timeout(LONG, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("flame {args:?} did not exit"))
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    println!("$ flame {}\n{stdout}{stderr}", args.join(" "));
    (out.status.code(), stdout, stderr)
}

/// A running `flame watch` of the operator, its lines gathered.
struct OperatorWatch {
    _child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl OperatorWatch {
    async fn start(secured: &Secured, pool: &str) -> OperatorWatch {
        use tokio::io::AsyncBufReadExt;
        let mut child = operator_command(
            secured,
            "flame-operator",
            &secured.operator_password,
            &["watch", pool],
        )
        .spawn()
        .unwrap();
        let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let first = tokio::time::timeout(LONG, stderr.next_line())
            .await
            .expect("flame watch said nothing")
            .unwrap()
            .expect("flame watch exited");
        assert!(first.starts_with("watching flame."), "{first}");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let seen = lines.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                seen.lock().unwrap().push(line);
            }
        });
        OperatorWatch {
            _child: child,
            lines,
        }
    }

    /// Waits for a line with all of `words`.
    async fn line_with(&self, words: &[&str]) -> String {
        wait_for(&format!("a watch line with {words:?}"), LONG, || {
            let found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| words.iter().all(|w| l.contains(w)))
                .cloned();
            async move { found }
        })
        .await
    }
}

/// Whether a line of `table` starts with the cells `first`.
fn has_row(table: &str, first: &[&str]) -> bool {
    table.lines().any(|l| {
        l.split_whitespace()
            .take(first.len())
            .eq(first.iter().copied())
    })
}

/// Everything flame does on the documented permissions: a private pool
/// (start, calls, casts, streams), then a shared pool of two parents
/// (scaler election, calls, idle retirement), their events watched by the
/// operator, and every `flame` command; the violations the server logged.
async fn full_run(secured: &Secured) -> Vec<String> {
    let all = OperatorWatch::start(secured, "*").await;
    let one = OperatorWatch::start(secured, POOL).await;

    let flame = secured.parent().await;
    let hooks = HookLog::default();
    let pool = hooks
        .attach(flame.pool(POOL))
        .backend(secured.runners())
        .min(1)
        .max(2)
        .timeout(LONG)
        .heartbeat(Duration::from_millis(200))
        .idle_shutdown_after(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    exercise(&pool).await;
    let (code, stdout, stderr) = operator(secured, &["pools", "--wait", "1s"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(has_row(&stdout, &[POOL, "private"]), "{stdout}");
    let runner = pool.runners()[0].id.clone();
    let (code, stdout, stderr) = operator(secured, &["runners", POOL, "--wait", "1s"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(&runner), "{stdout}");
    all.line_with(&["thumbs runner_ready", &runner[..8]]).await;
    one.line_with(&["thumbs runner_ready", &runner[..8]]).await;
    pool.shutdown().await;
    flame.close().await;

    let (first, second) = (secured.parent().await, secured.parent().await);
    let shared = |flame: &Flame| {
        hooks
            .attach(flame.pool(POOL))
            .shared(true)
            .backend(secured.runners())
            .min(1)
            .max(2)
            .timeout(LONG)
            .heartbeat(Duration::from_millis(300))
            .idle_shutdown_after(Duration::from_secs(1))
    };
    let a = shared(&first).start().await.unwrap();
    let b = shared(&second).start().await.unwrap();
    all.line_with(&["thumbs scaler_elected"]).await;
    exercise(&a).await;
    exercise(&b).await;
    let (code, stdout, stderr) = operator(secured, &["pools", "--wait", "1s"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(has_row(&stdout, &[POOL, "shared"]), "{stdout}");
    let (code, stdout, stderr) = operator(secured, &["runners", POOL, "--wait", "1s"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let runner = a.runners()[0].id.clone();
    assert!(stdout.contains(&runner), "{stdout}");
    b.shutdown().await;
    a.shutdown().await;
    first.close().await;
    second.close().await;
    one.line_with(&["thumbs runner_gone", "reason=shutdown"])
        .await;
    secured.violations()
}

#[tokio::test]
async fn a_full_run_on_the_documented_permissions_has_no_violation() {
    let secured = Secured::start();
    let violations = full_run(&secured).await;
    assert_eq!(violations, Vec::<String>::new());
}

/// `flame args..` as an operator whose user lacks `line` of `block`: it
/// must fail (exit 1) with "permission denied on <subject>", quickly.
async fn cli_refused(without: &[(Block, &str)], args: &[&str], subject: &str) {
    let secured = Secured::without(without);
    let started = tokio::time::Instant::now();
    let (code, _, stderr) = operator(&secured, args).await;
    let took = started.elapsed();
    println!("flame {args:?} without {subject}: exit {code:?} after {took:?}");
    assert!(
        stderr.contains(&format!("flame: permission denied on {subject} ")),
        "{stderr}"
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(!stderr.contains(&secured.operator_password), "{stderr}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[tokio::test]
async fn flame_pools_says_permission_denied() {
    cli_refused(
        &[(Block::OperatorPublish, "flame.pools.info")],
        &["pools"],
        "flame.pools.info",
    )
    .await;
}

#[tokio::test]
async fn flame_runners_says_permission_denied() {
    cli_refused(
        &[(Block::OperatorPublish, "$SRV.INFO.flame-thumbs")],
        &["runners", POOL],
        "$SRV.INFO.flame-thumbs",
    )
    .await;
    cli_refused(
        &[(
            Block::OperatorPublish,
            "$JS.API.STREAM.INFO.KV_flame-thumbs",
        )],
        &["runners", POOL],
        "$JS.API.STREAM.INFO.KV_flame-thumbs",
    )
    .await;
}

#[tokio::test]
async fn flame_watch_says_permission_denied() {
    cli_refused(
        &[(Block::OperatorSubscribe, "flame.*.events.>")],
        &["watch", "*"],
        "flame.*.events.>",
    )
    .await;
    // (`flame.*.events.>` grants it too.)
    cli_refused(
        &[
            (Block::OperatorSubscribe, "flame.thumbs.events.>"),
            (Block::OperatorSubscribe, "flame.*.events.>"),
        ],
        &["watch", POOL],
        "flame.thumbs.events.>",
    )
    .await;
}

/// `flame top` needs a terminal: it runs under `script`, which gives it
/// one.
#[tokio::test]
async fn flame_top_says_permission_denied() {
    for (without, subject) in [
        (
            (Block::OperatorSubscribe, "flame.*.events.>"),
            "flame.*.events.>",
        ),
        (
            (Block::OperatorPublish, "flame.pools.info"),
            "flame.pools.info",
        ),
    ] {
        let secured = Secured::without(&[without]);
        let line = format!(
            "{} --server {} top",
            flame_tests::harness::flame_cli().display(),
            secured.server.url()
        );
        let mut cmd = tokio::process::Command::new("script");
        cmd.args(["-qefc", &line, "/dev/null"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .env("NATS_USER", "flame-operator")
            .env("NATS_PASSWORD", &secured.operator_password)
            .env_remove("NATS_URL");
        let (code, stdout, stderr) = finished(cmd, &["top"]).await;
        assert!(
            stdout.contains(&format!("flame: permission denied on {subject} ")),
            "{stdout}{stderr}"
        );
        assert_eq!(code, Some(1), "{stdout}{stderr}");
    }
}
