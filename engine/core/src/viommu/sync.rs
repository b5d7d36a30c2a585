//! The synchronisation primitives of the unbind barrier, from `std` normally and from `loom`
//! under `--cfg loom`, so the loom model in `tests/loom_grace.rs` checks the very code the engine
//! runs.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Mutex};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, Mutex};

/// Waits a little while another thread makes progress: a spin that backs off to yielding the
/// core. Under loom it yields to the model's scheduler, which is what lets loom explore a wait loop.
pub(crate) struct Wait {
    #[cfg(not(loom))]
    backoff: crossbeam_utils::Backoff,
}

impl Wait {
    pub(crate) fn new() -> Wait {
        Wait {
            #[cfg(not(loom))]
            backoff: crossbeam_utils::Backoff::new(),
        }
    }

    pub(crate) fn once(&self) {
        #[cfg(loom)]
        loom::thread::yield_now();
        #[cfg(not(loom))]
        if self.backoff.is_completed() {
            // A reader can be a vCPU the hypervisor has paused for milliseconds: stop burning
            // the core it may need.
            std::thread::yield_now();
        } else {
            self.backoff.snooze();
        }
    }
}

// Every structure guarded here is left consistent at every step, so a panic elsewhere while it
// was held does not stop the engine from using it.
#[cfg(not(loom))]
pub(crate) use crate::sync::lock;

/// Locks `m` whatever a panicking holder left (loom's mutex, for the models).
#[cfg(loom)]
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> loom::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
