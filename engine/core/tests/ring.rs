//! Guest rings: the guest and engine sides over heap memory, files and sealed memfds, with the
//! hostile guests the engine must survive.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vcmdq::command::RawCommand;
use vcmdq::mock::Rng;
use vcmdq::queue::CError;
use vcmdq::ring::layout::{self, OFF_CONS, OFF_ERR_ACK, OFF_LOG2SIZE, OFF_MAGIC, OFF_VERSION};
use vcmdq::ring::{heap_pair, AttachOptions, GuestRing, HostRing, RingError};

/// Command number `i`: distinct in both words so a torn or misplaced copy shows.
fn cmd(i: u64) -> RawCommand {
    RawCommand::new(i, !i ^ 0x5a5a_0000_0000_0000)
}

const CMD_SYNC_IRQ: u64 = 0x46 | (1 << 12);

/// A file under the temp dir, removed when dropped.
struct TempPath(PathBuf);

impl TempPath {
    fn new(name: &str) -> TempPath {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        TempPath(
            std::env::temp_dir().join(format!("vcmdq-ring-test-{}-{n}-{name}", std::process::id())),
        )
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl AsRef<Path> for TempPath {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

const UNSEALED: AttachOptions = AttachOptions {
    allow_unsealed: true,
};

fn round_trip(guest: &mut GuestRing, host: &mut HostRing) {
    let entries = guest.shape().entries();
    let n = entries.min(5) as u64;
    let cmds: Vec<_> = (0..n).map(cmd).collect();
    assert_eq!(guest.push(&cmds), n as usize);
    // Not published yet: the engine sees nothing.
    let mut out = vec![RawCommand::default(); 8];
    assert_eq!(host.poll(&mut out).unwrap().n, 0);
    guest.doorbell();
    let p = host.poll(&mut out).unwrap();
    assert_eq!((p.first, p.n), (0, n as usize));
    assert_eq!(&out[..p.n], &cmds[..]);
    assert_eq!(guest.free(), entries - n as u32);
    host.complete(n as u32);
    assert_eq!(guest.cons(), (n as u32, CError::None));
    assert_eq!(guest.free(), entries);
    assert_eq!(host.viommu_id(), guest.viommu_id());
    assert_eq!(host.shape(), guest.shape());
}

#[test]
fn round_trip_over_heap() {
    let (mut guest, mut host) = heap_pair(4, 7).unwrap();
    assert_eq!(host.viommu_id(), 7);
    round_trip(&mut guest, &mut host);
}

#[test]
#[cfg_attr(miri, ignore)]
fn round_trip_over_a_file_mapped_twice() {
    let path = TempPath::new("rt");
    let mut guest = GuestRing::create(&path, 3, 11).unwrap();
    // Separate mappings of the same file.
    let mut host = HostRing::attach_with(&path, UNSEALED).unwrap();
    assert!(!host.sealed());
    round_trip(&mut guest, &mut host);
    let reopened = GuestRing::open(&path).unwrap();
    assert_eq!(reopened.prod(), guest.prod());
    assert_eq!(reopened.viommu_id(), 11);
}

#[test]
#[cfg_attr(miri, ignore)]
fn an_unsealed_file_is_refused_by_default() {
    let path = TempPath::new("unsealed");
    GuestRing::create(&path, 3, 1).unwrap();
    let err = HostRing::attach(&path).unwrap_err();
    assert!(matches!(err, RingError::Unsealed { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&path.0.display().to_string()), "{msg}");
    assert!(msg.contains("allow_unsealed"), "{msg}");
}

#[test]
#[cfg_attr(miri, ignore)]
fn sealed_memfd_made_by_the_engine() {
    let mut host = HostRing::create_sealed(4, 3).unwrap();
    assert!(host.sealed());
    let path = host.path().to_path_buf();
    assert!(path.starts_with("/proc"), "{}", path.display());
    let mut guest = GuestRing::open(&path).unwrap();
    round_trip(&mut guest, &mut host);
    // The seal holds: nobody can shrink it under the engine.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    assert!(f.set_len(0).is_err());
    assert!(f.set_len(100).is_err());
}

#[test]
#[cfg_attr(miri, ignore)]
fn sealed_memfd_made_by_the_guest_is_attached_strictly() {
    let mut guest = GuestRing::create_sealed(2, 9).unwrap();
    let mut host = HostRing::attach(guest.path()).unwrap();
    assert!(host.sealed());
    round_trip(&mut guest, &mut host);
}

/// Guest and engine move many laps with random batch and buffer sizes; every entry arrives
/// once, in order.
fn laps(log2size: u8, total: u64, seed: u64) {
    let (mut guest, mut host) = heap_pair(log2size, 0).unwrap();
    let mut rng = Rng::new(seed);
    let mut next = || rng.next_u64();
    let entries = guest.shape().entries() as u64;
    let (mut sent, mut got) = (0u64, 0u64);
    let mut out = vec![RawCommand::default(); entries as usize + 3];
    while got < total {
        let want = (next() % (entries + 1)).min(total - sent);
        let batch: Vec<_> = (sent..sent + want).map(cmd).collect();
        let pushed = guest.push(&batch);
        sent += pushed as u64;
        if next() % 3 != 0 {
            guest.doorbell();
        }
        let room = 1 + (next() % (entries + 2)) as usize;
        let p = host.poll(&mut out[..room]).unwrap();
        assert_eq!(p.first, guest.shape().ptr(got as u32));
        for (k, c) in out[..p.n].iter().enumerate() {
            assert_eq!(*c, cmd(got + k as u64));
        }
        got += p.n as u64;
        if p.n > 0 || next() % 2 == 0 {
            host.complete(host.read_ptr());
        }
    }
    assert_eq!(host.stats().copied, total);
    assert_eq!(host.stats().prod_backwards + host.stats().prod_overrun, 0);
}

#[test]
fn wraps_around_many_laps() {
    let total = if cfg!(miri) { 40 } else { 20_000 };
    for log2 in [0, 1, 4] {
        laps(log2, total, 0x9e37_79b9_7f4a_7c15 ^ log2 as u64);
    }
}

#[test]
fn a_full_ring() {
    for log2 in [0u8, 1, 4] {
        let (mut guest, mut host) = heap_pair(log2, 0).unwrap();
        let entries = guest.shape().entries();
        let cmds: Vec<_> = (0..entries as u64 + 3).map(cmd).collect();
        assert_eq!(guest.submit(&cmds), entries as usize);
        assert_eq!(guest.free(), 0);
        assert_eq!(guest.push(&cmds), 0);
        let mut out = vec![RawCommand::default(); 64];
        let p = host.poll(&mut out).unwrap();
        assert_eq!(p.n, entries as usize);
        assert_eq!(&out[..p.n], &cmds[..p.n]);
        // Full but all taken: nothing more to read, and that is not a hostile PROD.
        assert_eq!(host.poll(&mut out).unwrap().n, 0);
        assert_eq!(host.stats().prod_overrun, 0);
        host.complete(host.read_ptr());
        assert_eq!(guest.free(), entries);
        assert_eq!(guest.submit(&cmds[..1]), 1);
        let p = host.poll(&mut out).unwrap();
        assert_eq!((p.first, p.n), (guest.shape().ptr(entries), 1));
    }
}

#[test]
fn prod_moved_backwards_keeps_what_was_taken() {
    let (mut guest, mut host) = heap_pair(4, 0).unwrap();
    let cmds: Vec<_> = (0..8).map(cmd).collect();
    guest.submit(&cmds);
    let mut out = vec![RawCommand::default(); 16];
    assert_eq!(host.poll(&mut out).unwrap().n, 8);
    host.complete(2);
    // Behind the read pointer, not behind CONS.
    guest.write_prod_raw(5);
    assert_eq!(host.poll(&mut out).unwrap().n, 0);
    assert_eq!(host.stats().prod_backwards, 1);
    assert_eq!(host.read_ptr(), 8);
    // Back where it was: nothing is read twice.
    guest.write_prod_raw(8);
    assert_eq!(host.poll(&mut out).unwrap().n, 0);
    assert_eq!(host.stats().prod_backwards, 1);
    // The engine goes on once PROD passes its read pointer.
    guest.write_slot(8, cmd(100));
    guest.write_prod_raw(9);
    let p = host.poll(&mut out).unwrap();
    assert_eq!((p.first, p.n, out[0]), (8, 1, cmd(100)));
    // Entries already taken can still be completed normally.
    host.complete(9);
    assert_eq!(guest.cons().0, 9);
}

/// PROD exactly 2^LOG2SIZE behind CONS has CONS's index and the other wrap bit: a full ring, as
/// on an SMMU, so the engine reads the whole ring again (the previous lap's slots). Only a guest
/// can tell this PROD from a full ring; the soak's backwards game must not write it.
#[test]
fn prod_moved_back_a_whole_ring_behind_cons_is_a_full_ring() {
    let (mut guest, mut host) = heap_pair(4, 0).unwrap();
    let mut out = vec![RawCommand::default(); 64];
    guest.submit(&(0..16).map(cmd).collect::<Vec<_>>());
    assert_eq!(host.poll(&mut out).unwrap().n, 16);
    host.complete(16);
    guest.write_prod_raw(0);
    let p = host.poll(&mut out).unwrap();
    assert_eq!((p.first, p.n), (16, 16));
    assert_eq!(&out[..16], &(0..16).map(cmd).collect::<Vec<_>>()[..]);
    assert_eq!(host.stats().prod_backwards + host.stats().prod_overrun, 0);
}

#[test]
fn prod_overrun_and_prod_behind_cons_copy_nothing() {
    let (mut guest, mut host) = heap_pair(4, 0).unwrap();
    let mut out = vec![RawCommand::default(); 64];
    guest.submit(&(0..4).map(cmd).collect::<Vec<_>>());
    assert_eq!(host.poll(&mut out).unwrap().n, 4);
    host.complete(4);
    // 17 ahead of CONS in a 16-entry ring.
    guest.write_prod_raw(4 + 17);
    assert_eq!(host.poll(&mut out).unwrap().n, 0);
    // One behind CONS reads the same as 31 ahead.
    guest.write_prod_raw(3);
    assert_eq!(host.poll(&mut out).unwrap().n, 0);
    assert_eq!(host.stats().prod_overrun, 2);
    assert_eq!(host.read_ptr(), 4);
    // A valid PROD again, with junk above the wrap bit: reading resumes.
    guest.write_slot(4, cmd(44));
    guest.write_prod_raw(0xdead_be00 | 5);
    let p = host.poll(&mut out).unwrap();
    assert_eq!((p.first, p.n, out[0]), (4, 1, cmd(44)));
    // Exactly full (16 ahead of CONS) is legal.
    host.complete(5);
    guest.write_prod_raw(5 + 16);
    assert_eq!(host.poll(&mut out).unwrap().n, 16);
    assert_eq!(host.stats().prod_overrun, 2);
}

#[test]
fn rewriting_slots_after_the_copy_changes_nothing() {
    let (mut guest, mut host) = heap_pair(3, 0).unwrap();
    let cmds: Vec<_> = (0..6).map(cmd).collect();
    guest.submit(&cmds);
    let mut out = vec![RawCommand::default(); 3];
    let p = host.poll(&mut out).unwrap();
    assert_eq!(p.n, 3);
    for i in 0..6 {
        guest.write_slot(i, cmd(1000 + i as u64));
    }
    assert_eq!(&out[..], &cmds[..3]);
    // The rest is read now, with the guest's rewrite (it was not copied before).
    let p = host.poll(&mut out).unwrap();
    assert_eq!((p.first, p.n), (3, 3));
    assert_eq!(&out[..], &[cmd(1003), cmd(1004), cmd(1005)]);
    // Never again.
    assert_eq!(host.poll(&mut out).unwrap().n, 0);
    assert_eq!(host.stats().copied, 6);
}

#[test]
fn words_the_engine_owns_are_never_read_back() {
    let (mut guest, mut host) = heap_pair(3, 5).unwrap();
    guest.submit(&(0..4).map(cmd).collect::<Vec<_>>());
    let mut out = vec![RawCommand::default(); 8];
    assert_eq!(host.poll(&mut out).unwrap().n, 4);
    // The guest scribbles CONS, LOG2SIZE and the magic.
    guest.write_header_u32(OFF_CONS, 0x7fff_ffff);
    guest.write_header_u32(OFF_LOG2SIZE, 19);
    guest.write_header_u64(OFF_MAGIC, 0);
    guest.write_header_u64(layout::OFF_SYNC_COUNT, 99);
    assert_eq!(host.cons_ptr(), 0);
    assert_eq!(host.shape().log2size(), 3);
    assert_eq!(host.poll(&mut out).unwrap().n, 0);
    host.complete(3);
    assert_eq!(guest.cons(), (3, CError::None));
    assert_eq!(host.viommu_id(), 5);
    host.signal_sync(0, 0);
    assert_eq!(guest.sync_count(), 1);
}

#[test]
fn stop_acknowledge_and_resume_at_the_fixed_slot() {
    let (mut guest, mut host) = heap_pair(3, 0).unwrap();
    let cmds: Vec<_> = (0..6).map(cmd).collect();
    guest.submit(&cmds);
    let mut out = vec![RawCommand::default(); 8];
    assert_eq!(host.poll(&mut out).unwrap().n, 6);
    // Slot 3 is refused: CONS moves to 3 with CONS.ERR, the flag goes up.
    host.stop(3, CError::Ill);
    assert_eq!(guest.error(), Some((3, CError::Ill)));
    assert_eq!(guest.cons(), (3, CError::Ill));
    assert_eq!(host.stopped(), Some((3, CError::Ill)));
    assert_eq!(host.read_ptr(), 3);
    // Nothing is read while stopped, whatever the guest does to PROD.
    guest.submit(&[cmd(6)]);
    assert_eq!(host.poll(&mut out).unwrap().n, 0);
    // The guest fixes the slot as Linux does and acknowledges.
    let sync = RawCommand::new(0x46, 0);
    guest.write_slot(3, sync);
    guest.ack_error();
    assert_eq!(guest.error(), None);
    let p = host.poll(&mut out).unwrap();
    assert_eq!((p.first, p.n), (3, 4));
    assert_eq!(&out[..4], &[sync, cmd(4), cmd(5), cmd(6)]);
    assert_eq!(guest.cons(), (3, CError::None));
    assert_eq!(host.stopped(), None);
    assert_eq!(host.stats().stops, 1);
    assert_eq!(host.stats().acks, 1);
    host.complete(7);
    assert_eq!(guest.cons(), (7, CError::None));
}

#[test]
fn stop_after_forwarding_resumes_past_what_was_forwarded() {
    let (mut guest, mut host) = heap_pair(3, 0).unwrap();
    guest.submit(&(0..6).map(cmd).collect::<Vec<_>>());
    let mut out = vec![RawCommand::default(); 8];
    assert_eq!(host.poll(&mut out).unwrap().n, 6);
    host.complete(1);
    // Slot 2 failed in the physical queue after slots up to 4 had been forwarded.
    host.stop_resume_at(2, CError::AtcInvSync, 5);
    assert_eq!(guest.error(), Some((2, CError::AtcInvSync)));
    guest.ack_error();
    let p = host.poll(&mut out).unwrap();
    assert_eq!((p.first, p.n, out[0]), (5, 1, cmd(5)));
    // CONS stays at the failing slot until the engine completes past it.
    assert_eq!(guest.cons(), (2, CError::None));
    host.complete(6);
    assert_eq!(guest.cons().0, 6);
}

#[test]
fn an_early_acknowledgement_does_not_cancel_the_next_error() {
    let (mut guest, mut host) = heap_pair(2, 0).unwrap();
    guest.submit(&[cmd(0), cmd(1)]);
    let mut out = vec![RawCommand::default(); 4];
    host.poll(&mut out).unwrap();
    // A guest toggling ERR_ACK with no error pending.
    guest.write_header_u32(OFF_ERR_ACK, 1);
    host.stop(1, CError::Ill);
    assert_eq!(guest.error(), Some((1, CError::Ill)));
    assert_eq!(host.poll(&mut out).unwrap().n, 0);
    assert!(host.stopped().is_some());
    guest.ack_error();
    assert_eq!(host.poll(&mut out).unwrap().n, 1);
}

#[test]
fn a_reattached_engine_keeps_a_pending_error() {
    let (mut guest, mut host) = heap_pair(2, 0).unwrap();
    guest.submit(&[cmd(0), cmd(1)]);
    let mut out = vec![RawCommand::default(); 4];
    host.poll(&mut out).unwrap();
    host.stop(1, CError::Ill);
    drop(host);
    let mut host = HostRing::attach_memory(guest.memory(), AttachOptions::default()).unwrap();
    assert_eq!(host.stopped(), Some((1, CError::Ill)));
    assert_eq!(host.poll(&mut out).unwrap().n, 0);
    guest.ack_error();
    let p = host.poll(&mut out).unwrap();
    assert_eq!((p.first, p.n, out[0]), (1, 1, cmd(1)));
}

#[test]
fn guest_waits_end_on_cons_on_error_and_on_timeout() {
    let (mut guest, mut host) = heap_pair(3, 0).unwrap();
    guest.submit(&(0..4).map(cmd).collect::<Vec<_>>());
    let short = Duration::from_millis(1);
    assert!(matches!(
        guest.wait_cons(4, short),
        Err(RingError::Timeout { what: "CONS", .. })
    ));
    let mut out = vec![RawCommand::default(); 8];
    host.poll(&mut out).unwrap();
    host.complete(2);
    assert_eq!(guest.wait_cons(2, short).unwrap(), 2);
    assert_eq!(guest.wait_cons(1, short).unwrap(), 2);
    host.stop(3, CError::AtcInvSync);
    match guest.wait_cons(4, Duration::from_secs(60)) {
        Err(RingError::Stopped { slot: 3, cerror }) => assert_eq!(cerror, CError::AtcInvSync),
        other => panic!("{other:?}"),
    }
}

#[test]
fn sync_completion_word_and_counter() {
    let (mut guest, mut host) = heap_pair(3, 0).unwrap();
    let irq = RawCommand::new(CMD_SYNC_IRQ | (0xabcd_1234 << 32), 0xdead_0000);
    let none = RawCommand::new(0x46 | (0x1111 << 32), 0);
    guest.submit(&[irq, none]);
    assert_eq!(guest.sync_count(), 0);
    let mut out = vec![RawCommand::default(); 8];
    host.poll(&mut out).unwrap();
    host.signal_sync_of(&out[0]);
    host.complete(1);
    assert_eq!(guest.wait_syncs(1, Duration::from_secs(60)).unwrap(), 1);
    assert_eq!(guest.completion(), 0xabcd_1234);
    // CS=none counts but leaves the completion word alone.
    host.signal_sync_of(&out[1]);
    host.complete(2);
    assert_eq!(guest.sync_count(), 2);
    assert_eq!(guest.completion(), 0xabcd_1234);
    assert_eq!(host.sync_count(), 2);
    assert!(matches!(
        guest.wait_syncs(3, Duration::from_millis(1)),
        Err(RingError::Timeout { .. })
    ));
}

/// Found by the `ring` fuzz target: the engine takes SYNC_COUNT over at attach, so a guest that
/// scribbled it to u64::MAX made the next CMD_SYNC overflow the engine's counter (a panic in
/// debug builds).
#[test]
fn a_scribbled_sync_count_wraps_instead_of_panicking() {
    let (guest, mut host) = heap_pair(2, 0).unwrap();
    guest.write_header_u64(layout::OFF_SYNC_COUNT, u64::MAX);
    drop(host);
    host = HostRing::attach_memory(guest.memory(), AttachOptions::default()).unwrap();
    assert_eq!(host.sync_count(), u64::MAX);
    host.signal_sync(1, 7);
    assert_eq!(host.sync_count(), 0);
    assert_eq!(guest.sync_count(), 0);
    assert_eq!(guest.completion(), 7);
    host.signal_sync(0, 8);
    assert_eq!(guest.sync_count(), 1);
    assert_eq!(host.stats().syncs, 2);
}

#[test]
#[should_panic(expected = "not between CONS")]
fn completing_past_the_read_pointer_is_an_engine_bug() {
    let (mut guest, mut host) = heap_pair(3, 0).unwrap();
    guest.submit(&[cmd(0)]);
    host.poll(&mut [RawCommand::default(); 4]).unwrap();
    host.complete(2);
}

/// A guest thread writes random PROD values and scribbles every slot while the engine polls:
/// the engine never crashes and its pointers stay consistent.
#[test]
fn a_scribbling_guest_cannot_break_the_engine() {
    let (guest, mut host) = heap_pair(2, 0).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let scribbler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut rng = Rng::new(0x1234_5678_9abc_def1);
            let mut writes = 0u64;
            while !stop.load(Ordering::Relaxed) || writes < 100 {
                let x = rng.next_u64();
                guest.write_prod_raw(x as u32);
                guest.write_slot((x >> 32) as u32, cmd(x));
                if x.is_multiple_of(7) {
                    guest.ack_error();
                }
                writes += 1;
                if cfg!(miri) && writes >= 100 {
                    break;
                }
            }
        })
    };
    let mut out = vec![RawCommand::default(); 3];
    let polls = if cfg!(miri) { 100 } else { 200_000 };
    let entries = host.shape().entries();
    for i in 0..polls {
        let read = host.read_ptr();
        let p = host.poll(&mut out).unwrap();
        assert!(p.n <= out.len());
        if host.stopped().is_none() {
            assert_eq!(p.first, read);
        }
        let taken = host.shape().distance(host.read_ptr(), host.cons_ptr());
        assert!(taken <= entries);
        if p.n > 0 && i % 5 == 0 {
            host.stop(p.first, CError::Ill);
        } else if host.stopped().is_none() {
            host.complete(host.read_ptr());
        }
    }
    stop.store(true, Ordering::Relaxed);
    scribbler.join().unwrap();
}

/// Two mappings of one sealed memfd, one per thread: the guest thread sends numbered commands,
/// the engine thread receives them all in order.
#[test]
#[cfg_attr(miri, ignore)]
fn two_threads_two_mappings() {
    const TOTAL: u64 = 50_000;
    let mut host = HostRing::create_sealed(6, 1).unwrap();
    let path = host.path().to_path_buf();
    let guest = std::thread::spawn(move || {
        let mut guest = GuestRing::open(&path).unwrap();
        let mut sent = 0;
        while sent < TOTAL {
            let batch: Vec<_> = (sent..(sent + 40).min(TOTAL)).map(cmd).collect();
            let n = guest.submit(&batch);
            sent += n as u64;
            if n == 0 {
                std::thread::yield_now();
            }
        }
        guest
            .wait_cons(guest.prod(), Duration::from_secs(120))
            .unwrap();
    });
    let mut out = vec![RawCommand::default(); 64];
    let mut got = 0;
    while got < TOTAL {
        let p = host.poll(&mut out).unwrap();
        for c in &out[..p.n] {
            assert_eq!(*c, cmd(got));
            got += 1;
        }
        host.complete(host.read_ptr());
        if p.n == 0 {
            std::thread::yield_now();
        }
    }
    guest.join().unwrap();
}

fn write_file(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

fn ring_bytes(log2size: u32) -> Vec<u8> {
    let mut b = vec![0u8; 256 + (16 << log2size)];
    b[0..8].copy_from_slice(b"VCMDQRNG");
    b[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&1u32.to_le_bytes());
    b[12..16].copy_from_slice(&256u32.to_le_bytes());
    b[OFF_LOG2SIZE..OFF_LOG2SIZE + 4].copy_from_slice(&log2size.to_le_bytes());
    b
}

fn attach_err(bytes: &[u8], name: &str) -> (RingError, String) {
    let path = TempPath::new(name);
    write_file(path.as_ref(), bytes);
    let err = HostRing::attach_with(&path, UNSEALED).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&path.0.display().to_string()), "{msg}");
    // The guest side refuses it the same way.
    assert!(GuestRing::open(&path).is_err());
    (err, msg)
}

