//! One translating worker: its rings, its physical queue, its pass loop.

use super::phys::PhysicalQueue;
use super::stats::{AuditRecord, EngineStats, RingProgress};
use super::{Ctrl, EngineConfig, RingId, Shared, TrapEvent};
use crate::command::{opcode, RawCommand};
use crate::queue::{runs, CError};
use crate::ring::wake::{self, Wait, FUTEX_WAITV_MAX};
use crate::ring::{HostRing, RingError};
use crate::sync::{lock, Backoff};
use crate::translate::{translate_numbered, BatchEnd, Stop};
use crate::viommu::{Reader, Viommu};
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a worker keeps polling after its last pass that found work before it announces
/// that it sleeps: a guest that submits again within this time is served without a kick or a
/// wake-up. Longer costs more CPU after each burst; shorter sends more guests through the
/// futex wake (tens of microseconds).
pub const IDLE_SPIN: Duration = Duration::from_micros(50);

/// The longest a worker sleeps unless [`EngineConfig::sleep_timeout`] says otherwise: it then
/// polls every ring once and sleeps again, so a guest that never kicks (one written before
/// SLEEPING existed) is still served, this late at most.
pub const SLEEP_TIMEOUT: Duration = Duration::from_millis(100);

/// The physical CMD_SYNC the engine appends to a batch that ends in a guest CMD_SYNC. CS=none:
/// the worker polls CONS, as Linux does without MSIs; the guest's MSI address is never used.
const PHYS_SYNC: RawCommand = RawCommand::new(opcode::CMD_SYNC as u64, 0);

/// Batches in flight per ring at most, so `inflight` never reallocates on the hot path.
const MAX_INFLIGHT: usize = 1024;

/// What to do once the physical queue has consumed up to `Pending::phys`.
#[derive(Clone, Copy, Debug)]
enum Action {
    /// CONS moves to `guest_end`.
    Advance,
    /// CONS moves past the guest CMD_SYNC (`guest_end` includes it) and it is signalled.
    Sync { cs: u8, msidata: u32 },
    /// The ring stops at `guest_end` with CONS.ERR.
    Stop { cerror: CError },
    /// CONS moves to `guest_end`, where the trapped command sits; it goes to the control plane.
    Trap { cmd: RawCommand },
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    /// Free-running physical position after the batch (and its CMD_SYNC).
    phys: u64,
    /// Guest pointer CONS moves to.
    guest_end: u32,
    /// Physical entries the batch took (its commands and its CMD_SYNC).
    entries: u32,
    action: Action,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pause {
    Running,
    /// A stop or a trap is queued behind commands in flight: read nothing more until it is
    /// applied (a stopped ring then waits inside `HostRing` for the guest's acknowledgement).
    Draining,
    /// The control plane holds the trapped command at this guest pointer.
    Trapped {
        slot: u32,
    },
}

struct RingState {
    id: RingId,
    host: HostRing,
    viommu: Arc<Viommu>,
    progress: Arc<RingProgress>,
    inflight: VecDeque<Pending>,
    pause: Pause,
    detach: bool,
    /// Sequence number of the host's read pointer (entries read since attach).
    read_seq: u64,
    /// The ring's memory failed; it leaves at the end of the pass.
    failed: Option<RingError>,
    /// Capture: the ring was stopped here, and the guest's fix and acknowledgement are still to
    /// be recorded.
    stopped_at: Option<u32>,
    /// Capture: entries before this sequence number are recorded.
    captured_seq: u64,
    /// Physical entries of this ring published and not yet retired: at most the ring budget,
    /// so that a flooding ring holds no more of the physical queue than one pass's share
    /// however fast passes come while the hardware works.
    phys_inflight: usize,
}

impl RingState {
    /// Queues a pending record and counts its physical entries in flight.
    fn track(&mut self, p: Pending) {
        self.phys_inflight += p.entries as usize;
        self.inflight.push_back(p);
    }

    /// Forgets every pending record (a fault or a failure voided them).
    fn clear_inflight(&mut self) {
        self.inflight.clear();
        self.phys_inflight = 0;
    }

    /// Sequence number of the guest pointer `ptr`, which lies between CONS and the read pointer.
    fn seq_of(&self, ptr: u32) -> u64 {
        let shape = self.host.shape();
        self.read_seq - u64::from(shape.distance(self.host.read_ptr(), ptr))
    }

