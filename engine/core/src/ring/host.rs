//! The engine's side of a ring. The memory is hostile and shared: the guest may write any byte
//! at any time, so the engine reads PROD once per poll, copies each slot out exactly once,
//! masks every index, and keeps its own copies of the words it owns (CONS, ERR, SYNC_COUNT)
//! instead of reading them back.
//!
//! The engine never maps a file that can shrink (see `access.rs`): nothing a guest or any other
//! process does to a ring file can raise a signal in the engine.
//!
//! A ring's registers and its slots are two memories ([`QueueRegisters`], [`QueueSlots`]); the
//! ring format is one backing of both, the header as registers and the rest as slots.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::access::{FileRing, HostMemory};
use super::layout;
use super::memory::{self, HeapMemory, MmapMemory, Region, RingMemory};
use super::regs::{HeaderRegisters, QueueRegisters};
use super::slots::{MemorySlots, QueueSlots};
use super::{identity_of, new_region, shape_for, validate, validate_identity, RingError};
use crate::command::RawCommand;
use crate::queue::{cons_err, runs, with_cons_err, CError, QueueShape};

/// How [`HostRing::attach_with`] treats a file it did not create.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttachOptions {
    /// Accept a file that is not a memfd sealed with F_SEAL_SHRINK. The engine never maps such
    /// a file: it reads and writes it with `pread`/`pwrite`, a few system calls per poll and
    /// per batch, so a file truncated under it is an error for that ring
    /// ([`RingError::Shrunk`]), never a SIGBUS. Slower than a sealed memfd, and a truncate
    /// racing the engine's write of CONS can extend the file again: for files a trusted process
    /// writes (tests, the trace replayer).
    pub allow_unsealed: bool,
}

/// What one [`HostRing::poll`] copied out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Polled {
    /// The pointer (index and wrap) of `out[0]`; entry `i` came from `first + i`.
    pub first: u32,
    /// Entries copied into `out[..n]`; 0 when the ring is idle, stopped, or PROD is invalid.
    pub n: usize,
}

/// What a ring has seen, for reports and tests. Counted by polls, not by events: a PROD left
/// backwards for ten polls counts ten.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Calls to `poll`.
    pub polls: u64,
    /// Entries copied out.
    pub copied: u64,
    /// Polls that found PROD behind the engine's read pointer but not behind CONS.
    pub prod_backwards: u64,
    /// Polls that found PROD more than 2^LOG2SIZE entries ahead of CONS (or behind it).
    pub prod_overrun: u64,
    /// Stops with an error.
    pub stops: u64,
    /// Error acknowledgements seen.
    pub acks: u64,
    /// Guest CMD_SYNCs signalled.
    pub syncs: u64,
}

/// Why a ring is dead, kept to be reported again ([`RingError`] holds an `io::Error`, which
/// cannot be cloned).
#[derive(Debug)]
enum Failure {
    /// The memory is shorter than the ring: [`RingError::Shrunk`].
    Shrunk { path: PathBuf, len: u64, need: u64 },
    /// Any other error, as its memory, operation and message.
    Other {
        path: PathBuf,
        op: &'static str,
        why: String,
    },
}

#[derive(Clone, Copy, Debug)]
struct Stop {
    at: u32,
    cerror: CError,
    resume: u32,
}

