//! After a boot fails: whether booting again would fail the same way
//! ([`BootFailure`]), the reason operators see, and how long the next boot
//! waits ([`RetryGate`]).

use std::time::Duration;

use flame_core::backoff::Backoff;
use flame_core::Error;
use tokio::time::Instant;

use crate::protocol::pool_events::Reason;

/// Pause before booting again after a transient boot failure, while
/// demand remains; it doubles with each failure in a row (plus jitter), up
/// to [`BOOT_RETRY_MAX`].
pub(crate) const BOOT_RETRY_DEBOUNCE: Duration = Duration::from_secs(1);

/// The longest pause between boots that keep failing transiently.
pub(crate) const BOOT_RETRY_MAX: Duration = Duration::from_secs(30);

/// A boot that did not give a ready runner, and whether booting again
/// would fail the same way.
#[derive(Debug)]
pub(crate) struct BootFailure {
    pub(crate) error: Error,
    /// Bad credentials, an invalid configuration, an image that cannot
    /// start, a runner that exits (or is refused) before it is ready: the
    /// pool fails its waiting callers at once and cools down. Otherwise the
    /// pool tries again with backoff.
    pub(crate) permanent: bool,
}

impl BootFailure {
    pub(crate) fn permanent(error: Error) -> BootFailure {
        BootFailure {
            error,
            permanent: true,
        }
    }

    pub(crate) fn transient(error: Error) -> BootFailure {
        BootFailure {
            error,
            permanent: false,
        }
    }
}

/// Holds boots back after a failure: with exponential backoff after
/// transient failures, and for the pool's boot cooldown after a permanent
/// one.
#[derive(Debug)]
pub(crate) struct RetryGate {
    closed_until: Option<Instant>,
    backoff: Backoff,
    /// Until when a permanent failure holds: calls that would need a boot
    /// fail at once meanwhile.
    cooling_until: Option<Instant>,
}

impl Default for RetryGate {
    fn default() -> RetryGate {
        RetryGate {
            closed_until: None,
            backoff: Backoff::new(BOOT_RETRY_DEBOUNCE, BOOT_RETRY_MAX),
            cooling_until: None,
        }
    }
}

impl RetryGate {
    /// A boot failed: hold the next one back. Returns for how long.
    pub(crate) fn failed(&mut self, permanent: bool, cooldown: Duration) -> Duration {
        let now = Instant::now();
        let pause = if permanent {
            self.cooling_until = Some(now + cooldown);
            cooldown
        } else {
            self.backoff.next_pause()
        };
        self.closed_until = Some(now + pause);
        pause
    }

    /// A runner booted: the next failure starts the backoff over.
    pub(crate) fn booted(&mut self) {
        self.backoff.reset();
        self.cooling_until = None;
    }

    /// True when a boot may start now.
    pub(crate) fn is_open(&mut self) -> bool {
        match self.closed_until {
            Some(at) if Instant::now() < at => false,
            _ => {
                self.closed_until = None;
                true
            }
        }
    }

    /// True while a permanent failure's cooldown runs.
    pub(crate) fn cooling_down(&self) -> bool {
        self.cooling_until.is_some_and(|at| Instant::now() < at)
    }
}

/// The machine-readable reason of a failed boot.
pub(crate) fn boot_failure_reason(e: &Error) -> Reason {
    match e {
        Error::BootTimeout { .. } => Reason::BootTimeout,
        Error::BuildMismatch { .. } => Reason::BuildMismatch,
        // The runner was refused when it reported another build.
        Error::BootFailed { reason, .. } if reason.starts_with("build mismatch") => {
            Reason::BuildMismatch
        }
        // It started, then exited (or went silent) before it was ready.
        Error::BootFailed {
            source: None,
            reason,
            ..
        } => crate::protocol::pool_events::classify_gone(reason),
        _ => Reason::BackendError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn transient_failures_back_off_and_a_permanent_one_cools_down() {
        let cooldown = Duration::from_secs(5);
        let mut gate = RetryGate::default();
        let first = gate.failed(false, cooldown);
        let second = gate.failed(false, cooldown);
        assert!(first >= BOOT_RETRY_DEBOUNCE && first <= BOOT_RETRY_DEBOUNCE * 5 / 4);
        assert!(second >= BOOT_RETRY_DEBOUNCE * 2, "{second:?}");
        assert!(!gate.is_open() && !gate.cooling_down());
        tokio::time::advance(second).await;
        assert!(gate.is_open());
        assert_eq!(gate.failed(true, cooldown), cooldown);
        assert!(gate.cooling_down() && !gate.is_open());
        tokio::time::advance(cooldown).await;
        assert!(gate.is_open() && !gate.cooling_down());
        gate.booted();
        let again = gate.failed(false, cooldown);
        assert!(again <= BOOT_RETRY_DEBOUNCE * 5 / 4, "{again:?}");
    }
}