    /// The sequence number whose low 32 bits are `tag` (a physical slot's provenance), for an
    /// entry read and not yet completed: at most a ring's entries below the read pointer.
    fn seq_of_tag(&self, tag: u32) -> u64 {
        self.read_seq - u64::from((self.read_seq as u32).wrapping_sub(tag))
    }

    /// The guest pointer of the entry with sequence number `seq`, read and not yet completed.
    fn ptr_of_seq(&self, seq: u64) -> u32 {
        let back = (self.read_seq - seq) as u32;
        self.host
            .shape()
            .advance(self.host.read_ptr(), back.wrapping_neg())
    }
}

/// The ring of a physical slot that carries nothing of a guest.
const NO_RING: u32 = u32::MAX;

/// A batch just published for a ring, as [`Issuer::settle`] needs it.
#[derive(Clone, Copy)]
struct Batch {
    /// Guest pointer of its first input entry.
    first: u32,
    /// Free-running physical position it starts at.
    pos0: u64,
    /// Free-running physical position after it (and its CMD_SYNC).
    phys: u64,
    /// Sequence number of its first input entry.
    seq0: u64,
    /// Entries of the poll before it.
    done: usize,
}

/// The part of a worker that issues commands to its physical command queue: it translates what
/// a guest ring holds, writes the batches after PROD and publishes them, and follows CONS
/// until they are consumed (then completes the guest's CONS and CMD_SYNC), or until the queue
/// stops on an error at one of them. Named for what SMMUv3 software does to a command queue,
/// issue commands to it. It holds everything of a worker but its rings and its grace-period
/// reader, so that a pass can lend it one ring at a time.
struct Issuer<Q> {
    batch_limit: usize,
    ring_budget: usize,
    audit_on: bool,
    shared: Arc<Shared>,
    producer: Q,
    /// Provenance of each physical slot, by index: the ring it came from ([`NO_RING`] for
    /// none)...
    tag_ring: Vec<u32>,
    /// ... and the low 32 bits of the guest entry's sequence number, which the translation
    /// writes as it writes the slot.
    tag_seq: Vec<u32>,
    /// The one copy of what a poll read from the guest's slots (atomic loads, once per slot):
    /// the engine judges this copy, never memory the guest can still write. Not fused into the
    /// translation: a SIMD group that fails its vector check is examined again by the scalar
    /// loop, which would read those guest slots a second time (and could judge bytes the guest
    /// changed in between), and a capture records the bytes judged. It costs a store and a
    /// load per word in L1 (`ring_read/poll` 0.46 ns an entry in all), against the guest's
    /// lines crossing cores, which any reader pays.
    inbuf: Vec<RawCommand>,
    /// Where a batch is translated when the physical queue's slots cannot be written as plain
    /// memory ([`Slots::into_runs_mut`](super::phys::Slots::into_runs_mut)), and where the
    /// audit reads a batch's commands back.
    out: Vec<RawCommand>,
    /// Provenance of `out`: input indices of the batch.
    prov: Vec<u32>,
    stats: EngineStats,
    audit: Vec<AuditRecord>,
}

/// What a worker hands back when it ends.
pub(super) struct Report {
    pub(super) audit: Vec<AuditRecord>,
}

/// Generic over its physical queue, so that the queue's methods are called statically (see
/// [`PhysicalQueue`]).
pub(super) struct Worker<Q> {
    index: usize,
    issuer: Issuer<Q>,
    reader: Reader,
    rings: Vec<RingState>,
    next_ring: usize,
    /// `futex_waitv` failed with something other than a wake or a timeout (ENOSYS before Linux
    /// 5.16): this worker polls with the backoff from then on.
    no_futex: bool,
    /// [`EngineConfig::sleep_timeout`].
    sleep_timeout: Duration,
}

impl<Q: PhysicalQueue> Worker<Q> {
    pub(super) fn new(index: usize, cfg: &EngineConfig, shared: Arc<Shared>, producer: Q) -> Self {
        let entries = producer.shape().entries() as usize;
        let batch_limit = cfg.batch_limit.max(1);
        Worker {
            index,
            reader: shared.grace.register(),
            issuer: Issuer {
                batch_limit,
                ring_budget: cfg.ring_budget.max(1),
                audit_on: cfg.audit,
                shared,
                producer,
                tag_ring: vec![NO_RING; entries],
                tag_seq: vec![0; entries],
                inbuf: vec![RawCommand::default(); cfg.ring_budget.max(1)],
                // The batch's commands and its physical CMD_SYNC.
                out: vec![RawCommand::default(); batch_limit + 1],
                prov: vec![0; batch_limit + 1],
                stats: EngineStats::default(),
                audit: Vec::new(),
            },
            rings: Vec::new(),
            next_ring: 0,
            no_futex: false,
            sleep_timeout: cfg.sleep_timeout,
        }
    }

