//! `vcmdq::mock::GuestDriver`, the one guest driver the CLI, the benchmarks, the soak and these
//! tests share: its fix policies on real CONS.ERR stops of a running engine, its bounded waits,
//! its counters, and its refusal of rings it cannot own.
#![cfg(not(loom))]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use common::{c, hw, Model, TestEngine};
use vcmdq::command::{opcode, RawCommand};
use vcmdq::engine::{EngineConfig, RingId};
use vcmdq::hwmodel::{Fault, HwConfig};
use vcmdq::mock::{Awaited, DriverError, FixPolicy, GuestDriver, Stop, FIX_SYNC};
use vcmdq::queue::{with_cons_err, CError};
use vcmdq::ring::layout::{OFF_CONS, OFF_ERR, OFF_SYNC_COUNT};
use vcmdq::ring::{heap_pair, GuestRing};
use vcmdq::viommu::{DeviceId, ViommuConfig};

/// A short timeout for waits that must time out: no engine serves the ring.
const SHORT: Duration = Duration::from_millis(50);

/// An engine with vIOMMU 1 (VMID 5) binding vSID 0x10 -> pSID 0x800, and a 2^4 ring on it.
fn engine_and_ring(hwcfg: HwConfig) -> (TestEngine, RingId, GuestRing) {
    let engine = TestEngine::with_model(
        EngineConfig {
            audit: true,
            ..Default::default()
        },
        Model::with(hwcfg),
    );
    engine.devices().add_device(DeviceId(1), 0, 0x800).unwrap();
    let v = engine.create_viommu(ViommuConfig::new(1, 5, 0)).unwrap();
    v.set_dev_id(DeviceId(1), 0x10).unwrap();
    let (guest, host) = heap_pair(4, 1).unwrap();
    let ring = engine.attach_ring(host).unwrap();
    (engine, ring, guest)
}

#[test]
fn like_linux_overwrites_a_refused_command_with_a_cmd_sync_and_the_batch_completes() {
    let (hwcfg, log) = hw(&[5], &[0x800]);
    let (engine, _, guest) = engine_and_ring(hwcfg);
    let mut d = GuestDriver::new(guest, FixPolicy::LikeLinux).unwrap();
    let refused = c("ATC_INV sid=0x99 size=52");
    let batch = [
        c("ATC_INV sid=0x10 size=52"),
        refused,
        c("CMD_SYNC cs=1 msidata=7"),
    ];
    d.submit(&batch).unwrap();
    assert_eq!(
        d.stops(),
        [Stop {
            seq: 1,
            slot: 1,
            cerror: CError::Ill,
            found: refused,
            fixed: Some(FIX_SYNC),
        }]
    );
    assert_eq!(d.ring().read_slot(1), FIX_SYNC, "the slot holds the fix");
    let n = d.counters();
    assert_eq!((n.batches, n.submitted, n.fixes), (1, 3, 1));
    assert_eq!(n.syncs, 2, "the fix is a CMD_SYNC the driver waited for");
    assert_eq!(n.completed, 2);
    assert_eq!((n.errors_of(CError::Ill), n.total_errors()), (1, 1));
    assert_eq!(d.ring().completion(), 7);
    // A second batch starts clean and completes without a stop.
    d.submit(&[c("ATC_INV sid=0x10 size=52"), c("CMD_SYNC")])
        .unwrap();
    assert!(d.stops().is_empty());
    assert_eq!(d.counters().completed, 3);
    engine.shutdown();
    let atc = log
        .lock()
        .unwrap()
        .iter()
        .filter(|x| x.opcode() == opcode::ATC_INV)
        .count();
    assert_eq!(atc, 2, "the refused command never reached the hardware");
}

#[test]
fn retry_acknowledges_a_physical_fault_unchanged_and_the_engine_resends_it() {
    let (hwcfg, log) = hw(&[5], &[0x800]);
    let (engine, _, guest) = engine_and_ring(hwcfg.with_fault(Fault::Abt { at: 0 }));
    let mut d = GuestDriver::new(guest, FixPolicy::Retry).unwrap();
    let atc = c("ATC_INV sid=0x10 size=52");
    d.submit(&[atc, c("CMD_SYNC")]).unwrap();
    assert_eq!(d.stops().len(), 1, "{:?}", d.stops());
    let s = d.stops()[0];
    assert_eq!(
        (s.seq, s.cerror, s.found, s.fixed),
        (0, CError::Abt, atc, None)
    );
    assert_eq!(d.ring().read_slot(0), atc, "retried as it was");
    let n = d.counters();
    assert_eq!((n.errors_of(CError::Abt), n.fixes, n.completed), (1, 0, 1));
    engine.shutdown();
    let psid_atc = log
        .lock()
        .unwrap()
        .iter()
        .filter(|x| x.opcode() == opcode::ATC_INV)
        .count();
    assert!(psid_atc >= 1, "the retried ATC_INV reached the hardware");
}

