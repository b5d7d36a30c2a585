//! PROD/CONS arithmetic of an SMMUv3 queue: one implementation for the guest rings and the
//! physical VCMDQ.
//!
//! A pointer is `index | wrap << LOG2SIZE`. Both registers are masked to those bits before any
//! comparison, so a value written with junk above the wrap bit (or CONS.ERR) cannot confuse
//! empty with full. Empty: equal. Full: equal index, different wrap. Pending entries:
//! `(PROD - CONS) mod 2^(LOG2SIZE+1)`; a value above 2^LOG2SIZE can only come from a bad PROD write.

/// Largest LOG2SIZE of a command queue (SMMU_IDR1.CMDQS maximum).
pub const MAX_LOG2SIZE: u8 = 19;

/// CONS.ERR occupies bits [30:24] of CONS.
const ERR_SHIFT: u32 = 24;
const ERR_MASK: u32 = 0x7f << ERR_SHIFT;

/// The error field of CONS: why the consumer stopped at CONS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum CError {
    /// No error.
    None = 0,
    /// An illegal or malformed command.
    Ill = 1,
    /// The queue's memory could not be read.
    Abt = 2,
    /// A CMD_SYNC failed to complete an earlier ATC_INV.
    AtcInvSync = 3,
    /// Tegra241 VCMDQ: a command the VCMDQ may not issue.
    IllAccess = 4,
}

impl CError {
    /// The error of a CONS.ERR value; unknown codes read as `None` paired with the raw code.
    pub fn from_code(code: u8) -> Option<CError> {
        Some(match code {
            0 => CError::None,
            1 => CError::Ill,
            2 => CError::Abt,
            3 => CError::AtcInvSync,
            4 => CError::IllAccess,
            _ => return None,
        })
    }

    /// The CONS.ERR code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The spec's short name (`ILL`, `ABT`, `ATC_INV_SYNC`, `ILL_ACCESS`, `NONE`).
    pub fn name(self) -> &'static str {
        match self {
            CError::None => "NONE",
            CError::Ill => "ILL",
            CError::Abt => "ABT",
            CError::AtcInvSync => "ATC_INV_SYNC",
            CError::IllAccess => "ILL_ACCESS",
        }
    }
}

impl core::fmt::Display for CError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "CERROR_{}", self.name())
    }
}

/// Errors of queue geometry and pointer values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// LOG2SIZE outside 0..=19.
    #[error("LOG2SIZE {0} is out of range: a command queue has 2^0 to 2^19 entries")]
    Log2Size(u8),
    /// PROD is further ahead of CONS than the queue holds: a bad PROD write.
    #[error("PROD {prod:#x} is {pending} entries ahead of CONS {cons:#x}, more than the {entries} the queue holds")]
    Overrun {
        /// The masked PROD.
        prod: u32,
        /// The masked CONS.
        cons: u32,
        /// Entries PROD claims are pending.
        pending: u32,
        /// Queue entries.
        entries: u32,
    },
}

/// The geometry of one queue: 2^LOG2SIZE entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QueueShape {
    log2size: u8,
}

impl QueueShape {
    /// A queue of 2^`log2size` entries, `log2size` in 0..=19.
    pub const fn new(log2size: u8) -> Result<QueueShape, QueueError> {
        if log2size > MAX_LOG2SIZE {
            return Err(QueueError::Log2Size(log2size));
        }
        Ok(QueueShape { log2size })
    }

    /// LOG2SIZE.
    #[inline]
    pub const fn log2size(self) -> u8 {
        self.log2size
    }

    /// Entries in the queue.
    #[inline]
    pub const fn entries(self) -> u32 {
        1 << self.log2size
    }

    /// The bits of a pointer that are the index.
    #[inline]
    pub const fn index_mask(self) -> u32 {
        self.entries() - 1
    }

    /// The wrap bit.
    #[inline]
    pub const fn wrap_bit(self) -> u32 {
        self.entries()
    }

    /// The bits of a register that are index and wrap.
    #[inline]
    pub const fn ptr_mask(self) -> u32 {
        (self.entries() << 1) - 1
    }

