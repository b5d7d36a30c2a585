use super::*;
use crate::command::{layout_of, text, OpLayout};
use crate::oracle;
use crate::viommu::{DeviceId, Devices, GraceDomain, SmmuFeatures, ViommuConfig};
use proptest::prelude::*;
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;

thread_local! {
    /// The kernel `translate` runs on this test thread, instead of the CPU's widest.
    static FORCED: Cell<Option<Kernel>> = const { Cell::new(None) };
}

/// The kernel a test forced on this thread (`translate` checks it under `cfg(test)` only).
pub(super) fn forced_kernel() -> Option<Kernel> {
    FORCED.with(Cell::get)
}

/// Every kernel this CPU runs, with a note on stderr for each it cannot (a CPU without AVX2
/// or AVX-512, another architecture, or miri, which does not implement their intrinsics).
fn kernels() -> Vec<Kernel> {
    Kernel::ALL
        .into_iter()
        .filter(|k| {
            let ok = k.is_supported();
            if !ok {
                eprintln!("note: the {k} kernel is not supported here: skipped");
            }
            ok
        })
        .collect()
}

/// Runs `f` once per kernel in [`kernels`], with `translate` forced to it.
fn each_kernel(f: impl Fn()) {
    for k in kernels() {
        FORCED.with(|c| c.set(Some(k)));
        let r = std::panic::catch_unwind(AssertUnwindSafe(&f));
        FORCED.with(|c| c.set(None));
        if let Err(e) = r {
            eprintln!("failed with the {k} kernel");
            std::panic::resume_unwind(e);
        }
    }
}

const VMID: u16 = 5;
const OTHER_VMID: u16 = 9;

/// Two VMs on one SMMU: `v` (VMID 5: vSID 0x10 -> 0x800, 0x11 -> 0x801) and `other`
/// (VMID 9: vSID 0x20 -> 0x900, 0x10 -> 0x901).
struct World {
    v: Viommu,
    other: Viommu,
}

fn world(profile: Profile, range_inv: bool) -> World {
    world_on(
        profile,
        SmmuFeatures {
            ril: range_inv,
            ..SmmuFeatures::ANY
        },
    )
}

/// [`world`] on an SMMU with `features`.
fn world_on(profile: Profile, features: SmmuFeatures) -> World {
    let devices = Devices::new();
    let grace = GraceDomain::new();
    for (id, psid) in [(0, 0x800), (1, 0x801), (2, 0x900), (3, 0x901)] {
        devices.add_device(DeviceId(id), 0, psid).unwrap();
    }
    let mk = |id, vmid| {
        let cfg = ViommuConfig {
            profile,
            sidsize: 16,
            ..ViommuConfig::new(id, vmid, 0)
        }
        .with_smmu(features);
        Viommu::new(cfg, devices.clone(), grace.clone()).unwrap()
    };
    let v = mk(1, VMID);
    let other = mk(2, OTHER_VMID);
    v.set_dev_id(DeviceId(0), 0x10).unwrap();
    v.set_dev_id(DeviceId(1), 0x11).unwrap();
    other.set_dev_id(DeviceId(2), 0x20).unwrap();
    other.set_dev_id(DeviceId(3), 0x10).unwrap();
    World { v, other }
}

fn kernel() -> Viommu {
    world(Profile::Kernel, true).v
}

fn cmd(line: &str) -> RawCommand {
    text::parse(line).unwrap_or_else(|e| panic!("{line}: {e}"))
}

/// The outcome of one command, through the fast path, checked against the oracle.
fn one(v: &Viommu, c: RawCommand) -> SlotOutcome {
    let fast = translate_all(v, &[c], false);
    let map: HashMap<u32, u32> = v
        .bindings()
        .into_iter()
        .map(|(_, vs, ps)| (vs, ps))
        .collect();
    let slow = oracle::translate_all(v.config(), &map, &[c], false);
    assert_eq!(fast, slow, "fast path and oracle disagree on {c:?}");
    fast[0]
}

fn forwarded(v: &Viommu, line: &str) -> RawCommand {
    match one(v, cmd(line)) {
        SlotOutcome::Forwarded(o) => o,
        o => panic!("{line}: {o:?}"),
    }
}

fn refused(v: &Viommu, c: RawCommand) -> RefuseReason {
    match one(v, c) {
        SlotOutcome::Refused {
            cerror: CError::Ill,
            reason,
        } => reason,
        o => panic!("{c:?}: {o:?}"),
    }
}

#[test]
fn tlbi_nh_get_the_viommu_vmid_whatever_the_guest_wrote() {
    each_kernel(|| {
        let v = kernel();
        for (guest, want) in [
            ("TLBI_NH_ALL vmid=9", "TLBI_NH_ALL vmid=5"),
            ("TLBI_NH_ASID vmid=0 asid=7", "TLBI_NH_ASID vmid=5 asid=7"),
            (
                "TLBI_NH_VA vmid=65535 asid=7 addr=0x8000_0000 tg=4k num=3 scale=1 ttl=3 leaf",
                "TLBI_NH_VA vmid=5 asid=7 addr=0x8000_0000 tg=4k num=3 scale=1 ttl=3 leaf",
            ),
            (
                "TLBI_NH_VAA vmid=9 addr=0x1000 tg=64k ttl=2",
                "TLBI_NH_VAA vmid=5 addr=0x1000 tg=64k ttl=2",
            ),
            (
                "TLBI_NH_VAA vmid=9 addr=0x1000 leaf",
                "TLBI_NH_VAA vmid=5 addr=0x1000 leaf",
            ),
        ] {
            assert_eq!(forwarded(&v, guest), cmd(want), "{guest}");
        }
    });
}

#[test]
fn tlbi_nsnh_all_becomes_nh_all_with_vmid() {
    each_kernel(|| {
        let v = kernel();
        let out = forwarded(&v, "TLBI_NSNH_ALL");
        assert_eq!(out, cmd("TLBI_NH_ALL vmid=5"));
        assert_eq!(out.d1(), 0);
    });
}

