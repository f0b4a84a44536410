//! Which failed requests are tried again, and the pauses between attempts.

use std::time::Duration;

use flame_core::backoff::Backoff;
use reqwest::StatusCode;

/// Attempts of one API request before a transient failure is final.
pub(crate) const ATTEMPTS: u32 = 8;

/// First pause between attempts; doubled each time, up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(250);
const MAX_PAUSE: Duration = Duration::from_secs(8);

/// Statuses worth another try: rate limited (429), no capacity right now
/// (412), and the API's own troubles (5xx). Anything else (401 bad token,
/// 422 invalid config, ...) is final at once.
pub(crate) fn transient(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::PRECONDITION_FAILED
        || status.is_server_error()
}

/// The pause before attempt `attempt + 1`: exponential, with jitter (so
/// that many parents do not retry in step), or what `Retry-After` asks.
pub(crate) fn pause(attempt: u32, retry_after: Option<Duration>) -> Duration {
    if let Some(wait) = retry_after {
        return wait.min(MAX_PAUSE * 4);
    }
    Backoff::new(FIRST_PAUSE, MAX_PAUSE).pause(attempt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_failures_are_retried_with_growing_pauses() {
        assert!(transient(StatusCode::TOO_MANY_REQUESTS));
        assert!(transient(StatusCode::PRECONDITION_FAILED));
        assert!(transient(StatusCode::BAD_GATEWAY));
        assert!(!transient(StatusCode::UNAUTHORIZED));
        assert!(!transient(StatusCode::UNPROCESSABLE_ENTITY));
        assert!(!transient(StatusCode::CONFLICT));
        let first = pause(1, None);
        assert!(
            first >= FIRST_PAUSE && first <= FIRST_PAUSE * 5 / 4,
            "{first:?}"
        );
        assert!(pause(3, None) >= FIRST_PAUSE * 4);
        assert!(pause(30, None) <= MAX_PAUSE * 5 / 4);
        assert_eq!(
            pause(1, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
    }
}
