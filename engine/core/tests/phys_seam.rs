//! The physical-queue seam: a real engine running on a second, minimal implementation of
//! [`PhysicalQueue`] written here, not on the model. [`RecordingQueue`] keeps the commands it
//! consumed, in order, consumes them on the worker's thread in `progress` (unless the test holds
//! it), and can stop on an error at CONS at a chosen position. Each test fails if the worker
//! goes around the seam: forwarding (nothing recorded), completion (a guest CMD_SYNC completed
//! before the queue consumed its physical CMD_SYNC), the error at CONS (the ring never stops)
//! and retraction (a command taken back runs twice).
#![cfg(not(loom))]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::{c, until, TestEngine, PHYS_SYNC, T};
use vcmdq::command::RawCommand;
use vcmdq::engine::phys::{CmdSlot, ConsError, Full, PhysicalQueue, Slots};
use vcmdq::engine::{Engine, EngineConfig, EngineError};
use vcmdq::hwmodel::{HwConfig, HwPlacement, ModelQueue};
use vcmdq::queue::{CError, QueueShape};
use vcmdq::ring::{heap_pair, GuestRing, RingError};
use vcmdq::viommu::{DeviceId, ViommuConfig};

/// What a [`RecordingQueue`] shares with its test.
#[derive(Default)]
struct Seen {
    /// Every command consumed, in order.
    consumed: Mutex<Vec<RawCommand>>,
    /// The free-running PROD as last committed.
    published: AtomicU64,
    /// Consume nothing while set.
    hold: AtomicBool,
    /// Calls of `progress`: the worker's passes.
    passes: AtomicU64,
}

impl Seen {
    fn consumed(&self) -> Vec<RawCommand> {
        self.consumed.lock().unwrap().clone()
    }

    /// Waits (bounded) until the worker has made `n` more passes.
    fn wait_passes(&self, n: u64) {
        let p0 = self.passes.load(Ordering::Acquire);
        until(&format!("the worker makes {n} more passes"), || {
            self.passes.load(Ordering::Acquire) >= p0 + n
        });
    }
}

/// A physical queue that is not the model: a plain ring of [`CmdSlot`]s, a consumer run by the
/// worker's `progress`, and an optional error at CONS.
struct RecordingQueue {
    shape: QueueShape,
    slots: Box<[CmdSlot]>,
    prod: u64,
    cons: u64,
    /// Stop with this CONS.ERR when CONS reaches this position, once.
    fault: Option<(u64, CError)>,
    /// Stopped on this error until `recover`.
    stopped: Option<CError>,
    seen: Arc<Seen>,
}

impl RecordingQueue {
    fn new(log2size: u8) -> (RecordingQueue, Arc<Seen>) {
        let shape = QueueShape::new(log2size).unwrap();
        let seen = Arc::new(Seen::default());
        let q = RecordingQueue {
            shape,
            slots: (0..shape.entries()).map(|_| CmdSlot::new()).collect(),
            prod: 0,
            cons: 0,
            fault: None,
            stopped: None,
            seen: seen.clone(),
        };
        (q, seen)
    }

    fn failing_at(log2size: u8, pos: u64, cerror: CError) -> (RecordingQueue, Arc<Seen>) {
        let (mut q, seen) = RecordingQueue::new(log2size);
        q.fault = Some((pos, cerror));
        (q, seen)
    }

    fn slot(&self, pos: u64) -> &CmdSlot {
        &self.slots[(pos & u64::from(self.shape.entries() - 1)) as usize]
    }
}

impl PhysicalQueue for RecordingQueue {
    fn shape(&self) -> QueueShape {
        self.shape
    }

    fn room(&self) -> u32 {
        self.shape.entries() - (self.prod - self.cons) as u32
    }

