//! loom model of the sleep protocol's handshake (`ring::wake`, `engine::worker::Worker::sleep`):
//! no lost wake-up. Run with `make loom`.
//!
//! The guest stores PROD (Release), runs a SeqCst fence and loads SLEEPING; if it finds 1 it
//! swaps it to 0 and wakes the futex. The worker stores SLEEPING = 1, runs a SeqCst fence and
//! re-reads PROD; if that is the old PROD it sleeps in `futex_waitv`, which the kernel lets it
//! do only while SLEEPING still holds 1, and which a later FUTEX_WAKE ends. So a wake-up is lost
//! exactly when the worker's re-read sees the old PROD and the guest's load sees SLEEPING = 0:
//! the model asserts that this never happens. It is the store-buffering shape, which only the
//! two fences forbid: drop either and loom finds the execution.
//!
//! The ring's words live in memory another process maps and are std atomics in the engine;
//! here they are loom atomics with the orderings `GuestRing::doorbell`, `wake::kick` and
//! `Worker::sleep` use. The control plane's kick of a worker's own word (a message pushed,
//! then the same fence and load) has the same shape.
#![cfg(loom)]

use loom::sync::atomic::{fence, AtomicU32, Ordering};
use loom::sync::Arc;
use loom::thread;

#[test]
fn a_guest_that_moves_prod_either_is_seen_by_the_recheck_or_kicks() {
    loom::model(|| {
        let prod = Arc::new(AtomicU32::new(0));
        let sleeping = Arc::new(AtomicU32::new(0));
        let guest = {
            let (prod, sleeping) = (prod.clone(), sleeping.clone());
            thread::spawn(move || {
                // GuestRing::doorbell, then wake::kick.
                prod.store(1, Ordering::Release);
                fence(Ordering::SeqCst);
                sleeping.load(Ordering::Relaxed) != 0 && sleeping.swap(0, Ordering::SeqCst) != 0
            })
        };
        // Worker::sleep: the announcement, the fence, the re-check.
        sleeping.store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let recheck_saw_prod = prod.load(Ordering::Acquire) == 1;
        let kicked = guest.join().unwrap();
        assert!(
            recheck_saw_prod || kicked,
            "lost wake-up: the worker's re-check missed PROD and the guest did not kick"
        );
    });
}
