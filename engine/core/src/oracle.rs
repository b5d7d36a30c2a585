//! The sequential oracle of the translation policy: the rules of `translate` written a second
//! time, for clarity and not for speed, straight from the spec text (`docs/rules.md`)
//! with command names, named fields and a `HashMap` of bindings. Tests, the fuzz target and
//! replay compare the fast path with it, slot by slot.
//!
//! It shares with the fast path only the field table (`LAYOUTS`), which has its own tests
//! against the spec; it does not use the opcode dispatch table, the masks or the radix table.

use crate::command::{opcode, FieldDef, OpLayout, RawCommand, LAYOUTS};
use crate::queue::CError;
use crate::translate::{RefuseReason, SlotOutcome};
use crate::viommu::{Profile, SmmuFeatures, ViommuConfig};
use std::collections::HashMap;

/// What the `kernel` profile forwards (after patching).
const KERNEL_FORWARDS: &[&str] = &[
    "TLBI_NH_ALL",
    "TLBI_NH_ASID",
    "TLBI_NH_VA",
    "TLBI_NH_VAA",
    "TLBI_NSNH_ALL",
    "ATC_INV",
    "CFGI_CD",
    "CFGI_CD_ALL",
];

/// What a Tegra241 guest VCMDQ forwards.
const TEGRA241_FORWARDS: &[&str] = &["TLBI_NH_ASID", "TLBI_NH_VA", "ATC_INV"];

fn field(layout: &OpLayout, name: &str) -> &'static FieldDef {
    match layout.field(name) {
        Some(f) => f,
        None => panic!("oracle: {} has no field {name}", layout.name),
    }
}

fn get(layout: &OpLayout, cmd: &RawCommand, name: &str) -> u64 {
    field(layout, name).get(cmd)
}

fn put(layout: &OpLayout, words: &mut [u64; 2], name: &str, value: u64) {
    if let Err(e) = field(layout, name).put(words, value) {
        panic!("oracle: {e}");
    }
}

fn refuse(reason: RefuseReason) -> SlotOutcome {
    SlotOutcome::Refused {
        cerror: CError::Ill,
        reason,
    }
}

/// What the policy does with one command of a vIOMMU configured as `cfg` whose bindings are
/// `bindings` (vSID -> pSID).
pub fn translate_one(
    cfg: &ViommuConfig,
    bindings: &HashMap<u32, u32>,
    cmd: RawCommand,
) -> SlotOutcome {
    let op = cmd.opcode();
    let Some(layout) = LAYOUTS[op as usize] else {
        return refuse(RefuseReason::IllegalOpcode { opcode: op });
    };
    if let Some(refused) = res0_refusal(layout, &cmd) {
        return refused;
    }
    if let Some(outcome) = not_forwarded(cfg, layout, &cmd) {
        return outcome;
    }
    match forwarded(cfg, bindings, layout, &cmd) {
        Ok(w) => SlotOutcome::Forwarded(RawCommand::new(w[0], w[1])),
        Err(refused) => refused,
    }
}

/// The refusal of a command with a RES0 bit set: one that is neither the opcode byte nor
/// inside one of the opcode's fields.
fn res0_refusal(layout: &OpLayout, cmd: &RawCommand) -> Option<SlotOutcome> {
    let mut named = [0xffu64, 0];
    for f in layout.fields {
        named[f.word as usize] |= f.mask();
    }
    let (x0, x1) = (cmd.d0() & !named[0], cmd.d1() & !named[1]);
    (x0 != 0 || x1 != 0).then(|| {
        refuse(RefuseReason::Res0 {
            opcode: cmd.opcode(),
            d0: x0,
            d1: x1,
        })
    })
}

