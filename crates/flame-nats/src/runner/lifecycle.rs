//! A runner's life beside its calls: the heartbeat that tells its parents
//! it is alive, and the watch that decides when to stop (SIGTERM, idle,
//! parent gone, lease lost).
//!
//! The two are separate tasks on purpose: the heartbeat must keep its
//! rhythm whatever the watch waits on (a slow idle check, a slow parent),
//! and it keeps going while the runner drains, so that a draining runner
//! is not mistaken for a dead one.
//!
//! Functions of the whole runner (its parent, its work, its lease), called
//! with it: `lifecycle::heartbeat(runner)`, `lifecycle::ask_parent(&runner,
//! ..)`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use bytes::Bytes;
use flame_core::{codec, Error};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn, Instrument};

use super::{Runner, Stop};
use crate::protocol::call as wire;
use crate::protocol::reports::{ParentAnswer, ReportKind, RunnerReport};
use crate::protocol::subjects;

/// Ends each outage of the runner's connection once the server has its
/// subscriptions again, until aborted. After a reconnection the client
/// sends its subscriptions first; a flush that comes back after that means
/// the server took them. Calls sent before then were dropped, so the lease
/// must report the outage as lasting until now (see
/// [`Outages`](crate::connect::Outages)).
pub(super) async fn confirm_resubscriptions(
    runner: Arc<Runner>,
    connected: Arc<tokio::sync::Notify>,
) {
    let heartbeat = Duration::from_millis(runner.info.heartbeat_ms);
    // Registered before each flush, so that a reconnection during one is
    // not missed.
    let mut next = std::pin::pin!(connected.notified());
    next.as_mut().enable();
    loop {
        next.as_mut().await;
        next.set(connected.notified());
        next.as_mut().enable();
        while runner.outages.lock().unwrap().awaiting_subscriptions() {
            match tokio::time::timeout(heartbeat, runner.client.flush()).await {
                Ok(Ok(())) => {
                    runner
                        .outages
                        .lock()
                        .unwrap()
                        .resubscribed(std::time::Instant::now());
                    debug!(runner = %runner.info.runner_id, "subscriptions back after an outage");
                    // What the lost connection took with it, if anything.
                    runner.unconfirmed.send_again(&runner.client).await;
                }
                // Lost again (the next reconnection wakes us) or slow: try
                // again unless the connection went meanwhile.
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

/// Confirms the runner's replies (see `unconfirmed.rs`) every heartbeat,
/// and sooner when many are kept, until aborted.
pub(super) async fn confirm_replies(runner: Arc<Runner>) {
    let heartbeat = Duration::from_millis(runner.info.heartbeat_ms);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(heartbeat) => {}
            _ = runner.unconfirmed.filled() => {}
        }
        confirm_sent(&runner, heartbeat).await;
    }
}

/// Pings the parent (a private pool) or any parent and renews the lease (a
/// shared pool) every heartbeat, until aborted. What it learns is left in
/// the runner's flags for [`watch`].
pub(super) async fn heartbeat(runner: Arc<Runner>) {
    let heartbeat = Duration::from_millis(runner.info.heartbeat_ms);
    let mut ping = tokio::time::interval(heartbeat);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ping.tick().await;
        // Each on its own task, so that a slow answer never delays the next
        // beat: the parent counts a silent runner as down after two.
        let r = runner.clone();
        tokio::spawn(
            async move {
                let answer = if r.info.shared {
                    ask_any_parent(&r, heartbeat).await
                } else {
                    ask_parent(&r, ReportKind::Ping, 0, heartbeat).await
                };
                match answer {
                    Some(true) => heard_parent(&r),
                    Some(false) => r.parent_refused.store(true, Ordering::SeqCst),
                    None => {}
                }
            }
            .in_current_span(),
        );
        if runner.info.shared {
            let r = runner.clone();
            tokio::spawn(
                async move {
                    if !renew_lease(&r).await {
                        r.lease.lost.store(true, Ordering::SeqCst);
                    }
                }
                .in_current_span(),
            );
        }
    }
}

/// Watches signals (`sigterm`, installed before the runner served), idleness
/// and the parent; returns why the runner should stop.
pub(super) async fn watch(
    runner: Arc<Runner>,
    mut sigterm: Option<tokio::signal::unix::Signal>,
) -> Stop {
    let info = &runner.info;
    let heartbeat = Duration::from_millis(info.heartbeat_ms);
    let grace = Duration::from_millis(info.parent_grace_ms);
    let idle_after = info.idle_shutdown_after();
    let idle_check = (idle_after / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut check = tokio::time::interval(heartbeat);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut idle = tokio::time::interval(idle_check);
    let mut last_dirty_write = Instant::now() - heartbeat;
    // The answer of an idle runner's request to leave, from its own task.
    let (left_tx, mut left_rx) = mpsc::channel::<Duration>(1);
    let mut asking = None::<tokio::task::JoinHandle<()>>;
    heard_parent(&runner);

    loop {
        tokio::select! {
            _ = async { sigterm.as_mut().unwrap().recv().await }, if sigterm.is_some() => {
                return Stop::Drain("SIGTERM".to_string());
            }
            _ = check.tick() => {
                if runner.lease.lost.load(Ordering::SeqCst) {
                    return Stop::Abandoned("the scaler removed this runner's lease".to_string());
                }
                if runner.parent_refused.load(Ordering::SeqCst) {
                    return Stop::Abandoned("the parent no longer knows this runner".to_string());
                }
                let heard = runner.parent_heard_ms.load(Ordering::SeqCst);
                let silent = runner.work.started.elapsed().saturating_sub(Duration::from_millis(heard));
                if silent >= grace {
                    return Stop::Abandoned(format!("no word from the parent for {silent:?}"));
                }
            }
            _ = runner.lease.dirty.notified(), if runner.info.shared => {
                // Callers started queueing here: show the scaler soon. The
                // short wait gathers a burst of them into one write; at most
                // four such writes a heartbeat (calls queue all the time
                // under steady load, and the bucket may be failing over).
                if last_dirty_write.elapsed() < heartbeat / 4 {
                    continue;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                last_dirty_write = Instant::now();
                let r = runner.clone();
                tokio::spawn(async move { renew_lease(&r).await }.in_current_span());
            }
            Some(idle_for) = left_rx.recv() => {
                return Stop::Drain(format!("idle for {idle_for:?}"));
            }
            _ = idle.tick(), if !runner.info.shared => {
                if asking.as_ref().is_some_and(|t| !t.is_finished()) {
                    continue;
                }
                if runner.counters.in_flight.load(Ordering::SeqCst) > 0
                    || runner.work.idle_for() < idle_after
                {
                    continue;
                }
                // The idle check and the parent's answer may take a while:
                // ask on a task of their own.
                let (r, tx) = (runner.clone(), left_tx.clone());
                asking = Some(tokio::spawn(async move {
                    if let Some(idle_for) = may_leave(&r, idle_after, heartbeat).await {
                        let _ = tx.send(idle_for).await;
                    }
                }.in_current_span()));
            }
        }
    }
}

/// Shared pools: writes load, queue and idle time into the lease (see
/// [`Lease::renew`](super::lease::Lease::renew)). False once the lease is
/// gone.
async fn renew_lease(runner: &Runner) -> bool {
    let idle_for = if runner.counters.in_flight.load(Ordering::SeqCst) == 0
        && runner.work.queued.load(Ordering::SeqCst) == 0
    {
        let idle_for = runner.work.idle_for();
        if idle_for >= runner.info.idle_shutdown_after() && !idle_check_allows(runner).await {
            Duration::ZERO
        } else {
            idle_for
        }
    } else {
        Duration::ZERO
    };
    let load = runner.counters.in_flight.load(Ordering::SeqCst);
    let queued = runner.work.queued.load(Ordering::SeqCst);
    let heartbeat = Duration::from_millis(runner.info.heartbeat_ms);
    runner
        .lease
        .renew(
            load,
            queued,
            idle_for,
            &runner.outages,
            heartbeat,
            &runner.info.runner_id,
        )
        .await
}

/// An idle runner of a private pool asks to leave: the pool's idle check
/// first, then the parent. The idle time when both say yes.
async fn may_leave(runner: &Runner, idle_after: Duration, timeout: Duration) -> Option<Duration> {
    if !idle_check_allows(runner).await {
        return None;
    }
    // Work may have come in while the check ran.
    let idle_for = runner.work.idle_for();
    if runner.counters.in_flight.load(Ordering::SeqCst) > 0 || idle_for < idle_after {
        return None;
    }
    let idle_ms = idle_for.as_millis() as u64;
    (ask_parent(runner, ReportKind::Leave, idle_ms, timeout).await == Some(true))
        .then_some(idle_for)
}

/// Shared pools: asks whether a parent of the pool and of this runner's
/// build is alive. `None` when no parent answered or none of this build
/// is left: the runner then stops after `parent_grace` (unless the
/// scaler retires it first).
async fn ask_any_parent(runner: &Runner, timeout: Duration) -> Option<bool> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(wire::HEADER_BUILD, runner.build);
    let request = async_nats::Request::new()
        .payload(Bytes::from(runner.info.runner_id.clone()))
        .headers(headers)
        .timeout(Some(timeout));
    match runner
        .client
        .send_request(subjects::alive(&runner.info.pool), request)
        .await
    {
        Ok(msg) if &msg.payload[..] == subjects::ALIVE_NO.as_bytes() => {
            debug!(runner = %runner.info.runner_id, "no parent of this build is left");
            None
        }
        Ok(_) => Some(true),
        Err(e) => {
            debug!("no parent answered: {e}");
            None
        }
    }
}

/// Forgets the replies the server has for sure: those published before
/// a round trip (a flush) that came back on the same connection.
async fn confirm_sent(runner: &Runner, timeout: Duration) {
    let mark = runner.unconfirmed.mark();
    let Some(before) = runner.outages.lock().unwrap().stretch() else {
        return;
    };
    if let Ok(Ok(())) = tokio::time::timeout(timeout, runner.client.flush()).await {
        if runner.outages.lock().unwrap().stretch() == Some(before) {
            runner.unconfirmed.confirm(mark);
        }
    }
}

pub(super) fn heard_parent(runner: &Runner) {
    let ms = runner.work.started.elapsed().as_millis() as u64;
    runner.parent_heard_ms.fetch_max(ms, Ordering::SeqCst);
}

/// Runs the pool's idle check, if any, within max(heartbeat, 1 s). A
/// check that fails to run counts as yes (logged): a runner with no work
/// must not stay up forever.
pub(super) async fn idle_check_allows(runner: &Runner) -> bool {
    let Some(name) = runner.info.idle_shutdown_check.as_deref() else {
        return true;
    };
    let Some((name, handler)) = runner.registry.lookup(name) else {
        warn!(runner = %runner.info.runner_id, "idle check `{name}` is not registered in this build; stopping anyway");
        return true;
    };
    let args = Bytes::from(codec::encode(&()).expect("() encodes"));
    let timeout = Duration::from_millis(runner.info.heartbeat_ms.max(1_000));
    match runner.executor.execute(handler, args, timeout).await {
        Ok(bytes) => match codec::decode::<bool>(&bytes) {
            Ok(allowed) => {
                if !allowed {
                    debug!(runner = %runner.info.runner_id, "idle check `{name}` says stay up");
                }
                allowed
            }
            Err(e) => {
                warn!(runner = %runner.info.runner_id, "idle check `{name}` returned no bool ({e}); stopping anyway");
                true
            }
        },
        Err(error) => {
            let message = error.message;
            warn!(runner = %runner.info.runner_id, "idle check `{name}` failed ({message}); stopping anyway");
            true
        }
    }
}

/// Tells the parent we are ready; retried until the failsafe deadline.
pub(super) async fn announce_ready(runner: &Runner, deadline: Instant) -> Result<(), Error> {
    let mut last_failure = String::from("no attempt finished");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::RunnerStart(format!(
                "failsafe: parent {} did not acknowledge this runner within {} ms ({last_failure})",
                runner.info.parent_id, runner.info.failsafe_timeout_ms
            )));
        }
        match request_parent(
            runner,
            ReportKind::Ready,
            0,
            left.min(Duration::from_secs(2)),
        )
        .await
        {
            Ok(true) => return Ok(()),
            Ok(false) => {
                return Err(Error::RunnerStart(
                    "the parent refused this runner (it gave up on it)".into(),
                ))
            }
            Err(why) => {
                last_failure = why;
                tokio::time::sleep(Duration::from_millis(50).min(left)).await
            }
        }
    }
}

