//! The engine end to end over heap rings: forwarding, guest CMD_SYNC completion, refusal and
//! resume, traps, physical faults, shutdown; every run checked against the oracle through the
//! audit trail, and every physical command checked by the hardware model for isolation.
#![cfg(not(loom))]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bindings, c, hw, join_named, outcomes, start_engine, Model, TestEngine, T};
use vcmdq::command::{opcode, RawCommand};
use vcmdq::engine::{Engine, EngineConfig, RingId};
use vcmdq::hwmodel::{Fault, HwConfig, HwPlacement, ModelCounters};
use vcmdq::oracle;
use vcmdq::queue::CError;
use vcmdq::ring::{heap_pair, AttachOptions, GuestRing, HostRing, RingError};
use vcmdq::viommu::{DeviceId, ViommuConfig};

struct Vm {
    ring: RingId,
    guest: GuestRing,
}

/// An engine with vIOMMU 1 (VMID 5) binding vSID 0x10 -> pSID 0x800 and vSID 0x11 -> 0x801,
/// and vIOMMU 2 (VMID 6) binding vSID 0x10 -> pSID 0x900; one 2^log2 ring on each.
fn setup(hwcfg: HwConfig, log2: u8) -> (Engine, Vm, Vm) {
    let (engine, _, a, b) = setup_model(hwcfg, log2);
    (engine, a, b)
}

/// [`setup`], with the model's counters.
fn setup_model(hwcfg: HwConfig, log2: u8) -> (Engine, ModelCounters, Vm, Vm) {
    let (engine, model) = start_engine(
        EngineConfig {
            audit: true,
            ..Default::default()
        },
        &Model::with(hwcfg),
    );
    let d = engine.devices();
    d.add_device(DeviceId(1), 0, 0x800).unwrap();
    d.add_device(DeviceId(2), 0, 0x801).unwrap();
    d.add_device(DeviceId(3), 0, 0x900).unwrap();
    let v1 = engine.create_viommu(ViommuConfig::new(1, 5, 0)).unwrap();
    v1.set_dev_id(DeviceId(1), 0x10).unwrap();
    v1.set_dev_id(DeviceId(2), 0x11).unwrap();
    let v2 = engine.create_viommu(ViommuConfig::new(2, 6, 0)).unwrap();
    v2.set_dev_id(DeviceId(3), 0x10).unwrap();
    let vm = |v: u32| {
        let (guest, host) = heap_pair(log2, v).unwrap();
        let ring = engine.attach_ring(host).unwrap();
        Vm { ring, guest }
    };
    let (a, b) = (vm(1), vm(2));
    (engine, model, a, b)
}

