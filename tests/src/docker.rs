//! A private Docker Engine for the tests of the Docker backend: one real
//! `dockerd` per test binary, started on first use, and the runner images
//! built locally (no image registry is reachable here).
//!
//! The engine runs inside `unshare --pid --mount --mount-proc --fork
//! --kill-child`, with its own containerd (`/run/containerd` is a tmpfs of
//! its mount namespace: a host's containerd is not used, and the shims'
//! sockets go with the namespace), data root, exec root and socket under
//! `/tmp/flame-dockerd-<pid>/` and its containers' cgroups under
//! `flame-dockerd-<pid>`:
//! - the test process's death kills `unshare` (`PR_SET_PDEATHSIG`, set on
//!   it from a thread that lives as long as the process), `unshare` kills
//!   `dockerd` (`--kill-child`), and the end of `dockerd`, the first
//!   process of its PID namespace, kills every process in it: containerd,
//!   shims and containers. Its mounts (overlays) go with its mount
//!   namespace. Nothing outlives the tests, even when they are SIGKILLed;
//! - at a normal exit (an `atexit` hook) the engine is killed, and its
//!   directory and (emptied) cgroups are removed; what a killed test binary
//!   left is removed by the next one that starts an engine.
//!
//! Runners share the host's network (`--bridge=none --iptables=false`,
//! containers in network mode `host`), so they reach the test's
//! nats-server on 127.0.0.1, and they get the host's `/tmp` (the files
//! tests make for them are there).
//!
//! Images, all made from one `docker import` of a tar holding the test app
//! (`flame-testapp`), `sleep`, and the shared libraries `ldd` lists for
//! them:
//! - [`IMAGE`]: the test app as a runner;
//! - [`IMAGE_EXITS_EARLY`]: the test app's `no-state` mode: it exits with
//!   code 3 before it is ready;
//! - [`IMAGE_STUCK`]: `sleep 600`: started, never ready;
//! - [`IMAGE_MISSING`] is never built: creating its container fails (404).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::harness::testapp;

/// The working runner image.
pub const IMAGE: &str = "flame-test/runner:working";
/// A runner that exits with code 3 before it is ready.
pub const IMAGE_EXITS_EARLY: &str = "flame-test/runner:exits-early";
/// A container that starts and never becomes a runner.
pub const IMAGE_STUCK: &str = "flame-test/runner:stuck";
/// An image that is not there.
pub const IMAGE_MISSING: &str = "flame-test/missing:1";

/// Prefix of the engine's directory (in `/tmp`) and cgroup.
const PREFIX: &str = "flame-dockerd-";

/// The `unshare` process of this test binary's engine.
static UNSHARE_PID: AtomicU32 = AtomicU32::new(0);

/// This test binary's Docker Engine.
#[derive(Debug)]
pub struct Dockerd {
    /// `unix:///tmp/flame-dockerd-<pid>/docker.sock`, for `DOCKER_HOST`.
    pub host: String,
    dir: PathBuf,
}

/// The engine, started (and its images built) on first use.
pub fn dockerd() -> &'static Dockerd {
    static ENGINE: OnceLock<Dockerd> = OnceLock::new();
    ENGINE.get_or_init(start)
}