/// Sends a signed event to the parent. `None` when there was no answer.
pub(super) async fn ask_parent(
    runner: &Runner,
    event: ReportKind,
    idle_ms: u64,
    timeout: Duration,
) -> Option<bool> {
    request_parent(runner, event, idle_ms, timeout).await.ok()
}

/// [`ask_parent`], saying why there was no answer.
async fn request_parent(
    runner: &Runner,
    event: ReportKind,
    idle_ms: u64,
    timeout: Duration,
) -> Result<bool, String> {
    let key = runner
        .event_key
        .as_ref()
        .ok_or_else(|| "no event key".to_string())?;
    let subject = subjects::parent_event(&runner.info.pool, &runner.info.parent_id, event);
    let seq = runner.event_seq.fetch_add(1, Ordering::SeqCst) + 1;
    let body = RunnerReport::signed(
        key,
        event,
        &runner.info.runner_id,
        runner.build,
        idle_ms,
        seq,
    );
    let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    let request = async_nats::Request::new()
        .payload(body.into())
        .timeout(Some(timeout));
    match runner.client.send_request(subject.clone(), request).await {
        Ok(msg) => serde_json::from_slice::<ParentAnswer>(&msg.payload)
            .map(|a| a.ok)
            .map_err(|e| format!("unreadable answer on {subject}: {e}")),
        Err(e) => {
            debug!(event = event.as_str(), "parent did not answer: {e}");
            Err(match e.kind() {
                RequestErrorKind::NoResponders => format!(
                    "nobody listens on {subject}: the parent is gone, or this runner's \
                     NATS user is not in the parent's account"
                ),
                _ => format!("no answer on {subject}: {e}"),
            })
        }
    }
}
