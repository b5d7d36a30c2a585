//! An arbitrary vIOMMU (profile, VMID, SIDSIZE, the physical SMMU's features: range support,
//! ASID size, ATS, SSIDSIZE, granules, DS), an arbitrary sequence of
//! set/unset_dev_id and an arbitrary batch: the errnos match a model, the fast path matches the
//! oracle slot by slot (whatever the output room), and nothing forwarded carries another VMID or
//! an unbound pSID. Every translation kernel this CPU runs (scalar, AVX2, AVX-512) is checked
//! in turn; the batch leans on the opcodes the SIMD kernels take several at a time.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use std::collections::{HashMap, HashSet};
use vcmdq::command::opcode;
use vcmdq::command::{RawCommand, LAYOUTS};
use vcmdq::oracle;
use vcmdq::translate::{translate_all_with, translate_with, Kernel, SlotOutcome, Stop};
use vcmdq::viommu::{DeviceId, Devices, GraceDomain, Profile, SmmuFeatures, Viommu, ViommuConfig};

const SMMU: u32 = 3;

/// A SID: mostly small, so that commands and bindings meet.
fn sid(raw: u32) -> u32 {
    if raw & 0x8000_0000 == 0 {
        raw % 48
    } else {
        raw
    }
}

/// A command biased toward legal opcodes and well-formed fields.
#[derive(Debug)]
struct Cmd(RawCommand);

impl<'a> Arbitrary<'a> for Cmd {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let kind: u8 = u.arbitrary()?;
        let mut d0: u64 = u.arbitrary()?;
        let mut d1: u64 = u.arbitrary()?;
        if kind < 224 {
            let legal: Vec<_> = LAYOUTS.iter().flatten().collect();
            // Half of them one of the opcodes forwarded as they are, so that the SIMD kernels
            // see runs of them.
            let l = match kind & 1 {
                0 => {
                    let op = FORWARDED[usize::from(kind >> 1) % FORWARDED.len()];
                    LAYOUTS[usize::from(op)].expect("legal")
                }
                _ => legal[usize::from(kind >> 1) % legal.len()],
            };
            d0 = (d0 & !0xff) | u64::from(l.opcode);
            d0 = (d0 & 0xffff_ffff) | u64::from(sid((d0 >> 32) as u32)) << 32;
            if kind % 8 != 0 {
                d0 &= l.allowed[0];
                d1 &= l.allowed[1];
            }
        }
        Ok(Cmd(RawCommand::new(d0, d1)))
    }
}

/// The opcodes a vIOMMU forwards with only their VMID or SID replaced.
const FORWARDED: [u8; 7] = [
    opcode::TLBI_NH_ALL,
    opcode::TLBI_NH_ASID,
    opcode::TLBI_NH_VA,
    opcode::TLBI_NH_VAA,
    opcode::ATC_INV,
    opcode::CFGI_CD,
    opcode::CFGI_CD_ALL,
];

#[derive(Debug, Arbitrary)]
enum Op {
    /// Bind device `dev` (created on first use with pSID `psid`, behind another SMMU if
    /// `foreign`) to `vsid`.
    Bind {
        dev: u8,
        psid: u32,
        foreign: bool,
        vsid: u32,
    },
    /// Unbind device `dev`.
    Unbind { dev: u8 },
}

#[derive(Debug, Arbitrary)]
struct Input {
    tegra: bool,
    range_inv: bool,
    /// ASID16, ATS, GRAN4K, GRAN16K, GRAN64K, DS.
    features: [bool; 6],
    /// SSIDSIZE, taken modulo 21.
    ssidsize: u8,
    vmid: u16,
    sidsize: u8,
    keep_going: bool,
    /// Output room of each `translate` call, 1..=16.
    room: u8,
    ops: Vec<Op>,
    cmds: Vec<Cmd>,
}

