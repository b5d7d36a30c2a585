//! The vSID -> pSID table of one vIOMMU: a radix table with lock-free lookups.
//!
//! Shape, chosen from SIDSIZE so that small guests pay one or two loads and 32-bit vSIDs three:
//! - SIDSIZE <= 8: one flat leaf of 2^SIDSIZE entries;
//! - SIDSIZE <= 20: a root of 2^(SIDSIZE-8) leaf pointers (at most 64 KiB), leaves of 256
//!   entries (2 KiB): one leaf per PCI bus when vSIDs are BDFs;
//! - SIDSIZE <= 32: a root of 2^(SIDSIZE-20) pointers (at most 64 KiB) to mid nodes of 4,096
//!   leaf pointers (64 KiB), leaves as above.
//!
//! Small leaves keep scattered vSIDs cheap (2 KiB per isolated vSID, plus its mid node); wide
//! interior levels keep the walk at three loads for 32-bit vSIDs.
//!
//! An entry is an `AtomicU64`: 0 when unbound, `VALID | pSID` when bound. Interior pointers are
//! `OnceLock`s: a lookup is one acquire load per level and one relaxed load of the entry, no lock,
//! no allocation, no `unsafe`. A vSID beyond SIDSIZE falls outside the root and reads as unbound.
//!
//! Memory: the root is allocated with the table; mid nodes and leaves on first use, and kept
//! until the table is dropped (freeing them would need a grace period per node; keeping them
//! bounds memory by the largest set ever bound, and makes rebinding in the same range free).
//! [`SidTable::stats`] reports what is allocated, [`SidTable::growth`] what an insert would add:
//! a vIOMMU checks it against its memory limit before inserting (32-bit vSIDs scattered one per
//! mid node would otherwise cost 66 KiB each, 32 GiB in all).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// vSID bits resolved by a leaf.
pub const LEAF_BITS: u32 = 8;
/// vSID bits resolved by a mid node (three-level tables only).
pub const MID_BITS: u32 = 12;
const LEAF: usize = 1 << LEAF_BITS;
const MID: usize = 1 << MID_BITS;
const LEAF_MASK: usize = LEAF - 1;
const MID_MASK: usize = MID - 1;

/// Set in a bound entry; the pSID is in the low 32 bits.
const VALID: u64 = 1 << 32;

type Leaf = [AtomicU64; LEAF];
type LeafPtr = OnceLock<Box<Leaf>>;
type Mid = [LeafPtr; MID];

/// Bytes of one leaf.
pub const LEAF_BYTES: usize = core::mem::size_of::<Leaf>();
/// Bytes of one mid node.
pub const MID_BYTES: usize = core::mem::size_of::<Mid>();

enum Root {
    Flat(Box<[AtomicU64]>),
    Two(Box<[LeafPtr]>),
    Three(Box<[OnceLock<Box<Mid>>]>),
}

/// Why a binding could not be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InsertError {
    /// The vSID needs more bits than SIDSIZE.
    #[error("vSID {vsid:#x} does not fit SIDSIZE {sidsize}")]
    BeyondSidsize {
        /// The vSID given.
        vsid: u32,
        /// The table's SIDSIZE.
        sidsize: u8,
    },
    /// The vSID is already bound.
    #[error("vSID {vsid:#x} is already bound to pSID {psid:#x}")]
    Taken {
        /// The vSID given.
        vsid: u32,
        /// The pSID it is bound to.
        psid: u32,
    },
}

/// What a table has allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableStats {
    /// Bound vSIDs.
    pub bound: usize,
    /// Levels a lookup walks (1 to 3).
    pub levels: u8,
    /// Mid nodes allocated.
    pub mids: usize,
    /// Leaves allocated (the flat root of a one-level table counts as one).
    pub leaves: usize,
    /// Bytes of all nodes, root included (not the table header).
    pub bytes: usize,
}

/// A vSID -> pSID radix table. Lookups from any thread without a lock; updates from any thread
/// too (each is a single compare-and-swap on the entry), though a vIOMMU serialises its own.
pub struct SidTable {
    root: Root,
    sidsize: u8,
    bound: AtomicUsize,
    mids: AtomicUsize,
    leaves: AtomicUsize,
}

