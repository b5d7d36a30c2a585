//! The translation policy, fast path: a batch of guest commands in, patched physical commands
//! and a per-slot account out.
//!
//! For each command, in this order (the first that applies decides):
//! 1. an opcode the SMMUv3 does not define: CERROR_ILL (`IllegalOpcode`);
//! 2. a RES0 bit set: CERROR_ILL (`Res0`), whatever the opcode and profile: a malformed command is
//!    illegal on any queue, and the control plane only ever sees well-formed ones;
//! 3. the profile: CFGI_STE and CFGI_STE_RANGE are trapped (handed to the control plane, in
//!    order), PREFETCH_* dropped (a hint; nothing to forward), CMD_SYNC ends the batch, commands
//!    the profile does not forward are CERROR_ILL (`NotAllowedByProfile`);
//! 4. SSEC set (CFGI_*): CERROR_ILL (`Secure`): a guest has no Secure state;
//! 5. what the physical SMMU does not have (its [`SmmuFeatures`]):
//!    TG, TTL, NUM or SCALE without range invalidation (`RangeUnsupported`), ASID\[15:8\] with
//!    8-bit ASIDs (`AsidTooLarge`), SSV, SSID or GLOBAL without substreams (`NoSubstreams`), an
//!    SSID beyond SSIDSIZE (`SsidTooLarge`); ATC_INV without ATS (`AtsUnsupported`);
//! 6. field values: ATC_INV with SIZE > 52 (`AtcSizeTooLarge`); the range encoding of
//!    TLBI_NH_VA/VAA (`MalformedRange`, `TtlWithoutGranule`, `GranuleUnsupported`,
//!    `ReservedRange`, `ReservedTtl`; see [`RefuseReason`]); CMD_SYNC with the reserved CS=3
//!    (`ReservedSyncCs`);
//! 7. ATC_INV, CFGI_CD, CFGI_CD_ALL: the vSID must be bound in this vIOMMU (`UnknownVsid`), and
//!    SID becomes its pSID.
//!
//! What is forwarded: TLBI_NH_ALL/ASID/VA/VAA with VMID overwritten by the vIOMMU's (the guest's
//! value is ignored, as the kernel does); TLBI_NSNH_ALL as TLBI_NH_ALL with that VMID and d1 zero;
//! ATC_INV (SSV/SSID and GLOBAL pass unchanged: they only narrow or widen what the guest's own
//! device drops from its ATC), CFGI_CD (SSID and LEAF pass) and CFGI_CD_ALL with the pSID. The
//! `tegra241` profile forwards only TLBI_NH_ASID, TLBI_NH_VA and ATC_INV.
//!
//! A guest CMD_SYNC is never forwarded (rule 1): it stops the batch as [`Stop::Sync`], a
//! completion point the engine honours itself once everything before it has completed (rule 2).
//! Its MSIADDR is returned only so the engine can complete the guest's sync in guest memory.

use crate::command::{opcode, RawCommand, LAYOUTS};
use crate::queue::CError;
use crate::viommu::{Profile, SmmuFeatures, Viommu, ViommuConfig, WithLookup};
use std::sync::{Arc, Mutex, Weak};

/// Why a command was refused. Every refusal is CERROR_ILL at that slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefuseReason {
    /// The opcode is not an SMMUv3 command.
    IllegalOpcode {
        /// `d0[7:0]`.
        opcode: u8,
    },
    /// Bits that are RES0 for the opcode are set.
    Res0 {
        /// `d0[7:0]`.
        opcode: u8,
        /// The offending bits of d0.
        d0: u64,
        /// The offending bits of d1.
        d1: u64,
    },
    /// A legal command the vIOMMU's profile does not let a guest issue.
    NotAllowedByProfile {
        /// `d0[7:0]`.
        opcode: u8,
    },
    /// SSEC is set: a guest has no Secure state.
    Secure {
        /// `d0[7:0]`.
        opcode: u8,
    },
    /// ATC_INV with SIZE above 52.
    AtcSizeTooLarge {
        /// SIZE, `d1[5:0]`.
        size: u8,
    },
    /// TG, TTL, NUM or SCALE set while the physical SMMU has no range invalidation
    /// (SMMU_IDR3.RIL = 0): they are RES0 there.
    RangeUnsupported {
        /// `d0[7:0]`.
        opcode: u8,
    },
    /// NUM or SCALE set with TG=0 (the non-range form).
    MalformedRange {
        /// `d0[7:0]`.
        opcode: u8,
    },
    /// TTL set with TG=0: a level without a granule has no meaning; TTL is RES0 then.
    TtlWithoutGranule {
        /// `d0[7:0]`.
        opcode: u8,
    },
    /// TG names a granule the physical SMMU does not support (SMMU_IDR5.GRAN4K/16K/64K).
    GranuleUnsupported {
        /// `d0[7:0]`.
        opcode: u8,
        /// TG: 1 4K, 2 16K, 3 64K.
        tg: u8,
    },
    /// TG != 0 with NUM = SCALE = TTL = 0: a reserved combination (CERROR_ILL).
    ReservedRange {
        /// `d0[7:0]`.
        opcode: u8,
    },
    /// A TTL the granule cannot have (TTL=1 with 16K without SMMU_IDR5.DS).
    ReservedTtl {
        /// `d0[7:0]`.
        opcode: u8,
        /// TG.
        tg: u8,
        /// TTL.
        ttl: u8,
    },
    /// ASID\[15:8\] set while the physical SMMU has 8-bit ASIDs (no SMMU_IDR0.ASID16).
    AsidTooLarge {
        /// `d0[7:0]`.
        opcode: u8,
        /// The ASID.
        asid: u16,
    },
    /// SSV, SSID or GLOBAL set while the physical SMMU has no substreams (SSIDSIZE = 0).
    NoSubstreams {
        /// `d0[7:0]`.
        opcode: u8,
    },
    /// An SSID that needs more bits than the physical SMMU's SSIDSIZE.
    SsidTooLarge {
        /// `d0[7:0]`.
        opcode: u8,
        /// The SSID.
        ssid: u32,
        /// SMMU_IDR1.SSIDSIZE.
        ssidsize: u8,
    },
    /// ATC_INV while the physical SMMU has no ATS (SMMU_IDR0.ATS = 0).
    AtsUnsupported,
    /// The SID is not a vSID bound in this vIOMMU.
    UnknownVsid {
        /// `d0[7:0]`.
        opcode: u8,
        /// The SID the guest wrote.
        vsid: u32,
    },
    /// CMD_SYNC with CS=3, a reserved value.
    ReservedSyncCs,
}

