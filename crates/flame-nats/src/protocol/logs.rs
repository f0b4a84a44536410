//! Runner log lines forwarded to the parent (`PoolBuilder::forward_runner_logs`):
//! batches published on `flame.<pool>.parent.<parent_id>.logs`, JSON
//! bodies signed with the runner's event key in a `Flame-Proof` header, so
//! that nobody else on the NATS account can put lines in a parent's log.

use serde::{Deserialize, Serialize};

use super::reports::ReportKey;

/// Last token of the subject.
pub(crate) const LOGS_TOKEN: &str = "logs";

/// Header carrying the keyed BLAKE3 hash of the body, 64 hex digits.
pub(crate) const HEADER_PROOF: &str = "Flame-Proof";

/// One batch of a runner's log lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LogBatch {
    /// The runner.
    pub(crate) runner: String,
    /// Grows by one each batch: a batch not above the last one is a replay.
    pub(crate) seq: u64,
    /// Lines the runner dropped since the last batch (it keeps at most a
    /// bounded number waiting; logging never blocks a runner).
    #[serde(default)]
    pub(crate) dropped: u64,
    /// The lines, oldest first.
    pub(crate) lines: Vec<LogLine>,
}

/// One log event of a runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LogLine {
    /// `TRACE`, `DEBUG`, `INFO`, `WARN` or `ERROR`.
    pub(crate) level: String,
    /// The event's target (its module path, usually).
    pub(crate) target: String,
    /// The message, then the event's other fields as ` name=value`.
    pub(crate) message: String,
}

impl ReportKey {
    /// The proof of a batch's body.
    pub(crate) fn prove_logs(&self, body: &[u8]) -> String {
        self.keyed(body).to_hex().to_string()
    }

    /// Whether `proof` is that of `body`.
    pub(crate) fn verify_logs(&self, body: &[u8], proof: &str) -> bool {
        blake3::Hash::from_hex(proof).is_ok_and(|p| p == self.keyed(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_signed_and_checked() {
        let key = ReportKey::random();
        let batch = LogBatch {
            runner: "r".into(),
            seq: 1,
            dropped: 0,
            lines: vec![LogLine {
                level: "INFO".into(),
                target: "app".into(),
                message: "hello n=1".into(),
            }],
        };
        let body = serde_json::to_vec(&batch).unwrap();
        let proof = key.prove_logs(&body);
        assert!(key.verify_logs(&body, &proof));
        assert!(!ReportKey::random().verify_logs(&body, &proof));
        let mut forged = body.clone();
        forged[10] ^= 1;
        assert!(!key.verify_logs(&forged, &proof));
        assert!(!key.verify_logs(&body, "not hex"));
        let back: LogBatch = serde_json::from_slice(&body).unwrap();
        assert_eq!(back, batch);
    }
}
