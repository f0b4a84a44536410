//! What operators' tools read: pool events on `flame.<pool>.events.<kind>`
//! and the answers to `flame.pools.info` (section 11 of `PROTOCOL.md`).
//!
//! Parents publish both; runners never do. Bodies are JSON; event types
//! are versioned (`io.flame.pool.v1.<kind>`), so a later incompatible
//! change gets a new type rather than a silent change of meaning.

use serde::{Deserialize, Serialize};

use super::subjects::ROOT;

/// Prefix of every event's `type`: `io.flame.pool.v1.<kind>`.
pub const EVENT_TYPE_PREFIX: &str = "io.flame.pool.v1.";

/// Subject every started pool answers discovery requests on (no queue
/// group: every parent answers, one answer per pool and parent).
pub const POOLS_INFO_SUBJECT: &str = "flame.pools.info";

/// Subject of one pool event: `flame.<pool>.events.<kind>`.
pub fn event_subject(pool: &str, kind: EventKind) -> String {
    format!("{ROOT}.{pool}.events.{}", kind.as_str())
}

/// Subject matching every event of `pool` (`*` for all pools):
/// `flame.<pool>.events.>`.
pub fn events_wildcard(pool: &str) -> String {
    format!("{ROOT}.{pool}.events.>")
}

/// What changed in a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// The pool asked its backend for a runner.
    RunnerBooting,
    /// A runner is serving.
    RunnerReady,
    /// A boot failed (`reason`, `detail`); the pool retries while callers
    /// wait.
    RunnerBootFailed,
    /// A runner's load went from 0 to more, or changed while above 0
    /// (`runner_load`).
    RunnerBusy,
    /// A runner's load went back to 0.
    RunnerIdle,
    /// A runner was told to stop, or said it stops (`reason`); it drains.
    RunnerRetiring,
    /// A runner left the pool (`reason`, `detail`).
    RunnerGone,
    /// This parent became the scaler of its build (shared pools).
    ScalerElected,
    /// `min` and `max` of the pool changed on this parent.
    LimitsChanged,
}

impl EventKind {
    /// Every kind, in the order of a runner's life.
    pub const ALL: [EventKind; 9] = [
        EventKind::RunnerBooting,
        EventKind::RunnerReady,
        EventKind::RunnerBootFailed,
        EventKind::RunnerBusy,
        EventKind::RunnerIdle,
        EventKind::RunnerRetiring,
        EventKind::RunnerGone,
        EventKind::ScalerElected,
        EventKind::LimitsChanged,
    ];

    /// The kind as it appears in subjects and types: `runner_ready`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::RunnerBooting => "runner_booting",
            EventKind::RunnerReady => "runner_ready",
            EventKind::RunnerBootFailed => "runner_boot_failed",
            EventKind::RunnerBusy => "runner_busy",
            EventKind::RunnerIdle => "runner_idle",
            EventKind::RunnerRetiring => "runner_retiring",
            EventKind::RunnerGone => "runner_gone",
            EventKind::ScalerElected => "scaler_elected",
            EventKind::LimitsChanged => "limits_changed",
        }
    }

    /// The event's `type`: `io.flame.pool.v1.runner_ready`.
    pub fn event_type(self) -> String {
        format!("{EVENT_TYPE_PREFIX}{}", self.as_str())
    }

    /// The kind named by a subject token (`runner_ready`).
    pub fn from_token(token: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == token)
    }
}