fn op_name(opcode: u8) -> String {
    match LAYOUTS[opcode as usize] {
        Some(l) => l.name.to_string(),
        None => format!("opcode {opcode:#04x}"),
    }
}

impl core::fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            RefuseReason::IllegalOpcode { opcode } => write!(f, "illegal opcode {opcode:#04x}"),
            RefuseReason::Res0 { opcode, d0, d1 } => write!(
                f,
                "{} has RES0 bits set (d0 {d0:#x}, d1 {d1:#x})",
                op_name(opcode)
            ),
            RefuseReason::NotAllowedByProfile { opcode } => {
                write!(
                    f,
                    "{} is not allowed by the vIOMMU's profile",
                    op_name(opcode)
                )
            }
            RefuseReason::Secure { opcode } => write!(f, "{} has SSEC set", op_name(opcode)),
            RefuseReason::AtcSizeTooLarge { size } => {
                write!(f, "ATC_INV SIZE {size} is above 52")
            }
            RefuseReason::RangeUnsupported { opcode } => write!(
                f,
                "{} has range fields (TG/TTL/NUM/SCALE) and the SMMU has no range invalidation \
                 (RIL)",
                op_name(opcode)
            ),
            RefuseReason::MalformedRange { opcode } => {
                write!(f, "{} has NUM/SCALE set with TG=0", op_name(opcode))
            }
            RefuseReason::TtlWithoutGranule { opcode } => {
                write!(
                    f,
                    "{} has TTL set with TG=0 (TTL is RES0 then)",
                    op_name(opcode)
                )
            }
            RefuseReason::GranuleUnsupported { opcode, tg } => write!(
                f,
                "{} has TG={tg} ({}), a granule the SMMU does not support",
                op_name(opcode),
                ["-", "4K", "16K", "64K"][usize::from(tg & 3)]
            ),
            RefuseReason::ReservedRange { opcode } => write!(
                f,
                "{} has TG set with NUM=SCALE=TTL=0, a reserved combination",
                op_name(opcode)
            ),
            RefuseReason::ReservedTtl { opcode, tg, ttl } => write!(
                f,
                "{} has TTL={ttl}, a level the {} granule cannot have on this SMMU",
                op_name(opcode),
                ["-", "4K", "16K", "64K"][usize::from(tg & 3)]
            ),
            RefuseReason::AsidTooLarge { opcode, asid } => write!(
                f,
                "{} has ASID {asid:#x} and the SMMU has 8-bit ASIDs (no ASID16)",
                op_name(opcode)
            ),
            RefuseReason::NoSubstreams { opcode } => write!(
                f,
                "{} has SSV/SSID/GLOBAL set and the SMMU has no substreams (SSIDSIZE 0)",
                op_name(opcode)
            ),
            RefuseReason::SsidTooLarge {
                opcode,
                ssid,
                ssidsize,
            } => write!(
                f,
                "{} has SSID {ssid:#x}, beyond the SMMU's SSIDSIZE {ssidsize}",
                op_name(opcode)
            ),
            RefuseReason::AtsUnsupported => f.write_str("ATC_INV and the SMMU has no ATS"),
            RefuseReason::UnknownVsid { opcode, vsid } => write!(
                f,
                "{} names vSID {vsid:#x}, not bound in this vIOMMU",
                op_name(opcode)
            ),
            RefuseReason::ReservedSyncCs => f.write_str("CMD_SYNC has the reserved CS=3"),
        }
    }
}

/// Why [`translate`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Every input command was handled.
    Drained,
    /// `out` (or `prov`) is full; the next input command needs room.
    OutputFull,
    /// A guest CMD_SYNC at `slot`: the batch ends here. The engine completes it after everything
    /// before it has completed. `msiaddr` is a guest address.
    Sync {
        /// Its index in `input`.
        slot: usize,
        /// CS: 0 none, 1 IRQ (MSI), 2 SEV.
        cs: u8,
        /// MSIDATA.
        msidata: u32,
        /// MSIADDR, bits `[51:2]` in place.
        msiaddr: u64,
    },
    /// A command for the control plane at `slot`; the ring pauses until it is handled.
    Trap {
        /// Its index in `input`.
        slot: usize,
        /// The command as the guest wrote it.
        cmd: RawCommand,
    },
    /// The command at `slot` is refused: the guest ring stops there with CONS.ERR = `cerror`.
    Refused {
        /// Its index in `input`.
        slot: usize,
        /// The CONS.ERR value.
        cerror: CError,
        /// Why.
        reason: RefuseReason,
    },
}

/// What one [`translate`] call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchEnd {
    /// Input commands fully handled (forwarded, dropped, the sync, the trap); a refused slot is
    /// not consumed.
    pub consumed: usize,
    /// Commands written to `out` (and entries to `prov`).
    pub produced: usize,
    /// Why it stopped.
    pub stop: Stop,
}

/// What became of one guest command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotOutcome {
    /// Forwarded to the physical queue as this command.
    Forwarded(RawCommand),
    /// A guest CMD_SYNC: a completion point the engine honours itself.
    Sync {
        /// CS.
        cs: u8,
        /// MSIDATA.
        msidata: u32,
        /// MSIADDR (a guest address).
        msiaddr: u64,
    },
    /// Dropped by rule (PREFETCH_*).
    Dropped,
    /// Handed to the control plane.
    Trapped(RawCommand),
    /// Refused: the ring stops here with this CONS.ERR.
    Refused {
        /// The CONS.ERR value.
        cerror: CError,
        /// Why.
        reason: RefuseReason,
    },
    /// After a refused command, the queue never got here.
    NotReached,
}