/// The engine's end of one guest ring.
///
/// Pointers: CONS ≤ read ≤ PROD (in ring order). Entries in [CONS, read) have been copied out
/// and belong to the engine until it [`complete`](HostRing::complete)s or
/// [`stop`](HostRing::stop)s them; [read, PROD) are pending.
///
/// A `HostRing` of the ring format holds its ring's one-engine lock for as long as it lives: a
/// second `HostRing` of the same ring, in this process or another, is refused with
/// [`RingError::AlreadyAttached`]. Dropping it releases the lock.
#[derive(Debug)]
pub struct HostRing {
    // Trait objects, not type parameters: the engine calls the registers once per poll (PROD),
    // per batch (CONS) and per guest CMD_SYNC, and the slots at most twice per poll (one call
    // per contiguous run copies the whole run), never once per command, so an indirect call
    // costs a few nanoseconds per batch. In exchange `HostRing` stays one type: the engine,
    // its workers and every caller hold any backing without being generic over it, and a new
    // backing is a new implementation, not a change to the engine.
    regs: Box<dyn QueueRegisters>,
    slots: Box<dyn QueueSlots>,
    /// Which memories can go away under the engine and are checked on every poll:
    /// (registers, slots). Neither for sealed memory; for an unsealed ring file only the
    /// slots, whose check covers the whole file (one `fstat` per poll, not two).
    check: (bool, bool),
    /// The memory a same-process guest shares, kept only to hand back from
    /// [`HostRing::memory`]; the engine reaches it through `regs` and `slots` alone.
    shared: Option<Arc<dyn RingMemory>>,
    shape: QueueShape,
    viommu_id: u32,
    read: u32,
    cons: u32,
    err: u32,
    stop: Option<Stop>,
    syncs: u64,
    /// The backing file failed (shrank, or a read or write failed): nothing is read or written
    /// any more, and every poll reports it.
    dead: bool,
    /// The error of a failed write, reported by the next poll.
    pending: Option<RingError>,
    /// The first failure: what every poll of the dead ring reports, even once a file that
    /// shrank has grown back.
    failure: Option<Failure>,
    stats: RingStats,
}

impl HostRing {
    /// Attaches a ring file the engine did not create; refuses an unsealed one (see
    /// [`AttachOptions`]).
    pub fn attach(path: impl AsRef<Path>) -> Result<HostRing, RingError> {
        Self::attach_with(path, AttachOptions::default())
    }

    /// Attaches a ring file: checks magic, version, LOG2SIZE and size, takes the ring's
    /// one-engine lock, and maps it if it is sealed against shrinking; an unsealed file is
    /// refused unless `opts` allow it, and then read with system calls, never mapped.
    pub fn attach_with(path: impl AsRef<Path>, opts: AttachOptions) -> Result<HostRing, RingError> {
        let path = path.as_ref();
        let file = memory::open_rw(path)?;
        if memory::has_shrink_seal(&file) {
            let mem: Arc<dyn RingMemory> =
                Arc::new(MmapMemory::from_file(file, path.to_path_buf())?);
            return Self::attach_inner(HostMemory::Mapped(Region::new(mem.clone())), Some(mem));
        }
        if !opts.allow_unsealed {
            return Err(RingError::Unsealed {
                path: path.to_path_buf(),
            });
        }
        let file = FileRing::new(file, path.to_path_buf());
        Self::attach_inner(HostMemory::File(Arc::new(file)), None)
    }

    /// Attaches a ring in memory another handle shares (a [`GuestRing::memory`](super::GuestRing::memory)).
    /// Unsealed file memory is refused unless `opts` allow it, and then read through its file
    /// with system calls, never through the shared mapping.
    ///
    /// The engine takes over where the ring is: CONS as the memory holds it (masked), its error
    /// state, its sync count. A fresh ring starts at 0.
    pub fn attach_memory(
        mem: Arc<dyn RingMemory>,
        opts: AttachOptions,
    ) -> Result<HostRing, RingError> {
        if mem.sealed() {
            return Self::attach_inner(HostMemory::Mapped(Region::new(mem.clone())), Some(mem));
        }
        let unsealed = || RingError::Unsealed {
            path: mem.name().to_path_buf(),
        };
        if !opts.allow_unsealed {
            return Err(unsealed());
        }
        // Memory that may shrink and has no file to read instead is never touched.
        let file = mem.file().ok_or_else(unsealed)?;
        let file = file.try_clone().map_err(|source| RingError::Io {
            path: mem.name().to_path_buf(),
            op: "dup",
            source,
        })?;
        let path = mem.name().to_path_buf();
        Self::attach_inner(
            HostMemory::File(Arc::new(FileRing::new(file, path))),
            Some(mem),
        )
    }

