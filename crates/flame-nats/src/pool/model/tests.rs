//! Tests of the placement rules.

use super::*;

fn id(s: &str) -> RunnerId {
    Arc::from(s)
}

#[test]
fn counts_sum_the_load_of_every_runner() {
    let mut m = PoolModel::new(0, 3, 2);
    for r in ["a", "b", "c"] {
        m.add_booting(id(r));
    }
    m.runner_ready(&id("a")).unwrap();
    m.runner_ready(&id("b")).unwrap();
    for w in 0..5 {
        m.checkout(w);
    }
    let c = m.counts();
    assert_eq!((c.runners, c.ready, c.load, c.waiting), (3, 2, 4, 1));
}

#[test]
fn empty_pool_queues_and_wants_one_boot() {
    let mut m = PoolModel::new(0, 3, 2);
    assert_eq!(m.checkout(1), Checkout::Queued);
    assert_eq!(m.boots_needed(), 1);
    m.add_booting(id("a"));
    // A second caller is covered by the capacity already booting.
    assert_eq!(m.checkout(2), Checkout::Queued);
    assert_eq!(m.boots_needed(), 0);
    // A third is not.
    assert_eq!(m.checkout(3), Checkout::Queued);
    assert_eq!(m.boots_needed(), 1);
    let handed = m.runner_ready(&id("a")).unwrap();
    assert_eq!(handed, vec![(1, id("a")), (2, id("a"))]);
    assert_eq!(m.waiting(), 1);
}

#[test]
fn places_on_least_loaded_and_hands_freed_slots_fifo() {
    let mut m = PoolModel::new(0, 2, 2);
    for r in ["a", "b"] {
        m.add_booting(id(r));
        m.runner_ready(&id(r)).unwrap();
    }
    assert_eq!(m.checkout(1), Checkout::Placed(id("a")));
    assert_eq!(m.checkout(2), Checkout::Placed(id("b")));
    assert_eq!(m.checkout(3), Checkout::Placed(id("a")));
    assert_eq!(m.checkout(4), Checkout::Placed(id("b")));
    assert_eq!(m.checkout(5), Checkout::Queued);
    assert_eq!(m.checkout(6), Checkout::Queued);
    assert_eq!(m.boots_needed(), 0, "at max");
    assert!(m.cancel(6));
    assert!(!m.cancel(6));
    assert_eq!(m.checkin(&id("b")), Some((5, id("b"))));
    assert_eq!(m.checkin(&id("b")), None);
    assert_eq!(m.runner(&id("b")), Some((RunnerState::Ready, 1)));
}

#[test]
fn hot_start_boots_one_runner_ahead_of_demand() {
    let mut m = PoolModel::new(0, 3, 4).hot_start(Some(50));
    m.add_booting(id("a"));
    m.runner_ready(&id("a"));
    assert_eq!(m.checkout(1), Checkout::Placed(id("a")));
    assert_eq!(m.boots_needed(), 0, "a quarter busy");
    assert_eq!(m.checkout(2), Checkout::Placed(id("a")));
    assert_eq!(m.boots_needed(), 1, "half busy: one ahead");
    m.add_booting(id("b"));
    assert_eq!(m.checkout(3), Checkout::Placed(id("a")));
    assert_eq!(m.boots_needed(), 0, "one is booting already");
    // Off by default.
    let mut plain = PoolModel::new(0, 3, 4);
    plain.add_booting(id("a"));
    plain.runner_ready(&id("a"));
    for w in 0..4 {
        plain.checkout(w);
    }
    assert_eq!(plain.boots_needed(), 0);
}

#[test]
fn never_boots_past_max_and_keeps_min() {
    let mut m = PoolModel::new(2, 3, 1);
    assert_eq!(m.boots_needed(), 2);
    m.add_booting(id("a"));
    m.add_booting(id("b"));
    assert_eq!(m.boots_needed(), 0);
    for w in 0..10 {
        m.checkout(w);
    }
    assert_eq!(m.boots_needed(), 1);
    m.add_booting(id("c"));
    assert_eq!(m.boots_needed(), 0);
    // A runner that dies is replaced to keep min (and demand).
    m.remove(&id("a"));
    assert_eq!(m.boots_needed(), 1);
}