#[test]
fn sid_commands_get_the_psid() {
    each_kernel(|| {
        let v = kernel();
        for (guest, want) in [
            (
                "ATC_INV sid=0x10 addr=0x4000 size=2",
                "ATC_INV sid=0x800 addr=0x4000 size=2",
            ),
            (
                "ATC_INV sid=0x11 ssv ssid=0x42 global size=52",
                "ATC_INV sid=0x801 ssv ssid=0x42 global size=52",
            ),
            (
                "CFGI_CD sid=0x10 ssid=0x7 leaf",
                "CFGI_CD sid=0x800 ssid=0x7 leaf",
            ),
            ("CFGI_CD_ALL sid=0x11", "CFGI_CD_ALL sid=0x801"),
        ] {
            assert_eq!(forwarded(&v, guest), cmd(want), "{guest}");
        }
    });
}

#[test]
fn unknown_vsid_and_another_viommus_vsid_are_ill() {
    each_kernel(|| {
        let w = world(Profile::Kernel, true);
        // 0x20 is bound in the other vIOMMU only; 0x12 nowhere; 0x10000 beyond SIDSIZE 16.
        for vsid in [0x20u32, 0x12, 0x1_0000, u32::MAX] {
            for op in ["ATC_INV", "CFGI_CD", "CFGI_CD_ALL"] {
                let c = cmd(&format!("{op} sid={vsid:#x}"));
                assert_eq!(
                    refused(&w.v, c),
                    RefuseReason::UnknownVsid {
                        opcode: c.opcode(),
                        vsid
                    }
                );
            }
        }
        // The same vSID means different devices in different vIOMMUs.
        assert_eq!(
            forwarded(&w.other, "ATC_INV sid=0x10 size=52"),
            cmd("ATC_INV sid=0x901 size=52")
        );
    });
}

#[test]
fn atc_inv_size_above_52_is_ill() {
    each_kernel(|| {
        let v = kernel();
        forwarded(&v, "ATC_INV sid=0x10 size=52");
        for size in 53..=63u8 {
            let c = cmd(&format!("ATC_INV sid=0x10 size={size}"));
            assert_eq!(refused(&v, c), RefuseReason::AtcSizeTooLarge { size });
        }
    });
}

#[test]
fn secure_bit_is_ill() {
    each_kernel(|| {
        let v = kernel();
        for op in ["CFGI_CD", "CFGI_CD_ALL", "CFGI_STE", "CFGI_STE_RANGE"] {
            let c = cmd(&format!("{op} sid=0x10 ssec"));
            assert_eq!(
                refused(&v, c),
                RefuseReason::Secure { opcode: c.opcode() },
                "{op}"
            );
        }
    });
}

#[test]
fn range_fields_without_range_support_are_ill() {
    each_kernel(|| {
        let v = world(Profile::Kernel, false).v;
        forwarded(&v, "TLBI_NH_VA asid=1 addr=0x1000 leaf");
        // "Without RIL, TG, TTL, NUM and SCALE are RES0": TTL alone too.
        for fields in [
            "tg=4k",
            "tg=64k num=1",
            "tg=16k scale=2",
            "ttl=3",
            "tg=4k ttl=3",
        ] {
            for op in ["TLBI_NH_VA", "TLBI_NH_VAA"] {
                let c = cmd(&format!("{op} addr=0x1000 {fields}"));
                assert_eq!(
                    refused(&v, c),
                    RefuseReason::RangeUnsupported { opcode: c.opcode() },
                    "{op} {fields}"
                );
            }
        }
        // NUM/SCALE with TG=0 (which the text form refuses to write).
        let c = RawCommand::new(u64::from(opcode::TLBI_NH_VA) | 1 << 12, 0x1000);
        assert_eq!(
            refused(&v, c),
            RefuseReason::RangeUnsupported { opcode: c.opcode() }
        );
    });
}

#[test]
fn num_scale_without_granule_is_ill_even_with_range_support() {
    each_kernel(|| {
        let v = kernel();
        for d0 in [1u64 << 12, 1 << 20, 0x1f << 12 | 0x1f << 20] {
            for op in [opcode::TLBI_NH_VA, opcode::TLBI_NH_VAA] {
                let c = RawCommand::new(u64::from(op) | d0, 0x1000);
                assert_eq!(refused(&v, c), RefuseReason::MalformedRange { opcode: op });
            }
        }
    });
}

#[test]
fn cfgi_ste_is_trapped_and_prefetch_dropped_in_both_profiles() {
    each_kernel(|| {
        for profile in Profile::ALL {
            let v = world(profile, true).v;
            for line in ["CFGI_STE sid=0x10 leaf", "CFGI_STE_RANGE sid=0x40 range=3"] {
                // Trapped as written: the control plane translates the SID itself.
                assert_eq!(
                    one(&v, cmd(line)),
                    SlotOutcome::Trapped(cmd(line)),
                    "{profile} {line}"
                );
            }
            for line in [
                "PREFETCH_CONFIG sid=0x10",
                "PREFETCH_ADDR sid=0x12 addr=0x1000 size=3",
            ] {
                assert_eq!(one(&v, cmd(line)), SlotOutcome::Dropped, "{profile} {line}");
            }
        }
    });
}

/// The opcodes a profile forwards (after patching).
fn forwards(profile: Profile) -> &'static [u8] {
    match profile {
        Profile::Kernel => &[
            opcode::TLBI_NH_ALL,
            opcode::TLBI_NH_ASID,
            opcode::TLBI_NH_VA,
            opcode::TLBI_NH_VAA,
            opcode::TLBI_NSNH_ALL,
            opcode::ATC_INV,
            opcode::CFGI_CD,
            opcode::CFGI_CD_ALL,
        ],
        Profile::Tegra241 => &[opcode::TLBI_NH_ASID, opcode::TLBI_NH_VA, opcode::ATC_INV],
    }
}

/// A well-formed command of `layout` naming vSID 0x10 where it has a SID, ATC_INV SIZE 0.
fn minimal(layout: &OpLayout) -> RawCommand {
    let mut w = [u64::from(layout.opcode), 0];
    if let Some(f) = layout.field("sid") {
        f.put(&mut w, 0x10).unwrap();
    }
    RawCommand::new(w[0], w[1])
}

