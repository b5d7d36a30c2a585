//! Guest command queues in shared memory.
//!
//! A ring is a 256-byte header and 2^LOG2SIZE 16-byte slots in a memory-mapped file or memfd
//! (`docs/ring-format.md` has the layout byte by byte). The guest side, [`GuestRing`], writes
//! commands, moves PROD, waits for CONS or for its CMD_SYNCs and acknowledges errors. The engine
//! side, [`HostRing`], treats the memory as hostile: it reads PROD once per [`HostRing::poll`],
//! copies each entry out exactly once with atomic loads, never reads back a word it owns, and
//! turns a PROD moved backwards or past a full ring into an idle poll and a counter.
//!
//! The engine side takes a queue's registers and its slots as two memories,
//! [`QueueRegisters`] and [`QueueSlots`] ([`HostRing::from_parts`]): a VMM's queue has PROD and
//! CONS in a register page and the slots in guest RAM. The ring format is one backing of both:
//! [`HeaderRegisters`] over the header, [`MemorySlots`] over the rest of the same memory.
//!
//! Both sides run over any [`RingMemory`]: a shared mapping ([`MmapMemory`]) or a heap block
//! ([`HeapMemory`]) for tests, miri and single-process use. The engine side never maps memory
//! that can shrink: an unsealed file is read and written with system calls (`access.rs`), so no
//! other process can make it fault. A ring has one engine side at a time (a lock on its file).

// Ring words are little-endian and are accessed as native atomics.
#[cfg(not(target_endian = "little"))]
compile_error!("vcmdq rings are little-endian; this host is not");

mod access;
mod guest;
mod host;
pub mod layout;
mod memory;
mod regs;
mod slots;
pub mod wake;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use guest::GuestRing;
pub use host::{AttachOptions, HostRing, Polled, RingStats};
pub use memory::{HeapMemory, MmapMemory, RingMemory, RING_ALIGN};
pub use regs::{HeaderRegisters, QueueRegisters, RegisterSnapshot};
pub use slots::{MemorySlots, QueueSlots};

use crate::command::RawCommand;
use crate::queue::{CError, QueueShape};
use layout::{Identity, IdentityError};
use memory::Region;

