//! The physical VCMDQ model: publication, back-pressure, every injected fault and its
//! recovery, the hardware check, counters, and a producer and consumer on two threads.
// Under `--cfg loom` the queue's atomics are loom's and only work inside a loom model.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vcmdq::command::{opcode, RawCommand};
use vcmdq::engine::phys::{CmdSlot, Full, PhysicalQueue, Slots};
use vcmdq::engine::MAX_WORKERS;
use vcmdq::hwmodel::{
    Fault, HwConfig, HwPlacement, ModelError, ModelQueue, OnCheckFailure, PhysQueue,
};
use vcmdq::queue::CError;

/// A legal TLBI_NH_ASID whose ASID and VMID number it.
fn tlbi(i: u64) -> RawCommand {
    RawCommand::new(
        u64::from(opcode::TLBI_NH_ASID) | ((i & 0xffff) << 48) | (((i >> 16) & 0xffff) << 32),
        0,
    )
}

fn sync() -> RawCommand {
    RawCommand::new(u64::from(opcode::CMD_SYNC), 0)
}

/// A check that logs every command it sees.
fn logging() -> (HwConfig, Arc<Mutex<Vec<RawCommand>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let cfg = HwConfig::default().with_check(move |c| {
        l.lock().unwrap().push(*c);
        Ok(())
    });
    (cfg, log)
}

#[test]
fn publish_and_consume() {
    let (cfg, log) = logging();
    let (mut p, mut hw) = PhysQueue::new(4, cfg).unwrap();
    let cmds: Vec<_> = (0..10).map(tlbi).chain([sync()]).collect();
    assert_eq!(p.room(), 16);
    assert_eq!(p.publish(&cmds), Ok(11));
    assert_eq!(p.room(), 5);
    assert_eq!(p.consumed(), 0);
    assert_eq!(hw.step(4), 4);
    assert_eq!(p.consumed(), 4);
    assert_eq!(hw.step(100), 7);
    assert_eq!(hw.step(100), 0);
    assert_eq!(p.consumed(), 11);
    assert_eq!(p.room(), 16);
    assert_eq!(*log.lock().unwrap(), cmds);
    let c = hw.counters();
    assert_eq!(c.per_opcode[opcode::TLBI_NH_ASID as usize], 10);
    assert_eq!(c.per_opcode[opcode::CMD_SYNC as usize], 1);
    assert_eq!((c.consumed, c.syncs, c.total_errors()), (11, 1, 0));
    assert_eq!(hw.position(), 11);
}

#[test]
fn wraps_over_many_laps() {
    for log2 in [0u8, 1, 4] {
        let (cfg, log) = logging();
        let (mut p, mut hw) = PhysQueue::new(log2, cfg).unwrap();
        let mut sent = 0u64;
        let total = if cfg!(miri) { 50 } else { 5000 };
        while sent < total {
            let n = (p.room() as u64).min(total - sent).min(3);
            let batch: Vec<_> = (sent..sent + n).map(tlbi).collect();
            assert_eq!(p.publish(&batch), Ok(sent + n));
            sent += n;
            hw.step(2);
            assert!(p.consumed() <= p.published());
        }
        while hw.step(64) > 0 {}
        assert_eq!(p.consumed(), total);
        let log = log.lock().unwrap();
        assert!(log.iter().copied().eq((0..total).map(tlbi)));
    }
}

#[test]
fn a_full_queue_pushes_back() {
    let (mut p, mut hw) = PhysQueue::new(2, HwConfig::default()).unwrap();
    assert_eq!(p.publish(&[tlbi(0), tlbi(1), tlbi(2), tlbi(3)]), Ok(4));
    assert_eq!(p.publish(&[tlbi(4)]), Err(Full { room: 0, wanted: 1 }));
    assert_eq!(hw.step(2), 2);
    assert_eq!(p.room(), 2);
    // All or nothing.
    assert_eq!(
        p.publish(&[tlbi(4), tlbi(5), tlbi(6)]),
        Err(Full { room: 2, wanted: 3 })
    );
    assert_eq!(p.published(), 4);
    assert_eq!(p.publish(&[tlbi(4), tlbi(5)]), Ok(6));
    assert_eq!(hw.step(10), 4);
    assert_eq!(p.consumed(), 6);
}

