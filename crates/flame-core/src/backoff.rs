//! Exponential backoff with jitter, for retrying something that is not
//! ready yet (a JetStream cluster electing its leader, a rate-limited API).
//!
//! In the style of tower's `ExponentialBackoff`: each pause doubles, up to a
//! ceiling, and is drawn at random from its upper half, so that many
//! processes started together (a rolling deploy, `docker compose up`) do
//! not retry in step. With a deadline, the pauses never run past it.
//!
//! ```
//! use std::time::Duration;
//! use flame_core::backoff::Backoff;
//!
//! let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
//! let first = backoff.next_pause();
//! assert!(first >= Duration::from_millis(25) && first <= Duration::from_millis(50));
//! assert_eq!(backoff.attempts(), 1);
//! ```

use std::time::Duration;

use tokio::time::Instant;

/// Pauses between attempts: exponential, with jitter, capped.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    ceiling: Duration,
    attempts: u32,
}

impl Backoff {
    /// Pauses starting at about `first`, doubling up to `max`.
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max: max.max(first),
            ceiling: first,
            attempts: 0,
        }
    }

    /// How many pauses were taken (the attempts made after the first).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The pause before the next attempt: between half of the current
    /// ceiling and the ceiling, which then doubles (up to the maximum).
    pub fn next_pause(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = self.ceiling.saturating_mul(2).min(self.max);
        self.attempts += 1;
        let half = ceiling / 2;
        half + half.mul_f64(random_fraction())
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
        self.ceiling = self.first;
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
    fn pauses_double_up_to_the_maximum_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let ceilings = [100, 200, 400, 800, 800, 800];
        let mut pauses = Vec::new();
        for ceiling in ceilings {
            let pause = b.next_pause();
            let ceiling = Duration::from_millis(ceiling);
            assert!(pause >= ceiling / 2 && pause <= ceiling, "{pause:?}");
            pauses.push(pause);
        }
        assert_eq!(b.attempts(), 6);
        // Jittered: not all the capped pauses are equal.
        assert!(pauses[3..].windows(2).any(|w| w[0] != w[1]), "{pauses:?}");
        b.reset();
        assert!(b.next_pause() <= Duration::from_millis(100));
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
