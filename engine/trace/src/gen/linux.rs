//! Commands as a Linux guest's arm-smmu-v3 driver builds them: TLB invalidations split into
//! range commands (TG/NUM/SCALE) or one per page, ATC invalidations rounded to an aligned span,
//! and CMD_SYNC with MSI polling or SEV. The arithmetic follows the driver's documented
//! behaviour; the code is ours.

use vcmdq::command::{Command, RawCommand};

/// Leaf page size the generators use (4 KiB granule, TG=1).
pub const PAGE_SHIFT: u32 = 12;
/// Linux falls back to invalidating the whole ASID when a non-range invalidation would need
/// this many commands or more (one per page): 2^(PAGE_SHIFT-3).
pub const MAX_TLBI_OPS: u64 = 1 << (PAGE_SHIFT - 3);
/// ATC_INV SIZE meaning "everything".
pub const ATC_SIZE_ALL: u8 = 52;

/// TLBI_NH_VA commands invalidating `[iova, iova + size)` of `asid`, whose leaves are
/// `leaf_granule` bytes (4 KiB pages or 2 MiB blocks). `leaf`: only leaf entries changed (an
/// unmap); `range`: the SMMU advertises range invalidation. `vmid` is what the guest writes (its
/// own notion; the engine overwrites it).
pub fn tlbi_va(
    vmid: u16,
    asid: u16,
    iova: u64,
    size: u64,
    leaf_granule: u64,
    leaf: bool,
    range: bool,
) -> Vec<RawCommand> {
    let mut out = Vec::new();
    if size == 0 {
        return out;
    }
    if !range {
        let step = leaf_granule.max(1 << PAGE_SHIFT);
        let n = size.div_ceil(step);
        if n >= MAX_TLBI_OPS {
            out.push(tlbi_asid(vmid, asid));
            return out;
        }
        for i in 0..n {
            out.push(
                Command::TlbiNhVa {
                    vmid,
                    asid,
                    addr: iova + i * step,
                    tg: 0,
                    num: 0,
                    scale: 0,
                    ttl: 0,
                    leaf,
                }
                .encode(),
            );
        }
        return out;
    }
    let mut pages = size.div_ceil(1 << PAGE_SHIFT);
    let ttl = if leaf {
        // The level of the leaf: 4 KiB pages are level 3, 2 MiB blocks level 2.
        let lg = 63 - leaf_granule.max(1 << PAGE_SHIFT).leading_zeros();
        (4 - (lg - 3) / (PAGE_SHIFT - 3)) as u8
    } else {
        // Non-leaf: TTL unknown; a lone page would make NUM and SCALE both 0, which some SMMUs
        // mishandle, so Linux invalidates one page more.
        if pages & 31 == 1 {
            pages += 1;
        }
        0
    };
    let mut addr = iova;
    while pages > 0 {
        let scale = pages.trailing_zeros();
        let num = (pages >> scale) & 31;
        out.push(
            Command::TlbiNhVa {
                vmid,
                asid,
                addr,
                tg: 1,
                num: (num - 1) as u8,
                scale: scale as u8,
                ttl,
                leaf,
            }
            .encode(),
        );
        addr += num << (scale + PAGE_SHIFT);
        pages -= num << scale;
    }
    out
}

/// TLBI_NH_ASID.
pub fn tlbi_asid(vmid: u16, asid: u16) -> RawCommand {
    Command::TlbiNhAsid { vmid, asid }.encode()
}

/// ATC_INV of `[iova, iova + size)` for `sid` (with PASID `ssid` when `Some`): the smallest
/// naturally aligned power-of-two span of pages covering the range; `size` 0 means everything.
pub fn atc_inv(sid: u32, ssid: Option<u32>, iova: u64, size: u64) -> RawCommand {
    let (addr, log2) = if size == 0 {
        (0, ATC_SIZE_ALL)
    } else {
        let start = iova >> PAGE_SHIFT;
        let end = (iova + size - 1) >> PAGE_SHIFT;
        let span = 64 - (start ^ end).leading_zeros();
        let start = start & !((1u64 << span) - 1);
        ((start << PAGE_SHIFT), span as u8)
    };
    Command::AtcInv {
        sid,
        ssv: ssid.is_some(),
        ssid: ssid.unwrap_or(0),
        global: false,
        addr,
        size: log2,
    }
    .encode()
}

/// CFGI_CD for `sid`'s context descriptor `ssid` (leaf: only that CD changed).
pub fn cfgi_cd(sid: u32, ssid: u32) -> RawCommand {
    Command::CfgiCd {
        ssec: false,
        ssid,
        sid,
        leaf: true,
    }
    .encode()
}