#[test]
#[cfg_attr(miri, ignore)]
fn a_hand_written_file_in_the_documented_format_attaches() {
    let path = TempPath::new("handmade");
    let mut b = ring_bytes(2);
    b[20..24].copy_from_slice(&77u32.to_le_bytes());
    b[layout::OFF_PROD..layout::OFF_PROD + 4].copy_from_slice(&2u32.to_le_bytes());
    b[256..264].copy_from_slice(&0x1122u64.to_le_bytes());
    b[272 + 8..272 + 16].copy_from_slice(&0x3344u64.to_le_bytes());
    write_file(path.as_ref(), &b);
    let mut host = HostRing::attach_with(&path, UNSEALED).unwrap();
    assert_eq!(host.viommu_id(), 77);
    let mut out = [RawCommand::default(); 4];
    let p = host.poll(&mut out).unwrap();
    assert_eq!(p.n, 2);
    assert_eq!(out[0], RawCommand::new(0x1122, 0));
    assert_eq!(out[1], RawCommand::new(0, 0x3344));
    host.complete(2);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[OFF_CONS..OFF_CONS + 4], &2u32.to_le_bytes());
}

#[test]
#[cfg_attr(miri, ignore)]
fn bad_files_are_refused_with_their_name() {
    let mut b = ring_bytes(2);
    b[0] = b'X';
    let (err, msg) = attach_err(&b, "magic");
    assert!(
        matches!(err, RingError::BadMagic { .. }) && msg.contains("magic"),
        "{msg}"
    );

    let mut b = ring_bytes(2);
    b[OFF_VERSION] = 2;
    let (err, msg) = attach_err(&b, "version");
    assert!(
        matches!(err, RingError::BadVersion { found: 2, .. }),
        "{msg}"
    );

    let mut b = ring_bytes(2);
    b[12] = 64;
    b[13] = 0;
    let (err, _) = attach_err(&b, "hdrsize");
    assert!(matches!(err, RingError::BadHeaderSize { found: 64, .. }));

    let mut b = ring_bytes(2);
    b[OFF_LOG2SIZE] = 20;
    let (err, msg) = attach_err(&b, "log2size");
    assert!(
        matches!(err, RingError::BadLog2Size { found: 20, .. }),
        "{msg}"
    );

    let (err, msg) = attach_err(&[0u8; 100], "short");
    assert!(matches!(err, RingError::TooSmall { len: 100, .. }), "{msg}");

    let (err, _) = attach_err(&[], "empty");
    assert!(matches!(err, RingError::TooSmall { len: 0, .. }));

    // A header that promises more slots than the file has.
    let b = ring_bytes(4);
    let (err, msg) = attach_err(&b[..256 + 16 * 15], "truncated");
    assert!(
        matches!(err, RingError::TooSmall { need: 512, .. }),
        "{msg}"
    );

    let missing = TempPath::new("missing");
    let err = HostRing::attach_with(&missing, UNSEALED).unwrap_err();
    assert!(matches!(err, RingError::Io { op: "open", .. }));
    assert!(err.to_string().contains(&missing.0.display().to_string()));
}