impl BatchEnd {
    /// What became of each input command the [`translate`] call that returned this handled, in
    /// input order: the consumed ones, then the refused one if it stopped on a refusal. `out`
    /// and `prov` are what that call wrote.
    pub fn outcomes<'a>(
        &'a self,
        out: &'a [RawCommand],
        prov: &'a [u32],
    ) -> impl Iterator<Item = SlotOutcome> + 'a {
        let mut j = 0;
        let consumed = (0..self.consumed).map(move |i| {
            if j < self.produced && prov[j] as usize == i {
                j += 1;
                return SlotOutcome::Forwarded(out[j - 1]);
            }
            match self.stop {
                Stop::Sync {
                    slot,
                    cs,
                    msidata,
                    msiaddr,
                } if slot == i => SlotOutcome::Sync {
                    cs,
                    msidata,
                    msiaddr,
                },
                Stop::Trap { slot, cmd } if slot == i => SlotOutcome::Trapped(cmd),
                _ => SlotOutcome::Dropped,
            }
        });
        let refused = match self.stop {
            Stop::Refused { cerror, reason, .. } => Some(SlotOutcome::Refused { cerror, reason }),
            _ => None,
        };
        consumed.chain(refused)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Illegal,
    NotAllowed,
    /// TLBI_NH_ALL, TLBI_NH_ASID: VMID.
    Tlbi,
    /// TLBI_NH_VA, TLBI_NH_VAA: range checks, VMID.
    TlbiRange,
    /// TLBI_NSNH_ALL -> TLBI_NH_ALL.
    Nsnh,
    AtcInv,
    /// ATC_INV on an SMMU without ATS.
    NoAts,
    /// CFGI_CD, CFGI_CD_ALL: SSEC, SID.
    CfgiSid,
    /// CFGI_STE, CFGI_STE_RANGE: SSEC, then to the control plane.
    Trap,
    Drop,
    Sync,
}

/// One entry per opcode: its allowed bits and what the profile does with it, so that the RES0
/// check and the dispatch cost one table load.
///
/// `reject` is the complement of the opcode's allowed bits, plus the bits the policy refuses on
/// a command the profile takes: SSEC of CFGI_*, and what the physical SMMU lacks (TG/TTL/NUM/
/// SCALE without range invalidation, ASID[15:8] with 8-bit ASIDs, SSV/SSID/GLOBAL beyond its
/// substreams). One mask test then covers RES0, Secure and the SMMU's features; the cold path
/// tells them apart. The value checks of a forwarded command are data too (`range_ok`,
/// `size_max`), so the hot loop tests them without asking which opcode it has.
#[derive(Clone, Copy)]
struct Rule {
    reject: [u64; 2],
    /// The bits the vIOMMU's VMID replaces (VMID for TLBIs, else 0).
    vmid_mask: u64,
    /// For TLBI_NH_VA/VAA: bit `TG << 2 | TTL` of `range_ok[n]` is set when that TG and TTL are
    /// a valid encoding with (n = 1) or without (n = 0) NUM/SCALE. All ones for other opcodes.
    range_ok: [u16; 2],
    /// The largest `d1[5:0]` allowed: 52 for ATC_INV's SIZE, 63 (no check) otherwise.
    size_max: u8,
    action: Action,
    /// `F_*`: forwarded by the hot loop, and whether its SID is a vSID.
    flags: u8,
}

/// Forwarded after the checks and patches below; every other action takes the slow match.
const F_FORWARD: u8 = 1;
/// SID is a vSID to replace with its pSID.
const F_SID: u8 = 16;

/// The translation rules of a vIOMMU: its profile on its physical SMMU, one `Rule` per
/// opcode, the same rules as tables for the SIMD kernels, and the kernel this CPU runs. Built
/// when a vIOMMU with a new profile, range invalidation setting and SMMU is created, and shared
/// by every vIOMMU with the same three (`RuleTable::for_config`).
pub struct RuleTable {
    rules: [Rule; 256],
    simd: SimdTables,
    kernel: Kernel,
}

/// What a [`RuleTable`] is built from: all of a vIOMMU's configuration that the rules read.
type RuleKey = (Profile, bool, SmmuFeatures);

impl RuleTable {
    /// The rules for a vIOMMU configured as `cfg`: the table of every live vIOMMU with the same
    /// profile, range invalidation and physical SMMU features, or a new one. Shared because a
    /// worker serving many guests (a vIOMMU each, mostly alike) would otherwise walk a table
    /// of its own per guest, 9 KiB each, which fall out of the caches between batches: with
    /// 256 rings on 256 vIOMMUs they did. Control plane only (a lock and, the first time, an
    /// allocation).
    pub(crate) fn for_config(cfg: &ViommuConfig) -> Arc<RuleTable> {
        static SHARED: Mutex<Vec<(RuleKey, Weak<RuleTable>)>> = Mutex::new(Vec::new());
        let key = (cfg.profile, cfg.range_inv, cfg.features);
        let mut shared = crate::sync::lock(&SHARED);
        shared.retain(|(_, t)| t.strong_count() > 0);
        if let Some(t) = shared
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, t)| t.upgrade())
        {
            return t;
        }
        let rules = rules(cfg.profile, cfg.range_inv, &cfg.features);
        let t = Arc::new(RuleTable {
            simd: SimdTables::new(&rules),
            rules,
            kernel: Kernel::best(),
        });
        shared.push((key, Arc::downgrade(&t)));
        t
    }
}

/// Which implementation of the forward loop (the common case: commands forwarded as they are,
/// with their VMID or pSID) [`translate`] runs. Every kernel gives the same outcome for every
/// input; they differ in how many commands they check at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// One command at a time; every CPU.
    Scalar,
    /// Two commands per 256-bit register (x86_64 with AVX2).
    Avx2,
    /// Four commands per 512-bit register (x86_64 with AVX-512 F, BW, VL and VBMI).
    Avx512,
}

impl Kernel {
    /// Every kernel, narrowest first.
    pub const ALL: [Kernel; 3] = [Kernel::Scalar, Kernel::Avx2, Kernel::Avx512];

