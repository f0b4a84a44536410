//! A second parent process of a shared pool (the test app), driven from
//! the test, and what it reports.

use std::time::Duration;

use super::{kill9, runner_pids, testapp};

/// What a `shared-parent` test app printed when its calls were done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentReport {
    /// Calls that succeeded.
    pub ok: usize,
    /// Calls that failed.
    pub failed: usize,
    /// Highest runner-side concurrency any call reported.
    pub peak: usize,
    /// Runner pids that served its calls.
    pub pids: Vec<u32>,
    /// The kinds (`flame::Error` variant names) of the failed calls, each
    /// once.
    pub failure_kinds: Vec<String>,
}

/// A parent process of a shared pool (`flame-testapp shared-parent`),
/// killed on drop.
pub struct SharedParent {
    /// The process.
    pub child: tokio::process::Child,
    /// Its parent id.
    pub parent_id: String,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Calls done so far, from its progress lines.
    pub progress: usize,
    pool: String,
}

impl Drop for SharedParent {
    /// Kills the parent and the pool's runners, rather than leave them to
    /// exit on their own after their grace period.
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        for pid in runner_pids(&self.pool) {
            kill9(pid);
        }
    }
}

impl SharedParent {
    /// Starts a parent of `pool` on the server at `url` and waits until it is
    /// ready. `calls` 0 runs until killed.
    pub async fn start(
        url: &str,
        pool: &str,
        (max, max_concurrency): (usize, usize),
        (callers, calls, ms): (usize, usize, u64),
        extra_env: &[(&str, &str)],
    ) -> SharedParent {
        use tokio::io::AsyncBufReadExt;
        let mut cmd = tokio::process::Command::new(testapp());
        cmd.arg("shared-parent")
            .arg(pool)
            .args([max, max_concurrency, callers, calls].map(|n| n.to_string()))
            .arg(ms.to_string())
            .env(flame::env::NATS_URL, url)
            .env(flame::env::BUILD_ID, crate::TEST_BUILD)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn shared parent");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = tokio::time::timeout(Duration::from_secs(60), lines.recv())
            .await
            .expect("parent ready in time")
            .expect("parent printed nothing");
        let parent_id = first
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("unexpected first line: {first}"))
            .to_string();
        SharedParent {
            child,
            parent_id,
            lines,
            progress: 0,
            pool: pool.to_string(),
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Reads output until the calls are done (or `limit` passes).
    pub async fn done(&mut self, limit: Duration) -> ParentReport {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .expect("parent finished in time")
                .expect("parent exited before it was done");
            if let Some(rest) = line.strip_prefix("done ") {
                let f: Vec<&str> = rest.split(' ').collect();
                return ParentReport {
                    ok: f[0].parse().unwrap(),
                    failed: f[1].parse().unwrap(),
                    peak: f[2].parse().unwrap(),
                    pids: f
                        .get(3)
                        .map(|p| p.split(',').filter_map(|x| x.parse().ok()).collect())
                        .unwrap_or_default(),
                    failure_kinds: f
                        .get(4)
                        .map(|k| {
                            k.split(',')
                                .filter(|x| !x.is_empty() && *x != "-")
                                .map(str::to_string)
                                .collect()
                        })
                        .unwrap_or_default(),
                };
            }
            self.note(&line);
        }
    }

    /// Waits until the parent has completed `n` calls in all.
    pub async fn progressed_to(&mut self, n: usize, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.progress < n {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("parent stuck at {} calls, waiting for {n}", self.progress)
                })
                .expect("parent exited");
            self.note(&line);
        }
    }

    fn note(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("progress ") {
            if let Some(ok) = rest.split(' ').next().and_then(|n| n.parse().ok()) {
                self.progress = self.progress.max(ok);
            }
        }
    }
}

impl SharedParent {
    /// Closes the parent's stdin: once its calls are done it shuts its pool
    /// down, prints `shut down` and exits.
    pub fn close_stdin(&mut self) {
        drop(self.child.stdin.take());
    }

    /// Waits (at most `limit`) for a line starting with `prefix`, reading
    /// past other lines; panics if the parent exits first.
    pub async fn line_starting(&mut self, prefix: &str, limit: Duration) -> String {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no `{prefix}` line within {limit:?}"))
                .unwrap_or_else(|| panic!("parent exited before printing `{prefix}`"));
            if line.starts_with(prefix) {
                return line;
            }
            self.note(&line);
        }
    }
}
