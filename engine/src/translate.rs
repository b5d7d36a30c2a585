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
//! 5. ATC_INV with SIZE > 52 (`AtcSizeTooLarge`); TLBI_NH_VA/VAA with TG, NUM or SCALE set on an
//!    SMMU without range invalidation (`RangeUnsupported`), or NUM/SCALE with TG=0
//!    (`MalformedRange`); CMD_SYNC with the reserved CS=3 (`ReservedSyncCs`);
//! 6. ATC_INV, CFGI_CD, CFGI_CD_ALL: the vSID must be bound in this vIOMMU (`UnknownVsid`), and
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
use crate::viommu::{Profile, Viommu};

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
    /// TG, NUM or SCALE set while the physical SMMU has no range invalidation.
    RangeUnsupported {
        /// `d0[7:0]`.
        opcode: u8,
    },
    /// NUM or SCALE set with TG=0 (the non-range form).
    MalformedRange {
        /// `d0[7:0]`.
        opcode: u8,
    },
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
                "{} has range fields (TG/NUM/SCALE) and the SMMU has no range invalidation",
                op_name(opcode)
            ),
            RefuseReason::MalformedRange { opcode } => {
                write!(f, "{} has NUM/SCALE set with TG=0", op_name(opcode))
            }
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
    /// CFGI_CD, CFGI_CD_ALL: SSEC, SID.
    CfgiSid,
    /// CFGI_STE, CFGI_STE_RANGE: SSEC, then to the control plane.
    Trap,
    Drop,
    Sync,
}

/// One entry per opcode: its allowed bits and what the profile does with it, so that the RES0
/// check and the dispatch cost one table load.
#[derive(Clone, Copy)]
struct Rule {
    allowed: [u64; 2],
    action: Action,
}

const fn set(t: &mut [Rule; 256], op: u8, action: Action) {
    t[op as usize].action = action;
}

const fn rules(profile: Profile) -> [Rule; 256] {
    let mut t = [Rule {
        allowed: [0, 0],
        action: Action::Illegal,
    }; 256];
    let mut op = 0;
    while op < 256 {
        if let Some(l) = LAYOUTS[op] {
            t[op] = Rule {
                allowed: l.allowed,
                action: Action::NotAllowed,
            };
        }
        op += 1;
    }
    set(&mut t, opcode::CFGI_STE, Action::Trap);
    set(&mut t, opcode::CFGI_STE_RANGE, Action::Trap);
    set(&mut t, opcode::PREFETCH_CONFIG, Action::Drop);
    set(&mut t, opcode::PREFETCH_ADDR, Action::Drop);
    set(&mut t, opcode::CMD_SYNC, Action::Sync);
    set(&mut t, opcode::TLBI_NH_ASID, Action::Tlbi);
    set(&mut t, opcode::TLBI_NH_VA, Action::TlbiRange);
    set(&mut t, opcode::ATC_INV, Action::AtcInv);
    if let Profile::Kernel = profile {
        set(&mut t, opcode::TLBI_NH_ALL, Action::Tlbi);
        set(&mut t, opcode::TLBI_NH_VAA, Action::TlbiRange);
        set(&mut t, opcode::TLBI_NSNH_ALL, Action::Nsnh);
        set(&mut t, opcode::CFGI_CD, Action::CfgiSid);
        set(&mut t, opcode::CFGI_CD_ALL, Action::CfgiSid);
    }
    t
}

static KERNEL_RULES: [Rule; 256] = rules(Profile::Kernel);
static TEGRA241_RULES: [Rule; 256] = rules(Profile::Tegra241);

/// VMID, `d0[47:32]`.
const VMID_MASK: u64 = 0xffff << 32;
/// SID, `d0[63:32]`.
const SID_SHIFT: u32 = 32;
/// SSEC, `d0[10]`.
const SSEC: u64 = 1 << 10;
/// NUM `d0[16:12]` and SCALE `d0[24:20]`.
const NUM_SCALE_MASK: u64 = (0x1f << 12) | (0x1f << 20);
/// TG, `d1[11:10]`.
const TG_MASK: u64 = 0b11 << 10;
/// ATC_INV SIZE, `d1[5:0]`.
const ATC_SIZE_MASK: u64 = 0x3f;
/// The SIZE that means "the whole address space".
const ATC_SIZE_ALL: u64 = 52;
/// CMD_SYNC CS, `d0[13:12]`.
const CS_SHIFT: u32 = 12;
/// CMD_SYNC MSIADDR, `d1[51:2]`.
const MSIADDR_MASK: u64 = ((1 << 52) - 1) & !0b11;

