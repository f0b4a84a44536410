//! What travels between a parent and its runners.
//!
//! A call is one NATS request on the runner's subject. Metadata rides in
//! headers so that `nats sub 'flame.>'` shows it legibly; the body is the
//! MessagePack encoding of the argument tuple. A successful reply's body is the
//! MessagePack encoding of the function's return value. A failed reply follows
//! the NATS micro convention (`Nats-Service-Error` and
//! `Nats-Service-Error-Code` headers, empty body) plus a `Flame-Error` header
//! naming the kind, so the caller can rebuild a typed [`Error`].

use std::time::Duration;

use serde::{de::DeserializeOwned, Serialize};

use crate::Error;

/// Header: registered name of the function to run.
pub const HEADER_FUNCTION: &str = "Flame-Fn";
/// Header: build id of the caller; the runner refuses other builds.
pub const HEADER_BUILD: &str = "Flame-Build";
/// Header: milliseconds the runner has left to finish the call.
pub const HEADER_TIMEOUT_MS: &str = "Flame-Timeout-Ms";
/// Header: present (value `1`) when the work is a cast, whose failures are
/// logged and counted on the runner.
pub const HEADER_CAST: &str = "Flame-Cast";
/// Header on error replies: the kind of error, see [`ErrorKind`].
pub const HEADER_ERROR: &str = "Flame-Error";
/// Header on build-mismatch replies: the runner's own build id.
pub const HEADER_RUNNER_BUILD: &str = "Flame-Runner-Build";
/// Header on payload-too-large replies: encoded size of the result.
pub const HEADER_SIZE: &str = "Flame-Size";
/// Header on payload-too-large replies: the server's max_payload.
pub const HEADER_MAX: &str = "Flame-Max";
/// Micro-service error header (status text), set by async-nats.
pub const HEADER_SERVICE_ERROR: &str = "Nats-Service-Error";

/// Environment variable that makes a process a runner. Its value is the JSON
/// form of [`ParentInfo`].
pub const PARENT_ENV: &str = "FLAME_PARENT";

/// The kinds of error a runner can reply with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request lacked required headers or had unreadable ones.
    Malformed,
    /// No function with that name.
    UnknownFunction,
    /// Different build.
    BuildMismatch,
    /// Arguments could not be decoded into the function's parameter types.
    DecodeArgs,
    /// The result could not be encoded.
    EncodeResult,
    /// The result is larger than the server's max_payload.
    ResultTooLarge,
    /// The function panicked.
    Panicked,
    /// The deadline passed on the runner; the work was cancelled.
    Timeout,
    /// The runner is stopping and takes no new work; nothing ran, so the
    /// caller may place the call elsewhere.
    Draining,
}

impl ErrorKind {
    /// Token used in the `Flame-Error` header.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Malformed => "malformed",
            ErrorKind::UnknownFunction => "unknown-function",
            ErrorKind::BuildMismatch => "build-mismatch",
            ErrorKind::DecodeArgs => "decode-args",
            ErrorKind::EncodeResult => "encode-result",
            ErrorKind::ResultTooLarge => "result-too-large",
            ErrorKind::Panicked => "panicked",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Draining => "draining",
        }
    }

    /// Parses the `Flame-Error` header token.
    pub fn parse(s: &str) -> Option<ErrorKind> {
        Some(match s {
            "malformed" => ErrorKind::Malformed,
            "unknown-function" => ErrorKind::UnknownFunction,
            "build-mismatch" => ErrorKind::BuildMismatch,
            "decode-args" => ErrorKind::DecodeArgs,
            "encode-result" => ErrorKind::EncodeResult,
            "result-too-large" => ErrorKind::ResultTooLarge,
            "panicked" => ErrorKind::Panicked,
            "timeout" => ErrorKind::Timeout,
            "draining" => ErrorKind::Draining,
            _ => return None,
        })
    }

    /// HTTP-like status code for `Nats-Service-Error-Code`, which
    /// `nats micro stats` shows as the last error.
    pub fn code(self) -> usize {
        match self {
            ErrorKind::Malformed | ErrorKind::DecodeArgs => 400,
            ErrorKind::UnknownFunction => 404,
            ErrorKind::BuildMismatch => 409,
            ErrorKind::ResultTooLarge => 413,
            ErrorKind::Panicked | ErrorKind::EncodeResult => 500,
            ErrorKind::Draining => 503,
            ErrorKind::Timeout => 504,
        }
    }
}

