//! `flame watch <pool>`: pool events as they happen, one line each.

use std::io::Write;

use flame_nats::ops::{events_wildcard, EventKind, PoolEventMessage};
use futures::StreamExt;

use crate::connection::Connection;
use crate::error::CliError;
use crate::table::short;

/// One event as a line:
/// `08:00:00.123 thumbs runner_ready 3f2a9c1e… runners=3 ready=2 load=5`.
pub(crate) fn line(e: &PoolEventMessage) -> String {
    let time = e.time.get(11..23).unwrap_or(&e.time);
    let kind = e
        .event_type
        .rsplit('.')
        .next()
        .unwrap_or(e.event_type.as_str());
    let mut out = format!("{time} {} {kind}", e.pool);
    if let Some(runner) = &e.runner {
        out.push_str(&format!(" {}…", short(runner, 8)));
    }
    if let Some(load) = e.runner_load {
        out.push_str(&format!(" runner_load={load}"));
    }
    if e.kind() == Some(EventKind::ScalerElected) {
        out.push_str(&format!(" scaler={}…", short(&e.parent, 8)));
    }
    out.push_str(&format!(
        " runners={} ready={} load={}",
        e.runners, e.ready, e.load
    ));
    if e.waiting > 0 {
        out.push_str(&format!(" waiting={}", e.waiting));
    }
    if let (Some(min), Some(max)) = (e.min, e.max) {
        out.push_str(&format!(" min={min} max={max}"));
    }
    if let Some(reason) = e.reason {
        out.push_str(&format!(" reason={}", reason.as_str()));
    }
    if let Some(detail) = &e.detail {
        out.push_str(&format!(" detail={detail:?}"));
    }
    out
}

/// `flame watch`.
pub(crate) async fn run(
    connection: &Connection,
    url: &str,
    pool: &str,
    json: bool,
) -> Result<(), CliError> {
    let client = &connection.client;
    let subject = events_wildcard(pool);
    let subscribed = async {
        client
            .subscribe(subject.clone())
            .await
            .map_err(|e| CliError::nats(&format!("cannot subscribe to {subject}"), e))
    };
    // Said only once the server has the subscription (the guard's round
    // trip): nothing published after the line is missed; and a refused
    // subscription is said, not watched in silence.
    let mut events = connection.refusals.guard(client, subscribed).await?;
    eprintln!(
        "watching {subject} on {} (Ctrl-C stops)",
        flame_nats::tool::without_credentials(url)
    );
    let mut stdout = std::io::stdout();
    loop {
        let msg = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            e = connection.refusals.refused() => return Err(e),
            msg = events.next() => match msg {
                Some(msg) => msg,
                None => return Err(CliError::Failed("the connection to NATS closed".into())),
            },
        };
        let text = if json {
            String::from_utf8_lossy(&msg.payload).into_owned()
        } else {
            match serde_json::from_slice::<PoolEventMessage>(&msg.payload) {
                Ok(event) => line(&event),
                Err(_) => format!(
                    "{} (not a pool event) {}",
                    msg.subject,
                    String::from_utf8_lossy(&msg.payload)
                ),
            }
        };
        // A reader that went away (a closed pipe) ends the watch.
        if writeln!(stdout, "{text}")
            .and_then(|_| stdout.flush())
            .is_err()
        {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(json: serde_json::Value) -> PoolEventMessage {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn events_read_as_one_line() {
        let ready = event(serde_json::json!({
            "type": "io.flame.pool.v1.runner_ready", "id": "x", "time": "2026-11-22T08:00:00.123Z",
            "pool": "thumbs", "runner": "3f2a9c1e8b7d4f60a1c2d3e4f5061728", "parent": "p", "build": "b",
            "runners": 3, "ready": 2, "load": 5, "waiting": 0
        }));
        assert_eq!(
            line(&ready),
            "08:00:00.123 thumbs runner_ready 3f2a9c1e… runners=3 ready=2 load=5"
        );
        let busy = event(serde_json::json!({
            "type": "io.flame.pool.v1.runner_busy", "id": "x", "time": "2026-11-22T08:00:00.500Z",
            "pool": "thumbs", "runner": "3f2a9c1e8b7d4f60a1c2d3e4f5061728", "parent": "p", "build": "b",
            "runners": 3, "ready": 3, "load": 5, "waiting": 0, "runner_load": 2
        }));
        assert_eq!(
            line(&busy),
            "08:00:00.500 thumbs runner_busy 3f2a9c1e… runner_load=2 runners=3 ready=3 load=5"
        );
        let gone = event(serde_json::json!({
            "type": "io.flame.pool.v1.runner_gone", "id": "x", "time": "2026-11-22T08:00:01.000Z",
            "pool": "thumbs", "runner": "3f2a9c1e8b7d4f60a1c2d3e4f5061728", "parent": "p", "build": "b",
            "runners": 2, "ready": 2, "load": 0, "waiting": 1, "reason": "crashed",
            "detail": "runner process was killed by signal 9"
        }));
        assert_eq!(
            line(&gone),
            "08:00:01.000 thumbs runner_gone 3f2a9c1e… runners=2 ready=2 load=0 waiting=1 reason=crashed detail=\"runner process was killed by signal 9\""
        );
        let limits = event(serde_json::json!({
            "type": "io.flame.pool.v1.limits_changed", "id": "x", "time": "2026-11-22T08:00:02.000Z",
            "pool": "thumbs", "parent": "b71e0c5a9d2f", "build": "b",
            "runners": 2, "ready": 2, "load": 0, "waiting": 0, "min": 0, "max": 3
        }));
        assert_eq!(
            line(&limits),
            "08:00:02.000 thumbs limits_changed runners=2 ready=2 load=0 min=0 max=3"
        );
    }
}