#[test]
fn forwards_patched_commands_and_completes_the_guest_sync() {
    let (hwcfg, log) = hw(&[5, 6], &[0x800, 0x801, 0x900]);
    let (engine, mut a, mut b) = setup(hwcfg, 4);
    let cmds_a = [
        c("TLBI_NH_VA vmid=6 asid=7 addr=0x8000_0000 tg=4k num=3 scale=0 ttl=3 leaf"),
        c("ATC_INV sid=0x11 addr=0x1000 size=0"),
        c("PREFETCH_CONFIG sid=0x10"),
        c("TLBI_NSNH_ALL"),
        c("CMD_SYNC cs=1 msidata=0xcafe msiaddr=0xfee0_0000"),
    ];
    let cmds_b = [c("ATC_INV sid=0x10 size=52"), c("CMD_SYNC cs=2")];
    assert_eq!(a.guest.submit(&cmds_a), 5);
    assert_eq!(b.guest.submit(&cmds_b), 2);
    a.guest.wait_syncs(1, T).unwrap();
    b.guest.wait_syncs(1, T).unwrap();
    assert_eq!(a.guest.completion(), 0xcafe, "CS=IRQ writes MSIDATA");
    assert_eq!(a.guest.cons(), (5, CError::None));
    assert_eq!(b.guest.cons(), (2, CError::None));
    let report = engine.shutdown();
    let want_a = oracle::translate_all(
        &ViommuConfig::new(1, 5, 0),
        &bindings(&[(0x10, 0x800), (0x11, 0x801)]),
        &cmds_a,
        false,
    );
    assert_eq!(outcomes(&report.audit, a.ring), want_a);
    let want_b = oracle::translate_all(
        &ViommuConfig::new(2, 6, 0),
        &bindings(&[(0x10, 0x900)]),
        &cmds_b,
        false,
    );
    assert_eq!(outcomes(&report.audit, b.ring), want_b);
    // The VMID the guest wrote (6, another VM's) was replaced by its own.
    let seen = log.lock().unwrap().clone();
    assert!(seen.contains(&c(
        "TLBI_NH_VA vmid=5 asid=7 addr=0x8000_0000 tg=4k num=3 scale=0 ttl=3 leaf"
    )));
    assert!(seen.contains(&c("TLBI_NH_ALL vmid=5")));
    assert!(seen.contains(&c("ATC_INV sid=0x801 addr=0x1000 size=0")));
    assert!(seen.contains(&c("ATC_INV sid=0x900 size=52")));
    assert_eq!(report.stats.forwarded, 4);
    assert_eq!(report.stats.dropped, 1);
    assert_eq!(report.stats.guest_syncs, 2);
    assert_eq!(
        report.stats.phys_syncs, 2,
        "one physical CMD_SYNC per guest CMD_SYNC batch"
    );
}

#[test]
fn a_refused_command_stops_its_ring_alone_and_it_resumes_after_the_ack() {
    let (hwcfg, log) = hw(&[5, 6], &[0x800, 0x801, 0x900]);
    let (engine, mut a, mut b) = setup(hwcfg, 3);
    let bad = c("ATC_INV sid=0x99");
    let cmds = [
        c("TLBI_NH_ASID asid=1"),
        bad,
        c("TLBI_NH_ASID asid=2"),
        c("CMD_SYNC"),
    ];
    a.guest.submit(&cmds);
    match a.guest.wait_syncs(1, T) {
        Err(RingError::Stopped { slot, cerror }) => assert_eq!((slot, cerror), (1, CError::Ill)),
        other => panic!("expected a stop at slot 1, got {other:?}"),
    }
    // The other guest is not affected.
    b.guest.submit(&[c("TLBI_NH_ASID asid=9"), c("CMD_SYNC")]);
    b.guest.wait_syncs(1, T).unwrap();
    assert_eq!(a.guest.error(), Some((1, CError::Ill)));
    // As Linux does: overwrite the faulting command with a CMD_SYNC, acknowledge.
    a.guest.write_slot(1, c("CMD_SYNC"));
    a.guest.ack_error();
    a.guest.wait_syncs(2, T).unwrap();
    assert_eq!(a.guest.cons(), (4, CError::None));
    let report = engine.shutdown();
    let seen = log.lock().unwrap().clone();
    let asid = |n| {
        seen.iter()
            .filter(|&&x| x == c(&format!("TLBI_NH_ASID vmid=5 asid={n}")))
            .count()
    };
    assert_eq!((asid(1), asid(2)), (1, 1), "nothing lost, nothing doubled");
    assert_eq!(report.stats.refused, 1);
    let got = outcomes(&report.audit, a.ring);
    let fixed = [cmds[0], c("CMD_SYNC"), cmds[2], cmds[3]];
    let want = oracle::translate_all(
        &ViommuConfig::new(1, 5, 0),
        &bindings(&[(0x10, 0x800), (0x11, 0x801)]),
        &fixed,
        false,
    );
    assert_eq!(got, want);
}

