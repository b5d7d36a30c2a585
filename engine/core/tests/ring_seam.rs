//! The seam between a guest queue's registers and its slots: the engine serves a queue whose
//! PROD/CONS live in one memory and whose slots live in another, through implementations of
//! `QueueRegisters` and `QueueSlots` written here, outside the crate (as a VMM would write its
//! register page and its guest-RAM slots); and the ring format still round-trips through the
//! library's own two parts over one memory.
#![cfg(not(loom))]

mod common;

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use common::{bindings, c, hw, outcomes, Model, TestEngine, T};
use vcmdq::command::RawCommand;
use vcmdq::engine::EngineConfig;
use vcmdq::oracle;
use vcmdq::queue::{cons_err, CError, QueueShape};
use vcmdq::ring::{
    layout, GuestRing, HeaderRegisters, HeapMemory, HostRing, MemorySlots, QueueRegisters,
    QueueSlots, RegisterSnapshot, RingError, RingMemory,
};
use vcmdq::viommu::{DeviceId, ViommuConfig};

/// A register page of its own allocation: the guest's words and the engine's, one atomic each.
#[derive(Debug, Default)]
struct Page {
    prod: AtomicU32,
    err_ack: AtomicU32,
    cons: AtomicU32,
    err: AtomicU32,
    completion: AtomicU32,
    sync_count: AtomicU64,
}

/// The engine's view of a [`Page`].
#[derive(Debug)]
struct PageRegisters(Arc<Page>);

impl QueueRegisters for PageRegisters {
    fn name(&self) -> &Path {
        Path::new("test-register-page")
    }
    fn snapshot(&self) -> Result<RegisterSnapshot, RingError> {
        let p = &self.0;
        Ok(RegisterSnapshot {
            cons: p.cons.load(Ordering::Relaxed),
            err: p.err.load(Ordering::Relaxed),
            err_ack: p.err_ack.load(Ordering::Acquire),
            sync_count: p.sync_count.load(Ordering::Relaxed),
        })
    }
    fn prod(&self) -> Result<u32, RingError> {
        Ok(self.0.prod.load(Ordering::Acquire))
    }
    fn err_ack(&self) -> Result<u32, RingError> {
        Ok(self.0.err_ack.load(Ordering::Acquire))
    }
    fn set_cons(&self, cons: u32) -> Result<(), RingError> {
        self.0.cons.store(cons, Ordering::Release);
        Ok(())
    }
    fn set_err(&self, err: u32) -> Result<(), RingError> {
        self.0.err.store(err, Ordering::Release);
        Ok(())
    }
    fn sync_completed(&self, msidata: Option<u32>, count: u64) -> Result<(), RingError> {
        if let Some(m) = msidata {
            self.0.completion.store(m, Ordering::Relaxed);
        }
        self.0.sync_count.store(count, Ordering::Release);
        Ok(())
    }
}

/// A slot buffer of its own allocation; `unplugged` makes every read fail, as guest memory
/// that went away would.
#[derive(Debug)]
struct Buffer {
    slots: Vec<[AtomicU64; 2]>,
    unplugged: AtomicBool,
}

/// The engine's view of a [`Buffer`]: each slot copied with two atomic loads.
#[derive(Debug)]
struct BufferSlots(Arc<Buffer>);

impl QueueSlots for BufferSlots {
    fn name(&self) -> &Path {
        Path::new("test-slot-buffer")
    }
    fn capacity(&self) -> u64 {
        self.0.slots.len() as u64
    }
    fn copy_out(&mut self, index: u32, out: &mut [RawCommand]) -> Result<(), RingError> {
        if self.0.unplugged.load(Ordering::Relaxed) {
            return Err(RingError::Io {
                path: self.name().to_path_buf(),
                op: "read",
                source: io::Error::other("the slot memory was unplugged"),
            });
        }
        let run = &self.0.slots[index as usize..index as usize + out.len()];
        for (o, s) in out.iter_mut().zip(run) {
            *o = RawCommand::new(s[0].load(Ordering::Relaxed), s[1].load(Ordering::Relaxed));
        }
        Ok(())
    }
}

/// A guest driving a queue whose registers are a [`Page`] and whose slots are a [`Buffer`].
struct SplitGuest {
    page: Arc<Page>,
    buf: Arc<Buffer>,
    shape: QueueShape,
    prod: u32,
}