/// Code that wants a lookup specialised to a table's shape ([`SidTable::with_lookup`]).
pub trait WithLookup {
    /// What the code returns.
    type Output;
    /// Runs with `lookup`, which answers as [`SidTable::get`] does.
    fn run(self, lookup: impl Fn(u32) -> Option<u32>) -> Self::Output;
}

/// The pSID in a bound entry. Relaxed, as in [`SidTable::get`].
#[inline(always)]
fn bound(entry: &AtomicU64) -> Option<u32> {
    let e = entry.load(Ordering::Relaxed);
    (e & VALID != 0).then_some(e as u32)
}

fn zeroed_leaf() -> Box<Leaf> {
    let v: Box<[AtomicU64]> = (0..LEAF).map(|_| AtomicU64::new(0)).collect();
    match v.try_into() {
        Ok(leaf) => leaf,
        Err(_) => unreachable!("collected exactly LEAF entries"),
    }
}

fn empty_mid() -> Box<Mid> {
    let v: Box<[LeafPtr]> = (0..MID).map(|_| OnceLock::new()).collect();
    match v.try_into() {
        Ok(mid) => mid,
        Err(_) => unreachable!("collected exactly MID entries"),
    }
}

impl SidTable {
    /// An empty table for vSIDs of `sidsize` bits (1..=32); `None` outside that range.
    pub fn new(sidsize: u8) -> Option<SidTable> {
        if !(1..=32).contains(&sidsize) {
            return None;
        }
        let bits = u32::from(sidsize);
        let root = if bits <= LEAF_BITS {
            Root::Flat((0..1usize << bits).map(|_| AtomicU64::new(0)).collect())
        } else if bits <= LEAF_BITS + MID_BITS {
            Root::Two(
                (0..1usize << (bits - LEAF_BITS))
                    .map(|_| OnceLock::new())
                    .collect(),
            )
        } else {
            Root::Three(
                (0..1usize << (bits - LEAF_BITS - MID_BITS))
                    .map(|_| OnceLock::new())
                    .collect(),
            )
        };
        Some(SidTable {
            root,
            sidsize,
            bound: AtomicUsize::new(0),
            mids: AtomicUsize::new(0),
            leaves: AtomicUsize::new(0),
        })
    }

    /// SIDSIZE: vSIDs have this many bits.
    pub fn sidsize(&self) -> u8 {
        self.sidsize
    }

    /// Whether `vsid` fits SIDSIZE.
    #[inline]
    pub fn fits(&self, vsid: u32) -> bool {
        u64::from(vsid) >> self.sidsize == 0
    }

    /// The pSID bound to `vsid`: the translating threads' lookup.
    ///
    /// No lock, no allocation, no read-modify-write: an acquire load per interior level and a
    /// relaxed load of the entry. Relaxed suffices: the entry carries its own value, and the
    /// order against unbinds comes from the grace period's fences around the batch.
    #[inline]
    pub fn get(&self, vsid: u32) -> Option<u32> {
        let e = self.entry(vsid)?.load(Ordering::Relaxed);
        if e & VALID != 0 {
            Some(e as u32)
        } else {
            None
        }
    }

    /// Runs `user` with a lookup specialised to this table's shape: the same answers as
    /// [`SidTable::get`], without deciding the shape again for every vSID. For loops that look
    /// up many vSIDs (the translator's batches).
    #[inline]
    pub fn with_lookup<U: WithLookup>(&self, user: U) -> U::Output {
        match &self.root {
            Root::Flat(leaf) => user.run(|vsid| bound(leaf.get(vsid as usize)?)),
            Root::Two(root) => user.run(|vsid| {
                let v = vsid as usize;
                bound(&root.get(v >> LEAF_BITS)?.get()?[v & LEAF_MASK])
            }),
            Root::Three(root) => user.run(|vsid| {
                let v = vsid as usize;
                let mid = root.get(v >> (LEAF_BITS + MID_BITS))?.get()?;
                bound(&mid[(v >> LEAF_BITS) & MID_MASK].get()?[v & LEAF_MASK])
            }),
        }
    }

