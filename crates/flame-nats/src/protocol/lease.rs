//! What a shared pool keeps in its JetStream KV bucket (JSON values, so that
//! `nats kv get` shows them legibly).

use serde::{Deserialize, Serialize};

/// Where a runner is in its life, as its lease says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LeaseState {
    /// Asked of the backend; not yet serving.
    Booting,
    /// Serving calls.
    Ready,
    /// Finishing its work before it exits; takes no new calls.
    Draining,
}

/// A runner's lease (`runners.<id>`). Written by the scaler when it boots the
/// runner, then renewed by the runner every heartbeat. A lease that stops
/// changing belongs to a dead runner; the scaler removes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RunnerLease {
    /// The runner's id.
    pub(crate) runner: String,
    /// The pool.
    pub(crate) pool: String,
    /// Lifecycle state.
    pub(crate) state: LeaseState,
    /// Build id of the runner: the build of the scaler that booted it, then
    /// the runner's own. Parents place calls only on runners of their build.
    pub(crate) build: String,
    /// Calls it runs at once (`max_concurrency`).
    pub(crate) capacity: usize,
    /// Calls running now.
    pub(crate) load: usize,
    /// Calls waiting on the runner for a free slot.
    pub(crate) queued: usize,
    /// How long it has had no work, in milliseconds (0 while busy, or while
    /// the pool's idle check says to stay up).
    pub(crate) idle_ms: u64,
    /// The backend's handle (e.g. `pid 4242`, a machine id); empty until the
    /// backend started it.
    pub(crate) handle: String,
    /// Parent whose scaler booted it.
    pub(crate) booted_by: String,
    /// Counts renewals; changes every heartbeat while the runner lives.
    pub(crate) beat: u64,
    /// Outages of the runner's NATS connection so far. Calls sent to the
    /// runner during an outage never reach it: when this grows, parents
    /// fail the calls they sent in the last one.
    #[serde(default)]
    pub(crate) outages: u64,
    /// How long the last outage lasted, in milliseconds.
    #[serde(default)]
    pub(crate) outage_ms: u64,
    /// Milliseconds from the end of the last outage to this write.
    #[serde(default)]
    pub(crate) since_outage_ms: u64,
    /// Why its boot failed, in the backend's words (a local runner's last
    /// line, a machine's failure). Written by the scaler just before it
    /// removes the lease, so every parent's waiting callers can end with
    /// the reason rather than a bare timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) boot_failure: Option<String>,
    /// The boot failure would happen again (bad credentials, an invalid
    /// configuration, a runner that exits before it is ready): parents
    /// fail their callers waiting for a runner at once, not at their
    /// deadline.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) boot_failure_permanent: bool,
}

/// A parent's lease (`parents.<id>`), renewed every heartbeat and whenever its
/// number of waiting callers changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ParentLease {
    /// The parent's id.
    pub(crate) parent: String,
    /// The parent's build id: its callers wait for runners of this build.
    #[serde(default)]
    pub(crate) build: String,
    /// Its callers waiting for a slot.
    pub(crate) waiting: usize,
    /// Counts renewals.
    pub(crate) beat: u64,
}

/// Who the scaler of a build is (`scalers.<build>`), renewed by it every
/// heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ScalerLease {
    /// The scaler's parent id.
    pub(crate) parent: String,
    /// The build it boots runners of.
    #[serde(default)]
    pub(crate) build: String,
    /// Counts renewals.
    pub(crate) beat: u64,
}

/// Runner ids counted against `max` (`slots`). Changed only by
/// compare-and-set, so racing scalers can never boot past `max`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Slots {
    /// The ids.
    pub(crate) runners: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_as_legible_json() {
        let lease = RunnerLease {
            runner: "r1".into(),
            pool: "p".into(),
            state: LeaseState::Draining,
            build: "b".into(),
            capacity: 4,
            load: 1,
            queued: 2,
            idle_ms: 0,
            handle: "pid 7".into(),
            booted_by: "x".into(),
            beat: 9,
            outages: 0,
            outage_ms: 0,
            since_outage_ms: 0,
            boot_failure: None,
            boot_failure_permanent: false,
        };
        let json = serde_json::to_string(&lease).unwrap();
        assert!(json.contains(r#""state":"draining""#), "{json}");
        assert_eq!(serde_json::from_str::<RunnerLease>(&json).unwrap(), lease);
        let slots = Slots {
            runners: vec!["a".into()],
        };
        let json = serde_json::to_string(&slots).unwrap();
        assert_eq!(json, r#"{"runners":["a"]}"#);
        let parent = ParentLease {
            parent: "p".into(),
            build: "b".into(),
            waiting: 3,
            beat: 1,
        };
        let back: ParentLease =
            serde_json::from_str(&serde_json::to_string(&parent).unwrap()).unwrap();
        assert_eq!(back, parent);
        let scaler: ScalerLease = serde_json::from_str(r#"{"parent":"p","beat":2}"#).unwrap();
        assert_eq!(scaler.beat, 2);
    }
}
