//! The 16-byte wire form of a command: two little-endian 64-bit words.

use zerocopy::little_endian::U64;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// One SMMUv3 command exactly as it sits in a queue slot.
///
/// Alignment 1 so a slice of them can be viewed over any byte buffer; on x86-64 and AArch64 the
/// unaligned little-endian loads compile to plain loads.
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct RawCommand {
    d0: U64,
    d1: U64,
}

const _: () = assert!(core::mem::size_of::<RawCommand>() == RawCommand::SIZE);

impl RawCommand {
    /// Bytes in one command (and in one queue slot).
    pub const SIZE: usize = 16;

    /// A command from its two words.
    #[inline]
    pub const fn new(d0: u64, d1: u64) -> Self {
        Self {
            d0: U64::new(d0),
            d1: U64::new(d1),
        }
    }

    /// Word 0 (bytes 0..8).
    #[inline]
    pub fn d0(&self) -> u64 {
        self.d0.get()
    }

    /// Word 1 (bytes 8..16).
    #[inline]
    pub fn d1(&self) -> u64 {
        self.d1.get()
    }

    /// Word `i` (0 or 1).
    #[inline]
    pub fn word(&self, i: usize) -> u64 {
        if i == 0 {
            self.d0()
        } else {
            self.d1()
        }
    }

    /// Replaces word 0.
    #[inline]
    pub fn set_d0(&mut self, v: u64) {
        self.d0.set(v);
    }

    /// Replaces word 1.
    #[inline]
    pub fn set_d1(&mut self, v: u64) {
        self.d1.set(v);
    }

    /// The opcode, `d0[7:0]`.
    #[inline]
    pub fn opcode(&self) -> u8 {
        self.d0() as u8
    }

    /// The command from its 16 little-endian bytes.
    #[inline]
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        zerocopy::transmute!(bytes)
    }

    /// The command's 16 little-endian bytes.
    #[inline]
    pub fn to_bytes(self) -> [u8; 16] {
        zerocopy::transmute!(self)
    }
}

impl core::fmt::Debug for RawCommand {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "RawCommand({:#018x} {:#018x})", self.d0(), self.d1())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_little_endian_in_slot_order() {
        let c = RawCommand::new(0x0807_0605_0403_0201, 0x100f_0e0d_0c0b_0a09);
        let b = c.to_bytes();
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
        assert_eq!(RawCommand::from_bytes(b), c);
        assert_eq!(c.opcode(), 1);
    }

    #[test]
    fn slice_view_over_bytes() {
        let bytes: Vec<u8> = (0..48u8).collect();
        let cmds = <[RawCommand]>::ref_from_bytes(&bytes).unwrap();
        assert_eq!(cmds.len(), 3);
        assert_eq!(
            cmds[2].d0(),
            u64::from_le_bytes([32, 33, 34, 35, 36, 37, 38, 39])
        );
    }
}
