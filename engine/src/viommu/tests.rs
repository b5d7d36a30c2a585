use super::*;
use crate::command::{opcode, RawCommand};
use crate::translate::{translate, Stop};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const SMMU: u32 = 0;
const OTHER_SMMU: u32 = 1;

struct Host {
    devices: Arc<Devices>,
    grace: Arc<GraceDomain>,
}

impl Host {
    fn new() -> Host {
        Host {
            devices: Devices::new(),
            grace: GraceDomain::new(),
        }
    }

    fn viommu(&self, id: u32, vmid: u16, smmu: u32, sidsize: u8) -> Viommu {
        let cfg = ViommuConfig {
            sidsize,
            ..ViommuConfig::new(id, vmid, smmu)
        };
        Viommu::new(cfg, self.devices.clone(), self.grace.clone()).unwrap()
    }
}

fn host_with_devices() -> Host {
    let h = Host::new();
    for i in 0..4 {
        h.devices.add_device(DeviceId(i), SMMU, 0x800 + i).unwrap();
    }
    h.devices
        .add_device(DeviceId(9), OTHER_SMMU, 0x800)
        .unwrap();
    h
}

#[test]
fn bind_then_lookup() {
    let h = host_with_devices();
    let v = h.viommu(1, 5, SMMU, 16);
    assert_eq!(v.lookup(0x10), None);
    v.set_dev_id(DeviceId(0), 0x10).unwrap();
    v.set_dev_id(DeviceId(1), 0x11).unwrap();
    assert_eq!(v.lookup(0x10), Some(0x800));
    assert_eq!(v.lookup(0x11), Some(0x801));
    assert_eq!(
        v.bindings(),
        vec![(DeviceId(0), 0x10, 0x800), (DeviceId(1), 0x11, 0x801)]
    );
}

#[test]
fn vsid_taken_is_eexist() {
    let h = host_with_devices();
    let v = h.viommu(1, 5, SMMU, 16);
    v.set_dev_id(DeviceId(0), 0x10).unwrap();
    let e = v.set_dev_id(DeviceId(1), 0x10).unwrap_err();
    assert_eq!(
        e,
        ViommuError::VsidTaken {
            viommu: 1,
            vsid: 0x10,
            device: DeviceId(0)
        }
    );
    assert_eq!(e.errno(), "EEXIST");
    assert!(e.to_string().starts_with("EEXIST: "), "{e}");
    assert_eq!(
        v.lookup(0x10),
        Some(0x800),
        "a refused bind changes nothing"
    );
}

#[test]
fn device_already_bound_is_eexist_here_and_elsewhere() {
    let h = host_with_devices();
    let v = h.viommu(1, 5, SMMU, 16);
    let w = h.viommu(2, 6, SMMU, 16);
    v.set_dev_id(DeviceId(0), 0x10).unwrap();
    let e = v.set_dev_id(DeviceId(0), 0x12).unwrap_err();
    assert_eq!(
        e,
        ViommuError::DeviceBound {
            device: DeviceId(0),
            viommu: 1,
            vsid: Some(0x10)
        }
    );
    assert_eq!(e.errno(), "EEXIST");
    // Another VM's vIOMMU on the same SMMU cannot take the device (and so its pSID) either.
    let e = w.set_dev_id(DeviceId(0), 0x10).unwrap_err();
    assert_eq!(e.errno(), "EEXIST");
    assert_eq!(w.lookup(0x10), None);
    assert_eq!(v.lookup(0x12), None);
}

#[test]
fn device_behind_another_smmu_is_einval() {
    let h = host_with_devices();
    let v = h.viommu(1, 5, SMMU, 16);
    let e = v.set_dev_id(DeviceId(9), 0x10).unwrap_err();
    assert_eq!(
        e,
        ViommuError::WrongSmmu {
            device: DeviceId(9),
            device_smmu: OTHER_SMMU,
            viommu: 1,
            viommu_smmu: SMMU
        }
    );
    assert_eq!(e.errno(), "EINVAL");
    assert_eq!(v.lookup(0x10), None);
}