fuzz_target!(|input: Input| {
    let f = input.features;
    let features = SmmuFeatures {
        ril: input.range_inv,
        asid16: f[0],
        ats: f[1],
        gran4k: f[2],
        gran16k: f[3],
        gran64k: f[4],
        ds: f[5],
        ssidsize: input.ssidsize % 21,
        ..SmmuFeatures::ANY
    };
    let cfg = ViommuConfig {
        profile: if input.tegra {
            Profile::Tegra241
        } else {
            Profile::Kernel
        },
        sidsize: input.sidsize % 32 + 1,
        // Enough VINTF slots for every bind below: the slot limit has its own tests.
        tegra241_sid_slots: 1 << 16,
        ..ViommuConfig::new(1, input.vmid, SMMU)
    }
    .with_smmu(features);
    let devices = Devices::new();
    let v = Viommu::new(cfg, devices.clone(), GraceDomain::new()).unwrap();

    // The model: device -> (smmu, psid), and the bindings.
    let mut devs: HashMap<u8, (u32, u32)> = HashMap::new();
    let mut by_dev: HashMap<u8, u32> = HashMap::new();
    let mut map: HashMap<u32, u32> = HashMap::new();
    for op in input.ops.iter().take(64) {
        match *op {
            Op::Bind {
                dev,
                psid,
                foreign,
                vsid,
            } => {
                let vsid = sid(vsid);
                let smmu = if foreign { SMMU + 1 } else { SMMU };
                let id = DeviceId(dev.into());
                if !devs.contains_key(&dev) {
                    let dup = devs.values().any(|&d| d == (smmu, psid));
                    let r = devices.add_device(id, smmu, psid);
                    assert_eq!(r.is_err(), dup, "add_device {r:?}");
                    if dup {
                        continue;
                    }
                    devs.insert(dev, (smmu, psid));
                }
                let (smmu, psid) = devs[&dev];
                let want = if smmu != SMMU {
                    Some("EINVAL")
                } else if u64::from(vsid) >> cfg.sidsize != 0 {
                    Some("EINVAL")
                } else if by_dev.contains_key(&dev) || map.contains_key(&vsid) {
                    Some("EEXIST")
                } else {
                    None
                };
                let got = v.set_dev_id(id, vsid);
                assert_eq!(got.as_ref().err().map(|e| e.errno()), want, "{got:?}");
                if got.is_ok() {
                    by_dev.insert(dev, vsid);
                    map.insert(vsid, psid);
                }
            }
            Op::Unbind { dev } => {
                let got = v.unset_dev_id(DeviceId(dev.into()));
                match by_dev.remove(&dev) {
                    Some(vsid) => {
                        assert_eq!(got, Ok(vsid));
                        map.remove(&vsid);
                    }
                    None => assert_eq!(got.map_err(|e| e.errno()), Err("ENOENT")),
                }
            }
        }
    }
    let bound: HashMap<u32, u32> = v
        .bindings()
        .into_iter()
        .map(|(_, vs, ps)| (vs, ps))
        .collect();
    assert_eq!(bound, map);

    let cmds: Vec<RawCommand> = input.cmds.iter().map(|c| c.0).collect();
    let slow = oracle::translate_all(&cfg, &map, &cmds, input.keep_going);
    let psids: HashSet<u32> = map.values().copied().collect();
    for kernel in Kernel::ALL {
        if !kernel.is_supported() {
            continue;
        }
        check(kernel, &v, &cmds, &slow, &psids, &input);
    }
});

/// `kernel` against the oracle's `slow` outcomes, through `translate_all` and through
/// `translate` with little output room.
fn check(
    kernel: Kernel,
    v: &Viommu,
    cmds: &[RawCommand],
    slow: &[SlotOutcome],
    psids: &HashSet<u32>,
    input: &Input,
) {
    let fast = translate_all_with(kernel, v, cmds, input.keep_going).expect("supported");
    assert_eq!(fast, slow, "kernel {kernel}");

    for o in &fast {
        if let SlotOutcome::Forwarded(c) = o {
            if let Err(e) = oracle::check_isolation(v.config(), psids, c) {
                panic!("isolation, kernel {kernel}: {e}");
            }
        }
    }

    // The same through `translate` with little output room: the same forwards, in order, with
    // provenance pointing at the right slots.
    let room = usize::from(input.room % 16) + 1;
    let mut out = vec![RawCommand::default(); room];
    let mut prov = vec![0u32; room];
    let mut start = 0;
    while start < cmds.len() {
        let end =
            translate_with(kernel, v, &cmds[start..], &mut out, &mut prov).expect("supported");
        assert!(end.produced <= room && end.consumed <= cmds.len() - start);
        for j in 0..end.produced {
            let slot = start + prov[j] as usize;
            assert!(prov[j] as usize <= end.consumed);
            assert_eq!(
                fast[slot],
                SlotOutcome::Forwarded(out[j]),
                "slot {slot}, kernel {kernel}"
            );
        }
        start += end.consumed;
        match end.stop {
            Stop::Refused { slot, .. } => {
                assert_eq!(slot, end.consumed);
                assert!(matches!(fast[start], SlotOutcome::Refused { .. }));
                if !input.keep_going {
                    assert!(fast[start + 1..]
                        .iter()
                        .all(|o| *o == SlotOutcome::NotReached));
                    break;
                }
                start += 1;
            }
            Stop::OutputFull => assert_eq!(end.produced, room),
            Stop::Drained => assert_eq!(start, cmds.len()),
            Stop::Sync { slot, .. } => {
                assert!(matches!(fast[start - 1], SlotOutcome::Sync { .. }));
                assert_eq!(slot + 1, end.consumed);
            }
            Stop::Trap { slot, cmd } => {
                assert_eq!(fast[start - 1], SlotOutcome::Trapped(cmd));
                assert_eq!(slot + 1, end.consumed);
            }
        }
    }
}