    /// Whether this CPU can run the kernel (runtime feature detection; cached by std). Under
    /// miri only the scalar kernel: miri does not implement the SIMD intrinsics they use.
    pub fn is_supported(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(all(target_arch = "x86_64", not(miri)))]
            Kernel::Avx2 => x86::avx2_detected(),
            #[cfg(all(target_arch = "x86_64", not(miri)))]
            Kernel::Avx512 => x86::avx512_detected(),
            #[cfg(not(all(target_arch = "x86_64", not(miri))))]
            Kernel::Avx2 | Kernel::Avx512 => false,
        }
    }

    /// The widest kernel this CPU supports: what [`translate`] runs.
    pub fn best() -> Kernel {
        Kernel::ALL
            .into_iter()
            .rev()
            .find(|k| k.is_supported())
            .unwrap_or(Kernel::Scalar)
    }

    /// Its name: `scalar`, `avx2`, `avx512`.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512 => "avx512",
        }
    }
}

impl core::fmt::Display for Kernel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// [`translate_with`] was asked for a kernel this CPU cannot run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the {kernel} translation kernel needs CPU features this machine lacks (see \
     Kernel::is_supported; Kernel::best() names the widest it has)"
)]
pub struct UnsupportedKernel {
    /// The kernel asked for.
    pub kernel: Kernel,
}

/// The rules of the opcodes forwarded as they are, as tables the SIMD kernels index by class
/// (1..=7; class 0 is every other opcode, which the scalar loop handles). Built from the
/// scalar [`Rule`]s, so the kernels cannot disagree with them on what a rule says.
#[derive(Clone)]
#[repr(C, align(64))]
#[cfg_attr(not(all(target_arch = "x86_64", not(miri))), allow(dead_code))]
struct SimdTables {
    /// AVX-512, by `opcode & 0x7f`: `class * 2`, plus [`SimdTables::SID`] for a SID command.
    cls: [u8; 128],
    /// AVX-512, by `class * 2 + word`: the rejected bits (with opcode bit 7: every class's
    /// opcode is below 0x80, so the 7-bit index above is exact).
    reject: [u64; 16],
    /// AVX-512, by `class * 2 + word`: the invalid values, bit `SIZE` (`d1[5:0]`) for word 0
    /// and bit `TG << 2 | TTL` (+ 16 with NUM/SCALE) for word 1. All ones for class 0.
    bad: [u64; 16],
    /// AVX-512, by `class * 2 + word`: the bits the VMID replaces.
    patch: [u64; 16],
    /// AVX2, by opcode: the class.
    class: [u8; 256],
    /// AVX2, by class: the same rule.
    rows: [SimdRow; 8],
}

/// One class's rule, for the AVX2 kernel's two 16-byte loads per command.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
#[cfg_attr(not(all(target_arch = "x86_64", not(miri))), allow(dead_code))]
struct SimdRow {
    reject: [u64; 2],
    bad: [u64; 2],
    patch: [u64; 2],
    /// Non-zero for a SID command.
    sid: u64,
}

impl SimdTables {
    /// The flag in `cls` of a class whose SID is a vSID (bit 4: above `class * 2 + word`).
    #[cfg_attr(not(all(target_arch = "x86_64", not(miri))), allow(dead_code))]
    const SID: u8 = 0x10;

    fn new(rules: &[Rule; 256]) -> SimdTables {
        let mut rows = [SimdRow {
            reject: [!0, !0],
            bad: [!0, !0],
            patch: [0, 0],
            sid: 0,
        }; 8];
        let mut cls = [0u8; 128];
        let mut class = [0u8; 256];
        let mut next = 1;
        for (op, r) in rules.iter().enumerate() {
            // More than 7 such opcodes (none today) or one above 0x7f would be left to the
            // scalar loop, still correct.
            if r.flags & F_FORWARD == 0 || op >= 0x80 || next == rows.len() {
                continue;
            }
            let size_bad = match r.size_max {
                63.. => 0,
                m => !0u64 << (m + 1),
            };
            let range_ok = u64::from(r.range_ok[0]) | u64::from(r.range_ok[1]) << 16;
            rows[next] = SimdRow {
                reject: [r.reject[0] | 0x80, r.reject[1]],
                bad: [size_bad, !range_ok & 0xffff_ffff],
                patch: [r.vmid_mask, 0],
                sid: u64::from(r.flags & F_SID != 0),
            };
            cls[op] = (next as u8) << 1 | if r.flags & F_SID != 0 { Self::SID } else { 0 };
            class[op] = next as u8;
            next += 1;
        }
        let (mut reject, mut bad, mut patch) = ([0; 16], [0; 16], [0; 16]);
        for (c, row) in rows.iter().enumerate() {
            reject[2 * c..2 * c + 2].copy_from_slice(&row.reject);
            bad[2 * c..2 * c + 2].copy_from_slice(&row.bad);
            patch[2 * c..2 * c + 2].copy_from_slice(&row.patch);
        }
        SimdTables {
            cls,
            reject,
            bad,
            patch,
            class,
            rows,
        }
    }
}

/// The valid (TG, TTL) encodings of a range TLBI on an SMMU with `f`, without and with
/// NUM/SCALE (the module docs and docs/rules.md, "Range invalidation").
fn range_encodings(f: &SmmuFeatures) -> [u16; 2] {
    let mut ok = [0u16; 2];
    for (ns, mask) in ok.iter_mut().enumerate() {
        for k in 0..16u8 {
            let (tg, ttl) = (k >> 2, k & 3);
            let valid = if tg == 0 {
                ns == 0 && ttl == 0
            } else if ttl == 0 {
                f.granule(tg) && ns == 1
            } else {
                f.granule(tg) && f.ttl(tg, ttl)
            };
            *mask |= u16::from(valid) << k;
        }
    }
    ok
}

