//! loom models of the engine's completion path: a guest publishes commands with PROD, a worker
//! copies them out, publishes them into the physical queue, waits until the hardware has
//! consumed them and then moves the guest's CONS and signals its CMD_SYNC; the guest that sees
//! its sync count must see CONS past the sync and the invalidation done. A second model runs
//! the error path: the hardware fails the command, the worker repairs the physical queue and
//! stops the guest ring with CONS.ERR, the guest fixes the slot and acknowledges, the worker
//! reads the fixed slot and completes. Run with `make loom`.
//!
//! The physical queue is the real one (`PhysProducer`, `Hardware`: their atomics come from
//! `crate::sync`, so loom explores them). A guest ring lives in memory another process maps and
//! is accessed through std atomics over raw memory, which loom cannot see; so the ring's words
//! (PROD, CONS, ERR, ERR_ACK, SYNC_COUNT, the slots) are modelled here as loom atomics with
//! exactly the orderings `ring::HostRing` and `ring::GuestRing` use (named at each access), and
//! the worker's steps are those of `engine::worker` (`serve`, `retire`, `physical_fault`) cut
//! down to one ring and one batch.
//!
//! What the models show: the chain of Release/Acquire pairs from the hardware's side effects
//! through the physical CONS, the worker, and the guest's CONS and SYNC_COUNT makes every
//! invalidation visible to the guest that sees its sync completed, and the ERR/ERR_ACK pair
//! hands the fixed slot to the worker. Weakening any link (the physical PROD store, the
//! hardware's CONS store, the producer's CONS load, the ring's CONS or SYNC_COUNT store or
//! their loads) fails a model: an execution in which the hardware reads a slot before its PROD
//! fails even if the protocol then never completes.
#![cfg(loom)]

use std::sync::atomic::{AtomicUsize as StdAtomicUsize, Ordering as StdOrdering};

use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;
use vcmdq::command::{opcode, RawCommand};
use vcmdq::hwmodel::{Fault, HwConfig, PhysQueue};
use vcmdq::queue::{with_cons_err, CError};

/// `loom::model`, counting the executions in which `f` reached the end of the protocol (it
/// returns true) and failing if none did: a model whose waits never succeed checks nothing.
fn model(name: &str, f: impl Fn() -> bool + Sync + Send + 'static) {
    static REACHED: StdAtomicUsize = StdAtomicUsize::new(0);
    REACHED.store(0, StdOrdering::Relaxed);
    loom::model(move || {
        if f() {
            REACHED.fetch_add(1, StdOrdering::Relaxed);
        }
    });
    assert!(
        REACHED.load(StdOrdering::Relaxed) > 0,
        "{name}: no execution reached the end"
    );
}

/// Tries `f` up to `n` times, yielding between tries. Waits in these models are bounded: loom
/// explores every interleaving anyway, and an unbounded spin in each of three threads makes the
/// state space explode.
///
/// After a yield, loom no longer offers a thread a value it had itself loaded before the yield
/// when a newer one exists (it takes a yield for a spin loop that must see progress). So a
/// thread here never loads a word before a wait whose stale value a later load must be able
/// to return.
fn attempts<T>(n: usize, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    for i in 0..n {
        if let Some(v) = f() {
            return Some(v);
        }
        if i + 1 < n {
            thread::yield_now();
        }
    }
    None
}

/// The guest's command: a TLBI_NH_ASID with the guest's (wrong) VMID 9.
fn guest_cmd() -> RawCommand {
    RawCommand::new(u64::from(opcode::TLBI_NH_ASID) | (9 << 32) | (7 << 48), 0)
}

/// What the worker forwards for it: the VM's VMID 5.
fn patched() -> RawCommand {
    RawCommand::new(u64::from(opcode::TLBI_NH_ASID) | (5 << 32) | (7 << 48), 0)
}

fn sync() -> RawCommand {
    RawCommand::new(u64::from(opcode::CMD_SYNC), 0)
}

/// The words of a two-slot guest ring (LOG2SIZE 1: pointers carry a wrap bit at bit 1).
struct Ring {
    slots: [[AtomicU64; 2]; 2],
    prod: AtomicU32,
    err_ack: AtomicU32,
    cons: AtomicU32,
    err: AtomicU32,
    sync_count: AtomicU64,
}