#[test]
fn draining_counts_against_max_but_takes_no_work() {
    let mut m = PoolModel::new(0, 1, 1);
    m.add_booting(id("a"));
    m.runner_ready(&id("a")).unwrap();
    assert!(m.may_leave(&id("a"), Duration::from_secs(1), None));
    assert_eq!(m.checkout(1), Checkout::Queued);
    assert_eq!(m.boots_needed(), 0);
    m.remove(&id("a"));
    assert_eq!(m.boots_needed(), 1);
}

#[test]
fn reported_load_of_other_parents_steers_placement() {
    let mut m = PoolModel::new(0, 2, 4);
    for r in ["a", "b"] {
        m.add_booting(id(r));
        m.runner_ready(&id(r)).unwrap();
    }
    // "a" is busy with other parents' calls: prefer "b".
    m.set_reported_load(&id("a"), 3);
    assert_eq!(m.checkout(1), Checkout::Placed(id("b")));
    // Reports never hold a caller back: "a" still takes work when "b"
    // is full.
    m.set_reported_load(&id("a"), 4);
    for w in 2..5 {
        assert_eq!(m.checkout(w), Checkout::Placed(id("b")));
    }
    assert_eq!(m.checkout(5), Checkout::Placed(id("a")));
}

#[test]
fn single_use_runner_takes_one_call_then_drains() {
    let mut m = PoolModel::new(0, 2, 5).single_use();
    assert_eq!(m.checkout(1), Checkout::Queued);
    assert_eq!(m.checkout(2), Checkout::Queued);
    assert_eq!(m.boots_needed(), 2, "one runner per call");
    m.add_booting(id("a"));
    assert_eq!(m.runner_ready(&id("a")).unwrap(), vec![(1, id("a"))]);
    assert_eq!(m.checkin(&id("a")), None, "not handed on");
    assert_eq!(m.runner(&id("a")), Some((RunnerState::Draining, 0)));
    assert_eq!(m.checkout(3), Checkout::Queued);
}

#[test]
fn lowering_max_retires_idle_runners_first() {
    let mut m = PoolModel::new(0, 3, 1);
    for r in ["a", "b", "c"] {
        m.add_booting(id(r));
        m.runner_ready(&id(r)).unwrap();
    }
    assert_eq!(m.checkout(1), Checkout::Placed(id("a")));
    m.set_limits(0, 1);
    assert_eq!(m.retire_surplus(), vec![id("b"), id("c")]);
    assert_eq!(m.count(RunnerState::Draining), 2);
    assert_eq!(m.retire_surplus(), Vec::<RunnerId>::new(), "idempotent");
    // Raising min boots again, up to the new max.
    m.remove(&id("b"));
    m.remove(&id("c"));
    m.set_limits(3, 4);
    assert_eq!(m.boots_needed(), 2);
    assert_eq!(m.limits(), (3, 4));
}

#[test]
fn leave_is_refused_for_busy_and_min_runners() {
    let mut m = PoolModel::new(1, 2, 1);
    for r in ["a", "b"] {
        m.add_booting(id(r));
        m.runner_ready(&id(r)).unwrap();
    }
    assert_eq!(m.checkout(1), Checkout::Placed(id("a")));
    assert!(!m.may_leave(&id("a"), Duration::from_secs(9), None), "busy");
    assert!(
        m.may_leave(&id("b"), Duration::from_secs(9), None),
        "beyond min"
    );
    m.checkin(&id("a"));
    assert!(
        !m.may_leave(&id("a"), Duration::from_secs(9), None),
        "the min runner"
    );
    assert!(m.may_leave(
        &id("a"),
        Duration::from_secs(9),
        Some(Duration::from_secs(5))
    ));
    assert!(
        m.may_leave(&id("zzz"), Duration::ZERO, None),
        "unknown runner"
    );
    // The min runner left after min_idle_shutdown_after: not replaced
    // until the next call.
    m.remove(&id("a"));
    m.remove(&id("b"));
    assert_eq!(m.boots_needed(), 0);
    assert_eq!(m.checkout(2), Checkout::Queued);
    assert_eq!(m.boots_needed(), 1);
}
