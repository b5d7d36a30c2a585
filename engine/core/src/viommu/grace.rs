//! The unbind barrier (rule 5): once `unset_dev_id` returns, no command translated through the
//! removed binding can still be published to the physical queue.
//!
//! An epoch-based grace period shared by every vIOMMU of one engine:
//! - each translating worker owns a registered [`Reader`], a cache-padded slot holding 0 when the
//!   worker is outside a batch, or the global epoch it saw when it entered one;
//! - a worker pins once per batch, *before* its first table lookup, and unpins after the batch
//!   has been published to the physical queue ([`Reader::pin`] returns a guard; publication
//!   happens while the guard lives);
//! - the unbinder removes the table entry, moves the global epoch to `E+1` and then waits, for
//!   each reader, until its slot is 0 (it left the batch, or was never in one) or holds an epoch
//!   `>= E+1` (it entered a new batch after the removal and so cannot have seen the old entry).
//!
//! A reader that keeps re-pinning cannot hold the unbinder forever: its next pin stores the new
//! epoch. A parked reader (slot 0) is never waited for.
//!
//! Memory ordering, the whole argument:
//! - Removal vs. pin is a store-buffer pattern (the unbinder stores the entry and loads the slot,
//!   the reader stores the slot and loads the entry) with a `SeqCst` fence on both sides, so at
//!   least one of them sees the other: either the unbinder sees the reader pinned and waits, or
//!   the reader's lookups see the removal.
//! - A reader that read epoch `E+1` read it from the unbinder's `fetch_add`, which is ordered
//!   after the removal; the reader's `SeqCst` fence after that load makes the removal visible to
//!   its lookups.
//! - The slot is written with `Release` (at pin and at unpin) and read with `Acquire`, so
//!   everything the reader published before the slot value the unbinder saw happens-before
//!   `synchronize` returns.
//!
//! Cost on the translating side: per batch, one relaxed load, one release store and one fence
//! at pin, one release store at unpin; nothing per command.

use super::sync::{fence, lock, Arc, AtomicU64, Mutex, Ordering, Wait};
use crossbeam_utils::CachePadded;

/// A slot value: the reader is outside any batch.
const IDLE: u64 = 0;

/// One reader's state, alone on its cache line so readers do not slow each other down.
struct Slot {
    state: CachePadded<AtomicU64>,
}

struct Shared {
    /// The global epoch; starts at 1 so that no pinned slot ever reads as [`IDLE`].
    epoch: AtomicU64,
    /// Every registered reader. Locked only to register, deregister and take a snapshot.
    readers: Mutex<Vec<Arc<Slot>>>,
}

/// The grace-period domain of one engine: the translating workers register in it, and unbinds
/// of every vIOMMU of the engine wait in it.
pub struct GraceDomain {
    shared: Arc<Shared>,
}