    /// A register value reduced to index and wrap; everything above (CONS.ERR, junk a guest
    /// wrote) is dropped.
    #[inline]
    pub const fn ptr(self, reg: u32) -> u32 {
        reg & self.ptr_mask()
    }

    /// The slot a pointer names.
    #[inline]
    pub const fn index(self, reg: u32) -> u32 {
        reg & self.index_mask()
    }

    /// The wrap bit of a pointer.
    #[inline]
    pub const fn wrap(self, reg: u32) -> bool {
        reg & self.wrap_bit() != 0
    }

    /// Nothing pending.
    #[inline]
    pub const fn is_empty(self, prod: u32, cons: u32) -> bool {
        self.ptr(prod) == self.ptr(cons)
    }

    /// No free slot.
    #[inline]
    pub const fn is_full(self, prod: u32, cons: u32) -> bool {
        self.ptr(prod ^ cons) == self.wrap_bit()
    }

    /// `(PROD - CONS) mod 2^(LOG2SIZE+1)`, unchecked: above `entries()` only for a bad PROD.
    #[inline]
    pub const fn distance(self, prod: u32, cons: u32) -> u32 {
        prod.wrapping_sub(cons) & self.ptr_mask()
    }

    /// Entries pending between CONS and PROD, refusing a PROD that claims more than fit.
    #[inline]
    pub const fn pending(self, prod: u32, cons: u32) -> Result<u32, QueueError> {
        let pending = self.distance(prod, cons);
        if pending > self.entries() {
            return Err(QueueError::Overrun {
                prod: self.ptr(prod),
                cons: self.ptr(cons),
                pending,
                entries: self.entries(),
            });
        }
        Ok(pending)
    }

    /// Free slots a producer at PROD may fill; 0 when PROD is invalid.
    #[inline]
    pub const fn free(self, prod: u32, cons: u32) -> u32 {
        match self.pending(prod, cons) {
            Ok(p) => self.entries() - p,
            Err(_) => 0,
        }
    }

    /// The pointer `n` entries after `reg` (index and wrap only).
    #[inline]
    pub const fn advance(self, reg: u32, n: u32) -> u32 {
        reg.wrapping_add(n) & self.ptr_mask()
    }
}

/// The `n` slots of a ring of `len` from index `start` on, wrapping to slot 0, as at most two
/// contiguous runs of indices: up to the end of the ring, then from slot 0 (empty when they do
/// not wrap). Every reader or writer of a batch of slots (a guest ring's push and poll, the
/// physical queue's reservation, the worker's provenance tags) walks a batch this way. `start`
/// must be below `len` and `n` at most `len` (a caller bug otherwise: the runs would be out of
/// range).
#[inline]
pub fn runs(len: usize, start: usize, n: usize) -> [core::ops::Range<usize>; 2] {
    let first = n.min(len - start);
    [start..start + first, 0..n - first]
}

/// CONS.ERR of a CONS register value (7 bits).
#[inline]
pub const fn cons_err(cons: u32) -> u8 {
    ((cons & ERR_MASK) >> ERR_SHIFT) as u8
}

