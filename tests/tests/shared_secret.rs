//! A shared pool's calls are signed with a key derived from the pool's
//! secret (`FLAME_SECRET`, or `PoolBuilder::secret`): every parent with it
//! can call the pool's runners, a parent with another cannot, and the
//! secret itself never reaches a runner.

use std::time::Duration;

use flame::Error;
use flame_tests::funcs::*;
use flame_tests::harness::{runner_pids, runner_stats, shared_pool, wait_for, TestEnv};

const LONG: Duration = Duration::from_secs(30);
const SECRET: &str = "correct horse battery staple";

#[tokio::test]
async fn a_shared_pool_with_a_secret_works_across_parents_and_a_wrong_secret_cannot_call() {
    let env = TestEnv::start().await;
    let second = env.another_parent().await;
    let third = env.another_parent().await;
    let a = shared_pool(&env.flame, "secret")
        .secret(SECRET)
        .min(1)
        .start()
        .await
        .unwrap();
    let b = shared_pool(&second, "secret")
        .secret(SECRET)
        .start()
        .await
        .unwrap();
    assert_eq!(flame::call!(a, add(1, 2)).await.unwrap(), 3);
    assert_eq!(flame::call!(b, add(2, 2)).await.unwrap(), 4);

    // A parent with another secret: refused at once, with the reason.
    let c = shared_pool(&third, "secret")
        .secret("another secret")
        .start()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let refused = flame::call!(c, add(3, 3)).await;
    let took = started.elapsed();
    eprintln!("wrong secret refused in {took:?}: {refused:?}");
    match refused {
        Err(Error::Unauthenticated { message, .. }) => {
            assert!(message.contains("signature"), "{message}");
            assert!(!message.contains(SECRET));
        }
        other => panic!("expected Unauthenticated, got {other:?}"),
    }
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let stats = runner_stats(&env, "secret").await.unwrap();
    assert_eq!(stats["unauthenticated"], 1);

    // The runner's environment holds a key derived from the secret (in
    // `event_key`, where a private pool's runner has its own), never the
    // secret.
    let pids = wait_for("the runner's pid", LONG, || async {
        let pids = runner_pids("secret");
        (!pids.is_empty()).then_some(pids)
    })
    .await;
    for pid in pids {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let environ = String::from_utf8_lossy(&environ);
        assert!(!environ.contains(SECRET), "the secret reached runner {pid}");
        assert!(!environ.contains(flame::env::SECRET));
        let info = environ
            .split('\0')
            .find_map(|v| v.strip_prefix("FLAME_PARENT="))
            .expect("FLAME_PARENT");
        let info: serde_json::Value = serde_json::from_str(info).unwrap();
        assert_eq!(info["event_key"].as_str().unwrap().len(), 64);
    }
    // The parents' Debug output does not show it either.
    assert!(!format!("{a:?}").contains(SECRET));
    assert!(!format!("{:?}", shared_pool(&env.flame, "x").secret(SECRET)).contains(SECRET));

    // A plain `retire` from another client is refused too; the runner
    // serves on.
    let client = env.client().await;
    let runner = &a.runners()[0].id;
    client
        .publish(
            format!("flame.secret.runner.{runner}.control"),
            "retire".into(),
        )
        .await
        .unwrap();
    wait_for("the forged retire counted", LONG, || async {
        let stats = runner_stats(&env, "secret").await?;
        (stats["unauthenticated"] == 2).then_some(())
    })
    .await;
    assert_eq!(flame::call!(b, add(4, 4)).await.unwrap(), 8);

    // The last parent out retires the runner with a signed `retire`: it
    // exits at once, not after its parent grace (5 s) without parents.
    let pids = runner_pids("secret");
    let stopped = std::time::Instant::now();
    c.shutdown().await;
    b.shutdown().await;
    a.shutdown().await;
    wait_for("the runner retired", LONG, || async {
        pids.iter()
            .all(|pid| !flame_tests::harness::process_alive(*pid))
            .then_some(())
    })
    .await;
    eprintln!(
        "runner exited {:?} after the parents began to leave",
        stopped.elapsed()
    );
    assert!(stopped.elapsed() < Duration::from_secs(4));
}