#[test]
fn a_trapped_command_pauses_its_ring_until_the_control_plane_is_done() {
    let (hwcfg, log) = hw(&[5, 6], &[0x800, 0x801, 0x900]);
    let (engine, mut a, _b) = setup(hwcfg, 4);
    let ste = c("CFGI_STE sid=0x10 leaf");
    a.guest.submit(&[
        c("TLBI_NH_ASID asid=1"),
        ste,
        c("TLBI_NH_ASID asid=2"),
        c("CMD_SYNC"),
    ]);
    let trap = loop {
        if let Some(t) = engine.next_trap() {
            break t;
        }
        std::thread::yield_now();
    };
    assert_eq!(
        (trap.ring, trap.slot, trap.seq, trap.cmd),
        (a.ring, 1, 1, ste)
    );
    assert_eq!(
        a.guest.wait_cons(1, T).unwrap(),
        1,
        "CONS waits at the trapped command"
    );
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(a.guest.cons().0, 1);
    assert!(
        !log.lock()
            .unwrap()
            .contains(&c("TLBI_NH_ASID vmid=5 asid=2")),
        "nothing after the trap runs before the control plane is done"
    );
    engine.complete_trap(a.ring).unwrap();
    a.guest.wait_syncs(1, T).unwrap();
    assert_eq!(a.guest.cons().0, 4);
    let report = engine.shutdown();
    assert_eq!(report.stats.trapped, 1);
    assert!(log
        .lock()
        .unwrap()
        .contains(&c("TLBI_NH_ASID vmid=5 asid=2")));
}

#[test]
fn a_physical_fault_stops_only_the_guest_whose_command_failed() {
    // Physical positions: ring a's four TLBIs are 0..4 if a is served first; the fault is on
    // whichever command lands at position 2, and the test finds its owner from the guest side.
    let (hwcfg, log) = hw(&[5, 6], &[0x800, 0x801, 0x900]);
    let (engine, mut a, mut b) = setup(hwcfg.with_fault(Fault::Ill { at: 2 }), 4);
    let cmds: Vec<_> = (1..=4)
        .map(|n| c(&format!("TLBI_NH_ASID asid={n}")))
        .collect();
    a.guest.submit(&cmds);
    let stop = match a.guest.wait_cons(4, T) {
        Err(RingError::Stopped { slot, cerror }) => (slot, cerror),
        other => panic!("expected a stop, got {other:?}"),
    };
    assert_eq!(
        stop,
        (2, CError::Ill),
        "the third command failed in the physical queue"
    );
    b.guest.submit(&[c("TLBI_NH_ASID asid=7"), c("CMD_SYNC")]);
    b.guest.wait_syncs(1, T).unwrap();
    // The guest fixes nothing (the command was fine): acknowledging re-reads it.
    a.guest.ack_error();
    a.guest.wait_cons(4, T).unwrap();
    a.guest.submit(&[c("CMD_SYNC")]);
    a.guest.wait_syncs(1, T).unwrap();
    let report = engine.shutdown();
    let seen = log.lock().unwrap().clone();
    // asid=3 failed (the model fails it before its check sees it; the repair runs a CMD_SYNC
    // in its place), asid=4 was taken back, and both ran once after the ack.
    for n in 1..=4 {
        let x = c(&format!("TLBI_NH_ASID vmid=5 asid={n}"));
        assert_eq!(
            seen.iter().filter(|&&y| y == x).count(),
            1,
            "asid {n} exactly once"
        );
    }
    assert_eq!(report.stats.phys_faults, 1);
    assert_eq!(outcomes(&report.audit, a.ring).len(), 5);
}

#[test]
fn shutdown_completes_everything_taken() {
    let (hwcfg, _log) = hw(&[5, 6], &[0x800, 0x801, 0x900]);
    let (engine, mut a, _b) = setup(hwcfg, 8);
    let cmds: Vec<_> = (0..200)
        .map(|n| c(&format!("TLBI_NH_ASID asid={n}")))
        .collect();
    a.guest.submit(&cmds);
    std::thread::sleep(Duration::from_millis(5));
    let report = engine.shutdown();
    assert_eq!(
        u64::from(a.guest.cons().0),
        report.stats.taken,
        "CONS covers exactly what the engine took"
    );
}