#[cold]
fn malformed(rule: &Rule, d0: u64, d1: u64) -> RefuseReason {
    let opcode = d0 as u8;
    if rule.action == Action::Illegal {
        RefuseReason::IllegalOpcode { opcode }
    } else {
        RefuseReason::Res0 {
            opcode,
            d0: d0 & !rule.allowed[0],
            d1: d1 & !rule.allowed[1],
        }
    }
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
pub fn translate(
    v: &Viommu,
    input: &[RawCommand],
    out: &mut [RawCommand],
    prov: &mut [u32],
) -> BatchEnd {
    let rules = match v.profile() {
        Profile::Kernel => &KERNEL_RULES,
        Profile::Tegra241 => &TEGRA241_RULES,
    };
    let vmid = u64::from(v.vmid()) << 32;
    let range_inv = v.config().range_inv;
    let table = v.table();
    let cap = out.len().min(prov.len());
    let mut produced = 0;
    let refused = |slot: usize, produced: usize, reason: RefuseReason| BatchEnd {
        consumed: slot,
        produced,
        stop: Stop::Refused {
            slot,
            cerror: CError::Ill,
            reason,
        },
    };
    for (i, cmd) in input.iter().enumerate() {
        let (d0, d1) = (cmd.d0(), cmd.d1());
        let op = d0 as u8;
        let rule = &rules[op as usize];
        if (d0 & !rule.allowed[0]) | (d1 & !rule.allowed[1]) != 0 {
            return refused(i, produced, malformed(rule, d0, d1));
        }
        let (o0, o1) = match rule.action {
            Action::Tlbi => ((d0 & !VMID_MASK) | vmid, d1),
            Action::TlbiRange => {
                let tg = d1 & TG_MASK;
                let num_scale = d0 & NUM_SCALE_MASK;
                if !range_inv && (tg | num_scale) != 0 {
                    return refused(i, produced, RefuseReason::RangeUnsupported { opcode: op });
                }
                if tg == 0 && num_scale != 0 {
                    return refused(i, produced, RefuseReason::MalformedRange { opcode: op });
                }
                ((d0 & !VMID_MASK) | vmid, d1)
            }
            Action::Nsnh => (u64::from(opcode::TLBI_NH_ALL) | vmid, 0),
            Action::AtcInv => {
                let size = d1 & ATC_SIZE_MASK;
                if size > ATC_SIZE_ALL {
                    return refused(
                        i,
                        produced,
                        RefuseReason::AtcSizeTooLarge { size: size as u8 },
                    );
                }
                let vsid = (d0 >> SID_SHIFT) as u32;
                let Some(psid) = table.get(vsid) else {
                    return refused(i, produced, RefuseReason::UnknownVsid { opcode: op, vsid });
                };
                ((d0 & 0xffff_ffff) | (u64::from(psid) << SID_SHIFT), d1)
            }
            Action::CfgiSid => {
                if d0 & SSEC != 0 {
                    return refused(i, produced, RefuseReason::Secure { opcode: op });
                }
                let vsid = (d0 >> SID_SHIFT) as u32;
                let Some(psid) = table.get(vsid) else {
                    return refused(i, produced, RefuseReason::UnknownVsid { opcode: op, vsid });
                };
                ((d0 & 0xffff_ffff) | (u64::from(psid) << SID_SHIFT), d1)
            }
            Action::Trap => {
                if d0 & SSEC != 0 {
                    return refused(i, produced, RefuseReason::Secure { opcode: op });
                }
                return BatchEnd {
                    consumed: i + 1,
                    produced,
                    stop: Stop::Trap { slot: i, cmd: *cmd },
                };
            }
            Action::Drop => continue,
            Action::Sync => {
                let cs = ((d0 >> CS_SHIFT) & 0b11) as u8;
                if cs == 3 {
                    return refused(i, produced, RefuseReason::ReservedSyncCs);
                }
                return BatchEnd {
                    consumed: i + 1,
                    produced,
                    stop: Stop::Sync {
                        slot: i,
                        cs,
                        msidata: (d0 >> 32) as u32,
                        msiaddr: d1 & MSIADDR_MASK,
                    },
                };
            }
            Action::NotAllowed => {
                return refused(
                    i,
                    produced,
                    RefuseReason::NotAllowedByProfile { opcode: op },
                )
            }
            Action::Illegal => {
                return refused(i, produced, RefuseReason::IllegalOpcode { opcode: op })
            }
        };
        if produced == cap {
            return BatchEnd {
                consumed: i,
                produced,
                stop: Stop::OutputFull,
            };
        }
        out[produced] = RawCommand::new(o0, o1);
        prov[produced] = i as u32;
        produced += 1;
    }
    BatchEnd {
        consumed: input.len(),
        produced,
        stop: Stop::Drained,
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
    let mut res = Vec::with_capacity(input.len());
    let mut out = [RawCommand::default(); CHUNK];
    let mut prov = [0u32; CHUNK];
    let mut start = 0;
    while start < input.len() {
        let end = translate(v, &input[start..], &mut out, &mut prov);
        let mut j = 0;
        for k in 0..end.consumed {
            if j < end.produced && prov[j] as usize == k {
                res.push(SlotOutcome::Forwarded(out[j]));
                j += 1;
                continue;
            }
            res.push(match end.stop {
                Stop::Sync {
                    slot,
                    cs,
                    msidata,
                    msiaddr,
                } if slot == k => SlotOutcome::Sync {
                    cs,
                    msidata,
                    msiaddr,
                },
                Stop::Trap { slot, cmd } if slot == k => SlotOutcome::Trapped(cmd),
                _ => SlotOutcome::Dropped,
            });
        }
        start += end.consumed;
        if let Stop::Refused { cerror, reason, .. } = end.stop {
            res.push(SlotOutcome::Refused { cerror, reason });
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