impl Ring {
    fn new() -> Ring {
        Ring {
            slots: [
                [AtomicU64::new(0), AtomicU64::new(0)],
                [AtomicU64::new(0), AtomicU64::new(0)],
            ],
            prod: AtomicU32::new(0),
            err_ack: AtomicU32::new(0),
            cons: AtomicU32::new(0),
            err: AtomicU32::new(0),
            sync_count: AtomicU64::new(0),
        }
    }

    /// `GuestRing::write_slot` / `push`: two Relaxed stores.
    fn write(&self, i: usize, cmd: RawCommand) {
        self.slots[i][0].store(cmd.d0(), Ordering::Relaxed);
        self.slots[i][1].store(cmd.d1(), Ordering::Relaxed);
    }

    /// `HostRing::poll`'s copy: two Relaxed loads.
    fn read(&self, i: usize) -> RawCommand {
        RawCommand::new(
            self.slots[i][0].load(Ordering::Relaxed),
            self.slots[i][1].load(Ordering::Relaxed),
        )
    }
}

/// A hardware check that records, in `done`, that the patched command ran (a Relaxed store:
/// only the Release/Acquire chain after it may make it visible to the guest), and fails on
/// anything the worker did not mean to publish.
fn hw_config(done: Arc<AtomicBool>, allowed: Vec<RawCommand>) -> HwConfig {
    HwConfig::default().with_check(move |c| {
        if *c == patched() {
            done.store(true, Ordering::Relaxed);
        }
        if allowed.contains(c) {
            Ok(())
        } else {
            Err(format!("the hardware saw {c:?}"))
        }
    })
}

/// The modelled hardware: `steps` calls of `Hardware::step`, as its thread makes them. No yield
/// between them: the hardware loads the failing command before it raises the error, and after
/// the repair it must still be offered that stale slot (see `attempts`).
///
/// The hardware raises no error but the `injected` ones: an execution in which it read a slot
/// the worker had not yet published (a stale or torn command, CERROR_ILL) fails the model,
/// even when the worker then gives up waiting for it.
fn hardware(
    mut hw: vcmdq::hwmodel::Hardware,
    steps: usize,
    injected: u64,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for _ in 0..steps {
            hw.step(4);
        }
        assert!(
            hw.counters().total_errors() <= injected,
            "the hardware raised {} error(s), {injected} injected: it read a slot before the \
             physical PROD published it",
            hw.counters().total_errors()
        );
    })
}

/// The guest publishes a command and a CMD_SYNC; the worker forwards the command and a
/// physical CMD_SYNC, and once both are consumed moves CONS past the guest's sync and counts
/// it. The guest that sees the count sees CONS past its sync and the invalidation done.
#[test]
fn a_completed_sync_shows_cons_past_it_and_the_invalidation_done() {
    model("completion", || {
        let ring = Arc::new(Ring::new());
        let done = Arc::new(AtomicBool::new(false));
        let (mut producer, hw) =
            PhysQueue::new(1, hw_config(done.clone(), vec![patched(), sync()])).unwrap();
        let hw = hardware(hw, 2, 0);

        let r = ring.clone();
        let worker = thread::spawn(move || {
            // `HostRing::poll`: PROD with Acquire, then the slots.
            if r.prod.load(Ordering::Acquire) != 2 {
                return;
            }
            assert_eq!(r.read(0), guest_cmd(), "a slot read before its PROD");
            assert_eq!(r.read(1), sync());
            // `Lane::serve`: the patched command, then the physical CMD_SYNC.
            producer.publish(&[patched()]).unwrap();
            let end = producer.publish(&[sync()]).unwrap();
            // `Lane::retire`: `PhysProducer::consumed`, an Acquire of the hardware's CONS.
            if attempts(2, || (producer.consumed() >= end).then_some(())).is_none() {
                return;
            }
            // `Action::Sync`: `HostRing::complete` stores CONS (Release), then
            // `HostRing::signal_sync` stores SYNC_COUNT (Release).
            r.cons.store(2, Ordering::Release);
            r.sync_count.store(1, Ordering::Release);
        });

        // `GuestRing::submit`: the slots, then PROD with Release.
        ring.write(0, guest_cmd());
        ring.write(1, sync());
        ring.prod.store(2, Ordering::Release);
        // `GuestRing::wait_syncs`: SYNC_COUNT with Acquire, then `GuestRing::cons` (Acquire).
        let completed = ring.sync_count.load(Ordering::Acquire) == 1;
        if completed {
            assert_eq!(
                ring.cons.load(Ordering::Acquire),
                2,
                "the sync completed but CONS is not past it"
            );
            assert!(
                done.load(Ordering::Relaxed),
                "the sync completed before its invalidation was visible"
            );
        }
        worker.join().unwrap();
        hw.join().unwrap();
        completed
    });
}

