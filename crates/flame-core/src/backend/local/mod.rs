//! Runners as child processes of the parent, on the same machine.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::process::Command;
use tokio::sync::{oneshot, watch};

use super::{Backend, BootError, BootSpec, Booted, StopRunner, RUNNER_FAILURE_PREFIX};
use crate::BoxError;

mod process;

/// Set in every runner process this backend starts, to the runner id, so
/// that [`LocalBackend::terminate`] kills only that process, never one
/// that reused its pid.
pub const RUNNER_ID_ENV: &str = "FLAME_RUNNER_ID";

/// Boots each runner as a child process: by default the current executable,
/// with the parent's arguments and environment plus the runner's own
/// variables.
///
/// The parent sees a child exit at once, so calls on a runner that dies fail
/// immediately. Children are killed when the pool is dropped; if the parent is
/// killed outright, runners notice their parent is gone and exit after the
/// pool's `parent_grace`.
///
/// A runner's stderr goes to the parent's stderr, line by line, through the
/// parent: when a runner exits, its last [`super::RUNNER_FAILURE_PREFIX`]
/// line (why it could not start) becomes part of the exit reason, and so of
/// the pool's `Error::BootFailed`.
#[derive(Clone, Default)]
pub struct LocalBackend {
    program: Option<PathBuf>,
    args: Option<Vec<OsString>>,
    clear_env: bool,
    extra_env: Vec<(String, String)>,
    memory_limit_mb: Option<u64>,
}

impl std::fmt::Debug for LocalBackend {
    /// The extra variables' names only: their values may be secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let env: Vec<&str> = self.extra_env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("LocalBackend")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("clear_env", &self.clear_env)
            .field("env", &env)
            .field("memory_limit_mb", &self.memory_limit_mb)
            .finish()
    }
}

impl LocalBackend {
    /// Runs the current executable with the parent's arguments.
    pub fn new() -> LocalBackend {
        LocalBackend::default()
    }

    /// Runs another program (which must be built from the same code and
    /// register the same functions).
    pub fn program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = Some(program.into());
        self
    }

    /// Arguments for the runner instead of the parent's own.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// Starts runners with an empty environment (except `PATH`) plus the
    /// pool's forwarded variables, as a remote backend would. Catches
    /// variables you forgot to forward before you deploy.
    pub fn clear_env(mut self, clear: bool) -> Self {
        self.clear_env = clear;
        self
    }

    /// Sets an extra variable in every runner.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra_env.push((key.into(), value.into()));
        self
    }

    /// Limits each runner's memory to `mb` MiB of address space
    /// (`RLIMIT_AS`, as `prlimit --as` sets it; glibc is asked for two
    /// malloc arenas so that threads do not reserve the limit away). A
    /// runner that allocates past it aborts, and the pool reports it as out
    /// of memory to the calls it was running and in its events.
    ///
    /// Linux only: macOS accepts `RLIMIT_AS` but does not enforce it.
    #[cfg(target_os = "linux")]
    pub fn memory_limit_mb(mut self, mb: u64) -> Self {
        self.memory_limit_mb = Some(mb);
        self
    }

    fn command(&self) -> std::io::Result<Command> {
        let program = match &self.program {
            Some(p) => p.clone(),
            None => std::env::current_exe()?,
        };
        let mut cmd = Command::new(program);
        match &self.args {
            Some(args) => cmd.args(args),
            None => cmd.args(std::env::args_os().skip(1)),
        };
        if self.clear_env {
            cmd.env_clear();
            if let Some(path) = std::env::var_os("PATH") {
                cmd.env("PATH", path);
            }
        }
        cmd.envs(self.extra_env.iter().map(|(k, v)| (k, v)));
        #[cfg(target_os = "linux")]
        if let Some(mb) = self.memory_limit_mb {
            let bytes = mb.saturating_mul(1 << 20);
            cmd.env("MALLOC_ARENA_MAX", "2");
            // SAFETY: setrlimit is async-signal-safe and touches no memory
            // of the parent; the closure allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: bytes as libc::rlim_t,
                        rlim_max: bytes as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        Ok(cmd)
    }
}