fn set(t: &mut [Rule; 256], op: u8, action: Action, range_inv: bool, f: &SmmuFeatures) {
    let action = match action {
        Action::AtcInv if !f.ats => Action::NoAts,
        a => a,
    };
    let r = &mut t[op as usize];
    r.action = action;
    (r.flags, r.vmid_mask) = match action {
        Action::Tlbi => (F_FORWARD, VMID_MASK),
        Action::TlbiRange => {
            r.range_ok = range_encodings(f);
            (F_FORWARD, VMID_MASK)
        }
        Action::AtcInv => {
            r.size_max = ATC_SIZE_ALL as u8;
            (F_FORWARD | F_SID, 0)
        }
        Action::CfgiSid => (F_FORWARD | F_SID, 0),
        _ => (0, 0),
    };
    match action {
        Action::CfgiSid | Action::Trap => r.reject[0] |= SSEC,
        Action::TlbiRange if !range_inv => {
            r.reject[0] |= NUM_SCALE_MASK;
            r.reject[1] |= TG_MASK | TTL_MASK;
        }
        _ => {}
    }
    if matches!(action, Action::Tlbi | Action::TlbiRange) && !f.asid16 {
        // Only the opcodes with an ASID field: for the others these bits are RES0 already.
        r.reject[0] |= ASID_HIGH & !r.reject[0] & layout_allowed(op);
    }
    // SSIDs need at most SSIDSIZE bits; with none, SSV and GLOBAL are refused too.
    let ssid_beyond = SSID_MASK & !((1u64 << (SSID_SHIFT + u32::from(f.ssidsize))) - 1);
    match (action, op) {
        (Action::AtcInv, _) => {
            r.reject[0] |= ssid_beyond;
            if f.ssidsize == 0 {
                r.reject[0] |= SSV | GLOBAL;
            }
        }
        (Action::CfgiSid, opcode::CFGI_CD) => r.reject[0] |= ssid_beyond,
        _ => {}
    }
}

fn layout_allowed(op: u8) -> u64 {
    LAYOUTS[op as usize].map_or(0, |l| l.allowed[0])
}

fn rules(profile: Profile, range_inv: bool, f: &SmmuFeatures) -> [Rule; 256] {
    let mut t = [Rule {
        reject: [!0, !0],
        vmid_mask: 0,
        range_ok: [!0, !0],
        size_max: ATC_SIZE_MASK as u8,
        action: Action::Illegal,
        flags: 0,
    }; 256];
    for (op, rule) in t.iter_mut().enumerate() {
        if let Some(l) = LAYOUTS[op] {
            rule.reject = [!l.allowed[0], !l.allowed[1]];
            rule.action = Action::NotAllowed;
        }
    }
    let r = range_inv;
    set(&mut t, opcode::CFGI_STE, Action::Trap, r, f);
    set(&mut t, opcode::CFGI_STE_RANGE, Action::Trap, r, f);
    set(&mut t, opcode::PREFETCH_CONFIG, Action::Drop, r, f);
    set(&mut t, opcode::PREFETCH_ADDR, Action::Drop, r, f);
    set(&mut t, opcode::CMD_SYNC, Action::Sync, r, f);
    set(&mut t, opcode::TLBI_NH_ASID, Action::Tlbi, r, f);
    set(&mut t, opcode::TLBI_NH_VA, Action::TlbiRange, r, f);
    set(&mut t, opcode::ATC_INV, Action::AtcInv, r, f);
    if let Profile::Kernel = profile {
        set(&mut t, opcode::TLBI_NH_ALL, Action::Tlbi, r, f);
        set(&mut t, opcode::TLBI_NH_VAA, Action::TlbiRange, r, f);
        set(&mut t, opcode::TLBI_NSNH_ALL, Action::Nsnh, r, f);
        set(&mut t, opcode::CFGI_CD, Action::CfgiSid, r, f);
        set(&mut t, opcode::CFGI_CD_ALL, Action::CfgiSid, r, f);
    }
    t
}

/// VMID, `d0[47:32]`.
const VMID_MASK: u64 = 0xffff << 32;
/// The upper byte of ASID, `d0[63:56]`.
const ASID_HIGH: u64 = 0xff << 56;
/// SID, `d0[63:32]`.
const SID_SHIFT: u32 = 32;
/// SSEC, `d0[10]`.
const SSEC: u64 = 1 << 10;
/// SSV, `d0[11]`.
const SSV: u64 = 1 << 11;
/// ATC_INV GLOBAL, `d0[9]`.
const GLOBAL: u64 = 1 << 9;
/// SSID, `d0[31:12]`.
const SSID_MASK: u64 = 0xf_ffff << SSID_SHIFT;
const SSID_SHIFT: u32 = 12;
/// NUM `d0[16:12]` and SCALE `d0[24:20]`.
pub(crate) const NUM_SCALE_MASK: u64 = (0x1f << 12) | (0x1f << 20);
/// TTL, `d1[9:8]`.
const TTL_MASK: u64 = 0b11 << 8;
/// TG, `d1[11:10]`.
const TG_MASK: u64 = 0b11 << 10;
/// TG and TTL, `d1[11:8]`, read as one 4-bit index `TG << 2 | TTL`.
const TG_TTL_SHIFT: u32 = 8;
/// ATC_INV SIZE, `d1[5:0]`.
const ATC_SIZE_MASK: u64 = 0x3f;
/// The SIZE that means "the whole address space".
const ATC_SIZE_ALL: u64 = 52;
/// CMD_SYNC CS, `d0[13:12]`.
const CS_SHIFT: u32 = 12;
/// CMD_SYNC MSIADDR, `d1[51:2]`.
const MSIADDR_MASK: u64 = ((1 << 52) - 1) & !0b11;

/// Whether the range fields of `d0`/`d1` are an encoding `rule` accepts.
#[inline(always)]
fn range_valid(rule: &Rule, d0: u64, d1: u64) -> bool {
    let k = (d1 >> TG_TTL_SHIFT) & 0xf;
    let ns = usize::from(d0 & NUM_SCALE_MASK != 0);
    (rule.range_ok[ns] >> k) & 1 != 0
}