#[test]
fn every_legal_opcode_has_its_profile_outcome() {
    each_kernel(|| {
        for profile in Profile::ALL {
            let v = world(profile, true).v;
            for layout in LAYOUTS.iter().flatten() {
                let c = minimal(layout);
                let got = one(&v, c);
                let op = layout.opcode;
                let want_kind = match op {
                    opcode::CFGI_STE | opcode::CFGI_STE_RANGE => "trapped",
                    opcode::PREFETCH_CONFIG | opcode::PREFETCH_ADDR => "dropped",
                    opcode::CMD_SYNC => "sync",
                    _ if forwards(profile).contains(&op) => "forwarded",
                    _ => "refused",
                };
                let kind = match got {
                    SlotOutcome::Forwarded(_) => "forwarded",
                    SlotOutcome::Trapped(_) => "trapped",
                    SlotOutcome::Dropped => "dropped",
                    SlotOutcome::Sync { .. } => "sync",
                    SlotOutcome::Refused {
                        reason: RefuseReason::NotAllowedByProfile { opcode },
                        ..
                    } if opcode == op => "refused",
                    _ => "unexpected",
                };
                assert_eq!(kind, want_kind, "{profile} {} -> {got:?}", layout.name);
            }
        }
    });
}

#[test]
fn tegra241_refuses_what_its_vcmdq_does_not_take() {
    each_kernel(|| {
        let v = world(Profile::Tegra241, true).v;
        assert_eq!(
            forwarded(&v, "TLBI_NH_ASID vmid=3 asid=4"),
            cmd("TLBI_NH_ASID vmid=5 asid=4")
        );
        assert_eq!(
            forwarded(&v, "TLBI_NH_VA asid=4 addr=0x2000 tg=4k ttl=3"),
            cmd("TLBI_NH_VA vmid=5 asid=4 addr=0x2000 tg=4k ttl=3")
        );
        assert_eq!(
            forwarded(&v, "ATC_INV sid=0x11 size=52"),
            cmd("ATC_INV sid=0x801 size=52")
        );
        for line in [
            "TLBI_NH_ALL",
            "TLBI_NH_VAA addr=0x1000",
            "TLBI_NSNH_ALL",
            "CFGI_CD sid=0x10",
            "CFGI_CD_ALL sid=0x10",
        ] {
            let c = cmd(line);
            assert_eq!(
                refused(&v, c),
                RefuseReason::NotAllowedByProfile { opcode: c.opcode() },
                "{line}"
            );
        }
    });
}

#[test]
fn every_illegal_opcode_is_ill() {
    each_kernel(|| {
        for profile in Profile::ALL {
            let v = world(profile, true).v;
            for op in 0..=255u8 {
                if LAYOUTS[op as usize].is_some() {
                    continue;
                }
                for d1 in [0, 1, u64::MAX] {
                    let c = RawCommand::new(u64::from(op) | 0x10 << 32, d1);
                    assert_eq!(refused(&v, c), RefuseReason::IllegalOpcode { opcode: op });
                }
            }
        }
    });
}

#[test]
fn every_res0_bit_of_every_opcode_is_ill() {
    each_kernel(|| {
        for profile in Profile::ALL {
            let v = world(profile, false).v;
            for layout in LAYOUTS.iter().flatten() {
                for word in 0..2 {
                    for bit in 0..64 {
                        if layout.allowed[word] >> bit & 1 != 0 {
                            continue;
                        }
                        let mut w = [minimal(layout).d0(), minimal(layout).d1()];
                        w[word] |= 1 << bit;
                        let c = RawCommand::new(w[0], w[1]);
                        let mut bits = [0, 0];
                        bits[word] = 1 << bit;
                        assert_eq!(
                            refused(&v, c),
                            RefuseReason::Res0 {
                                opcode: layout.opcode,
                                d0: bits[0],
                                d1: bits[1]
                            },
                            "{profile} {} d{word}[{bit}]",
                            layout.name
                        );
                    }
                }
            }
        }
    });
}

#[test]
fn guest_cmd_sync_closes_the_batch_and_is_never_forwarded() {
    each_kernel(|| {
        let v = kernel();
        let input = [
            cmd("TLBI_NH_ASID asid=1"),
            cmd("CMD_SYNC cs=1 msidata=0xcafe msiaddr=0x8000_1234 msh=3 msiattr=15"),
            cmd("TLBI_NH_ASID asid=2"),
        ];
        let mut out = [RawCommand::default(); 8];
        let mut prov = [0u32; 8];
        let end = translate(&v, &input, &mut out, &mut prov);
        assert_eq!(
            end,
            BatchEnd {
                consumed: 2,
                produced: 1,
                stop: Stop::Sync {
                    slot: 1,
                    cs: 1,
                    msidata: 0xcafe,
                    msiaddr: 0x8000_1234
                }
            }
        );
        assert_eq!(out[0], cmd("TLBI_NH_ASID vmid=5 asid=1"));
        assert_eq!(prov[0], 0);
        // The guest's MSI address never reaches the physical queue.
        assert!(out[..end.produced]
            .iter()
            .all(|c| c.opcode() != opcode::CMD_SYNC));
    });
}

#[test]
fn cmd_sync_fields_are_checked() {
    each_kernel(|| {
        let v = kernel();
        for cs in 0..3u8 {
            assert_eq!(
                one(&v, cmd(&format!("CMD_SYNC cs={cs}"))),
                SlotOutcome::Sync {
                    cs,
                    msidata: 0,
                    msiaddr: 0
                }
            );
        }
        assert_eq!(
            refused(&v, cmd("CMD_SYNC cs=3")),
            RefuseReason::ReservedSyncCs
        );
        // MSIADDR bits [1:0] and [63:52] are RES0.
        let c = RawCommand::new(u64::from(opcode::CMD_SYNC), 0b10);
        assert!(matches!(
            refused(&v, c),
            RefuseReason::Res0 { d1: 0b10, .. }
        ));
    });
}

