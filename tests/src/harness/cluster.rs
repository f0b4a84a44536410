//! A NATS cluster of three real servers, for tests that lose a node.

use std::time::Duration;

use super::{free_port, init_tracing, wait_for};
use flame::embedded::NatsServer;

/// A JetStream cluster of nats-servers on this machine, each killed on drop.
pub struct NatsCluster {
    /// The servers; `nodes[i]` is named `n<i>`.
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` servers routed to each other (cluster `flame-test`,
    /// JetStream on, each with its own store) and waits until JetStream
    /// answers through every one of them.
    pub async fn start(size: usize) -> NatsCluster {
        let cluster = NatsCluster::launch(size, size);
        cluster.wait_until_ready().await;
        cluster
    }

    /// Starts `running` of the `size` servers of a cluster (the others
    /// are routed to but never started) without waiting for JetStream: as
    /// `docker compose up` starts them next to the app. With fewer than a
    /// majority running, the cluster never elects a JetStream meta leader.
    pub fn launch(size: usize, running: usize) -> NatsCluster {
        init_tracing();
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes = |me: usize| {
            route_ports
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != me)
                .map(|(_, p)| format!("nats://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let nodes = (0..running)
            .map(|i| {
                NatsServer::builder()
                    .server_name(format!("n{i}"))
                    .arg("--cluster_name")
                    .arg("flame-test")
                    .arg("--cluster")
                    .arg(format!("nats://127.0.0.1:{}", route_ports[i]))
                    .arg("--routes")
                    .arg(routes(i))
                    .start()
                    .expect("start a cluster node")
            })
            .collect();
        NatsCluster { nodes }
    }

    /// Waits until JetStream answers through every node.
    pub async fn wait_until_ready(&self) {
        let cluster = self;
        let size = self.nodes.len();
        // Ready when a stream with a replica on every node can be placed:
        // JetStream answers before all peers have joined.
        let client = async_nats::connect(cluster.nodes[0].url())
            .await
            .expect("connect");
        let js = async_nats::jetstream::new(client);
        wait_for(
            "a JetStream stream to be placed on every node",
            Duration::from_secs(60),
            || async {
                let config = async_nats::jetstream::stream::Config {
                    name: "cluster-ready".into(),
                    subjects: vec!["cluster-ready".into()],
                    num_replicas: size,
                    ..Default::default()
                };
                js.create_stream(config).await.ok().map(|_| ())
            },
        )
        .await;
        js.delete_stream("cluster-ready")
            .await
            .expect("delete the readiness stream");
    }

    /// Waits until every replica of `stream` is current (after a node came
    /// back), so that losing another node keeps a quorum.
    pub async fn wait_for_replicas(&self, stream: &str) {
        let client = async_nats::connect(self.nodes[0].url())
            .await
            .expect("connect");
        let js = async_nats::jetstream::new(client);
        wait_for(
            "every replica of the stream to be current",
            Duration::from_secs(60),
            || async {
                let mut s = js.get_stream(stream).await.ok()?;
                let info = s.info().await.ok()?;
                let cluster = info.cluster.as_ref()?;
                cluster.leader.as_ref()?;
                let replicas = &cluster.replicas;
                (replicas.len() + 1 == self.nodes.len()
                    && replicas.iter().all(|r| r.current && !r.offline))
                .then_some(())
            },
        )
        .await;
    }

    /// Every node's URL, comma-separated, as `NATS_URL` takes them.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }
}