/// The outcome of a legal command the profile does not forward: trapped, dropped, a guest
/// CMD_SYNC or refused. `None` for one it forwards.
fn not_forwarded(cfg: &ViommuConfig, layout: &OpLayout, cmd: &RawCommand) -> Option<SlotOutcome> {
    let op = cmd.opcode();
    let forwards = match cfg.profile {
        Profile::Kernel => KERNEL_FORWARDS,
        Profile::Tegra241 => TEGRA241_FORWARDS,
    };
    Some(match layout.name {
        "CFGI_STE" | "CFGI_STE_RANGE" if get(layout, cmd, "ssec") != 0 => {
            refuse(RefuseReason::Secure { opcode: op })
        }
        "CFGI_STE" | "CFGI_STE_RANGE" => SlotOutcome::Trapped(*cmd),
        "PREFETCH_CONFIG" | "PREFETCH_ADDR" => SlotOutcome::Dropped,
        "CMD_SYNC" => {
            let cs = get(layout, cmd, "cs") as u8;
            if cs == 3 {
                return Some(refuse(RefuseReason::ReservedSyncCs));
            }
            SlotOutcome::Sync {
                cs,
                msidata: get(layout, cmd, "msidata") as u32,
                msiaddr: get(layout, cmd, "msiaddr"),
            }
        }
        name if !forwards.contains(&name) => {
            refuse(RefuseReason::NotAllowedByProfile { opcode: op })
        }
        _ => return None,
    })
}

/// The two words a command the profile forwards becomes (VMID inserted, vSID replaced by its
/// pSID), or its refusal.
fn forwarded(
    cfg: &ViommuConfig,
    bindings: &HashMap<u32, u32>,
    layout: &OpLayout,
    cmd: &RawCommand,
) -> Result<[u64; 2], SlotOutcome> {
    let op = cmd.opcode();
    let name = layout.name;
    let mut w = [cmd.d0(), cmd.d1()];
    let vmid = u64::from(cfg.vmid);
    match name {
        "TLBI_NH_ALL" => put(layout, &mut w, "vmid", vmid),
        "TLBI_NH_ASID" => {
            if let Some(refused) = asid_check(cfg, layout, cmd) {
                return Err(refused);
            }
            put(layout, &mut w, "vmid", vmid);
        }
        "TLBI_NH_VA" | "TLBI_NH_VAA" => {
            tlbi_va_check(cfg, layout, cmd)?;
            put(layout, &mut w, "vmid", vmid);
        }
        "TLBI_NSNH_ALL" => {
            let nh_all = LAYOUTS[opcode::TLBI_NH_ALL as usize].expect("TLBI_NH_ALL is legal");
            w = [u64::from(opcode::TLBI_NH_ALL), 0];
            put(nh_all, &mut w, "vmid", vmid);
        }
        "ATC_INV" => {
            atc_inv_check(cfg, layout, cmd)?;
            translate_sid(cfg, bindings, layout, cmd, &mut w)?;
        }
        "CFGI_CD" | "CFGI_CD_ALL" => {
            if get(layout, cmd, "ssec") != 0 {
                return Err(refuse(RefuseReason::Secure { opcode: op }));
            }
            if name == "CFGI_CD" {
                let ssid = get(layout, cmd, "ssid");
                substream_rule(cfg.features.ssidsize, op, 0, ssid)
                    .map_or(Ok(()), |r| Err(refuse(r)))?;
            }
            translate_sid(cfg, bindings, layout, cmd, &mut w)?;
        }
        other => unreachable!("oracle: {other} is forwarded but has no rule"),
    }
    Ok(w)
}

