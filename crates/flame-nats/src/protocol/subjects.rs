//! NATS subject names and KV keys, in one place so that operators can rely
//! on them (`PROTOCOL.md` describes each).
//!
//! ```text
//! flame.<pool>.runner.<runner_id>          calls and casts (a micro endpoint)
//! flame.<pool>.runner.<runner_id>.cancel   caller stopped waiting: cancel the call (body: its reply subject)
//! flame.<pool>.parent.<parent_id>.ready    runner -> parent: subscribed, ready for work
//! flame.<pool>.parent.<parent_id>.leave    runner -> parent: idle, may I stop?
//! flame.<pool>.parent.<parent_id>.ping     runner -> parent: are you still there?
//! flame.<pool>.parent.<parent_id>.stopping runner -> parent: stopping, send nothing new
//! ```
//!
//! Shared pools (several parents, one pool) add:
//!
//! ```text
//! flame.<pool>.runner.<runner_id>.control  scaler -> runner: `retire` (drain and exit)
//! flame.<pool>.alive                       runner -> any parent (queue group): still there?
//! KV bucket flame-<pool>:
//!   runners.<runner_id>   runner lease: state, build, capacity, load, handle
//!   parents.<parent_id>   parent lease: build, callers waiting for a slot
//!   scalers.<build>       the parent that boots and retires runners of a build
//!   slots                 runner ids counted against max (compare-and-set)
//! ```
//!
//! `nats sub 'flame.>'` shows all of it; `nats sub 'flame.<pool>.>'` one pool;
//! `nats kv watch flame-<pool>` the shared state.

use flame_core::Error;

use super::reports::ReportKind;

/// Root token of every flame subject.
pub(crate) const ROOT: &str = "flame";

/// Checks that a pool name can be used as a subject token and as part of a
/// micro service name: ASCII letters, digits, `-` and `_`.
pub(crate) fn validate_pool_name(name: &str) -> Result<(), Error> {
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
pub(crate) fn runner(pool: &str, runner_id: &str) -> String {
    format!("{ROOT}.{pool}.runner.{runner_id}")
}

/// Subject a runner takes cancellations on; the body is the reply subject
/// of the call to cancel.
pub(crate) fn runner_cancel(pool: &str, runner_id: &str) -> String {
    format!("{ROOT}.{pool}.runner.{runner_id}.cancel")
}

/// Subject a shared pool's scaler sends control messages to a runner on.
pub(crate) fn runner_control(pool: &str, runner_id: &str) -> String {
    format!("{ROOT}.{pool}.runner.{runner_id}.control")
}

/// Subject runners of a shared pool ask "is any parent alive?" on.
pub(crate) fn alive(pool: &str) -> String {
    format!("{ROOT}.{pool}.alive")
}

/// Subject every parent of a shared pool answers on while its connection
/// lives: a parent whose scaler is silent asks the scaler's, and a
/// no-responders answer means the scaler is gone, so it takes over at once
/// instead of waiting out the lease.
pub(crate) fn parent_present(pool: &str, parent_id: &str) -> String {
    format!("{ROOT}.{pool}.parent.{parent_id}.present")
}

/// Queue group of the parents answering [`alive`].
pub(crate) const ALIVE_QUEUE: &str = "parents";

/// Answer on [`alive`]: a parent of the asking runner's build is alive.
pub(crate) const ALIVE_YES: &str = "yes";

/// Answer on [`alive`]: no parent of the asking runner's build is left.
pub(crate) const ALIVE_NO: &str = "no";

/// JetStream KV bucket of a shared pool.
pub(crate) fn bucket(pool: &str) -> String {
    format!("{ROOT}-{pool}")
}

/// KV key of a runner's lease.
pub(crate) fn runner_key(runner_id: &str) -> String {
    format!("runners.{runner_id}")
}

/// KV key of a parent's lease.
pub(crate) fn parent_key(parent_id: &str) -> String {
    format!("parents.{parent_id}")
}

/// KV key naming the scaler of the runners of `build` (one scaler per build,
/// so that during a rolling deploy each build boots its own runners).
pub(crate) fn scaler_key(build: &str) -> String {
    format!("scalers.{}", build_token(build))
}

/// A build id as one KV key token: itself when it is 1 to 64 ASCII
/// letters, digits, `-` or `_`; else `h` and a hash of it.
pub(crate) fn build_token(build: &str) -> String {
    let plain = !build.is_empty()
        && build.len() <= 64
        && build
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if plain {
        build.to_string()
    } else {
        format!("h{:016x}", xxhash_rust::xxh3::xxh3_64(build.as_bytes()))
    }
}

/// KV key with the runner ids counted against `max`.
pub(crate) const SLOTS_KEY: &str = "slots";

/// Control message telling a runner to drain and exit.
pub(crate) const CONTROL_RETIRE: &str = "retire";

/// Wildcard covering every event a parent receives from its runners.
pub(crate) fn parent_events(pool: &str, parent_id: &str) -> String {
    format!("{ROOT}.{pool}.parent.{parent_id}.*")
}

/// Subject a runner of a private pool forwards its log lines on.
pub(crate) fn parent_logs(pool: &str, parent_id: &str) -> String {
    format!(
        "{ROOT}.{pool}.parent.{parent_id}.{}",
        super::logs::LOGS_TOKEN
    )
}

/// Subject of one parent event.
pub(crate) fn parent_event(pool: &str, parent_id: &str, event: ReportKind) -> String {
    format!("{ROOT}.{pool}.parent.{parent_id}.{}", event.as_str())
}

/// Inbox prefix of a runner's connection: the subjects of replies to its
/// own requests and of the streams it sends and receives start with it.
/// Of its pool, so that a runner's NATS user can be allowed to read these
/// and no other replies on the account (parents keep the usual `_INBOX`).
pub(crate) fn runner_inbox_prefix(pool: &str) -> String {
    format!("_INBOX.{ROOT}-{pool}")
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
        assert_eq!(runner_cancel("t", "r"), "flame.t.runner.r.cancel");
        assert_eq!(runner_control("t", "r"), "flame.t.runner.r.control");
        assert_eq!(alive("t"), "flame.t.alive");
        assert_eq!(bucket("t"), "flame-t");
        assert_eq!(
            (runner_key("r"), parent_key("p")),
            ("runners.r".into(), "parents.p".into())
        );
        assert_eq!(runner("thumbs", "ab12"), "flame.thumbs.runner.ab12");
        assert_eq!(scaler_key("v1-2_a"), "scalers.v1-2_a");
        let hashed = scaler_key("v1.2 (x)");
        assert!(hashed.starts_with("scalers.h") && hashed.len() == "scalers.h".len() + 16);
        assert_ne!(build_token("a.b"), build_token("a-b"));
        let s = parent_event("thumbs", "p1", ReportKind::Leave);
        assert_eq!(s, "flame.thumbs.parent.p1.leave");
        assert_eq!(ReportKind::from_subject(&s), Some(ReportKind::Leave));
        assert_eq!(parent_events("thumbs", "p1"), "flame.thumbs.parent.p1.*");
    }
}