impl Backend for LocalBackend {
    fn boot(&self, spec: BootSpec) -> BoxFuture<'static, Result<Booted, BoxError>> {
        let cmd = self.command();
        let self_memory_limit = self.memory_limit_mb;
        async move {
            let mut cmd = cmd.map_err(|e| {
                BootError::permanent(with_context("cannot find the executable to run", e))
            })?;
            // Killed on drop by our own guard below, which can be detached.
            cmd.envs(spec.env.iter().map(|(k, v)| (k, v)))
                .env(RUNNER_ID_ENV, &spec.runner_id)
                .stdin(Stdio::null())
                // Read (and passed on) for the runner's failure line.
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().map_err(spawn_failure)?;
            let pid = child.id().unwrap_or(0);
            // The OOM killer's count in the runner's memory cgroup, to tell
            // its SIGKILL from any other.
            let oom_kills_before = oom_kills(pid);
            let memory_limit_mb = self_memory_limit;
            tracing::debug!(pool = %spec.pool, runner = %spec.runner_id, pid, "runner process started");
            let failure = child.stderr.take().map(|stderr| tokio::spawn(pass_on(stderr)));

            let (exit_tx, exit_rx) = oneshot::channel::<String>();
            let (stop_tx, mut stop_rx) = watch::channel::<Option<Duration>>(None);
            let attached = Arc::new(AtomicBool::new(true));
            let guard = KillOnDrop {
                pid,
                attached: attached.clone(),
            };
            // One task owns the child: it reports the exit, and carries out a
            // stop (SIGTERM, then SIGKILL after the grace period). If the task
            // is dropped (the runtime shuts down), the guard kills the child
            // unless it was detached.
            let attached_flag = attached.clone();
            tokio::spawn(async move {
                let guard = guard;
                let status = tokio::select! {
                    status = child.wait() => status,
                    grace = async {
                        loop {
                            if let Some(grace) = *stop_rx.borrow_and_update() {
                                return grace;
                            }
                                if stop_rx.changed().await.is_err() {
                                if !attached_flag.load(Ordering::SeqCst) {
                                    // Detached: let it run; keep reaping it.
                                    std::future::pending::<()>().await;
                                }
                                // The pool dropped its handle: stop the child.
                                return Duration::ZERO;
                            }
                        }
                    } => {
                        signal(pid, libc::SIGTERM);
                        match tokio::time::timeout(grace, child.wait()).await {
                            Ok(status) => status,
                            Err(_) => {
                                let _ = child.start_kill();
                                child.wait().await
                            }
                        }
                    }
                };
                // Reaped: its pid may be reused, so never signal it again.
                guard.attached.store(false, Ordering::SeqCst);
                let mut reason = match status {
                    Ok(s) => {
                        let oom_killed = oom_kills_before
                            .zip(oom_kills(std::process::id()))
                            .is_some_and(|(before, after)| after > before);
                        describe_exit(s, oom_killed, memory_limit_mb)
                    }
                    Err(e) => format!("cannot wait for runner process: {e}"),
                };
                // The pipe ends with the process, unless something it
                // started still holds it: then go on without the line.
                if let Some(failure) = failure {
                    if let Ok(Ok(Some(line))) =
                        tokio::time::timeout(STDERR_END_WAIT, failure).await
                    {
                        reason = format!("{reason}: {line}");
                    }
                }
                let _ = exit_tx.send(reason);
            });
            let exited = async move {
                exit_rx
                    .await
                    .unwrap_or_else(|_| "runner process monitor stopped".to_string())
            }
            .boxed();
            Ok(Booted {
                handle: format!("pid {pid}"),
                exited: Some(exited),
                stopper: Box::new(LocalStopper { stop_tx, attached }),
            })
        }
        .boxed()
    }

    fn runners_are_local(&self) -> bool {
        true
    }

    /// Kills `pid <n>` with SIGKILL, but only if that process is still the
    /// runner (its environment names the runner id), never a process that
    /// reused the pid.
    fn terminate(&self, handle: &str, runner_id: &str) -> BoxFuture<'static, Result<(), BoxError>> {
        let handle = handle.to_string();
        let runner_id = runner_id.to_string();
        async move {
            let pid: u32 = handle
                .strip_prefix("pid ")
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| format!("`{handle}` is not a local runner handle"))?;
            let environ = match process::environment(pid) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                    return Err(e.into());
                }
                // Already gone.
                Err(_) => return Ok(()),
            };
            let marker = format!("{RUNNER_ID_ENV}={runner_id}");
            let is_runner = environ
                .split(|b| *b == 0)
                .any(|var| var == marker.as_bytes());
            if is_runner {
                tracing::debug!(pid, runner = %runner_id, "terminating runner process");
                signal(pid, libc::SIGKILL);
                // Resolve once it is gone (or a zombie), so the caller can
                // count it out.
                for _ in 0..500 {
                    if !process::running(pid) {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                return Err(format!("runner process {pid} did not die after SIGKILL").into());
            }
            Ok(())
        }
        .boxed()
    }
}

/// How long, after a runner process exits, its stderr may take to end.
const STDERR_END_WAIT: Duration = Duration::from_millis(500);

/// Longest failure line kept (the rest is cut).
const MAX_FAILURE_LINE: usize = 2048;

