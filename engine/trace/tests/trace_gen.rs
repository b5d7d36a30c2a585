//! The generators: deterministic, valid, faithful to the guest's view of ring capacity, and
//! hostile guests that fix and acknowledge exactly the commands the engine must refuse.

use std::collections::{HashMap, HashSet, VecDeque};
use vcmdq::command::{decode, opcode, Command, DecodeError, RawCommand, LAYOUTS};
use vcmdq::queue::QueueShape;
use vcmdq_trace::gen::{generate_vec, GenParams, Workload};
use vcmdq_trace::{validate, Event, Kind, Profile, Trace};

fn all_small() -> Vec<(Workload, GenParams)> {
    Workload::ALL
        .iter()
        .map(|&w| {
            let mut p = w.defaults();
            p.commands = p.commands.min(3000);
            (w, p)
        })
        .collect()
}

#[test]
fn same_parameters_same_bytes_whatever_the_threads() {
    for (w, p) in all_small() {
        let a = generate_vec(w, &p).unwrap();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let b = one.install(|| generate_vec(w, &p).unwrap());
        assert_eq!(a, b, "{}", w.name());
        let mut q = p;
        q.seed += 1;
        assert_ne!(
            a,
            generate_vec(w, &q).unwrap(),
            "{}: the seed changes nothing",
            w.name()
        );
    }
}

#[test]
fn bad_parameters_are_refused() {
    let mut p = Workload::DmaUnmap.defaults();
    p.log2size = 1;
    assert!(generate_vec(Workload::DmaUnmap, &p).is_err());
    let mut p = Workload::DmaUnmap.defaults();
    p.vms = 0;
    assert!(generate_vec(Workload::DmaUnmap, &p)
        .unwrap_err()
        .to_string()
        .contains("vms=0"));
    let mut p = Workload::DmaUnmap.defaults();
    p.commands = u64::MAX;
    assert!(generate_vec(Workload::DmaUnmap, &p).is_err());
}

#[test]
fn parameters_needing_more_ring_memory_or_commands_than_the_limits_are_refused_first() {
    use vcmdq_trace::gen::{GenError, GenLimits};
    let mut p = Workload::Mixed.defaults();
    (p.vms, p.rings, p.log2size) = (4096, 16, 19);
    assert_eq!(p.ring_bytes(), 512 << 30);
    assert!(matches!(
        generate_vec(Workload::Mixed, &p),
        Err(GenError::Limit {
            flag: "--max-ring-memory",
            ..
        })
    ));
    let mut p = Workload::Mixed.defaults();
    p.commands = 50_000_000;
    assert!(matches!(
        p.check(),
        Err(GenError::Limit {
            flag: "--max-commands",
            value: 50_000_000,
            ..
        })
    ));
    p.check_with(&GenLimits {
        max_commands: 50_000_000,
        ..GenLimits::default()
    })
    .unwrap();
}

/// What the engine's rules (`docs/rules.md`, "Policy profiles") say about one command,
/// written here independently of the generator's own model.
fn must_refuse(profile: Profile, range_inv: bool, bound: &HashSet<u32>, raw: RawCommand) -> bool {
    let Ok(c) = decode(raw) else { return true };
    let kernel = profile == Profile::Kernel;
    match c {
        Command::CmdSync { .. } => false,
        Command::CfgiSte { ssec, .. } | Command::CfgiSteRange { ssec, .. } => ssec,
        Command::PrefetchConfig { .. } | Command::PrefetchAddr { .. } => false,
        Command::TlbiNhAsid { .. } => false,
        Command::TlbiNhVa { tg, .. } => tg != 0 && !range_inv,
        Command::TlbiNhVaa { tg, .. } => !kernel || (tg != 0 && !range_inv),
        Command::TlbiNhAll { .. } | Command::TlbiNsnhAll {} => !kernel,
        Command::AtcInv { sid, size, .. } => !bound.contains(&sid) || size > 52,
        Command::CfgiCd { ssec, sid, .. } | Command::CfgiCdAll { ssec, sid } => {
            !kernel || ssec || !bound.contains(&sid)
        }
        _ => true,
    }
}

#[derive(Default)]
struct RingCheck {
    viommu: u32,
    shape: Option<QueueShape>,
    prod: u32,
    last_sync: u32,
    doorbelled: bool,
    expected: VecDeque<u32>,
    fixes: u64,
    acks: u64,
}

#[derive(Default, Debug)]
struct Seen {
    refused: u64,
    fixes: u64,
    acks: u64,
    junk_prod: u64,
    foreign_vmid: u64,
    illegal: u64,
    res0: u64,
    range_without_tg: u64,
    trapped: u64,
    prefetch: u64,
    range_cmds: u64,
    page_cmds: u64,
    unbinds: u64,
    late: u64,
}