    #[inline]
    fn entry(&self, vsid: u32) -> Option<&AtomicU64> {
        let v = vsid as usize;
        match &self.root {
            // The root's length is exactly 2^(SIDSIZE - bits below it): `get` on it is the
            // SIDSIZE check.
            Root::Flat(leaf) => leaf.get(v),
            Root::Two(root) => Some(&root.get(v >> LEAF_BITS)?.get()?[v & LEAF_MASK]),
            Root::Three(root) => {
                let mid = root.get(v >> (LEAF_BITS + MID_BITS))?.get()?;
                Some(&mid[(v >> LEAF_BITS) & MID_MASK].get()?[v & LEAF_MASK])
            }
        }
    }

    /// The entry of `vsid`, allocating the nodes on its path. `None` beyond SIDSIZE.
    fn entry_or_alloc(&self, vsid: u32) -> Option<&AtomicU64> {
        let v = vsid as usize;
        let new_leaf = || {
            self.leaves.fetch_add(1, Ordering::Relaxed);
            zeroed_leaf()
        };
        match &self.root {
            Root::Flat(leaf) => leaf.get(v),
            Root::Two(root) => {
                Some(&root.get(v >> LEAF_BITS)?.get_or_init(new_leaf)[v & LEAF_MASK])
            }
            Root::Three(root) => {
                let mid = root.get(v >> (LEAF_BITS + MID_BITS))?.get_or_init(|| {
                    self.mids.fetch_add(1, Ordering::Relaxed);
                    empty_mid()
                });
                let leaf = mid[(v >> LEAF_BITS) & MID_MASK].get_or_init(new_leaf);
                Some(&leaf[v & LEAF_MASK])
            }
        }
    }

    /// Bytes inserting `vsid` would allocate (the nodes on its path not allocated yet); 0 for
    /// a vSID beyond SIDSIZE, which allocates nothing.
    pub fn growth(&self, vsid: u32) -> usize {
        let v = vsid as usize;
        match &self.root {
            Root::Flat(_) => 0,
            Root::Two(root) => match root.get(v >> LEAF_BITS) {
                Some(leaf) if leaf.get().is_none() => LEAF_BYTES,
                _ => 0,
            },
            Root::Three(root) => match root.get(v >> (LEAF_BITS + MID_BITS)) {
                None => 0,
                Some(mid) => match mid.get() {
                    None => MID_BYTES + LEAF_BYTES,
                    Some(mid) if mid[(v >> LEAF_BITS) & MID_MASK].get().is_none() => LEAF_BYTES,
                    Some(_) => 0,
                },
            },
        }
    }

    /// The most one insert can allocate at this table's SIDSIZE.
    pub fn growth_max(&self) -> usize {
        match &self.root {
            Root::Flat(_) => 0,
            Root::Two(_) => LEAF_BYTES,
            Root::Three(_) => MID_BYTES + LEAF_BYTES,
        }
    }

    /// Binds `vsid` to `psid` if `vsid` is free and fits SIDSIZE.
    pub fn insert(&self, vsid: u32, psid: u32) -> Result<(), InsertError> {
        let entry = self
            .entry_or_alloc(vsid)
            .ok_or(InsertError::BeyondSidsize {
                vsid,
                sidsize: self.sidsize,
            })?;
        match entry.compare_exchange(
            0,
            VALID | u64::from(psid),
            Ordering::Release,
            Ordering::Relaxed,
        ) {
            Ok(_) => {
                self.bound.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(cur) => Err(InsertError::Taken {
                vsid,
                psid: cur as u32,
            }),
        }
    }

    /// Unbinds `vsid`, returning the pSID it had. Translations that started before this call may
    /// still use the old pSID: the caller waits for them with the grace period.
    pub fn remove(&self, vsid: u32) -> Option<u32> {
        let old = self.entry(vsid)?.swap(0, Ordering::Relaxed);
        if old & VALID == 0 {
            return None;
        }
        self.bound.fetch_sub(1, Ordering::Relaxed);
        Some(old as u32)
    }

    /// Bound vSIDs.
    pub fn len(&self) -> usize {
        self.bound.load(Ordering::Relaxed)
    }

    /// Whether nothing is bound.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the table has allocated.
    pub fn stats(&self) -> TableStats {
        let mids = self.mids.load(Ordering::Relaxed);
        let leaves = self.leaves.load(Ordering::Relaxed);
        let (levels, root_bytes, leaves) = match &self.root {
            Root::Flat(l) => (1, core::mem::size_of_val::<[AtomicU64]>(l), 1),
            Root::Two(r) => (2, core::mem::size_of_val::<[LeafPtr]>(r), leaves),
            Root::Three(r) => (3, core::mem::size_of_val::<[OnceLock<Box<Mid>>]>(r), leaves),
        };
        let grown = if levels == 1 { 0 } else { leaves * LEAF_BYTES };
        TableStats {
            bound: self.len(),
            levels,
            mids,
            leaves,
            bytes: root_bytes + mids * MID_BYTES + grown,
        }
    }
}

impl core::fmt::Debug for SidTable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SidTable")
            .field("sidsize", &self.sidsize)
            .field("stats", &self.stats())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn levels_follow_sidsize() {
        for (sidsize, levels) in [(1, 1), (8, 1), (9, 2), (16, 2), (20, 2), (21, 3), (32, 3)] {
            assert_eq!(
                SidTable::new(sidsize).unwrap().stats().levels,
                levels,
                "{sidsize}"
            );
        }
        assert!(SidTable::new(0).is_none());
        assert!(SidTable::new(33).is_none());
    }

