//! A hostile guest against the engine side of a ring, checked step by step against a model.
//!
//! The input is a LOG2SIZE (0..=6; bit 7 set puts the ring in a plain file instead of the heap)
//! and a list of operations. The guest side writes slots,
//! pushes and rings the doorbell, stores any PROD, scribbles any header word (the identity
//! line and the words the engine owns included) and acknowledges errors; the engine side polls,
//! completes, stops, resumes past forwarded entries, signals CMD_SYNCs and re-attaches (which
//! must be refused while the old engine side holds the ring). For a file ring, another process
//! truncates or extends the file at any point: the engine side reads it with system calls, so
//! that must be an error for that ring (every poll from the next one that sees the file short),
//! never a signal, and nothing the engine writes after that. The guest side maps the file, so
//! the driver keeps it away from a file shorter than the ring. The driver only ever calls the engine with arguments `HostRing` documents as valid, so any panic
//! is a bug the guest can trigger.
//!
//! The model keeps a shadow of every slot and header word the guest or the engine writes and
//! the engine's pointers as absolute (unwrapped) positions. It checks, after every operation:
//! - a poll returns exactly the entries between the read pointer and a valid PROD (no more than
//!   the out buffer or the ring holds), starting at the read pointer (`first`): nothing is
//!   skipped and nothing returned twice, except what a stop rewinds (from `at` up to `resume`);
//! - each entry is the content of its slot at the moment of the poll (a single thread: that is
//!   the only instant between the doorbell and the copy), and `out` past `n` is untouched;
//! - CONS, CONS.ERR, ERR, SYNC_COUNT and COMPLETION in memory are what the engine last wrote
//!   there or what the guest scribbled since: the engine never reads them back;
//! - the engine's pointers, stop state and counters agree with the model;
//! - at the end, the engine never wrote a slot.
//!
//! Seeds (`corpus/ring/seed-*`) are inputs in `arbitrary`'s byte format, written and checked by
//! the `ring_fuzz_seeds` test in `engine/core/tests/ring.rs`, which encodes operations by their
//! variant index: keep `Op` and `Code` in the order that test lists. `cargo fuzz fmt ring <file>`
//! prints a seed as operations.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vcmdq::command::RawCommand;
use vcmdq::queue::{cons_err, with_cons_err, CError, QueueShape};
use vcmdq::ring::layout;
use vcmdq::ring::{heap_pair, AttachOptions, GuestRing, HostRing, RingError, RingStats};

