//! Exponential backoff with jitter, for anything that tries again: boots,
//! platform API requests, a JetStream that is not ready yet.
//!
//! In the style of tower's `ExponentialBackoff`: each pause doubles from
//! `first` up to `max`, and up to a quarter of it is added at random, so
//! that many processes started together (a rolling deploy, `docker compose
//! up`) do not retry in step. With a deadline, the pauses never run past
//! it.
//!
//! ```
//! use std::time::Duration;
//! use flame_core::backoff::Backoff;
//!
//! let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
//! let first = backoff.next_pause();
//! assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(125));
//! assert_eq!(backoff.attempts(), 1);
//! backoff.reset();
//! assert_eq!(backoff.attempts(), 0);
//! ```

use std::time::Duration;

use tokio::time::Instant;

/// Pauses between attempts: exponential, with jitter, capped.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    attempts: u32,
}

impl Backoff {
    /// Pauses starting at `first`, doubling up to `max` (jitter comes on
    /// top).
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max: max.max(first),
            attempts: 0,
        }
    }

    /// How many pauses were taken since the last [`Backoff::reset`].
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The pause before the next attempt; counts one more failure.
    pub fn next_pause(&mut self) -> Duration {
        self.attempts = self.attempts.saturating_add(1);
        self.pause(self.attempts)
    }

    /// The pause after the `attempt`-th failure (1-based): `first` doubled
    /// `attempt - 1` times, at most `max`, plus up to a quarter of jitter.
    pub fn pause(&self, attempt: u32) -> Duration {
        let doubled = self
            .first
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(31)));
        let base = doubled.min(self.max);
        base + (base / 4).mul_f64(random_fraction())
    }

    /// Sleeps the next pause, cut short at `deadline`. False when the
    /// deadline has come (no time is left for another attempt).
    pub async fn pause_until(&mut self, deadline: Instant) -> bool {
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        let pause = self.next_pause().min(deadline - now);
        tokio::time::sleep(pause).await;
        Instant::now() < deadline
    }

    /// Starts again from the first pause (after a success).
    pub fn reset(&mut self) {
        self.attempts = 0;
    }
}

/// A number in `[0, 1)`, different on each call and in each process: the
/// standard library's randomly seeded hasher over a counter (no generator
/// crate is needed for jitter).
fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_maximum_with_a_quarter_of_jitter() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(800));
        let mut pauses = Vec::new();
        for base in [100, 200, 400, 800, 800, 800] {
            let pause = b.next_pause();
            let base = ms(base);
            assert!(pause >= base && pause <= base * 5 / 4, "{pause:?}");
            pauses.push(pause);
        }
        assert_eq!(b.attempts(), 6);
        // Jittered: not all the capped pauses are equal.
        assert!(pauses[3..].windows(2).any(|w| w[0] != w[1]), "{pauses:?}");
        assert!(b.pause(40) <= ms(1000));
        b.reset();
        assert!(b.next_pause() <= ms(125));
    }

    #[tokio::test]
    async fn pauses_stop_at_the_deadline() {
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        let started = Instant::now();
        let deadline = started + Duration::from_millis(50);
        assert!(!b.pause_until(deadline).await);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!b.pause_until(deadline).await);
    }
}