/// Everything a runner needs to know about the parent that booted it.
///
/// Serialized as JSON into the [`PARENT_ENV`] environment variable, so it can
/// be read with `ps e` or `/proc/<pid>/environ` when debugging.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParentInfo {
    /// Id of the parent instance (unique per process).
    pub parent_id: String,
    /// The pool this runner serves.
    pub pool: String,
    /// This runner's id, chosen by the parent.
    pub runner_id: String,
    /// NATS server the runner connects to.
    pub nats_url: String,
    /// Most calls the runner runs at once.
    pub max_concurrency: usize,
    /// Idle time after which the runner asks to stop, in milliseconds.
    pub idle_shutdown_after_ms: u64,
    /// Drain time for in-flight work when stopping, in milliseconds.
    pub shutdown_timeout_ms: u64,
    /// The runner gives up if it is not connected and acknowledged within
    /// this time after start, in milliseconds.
    pub failsafe_timeout_ms: u64,
    /// How long the runner keeps going without hearing from its parent (or
    /// NATS), in milliseconds.
    pub parent_grace_ms: u64,
    /// Interval of the runner's liveness pings to its parent, in milliseconds.
    pub heartbeat_ms: u64,
    /// The runner stops after its first call or cast.
    #[serde(default)]
    pub single_use: bool,
    /// Registered name of the function an idle runner asks before stopping.
    #[serde(default)]
    pub idle_shutdown_check: Option<String>,
    /// The runner belongs to a shared pool: it keeps a lease in the pool's KV
    /// bucket, serves any parent of the pool, and is retired by the scaler.
    #[serde(default)]
    pub shared: bool,
}

impl ParentInfo {
    /// Serializes for the environment variable.
    pub fn to_env_value(&self) -> String {
        serde_json::to_string(self).expect("ParentInfo always serializes")
    }

    /// Parses the environment variable's value.
    pub fn from_env_value(value: &str) -> Result<ParentInfo, Error> {
        serde_json::from_str(value)
            .map_err(|e| Error::Config(format!("{PARENT_ENV} is not valid runner info: {e}")))
    }

    /// Idle shutdown as a duration.
    pub fn idle_shutdown_after(&self) -> Duration {
        Duration::from_millis(self.idle_shutdown_after_ms)
    }
}

/// Returns the parent's info when this process is a runner, `None` in a
/// parent (or an app not using flame).
///
/// Use it to skip work a runner does not need, such as starting a web server:
///
/// ```
/// if flame_core::parent().is_none() {
///     // start the HTTP server only in the parent
/// }
/// ```
pub fn parent() -> Option<ParentInfo> {
    let value = std::env::var(PARENT_ENV).ok()?;
    ParentInfo::from_env_value(&value).ok()
}

/// Encodes a value with MessagePack (named fields, so structs may evolve).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec_named(value)
}

/// Decodes a MessagePack value.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

/// Makes text safe for a NATS header value (no line breaks, bounded length).
pub fn header_safe(text: &str) -> String {
    const MAX: usize = 1024;
    let mut out: String = text
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    if out.len() > MAX {
        let mut cut = MAX;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_round_trip() {
        for kind in [
            ErrorKind::Malformed,
            ErrorKind::UnknownFunction,
            ErrorKind::BuildMismatch,
            ErrorKind::DecodeArgs,
            ErrorKind::EncodeResult,
            ErrorKind::ResultTooLarge,
            ErrorKind::Panicked,
            ErrorKind::Timeout,
            ErrorKind::Draining,
        ] {
            assert_eq!(ErrorKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(ErrorKind::parse("nonsense"), None);
    }

    #[test]
    fn header_safe_strips_newlines_and_bounds_length() {
        assert_eq!(header_safe("a\nb\r\nc"), "a b  c");
        let long = "é".repeat(2000);
        let safe = header_safe(&long);
        assert!(safe.len() <= 1024 + '…'.len_utf8());
        assert!(safe.ends_with('…'));
    }

    #[test]
    fn parent_info_round_trips_and_rejects_garbage() {
        let info = ParentInfo {
            parent_id: "p".into(),
            pool: "thumbs".into(),
            runner_id: "r".into(),
            nats_url: "nats://127.0.0.1:4222".into(),
            max_concurrency: 3,
            idle_shutdown_after_ms: 1000,
            shutdown_timeout_ms: 2000,
            failsafe_timeout_ms: 3000,
            parent_grace_ms: 4000,
            heartbeat_ms: 500,
            single_use: true,
            idle_shutdown_check: Some("app::may_stop".into()),
            shared: false,
        };
        assert_eq!(
            ParentInfo::from_env_value(&info.to_env_value()).unwrap(),
            info
        );
        assert!(matches!(
            ParentInfo::from_env_value("{"),
            Err(Error::Config(_))
        ));
    }
}
