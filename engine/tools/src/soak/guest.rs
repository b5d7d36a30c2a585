//! The soak's guests: each thread drives several rings without blocking on any one, writing
//! each ring's stream (`stream.rs`) in doorbell-sized chunks and checking what the engine
//! shows it through the ring alone: CONS, CONS.ERR, the sync count and the completion word.
//!
//! What a guest checks:
//! - CONS never moves backwards, never past PROD.
//! - A stop is at a slot it wrote and has not seen consumed. At the first refused entry it
//!   wrote (its stream says which), the stop must be that slot with CERROR_ILL: it overwrites
//!   the entry with a CMD_SYNC and acknowledges. Anywhere before that the stop is a physical
//!   fault the engine passed on: CERROR_ILL or CERROR_ABT on a forwarded entry or a CMD_SYNC,
//!   CERROR_ATC_INV_SYNC on a CMD_SYNC only; it acknowledges without fixing (the command was
//!   fine). Never a stop past an unfixed refused entry.
//! - The sync count never goes down and never exceeds the CMD_SYNCs written (a refused entry
//!   counts: it becomes one). When it passes a CMD_SYNC, every forwarded entry before that sync
//!   has been verified by the hardware check (rule 2).
//! - At a blocking CMD_SYNC (one in eight) it writes nothing more until every sync completed;
//!   then CONS must equal PROD and the completion word must hold MSIDATA of its last CS=IRQ
//!   sync.
//! - Progress: a ring with work outstanding that does not move for the stall timeout is a
//!   violation (a lost completion, a ring stuck on a stop).
//! - Segments ([`Mix::churn_log2`](super::Mix)): at each boundary it writes nothing more until
//!   its ring is quiet (CONS = PROD, every CMD_SYNC completed, no stop), then asks the control
//!   plane to act (unbind or bind its second device, perhaps a new ring) and goes on once it
//!   has: so every entry is translated with the binding its segment says, which the checker
//!   knows from the sequence number alone.
//! - Hostile PROD games ([`Mix::prod_game_every`](super::Mix)) after a doorbell: junk bits above
//!   the wrap bit (the engine masks them), PROD moved back between CONS and PROD or past a full
//!   ring and then restored (the engine takes nothing while it is invalid and goes on after),
//!   and entries the hardware has already verified, still short of CONS, overwritten with
//!   another command of the ring (the engine must never read a taken slot again: were it
//!   forwarded, the checker would see it out of order).

use super::checker::{Checker, Violations};
use super::stream::{ident_asid, sync_msidata, Class, Hostile, Stream, FIX};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vcmdq::command::{Command, RawCommand};
use vcmdq::mock::{FixPolicy, GuestDriver, Rng};
use vcmdq::queue::{CError, QueueShape};
use vcmdq::ring::GuestRing;

/// The kinds of hostile PROD game, in the order the guests play them.
pub const PROD_GAMES: [&str; 4] = ["junk_bits", "backwards", "overrun", "rewrite_taken"];

/// The segment protocol between each ring's guest and the control plane.
pub(super) struct Churn {
    /// Per ring: the segment whose start the guest has reached with its ring quiet.
    pub request: Vec<AtomicU64>,
    /// Per ring: the last segment the control plane has prepared the ring for.
    pub ack: Vec<AtomicU64>,
    /// Per ring: a ring the control plane attached in place of the guest's, to go on with.
    pub mailbox: Vec<Mutex<Option<GuestRing>>>,
}

impl Churn {
    pub(super) fn new(rings: usize) -> Churn {
        Churn {
            request: (0..rings).map(|_| AtomicU64::new(0)).collect(),
            ack: (0..rings).map(|_| AtomicU64::new(0)).collect(),
            mailbox: (0..rings).map(|_| Mutex::new(None)).collect(),
        }
    }
}

/// Entries one doorbell publishes at most.
const MAX_CHUNK: u64 = 128;

