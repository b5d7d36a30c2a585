//! The atomics the physical queue model shares between threads: loom's under `--cfg loom` so
//! `make loom` can explore every interleaving and weak-memory outcome of the PROD/CONS protocol,
//! std's otherwise. Memory another process maps (the guest rings) always uses std atomics over
//! raw memory and does not go through here: loom cannot model such memory. [`lock`] takes a
//! std mutex whatever a panicking holder left; [`Backoff`] is how every busy-wait passes time.

use std::time::Duration;

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
#[cfg(loom)]
pub use loom::sync::Arc;

#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub use std::sync::Arc;

/// Locks `m`, whether or not a thread panicked while holding it. Every mutex the engine and its
/// tools lock through here guards state that each critical section leaves whole (one insert or
/// remove, a counter and a cursor), so a panic elsewhere does not make it unusable. Always std's
/// mutex: the loom models' locks are in `viommu::sync`.
pub fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a wait passes the time between looks at memory another thread moves: spin, then
/// yield, then sleep. The engine's idle workers, the guest side of a ring and the test and
/// bench drivers all wait with one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Looks with a spin-loop hint between them.
    pub spins: u32,
    /// Then looks with a `yield_now` between them.
    pub yields: u32,
    /// Then this long asleep between looks.
    pub sleep: Duration,
}

impl Backoff {
    /// Spin a little, then yield forever: [`crate::ring::GuestRing`]'s own waits; for a guest
    /// with a core of its own.
    pub const SPIN_THEN_YIELD: Backoff = Backoff {
        spins: 64,
        yields: u32::MAX,
        sleep: Duration::ZERO,
    };
    /// Spin, yield, then sleep 20 µs: many guests on few cores, where guests that only yield
    /// starve the engine's workers.
    pub const SHARED_CORES: Backoff = Backoff {
        spins: 32,
        yields: 32,
        sleep: Duration::from_micros(20),
    };

    /// Waits once, the `n`-th time in a row.
    pub fn pause(&self, n: u32) {
        if n < self.spins {
            std::hint::spin_loop();
        } else if n - self.spins < self.yields {
            std::thread::yield_now();
        } else {
            std::thread::sleep(self.sleep);
        }
    }
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::SPIN_THEN_YIELD
    }
}