#[test]
fn detach_and_remove_viommu() {
    let (hwcfg, _log) = hw(&[5, 6], &[0x800, 0x801, 0x900]);
    let (engine, mut a, _b) = setup(hwcfg, 4);
    a.guest.submit(&[c("TLBI_NH_ASID asid=1"), c("CMD_SYNC")]);
    a.guest.wait_syncs(1, T).unwrap();
    assert!(engine.remove_viommu(1).is_err(), "a ring is still attached");
    let host: HostRing = engine.detach_ring(a.ring, T).unwrap();
    assert_eq!(host.cons_ptr(), 2);
    engine.remove_viommu(1).unwrap();
    assert!(engine.viommu(1).is_none());
    let (_g, h) = heap_pair(2, 1).unwrap();
    assert!(engine.attach_ring(h).is_err(), "vIOMMU 1 is gone");
    let _ = AttachOptions::default();
}

/// Two faults on one physical slot: the first stops the guest ring there; the second hits what
/// the repair left in the slot (a CMD_SYNC for CERROR_ILL, the retried fetch for CERROR_ABT),
/// which carries nothing of the guest any more. It must be recovered without blaming the ring
/// again (found by the soak: the engine stopped the already stopped ring and panicked).
#[test]
fn a_second_fault_on_a_repaired_slot_blames_no_ring() {
    let cases = [
        (Fault::Ill { at: 2 }, CError::Ill),
        (Fault::Abt { at: 2 }, CError::Abt),
    ]
    .into_iter()
    .flat_map(|first| {
        [
            Fault::Ill { at: 2 },
            Fault::Abt { at: 2 },
            Fault::AtcInvSync { at: 2 },
        ]
        .map(|second| (first, second))
    });
    for ((first, cerror), second) in cases {
        let (hwcfg, log) = hw(&[5, 6], &[0x800, 0x801, 0x900]);
        let hwcfg = hwcfg.with_fault(first).with_fault(second);
        let second = (first, second);
        let (engine, model, mut a, _b) = setup_model(hwcfg, 4);
        let cmds: Vec<_> = (1..=4)
            .map(|n| c(&format!("TLBI_NH_ASID asid={n}")))
            .collect();
        a.guest.submit(&cmds);
        match a.guest.wait_cons(4, T) {
            Err(RingError::Stopped { slot, cerror: got }) => {
                assert_eq!((slot, got), (2, cerror), "{second:?}")
            }
            other => panic!("{second:?}: expected a stop, got {other:?}"),
        }
        // Let the hardware reach the repaired slot (and the second fault) before the ack.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(a.guest.error(), Some((2, cerror)), "{second:?}");
        a.guest.ack_error();
        a.guest.submit(&[c("CMD_SYNC")]);
        a.guest.wait_syncs(1, T).unwrap();
        assert_eq!(a.guest.cons(), (5, CError::None), "{second:?}");
        let report = engine.shutdown();
        let seen = log.lock().unwrap().clone();
        for n in 1..=4 {
            let x = c(&format!("TLBI_NH_ASID vmid=5 asid={n}"));
            assert_eq!(
                seen.iter().filter(|&&y| y == x).count(),
                1,
                "{second:?}: asid {n} exactly once"
            );
        }
        assert_eq!(report.stats.phys_faults, 2, "{second:?}");
        assert_eq!(model.collect()[0].total_errors(), 2, "{second:?}");
    }
}

/// Waits until `f` holds.
fn until(mut f: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(t0.elapsed() < T, "timed out");
        std::thread::yield_now();
    }
}