    #[test]
    fn every_sidsize_bounds_its_vsids() {
        for sidsize in 1..=32u8 {
            let t = SidTable::new(sidsize).unwrap();
            let max = (u64::from(u32::MAX) >> (32 - sidsize)) as u32;
            t.insert(max, 7).unwrap();
            t.insert(0, 8).unwrap();
            assert_eq!(t.get(max), Some(7));
            assert_eq!(t.get(0), Some(8));
            if sidsize < 32 {
                assert_eq!(
                    t.insert(max + 1, 9),
                    Err(InsertError::BeyondSidsize {
                        vsid: max + 1,
                        sidsize
                    })
                );
                assert_eq!(t.get(max + 1), None);
                assert_eq!(t.get(u32::MAX), None);
                assert_eq!(t.remove(u32::MAX), None);
            }
        }
    }

    #[test]
    fn insert_get_remove() {
        let t = SidTable::new(32).unwrap();
        assert_eq!(t.get(0x10), None);
        t.insert(0x10, 0x800).unwrap();
        assert_eq!(t.get(0x10), Some(0x800));
        assert_eq!(
            t.insert(0x10, 0x900),
            Err(InsertError::Taken {
                vsid: 0x10,
                psid: 0x800
            })
        );
        // pSID 0 and pSID u32::MAX are ordinary values.
        t.insert(0x11, 0).unwrap();
        t.insert(0xffff_ffff, u32::MAX).unwrap();
        assert_eq!(t.get(0x11), Some(0));
        assert_eq!(t.get(0xffff_ffff), Some(u32::MAX));
        assert_eq!(t.len(), 3);
        assert_eq!(t.remove(0x10), Some(0x800));
        assert_eq!(t.remove(0x10), None);
        assert_eq!(t.get(0x10), None);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn four_devices_cost_kilobytes() {
        // Clustered (one PCI bus) and scattered over the whole 32-bit space.
        let t = SidTable::new(32).unwrap();
        for v in [0x100, 0x108, 0x110, 0x118] {
            t.insert(v, v).unwrap();
        }
        let s = t.stats();
        assert_eq!((s.mids, s.leaves), (1, 1));
        assert!(s.bytes <= 136 << 10, "{s:?}");
        let t = SidTable::new(32).unwrap();
        for v in [0, 0x4000_0000, 0x8000_0000, 0xffff_ffff] {
            t.insert(v, v).unwrap();
        }
        let s = t.stats();
        assert_eq!((s.mids, s.leaves), (4, 4));
        assert!(s.bytes <= 336 << 10, "{s:?}");
        let t = SidTable::new(16).unwrap();
        for v in [0x100, 0x2000, 0x4000, 0xffff] {
            t.insert(v, v).unwrap();
        }
        let s = t.stats();
        assert_eq!((s.mids, s.leaves), (0, 4));
        assert!(s.bytes <= 16 << 10, "{s:?}");
    }

    #[test]
    fn a_million_dense_vsids_cost_eight_bytes_each() {
        let t = SidTable::new(32).unwrap();
        for v in 0..1_000_000u32 {
            t.insert(v, v ^ 0x5555).unwrap();
        }
        let s = t.stats();
        assert_eq!(s.leaves, 1_000_000usize.div_ceil(LEAF));
        assert!(s.bytes < 1_000_000 * 9, "{s:?}");
        for v in (0..1_000_000u32).step_by(997) {
            assert_eq!(t.get(v), Some(v ^ 0x5555));
        }
        assert_eq!(t.get(1_000_000), None);
    }

    #[test]
    fn nodes_outlive_removal_and_are_reused() {
        let t = SidTable::new(24).unwrap();
        t.insert(0x12345, 1).unwrap();
        let before = t.stats();
        t.remove(0x12345).unwrap();
        t.insert(0x12346, 2).unwrap();
        assert_eq!(t.stats().bytes, before.bytes);
    }

    #[test]
    fn concurrent_lookups_see_bound_or_unbound_never_garbage() {
        let t = std::sync::Arc::new(SidTable::new(32).unwrap());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (t, stop) = (t.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut seen = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for v in (0..1u32 << 16).step_by(251) {
                            let vsid = v.wrapping_mul(0x9e37_79b9);
                            if let Some(p) = t.get(vsid) {
                                assert_eq!(p, !vsid, "torn or foreign entry");
                                seen += 1;
                            }
                        }
                    }
                    seen
                })
            })
            .collect();
        for round in 0..4 {
            for v in (0..1u32 << 16).step_by(251) {
                let vsid = v.wrapping_mul(0x9e37_79b9);
                if round % 2 == 0 {
                    t.insert(vsid, !vsid).unwrap();
                } else {
                    assert_eq!(t.remove(vsid), Some(!vsid));
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn behaves_like_a_map(
            sidsize in 1u8..=32,
            ops in proptest::collection::vec((any::<bool>(), any::<u32>(), any::<u32>()), 0..200),
        ) {
            let t = SidTable::new(sidsize).unwrap();
            let mut m: HashMap<u32, u32> = HashMap::new();
            let limit = 1u64 << sidsize;
            for (insert, raw, psid) in ops {
                // Half the vSIDs are kept in range so both paths get exercised.
                let vsid = if raw & 1 == 0 { (u64::from(raw) % limit) as u32 } else { raw };
                if insert {
                    let want = if u64::from(vsid) >= limit {
                        Err(InsertError::BeyondSidsize { vsid, sidsize })
                    } else if let Some(&p) = m.get(&vsid) {
                        Err(InsertError::Taken { vsid, psid: p })
                    } else {
                        m.insert(vsid, psid);
                        Ok(())
                    };
                    // `growth` is what the insert allocates, whether it succeeds or not.
                    let (before, growth) = (t.stats().bytes, t.growth(vsid));
                    prop_assert_eq!(t.insert(vsid, psid), want);
                    let grown = t.stats().bytes - before;
                    prop_assert_eq!(grown, growth);
                    prop_assert!(growth <= t.growth_max());
                } else {
                    prop_assert_eq!(t.remove(vsid), m.remove(&vsid));
                }
                prop_assert_eq!(t.get(vsid), m.get(&vsid).copied());
                prop_assert_eq!(t.len(), m.len());
            }
            for (&v, &p) in &m {
                prop_assert_eq!(t.get(v), Some(p));
            }
            // The specialised lookup answers as `get` does, bound or not, in range or not.
            struct Probe(Vec<u32>);
            impl WithLookup for Probe {
                type Output = Vec<Option<u32>>;
                fn run(self, lookup: impl Fn(u32) -> Option<u32>) -> Self::Output {
                    self.0.into_iter().map(lookup).collect()
                }
            }
            let probes: Vec<u32> = m
                .keys()
                .copied()
                .chain([0, 1, u32::MAX, (limit - 1) as u32, limit as u32])
                .collect();
            let want: Vec<Option<u32>> = probes.iter().map(|&v| t.get(v)).collect();
            prop_assert_eq!(t.with_lookup(Probe(probes)), want);
        }
    }
}
