//! A guest queue's slots as the engine reads them: 2^LOG2SIZE 16-byte commands the guest
//! writes, which the engine copies out. They are the other memory of a guest queue, next to its
//! registers (`regs.rs`): in the memfd ring format they follow the header in the same mapping;
//! in a VMM they are guest RAM at the base the guest programmed.
//!
//! [`MemorySlots`] reads slots from a [`RingMemory`] (a sealed memfd or the heap) at an offset,
//! and, inside the crate, from an unsealed ring file with `pread`. Slots elsewhere (guest RAM
//! through `vm-memory`, say) are another implementation of [`QueueSlots`].

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use super::access::HostMemory;
use super::layout::SLOT_SIZE;
use super::memory::{Region, RingMemory};
use super::RingError;
use crate::command::RawCommand;

/// The slots of one guest command queue, as the engine copies them out.
///
/// The rules for memory another party writes at any time: each slot is copied once, with
/// atomic or volatile loads (never through a `&[u8]` or any reference to the shared bytes), and
/// the engine looks only at the copy; a torn slot is a command like any other. A read that
/// fails is a typed [`RingError`] naming the memory, never a panic or a signal: the engine then
/// treats the queue as dead and reports the error on every poll.
///
/// [`HostRing`](super::HostRing) calls [`QueueSlots::copy_out`] at most twice per poll (the run
/// up to the last slot, then the run from slot 0), never once per command.
pub trait QueueSlots: Send + Sync + fmt::Debug {
    /// What to call the slots in an error message.
    fn name(&self) -> &Path;

    /// Slots the memory holds from slot 0 on: at least 2^LOG2SIZE, or the queue is refused at
    /// attach with [`RingError::SlotsTooSmall`].
    fn capacity(&self) -> u64;

    /// Copies `out.len()` slots, slot `index` first, into `out`. The run never wraps:
    /// `index + out.len()` is at most 2^LOG2SIZE, which is at most [`QueueSlots::capacity`].
    fn copy_out(&mut self, index: u32, out: &mut [RawCommand]) -> Result<(), RingError>;

    /// Whether the memory can go away under the engine (an unsealed file): the engine then
    /// calls [`QueueSlots::check`] on every poll. Asked once, at attach.
    fn may_shrink(&self) -> bool {
        false
    }

    /// `Ok` while the memory still holds the slots; [`RingError::Shrunk`] or an I/O error if
    /// not.
    fn check(&self) -> Result<(), RingError> {
        Ok(())
    }
}

/// Slots in ring memory, from a byte offset on: after the header of a vcmdq ring, or a buffer
/// of their own. Mapped memory is copied with two atomic loads per slot; an unsealed ring file
/// (only inside the crate, for `HostRing::attach_with`) with one `pread` per run.
#[derive(Debug)]
pub struct MemorySlots {
    mem: HostMemory,
    /// Byte offset of slot 0.
    offset: usize,
    capacity: u64,
    /// Bytes the backing object must hold: a file shorter than this has shrunk.
    need: u64,
    /// Where a file's slot runs are read before they are decoded.
    buf: Vec<u8>,
}

impl MemorySlots {
    /// The slots of `mem` from byte `offset` on: as many whole slots as fit. Refuses memory that
    /// may shrink under its mapping ([`RingError::Unsealed`]) and an offset that is not a
    /// multiple of 16 ([`RingError::SlotsMisaligned`]).
    pub fn new(mem: Arc<dyn RingMemory>, offset: usize) -> Result<MemorySlots, RingError> {
        if !mem.sealed() {
            return Err(RingError::Unsealed {
                path: mem.name().to_path_buf(),
            });
        }
        if !offset.is_multiple_of(SLOT_SIZE) {
            return Err(RingError::SlotsMisaligned {
                path: mem.name().to_path_buf(),
                offset: offset as u64,
            });
        }
        let len = mem.mapped_len();
        let capacity = (len.saturating_sub(offset) / SLOT_SIZE) as u64;
        Ok(Self::over(
            HostMemory::Mapped(Region::new(mem)),
            offset,
            capacity,
            len as u64,
        ))
    }

    /// `capacity` slots of `mem` from `offset` on, already checked to fit in `need` bytes.
    pub(crate) fn over(mem: HostMemory, offset: usize, capacity: u64, need: u64) -> MemorySlots {
        MemorySlots {
            mem,
            offset,
            capacity,
            need,
            buf: Vec::new(),
        }
    }
}

impl QueueSlots for MemorySlots {
    fn name(&self) -> &Path {
        self.mem.name()
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    /// # Panics
    /// If the run leaves the slots: the engine asks only for slots of its own shape, which
    /// fits in the capacity (checked at attach), never for an index a guest chose.
    #[inline]
    fn copy_out(&mut self, index: u32, out: &mut [RawCommand]) -> Result<(), RingError> {
        assert!(
            u64::from(index) + out.len() as u64 <= self.capacity,
            "slots {index}+{} of {}",
            out.len(),
            self.capacity
        );
        let off = self.offset + index as usize * SLOT_SIZE;
        self.mem
            .copy_slots(off, out, &mut self.buf)
            .map_err(|e| self.mem.error(e, "read", self.need))
    }

    fn may_shrink(&self) -> bool {
        !self.mem.sealed()
    }

    fn check(&self) -> Result<(), RingError> {
        self.mem.check_len(self.need)
    }
}
