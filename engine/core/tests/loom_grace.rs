//! loom models of the unbind barrier: every interleaving (and every memory-order outcome loom
//! models) of translators pinning, looking a binding up and publishing, against an unbinder
//! removing it and waiting for the grace period. The first models the grace domain's memory
//! orderings with the table entry as a loom atomic; the second drives the real
//! `Viommu::unset_dev_id` and `Viommu::lookup`, so deleting the barrier call in the unbind
//! fails it. Run with `make loom`.
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use loom::sync::{Arc, Mutex};
use vcmdq::viommu::{DeviceId, Devices, GraceDomain, Viommu, ViommuConfig};

/// The bound entry, as `SidTable` stores it: VALID | pSID.
const OLD: u64 = 1 << 32 | 0x800;

/// What the physical queue saw, in order: a published pSID entry, or the unbind's return.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Event {
    Published(u64),
    UnbindReturned,
}

fn model(readers: usize, batches: usize) {
    let mut b = loom::model::Builder::new();
    // `make loom` sets LOOM_MAX_PREEMPTIONS; without it, a bound that finishes in seconds.
    if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(move || {
        let domain = GraceDomain::new();
        let entry = Arc::new(AtomicU64::new(OLD));
        let log = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..readers)
            .map(|_| {
                let mut reader = domain.register();
                let (entry, log) = (entry.clone(), log.clone());
                loom::thread::spawn(move || {
                    for _ in 0..batches {
                        let guard = reader.pin();
                        // The lookup, as `SidTable::get` does it.
                        let e = entry.load(Ordering::Relaxed);
                        if e != 0 {
                            log.lock().unwrap().push(Event::Published(e));
                        }
                        drop(guard);
                    }
                })
            })
            .collect();
        // The unbind, as `Viommu::unset_dev_id` does it.
        entry.swap(0, Ordering::Relaxed);
        domain.synchronize();
        log.lock().unwrap().push(Event::UnbindReturned);
        for t in threads {
            t.join().unwrap();
        }
        let log = log.lock().unwrap();
        let ret = log
            .iter()
            .position(|e| *e == Event::UnbindReturned)
            .unwrap();
        assert!(
            log[ret..].iter().all(|e| *e == Event::UnbindReturned),
            "published after the unbind returned: {log:?}"
        );
    });
}

#[test]
fn one_reader_two_batches() {
    model(1, 2);
}

#[test]
fn two_readers_one_batch() {
    model(2, 1);
}

/// The real unbind: translators registered in the vIOMMU's own grace domain pin, look the vSID
/// up through `Viommu::lookup` and publish while pinned, as `engine::worker` does per batch;
/// the unbinder calls `Viommu::unset_dev_id` itself and then raises `returned`. A translator
/// publishing the old pSID must not see `returned` (its load of it stands for the instant of
/// publication, so a loom branch point lies between the lookup and the publication), and the
/// device must be free to bind again once the unbind returned.
///
/// The vSID table's entries are std atomics, which loom runs but neither reorders nor sees:
/// the weak memory outcomes of the entry against the reader's slot are the first model's. So
/// that loom explores the lookup on both sides of the removal, each side touches a loom atomic
/// (`touched`, Relaxed: no synchronisation added) just before it; this model then checks that
/// the real unbind waits, which deleting its barrier call breaks.
fn real_unset_dev_id(readers: usize, batches: usize) {
    let mut b = loom::model::Builder::new();
    if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(move || {
        const VSID: u32 = 0x12;
        const PSID: u32 = 0x800;
        let devices = Devices::new();
        devices.add_device(DeviceId(1), 0, PSID).unwrap();
        let viommu = std::sync::Arc::new(
            Viommu::new(
                ViommuConfig::new(1, 5, 0),
                devices.clone(),
                GraceDomain::new(),
            )
            .unwrap(),
        );
        viommu.set_dev_id(DeviceId(1), VSID).unwrap();
        let returned = Arc::new(AtomicBool::new(false));
        let touched = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..readers)
            .map(|_| {
                let mut reader = viommu.grace().register();
                let (viommu, returned, touched) =
                    (viommu.clone(), returned.clone(), touched.clone());
                loom::thread::spawn(move || {
                    for _ in 0..batches {
                        let guard = reader.pin();
                        touched.load(Ordering::Relaxed);
                        if let Some(psid) = viommu.lookup(VSID) {
                            // The publication of a batch carrying the pSID.
                            assert!(
                                !returned.load(Ordering::SeqCst),
                                "pSID {psid:#x} published after unset_dev_id returned"
                            );
                        }
                        drop(guard);
                    }
                })
            })
            .collect();
        touched.store(1, Ordering::Relaxed);
        assert_eq!(viommu.unset_dev_id(DeviceId(1)), Ok(VSID));
        returned.store(true, Ordering::SeqCst);
        // The barrier is over: the device can go to another vIOMMU at once.
        let other =
            Viommu::new(ViommuConfig::new(2, 6, 0), devices, viommu.grace().clone()).unwrap();
        assert_eq!(other.set_dev_id(DeviceId(1), VSID), Ok(()));
        for t in threads {
            t.join().unwrap();
        }
    });
}

#[test]
fn real_unset_dev_id_one_reader_two_batches() {
    real_unset_dev_id(1, 2);
}

#[test]
fn real_unset_dev_id_two_readers_one_batch() {
    real_unset_dev_id(2, 1);
}