impl SplitGuest {
    /// A queue of 2^`log2size` slots in a buffer of `slots` slots, and the engine's two parts.
    fn new(log2size: u8, slots: usize) -> (SplitGuest, PageRegisters, BufferSlots) {
        let page = Arc::new(Page::default());
        let buf = Arc::new(Buffer {
            slots: (0..slots)
                .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
                .collect(),
            unplugged: AtomicBool::new(false),
        });
        let guest = SplitGuest {
            page: page.clone(),
            buf: buf.clone(),
            shape: QueueShape::new(log2size).unwrap(),
            prod: 0,
        };
        (guest, PageRegisters(page), BufferSlots(buf))
    }

    fn write_slot(&self, ptr: u32, cmd: RawCommand) {
        let s = &self.buf.slots[self.shape.index(ptr) as usize];
        s[0].store(cmd.d0(), Ordering::Relaxed);
        s[1].store(cmd.d1(), Ordering::Relaxed);
    }

    /// Writes `cmds` from PROD on and publishes them with one PROD store (release).
    fn submit(&mut self, cmds: &[RawCommand]) {
        let cons = self.shape.ptr(self.page.cons.load(Ordering::Acquire));
        assert!(
            self.shape.free(self.prod, cons) as usize >= cmds.len(),
            "the test guest overfilled its queue"
        );
        for cmd in cmds {
            self.write_slot(self.prod, *cmd);
            self.prod = self.shape.advance(self.prod, 1);
        }
        self.page.prod.store(self.prod, Ordering::Release);
    }

    fn cons(&self) -> (u32, u8) {
        let cons = self.page.cons.load(Ordering::Acquire);
        (self.shape.ptr(cons), cons_err(cons))
    }

    fn syncs(&self) -> u64 {
        self.page.sync_count.load(Ordering::Acquire)
    }

    fn error_raised(&self) -> bool {
        self.page.err.load(Ordering::Acquire) & 1 != self.page.err_ack.load(Ordering::Relaxed) & 1
    }

    fn ack_error(&self) {
        let err = self.page.err.load(Ordering::Acquire);
        self.page.err_ack.store(err & 1, Ordering::Release);
    }
}

/// Whether two allocations share no byte.
fn apart(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0
}

/// An engine with vIOMMU 1 (VMID 5) binding vSID 0x10 -> pSID 0x800, auditing every slot.
fn engine() -> (TestEngine, common::Log) {
    let (hwcfg, log) = hw(&[5], &[0x800]);
    let engine = TestEngine::with_model(
        EngineConfig {
            audit: true,
            ..Default::default()
        },
        Model::with(hwcfg),
    );
    engine.add_device(DeviceId(1), 0, 0x800).unwrap();
    engine.create_viommu(ViommuConfig::new(1, 5, 0)).unwrap();
    engine.set_dev_id(1, DeviceId(1), 0x10).unwrap();
    (engine, log)
}

#[test]
fn a_queue_with_registers_and_slots_in_separate_memories_is_served_and_advances_cons_in_its_register_page(
) {
    let (engine, log) = engine();
    let (mut guest, regs, slots) = SplitGuest::new(2, 4);
    let page = (Arc::as_ptr(&guest.page) as usize, size_of::<Page>());
    let buf = (
        guest.buf.slots.as_ptr() as usize,
        16 * guest.buf.slots.len(),
    );
    assert!(apart(page, buf), "the registers and slots share memory");
    let host = HostRing::from_parts(regs, slots, 2, 1).unwrap();
    assert_eq!((host.shape().log2size(), host.viommu_id()), (2, 1));
    assert!(host.sealed() && host.memory().is_none());
    assert_eq!(host.path(), Path::new("test-register-page"));
    let ring = engine.attach_ring(host).unwrap();
    // Two batches of three in a queue of four: the second wraps, copied in two runs.
    let first = [
        c("TLBI_NH_ASID vmid=9 asid=1"),
        c("ATC_INV sid=0x10 addr=0x1000 size=0"),
        c("CMD_SYNC cs=1 msidata=0xcafe msiaddr=0xfee0_0000"),
    ];
    let second = [
        c("TLBI_NH_ASID asid=2"),
        c("PREFETCH_CONFIG sid=0x10"),
        c("CMD_SYNC cs=2"),
    ];
    guest.submit(&first);
    engine.until("the first CMD_SYNC completed in the register page", || {
        guest.syncs() == 1
    });
    assert_eq!(guest.page.completion.load(Ordering::Relaxed), 0xcafe);
    assert_eq!(guest.cons(), (3, 0), "CONS in the register page");
    guest.submit(&second);
    engine.until("the second CMD_SYNC completed in the register page", || {
        guest.syncs() == 2
    });
    assert_eq!(guest.cons(), (6, 0), "CONS wrapped: index 2, wrap bit set");
    let report = engine.shutdown();
    let all: Vec<RawCommand> = first.iter().chain(&second).copied().collect();
    let want = oracle::translate_all(
        &ViommuConfig::new(1, 5, 0),
        &bindings(&[(0x10, 0x800)]),
        &all,
        false,
    );
    assert_eq!(outcomes(&report.audit, ring), want);
    let seen = log.lock().unwrap().clone();
    for cmd in [
        c("TLBI_NH_ASID vmid=5 asid=1"),
        c("ATC_INV sid=0x800 addr=0x1000 size=0"),
        c("TLBI_NH_ASID vmid=5 asid=2"),
    ] {
        assert!(seen.contains(&cmd), "{cmd:?} was not forwarded: {seen:?}");
    }
}