    /// Builds the engine side of a guest queue from its two memories: `registers` (PROD, CONS
    /// and the error and completion words) and `slots` (at least 2^`log2size` of them), for
    /// vIOMMU `viommu_id`. The two may live anywhere: a register page and guest RAM, two heap
    /// blocks, or the header and the rest of one ring ([`HostRing::attach_memory`] does that).
    ///
    /// The engine takes over where the registers are, as [`HostRing::attach_memory`] does.
    /// Refuses a LOG2SIZE above 19 ([`RingError::BadLog2Size`]) and slot memory that holds
    /// fewer than 2^`log2size` slots ([`RingError::SlotsTooSmall`]). Whatever one-engine rule
    /// the memories need is theirs to keep ([`HeaderRegisters`] holds the ring's lock).
    pub fn from_parts(
        registers: impl QueueRegisters + 'static,
        slots: impl QueueSlots + 'static,
        log2size: u8,
        viommu_id: u32,
    ) -> Result<HostRing, RingError> {
        let shape = QueueShape::new(log2size).map_err(|_| RingError::BadLog2Size {
            path: registers.name().to_path_buf(),
            found: log2size.into(),
        })?;
        let (have, need) = (slots.capacity(), u64::from(shape.entries()));
        if have < need {
            return Err(RingError::SlotsTooSmall {
                path: slots.name().to_path_buf(),
                have,
                log2size,
                need,
            });
        }
        Self::assemble(Box::new(registers), Box::new(slots), shape, viommu_id, None)
    }

