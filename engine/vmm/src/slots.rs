//! A guest VCMDQ's slots in guest RAM, read through rust-vmm's `vm-memory`: any
//! [`GuestMemory`] a VMM holds (`GuestMemoryMmap` in the example and tests).
//!
//! The queue is checked once, at enable ([`GuestRamSlots::new`]): LOG2SIZE at most
//! [`VCMDQ_LOG2SIZE_MAX`], BASE aligned to the queue's size and to at least 32 bytes (the
//! SMMUv3 rule for a command queue's base, which Linux's `arm_smmu_init_one_queue` keeps, and
//! the low bit of Tegra241's VCMDQ_BASE address field, bit 5), and every byte of the queue in
//! guest RAM. The queue may span several memory regions as long as they are contiguous in the
//! guest-physical address space (no hole) and every boundary inside the queue falls between
//! two slots; a queue across a hole, or a slot split between two regions, is refused.
//!
//! Each slot is copied out once, as two volatile 64-bit loads through `vm-memory`'s checked
//! array view of the region (`VolatileSlice::get_array_ref`): the guest may rewrite it at any
//! time, and the engine only looks at the copy.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vcmdq::command::RawCommand;
use vcmdq::ring::{QueueSlots, RingError};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions, VolatileMemory};

use crate::regs::VCMDQ_LOG2SIZE_MAX;

/// Bytes of one command slot.
pub const SLOT_BYTES: u64 = 16;
/// The alignment every queue base has at least: 32 bytes (BASE's address field starts at bit 5).
pub const MIN_BASE_ALIGN: u64 = 32;
/// 64-bit words copied out of guest RAM per step (a 1 KiB stack buffer, 64 slots).
const COPY_WORDS: usize = 128;

/// Why a guest queue was refused at enable: the reason names the register value that is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnableError {
    /// LOG2SIZE above what a VCMDQ takes.
    #[error("VCMDQ_BASE LOG2SIZE {log2size} is above {VCMDQ_LOG2SIZE_MAX} (VCMDQ_LOG2SIZE_MAX)")]
    Log2SizeTooLarge {
        /// LOG2SIZE as the guest wrote it (bits `[4:0]` of BASE).
        log2size: u8,
    },
    /// BASE not aligned as the architecture requires.
    #[error("VCMDQ_BASE address {base:#x} is not aligned to {align:#x} bytes (a queue of 2^{log2size} 16-byte slots is aligned to its size, and to 32 bytes at least)")]
    Misaligned {
        /// The queue's guest-physical address.
        base: u64,
        /// Its LOG2SIZE.
        log2size: u8,
        /// The alignment it needs.
        align: u64,
    },
    /// Part of the queue is not guest RAM.
    #[error("VCMDQ_BASE {base:#x} with LOG2SIZE {log2size}: the queue's {len:#x} bytes are not all in guest RAM (first byte outside: {first_outside:#x})")]
    OutsideRam {
        /// The queue's guest-physical address.
        base: u64,
        /// Its LOG2SIZE.
        log2size: u8,
        /// Its length in bytes.
        len: u64,
        /// The first guest-physical address of the queue that no region holds.
        first_outside: u64,
    },
    /// A memory-region boundary inside the queue splits a slot.
    #[error("VCMDQ_BASE {base:#x}: a guest memory region ends at {at:#x}, inside a 16-byte slot of the queue")]
    SlotSplit {
        /// The queue's guest-physical address.
        base: u64,
        /// Where the region ends.
        at: u64,
    },
    /// Guest RAM the queue is in cannot be read with atomic loads (a region mapped at a host
    /// address that is not 8-byte aligned).
    #[error(
        "VCMDQ_BASE {base:#x}: guest RAM at {at:#x} cannot be read with 64-bit atomic loads: {why}"
    )]
    Unreadable {
        /// The queue's guest-physical address.
        base: u64,
        /// The address that failed.
        at: u64,
        /// What vm-memory said.
        why: String,
    },
    /// The engine or the register page refused the queue (a logical VCMDQ index past the
    /// VINTF's, a vIOMMU removed meanwhile): the message says which.
    #[error("{0}")]
    Engine(String),
}

/// The slots of one guest queue in guest RAM: 2^LOG2SIZE 16-byte commands from BASE on.
///
/// ```
/// use std::sync::Arc;
/// use vcmdq_vmm::{EnableError, GuestRamSlots};
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// let ram = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
/// // 8 slots (128 bytes) at a 128-byte-aligned address inside RAM: taken.
/// assert!(GuestRamSlots::new(ram.clone(), 0x1000, 3).is_ok());
/// // Past the end of RAM, or not aligned to the queue's size: refused with the reason.
/// assert!(matches!(
///     GuestRamSlots::new(ram.clone(), 0x10_0000, 3),
///     Err(EnableError::OutsideRam { .. })
/// ));
/// assert!(matches!(
///     GuestRamSlots::new(ram, 0x1040, 3),
///     Err(EnableError::Misaligned { align: 128, .. })
/// ));
/// ```
pub struct GuestRamSlots<M: GuestMemory> {
    mem: Arc<M>,
    base: u64,
    log2size: u8,
    name: PathBuf,
}