/// CMD_SYNC as Linux builds it: with MSI polling, CS=IRQ and MSIADDR pointing at the sync's own
/// slot (`Some(address)`); without, CS=SEV. MSH inner-shareable, MSIATTR write-back.
pub fn cmd_sync(msi_slot_addr: Option<u64>) -> RawCommand {
    let (cs, msiaddr) = match msi_slot_addr {
        Some(a) => (1, a),
        None => (2, 0),
    };
    Command::CmdSync {
        cs,
        msh: 3,
        msiattr: 0xf,
        msidata: 0,
        msiaddr,
    }
    .encode()
}

/// What Linux writes over a command the SMMU refused before acknowledging the error.
pub fn fix_sync() -> RawCommand {
    cmd_sync(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vcmdq::command::{decode, TlbiSpan};

    fn covered(cmds: &[RawCommand]) -> u64 {
        cmds.iter()
            .map(|c| match decode(*c).unwrap().tlbi_span().unwrap() {
                TlbiSpan::Range { bytes, .. } => bytes,
                TlbiSpan::Entry { .. } => 4096,
            })
            .sum()
    }

    #[test]
    fn range_splits_like_linux() {
        // 35 pages: 3 (num=2, scale=0) then 32 (num=0, scale=5).
        let c = tlbi_va(0, 7, 0x10_0000, 35 << 12, 4096, true, true);
        assert_eq!(c.len(), 2);
        let d: Vec<Command> = c.iter().map(|x| decode(*x).unwrap()).collect();
        assert!(matches!(
            d[0],
            Command::TlbiNhVa {
                num: 2,
                scale: 0,
                tg: 1,
                ttl: 3,
                leaf: true,
                addr: 0x10_0000,
                ..
            }
        ));
        assert!(matches!(
            d[1],
            Command::TlbiNhVa {
                num: 0,
                scale: 5,
                addr: 0x10_3000,
                ..
            }
        ));
        assert_eq!(covered(&c), 35 << 12);
        // SCALE comes from the lowest set bit of the page count: 4 pages is NUM=0 SCALE=2.
        let c = tlbi_va(0, 7, 0x8000_0000, 4 << 12, 4096, true, true);
        assert!(matches!(
            decode(c[0]).unwrap(),
            Command::TlbiNhVa {
                num: 0,
                scale: 2,
                ..
            }
        ));
        // A 2 MiB block is TTL 2.
        let c = tlbi_va(0, 7, 0x20_0000, 2 << 20, 2 << 20, true, true);
        assert!(matches!(
            decode(c[0]).unwrap(),
            Command::TlbiNhVa { ttl: 2, .. }
        ));
    }

    #[test]
    fn non_range_is_one_per_leaf_then_asid() {
        let c = tlbi_va(0, 7, 0x10_0000, 3 << 12, 4096, true, false);
        assert_eq!(c.len(), 3);
        assert!(c.iter().all(|x| matches!(
            decode(*x).unwrap(),
            Command::TlbiNhVa {
                tg: 0,
                num: 0,
                scale: 0,
                ..
            }
        )));
        let c = tlbi_va(0, 7, 0, MAX_TLBI_OPS << 12, 4096, true, false);
        assert_eq!(c, vec![tlbi_asid(0, 7)]);
    }

    #[test]
    fn non_leaf_lone_page_rounds_up() {
        let c = tlbi_va(0, 7, 0, 4096, 4096, false, true);
        assert!(matches!(
            decode(c[0]).unwrap(),
            Command::TlbiNhVa {
                num: 0,
                scale: 1,
                ttl: 0,
                leaf: false,
                ..
            }
        ));
    }

    #[test]
    fn atc_span_is_aligned_power_of_two() {
        // Pages 3..=4 cross an 8-page boundary? 3 ^ 4 = 7 -> span 2^3 pages from page 0.
        let c = decode(atc_inv(0x10, None, 3 << 12, 2 << 12)).unwrap();
        assert!(matches!(
            c,
            Command::AtcInv {
                addr: 0,
                size: 3,
                ssv: false,
                ..
            }
        ));
        let c = decode(atc_inv(0x10, Some(5), 0, 0)).unwrap();
        assert!(matches!(
            c,
            Command::AtcInv {
                size: 52,
                ssv: true,
                ssid: 5,
                ..
            }
        ));
        let c = decode(atc_inv(0x10, None, 0x5000, 4096)).unwrap();
        assert!(matches!(
            c,
            Command::AtcInv {
                addr: 0x5000,
                size: 0,
                ..
            }
        ));
    }
}