#[test]
fn ill_stops_at_the_command_and_recovery_skips_it() {
    let (cfg, log) = logging();
    let (mut p, mut hw) = PhysQueue::new(3, cfg.with_fault(Fault::Ill { at: 5 })).unwrap();
    let cmds: Vec<_> = (0..7).map(tlbi).chain([sync()]).collect();
    p.publish(&cmds).unwrap();
    assert_eq!(hw.step(100), 5);
    assert!(hw.halted());
    assert_eq!(hw.step(100), 0);
    let err = p.error().expect("an error");
    assert_eq!((err.pos, err.cerror, err.cmd), (5, CError::Ill, tlbi(5)));
    assert_eq!(p.consumed(), 5);
    // Still halted until acknowledged, even with more published.
    p.publish(&[tlbi(8)]).unwrap();
    assert_eq!(hw.step(100), 0);
    assert_eq!(p.recover(), Some(err));
    assert_eq!(p.error(), None);
    assert_eq!(hw.step(100), 4);
    assert_eq!(p.consumed(), 9);
    let mut want: Vec<_> = (0..5).map(tlbi).collect();
    want.extend([sync(), tlbi(6), sync(), tlbi(8)]);
    assert_eq!(*log.lock().unwrap(), want);
    let c = hw.counters();
    assert_eq!(c.errors[CError::Ill.code() as usize], 1);
    assert_eq!(c.syncs, 2);
    assert_eq!(c.consumed, 9);
    assert_eq!(p.recover(), None);
}

#[test]
fn abt_is_retried_with_the_command_unchanged() {
    let (cfg, log) = logging();
    let (mut p, mut hw) = PhysQueue::new(3, cfg.with_fault(Fault::Abt { at: 2 })).unwrap();
    p.publish(&(0..4).map(tlbi).collect::<Vec<_>>()).unwrap();
    assert_eq!(hw.step(100), 2);
    let err = p.recover().unwrap();
    assert_eq!((err.pos, err.cerror, err.cmd), (2, CError::Abt, tlbi(2)));
    assert_eq!(hw.step(100), 2);
    assert!(log.lock().unwrap().iter().copied().eq((0..4).map(tlbi)));
}

#[test]
fn atc_inv_sync_fails_the_next_sync_once_and_the_sync_is_retried() {
    let (cfg, log) = logging();
    let (mut p, mut hw) = PhysQueue::new(3, cfg.with_fault(Fault::AtcInvSync { at: 1 })).unwrap();
    let atc_inv = RawCommand::new(u64::from(opcode::ATC_INV) | (9 << 32), 52);
    let cmds = [tlbi(0), atc_inv, tlbi(2), sync(), tlbi(4), sync()];
    p.publish(&cmds).unwrap();
    assert_eq!(hw.step(100), 3);
    let err = p.error().unwrap();
    assert_eq!(
        (err.pos, err.cerror, err.cmd),
        (3, CError::AtcInvSync, sync())
    );
    p.recover().unwrap();
    assert_eq!(hw.step(100), 3);
    assert_eq!(*log.lock().unwrap(), cmds);
    assert_eq!(hw.counters().errors[CError::AtcInvSync.code() as usize], 1);
    assert_eq!(hw.counters().syncs, 2);
}

#[test]
fn the_zero_cost_consumer_takes_everything_unread() {
    let (mut p, mut hw) = PhysQueue::new(3, HwConfig::zero_cost()).unwrap();
    // Even a command the full model refuses: this consumer does not read what it takes.
    let illegal = RawCommand::new(0x07, 0);
    for lap in 0..5u64 {
        p.publish(&[tlbi(lap), illegal, sync()]).unwrap();
        assert_eq!(hw.step(2), 2);
        assert_eq!(hw.step(100), 1);
        assert_eq!(hw.step(100), 0);
        assert_eq!(p.consumed(), 3 * (lap + 1));
        assert!(p.error().is_none());
    }
    let c = hw.counters();
    assert_eq!((c.consumed, c.syncs, c.total_errors()), (15, 0, 0));
    assert_eq!(c.per_opcode.iter().sum::<u64>(), 0);
    // A configured check, cost or fault turns the full model back on.
    for cfg in [
        HwConfig::zero_cost().with_check(|_| Ok(())),
        HwConfig::zero_cost().with_cost(opcode::CMD_SYNC, 1),
        HwConfig::zero_cost().with_fault(Fault::Ill { at: 100 }),
    ] {
        let (mut p, mut hw) = PhysQueue::new(3, cfg).unwrap();
        p.publish(&[tlbi(0), illegal]).unwrap();
        assert_eq!(hw.step(10), 1);
        assert_eq!(p.error().map(|e| e.cerror), Some(CError::Ill));
    }
}