/// Walks a generated trace as a guest-aware replay would, checking the generator's promises.
fn check(bytes: &[u8], name: &str) -> Seen {
    let t = Trace::parse(bytes).unwrap();
    validate(&t).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut viommus: HashMap<u32, (Profile, bool, u16)> = HashMap::new();
    let mut devices: HashMap<u32, (u32, u32)> = HashMap::new(); // device -> (viommu, vsid)
    let mut bound: HashMap<u32, HashSet<u32>> = HashMap::new();
    let mut unbound: HashMap<u32, HashSet<u32>> = HashMap::new();
    let mut rings: HashMap<u32, RingCheck> = HashMap::new();
    let mut seen = Seen::default();
    for r in t.records() {
        let r = r.unwrap();
        match r.event {
            Event::ViommuCreate {
                viommu,
                profile,
                range_inv,
                vmid,
                ..
            } => {
                viommus.insert(viommu, (profile, range_inv, vmid));
            }
            Event::Bind {
                viommu,
                device,
                vsid,
            } => {
                devices.insert(device, (viommu, vsid));
                bound.entry(viommu).or_default().insert(vsid);
                unbound.entry(viommu).or_default().remove(&vsid);
            }
            Event::Unbind { viommu, device } => {
                let vsid = devices[&device].1;
                bound.entry(viommu).or_default().remove(&vsid);
                unbound.entry(viommu).or_default().insert(vsid);
                seen.unbinds += 1;
            }
            Event::RingCreate {
                ring,
                viommu,
                log2size,
            } => {
                rings.insert(
                    ring,
                    RingCheck {
                        viommu,
                        shape: Some(QueueShape::new(log2size).unwrap()),
                        ..Default::default()
                    },
                );
            }
            Event::Commands { ring, slot, cmds } => {
                let rc = rings.get_mut(&ring).unwrap();
                let shape = rc.shape.unwrap();
                assert_eq!(slot, rc.prod, "{name}: ring {ring} written out of order");
                assert!(
                    rc.expected.is_empty(),
                    "{name}: ring {ring} written while stopped at {:?}",
                    rc.expected
                );
                assert!(
                    rc.doorbelled || rc.prod == 0,
                    "{name}: batch not doorbelled"
                );
                // Linux batches: at most 63 commands and a closing CMD_SYNC.
                assert!(cmds.len() <= 64, "{name}: batch of {}", cmds.len());
                assert_eq!(cmds.last().unwrap().opcode(), opcode::CMD_SYNC, "{name}");
                // The guest's view of capacity: only what precedes its last CMD_SYNC is known
                // to be consumed.
                let end = shape.advance(slot, cmds.len() as u32);
                assert!(
                    shape.distance(end, rc.last_sync) <= shape.entries(),
                    "{name}: ring {ring} overfilled: {} outstanding in {}",
                    shape.distance(end, rc.last_sync),
                    shape.entries()
                );
                let (profile, range_inv, own_vmid) = viommus[&rc.viommu];
                let b = bound.entry(rc.viommu).or_default().clone();
                let gone = unbound.entry(rc.viommu).or_default().clone();
                for (i, &c) in cmds.iter().enumerate() {
                    let s = shape.advance(slot, i as u32);
                    if c.opcode() == opcode::CMD_SYNC {
                        rc.last_sync = s;
                    }
                    if must_refuse(profile, range_inv, &b, c) {
                        rc.expected.push_back(s);
                        seen.refused += 1;
                    }
                    match decode(c) {
                        Err(DecodeError::IllegalOpcode { .. }) => seen.illegal += 1,
                        Err(DecodeError::Res0 { .. }) => seen.res0 += 1,
                        Err(DecodeError::RangeWithoutGranule { .. }) => seen.range_without_tg += 1,
                        Ok(Command::TlbiNhAsid { vmid, .. } | Command::TlbiNhVa { vmid, .. })
                            if vmid != 0 && vmid != own_vmid =>
                        {
                            seen.foreign_vmid += 1
                        }
                        Ok(Command::CfgiSte { .. } | Command::CfgiSteRange { .. }) => {
                            seen.trapped += 1
                        }
                        Ok(Command::PrefetchAddr { .. } | Command::PrefetchConfig { .. }) => {
                            seen.prefetch += 1
                        }
                        Ok(Command::TlbiNhVa { tg: 0, .. }) => seen.page_cmds += 1,
                        Ok(Command::TlbiNhVa { .. }) => seen.range_cmds += 1,
                        Ok(Command::AtcInv { sid, .. } | Command::CfgiCd { sid, .. })
                            if gone.contains(&sid) =>
                        {
                            seen.late += 1
                        }
                        _ => {}
                    }
                }
                rc.prod = end;
                rc.doorbelled = false;
            }
            Event::Doorbell { ring, prod } => {
                let rc = rings.get_mut(&ring).unwrap();
                let shape = rc.shape.unwrap();
                assert_eq!(
                    shape.ptr(prod),
                    rc.prod,
                    "{name}: doorbell is not the batch's end"
                );
                if prod != shape.ptr(prod) {
                    seen.junk_prod += 1;
                }
                rc.doorbelled = true;
            }
            Event::GuestFix { ring, slot, cmd } => {
                let rc = rings.get_mut(&ring).unwrap();
                assert_eq!(
                    rc.expected.pop_front(),
                    Some(slot),
                    "{name}: fix of a slot that is not refused"
                );
                assert_eq!(cmd.opcode(), opcode::CMD_SYNC);
                rc.fixes += 1;
                seen.fixes += 1;
            }
            Event::GuestAck { ring } => {
                let rc = rings.get_mut(&ring).unwrap();
                rc.acks += 1;
                seen.acks += 1;
                assert!(rc.acks <= rc.fixes + 1, "{name}: ack with nothing refused");
            }
            _ => {}
        }
    }
    for (id, rc) in &rings {
        assert!(
            rc.expected.is_empty(),
            "{name}: ring {id} left stopped at {:?}",
            rc.expected
        );
    }
    assert_eq!(seen.refused, seen.fixes, "{name}");
    seen
}

