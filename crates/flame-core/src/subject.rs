//! NATS subject names, in one place so that operators can rely on them.
//!
//! ```text
//! flame.<pool>.runner.<runner_id>          calls and casts (a micro endpoint)
//! flame.<pool>.runner.<runner_id>.cancel   caller stopped waiting: cancel call <id>
//! flame.<pool>.parent.<parent_id>.ready    runner -> parent: subscribed, ready for work
//! flame.<pool>.parent.<parent_id>.leave    runner -> parent: idle, may I stop?
//! flame.<pool>.parent.<parent_id>.ping     runner -> parent: are you still there?
//! flame.<pool>.parent.<parent_id>.stopping runner -> parent: stopping, send nothing new
//! ```
//!
//! `nats sub 'flame.>'` shows all of it; `nats sub 'flame.<pool>.>'` one pool.

use crate::Error;

/// Root token of every flame subject.
pub const ROOT: &str = "flame";

/// Checks that a pool name can be used as a subject token and as part of a
/// micro service name: ASCII letters, digits, `-` and `_`.
pub fn validate_pool_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 64 {
        return Err(Error::Config(format!(
            "pool name `{name}` must be 1 to 64 characters long"
        )));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(Error::Config(format!(
            "pool name `{name}` may only contain ASCII letters, digits, `-` and `_`"
        )));
    }
    Ok(())
}

/// Subject a runner serves calls on.
pub fn runner(pool: &str, runner_id: &str) -> String {
    format!("{ROOT}.{pool}.runner.{runner_id}")
}

/// Subject a runner takes cancellations on; the body is the call id.
pub fn runner_cancel(pool: &str, runner_id: &str) -> String {
    format!("{ROOT}.{pool}.runner.{runner_id}.cancel")
}

/// Wildcard covering every event a parent receives from its runners.
pub fn parent_events(pool: &str, parent_id: &str) -> String {
    format!("{ROOT}.{pool}.parent.{parent_id}.*")
}

/// Subject of one parent event.
pub fn parent_event(pool: &str, parent_id: &str, event: ParentEvent) -> String {
    format!("{ROOT}.{pool}.parent.{parent_id}.{}", event.as_str())
}

/// What a runner tells its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParentEvent {
    /// Subscribed and flushed: route calls here.
    Ready,
    /// Idle past the idle timeout: asks leave to stop.
    Leave,
    /// Liveness check.
    Ping,
    /// The runner is stopping (SIGTERM, single-use, idle): place nothing new
    /// on it.
    Stopping,
}

impl ParentEvent {
    /// Last subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            ParentEvent::Ready => "ready",
            ParentEvent::Leave => "leave",
            ParentEvent::Ping => "ping",
            ParentEvent::Stopping => "stopping",
        }
    }

    /// Parses the last token of a parent-event subject.
    pub fn from_subject(subject: &str) -> Option<ParentEvent> {
        match subject.rsplit('.').next()? {
            "ready" => Some(ParentEvent::Ready),
            "leave" => Some(ParentEvent::Leave),
            "ping" => Some(ParentEvent::Ping),
            "stopping" => Some(ParentEvent::Stopping),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_names_are_checked() {
        assert!(validate_pool_name("thumbs-2_x").is_ok());
        assert!(validate_pool_name("").is_err());
        assert!(validate_pool_name("a.b").is_err());
        assert!(validate_pool_name("a b").is_err());
        assert!(validate_pool_name("a*").is_err());
    }

    #[test]
    fn subjects_are_legible() {
        assert_eq!(runner("thumbs", "ab12"), "flame.thumbs.runner.ab12");
        let s = parent_event("thumbs", "p1", ParentEvent::Leave);
        assert_eq!(s, "flame.thumbs.parent.p1.leave");
        assert_eq!(ParentEvent::from_subject(&s), Some(ParentEvent::Leave));
        assert_eq!(parent_events("thumbs", "p1"), "flame.thumbs.parent.p1.*");
    }
}
