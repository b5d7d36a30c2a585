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
    const CYCLES: usize = 200;
    let h = host_with_devices();
    let v = Arc::new(h.viommu(1, 5, SMMU, 16));
    for d in 0..BARRIER_DEVICES {
        v.set_dev_id(DeviceId(d), 0x10 + d).unwrap();
    }
    let seq = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let translators: Vec<_> = (0..2)
        .map(|t| {
            let (v, seq, stop) = (v.clone(), seq.clone(), stop.clone());
            let reader = h.grace.register();
            std::thread::spawn(move || translate_and_log(&v, reader, &seq, &stop, t))
        })
        .collect();

    // (pSID, unbind returned at, next bind started at)
    let mut windows: Vec<(u32, u64, u64)> = Vec::new();
    for c in 0..CYCLES {
        // Every unbind races with live batches.
        wait_published(&seq, &translators, u64::from(BARRIER_DEVICES));
        let d = (c as u32) % BARRIER_DEVICES;
        let vsid = v.unset_dev_id(DeviceId(d)).unwrap();
        let returned = seq.fetch_add(1, Ordering::SeqCst);
        // Keep the device unbound while the translators publish a few batches: a stale pSID
        // would land in this window.
        wait_published(&seq, &translators, u64::from(BARRIER_DEVICES) * 4);
        let rebind = seq.fetch_add(1, Ordering::SeqCst);
        // Rebind to the other vSID of the pair so lookups of the old vSID keep failing.
        let next_vsid = if vsid < 0x10 + BARRIER_DEVICES {
            vsid + BARRIER_DEVICES
        } else {
            vsid - BARRIER_DEVICES
        };
        v.set_dev_id(DeviceId(d), next_vsid).unwrap();
        windows.push((0x800 + d, returned, rebind));
    }
    stop.store(true, Ordering::Relaxed);
    let logs: Vec<Vec<(u64, u32)>> = translators.into_iter().map(|t| t.join().unwrap()).collect();
    assert_no_psid_published_while_unbound(&windows, &logs);
}

/// Devices the barrier test binds, each to vSID 0x10 + d or 0x10 + d + this, in turn.
const BARRIER_DEVICES: u32 = 4;

/// A translator of the barrier test: until `stop`, pins, translates an ATC_INV of every vSID
/// the devices are ever bound to, logs each command it publishes with a global sequence number
/// and the pSID it carries, unpins. Returns the log.
fn translate_and_log(
    v: &Viommu,
    mut reader: Reader,
    seq: &AtomicU64,
    stop: &AtomicBool,
    t: u64,
) -> Vec<(u64, u32)> {
    let input: Vec<RawCommand> = (0..BARRIER_DEVICES * 2)
        .map(|i| atc_inv(0x10 + i))
        .collect();
    let mut out = vec![RawCommand::default(); input.len()];
    let mut prov = vec![0u32; input.len()];
    let mut log: Vec<(u64, u32)> = Vec::new();
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let guard = reader.pin();
        let mut start = 0;
        while start < input.len() {
            let end = translate(v, &input[start..], &mut out, &mut prov);
            // Widen the window between lookup and publication now and then (give the core away
            // while pinned), so a missing barrier shows.
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
}

/// Waits until the translators have published `n` more commands, or one of them died (its
/// join then reports why); fails if they have not within a minute.
fn wait_published(
    seq: &AtomicU64,
    translators: &[std::thread::JoinHandle<Vec<(u64, u32)>>],
    n: u64,
) {
    let target = seq.load(Ordering::SeqCst) + n;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while seq.load(Ordering::SeqCst) < target && !translators.iter().any(|t| t.is_finished()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the translators did not publish {n} more commands within 60 s (at {} of {target})",
            seq.load(Ordering::SeqCst)
        );
        std::thread::yield_now();
    }
}