    /// Runs passes until shutdown is asked and everything taken has completed. The queue is
    /// dropped on return, on this thread.
    ///
    /// Idle, it polls for [`IDLE_SPIN`], then sleeps on its futexes (see [`Worker::sleep`]) if
    /// it can, and otherwise keeps polling with a backoff that ends in 50 us sleeps.
    pub(super) fn run(mut self) -> Report {
        let mut idle = 0u32;
        let mut idle_since = Instant::now();
        loop {
            let stopping = self.issuer.shared.stopping.load(Ordering::Acquire);
            let work = self.pass(stopping);
            if work {
                idle = 0;
                self.issuer.shared.stats[self.index].store(&self.issuer.stats);
                continue;
            }
            if stopping && self.quiescent() {
                break;
            }
            if idle == 0 {
                idle_since = Instant::now();
            }
            idle = idle.saturating_add(1);
            // Sleeping needs nothing in flight: the physical queue moves without a kick.
            let may_sleep = !stopping && !self.no_futex && self.quiescent();
            if may_sleep && idle_since.elapsed() >= IDLE_SPIN {
                if self.sleep() {
                    idle = 0;
                    self.issuer.shared.stats[self.index].store(&self.issuer.stats);
                    continue;
                }
            } else if may_sleep {
                spin(idle);
                continue;
            }
            IDLE_BACKOFF.pause(idle);
        }
        self.issuer.shared.stats[self.index].store(&self.issuer.stats);
        let mut detached = lock(&self.issuer.shared.detached);
        for r in self.rings.drain(..) {
            if let Some(w) = r.host.wake_word() {
                w.store(0, Ordering::Relaxed);
            }
            detached.insert(r.id, (r.host, None));
        }
        drop(detached);
        Report {
            audit: std::mem::take(&mut self.issuer.audit),
        }
    }

    /// Announces that this worker sleeps (SLEEPING = 1 on each ring and on its own word),
    /// re-checks every ring with a pass, and only if that finds nothing sleeps in
    /// `futex_waitv` until a guest kicks, the control plane sends a message, or
    /// [`SLEEP_TIMEOUT`]. False if it cannot sleep: a ring without a SLEEPING word (a register
    /// page, an unsealed file), more rings than `futex_waitv` takes, or no `futex_waitv`.
    fn sleep(&mut self) -> bool {
        let words = self.rings.iter().map(|r| r.host.wake_word());
        if self.rings.len() >= FUTEX_WAITV_MAX || words.clone().any(|w| w.is_none()) {
            return false;
        }
        let own = &self.issuer.shared.wake[self.index];
        own.store(1, Ordering::SeqCst);
        for w in words.flatten() {
            w.store(1, Ordering::SeqCst);
        }
        // Pairs with the guest's fence between its PROD store and its load of SLEEPING (and the
        // control plane's between its message and its load of the worker's word): either the
        // pass below sees what they published, or they see SLEEPING = 1 and kick.
        fence(Ordering::SeqCst);
        #[cfg(feature = "mock")]
        super::hooks::before_recheck();
        let stopping = self.issuer.shared.stopping.load(Ordering::Acquire);
        if self.pass(stopping) || stopping || !self.quiescent() {
            self.issuer.stats.sleep_rechecks += 1;
            self.awake();
            return true;
        }
        // No work, so no control message: the rings are those announced above.
        let own = &self.issuer.shared.wake[self.index];
        let mut waits: Vec<&AtomicU32> = Vec::with_capacity(self.rings.len() + 1);
        waits.push(own);
        waits.extend(self.rings.iter().filter_map(|r| r.host.wake_word()));
        let slept = wake::wait_any(&waits, self.sleep_timeout);
        drop(waits);
        match slept {
            Wait::Woken => self.issuer.stats.sleeps += 1,
            Wait::TimedOut => {
                self.issuer.stats.sleeps += 1;
                self.issuer.stats.sleep_timeouts += 1;
            }
            Wait::Unsupported => {
                self.no_futex = true;
                eprintln!(
                    "vcmdq: worker {}: futex_waitv is not available (Linux >= 5.16 has it); \
                     idle workers poll with a backoff instead of sleeping",
                    self.index
                );
            }
        }
        self.awake();
        true
    }