#[test]
fn a_custom_policy_writes_its_own_command_over_the_refused_one() {
    let (hwcfg, log) = hw(&[5], &[0x800]);
    let (engine, _, guest) = engine_and_ring(hwcfg);
    let good = c("ATC_INV sid=0x10 addr=0x5000 size=0");
    let policy = FixPolicy::Custom(Arc::new(move |cerror, cmd: RawCommand| {
        (cerror == CError::Ill && cmd.opcode() == opcode::ATC_INV).then_some(good)
    }));
    let mut d = GuestDriver::new(guest, policy).unwrap();
    d.submit(&[c("ATC_INV sid=0x99 size=52"), c("CMD_SYNC")])
        .unwrap();
    assert_eq!(d.stops()[0].fixed, Some(good));
    let n = d.counters();
    assert_eq!(
        (n.fixes, n.syncs, n.completed),
        (1, 1, 1),
        "no CMD_SYNC added"
    );
    engine.shutdown();
    let got: Vec<RawCommand> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|x| x.opcode() == opcode::ATC_INV)
        .copied()
        .collect();
    assert_eq!(
        got.len(),
        1,
        "the replacement reached the hardware: {got:?}"
    );
    assert_eq!(got[0].d1(), good.d1());
}

/// Plays the engine's part of a stop: CONS at `slot` with `cerror`, the error bit toggled.
fn fake_stop(ring: &GuestRing, slot: u32, cerror: CError) {
    ring.write_header_u32(OFF_CONS, with_cons_err(slot, cerror.code()));
    ring.write_header_u32(OFF_ERR, 1);
}

#[test]
fn every_error_kind_is_counted_ill_access_included() {
    let (guest, _host) = heap_pair(4, 1).unwrap();
    let mut d = GuestDriver::new(guest, FixPolicy::LikeLinux)
        .unwrap()
        .with_timeout(SHORT);
    d.post(&[c("TLBI_NH_ALL"), c("CMD_SYNC")]).unwrap();
    fake_stop(d.ring(), 0, CError::IllAccess);
    assert!(d.handle_stop().unwrap());
    assert_eq!(
        d.stops()[0].fixed,
        None,
        "Linux retries ILL_ACCESS unchanged"
    );
    assert_eq!(d.counters().errors_of(CError::IllAccess), 1);
    assert!(d.ring().error().is_none(), "acknowledged");
    assert!(!d.handle_stop().unwrap(), "nothing more to handle");
}