#[test]
#[cfg_attr(miri, ignore)]
fn a_ring_truncated_after_attach_is_detected() {
    let path = TempPath::new("shrink");
    let guest = GuestRing::create(&path, 10, 0).unwrap();
    let mut host = HostRing::attach_with(&path, UNSEALED).unwrap();
    host.check_size().unwrap();
    // Keep the header page, drop the slots (PROD is 0, so no slot is touched).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let err = host.check_size().unwrap_err();
    assert!(matches!(err, RingError::Shrunk { len: 4096, .. }), "{err}");
    assert!(err.to_string().contains(&path.0.display().to_string()));
    // An unsealed ring's size is checked on every poll: the first one after the truncate
    // reports it, and so does every later one.
    let mut out = [RawCommand::default(); 4];
    for _ in 0..3 {
        let err = host.poll(&mut out).unwrap_err();
        assert!(matches!(err, RingError::Shrunk { len: 4096, .. }), "{err}");
    }
    assert!(host.failed());
    drop(guest);
}

#[test]
fn bad_log2size_on_create() {
    assert!(matches!(
        GuestRing::heap(20, 0),
        Err(RingError::BadLog2Size { found: 20, .. })
    ));
    assert!(matches!(
        HostRing::create_heap(20, 0),
        Err(RingError::BadLog2Size { found: 20, .. })
    ));
    let host = HostRing::create_heap(1, 4).unwrap();
    let guest = GuestRing::from_memory(host.memory().unwrap()).unwrap();
    assert_eq!((guest.viommu_id(), guest.shape().entries()), (4, 2));
}