/// `cons` with CONS.ERR replaced by `err` (7 bits); index, wrap and bit 31 untouched.
#[inline]
pub const fn with_cons_err(cons: u32, err: u8) -> u32 {
    (cons & !ERR_MASK) | (((err as u32) << ERR_SHIFT) & ERR_MASK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn log2size_bounds() {
        assert!(QueueShape::new(0).is_ok());
        assert!(QueueShape::new(19).is_ok());
        assert_eq!(QueueShape::new(20), Err(QueueError::Log2Size(20)));
    }

    #[test]
    fn one_entry_queue() {
        let q = QueueShape::new(0).unwrap();
        assert_eq!(q.entries(), 1);
        assert!(q.is_empty(0, 0));
        assert!(q.is_full(1, 0));
        assert!(q.is_full(0, 1));
        assert_eq!(q.pending(1, 0), Ok(1));
        assert_eq!(q.free(1, 0), 0);
        assert_eq!(q.advance(1, 1), 0);
        assert_eq!(q.index(1), 0);
        assert!(q.wrap(1));
    }

    #[test]
    fn largest_queue() {
        let q = QueueShape::new(19).unwrap();
        let n = 1u32 << 19;
        assert_eq!(q.entries(), n);
        assert!(q.is_full(n, 0));
        assert!(!q.is_full(n - 1, 0));
        assert_eq!(q.pending(n, 0), Ok(n));
        assert!(matches!(
            q.pending(n + 1, 0),
            Err(QueueError::Overrun { .. })
        ));
        assert_eq!(q.advance(2 * n - 1, 1), 0);
    }

    #[test]
    fn bits_above_wrap_and_err_are_ignored() {
        let q = QueueShape::new(4).unwrap();
        let cons = with_cons_err(3, CError::Ill.code());
        assert_eq!(cons_err(cons), 1);
        assert_eq!(q.ptr(cons), 3);
        assert!(q.is_empty(0xffff_ffe3 & !0x10 | 3, cons));
        assert_eq!(q.pending(0xdead_0000 | 5, cons), Ok(2));
    }

    #[test]
    fn cons_err_leaves_index_alone() {
        let cons = 0x8000_0000 | 0x1_2345;
        let set = with_cons_err(cons, 3);
        assert_eq!(set & !ERR_MASK, cons);
        assert_eq!(cons_err(set), 3);
        assert_eq!(with_cons_err(set, 0), cons);
        assert_eq!(cons_err(with_cons_err(0, 0xff)), 0x7f);
    }

    // The model: free-running u64 counters, pending = prod - cons, registers derived by masking.
    proptest! {
        #[test]
        fn runs_cover_the_n_slots_from_start_in_ring_order(
            log2 in 0u32..=8,
            start_seed: usize,
            n_seed: usize,
        ) {
            let len = 1usize << log2;
            let (start, n) = (start_seed % len, n_seed % (len + 1));
            let [head, tail] = runs(len, start, n);
            let walked: Vec<usize> = head.clone().chain(tail.clone()).collect();
            let want: Vec<usize> = (0..n).map(|i| (start + i) % len).collect();
            prop_assert_eq!(walked, want);
            // The second run only when the first reaches the end of the ring.
            prop_assert!(tail.is_empty() || head.end == len);
        }

        #[test]
        fn matches_counter_model(
            log2 in 0u8..=19,
            ops in proptest::collection::vec((any::<bool>(), 0u32..=(1 << 19), any::<u32>()), 1..64),
        ) {
            let q = QueueShape::new(log2).unwrap();
            let entries = 1u64 << log2;
            let (mut p, mut c) = (0u64, 0u64);
            for (produce, n, junk) in ops {
                let junk = junk & !q.ptr_mask();
                let (prod, cons) = ((p as u32 & q.ptr_mask()) | junk, c as u32 & q.ptr_mask());
                let pending = p - c;
                prop_assert_eq!(q.pending(prod, cons), Ok(pending as u32));
                prop_assert_eq!(q.is_empty(prod, cons), pending == 0);
                prop_assert_eq!(q.is_full(prod, cons), pending == entries);
                prop_assert_eq!(q.free(prod, cons) as u64, entries - pending);
                prop_assert_eq!(q.index(prod) as u64, p % entries);
                prop_assert_eq!(q.wrap(prod), (p / entries) % 2 == 1);
                if produce {
                    let n = (n as u64).min(entries - pending);
                    prop_assert_eq!(q.advance(prod, n as u32) as u64, (p + n) % (2 * entries));
                    p += n;
                } else {
                    let n = (n as u64).min(pending);
                    c += n;
                }
            }
        }

        #[test]
        fn overrun_is_detected(log2 in 1u8..=19, cons in any::<u32>(), extra in 1u32..(1 << 19)) {
            let q = QueueShape::new(log2).unwrap();
            // PROD more than a full queue ahead of CONS, but not a whole lap (which would alias).
            let extra = 1 + extra % (q.entries() - 1).max(1);
            prop_assume!(extra < q.entries());
            let prod = cons.wrapping_add(q.entries() + extra);
            prop_assert!(q.pending(prod, cons).is_err());
            prop_assert_eq!(q.free(prod, cons), 0);
        }
    }
}
