//! The byte layout of a guest ring: a 256-byte header, then 2^LOG2SIZE 16-byte slots.
//!
//! This is an interface other programs implement; `docs/ring-format.md` is its specification and
//! must change with this file. All multi-byte fields are little-endian. The header is three
//! 64-byte lines so the words each side writes never share a cache line with the other side's:
//! line 0 is written once by the creator, line 1 only by the guest, line 2 only by the engine.

use crate::queue::{QueueShape, MAX_LOG2SIZE};

/// `b"VCMDQRNG"` read as a little-endian u64: bytes 0..8 of every ring.
pub const MAGIC: u64 = u64::from_le_bytes(*b"VCMDQRNG");
/// The format version this code reads and writes.
pub const VERSION: u32 = 1;
/// Bytes before slot 0.
pub const HEADER_SIZE: usize = 256;
/// Bytes in one slot.
pub const SLOT_SIZE: usize = 16;

/// Offset of MAGIC (u64, creator).
pub const OFF_MAGIC: usize = 0;
/// Offset of VERSION (u32, creator).
pub const OFF_VERSION: usize = 8;
/// Offset of HEADER_SIZE (u32, creator): where slot 0 starts; 256 in version 1.
pub const OFF_HEADER_SIZE: usize = 12;
/// Offset of LOG2SIZE (u32, creator).
pub const OFF_LOG2SIZE: usize = 16;
/// Offset of VIOMMU_ID (u32, creator): the vIOMMU whose policy and tables translate this ring.
pub const OFF_VIOMMU_ID: usize = 20;
/// Offset of PROD (u32, guest): index and wrap bit; every other bit is ignored.
pub const OFF_PROD: usize = 64;
/// Offset of ERR_ACK (u32, guest): the GERRORN equivalent; bit 0 acknowledges an error.
pub const OFF_ERR_ACK: usize = 68;
/// Offset of CONS (u32, engine): index, wrap bit, CONS.ERR in bits `[30:24]`.
pub const OFF_CONS: usize = 128;
/// Offset of ERR (u32, engine): the GERROR.CMDQ_ERR equivalent; bit 0 differs from ERR_ACK
/// bit 0 while the ring is stopped on an error.
pub const OFF_ERR: usize = 132;
/// Offset of COMPLETION (u32, engine): MSIDATA of the last completed CMD_SYNC with CS=IRQ.
pub const OFF_COMPLETION: usize = 136;
/// Offset of SLEEPING (u32, engine sets 1, guest clears): 1 while the engine sleeps and wants a
/// kick after PROD or ERR_ACK moves (`ring::wake`); 0, as a ring is created, means no kick is
/// needed.
pub const OFF_SLEEPING: usize = 140;
/// Offset of SYNC_COUNT (u64, engine): guest CMD_SYNCs completed since the ring was attached.
pub const OFF_SYNC_COUNT: usize = 144;

/// Bytes a ring of `shape` needs: header and slots.
pub const fn ring_bytes(shape: QueueShape) -> usize {
    HEADER_SIZE + SLOT_SIZE * shape.entries() as usize
}

/// Bytes of the largest ring (LOG2SIZE 19): 8 MiB and the header.
pub const MAX_RING_BYTES: usize = HEADER_SIZE + SLOT_SIZE * (1 << MAX_LOG2SIZE);

/// Offset of the slot a pointer names (its index bits only).
#[inline]
pub const fn slot_offset(shape: QueueShape, ptr: u32) -> usize {
    HEADER_SIZE + SLOT_SIZE * shape.index(ptr) as usize
}

/// The creator-written line of the header, as copied out of the ring once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Bytes 0..8.
    pub magic: u64,
    /// VERSION.
    pub version: u32,
    /// HEADER_SIZE.
    pub header_size: u32,
    /// LOG2SIZE as stored (not yet checked).
    pub log2size: u32,
    /// VIOMMU_ID.
    pub viommu_id: u32,
}

/// Why an identity line is not one of a ring this code can use (without the file name, which
/// the caller adds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IdentityError {
    Magic(u64),
    Version(u32),
    HeaderSize(u32),
    Log2Size(u32),
    TooSmall { need: u64 },
}

impl Identity {
    /// Checks the identity against the mapping length: the shape of a ring that fits in `len`.
    pub(crate) fn validate(&self, len: u64) -> Result<QueueShape, IdentityError> {
        if self.magic != MAGIC {
            return Err(IdentityError::Magic(self.magic));
        }
        if self.version != VERSION {
            return Err(IdentityError::Version(self.version));
        }
        if self.header_size as usize != HEADER_SIZE {
            return Err(IdentityError::HeaderSize(self.header_size));
        }
        let shape = u8::try_from(self.log2size)
            .ok()
            .and_then(|l| QueueShape::new(l).ok())
            .ok_or(IdentityError::Log2Size(self.log2size))?;
        let need = ring_bytes(shape) as u64;
        if len < need {
            return Err(IdentityError::TooSmall { need });
        }
        Ok(shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_do_not_share_writers() {
        // Creator line, guest line, engine line: one 64-byte line each.
        for off in [
            OFF_MAGIC,
            OFF_VERSION,
            OFF_HEADER_SIZE,
            OFF_LOG2SIZE,
            OFF_VIOMMU_ID,
        ] {
            assert!(off < 64);
        }
        for off in [OFF_PROD, OFF_ERR_ACK] {
            assert!((64..128).contains(&off));
        }
        for off in [OFF_CONS, OFF_ERR, OFF_COMPLETION, OFF_SYNC_COUNT] {
            assert!((128..192).contains(&off));
        }
        assert_eq!(OFF_SYNC_COUNT % 8, 0);
        assert_eq!(HEADER_SIZE % 64, 0);
    }

    #[test]
    fn magic_bytes() {
        assert_eq!(MAGIC.to_le_bytes(), *b"VCMDQRNG");
    }

    #[test]
    fn sizes() {
        let s = QueueShape::new(0).unwrap();
        assert_eq!(ring_bytes(s), 272);
        let s = QueueShape::new(4).unwrap();
        assert_eq!(ring_bytes(s), 256 + 256);
        assert_eq!(slot_offset(s, 0x1f), 256 + 15 * 16);
        assert_eq!(MAX_RING_BYTES, 256 + (8 << 20));
    }

    #[test]
    fn validate_each_field() {
        let good = Identity {
            magic: MAGIC,
            version: VERSION,
            header_size: 256,
            log2size: 4,
            viommu_id: 9,
        };
        assert_eq!(good.validate(512).unwrap().log2size(), 4);
        assert_eq!(
            good.validate(511),
            Err(IdentityError::TooSmall { need: 512 })
        );
        let bad = Identity { magic: 1, ..good };
        assert_eq!(bad.validate(512), Err(IdentityError::Magic(1)));
        let bad = Identity { version: 2, ..good };
        assert_eq!(bad.validate(512), Err(IdentityError::Version(2)));
        let bad = Identity {
            header_size: 64,
            ..good
        };
        assert_eq!(bad.validate(512), Err(IdentityError::HeaderSize(64)));
        let bad = Identity {
            log2size: 20,
            ..good
        };
        assert_eq!(bad.validate(1 << 30), Err(IdentityError::Log2Size(20)));
        let bad = Identity {
            log2size: 1 << 8,
            ..good
        };
        assert_eq!(bad.validate(1 << 30), Err(IdentityError::Log2Size(256)));
    }
}
