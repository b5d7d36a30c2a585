//! loom models of the physical queue: PROD publication, CONS visibility and the error
//! completion path (GERROR/GERRORN), over every interleaving and weak-memory outcome loom
//! explores. Run with `make loom`.
//!
//! What loom cannot show: it never lets a load return a value from a store that comes later in
//! program order on another thread (load buffering), so the Release on the hardware's CONS
//! store (its slot loads finish before the producer may reuse the slots) is argued in
//! `hwmodel.rs`, not checked here. Weakening PROD's Release or either side of the
//! GERROR/GERRORN handshake makes these models fail.
#![cfg(loom)]

use std::sync::atomic::{AtomicU64 as StdAtomicU64, Ordering as StdOrdering};

use loom::thread;
use vcmdq::command::{opcode, RawCommand};
use vcmdq::hwmodel::{Fault, Hardware, HwConfig, PhysQueue};
use vcmdq::queue::CError;

/// Command `i`: a legal TLBI_NH_ALL numbered by its VMID field.
fn cmd(i: u64) -> RawCommand {
    RawCommand::new(u64::from(opcode::TLBI_NH_ALL) | ((i + 1) << 32), 0)
}

/// The hardware on a thread of its own, stepping at most `per_step` commands at a time until it
/// has consumed up to position `end`; joins to what it consumed.
fn hardware_until(mut hw: Hardware, end: u64, per_step: usize) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        while hw.position() < end {
            if hw.step(per_step) == 0 {
                thread::yield_now();
            }
        }
        hw.counters().consumed
    })
}

fn sync() -> RawCommand {
    RawCommand::new(u64::from(opcode::CMD_SYNC), 0)
}

/// A check that the hardware sees exactly `want`, in order. The counter is a std atomic: only
/// the consumer thread touches it.
fn expecting(want: Vec<RawCommand>) -> HwConfig {
    let seen = StdAtomicU64::new(0);
    HwConfig::default().with_check(move |c| {
        let i = seen.fetch_add(1, StdOrdering::Relaxed) as usize;
        match want.get(i) {
            Some(w) if w == c => Ok(()),
            w => Err(format!("entry {i}: saw {c:?}, published {w:?}")),
        }
    })
}

/// Two batches through a two-entry queue: the second overwrites the slots of the first, so
/// the consumer must never read a slot before its PROD (torn or stale) nor after the producer
/// reused it (CONS published too early), and the producer's view of CONS never runs ahead.
#[test]
fn publish_two_batches_through_a_two_entry_queue() {
    loom::model(|| {
        let want = vec![cmd(0), cmd(1), cmd(2), cmd(3)];
        let (mut p, hw) = PhysQueue::new(1, expecting(want.clone())).unwrap();
        let consumer = hardware_until(hw, 4, 4);
        p.publish(&want[..2]).unwrap();
        while p.room() < 2 {
            assert!(p.consumed() <= p.published());
            thread::yield_now();
        }
        p.publish(&want[2..]).unwrap();
        while p.consumed() < 4 {
            assert!(p.consumed() <= p.published());
            thread::yield_now();
        }
        assert_eq!(consumer.join().unwrap(), 4);
    });
}

/// The worker's publication: reserve the slots after PROD, write them one by one (the
/// translation writes them as it goes), commit with one PROD store; then the same slots again
/// once CONS has passed them. The consumer never sees a slot before the commit that covers it,
/// nor the second round's command in place of the first's. Under loom the reservation is
/// written with the slots' Relaxed stores (`Slots::into_runs_mut` lends no plain memory over
/// loom's atomics); the plain stores of the real path are checked under miri by
/// `runs_mut_stores_reach_a_consumer_on_another_thread` in `tests/hwmodel.rs`.
#[test]
fn reserve_write_and_commit_publish_a_batch_and_reuse_its_slots() {
    loom::model(|| {
        let want = vec![cmd(0), cmd(1), cmd(2), cmd(3)];
        let (mut p, hw) = PhysQueue::new(1, expecting(want.clone())).unwrap();
        let consumer = hardware_until(hw, 4, 4);
        for round in want.chunks(2) {
            while p.room() < 2 {
                thread::yield_now();
            }
            let slots = p.reserve(2).unwrap();
            let slots = slots
                .into_runs_mut()
                .expect_err("loom's atomics are not lent");
            for (i, c) in round.iter().enumerate() {
                slots.write(i, *c);
            }
            p.commit(2).unwrap();
        }
        consumer.join().unwrap();
        assert_eq!(p.consumed(), 4);
    });
}

/// The completion path of an error: the hardware stops on CERROR_ILL, the producer sees the
/// flag, reads CONS and the failing command, overwrites it with a CMD_SYNC and acknowledges;
/// the hardware must consume the CMD_SYNC, never the stale command.
#[test]
fn ill_recovery_hands_the_repaired_slot_to_the_hardware() {
    loom::model(|| {
        let cfg = expecting(vec![cmd(0), sync()]).with_fault(Fault::Ill { at: 1 });
        let (mut p, hw) = PhysQueue::new(1, cfg).unwrap();
        let consumer = hardware_until(hw, 2, 2);
        p.publish(&[cmd(0), cmd(1)]).unwrap();
        let mut recovered = 0;
        while p.consumed() < 2 {
            if let Some(e) = p.recover() {
                assert_eq!((e.pos, e.cerror, e.cmd), (1, CError::Ill, cmd(1)));
                recovered += 1;
            }
            thread::yield_now();
        }
        assert_eq!(recovered, 1);
        consumer.join().unwrap();
    });
}

/// A one-entry queue: full and empty differ only in the wrap bit, and every command reuses
/// the slot the previous one just left.
#[test]
fn one_entry_queue_wraps() {
    loom::model(|| {
        let want = vec![cmd(0), cmd(1), cmd(2)];
        let (mut p, hw) = PhysQueue::new(0, expecting(want.clone())).unwrap();
        let consumer = hardware_until(hw, 3, 1);
        for c in &want {
            while p.publish(std::slice::from_ref(c)).is_err() {
                thread::yield_now();
            }
        }
        while p.consumed() < 3 {
            thread::yield_now();
        }
        consumer.join().unwrap();
    });
}