#[test]
fn a_stop_at_a_slot_with_nothing_in_flight_is_an_error_naming_the_slot() {
    let (guest, _host) = heap_pair(4, 1).unwrap();
    let mut d = GuestDriver::new(guest, FixPolicy::LikeLinux).unwrap();
    d.post(&[c("CMD_SYNC")]).unwrap();
    fake_stop(d.ring(), 5, CError::Ill);
    let e = d.handle_stop().unwrap_err();
    assert!(
        matches!(e, DriverError::StopNotInFlight { slot: 5, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("slot 0x5"), "{e}");
}

#[test]
fn a_cmd_sync_nobody_serves_times_out_naming_the_sync() {
    let (guest, _host) = heap_pair(4, 1).unwrap();
    let mut d = GuestDriver::new(guest, FixPolicy::LikeLinux)
        .unwrap()
        .with_timeout(SHORT);
    let e = d.submit(&[c("TLBI_NH_ALL"), c("CMD_SYNC")]).unwrap_err();
    match e {
        DriverError::Timeout {
            what: Awaited::Syncs { want: 1, seen: 0 },
            cons: 0,
            prod: 2,
            ..
        } => {}
        ref other => panic!("{other}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("waiting for CMD_SYNC 1 to complete (the ring's sync count reached 0 of 1)"),
        "{msg}"
    );
}

#[test]
fn a_full_ring_nobody_serves_times_out_waiting_for_room() {
    let (guest, _host) = heap_pair(2, 1).unwrap();
    let mut d = GuestDriver::new(guest, FixPolicy::LikeLinux)
        .unwrap()
        .with_timeout(SHORT);
    d.post(&[c("TLBI_NH_ALL"), c("TLBI_NH_ALL"), c("CMD_SYNC")])
        .unwrap();
    let e = d.post(&[c("TLBI_NH_ALL"), c("CMD_SYNC")]).unwrap_err();
    assert!(
        matches!(
            e,
            DriverError::Timeout {
                what: Awaited::Room { need: 2, free: 1 },
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("room for a batch of 2 entries (1 slots free)"),
        "{e}"
    );
    let e = d.post(&[c("CMD_SYNC"); 5]).unwrap_err();
    assert!(
        matches!(e, DriverError::BatchTooLarge { len: 5, entries: 4 }),
        "{e}"
    );
}

#[test]
fn a_ring_another_guest_is_using_or_left_stopped_is_refused() {
    let (mut guest, _host) = heap_pair(4, 1).unwrap();
    guest.submit(&[c("CMD_SYNC")]);
    let e = GuestDriver::new(guest, FixPolicy::Retry).unwrap_err();
    assert!(matches!(e, DriverError::Busy { cons: 0, prod: 1 }), "{e}");

    let (guest, _host) = heap_pair(4, 1).unwrap();
    fake_stop(&guest, 0, CError::Ill);
    let e = GuestDriver::new(guest, FixPolicy::Retry).unwrap_err();
    assert!(
        matches!(
            e,
            DriverError::StoppedBefore {
                slot: 0,
                cerror: CError::Ill
            }
        ),
        "{e}"
    );
}

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

/// Counts the allocations of a thread while it asks to.
struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; the thread-locals are const
// initialised, so reading them never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCS.with(|a| a.set(a.get() + 1));
        }
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn posting_a_batch_allocates_nothing() {
    let (guest, mut host) = heap_pair(10, 1).unwrap();
    let mut d = GuestDriver::new(guest, FixPolicy::LikeLinux).unwrap();
    let mut batch = vec![c("TLBI_NH_ASID asid=3"); 64];
    batch.push(c("CMD_SYNC"));
    let mut buf = vec![RawCommand::default(); 1 << 10];
    COUNTING.with(|c| c.set(true));
    for _ in 0..100 {
        d.post(&batch).unwrap();
        // Consume as an engine would, so that the next batch finds room.
        let p = host.poll(&mut buf).unwrap();
        host.complete(host.read_ptr());
        assert_eq!(p.n, batch.len());
    }
    COUNTING.with(|c| c.set(false));
    assert_eq!(ALLOCS.with(Cell::get), 0, "allocations while posting");
    assert_eq!(d.counters().submitted, 6500);
}

/// The guest plays the engine through a second handle on the ring: a fix into a CMD_SYNC is
/// one more completion to wait for, so a driver whose wait counted only the CMD_SYNCs it wrote
/// would return with the batch's own CMD_SYNC still pending.
#[test]
fn a_command_fixed_into_a_cmd_sync_is_one_more_completion_to_wait_for() {
    let (guest, _host) = heap_pair(4, 1).unwrap();
    let engine_side = GuestRing::from_memory(guest.memory()).unwrap();
    // The fix completes at once (CONS past it, the sync count at 1); the batch's CMD_SYNC
    // never does.
    let policy = FixPolicy::Custom(Arc::new(move |cerror, _| {
        engine_side.write_header_u32(OFF_CONS, 1);
        engine_side.write_header_u64(OFF_SYNC_COUNT, 1);
        (cerror == CError::Ill).then_some(FIX_SYNC)
    }));
    let mut d = GuestDriver::new(guest, policy).unwrap().with_timeout(SHORT);
    d.post(&[c("ATC_INV sid=0x99 size=52"), c("CMD_SYNC")])
        .unwrap();
    fake_stop(d.ring(), 0, CError::Ill);
    let e = d.complete().unwrap_err();
    assert!(
        matches!(
            e,
            DriverError::Timeout {
                what: Awaited::Syncs { want: 2, seen: 1 },
                cons: 1,
                prod: 2,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(d.counters().syncs, 2);
}
