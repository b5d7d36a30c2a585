//! SMMUv3 commands: the 16-byte wire form, the field layouts, the typed view, decode and encode.
//!
//! `decode` is strict: an illegal opcode, a set RES0 bit, or range fields on a non-range TLB
//! invalidation are refused with an error naming the opcode and the bits. `encode(decode(x)) == x`
//! for every `x` that decodes.

mod layout;
mod raw;
mod span;
pub mod text;
mod typed;

pub use layout::{FieldDef, FieldKind, FieldRangeError, OpLayout};
pub use raw::RawCommand;
pub use span::{AtcSpan, Granule, SidSpan, TlbiSpan};
pub use typed::{layout_of, opcode, Command, LAYOUTS};

/// Why 16 bytes are not a well-formed command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The opcode is not one the SMMUv3 command queue defines.
    #[error("illegal opcode {opcode:#04x}")]
    IllegalOpcode {
        /// `d0[7:0]`.
        opcode: u8,
    },
    /// Bits that are RES0 for this opcode are set.
    #[error("{name} (opcode {opcode:#04x}) has RES0 bits set: d0 {d0:#018x}, d1 {d1:#018x}")]
    Res0 {
        /// `d0[7:0]`.
        opcode: u8,
        /// The spec name of the opcode.
        name: &'static str,
        /// The offending bits of `d0`.
        d0: u64,
        /// The offending bits of `d1`.
        d1: u64,
    },
    /// A TLB invalidation with TG=0 (the non-range form) has NUM or SCALE set.
    #[error("{name} (opcode {opcode:#04x}) has NUM={num}/SCALE={scale} with TG=0; the non-range form needs both 0")]
    RangeWithoutGranule {
        /// `d0[7:0]`.
        opcode: u8,
        /// The spec name of the opcode.
        name: &'static str,
        /// NUM, `d0[16:12]`.
        num: u8,
        /// SCALE, `d0[24:20]`.
        scale: u8,
    },
}

impl DecodeError {
    /// The opcode of the refused command.
    pub fn opcode(&self) -> u8 {
        match *self {
            DecodeError::IllegalOpcode { opcode }
            | DecodeError::Res0 { opcode, .. }
            | DecodeError::RangeWithoutGranule { opcode, .. } => opcode,
        }
    }
}

/// Bits of `raw` that are RES0 for its opcode, as `[d0, d1]`; `None` for an illegal opcode.
///
/// The hot path's check: one table load and two masks, no decode.
#[inline]
pub fn res0_bits(raw: &RawCommand) -> Option<[u64; 2]> {
    LAYOUTS[raw.opcode() as usize].map(|l| [raw.d0() & !l.allowed[0], raw.d1() & !l.allowed[1]])
}

/// Reads a command, refusing anything the spec calls illegal or malformed.
pub fn decode(raw: RawCommand) -> Result<Command, DecodeError> {
    let opcode = raw.opcode();
    let layout = LAYOUTS[opcode as usize].ok_or(DecodeError::IllegalOpcode { opcode })?;
    let (d0, d1) = (raw.d0() & !layout.allowed[0], raw.d1() & !layout.allowed[1]);
    if d0 | d1 != 0 {
        return Err(DecodeError::Res0 {
            opcode,
            name: layout.name,
            d0,
            d1,
        });
    }
    let cmd = Command::from_raw_fields(&raw).ok_or(DecodeError::IllegalOpcode { opcode })?;
    if let Some((tg, num, scale)) = cmd.range_fields() {
        if tg == 0 && (num != 0 || scale != 0) {
            return Err(DecodeError::RangeWithoutGranule {
                opcode,
                name: layout.name,
                num,
                scale,
            });
        }
    }
    Ok(cmd)
}

impl Command {
    /// The 16 bytes of a command that came from [`decode`] or whose fields fit their bits.
    ///
    /// # Panics
    /// If a field holds a value wider than its bits, which [`decode`] never produces; use
    /// [`Command::try_encode`] for commands built by hand.
    pub fn encode(&self) -> RawCommand {
        match self.try_encode() {
            Ok(raw) => raw,
            Err(e) => panic!("Command::encode: {e}"),
        }
    }

    /// The spec name of the opcode, e.g. `TLBI_NH_VA`.
    pub fn name(&self) -> &'static str {
        self.layout().name
    }
}

/// The spec name of `opcode`, or `None` if it is illegal.
pub fn opcode_name(opcode: u8) -> Option<&'static str> {
    LAYOUTS[opcode as usize].map(|l| l.name)
}