/// TLBI_NH_VA and TLBI_NH_VAA: the range fields (RES0 without RIL), the ASID, the range rules.
fn tlbi_va_check(
    cfg: &ViommuConfig,
    layout: &OpLayout,
    cmd: &RawCommand,
) -> Result<(), SlotOutcome> {
    let op = cmd.opcode();
    let tg = get(layout, cmd, "tg") as u8;
    let ttl = get(layout, cmd, "ttl") as u8;
    let num = get(layout, cmd, "num");
    let scale = get(layout, cmd, "scale");
    // Without RIL, TG, TTL, NUM and SCALE are RES0.
    if !cfg.range_inv && (tg != 0 || ttl != 0 || num != 0 || scale != 0) {
        return Err(refuse(RefuseReason::RangeUnsupported { opcode: op }));
    }
    if layout.name == "TLBI_NH_VA" {
        if let Some(refused) = asid_check(cfg, layout, cmd) {
            return Err(refused);
        }
    }
    range_rule(&cfg.features, op, tg, ttl, num, scale).map_or(Ok(()), |r| Err(refuse(r)))
}

/// ATC_INV: ATS, the substream fields, SIZE.
fn atc_inv_check(
    cfg: &ViommuConfig,
    layout: &OpLayout,
    cmd: &RawCommand,
) -> Result<(), SlotOutcome> {
    if !cfg.features.ats {
        return Err(refuse(RefuseReason::AtsUnsupported));
    }
    let substream_flags = get(layout, cmd, "ssv") | get(layout, cmd, "global");
    let ssid = get(layout, cmd, "ssid");
    if let Some(reason) = substream_rule(cfg.features.ssidsize, cmd.opcode(), substream_flags, ssid)
    {
        return Err(refuse(reason));
    }
    let size = get(layout, cmd, "size");
    if size > 52 {
        return Err(refuse(RefuseReason::AtcSizeTooLarge { size: size as u8 }));
    }
    Ok(())
}

/// Replaces the command's vSID by its pSID, refusing a vSID that is unbound or beyond SIDSIZE.
fn translate_sid(
    cfg: &ViommuConfig,
    bindings: &HashMap<u32, u32>,
    layout: &OpLayout,
    cmd: &RawCommand,
    w: &mut [u64; 2],
) -> Result<(), SlotOutcome> {
    let vsid = get(layout, cmd, "sid") as u32;
    let fits = u64::from(vsid) < (1u64 << cfg.sidsize);
    match bindings.get(&vsid) {
        Some(&psid) if fits => {
            put(layout, w, "sid", u64::from(psid));
            Ok(())
        }
        _ => Err(refuse(RefuseReason::UnknownVsid {
            opcode: cmd.opcode(),
            vsid,
        })),
    }
}

/// An ASID with its upper byte set on an SMMU with 8-bit ASIDs.
fn asid_check(cfg: &ViommuConfig, layout: &OpLayout, cmd: &RawCommand) -> Option<SlotOutcome> {
    let asid = get(layout, cmd, "asid");
    if !cfg.features.asid16 && asid > 0xff {
        return Some(refuse(RefuseReason::AsidTooLarge {
            opcode: cmd.opcode(),
            asid: asid as u16,
        }));
    }
    None
}

/// The substream rules of ATC_INV and CFGI_CD on an SMMU with `ssidsize` SSID bits: without
/// substreams, no substream field may be set (`flags`: SSV and GLOBAL where the command has
/// them); with them, the SSID must fit.
fn substream_rule(ssidsize: u8, op: u8, flags: u64, ssid: u64) -> Option<RefuseReason> {
    if ssidsize == 0 && (flags != 0 || ssid != 0) {
        return Some(RefuseReason::NoSubstreams { opcode: op });
    }
    (ssid >> ssidsize != 0).then_some(RefuseReason::SsidTooLarge {
        opcode: op,
        ssid: ssid as u32,
        ssidsize,
    })
}