#[test]
fn workloads_keep_their_promises() {
    for (w, p) in all_small() {
        let seen = check(&generate_vec(w, &p).unwrap(), w.name());
        match w {
            Workload::DmaUnmap => {
                assert!(seen.range_cmds > 0 && seen.page_cmds > 0, "{seen:?}");
                assert_eq!(seen.refused, 0);
            }
            Workload::Ats | Workload::SvaChurn | Workload::NoisyNeighbour => {
                assert_eq!(seen.refused, 0, "{}: {seen:?}", w.name())
            }
            Workload::HotUnplug => {
                assert!(seen.unbinds >= 2, "{seen:?}");
                assert!(seen.late >= 3 && seen.refused == seen.late, "{seen:?}");
            }
            Workload::Hostile | Workload::Mixed => {
                assert!(seen.refused > 5, "{seen:?}");
                assert!(seen.acks > seen.fixes, "one ack before its fix: {seen:?}");
                assert!(
                    seen.illegal > 0 && seen.res0 > 0 && seen.range_without_tg > 0,
                    "{seen:?}"
                );
                assert!(
                    seen.foreign_vmid > 0 && seen.trapped > 0 && seen.prefetch > 0,
                    "{seen:?}"
                );
                if w == Workload::Hostile {
                    assert!(seen.junk_prod > 0, "{seen:?}");
                }
            }
        }
    }
}

#[test]
fn one_device_hot_unplug_terminates() {
    // With its only device unplugged a guest has nothing to unmap; the run must still end.
    for w in [
        Workload::HotUnplug,
        Workload::Hostile,
        Workload::SvaChurn,
        Workload::Mixed,
    ] {
        let mut p = w.defaults();
        p.devices = 1;
        p.commands = 1000;
        check(
            &generate_vec(w, &p).unwrap(),
            &format!("{} with one device", w.name()),
        );
    }
}

#[test]
fn tiny_rings_still_hold_the_capacity_rule() {
    for log2size in [2, 3, 5] {
        for w in [
            Workload::Hostile,
            Workload::DmaUnmap,
            Workload::SvaChurn,
            Workload::HotUnplug,
        ] {
            let mut p = w.defaults();
            p.log2size = log2size;
            p.commands = 1500;
            check(
                &generate_vec(w, &p).unwrap(),
                &format!("{} log2size={log2size}", w.name()),
            );
        }
    }
}

#[test]
fn noisy_neighbour_floods_from_one_vm() {
    let p = Workload::NoisyNeighbour.defaults();
    let bytes = generate_vec(Workload::NoisyNeighbour, &p).unwrap();
    let s = validate(&Trace::parse(&bytes).unwrap()).unwrap();
    let flooder = s.commands_by_ring[&0];
    let others: u64 = s
        .commands_by_ring
        .iter()
        .filter(|(r, _)| **r != 0)
        .map(|(_, n)| n)
        .sum();
    assert!(flooder > 3 * others, "flooder {flooder}, others {others}");
    assert_eq!(s.count(Kind::ViommuCreate), u64::from(p.vms));
    assert!(s.commands_by_ring.len() == p.vms as usize);
}

#[test]
fn every_opcode_written_is_named_or_deliberately_illegal() {
    // Outside the hostile workloads nothing illegal is written.
    for w in [
        Workload::DmaUnmap,
        Workload::Ats,
        Workload::SvaChurn,
        Workload::NoisyNeighbour,
    ] {
        let bytes = generate_vec(w, &w.defaults()).unwrap();
        let s = validate(&Trace::parse(&bytes).unwrap()).unwrap();
        for op in s.commands_by_opcode.keys() {
            assert!(
                LAYOUTS.iter().flatten().any(|l| l.name == op),
                "{}: {op}",
                w.name()
            );
        }
    }
}

/// The bundled traces are exactly what the generators make (`make traces` regenerates them).
#[test]
fn bundled_traces_regenerate_byte_for_byte() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../traces");
    for w in Workload::ALL {
        let path = dir.join(format!("{}.vct", w.name()));
        let on_disk = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let fresh = generate_vec(w, &w.defaults()).unwrap();
        assert!(
            on_disk == fresh,
            "{} differs from a fresh generation: run `make traces`",
            path.display()
        );
    }
}
