//! Baselines the benchmarks compare vcmdq with: the copy limit and the naive floor, plus the
//! inputs they share.

pub mod e2e;
pub mod guest_ram;
pub mod report;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use vcmdq::command::{decode, opcode, Command, RawCommand};
use vcmdq::sync::lock;

/// The limit: copy 16-byte commands from one buffer to another, touching nothing.
#[inline]
pub fn copy_limit(input: &[RawCommand], out: &mut [RawCommand]) -> usize {
    let n = input.len().min(out.len());
    out[..n].copy_from_slice(&input[..n]);
    n
}

/// The floor: what a first, obvious translator does. Per command it takes a lock, decodes into
/// the typed form, looks the vSID up in a SipHash `HashMap` and encodes again. Kernel profile,
/// forwards only; stops at the first command it does not forward.
pub struct NaiveTranslator {
    vmid: u16,
    map: Mutex<HashMap<u32, u32>>,
}

impl NaiveTranslator {
    /// A translator for VMID `vmid` with these vSID -> pSID bindings.
    pub fn new(vmid: u16, bindings: impl IntoIterator<Item = (u32, u32)>) -> NaiveTranslator {
        NaiveTranslator {
            vmid,
            map: Mutex::new(bindings.into_iter().collect()),
        }
    }

    /// Translates into `out`; returns how many commands it forwarded.
    pub fn translate(&self, input: &[RawCommand], out: &mut [RawCommand]) -> usize {
        let vmid = self.vmid;
        for (i, (raw, o)) in input.iter().zip(out.iter_mut()).enumerate() {
            let map = lock(&self.map);
            let psid = |sid: u32| map.get(&sid).copied();
            let cmd = match decode(*raw) {
                Ok(Command::TlbiNhAll { .. }) | Ok(Command::TlbiNsnhAll {}) => {
                    Command::TlbiNhAll { vmid }
                }
                Ok(Command::TlbiNhAsid { asid, .. }) => Command::TlbiNhAsid { vmid, asid },
                Ok(Command::TlbiNhVa {
                    asid,
                    addr,
                    tg,
                    num,
                    scale,
                    ttl,
                    leaf,
                    ..
                }) => Command::TlbiNhVa {
                    vmid,
                    asid,
                    addr,
                    tg,
                    num,
                    scale,
                    ttl,
                    leaf,
                },
                Ok(Command::AtcInv {
                    sid,
                    ssv,
                    ssid,
                    global,
                    addr,
                    size,
                }) if size <= 52 => match psid(sid) {
                    Some(sid) => Command::AtcInv {
                        sid,
                        ssv,
                        ssid,
                        global,
                        addr,
                        size,
                    },
                    None => return i,
                },
                Ok(Command::CfgiCd {
                    ssec: false,
                    ssid,
                    sid,
                    leaf,
                }) => match psid(sid) {
                    Some(sid) => Command::CfgiCd {
                        ssec: false,
                        ssid,
                        sid,
                        leaf,
                    },
                    None => return i,
                },
                _ => return i,
            };
            *o = cmd.encode();
        }
        input.len().min(out.len())
    }
}

/// The generator and the guest's invalidation traffic every benchmark draws its inputs from
/// (`guest_mix`: 50% TLBI_NH_VA, 25% ATC_INV, 15% TLBI_NH_ASID, 10% CFGI_CD, no CMD_SYNC):
/// the core's, which `vcmdq loadtest` sends too.
pub use vcmdq::mock::{guest_mix, Rng};

/// `n` distinct vSIDs: `0..n` when `sequential`, else drawn uniformly from `[0, 2^sidsize)`.
pub fn vsids(n: usize, sequential: bool, sidsize: u8, rng: &mut Rng) -> Vec<u32> {
    if sequential {
        return (0..n as u32).collect();
    }
    let mut seen = std::collections::HashSet::with_capacity(n);
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let s = rng.below(1 << sidsize) as u32;
        if seen.insert(s) {
            v.push(s);
        }
    }
    v
}

/// The pSID the benchmarks bind a vSID to.
pub fn psid_of(vsid: u32) -> u32 {
    vsid ^ 0x00ab_cdef
}

/// `len` ATC_INVs with SIDs drawn from `vsids`: every command needs a lookup.
pub fn atc_only(len: usize, vsids: &[u32], rng: &mut Rng) -> Vec<RawCommand> {
    (0..len)
        .map(|_| {
            let sid = u64::from(*rng.pick(vsids)) << 32;
            RawCommand::new(u64::from(opcode::ATC_INV) | sid, 52)
        })
        .collect()
}

/// The criterion settings of every suite: half a second of warm-up and two seconds of
/// measurement per benchmark, in `samples` samples (fewer where an iteration is long).
pub fn criterion_config(samples: usize) -> criterion::Criterion {
    criterion::Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(samples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vcmdq::translate::{translate_all, SlotOutcome};
    use vcmdq::viommu::{DeviceId, Devices, GraceDomain, Viommu, ViommuConfig};

    #[test]
    fn the_floor_translates_like_vcmdq() {
        let mut rng = Rng::new(7);
        let vs = vsids(64, false, 20, &mut rng);
        let input = guest_mix(1000, &vs, &mut rng);
        let naive = NaiveTranslator::new(3, vs.iter().map(|&v| (v, psid_of(v))));
        let mut out = vec![RawCommand::default(); input.len()];
        assert_eq!(naive.translate(&input, &mut out), input.len());

        let devices = Devices::new();
        let v = Viommu::new(
            ViommuConfig::new(1, 3, 0),
            Arc::clone(&devices),
            GraceDomain::new(),
        )
        .unwrap();
        for (i, &vsid) in vs.iter().enumerate() {
            devices
                .add_device(DeviceId(i as u32), 0, psid_of(vsid))
                .unwrap();
            v.set_dev_id(DeviceId(i as u32), vsid).unwrap();
        }
        let fast = translate_all(&v, &input, false);
        for (o, n) in fast.iter().zip(&out) {
            assert_eq!(*o, SlotOutcome::Forwarded(*n));
        }
    }

    #[test]
    fn vsids_are_distinct_and_in_range() {
        let mut rng = Rng::new(1);
        let v = vsids(5000, false, 16, &mut rng);
        let set: std::collections::HashSet<_> = v.iter().collect();
        assert_eq!(set.len(), 5000);
        assert!(v.iter().all(|&s| s < 1 << 16));
        assert_eq!(vsids(3, true, 16, &mut rng), [0, 1, 2]);
    }
}
