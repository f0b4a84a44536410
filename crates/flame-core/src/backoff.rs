//! Exponential backoff with jitter, for anything that tries again: boots,
//! platform API requests, a JetStream that is not ready yet.

use std::time::Duration;

/// Pauses that double from `first` up to `max`, each with up to a quarter
/// of jitter added (so that many parents do not retry in step).
///
/// ```
/// use std::time::Duration;
/// use flame_core::Backoff;
///
/// let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
/// let first = backoff.next_pause();
/// assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(125));
/// backoff.reset();
/// assert_eq!(backoff.attempts(), 0);
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    attempts: u32,
}

impl Backoff {
    /// Starts at `first`, doubling up to `max` (jitter comes on top).
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max: max.max(first),
            attempts: 0,
        }
    }

    /// The pause before the next attempt; counts one more failure.
    pub fn next_pause(&mut self) -> Duration {
        self.attempts = self.attempts.saturating_add(1);
        self.pause(self.attempts)
    }

    /// The pause after the `attempt`-th failure (1-based), with jitter.
    pub fn pause(&self, attempt: u32) -> Duration {
        let doubled = self
            .first
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(31)));
        let base = doubled.min(self.max);
        base + base / 4 * jitter_per_mille() / 1000
    }

    /// Failures counted since the last [`Backoff::reset`].
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempts = 0;
    }
}

/// 0 to 999, from the clock's low bits: enough to spread retries apart,
/// without a random number generator.
fn jitter_per_mille() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() % 1000)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_max_with_a_quarter_of_jitter() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(250), ms(8000));
        let within = |d: Duration, base: Duration| d >= base && d <= base * 5 / 4;
        assert!(within(b.next_pause(), ms(250)));
        assert!(within(b.next_pause(), ms(500)));
        assert!(within(b.next_pause(), ms(1000)));
        assert!(within(b.pause(40), ms(8000)));
        assert_eq!(b.attempts(), 3);
        b.reset();
        assert!(within(b.next_pause(), ms(250)));
    }
}
