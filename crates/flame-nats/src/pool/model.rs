//! The placement model of a pool: which runner takes a call, who waits, when
//! to boot. Pure state with no I/O, so every rule is unit-tested here and the
//! runtime only carries out its decisions.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// Id of a runner (also the last token of its subject).
pub(crate) type RunnerId = Arc<str>;

/// Id of a caller waiting for a slot.
pub(crate) type WaiterId = u64;

/// Where a runner is in its life, as the pool sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RunnerState {
    /// Asked of the backend, not yet ready.
    Booting,
    /// Takes calls.
    Ready,
    /// Stopping: takes no new calls, still counts against `max`.
    Draining,
}

#[derive(Debug, Clone)]
struct Runner {
    state: RunnerState,
    load: usize,
    /// Took a call already (matters for single-use pools).
    used: bool,
    /// Calls other parents run there, as last reported (shared pools). Only
    /// breaks ties between runners; it never holds a caller back, since it
    /// is always somewhat out of date.
    others: usize,
}

/// Result of asking for a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Checkout {
    /// A slot on this runner is yours; give it back with
    /// [`PoolModel::checkin`].
    Placed(RunnerId),
    /// No free slot: you are queued (FIFO) and will be handed one by
    /// [`PoolModel::runner_ready`] or [`PoolModel::checkin`].
    Queued,
}

/// Placement state of one pool.
#[derive(Debug, Clone)]
pub(crate) struct PoolModel {
    min: usize,
    max: usize,
    max_concurrency: usize,
    single_use: bool,
    /// Set when a `min` runner idled down past `min_idle_shutdown_after`:
    /// the pool then stays below `min` until the next call.
    min_suspended: bool,
    runners: BTreeMap<RunnerId, Runner>,
    waiters: VecDeque<WaiterId>,
    /// Boot one more runner when the ready ones are this busy (percent).
    hot_start: Option<u8>,
}

impl PoolModel {
    /// An empty pool with these limits.
    pub(crate) fn new(min: usize, max: usize, max_concurrency: usize) -> PoolModel {
        PoolModel {
            min,
            max,
            max_concurrency,
            single_use: false,
            min_suspended: false,
            runners: BTreeMap::new(),
            waiters: VecDeque::new(),
            hot_start: None,
        }
    }

    /// Boots a runner ahead of demand once the ready ones are `percent`
    /// busy (see [`PoolModel::boots_needed`]).
    pub(crate) fn hot_start(mut self, percent: Option<u8>) -> PoolModel {
        self.hot_start = percent;
        self
    }

    /// Whether a placement may call for a boot (hot start is on).
    pub(crate) fn boots_ahead(&self) -> bool {
        self.hot_start.is_some()
    }

    /// Makes every runner take exactly one call, then drain.
    pub(crate) fn single_use(mut self) -> PoolModel {
        self.single_use = true;
        self.max_concurrency = 1;
        self
    }

    /// Takes a slot on the least-loaded ready runner, or queues the caller.
    pub(crate) fn checkout(&mut self, waiter: WaiterId) -> Checkout {
        self.min_suspended = false;
        match self.least_loaded() {
            Some(id) if self.waiters.is_empty() => {
                let r = self.runners.get_mut(&id).expect("exists");
                r.load += 1;
                r.used = true;
                Checkout::Placed(id)
            }
            _ => {
                self.waiters.push_back(waiter);
                Checkout::Queued
            }
        }
    }

    fn least_loaded(&self) -> Option<RunnerId> {
        self.runners
            .iter()
            .filter(|(_, r)| self.takes_work(r))
            .min_by_key(|(_, r)| r.load + r.others)
            .map(|(id, _)| id.clone())
    }

    fn takes_work(&self, r: &Runner) -> bool {
        r.state == RunnerState::Ready
            && r.load < self.max_concurrency
            && !(self.single_use && r.used)
    }

    /// Removes a queued caller (it gave up). False if it was not queued,
    /// meaning a slot was already handed to it.
    pub(crate) fn cancel(&mut self, waiter: WaiterId) -> bool {
        match self.waiters.iter().position(|w| *w == waiter) {
            Some(i) => {
                self.waiters.remove(i);
                true
            }
            None => false,
        }
    }

    /// Returns a slot. If a caller is queued and the runner still takes work,
    /// the slot goes straight to it.
    pub(crate) fn checkin(&mut self, runner: &RunnerId) -> Option<(WaiterId, RunnerId)> {
        let single_use = self.single_use;
        let r = self.runners.get_mut(runner)?;
        r.load = r.load.saturating_sub(1);
        if single_use {
            // Its one call is done; the runner stops on its own.
            r.state = RunnerState::Draining;
            return None;
        }
        if r.state == RunnerState::Ready && r.load < self.max_concurrency {
            if let Some(w) = self.waiters.pop_front() {
                r.load += 1;
                return Some((w, runner.clone()));
            }
        }
        None
    }

    /// Records a runner being booted.
    pub(crate) fn add_booting(&mut self, runner: RunnerId) {
        self.runners.insert(
            runner,
            Runner {
                state: RunnerState::Booting,
                load: 0,
                used: false,
                others: 0,
            },
        );
    }

    /// A booting runner reported ready: it takes queued callers, oldest
    /// first, up to its concurrency. `None` when the runner is unknown (it was
    /// given up on).
    pub(crate) fn runner_ready(&mut self, runner: &RunnerId) -> Option<Vec<(WaiterId, RunnerId)>> {
        let r = self.runners.get_mut(runner)?;
        if r.state != RunnerState::Booting {
            return Some(Vec::new());
        }
        r.state = RunnerState::Ready;
        let mut handed = Vec::new();
        while r.load < self.max_concurrency && !(self.single_use && r.used) {
            let Some(w) = self.waiters.pop_front() else {
                break;
            };
            r.load += 1;
            r.used = true;
            handed.push((w, runner.clone()));
        }
        Some(handed)
    }

