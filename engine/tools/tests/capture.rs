//! Capture: a replay captured by the engine replays to the same outcomes as the trace it came
//! from, and what it costs is each poll's copy.
#![cfg(not(loom))]

use vcmdq_tools::replay::{replay, ReplayOptions};
use vcmdq_trace::{validate, TraceFile};

fn outcomes_of(
    path: &std::path::Path,
    capture: Option<std::path::PathBuf>,
) -> vcmdq_tools::replay::ReplayReport {
    let f = TraceFile::open(path).unwrap();
    let t = f.trace().unwrap();
    let r = replay(
        &t,
        &ReplayOptions {
            capture,
            ..Default::default()
        },
        |_| {},
    )
    .unwrap();
    assert!(
        r.ok(),
        "{}: {:?} {:?}",
        path.display(),
        r.mismatches,
        r.invariant_failures
    );
    r
}

#[test]
fn a_captured_replay_replays_to_the_same_outcomes() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../traces");
    for name in ["hostile.vct", "hot-unplug.vct", "qemu-sample.vct"] {
        let dir = std::env::temp_dir().join(format!("vcmdq-capture-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join(name);
        let original = outcomes_of(&root.join(name), Some(out.clone()));
        let f = TraceFile::open(&out).unwrap();
        let summary = validate(&f.trace().unwrap()).unwrap();
        assert_eq!(
            summary.commands, original.commands,
            "{name}: every entry captured once"
        );
        let again = outcomes_of(&out, None);
        assert_eq!(again.outcomes, original.outcomes, "{name}");
        assert_eq!(again.per_viommu, original.per_viommu, "{name}");
        std::fs::remove_file(&out).unwrap();
    }
}

#[path = "../../core/tests/common/mod.rs"]
mod common;

use common::{c, outcomes, start_engine, Model, T};
use std::time::Instant;
use vcmdq::command::RawCommand;
use vcmdq::engine::EngineConfig;
use vcmdq::ring::heap_pair;
use vcmdq::translate::SlotOutcome;
use vcmdq::viommu::{DeviceId, ViommuConfig};
use vcmdq_tools::replay::Outcomes;
use vcmdq_trace::Event;

#[test]
fn a_slot_rewritten_behind_a_trap_is_captured_as_the_engine_read_it_and_replays_alike() {
    let dir = std::env::temp_dir().join(format!("vcmdq-capture-rw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("rewrite.vct");
    let (engine, _) = start_engine(
        EngineConfig {
            audit: true,
            capture: Some(vcmdq_trace::capture_to_file(&path)),
            ..Default::default()
        },
        &Model::default(),
    );
    engine.add_device(DeviceId(1), 0, 0x800).unwrap();
    engine.create_viommu(ViommuConfig::new(1, 5, 0)).unwrap();
    engine.set_dev_id(1, DeviceId(1), 0x10).unwrap();
    let (mut guest, host) = heap_pair(4, 1).unwrap();
    let ring = engine.attach_ring(host).unwrap();

    // X would be refused (opcode 0 is illegal); Y is forwarded. The engine reads both slots in
    // one poll, traps the CFGI_STE and gives X back to be read again after the trap.
    let x = RawCommand::new(0, 0);
    let y = c("TLBI_NH_ASID vmid=0 asid=7");
    assert_eq!(guest.submit(&[c("CFGI_STE sid=0x10"), x]), 2);
    let deadline = Instant::now() + T;
    let trap = loop {
        if let Some(t) = engine.next_trap() {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "the engine did not trap the CFGI_STE at slot 0 within {T:?}"
        );
        std::thread::yield_now();
    };
    assert_eq!(trap.slot, 0);
    // The trap is pending, so the engine has read slot 1 and not acted on it: rewrite it.
    guest.write_slot(1, y);
    engine.complete_trap(ring).unwrap();
    guest
        .wait_cons(2, T)
        .expect("CONS did not pass slot 1 after the trap was completed");
    let report = engine.shutdown();
    assert!(
        matches!(report.capture, Some(Ok(_))),
        "capture: {:?}",
        report.capture
    );
    let got = outcomes(&report.audit, ring);
    assert!(matches!(got[0], SlotOutcome::Trapped(_)), "{got:?}");
    assert_eq!(
        got[1],
        SlotOutcome::Forwarded(c("TLBI_NH_ASID vmid=5 asid=7")),
        "the engine forwards what the guest rewrote"
    );
    let mut original = Outcomes::default();
    for o in &got {
        original.read += 1;
        match o {
            SlotOutcome::Forwarded(_) => original.forwarded += 1,
            SlotOutcome::Trapped(_) => original.trapped += 1,
            other => panic!("unexpected outcome {other:?}"),
        }
    }

    // What the capture wrote into slot 1, in order: only Y, the bytes the engine acted on.
    let f = TraceFile::open(&path).unwrap();
    let t = f.trace().unwrap();
    let mut slot1 = Vec::new();
    for rec in t.records() {
        match rec.unwrap().event {
            Event::Commands { slot, cmds, .. } => {
                for (i, cmd) in cmds.iter().enumerate() {
                    if (slot as usize + i) % 16 == 1 {
                        slot1.push(*cmd);
                    }
                }
            }
            Event::GuestFix { slot: 1, cmd, .. } => slot1.push(cmd),
            _ => {}
        }
    }
    assert_eq!(
        slot1,
        vec![y],
        "the capture holds what the engine read and acted on"
    );

    let again = replay(&t, &ReplayOptions::default(), |_| {}).unwrap();
    assert!(
        again.ok(),
        "{:?} {:?}",
        again.mismatches,
        again.invariant_failures
    );
    assert_eq!(
        again.outcomes, original,
        "the capture replays as the run went"
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_slot_rewritten_while_the_ring_is_stopped_is_captured_as_the_engine_read_it() {
    let dir = std::env::temp_dir().join(format!("vcmdq-capture-stop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("stop.vct");
    let (engine, _) = start_engine(
        EngineConfig {
            audit: true,
            capture: Some(vcmdq_trace::capture_to_file(&path)),
            ..Default::default()
        },
        &Model::default(),
    );
    engine.add_device(DeviceId(1), 0, 0x800).unwrap();
    engine.create_viommu(ViommuConfig::new(1, 5, 0)).unwrap();
    engine.set_dev_id(1, DeviceId(1), 0x10).unwrap();
    let (mut guest, host) = heap_pair(4, 1).unwrap();
    let ring = engine.attach_ring(host).unwrap();

    // Slot 0 is refused; the engine read slot 1 (X) in the same poll and gives it back. While
    // the ring is stopped the guest fixes slot 0 as Linux does and also rewrites slot 1 (Y).
    let x = c("TLBI_NH_ASID vmid=0 asid=1");
    let y = c("TLBI_NH_ASID vmid=0 asid=2");
    let sync = c("CMD_SYNC cs=0");
    assert_eq!(guest.submit(&[RawCommand::new(0, 0), x]), 2);
    let deadline = Instant::now() + T;
    while guest.error().is_none() {
        assert!(
            Instant::now() < deadline,
            "the ring did not stop on the illegal command at slot 0 within {T:?}"
        );
        std::thread::yield_now();
    }
    guest.write_slot(0, sync);
    guest.write_slot(1, y);
    guest.ack_error();
    guest
        .wait_cons(2, T)
        .expect("CONS did not pass slot 1 after the acknowledgement");
    let report = engine.shutdown();
    assert!(
        matches!(report.capture, Some(Ok(_))),
        "capture: {:?}",
        report.capture
    );
    let got = outcomes(&report.audit, ring);
    assert_eq!(
        got[1],
        SlotOutcome::Forwarded(c("TLBI_NH_ASID vmid=5 asid=2")),
        "{got:?}"
    );
    let mut original = Outcomes::default();
    let mut refused = 0;
    for rec in &report.audit {
        if let vcmdq::engine::AuditRecord::Slot { outcome, .. } = rec {
            original.read += 1;
            match outcome {
                SlotOutcome::Forwarded(_) => original.forwarded += 1,
                SlotOutcome::Sync { .. } => original.syncs += 1,
                SlotOutcome::Refused { .. } => refused += 1,
                other => panic!("unexpected outcome {other:?}"),
            }
        }
    }

    let f = TraceFile::open(&path).unwrap();
    let t = f.trace().unwrap();
    let mut slot1 = Vec::new();
    for rec in t.records() {
        if let Event::Commands { slot, cmds, .. } = rec.unwrap().event {
            for (i, cmd) in cmds.iter().enumerate() {
                if (slot as usize + i) % 16 == 1 {
                    slot1.push(*cmd);
                }
            }
        }
    }
    assert_eq!(
        slot1,
        vec![y],
        "the capture holds what the engine read and acted on"
    );
    let again = replay(&t, &ReplayOptions::default(), |_| {}).unwrap();
    assert!(
        again.ok(),
        "{:?} {:?}",
        again.mismatches,
        again.invariant_failures
    );
    assert_eq!(again.outcomes.read, original.read);
    assert_eq!(again.outcomes.forwarded, original.forwarded);
    assert_eq!(again.outcomes.syncs, original.syncs);
    assert_eq!(again.outcomes.refused_total(), refused);
    std::fs::remove_file(&path).unwrap();
}