    /// Validates a ring-format memory's header and builds its engine side: the header as
    /// registers, the rest as slots. `shared` is what [`HostRing::memory`] hands back.
    fn attach_inner(
        mem: HostMemory,
        shared: Option<Arc<dyn RingMemory>>,
    ) -> Result<HostRing, RingError> {
        // The creator line first: a file that is no ring is refused as such, whoever holds it.
        // Nothing the engine owns is read or written before the lock is held.
        let (shape, viommu_id) = match &mem {
            HostMemory::Mapped(region) => validate(region)?,
            HostMemory::File(f) => {
                let io = |op, source| RingError::Io {
                    path: mem.name().to_path_buf(),
                    op,
                    source,
                };
                let len = mem.backing_len().map_err(|e| io("stat", e))?;
                let need = (layout::HEADER_SIZE + layout::SLOT_SIZE) as u64;
                let header = match f.read_header() {
                    Ok(h) => h,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        return Err(RingError::TooSmall {
                            path: mem.name().to_path_buf(),
                            len,
                            need,
                        })
                    }
                    Err(e) => return Err(io("read", e)),
                };
                validate_identity(mem.name(), identity_of(&header), len)?
            }
        };
        let need = layout::ring_bytes(shape) as u64;
        let regs = HeaderRegisters::over(mem.clone(), need)?;
        let entries = shape.entries().into();
        let slots = MemorySlots::over(mem, layout::HEADER_SIZE, entries, need);
        let mut ring = Self::assemble(Box::new(regs), Box::new(slots), shape, viommu_id, shared)?;
        // One file, one length: the slots' check (the whole ring) is the registers' too.
        ring.check.0 = false;
        Ok(ring)
    }

    /// The engine side over `regs` and `slots`, taking over where the registers are: CONS as
    /// they hold it (masked), its error state, its sync count.
    fn assemble(
        regs: Box<dyn QueueRegisters>,
        slots: Box<dyn QueueSlots>,
        shape: QueueShape,
        viommu_id: u32,
        shared: Option<Arc<dyn RingMemory>>,
    ) -> Result<HostRing, RingError> {
        let check = (regs.may_shrink(), slots.may_shrink());
        let mut ring = HostRing {
            regs,
            slots,
            check,
            shared,
            shape,
            viommu_id,
            read: 0,
            cons: 0,
            err: 0,
            stop: None,
            syncs: 0,
            dead: false,
            pending: None,
            failure: None,
            stats: RingStats::default(),
        };
        let snap = match ring.regs.snapshot() {
            Ok(s) => s,
            Err(e) => return Err(ring.fail(e)),
        };
        let (cons_word, err, ack, syncs) =
            (snap.cons, snap.err & 1, snap.err_ack & 1, snap.sync_count);
        let cons = shape.ptr(cons_word);
        (ring.read, ring.cons, ring.err, ring.syncs) = (cons, cons, err, syncs);
        if err != ack {
            // Stopped by an earlier engine and not yet acknowledged: stay stopped there.
            let cerror = match CError::from_code(cons_err(cons_word)) {
                None | Some(CError::None) => CError::Ill,
                Some(e) => e,
            };
            ring.stop = Some(Stop {
                at: cons,
                cerror,
                resume: cons,
            });
            ring.store_cons(with_cons_err(cons, cerror.code()));
        } else {
            ring.store_cons(cons);
        }
        match ring.pending.take() {
            Some(e) => Err(e),
            None => Ok(ring),
        }
    }

    /// Creates a ring in a memfd sealed against shrinking and growing, attached: the way to
    /// share a ring with another process. A guest opens [`HostRing::path`]
    /// (`/proc/<pid>/fd/<n>`) with [`GuestRing::open`](super::GuestRing::open) while this ring
    /// lives.
    pub fn create_sealed(log2size: u8, viommu_id: u32) -> Result<HostRing, RingError> {
        let shape = shape_for(log2size)?;
        let mem = MmapMemory::create_sealed("vcmdq-ring", layout::ring_bytes(shape))?;
        let region = new_region(Arc::new(mem), shape, viommu_id);
        Self::attach_memory(region.memory().clone(), AttachOptions::default())
    }

    /// Creates a ring on the heap, attached; a guest side shares it through
    /// [`HostRing::memory`] and [`GuestRing::from_memory`](super::GuestRing::from_memory).
    pub fn create_heap(log2size: u8, viommu_id: u32) -> Result<HostRing, RingError> {
        let shape = shape_for(log2size)?;
        let mem = HeapMemory::new(layout::ring_bytes(shape));
        let region = new_region(Arc::new(mem), shape, viommu_id);
        Self::attach_memory(region.memory().clone(), AttachOptions::default())
    }

    /// The ring's memory, for a guest side in the same process; `None` for an unsealed file
    /// attached by path, which the engine reads with system calls and never maps, and for a
    /// queue built [`from_parts`](HostRing::from_parts).
    pub fn memory(&self) -> Option<Arc<dyn RingMemory>> {
        self.shared.clone()
    }

    /// The ring's file (`<heap>` for heap memory); for a queue built from parts, the name of
    /// its registers.
    pub fn path(&self) -> &Path {
        self.regs.name()
    }

    /// The vIOMMU named in the header when the ring was attached (read once: a guest
    /// rewriting the header later changes nothing).
    pub fn viommu_id(&self) -> u32 {
        self.viommu_id
    }

    /// The queue geometry, read once at attach.
    pub fn shape(&self) -> QueueShape {
        self.shape
    }

    /// Whether the ring's memory cannot shrink (sealed memfd or heap) and is accessed through a
    /// mapping; `false` for an unsealed file, read with system calls (or any registers or slots
    /// that say they may shrink).
    pub fn sealed(&self) -> bool {
        self.check == (false, false)
    }

    /// The word the engine sleeps on for this ring ([`QueueRegisters::wake_word`]); `None` if
    /// the ring has none and must be polled.
    pub fn wake_word(&self) -> Option<&std::sync::atomic::AtomicU32> {
        if self.dead {
            return None;
        }
        self.regs.wake_word()
    }

    /// CONS as the engine last wrote it (index and wrap).
    pub fn cons_ptr(&self) -> u32 {
        self.cons
    }

    /// The engine's read pointer: the next slot `poll` copies.
    pub fn read_ptr(&self) -> u32 {
        self.read
    }

    /// The slot and error the ring is stopped on, until the guest acknowledges.
    pub fn stopped(&self) -> Option<(u32, CError)> {
        self.stop.map(|s| (s.at, s.cerror))
    }

    /// Counters.
    pub fn stats(&self) -> RingStats {
        self.stats
    }

    /// Checks that the backing file still holds the ring: [`RingError::Shrunk`] when it was
    /// truncated, or an I/O error. Free for sealed memory.
    pub fn check_size(&self) -> Result<(), RingError> {
        if self.check.0 {
            self.regs.check()?;
        }
        if self.check.1 {
            self.slots.check()?;
        }
        Ok(())
    }

    /// Whether the ring's file failed (shrank, or a read or write failed): the engine must
    /// detach it; nothing is read or written any more.
    pub fn failed(&self) -> bool {
        self.dead
    }

    /// Marks the ring dead after `e` (the registers or slots already said why: a short read of
    /// a truncated file is [`RingError::Shrunk`]) and hands `e` back.
    #[cold]
    fn fail(&mut self, e: RingError) -> RingError {
        self.dead = true;
        if self.failure.is_none() {
            self.failure = Some(match &e {
                RingError::Shrunk { path, len, need } => Failure::Shrunk {
                    path: path.clone(),
                    len: *len,
                    need: *need,
                },
                RingError::Io { path, op, .. } => Failure::Other {
                    path: path.clone(),
                    op,
                    why: e.to_string(),
                },
                _ => Failure::Other {
                    path: self.regs.name().to_path_buf(),
                    op: "access",
                    why: e.to_string(),
                },
            });
        }
        e
    }

    /// What a poll of a dead ring reports.
    #[cold]
    fn dead_error(&mut self) -> RingError {
        if let Some(e) = self.pending.take() {
            return e;
        }
        match &self.failure {
            Some(Failure::Shrunk { path, len, need }) => {
                return RingError::Shrunk {
                    path: path.clone(),
                    len: *len,
                    need: *need,
                }
            }
            Some(Failure::Other { path, op, why }) => {
                return RingError::Io {
                    path: path.clone(),
                    op,
                    source: io::Error::other(format!("the ring failed earlier: {why}")),
                }
            }
            None => {}
        }
        match self.check_size() {
            Err(e) => e,
            Ok(()) => RingError::Io {
                path: self.regs.name().to_path_buf(),
                op: "read",
                source: io::Error::other("an earlier access to the ring's file failed"),
            },
        }
    }

    /// Copies up to `out.len()` new entries out of the ring.
    ///
    /// Reads PROD once (Acquire) and copies each entry between the read pointer and PROD with
    /// atomic loads (or, for an unsealed file, one `pread` per contiguous run); the engine must
    /// look only at `out`, never at the ring. While the ring is stopped it checks for the
    /// guest's acknowledgement instead and copies nothing until then; the acknowledgement
    /// clears CONS.ERR and reading resumes (see [`HostRing::stop`]).
    ///
    /// A hostile PROD copies nothing: one more than 2^LOG2SIZE ahead of CONS (equivalently,
    /// behind CONS) counts in [`RingStats::prod_overrun`]; one between CONS and the read
    /// pointer counts in [`RingStats::prod_backwards`] and the entries already copied stay
    /// taken. Polling goes on normally once PROD is valid again.
    ///
    /// Errors only for an unsealed file: one that shrank (checked on every poll, and a short
    /// read is one too) gives [`RingError::Shrunk`], a failed read or write an I/O error. The
    /// ring is then dead: every later poll errs, nothing is read or written, and the engine must
    /// detach it.
    pub fn poll(&mut self, out: &mut [RawCommand]) -> Result<Polled, RingError> {
        self.stats.polls += 1;
        if self.dead {
            return Err(self.dead_error());
        }
        if self.check != (false, false) {
            if let Err(e) = self.check_size() {
                return Err(self.fail(e));
            }
        }
        let idle = Polled {
            first: self.read,
            n: 0,
        };
        if let Some(stop) = self.stop {
            // Acquire: the slot the guest fixed before acknowledging is visible to the re-read.
            let ack = match self.regs.err_ack() {
                Ok(a) => a,
                Err(e) => return Err(self.fail(e)),
            };
            if ack & 1 != self.err {
                return Ok(idle);
            }
            self.stop = None;
            self.stats.acks += 1;
            self.read = stop.resume;
            self.store_cons(self.cons);
            if self.dead {
                return Err(self.dead_error());
            }
        }
        let prod = match self.regs.prod() {
            Ok(p) => self.shape.ptr(p),
            Err(e) => return Err(self.fail(e)),
        };
        let ahead = self.shape.distance(prod, self.cons);
        let taken = self.shape.distance(self.read, self.cons);
        if ahead > self.shape.entries() {
            self.stats.prod_overrun += 1;
            return Ok(idle);
        }
        if ahead < taken {
            self.stats.prod_backwards += 1;
            return Ok(idle);
        }
        let n = ((ahead - taken) as usize).min(out.len());
        if n == 0 {
            return Ok(idle);
        }
        let entries = self.shape.entries() as usize;
        let [head, tail] = runs(entries, self.shape.index(self.read) as usize, n);
        let first_run = head.len();
        let mut copied = self
            .slots
            .copy_out(head.start as u32, &mut out[..first_run]);
        if copied.is_ok() && !tail.is_empty() {
            copied = self
                .slots
                .copy_out(tail.start as u32, &mut out[first_run..n]);
        }
        if let Err(e) = copied {
            return Err(self.fail(e));
        }
        self.read = self.shape.advance(self.read, n as u32);
        self.stats.copied += n as u64;
        Ok(Polled {
            first: idle.first,
            n,
        })
    }

    /// Moves CONS to `upto` (Release): the guest sees every entry before it consumed and may
    /// reuse those slots. The engine must not move CONS past a guest CMD_SYNC it has not
    /// completed: a guest that polls CONS takes that as the sync's completion.
    ///
    /// # Panics
    /// If the ring is stopped or `upto` is not between CONS and the read pointer: a bug in the
    /// engine, never something a guest can cause.
    pub fn complete(&mut self, upto: u32) {
        assert!(
            self.stop.is_none(),
            "HostRing::complete({upto:#x}) on a ring stopped at {:#x}",
            self.cons
        );
        let upto = self.check_taken("complete", upto);
        self.cons = upto;
        self.store_cons(upto);
    }

    /// Moves the read pointer back to `to` (between CONS and the read pointer): entries copied
    /// at or after `to` are given back and read again by a later poll. For entries the engine
    /// copied but did not act on, e.g. those after a trapped command the ring must pause at.
    ///
    /// # Panics
    /// If the ring is stopped or `to` is not between CONS and the read pointer.
    pub fn rewind(&mut self, to: u32) {
        assert!(
            self.stop.is_none(),
            "HostRing::rewind({to:#x}) on a stopped ring"
        );
        self.read = self.check_taken("rewind", to);
    }

    /// Stops the ring at `at` with `cerror`: CONS = `at` with CONS.ERR, then the error flag is
    /// raised (ERR bit 0 made to differ from ERR_ACK bit 0). Entries before `at` count as
    /// consumed, so the same caveat about guest CMD_SYNCs as for [`HostRing::complete`] holds.
    ///
    /// The read pointer goes back to `at`: entries the engine had copied at or after `at` are
    /// dropped and, after the guest acknowledges, read again from the ring, starting with the
    /// (possibly fixed) slot `at`. Right when nothing at or after `at` has been forwarded, the
    /// case for a command the engine refuses itself. For a fault on a command already
    /// forwarded, see [`HostRing::stop_resume_at`].
    ///
    /// # Panics
    /// If `cerror` is `CError::None`, the ring is already stopped, or `at` is not between CONS
    /// and the read pointer.
    pub fn stop(&mut self, at: u32, cerror: CError) {
        self.stop_resume_at(at, cerror, at);
    }

    /// Stops the ring at `at` as [`HostRing::stop`] does, but after the acknowledgement reading
    /// resumes at `resume` (between `at` and the read pointer): entries in [`at`, `resume`)
    /// are not read again, the fixed slot `at` included. For a physical-queue fault on a
    /// command the engine had already forwarded along with the entries up to `resume`: the
    /// guest sees the error at its slot, and nothing is forwarded twice. CONS stays at `at`
    /// until the engine completes past `resume`.
    ///
    /// # Panics
    /// As [`HostRing::stop`], and if `resume` is not between `at` and the read pointer.
    pub fn stop_resume_at(&mut self, at: u32, cerror: CError, resume: u32) {
        assert!(cerror != CError::None, "HostRing::stop with CERROR_NONE");
        assert!(
            self.stop.is_none(),
            "HostRing::stop({at:#x}) on a ring already stopped at {:#x}",
            self.cons
        );
        let at = self.check_taken("stop", at);
        let resume = self.shape.ptr(resume);
        assert!(
            self.shape.distance(resume, at) <= self.shape.distance(self.read, at),
            "HostRing::stop: resume {resume:#x} is not between {at:#x} and the read pointer {:#x}",
            self.read
        );
        self.cons = at;
        self.read = resume;
        self.stop = Some(Stop { at, cerror, resume });
        self.stats.stops += 1;
        self.store_cons(with_cons_err(at, cerror.code()));
        // Raise the flag against whatever ERR_ACK holds now, so a guest that toggled ERR_ACK
        // early cannot pre-acknowledge the error.
        let ack = if self.dead {
            0
        } else {
            match self.regs.err_ack() {
                Ok(a) => a & 1,
                Err(e) => {
                    let e = self.fail(e);
                    self.pending.get_or_insert(e);
                    0
                }
            }
        };
        self.err = ack ^ 1;
        // Release: a guest that sees the flag (Acquire) sees CONS and CONS.ERR.
        if !self.dead {
            let r = self.regs.set_err(self.err);
            self.note(r);
        }
    }

    /// Completes a guest CMD_SYNC: with CS=IRQ (1), MSIDATA goes into the completion word; for
    /// every CS the sync count goes up by one (Release). The MSI address is a guest address
    /// and is never written; nothing outside the ring is.
    pub fn signal_sync(&mut self, cs: u8, msidata: u32) {
        // The count is taken over from the registers at attach, so a guest chooses where it
        // starts: it wraps, as a 64-bit hardware counter would.
        self.syncs = self.syncs.wrapping_add(1);
        self.stats.syncs += 1;
        if !self.dead {
            let r = self
                .regs
                .sync_completed((cs == CS_IRQ).then_some(msidata), self.syncs);
            self.note(r);
        }
    }

    /// [`HostRing::signal_sync`] with CS (`d0[13:12]`) and MSIDATA (`d0[63:32]`) of a guest
    /// CMD_SYNC.
    pub fn signal_sync_of(&mut self, cmd_sync: &RawCommand) {
        let d0 = cmd_sync.d0();
        self.signal_sync(((d0 >> 12) & 3) as u8, (d0 >> 32) as u32);
    }

    /// Guest CMD_SYNCs completed on this ring.
    pub fn sync_count(&self) -> u64 {
        self.syncs
    }

    /// Stores CONS (with CONS.ERR); a dead ring is not written at all.
    fn store_cons(&mut self, value: u32) {
        if !self.dead {
            let r = self.regs.set_cons(value);
            self.note(r);
        }
    }

    /// Keeps the outcome of a write to the registers: a failure (an unsealed file that shrank,
    /// say) makes the ring dead and is reported by the next poll.
    #[inline]
    fn note(&mut self, r: Result<(), RingError>) {
        if let Err(e) = r {
            let e = self.fail(e);
            self.pending.get_or_insert(e);
        }
    }

    /// `ptr` masked, after checking it lies in [CONS, read].
    fn check_taken(&self, what: &str, ptr: u32) -> u32 {
        let ptr = self.shape.ptr(ptr);
        assert!(
            self.shape.distance(ptr, self.cons) <= self.shape.distance(self.read, self.cons),
            "HostRing::{what}({ptr:#x}) is not between CONS {:#x} and the read pointer {:#x}",
            self.cons,
            self.read
        );
        ptr
    }
}

/// CMD_SYNC CS value for "signal with an MSI".
const CS_IRQ: u8 = 1;