#[test]
fn a_bad_command_in_separate_slots_stops_the_queue_with_cons_err_in_its_register_page() {
    let (engine, log) = engine();
    let (mut guest, regs, slots) = SplitGuest::new(3, 8);
    engine
        .attach_ring(HostRing::from_parts(regs, slots, 3, 1).unwrap())
        .unwrap();
    guest.submit(&[
        c("TLBI_NH_ASID asid=1"),
        c("ATC_INV sid=0x99"),
        c("TLBI_NH_ASID asid=2"),
        c("CMD_SYNC"),
    ]);
    engine.until("the error flag raised in the register page", || {
        guest.error_raised()
    });
    assert_eq!(
        guest.cons(),
        (1, CError::Ill.code()),
        "CONS at the unbound vSID's slot with CONS.ERR = ILL"
    );
    // As Linux does: overwrite the failing command with a CMD_SYNC, acknowledge.
    guest.write_slot(1, c("CMD_SYNC"));
    guest.ack_error();
    engine.until("both CMD_SYNCs completed after the acknowledgement", || {
        guest.syncs() == 2
    });
    assert_eq!(
        guest.cons(),
        (4, 0),
        "CONS.ERR cleared, every entry consumed"
    );
    let report = engine.shutdown();
    assert_eq!(report.stats.refused, 1);
    let seen = log.lock().unwrap().clone();
    let n = |cmd: &str| seen.iter().filter(|&&x| x == c(cmd)).count();
    assert_eq!(
        (
            n("TLBI_NH_ASID vmid=5 asid=1"),
            n("TLBI_NH_ASID vmid=5 asid=2")
        ),
        (1, 1),
        "nothing lost, nothing doubled"
    );
}