#[test]
fn batch_accounting_and_provenance() {
    each_kernel(|| {
        let v = kernel();
        let input = [
            cmd("PREFETCH_CONFIG sid=0x10"),
            cmd("ATC_INV sid=0x10 size=1"),
            cmd("PREFETCH_CONFIG sid=0x10"),
            cmd("TLBI_NH_ASID asid=3"),
            cmd("TLBI_NH_ASID asid=4"),
            cmd("PREFETCH_ADDR sid=0x10"),
            cmd("CFGI_STE sid=0x10"),
            cmd("TLBI_NH_ALL"),
        ];
        let mut out = [RawCommand::default(); 8];
        let mut prov = [0u32; 8];
        let end = translate(&v, &input, &mut out, &mut prov);
        assert_eq!(
            end,
            BatchEnd {
                consumed: 7,
                produced: 3,
                stop: Stop::Trap {
                    slot: 6,
                    cmd: input[6]
                }
            }
        );
        assert_eq!(&prov[..3], &[1, 3, 4]);

        // Output room for two: stops before the third forward; drops need no room.
        let end = translate(&v, &input, &mut out[..2], &mut prov);
        assert_eq!(
            end,
            BatchEnd {
                consumed: 4,
                produced: 2,
                stop: Stop::OutputFull
            }
        );
        // `prov` shorter than `out` limits too.
        let end = translate(&v, &input, &mut out, &mut prov[..1]);
        assert_eq!(
            (end.consumed, end.produced, end.stop),
            (3, 1, Stop::OutputFull)
        );
        // No room at all: leading drops are still consumed.
        let end = translate(&v, &input, &mut [], &mut []);
        assert_eq!(
            (end.consumed, end.produced, end.stop),
            (1, 0, Stop::OutputFull)
        );
        // Drained.
        let end = translate(&v, &input[..6], &mut out, &mut prov);
        assert_eq!(
            (end.consumed, end.produced, end.stop),
            (6, 3, Stop::Drained)
        );
        let end = translate(&v, &[], &mut out, &mut prov);
        assert_eq!(
            (end.consumed, end.produced, end.stop),
            (0, 0, Stop::Drained)
        );
    });
}

#[test]
fn a_refused_slot_is_not_consumed_and_stops_the_queue() {
    each_kernel(|| {
        let v = kernel();
        let input = [
            cmd("TLBI_NH_ASID asid=3"),
            cmd("PREFETCH_CONFIG sid=0x10"),
            cmd("TLBI_EL2_ALL"),
            cmd("TLBI_NH_ASID asid=4"),
        ];
        let mut out = [RawCommand::default(); 8];
        let mut prov = [0u32; 8];
        let end = translate(&v, &input, &mut out, &mut prov);
        assert_eq!(
            end,
            BatchEnd {
                consumed: 2,
                produced: 1,
                stop: Stop::Refused {
                    slot: 2,
                    cerror: CError::Ill,
                    reason: RefuseReason::NotAllowedByProfile {
                        opcode: opcode::TLBI_EL2_ALL
                    }
                }
            }
        );
        let all = translate_all(&v, &input, false);
        assert!(matches!(all[0], SlotOutcome::Forwarded(_)));
        assert_eq!(all[1], SlotOutcome::Dropped);
        assert!(matches!(all[2], SlotOutcome::Refused { .. }));
        assert_eq!(all[3], SlotOutcome::NotReached);
        let all = translate_all(&v, &input, true);
        assert_eq!(
            all[3],
            SlotOutcome::Forwarded(cmd("TLBI_NH_ASID vmid=5 asid=4"))
        );
    });
}

#[test]
fn translate_all_spans_chunks() {
    each_kernel(|| {
        let v = kernel();
        let input: Vec<RawCommand> = (0..300u64)
            .map(|i| match i % 5 {
                0 => cmd("PREFETCH_CONFIG sid=0x10"),
                1 => cmd("CMD_SYNC"),
                2 => cmd("CFGI_STE sid=0x11"),
                _ => RawCommand::new(u64::from(opcode::TLBI_NH_ASID) | i << 48, 0),
            })
            .collect();
        let all = translate_all(&v, &input, false);
        assert_eq!(all.len(), 300);
        for (i, o) in all.iter().enumerate() {
            let ok = match i % 5 {
                0 => *o == SlotOutcome::Dropped,
                1 => matches!(o, SlotOutcome::Sync { .. }),
                2 => matches!(o, SlotOutcome::Trapped(_)),
                _ => {
                    *o == SlotOutcome::Forwarded(RawCommand::new(
                        u64::from(opcode::TLBI_NH_ASID) | (i as u64) << 48 | u64::from(VMID) << 32,
                        0,
                    ))
                }
            };
            assert!(ok, "slot {i}: {o:?}");
        }
        // Only forwards, past one chunk of 64.
        let input = vec![cmd("TLBI_NH_ALL"); 200];
        assert!(translate_all(&v, &input, false)
            .iter()
            .all(|o| *o == SlotOutcome::Forwarded(cmd("TLBI_NH_ALL vmid=5"))));
    });
}

/// The `world` vIOMMU `v`, on an SMMU with `features` (and its RIL).
fn on_smmu(profile: Profile, features: SmmuFeatures) -> Viommu {
    let devices = Devices::new();
    devices.add_device(DeviceId(0), 0, 0x800).unwrap();
    let cfg = ViommuConfig {
        profile,
        sidsize: 16,
        ..ViommuConfig::new(1, VMID, 0)
    }
    .with_smmu(features);
    let v = Viommu::new(cfg, devices, GraceDomain::new()).unwrap();
    v.set_dev_id(DeviceId(0), 0x10).unwrap();
    v
}

fn range_cmd(op: u8, tg: u64, ttl: u64, num: u64, scale: u64) -> RawCommand {
    RawCommand::new(
        u64::from(op) | num << 12 | scale << 20,
        0x4000_0000 | tg << 10 | ttl << 8 | 1,
    )
}

#[test]
fn ttl_with_tg_0_is_ill_because_ttl_is_res0_without_a_granule() {
    each_kernel(|| {
        // "TG=0 is the non-range form, and then NUM, SCALE and TTL are all RES0".
        let v = kernel();
        for op in [opcode::TLBI_NH_VA, opcode::TLBI_NH_VAA] {
            for ttl in 1..=3 {
                assert_eq!(
                    refused(&v, range_cmd(op, 0, ttl, 0, 0)),
                    RefuseReason::TtlWithoutGranule { opcode: op }
                );
            }
            assert!(matches!(
                one(&v, range_cmd(op, 0, 0, 0, 0)),
                SlotOutcome::Forwarded(_)
            ));
            // NUM/SCALE with TG=0 is named first when both are wrong.
            assert_eq!(
                refused(&v, range_cmd(op, 0, 2, 1, 0)),
                RefuseReason::MalformedRange { opcode: op }
            );
        }
    });
}