/// Why a runner is retiring, is gone, or failed to boot: short and
/// machine-readable (the `detail` field carries the words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Reason {
    /// It had no work for `idle_shutdown_after` and the pool let it go.
    Idle,
    /// The pool retired it: `max` lowered below the runners up, or it was
    /// reaped after not stopping in time once retired.
    Retired,
    /// Shared pools: no parent of its build is left (a rolling deploy).
    BuildGone,
    /// A single-use runner took its one call.
    SingleUse,
    /// The pool was shut down.
    Shutdown,
    /// It stopped on its own with exit code 0, for a reason its parent did
    /// not decide (SIGTERM, or it lost its parent).
    Stopped,
    /// Its process exited with a non-zero code or was killed by a signal.
    Crashed,
    /// It ran out of memory.
    OutOfMemory,
    /// It stopped sending heartbeats (private pools), or its lease stopped
    /// changing (shared pools).
    HeartbeatLost,
    /// Shared pools: its lease was removed without the scaler knowing why.
    LeaseLost,
    /// Boots: it did not become ready within `boot_timeout`.
    BootTimeout,
    /// Boots: it reported another build than its parent's.
    BuildMismatch,
    /// Boots: the backend could not start it.
    BackendError,
}

impl Reason {
    /// The reason as it appears in JSON: `heartbeat_lost`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Idle => "idle",
            Reason::Retired => "retired",
            Reason::BuildGone => "build_gone",
            Reason::SingleUse => "single_use",
            Reason::Shutdown => "shutdown",
            Reason::Stopped => "stopped",
            Reason::Crashed => "crashed",
            Reason::OutOfMemory => "out_of_memory",
            Reason::HeartbeatLost => "heartbeat_lost",
            Reason::LeaseLost => "lease_lost",
            Reason::BootTimeout => "boot_timeout",
            Reason::BuildMismatch => "build_mismatch",
            Reason::BackendError => "backend_error",
        }
    }
}

/// Reads the words flame and its backends use for a runner's end
/// ("runner process was killed by signal 9", "runner process exited with
/// code 3", "no heartbeat for 3.1s", "its lease has not changed for 2s")
/// as a [`Reason`]. Any text saying "out of memory" is
/// [`Reason::OutOfMemory`]; a text it does not know is
/// [`Reason::Crashed`].
pub(crate) fn classify_gone(detail: &str) -> Reason {
    let text = detail.to_ascii_lowercase();
    let has = |words: &str| text.contains(words);
    if has("out of memory") {
        Reason::OutOfMemory
    } else if let Some(code) = exit_code(&text) {
        if code == 0 {
            Reason::Stopped
        } else {
            Reason::Crashed
        }
    } else if has("killed by signal") {
        Reason::Crashed
    } else if has("no heartbeat") || has("lease has not changed") {
        Reason::HeartbeatLost
    } else if has("did not stop after being retired") {
        Reason::Retired
    } else if has("did not become ready") {
        Reason::BootTimeout
    } else if has("pool was shut down") {
        Reason::Shutdown
    } else if has("lease was removed") {
        Reason::LeaseLost
    } else {
        Reason::Crashed
    }
}

/// The reason a runner is gone, knowing why it was draining (`cause`, if
/// the parent or scaler decided it): a clean exit or a removed lease of a
/// runner told to stop is that cause; a crash stays a crash.
pub(crate) fn gone_reason(detail: &str, cause: Option<Reason>) -> Reason {
    match (classify_gone(detail), cause) {
        (Reason::Stopped | Reason::LeaseLost, Some(cause)) => cause,
        (reason, _) => reason,
    }
}

/// The code in "... exited with code 3".
fn exit_code(text: &str) -> Option<i64> {
    let rest = &text[text.find("exited with code ")? + "exited with code ".len()..];
    let digits: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    digits.parse().ok()
}

