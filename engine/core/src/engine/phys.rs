//! The seam between the engine and a physical command queue: an SMMUv3 CMDQ (or a VCMDQ of a
//! CMDQV) as a worker sees it, from the producer's side.
//!
//! A worker owns one [`PhysicalQueue`]. It asks how much room there is, writes a batch into the
//! slots after PROD ([`PhysicalQueue::reserve`]) and publishes it with one PROD store
//! ([`PhysicalQueue::commit`]); it learns from CONS what was consumed, and when the queue
//! stops on an error (CONS.ERR, GERROR.CMDQ_ERR) it takes back what it no longer wants
//! consumed ([`PhysicalQueue::retract`]) and has the queue repaired and restarted
//! ([`PhysicalQueue::recover`]).
//!
//! A queue whose `reserve` builds its [`Slots`] with [`Slots::reserved`] (it vouches that
//! nothing else touches them until the commit) has them written as plain memory by the
//! translation itself; one built with [`Slots::of_ring`] gets each command stored separately
//! from a worker buffer. Both are correct; the first saves a copy per command.
//!
//! Positions are free-running u64 counts of entries since the queue was made: the worker keeps
//! provenance by position, and a CMD_SYNC at position `p` has completed once
//! [`PhysicalQueue::consumed`] is above `p`.
//!
//! The modelled SMMU (`crate::hwmodel::ModelQueue`) is one implementation; `tests/phys_seam.rs`
//! holds another. A new one is a new type implementing this trait, handed to
//! [`Engine::start`](super::Engine::start): the worker does not change.

use crate::command::RawCommand;
use crate::queue::{CError, QueueShape};
use crate::sync::{AtomicU64, Ordering};

/// One 16-byte entry of a physical command queue, as the producer writes it: two 64-bit words
/// stored Relaxed. They become visible to the consumer through the Release store of PROD in
/// [`PhysicalQueue::commit`]. `repr(transparent)` over the words, so an implementation whose
/// slots live in memory it maps can view that memory as `[CmdSlot]`.
#[derive(Debug)]
#[repr(transparent)]
pub struct CmdSlot([AtomicU64; 2]);

impl Default for CmdSlot {
    fn default() -> CmdSlot {
        CmdSlot::new()
    }
}

impl CmdSlot {
    /// An empty slot (all zero).
    pub fn new() -> CmdSlot {
        CmdSlot([AtomicU64::new(0), AtomicU64::new(0)])
    }

    /// Stores `cmd`. Relaxed: the PROD store that publishes the slot orders it.
    #[inline]
    pub fn write(&self, cmd: RawCommand) {
        self.0[0].store(cmd.d0(), Ordering::Relaxed);
        self.0[1].store(cmd.d1(), Ordering::Relaxed);
    }

    /// The command in the slot. Relaxed: the reader has synchronised with the writer (PROD
    /// Acquire for the consumer; the producer reads only its own or a stopped queue's slots).
    #[inline]
    pub fn read(&self) -> RawCommand {
        RawCommand::new(
            self.0[0].load(Ordering::Relaxed),
            self.0[1].load(Ordering::Relaxed),
        )
    }
}

/// The slots after PROD that [`PhysicalQueue::reserve`] hands out: at most two contiguous runs,
/// up to the end of the ring and then from slot 0. Writing them publishes nothing; a
/// [`PhysicalQueue::commit`] does.
///
/// Not `Clone`: a reservation is one writer's. One made with [`Slots::reserved`] (whose maker
/// vouches that nobody else touches the slots until they are committed) can be written as plain
/// memory through [`Slots::into_runs_mut`], so that the worker translates straight into the
/// physical queue; one made with [`Slots::of_ring`] is written a command at a time.
#[derive(Debug)]
pub struct Slots<'a> {
    head: &'a [CmdSlot],
    tail: &'a [CmdSlot],
    /// Made by [`Slots::reserved`]: nobody else reads or writes these slots while they live.
    #[cfg_attr(any(loom, not(target_endian = "little")), allow(dead_code))]
    exclusive: bool,
}