    /// Withdraws the announcement: guests need not kick while the worker polls.
    fn awake(&self) {
        self.issuer.shared.wake[self.index].store(0, Ordering::Relaxed);
        for w in self.rings.iter().filter_map(|r| r.host.wake_word()) {
            w.store(0, Ordering::Relaxed);
        }
    }

    fn quiescent(&self) -> bool {
        let p = &self.issuer.producer;
        p.error().is_none()
            && p.consumed() == p.published()
            && self.rings.iter().all(|r| r.inflight.is_empty())
    }

    /// One pass over everything this worker owns; true if anything moved.
    fn pass(&mut self, stopping: bool) -> bool {
        let mut work = self.control();
        work |= self.issuer.producer.progress();
        work |= self.issuer.physical_fault(&mut self.rings);
        let n = self.rings.len();
        for k in 0..n {
            let r = &mut self.rings[(self.next_ring + k) % n];
            work |= self.issuer.retire(r);
            if !stopping {
                work |= self.issuer.serve(r, &mut self.reader);
            }
        }
        if n > 0 {
            self.next_ring = (self.next_ring + 1) % n;
        }
        work
    }

    /// Applies the control plane's messages; lets go of rings that finished detaching.
    fn control(&mut self) -> bool {
        let mut work = false;
        while let Some(msg) = self.issuer.shared.ctrl[self.index].pop() {
            work = true;
            match msg {
                Ctrl::Attach {
                    id,
                    host,
                    viommu,
                    progress,
                } => self.rings.push(RingState {
                    id,
                    progress,
                    read_seq: 0,
                    host: *host,
                    viommu,
                    inflight: VecDeque::with_capacity(MAX_INFLIGHT),
                    pause: Pause::Running,
                    detach: false,
                    failed: None,
                    stopped_at: None,
                    captured_seq: 0,
                    phys_inflight: 0,
                }),
                Ctrl::Detach { id } => {
                    if let Some(r) = self.rings.iter_mut().find(|r| r.id == id) {
                        r.detach = true;
                    }
                }
                Ctrl::TrapDone { id } => {
                    if let Some(r) = self.rings.iter_mut().find(|r| r.id == id) {
                        if let Pause::Trapped { slot } = r.pause {
                            r.host.complete(r.host.shape().advance(slot, 1));
                            r.pause = Pause::Running;
                        }
                    }
                }
            }
        }
        let mut i = 0;
        while i < self.rings.len() {
            if self.rings[i].detach && self.rings[i].inflight.is_empty() {
                let r = self.rings.swap_remove(i);
                if let Some(w) = r.host.wake_word() {
                    // The next engine of this ring starts awake.
                    w.store(0, Ordering::Relaxed);
                }
                lock(&self.issuer.shared.detached).insert(r.id, (r.host, r.failed));
                work = true;
            } else {
                i += 1;
            }
        }
        work
    }
}

impl<Q: PhysicalQueue> Issuer<Q> {
    fn now(&self) -> u64 {
        self.shared.epoch.elapsed().as_nanos() as u64
    }

    /// Applies the pending records of `r` whose physical commands have been consumed.
    fn retire(&mut self, r: &mut RingState) -> bool {
        let consumed = self.producer.consumed();
        let mut work = false;
        while let Some(&p) = r.inflight.front() {
            if consumed < p.phys {
                break;
            }
            r.inflight.pop_front();
            r.phys_inflight -= p.entries as usize;
            work = true;
            match p.action {
                Action::Advance => r.host.complete(p.guest_end),
                Action::Sync { cs, msidata } => {
                    r.host.complete(p.guest_end);
                    r.host.signal_sync(cs, msidata);
                    self.stats.guest_syncs += 1;
                    if self.audit_on {
                        let seq = r.seq_of(p.guest_end) - 1;
                        let t = self.now();
                        self.audit
                            .push(AuditRecord::SyncDone { ring: r.id, seq, t });
                    }
                }
                Action::Stop { cerror } => {
                    r.host.stop(p.guest_end, cerror);
                    r.stopped_at = Some(p.guest_end);
                    r.pause = Pause::Running;
                }
                Action::Trap { cmd } => {
                    r.host.complete(p.guest_end);
                    r.pause = Pause::Trapped { slot: p.guest_end };
                    self.shared.traps.push(TrapEvent {
                        ring: r.id,
                        viommu: r.viommu.id(),
                        slot: p.guest_end,
                        seq: r.seq_of(p.guest_end),
                        cmd,
                    });
                    wake::kick(&self.shared.trap_wake);
                }
            }
        }
        work
    }