/// One pool event, as published on `flame.<pool>.events.<kind>`. Fields
/// that do not apply to a kind are absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PoolEventMessage {
    /// `io.flame.pool.v1.<kind>`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Unique id of this event (UUID v4, no dashes).
    pub id: String,
    /// When the publishing parent saw the change, RFC 3339 UTC with
    /// milliseconds: `2026-11-22T08:00:00.123Z`.
    pub time: String,
    /// The pool.
    pub pool: String,
    /// The runner, for `runner_*` kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    /// The publishing parent's id.
    pub parent: String,
    /// The publishing parent's build id (runners of a pool serve their
    /// parent's build).
    pub build: String,
    /// Runners booting, ready or draining, after the change.
    pub runners: usize,
    /// Runners ready, after the change.
    pub ready: usize,
    /// Calls running on the pool's runners, after the change.
    pub load: usize,
    /// Callers waiting for a slot, after the change.
    pub waiting: usize,
    /// `runner_busy` and `runner_idle`: calls running or waiting on this
    /// runner after the change (0 when idle). A private pool counts its
    /// parent's calls; a shared pool every parent's, as the runner's lease
    /// says. A busy runner whose load changes is announced busy again with
    /// its new load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_load: Option<usize>,
    /// Why: `runner_boot_failed`, `runner_retiring`, `runner_gone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// The words behind the reason: `runner_boot_failed`, `runner_gone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// New `min`: `limits_changed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<usize>,
    /// New `max`: `limits_changed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<usize>,
}

impl PoolEventMessage {
    /// The kind, from `type`; `None` for a type this version does not know.
    pub fn kind(&self) -> Option<EventKind> {
        EventKind::from_token(self.event_type.strip_prefix(EVENT_TYPE_PREFIX)?)
    }
}

/// One parent's answer on [`POOLS_INFO_SUBJECT`]: a pool as that parent
/// sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PoolInfo {
    /// The pool.
    pub pool: String,
    /// The answering parent's id.
    pub parent: String,
    /// The answering parent's build id.
    pub build: String,
    /// A shared pool (several parents may answer for it).
    pub shared: bool,
    /// This parent's `min`.
    pub min: usize,
    /// This parent's `max`.
    pub max: usize,
    /// Calls per runner.
    pub max_concurrency: usize,
    /// Runners booting, ready or draining (shared pools: every lease in
    /// the bucket).
    pub runners: usize,
    /// Runners ready.
    pub ready: usize,
    /// Calls running (shared pools: every parent's, as the leases report).
    pub load: usize,
    /// This parent's callers waiting for a slot.
    pub waiting: usize,
    /// Shared pools: this parent is the scaler of its build.
    pub scaler: bool,
    /// When this parent started the pool (RFC 3339 UTC).
    pub started: String,
}