impl<'a> Slots<'a> {
    /// The `n` slots of `ring` from index `start` on, wrapping to slot 0. `start` must be below
    /// `ring.len()` and `n` at most `ring.len()` (a caller bug otherwise: panics).
    #[inline]
    pub fn of_ring(ring: &'a [CmdSlot], start: usize, n: usize) -> Slots<'a> {
        let [head, tail] = crate::queue::runs(ring.len(), start, n);
        Slots {
            head: &ring[head],
            tail: &ring[tail],
            exclusive: false,
        }
    }

    /// [`Slots::of_ring`] for slots the caller hands out for the writer's sole use, which
    /// [`Slots::into_runs_mut`] may then view as plain memory.
    ///
    /// # Safety
    /// Until the returned `Slots` (and anything [`Slots::into_runs_mut`] made of it) is dropped,
    /// nothing but it reads or writes these `n` slots: the consumer has finished with them (the
    /// caller learnt that through an Acquire load of CONS, or the queue is stopped) and will
    /// not read them before a Release store of PROD that covers them; no other `Slots` over
    /// them exists. A queue's `reserve` from `&mut self`, on slots after PROD that CONS has
    /// passed, meets this.
    #[inline]
    pub unsafe fn reserved(ring: &'a [CmdSlot], start: usize, n: usize) -> Slots<'a> {
        Slots {
            exclusive: true,
            ..Slots::of_ring(ring, start, n)
        }
    }

    /// The two runs, in order (the second empty when the slots do not wrap).
    #[inline]
    pub fn runs(&self) -> [&'a [CmdSlot]; 2] {
        [self.head, self.tail]
    }

    /// Slots reserved.
    #[inline]
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// Whether no slot was reserved.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes `cmd` into reserved slot `i` (0 is the slot at PROD). Panics if `i` is not
    /// below [`Slots::len`], as a slice index does.
    #[inline]
    pub fn write(&self, i: usize, cmd: RawCommand) {
        match self.head.get(i) {
            Some(slot) => slot.write(cmd),
            None => self.tail[i - self.head.len()].write(cmd),
        }
    }

    /// The command in reserved slot `i`, as written (Relaxed loads: only the writer reads
    /// reserved slots). Panics if `i` is not below [`Slots::len`].
    #[inline]
    pub fn read(&self, i: usize) -> RawCommand {
        match self.head.get(i) {
            Some(slot) => slot.read(),
            None => self.tail[i - self.head.len()].read(),
        }
    }

    /// Writes `cmds` into the first `cmds.len()` reserved slots. Panics if there are fewer.
    #[inline]
    pub fn fill(&self, cmds: &[RawCommand]) {
        assert!(
            cmds.len() <= self.len(),
            "more commands than reserved slots"
        );
        let (a, b) = cmds.split_at(cmds.len().min(self.head.len()));
        for (slot, cmd) in self.head.iter().zip(a) {
            slot.write(*cmd);
        }
        for (slot, cmd) in self.tail.iter().zip(b) {
            slot.write(*cmd);
        }
    }

    /// The two runs as plain commands the writer stores into directly (whole vectors at a
    /// time, where the translation kernels write four commands with one store), for slots made
    /// by [`Slots::reserved`]; `Err(self)` for slots made by [`Slots::of_ring`], under loom
    /// (its atomics are not memory), and on a big-endian host (a slot's words are native
    /// `u64`s, a `RawCommand`'s little-endian).
    ///
    /// A command stored here is read by the consumer's Relaxed loads after the Release store of
    /// PROD in [`PhysicalQueue::commit`]: a plain store ordered before an atomic load by
    /// happens-before, which the memory model allows (and miri checks:
    /// `runs_mut_stores_reach_a_consumer_on_another_thread`).
    #[inline]
    pub fn into_runs_mut(self) -> Result<[&'a mut [RawCommand]; 2], Slots<'a>> {
        #[cfg(all(not(loom), target_endian = "little"))]
        if self.exclusive {
            let view = |run: &'a [CmdSlot]| {
                // SAFETY: a `CmdSlot` is two `AtomicU64`s (`repr(transparent)`), 16 bytes with
                // the interior mutability of `UnsafeCell`, so writing through a pointer derived
                // from the shared slice is allowed; a `RawCommand` is 16 bytes of alignment 1
                // whose every bit pattern is valid, little-endian like the host's `u64`s. The
                // `&mut` is unique: `exclusive` says the slots' maker vouched (the contract of
                // `Slots::reserved`) that nothing else touches them while this borrow of 'a
                // lives, and `self` is consumed, so no second view is made of them.
                unsafe {
                    core::slice::from_raw_parts_mut(
                        run.as_ptr().cast::<RawCommand>().cast_mut(),
                        run.len(),
                    )
                }
            };
            return Ok([view(self.head), view(self.tail)]);
        }
        Err(self)
    }
}

/// A reservation or publication that does not fit in the queue's room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("physical queue full: {room} free slots for {wanted} commands")]
pub struct Full {
    /// Free slots.
    pub room: u32,
    /// Commands offered.
    pub wanted: usize,
}

/// The error a physical queue stopped on: CONS points at the failing command, with CONS.ERR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsError {
    /// Free-running position of the failing command (CONS points at it).
    pub pos: u64,
    /// CONS.ERR.
    pub cerror: CError,
    /// The failing command as it was in the queue.
    pub cmd: RawCommand,
}

/// A physical command queue as an engine worker sees it: the producer's end. One worker owns
/// it, so nothing here needs a lock; the publish path (`room`, `reserve`, `commit`) must not
/// allocate, lock, or make an atomic read-modify-write per command.
///
/// Dispatch: [`Engine::start`](super::Engine::start) is generic over the queue type, so each
/// worker is compiled for its queue and these calls are static (a few per batch, none per
/// command but the slot stores). An engine with queues of different kinds takes
/// `Box<dyn PhysicalQueue>`, which implements this trait too: one indirect call per method
/// then, still per batch, never per command.
pub trait PhysicalQueue: Send + 'static {
    /// The queue geometry (LOG2SIZE). Must not change while the queue is in use.
    fn shape(&self) -> QueueShape;

