//! A guest queue's registers as the engine sees them: the words the guest writes (PROD, the
//! error acknowledgement) and the words the engine writes (CONS with CONS.ERR, the error flag,
//! CMD_SYNC completion). They are one memory of a guest queue; its slots are the other
//! (`slots.rs`), so the two can live apart: in a VMM the registers are a register page and the
//! slots are guest RAM at the guest-programmed base.
//!
//! [`HeaderRegisters`] is the vcmdq ring header (`docs/ring-format.md`) as registers, in the
//! ring's own memory or in a page of its own. Another register interface (a VCMDQ register
//! page, say) is another implementation of [`QueueRegisters`], not a change to [`HostRing`].
//!
//! [`HostRing`]: super::HostRing

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::access::{Claim, HostMemory};
use super::layout;
use super::memory::{Region, RingMemory};
use super::RingError;

/// The registers of one guest command queue, as the engine reads and writes them.
///
/// The guest may write any register at any time: an implementation returns what it loads,
/// unchecked (the engine masks every value), and never reads back a word the engine owns to
/// decide anything. Loads are single loads of the register (acquire where noted), stores single
/// stores (release where noted), so a guest on another CPU sees them in the order the engine
/// makes them. An error is a typed [`RingError`] naming the memory: the engine then treats the
/// queue as dead (nothing more is read or written) and reports the error on every poll.
///
/// The engine calls these once per poll (PROD), per batch (CONS) and per guest CMD_SYNC, never
/// per command, which is why [`HostRing`](super::HostRing) holds them as a trait object.
pub trait QueueRegisters: Send + Sync + fmt::Debug {
    /// What to call the registers in an error message (a file's path, `<heap>`, a device name).
    fn name(&self) -> &Path;

    /// The engine-owned words as they are when the engine attaches, and the guest's
    /// acknowledgement: where a new engine takes over (CONS, a pending error, the sync count).
    fn snapshot(&self) -> Result<RegisterSnapshot, RingError>;

    /// PROD as the guest wrote it (acquire: the slots it publishes are visible after it).
    fn prod(&self) -> Result<u32, RingError>;

    /// The guest's error acknowledgement (bit 0 is the GERRORN.CMDQ_ERR toggle), with acquire:
    /// a slot the guest fixed before acknowledging is visible after it.
    fn err_ack(&self) -> Result<u32, RingError>;

    /// Stores CONS: index and wrap, CONS.ERR in bits `[30:24]` (release: the guest that sees it
    /// may reuse every slot before it).
    fn set_cons(&self, cons: u32) -> Result<(), RingError>;

    /// Stores the error flag (bit 0 is GERROR.CMDQ_ERR), with release: a guest that sees the
    /// flag sees CONS and CONS.ERR.
    fn set_err(&self, err: u32) -> Result<(), RingError>;

    /// A guest CMD_SYNC completed: `msidata` is its MSIDATA when CS=IRQ, `count` the number of
    /// guest CMD_SYNCs completed on this queue (wrapping), stored last with release.
    fn sync_completed(&self, msidata: Option<u32>, count: u64) -> Result<(), RingError>;

    /// The SLEEPING word of these registers, if they have one the engine can sleep on: a u32 in
    /// memory both sides map, which the engine sets to 1 before it sleeps and the guest clears
    /// and wakes with a futex after it moved PROD or acknowledged an error (`ring::wake`).
    /// `None` (the default: a register page with no such word, an unsealed file read with
    /// system calls) keeps the worker that serves this queue polling with a bounded backoff
    /// whenever it is idle: nobody would wake it.
    fn wake_word(&self) -> Option<&AtomicU32> {
        None
    }

    /// Whether the memory can go away under the engine (an unsealed file): the engine then
    /// calls [`QueueRegisters::check`] on every poll. Asked once, at attach.
    fn may_shrink(&self) -> bool {
        false
    }

    /// `Ok` while the memory still holds the registers; [`RingError::Shrunk`] or an I/O error
    /// if not.
    fn check(&self) -> Result<(), RingError> {
        Ok(())
    }
}

/// The registers as [`QueueRegisters::snapshot`] found them, unchecked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegisterSnapshot {
    /// CONS with CONS.ERR, as the previous engine (or the creator) left it.
    pub cons: u32,
    /// The error flag (bit 0).
    pub err: u32,
    /// The guest's acknowledgement (bit 0).
    pub err_ack: u32,
    /// Guest CMD_SYNCs completed so far (the engine counts on from here).
    pub sync_count: u64,
}