    /// Records how many calls a shared pool's runner runs or queues in all,
    /// as its lease says; the part that is not ours is other parents' work.
    pub(crate) fn set_reported_load(&mut self, runner: &RunnerId, total: usize) {
        if let Some(r) = self.runners.get_mut(runner) {
            r.others = total.saturating_sub(r.load);
        }
    }

    /// Stops placing work on a runner; it still counts against `max` until
    /// [`PoolModel::remove`].
    pub(crate) fn drain(&mut self, runner: &RunnerId) {
        if let Some(r) = self.runners.get_mut(runner) {
            r.state = RunnerState::Draining;
        }
    }

    /// Forgets a runner (exited, failed to boot, or given up on). Returns its
    /// state if it was known.
    pub(crate) fn remove(&mut self, runner: &RunnerId) -> Option<RunnerState> {
        self.runners.remove(runner).map(|r| r.state)
    }

    /// How many runners to boot now: enough to keep `min` up and to cover
    /// the queued callers that the runners already booting will not serve,
    /// never past `max`.
    pub(crate) fn boots_needed(&self) -> usize {
        let booting = self.count(RunnerState::Booting);
        let ready = self.count(RunnerState::Ready);
        let total = self.runners.len();
        let min = if self.min_suspended { 0 } else { self.min };
        let for_min = min.saturating_sub(booting + ready);
        let uncovered = self
            .waiters
            .len()
            .saturating_sub(booting * self.max_concurrency);
        let for_demand = uncovered.div_ceil(self.max_concurrency);
        let ahead = self.hot_start.is_some_and(|percent| {
            let capacity = ready * self.max_concurrency;
            let busy: usize = self
                .runners
                .values()
                .filter(|r| r.state == RunnerState::Ready)
                .map(|r| r.load + r.others)
                .sum::<usize>()
                + self.waiters.len();
            booting == 0 && capacity > 0 && busy * 100 >= capacity * percent as usize
        });
        for_min
            .max(for_demand)
            .max(usize::from(ahead))
            .min(self.max.saturating_sub(total))
    }

    /// A runner idle for `idle_for` asks to stop. Granted (and the runner
    /// marked draining) when the parent has no work on it, no caller is
    /// waiting, and either more than `min` runners are ready or the runner
    /// has been idle past `min_idle_shutdown_after`.
    pub(crate) fn may_leave(
        &mut self,
        runner: &RunnerId,
        idle_for: Duration,
        min_idle_shutdown_after: Option<Duration>,
    ) -> bool {
        let ready = self.count(RunnerState::Ready);
        let waiting = !self.waiters.is_empty();
        let Some(r) = self.runners.get_mut(runner) else {
            // Unknown to this parent: nothing of ours runs there.
            return true;
        };
        if r.state == RunnerState::Draining {
            return true;
        }
        if r.load > 0 || waiting || r.state != RunnerState::Ready {
            // (A waiting caller means every runner is full or booting; a
            // runner that could serve it would have been handed it.)
            return false;
        }
        let beyond_min = ready > self.min;
        let min_idle_over = min_idle_shutdown_after.is_some_and(|d| idle_for >= d);
        if beyond_min || min_idle_over {
            r.state = RunnerState::Draining;
            if !beyond_min {
                // Not replaced until there is work again.
                self.min_suspended = true;
            }
            true
        } else {
            false
        }
    }

    /// Changes `min` and `max` of a live pool.
    pub(crate) fn set_limits(&mut self, min: usize, max: usize) {
        self.min = min;
        self.max = max;
        self.min_suspended = false;
    }

    /// Picks the ready runners to retire so that no more than `max` remain,
    /// idle ones first, and marks them draining (they finish their work and
    /// take no more). Runners still booting are not retired: they count
    /// until they are ready and then serve as usual.
    pub(crate) fn retire_surplus(&mut self) -> Vec<RunnerId> {
        let live = self
            .runners
            .values()
            .filter(|r| r.state != RunnerState::Draining)
            .count();
        let mut ready: Vec<_> = self
            .runners
            .iter()
            .filter(|(_, r)| r.state == RunnerState::Ready)
            .map(|(id, r)| (r.load, id.clone()))
            .collect();
        ready.sort();
        let retire: Vec<RunnerId> = ready
            .into_iter()
            .take(live.saturating_sub(self.max))
            .map(|(_, id)| id)
            .collect();
        for id in &retire {
            self.drain(id);
        }
        retire
    }

    /// The current `min` and `max`.
    pub(crate) fn limits(&self) -> (usize, usize) {
        (self.min, self.max)
    }

    /// Number of runners in a state.
    pub(crate) fn count(&self, state: RunnerState) -> usize {
        self.runners.values().filter(|r| r.state == state).count()
    }

    /// Runners known, in any state.
    pub(crate) fn len(&self) -> usize {
        self.runners.len()
    }

    /// Callers waiting for a slot.
    pub(crate) fn waiting(&self) -> usize {
        self.waiters.len()
    }

    /// The numbers pool events report: runners, ready, load, waiting.
    pub(crate) fn counts(&self) -> crate::ops::Counts {
        crate::ops::Counts {
            runners: self.runners.len(),
            ready: self.count(RunnerState::Ready),
            load: self.runners.values().map(|r| r.load).sum(),
            waiting: self.waiters.len(),
        }
    }

    /// State and load of a runner.
    pub(crate) fn runner(&self, runner: &RunnerId) -> Option<(RunnerState, usize)> {
        self.runners.get(runner).map(|r| (r.state, r.load))
    }
}

#[cfg(test)]
mod tests;