#[test]
fn ring_progress_counts_what_each_ring_has_published() {
    let (hwcfg, _log) = hw(&[5, 6], &[0x800, 0x801, 0x900]);
    let (engine, mut a, mut b) = setup(hwcfg, 4);
    let pa = engine.ring_progress(a.ring).unwrap();
    let pb = engine.ring_progress(b.ring).unwrap();
    assert_eq!((pa.published(), pb.published()), (0, 0));
    a.guest.submit(&[
        c("TLBI_NH_ASID asid=1"),
        c("PREFETCH_CONFIG sid=0x10"),
        c("CMD_SYNC"),
    ]);
    a.guest.wait_syncs(1, T).unwrap();
    // A completed sync was published first, with everything before it.
    assert_eq!(pa.published(), 3);
    assert_eq!(pb.published(), 0, "the other ring's counter is its own");
    // A trapped command: published up to it, not past it, until the control plane is done.
    a.guest.submit(&[
        c("TLBI_NH_ASID asid=2"),
        c("CFGI_STE sid=0x10"),
        c("CMD_SYNC"),
    ]);
    until(|| engine.next_trap().is_some());
    assert_eq!(pa.published(), 4);
    engine.complete_trap(a.ring).unwrap();
    a.guest.wait_syncs(2, T).unwrap();
    assert_eq!(pa.published(), 6);
    // A refused command: published up to it; after the fix and the acknowledgement, on.
    a.guest.submit(&[
        c("TLBI_NH_ASID asid=3"),
        c("ATC_INV sid=0x99"),
        c("CMD_SYNC"),
    ]);
    until(|| a.guest.error().is_some());
    until(|| pa.published() == 7);
    a.guest.write_slot(7, c("CMD_SYNC"));
    a.guest.ack_error();
    a.guest.wait_syncs(4, T).unwrap();
    assert_eq!(pa.published(), 9);
    b.guest.submit(&[c("TLBI_NH_ALL"), c("CMD_SYNC")]);
    b.guest.wait_syncs(1, T).unwrap();
    assert_eq!((pa.published(), pb.published()), (9, 2));
    engine.detach_ring(b.ring, T).unwrap();
    assert!(engine.ring_progress(b.ring).is_none());
    engine.shutdown();
}

/// A gate a hardware check or a publish hook stops at, once, until the test opens it. The
/// held thread waits at most `3 * T`, so a failing test does not leave it behind forever.
#[derive(Clone, Default)]
struct Gate {
    entered: Arc<AtomicBool>,
    open: Arc<AtomicBool>,
}