#[test]
fn tg_with_num_scale_and_ttl_all_0_is_the_reserved_range_encoding() {
    each_kernel(|| {
        // IHI 0070 4.4.1.1: with TG != 0, TTL = NUM = SCALE = 0 is reserved and CERROR_ILL.
        let v = kernel();
        for op in [opcode::TLBI_NH_VA, opcode::TLBI_NH_VAA] {
            for tg in 1..=3 {
                assert_eq!(
                    refused(&v, range_cmd(op, tg, 0, 0, 0)),
                    RefuseReason::ReservedRange { opcode: op }
                );
                // Any one of them non-zero makes it a valid range.
                for (ttl, num, scale) in [(3, 0, 0), (0, 1, 0), (0, 0, 1)] {
                    assert!(
                        matches!(
                            one(&v, range_cmd(op, tg, ttl, num, scale)),
                            SlotOutcome::Forwarded(_)
                        ),
                        "tg={tg} ttl={ttl} num={num} scale={scale}"
                    );
                }
            }
        }
    });
}

#[test]
fn ttl_1_with_a_16k_granule_needs_ds_and_every_other_level_is_valid() {
    each_kernel(|| {
        // "16K: TTL=1 (a level-1 leaf) exists only with 52-bit addresses (SMMU_IDR5.DS)".
        let no_ds = on_smmu(
            Profile::Kernel,
            SmmuFeatures {
                ds: false,
                ..SmmuFeatures::ANY
            },
        );
        let ds = on_smmu(Profile::Kernel, SmmuFeatures::ANY);
        let op = opcode::TLBI_NH_VA;
        assert_eq!(
            refused(&no_ds, range_cmd(op, 2, 1, 0, 0)),
            RefuseReason::ReservedTtl {
                opcode: op,
                tg: 2,
                ttl: 1
            }
        );
        assert_eq!(
            refused(&no_ds, range_cmd(op, 2, 1, 3, 1)),
            RefuseReason::ReservedTtl {
                opcode: op,
                tg: 2,
                ttl: 1
            }
        );
        assert!(matches!(
            one(&ds, range_cmd(op, 2, 1, 0, 0)),
            SlotOutcome::Forwarded(_)
        ));
        // 4K levels 1..3, 16K levels 2..3, 64K levels 1..3 (Linux's TTL = 4 - (log2(size) - 3) /
        // (log2(granule) - 3) gives exactly these for the leaf sizes each granule has).
        for (tg, ttl) in [
            (1, 1),
            (1, 2),
            (1, 3),
            (2, 2),
            (2, 3),
            (3, 1),
            (3, 2),
            (3, 3),
        ] {
            assert!(
                matches!(
                    one(&no_ds, range_cmd(op, tg, ttl, 0, 0)),
                    SlotOutcome::Forwarded(_)
                ),
                "tg={tg} ttl={ttl}"
            );
        }
    });
}

#[test]
fn a_granule_the_smmu_does_not_support_is_ill() {
    each_kernel(|| {
        let only_4k = on_smmu(
            Profile::Kernel,
            SmmuFeatures {
                gran16k: false,
                gran64k: false,
                ..SmmuFeatures::ANY
            },
        );
        for tg in [2, 3] {
            for op in [opcode::TLBI_NH_VA, opcode::TLBI_NH_VAA] {
                assert_eq!(
                    refused(&only_4k, range_cmd(op, tg, 3, 1, 0)),
                    RefuseReason::GranuleUnsupported {
                        opcode: op,
                        tg: tg as u8
                    }
                );
            }
        }
        forwarded(&only_4k, "TLBI_NH_VA asid=1 addr=0x1000 tg=4k num=1");
    });
}

#[test]
fn an_asid_upper_byte_on_an_smmu_with_8_bit_asids_is_ill() {
    each_kernel(|| {
        let v = on_smmu(
            Profile::Kernel,
            SmmuFeatures {
                asid16: false,
                ..SmmuFeatures::ANY
            },
        );
        forwarded(&v, "TLBI_NH_ASID asid=0xff");
        forwarded(&v, "TLBI_NH_VA asid=0xff addr=0x1000");
        for line in [
            "TLBI_NH_ASID asid=0x100",
            "TLBI_NH_VA asid=0xff00 addr=0x1000",
        ] {
            let c = cmd(line);
            assert!(
                matches!(refused(&v, c), RefuseReason::AsidTooLarge { opcode, asid }
                if opcode == c.opcode() && asid == (c.d0() >> 48) as u16),
                "{line}"
            );
        }
        // The same on an SMMU with 16-bit ASIDs is fine.
        forwarded(&kernel(), "TLBI_NH_ASID asid=0x100");
    });
}

#[test]
fn substream_fields_without_substreams_or_beyond_ssidsize_are_ill() {
    each_kernel(|| {
        let none = on_smmu(
            Profile::Kernel,
            SmmuFeatures {
                ssidsize: 0,
                ..SmmuFeatures::ANY
            },
        );
        forwarded(&none, "ATC_INV sid=0x10 size=52");
        forwarded(&none, "CFGI_CD sid=0x10 leaf");
        for line in [
            "ATC_INV sid=0x10 ssv size=52",
            "ATC_INV sid=0x10 ssid=1 size=52",
            "ATC_INV sid=0x10 global size=52",
            "CFGI_CD sid=0x10 ssid=1",
        ] {
            let c = cmd(line);
            assert_eq!(
                refused(&none, c),
                RefuseReason::NoSubstreams { opcode: c.opcode() },
                "{line}"
            );
        }
        let eight = on_smmu(
            Profile::Kernel,
            SmmuFeatures {
                ssidsize: 8,
                ..SmmuFeatures::ANY
            },
        );
        forwarded(&eight, "ATC_INV sid=0x10 ssv ssid=0xff global size=52");
        forwarded(&eight, "CFGI_CD sid=0x10 ssid=0xff");
        for line in [
            "ATC_INV sid=0x10 ssv ssid=0x100 size=52",
            "CFGI_CD sid=0x10 ssid=0x100",
        ] {
            let c = cmd(line);
            assert_eq!(
                refused(&eight, c),
                RefuseReason::SsidTooLarge {
                    opcode: c.opcode(),
                    ssid: 0x100,
                    ssidsize: 8
                },
                "{line}"
            );
        }
    });
}