/// Why a ring could not be created, opened or attached, or why a guest wait ended early.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// A system call on the ring's file failed.
    #[error("ring {}: {op} failed: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done: `open`, `create`, `map`, `stat`, `memfd_create`, `seal`, ...
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is shorter than the header, or than the header and slots its LOG2SIZE needs.
    #[error("ring {}: file is {len} bytes, a ring needs at least {need}", path.display())]
    TooSmall {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// Bytes needed.
        need: u64,
    },
    /// Bytes 0..8 are not `VCMDQRNG`.
    #[error("ring {}: bad magic {found:#018x}, not a vcmdq ring (expected \"VCMDQRNG\")", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// Bytes 0..8 as a little-endian u64.
        found: u64,
    },
    /// A format version this code does not read.
    #[error("ring {}: format version {found}, this vcmdq reads version {}", path.display(), layout::VERSION)]
    BadVersion {
        /// The file.
        path: PathBuf,
        /// The VERSION field.
        found: u32,
    },
    /// HEADER_SIZE is not 256.
    #[error("ring {}: header size {found}, version 1 rings have {}", path.display(), layout::HEADER_SIZE)]
    BadHeaderSize {
        /// The file.
        path: PathBuf,
        /// The HEADER_SIZE field.
        found: u32,
    },
    /// LOG2SIZE above 19.
    #[error("ring {}: LOG2SIZE {found} is out of range 0..=19", path.display())]
    BadLog2Size {
        /// The file (or `<new>` for a ring being created).
        path: PathBuf,
        /// The LOG2SIZE asked for or found.
        found: u32,
    },
    /// A file that could shrink under the engine (not a memfd sealed with F_SEAL_SHRINK).
    #[error("ring {}: not a memfd sealed against shrinking (F_SEAL_SHRINK), so another process can truncate it under the engine. Share rings as sealed memfds (HostRing::create_sealed, GuestRing::create_sealed), or attach it with AttachOptions::allow_unsealed: the engine then reads it with system calls, never through a mapping, and detaches it with an error if it shrinks", path.display())]
    Unsealed {
        /// The file.
        path: PathBuf,
    },
    /// A file sealed against writes (F_SEAL_WRITE or F_SEAL_FUTURE_WRITE): the guest must write
    /// slots and PROD, the engine CONS.
    #[error("ring {}: the file is sealed against writes (F_SEAL_WRITE or F_SEAL_FUTURE_WRITE), but a ring is written by both sides: the guest writes slots and PROD, the engine CONS. Seal ring memfds with F_SEAL_SHRINK and F_SEAL_GROW only", path.display())]
    WriteSealed {
        /// The file.
        path: PathBuf,
    },
    /// Another engine side holds the ring: in this process or another one, through this path or
    /// another path to the same file. A ring has one engine, or every command is forwarded twice.
    #[error("ring {}: already attached to an engine (in this process or another; a ring has one engine, or its commands would be forwarded twice). Detach it there first", path.display())]
    AlreadyAttached {
        /// The file (or `<heap>`).
        path: PathBuf,
    },
    /// An unsealed file shrank below the ring after it was attached: the engine side reads and
    /// writes it no more, and must be detached.
    #[error("ring {}: file shrank to {len} bytes under the engine, the ring needs {need}; the engine reads and writes it no more", path.display())]
    Shrunk {
        /// The file.
        path: PathBuf,
        /// Its length now.
        len: u64,
        /// Bytes the ring needs.
        need: u64,
    },
    /// A queue's slot memory holds fewer slots than its LOG2SIZE needs.
    #[error("ring slots {}: the memory holds {have} slots, LOG2SIZE {log2size} needs {need}; give the queue more slot memory or a smaller LOG2SIZE", path.display())]
    SlotsTooSmall {
        /// The slot memory.
        path: PathBuf,
        /// Slots it holds.
        have: u64,
        /// The queue's LOG2SIZE.
        log2size: u8,
        /// Slots needed: 2^LOG2SIZE.
        need: u64,
    },
    /// Slot 0 is not 16-byte aligned in its memory.
    #[error("ring slots {}: slot 0 at byte offset {offset} is not a multiple of 16 (the slot size)", path.display())]
    SlotsMisaligned {
        /// The slot memory.
        path: PathBuf,
        /// The offset asked for.
        offset: u64,
    },
    /// A guest wait ended because the engine stopped the ring with an error at `slot`.
    #[error("ring stopped at slot {slot:#x} with {cerror}")]
    Stopped {
        /// CONS: the slot of the failing command.
        slot: u32,
        /// CONS.ERR.
        cerror: CError,
    },
    /// A guest wait timed out.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        waited: Duration,
    },
}

/// A guest and an engine side sharing one heap ring: the quickest way to test ring logic.
pub fn heap_pair(log2size: u8, viommu_id: u32) -> Result<(GuestRing, HostRing), RingError> {
    let guest = GuestRing::heap(log2size, viommu_id)?;
    let host = HostRing::attach_memory(guest.memory(), AttachOptions::default())?;
    Ok((guest, host))
}

fn shape_for(log2size: u8) -> Result<QueueShape, RingError> {
    QueueShape::new(log2size).map_err(|_| RingError::BadLog2Size {
        path: PathBuf::from("<new>"),
        found: log2size.into(),
    })
}