    fn reserve(&mut self, n: usize) -> Result<Slots<'_>, Full> {
        let room = self.room();
        if n > room as usize {
            return Err(Full { room, wanted: n });
        }
        let start = (self.prod & u64::from(self.shape.entries() - 1)) as usize;
        Ok(Slots::of_ring(&self.slots, start, n))
    }

    fn commit(&mut self, n: usize) -> Result<u64, Full> {
        let room = self.room();
        if n > room as usize {
            return Err(Full { room, wanted: n });
        }
        self.prod += n as u64;
        self.seen.published.store(self.prod, Ordering::Release);
        Ok(self.prod)
    }

    fn published(&self) -> u64 {
        self.prod
    }

    fn consumed(&self) -> u64 {
        self.cons
    }

    fn error(&self) -> Option<ConsError> {
        self.stopped.map(|cerror| ConsError {
            pos: self.cons,
            cerror,
            cmd: self.slot(self.cons).read(),
        })
    }

    fn retract(&mut self, pos: u64) -> bool {
        if self.stopped.is_none() || pos < self.cons || pos >= self.prod {
            return false;
        }
        self.slot(pos).write(PHYS_SYNC);
        true
    }

    fn recover(&mut self) -> Option<ConsError> {
        let err = self.error()?;
        if err.cerror == CError::Ill {
            self.slot(self.cons).write(PHYS_SYNC);
        }
        self.stopped = None;
        Some(err)
    }

    fn progress(&mut self) -> bool {
        self.seen.passes.fetch_add(1, Ordering::Release);
        if self.stopped.is_some() || self.seen.hold.load(Ordering::Acquire) {
            return false;
        }
        let mut moved = false;
        while self.cons < self.prod {
            if let Some((at, cerror)) = self.fault {
                if at == self.cons {
                    self.fault = None;
                    self.stopped = Some(cerror);
                    return true;
                }
            }
            let cmd = self.slot(self.cons).read();
            self.seen.consumed.lock().unwrap().push(cmd);
            self.cons += 1;
            moved = true;
        }
        moved
    }
}

/// vIOMMU `id` with VMID `vmid` binding vSID 0x10 to pSID `psid`, and a 2^4 ring on it.
fn vm(engine: &Engine, id: u32, vmid: u16, psid: u32) -> GuestRing {
    engine.add_device(DeviceId(id), 0, psid).unwrap();
    engine
        .create_viommu(ViommuConfig::new(id, vmid, 0))
        .unwrap();
    engine.set_dev_id(id, DeviceId(id), 0x10).unwrap();
    let (guest, host) = heap_pair(4, id).unwrap();
    engine.attach_ring(host).unwrap();
    guest
}

/// An engine of one worker on `q`. A [`TestEngine`]: a test that fails leaves its threads
/// behind instead of waiting forever for a queue that never completes.
fn one_worker<Q: PhysicalQueue>(q: Q) -> TestEngine {
    TestEngine::on_queues(
        EngineConfig {
            workers: 1,
            ..Default::default()
        },
        vec![q],
    )
}

fn asid(n: u32) -> RawCommand {
    c(&format!("TLBI_NH_ASID asid={n}"))
}

/// What the engine makes of [`asid`]`(n)` on a vIOMMU with VMID `vmid`.
fn asid_patched(vmid: u16, n: u32) -> RawCommand {
    c(&format!("TLBI_NH_ASID vmid={vmid} asid={n}"))
}

#[test]
fn an_engine_on_a_second_queue_implementation_forwards_every_command_once_in_order() {
    // An 8-entry queue under 11-entry rounds: batches wrap the ring, so both runs of a
    // reservation are written.
    let (q, seen) = RecordingQueue::new(3);
    let engine = one_worker(q);
    let mut g = vm(&engine, 1, 5, 0x800);
    let mut want = Vec::new();
    for round in 0..6u32 {
        let mut cmds: Vec<_> = (0..10).map(|i| asid(round * 10 + i)).collect();
        cmds.push(c("CMD_SYNC"));
        assert_eq!(g.submit(&cmds), cmds.len());
        g.wait_syncs(u64::from(round) + 1, T).unwrap();
        want.extend((0..10).map(|i| asid_patched(5, round * 10 + i)));
        want.push(PHYS_SYNC);
    }
    let report = engine.shutdown();
    assert_eq!(
        seen.consumed(),
        want,
        "the queue consumed each translated command once, in ring order, and one physical \
         CMD_SYNC per guest CMD_SYNC"
    );
    assert_eq!(report.stats.forwarded, 60);
    assert_eq!(report.stats.guest_syncs, 6);
}

#[test]
fn a_guest_cmd_sync_completes_only_once_the_queue_has_consumed_its_physical_cmd_sync() {
    let (q, seen) = RecordingQueue::new(4);
    seen.hold.store(true, Ordering::Release);
    let engine = one_worker(q);
    let mut g = vm(&engine, 1, 5, 0x800);
    g.submit(&[asid(1), asid(2), c("CMD_SYNC")]);
    until("the worker publishes the batch and its CMD_SYNC", || {
        seen.published.load(Ordering::Acquire) == 3
    });
    // Passes after the publication: each one asks the queue what it consumed (nothing).
    seen.wait_passes(4);
    assert_eq!(g.sync_count(), 0, "completed before the queue consumed it");
    assert_eq!(
        g.cons(),
        (0, CError::None),
        "CONS moved past unconsumed commands"
    );
    seen.hold.store(false, Ordering::Release);
    g.wait_syncs(1, T).unwrap();
    assert_eq!(g.cons(), (3, CError::None));
    engine.shutdown();
    assert_eq!(
        seen.consumed(),
        [asid_patched(5, 1), asid_patched(5, 2), PHYS_SYNC]
    );
}

