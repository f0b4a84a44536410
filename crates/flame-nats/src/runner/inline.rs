//! Where a call runs: inline on the serve loop, or handed off (its own
//! task for an async function, the blocking pool for a plain one). Handing
//! off costs a cross-thread wake-up, most of a short call's cost on a small
//! machine; running inline stalls the serve loop if the call is long. So
//! each function's first runs are timed on the thread's CPU clock, and a
//! function earns (or loses) the inline path by how they went.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::time::Duration;

/// A first poll longer than this marks a function as doing CPU work before
/// its first await; its calls are then always spawned.
pub(super) const SLOW_FIRST_POLL: Duration = Duration::from_millis(1);

/// Slow first polls in a row after which a function's calls are always
/// spawned.
pub(super) const SLOW_STRIKES: u8 = 3;

/// Fast first polls in a row after which a function's first polls are
/// timed only now and then: timing takes two syscalls per call.
pub(super) const TRUST_AFTER: u32 = 32;

/// A trusted function's first polls are timed once in this many calls.
pub(super) const SAMPLE_EVERY: u32 = 16;

/// A plain function whose runs on the blocking pool all took less than
/// this ...
pub(super) const FAST_PLAIN: Duration = Duration::from_micros(200);

/// ... this many times in a row runs inline from then on: handing a short
/// call to the blocking pool and back costs more than the call.
pub(super) const TRUST_PLAIN_AFTER: u32 = 32;

/// A plain function that ran longer than this inline [`SLOW_STRIKES`]
/// times in a row goes back to the blocking pool for good (it held up the
/// runner's serve loop; one slow run may be a preemption on a busy machine).
pub(super) const SLOW_INLINE_PLAIN: Duration = Duration::from_millis(1);

/// How a function's first polls went: its slow ones in a row, its fast
/// ones in a row, and its calls.
#[derive(Debug, Default)]
pub(super) struct PollWatch {
    strikes: AtomicU8,
    fast_in_row: AtomicU32,
    calls: AtomicU32,
    /// Plain functions: fast runs on the blocking pool in a row.
    plain_fast_in_row: AtomicU32,
    /// Plain functions: slow inline runs in a row.
    plain_strikes: AtomicU8,
    /// Plain functions: ran long inline too often; never inline again.
    plain_banned: AtomicBool,
}

impl PollWatch {
    /// Whether this call's first poll may run inline.
    pub(super) fn inline(&self) -> bool {
        self.strikes.load(Ordering::Relaxed) < SLOW_STRIKES
    }

    /// Whether to time this call's first poll: always until the function
    /// is trusted, then once in [`SAMPLE_EVERY`] calls.
    pub(super) fn time_this_one(&self) -> bool {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        self.fast_in_row.load(Ordering::Relaxed) < TRUST_AFTER || n.is_multiple_of(SAMPLE_EVERY)
    }

    /// Whether a call of this plain function may run inline (see
    /// [`TRUST_PLAIN_AFTER`]).
    pub(super) fn plain_inline(&self) -> bool {
        !self.plain_banned.load(Ordering::Relaxed)
            && self.plain_fast_in_row.load(Ordering::Relaxed) >= TRUST_PLAIN_AFTER
    }

    /// Notes how long a run of this plain function took, inline or on the
    /// blocking pool; true when it sent the function back to the pool.
    pub(super) fn plain_ran(&self, took: Duration, inline: bool) -> bool {
        if inline {
            if took <= SLOW_INLINE_PLAIN {
                self.plain_strikes.store(0, Ordering::Relaxed);
            } else if self.plain_strikes.fetch_add(1, Ordering::Relaxed) + 1 >= SLOW_STRIKES {
                self.plain_banned.store(true, Ordering::Relaxed);
                return true;
            }
        } else if took <= FAST_PLAIN {
            self.plain_fast_in_row.fetch_add(1, Ordering::Relaxed);
        } else {
            self.plain_fast_in_row.store(0, Ordering::Relaxed);
        }
        false
    }

    /// Notes a timed first poll; true when it made the function's calls
    /// spawned from now on.
    pub(super) fn timed(&self, took: Duration) -> bool {
        if took <= SLOW_FIRST_POLL {
            self.strikes.store(0, Ordering::Relaxed);
            self.fast_in_row.fetch_add(1, Ordering::Relaxed);
            false
        } else {
            self.fast_in_row.store(0, Ordering::Relaxed);
            self.strikes.fetch_add(1, Ordering::Relaxed) + 1 == SLOW_STRIKES
        }
    }
}

/// CPU time consumed by the calling thread.
pub(super) fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_polls_are_timed_until_trusted_then_sampled() {
        let watch = PollWatch::default();
        let fast = Duration::from_micros(10);
        for _ in 0..TRUST_AFTER {
            assert!(watch.time_this_one());
            assert!(!watch.timed(fast));
        }
        let timed = (0..SAMPLE_EVERY * 4)
            .filter(|_| watch.time_this_one())
            .count();
        assert_eq!(timed, 4);
        // Slow three times in a row (as sampled): spawned from then on.
        let slow = SLOW_FIRST_POLL * 2;
        assert!(!watch.timed(slow));
        assert!(!watch.timed(slow));
        assert!(watch.inline());
        assert!(watch.timed(slow));
        assert!(!watch.inline());
        // A slow one resets the trust: timed every call again.
        assert!((0..3).all(|_| watch.time_this_one()));
    }

    #[test]
    fn short_plain_functions_go_inline_and_slow_ones_back_to_the_pool() {
        let w = PollWatch::default();
        for _ in 0..TRUST_PLAIN_AFTER - 1 {
            assert!(!w.plain_inline());
            w.plain_ran(Duration::from_micros(50), false);
        }
        // A slow run on the pool starts the count again.
        w.plain_ran(Duration::from_millis(5), false);
        assert!(!w.plain_inline());
        for _ in 0..TRUST_PLAIN_AFTER {
            w.plain_ran(Duration::from_micros(50), false);
        }
        assert!(w.plain_inline());
        // Slow inline runs: a hiccup is forgiven, a habit is not.
        assert!(!w.plain_ran(Duration::from_millis(5), true));
        assert!(!w.plain_ran(Duration::from_micros(10), true));
        assert!(w.plain_inline());
        for i in 1..=SLOW_STRIKES {
            let banned = w.plain_ran(Duration::from_millis(5), true);
            assert_eq!(banned, i == SLOW_STRIKES);
        }
        assert!(!w.plain_inline());
        for _ in 0..2 * TRUST_PLAIN_AFTER {
            w.plain_ran(Duration::from_micros(50), false);
        }
        assert!(!w.plain_inline());
    }
}
