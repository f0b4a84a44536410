//! The scaler's decisions for a shared pool: how many runners to boot and
//! which to retire, from the leases in the KV bucket. Pure, like
//! the placement model of a private pool, so the rules are unit-tested here.

use std::time::Duration;

use crate::protocol::lease::{LeaseState, RunnerLease};

/// Limits and timings the scaler works with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ScalingRules {
    /// Runners kept up.
    pub(super) min: usize,
    /// Runners booted or booting, at most.
    pub(super) max: usize,
    /// Calls per runner.
    pub(super) max_concurrency: usize,
    /// A runner idle this long beyond `min` is retired.
    pub(super) idle_shutdown_after: Duration,
    /// The same for the `min` runners; `None` keeps them.
    pub(super) min_idle_shutdown_after: Option<Duration>,
    /// Boot one more runner once the ready ones are this busy (percent).
    pub(super) hot_start_percent: Option<u8>,
}

/// What the scaler should do now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Plan {
    /// Runners to boot.
    pub(super) boot: usize,
    /// Runners to retire (idle ones beyond `min`).
    pub(super) retire: Vec<String>,
}

/// Decides boots and retirements.
///
/// `runners` are the live leases, `slots` how many runners count against
/// `max` (draining ones included), `waiting` the callers all parents have
/// queued. Callers queued on a runner count as demand too.
pub(super) fn plan(
    rules: &ScalingRules,
    runners: &[RunnerLease],
    slots: usize,
    waiting: usize,
) -> Plan {
    let mc = rules.max_concurrency.max(1);
    let booting = count(runners, LeaseState::Booting);
    let ready = count(runners, LeaseState::Ready);
    let demand = waiting
        + runners
            .iter()
            .filter(|r| r.state == LeaseState::Ready)
            .map(|r| r.queued)
            .sum::<usize>();
    let for_min = rules.min.saturating_sub(booting + ready);
    let for_demand = demand.saturating_sub(booting * mc).div_ceil(mc);
    let room = rules.max.saturating_sub(slots.max(runners.len()));
    let ahead = rules.hot_start_percent.is_some_and(|percent| {
        let capacity = ready * mc;
        let busy: usize = runners
            .iter()
            .filter(|r| r.state == LeaseState::Ready)
            .map(|r| r.load + r.queued)
            .sum::<usize>()
            + waiting;
        booting == 0 && capacity > 0 && busy * 100 >= capacity * percent as usize
    });
    let boot = for_min.max(for_demand).max(usize::from(ahead)).min(room);

    let mut retire = Vec::new();
    if demand == 0 && boot == 0 {
        let mut idle: Vec<&RunnerLease> = runners
            .iter()
            .filter(|r| {
                r.state == LeaseState::Ready
                    && r.load == 0
                    && r.queued == 0
                    && Duration::from_millis(r.idle_ms) >= rules.idle_shutdown_after
            })
            .collect();
        // Longest idle first; ties by id so every scaler picks the same.
        idle.sort_by(|a, b| b.idle_ms.cmp(&a.idle_ms).then(a.runner.cmp(&b.runner)));
        let mut left = ready;
        for r in idle {
            let beyond_min = left > rules.min;
            let min_idle_over = rules
                .min_idle_shutdown_after
                .is_some_and(|d| Duration::from_millis(r.idle_ms) >= d);
            if beyond_min || min_idle_over {
                retire.push(r.runner.clone());
                left -= 1;
            }
        }
    }
    Plan { boot, retire }
}

fn count(runners: &[RunnerLease], state: LeaseState) -> usize {
    runners.iter().filter(|r| r.state == state).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: &str, state: LeaseState, load: usize, idle_ms: u64) -> RunnerLease {
        RunnerLease {
            runner: id.into(),
            pool: "p".into(),
            state,
            build: "b".into(),
            capacity: 2,
            load,
            queued: 0,
            idle_ms,
            handle: String::new(),
            booted_by: "x".into(),
            beat: 0,
            outages: 0,
            outage_ms: 0,
            since_outage_ms: 0,
            boot_failure: None,
            boot_failure_permanent: false,
        }
    }

    fn rules(min: usize, max: usize) -> ScalingRules {
        ScalingRules {
            min,
            max,
            max_concurrency: 2,
            idle_shutdown_after: Duration::from_secs(1),
            min_idle_shutdown_after: None,
            hot_start_percent: None,
        }
    }

    #[test]
    fn boots_for_min_and_for_demand_never_past_max() {
        assert_eq!(plan(&rules(2, 4), &[], 0, 0).boot, 2);
        // Five callers, two slots each: three runners.
        assert_eq!(plan(&rules(0, 4), &[], 0, 5).boot, 3);
        // Capacity already booting covers the demand.
        let booting = [lease("a", LeaseState::Booting, 0, 0)];
        assert_eq!(plan(&rules(0, 4), &booting, 1, 2).boot, 0);
        assert_eq!(plan(&rules(0, 4), &booting, 1, 3).boot, 1);
        // Never past max, counting slots of runners without a lease yet.
        assert_eq!(plan(&rules(0, 2), &booting, 2, 100).boot, 0);
        assert_eq!(plan(&rules(0, 3), &booting, 1, 100).boot, 2);
    }

    #[test]
    fn hot_start_boots_one_ahead_of_demand() {
        let mut r = rules(0, 3);
        r.hot_start_percent = Some(50);
        let one = [lease("a", LeaseState::Ready, 1, 0)];
        // Half of two slots busy: one more runner, though nobody waits.
        assert_eq!(plan(&r, &one, 1, 0).boot, 1);
        assert_eq!(plan(&rules(0, 3), &one, 1, 0).boot, 0);
        // Less busy, or a runner already booting, or no room: none.
        let idle = [lease("a", LeaseState::Ready, 0, 0)];
        assert_eq!(plan(&r, &idle, 1, 0).boot, 0);
        let booting = [
            lease("a", LeaseState::Ready, 2, 0),
            lease("b", LeaseState::Booting, 0, 0),
        ];
        assert_eq!(plan(&r, &booting, 2, 0).boot, 0);
        assert_eq!(plan(&r, &one, 3, 0).boot, 0);
    }

    #[test]
    fn callers_queued_on_runners_are_demand() {
        let mut busy = lease("a", LeaseState::Ready, 2, 0);
        busy.queued = 3;
        assert_eq!(plan(&rules(0, 4), &[busy], 1, 0).boot, 2);
    }

    #[test]
    fn retires_idle_runners_beyond_min_longest_idle_first() {
        let runners = [
            lease("a", LeaseState::Ready, 0, 5_000),
            lease("b", LeaseState::Ready, 0, 9_000),
            lease("c", LeaseState::Ready, 1, 0),
            lease("d", LeaseState::Ready, 0, 500),
        ];
        let p = plan(&rules(2, 4), &runners, 4, 0);
        assert_eq!(p.boot, 0);
        assert_eq!(p.retire, vec!["b".to_string(), "a".to_string()]);
        // Nothing is retired while callers wait.
        assert!(plan(&rules(0, 4), &runners, 4, 1).retire.is_empty());
        // min_idle_shutdown_after lets the min runners go too.
        let mut r = rules(2, 4);
        r.min_idle_shutdown_after = Some(Duration::from_secs(4));
        assert_eq!(
            plan(&r, &runners, 4, 0).retire,
            vec!["b".to_string(), "a".to_string()]
        );
        r.min = 4;
        assert_eq!(
            plan(&r, &runners, 4, 0).retire,
            vec!["b".to_string(), "a".to_string()]
        );
    }
}