/// What the guests did and saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestStats {
    /// Entries written (a fix is not counted again).
    pub submitted: u64,
    /// Doorbells rung.
    pub doorbells: u64,
    /// CMD_SYNCs written (not counting fixes), and of those with CS=IRQ.
    pub syncs: u64,
    /// CMD_SYNCs with CS=IRQ written.
    pub irq_syncs: u64,
    /// Blocking CMD_SYNCs waited for (each a quiescence check: CONS = PROD, completion word).
    pub blocking_waits: u64,
    /// CMD_SYNC completions checked against the hardware check's cursor (rule 2).
    pub sync_order_checks: u64,
    /// Entries written that are dropped by rule (PREFETCH_*).
    pub prefetches: u64,
    /// Entries written that are trapped (CFGI_STE, CFGI_STE_RANGE).
    pub traps: u64,
    /// Hostile entries written, by kind (index into [`Hostile::ALL`]).
    pub hostile: [u64; Hostile::ALL.len()],
    /// Refusals seen at exactly the expected slot, fixed and acknowledged, by kind.
    pub refused: [u64; Hostile::ALL.len()],
    /// Stops from physical faults, acknowledged without a fix: CERROR_ILL, CERROR_ABT,
    /// CERROR_ATC_INV_SYNC.
    pub phys_stops: [u64; 3],
    /// Segment boundaries reached with the ring quiet, each a request to the control plane.
    pub boundaries: u64,
    /// Window entries naming the device being bound or unbound that stopped the ring with
    /// CERROR_ILL (refused, or failed in the physical queue), fixed into a CMD_SYNC.
    pub window_fixes: u64,
    /// Of those, boundaries at which the control plane replaces the ring.
    pub ring_swaps: u64,
    /// Hostile PROD games played, by kind (index into [`PROD_GAMES`]); for `rewrite_taken`,
    /// the slots rewritten.
    pub prod_games: [u64; 4],
}

impl GuestStats {
    /// Adds another thread's.
    pub fn add(&mut self, o: &GuestStats) {
        self.submitted += o.submitted;
        self.doorbells += o.doorbells;
        self.syncs += o.syncs;
        self.irq_syncs += o.irq_syncs;
        self.blocking_waits += o.blocking_waits;
        self.sync_order_checks += o.sync_order_checks;
        self.prefetches += o.prefetches;
        self.traps += o.traps;
        for i in 0..Hostile::ALL.len() {
            self.hostile[i] += o.hostile[i];
            self.refused[i] += o.refused[i];
        }
        for i in 0..3 {
            self.phys_stops[i] += o.phys_stops[i];
        }
        self.boundaries += o.boundaries;
        self.window_fixes += o.window_fixes;
        self.ring_swaps += o.ring_swaps;
        for i in 0..4 {
            self.prod_games[i] += o.prod_games[i];
        }
    }

    /// Hostile entries written.
    pub fn hostile_total(&self) -> u64 {
        self.hostile.iter().sum()
    }

    /// Refusals handled.
    pub fn refused_total(&self) -> u64 {
        self.refused.iter().sum()
    }

    /// Physical-fault stops handled.
    pub fn phys_stops_total(&self) -> u64 {
        self.phys_stops.iter().sum()
    }
}

fn hostile_index(h: Hostile) -> usize {
    Hostile::ALL
        .iter()
        .position(|&x| x == h)
        .expect("every kind is in ALL")
}

/// Everything a guest thread shares with the rest of the soak.
pub(super) struct Ctx<'a> {
    pub stream: &'a Stream,
    pub checker: &'a Checker,
    pub violations: &'a Violations,
    pub stall_timeout: Duration,
    pub churn: &'a Churn,
}

/// One ring, guest side.
pub(super) struct Driver {
    ring: usize,
    /// The normal guest's part: writing, doorbells, fixes and acknowledgements. The hostile
    /// extras below go to its ring directly.
    drv: GuestDriver,
    shape: QueueShape,
    /// Entries written (the sequence number of the guest's PROD).
    prod_seq: u64,
    /// Sequence number of the last CONS seen.
    cons_seq: u64,
    /// Sync completions seen.
    syncs_seen: u64,
    /// CMD_SYNCs written and not yet seen complete, in ring order, with the last forwarded
    /// entry before each (refused entries included: they become CMD_SYNCs).
    pending_syncs: VecDeque<(u64, Option<u64>)>,
    /// Refused entries written and not yet fixed, in ring order.
    hostiles: VecDeque<(u64, Hostile)>,
    last_forward: Option<u64>,
    /// MSIDATA of the last CS=IRQ CMD_SYNC written.
    last_irq: Option<u32>,
    /// A blocking CMD_SYNC was written: nothing more until every sync completed.
    waiting: bool,
    done: bool,
    /// The last stop handled and how many times in a row at that entry.
    last_stop: (u64, u32),
    last_progress: Instant,
    /// Visits in a row that moved nothing.
    idle_visits: u32,
    /// Chunk sizes and PROD games.
    rng: Rng,
    buf: Vec<RawCommand>,
    /// The segment the guest writes in.
    segment: u64,
    /// It asked the control plane to prepare the next segment.
    requested: bool,
    /// A rewrite of taken slots is due.
    rewrite_due: bool,
    pub(super) stats: GuestStats,
}