    /// Reads ring `r` once, translates what it holds in batches and publishes them.
    fn serve(&mut self, r: &mut RingState, reader: &mut Reader) -> bool {
        let Some(room) = self.room_for(r) else {
            return false;
        };
        let polled = match r.host.poll(&mut self.inbuf[..room]) {
            Ok(p) => p,
            Err(e) => {
                self.ring_failed(r, e);
                return true;
            }
        };
        if polled.n == 0 {
            return false;
        }
        self.stats.taken += polled.n as u64;
        let seq0 = r.read_seq;
        r.read_seq += polled.n as u64;
        // One pin per pass: lookups and publication of every batch below happen inside it, so
        // an unbind that returns has seen them all published (rule 5).
        let pin = reader.pin();
        let acted = self.forward(r, polled.first, polled.n, seq0);
        if self.shared.capture.is_some() {
            self.capture(r, polled.first, acted, seq0);
        }
        if self.audit_on {
            let t = self.now();
            self.audit.push(AuditRecord::Published {
                ring: r.id,
                first: seq0,
                end: r.read_seq,
                t,
            });
        }
        drop(pin);
        true
    }

    /// How many entries ring `r` may be read for now; `None` if it may not be read at all.
    #[inline]
    fn room_for(&self, r: &RingState) -> Option<usize> {
        if r.pause != Pause::Running || r.detach || r.inflight.len() + 2 >= MAX_INFLIGHT {
            return None;
        }
        // Each guest entry becomes at most one physical entry (a guest CMD_SYNC becomes the
        // physical CMD_SYNC), so the free space bounds what may be taken; and so does what is
        // left of the ring's budget of entries in flight.
        let room =
            (self.producer.room() as usize).min(self.ring_budget.saturating_sub(r.phys_inflight));
        (room > 0).then_some(room)
    }

    /// The ring's memory failed (an unsealed file shrank): give it up. Its CONS can no longer
    /// be written safely, so what is in flight of it completes in the physical queue without a
    /// word to the guest.
    #[cold]
    fn ring_failed(&mut self, r: &mut RingState, e: RingError) {
        self.stats.ring_failures += 1;
        r.detach = true;
        r.failed = Some(e);
        r.clear_inflight();
    }

    /// Translates and publishes, batch by batch, the `n` entries of a poll that read from guest
    /// pointer `first` (they are `inbuf[..n]`, the first with sequence number `seq0`). Returns
    /// how many of them the engine acted on: all, unless a trapped or refused entry paused the
    /// ring and what was read after it was given back.
    #[inline]
    fn forward(&mut self, r: &mut RingState, first: u32, n: usize, seq0: u64) -> usize {
        let shape = r.host.shape();
        let mut done = 0usize;
        while done < n {
            let batch_first = shape.advance(first, done as u32);
            let (end, pos0, phys) = self.publish_batch(r, done, n - done, seq0 + done as u64);
            if self.audit_on {
                self.record(r.id, seq0, done, &end);
            }
            let batch = Batch {
                first: batch_first,
                pos0,
                phys,
                seq0: seq0 + done as u64,
                done,
            };
            if let Some(acted) = self.settle(r, &end, batch) {
                return acted;
            }
            done += end.consumed;
            r.progress.advance(seq0 + done as u64);
        }
        n
    }