#[test]
fn atc_inv_on_an_smmu_without_ats_is_ill_in_both_profiles() {
    each_kernel(|| {
        for profile in Profile::ALL {
            let v = on_smmu(profile, SmmuFeatures::preset("qemu").unwrap());
            assert_eq!(
                refused(&v, cmd("ATC_INV sid=0x10 size=52")),
                RefuseReason::AtsUnsupported
            );
        }
    });
}

#[test]
fn each_new_reason_reads_as_its_rule() {
    each_kernel(|| {
        let op = opcode::TLBI_NH_VA;
        for (r, want) in [
            (
                RefuseReason::TtlWithoutGranule { opcode: op },
                "TTL set with TG=0",
            ),
            (
                RefuseReason::ReservedRange { opcode: op },
                "NUM=SCALE=TTL=0",
            ),
            (
                RefuseReason::ReservedTtl {
                    opcode: op,
                    tg: 2,
                    ttl: 1,
                },
                "16K granule",
            ),
            (
                RefuseReason::GranuleUnsupported { opcode: op, tg: 3 },
                "64K",
            ),
            (
                RefuseReason::AsidTooLarge {
                    opcode: op,
                    asid: 0x100,
                },
                "8-bit ASIDs",
            ),
            (RefuseReason::NoSubstreams { opcode: op }, "no substreams"),
            (RefuseReason::AtsUnsupported, "no ATS"),
        ] {
            let s = r.to_string();
            assert!(s.contains(want), "{s}");
        }
    });
}

/// Tegra241's VCMDQ only supports CS=NONE (the kernel sets ARM_SMMU_OPT_SECONDARY_CMDQ_CS_NONE_ONLY
/// for it and never issues another CS there), but a guest CMD_SYNC never reaches hardware: the
/// engine completes it (rule 1). vcmdq completes CS=IRQ and CS=SEV on a tegra241 ring as it does
/// on the kernel profile (docs/differences.md); only the reserved CS=3 is refused.
#[test]
fn a_tegra241_guest_sync_completes_whatever_its_cs_and_cs_3_is_ill() {
    each_kernel(|| {
        let v = world(Profile::Tegra241, true).v;
        for cs in 0..=2u8 {
            let c = cmd(&format!("CMD_SYNC cs={cs} msidata=0x7 msiaddr=0x1000"));
            match one(&v, c) {
                SlotOutcome::Sync { cs: got, .. } => assert_eq!(got, cs),
                o => panic!("CS={cs}: {o:?}"),
            }
        }
        let c = RawCommand::new(u64::from(opcode::CMD_SYNC) | 3 << 12, 0);
        assert_eq!(refused(&v, c), RefuseReason::ReservedSyncCs);
    });
}

#[test]
fn reasons_read_well() {
    each_kernel(|| {
        assert_eq!(
            RefuseReason::UnknownVsid {
                opcode: opcode::ATC_INV,
                vsid: 0x12
            }
            .to_string(),
            "ATC_INV names vSID 0x12, not bound in this vIOMMU"
        );
        assert_eq!(
            RefuseReason::IllegalOpcode { opcode: 0x47 }.to_string(),
            "illegal opcode 0x47"
        );
        assert!(RefuseReason::NotAllowedByProfile {
            opcode: layout_of::TLBI_EL2_ALL.opcode
        }
        .to_string()
        .starts_with("TLBI_EL2_ALL "));
    });
}

/// Commands biased toward what matters: mostly legal opcodes with SIDs near the bound ones,
/// some with random bits anywhere.
fn command_strategy() -> impl Strategy<Value = RawCommand> {
    let legal: Vec<u8> = LAYOUTS.iter().flatten().map(|l| l.opcode).collect();
    let sid = prop_oneof![0x0fu32..0x13, 0x1fu32..0x22, any::<u32>()];
    prop_oneof![
        4 => (proptest::sample::select(legal), sid, any::<u32>(), any::<u64>(), 0u8..4)
            .prop_map(|(op, sid, lo, d1, noise)| {
                let layout = LAYOUTS[op as usize].unwrap();
                // Keep to the allowed bits most of the time, so the deeper rules run.
                let mut d0 = (u64::from(lo) & !0xff | u64::from(op) | u64::from(sid) << 32)
                    & layout.allowed[0];
                let mut d1 = d1 & layout.allowed[1];
                if noise == 0 {
                    d0 |= 1 << (lo % 64);
                    d1 |= 1 << (sid % 64);
                }
                if op == opcode::ATC_INV && noise != 1 {
                    d1 = d1 & !0x3f | u64::from(lo % 54);
                }
                RawCommand::new(d0, d1)
            }),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(a, b)| RawCommand::new(a, b)),
    ]
}