#[test]
fn rewind_gives_entries_back_to_be_read_again() {
    let (mut guest, mut host) = heap_pair(3, 1).unwrap();
    let cmds: Vec<_> = (0..5).map(cmd).collect();
    guest.submit(&cmds);
    let mut out = [RawCommand::default(); 8];
    let p = host.poll(&mut out).unwrap();
    assert_eq!(p.n, 5);
    host.complete(1);
    host.rewind(3);
    assert_eq!(host.read_ptr(), 3);
    let p = host.poll(&mut out).unwrap();
    assert_eq!((p.first, p.n), (3, 2));
    assert_eq!(out[..2], cmds[3..]);
}

/// The `ring` fuzz target's seeds, one scenario each, in the byte format `arbitrary` 1.x decodes
/// the target's `Input` from: LOG2SIZE, then per operation a continue byte (odd) and the
/// operation (a u32 choosing the variant, then its fields little-endian), then a stop byte.
/// `VCMDQ_WRITE_SEEDS=1 cargo test --test ring ring_fuzz_seeds` writes them; without it the
/// test checks the committed files are exactly these. `cargo fuzz fmt ring <file>` prints one.
#[test]
#[cfg_attr(miri, ignore)]
fn ring_fuzz_seeds() {
    /// The target's `Op` variants, in declaration order (the variant index is the encoding).
    const OPS: [&str; 12] = [
        "WriteSlot",
        "Push",
        "WriteProd",
        "Scribble",
        "AckError",
        "Poll",
        "Complete",
        "Stop",
        "StopResumeAt",
        "SignalSync",
        "Reattach",
        "Resize",
    ];
    /// The target's `Code` variants.
    const CODES: [&str; 4] = ["Ill", "Abt", "AtcInvSync", "IllAccess"];
    /// The u32 that `arbitrary`'s derive maps to variant `i` of `count`: `(x * count) >> 32`.
    fn variant(names: &[&str], name: &str) -> Vec<u8> {
        let i = names.iter().position(|n| *n == name).unwrap() as u64;
        let x = if i == 0 {
            0
        } else {
            (i << 32) / names.len() as u64 + 1
        };
        (x as u32).to_le_bytes().to_vec()
    }
    fn op(name: &str, fields: &[&[u8]]) -> Vec<u8> {
        let mut b = vec![1];
        b.extend(variant(&OPS, name));
        fields.iter().for_each(|f| b.extend_from_slice(f));
        b
    }
    let write = |ptr: u32, d0: u64, d1: u64| {
        op(
            "WriteSlot",
            &[&ptr.to_le_bytes(), &d0.to_le_bytes(), &d1.to_le_bytes()],
        )
    };
    let push = |n: u8, doorbell: bool| op("Push", &[&[n, doorbell.into()]]);
    let prod = |v: u32| op("WriteProd", &[&v.to_le_bytes()]);
    // Header word `w` (of 64; 16 is LOG2SIZE, 17 ERR_ACK, 32 CONS, 33 ERR, 36 SYNC_COUNT).
    let scribble = |w: u8, v: u64| op("Scribble", &[&[w], &v.to_le_bytes()]);
    let ack = op("AckError", &[]);
    let poll = |k: u8| op("Poll", &[&[k]]);
    // The engine's picks are `lo + x % (hi - lo + 1)` over [CONS, read] (and [at, read]).
    let complete = |x: u8| op("Complete", &[&[x]]);
    let stop = |at: u8, code: &str| op("Stop", &[&[at], &variant(&CODES, code)]);
    let stop_resume = |at: u8, resume: u8, code: &str| {
        op("StopResumeAt", &[&[at, resume], &variant(&CODES, code)])
    };
    let sync = |cs: u8, msidata: u32| op("SignalSync", &[&[cs], &msidata.to_le_bytes()]);
    let reattach = op("Reattach", &[]);
    // A file ring's length (`len` modulo the ring's size plus one; 0x8000: the full size).
    let resize = |len: u16| op("Resize", &[&len.to_le_bytes()]);
    // LOG2SIZE with bit 7: the ring lives in a plain file the engine reads with system calls.
    const FILE: u8 = 0x80;

    let seeds: Vec<(&str, u8, Vec<Vec<u8>>)> = vec![
        (
            "file-truncated-mid-slots",
            FILE | 4,
            vec![
                push(8, true),
                poll(4),
                complete(4),
                resize(300),
                poll(8),
                complete(4),
                sync(1, 7),
                poll(8),
                resize(0x8000),
                poll(8),
                reattach.clone(),
                push(3, true),
                poll(8),
                complete(3),
            ],
        ),
        (
            "file-truncated-to-zero-while-stopped",
            FILE | 2,
            vec![
                push(3, true),
                poll(4),
                stop(1, "Ill"),
                resize(0),
                ack.clone(),
                sync(0, 1),
                poll(4),
                resize(100),
                reattach.clone(),
                resize(0x8000),
                reattach.clone(),
                poll(4),
            ],
        ),
        (
            "round-trip",
            4,
            vec![
                push(5, true),
                poll(8),
                complete(5),
                poll(8),
                push(3, false),
                poll(8),
                push(0, true),
                poll(8),
                complete(3),
            ],
        ),
        (
            "laps",
            2,
            (0..6)
                .flat_map(|_| [push(3, true), poll(2), poll(8), complete(3)])
                .collect(),
        ),
        (
            "full-one-entry",
            0,
            vec![
                push(1, true),
                push(1, true),
                poll(4),
                poll(4),
                complete(1),
                push(1, true),
                poll(0),
                poll(1),
                complete(1),
            ],
        ),
        (
            "full-64",
            6,
            vec![
                push(64, true),
                poll(71),
                push(1, true),
                complete(64),
                push(64, true),
                poll(32),
                poll(32),
                complete(64),
            ],
        ),
        (
            "stop-fix-ack",
            3,
            vec![
                push(6, true),
                poll(8),
                stop(3, "Ill"),
                push(1, true),
                poll(8),
                write(3, 0x46, 0),
                ack.clone(),
                poll(8),
                complete(4),
            ],
        ),
        (
            "stop-resume-at",
            3,
            vec![
                push(6, true),
                poll(8),
                complete(1),
                stop_resume(1, 3, "AtcInvSync"),
                ack.clone(),
                poll(8),
                complete(5),
            ],
        ),
        (
            "early-ack",
            2,
            vec![
                push(2, true),
                poll(4),
                scribble(17, 1),
                stop(1, "Ill"),
                poll(4),
                ack.clone(),
                poll(4),
                complete(1),
            ],
        ),
        (
            "prod-backwards",
            4,
            vec![
                push(8, true),
                poll(16),
                complete(2),
                prod(5),
                poll(16),
                prod(8),
                poll(16),
                write(8, 100, 100),
                prod(9),
                poll(16),
                complete(7),
            ],
        ),
        (
            "prod-overrun",
            4,
            vec![
                push(4, true),
                poll(64),
                complete(4),
                prod(4 + 17),
                poll(64),
                prod(3),
                poll(64),
                prod(0xdead_be05),
                poll(64),
                complete(1),
                prod(5 + 16),
                poll(64),
            ],
        ),
        (
            "scribble-engine-words",
            3,
            vec![
                push(4, true),
                poll(8),
                scribble(32, 0x7fff_ffff),
                scribble(33, 1),
                scribble(34, 0x1234),
                scribble(36, 99),
                scribble(4, 19),
                scribble(0, 0),
                poll(8),
                complete(3),
                sync(1, 0xabcd),
                sync(0, 1),
                ack.clone(),
                poll(8),
            ],
        ),
        (
            "reattach-stopped",
            2,
            vec![
                push(2, true),
                poll(4),
                stop(1, "Ill"),
                reattach.clone(),
                poll(4),
                ack.clone(),
                poll(4),
                complete(1),
            ],
        ),
        (
            "reattach-scribbled",
            4,
            vec![
                push(6, true),
                poll(8),
                complete(2),
                scribble(32, 0x0300_000b),
                scribble(33, 1),
                reattach.clone(),
                poll(8),
                ack.clone(),
                poll(8),
                scribble(4, 2),
                reattach.clone(),
                push(3, true),
                poll(8),
                scribble(0, 1),
                reattach.clone(),
                poll(8),
            ],
        ),
        (
            // ERR raised without a CONS.ERR code (0, then one no engine writes): the new engine
            // stays stopped with CERROR_ILL.
            "reattach-flag-without-code",
            2,
            vec![
                push(3, true),
                poll(4),
                scribble(33, 1),
                reattach.clone(),
                poll(4),
                ack.clone(),
                poll(4),
                complete(3),
                scribble(32, 0x7f00_0001),
                scribble(33, 0),
                reattach.clone(),
                poll(4),
                ack.clone(),
                poll(4),
            ],
        ),
        (
            "sync-count-wraps",
            2,
            vec![
                scribble(36, u64::MAX),
                reattach.clone(),
                sync(1, 7),
                sync(2, 8),
            ],
        ),
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/ring");
    let write_seeds = std::env::var_os("VCMDQ_WRITE_SEEDS").is_some();
    if write_seeds {
        std::fs::create_dir_all(&dir).unwrap();
    }
    for (name, log2size, ops) in seeds {
        let mut bytes = vec![log2size];
        ops.iter().for_each(|o| bytes.extend(o));
        bytes.push(0);
        let p = dir.join(format!("seed-{name}"));
        if write_seeds {
            std::fs::write(&p, &bytes).unwrap();
        } else {
            let have = std::fs::read(&p)
                .unwrap_or_else(|e| panic!("{}: {e}; VCMDQ_WRITE_SEEDS=1 writes it", p.display()));
            assert_eq!(have, bytes, "{} is stale", p.display());
        }
    }
}