/// The registers of a vcmdq ring header (`docs/ring-format.md`): PROD and ERR_ACK in the guest
/// line, CONS, ERR, COMPLETION and SYNC_COUNT in the engine line. The creator line is not read
/// here: whoever builds a [`HostRing`](super::HostRing) from parts gives the shape and vIOMMU.
///
/// Holds the ring's one-engine lock (see [`RingError::AlreadyAttached`]) for as long as it
/// lives: these words have one writer.
#[derive(Debug)]
pub struct HeaderRegisters {
    mem: HostMemory,
    /// Bytes the backing object must hold: a file shorter than this has shrunk.
    need: u64,
    _claim: Claim,
}

impl HeaderRegisters {
    /// The header at the start of `mem`: a whole ring's memory, or a page that holds only the
    /// header (the slots then live elsewhere). Refuses memory that may shrink under its mapping
    /// ([`RingError::Unsealed`]), memory shorter than a header ([`RingError::TooSmall`]), and
    /// memory another engine side holds ([`RingError::AlreadyAttached`]).
    pub fn new(mem: Arc<dyn RingMemory>) -> Result<HeaderRegisters, RingError> {
        if !mem.sealed() {
            return Err(RingError::Unsealed {
                path: mem.name().to_path_buf(),
            });
        }
        let len = mem.mapped_len() as u64;
        let need = layout::HEADER_SIZE as u64;
        if len < need {
            return Err(RingError::TooSmall {
                path: mem.name().to_path_buf(),
                len,
                need,
            });
        }
        Self::over(HostMemory::Mapped(Region::new(mem)), need)
    }

    /// The header at the start of `mem`, already checked to hold `need` bytes, and the lock.
    pub(crate) fn over(mem: HostMemory, need: u64) -> Result<HeaderRegisters, RingError> {
        let claim = Claim::take(&mem)?;
        Ok(HeaderRegisters {
            mem,
            need,
            _claim: claim,
        })
    }

    fn load_u32(&self, off: usize, order: Ordering) -> Result<u32, RingError> {
        self.mem
            .load_u32(off, order)
            .map_err(|e| self.mem.error(e, "read", self.need))
    }

    fn store_u32(&self, off: usize, v: u32, order: Ordering) -> Result<(), RingError> {
        self.mem
            .store_u32(off, v, order)
            .map_err(|e| self.mem.error(e, "write", self.need))
    }
}

impl QueueRegisters for HeaderRegisters {
    fn name(&self) -> &Path {
        self.mem.name()
    }

    fn snapshot(&self) -> Result<RegisterSnapshot, RingError> {
        Ok(RegisterSnapshot {
            cons: self.load_u32(layout::OFF_CONS, Ordering::Relaxed)?,
            err: self.load_u32(layout::OFF_ERR, Ordering::Relaxed)?,
            err_ack: self.load_u32(layout::OFF_ERR_ACK, Ordering::Acquire)?,
            sync_count: self
                .mem
                .load_u64(layout::OFF_SYNC_COUNT, Ordering::Relaxed)
                .map_err(|e| self.mem.error(e, "read", self.need))?,
        })
    }

    #[inline]
    fn prod(&self) -> Result<u32, RingError> {
        self.load_u32(layout::OFF_PROD, Ordering::Acquire)
    }

    fn err_ack(&self) -> Result<u32, RingError> {
        self.load_u32(layout::OFF_ERR_ACK, Ordering::Acquire)
    }

    #[inline]
    fn set_cons(&self, cons: u32) -> Result<(), RingError> {
        self.store_u32(layout::OFF_CONS, cons, Ordering::Release)
    }

    fn set_err(&self, err: u32) -> Result<(), RingError> {
        self.store_u32(layout::OFF_ERR, err, Ordering::Release)
    }

    fn sync_completed(&self, msidata: Option<u32>, count: u64) -> Result<(), RingError> {
        if let Some(m) = msidata {
            self.store_u32(layout::OFF_COMPLETION, m, Ordering::Relaxed)?;
        }
        self.mem
            .store_u64(layout::OFF_SYNC_COUNT, count, Ordering::Release)
            .map_err(|e| self.mem.error(e, "write", self.need))
    }

    fn wake_word(&self) -> Option<&AtomicU32> {
        match &self.mem {
            HostMemory::Mapped(r) => Some(r.u32_at(layout::OFF_SLEEPING)),
            HostMemory::File(_) => None,
        }
    }

    fn may_shrink(&self) -> bool {
        !self.mem.sealed()
    }

    fn check(&self) -> Result<(), RingError> {
        self.mem.check_len(self.need)
    }
}