    /// The hot path, in one pass over what is left of the poll (`inbuf[done..done + left]`,
    /// the first with sequence number `seq`): each command is checked and patched in registers
    /// and written straight into its physical slot after PROD, with its provenance (the ring, and
    /// the sequence number the translation writes) beside it, up to the end of a batch: a guest
    /// CMD_SYNC (its physical CMD_SYNC goes in the next slot), a trapped or refused entry,
    /// `batch_limit` commands forwarded, or the end of the poll. One PROD store publishes the
    /// batch. Returns what the translation did and the free-running physical positions the
    /// batch starts and ends at.
    #[inline]
    fn publish_batch(
        &mut self,
        r: &RingState,
        done: usize,
        left: usize,
        seq: u64,
    ) -> (BatchEnd, u64, u64) {
        let pos0 = self.producer.published();
        let input = &self.inbuf[done..done + left];
        let tag0 = seq as u32;
        let cap = left.min(self.batch_limit);
        let entries = self.tag_seq.len();
        let [th, tt] = runs(entries, pos0 as usize & (entries - 1), left);
        let (lo, hi) = self.tag_seq.split_at_mut(th.start);
        let (tag_head, tag_tail) = (&mut hi[..th.len()], &mut lo[..tt.len()]);
        // `serve` takes no more guest entries than the queue has free slots, and each becomes
        // at most one physical entry: what is left of the poll fits.
        let slots = match self.producer.reserve(left) {
            Ok(s) => s,
            Err(full) => unreachable!("physical queue full despite the room check: {full:?}"),
        };
        let (end, n) = match slots.into_runs_mut() {
            Ok([head, tail]) => {
                let outs = [&mut *head, &mut *tail];
                let tags = [&mut *tag_head, &mut *tag_tail];
                let end = translate_runs(&r.viommu, input, tag0, outs, tags, cap);
                let mut n = end.produced;
                if let Stop::Sync { slot, .. } = end.stop {
                    // There is room: the guest's sync took an input slot.
                    *at(head, tail, n) = PHYS_SYNC;
                    *at(tag_head, tag_tail, n) = tag0.wrapping_add(slot as u32);
                    n += 1;
                }
                if self.audit_on {
                    // The audit reads the batch back as `translate` would have written it.
                    for j in 0..end.produced {
                        self.out[j] = *at(head, tail, j);
                        self.prov[j] = at(tag_head, tag_tail, j).wrapping_sub(tag0);
                    }
                }
                (end, n)
            }
            Err(slots) => {
                let (out, prov) = (&mut self.out[..cap], &mut self.prov[..cap]);
                let end = translate_numbered(&r.viommu, input, 0, out, prov);
                let mut n = end.produced;
                if let Stop::Sync { slot, .. } = end.stop {
                    self.out[n] = PHYS_SYNC;
                    self.prov[n] = slot as u32;
                    n += 1;
                }
                slots.fill(&self.out[..n]);
                let tags = tag_head.iter_mut().chain(tag_tail);
                for (t, p) in tags.zip(&self.prov[..n]) {
                    *t = tag0.wrapping_add(*p);
                }
                (end, n)
            }
        };
        let phys = self.commit_batch(r.id.0, th, n, pos0);
        self.count_batch(&end);
        (end, pos0, phys)
    }

    /// Tags the `n` slots written from physical index `head.start` on (wrapping) with `ring`
    /// and publishes them with one PROD store; the new free-running PROD (`pos0` for none).
    #[inline]
    fn commit_batch(&mut self, ring: u32, head: Range<usize>, n: usize, pos0: u64) -> u64 {
        if n == 0 {
            return pos0;
        }
        self.tag_ring[head.start..head.start + n.min(head.len())].fill(ring);
        self.tag_ring[..n.saturating_sub(head.len())].fill(ring);
        match self.producer.commit(n) {
            Ok(pos) => pos,
            Err(full) => unreachable!("physical queue full after its reservation: {full:?}"),
        }
    }

    /// The counters of one translated batch.
    #[inline]
    fn count_batch(&mut self, end: &BatchEnd) {
        if let Stop::Sync { .. } = end.stop {
            self.stats.phys_syncs += 1;
        }
        self.stats.forwarded += end.produced as u64;
        // A guest CMD_SYNC or trapped command is consumed but neither forwarded nor dropped.
        let special = matches!(end.stop, Stop::Sync { .. } | Stop::Trap { .. });
        self.stats.dropped += (end.consumed - end.produced - usize::from(special)) as u64;
        self.stats.batches += 1;
    }