    /// Slots free for a batch: entries minus those published and not yet consumed.
    fn room(&self) -> u32;

    /// The `n` slots after PROD, to be written and then published by [`PhysicalQueue::commit`].
    /// Moves nothing: a second `reserve` hands out the same slots. [`Full`] if `n` exceeds
    /// [`PhysicalQueue::room`].
    fn reserve(&mut self, n: usize) -> Result<Slots<'_>, Full>;

    /// Publishes the first `n` slots after PROD, which the caller has written through
    /// [`PhysicalQueue::reserve`], with one PROD store (Release, or the barrier the hardware
    /// needs). Returns the new free-running PROD. [`Full`] (and nothing published) if `n`
    /// exceeds [`PhysicalQueue::room`].
    fn commit(&mut self, n: usize) -> Result<u64, Full>;

    /// Writes `cmds` and publishes them with one PROD store: all or nothing. Returns the new
    /// free-running PROD.
    fn publish(&mut self, cmds: &[RawCommand]) -> Result<u64, Full> {
        publish_reserved(self, cmds)
    }

    /// The free-running PROD: entries published so far.
    fn published(&self) -> u64;

    /// Entries consumed, free-running: from CONS. Never above [`PhysicalQueue::published`];
    /// while the queue is stopped on an error, the position of the failing command.
    fn consumed(&self) -> u64;

    /// The error the queue is stopped on, if any (CONS.ERR with GERROR.CMDQ_ERR not yet
    /// acknowledged).
    fn error(&self) -> Option<ConsError>;

    /// While the queue is stopped on an error, makes the unconsumed command at `pos` a no-op
    /// (a CMD_SYNC with CS=none): how the worker takes back what it published for a guest
    /// ring the error stops. False, and nothing written, when the queue is not stopped or `pos`
    /// is not in [error position, published).
    fn retract(&mut self, pos: u64) -> bool;

    /// Repairs the queue after an error as Linux does (CERROR_ILL: the failing command becomes
    /// a CMD_SYNC; CERROR_ABT and CERROR_ATC_INV_SYNC: retried as they are), acknowledges it
    /// (GERRORN), and returns it; consumption restarts at CONS. `None` when not stopped.
    fn recover(&mut self) -> Option<ConsError>;

    /// Called by the worker once per pass, from its thread: an implementation whose consumer
    /// runs on the worker's thread (the model stepped inline) advances it here and says whether
    /// anything moved. A queue consumed elsewhere (real hardware, a consumer thread) does
    /// nothing.
    fn progress(&mut self) -> bool {
        false
    }
}

/// [`PhysicalQueue::publish`] built on `reserve` and `commit`: what the default does, for an
/// implementation that overrides `publish` to do something first.
pub fn publish_reserved<Q: PhysicalQueue + ?Sized>(
    q: &mut Q,
    cmds: &[RawCommand],
) -> Result<u64, Full> {
    q.reserve(cmds.len())?.fill(cmds);
    q.commit(cmds.len())
}

impl<Q: PhysicalQueue + ?Sized> PhysicalQueue for Box<Q> {
    #[inline]
    fn shape(&self) -> QueueShape {
        (**self).shape()
    }
    #[inline]
    fn room(&self) -> u32 {
        (**self).room()
    }
    #[inline]
    fn reserve(&mut self, n: usize) -> Result<Slots<'_>, Full> {
        (**self).reserve(n)
    }
    #[inline]
    fn commit(&mut self, n: usize) -> Result<u64, Full> {
        (**self).commit(n)
    }
    #[inline]
    fn publish(&mut self, cmds: &[RawCommand]) -> Result<u64, Full> {
        (**self).publish(cmds)
    }
    #[inline]
    fn published(&self) -> u64 {
        (**self).published()
    }
    #[inline]
    fn consumed(&self) -> u64 {
        (**self).consumed()
    }
    #[inline]
    fn error(&self) -> Option<ConsError> {
        (**self).error()
    }
    #[inline]
    fn retract(&mut self, pos: u64) -> bool {
        (**self).retract(pos)
    }
    #[inline]
    fn recover(&mut self) -> Option<ConsError> {
        (**self).recover()
    }
    #[inline]
    fn progress(&mut self) -> bool {
        (**self).progress()
    }
}