#[test]
fn vsid_beyond_sidsize_is_einval() {
    let h = host_with_devices();
    for sidsize in [1u8, 8, 16, 31] {
        let v = h.viommu(sidsize.into(), 5, SMMU, sidsize);
        let first_bad = 1u32 << sidsize;
        let e = v.set_dev_id(DeviceId(0), first_bad).unwrap_err();
        assert_eq!(
            e,
            ViommuError::VsidTooLarge {
                viommu: sidsize.into(),
                vsid: first_bad,
                sidsize
            }
        );
        assert_eq!(e.errno(), "EINVAL");
        assert_eq!(
            v.set_dev_id(DeviceId(0), u32::MAX).unwrap_err().errno(),
            "EINVAL"
        );
        v.set_dev_id(DeviceId(0), first_bad - 1).unwrap();
        v.unset_dev_id(DeviceId(0)).unwrap();
    }
    let v = h.viommu(32, 5, SMMU, 32);
    v.set_dev_id(DeviceId(0), u32::MAX).unwrap();
    assert_eq!(v.lookup(u32::MAX), Some(0x800));
}

#[test]
fn bad_sidsize_is_einval() {
    let h = Host::new();
    for sidsize in [0u8, 33, 255] {
        let cfg = ViommuConfig {
            sidsize,
            ..ViommuConfig::new(1, 1, 0)
        };
        let e = Viommu::new(cfg, h.devices.clone(), h.grace.clone()).unwrap_err();
        assert_eq!(e, ViommuError::BadSidsize(sidsize));
        assert_eq!(e.errno(), "EINVAL");
    }
}

#[test]
fn unbinding_what_is_not_bound_is_enoent() {
    let h = host_with_devices();
    let v = h.viommu(1, 5, SMMU, 16);
    let w = h.viommu(2, 6, SMMU, 16);
    let e = v.unset_dev_id(DeviceId(0)).unwrap_err();
    assert_eq!(
        e,
        ViommuError::NotBound {
            device: DeviceId(0),
            viommu: 1
        }
    );
    assert_eq!(e.errno(), "ENOENT");
    w.set_dev_id(DeviceId(0), 0x10).unwrap();
    assert_eq!(v.unset_dev_id(DeviceId(0)).unwrap_err().errno(), "ENOENT");
    assert_eq!(
        w.lookup(0x10),
        Some(0x800),
        "a failed unbind elsewhere changes nothing"
    );
    assert_eq!(w.unset_dev_id(DeviceId(0)), Ok(0x10));
    assert_eq!(w.unset_dev_id(DeviceId(0)).unwrap_err().errno(), "ENOENT");
    assert_eq!(v.unset_dev_id(DeviceId(77)).unwrap_err().errno(), "ENOENT");
}

#[test]
fn unknown_device_is_enoent() {
    let h = host_with_devices();
    let v = h.viommu(1, 5, SMMU, 16);
    let e = v.set_dev_id(DeviceId(77), 0x10).unwrap_err();
    assert_eq!(
        e,
        ViommuError::NoDevice {
            device: DeviceId(77)
        }
    );
    assert_eq!(e.errno(), "ENOENT");
}

#[test]
fn device_registry_errnos() {
    let h = host_with_devices();
    let e = h.devices.add_device(DeviceId(0), SMMU, 0x999).unwrap_err();
    assert_eq!(
        e,
        ViommuError::DeviceExists {
            device: DeviceId(0)
        }
    );
    assert_eq!(e.errno(), "EEXIST");
    // Two devices cannot share a pSID on one SMMU; on different SMMUs they can.
    let e = h.devices.add_device(DeviceId(50), SMMU, 0x801).unwrap_err();
    assert_eq!(
        e,
        ViommuError::PsidTaken {
            smmu: SMMU,
            psid: 0x801,
            device: DeviceId(1)
        }
    );
    assert_eq!(e.errno(), "EEXIST");
    h.devices.add_device(DeviceId(51), 7, 0x801).unwrap();
    let v = h.viommu(1, 5, SMMU, 16);
    v.set_dev_id(DeviceId(2), 0x10).unwrap();
    let e = h.devices.remove_device(DeviceId(2)).unwrap_err();
    assert_eq!(e.errno(), "EBUSY");
    v.unset_dev_id(DeviceId(2)).unwrap();
    h.devices.remove_device(DeviceId(2)).unwrap();
    assert_eq!(
        h.devices.remove_device(DeviceId(2)).unwrap_err().errno(),
        "ENOENT"
    );
    assert_eq!(h.devices.get(DeviceId(2)), None);
    // Its pSID is free again.
    h.devices.add_device(DeviceId(52), SMMU, 0x802).unwrap();
}

