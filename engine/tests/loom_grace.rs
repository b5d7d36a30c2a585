//! A loom model of the unbind barrier: every interleaving (and every memory-order outcome loom
//! models) of translators pinning, looking a binding up and publishing, against an unbinder
//! removing it and waiting for the grace period. Run with `make loom`.
#![cfg(loom)]

use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::{Arc, Mutex};
use vcmdq::viommu::GraceDomain;

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