impl Gate {
    /// Called by the held thread: the first call waits for `open`, later ones pass.
    fn hold_once(&self) {
        if self.entered.swap(true, Ordering::AcqRel) {
            return;
        }
        let deadline = Instant::now() + 3 * T;
        while !self.open.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn entered(&self) -> bool {
        self.entered.load(Ordering::Acquire)
    }

    fn open(&self) {
        self.open.store(true, Ordering::Release);
    }
}

/// vIOMMU 1 (VMID 5) with vSID 0x10 -> pSID 0x800 on an engine of one worker, and one ring of
/// 2^`log2` slots.
fn one_ring(hwcfg: HwConfig, hardware: HwPlacement, log2: u8) -> (TestEngine, Vm) {
    let engine = TestEngine::with_model(
        EngineConfig {
            workers: 1,
            audit: true,
            ..Default::default()
        },
        Model {
            hw: hwcfg,
            placement: hardware,
            ..Model::default()
        },
    );
    engine.devices().add_device(DeviceId(1), 0, 0x800).unwrap();
    let v = engine.create_viommu(ViommuConfig::new(1, 5, 0)).unwrap();
    v.set_dev_id(DeviceId(1), 0x10).unwrap();
    let (guest, host) = heap_pair(log2, 1).unwrap();
    let ring = engine.attach_ring(host).unwrap();
    (engine, Vm { ring, guest })
}

/// The hardware (on its own thread) is held on the first command of a batch the engine has
/// published: the guest's CMD_SYNC must not complete, nor CONS move, until the hardware has
/// consumed the batch. Proved by order, not by time: the hardware holding a command shows the
/// physical PROD moved, the ring's progress shows the whole batch (its CMD_SYNC included) was
/// published; then the guest side is checked unmoved; only after the release may it move.
#[test]
fn a_guest_sync_stays_pending_while_the_hardware_holds_its_published_batch() {
    let (hwcfg, log) = hw(&[5], &[0x800]);
    let check = hwcfg.check.clone().expect("hw() installs a check");
    let gate = Gate::default();
    let g = gate.clone();
    let hwcfg = hwcfg.with_check(move |cmd| {
        g.hold_once();
        check(cmd)
    });
    let (engine, mut a) = one_ring(hwcfg, HwPlacement::Thread, 4);
    let progress = engine.ring_progress(a.ring).unwrap();
    let cmds = [
        c("TLBI_NH_ASID vmid=9 asid=1"),
        c("ATC_INV sid=0x10 size=0"),
        c("CMD_SYNC cs=1 msidata=0xcafe msiaddr=0xfee0_0000"),
    ];
    assert_eq!(a.guest.submit(&cmds), 3);
    engine.until("the hardware reaches the batch's first command", || {
        gate.entered()
    });
    engine.until(
        "the engine publishes the whole batch with its CMD_SYNC",
        || progress.published() == 3,
    );
    assert_eq!(
        a.guest.sync_count(),
        0,
        "the guest's CMD_SYNC completed while the hardware had consumed nothing of its batch"
    );
    assert_eq!(
        a.guest.cons(),
        (0, CError::None),
        "CONS moved while the hardware had consumed nothing"
    );
    assert_ne!(a.guest.completion(), 0xcafe, "MSIDATA written early");
    gate.open();
    a.guest.wait_syncs(1, T).unwrap();
    assert_eq!(a.guest.cons(), (3, CError::None));
    assert_eq!(a.guest.completion(), 0xcafe);
    engine.shutdown();
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            c("TLBI_NH_ASID vmid=5 asid=1"),
            c("ATC_INV sid=0x800 size=0"),
            common::PHYS_SYNC
        ]
    );
}

/// The worker is held between translating a batch with vSID 0x10 (pSID 0x800) and publishing
/// it, inside its grace-period pin. `unset_dev_id` on another thread must remove the binding
/// and then wait: it may not return before that batch is published (rule 5). Deterministic:
/// the test waits until the unbind has started its grace period (or, were the barrier gone,
/// returned), checks it has not returned, then lets the worker publish; the publish hook
/// records whether the unbind had returned by then. Afterwards the vSID is refused.
#[test]
fn unset_dev_id_waits_for_a_batch_translated_with_the_binding_but_not_yet_published() {
    let (mut hwcfg, log) = hw(&[5], &[0x800]);
    let gate = Gate::default();
    let returned = Arc::new(AtomicBool::new(false));
    let late = Arc::new(AtomicBool::new(false));
    {
        let (gate, returned, late) = (gate.clone(), returned.clone(), late.clone());
        hwcfg.before_publish = Some(Arc::new(move |cmds| {
            let carries = cmds
                .iter()
                .any(|x| x.opcode() == opcode::ATC_INV && (x.d0() >> 32) as u32 == 0x800);
            if carries {
                gate.hold_once();
                if returned.load(Ordering::SeqCst) {
                    late.store(true, Ordering::SeqCst);
                }
            }
        }));
    }
    let (engine, mut a) = one_ring(hwcfg, HwPlacement::Inline, 4);
    let v = engine.viommu(1).unwrap();
    assert_eq!(
        a.guest
            .submit(&[c("ATC_INV sid=0x10 size=0"), c("CMD_SYNC")]),
        2
    );
    engine.until(
        "the worker translates the batch and reaches its publication",
        || gate.entered(),
    );
    let epoch = v.grace().epoch();
    std::thread::scope(|s| {
        let unbinder = s.spawn(|| {
            let vsid = v.unset_dev_id(DeviceId(1));
            returned.store(true, Ordering::SeqCst);
            vsid
        });
        // Open the gate whatever happens below, so the worker (and the unbind) can finish.
        struct Open<'a>(&'a Gate);
        impl Drop for Open<'_> {
            fn drop(&mut self) {
                self.0.open();
            }
        }
        let open = Open(&gate);
        engine.until(
            "the unbind removes the binding and starts its grace period (or returns)",
            || v.grace().epoch() > epoch || returned.load(Ordering::SeqCst),
        );
        assert_eq!(v.lookup(0x10), None, "the binding is removed first");
        assert!(
            !returned.load(Ordering::SeqCst),
            "unset_dev_id returned while a batch translated with the binding was not yet \
             published (no unbind barrier)"
        );
        drop(open);
        assert_eq!(join_named("the unbinder", T, unbinder), Ok(0x10));
    });
    assert!(
        !late.load(Ordering::SeqCst),
        "a batch carrying pSID 0x800 was published after unset_dev_id returned"
    );
    a.guest.wait_syncs(1, T).unwrap();
    // Unbound now: the next command naming vSID 0x10 is refused at its slot.
    assert_eq!(
        a.guest
            .submit(&[c("ATC_INV sid=0x10 size=0"), c("CMD_SYNC")]),
        2
    );
    engine.until("the ring stops at the refused command", || {
        a.guest.error().is_some()
    });
    assert_eq!(a.guest.error(), Some((2, CError::Ill)));
    a.guest.write_slot(2, c("CMD_SYNC"));
    a.guest.ack_error();
    a.guest.wait_syncs(3, T).unwrap();
    engine.shutdown();
    let atc: Vec<RawCommand> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|x| x.opcode() == opcode::ATC_INV)
        .copied()
        .collect();
    assert_eq!(atc, vec![c("ATC_INV sid=0x800 size=0")]);
}