impl Driver {
    /// The guest of ring `ring` (of the plan), on a fresh ring.
    pub(super) fn new(ring: usize, guest: GuestRing, seed: u64) -> Driver {
        let shape = guest.shape();
        Driver {
            ring,
            drv: GuestDriver::new(guest, FixPolicy::Retry)
                .expect("the soak attaches fresh rings: CONS at PROD, no error"),
            shape,
            prod_seq: 0,
            cons_seq: 0,
            syncs_seen: 0,
            pending_syncs: VecDeque::with_capacity(shape.entries() as usize),
            hostiles: VecDeque::new(),
            last_forward: None,
            last_irq: None,
            waiting: false,
            done: false,
            last_stop: (u64::MAX, 0),
            last_progress: Instant::now(),
            idle_visits: 0,
            rng: Rng::fork(seed, ring as u64),
            buf: Vec::with_capacity(MAX_CHUNK as usize),
            segment: 0,
            requested: false,
            rewrite_due: false,
            stats: GuestStats::default(),
        }
    }

    /// The ring's index in the plan.
    pub(super) fn ring(&self) -> usize {
        self.ring
    }

    /// Whether the ring finished: its last blocking CMD_SYNC completed after `finishing`.
    pub(super) fn done(&self) -> bool {
        self.done
    }

    fn violation(&self, ctx: &Ctx<'_>, what: String) {
        ctx.violations
            .report(format!("guest of ring {}: {what}", self.ring));
    }

    /// Sequence number of a pointer between CONS and PROD, or `None` if it is not one.
    fn seq_of(&self, ptr: u32) -> Option<u64> {
        let d = u64::from(self.shape.distance(self.drv.ring().prod(), ptr));
        (d <= u64::from(self.shape.entries()) && d <= self.prod_seq).then(|| self.prod_seq - d)
    }

    /// One look at the ring: handle a stop, check completions, write a chunk. `budget` is what
    /// the thread may still write before it finishes (ignored once `finishing`: then each ring
    /// writes up to its next blocking CMD_SYNC and waits for it). True if anything moved.
    pub(super) fn visit(&mut self, ctx: &Ctx<'_>, budget: &mut u64, finishing: bool) -> bool {
        if self.done {
            return false;
        }
        let mut progress = false;
        if let Some((slot, cerror)) = self.drv.ring().error() {
            self.on_stop(ctx, slot, cerror);
            progress = true;
        }
        // The sync count first, then CONS and the checker's cursor: the engine moves CONS
        // before it signals, and the hardware verified before it consumed the sync.
        let count = self.drv.ring().sync_count();
        if count != self.syncs_seen {
            progress = true;
            self.on_syncs(ctx, count);
        }
        let (cons, _) = self.drv.ring().cons();
        match self.seq_of(cons) {
            Some(s) if s >= self.cons_seq => {
                if s != self.cons_seq {
                    progress = true;
                    self.cons_seq = s;
                }
            }
            _ => self.violation(
                ctx,
                format!(
                    "CONS {cons:#x} is behind the last CONS seen (entry {}) or past PROD {:#x}",
                    self.cons_seq,
                    self.drv.ring().prod()
                ),
            ),
        }
        if self.rewrite_due {
            self.rewrite_taken(ctx);
        }
        if self.waiting {
            if self.pending_syncs.is_empty() {
                self.waiting = false;
                progress = true;
                self.quiescent(ctx);
                if finishing {
                    self.done = true;
                    return true;
                }
            } else {
                return self.idle(ctx, progress);
            }
        }
        progress |= self.write(ctx, budget, finishing);
        self.idle(ctx, progress)
    }

