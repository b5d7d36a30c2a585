//! Counters and the audit trail.

use crate::translate::SlotOutcome;
use crossbeam_utils::CachePadded;
use std::sync::atomic::{AtomicU64, Ordering};

use super::RingId;
use crate::queue::CError;

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// What the engine did, summed over workers.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct EngineStats {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl core::ops::AddAssign for EngineStats {
            fn add_assign(&mut self, o: EngineStats) {
                $(self.$name += o.$name;)*
            }
        }

        /// A worker's counters as the control plane reads them: written once per busy pass.
        #[derive(Default)]
        pub(super) struct Shared {
            $($name: CachePadded<AtomicU64>,)*
        }

        impl Shared {
            pub(super) fn load(&self) -> EngineStats {
                EngineStats { $($name: self.$name.load(Ordering::Relaxed),)* }
            }

            pub(super) fn store(&self, s: &EngineStats) {
                $(self.$name.store(s.$name, Ordering::Relaxed);)*
            }
        }
    };
}

counters! {
    /// Guest entries copied out of rings.
    taken,
    /// Guest commands forwarded to a physical queue.
    forwarded,
    /// Guest commands dropped by rule (PREFETCH_*).
    dropped,
    /// Guest commands handed to the control plane.
    trapped,
    /// Guest commands refused (the ring stopped with CONS.ERR).
    refused,
    /// Guest CMD_SYNCs completed.
    guest_syncs,
    /// Physical CMD_SYNCs the engine added.
    phys_syncs,
    /// Batches published.
    batches,
    /// Physical queue errors recovered.
    phys_faults,
    /// Physical commands taken back after a fault, to be forwarded again.
    retracted,
    /// Rings detached because their memory failed.
    ring_failures,
    /// Times a worker slept on its futexes (idle, every ring with a SLEEPING word).
    sleeps,
    /// Times a worker announced sleep and its re-check of every ring found work (a guest moved
    /// PROD before it could see SLEEPING = 1): the worker went on without sleeping.
    sleep_rechecks,
    /// Sleeps that ended on their timeout ([`SLEEP_TIMEOUT`](super::SLEEP_TIMEOUT)), not on a
    /// kick.
    sleep_timeouts,
}

/// How far the engine has got with one ring, for an observer on another thread (a load test):
/// the worker serving the ring stores it once per published batch, with no clock read and no
/// read-modify-write, so it costs the hot path one store. Get it with
/// [`Engine::ring_progress`](super::Engine::ring_progress).
#[derive(Debug, Default)]
pub struct RingProgress {
    published: CachePadded<AtomicU64>,
}

impl RingProgress {
    /// Entries of the ring, counted since attach, whose batch is in the physical queue: entry
    /// `seq` was forwarded (or dropped, or is a guest CMD_SYNC whose physical CMD_SYNC was
    /// queued) and published once `published() > seq`. Never goes back: entries read again
    /// after a stop or a physical fault count once.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    /// The worker's store after publishing a batch that ends before entry `end`.
    pub(super) fn advance(&self, end: u64) {
        // Single writer: a plain load and store, no read-modify-write. Release: an observer
        // that sees the count sees the batch in the physical queue.
        if end > self.published.load(Ordering::Relaxed) {
            self.published.store(end, Ordering::Release);
        }
    }
}

impl core::iter::Sum for EngineStats {
    fn sum<I: Iterator<Item = EngineStats>>(iter: I) -> Self {
        let mut t = EngineStats::default();
        for s in iter {
            t += s;
        }
        t
    }
}

/// One line of the audit trail. Sequence numbers count a ring's entries since it was attached;
/// times are nanoseconds since the engine started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditRecord {
    /// What became of the guest entry `seq`.
    Slot {
        /// The ring.
        ring: RingId,
        /// The entry.
        seq: u64,
        /// What became of it (a `Refused` slot stops the ring; it is read again after the ack).
        outcome: SlotOutcome,
    },
    /// Entries `first..end` of `ring` went to the physical queue at `t` (published).
    Published {
        /// The ring.
        ring: RingId,
        /// First entry.
        first: u64,
        /// One past the last entry.
        end: u64,
        /// When.
        t: u64,
    },
    /// The guest CMD_SYNC `seq` was signalled at `t`.
    SyncDone {
        /// The ring.
        ring: RingId,
        /// The CMD_SYNC's entry.
        seq: u64,
        /// When.
        t: u64,
    },
    /// The physical queue failed the command forwarded for entry `seq` with `cerror`; the ring
    /// stops there. Every entry of the ring from `seq` on that was recorded before is void: it
    /// is read again after the guest's acknowledgement.
    PhysFault {
        /// The ring.
        ring: RingId,
        /// The entry.
        seq: u64,
        /// The physical CONS.ERR.
        cerror: CError,
    },
}

/// The final outcome of each entry of `ring` in an audit trail, by sequence number: a later
/// record of an entry (read again after a stop) replaces the earlier one, and a physical fault
/// voids the entries from its own on (they are read again after the acknowledgement). `None`
/// for an entry the audit has no outcome for (yet).
pub fn slot_outcomes(audit: &[AuditRecord], ring: RingId) -> Vec<Option<SlotOutcome>> {
    let mut by_seq: Vec<Option<SlotOutcome>> = Vec::new();
    for rec in audit {
        match *rec {
            AuditRecord::Slot {
                ring: r,
                seq,
                outcome,
            } if r == ring => {
                let seq = seq as usize;
                if by_seq.len() <= seq {
                    by_seq.resize(seq + 1, None);
                }
                by_seq[seq] = Some(outcome);
            }
            AuditRecord::PhysFault { ring: r, seq, .. } if r == ring => {
                by_seq.truncate(seq as usize);
            }
            _ => {}
        }
    }
    by_seq
}