/// A guest's batch (commands and the CMD_SYNC that ends it, posted with one PROD store) goes to
/// the physical queue as one batch: its commands and the physical CMD_SYNC behind them, one
/// PROD store, not the commands and then the sync alone. Past `batch_limit` forwarded
/// commands a batch closes, and the next carries the rest and the sync.
#[test]
fn a_guest_batch_and_its_cmd_sync_go_out_as_one_physical_batch() {
    assert_eq!(
        EngineConfig::default().batch_limit,
        64,
        "the batches counted below"
    );
    let (hwcfg, log) = hw(&[5], &[0x800]);
    let (engine, Vm { mut guest, .. }) = one_ring(hwcfg, HwPlacement::Inline, 8);
    let batch = |n: usize| -> Vec<RawCommand> {
        let mut cmds: Vec<RawCommand> = (0..n)
            .map(|i| c(&format!("TLBI_NH_ASID asid={i}")))
            .collect();
        cmds.push(c("CMD_SYNC"));
        cmds
    };
    assert_eq!(guest.submit(&batch(64)), 65);
    guest.wait_syncs(1, T).unwrap();
    // The worker publishes its counters after the pass that signalled the sync.
    engine.until("the counters show the first batch", || {
        engine.stats().phys_syncs == 1
    });
    let s = engine.stats();
    assert_eq!(
        (s.batches, s.forwarded, s.phys_syncs),
        (1, 64, 1),
        "64 commands and their CMD_SYNC in one physical batch"
    );
    assert_eq!(guest.submit(&batch(100)), 101);
    guest.wait_syncs(2, T).unwrap();
    engine.until("the counters show the second sync", || {
        engine.stats().phys_syncs == 2
    });
    let s = engine.stats();
    assert_eq!(
        (s.batches, s.forwarded, s.phys_syncs),
        (3, 164, 2),
        "100 commands: 64, then 36 and the CMD_SYNC"
    );
    engine.shutdown();
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 166);
    let syncs: Vec<usize> = (0..log.len())
        .filter(|&i| log[i] == common::PHYS_SYNC)
        .collect();
    assert_eq!(syncs, [64, 165]);
}