#[derive(Arbitrary, Debug)]
struct Input {
    log2size: u8,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Code {
    Ill,
    Abt,
    AtcInvSync,
    IllAccess,
}

impl Code {
    fn cerror(self) -> CError {
        match self {
            Code::Ill => CError::Ill,
            Code::Abt => CError::Abt,
            Code::AtcInvSync => CError::AtcInvSync,
            Code::IllAccess => CError::IllAccess,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// The guest writes one slot, any slot, any time.
    WriteSlot { ptr: u32, d0: u64, d1: u64 },
    /// The guest pushes `n` fresh commands (as many as its view of CONS lets it), and rings the
    /// doorbell if asked.
    Push { n: u8, doorbell: bool },
    /// The guest stores any value into PROD.
    WriteProd(u32),
    /// The guest stores `value` into header word `word` (of 64; a 64-bit field takes all 64
    /// bits of `value`).
    Scribble { word: u8, value: u64 },
    /// The guest acknowledges the error (ERR_ACK = ERR, as `GuestRing::ack_error` does).
    AckError,
    /// The engine polls with an out buffer of `k % 72` entries.
    Poll { k: u8 },
    /// The engine completes up to a pointer between CONS and its read pointer.
    Complete { upto: u8 },
    /// The engine stops the ring at a pointer between CONS and its read pointer.
    Stop { at: u8, code: Code },
    /// As `Stop`, resuming at a pointer between `at` and the read pointer.
    StopResumeAt { at: u8, resume: u8, code: Code },
    /// The engine completes a guest CMD_SYNC.
    SignalSync { cs: u8, msidata: u32 },
    /// The engine detaches and attaches the ring again, taking over whatever the header holds.
    Reattach,
    /// Another process sets a file ring's length: `len` modulo the ring's size plus one, or
    /// the full size with bit 15 set. Nothing for a heap ring.
    Resize { len: u16 },
}

/// What the engine side is in the model. Positions are absolute (never wrap): a pointer is a
/// position reduced by the host shape.
#[derive(Debug)]
struct Engine {
    shape: QueueShape,
    viommu_id: u32,
    cons: u64,
    read: u64,
    err: u32,
    /// `at`, the error, `resume`.
    stop: Option<(u64, CError, u64)>,
    syncs: u64,
    stats: RingStats,
}

impl Engine {
    fn ptr(&self, pos: u64) -> u32 {
        self.shape.ptr(pos as u32)
    }

    /// A position in `[lo, hi]` chosen by `pick`.
    fn pick(lo: u64, hi: u64, pick: u8) -> u64 {
        lo + u64::from(pick) % (hi - lo + 1)
    }
}

/// The shadow of the ring's memory and the model of both sides.
#[derive(Debug)]
struct Model {
    /// The guest's (and the memory's) shape; the engine's may differ after a scribbled
    /// LOG2SIZE and a re-attach.
    shape: QueueShape,
    slots: Vec<RawCommand>,
    /// Header words, 32 bits each, in memory order; the two 64-bit fields span two words.
    header: [u32; layout::HEADER_SIZE / 4],
    /// The guest's own PROD (`GuestRing::prod`).
    guest_prod: u32,
    next_cmd: u64,
    engine: Engine,
    /// A file ring's length now; `None` for a heap ring.
    file_len: Option<u64>,
    /// The engine side saw its file fail: it reads and writes nothing more.
    dead: bool,
}

const W_PROD: usize = layout::OFF_PROD / 4;
const W_ERR_ACK: usize = layout::OFF_ERR_ACK / 4;
const W_CONS: usize = layout::OFF_CONS / 4;
const W_ERR: usize = layout::OFF_ERR / 4;
const W_COMPLETION: usize = layout::OFF_COMPLETION / 4;

/// What `out` holds where the engine wrote nothing.
const UNTOUCHED: RawCommand = RawCommand::new(0xdead_beef_dead_beef, 0xfeed_f00d_feed_f00d);

impl Model {
    fn new(shape: QueueShape, viommu_id: u32) -> Model {
        let mut header = [0u32; layout::HEADER_SIZE / 4];
        header[0] = layout::MAGIC as u32;
        header[1] = (layout::MAGIC >> 32) as u32;
        header[layout::OFF_VERSION / 4] = layout::VERSION;
        header[layout::OFF_HEADER_SIZE / 4] = layout::HEADER_SIZE as u32;
        header[layout::OFF_LOG2SIZE / 4] = shape.log2size().into();
        header[layout::OFF_VIOMMU_ID / 4] = viommu_id;
        Model {
            shape,
            slots: vec![RawCommand::default(); shape.entries() as usize],
            header,
            guest_prod: 0,
            next_cmd: 1,
            engine: Engine {
                shape,
                viommu_id,
                cons: 0,
                read: 0,
                err: 0,
                stop: None,
                syncs: 0,
                stats: RingStats::default(),
            },
            file_len: None,
            dead: false,
        }
    }

    /// Bytes of the guest's ring.
    fn full(&self) -> u64 {
        layout::ring_bytes(self.shape) as u64
    }

    /// Whether the guest may touch its mapping: every page of it is backed by the file.
    fn guest_safe(&self) -> bool {
        self.file_len.is_none_or(|len| len >= self.full())
    }

    /// The engine stores header word `w` (a u32): nothing once dead; a store past the end of a
    /// file extends it.
    fn engine_store(&mut self, w: usize, value: u32) {
        if self.dead {
            return;
        }
        if let Some(len) = &mut self.file_len {
            *len = (*len).max(w as u64 * 4 + 4);
        }
        self.header[w] = value;
    }

    /// The engine loads header bytes `off..off + size`: `None` (and the ring is dead) if the
    /// file is shorter.
    fn engine_load_ok(&mut self, off: usize, size: usize) -> bool {
        if self.file_len.is_some_and(|len| len < (off + size) as u64) {
            self.dead = true;
        }
        !self.dead
    }

    /// Another process sets the file's length: bytes past it read as zero from now on.
    fn resize(&mut self, len: u64) {
        fn keep(value: u64, off: u64, size: u64, len: u64) -> u64 {
            if len <= off {
                0
            } else if len >= off + size {
                value
            } else {
                value & ((1u64 << (8 * (len - off))) - 1)
            }
        }
        for (w, word) in self.header.iter_mut().enumerate() {
            *word = keep(u64::from(*word), w as u64 * 4, 4, len) as u32;
        }
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let off = (layout::HEADER_SIZE + layout::SLOT_SIZE * i) as u64;
            *slot = RawCommand::new(
                keep(slot.d0(), off, 8, len),
                keep(slot.d1(), off + 8, 8, len),
            );
        }
        self.file_len = Some(len);
    }

    fn u64_word(&self, off: usize) -> u64 {
        u64::from(self.header[off / 4]) | u64::from(self.header[off / 4 + 1]) << 32
    }

    fn set_u64_word(&mut self, off: usize, value: u64) {
        self.header[off / 4] = value as u32;
        self.header[off / 4 + 1] = (value >> 32) as u32;
    }

    /// A fresh command, distinct in both words from every other one this run.
    fn fresh(&mut self) -> RawCommand {
        let i = self.next_cmd;
        self.next_cmd += 1;
        RawCommand::new(i << 8 | 0x5a, !i)
    }

    /// The memory CONS as the guest reads it.
    fn guest_cons(&self) -> (u32, CError) {
        let word = self.header[W_CONS];
        (
            self.shape.ptr(word),
            CError::from_code(cons_err(word)).unwrap_or(CError::Ill),
        )
    }

    /// What `HostRing::attach_memory` makes of the header now: `None` if it must refuse it.
    fn attach(&self) -> Option<Engine> {
        let magic = self.u64_word(layout::OFF_MAGIC);
        let log2size = self.header[layout::OFF_LOG2SIZE / 4];
        if magic != layout::MAGIC
            || self.header[layout::OFF_VERSION / 4] != layout::VERSION
            || self.header[layout::OFF_HEADER_SIZE / 4] != layout::HEADER_SIZE as u32
            // Valid LOG2SIZE, and the memory (sized for the guest's shape) holds that many slots.
            || log2size > u32::from(self.shape.log2size())
        {
            return None;
        }
        if let Some(len) = self.file_len {
            let shape = QueueShape::new(log2size as u8).expect("at most the guest's LOG2SIZE");
            if len < layout::ring_bytes(shape) as u64 {
                return None;
            }
        }
        let shape = QueueShape::new(log2size as u8).expect("at most the guest's LOG2SIZE");
        let cons_word = self.header[W_CONS];
        let cons = u64::from(shape.ptr(cons_word));
        let err = self.header[W_ERR] & 1;
        let stop = (err != self.header[W_ERR_ACK] & 1).then(|| {
            let cerror = match CError::from_code(cons_err(cons_word)) {
                None | Some(CError::None) => CError::Ill,
                Some(e) => e,
            };
            (cons, cerror, cons)
        });
        Some(Engine {
            shape,
            viommu_id: self.header[layout::OFF_VIOMMU_ID / 4],
            cons,
            read: cons,
            err,
            stop,
            syncs: self.u64_word(layout::OFF_SYNC_COUNT),
            stats: RingStats::default(),
        })
    }

    /// The model's poll: the entries a poll with `k` out entries must return and their first
    /// position.
    fn poll(&mut self, k: usize) -> (u64, Vec<RawCommand>) {
        self.engine.stats.polls += 1;
        let need = layout::ring_bytes(self.engine.shape) as u64;
        if self.dead || self.file_len.is_some_and(|len| len < need) {
            self.dead = true;
            return (self.engine.read, Vec::new());
        }
        let e = &mut self.engine;
        if let Some((_, _, resume)) = e.stop {
            if self.header[W_ERR_ACK] & 1 != e.err {
                return (e.read, Vec::new());
            }
            e.stop = None;
            e.stats.acks += 1;
            e.read = resume;
            let cons = e.ptr(e.cons);
            self.engine_store(W_CONS, cons);
        }
        let e = &mut self.engine;
        let entries = u64::from(e.shape.entries());
        let prod = e.shape.ptr(self.header[W_PROD]);
        // How far the guest claims PROD is ahead of CONS: at most a lap, by the pointer rules.
        let ahead = u64::from(e.shape.distance(prod, e.ptr(e.cons)));
        let taken = e.read - e.cons;
        assert!(taken <= entries, "model: taken {taken} > {entries}");
        if ahead > entries {
            e.stats.prod_overrun += 1;
            return (e.read, Vec::new());
        }
        if ahead < taken {
            e.stats.prod_backwards += 1;
            return (e.read, Vec::new());
        }
        let n = (ahead - taken).min(k as u64);
        let first = e.read;
        let got = (first..first + n)
            .map(|pos| self.slots[e.shape.index(pos as u32) as usize])
            .collect();
        e.read += n;
        e.stats.copied += n;
        (first, got)
    }

    /// Raises the error flag as `HostRing::stop_resume_at` does.
    fn stop(&mut self, at: u64, cerror: CError, resume: u64) {
        let e = &mut self.engine;
        e.cons = at;
        e.read = resume;
        e.stop = Some((at, cerror, resume));
        e.stats.stops += 1;
        let cons = with_cons_err(e.ptr(at), cerror.code());
        self.engine_store(W_CONS, cons);
        let ack = if self.engine_load_ok(layout::OFF_ERR_ACK, 4) {
            self.header[W_ERR_ACK] & 1
        } else {
            0
        };
        self.engine.err = ack ^ 1;
        self.engine_store(W_ERR, self.engine.err);
    }
}

/// Everything both sides can observe agrees with the model.
fn check(model: &Model, guest: &GuestRing, host: &HostRing) {
    let e = &model.engine;
    assert_eq!(host.shape(), e.shape);
    assert_eq!(host.viommu_id(), e.viommu_id);
    assert_eq!(host.cons_ptr(), e.ptr(e.cons), "engine CONS");
    assert_eq!(host.read_ptr(), e.ptr(e.read), "engine read pointer");
    assert!(e.read - e.cons <= u64::from(e.shape.entries()));
    assert!(e.shape.distance(host.read_ptr(), host.cons_ptr()) <= e.shape.entries());
    assert_eq!(
        host.stopped(),
        e.stop.map(|(at, cerror, _)| (e.ptr(at), cerror)),
        "stop state"
    );
    assert_eq!(host.stats(), e.stats);
    assert_eq!(host.sync_count(), e.syncs);
    assert_eq!(host.failed(), model.dead, "dead");

    assert_eq!(guest.prod(), model.guest_prod);
    if !model.guest_safe() {
        return;
    }
    assert_eq!(guest.published_prod(), model.header[W_PROD]);
    assert_eq!(guest.cons(), model.guest_cons(), "CONS in memory");
    let flag = (model.header[W_ERR] ^ model.header[W_ERR_ACK]) & 1 != 0;
    assert_eq!(guest.error(), flag.then(|| model.guest_cons()), "ERR");
    assert_eq!(guest.sync_count(), model.u64_word(layout::OFF_SYNC_COUNT));
    assert_eq!(guest.completion(), model.header[W_COMPLETION]);
}

/// A file ring's file, for `Resize`.
struct Backing {
    path: std::path::PathBuf,
    file: std::fs::File,
}

impl Drop for Backing {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn step(
    op: &Op,
    model: &mut Model,
    guest: &mut GuestRing,
    host: &mut HostRing,
    backing: Option<&Backing>,
) {
    let shape = model.shape;
    let guest_op = matches!(
        op,
        Op::WriteSlot { .. }
            | Op::Push { .. }
            | Op::WriteProd(_)
            | Op::Scribble { .. }
            | Op::AckError
    );
    if guest_op && !model.guest_safe() {
        return;
    }
    match *op {
        Op::WriteSlot { ptr, d0, d1 } => {
            let cmd = RawCommand::new(d0, d1);
            guest.write_slot(ptr, cmd);
            model.slots[shape.index(ptr) as usize] = cmd;
        }
        Op::Push { n, doorbell } => {
            let cmds: Vec<_> = (0..n).map(|_| model.fresh()).collect();
            let free = shape.free(model.guest_prod, model.guest_cons().0);
            let want = (free as usize).min(cmds.len());
            assert_eq!(guest.push(&cmds), want, "push with {free} free");
            for (i, c) in cmds[..want].iter().enumerate() {
                model.slots[shape.index(shape.advance(model.guest_prod, i as u32)) as usize] = *c;
            }
            model.guest_prod = shape.advance(model.guest_prod, want as u32);
            if doorbell {
                guest.doorbell();
                model.header[W_PROD] = model.guest_prod;
            }
        }
        Op::WriteProd(value) => {
            guest.write_prod_raw(value);
            model.header[W_PROD] = value;
        }
        Op::Scribble { word, value } => {
            let off = usize::from(word % 64) * 4;
            let field64 = [layout::OFF_MAGIC, layout::OFF_SYNC_COUNT]
                .into_iter()
                .find(|f| (*f..*f + 8).contains(&off));
            if let Some(f) = field64 {
                guest.write_header_u64(f, value);
                model.set_u64_word(f, value);
            } else {
                guest.write_header_u32(off, value as u32);
                model.header[off / 4] = value as u32;
            }
        }
        Op::AckError => {
            guest.ack_error();
            model.header[W_ERR_ACK] = model.header[W_ERR] & 1;
        }
        Op::Poll { k } => {
            let k = usize::from(k % 72);
            let mut out = vec![UNTOUCHED; k];
            let polled = host.poll(&mut out);
            let (first, want) = model.poll(k);
            let polled = match polled {
                Ok(p) => {
                    assert!(!model.dead, "a poll of a ring whose file is short read it");
                    p
                }
                Err(e) => {
                    assert!(model.dead, "a poll failed: {e}");
                    assert!(
                        matches!(e, RingError::Shrunk { .. }),
                        "a short file gives Shrunk: {e}"
                    );
                    assert!(out.iter().all(|c| *c == UNTOUCHED), "out of a failed poll");
                    return;
                }
            };
            let e = &model.engine;
            assert_eq!(polled.n, want.len(), "entries polled");
            assert!(polled.n <= k && polled.n <= e.shape.entries() as usize);
            assert!(
                polled.first <= e.shape.ptr_mask(),
                "first {:#x}",
                polled.first
            );
            if polled.n > 0 {
                assert_eq!(polled.first, e.ptr(first), "first");
            }
            assert_eq!(&out[..polled.n], &want[..], "entries from {first:#x}");
            assert!(
                out[polled.n..].iter().all(|c| *c == UNTOUCHED),
                "out past n"
            );
        }
        Op::Complete { upto } => {
            let e = &mut model.engine;
            if e.stop.is_none() {
                let upto = Engine::pick(e.cons, e.read, upto);
                host.complete(e.ptr(upto));
                e.cons = upto;
                let cons = e.ptr(upto);
                model.engine_store(W_CONS, cons);
            }
        }
        Op::Stop { at, code } => {
            let e = &model.engine;
            if e.stop.is_none() {
                let at = Engine::pick(e.cons, e.read, at);
                host.stop(e.ptr(at), code.cerror());
                model.stop(at, code.cerror(), at);
            }
        }
        Op::StopResumeAt { at, resume, code } => {
            let e = &model.engine;
            if e.stop.is_none() {
                let at = Engine::pick(e.cons, e.read, at);
                let resume = Engine::pick(at, e.read, resume);
                host.stop_resume_at(e.ptr(at), code.cerror(), e.ptr(resume));
                model.stop(at, code.cerror(), resume);
            }
        }
        Op::SignalSync { cs, msidata } => {
            host.signal_sync(cs, msidata);
            let e = &mut model.engine;
            e.syncs = e.syncs.wrapping_add(1);
            e.stats.syncs += 1;
            let syncs = e.syncs;
            if cs == 1 {
                model.engine_store(W_COMPLETION, msidata);
            }
            if !model.dead {
                let end = (layout::OFF_SYNC_COUNT + 8) as u64;
                if let Some(len) = &mut model.file_len {
                    *len = (*len).max(end);
                }
                model.set_u64_word(layout::OFF_SYNC_COUNT, syncs);
            }
        }
        Op::Reattach => {
            let opts = AttachOptions {
                allow_unsealed: backing.is_some(),
            };
            // While the old engine side lives, the ring has an engine: a ring that is one is
            // refused as taken, one that is not as what is wrong with it.
            let want = model.attach();
            match HostRing::attach_memory(guest.memory(), opts) {
                Ok(_) => panic!("a second engine side attached a ring"),
                Err(RingError::AlreadyAttached { .. }) => {
                    assert!(want.is_some(), "taken, but the model refuses {want:?}")
                }
                Err(e) => assert!(want.is_none(), "{e}, the model attaches {want:?}"),
            }
            if want.is_none() {
                return;
            }
            let placeholder = HostRing::create_heap(0, 0).expect("a heap ring");
            drop(std::mem::replace(host, placeholder));
            let attached = HostRing::attach_memory(guest.memory(), opts);
            match (attached, want) {
                (Ok(h), Some(engine)) => {
                    *host = h;
                    model.dead = false;
                    model.header[W_CONS] = match engine.stop {
                        Some((at, cerror, _)) => with_cons_err(engine.ptr(at), cerror.code()),
                        None => engine.ptr(engine.cons),
                    };
                    model.engine = engine;
                }
                (Err(_), None) => {}
                (got, want) => panic!("attach gave {got:?}, the model {want:?}"),
            }
        }
        Op::Resize { len } => {
            if let Some(b) = backing {
                let full = model.full();
                let len = if len & 0x8000 != 0 {
                    full
                } else {
                    u64::from(len) % (full + 1)
                };
                b.file.set_len(len).expect("set a ring file's length");
                model.resize(len);
            }
        }
    }
}

/// A ring in a fresh plain file: the guest maps it, the engine reads it with system calls.
fn file_pair(log2size: u8) -> (GuestRing, HostRing, Backing) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "vcmdq-fuzz-ring-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let guest = GuestRing::create(&path, log2size, 0x600d).expect("a ring file");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open the ring file");
    let backing = Backing { path, file };
    let opts = AttachOptions {
        allow_unsealed: true,
    };
    let host = HostRing::attach_memory(guest.memory(), opts).expect("attach the ring file");
    (guest, host, backing)
}

fuzz_target!(|input: Input| {
    let log2size = (input.log2size & 0x7f) % 7;
    let (mut guest, mut host, backing) = if input.log2size & 0x80 != 0 {
        let (g, h, b) = file_pair(log2size);
        (g, h, Some(b))
    } else {
        let (g, h) = heap_pair(log2size, 0x600d).expect("LOG2SIZE 0..=6");
        (g, h, None)
    };
    let mut model = Model::new(guest.shape(), 0x600d);
    if backing.is_some() {
        model.file_len = Some(model.full());
    }
    check(&model, &guest, &host);
    for op in &input.ops {
        step(op, &mut model, &mut guest, &mut host, backing.as_ref());
        check(&model, &guest, &host);
    }
    // The engine never writes a slot.
    if model.guest_safe() {
        for (i, want) in model.slots.iter().enumerate() {
            assert_eq!(guest.read_slot(i as u32), *want, "slot {i}");
        }
    }
    // The guest's mapping goes before the file does.
    drop(guest);
    drop(host);
    drop(backing);
});