/// `t` as RFC 3339 UTC with milliseconds: `2026-11-22T08:00:00.123Z`.
pub(crate) fn format_time(t: std::time::SystemTime) -> String {
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// Year, month, day of a count of days since 1970-01-01 (H. Hinnant's
/// algorithm, proleptic Gregorian calendar).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn message(kind: EventKind) -> PoolEventMessage {
        PoolEventMessage {
            event_type: kind.event_type(),
            id: "0f8e7d6c5b4a39281706f5e4d3c2b1a0".into(),
            time: "2026-11-22T08:00:00.123Z".into(),
            pool: "thumbs".into(),
            runner: Some("3f2a9c1e8b7d4f60a1c2d3e4f5061728".into()),
            parent: "b71e0c5a9d2f4e8b8a6c1d3f5e7a9b0c".into(),
            build: "9c1b".into(),
            runners: 3,
            ready: 2,
            load: 5,
            waiting: 0,
            runner_load: None,
            reason: None,
            detail: None,
            min: None,
            max: None,
        }
    }

    #[test]
    fn events_have_the_documented_json_shape() {
        let ready = serde_json::to_string(&message(EventKind::RunnerReady)).unwrap();
        assert_eq!(
            ready,
            r#"{"type":"io.flame.pool.v1.runner_ready","id":"0f8e7d6c5b4a39281706f5e4d3c2b1a0","time":"2026-11-22T08:00:00.123Z","pool":"thumbs","runner":"3f2a9c1e8b7d4f60a1c2d3e4f5061728","parent":"b71e0c5a9d2f4e8b8a6c1d3f5e7a9b0c","build":"9c1b","runners":3,"ready":2,"load":5,"waiting":0}"#
        );
        let mut gone = message(EventKind::RunnerGone);
        gone.reason = Some(Reason::OutOfMemory);
        gone.detail = Some("runner process ran out of memory".into());
        let v: serde_json::Value = serde_json::to_value(&gone).unwrap();
        assert_eq!(v["type"], "io.flame.pool.v1.runner_gone");
        assert_eq!(v["reason"], "out_of_memory");
        assert_eq!(v["detail"], "runner process ran out of memory");
        assert!(v.get("min").is_none() && v.get("runner_load").is_none());
        let mut busy = message(EventKind::RunnerBusy);
        busy.runner_load = Some(2);
        let v: serde_json::Value = serde_json::to_value(&busy).unwrap();
        assert_eq!(v["runner_load"].as_u64(), Some(2));
        let mut limits = message(EventKind::LimitsChanged);
        limits.runner = None;
        limits.min = Some(1);
        limits.max = Some(8);
        let v: serde_json::Value = serde_json::to_value(&limits).unwrap();
        assert!(v.get("runner").is_none() && v.get("reason").is_none());
        assert_eq!((v["min"].as_u64(), v["max"].as_u64()), (Some(1), Some(8)));
        // Read back, unknown fields ignored.
        let mut raw = v.clone();
        raw["later"] = serde_json::json!("field");
        let back: PoolEventMessage = serde_json::from_value(raw).unwrap();
        assert_eq!(back, limits);
        assert_eq!(back.kind(), Some(EventKind::LimitsChanged));
    }

    #[test]
    fn kinds_and_reasons_are_snake_case_everywhere() {
        for kind in EventKind::ALL {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            assert_eq!(EventKind::from_token(kind.as_str()), Some(kind));
        }
        assert_eq!(
            serde_json::to_string(&Reason::HeartbeatLost).unwrap(),
            "\"heartbeat_lost\""
        );
        assert_eq!(Reason::BuildGone.as_str(), "build_gone");
        assert_eq!(
            event_subject("thumbs", EventKind::RunnerGone),
            "flame.thumbs.events.runner_gone"
        );
        assert_eq!(events_wildcard("*"), "flame.*.events.>");
    }

    #[test]
    fn exit_texts_are_classified() {
        let cases = [
            ("runner process was killed by signal 9", Reason::Crashed),
            ("runner process exited with code 3", Reason::Crashed),
            ("runner process exited with code 0", Reason::Stopped),
            (
                "runner process exited with code 137 (out of memory)",
                Reason::OutOfMemory,
            ),
            (
                "runner process was killed by signal 9: Out of memory",
                Reason::OutOfMemory,
            ),
            ("no heartbeat for 3.1s", Reason::HeartbeatLost),
            (
                "runner stopped: its lease has not changed for 1.6s",
                Reason::HeartbeatLost,
            ),
            ("runner stopped: its lease was removed", Reason::LeaseLost),
            ("did not stop after being retired", Reason::Retired),
            ("did not become ready within 30s", Reason::BootTimeout),
            ("the pool was shut down", Reason::Shutdown),
            ("cannot wait for runner process: EINTR", Reason::Crashed),
            ("something new", Reason::Crashed),
        ];
        for (text, reason) in cases {
            assert_eq!(classify_gone(text), reason, "{text}");
        }
    }

    #[test]
    fn a_known_cause_explains_a_clean_exit_but_not_a_crash() {
        let clean = "runner process exited with code 0";
        assert_eq!(gone_reason(clean, Some(Reason::Idle)), Reason::Idle);
        assert_eq!(gone_reason(clean, None), Reason::Stopped);
        assert_eq!(
            gone_reason(
                "runner stopped: its lease was removed",
                Some(Reason::BuildGone)
            ),
            Reason::BuildGone
        );
        let killed = "runner process was killed by signal 9";
        assert_eq!(gone_reason(killed, Some(Reason::Idle)), Reason::Crashed);
    }

    #[test]
    fn times_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(format_time(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_334_400_123);
        assert_eq!(format_time(t), "2026-11-22T08:00:00.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(format_time(leap), "2000-02-29T00:00:00.000Z");
    }
}