impl<M: GuestMemory> std::fmt::Debug for GuestRamSlots<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRamSlots")
            .field("base", &format_args!("{:#x}", self.base))
            .field("log2size", &self.log2size)
            .finish_non_exhaustive()
    }
}

impl<M: GuestMemory> GuestRamSlots<M> {
    /// The queue at guest-physical `base` with 2^`log2size` slots in `mem`, checked as the
    /// module documentation says; `Err` names the reason it is refused.
    pub fn new(mem: Arc<M>, base: u64, log2size: u8) -> Result<GuestRamSlots<M>, EnableError> {
        if log2size > VCMDQ_LOG2SIZE_MAX {
            return Err(EnableError::Log2SizeTooLarge { log2size });
        }
        let len = SLOT_BYTES << log2size;
        let align = len.max(MIN_BASE_ALIGN);
        if !base.is_multiple_of(align) {
            return Err(EnableError::Misaligned {
                base,
                log2size,
                align,
            });
        }
        check_ram(&*mem, base, log2size, len)?;
        Ok(GuestRamSlots {
            mem,
            base,
            log2size,
            name: PathBuf::from(format!("guest RAM {base:#x}")),
        })
    }

    /// The queue's guest-physical address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The queue's LOG2SIZE.
    pub fn log2size(&self) -> u8 {
        self.log2size
    }
}

/// Checks that `[base, base + len)` is guest RAM, region boundaries between slots, and that
/// each region's first slot loads atomically.
fn check_ram<M: GuestMemory + ?Sized>(
    mem: &M,
    base: u64,
    log2size: u8,
    len: u64,
) -> Result<(), EnableError> {
    let outside = |first_outside| EnableError::OutsideRam {
        base,
        log2size,
        len,
        first_outside,
    };
    if base.checked_add(len).is_none() {
        return Err(outside(base));
    }
    let slices = mem
        .get_slices(GuestAddress(base), len as usize, Permissions::Read)
        .map_err(|_| outside(base))?;
    let mut at = base;
    for slice in slices {
        let slice = slice.map_err(|_| outside(at))?;
        let n = slice.len() as u64;
        if n == 0 {
            return Err(outside(at));
        }
        if let Err(e) = slice.load::<u64>(0, Ordering::Relaxed) {
            return Err(EnableError::Unreadable {
                base,
                at,
                why: e.to_string(),
            });
        }
        at += n;
        if at < base + len && !(at - base).is_multiple_of(SLOT_BYTES) {
            return Err(EnableError::SlotSplit { base, at });
        }
    }
    if at != base + len {
        return Err(outside(at));
    }
    Ok(())
}

impl<M: GuestMemory + Send + Sync> QueueSlots for GuestRamSlots<M> {
    fn name(&self) -> &Path {
        &self.name
    }

    fn capacity(&self) -> u64 {
        1 << self.log2size
    }

    fn copy_out(&mut self, index: u32, out: &mut [RawCommand]) -> Result<(), RingError> {
        let first = self.base + u64::from(index) * SLOT_BYTES;
        let read_err = |at: u64, why: String| RingError::Io {
            path: self.name.clone(),
            op: "read",
            source: std::io::Error::other(format!("guest RAM at {at:#x}: {why}")),
        };
        if u64::from(index) + out.len() as u64 > self.capacity() {
            return Err(read_err(first, "a run past the queue's slots".into()));
        }
        let slices = self
            .mem
            .get_slices(
                GuestAddress(first),
                out.len() * SLOT_BYTES as usize,
                Permissions::Read,
            )
            .map_err(|e| read_err(first, e.to_string()))?;
        let mut next = out.iter_mut();
        let mut at = first;
        let mut words = [0u64; COPY_WORDS];
        for slice in slices {
            let slice = slice.map_err(|e| read_err(at, e.to_string()))?;
            if !(slice.len() as u64).is_multiple_of(SLOT_BYTES) {
                return Err(read_err(at, "a region boundary splits a slot".into()));
            }
            // One bounds and alignment check per region (`get_array_ref`), then a loop of
            // volatile 64-bit loads into a stack buffer: per slot as cheap as the ring
            // format's two atomic loads, where `Bytes::load` checked every word again.
            let all = slice
                .get_array_ref::<u64>(0, slice.len() / 8)
                .map_err(|e| read_err(at, e.to_string()))?;
            let mut word = 0;
            while word < all.len() {
                let n = (all.len() - word).min(COPY_WORDS);
                for (i, w) in words[..n].iter_mut().enumerate() {
                    *w = all.load(word + i);
                }
                for pair in words[..n].chunks_exact(2) {
                    // Slots are little-endian; so is every host vcmdq builds for.
                    let slot = next.next().expect("the slices cover exactly the run");
                    *slot = RawCommand::new(u64::from_le(pair[0]), u64::from_le(pair[1]));
                }
                word += n;
            }
            at += slice.len() as u64;
        }
        Ok(())
    }
}