/// The hardware fails the forwarded command (CERROR_ILL). The worker repairs the physical
/// queue (the failed command becomes a CMD_SYNC) and stops the guest ring at the slot; the
/// guest sees CONS.ERR at that slot, overwrites it with a CMD_SYNC as Linux does, and
/// acknowledges; the worker reads the fixed slot (never the old command), publishes a
/// physical CMD_SYNC for it and completes it. The failed command never runs.
#[test]
fn an_error_stops_the_guest_at_the_slot_and_the_fixed_slot_completes() {
    model("error", || {
        let ring = Arc::new(Ring::new());
        let done = Arc::new(AtomicBool::new(false));
        let cfg = hw_config(done.clone(), vec![sync()]).with_fault(Fault::Ill { at: 0 });
        let (mut producer, hw) = PhysQueue::new(1, cfg).unwrap();
        let hw = hardware(hw, 3, 1);
        // The guest's command is in the ring before the worker starts, and the worker has its
        // copy: the publication is the first model's. (The worker must not load the slot here:
        // see `attempts`.)
        ring.write(0, guest_cmd());
        ring.prod.store(1, Ordering::Release);

        let r = ring.clone();
        let worker = thread::spawn(move || {
            producer.publish(&[patched()]).unwrap();
            // `Lane::physical_fault`: the error (GERROR with Acquire), the repair, the ack.
            let Some(err) = attempts(2, || producer.error()) else {
                return;
            };
            assert_eq!((err.pos, err.cerror, err.cmd), (0, CError::Ill, patched()));
            producer.recover().unwrap();
            // `HostRing::stop`: CONS with CONS.ERR (Release), then ERR against ERR_ACK
            // (Acquire, `QueueRegisters::err_ack`) (Release).
            r.cons
                .store(with_cons_err(0, CError::Ill.code()), Ordering::Release);
            let ack = r.err_ack.load(Ordering::Acquire) & 1;
            r.err.store(ack ^ 1, Ordering::Release);
            // `HostRing::poll` while stopped: ERR_ACK with Acquire, then CONS without the
            // error, then the slot again.
            if attempts(2, || {
                (r.err_ack.load(Ordering::Acquire) & 1 == ack ^ 1).then_some(())
            })
            .is_none()
            {
                return;
            }
            r.cons.store(0, Ordering::Release);
            assert_eq!(
                r.read(0),
                sync(),
                "the worker read the slot before the guest's fix"
            );
            let end = producer.publish(&[sync()]).unwrap();
            if attempts(2, || (producer.consumed() >= end).then_some(())).is_none() {
                return;
            }
            r.cons.store(1, Ordering::Release);
            r.sync_count.store(1, Ordering::Release);
        });

        // `GuestRing::error`: ERR (Acquire) against ERR_ACK, then CONS.
        let stopped = attempts(2, || {
            (ring.err.load(Ordering::Acquire) & 1 != ring.err_ack.load(Ordering::Relaxed) & 1)
                .then_some(())
        });
        let mut completed = false;
        if stopped.is_some() {
            assert_eq!(
                ring.cons.load(Ordering::Acquire),
                with_cons_err(0, CError::Ill.code()),
                "the error flag is up but CONS does not name the slot"
            );
            // Fix the slot, then `GuestRing::ack_error` (Release).
            ring.write(0, sync());
            let err = ring.err.load(Ordering::Acquire);
            ring.err_ack.store(err & 1, Ordering::Release);
            if attempts(2, || {
                (ring.sync_count.load(Ordering::Acquire) == 1).then_some(())
            })
            .is_some()
            {
                assert_eq!(ring.cons.load(Ordering::Acquire), 1);
                completed = true;
            }
        }
        worker.join().unwrap();
        hw.join().unwrap();
        assert!(!done.load(Ordering::Relaxed), "the failed command ran");
        completed
    });
}