#[test]
fn an_illegal_or_malformed_command_is_cerror_ill() {
    let (mut p, mut hw) = PhysQueue::new(2, HwConfig::default()).unwrap();
    let illegal = RawCommand::new(0x07, 0);
    let res0 = RawCommand::new(u64::from(opcode::TLBI_NH_ASID) | (1 << 8), 0);
    p.publish(&[tlbi(0), illegal, res0]).unwrap();
    assert_eq!(hw.step(10), 1);
    assert_eq!(p.recover().unwrap().cmd, illegal);
    assert_eq!(hw.step(10), 1);
    let err = p.recover().unwrap();
    assert_eq!((err.pos, err.cmd), (2, res0));
    assert_eq!(hw.step(10), 1);
    assert_eq!(hw.counters().errors[CError::Ill.code() as usize], 2);
    assert_eq!(hw.counters().syncs, 2);
}

#[test]
fn a_stall_stops_before_the_command_then_goes_on() {
    let cfg = HwConfig::default().with_fault(Fault::Stall {
        at: 3,
        for_: Duration::from_millis(5),
    });
    let (mut p, mut hw) = PhysQueue::new(3, cfg).unwrap();
    p.publish(&(0..6).map(tlbi).collect::<Vec<_>>()).unwrap();
    assert_eq!(hw.step(100), 3);
    let mut more = 0;
    while more < 3 {
        more += hw.step(100);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(p.consumed(), 6);
    assert_eq!(hw.counters().stalls, 1);
}

#[test]
fn a_hold_waits_for_the_test_to_release_it() {
    let (mut p, mut hw) =
        PhysQueue::new(3, HwConfig::default().with_fault(Fault::Hold { at: 2 })).unwrap();
    let switch = hw.stall_switch();
    p.publish(&(0..4).map(tlbi).collect::<Vec<_>>()).unwrap();
    assert_eq!(hw.step(100), 2);
    assert!(switch.is_held());
    for _ in 0..10 {
        assert_eq!(hw.step(100), 0);
    }
    switch.release();
    assert_eq!(hw.step(100), 2);
    // The switch also stalls at any time.
    switch.hold();
    p.publish(&[tlbi(4)]).unwrap();
    assert_eq!(hw.step(100), 0);
    switch.release();
    assert_eq!(hw.step(100), 1);
}

#[test]
fn costs_and_a_slow_consumer_take_at_least_their_time() {
    let mut cfg = HwConfig::default().with_cost(opcode::CMD_SYNC, 200_000);
    cfg.slow = Some(Duration::from_micros(100));
    let (mut p, mut hw) = PhysQueue::new(3, cfg).unwrap();
    p.publish(&[tlbi(0), sync(), tlbi(1)]).unwrap();
    let start = std::time::Instant::now();
    assert_eq!(hw.step(10), 3);
    // A lower bound only: a busy wait never ends early.
    assert!(start.elapsed() >= Duration::from_micros(500));
}

#[test]
#[should_panic(expected = "failed the hardware check (an engine bug)")]
fn a_failed_check_panics_by_default() {
    let cfg = HwConfig::default().with_check(|c| {
        if c.opcode() == opcode::TLBI_NH_ASID && (c.d0() >> 32) & 0xffff != 0 {
            Err(format!(
                "VMID {} was never handed out",
                (c.d0() >> 32) & 0xffff
            ))
        } else {
            Ok(())
        }
    });
    let (mut p, mut hw) = PhysQueue::new(3, cfg).unwrap();
    p.publish(&[tlbi(1), tlbi(1 << 16)]).unwrap();
    hw.step(10);
}

#[test]
fn a_failed_check_can_be_recorded() {
    let mut cfg = HwConfig::default().with_check(|c| {
        if (c.d0() >> 32) & 0xffff == 3 {
            Err("VMID 3 was never handed out".into())
        } else {
            Ok(())
        }
    });
    cfg.on_check_failure = OnCheckFailure::Record;
    let (mut p, mut hw) = PhysQueue::new(3, cfg).unwrap();
    p.publish(&[tlbi(1), tlbi(3 << 16), tlbi(2)]).unwrap();
    assert_eq!(hw.step(10), 3);
    let f = hw.failures();
    assert_eq!(f.len(), 1);
    assert_eq!((f[0].pos, f[0].cmd), (1, tlbi(3 << 16)));
    assert!(f[0].message.contains("VMID 3"));
    assert_eq!(hw.counters().check_failures, 1);
}

/// The engine's loop against a consumer thread, with faults of every kind: every command is
/// consumed exactly once, in order, except the ILL ones which become CMD_SYNCs.
#[test]
fn two_threads_with_faults() {
    let total: u64 = if cfg!(miri) { 200 } else { 100_000 };
    let ill2 = total / 2 + 1;
    let faults = [
        Fault::Ill { at: 17 },
        Fault::Abt { at: 100 },
        Fault::AtcInvSync { at: 150 },
        Fault::Ill { at: ill2 },
        Fault::Stall {
            at: total / 3,
            for_: Duration::from_millis(1),
        },
    ];
    let (mut cfg, log) = logging();
    cfg.faults = faults.to_vec();
    let (mut p, mut hw) = PhysQueue::new(5, cfg).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            hw.run(&stop);
            hw
        })
    };
    let cmd_at = |i: u64| if i % 16 == 15 { sync() } else { tlbi(i) };
    let mut sent = 0;
    let mut errors = Vec::new();
    while sent < total || p.consumed() < total {
        if let Some(e) = p.recover() {
            errors.push(e);
        }
        let n = (p.room() as u64).min(total - sent).min(24);
        if n > 0 {
            let batch: Vec<_> = (sent..sent + n).map(cmd_at).collect();
            p.publish(&batch).unwrap();
            sent += n;
        }
        assert!(p.consumed() <= p.published());
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Release);
    let hw = consumer.join().unwrap();
    let positions: Vec<_> = errors.iter().map(|e| (e.pos, e.cerror)).collect();
    let sync_after_150 = (150..).find(|i| i % 16 == 15).unwrap();
    let mut want = vec![
        (17, CError::Ill),
        (100, CError::Abt),
        (sync_after_150, CError::AtcInvSync),
        (ill2, CError::Ill),
    ];
    want.sort();
    assert_eq!(positions, want);
    for e in &errors {
        assert_eq!(e.cmd, cmd_at(e.pos));
    }
    let log = log.lock().unwrap();
    assert_eq!(log.len() as u64, total);
    for (i, c) in log.iter().enumerate() {
        let i = i as u64;
        let want = if i == 17 || i == ill2 {
            sync()
        } else {
            cmd_at(i)
        };
        assert_eq!(*c, want, "position {i}");
    }
    assert_eq!(hw.counters().total_errors(), 4);
    assert_eq!(hw.counters().stalls, 1);
}