/// The range encoding of a TLBI on an SMMU with range invalidation (docs/rules.md, "Range
/// invalidation"), in this order: with TG=0 (the non-range form) NUM, SCALE and TTL must be 0;
/// with TG != 0 the granule must be one the SMMU supports, NUM = SCALE = TTL = 0 is reserved,
/// and TTL must be a level that granule can have (16K level 1 only with DS).
fn range_rule(
    f: &SmmuFeatures,
    opcode: u8,
    tg: u8,
    ttl: u8,
    num: u64,
    scale: u64,
) -> Option<RefuseReason> {
    if tg == 0 {
        if num != 0 || scale != 0 {
            return Some(RefuseReason::MalformedRange { opcode });
        }
        if ttl != 0 {
            return Some(RefuseReason::TtlWithoutGranule { opcode });
        }
        return None;
    }
    let granule = match tg {
        1 => f.gran4k,
        2 => f.gran16k,
        _ => f.gran64k,
    };
    if !granule {
        return Some(RefuseReason::GranuleUnsupported { opcode, tg });
    }
    if num == 0 && scale == 0 && ttl == 0 {
        return Some(RefuseReason::ReservedRange { opcode });
    }
    let level_ok = match (tg, ttl) {
        (_, 0) => true,
        (2, 1) => f.ds,
        _ => true,
    };
    if !level_ok {
        return Some(RefuseReason::ReservedTtl { opcode, tg, ttl });
    }
    None
}

/// Every slot's outcome for a whole batch, as `translate::translate_all` gives it.
pub fn translate_all(
    cfg: &ViommuConfig,
    bindings: &HashMap<u32, u32>,
    input: &[RawCommand],
    continue_after_refuse: bool,
) -> Vec<SlotOutcome> {
    let mut res = Vec::with_capacity(input.len());
    let mut stopped = false;
    for &cmd in input {
        if stopped {
            res.push(SlotOutcome::NotReached);
            continue;
        }
        let o = translate_one(cfg, bindings, cmd);
        if matches!(o, SlotOutcome::Refused { .. }) && !continue_after_refuse {
            stopped = true;
        }
        res.push(o);
    }
    res
}

/// Checks rule 1 on one command leaving the engine for vIOMMU `cfg`, whose bound pSIDs are
/// `psids`: it is well formed, of a kind the profile forwards, a TLBI carries the vIOMMU's VMID
/// and a SID-carrying command a pSID bound in it. The error says which part is broken.
pub fn check_isolation(
    cfg: &ViommuConfig,
    psids: &std::collections::HashSet<u32>,
    cmd: &RawCommand,
) -> Result<(), String> {
    let op = cmd.opcode();
    let Some(layout) = LAYOUTS[op as usize] else {
        return Err(format!("illegal opcode {op:#04x} forwarded"));
    };
    if crate::command::res0_bits(cmd) != Some([0, 0]) {
        return Err(format!("{} forwarded with RES0 bits: {cmd:?}", layout.name));
    }
    let forwards = match cfg.profile {
        Profile::Kernel => &KERNEL_FORWARDS[..4],
        Profile::Tegra241 => &TEGRA241_FORWARDS[..2],
    };
    let name = layout.name;
    if name.starts_with("TLBI_") {
        if !forwards.contains(&name) {
            return Err(format!("{name} forwarded by the {} profile", cfg.profile));
        }
        let vmid = get(layout, cmd, "vmid");
        if vmid != u64::from(cfg.vmid) {
            return Err(format!("{name} carries VMID {vmid}, not {}", cfg.vmid));
        }
        return Ok(());
    }
    let sid_carrying = match cfg.profile {
        Profile::Kernel => ["ATC_INV", "CFGI_CD", "CFGI_CD_ALL"].contains(&name),
        Profile::Tegra241 => name == "ATC_INV",
    };
    if !sid_carrying {
        return Err(format!("{name} forwarded by the {} profile", cfg.profile));
    }
    if layout.field("ssec").is_some_and(|f| f.get(cmd) != 0) {
        return Err(format!("{name} forwarded with SSEC"));
    }
    let sid = get(layout, cmd, "sid") as u32;
    if !psids.contains(&sid) {
        return Err(format!(
            "{name} carries SID {sid:#x}, not a pSID bound in vIOMMU {}",
            cfg.id
        ));
    }
    Ok(())
}
