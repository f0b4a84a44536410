//! Processes and signals: whether a pid lives, SIGKILL and SIGTERM,
//! children of a process, the runner processes of a pool, and sampling
//! them over time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// True while a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3 is the state; Z is a zombie, X dead.
        Ok(stat) => !matches!(
            stat.rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next()),
            Some("Z") | Some("X")
        ),
        Err(_) => false,
    }
}

/// Sends SIGKILL to a process (never to a process group: pid 0 is
/// ignored).
pub fn kill9(pid: u32) {
    if pid == 0 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// Sends SIGTERM to a process (pid 0 is ignored).
pub fn sigterm(pid: u32) {
    if pid == 0 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
}

/// Pids of the live children of a process.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    // Fields after the command: state, ppid, ...
                    let rest = stat.rsplit(')').next()?.split_whitespace().nth(1)?;
                    rest.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .filter(|child| process_alive(*child))
        .collect()
}

/// Pids of the live runner processes of a pool, found by the pool name in
/// their `FLAME_PARENT` variable.
pub fn runner_pids(pool: &str) -> Vec<u32> {
    let needle = format!("\"pool\":\"{pool}\"");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
                return false;
            };
            environ.split(|b| *b == 0).any(|var| {
                var.starts_with(b"FLAME_PARENT=")
                    && var.windows(needle.len()).any(|w| w == needle.as_bytes())
            })
        })
        .filter(|pid| process_alive(*pid))
        .collect()
}

/// Watches a pool's runner processes from a thread and keeps the most seen
/// alive at once.
pub struct RunnerSampler {
    peak: Arc<AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunnerSampler {
    /// Starts sampling the runners of `pool`.
    pub fn start(pool: &str) -> RunnerSampler {
        let peak = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, s, pool) = (peak.clone(), stop.clone(), pool.to_string());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                p.fetch_max(runner_pids(&pool).len(), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        RunnerSampler {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    /// Most runners seen alive at once so far.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

impl Drop for RunnerSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