#[test]
fn bad_log2size() {
    assert!(PhysQueue::new(20, HwConfig::default()).is_err());
}

#[test]
fn retract_only_while_stopped_and_only_unconsumed() {
    let (cfg, log) = logging();
    let (mut p, mut hw) = PhysQueue::new(4, cfg.with_fault(Fault::Ill { at: 2 })).unwrap();
    let cmds: Vec<_> = (0..6).map(tlbi).collect();
    p.publish(&cmds).unwrap();
    assert!(!p.retract(4), "not stopped: nothing to retract");
    hw.step(100);
    let err = p.error().unwrap();
    assert_eq!(err.pos, 2);
    assert!(!p.retract(1), "already consumed");
    assert!(!p.retract(6), "never published");
    assert!(p.retract(4));
    p.recover();
    hw.step(100);
    assert_eq!(p.consumed(), 6);
    // 0 and 1 consumed, 2 failed then ran as CMD_SYNC, 3 and 5 as published, 4 retracted.
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen[..2], cmds[..2]);
    assert_eq!(&seen[seen.len() - 4..], &[sync(), cmds[3], sync(), cmds[5]]);
}

/// Faults fire in position order whatever order they were given in, several on one position
/// one after the other, and a CERROR_ATC_INV_SYNC waiting for its CMD_SYNC takes the first one
/// there is, even the one a CERROR_ILL repair wrote.
#[test]
fn faults_fire_in_position_order_and_several_on_one_slot() {
    let cfg = HwConfig::default()
        .with_fault(Fault::Ill { at: 4 })
        .with_fault(Fault::Ill { at: 2 })
        .with_fault(Fault::Abt { at: 2 })
        .with_fault(Fault::AtcInvSync { at: 1 })
        .with_fault(Fault::Ill { at: 100 });
    let (mut p, mut hw) = PhysQueue::new(3, cfg).unwrap();
    p.publish(&[tlbi(0), tlbi(1), tlbi(2), tlbi(3), tlbi(4), tlbi(5), sync()])
        .unwrap();
    let mut errors = Vec::new();
    for _ in 0..20 {
        hw.step(100);
        if let Some(e) = p.recover() {
            errors.push((e.pos, e.cerror));
        }
    }
    assert_eq!(
        errors,
        [
            (2, CError::Ill),
            (2, CError::AtcInvSync),
            (2, CError::Abt),
            (4, CError::Ill)
        ]
    );
    assert_eq!(p.consumed(), 7);
    assert_eq!(hw.counters().total_errors(), 4);
}

