//! Answering the reports runners of a private pool send their parent:
//! ready, leave, ping and stopping, each signed with the runner's key (and
//! taking the log lines they forward, see `pool/logs.rs`).

use std::sync::Arc;
use std::time::Duration;

use flame_core::Error;
use futures::StreamExt;
use tracing::debug;

use super::model::RunnerId;
use super::slot::{deliver, Handoff};
use super::PoolInner;
use crate::announce::Outgoing;
use crate::protocol::logs::LOGS_TOKEN;
use crate::protocol::pool_events::{EventKind, Reason};
use crate::protocol::reports::{ParentAnswer, ReportKind, RunnerReport};

impl PoolInner {
    /// Answers runner events until the pool's runners are stopped (not
    /// merely until it closes: a stopping runner must get its answer).
    pub(super) async fn listen(self: Arc<Self>, mut events: async_nats::Subscriber) {
        while let Some(Some(msg)) = self.listening.run_until_cancelled(events.next()).await {
            // Forwarded log lines: published, not requests.
            if msg.subject.rsplit('.').next() == Some(LOGS_TOKEN) {
                self.runner_logs(&msg);
                continue;
            }
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            let answer = match (
                ReportKind::from_subject(&msg.subject),
                serde_json::from_slice::<RunnerReport>(&msg.payload),
            ) {
                (Some(event), Ok(ev)) => self.on_event(event, ev),
                _ => ParentAnswer::refuse("not a flame runner event"),
            };
            let body = serde_json::to_vec(&answer).unwrap_or_default();
            if let Err(e) = self.parent.client.publish(reply, body.into()).await {
                debug!("cannot answer runner: {e}");
            }
        }
        let _ = events.unsubscribe().await;
    }

    fn on_event(self: &Arc<Self>, event: ReportKind, ev: RunnerReport) -> ParentAnswer {
        let id: RunnerId = Arc::from(ev.runner.as_str());
        let mut st = self.state.lock().unwrap();
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
            debug!(pool = %self.config.name, runner = %id, event = event.as_str(), "ignoring an event not signed by the runner");
            return ParentAnswer::refuse("event not signed by the runner");
        }
        match event {
            ReportKind::Ready => {
                if *ev.build != *self.parent.build_id {
                    let e = Error::BuildMismatch {
                        parent: self.parent.build_id.to_string(),
                        runner_build: ev.build.clone(),
                        runner: ev.runner.clone(),
                    };
                    entry.link.fail(&self.parent.replies, e.to_string());
                    entry.refuse_ready();
                    return ParentAnswer::refuse(e.to_string());
                }
                entry.ready();
                let Some(handed) = st.model.runner_ready(&id) else {
                    return ParentAnswer::refuse("unknown runner");
                };
                st.last_boot_error = None;
                let handoffs: Vec<Handoff> = handed
                    .into_iter()
                    .filter_map(|(w, r)| st.slot_for(self, w, &r))
                    .collect();
                self.announce(&st, |c| {
                    Outgoing::new(EventKind::RunnerReady, c).runner(id.clone())
                });
                if st.model.runner(&id).is_some_and(|(_, load)| load > 0) {
                    self.busy_if_first(&mut st, &id);
                }
                if st.model.boots_ahead() {
                    // Hot start: the callers it took may make it busy
                    // enough to boot the next one already.
                    self.boot_locked(&mut st);
                }
                drop(st);
                deliver(handoffs);
                self.changed.notify_waiters();
                ParentAnswer::answer(true)
            }
            ReportKind::Leave => {
                let ok = st.model.may_leave(
                    &id,
                    Duration::from_millis(ev.idle_ms),
                    self.config.min_idle_shutdown_after,
                );
                if ok {
                    debug!(pool = %self.config.name, runner = %id, "runner may leave");
                    if let Some(entry) = st.runners.get_mut(&id) {
                        entry.drain_cause = Some(Reason::Idle);
                    }
                    self.settle_idle(&mut st, &id);
                    self.announce(&st, |c| {
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
                let own = entry.drain_cause.is_none().then(|| self.own_stop_reason());
                if own.is_some() {
                    entry.drain_cause = own;
                }
                st.stopping(&id);
                if let Some(reason) = own {
                    self.settle_idle(&mut st, &id);
                    self.announce(&st, |c| {
                        Outgoing::new(EventKind::RunnerRetiring, c)
                            .runner(id.clone())
                            .reason(reason)
                    });
                }
                debug!(pool = %self.config.name, runner = %id, "runner is stopping");
                ParentAnswer::answer(true)
            }
            ReportKind::Ping => {
                entry.heard();
                ParentAnswer::answer(true)
            }
        }
    }
}
