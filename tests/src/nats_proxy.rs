//! A TCP proxy in front of a nats-server that a test can make lose what a
//! client writes, then cut: the way a server that dies loses the last bytes
//! its clients sent it. Clients reconnect through it as to any server.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The proxy, stopped (with its connections) on drop.
pub struct NatsProxy {
    port: u16,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

struct Shared {
    /// While set, what clients write is read and dropped, not forwarded.
    losing: AtomicBool,
    /// What was dropped so far.
    lost: Mutex<Vec<u8>>,
    /// Bumped to cut every connection open now.
    cut: watch::Sender<u64>,
}

impl NatsProxy {
    /// Listens on a free port of 127.0.0.1, forwarding to `upstream`
    /// (`host:port`).
    pub async fn start(upstream: String) -> NatsProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            losing: AtomicBool::new(false),
            lost: Mutex::new(Vec::new()),
            cut: watch::Sender::new(0),
        });
        let accepting = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                tokio::spawn(relay(client, server, accepting.clone()));
            }
        });
        NatsProxy {
            port,
            shared,
            accept,
        }
    }

    /// The URL clients connect to.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// From now on, drops what clients write instead of forwarding it.
    pub fn lose_writes(&self) {
        self.shared.losing.store(true, Ordering::SeqCst);
    }

    /// What was dropped so far, as text (the NATS protocol is text but for
    /// payloads).
    pub fn lost(&self) -> String {
        String::from_utf8_lossy(&self.shared.lost.lock().unwrap()).into_owned()
    }

    /// Cuts every open connection and forwards again: clients see their
    /// server gone and reconnect.
    pub fn cut(&self) {
        self.shared.losing.store(false, Ordering::SeqCst);
        self.shared.cut.send_modify(|n| *n += 1);
    }
}

impl Drop for NatsProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.cut.send_modify(|n| *n += 1);
    }
}

/// Relays one connection until either side closes or it is cut; dropping
/// both sockets closes them.
async fn relay(mut client: TcpStream, mut server: TcpStream, shared: Arc<Shared>) {
    let mut cut = shared.cut.subscribe();
    cut.borrow_and_update();
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = client_read.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            if shared.losing.load(Ordering::SeqCst) {
                shared.lost.lock().unwrap().extend_from_slice(&buf[..n]);
            } else {
                server_write.write_all(&buf[..n]).await?;
            }
        }
    };
    let down = tokio::io::copy(&mut server_read, &mut client_write);
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cut.changed() => {}
    }
}
