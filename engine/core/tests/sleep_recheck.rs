//! The lost-wakeup window of the sleep protocol, forced: a guest that loaded SLEEPING = 0 just
//! before the worker announced its sleep moves PROD without a kick. The worker's re-check after
//! its announcement must find that PROD, or it sleeps (here for an hour) with work in its ring.
//! Alone in its binary: the hook it installs is process-wide.
#![cfg(not(loom))]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestEngine, T};
use vcmdq::command::{opcode, RawCommand};
use vcmdq::engine::{hooks, EngineConfig};
use vcmdq::ring::heap_pair;
use vcmdq::viommu::ViommuConfig;

const SYNC: RawCommand = RawCommand::new(opcode::CMD_SYNC as u64, 0);

/// Removes the hook when the test ends, failed or not.
struct Unhook;

impl Drop for Unhook {
    fn drop(&mut self) {
        hooks::set_before_recheck(None);
    }
}

#[test]
fn a_prod_moved_without_a_kick_between_announcement_and_recheck_is_served() {
    let e = TestEngine::start(EngineConfig {
        sleep_timeout: Duration::from_secs(3600),
        ..Default::default()
    });
    e.create_viommu(ViommuConfig::new(1, 5, 0)).unwrap();
    let (guest, host) = heap_pair(4, 1).unwrap();
    e.attach_ring(host).unwrap();
    let guest = Arc::new(Mutex::new(guest));
    e.until("the idle worker announces SLEEPING = 1", || {
        guest.lock().unwrap().engine_sleeping()
    });

    let armed = Arc::new(AtomicBool::new(false));
    let _unhook = Unhook;
    {
        let (guest, armed) = (guest.clone(), armed.clone());
        hooks::set_before_recheck(Some(Box::new(move || {
            if armed.swap(false, Ordering::AcqRel) {
                let mut g = guest.lock().unwrap();
                assert_eq!(g.push(&[SYNC]), 1);
                g.doorbell_without_kick();
            }
        })));
    }
    armed.store(true, Ordering::Release);
    // The worker sleeps; a kicked command wakes it, and its next announcement runs the hook.
    assert_eq!(guest.lock().unwrap().submit(&[SYNC]), 1);
    guest
        .lock()
        .unwrap()
        .wait_syncs(1, T)
        .unwrap_or_else(|err| panic!("the kicked command: {err}"));
    e.until(
        "the worker announces its sleep again and runs the hook",
        || !armed.load(Ordering::Acquire),
    );
    let g = guest.lock().unwrap();
    g.wait_syncs(2, T).unwrap_or_else(|err| {
        panic!(
            "a PROD moved without a kick after the worker announced its sleep was not found by \
             its re-check (the worker sleeps an hour): {err}"
        )
    });
    let s = e.stats();
    assert!(s.sleep_rechecks >= 1, "the re-check found the work: {s:?}");
    assert_eq!(s.sleep_timeouts, 0);
    drop(g);
    e.shutdown();
}
