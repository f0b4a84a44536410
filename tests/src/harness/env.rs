//! A test's environment: a real nats-server of its own and a `Flame`
//! connected to it with the test state, and the pools and backends tests
//! build on it.

use std::time::Duration;

use super::{init_tracing, testapp};
use crate::TEST_BUILD;
use flame::embedded::NatsServer;
use flame::{Flame, LocalBackend, PoolBuilder};

/// The state every process of the tests gives flame, parent and runner
/// alike: the remote functions in [`crate::funcs`] take these.
pub fn with_test_state(builder: flame::FlameBuilder) -> flame::FlameBuilder {
    builder
        .state(crate::funcs::Db::from_env())
        .state(crate::funcs::Greeting("hello".into()))
}

/// A parent's builder with the test build id and the test state.
pub fn builder() -> flame::FlameBuilder {
    with_test_state(flame::FlameBuilder::new().build_id(TEST_BUILD))
}

/// A private nats-server and a parent connected to it.
pub struct TestEnv {
    /// The server (killed on drop).
    pub server: NatsServer,
    /// The parent.
    pub flame: Flame,
    /// The URL runners are told (see [`TestEnv::runner_nats_url`]).
    runner_url: String,
}

impl TestEnv {
    /// Starts a server and connects a parent with the test build id.
    pub async fn start() -> TestEnv {
        init_tracing();
        let (server, runner_url) = crate::real_k8s::nats_server();
        // Said on purpose: the stand-ins' runners run on this machine (on
        // a real cluster, the address its Pods reach).
        let runner_url = runner_url.unwrap_or_else(|| server.url());
        let flame = builder()
            .nats_url(server.url())
            .runner_nats_url(&runner_url)
            .init()
            .await
            .expect("connect to test nats-server");
        TestEnv {
            server,
            flame,
            runner_url,
        }
    }

    /// The NATS URL the parent tells its runners: the server's, but for
    /// the conformance suite on a real cluster (`tests/src/real_k8s.rs`).
    pub fn runner_nats_url(&self) -> String {
        self.runner_url.clone()
    }

    /// A pool whose runners are `flame-testapp` processes of the test build.
    pub fn pool(&self, name: &str) -> PoolBuilder {
        self.flame.pool(name).backend(runner_backend())
    }

    /// A second parent on the same server.
    pub async fn another_parent(&self) -> Flame {
        builder().nats_url(self.server.url()).init().await.unwrap()
    }

    /// A plain NATS client on the same server.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.server.url())
            .await
            .expect("connect")
    }
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The custom data (`in_flight`, `max_in_flight`, ...) that a pool's runner
/// reports through `$SRV.STATS`; the first runner to answer. `None` while no
/// runner answers.
pub async fn runner_stats(env: &TestEnv, pool: &str) -> Option<serde_json::Value> {
    // A short limit: a runner checks its permissions on a first connection
    // that it then drops, and a request that reached that one is never
    // answered (nor refused as having no responders).
    let request = async_nats::Request::new()
        .payload("".into())
        .timeout(Some(Duration::from_millis(500)));
    let reply = env
        .client()
        .await
        .send_request(format!("$SRV.STATS.flame-{pool}"), request)
        .await
        .ok()?;
    let stats: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
    Some(stats["endpoints"][0]["data"].clone())
}

/// A shared pool of test runners on `flame`, with 500 ms heartbeats.
pub fn shared_pool(flame: &Flame, name: &str) -> PoolBuilder {
    flame
        .pool(name)
        .shared(true)
        .heartbeat(Duration::from_millis(500))
        .backend(runner_backend())
}

/// The local backend running `flame-testapp` with the test build id.
pub fn runner_backend() -> LocalBackend {
    LocalBackend::new()
        .program(testapp())
        .args(Vec::<String>::new())
        .env(flame::env::BUILD_ID, TEST_BUILD)
}

/// Returns once the server has processed everything `client` sent so far
/// (a flush only writes it out): a message to a fresh inbox of its own
/// has come back.
pub async fn round_trip(client: &async_nats::Client) {
    use futures::StreamExt;
    let inbox = client.new_inbox();
    let mut echo = client.subscribe(inbox.clone()).await.expect("subscribe");
    client
        .publish(inbox, bytes::Bytes::new())
        .await
        .expect("publish");
    tokio::time::timeout(Duration::from_secs(30), echo.next())
        .await
        .expect("the server echoes within 30 s")
        .expect("an echo");
}