/// Why a command failed the mask test: a RES0 bit (by the opcode's layout) first, then the
/// policy bits folded into the mask (the precedence of the module docs).
#[cold]
fn rejected(rule: &Rule, d0: u64, d1: u64) -> RefuseReason {
    let opcode = d0 as u8;
    let Some(layout) = LAYOUTS[opcode as usize] else {
        return RefuseReason::IllegalOpcode { opcode };
    };
    let (x0, x1) = (d0 & !layout.allowed[0], d1 & !layout.allowed[1]);
    if x0 | x1 != 0 {
        return RefuseReason::Res0 {
            opcode,
            d0: x0,
            d1: x1,
        };
    }
    let (r0, r1) = (d0 & rule.reject[0], d1 & rule.reject[1]);
    if r0 & SSEC != 0 {
        return RefuseReason::Secure { opcode };
    }
    if rule.action == Action::TlbiRange
        && (r0 & NUM_SCALE_MASK != 0 || r1 & (TG_MASK | TTL_MASK) != 0)
    {
        return RefuseReason::RangeUnsupported { opcode };
    }
    if r0 & ASID_HIGH != 0 {
        return RefuseReason::AsidTooLarge {
            opcode,
            asid: (d0 >> 48) as u16,
        };
    }
    // What is left is a substream check: the SSID bits the rule refuses start at SSIDSIZE.
    let ssidsize = ((rule.reject[0] & SSID_MASK).trailing_zeros() - SSID_SHIFT) as u8;
    if ssidsize == 0 {
        RefuseReason::NoSubstreams { opcode }
    } else {
        RefuseReason::SsidTooLarge {
            opcode,
            ssid: ((d0 & SSID_MASK) >> SSID_SHIFT) as u32,
            ssidsize,
        }
    }
}

/// Which value check of a forwarded command failed.
#[cold]
fn field_reason(rule: &Rule, d0: u64, d1: u64) -> RefuseReason {
    let opcode = d0 as u8;
    if rule.action == Action::AtcInv {
        return RefuseReason::AtcSizeTooLarge {
            size: (d1 & ATC_SIZE_MASK) as u8,
        };
    }
    let tg = ((d1 & TG_MASK) >> 10) as u8;
    let ttl = ((d1 & TTL_MASK) >> 8) as u8;
    let ns = d0 & NUM_SCALE_MASK != 0;
    if tg == 0 {
        return if ns {
            RefuseReason::MalformedRange { opcode }
        } else {
            RefuseReason::TtlWithoutGranule { opcode }
        };
    }
    // A supported granule takes TTL=0 with NUM/SCALE.
    if (rule.range_ok[1] >> (tg << 2)) & 1 == 0 {
        return RefuseReason::GranuleUnsupported { opcode, tg };
    }
    if !ns && ttl == 0 {
        return RefuseReason::ReservedRange { opcode };
    }
    RefuseReason::ReservedTtl { opcode, tg, ttl }
}

/// Translates guest commands copied out of a ring into physical commands for vIOMMU `v`.
///
/// Writes the forwarded commands to `out[..produced]` and, for each, its index in `input` to
/// `prov`. Stops at the first guest CMD_SYNC, trapped or refused command, when `out` or `prov`
/// is full and another command must be forwarded, or at the end of `input`. Copies and patches
/// in one pass; no allocation, no lock, no atomic read-modify-write; a radix lookup only for
/// SID-carrying commands.
///
/// The caller holds a [`Pinned`](crate::viommu::Pinned) guard of the engine's grace domain from
/// before this call until `out` is published, so that unbinds are barriers (rule 5).
///
/// Runs the widest [`Kernel`] this CPU supports, chosen once when the vIOMMU was created.
pub fn translate(
    v: &Viommu,
    input: &[RawCommand],
    out: &mut [RawCommand],
    prov: &mut [u32],
) -> BatchEnd {
    translate_numbered(v, input, 0, out, prov)
}

/// [`translate`] with input i numbered `first + i` (wrapping) in `prov` instead of `i`: the
/// engine numbers each command by its guest sequence number, so that the provenance it keeps
/// per physical slot is written by the translation itself. Same outcome otherwise.
pub fn translate_numbered(
    v: &Viommu,
    input: &[RawCommand],
    first: u32,
    out: &mut [RawCommand],
    prov: &mut [u32],
) -> BatchEnd {
    #[cfg(test)]
    if let Some(k) = tests::forced_kernel() {
        return run_kernel(k, v, input, first, out, prov);
    }
    run_kernel(v.rules().kernel, v, input, first, out, prov)
}

/// [`translate`] with the forward loop of `kernel`, whichever this CPU would choose: for tests
/// and benchmarks that check or measure each kernel. Every kernel gives the same result.
pub fn translate_with(
    kernel: Kernel,
    v: &Viommu,
    input: &[RawCommand],
    out: &mut [RawCommand],
    prov: &mut [u32],
) -> Result<BatchEnd, UnsupportedKernel> {
    if !kernel.is_supported() {
        return Err(UnsupportedKernel { kernel });
    }
    Ok(run_kernel(kernel, v, input, 0, out, prov))
}

/// `translate` with `kernel`, which the caller checked this CPU supports.
fn run_kernel(
    kernel: Kernel,
    v: &Viommu,
    input: &[RawCommand],
    first: u32,
    out: &mut [RawCommand],
    prov: &mut [u32],
) -> BatchEnd {
    let t = v.rules();
    v.table().with_lookup(Batch {
        rules: &t.rules,
        simd: &t.simd,
        kernel,
        vmid: u64::from(v.vmid()) << 32,
        input,
        first,
        out,
        prov,
    })
}

/// One `translate` call, run with a lookup specialised to the vIOMMU's table.
struct Batch<'a> {
    rules: &'a [Rule; 256],
    simd: &'a SimdTables,
    /// Supported by this CPU (checked by whoever chose it).
    kernel: Kernel,
    vmid: u64,
    input: &'a [RawCommand],
    /// The number of input 0 in `prov`.
    first: u32,
    out: &'a mut [RawCommand],
    prov: &'a mut [u32],
}