#[test]
fn unbind_frees_vsid_and_device() {
    let h = host_with_devices();
    let v = h.viommu(1, 5, SMMU, 16);
    let w = h.viommu(2, 6, SMMU, 16);
    v.set_dev_id(DeviceId(0), 0x10).unwrap();
    assert_eq!(v.unset_dev_id(DeviceId(0)), Ok(0x10));
    assert_eq!(v.lookup(0x10), None);
    v.set_dev_id(DeviceId(1), 0x10).unwrap();
    assert_eq!(v.lookup(0x10), Some(0x801));
    w.set_dev_id(DeviceId(0), 0x33).unwrap();
    assert_eq!(w.lookup(0x33), Some(0x800));
}

#[test]
fn dropping_a_viommu_frees_its_devices() {
    let h = host_with_devices();
    let v = h.viommu(1, 5, SMMU, 16);
    v.set_dev_id(DeviceId(0), 0x10).unwrap();
    drop(v);
    let w = h.viommu(2, 6, SMMU, 16);
    w.set_dev_id(DeviceId(0), 0x10).unwrap();
}

#[test]
fn device_stays_reserved_until_the_grace_period_ends() {
    let h = host_with_devices();
    let v = Arc::new(h.viommu(1, 5, SMMU, 16));
    let w = h.viommu(2, 6, SMMU, 16);
    v.set_dev_id(DeviceId(0), 0x10).unwrap();
    let mut reader = h.grace.register();
    let guard = reader.pin();
    let unbinder = {
        let v = v.clone();
        std::thread::spawn(move || v.unset_dev_id(DeviceId(0)))
    };
    // Wait until the entry is gone: the unbinder is then inside its grace period, blocked by
    // our pin.
    while v.lookup(0x10).is_some() {
        std::thread::yield_now();
    }
    assert!(!unbinder.is_finished());
    let e = w.set_dev_id(DeviceId(0), 0x10).unwrap_err();
    assert_eq!(
        e,
        ViommuError::DeviceBound {
            device: DeviceId(0),
            viommu: 1,
            vsid: None
        }
    );
    // The vSID itself is free in v already: old translations carry the old pSID, which is still
    // this VM's until the unbind returns.
    v.set_dev_id(DeviceId(1), 0x10).unwrap();
    drop(guard);
    assert_eq!(unbinder.join().unwrap(), Ok(0x10));
    w.set_dev_id(DeviceId(0), 0x10).unwrap();
}

#[test]
fn profile_names_and_codes() {
    for p in Profile::ALL {
        assert_eq!(Profile::from_code(p.code()), Some(p));
        assert_eq!(p.to_string().parse::<Profile>(), Ok(p));
    }
    assert_eq!(Profile::default(), Profile::Kernel);
    assert_eq!("Tegra241".parse::<Profile>(), Ok(Profile::Tegra241));
    assert!("tegra234".parse::<Profile>().is_err());
    assert_eq!(Profile::from_code(2), None);
}

/// An ATC_INV of `vsid`, invalidating everything.
fn atc_inv(vsid: u32) -> RawCommand {
    RawCommand::new(u64::from(opcode::ATC_INV) | u64::from(vsid) << 32, 52)
}