/// Any set of SMMU features commands depend on.
fn features_strategy() -> impl Strategy<Value = SmmuFeatures> {
    (any::<[bool; 7]>(), 0u8..=20).prop_map(|(b, ssidsize)| SmmuFeatures {
        asid16: b[0],
        ats: b[1],
        ril: b[2],
        gran4k: b[3],
        gran16k: b[4],
        gran64k: b[5],
        ds: b[6],
        ssidsize,
        ..SmmuFeatures::ANY
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The fast path and the oracle agree on every SMMU's features, with the range fields
    /// (TG, TTL, NUM, SCALE) drawn from their whole space.
    #[test]
    fn fast_path_matches_oracle_on_any_smmu(
        tegra in any::<bool>(),
        features in features_strategy(),
        cont in any::<bool>(),
        input in proptest::collection::vec(command_strategy(), 0..100),
        ranges in proptest::collection::vec((0u64..4, 0u64..4, 0u64..3, 0u64..3, any::<bool>()), 0..40),
    ) {
        let profile = if tegra { Profile::Tegra241 } else { Profile::Kernel };
        let w = world_on(profile, features);
        let mut input = input;
        for (i, &(tg, ttl, num, scale, vaa)) in ranges.iter().enumerate() {
            let op = if vaa { opcode::TLBI_NH_VAA } else { opcode::TLBI_NH_VA };
            let asid = if i % 3 == 0 { 0x1234u64 << 48 } else { 7 << 48 };
            let c = range_cmd(op, tg, ttl, num, scale);
            let d0 = if vaa { c.d0() } else { c.d0() | asid };
            input.insert(i * 2 % (input.len() + 1), RawCommand::new(d0, c.d1()));
        }
        for (k, v) in kernels().into_iter().flat_map(|k| [(k, &w.v), (k, &w.other)]) {
            let map: HashMap<u32, u32> =
                v.bindings().into_iter().map(|(_, vs, ps)| (vs, ps)).collect();
            let fast = translate_all_with(k, v, &input, cont).unwrap();
            let slow = oracle::translate_all(v.config(), &map, &input, cont);
            prop_assert_eq!(&fast, &slow, "kernel {}", k);
        }
    }

    #[test]
    fn fast_path_matches_oracle(
        tegra in any::<bool>(),
        range_inv in any::<bool>(),
        cont in any::<bool>(),
        input in proptest::collection::vec(command_strategy(), 0..150),
    ) {
        let profile = if tegra { Profile::Tegra241 } else { Profile::Kernel };
        let w = world(profile, range_inv);
        for (k, v) in kernels().into_iter().flat_map(|k| [(k, &w.v), (k, &w.other)]) {
            let map: HashMap<u32, u32> =
                v.bindings().into_iter().map(|(_, vs, ps)| (vs, ps)).collect();
            let fast = translate_all_with(k, v, &input, cont).unwrap();
            let slow = oracle::translate_all(v.config(), &map, &input, cont);
            prop_assert_eq!(&fast, &slow, "kernel {}", k);
            // Isolation: nothing carries another VM's VMID or a pSID not bound here.
            let psids: HashSet<u32> = map.values().copied().collect();
            for o in &fast {
                if let SlotOutcome::Forwarded(c) = o {
                    if let Err(e) = oracle::check_isolation(v.config(), &psids, c) {
                        return Err(TestCaseError::fail(e));
                    }
                }
            }
        }
    }

    /// The guest tries every VMID and every SID on every opcode: outputs stay inside the VM.
    #[test]
    fn adversarial_batches_stay_isolated(
        tegra in any::<bool>(),
        vmids in proptest::collection::vec(any::<u16>(), 64),
        sids in proptest::collection::vec(prop_oneof![Just(0x10u32), Just(0x20), Just(0x800), Just(0x900), Just(0x901), any::<u32>()], 64),
    ) {
        let profile = if tegra { Profile::Tegra241 } else { Profile::Kernel };
        let w = world(profile, true);
        let input: Vec<RawCommand> = LAYOUTS
            .iter()
            .flatten()
            .zip(vmids.iter().cycle().zip(sids.iter().cycle()))
            .map(|(l, (&vmid, &sid))| {
                let mut wd = [u64::from(l.opcode), 0];
                if let Some(f) = l.field("vmid") { f.put(&mut wd, u64::from(vmid)).unwrap(); }
                if let Some(f) = l.field("sid") { f.put(&mut wd, u64::from(sid)).unwrap(); }
                RawCommand::new(wd[0], wd[1])
            })
            .collect();
        let psids: HashSet<u32> = [0x800, 0x801].into();
        for k in kernels() {
            for o in translate_all_with(k, &w.v, &input, true).unwrap() {
                if let SlotOutcome::Forwarded(c) = o {
                    if let Err(e) = oracle::check_isolation(w.v.config(), &psids, &c) {
                        return Err(TestCaseError::fail(format!("kernel {k}: {e}")));
                    }
                }
            }
        }
    }
}

/// Commands the SIMD kernels take whole groups of: mostly the opcodes forwarded as they are,
/// well-formed, naming bound vSIDs, with now and then a bit out of place, a value out of
/// range, an unbound vSID or any other command between them.
fn forward_strategy() -> impl Strategy<Value = RawCommand> {
    let fwd = vec![
        opcode::TLBI_NH_ALL,
        opcode::TLBI_NH_ASID,
        opcode::TLBI_NH_VA,
        opcode::TLBI_NH_VAA,
        opcode::ATC_INV,
        opcode::CFGI_CD,
        opcode::CFGI_CD_ALL,
    ];
    let sid = prop_oneof![12 => 0x10u32..0x12, 1 => 0x20u32..0x21, 1 => any::<u32>()];
    let fields = (0u64..4, 0u64..4, any::<bool>(), 0u64..64);
    prop_oneof![
        12 => (proptest::sample::select(fwd), sid, any::<u64>(), any::<u64>(), 0u8..24, fields)
            .prop_map(|(op, sid, a, b, noise, (tg, ttl, ns, size))| {
                let layout = LAYOUTS[op as usize].unwrap();
                let mut d0 = a & !0xff | u64::from(op) | u64::from(sid) << 32;
                let mut d1 = b;
                if noise >= 4 {
                    // Small ASIDs and SSIDs, no NUM/SCALE unless asked, a granule and level
                    // drawn from their whole space, SIZE up to 63.
                    d0 &= !(0xff << 56) & !(0xf_fff0 << 12);
                    if !ns {
                        d0 &= !super::NUM_SCALE_MASK;
                    }
                    d1 = d1 & !0xf3f | tg << 10 | ttl << 8 | size;
                }
                d0 &= layout.allowed[0];
                d1 &= layout.allowed[1];
                match noise {
                    0 => d0 |= 1 << (a % 64),
                    1 => d1 |= 1 << (b % 64),
                    2 => d0 ^= 0x80,
                    _ => {}
                }
                RawCommand::new(d0, d1)
            }),
        1 => command_strategy(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Runs of forwarded commands (the SIMD kernels' groups) with the odd failing lane: every
    /// kernel agrees with the oracle slot by slot, and `translate` with any output room gives
    /// every kernel the same batch end, output and provenance.
    #[test]
    fn forward_runs_match_the_oracle_with_every_kernel(
        tegra in any::<bool>(),
        features in prop_oneof![Just(SmmuFeatures::ANY), features_strategy()],
        cont in any::<bool>(),
        input in proptest::collection::vec(forward_strategy(), 0..120),
        room in 1usize..80,
    ) {
        let profile = if tegra { Profile::Tegra241 } else { Profile::Kernel };
        let w = world_on(profile, features);
        for v in [&w.v, &w.other] {
            let map: HashMap<u32, u32> =
                v.bindings().into_iter().map(|(_, vs, ps)| (vs, ps)).collect();
            let slow = oracle::translate_all(v.config(), &map, &input, cont);
            let mut first = None;
            for k in kernels() {
                let fast = translate_all_with(k, v, &input, cont).unwrap();
                prop_assert_eq!(&fast, &slow, "kernel {}", k);
                let mut out = vec![RawCommand::default(); room];
                let mut prov = vec![0u32; room];
                let mut ends = Vec::new();
                let mut start = 0;
                while start < input.len() {
                    let end = translate_with(k, v, &input[start..], &mut out, &mut prov).unwrap();
                    ends.push((end, out[..end.produced].to_vec(), prov[..end.produced].to_vec()));
                    start += end.consumed;
                    if matches!(end.stop, Stop::Refused { .. }) {
                        start += 1;
                    }
                }
                match &first {
                    None => first = Some((k, ends)),
                    Some((k0, e0)) => prop_assert_eq!(e0, &ends, "kernels {} and {}", k0, k),
                }
            }
        }
    }
}

#[test]
fn an_unsupported_kernel_is_an_error_and_the_best_is_supported() {
    let v = kernel();
    assert!(Kernel::best().is_supported());
    assert!(Kernel::Scalar.is_supported());
    for k in Kernel::ALL {
        let r = translate_with(k, &v, &[], &mut [], &mut []);
        match k.is_supported() {
            true => assert!(r.is_ok(), "{k}"),
            false => {
                let e = r.unwrap_err();
                assert_eq!(e, UnsupportedKernel { kernel: k });
                assert!(e.to_string().contains(k.name()), "{e}");
            }
        }
    }
}

/// A SIMD kernel checks a group in one go only when every opcode the profile forwards as it is
/// has a class in its tables; one left out would silently take the scalar loop.
#[test]
fn every_opcode_forwarded_as_it_is_has_a_simd_class() {
    for profile in [Profile::Kernel, Profile::Tegra241] {
        let v = world(profile, true).v;
        let t = v.rules();
        let mut classes = HashSet::new();
        for (op, r) in t.rules.iter().enumerate() {
            let forwarded = r.flags & F_FORWARD != 0;
            assert_eq!(
                t.simd.class[op] != 0,
                forwarded,
                "{profile:?} opcode {op:#04x}"
            );
            if op < 0x80 {
                assert_eq!(
                    t.simd.cls[op] != 0,
                    forwarded,
                    "{profile:?} opcode {op:#04x}"
                );
            }
            if forwarded {
                assert!(
                    classes.insert(t.simd.class[op]),
                    "{profile:?}: a class shared"
                );
                let row = &t.simd.rows[usize::from(t.simd.class[op])];
                assert_eq!(row.sid != 0, r.flags & F_SID != 0, "opcode {op:#04x}");
            }
        }
        assert!(!classes.is_empty());
    }
}

/// `translate_numbered` numbers input i as `first + i`, wrapping past `u32::MAX` (the engine
/// numbers by guest sequence number), with every kernel and through the SIMD groups, the
/// scalar tail and the policy step (a TLBI_NSNH_ALL); the outcome is `translate`'s.
#[test]
fn numbered_provenance_wraps_past_u32_max_with_every_kernel() {
    let v = kernel();
    let mut input: Vec<RawCommand> = (0..70)
        .map(|i| match i % 3 {
            0 => cmd("TLBI_NH_ASID asid=3"),
            1 => cmd("ATC_INV sid=0x10 size=52"),
            _ => cmd("CFGI_CD sid=0x11"),
        })
        .collect();
    input.insert(9, cmd("TLBI_NSNH_ALL"));
    let first = u32::MAX - 4;
    each_kernel(|| {
        let (mut out, mut prov) = ([RawCommand::default(); 80], [0u32; 80]);
        let plain = translate(&v, &input, &mut out, &mut prov);
        let want = out;
        let end = translate_numbered(&v, &input, first, &mut out, &mut prov);
        assert_eq!(end, plain);
        assert_eq!(end.produced, input.len(), "all forwarded");
        assert_eq!(out[..end.produced], want[..end.produced]);
        for (i, &p) in prov[..end.produced].iter().enumerate() {
            assert_eq!(p, first.wrapping_add(i as u32), "input {i}");
        }
    });
}

/// A SID command with an unbound vSID after the first block of 64 (where the kernels patch
/// SIDs a block at a time) ends the forwards exactly there: everything before it forwarded
/// and patched, the slot refused with the oracle's reason, with every kernel.
#[test]
fn an_unbound_vsid_past_the_first_block_stops_at_its_slot_with_every_kernel() {
    let v = kernel();
    let mut input: Vec<RawCommand> = (0..100)
        .map(|i| {
            if i % 2 == 0 {
                cmd("ATC_INV sid=0x11 size=52")
            } else {
                cmd("TLBI_NH_VA asid=1 addr=0x1000")
            }
        })
        .collect();
    input[77] = cmd("ATC_INV sid=0x12 size=52");
    let map: HashMap<u32, u32> = v
        .bindings()
        .into_iter()
        .map(|(_, vs, ps)| (vs, ps))
        .collect();
    let slow = oracle::translate_all(v.config(), &map, &input, false);
    each_kernel(|| {
        let (mut out, mut prov) = ([RawCommand::default(); 100], [0u32; 100]);
        let end = translate(&v, &input, &mut out, &mut prov);
        assert_eq!(end.produced, 77);
        assert!(
            matches!(end.stop, Stop::Refused { slot: 77, .. }),
            "{:?}",
            end.stop
        );
        let fast: Vec<SlotOutcome> = end.outcomes(&out, &prov).collect();
        assert_eq!(fast[..], slow[..78]);
        assert_eq!(
            out[76].d0() >> 32,
            0x801,
            "the last SID before it has its pSID"
        );
    });
}