impl WithLookup for Batch<'_> {
    type Output = BatchEnd;

    #[inline(always)]
    fn run(self, lookup: impl Fn(u32) -> Option<u32>) -> BatchEnd {
        let Batch {
            rules,
            simd,
            kernel,
            vmid,
            input,
            first,
            out,
            prov,
        } = self;
        let cap = out.len().min(prov.len());
        let nsnh = u64::from(opcode::TLBI_NH_ALL) | vmid;
        // Each input command produces at most one output, so the first `cap` inputs cannot
        // fill the output: those loops need no room check (the engine's batches never go
        // further).
        let fits = input.len().min(cap);
        // While every command is forwarded as it is, the kernel's forward loop runs: input i
        // becomes output i, with no index to check (and several commands at once in the SIMD
        // kernels). Anything else (a drop, a sync, a trap, a refusal, TLBI_NSNH_ALL) is one
        // step of the general loop, after which the forward loop takes over again.
        let (mut i, mut produced) = (0, 0);
        loop {
            let n = forwards_with(
                kernel,
                rules,
                simd,
                vmid,
                &input[i..fits],
                &mut out[produced..fits],
                &mut prov[produced..fits],
                first.wrapping_add(i as u32),
                &lookup,
            );
            i += n;
            produced += n;
            let Some(cmd) = input[..fits].get(i) else {
                break;
            };
            let (o0, o1) = match step(&rules[cmd.d0() as u8 as usize], cmd, vmid, &lookup) {
                Ok(o) => o,
                Err(Special::Nsnh) => (nsnh, 0),
                Err(Special::Drop) => {
                    i += 1;
                    continue;
                }
                Err(s) => return ended(i, produced, s, cmd),
            };
            out[produced] = RawCommand::new(o0, o1);
            prov[produced] = first.wrapping_add(i as u32);
            produced += 1;
            i += 1;
        }
        for (i, cmd) in input.iter().enumerate().skip(fits) {
            let (o0, o1) = match step(&rules[cmd.d0() as u8 as usize], cmd, vmid, &lookup) {
                Ok(o) => o,
                Err(Special::Nsnh) => (nsnh, 0),
                Err(Special::Drop) => continue,
                Err(s) => return ended(i, produced, s, cmd),
            };
            if produced == cap {
                return BatchEnd {
                    consumed: i,
                    produced,
                    stop: Stop::OutputFull,
                };
            }
            out[produced] = RawCommand::new(o0, o1);
            prov[produced] = first.wrapping_add(i as u32);
            produced += 1;
        }
        BatchEnd {
            consumed: input.len(),
            produced,
            stop: Stop::Drained,
        }
    }
}

/// What a command other than a well-formed, forwarded one does. Kept apart from the forward's
/// two words so that those stay in registers.
enum Special {
    /// TLBI_NSNH_ALL: forwarded as TLBI_NH_ALL with the VMID.
    Nsnh,
    Drop,
    Trap,
    Sync {
        cs: u8,
        msidata: u32,
        msiaddr: u64,
    },
    Refuse(RefuseReason),
}

/// [`forwards`] by `kernel`, which this CPU supports.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn forwards_with(
    kernel: Kernel,
    rules: &[Rule; 256],
    simd: &SimdTables,
    vmid: u64,
    input: &[RawCommand],
    out: &mut [RawCommand],
    prov: &mut [u32],
    base: u32,
    lookup: &impl Fn(u32) -> Option<u32>,
) -> usize {
    match kernel {
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        // SAFETY: `Batch::kernel` is supported by this CPU: `Kernel::best()` or
        // `translate_with` checked `Kernel::is_supported` (AVX-512 F/BW/VL/VBMI detected).
        Kernel::Avx512 => unsafe {
            x86::forwards_avx512(rules, simd, vmid, input, out, prov, base, lookup)
        },
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        // SAFETY: as above, AVX2 was detected.
        Kernel::Avx2 => unsafe {
            x86::forwards_avx2(rules, simd, vmid, input, out, prov, base, lookup)
        },
        _ => {
            let _ = simd;
            forwards(rules, vmid, input, out, prov, base, lookup)
        }
    }
}

/// Forwards commands from the start of `input` while each is forwarded as it is, input i to
/// output i with provenance `base + i` (wrapping); returns how many. A function of its own so
/// that its loop gets the registers.
///
/// A block of commands at a time: each is checked and written with its VMID (a SID command's
/// rule patches nothing, so its vSID stays), its position listed if it is a SID command, and
/// then [`patch_sids`] gives the listed ones their pSIDs. A branch per command on whether it is
/// a SID command mispredicted on a guest's mix (a third of them, in no order a predictor
/// learns); the list is appended to without one.
#[inline(never)]
fn forwards(
    rules: &[Rule; 256],
    vmid: u64,
    input: &[RawCommand],
    out: &mut [RawCommand],
    prov: &mut [u32],
    base: u32,
    lookup: &impl Fn(u32) -> Option<u32>,
) -> usize {
    let len = input.len().min(out.len()).min(prov.len());
    let mut sids = [0u32; SID_BLOCK];
    let mut n = 0;
    while n < len {
        let end = len.min(n + SID_BLOCK);
        let (mut cnt, mut stopped) = (0, false);
        for ((cmd, o), p) in input[n..end]
            .iter()
            .zip(&mut out[n..end])
            .zip(&mut prov[n..end])
        {
            let rule = &rules[cmd.d0() as u8 as usize];
            let Some(d0) = checked_d0(rule, cmd, vmid) else {
                stopped = true;
                break;
            };
            *o = RawCommand::new(d0, cmd.d1());
            *p = base.wrapping_add(n as u32);
            sids[cnt] = n as u32;
            cnt += usize::from(rule.flags & F_SID != 0);
            n += 1;
        }
        if let Err(j) = patch_sids(&sids[..cnt], out, lookup) {
            return j;
        }
        if stopped {
            break;
        }
    }
    n
}

/// Commands the forward loops check and write before they patch the SID commands among them
/// (at most this many).
const SID_BLOCK: usize = 64;

/// Gives each SID command at the positions `sids` (ascending) of `out` the pSID of the vSID it
/// carries. `Err(j)`: the vSID at `j` is not bound; those before it are patched, and nothing
/// from `j` on counts as forwarded.
#[inline(always)]
fn patch_sids(
    sids: &[u32],
    out: &mut [RawCommand],
    lookup: &impl Fn(u32) -> Option<u32>,
) -> Result<(), usize> {
    for &j in sids {
        let o = &mut out[j as usize];
        let d0 = o.d0();
        let psid = lookup((d0 >> SID_SHIFT) as u32).ok_or(j as usize)?;
        *o = RawCommand::new(d0 & 0xffff_ffff | u64::from(psid) << SID_SHIFT, o.d1());
    }
    Ok(())
}