    /// Notes progress, or reports a ring with work outstanding that stopped moving.
    fn idle(&mut self, ctx: &Ctx<'_>, progress: bool) -> bool {
        // The clock is read when an idle stretch starts and every 256 idle visits after.
        if progress {
            self.idle_visits = 0;
            return true;
        }
        self.idle_visits = self.idle_visits.wrapping_add(1);
        if self.idle_visits == 1 {
            self.last_progress = Instant::now();
        } else if self.idle_visits.is_multiple_of(256)
            && (self.waiting || self.cons_seq < self.prod_seq)
            && self.last_progress.elapsed() > ctx.stall_timeout
        {
            self.violation(
                ctx,
                format!(
                    "no progress for {:?}: CONS at entry {}, PROD at {}, {} CMD_SYNC(s) \
                     pending, stopped: {:?}",
                    ctx.stall_timeout,
                    self.cons_seq,
                    self.prod_seq,
                    self.pending_syncs.len(),
                    self.drv.ring().error()
                ),
            );
            self.last_progress = Instant::now();
        }
        false
    }

    fn on_syncs(&mut self, ctx: &Ctx<'_>, count: u64) {
        if count < self.syncs_seen {
            self.violation(
                ctx,
                format!("sync count went down from {} to {count}", self.syncs_seen),
            );
            return;
        }
        let cursor = ctx.checker.cursor(self.ring);
        for _ in self.syncs_seen..count {
            let Some((seq, need)) = self.pending_syncs.pop_front() else {
                self.violation(
                    ctx,
                    format!("sync count {count}: more CMD_SYNCs completed than were written"),
                );
                break;
            };
            self.stats.sync_order_checks += 1;
            if let Some(n) = need {
                if cursor <= n {
                    self.violation(
                        ctx,
                        format!(
                            "the CMD_SYNC at entry {seq} completed before forwarded entry {n} \
                             reached the hardware (verified up to {cursor})"
                        ),
                    );
                }
            }
        }
        self.syncs_seen = count;
    }

    /// Every CMD_SYNC written has completed and nothing was written after the last.
    fn quiescent(&mut self, ctx: &Ctx<'_>) {
        self.stats.blocking_waits += 1;
        let (cons, err) = self.drv.ring().cons();
        if self.seq_of(cons) != Some(self.prod_seq) || err != CError::None {
            self.violation(
                ctx,
                format!(
                    "every CMD_SYNC completed but CONS is {cons:#x} ({err:?}), PROD {:#x}",
                    self.drv.ring().prod()
                ),
            );
        }
        if let Some(m) = self.last_irq {
            let w = self.drv.ring().completion();
            if w != m {
                self.violation(
                    ctx,
                    format!("completion word {w:#x}, the last CS=IRQ CMD_SYNC wrote {m:#x}"),
                );
            }
        }
        if !self.hostiles.is_empty() {
            self.violation(
                ctx,
                format!(
                    "every CMD_SYNC completed but refused entries were never reported: {:?}",
                    self.hostiles
                ),
            );
            self.hostiles.clear();
        }
    }

    fn on_stop(&mut self, ctx: &Ctx<'_>, slot: u32, cerror: CError) {
        let Some(seq) = self
            .seq_of(slot)
            .filter(|&s| s >= self.cons_seq && s < self.prod_seq)
        else {
            self.violation(
                ctx,
                format!(
                    "stopped at slot {slot:#x} ({cerror:?}), not an entry in flight (CONS seen at \
                     entry {}, PROD at {})",
                    self.cons_seq, self.prod_seq
                ),
            );
            self.drv.acknowledge(slot, cerror, None);
            return;
        };
        self.count_stop(ctx, seq, cerror);
        if self.fix_refused(ctx, slot, seq, cerror) {
            return;
        }
        // A window entry naming the device being bound or unbound: refused, or failed in the
        // physical queue; the guest cannot tell which and fixes it either way (its command is
        // then never executed, which the checker accepts for these entries only).
        // Once fixed, it is a CMD_SYNC: a fault on it is a physical one.
        let fixed = ctx.stream.in_window(seq) && self.drv.ring().read_slot(slot) == FIX;
        if cerror == CError::Ill && !fixed && ctx.checker.either(self.ring, seq) {
            self.drv.acknowledge(slot, cerror, Some(FIX));
            let at = self.pending_syncs.partition_point(|&(s, _)| s < seq);
            self.pending_syncs.insert(at, (seq, None));
            self.stats.window_fixes += 1;
            return;
        }
        self.physical_stop(ctx, slot, seq, cerror, fixed);
    }

    /// A ring that stops at the same entry again and again is not making progress.
    fn count_stop(&mut self, ctx: &Ctx<'_>, seq: u64, cerror: CError) {
        if self.last_stop.0 == seq {
            self.last_stop.1 += 1;
            if self.last_stop.1 == 64 {
                self.violation(
                    ctx,
                    format!("stopped at entry {seq} 64 times in a row ({cerror:?})"),
                );
            }
        } else {
            self.last_stop = (seq, 1);
        }
    }