/// Waits (bounded) until `done` holds; fails with `what` otherwise.
fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within 10 s"
        );
        std::thread::yield_now();
    }
}

#[test]
fn reserved_slots_reach_the_hardware_only_at_commit_with_one_prod_store() {
    let (mut p, mut hw) = PhysQueue::new(2, HwConfig::default()).unwrap();
    p.publish(&[tlbi(0), tlbi(1)]).unwrap();
    assert_eq!(hw.step(usize::MAX), 2);
    // Slots 2, 3, then 0: the reservation wraps.
    let slots = p.reserve(3).unwrap();
    assert_eq!(slots.runs().map(<[_]>::len), [2, 1]);
    slots.fill(&[tlbi(2), tlbi(3), tlbi(4)]);
    assert_eq!(hw.step(usize::MAX), 0, "written but not committed");
    assert_eq!(
        p.reserve(3).unwrap().len(),
        3,
        "a reservation moves nothing"
    );
    assert_eq!(p.commit(2), Ok(4));
    assert_eq!(hw.step(usize::MAX), 2);
    assert_eq!(p.commit(1), Ok(5));
    assert_eq!(hw.step(usize::MAX), 1);
    assert_eq!(p.reserve(5).err(), Some(Full { room: 4, wanted: 5 }));
    assert_eq!(p.commit(5), Err(Full { room: 4, wanted: 5 }));
    assert_eq!(p.published(), 5, "a refused commit publishes nothing");
    assert_eq!(hw.counters().consumed, 5);
}

#[test]
fn model_queues_are_bounded_like_the_engines_workers() {
    for n in [0, MAX_WORKERS + 1] {
        match ModelQueue::for_workers(n, 4, &HwConfig::default(), HwPlacement::Inline) {
            Err(ModelError::Workers(limit)) => {
                assert_eq!((limit.value, limit.max_name), (n, "MAX_WORKERS"))
            }
            other => panic!("{n} queues: {other:?}"),
        }
    }
    assert!(matches!(
        ModelQueue::for_workers(1, 20, &HwConfig::default(), HwPlacement::Inline),
        Err(ModelError::Queue(_))
    ));
}

#[test]
fn a_model_queue_steps_its_hardware_inline_only_in_progress() {
    let (mut qs, counters) =
        ModelQueue::for_workers(1, 3, &HwConfig::default(), HwPlacement::Inline).unwrap();
    let mut q = qs.pop().unwrap();
    q.publish(&[tlbi(0), sync()]).unwrap();
    assert_eq!(q.consumed(), 0);
    assert!(q.progress());
    assert_eq!(q.consumed(), 2);
    assert!(
        counters.collect().is_empty(),
        "counters arrive when the queue is dropped"
    );
    drop(q);
    let hw = counters.collect();
    assert_eq!((hw[0].consumed, hw[0].syncs), (2, 1));
}

#[test]
fn a_model_queue_on_a_thread_leaves_its_counters_when_dropped() {
    let (mut qs, counters) =
        ModelQueue::for_workers(2, 3, &HwConfig::default(), HwPlacement::Thread).unwrap();
    for (i, q) in qs.iter_mut().enumerate() {
        let cmds: Vec<_> = (0..=i as u64).map(tlbi).collect();
        q.publish(&cmds).unwrap();
        assert!(!q.progress(), "the thread consumes, not the owner");
    }
    until("both hardware threads consume", || {
        qs.iter()
            .enumerate()
            .all(|(i, q)| q.consumed() == i as u64 + 1)
    });
    drop(qs);
    let consumed: Vec<u64> = counters.collect().iter().map(|h| h.consumed).collect();
    assert_eq!(consumed, [1, 2], "in queue order");
    assert_eq!(counters.dead_threads(), 0);
}