/// d0 of `cmd` with its VMID where `rule` has one, when it is a well-formed command the
/// profile forwards as it is, else `None`: the checks of the common case, in as few branches
/// as possible (a guest's mix of opcodes would otherwise mispredict a dispatch per command).
/// A SID command comes back with its vSID, for [`patch_sids`].
#[inline(always)]
fn checked_d0(rule: &Rule, cmd: &RawCommand, vmid: u64) -> Option<u64> {
    let (d0, d1) = (cmd.d0(), cmd.d1());
    let illegal = (d0 & rule.reject[0]) | (d1 & rule.reject[1]) != 0;
    let bad_range = !range_valid(rule, d0, d1);
    let bad_size = d1 & ATC_SIZE_MASK > u64::from(rule.size_max);
    if illegal | bad_range | bad_size | (rule.flags & F_FORWARD == 0) {
        return None;
    }
    Some((d0 & !rule.vmid_mask) | (vmid & rule.vmid_mask))
}

/// The policy for one command under its opcode's `rule`: the physical command's two words, or
/// what else to do.
#[inline(always)]
fn step(
    rule: &Rule,
    cmd: &RawCommand,
    vmid: u64,
    lookup: &impl Fn(u32) -> Option<u32>,
) -> Result<(u64, u64), Special> {
    let (d0, d1) = (cmd.d0(), cmd.d1());
    let Some(o0) = checked_d0(rule, cmd, vmid) else {
        return Err(special(rule, d0, d1));
    };
    if rule.flags & F_SID == 0 {
        return Ok((o0, d1));
    }
    match lookup((d0 >> SID_SHIFT) as u32) {
        Some(psid) => Ok(((o0 & 0xffff_ffff) | (u64::from(psid) << SID_SHIFT), d1)),
        None => Err(Special::Refuse(RefuseReason::UnknownVsid {
            opcode: d0 as u8,
            vsid: (d0 >> SID_SHIFT) as u32,
        })),
    }
}

/// Everything but a well-formed forwarded command: refusals, TLBI_NSNH_ALL, traps, drops, syncs.
#[inline(never)]
fn special(rule: &Rule, d0: u64, d1: u64) -> Special {
    let opcode = d0 as u8;
    if (d0 & rule.reject[0]) | (d1 & rule.reject[1]) != 0 {
        return Special::Refuse(rejected(rule, d0, d1));
    }
    match rule.action {
        _ if rule.flags & F_FORWARD != 0 => Special::Refuse(field_reason(rule, d0, d1)),
        Action::Nsnh => Special::Nsnh,
        Action::Trap => Special::Trap,
        Action::Drop => Special::Drop,
        Action::Sync => match ((d0 >> CS_SHIFT) & 0b11) as u8 {
            3 => Special::Refuse(RefuseReason::ReservedSyncCs),
            cs => Special::Sync {
                cs,
                msidata: (d0 >> 32) as u32,
                msiaddr: d1 & MSIADDR_MASK,
            },
        },
        Action::NotAllowed => Special::Refuse(RefuseReason::NotAllowedByProfile { opcode }),
        Action::NoAts => Special::Refuse(RefuseReason::AtsUnsupported),
        // Forwarding actions are handled above; an illegal opcode with all-zero words gets here.
        _ => Special::Refuse(RefuseReason::IllegalOpcode { opcode }),
    }
}

/// The end of a batch at input `slot` (a trap, a sync or a refusal), `produced` forwarded.
#[cold]
fn ended(slot: usize, produced: usize, s: Special, cmd: &RawCommand) -> BatchEnd {
    let (consumed, stop) = match s {
        Special::Trap => (slot + 1, Stop::Trap { slot, cmd: *cmd }),
        Special::Sync {
            cs,
            msidata,
            msiaddr,
        } => (
            slot + 1,
            Stop::Sync {
                slot,
                cs,
                msidata,
                msiaddr,
            },
        ),
        Special::Refuse(reason) => (
            slot,
            Stop::Refused {
                slot,
                cerror: CError::Ill,
                reason,
            },
        ),
        Special::Nsnh | Special::Drop => unreachable!("the loops handle forwards and drops"),
    };
    BatchEnd {
        consumed,
        produced,
        stop,
    }
}

/// Output room [`translate_all`] gives each [`translate`] call: a kernel-sized batch.
const CHUNK: usize = 64;

/// Every slot's outcome, built on [`translate`] in chunks of 64. After a refused command the
/// rest is [`SlotOutcome::NotReached`], unless `continue_after_refuse`. Traps and syncs do not
/// stop it. For tools and tests: it takes no part in the unbind barrier.
pub fn translate_all(
    v: &Viommu,
    input: &[RawCommand],
    continue_after_refuse: bool,
) -> Vec<SlotOutcome> {
    outcomes(input, continue_after_refuse, |i, o, p| {
        translate(v, i, o, p)
    })
}

/// [`translate_all`] with the forward loop of `kernel` (see [`translate_with`]).
pub fn translate_all_with(
    kernel: Kernel,
    v: &Viommu,
    input: &[RawCommand],
    continue_after_refuse: bool,
) -> Result<Vec<SlotOutcome>, UnsupportedKernel> {
    if !kernel.is_supported() {
        return Err(UnsupportedKernel { kernel });
    }
    Ok(outcomes(input, continue_after_refuse, |i, o, p| {
        run_kernel(kernel, v, i, 0, o, p)
    }))
}

/// Every slot's outcome, through `translate` in chunks of [`CHUNK`].
fn outcomes(
    input: &[RawCommand],
    continue_after_refuse: bool,
    translate: impl Fn(&[RawCommand], &mut [RawCommand], &mut [u32]) -> BatchEnd,
) -> Vec<SlotOutcome> {
    let mut res = Vec::with_capacity(input.len());
    let mut out = [RawCommand::default(); CHUNK];
    let mut prov = [0u32; CHUNK];
    let mut start = 0;
    while start < input.len() {
        let end = translate(&input[start..], &mut out, &mut prov);
        res.extend(end.outcomes(&out, &prov));
        start += end.consumed;
        if let Stop::Refused { .. } = end.stop {
            start += 1;
            if !continue_after_refuse {
                res.resize(input.len(), SlotOutcome::NotReached);
                break;
            }
        }
    }
    res
}

#[cfg(test)]
mod tests;
#[cfg(all(target_arch = "x86_64", not(miri)))]
mod x86;
