//! The atomics the physical queue model shares between threads: loom's under `--cfg loom` so
//! `make loom` can explore every interleaving and weak-memory outcome of the PROD/CONS protocol,
//! std's otherwise. Memory another process maps (the guest rings) always uses std atomics over
//! raw memory and does not go through here: loom cannot model such memory. [`lock`] takes a
//! std mutex whatever a panicking holder left.

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
