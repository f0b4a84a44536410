//! Reconnect pacing: how long to wait before each connection attempt.

use std::time::Duration;

/// Pause before a connection attempt: none for the first, then 100 ms more
/// per attempt up to 1 s. (The client's default grows to 4 s; flame wants
/// parents and runners back within a second of the server's return, as
/// they judge each other's silence.)
pub(super) fn reconnect_delay(attempts: usize) -> Duration {
    let waits = attempts.saturating_sub(1) as u64;
    Duration::from_millis(waits.saturating_mul(100).min(1_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_attempt_does_not_wait_and_later_ones_wait_at_most_a_second() {
        assert_eq!(reconnect_delay(0), Duration::ZERO);
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(100));
        assert_eq!(reconnect_delay(500), Duration::from_secs(1));
    }
}
