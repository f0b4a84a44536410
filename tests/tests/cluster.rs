//! A shared pool on a three-node NATS cluster (JetStream, the pool's KV
//! bucket with three replicas) survives the loss of any one node.

use std::collections::HashSet;
use std::time::Duration;

use flame_tests::harness::{
    process_alive, runner_pids, wait_for, NatsCluster, RunnerSampler, SharedParent,
};

const LONG: Duration = Duration::from_secs(60);

/// Kills the nodes of the cluster one at a time (each back before the
/// next) while two parent processes keep a shared pool busy: parents and runners reconnect to the other nodes, no runner is
/// lost or replaced, calls go on, only calls in flight on the lost
/// connections may fail (and then with `NatsUnreachable`), and `max` and
/// `max_concurrency` hold throughout.
#[tokio::test]
async fn a_shared_pool_survives_losing_any_one_node_of_three() {
    let mut cluster = NatsCluster::start(3).await;
    let urls = cluster.urls();
    let sampler = RunnerSampler::start("clustered");
    let (max, mc, callers) = (2, 4, 6);
    // A 1 s heartbeat: a lease counts as dead after 3 s, well past the
    // bucket's leader election on a loaded machine.
    let env = [
        ("FLAME_TEST_KV_REPLICAS", "3"),
        ("FLAME_TEST_HEARTBEAT_MS", "1000"),
    ];
    let mut parents = Vec::new();
    for _ in 0..2 {
        parents
            .push(SharedParent::start(&urls, "clustered", (max, mc), (callers, 0, 20), &env).await);
    }
    for p in &mut parents {
        p.progressed_to(200, LONG).await;
    }
    // Both runners up and serving before the node goes.
    let runners: HashSet<u32> = wait_for("two runners", LONG, || async {
        let pids = runner_pids("clustered");
        (pids.len() == max).then(|| pids.into_iter().collect())
    })
    .await;

    // The bucket has three replicas.
    let client = async_nats::connect(cluster.nodes[1].url()).await.unwrap();
    let store = async_nats::jetstream::new(client)
        .get_key_value("flame-clustered")
        .await
        .unwrap();
    let status = store.status().await.unwrap();
    assert_eq!(status.info.config.num_replicas, 3);
    drop(store);

    // Kill each node in turn (and bring it back before the next), so that
    // every parent and runner connection is lost once, wherever it was.
    for i in 0..cluster.nodes.len() {
        cluster.nodes[i].stop();
        for p in &mut parents {
            let target = p.progress + 300;
            p.progressed_to(target, LONG).await;
        }
        cluster.nodes[i].restart().expect("restart the node");
        cluster.wait_for_replicas("KV_flame-clustered").await;
        // No runner was lost or replaced.
        for pid in &runners {
            assert!(process_alive(*pid), "runner {pid} died with node {i}");
        }
        let now: HashSet<u32> = runner_pids("clustered").into_iter().collect();
        assert_eq!(now, runners, "runners were replaced after node {i} died");
    }

    for p in &mut parents {
        p.close_stdin();
    }
    for p in &mut parents {
        let report = p.done(LONG).await;
        // At most the calls in flight on a lost connection fail. A kill can
        // cost a parent its callers' calls twice: once on its own
        // connection, and once more (those placed again) on a runner's
        // connection to the same node, which the parent learns of later
        // from the runner's lease.
        assert!(
            report.failed <= 2 * callers * cluster.nodes.len(),
            "{report:?}"
        );
        for kind in &report.failure_kinds {
            assert_eq!(kind, "NatsUnreachable", "{report:?}");
        }
        assert!(report.peak <= mc, "{report:?}");
        let served: HashSet<u32> = report.pids.iter().copied().collect();
        assert!(served.is_subset(&runners), "{report:?}");
    }
    assert!(sampler.peak() <= max, "{} runners at once", sampler.peak());
}