    /// A stop at the next hostile entry: fixed and acknowledged; true if it was one.
    fn fix_refused(&mut self, ctx: &Ctx<'_>, slot: u32, seq: u64, cerror: CError) -> bool {
        let Some(&(h, kind)) = self.hostiles.front() else {
            return false;
        };
        if seq == h {
            if cerror != CError::Ill {
                self.violation(
                    ctx,
                    format!("refused entry {seq} ({kind:?}) stopped with {cerror:?}"),
                );
            }
            self.drv.acknowledge(slot, cerror, Some(FIX));
            self.hostiles.pop_front();
            self.stats.refused[hostile_index(kind)] += 1;
            return true;
        }
        if seq > h {
            self.violation(
                ctx,
                format!(
                    "stopped at entry {seq} ({cerror:?}) past refused entry {h} ({kind:?}), \
                     which was never reported"
                ),
            );
        }
        false
    }

    /// A physical fault passed on: acknowledged without a fix. Entries before the first
    /// unfixed refusal that were refused are CMD_SYNCs now.
    fn physical_stop(&mut self, ctx: &Ctx<'_>, slot: u32, seq: u64, cerror: CError, fixed: bool) {
        let (sync, forward) = match ctx.stream.class(self.ring, seq) {
            _ if fixed => (true, false),
            Class::Sync { .. } | Class::Hostile(_) => (true, false),
            Class::Forward => (false, true),
            _ => (false, false),
        };
        let (ok, k) = match cerror {
            CError::Ill => (sync || forward, 0),
            CError::Abt => (sync || forward, 1),
            CError::AtcInvSync => (sync, 2),
            _ => (false, 0),
        };
        if ok {
            self.stats.phys_stops[k] += 1;
        } else {
            self.violation(
                ctx,
                format!(
                    "stopped at entry {seq} with {cerror:?}, which no physical fault explains \
                     ({:?})",
                    ctx.stream.class(self.ring, seq)
                ),
            );
        }
        self.drv.acknowledge(slot, cerror, None);
    }

    fn next_chunk(&mut self) -> u64 {
        1 + self.rng.below(MAX_CHUNK)
    }

    /// The first entry that may still be in the ring: the CONS last seen may be stale, and the
    /// guest may have written up to a ring's worth past the CONS the ring holds now.
    fn oldest_in_ring(&self) -> u64 {
        self.cons_seq.max(
            self.prod_seq
                .saturating_sub(u64::from(self.shape.entries())),
        )
    }

    /// The ring pointer of entry `seq`, from [`Driver::oldest_in_ring`] to PROD.
    fn ptr_of(&self, seq: u64) -> u32 {
        let back = (self.prod_seq - seq) as u32;
        self.shape
            .advance(self.drv.ring().prod(), 2 * self.shape.entries() - back)
    }

    /// At a segment boundary: waits for the ring to be quiet and asks the control plane to
    /// act; then writes the window while it acts (or, when the ring is being replaced, nothing
    /// until it has); moves on to the next segment (on the new ring, if it attached one) once
    /// the control plane has acted. Returns whether anything moved, and the entry the guest
    /// may write up to meanwhile.
    fn cross(&mut self, ctx: &Ctx<'_>) -> (bool, u64) {
        let next = self.segment + 1;
        let boundary = ctx.stream.segment_start(next);
        let window_end = if ctx.stream.swaps_ring_at(next) {
            boundary
        } else {
            boundary + ctx.stream.window_len()
        };
        if !self.requested {
            let quiet = self.cons_seq == self.prod_seq
                && self.pending_syncs.is_empty()
                && self.hostiles.is_empty()
                && self.drv.ring().error().is_none();
            if !quiet {
                return (false, boundary);
            }
            ctx.churn.request[self.ring].store(next, Ordering::Release);
            self.requested = true;
            self.stats.boundaries += 1;
            if ctx.stream.swaps_ring_at(next) {
                self.stats.ring_swaps += 1;
            }
            return (true, window_end);
        }
        if ctx.churn.ack[self.ring].load(Ordering::Acquire) < next {
            return (false, window_end);
        }
        let boundary = ctx.stream.segment_start(next + 1);
        let swapped = ctx.churn.mailbox[self.ring]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(g) = swapped {
            // A fresh ring: PROD, CONS and the sync count start at 0 for entry `prod_seq`.
            let shape = g.shape();
            match GuestDriver::new(g, FixPolicy::Retry) {
                Ok(d) => self.drv = d,
                Err(e) => {
                    self.violation(ctx, format!("the ring attached in place of this one: {e}"))
                }
            }
            self.shape = shape;
            self.syncs_seen = 0;
            self.last_irq = None;
            self.last_stop = (u64::MAX, 0);
        }
        self.segment = next;
        self.requested = false;
        (true, boundary)
    }

