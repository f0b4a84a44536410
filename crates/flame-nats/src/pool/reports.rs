//! Answering the reports runners of a private pool send their parent:
//! ready, leave, ping and stopping, each signed with the runner's key (and
//! taking the log lines they forward, see `pool/logs.rs`). The pool's
//! part for this is [`Listener`], which says until when; [`listen`]
//! answers.

use std::sync::Arc;
use std::time::Duration;

use flame_core::Error;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::model::RunnerId;
use super::slot::{deliver, Handoff};
use super::{booting, logs, PoolInner};
use crate::ops::Outgoing;
use crate::protocol::logs::LOGS_TOKEN;
use crate::protocol::pool_events::{EventKind, Reason};
use crate::protocol::reports::{ParentAnswer, ReportKind, RunnerReport};

/// How long a pool answers its runners' reports: until its runners are
/// stopped, not merely until it closes (a stopping runner must get its
/// answer).
#[derive(Debug, Default)]
pub(super) struct Listener {
    until: CancellationToken,
}

impl Listener {
    /// Stops answering: the pool's runners are stopped.
    pub(super) fn stop(&self) {
        self.until.cancel();
    }
}

/// Answers runner events until the pool's runners are stopped (not
/// merely until it closes: a stopping runner must get its answer).
pub(super) async fn listen(pool: Arc<PoolInner>, mut events: async_nats::Subscriber) {
    while let Some(Some(msg)) = pool.listener.until.run_until_cancelled(events.next()).await {
        // Forwarded log lines: published, not requests.
        if msg.subject.rsplit('.').next() == Some(LOGS_TOKEN) {
            logs::forward(&pool, &msg);
            continue;
        }
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let answer = match (
            ReportKind::from_subject(&msg.subject),
            serde_json::from_slice::<RunnerReport>(&msg.payload),
        ) {
            (Some(event), Ok(ev)) => on_report(&pool, event, ev),
            _ => ParentAnswer::refuse("not a flame runner event"),
        };
        let body = serde_json::to_vec(&answer).unwrap_or_default();
        if let Err(e) = pool.parent.client.publish(reply, body.into()).await {
            debug!("cannot answer runner: {e}");
        }
    }
    let _ = events.unsubscribe().await;
}

/// The answer to one report, `ev` of kind `event`.
fn on_report(pool: &Arc<PoolInner>, event: ReportKind, ev: RunnerReport) -> ParentAnswer {
    let id: RunnerId = Arc::from(ev.runner.as_str());
    let mut st = pool.state.lock().unwrap();
    if st.closed {
        // Runners are being stopped: let them drain and go.
        return ParentAnswer::answer(event != ReportKind::Ready);
    }
    // Only the runner itself can sign its events; anyone else on the
    // NATS account could publish here.
    let Some(entry) = st.runners.get_mut(&id) else {
        return ParentAnswer::refuse("unknown runner");
    };
    let signed = entry.key.as_ref().is_some_and(|key| ev.verify(key, event));
    if !signed || !entry.replays.accept(ev.seq) {
        debug!(pool = %pool.config.name, runner = %id, event = event.as_str(), "ignoring an event not signed by the runner");
        return ParentAnswer::refuse("event not signed by the runner");
    }
    match event {
        ReportKind::Ready => {
            if *ev.build != *pool.parent.build_id {
                let e = Error::BuildMismatch {
                    parent: pool.parent.build_id.to_string(),
                    runner_build: ev.build.clone(),
                    runner: ev.runner.clone(),
                };
                entry.link.fail(&pool.parent.replies, e.to_string());
                entry.refuse_ready();
                return ParentAnswer::refuse(e.to_string());
            }
            entry.ready();
            let Some(handed) = st.model.runner_ready(&id) else {
                return ParentAnswer::refuse("unknown runner");
            };
            st.boot.last_error = None;
            let handoffs: Vec<Handoff> = handed
                .into_iter()
                .filter_map(|(w, r)| st.slot_for(pool, w, &r))
                .collect();
            pool.announcer.announce(&st, |c| {
                Outgoing::new(EventKind::RunnerReady, c).runner(id.clone())
            });
            if st.model.runner(&id).is_some_and(|(_, load)| load > 0) {
                pool.announcer.busy_if_first(&mut st, &id);
            }
            if st.model.boots_ahead() {
                // Hot start: the callers it took may make it busy
                // enough to boot the next one already.
                booting::grow_locked(pool, &mut st);
            }
            drop(st);
            deliver(handoffs);
            pool.changed.notify_waiters();
            ParentAnswer::answer(true)
        }
        ReportKind::Leave => {
            let ok = st.model.may_leave(
                &id,
                Duration::from_millis(ev.idle_ms),
                pool.config.min_idle_shutdown_after,
            );
            if ok {
                debug!(pool = %pool.config.name, runner = %id, "runner may leave");
                if let Some(entry) = st.runners.get_mut(&id) {
                    entry.drain_cause = Some(Reason::Idle);
                }
                pool.announcer.settle_idle(&mut st, &id);
                pool.announcer.announce(&st, |c| {
                    Outgoing::new(EventKind::RunnerRetiring, c)
                        .runner(id.clone())
                        .reason(Reason::Idle)
                });
            }
            ParentAnswer::answer(ok)
        }
        ReportKind::Stopping => {
            // Stopping on its own (SIGTERM, single use): announced now;
            // stopping because this parent said so: announced then.
            let own = entry.drain_cause.is_none().then(|| pool.own_stop_reason());
            if own.is_some() {
                entry.drain_cause = own;
            }
            st.stopping(&id);
            if let Some(reason) = own {
                pool.announcer.settle_idle(&mut st, &id);
                pool.announcer.announce(&st, |c| {
                    Outgoing::new(EventKind::RunnerRetiring, c)
                        .runner(id.clone())
                        .reason(reason)
                });
            }
            debug!(pool = %pool.config.name, runner = %id, "runner is stopping");
            ParentAnswer::answer(true)
        }
        ReportKind::Ping => {
            entry.heard();
            ParentAnswer::answer(true)
        }
    }
}