/// Passes a runner's stderr on to the parent's, line by line, and returns
/// the reason of its last failure line ([`RUNNER_FAILURE_PREFIX`]), if any.
async fn pass_on(stderr: tokio::process::ChildStderr) -> Option<String> {
    use std::io::Write;
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(stderr);
    let mut line = Vec::new();
    let mut failure = None;
    loop {
        line.clear();
        match lines.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return failure,
            Ok(_) => {}
        }
        // Whole lines, so that lines of several runners do not mix.
        let _ = std::io::stderr().lock().write_all(&line);
        let text = String::from_utf8_lossy(&line);
        if let Some(reason) = text.trim_end().strip_prefix(RUNNER_FAILURE_PREFIX) {
            let mut reason = reason.to_string();
            if reason.len() > MAX_FAILURE_LINE {
                let mut cut = MAX_FAILURE_LINE;
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                reason.truncate(cut);
                reason.push('…');
            }
            failure = Some(reason);
        }
    }
}

/// A runner process that could not be started: permanent when the program
/// is missing or cannot be run (it will not be there next time either),
/// transient when the system is short of processes or memory.
fn spawn_failure(e: std::io::Error) -> BoxError {
    use std::io::ErrorKind;
    let lasting = matches!(
        e.kind(),
        ErrorKind::NotFound | ErrorKind::PermissionDenied | ErrorKind::InvalidInput
    ) || e.raw_os_error() == Some(libc::ENOEXEC);
    let e = with_context("cannot start runner process", e);
    Box::new(if lasting {
        BootError::permanent(e)
    } else {
        BootError::transient(e)
    })
}

/// An I/O error with what was being done, keeping the error as source.
fn with_context(context: &str, error: std::io::Error) -> BoxError {
    #[derive(Debug, thiserror::Error)]
    #[error("{context}: {source}")]
    struct Contextual {
        context: String,
        source: std::io::Error,
    }
    Box::new(Contextual {
        context: context.to_string(),
        source: error,
    })
}

struct LocalStopper {
    stop_tx: watch::Sender<Option<Duration>>,
    attached: Arc<AtomicBool>,
}

/// Kills the child when dropped, unless detached or already reaped.
struct KillOnDrop {
    pid: u32,
    attached: Arc<AtomicBool>,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.attached.load(Ordering::SeqCst) {
            signal(self.pid, libc::SIGKILL);
        }
    }
}

impl StopRunner for LocalStopper {
    fn stop(&self, grace: Duration) -> BoxFuture<'static, ()> {
        let _ = self.stop_tx.send(Some(grace));
        let tx = self.stop_tx.clone();
        // Resolves when the monitor task drops its receiver, i.e. the child
        // has exited.
        async move { tx.closed().await }.boxed()
    }

    fn detach(&self) {
        self.attached.store(false, Ordering::SeqCst);
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    if pid > 0 {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our
        // own child, which has not been reaped yet (the monitor owns it).
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}

/// A runner process's end in words. Out of memory is said as such: killed
/// (SIGKILL) while the OOM killer's count of its memory cgroup went up, or
/// aborted (SIGABRT, what Rust does when an allocation fails) under a
/// [`LocalBackend::memory_limit_mb`].
fn describe_exit(
    status: std::process::ExitStatus,
    oom_killed: bool,
    memory_limit_mb: Option<u64>,
) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("runner process exited with code {code}"),
        (None, Some(libc::SIGKILL)) if oom_killed => {
            "runner process ran out of memory: killed by the kernel's OOM killer (signal 9)"
                .to_string()
        }
        (None, Some(libc::SIGABRT)) if memory_limit_mb.is_some() => format!(
            "runner process ran out of memory: an allocation failed at its memory limit of {} MiB (aborted, signal 6)",
            memory_limit_mb.unwrap_or_default()
        ),
        (None, Some(sig)) => format!("runner process was killed by signal {sig}"),
        _ => "runner process exited".to_string(),
    }
}

/// How many times the OOM killer struck in the memory cgroup of `pid`
/// (cgroup v2 `memory.events`, or v1 `memory.oom_control`); `None` where
/// that cannot be read, and on systems other than Linux (no cgroups: a
/// runner the system killed for memory is reported as killed by its
/// signal).
#[cfg(not(target_os = "linux"))]
fn oom_kills(_pid: u32) -> Option<u64> {
    None
}

/// How many times the OOM killer struck in the memory cgroup of `pid`
/// (cgroup v2 `memory.events`, or v1 `memory.oom_control`); `None` where
/// that cannot be read.
#[cfg(target_os = "linux")]
fn oom_kills(pid: u32) -> Option<u64> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mut files = Vec::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.is_empty() {
            files.push(format!("/sys/fs/cgroup{path}/memory.events"));
            files.push(format!("/sys/fs/cgroup/unified{path}/memory.events"));
        } else if controllers.split(',').any(|c| c == "memory") {
            files.push(format!("/sys/fs/cgroup/memory{path}/memory.oom_control"));
        }
    }
    files.iter().find_map(|f| {
        let text = std::fs::read_to_string(f).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_variable_names_not_values() {
        let backend = LocalBackend::new().env("NATS_PASSWORD", "s3cret");
        let shown = format!("{backend:?}");
        assert!(
            shown.contains("NATS_PASSWORD") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
}
