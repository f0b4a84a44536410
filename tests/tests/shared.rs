//! Shared pools: many parents, one pool, coordinated through JetStream KV.

use std::collections::HashSet;
use std::time::Duration;

use flame::{CallOptions, Flame};
use flame_tests::funcs::*;
use flame_tests::harness::{runner_backend, wait_for, TestEnv};
use flame_tests::TEST_BUILD;

const LONG: Duration = Duration::from_secs(60);

async fn another_parent(env: &TestEnv) -> Flame {
    flame::FlameBuilder::new()
        .nats_url(env.server.url())
        .build_id(TEST_BUILD)
        .init()
        .await
        .unwrap()
}

#[tokio::test]
async fn two_parents_share_one_pool() {
    let env = TestEnv::start().await;
    let second = another_parent(&env).await;
    let a = env
        .flame
        .pool("together")
        .shared(true)
        .max(2)
        .max_concurrency(2)
        .heartbeat(Duration::from_millis(300))
        .backend(runner_backend())
        .start()
        .await
        .unwrap();
    let b = second
        .pool("together")
        .shared(true)
        .max(2)
        .max_concurrency(2)
        .heartbeat(Duration::from_millis(300))
        .backend(runner_backend())
        .start()
        .await
        .unwrap();
    let mut pids = HashSet::new();
    for i in 0..20 {
        let pool = if i % 2 == 0 { &a } else { &b };
        let at = pool
            .call_with::<counted_sleep>((20,), CallOptions::new().timeout(LONG))
            .await
            .unwrap();
        assert!(at.peak <= 2, "{at:?}");
        pids.insert(at.pid);
    }
    assert!(pids.len() <= 2, "{pids:?}");
    wait_for("both parents to see the same runners", LONG, || async {
        let (sa, sb) = (a.status(), b.status());
        (sa.ready >= 1 && sa.ready == sb.ready).then_some(())
    })
    .await;
}