#[test]
fn a_hardware_thread_that_panics_is_counted_dead_and_its_panic_reaches_the_owner() {
    let cfg = HwConfig::default().with_check(|_| Err("refused by the test".into()));
    let (mut qs, counters) = ModelQueue::for_workers(1, 3, &cfg, HwPlacement::Thread).unwrap();
    qs[0].publish(&[tlbi(0)]).unwrap();
    until("the hardware thread dies", || counters.dead_threads() == 1);
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(qs)));
    assert!(
        dropped.is_err(),
        "dropping the queue re-raises its thread's panic"
    );
    assert!(counters.collect().is_empty());
}

#[test]
fn reserved_slots_are_lent_as_plain_memory_and_published_by_commit() {
    let (cfg, log) = logging();
    let (mut p, mut hw) = PhysQueue::new(2, cfg).unwrap();
    p.publish(&[tlbi(0), tlbi(1)]).unwrap();
    assert_eq!(hw.step(usize::MAX), 2);
    // Slots 2, 3, then 0: the runs wrap as the reservation does.
    let Ok([head, tail]) = p.reserve(3).unwrap().into_runs_mut() else {
        panic!("the model's reservation is lent as plain memory");
    };
    assert_eq!((head.len(), tail.len()), (2, 1));
    head.copy_from_slice(&[tlbi(2), tlbi(3)]);
    tail[0] = tlbi(4);
    assert_eq!(hw.step(usize::MAX), 0, "written but not committed");
    assert_eq!(p.commit(3), Ok(5));
    assert_eq!(hw.step(usize::MAX), 3);
    assert_eq!(*log.lock().unwrap(), (0..5).map(tlbi).collect::<Vec<_>>());
}

#[test]
fn slots_of_a_ring_are_not_lent_as_plain_memory() {
    let ring: Vec<CmdSlot> = (0..4).map(|_| CmdSlot::new()).collect();
    let slots = Slots::of_ring(&ring, 3, 2);
    let Err(slots) = slots.into_runs_mut() else {
        panic!("Slots::of_ring vouches for nothing: no plain view");
    };
    slots.fill(&[tlbi(7), tlbi(8)]);
    assert_eq!((ring[3].read(), ring[0].read()), (tlbi(7), tlbi(8)));
}

/// What the worker's one pass does, on two threads: plain stores into lent slots, published by
/// the Release store of PROD, read by the hardware's loads after its Acquire, and the slots
/// written again only after CONS passed them. Under miri (`make miri`) its data-race detector
/// checks that every plain store is ordered against the consumer's loads of the same slot.
#[test]
fn runs_mut_stores_reach_a_consumer_on_another_thread() {
    const N: u64 = 24;
    let (cfg, log) = logging();
    let (mut p, mut hw) = PhysQueue::new(2, cfg).unwrap();
    let consumer = std::thread::spawn(move || {
        while hw.counters().consumed < N {
            if hw.step(usize::MAX) == 0 {
                std::thread::yield_now();
            }
        }
    });
    let mut next = 0;
    while next < N {
        let n = (p.room() as u64).min(3).min(N - next) as usize;
        if n == 0 {
            std::thread::yield_now();
            continue;
        }
        let Ok([head, tail]) = p.reserve(n).unwrap().into_runs_mut() else {
            panic!("the model's reservation is lent as plain memory");
        };
        for (i, slot) in head.iter_mut().chain(tail.iter_mut()).enumerate() {
            *slot = tlbi(next + i as u64);
        }
        p.commit(n).unwrap();
        next += n as u64;
    }
    consumer.join().unwrap();
    assert_eq!(*log.lock().unwrap(), (0..N).map(tlbi).collect::<Vec<_>>());
}

#[test]
fn the_publish_hook_sees_the_batch_commit_publishes() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let cfg = HwConfig {
        before_publish: Some(Arc::new(move |cmds: &[RawCommand]| {
            s.lock().unwrap().push(cmds.to_vec())
        })),
        ..HwConfig::default()
    };
    let (mut p, _hw) = PhysQueue::new(3, cfg).unwrap();
    let Ok([head, _]) = p.reserve(2).unwrap().into_runs_mut() else {
        panic!("lent as plain memory");
    };
    head.copy_from_slice(&[tlbi(1), tlbi(2)]);
    p.commit(2).unwrap();
    p.publish(&[sync()]).unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![vec![tlbi(1), tlbi(2)], vec![sync()]]
    );
}