impl GraceDomain {
    /// A new domain with no readers.
    pub fn new() -> std::sync::Arc<GraceDomain> {
        std::sync::Arc::new(GraceDomain {
            shared: Arc::new(Shared {
                epoch: AtomicU64::new(1),
                readers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Registers a translating worker. The worker keeps the [`Reader`] for its lifetime and pins
    /// it around each batch; dropping it deregisters.
    pub fn register(&self) -> Reader {
        let slot = Arc::new(Slot {
            state: CachePadded::new(AtomicU64::new(IDLE)),
        });
        lock(&self.shared.readers).push(slot.clone());
        Reader {
            shared: self.shared.clone(),
            slot,
        }
    }

    /// Grace periods started so far, plus one. Tests only: it moves when an unbind has removed
    /// its entry and starts waiting, which lets a test see an unbind blocked in the barrier.
    #[doc(hidden)]
    pub fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Acquire)
    }

    /// Registered readers.
    pub fn readers(&self) -> usize {
        lock(&self.shared.readers).len()
    }

    /// Waits until every reader that may have seen the table as it was before this call has left
    /// the batch it was in. Call it after removing a binding: when it returns, every batch that
    /// could have used the binding has been published, and no later batch can use it.
    pub fn synchronize(&self) {
        let target = self.shared.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        // Pairs with the fence in `Reader::pin`: the caller's removal (before this call) and the
        // slot loads below form a store-buffer pattern with the reader's slot store and lookups.
        fence(Ordering::SeqCst);
        // A reader registered after this snapshot registered after the removal (the mutex orders
        // them), so its lookups already miss the removed entry.
        let readers: Vec<Arc<Slot>> = lock(&self.shared.readers).clone();
        for slot in &readers {
            let wait = Wait::new();
            loop {
                let s = slot.state.load(Ordering::Acquire);
                if s == IDLE || s >= target {
                    break;
                }
                wait.once();
            }
        }
    }
}

impl core::fmt::Debug for GraceDomain {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GraceDomain")
            .field("epoch", &self.shared.epoch.load(Ordering::Relaxed))
            .field("readers", &self.readers())
            .finish()
    }
}

/// One translating worker's membership in a [`GraceDomain`].
pub struct Reader {
    shared: Arc<Shared>,
    slot: Arc<Slot>,
}

impl Reader {
    /// Enters a batch. Look bindings up and publish the batch while the returned guard lives;
    /// dropping it leaves the batch. `&mut self` makes nested pins of one reader impossible.
    ///
    /// ```
    /// # use vcmdq::viommu::GraceDomain;
    /// let domain = GraceDomain::new();
    /// let mut reader = domain.register();
    /// let guard = reader.pin();
    /// // translate(...), then publish to the physical queue
    /// drop(guard);
    /// domain.synchronize(); // returns at once: nobody is inside a batch
    /// ```
    #[inline]
    pub fn pin(&mut self) -> Pinned<'_> {
        let epoch = self.shared.epoch.load(Ordering::Relaxed);
        self.slot.state.store(epoch, Ordering::Release);
        // Pairs with the fence in `synchronize`; see the module docs.
        fence(Ordering::SeqCst);
        Pinned { slot: &self.slot }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let mut readers = lock(&self.shared.readers);
        readers.retain(|s| !Arc::ptr_eq(s, &self.slot));
    }
}

impl core::fmt::Debug for Reader {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Reader")
            .field("state", &self.slot.state.load(Ordering::Relaxed))
            .finish()
    }
}

/// A reader inside a batch. Dropping it leaves the batch: do that only after the batch's
/// commands are in the physical queue.
#[must_use = "dropping the guard ends the batch; publish before dropping it"]
pub struct Pinned<'a> {
    slot: &'a Slot,
}

impl Drop for Pinned<'_> {
    #[inline]
    fn drop(&mut self) {
        // Release: the publication of the batch happens-before an unbinder's Acquire load of IDLE.
        self.slot.state.store(IDLE, Ordering::Release);
    }
}

impl core::fmt::Debug for Pinned<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Pinned")
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    #[test]
    fn synchronize_without_readers_returns() {
        let d = GraceDomain::new();
        d.synchronize();
        let r = d.register();
        assert_eq!(d.readers(), 1);
        d.synchronize();
        drop(r);
        assert_eq!(d.readers(), 0);
    }

    #[test]
    fn parked_reader_does_not_block() {
        let d = GraceDomain::new();
        let mut r = d.register();
        drop(r.pin());
        d.synchronize();
    }

    #[test]
    fn synchronize_waits_for_a_pinned_reader() {
        let d = GraceDomain::new();
        let mut r = d.register();
        let guard = r.pin();
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let t = {
            let (d, done) = (d.clone(), done.clone());
            std::thread::spawn(move || {
                d.synchronize();
                done.store(true, Ordering::SeqCst);
            })
        };
        // Not a timing assertion: whatever the delay, the unbinder must still be waiting while
        // the guard lives; it can only finish after the drop.
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !done.load(Ordering::SeqCst),
            "synchronize returned under a pin"
        );
        drop(guard);
        t.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
    }

    #[test]
    fn repinning_reader_does_not_starve_synchronize() {
        let d = GraceDomain::new();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let mut r = d.register();
        let t = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // Never idle for long: unpin and re-pin immediately.
                while !stop.load(Ordering::Relaxed) {
                    let _g = r.pin();
                    std::hint::spin_loop();
                }
            })
        };
        for _ in 0..100 {
            d.synchronize();
        }
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
    }

    #[test]
    fn dropped_reader_is_forgotten() {
        let d = GraceDomain::new();
        let a = d.register();
        let b = d.register();
        drop(a);
        assert_eq!(d.readers(), 1);
        drop(b);
        assert_eq!(d.readers(), 0);
    }
}
