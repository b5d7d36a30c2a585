//! Rings another process can break: unsealed files truncated under a polling engine, which
//! must never kill it, and rings attached twice, which must be refused.
#![cfg(not(loom))]
#![cfg(not(miri))]

mod common;

use common::file_ring::{ring_file, FileGuest, TempPath};
use common::{start_engine, Model};
use vcmdq::mock::Rng;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vcmdq::command::RawCommand;
use vcmdq::engine::EngineConfig;
use vcmdq::ring::layout;
use vcmdq::ring::{heap_pair, AttachOptions, GuestRing, HostRing, RingError};
use vcmdq::viommu::ViommuConfig;

const UNSEALED: AttachOptions = AttachOptions {
    allow_unsealed: true,
};

/// Command number `i`: distinct in both words so a torn or misplaced copy shows.
fn cmd(i: u64) -> RawCommand {
    RawCommand::new(i << 16, !i ^ 0x5a5a_0000_0000_0000)
}

/// One round: a guest thread fills the ring `fills` times, then truncates the file to `cut`
/// bytes, while this thread polls as fast as it can. Every entry the engine copies is the one
/// the guest wrote there, in order; every poll that starts after the truncate reports
/// `Shrunk`; the process never takes a signal.
fn truncate_while_polled(log2size: u8, cut: u64, fills: u64, budget: usize) {
    let path = ring_file("trunc", log2size);
    let mut host = HostRing::attach_with(&path, UNSEALED).unwrap();
    assert!(!host.sealed(), "an unsealed file is never mapped");
    let truncated = Arc::new(AtomicBool::new(false));
    let guest = {
        let truncated = truncated.clone();
        let path = path.0.clone();
        std::thread::spawn(move || {
            let mut g = FileGuest::open(&path, log2size);
            let mut written = 0;
            let mut tries = 0u64;
            while written < fills && tries < 1_000_000 {
                written += (g.fill(cmd) > 0) as u64;
                tries += 1;
                std::thread::yield_now();
            }
            g.truncate(cut);
            truncated.store(true, Ordering::SeqCst);
        })
    };
    let mut out = vec![RawCommand::default(); budget];
    let mut next = 0u64;
    let mut polls = 0u64;
    let err = loop {
        let after = truncated.load(Ordering::SeqCst);
        polls += 1;
        assert!(
            polls < 100_000_000,
            "the engine never noticed the file was cut to {cut} bytes"
        );
        match host.poll(&mut out) {
            Ok(p) => {
                assert!(
                    !after,
                    "a poll that began after the truncate to {cut} bytes read the ring"
                );
                for (i, c) in out[..p.n].iter().enumerate() {
                    assert_eq!(*c, cmd(next + i as u64), "entry {}", next + i as u64);
                }
                next += p.n as u64;
                host.complete(p.first.wrapping_add(p.n as u32));
            }
            Err(e) => break e,
        }
    };
    guest.join().expect("the guest thread ends");
    assert!(
        matches!(err, RingError::Shrunk { .. }),
        "cut to {cut}: {err}"
    );
    assert!(err.to_string().contains(&path.0.display().to_string()));
    assert!(host.failed());
    // The ring stays dead: no read, no write, the same answer.
    assert!(matches!(host.poll(&mut out), Err(RingError::Shrunk { .. })));
}

#[test]
fn an_unsealed_ring_truncated_while_polled_stops_that_ring_and_the_engine_lives() {
    let log2size = 6;
    let need = layout::HEADER_SIZE as u64 + (16u64 << log2size);
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    for round in 0..240u64 {
        let cut = match round % 4 {
            0 => 0,
            // Inside the header: before, inside and after PROD.
            1 => rng.below(layout::HEADER_SIZE as u64),
            // Inside the slots.
            _ => layout::HEADER_SIZE as u64 + rng.below(need - layout::HEADER_SIZE as u64),
        };
        let fills = rng.below(6);
        let budget = 1 + rng.below(70) as usize;
        truncate_while_polled(log2size, cut, fills, budget);
    }
}

#[test]
fn an_unsealed_ring_stopped_and_truncated_reports_it_on_the_next_poll() {
    let path = ring_file("stopped", 3);
    let mut host = HostRing::attach_with(&path, UNSEALED).unwrap();
    let mut g = FileGuest::open(&path.0, 3);
    g.fill(cmd);
    let mut out = [RawCommand::default(); 8];
    assert_eq!(host.poll(&mut out).unwrap().n, 8);
    host.stop(2, vcmdq::queue::CError::Ill);
    g.truncate(100);
    // The stopped ring reads ERR_ACK: a short read, not a signal.
    let err = host.poll(&mut out).unwrap_err();
    assert!(
        matches!(err, RingError::Shrunk { len, .. } if len <= 256),
        "{err}"
    );
    // Nothing more is written into the cut file (CONS, ERR live in 128..136).
    host.signal_sync(1, 5);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 100);
}

