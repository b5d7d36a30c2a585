//! An idle worker sleeps on its rings' SLEEPING words, and what must wake it does: a guest's
//! kick, a control-plane message (attach, detach, shutdown), and, for a guest that never kicks,
//! the sleep timeout. Timings are never asserted: a sleep timeout of an hour makes "served
//! within the test's bound" mean "woken by the kick", whatever the machine's load.
#![cfg(not(loom))]

mod common;

use std::time::Duration;

use common::{c, join_named, TestEngine, T};
use vcmdq::command::{opcode, RawCommand};
use vcmdq::engine::{EngineConfig, RingId};
use vcmdq::ring::{heap_pair, GuestRing};
use vcmdq::viommu::{DeviceId, ViommuConfig};

/// Longer than any test runs: a worker that gets past a sleep did not get there by its timeout.
const NEVER: Duration = Duration::from_secs(3600);

const SYNC: RawCommand = RawCommand::new(opcode::CMD_SYNC as u64, 0);

/// An engine of one worker sleeping at most `sleep_timeout`, with vIOMMU 1 and one ring on it.
fn engine(sleep_timeout: Duration) -> (TestEngine, GuestRing, RingId) {
    let e = TestEngine::start(EngineConfig {
        sleep_timeout,
        ..Default::default()
    });
    e.create_viommu(ViommuConfig::new(1, 5, 0)).unwrap();
    let (guest, ring) = ring(&e);
    (e, guest, ring)
}

fn ring(e: &TestEngine) -> (GuestRing, RingId) {
    let (guest, host) = heap_pair(4, 1).unwrap();
    let id = e.attach_ring(host).unwrap();
    (guest, id)
}

/// Waits until the worker has announced on `guest`'s ring that it sleeps. SLEEPING = 1 also
/// means the worker holds the ring: it sets the word only on rings it serves.
fn until_asleep(e: &TestEngine, guest: &GuestRing, what: &str) {
    e.until(
        &format!("{what}: the idle worker announces SLEEPING = 1"),
        || guest.engine_sleeping(),
    );
}

#[test]
fn an_idle_worker_sleeps_and_a_guests_kick_wakes_it() {
    let (e, mut guest, _) = engine(NEVER);
    for round in 1..=20u64 {
        until_asleep(&e, &guest, &format!("round {round}"));
        // Give the worker time to get from its announcement into the futex wait, so that most
        // rounds test the kick rather than the re-check (which a round may still hit: fine).
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(guest.submit(&[SYNC]), 1);
        guest.wait_syncs(round, T).unwrap_or_else(|err| {
            panic!(
                "round {round}: a guest's kick did not wake the sleeping worker (its sleep \
                 timeout is an hour): {err}"
            )
        });
    }
    let s = e.stats();
    assert_eq!(
        s.sleep_timeouts, 0,
        "no sleep of an hour ended on its timeout"
    );
    assert!(
        s.sleeps >= 1,
        "the worker slept and was woken at least once in 20 rounds: {s:?}"
    );
    let s = e.shutdown().stats;
    assert_eq!(s.sleep_timeouts, 0);
}

#[test]
fn a_guest_that_does_not_kick_is_served_after_the_sleep_timeout() {
    let (e, mut guest, _) = engine(Duration::from_millis(20));
    until_asleep(&e, &guest, "before the guest writes");
    assert_eq!(guest.push(&[SYNC]), 1);
    guest.doorbell_without_kick();
    guest.wait_syncs(1, T).unwrap_or_else(|err| {
        panic!("a guest that moved PROD without the kick was never served: {err}")
    });
    e.until("a sleep that ended on its timeout is counted", || {
        e.stats().sleep_timeouts >= 1
    });
    e.shutdown();
}

#[test]
fn attach_and_detach_wake_a_sleeping_worker() {
    let (e, guest, id) = engine(NEVER);
    until_asleep(&e, &guest, "before the detach");
    // The worker sleeps; only the control plane's kick lets it see the detach.
    let host = e.detach_ring(id, T).unwrap_or_else(|err| {
        panic!("detaching a ring of a sleeping worker did not finish (no wake-up?): {err}")
    });
    assert!(
        !guest.engine_sleeping(),
        "a ring given back by the engine asks for no kick"
    );
    drop(host);
    // The worker now sleeps with no ring at all: the attach alone must wake it.
    let (mut second, _) = ring(&e);
    until_asleep(
        &e,
        &second,
        "a ring attached to a worker asleep with no ring",
    );
    assert_eq!(second.submit(&[SYNC]), 1);
    second
        .wait_syncs(1, T)
        .unwrap_or_else(|err| panic!("the ring attached while the worker slept: {err}"));
    assert_eq!(e.stats().sleep_timeouts, 0);
    e.shutdown();
}

#[test]
fn shutdown_wakes_a_sleeping_worker() {
    let (e, guest, _) = engine(NEVER);
    until_asleep(&e, &guest, "before the shutdown");
    // TestEngine::shutdown fails the test if the engine does not stop within T.
    let report = e.shutdown();
    assert_eq!(report.stats.sleep_timeouts, 0);
    assert!(
        !guest.engine_sleeping(),
        "a stopped engine leaves its rings asking for no kick"
    );
}

#[test]
fn an_engine_with_no_ring_sleeps_and_stops() {
    let e = TestEngine::start(EngineConfig {
        sleep_timeout: NEVER,
        workers: 2,
        ..Default::default()
    });
    e.create_viommu(ViommuConfig::new(1, 5, 0)).unwrap();
    // Nothing shows that a worker with no ring sleeps: give it the time to (50 us of spinning),
    // so that the attach below has a sleeping worker to wake in all but a starved run.
    std::thread::sleep(Duration::from_millis(20));
    let (mut guest, _) = ring(&e);
    assert_eq!(guest.submit(&[SYNC]), 1);
    guest.wait_syncs(1, T).unwrap_or_else(|err| {
        panic!("a ring attached to a worker asleep with no ring was never served: {err}")
    });
    // Both workers sleep for an hour unless the shutdown wakes them.
    let report = e.shutdown();
    assert_eq!(report.stats.sleep_timeouts, 0);
}

#[test]
fn a_trap_wakes_a_control_plane_waiting_for_one() {
    let (e, mut guest, id) = engine(NEVER);
    e.devices().add_device(DeviceId(1), 0, 0x800).unwrap();
    e.viommu(1)
        .expect("vIOMMU 1")
        .set_dev_id(DeviceId(1), 0x10)
        .unwrap();
    assert!(
        !e.wait_for_trap(Duration::from_millis(1)),
        "no trap yet: the wait ends on its timeout"
    );
    let ste = c("CFGI_STE sid=0x10 leaf");
    std::thread::scope(|s| {
        // Far longer than T, so that a wait that ends within T was woken; yet bounded, since a
        // scope joins its threads even when the test fails.
        let waiter = s.spawn(|| e.wait_for_trap(3 * T));
        // Most runs get the waiter asleep first; a run that does not still checks the result.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(guest.submit(&[ste, SYNC]), 2);
        let woken = join_named(
            "a control plane waiting 30 s for a trap (the worker's kick must wake it)",
            T,
            waiter,
        );
        assert!(woken, "the wait ended with a trap waiting");
    });
    let trap = e.next_trap().expect("the trap the wait announced");
    assert_eq!((trap.ring, trap.cmd), (id, ste));
    e.complete_trap(id).unwrap();
    guest.wait_syncs(1, T).unwrap();
    e.shutdown();
}