#[test]
fn an_error_at_cons_stops_the_guest_ring_with_cons_err_and_its_later_commands_are_retracted() {
    // Physical positions 0..5: asid 1..4 and the physical CMD_SYNC; position 1 fails.
    let (q, seen) = RecordingQueue::failing_at(4, 1, CError::Ill);
    seen.hold.store(true, Ordering::Release);
    let engine = one_worker(q);
    let mut g = vm(&engine, 1, 5, 0x800);
    let mut other = vm(&engine, 2, 6, 0x900);
    g.submit(&[asid(1), asid(2), asid(3), asid(4), c("CMD_SYNC")]);
    until("the worker publishes all five", || {
        seen.published.load(Ordering::Acquire) == 5
    });
    seen.hold.store(false, Ordering::Release);
    match g.wait_syncs(1, T) {
        Err(RingError::Stopped { slot, cerror }) => {
            assert_eq!(
                (slot, cerror),
                (1, CError::Ill),
                "stopped at the failing slot"
            )
        }
        got => panic!("expected the ring to stop with CONS.ERR, got {got:?}"),
    }
    // The queue runs on for other rings once repaired.
    other.submit(&[asid(9), c("CMD_SYNC")]);
    other.wait_syncs(1, T).unwrap();
    // Nothing to fix (the command was fine): the acknowledgement re-reads it.
    g.ack_error();
    g.wait_syncs(1, T).unwrap();
    let report = engine.shutdown();
    assert_eq!(
        seen.consumed(),
        [
            asid_patched(5, 1),
            // The failing command repaired into a CMD_SYNC, then asid 3, 4 and the CMD_SYNC
            // taken back (no-op CMD_SYNCs).
            PHYS_SYNC,
            PHYS_SYNC,
            PHYS_SYNC,
            PHYS_SYNC,
            asid_patched(6, 9),
            PHYS_SYNC,
            // After the acknowledgement: from the failing slot on, once each.
            asid_patched(5, 2),
            asid_patched(5, 3),
            asid_patched(5, 4),
            PHYS_SYNC,
        ]
    );
    assert_eq!(report.stats.phys_faults, 1);
    assert_eq!(report.stats.retracted, 3);
}

#[test]
fn an_engine_runs_a_model_queue_and_a_recording_queue_side_by_side() {
    let (model, counters) =
        ModelQueue::for_workers(1, 4, &HwConfig::default(), HwPlacement::Inline).unwrap();
    let (recording, seen) = RecordingQueue::new(4);
    let mut queues: Vec<Box<dyn PhysicalQueue>> = Vec::new();
    queues.extend(
        model
            .into_iter()
            .map(|q| Box::new(q) as Box<dyn PhysicalQueue>),
    );
    queues.push(Box::new(recording));
    let engine = TestEngine::on_queues(
        EngineConfig {
            workers: 2,
            ..Default::default()
        },
        queues,
    );
    // Rings go to workers round robin: the first to the model, the second to the recorder.
    let mut a = vm(&engine, 1, 5, 0x800);
    let mut b = vm(&engine, 2, 6, 0x900);
    a.submit(&[asid(1), asid(2), c("CMD_SYNC")]);
    b.submit(&[asid(3), c("CMD_SYNC")]);
    a.wait_syncs(1, T).unwrap();
    b.wait_syncs(1, T).unwrap();
    engine.shutdown();
    assert_eq!(seen.consumed(), [asid_patched(6, 3), PHYS_SYNC]);
    let hw = counters.collect();
    assert_eq!(
        hw.len(),
        1,
        "the model queue left its counters when the engine dropped it"
    );
    assert_eq!((hw[0].consumed, hw[0].syncs), (3, 1));
}

#[test]
fn engine_start_refuses_a_queue_count_other_than_its_workers() {
    let (q, _) = RecordingQueue::new(4);
    match Engine::start(
        EngineConfig {
            workers: 2,
            ..Default::default()
        },
        vec![q],
    ) {
        Err(EngineError::PhysQueueCount { given, workers }) => assert_eq!((given, workers), (1, 2)),
        Err(e) => panic!("expected PhysQueueCount, got {e}"),
        Ok(_) => panic!("the engine started with one queue for two workers"),
    }
}