#[test]
fn slot_memory_smaller_than_the_queue_is_refused_at_attach_with_a_typed_error() {
    let (guest, regs, slots) = SplitGuest::new(3, 7);
    let err = HostRing::from_parts(regs, slots, 3, 1).unwrap_err();
    assert!(
        matches!(
            err,
            RingError::SlotsTooSmall {
                have: 7,
                log2size: 3,
                need: 8,
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("test-slot-buffer") && msg.contains("LOG2SIZE 3"),
        "{msg}"
    );
    assert_eq!(
        guest.page.cons.load(Ordering::Relaxed),
        0,
        "a refused queue's registers are not written"
    );
    // The library's slots over memory of their own: 8 slots from offset 16 leave 7.
    let mem: Arc<dyn RingMemory> = Arc::new(HeapMemory::new(16 * 8));
    let regs = HeaderRegisters::new(Arc::new(HeapMemory::new(layout::HEADER_SIZE))).unwrap();
    let slots = MemorySlots::new(mem.clone(), 16).unwrap();
    assert_eq!(slots.capacity(), 7);
    assert!(matches!(
        HostRing::from_parts(regs, slots, 3, 1),
        Err(RingError::SlotsTooSmall { have: 7, .. })
    ));
    assert!(matches!(
        MemorySlots::new(mem, 8),
        Err(RingError::SlotsMisaligned { offset: 8, .. })
    ));
    let (_, regs, slots) = SplitGuest::new(0, 1 << 10);
    assert!(matches!(
        HostRing::from_parts(regs, slots, 20, 1),
        Err(RingError::BadLog2Size { found: 20, .. })
    ));
}

#[test]
fn a_slot_read_that_fails_gives_up_that_queue_alone_with_its_typed_error() {
    let (engine, _log) = engine();
    let (mut bad, regs, slots) = SplitGuest::new(2, 4);
    let bad_id = engine
        .attach_ring(HostRing::from_parts(regs, slots, 2, 1).unwrap())
        .unwrap();
    let (mut good, regs, slots) = SplitGuest::new(2, 4);
    engine
        .attach_ring(HostRing::from_parts(regs, slots, 2, 1).unwrap())
        .unwrap();
    bad.buf.unplugged.store(true, Ordering::Relaxed);
    bad.submit(&[c("TLBI_NH_ASID asid=1"), c("CMD_SYNC")]);
    let mut failed = Vec::new();
    engine.until("the engine gave up the queue whose slots fail", || {
        failed.extend(engine.failed_rings());
        !failed.is_empty()
    });
    let (id, err) = &failed[0];
    assert_eq!(*id, bad_id);
    assert!(
        matches!(err, RingError::Io { op: "read", .. })
            && err.to_string().contains("test-slot-buffer"),
        "{err}"
    );
    assert_eq!(bad.cons(), (0, 0), "nothing of the failed queue consumed");
    good.submit(&[c("TLBI_NH_ASID asid=2"), c("CMD_SYNC")]);
    engine.until("the other queue is still served", || good.syncs() == 1);
    engine.shutdown();
}

/// The ring format through the new types: its header as `HeaderRegisters`, the rest of the same
/// memory as `MemorySlots`, driven by the ring format's own guest.
fn ring_format_round_trip(guest: GuestRing) {
    let (engine, log) = engine();
    let mut guest = guest;
    let mem = guest.memory();
    let regs = HeaderRegisters::new(mem.clone()).unwrap();
    let slots = MemorySlots::new(mem.clone(), layout::HEADER_SIZE).unwrap();
    assert_eq!(slots.capacity(), 16);
    let host = HostRing::from_parts(regs, slots, 4, 1).unwrap();
    // The header holds the ring's one-engine lock, whichever constructor took it.
    assert!(matches!(
        HostRing::attach_memory(mem, Default::default()),
        Err(RingError::AlreadyAttached { .. })
    ));
    engine.attach_ring(host).unwrap();
    let cmds = [
        c("ATC_INV sid=0x10 size=52"),
        c("CMD_SYNC cs=1 msidata=0xbeef"),
    ];
    for round in 1..=10u64 {
        assert_eq!(guest.submit(&cmds), 2);
        guest.wait_syncs(round, T).unwrap();
    }
    assert_eq!(guest.completion(), 0xbeef);
    assert_eq!(guest.cons(), (20 & 0x1f, CError::None), "CONS wrapped once");
    engine.shutdown();
    let seen = log.lock().unwrap().clone();
    let n = seen
        .iter()
        .filter(|&&x| x == c("ATC_INV sid=0x800 size=52"))
        .count();
    assert_eq!(n, 10);
}

#[test]
fn the_heap_ring_format_round_trips_through_header_registers_and_memory_slots() {
    ring_format_round_trip(GuestRing::heap(4, 1).unwrap());
}

#[test]
fn the_sealed_memfd_ring_format_round_trips_through_header_registers_and_memory_slots() {
    ring_format_round_trip(GuestRing::create_sealed(4, 1).unwrap());
}

#[test]
fn a_dead_queue_keeps_reporting_the_slot_memory_that_failed_not_its_registers() {
    let (mut guest, regs, slots) = SplitGuest::new(2, 4);
    let mut host = HostRing::from_parts(regs, slots, 2, 1).unwrap();
    guest.buf.unplugged.store(true, Ordering::Relaxed);
    guest.submit(&[c("TLBI_NH_ASID asid=1")]);
    let mut out = [RawCommand::new(0, 0); 4];
    for poll in 0..3 {
        let err = host.poll(&mut out).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, RingError::Io { op: "read", .. })
                && msg.contains("test-slot-buffer")
                && msg.contains("unplugged"),
            "poll {poll}: {msg}"
        );
        assert!(host.failed());
    }
    assert_eq!(host.read_ptr(), 0, "nothing taken from a dead queue");
}
