//! The typed view: one variant per legal opcode of the spec tables, with named fields.
//!
//! A single declarative list below generates the enum, the opcode constants, the per-opcode
//! layouts (and so the RES0 masks), decode and encode, so a field's bit position is written once.

use super::layout::{allowed_mask, extract, insert, FieldDef, FieldKind, FieldType, OpLayout};
use super::raw::RawCommand;

macro_rules! commands {
    ($(
        $(#[doc = $doc:literal])*
        $op:literal $variant:ident $name:ident {
            $( $field:ident : $ty:ty = $word:literal [$hi:literal : $lo:literal] $kind:ident ),* $(,)?
        }
    )*) => {
        /// A decoded SMMUv3 command. Built by [`decode`](super::decode), which has already refused
        /// illegal opcodes and set RES0 bits; turned back into bytes by [`Command::encode`].
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Command {
            $(
                $(#[doc = $doc])*
                $variant {
                    $(
                        #[doc = concat!("`", stringify!($field), "`: `d", $word, "[", $hi, ":", $lo, "]`")]
                        $field: $ty,
                    )*
                },
            )*
        }

        /// The opcode of each legal command, by its spec name.
        pub mod opcode {
            $(
                #[doc = concat!("`", stringify!($name), "`")]
                pub const $name: u8 = $op;
            )*
        }

        /// The layout of each legal command, by its spec name.
        pub mod layout_of {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[doc = concat!("Where the fields of `", stringify!($name), "` sit.")]
                pub static $name: OpLayout = OpLayout {
                    opcode: $op,
                    name: stringify!($name),
                    fields: &[$(
                        FieldDef {
                            name: stringify!($field), word: $word, hi: $hi, lo: $lo,
                            kind: FieldKind::$kind,
                        },
                    )*],
                    allowed: allowed_mask(&[$(
                        FieldDef {
                            name: stringify!($field), word: $word, hi: $hi, lo: $lo,
                            kind: FieldKind::$kind,
                        },
                    )*]),
                };
            )*
        }

        /// The layout of every opcode, indexed by opcode; `None` for an illegal one.
        pub static LAYOUTS: [Option<&'static OpLayout>; 256] = {
            let mut t: [Option<&'static OpLayout>; 256] = [None; 256];
            $( t[$op] = Some(&layout_of::$name); )*
            t
        };

        impl Command {
            /// The opcode, `d0[7:0]`.
            pub fn opcode(&self) -> u8 {
                match self { $( Command::$variant { .. } => $op, )* }
            }

            /// The layout of this command's opcode.
            pub fn layout(&self) -> &'static OpLayout {
                match self { $( Command::$variant { .. } => &layout_of::$name, )* }
            }

            /// Reads the fields of an opcode known to be legal. RES0 is checked by the caller.
            pub(super) fn from_raw_fields(raw: &RawCommand) -> Option<Command> {
                let w = [raw.d0(), raw.d1()];
                let _ = w;
                Some(match raw.opcode() {
                    $(
                        $op => Command::$variant {
                            $( $field: <$ty as FieldType>::from_field(
                                extract(w[$word], $hi, $lo, FieldKind::$kind)), )*
                        },
                    )*
                    _ => return None,
                })
            }

            /// The 16 bytes of this command, or which field does not fit its bits.
            pub fn try_encode(&self) -> Result<RawCommand, super::layout::FieldRangeError> {
                let mut w = [0u64; 2];
                match *self {
                    $(
                        Command::$variant { $( $field ),* } => {
                            w[0] = $op;
                            $(
                                insert(&mut w, $word, $hi, $lo, FieldKind::$kind,
                                    FieldType::to_field($field))
                                .map_err(|()| super::layout::FieldRangeError {
                                    field: stringify!($field),
                                    value: FieldType::to_field($field),
                                    max: layout_of::$name.field(stringify!($field))
                                        .map_or(0, FieldDef::max_value),
                                    kind: FieldKind::$kind,
                                })?;
                            )*
                        }
                    )*
                }
                Ok(RawCommand::new(w[0], w[1]))
            }
        }
    };
}

commands! {
    /// Prefetch the configuration of a stream.
    0x01 PrefetchConfig PREFETCH_CONFIG {
        ssv: bool = 0[11:11] Flag, ssid: u32 = 0[31:12] Hex, sid: u32 = 0[63:32] Hex,
    }
    /// Prefetch the translation of an address.
    0x02 PrefetchAddr PREFETCH_ADDR {
        ssv: bool = 0[11:11] Flag, ssid: u32 = 0[31:12] Hex, sid: u32 = 0[63:32] Hex,
        size: u8 = 1[4:0] Num, addr: u64 = 1[63:12] Addr,
    }
    /// Invalidate the cached STE of one stream.
    0x03 CfgiSte CFGI_STE {
        ssec: bool = 0[10:10] Flag, sid: u32 = 0[63:32] Hex, leaf: bool = 1[0:0] Flag,
    }
    /// Invalidate the STEs of the aligned block of 2^(RANGE+1) streams holding SID.
    0x04 CfgiSteRange CFGI_STE_RANGE {
        ssec: bool = 0[10:10] Flag, sid: u32 = 0[63:32] Hex, range: u8 = 1[4:0] Num,
    }
    /// Invalidate one cached context descriptor.
    0x05 CfgiCd CFGI_CD {
        ssec: bool = 0[10:10] Flag, ssid: u32 = 0[31:12] Hex, sid: u32 = 0[63:32] Hex,
        leaf: bool = 1[0:0] Flag,
    }
    /// Invalidate every cached context descriptor of a stream.
    0x06 CfgiCdAll CFGI_CD_ALL {
        ssec: bool = 0[10:10] Flag, sid: u32 = 0[63:32] Hex,
    }
    /// Invalidate all stage-1 TLB entries of a VMID.
    0x10 TlbiNhAll TLBI_NH_ALL {
        vmid: u16 = 0[47:32] Num,
    }
    /// Invalidate the stage-1 TLB entries of one ASID of a VMID.
    0x11 TlbiNhAsid TLBI_NH_ASID {
        vmid: u16 = 0[47:32] Num, asid: u16 = 0[63:48] Num,
    }
    /// Invalidate stage-1 TLB entries of an address range of one ASID.
    0x12 TlbiNhVa TLBI_NH_VA {
        vmid: u16 = 0[47:32] Num, asid: u16 = 0[63:48] Num, addr: u64 = 1[63:12] Addr,
        tg: u8 = 1[11:10] Tg, num: u8 = 0[16:12] Num, scale: u8 = 0[24:20] Num,
        ttl: u8 = 1[9:8] Num, leaf: bool = 1[0:0] Flag,
    }
    /// Invalidate stage-1 TLB entries of an address range of every ASID.
    0x13 TlbiNhVaa TLBI_NH_VAA {
        vmid: u16 = 0[47:32] Num, addr: u64 = 1[63:12] Addr,
        tg: u8 = 1[11:10] Tg, num: u8 = 0[16:12] Num, scale: u8 = 0[24:20] Num,
        ttl: u8 = 1[9:8] Num, leaf: bool = 1[0:0] Flag,
    }
    /// Invalidate all EL3 TLB entries.
    0x18 TlbiEl3All TLBI_EL3_ALL {}
    /// Invalidate EL3 TLB entries of an address range.
    0x1a TlbiEl3Va TLBI_EL3_VA {
        addr: u64 = 1[63:12] Addr, tg: u8 = 1[11:10] Tg, num: u8 = 0[16:12] Num,
        scale: u8 = 0[24:20] Num, ttl: u8 = 1[9:8] Num, leaf: bool = 1[0:0] Flag,
    }
    /// Invalidate all EL2 TLB entries.
    0x20 TlbiEl2All TLBI_EL2_ALL {}
    /// Invalidate the EL2 TLB entries of one ASID.
    0x21 TlbiEl2Asid TLBI_EL2_ASID {
        asid: u16 = 0[63:48] Num,
    }
    /// Invalidate EL2 TLB entries of an address range of one ASID.
    0x22 TlbiEl2Va TLBI_EL2_VA {
        asid: u16 = 0[63:48] Num, addr: u64 = 1[63:12] Addr, tg: u8 = 1[11:10] Tg,
        num: u8 = 0[16:12] Num, scale: u8 = 0[24:20] Num, ttl: u8 = 1[9:8] Num,
        leaf: bool = 1[0:0] Flag,
    }
    /// Invalidate EL2 TLB entries of an address range of every ASID.
    0x23 TlbiEl2Vaa TLBI_EL2_VAA {
        addr: u64 = 1[63:12] Addr, tg: u8 = 1[11:10] Tg, num: u8 = 0[16:12] Num,
        scale: u8 = 0[24:20] Num, ttl: u8 = 1[9:8] Num, leaf: bool = 1[0:0] Flag,
    }
    /// Invalidate all stage-1 and stage-2 TLB entries of a VMID.
    0x28 TlbiS12Vmall TLBI_S12_VMALL {
        vmid: u16 = 0[47:32] Num,
    }
    /// Invalidate stage-2 TLB entries of an IPA range of a VMID.
    0x2a TlbiS2Ipa TLBI_S2_IPA {
        vmid: u16 = 0[47:32] Num, addr: u64 = 1[51:12] Addr, tg: u8 = 1[11:10] Tg,
        num: u8 = 0[16:12] Num, scale: u8 = 0[24:20] Num, ttl: u8 = 1[9:8] Num,
        leaf: bool = 1[0:0] Flag,
    }
    /// Invalidate all non-secure, non-hypervisor TLB entries.
    0x30 TlbiNsnhAll TLBI_NSNH_ALL {}
    /// Invalidate a device's ATC entries of a range (SIZE 52: everything).
    0x40 AtcInv ATC_INV {
        sid: u32 = 0[63:32] Hex, ssv: bool = 0[11:11] Flag, ssid: u32 = 0[31:12] Hex,
        global: bool = 0[9:9] Flag, addr: u64 = 1[63:12] Addr, size: u8 = 1[5:0] Num,
    }
    /// Answer a PRI page request group.
    0x41 PriResp PRI_RESP {
        sid: u32 = 0[63:32] Hex, ssv: bool = 0[11:11] Flag, ssid: u32 = 0[31:12] Hex,
        grpid: u16 = 1[8:0] Num, resp: u8 = 1[13:12] Num,
    }
    /// Resume or terminate a stalled transaction (RESP: 0 term, 1 retry, 2 abort).
    0x44 Resume RESUME {
        sid: u32 = 0[63:32] Hex, resp: u8 = 0[13:12] Num, stag: u16 = 1[15:0] Hex,
    }
    /// Terminate every stalled transaction of a stream.
    0x45 StallTerm STALL_TERM {
        sid: u32 = 0[63:32] Hex,
    }
    /// Complete everything before it; signal as CS says (0 none, 1 IRQ/MSI, 2 SEV).
    0x46 CmdSync CMD_SYNC {
        cs: u8 = 0[13:12] Num, msh: u8 = 0[23:22] Num, msiattr: u8 = 0[27:24] Num,
        msidata: u32 = 0[63:32] Hex, msiaddr: u64 = 1[51:2] Addr,
    }
}
