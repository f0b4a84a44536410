//! A private PostgreSQL server for a demo, a test or a suite: `initdb` into
//! a temporary directory, `postgres` on a free port of 127.0.0.1, killed on
//! drop and with this process, even on SIGKILL
//! ([`flame::embedded::TiedChild`]).
//!
//! The binaries come from `PATH` or `/usr/lib/postgresql/<version>/bin`
//! (Debian's `postgresql` package; `scripts/install-postgres` installs it).
//! PostgreSQL refuses to run as root, so as root the server runs as the
//! `postgres` user (or `nobody`).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flame::embedded::TiedChild;

/// A running PostgreSQL server; stopped when dropped.
pub struct PgServer {
    /// Killed when dropped.
    _child: TiedChild,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PgServer {
    /// Starts a server with a trusted user `flame` and database `flame`.
    /// Panics with a message saying what to install when PostgreSQL is
    /// missing.
    pub fn start() -> PgServer {
        let bin = find_bin_dir().unwrap_or_else(|| {
            panic!(
                "PostgreSQL (initdb, postgres) was not found on PATH or in \
                 /usr/lib/postgresql/*/bin: run scripts/install-postgres \
                 (Debian package `postgresql`)"
            )
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let owner = run_as();
        if let Some((uid, gid)) = owner {
            chown(dir.path(), uid, gid);
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "flame", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_owner(&mut initdb, owner, dir.path());
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let mut postgres = Command::new(bin.join("postgres"));
        postgres
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(dir.path()));
        as_owner(&mut postgres, owner, dir.path());
        // Tied to this process (its parent-death signal is set after the
        // uid change, which would clear it otherwise).
        let child = TiedChild::spawn(postgres).expect("start postgres");
        let server = PgServer {
            _child: child,
            port,
            _dir: dir,
        };
        server.wait_ready(&bin);
        server
    }

    /// Connection URL of the `flame` database, as the `flame` user.
    pub fn url(&self) -> String {
        format!("postgres://flame@127.0.0.1:{}/postgres", self.port)
    }

    /// A client connection (its driver task runs on the current runtime).
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("connect to the test postgres");
        tokio::spawn(connection);
        client
    }

    /// Waits until the server accepts connections (not merely listens:
    /// it refuses them while it starts up).
    fn wait_ready(&self, bin: &Path) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = Command::new(bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not accept connections on port {} within 60 s; its log:\n{}",
                self.port,
                std::fs::read_to_string(self._dir.path().join("postgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The server's log, kept in its directory (shown when it does not start).
fn log_file(dir: &Path) -> Stdio {
    std::fs::File::create(dir.join("postgres.log"))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

fn find_bin_dir() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").exists() && dir.join("postgres").exists() {
                // PATH may hold links to the real directory, which has
                // pg_isready too.
                let real = std::fs::canonicalize(dir.join("initdb")).ok()?;
                return real.parent().map(Path::to_path_buf);
            }
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop()
}

/// The user to run PostgreSQL as, when this process is root.
fn run_as() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    for name in [c"postgres", c"nobody"] {
        // SAFETY: getpwnam reads a NUL-terminated name; the returned record
        // is read at once, before any other call that could reuse it.
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        if !pw.is_null() {
            // SAFETY: non-null, as checked.
            let pw = unsafe { &*pw };
            return Some((pw.pw_uid, pw.pw_gid));
        }
    }
    panic!("running as root, and there is no `postgres` or `nobody` user to run PostgreSQL as");
}

/// Runs `cmd` in `dir`, as `owner` when given.
fn as_owner(cmd: &mut Command, owner: Option<(u32, u32)>, dir: &Path) {
    cmd.current_dir(dir);
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid).env("HOME", dir);
    }
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown the postgres dir");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