/// Rule 5 under threads: translators pin, translate, publish each command with a global sequence
/// number, unpin; an unbinder unbinds and takes a sequence number when `unset_dev_id` returns.
/// No command carrying the unbound pSID may be published between that return and the next bind
/// of the device (whose sequence number is taken before `set_dev_id` starts).
#[test]
fn unbind_is_a_barrier_under_racing_translators() {
    const DEVICES: u32 = 4;
    const CYCLES: usize = 200;
    let h = host_with_devices();
    let v = Arc::new(h.viommu(1, 5, SMMU, 16));
    for d in 0..DEVICES {
        v.set_dev_id(DeviceId(d), 0x10 + d).unwrap();
    }
    let seq = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let translators: Vec<_> = (0..2)
        .map(|t| {
            let (v, seq, stop) = (v.clone(), seq.clone(), stop.clone());
            let mut reader = h.grace.register();
            std::thread::spawn(move || {
                // Every vSID the devices are ever bound to.
                let input: Vec<RawCommand> = (0..DEVICES * 2).map(|i| atc_inv(0x10 + i)).collect();
                let mut out = vec![RawCommand::default(); input.len()];
                let mut prov = vec![0u32; input.len()];
                let mut log: Vec<(u64, u32)> = Vec::new();
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let guard = reader.pin();
                    let mut start = 0;
                    while start < input.len() {
                        let end = translate(&v, &input[start..], &mut out, &mut prov);
                        // Widen the window between lookup and publication now and then (give the
                        // core away while pinned), so a missing barrier shows.
                        round += 1;
                        if (round + t).is_multiple_of(2) {
                            std::thread::yield_now();
                        }
                        for c in &out[..end.produced] {
                            log.push((seq.fetch_add(1, Ordering::SeqCst), (c.d0() >> 32) as u32));
                        }
                        start += end.consumed;
                        if let Stop::Refused { .. } = end.stop {
                            start += 1; // an unbound vSID: skip it
                        }
                    }
                    drop(guard);
                    // Two cores, three busy threads: let the unbinder run.
                    std::thread::yield_now();
                }
                log
            })
        })
        .collect();

    // Waits until the translators have published `n` more commands (or one of them died).
    let progress = |n: u64| {
        let target = seq.load(Ordering::SeqCst) + n;
        while seq.load(Ordering::SeqCst) < target && !translators.iter().any(|t| t.is_finished()) {
            std::thread::yield_now();
        }
    };
    // (pSID, unbind returned at, next bind started at)
    let mut windows: Vec<(u32, u64, u64)> = Vec::new();
    for c in 0..CYCLES {
        // Every unbind races with live batches.
        progress(u64::from(DEVICES));
        let d = (c as u32) % DEVICES;
        let vsid = v.unset_dev_id(DeviceId(d)).unwrap();
        let returned = seq.fetch_add(1, Ordering::SeqCst);
        // Keep the device unbound while the translators publish a few batches: a stale pSID
        // would land in this window.
        progress(u64::from(DEVICES) * 4);
        let rebind = seq.fetch_add(1, Ordering::SeqCst);
        // Rebind to the other vSID of the pair so lookups of the old vSID keep failing.
        let next_vsid = if vsid < 0x10 + DEVICES {
            vsid + DEVICES
        } else {
            vsid - DEVICES
        };
        v.set_dev_id(DeviceId(d), next_vsid).unwrap();
        windows.push((0x800 + d, returned, rebind));
    }
    stop.store(true, Ordering::Relaxed);
    let logs: Vec<Vec<(u64, u32)>> = translators.into_iter().map(|t| t.join().unwrap()).collect();
    let published: usize = logs.iter().map(Vec::len).sum();
    assert!(published > 0, "the translators never published");
    let mut by_psid: std::collections::HashMap<u32, Vec<(u64, u64)>> = Default::default();
    for &(p, returned, rebind) in &windows {
        by_psid.entry(p).or_default().push((returned, rebind));
    }
    for &(s, psid) in logs.iter().flatten() {
        for &(returned, rebind) in &by_psid[&psid] {
            assert!(
                !(s > returned && s < rebind),
                "pSID {psid:#x} published at {s}, after its unbind returned at {returned} \
                 and before its rebind at {rebind}"
            );
        }
    }
}