#[test]
fn an_unsealed_ring_attached_through_a_guests_memory_is_read_with_system_calls() {
    let path = TempPath::new("mem");
    let mut guest = GuestRing::create(&path, 2, 3).unwrap();
    let err = HostRing::attach_memory(guest.memory(), AttachOptions::default()).unwrap_err();
    assert!(matches!(err, RingError::Unsealed { .. }), "{err}");
    let mut host = HostRing::attach_memory(guest.memory(), UNSEALED).unwrap();
    assert!(!host.sealed());
    guest.submit(&[cmd(1), cmd(2)]);
    let mut out = [RawCommand::default(); 4];
    let p = host.poll(&mut out).unwrap();
    assert_eq!(&out[..p.n], &[cmd(1), cmd(2)]);
    host.complete(2);
    assert_eq!(guest.cons().0, 2);
    // Keep the guest's own mapping out of harm's way: cut the slots only after the last use.
    drop(guest);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    assert!(matches!(
        host.poll(&mut out),
        Err(RingError::Shrunk { len: 0, .. })
    ));
}

/// Through the engine: the truncated ring alone is given up, with its error, and a ring next
/// to it goes on.
#[test]
fn an_engine_gives_up_a_truncated_ring_and_serves_the_others() {
    let (engine, _) = start_engine(EngineConfig::default(), &Model::default());
    engine.create_viommu(ViommuConfig::new(1, 5, 0)).unwrap();
    let healthy = HostRing::create_sealed(4, 1).unwrap();
    let guest = GuestRing::open(healthy.path()).unwrap();
    engine.attach_ring(healthy).unwrap();
    let mut files = Vec::new();
    let mut ids = Vec::new();
    for i in 0..6u64 {
        let path = ring_file("engine", 4);
        let host = HostRing::attach_with(&path, UNSEALED).unwrap();
        ids.push(engine.attach_ring(host).unwrap());
        let mut g = FileGuest::open(&path.0, 4);
        g.fill(cmd);
        g.truncate(i * 60);
        files.push(path);
    }
    let mut failed = Vec::new();
    for _ in 0..200_000 {
        failed.extend(engine.failed_rings());
        if failed.len() == ids.len() {
            break;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    assert_eq!(
        failed.len(),
        ids.len(),
        "the engine did not give up every truncated ring: {failed:?}"
    );
    for (id, e) in &failed {
        assert!(ids.contains(id));
        assert!(matches!(e, RingError::Shrunk { .. }), "{e}");
    }
    let mut guest = guest;
    guest.submit(&[RawCommand::new(0x46, 0)]);
    guest
        .wait_syncs(1, Duration::from_secs(60))
        .expect("the healthy ring is still served after the others failed");
    assert_eq!(engine.dead_threads(), 0);
    let report = engine.shutdown();
    assert_eq!(report.stats.ring_failures, ids.len() as u64);
    assert_eq!(report.rings.len(), ids.len() + 1, "every ring's counters");
}

#[test]
fn the_same_ring_file_attached_twice_is_refused_through_any_path_until_detached() {
    let path = ring_file("twice", 3);
    let first = HostRing::attach_with(&path, UNSEALED).unwrap();
    let err = HostRing::attach_with(&path, UNSEALED).unwrap_err();
    assert!(matches!(err, RingError::AlreadyAttached { .. }), "{err}");
    assert!(err.to_string().contains("already attached"), "{err}");
    // A second name for the same inode.
    let link = TempPath::new("link");
    std::fs::hard_link(&path, &link).unwrap();
    let err = HostRing::attach_with(&link, UNSEALED).unwrap_err();
    assert!(matches!(err, RingError::AlreadyAttached { .. }), "{err}");
    let sym = TempPath::new("sym");
    std::os::unix::fs::symlink(&path.0, &sym.0).unwrap();
    let err = HostRing::attach_with(&sym, UNSEALED).unwrap_err();
    assert!(matches!(err, RingError::AlreadyAttached { .. }), "{err}");
    // A guest takes no lock.
    drop(GuestRing::open(&path).unwrap());
    drop(first);
    let again = HostRing::attach_with(&link, UNSEALED).unwrap();
    drop(again);
}

#[test]
fn a_sealed_memfd_opened_twice_through_its_proc_path_has_one_engine() {
    let first = HostRing::create_sealed(3, 1).unwrap();
    let path = first.path().to_path_buf();
    // A new open file description of the memfd, as another process would get.
    let err = HostRing::attach(&path).unwrap_err();
    assert!(matches!(err, RingError::AlreadyAttached { .. }), "{err}");
    let guest = GuestRing::create_sealed(3, 1).unwrap();
    let second = HostRing::attach(guest.path()).unwrap();
    let err = HostRing::attach(guest.path()).unwrap_err();
    assert!(matches!(err, RingError::AlreadyAttached { .. }), "{err}");
    drop(second);
    HostRing::attach(guest.path()).unwrap();
}

#[test]
fn a_heap_ring_has_one_engine() {
    let (guest, host) = heap_pair(2, 0).unwrap();
    let err = HostRing::attach_memory(guest.memory(), AttachOptions::default()).unwrap_err();
    assert!(matches!(err, RingError::AlreadyAttached { .. }), "{err}");
    drop(host);
    HostRing::attach_memory(guest.memory(), AttachOptions::default()).unwrap();
}

#[test]
fn a_ring_detached_from_an_engine_can_be_attached_again() {
    let (engine, _) = start_engine(EngineConfig::default(), &Model::default());
    engine.create_viommu(ViommuConfig::new(1, 5, 0)).unwrap();
    let path = ring_file("reattach", 3);
    let id = engine
        .attach_ring(HostRing::attach_with(&path, UNSEALED).unwrap())
        .unwrap();
    let err = HostRing::attach_with(&path, UNSEALED).unwrap_err();
    assert!(matches!(err, RingError::AlreadyAttached { .. }), "{err}");
    let host = engine.detach_ring(id, Duration::from_secs(60)).unwrap();
    drop(host);
    let id2 = engine
        .attach_ring(HostRing::attach_with(&path, UNSEALED).unwrap())
        .unwrap();
    assert_ne!(id, id2);
}

/// Two processes: a child of this test holds the lock on a memfd this process created; this
/// process's engine is refused while the child lives and attaches once it is gone.
#[test]
fn a_ring_another_process_attached_is_refused() {
    let guest = GuestRing::create_sealed(3, 1).unwrap();
    let path = guest.path().to_path_buf();
    // flock from another process through its own open of the path.
    let mut child = std::process::Command::new("flock")
        // --no-fork: the process that holds the lock is the one this test kills.
        .args(["--exclusive", "--nonblock", "--no-fork"])
        .arg(&path)
        .args(["sleep", "600"])
        .spawn();
    let Ok(ref mut holder) = child else {
        eprintln!("skipped: the flock(1) utility is not installed");
        return;
    };
    // Wait (bounded) until the child holds the lock.
    let mut refused = false;
    for _ in 0..20_000 {
        match HostRing::attach(&path) {
            Err(RingError::AlreadyAttached { .. }) => {
                refused = true;
                break;
            }
            Ok(h) => drop(h),
            Err(e) => panic!("{e}"),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(refused, "the engine attached a ring another process holds");
    HostRing::attach(&path).expect("the lock goes with the process that held it");
}

#[test]
fn a_write_sealed_memfd_is_refused_saying_why() {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::fs::FileExt;
    // SAFETY: a NUL-terminated name and valid flags.
    let fd = unsafe { libc::memfd_create(c"vcmdq-wseal".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    let bytes = layout::HEADER_SIZE as u64 + 16 * 8;
    file.set_len(bytes).unwrap();
    file.write_all_at(&layout::MAGIC.to_le_bytes(), 0).unwrap();
    file.write_all_at(&1u32.to_le_bytes(), 8).unwrap();
    file.write_all_at(&256u32.to_le_bytes(), 12).unwrap();
    file.write_all_at(&3u32.to_le_bytes(), 16).unwrap();
    // SAFETY: F_ADD_SEALS with an int of seal bits on a memfd that allows sealing.
    let rc = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_WRITE,
        )
    };
    assert_eq!(rc, 0);
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let err = HostRing::attach(&path).unwrap_err();
    assert!(matches!(err, RingError::WriteSealed { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("sealed against writes") && msg.contains("CONS"),
        "{msg}"
    );
    assert!(!msg.contains("map failed"), "{msg}");
    let err = GuestRing::open(&path).unwrap_err();
    assert!(matches!(err, RingError::WriteSealed { .. }), "{err}");
}