    /// Records what ring `r` waits for from the published batch `b`: its CONS to move, its
    /// CMD_SYNC to complete, or a pause at a trapped or refused entry. On a pause, gives back
    /// what was read after that entry and returns how many entries of the poll were acted on;
    /// `None` while the poll goes on.
    #[inline]
    fn settle(&mut self, r: &mut RingState, end: &BatchEnd, b: Batch) -> Option<usize> {
        let shape = r.host.shape();
        let guest_end = shape.advance(b.first, end.consumed as u32);
        let entries = (b.phys - b.pos0) as u32;
        let (action, at, paused) = match end.stop {
            Stop::Drained | Stop::OutputFull => (Action::Advance, guest_end, None),
            Stop::Sync { cs, msidata, .. } => (Action::Sync { cs, msidata }, guest_end, None),
            Stop::Trap { slot, cmd } => {
                // The ring pauses at the trapped slot: what was read after it is given back
                // and read again once the control plane is done.
                self.stats.trapped += 1;
                let at = shape.advance(b.first, slot as u32);
                let paused = (slot, guest_end, end.consumed, b.done + end.consumed);
                (Action::Trap { cmd }, at, Some(paused))
            }
            Stop::Refused { slot, cerror, .. } => {
                self.stats.refused += 1;
                let at = shape.advance(b.first, slot as u32);
                // The refused entry was acted on too (its refusal is what the guest sees), but
                // it is read again after the guest's acknowledgement.
                let paused = (slot, at, slot, b.done + slot + 1);
                (Action::Stop { cerror }, at, Some(paused))
            }
        };
        r.track(Pending {
            phys: b.phys,
            guest_end: at,
            entries,
            action,
        });
        // The entry at `slot` of the batch paused the ring; the ring reads again from `resume`,
        // the entry `read` of the batch; `acted` entries of the poll were acted on.
        let (slot, resume, read, acted) = paused?;
        r.host.rewind(resume);
        r.read_seq = b.seq0 + read as u64;
        r.pause = Pause::Draining;
        r.progress.advance(b.seq0 + slot as u64);
        Some(acted)
    }

    /// Capture: what the guest did that this poll shows, for the first `n` entries it read:
    /// those the engine acted on. Entries read after a trapped or refused one are given back
    /// and recorded only at the read that is acted on, since the guest may rewrite them while
    /// the ring waits (a replay must see the bytes the engine judged, not an earlier version).
    /// Entries recorded before (a refused entry read again after the guest's acknowledgement)
    /// are not recorded twice; a rewrite of the stopped slot is the guest's fix.
    fn capture(&mut self, r: &mut RingState, first: u32, n: usize, seq0: u64) {
        let shape = r.host.shape();
        let ring = r.id.0;
        if let Some(at) = r.stopped_at.take() {
            if first == at {
                let fixed = self.inbuf[0];
                self.shared.capture(|t| super::CaptureEvent::Fix {
                    at: t,
                    ring,
                    slot: at,
                    cmd: fixed,
                });
            }
            self.shared
                .capture(|t| super::CaptureEvent::Ack { at: t, ring });
        }
        let skip = (r.captured_seq.saturating_sub(seq0) as usize).min(n);
        if skip < n {
            let cmds = self.inbuf[skip..n].to_vec();
            let slot = shape.advance(first, skip as u32);
            self.shared.capture(|t| super::CaptureEvent::Commands {
                at: t,
                ring,
                slot,
                cmds,
            });
            let prod = shape.advance(first, n as u32);
            self.shared
                .capture(|t| super::CaptureEvent::Doorbell { at: t, ring, prod });
            r.captured_seq = seq0 + n as u64;
        }
    }

    /// Audit: what became of each input entry `translate` handled.
    fn record(&mut self, ring: RingId, seq0: u64, done: usize, end: &BatchEnd) {
        let seq0 = seq0 + done as u64;
        for (i, outcome) in end.outcomes(&self.out, &self.prov).enumerate() {
            self.audit.push(AuditRecord::Slot {
                ring,
                seq: seq0 + i as u64,
                outcome,
            });
        }
    }