impl Dockerd {
    /// Runs the `docker` command on this engine; its stdout when it
    /// succeeds, else a panic with its stderr.
    pub fn docker(&self, args: &[&str]) -> String {
        let out = self
            .docker_command(args)
            .output()
            .expect("run the docker command");
        assert!(
            out.status.success(),
            "docker {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The `docker` command on this engine, to run as one likes.
    pub fn docker_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("docker");
        command
            .args(args)
            .env("DOCKER_HOST", &self.host)
            .stdin(Stdio::null());
        command
    }

    /// Ids of the containers (any state) carrying `label` (`key=value`).
    pub fn containers_labelled(&self, label: &str) -> Vec<String> {
        self.docker(&[
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &format!("label={label}"),
        ])
        .lines()
        .map(str::to_string)
        .collect()
    }

    /// The API calls the engine has logged (`POST /containers/create?...`,
    /// without the version prefix) whose line holds one of `needles`
    /// (a container id, a pool's name), in order.
    pub fn api_calls(&self, needles: &[&str]) -> Vec<String> {
        let log = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        log.lines()
            .filter_map(|line| {
                let call = line.split("Calling ").nth(1)?;
                let call = call.trim_end_matches('"');
                let (method, path) = call.split_once(' ')?;
                let path = match path.strip_prefix("/v1.") {
                    Some(rest) => &rest[rest.find('/')?..],
                    None => path,
                };
                needles
                    .iter()
                    .any(|n| line.contains(n))
                    .then(|| format!("{method} {path}"))
            })
            .collect()
    }

    /// The engine's cgroup directory of `controller` (`memory`, ...).
    pub fn cgroup_dir(&self, controller: &str) -> PathBuf {
        Path::new("/sys/fs/cgroup")
            .join(controller)
            .join(format!("{PREFIX}{}", std::process::id()))
    }
}

fn start() -> Dockerd {
    sweep_stale();
    let pid = std::process::id();
    let dir = PathBuf::from(format!("/tmp/{PREFIX}{pid}"));
    std::fs::create_dir_all(&dir).expect("the engine's directory");
    let host = format!("unix://{}/docker.sock", dir.display());
    let log = std::fs::File::create(dir.join("dockerd.log")).expect("dockerd.log");
    let mut command = Command::new("unshare");
    command
        .args([
            "--pid",
            "--mount",
            "--mount-proc",
            "--fork",
            "--kill-child",
            "--",
            "sh",
            "-c",
            // A containerd of the host's (its socket in /run/containerd)
            // would be used by dockerd, and its containers would not be in
            // our namespaces: hide it under a tmpfs, so dockerd starts its
            // own, whose shims' sockets (in /run/containerd/s) then go
            // with the namespace too.
            "mkdir -p /run/containerd && mount -t tmpfs none /run/containerd && exec \"$@\"",
            "dockerd",
        ])
        .arg("dockerd")
        .arg("--data-root")
        .arg(dir.join("data"))
        .arg("--exec-root")
        .arg(dir.join("exec"))
        .arg("--pidfile")
        .arg(dir.join("docker.pid"))
        .args(["-H", &host])
        .args(["--bridge=none", "--iptables=false", "--ip6tables=false"])
        .args(["--cgroup-parent", &format!("{PREFIX}{pid}")])
        // Debug: the log names every API call ([`Dockerd::api_calls`]).
        .args(["--log-level", "debug"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dockerd.log"))
        .stderr(log);
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // PR_SET_PDEATHSIG fires when the *thread* that forked dies: fork from
    // one that lives until the process ends.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || match command.spawn() {
        Ok(mut child) => {
            UNSHARE_PID.store(child.id(), Ordering::SeqCst);
            let _ = tx.send(Ok(()));
            let _ = child.wait();
            loop {
                std::thread::park();
            }
        }
        Err(e) => {
            let _ = tx.send(Err(e));
        }
    });
    rx.recv()
        .expect("the dockerd thread")
        .expect("start dockerd (is docker.io installed? scripts/install-docker)");
    // SAFETY: registers a plain function to run at exit.
    unsafe {
        libc::atexit(stop_at_exit);
    }
    let engine = Dockerd { host, dir };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !engine
        .docker_command(&["version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        assert!(
            Instant::now() < deadline,
            "dockerd did not answer within 60 s: {}",
            std::fs::read_to_string(engine.dir.join("dockerd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    build_images(&engine);
    engine
}

/// Builds the runner images from the test app and `sleep`.
fn build_images(engine: &Dockerd) {
    let root = engine.dir.join("image-root");
    let _ = std::fs::remove_dir_all(&root);
    let sleep = which("sleep");
    for binary in [testapp(), sleep.clone()] {
        let name = binary.file_name().expect("a file name");
        let into = if binary == sleep { "bin" } else { "" };
        copy_into(&root, &binary, &Path::new("/").join(into).join(name));
        for lib in shared_libraries(&binary) {
            copy_into(&root, &lib, &lib);
        }
    }
    std::fs::create_dir_all(root.join("tmp")).expect("tmp in the image");
    let tar = engine.dir.join("image.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .expect("run tar");
    assert!(status.success(), "tar of the image root failed");
    engine.docker(&[
        "import",
        "--change",
        r#"ENTRYPOINT ["/flame-testapp"]"#,
        tar.to_str().expect("a UTF-8 path"),
        IMAGE,
    ]);
    for (tag, entrypoint) in [
        (
            IMAGE_EXITS_EARLY,
            r#"ENTRYPOINT ["/flame-testapp", "no-state"]"#,
        ),
        (IMAGE_STUCK, r#"ENTRYPOINT ["/bin/sleep", "600"]"#),
    ] {
        let id = engine.docker(&["create", IMAGE]);
        engine.docker(&["commit", "--change", entrypoint, id.trim(), tag]);
        engine.docker(&["rm", id.trim()]);
    }
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_file(&tar);
}

fn which(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} is not on PATH"))
}

/// The shared libraries `ldd` lists for `binary`, the loader included.
fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(binary).output().expect("run ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Copies `from` (following links) to `to` under `root`.
fn copy_into(root: &Path, from: &Path, to: &Path) {
    let target = root.join(to.strip_prefix("/").unwrap_or(to));
    std::fs::create_dir_all(target.parent().expect("a parent")).expect("a directory");
    std::fs::copy(from, &target)
        .unwrap_or_else(|e| panic!("copy {} into the image: {e}", from.display()));
}

/// At the process's exit: kills the engine (and so everything in its
/// namespaces), then removes its directory and cgroups.
extern "C" fn stop_at_exit() {
    let pid = UNSHARE_PID.load(Ordering::SeqCst);
    if pid != 0 {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
    remove_leftovers(std::process::id(), Duration::from_secs(10));
}

/// Removes what engines of test processes no longer alive left.
fn sweep_stale() {
    let mut pids = Vec::new();
    let controllers = std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default();
    for dir in std::iter::once(PathBuf::from("/tmp")).chain(controllers) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name
                    .strip_prefix(PREFIX)
                    .and_then(|p| p.parse::<u32>().ok())
                {
                    if !Path::new(&format!("/proc/{pid}")).exists() && !pids.contains(&pid) {
                        pids.push(pid);
                    }
                }
            }
        }
    }
    for pid in pids {
        remove_leftovers(pid, Duration::from_secs(2));
    }
}

/// Removes the directory and cgroups of the engine of test process `pid`,
/// waiting up to `limit` for its processes to be gone from the cgroups.
fn remove_leftovers(pid: u32, limit: Duration) {
    let name = format!("{PREFIX}{pid}");
    let deadline = Instant::now() + limit;
    let controllers: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    for controller in controllers {
        let top = controller.join(&name);
        if !top.exists() {
            continue;
        }
        // Deepest first: a cgroup goes only once empty and childless.
        loop {
            let mut dirs = Vec::new();
            collect_dirs(&top, &mut dirs);
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            let left = dirs
                .iter()
                .filter(|d| std::fs::remove_dir(d).is_err())
                .count();
            if left == 0 || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = std::fs::remove_dir_all(format!("/tmp/{name}"));
}

fn collect_dirs(dir: &Path, into: &mut Vec<PathBuf>) {
    into.push(dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), into);
            }
        }
    }
}