    /// One hostile PROD game after a doorbell (see the module docs).
    fn prod_game(&mut self, ctx: &Ctx<'_>) {
        let game =
            ((self.stats.doorbells / u64::from(ctx.stream.mix().prod_game_every)) % 4) as usize;
        let x = self.rng.next_u64();
        let entries = self.shape.entries();
        let prod = self.drv.ring().prod();
        match game {
            0 => {
                // Bits above the wrap bit: the engine masks them. Left until the next doorbell.
                let wrap_bits = entries.trailing_zeros() + 1;
                if wrap_bits >= 32 {
                    return;
                }
                let junk = (x as u32 | 1) << wrap_bits;
                self.drv.ring().write_prod_raw(prod | junk);
            }
            1 => {
                let Some(back) =
                    backwards_target(self.oldest_in_ring(), self.prod_seq, u64::from(entries), x)
                else {
                    return;
                };
                self.drv.ring().write_prod_raw(self.ptr_of(back));
                std::thread::yield_now();
                self.drv.ring().doorbell();
            }
            2 => {
                // More than a full ring ahead of any CONS between the one seen and PROD.
                self.drv
                    .ring()
                    .write_prod_raw(self.shape.advance(prod, entries + 1));
                std::thread::yield_now();
                self.drv.ring().doorbell();
            }
            _ => {
                // Played at the next visit that finds entries taken and not yet completed.
                self.rewrite_due = true;
                return;
            }
        }
        self.stats.prod_games[game] += 1;
    }

    /// Overwrites entries the hardware has verified (so the engine has taken them) that CONS
    /// has not passed yet with another command of this ring, which the checker would see out
    /// of order were the engine ever to read such a slot again.
    fn rewrite_taken(&mut self, ctx: &Ctx<'_>) {
        if self.drv.ring().error().is_some() {
            return;
        }
        let cursor = ctx.checker.cursor(self.ring);
        let first_refused = self.hostiles.front().map_or(u64::MAX, |h| h.0);
        let mut rewritten = 0;
        for seq in self.oldest_in_ring()..self.prod_seq.min(cursor).min(first_refused) {
            if rewritten == 8 {
                break;
            }
            if ctx.stream.class(self.ring, seq) != Class::Forward {
                continue;
            }
            let other = Command::TlbiNhAsid {
                vmid: 0,
                asid: ident_asid(self.ring as u64, seq + 128),
            };
            self.drv.ring().write_slot(self.ptr_of(seq), other.encode());
            rewritten += 1;
        }
        if rewritten > 0 {
            self.stats.prod_games[3] += rewritten;
            self.rewrite_due = false;
        }
    }