/// No command carrying a pSID was published between its device's unbind returning and its next
/// bind starting. `windows` holds (pSID, unbind returned at, rebind started at); `logs` each
/// translator's (sequence number, pSID) of what it published.
fn assert_no_psid_published_while_unbound(windows: &[(u32, u64, u64)], logs: &[Vec<(u64, u32)>]) {
    let published: usize = logs.iter().map(Vec::len).sum();
    assert!(published > 0, "the translators never published");
    let mut by_psid: std::collections::HashMap<u32, Vec<(u64, u64)>> = Default::default();
    for &(p, returned, rebind) in windows {
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

/// A host with `n` devices on `SMMU`, ids 0.., pSIDs 0x10000...
fn host_with_many_devices(n: u32) -> Host {
    let h = Host::new();
    for i in 0..n {
        h.devices
            .add_device(DeviceId(i), SMMU, 0x1_0000 + i)
            .unwrap();
    }
    h
}

/// vSID number `i` of a sequence scattered over the whole 32-bit space (an odd multiplier: no
/// two alike).
fn scattered(i: u32) -> u32 {
    i.wrapping_mul(0x9e37_79b9)
}

/// Binds scattered vSIDs, one device each, until a bind fails; returns how many were bound and
/// the error.
fn bind_scattered_until_refused(v: &Viommu, devices: u32) -> (u32, ViommuError) {
    for i in 0..devices {
        if let Err(e) = v.set_dev_id(DeviceId(i), scattered(i)) {
            return (i, e);
        }
    }
    panic!("{devices} scattered vSIDs were all bound: no limit stopped them")
}

#[test]
fn scattered_vsids_stop_at_the_table_memory_limit_with_enomem_and_memory_stays_bounded() {
    let h = host_with_many_devices(4096);
    let v = h.viommu(1, 5, SMMU, 32);
    let (bound, e) = bind_scattered_until_refused(&v, 4096);
    assert_eq!(e.errno(), "ENOMEM", "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("max_table_bytes") && msg.contains("max-table-bytes=N"),
        "the error says how to raise the limit: {msg}"
    );
    let stats = v.table().stats();
    assert_eq!(stats.bound, bound as usize);
    assert!(
        stats.bytes as u64 <= DEFAULT_MAX_TABLE_BYTES,
        "{stats:?} beyond the limit"
    );
    // Go on scattering: a refused bind allocates nothing; one that needs only a leaf in an
    // existing mid node may still fit; the table never passes the limit.
    let mut refused = 0;
    let mut taken = vec![];
    for i in bound..4096 {
        let before = v.table().stats().bytes;
        match v.set_dev_id(DeviceId(i), scattered(i)) {
            Ok(()) => taken.push(i),
            Err(e) => {
                assert_eq!(e.errno(), "ENOMEM", "{e}");
                assert_eq!(v.table().stats().bytes, before, "a refused bind allocated");
                refused += 1;
            }
        }
        assert!(v.table().stats().bytes as u64 <= DEFAULT_MAX_TABLE_BYTES);
    }
    assert!(refused > 3000, "{refused} refused");
    // A vSID whose nodes exist still binds.
    let spare = (bound..4096).find(|i| !taken.contains(i)).unwrap();
    v.set_dev_id(DeviceId(spare), scattered(0) ^ 1).unwrap();
    // Unbinding keeps the nodes: the count does not reset.
    let used = v.table().stats().bytes;
    v.unset_dev_id(DeviceId(0)).unwrap();
    assert_eq!(v.table().stats().bytes, used);
}

#[test]
fn the_table_memory_limit_can_be_raised() {
    let h = host_with_many_devices(4096);
    let small = h.viommu(1, 5, SMMU, 32);
    let (at_default, _) = bind_scattered_until_refused(&small, 4096);
    drop(small);
    let cfg = ViommuConfig {
        max_table_bytes: 4 * DEFAULT_MAX_TABLE_BYTES,
        ..ViommuConfig::new(2, 5, SMMU)
    };
    let big = Viommu::new(cfg, h.devices.clone(), h.grace.clone()).unwrap();
    let (bound, e) = bind_scattered_until_refused(&big, 4096);
    assert_eq!(e.errno(), "ENOMEM");
    assert!(bound > 3 * at_default, "{bound} vs {at_default}");
    assert!(big.table().stats().bytes as u64 <= 4 * DEFAULT_MAX_TABLE_BYTES);
}

#[test]
fn the_default_vsid_count_fits_sequential_vsids_and_the_next_is_enospc() {
    let n = DEFAULT_MAX_VSIDS;
    let h = host_with_many_devices(n + 1);
    let v = h.viommu(1, 5, SMMU, 32);
    // Not aligned to a leaf or a mid node: the most nodes a run of this length can touch.
    let base = (1 << 20) - 1;
    for i in 0..n {
        v.set_dev_id(DeviceId(i), base + i).unwrap();
    }
    let e = v.set_dev_id(DeviceId(n), base + n).unwrap_err();
    assert_eq!(
        e,
        ViommuError::VsidsFull {
            viommu: 1,
            max: DEFAULT_MAX_VSIDS
        }
    );
    assert_eq!(e.errno(), "ENOSPC");
    assert!(e.to_string().contains("max-vsids=N"), "{e}");
    assert!(v.table().stats().bytes < 1 << 20, "{:?}", v.table().stats());
}

#[test]
fn the_vsid_count_limit_is_enospc_until_one_is_unbound_and_can_be_raised() {
    let h = host_with_many_devices(8);
    for max in [3u32, 5] {
        let cfg = ViommuConfig {
            max_vsids: max,
            ..ViommuConfig::new(max, 5, SMMU)
        };
        let v = Viommu::new(cfg, h.devices.clone(), h.grace.clone()).unwrap();
        for i in 0..max {
            v.set_dev_id(DeviceId(i), scattered(i)).unwrap();
        }
        assert_eq!(
            v.set_dev_id(DeviceId(max), 0x10),
            Err(ViommuError::VsidsFull { viommu: max, max })
        );
        // A taken vSID is still EEXIST: the errno says what the caller got wrong first.
        assert_eq!(
            v.set_dev_id(DeviceId(max), scattered(0))
                .map_err(|e| e.errno()),
            Err("EEXIST")
        );
        v.unset_dev_id(DeviceId(0)).unwrap();
        v.set_dev_id(DeviceId(max), 0x10).unwrap();
    }
}

#[test]
fn limits_that_cannot_hold_one_binding_are_einval() {
    let h = Host::new();
    for (sidsize, max_vsids, max_table_bytes) in [
        (32u8, 0u32, DEFAULT_MAX_TABLE_BYTES),
        (32, 1, 64 << 10),
        (16, 1, 1024),
        (8, 1, 100),
    ] {
        let cfg = ViommuConfig {
            sidsize,
            max_vsids,
            max_table_bytes,
            ..ViommuConfig::new(1, 1, SMMU)
        };
        let e = Viommu::new(cfg, h.devices.clone(), h.grace.clone()).unwrap_err();
        assert!(matches!(e, ViommuError::BadLimits { .. }), "{e}");
        assert_eq!(e.errno(), "EINVAL");
    }
    // The smallest that holds one binding of any vSID does.
    let h = host_with_devices();
    let probe = SidTable::new(32).unwrap();
    let cfg = ViommuConfig {
        max_vsids: 1,
        max_table_bytes: (probe.stats().bytes + probe.growth_max()) as u64,
        ..ViommuConfig::new(1, 1, SMMU)
    };
    let v = Viommu::new(cfg, h.devices.clone(), h.grace.clone()).unwrap();
    v.set_dev_id(DeviceId(0), u32::MAX).unwrap();
}

#[test]
fn a_vmid_belongs_to_one_viommu_per_smmu_unless_sharing_is_declared() {
    let a = ViommuConfig::new(1, 5, 0);
    let e = check_vmid(&ViommuConfig::new(2, 5, 0), [&a]).unwrap_err();
    assert_eq!(
        e,
        ViommuError::VmidTaken {
            viommu: 2,
            vmid: 5,
            smmu: 0,
            holder: 1
        }
    );
    assert_eq!(e.errno(), "EEXIST");
    check_vmid(&ViommuConfig::new(2, 5, 1), [&a]).unwrap();
    check_vmid(&ViommuConfig::new(2, 6, 0), [&a]).unwrap();
    let shares = |id, with| ViommuConfig {
        shares_vmid_with: Some(with),
        ..ViommuConfig::new(id, 5, 0)
    };
    check_vmid(&shares(2, 1), [&a]).unwrap();
    let b = shares(2, 1);
    check_vmid(&shares(3, 2), [&a, &b]).unwrap();
    assert_eq!(
        check_vmid(&shares(3, 9), [&a, &b]).map_err(|e| e.errno()),
        Err("ENOENT")
    );
    let other_smmu = ViommuConfig::new(4, 5, 1);
    assert_eq!(
        check_vmid(&shares(3, 4), [&a, &other_smmu]),
        Err(ViommuError::ShareMismatch {
            viommu: 3,
            vmid: 5,
            smmu: 0,
            with: 4,
            with_vmid: 5,
            with_smmu: 1
        })
    );
}

#[test]
fn a_vmid_above_255_on_an_smmu_without_vmid16_is_a_configuration_error() {
    let h = Host::new();
    let eight_bit = SmmuFeatures {
        vmid16: false,
        ..SmmuFeatures::ANY
    };
    let cfg = |vmid| ViommuConfig::new(1, vmid, SMMU).with_smmu(eight_bit);
    let e = Viommu::new(cfg(256), h.devices.clone(), h.grace.clone()).unwrap_err();
    assert_eq!(
        e,
        ViommuError::VmidTooLarge {
            viommu: 1,
            vmid: 256
        }
    );
    assert_eq!(e.errno(), "EINVAL");
    assert!(e.to_string().contains("VMID16"), "{e}");
    Viommu::new(cfg(255), h.devices.clone(), h.grace.clone()).unwrap();
    // With VMID16 the same VMID is fine.
    Viommu::new(
        ViommuConfig::new(2, 256, SMMU),
        h.devices.clone(),
        h.grace.clone(),
    )
    .unwrap();
}

#[test]
fn a_17th_vsid_on_a_tegra241_viommu_is_enospc_and_the_slot_count_is_a_setting() {
    let h = Host::new();
    for i in 0..40 {
        h.devices.add_device(DeviceId(i), SMMU, 0x800 + i).unwrap();
    }
    let mk = |id, profile, slots| {
        let cfg = ViommuConfig {
            profile,
            tegra241_sid_slots: slots,
            ..ViommuConfig::new(id, id as u16, SMMU)
        };
        Viommu::new(cfg, h.devices.clone(), h.grace.clone()).unwrap()
    };
    let t = mk(1, Profile::Tegra241, DEFAULT_TEGRA241_SID_SLOTS);
    for i in 0..16 {
        t.set_dev_id(DeviceId(i), 0x100 + i).unwrap();
    }
    let e = t.set_dev_id(DeviceId(16), 0x110).unwrap_err();
    assert_eq!(
        e,
        ViommuError::SidSlotsFull {
            viommu: 1,
            slots: 16
        }
    );
    assert_eq!(e.errno(), "ENOSPC");
    // A freed slot takes the next one.
    t.unset_dev_id(DeviceId(0)).unwrap();
    t.set_dev_id(DeviceId(16), 0x110).unwrap();
    // A VINTF with 4 slots; and the kernel profile has no VINTF.
    let small = mk(2, Profile::Tegra241, 4);
    for i in 17..21 {
        small.set_dev_id(DeviceId(i), i).unwrap();
    }
    assert_eq!(
        small.set_dev_id(DeviceId(21), 21).unwrap_err().errno(),
        "ENOSPC"
    );
    let k = mk(3, Profile::Kernel, 4);
    for i in 22..40 {
        k.set_dev_id(DeviceId(i), i).unwrap();
    }
}

/// iommufd's selftest `vdevice_tombstone`: allocate a vdevice (vSID 0x99) for a device, destroy
/// the device, then destroy the vdevice: ENOENT. The kernel's device removal aborts the vdevice
/// (its virtual ID leaves the vIOMMU at once) and leaves a tombstone for the vdevice object only.
#[test]
fn removing_a_bound_device_destroys_its_vdevice_and_leaves_a_tombstone() {
    let h = host_with_devices();
    let v = h.viommu(1, 5, SMMU, 16);
    v.set_dev_id(DeviceId(0), 0x99).unwrap();
    assert_eq!(v.remove_device(DeviceId(0)), Ok(0x99));
    assert_eq!(h.devices.get(DeviceId(0)), None, "the device is gone");
    assert_eq!(v.lookup(0x99), None, "the vdevice is destroyed");
    assert!(v.has_tombstone(DeviceId(0)));
    let e = v.unset_dev_id(DeviceId(0)).unwrap_err();
    assert_eq!(
        e,
        ViommuError::VdeviceGone {
            device: DeviceId(0),
            viommu: 1
        }
    );
    assert_eq!(e.errno(), "ENOENT");
    assert!(
        !v.has_tombstone(DeviceId(0)),
        "destroying it clears the tombstone"
    );
    assert_eq!(
        v.unset_dev_id(DeviceId(0)).unwrap_err(),
        ViommuError::NotBound {
            device: DeviceId(0),
            viommu: 1
        }
    );
    // The vSID and the pSID are free again.
    v.set_dev_id(DeviceId(1), 0x99).unwrap();
    h.devices.add_device(DeviceId(60), SMMU, 0x800).unwrap();
    // Removing a device that is not bound here is ENOENT, and leaves no tombstone.
    assert_eq!(v.remove_device(DeviceId(2)).unwrap_err().errno(), "ENOENT");
    assert!(!v.has_tombstone(DeviceId(2)));
}

#[test]
fn a_new_vdevice_of_a_re_added_device_replaces_its_tombstone() {
    let h = host_with_devices();
    let v = h.viommu(1, 5, SMMU, 16);
    v.set_dev_id(DeviceId(0), 0x10).unwrap();
    v.remove_device(DeviceId(0)).unwrap();
    h.devices.add_device(DeviceId(0), SMMU, 0x800).unwrap();
    v.set_dev_id(DeviceId(0), 0x11).unwrap();
    assert!(!v.has_tombstone(DeviceId(0)));
    assert_eq!(v.unset_dev_id(DeviceId(0)), Ok(0x11));
}

/// Rule 5 holds for a removal: the device stays registered (and reserved) until no batch that
/// looked its binding up can still be published.
#[test]
fn removing_a_bound_device_is_an_unbind_barrier() {
    let h = host_with_devices();
    let v = Arc::new(h.viommu(1, 5, SMMU, 16));
    v.set_dev_id(DeviceId(0), 0x10).unwrap();
    let mut reader = h.grace.register();
    let guard = reader.pin();
    let remover = {
        let v = v.clone();
        std::thread::spawn(move || v.remove_device(DeviceId(0)))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while v.lookup(0x10).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "remove_device never took the vSID out of the table"
        );
        std::thread::yield_now();
    }
    assert!(
        !remover.is_finished(),
        "the removal did not wait for the pinned batch"
    );
    assert!(
        h.devices.get(DeviceId(0)).is_some(),
        "the device left before the grace period"
    );
    assert_eq!(h.devices.bound_in(DeviceId(0)), Some(1));
    drop(guard);
    assert_eq!(remover.join().unwrap(), Ok(0x10));
    assert_eq!(h.devices.get(DeviceId(0)), None);
}

/// vIOMMUs configured alike (profile, range invalidation, SMMU features) share one rule table,
/// whatever their VMID, SIDSIZE or SMMU; one that differs in any of the three gets its own, and
/// translates by its own rules with its own VMID.
#[test]
fn viommus_configured_alike_share_one_rule_table() {
    let h = Host::new();
    let a = h.viommu(1, 5, SMMU, 16);
    let b = h.viommu(2, 6, OTHER_SMMU, 20);
    assert!(std::ptr::eq(a.rules(), b.rules()), "same profile and SMMU");
    let mk = |cfg: ViommuConfig| Viommu::new(cfg, h.devices.clone(), h.grace.clone());
    let tegra = mk(ViommuConfig {
        profile: Profile::Tegra241,
        tegra241_sid_slots: 8,
        ..ViommuConfig::new(3, 7, SMMU)
    })
    .unwrap();
    let no_ril = mk(ViommuConfig::new(4, 8, SMMU).with_smmu(SmmuFeatures {
        ril: false,
        ..SmmuFeatures::ANY
    }))
    .unwrap();
    for other in [&tegra, &no_ril] {
        assert!(!std::ptr::eq(a.rules(), other.rules()));
    }
    let tlbi = RawCommand::new(u64::from(opcode::TLBI_NH_ALL) | 0x1234 << 32, 0);
    let (mut out, mut prov) = ([RawCommand::default(); 1], [0u32; 1]);
    for (v, vmid) in [(&a, 5u64), (&b, 6)] {
        assert_eq!(translate(v, &[tlbi], &mut out, &mut prov).produced, 1);
        assert_eq!(
            out[0].d0() >> 32,
            vmid,
            "the VMID is the vIOMMU's, not the table's"
        );
    }
    assert_eq!(
        translate(&tegra, &[tlbi], &mut out, &mut prov).stop,
        Stop::Refused {
            slot: 0,
            cerror: crate::queue::CError::Ill,
            reason: crate::translate::RefuseReason::NotAllowedByProfile {
                opcode: opcode::TLBI_NH_ALL
            },
        },
        "tegra241 does not forward TLBI_NH_ALL"
    );
}
