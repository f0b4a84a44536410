//! Another client of the account subscribed to `>` and to `_INBOX.>` (a
//! `nats sub '>'` while debugging) must not slow flame down: nothing in
//! flame may wait for "no responders" on a subject such a client can
//! subscribe to, nor for a reply it could swallow.

use std::time::{Duration, Instant};

use flame::embedded::NatsServer;
use flame::{Error, Flame};
use flame_tests::funcs::*;
use flame_tests::harness::{builder, init_tracing, runner_backend, shared_pool};
use futures::StreamExt;

/// Far below what a spy cost before (seconds: a probe's whole timeout) and
/// far above what each step takes on a loaded 2-core machine (tens of ms).
const BOUND: Duration = Duration::from_millis(1500);

/// A server with a client subscribed to `>` and to `_INBOX.>`, reading
/// everything (as `nats sub` does), and the messages it saw.
struct Spied {
    server: NatsServer,
    seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _spy: async_nats::Client,
}

async fn spied_server() -> Spied {
    init_tracing();
    let server = NatsServer::start().expect("start nats-server");
    let spy = async_nats::connect(server.url()).await.expect("connect");
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for subject in [">", "_INBOX.>"] {
        let mut sub = spy.subscribe(subject).await.unwrap();
        let seen = seen.clone();
        tokio::spawn(async move {
            while sub.next().await.is_some() {
                seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    spy.flush().await.unwrap();
    Spied {
        server,
        seen,
        _spy: spy,
    }
}

async fn parent(server: &NatsServer) -> (Flame, Duration) {
    let at = Instant::now();
    let flame = builder()
        .nats_url(server.url())
        .runner_nats_url(server.url())
        .init()
        .await
        .expect("connect");
    (flame, at.elapsed())
}

fn within(what: &str, took: Duration) {
    eprintln!("with a spy: {what} took {took:?}");
    assert!(
        took < BOUND,
        "{what} took {took:?} with a `>` and an `_INBOX.>` subscriber on the server (bound {BOUND:?})"
    );
}

#[tokio::test]
async fn a_private_pool_starts_and_calls_at_once_beside_a_spy() {
    let spied = spied_server().await;
    let (flame, took) = parent(&spied.server).await;
    within("connecting a parent", took);
    let at = Instant::now();
    let pool = flame
        .pool("spied")
        .backend(runner_backend())
        .min(1)
        .max(1)
        .start()
        .await
        .unwrap();
    within("a private pool's start with min(1)", at.elapsed());
    let at = Instant::now();
    assert_eq!(flame::call!(pool, add(1, 2)).await.unwrap(), 3);
    within("a call", at.elapsed());
    assert!(spied.seen.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

#[tokio::test]
async fn a_shared_pool_starts_and_serves_its_first_call_at_once_beside_a_spy() {
    let spied = spied_server().await;
    let (flame, took) = parent(&spied.server).await;
    within("connecting a parent", took);
    let at = Instant::now();
    let pool = shared_pool(&flame, "spiedshared")
        .max(1)
        .start()
        .await
        .unwrap();
    within("a shared pool's start", at.elapsed());
    let at = Instant::now();
    assert_eq!(flame::call!(pool, add(2, 3)).await.unwrap(), 5);
    within("a shared pool's first call (a runner booted)", at.elapsed());
}

#[tokio::test]
async fn a_runners_boot_failure_is_reported_at_once_beside_a_spy() {
    let spied = spied_server().await;
    let (flame, _) = parent(&spied.server).await;
    let at = Instant::now();
    // A runner of another build exits before it is ready.
    let err = flame
        .pool("spiedbad")
        .backend(runner_backend().env(flame::env::BUILD_ID, "not-the-test-build"))
        .min(1)
        .max(1)
        .boot_timeout(Duration::from_secs(20))
        .start()
        .await
        .unwrap_err();
    within("a runner's boot failure", at.elapsed());
    assert!(matches!(err, Error::BootFailed { .. }), "{err:?}");
}
