//! The atomics the physical queue model shares between threads: loom's under `--cfg loom` so
//! `make loom` can explore every interleaving and weak-memory outcome of the PROD/CONS protocol,
//! std's otherwise. Memory another process maps (the guest rings) always uses std atomics over
//! raw memory and does not go through here: loom cannot model such memory.

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
#[cfg(loom)]
pub use loom::sync::Arc;

#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub use std::sync::Arc;