    /// Handles an error the physical queue stopped on: the guest ring whose command failed
    /// stops at that command, its later commands are taken back, and the queue is repaired.
    fn physical_fault(&mut self, rings: &mut [RingState]) -> bool {
        let Some(err) = self.producer.error() else {
            return false;
        };
        let mask = self.tag_ring.len() as u64 - 1;
        let slot = (err.pos & mask) as usize;
        // Whatever the repair leaves in the failing slot (a CMD_SYNC for CERROR_ILL, the retried
        // fetch or CMD_SYNC otherwise) carries nothing of the ring any more: its command is
        // read again after the guest's acknowledgement. A second fault on that slot must blame
        // no ring, or it would stop the ring again (or, still stopped, twice).
        let ring = std::mem::replace(&mut self.tag_ring[slot], NO_RING);
        let tag = self.tag_seq[slot];
        self.stats.phys_faults += 1;
        if let Some(r) = rings.iter_mut().find(|r| r.id.0 == ring) {
            // Everything before the failing command has been consumed: complete it first.
            self.retire(r);
            // CERROR_ABT is retried by the repair: take the failing command back too.
            if err.cerror == CError::Abt && self.producer.retract(err.pos) {
                self.stats.retracted += 1;
            }
            for pos in err.pos + 1..self.producer.published() {
                let t = &mut self.tag_ring[(pos & mask) as usize];
                if *t == ring && self.producer.retract(pos) {
                    // A no-op now: a later fault on it blames no ring.
                    *t = NO_RING;
                    self.stats.retracted += 1;
                }
            }
            let cerror = match err.cerror {
                CError::None => CError::Ill,
                e => e,
            };
            let seq = r.seq_of_tag(tag);
            let ptr = r.ptr_of_seq(seq);
            r.clear_inflight();
            r.pause = Pause::Running;
            r.read_seq = seq;
            r.host.stop(ptr, cerror);
            r.stopped_at = Some(ptr);
            if self.audit_on {
                self.audit.push(AuditRecord::PhysFault {
                    ring: r.id,
                    seq,
                    cerror,
                });
            }
        }
        self.producer.recover();
        true
    }
}

/// Translates `input` (numbered from `first` in `prov`) into the two runs of a reservation
/// and the provenance of the same slots, `cap` commands forwarded at most: into the first run,
/// then, if that filled before `cap`, the rest of the input into the second. The result is
/// what one [`translate_numbered`] call over one run would have returned.
#[inline]
fn translate_runs(
    v: &Viommu,
    input: &[RawCommand],
    first: u32,
    out: [&mut [RawCommand]; 2],
    prov: [&mut [u32]; 2],
    cap: usize,
) -> BatchEnd {
    let ([o0, o1], [p0, p1]) = (out, prov);
    let h = o0.len().min(cap);
    let a = translate_numbered(v, input, first, &mut o0[..h], &mut p0[..h]);
    if a.stop != Stop::OutputFull || h == cap {
        return a;
    }
    // The runs hold what is left of the poll, at least `cap`: the second has `cap - h`.
    let (k, t) = (a.consumed, cap - h);
    let next = first.wrapping_add(k as u32);
    let b = translate_numbered(v, &input[k..], next, &mut o1[..t], &mut p1[..t]);
    let stop = match b.stop {
        Stop::Sync {
            slot,
            cs,
            msidata,
            msiaddr,
        } => Stop::Sync {
            slot: slot + k,
            cs,
            msidata,
            msiaddr,
        },
        Stop::Trap { slot, cmd } => Stop::Trap {
            slot: slot + k,
            cmd,
        },
        Stop::Refused {
            slot,
            cerror,
            reason,
        } => Stop::Refused {
            slot: slot + k,
            cerror,
            reason,
        },
        s => s,
    };
    BatchEnd {
        consumed: k + b.consumed,
        produced: a.produced + b.produced,
        stop,
    }
}

/// Element `j` of two runs taken as one sequence.
#[inline]
fn at<'s, T>(head: &'s mut [T], tail: &'s mut [T], j: usize) -> &'s mut T {
    match j.checked_sub(head.len()) {
        None => &mut head[j],
        Some(k) => &mut tail[k],
    }
}

/// Between empty passes before sleeping: spin, then let other threads run.
fn spin(idle: u32) {
    if idle < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// How an idle worker that cannot sleep (`run`) waits between passes: spin, then yield, then
/// 50 µs asleep.
const IDLE_BACKOFF: Backoff = Backoff {
    spins: 64,
    yields: 448,
    sleep: std::time::Duration::from_micros(50),
};