/// Writes the creator line of a fresh, zeroed ring.
fn init_header(region: &Region, shape: QueueShape, viommu_id: u32) {
    // The memory is not shared yet: order does not matter, atomics only because it is ring memory.
    region
        .u32_at(layout::OFF_VERSION)
        .store(layout::VERSION, Ordering::Relaxed);
    region
        .u32_at(layout::OFF_HEADER_SIZE)
        .store(layout::HEADER_SIZE as u32, Ordering::Relaxed);
    region
        .u32_at(layout::OFF_LOG2SIZE)
        .store(shape.log2size().into(), Ordering::Relaxed);
    region
        .u32_at(layout::OFF_VIOMMU_ID)
        .store(viommu_id, Ordering::Relaxed);
    region
        .u64_at(layout::OFF_MAGIC)
        .store(layout::MAGIC, Ordering::Release);
}

/// Reads the creator line once and checks it against the mapping: the ring's shape and vIOMMU.
fn validate(region: &Region) -> Result<(QueueShape, u32), RingError> {
    let len = region.len() as u64;
    if len < layout::HEADER_SIZE as u64 {
        return Err(RingError::TooSmall {
            path: region.memory().name().to_path_buf(),
            len,
            need: (layout::HEADER_SIZE + layout::SLOT_SIZE) as u64,
        });
    }
    let id = Identity {
        magic: region.u64_at(layout::OFF_MAGIC).load(Ordering::Acquire),
        version: region.u32_at(layout::OFF_VERSION).load(Ordering::Relaxed),
        header_size: region
            .u32_at(layout::OFF_HEADER_SIZE)
            .load(Ordering::Relaxed),
        log2size: region.u32_at(layout::OFF_LOG2SIZE).load(Ordering::Relaxed),
        viommu_id: region.u32_at(layout::OFF_VIOMMU_ID).load(Ordering::Relaxed),
    };
    validate_identity(region.memory().name(), id, len)
}

/// The creator line in a copy of the header.
fn identity_of(h: &[u8; layout::HEADER_SIZE]) -> Identity {
    let u32_at = |off: usize| u32::from_le_bytes(h[off..off + 4].try_into().expect("4 bytes"));
    Identity {
        magic: u64::from_le_bytes(h[..8].try_into().expect("8 bytes")),
        version: u32_at(layout::OFF_VERSION),
        header_size: u32_at(layout::OFF_HEADER_SIZE),
        log2size: u32_at(layout::OFF_LOG2SIZE),
        viommu_id: u32_at(layout::OFF_VIOMMU_ID),
    }
}

/// Checks a creator line against the ring's length: its shape and vIOMMU.
fn validate_identity(name: &Path, id: Identity, len: u64) -> Result<(QueueShape, u32), RingError> {
    let path = || name.to_path_buf();
    match id.validate(len) {
        Ok(shape) => Ok((shape, id.viommu_id)),
        Err(IdentityError::Magic(found)) => Err(RingError::BadMagic {
            path: path(),
            found,
        }),
        Err(IdentityError::Version(found)) => Err(RingError::BadVersion {
            path: path(),
            found,
        }),
        Err(IdentityError::HeaderSize(found)) => Err(RingError::BadHeaderSize {
            path: path(),
            found,
        }),
        Err(IdentityError::Log2Size(found)) => Err(RingError::BadLog2Size {
            path: path(),
            found,
        }),
        Err(IdentityError::TooSmall { need }) => Err(RingError::TooSmall {
            path: path(),
            len,
            need,
        }),
    }
}

/// Copies one slot out: two atomic loads, then the bytes are ours.
#[inline]
fn load_slot(slot: &[AtomicU64; 2]) -> RawCommand {
    RawCommand::new(
        slot[0].load(Ordering::Relaxed),
        slot[1].load(Ordering::Relaxed),
    )
}

/// Writes one slot: two atomic stores.
#[inline]
fn store_slot(slot: &[AtomicU64; 2], cmd: &RawCommand) {
    slot[0].store(cmd.d0(), Ordering::Relaxed);
    slot[1].store(cmd.d1(), Ordering::Relaxed);
}

/// The memory behind a new ring of `shape`, header written.
fn new_region(mem: Arc<dyn RingMemory>, shape: QueueShape, viommu_id: u32) -> Region {
    let region = Region::new(mem);
    init_header(&region, shape, viommu_id);
    region
}