    /// Writes the next chunk of the stream and rings the doorbell.
    fn write(&mut self, ctx: &Ctx<'_>, budget: &mut u64, finishing: bool) -> bool {
        let mut limit = ctx.stream.segment_start(self.segment + 1);
        let mut moved = false;
        if self.prod_seq >= limit {
            (moved, limit) = self.cross(ctx);
            if self.prod_seq >= limit {
                return moved;
            }
        }
        let free = u64::from(self.drv.ring().free());
        let mut n = free.min(self.next_chunk()).min(limit - self.prod_seq);
        if !finishing {
            n = n.min(*budget);
        }
        if n == 0 {
            return moved;
        }
        self.buf.clear();
        let ring = self.ring as u64;
        for _ in 0..n {
            let seq = self.prod_seq + self.buf.len() as u64;
            let e = ctx.stream.entry(self.ring, seq);
            self.buf.push(e.cmd);
            match e.class {
                // A window entry naming the device being bound or unbound may never reach
                // the hardware: a later CMD_SYNC cannot wait for it.
                Class::Forward
                    if !(ctx.stream.in_window(seq) && ctx.checker.either(self.ring, seq)) =>
                {
                    self.last_forward = Some(seq)
                }
                Class::Forward => {}
                Class::Drop => self.stats.prefetches += 1,
                Class::Trap => self.stats.traps += 1,
                Class::Sync { cs, blocking } => {
                    self.stats.syncs += 1;
                    self.pending_syncs.push_back((seq, self.last_forward));
                    if cs == 1 {
                        self.stats.irq_syncs += 1;
                        self.last_irq = Some(sync_msidata(ring, seq));
                    }
                    if blocking {
                        self.waiting = true;
                        break;
                    }
                }
                Class::Hostile(h) => {
                    self.stats.hostile[hostile_index(h)] += 1;
                    self.hostiles.push_back((seq, h));
                    self.pending_syncs.push_back((seq, self.last_forward));
                }
            }
        }
        let n = self.buf.len() as u64;
        if !finishing {
            *budget -= n;
        }
        ctx.checker.set_submitted(self.ring, self.prod_seq + n);
        let pushed = self.drv.post_now(&self.buf) as u64;
        if pushed != n {
            self.violation(
                ctx,
                format!("{n} entries fit the free space but the ring took {pushed}"),
            );
        }
        self.prod_seq += n;
        self.stats.submitted += n;
        self.stats.doorbells += 1;
        let every = ctx.stream.mix().prod_game_every;
        if every != 0 && self.stats.doorbells.is_multiple_of(u64::from(every)) {
            self.prod_game(ctx);
        }
        true
    }
}

/// Where the backwards game moves PROD: an entry from `oldest` (the oldest one still in the
/// ring as the guest last saw CONS) to before `prod_seq`, but never back a whole ring of
/// `entries` or more. The engine's CONS may have reached `prod_seq` meanwhile, and a PROD
/// exactly 2^LOG2SIZE behind CONS has the same index and the other wrap bit: it is a full ring
/// (docs/ring-format.md), which the engine must read, slots of the previous lap and all.
/// `None` when there is no such entry.
fn backwards_target(oldest: u64, prod_seq: u64, entries: u64, x: u64) -> Option<u64> {
    let lo = oldest.max((prod_seq + 1).saturating_sub(entries));
    (lo < prod_seq).then(|| lo + x % (prod_seq - lo))
}

/// Runs one guest thread over `drivers` until each has written its share and waited for its
/// last blocking CMD_SYNC, the deadline passed (then likewise), or a violation anywhere.
pub(super) fn run(
    ctx: &Ctx<'_>,
    drivers: &mut [Driver],
    budget: Option<u64>,
    deadline: Option<Instant>,
) {
    let mut budget = budget.unwrap_or(u64::MAX);
    let mut finishing = false;
    let mut idle = 0u32;
    let mut visits = 0u64;
    loop {
        if ctx.violations.any() {
            return;
        }
        visits += 1;
        if !finishing
            && (budget == 0
                || (visits.is_multiple_of(64) && deadline.is_some_and(|d| Instant::now() >= d)))
        {
            finishing = true;
        }
        let mut progress = false;
        let mut done = true;
        for d in drivers.iter_mut() {
            progress |= d.visit(ctx, &mut budget, finishing);
            done &= d.done();
        }
        if done {
            return;
        }
        if progress {
            idle = 0;
        } else {
            idle = idle.saturating_add(1);
            if idle < 16 {
                std::hint::spin_loop();
            } else if idle < 256 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::backwards_target;

    /// The soak's doubled-entries failure (seed 4, a 32-entry ring): the guest saw its ring full
    /// (CONS = PROD - 32), moved PROD back to that CONS while the engine had consumed all 32,
    /// and the engine rightly read a full ring of stale slots.
    #[test]
    fn the_backwards_game_never_moves_prod_back_a_whole_ring() {
        for entries in [1u64, 2, 32, 1024] {
            for prod in [0u64, 1, entries - 1, entries, 5 * entries + 3] {
                for oldest in prod.saturating_sub(entries)..=prod {
                    for x in 0..3 * entries {
                        if let Some(back) = backwards_target(oldest, prod, entries, x) {
                            assert!(
                                back >= oldest && back < prod && prod - back < entries,
                                "entries {entries} prod {prod} oldest {oldest} x {x}: {back}"
                            );
                        }
                    }
                }
            }
        }
        // A full ring as the guest saw it still gets a game, one entry short of a lap.
        assert_eq!(backwards_target(68, 100, 32, 0), Some(69));
    }
}
