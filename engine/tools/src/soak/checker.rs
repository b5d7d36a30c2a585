//! The streaming check the modelled hardware runs on every command it consumes
//! ([`HwConfig::check`](vcmdq::hwmodel::HwConfig)), with O(rings) state instead of an audit log.
//!
//! Each forwarded command names its ring (see `stream.rs`). Per ring the checker keeps a cursor:
//! the sequence number of the next entry it has not accounted for. For a command of ring `r` it
//! regenerates entries from the cursor on, asks the oracle what the engine must do with each
//! ([`oracle::translate_one`] with the vIOMMU's configuration and bindings), passes over those
//! that are not forwarded (dropped, guest CMD_SYNCs, trapped, refused and then fixed by the
//! guest into a CMD_SYNC), and requires the command to be bit for bit the oracle's translation of
//! the next forwarded one. So every forwarded command is checked against the oracle, and within
//! a ring nothing is lost (a later command would arrive where an earlier one is expected),
//! doubled (a command already accounted for would arrive where the next is expected, or past the
//! end of what the ring submitted) or reordered. Isolation is checked on its own as well: a TLBI
//! must carry its ring's VMID, a SID-carrying command a pSID bound to its ring.
//!
//! The only physical CMD_SYNC allowed is the engine's (CS=none, all else zero), which is also
//! what a retracted command and a repaired CERROR_ILL slot become.
//!
//! The guests publish how far each ring's stream has been written ([`Checker::set_submitted`])
//! before each doorbell, which bounds the search; the checker publishes its cursor
//! ([`Checker::cursor`]), which a guest reads after one of its CMD_SYNCs completes to check that
//! everything forwarded before the sync had reached the hardware (rule 2).

use super::plan::Plan;
use super::stream::{Class, Stream, FIX, SEQ_BITS};
use crossbeam_utils::CachePadded;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vcmdq::command::{opcode, text, RawCommand};
use vcmdq::oracle;
// Every critical section leaves the state whole (counters and a cursor).
use vcmdq::sync::lock;
use vcmdq::translate::SlotOutcome;

/// Violations kept with their text; the rest are only counted.
pub const KEEP_VIOLATIONS: usize = 32;

/// Broken rules found by any part of the soak: the hardware check, the guests, the control
/// plane, the final accounting.
#[derive(Debug, Default)]
pub struct Violations {
    count: AtomicU64,
    any: AtomicBool,
    first: Mutex<Vec<String>>,
}

impl Violations {
    /// Records one.
    pub fn report(&self, what: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.any.store(true, Ordering::Release);
        let mut first = lock(&self.first);
        if first.len() < KEEP_VIOLATIONS {
            first.push(what);
        }
    }

    /// Whether any was recorded.
    pub fn any(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    /// How many were recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The first [`KEEP_VIOLATIONS`].
    pub fn first(&self) -> Vec<String> {
        lock(&self.first).clone()
    }
}

/// What the checker accounted for, per ring or summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Forwarded commands that matched the oracle's translation, in order.
    pub forwarded: u64,
    /// Of those, TLBIs whose guest VMID was not the vIOMMU's (replaced by it).
    pub spoofed: u64,
    /// Entries dropped (PREFETCH_*).
    pub dropped: u64,
    /// Guest CMD_SYNCs.
    pub syncs: u64,
    /// Trapped entries.
    pub trapped: u64,
    /// Refused entries (the guest fixed each into a CMD_SYNC).
    pub refused: u64,
    /// Window entries naming a device being bound or unbound that did not reach the hardware:
    /// refused (or failed in the physical queue) and fixed by the guest into a CMD_SYNC.
    pub window_fixed: u64,
}

impl Tally {
    /// Entries accounted for.
    pub fn entries(&self) -> u64 {
        self.forwarded + self.dropped + self.syncs + self.trapped + self.refused + self.window_fixed
    }

    fn add(&mut self, o: &Tally) {
        self.forwarded += o.forwarded;
        self.spoofed += o.spoofed;
        self.dropped += o.dropped;
        self.syncs += o.syncs;
        self.trapped += o.trapped;
        self.refused += o.refused;
        self.window_fixed += o.window_fixed;
    }
}

/// What must become of an entry.
enum Verdict {
    /// This outcome.
    One(SlotOutcome),
    /// A window entry naming a device being bound or unbound: forwarded as this, or refused
    /// (then fixed by the guest), depending on when the engine read it.
    Either(RawCommand),
}

#[derive(Debug, Default)]
struct Cursor {
    /// The next entry not accounted for.
    next: u64,
    tally: Tally,
    /// The last unbind of the ring's second device: its segment, the ring's published
    /// progress once `unset_dev_id` had returned, and one past the last window entry of that
    /// segment seen forwarded with the device's pSID.
    unbind: Option<(u64, Option<u64>, u64)>,
}

#[derive(Debug, Default)]
struct RingCheck {
    /// Touched by the one hardware consumer that serves the ring: never contended.
    state: Mutex<Cursor>,
    /// One past the last forwarded entry verified (Release).
    cursor: AtomicU64,
    /// Entries the guest has written (Release, before its doorbell).
    submitted: AtomicU64,
    /// Forwarded commands verified, for progress reports.
    verified: AtomicU64,
    /// The control plane is unbinding the ring's second device.
    unbinding: AtomicBool,
    /// A worker holds a batch carrying that device's pSID before publishing it.
    held: AtomicBool,
}

/// How long a worker holds back a batch carrying the pSID of a device being unbound at most
/// (see [`Checker::before_publish`]).
pub const HOLD_PUBLISH: std::time::Duration = std::time::Duration::from_micros(200);

/// The streaming checker. Share it (`Arc`) between the hardware check and the guests.
#[derive(Debug)]
pub struct Checker {
    plan: Arc<Plan>,
    stream: Arc<Stream>,
    rings: Box<[CachePadded<RingCheck>]>,
    violations: Arc<Violations>,
}

/// The opcodes whose VMID field the engine overwrites.
fn has_vmid(op: u8) -> bool {
    matches!(
        op,
        opcode::TLBI_NH_ALL | opcode::TLBI_NH_ASID | opcode::TLBI_NH_VA | opcode::TLBI_NH_VAA
    )
}

fn show(cmd: &RawCommand) -> String {
    text::format_raw(cmd)
}

impl Checker {
    /// A checker for `plan`'s rings writing `stream`; violations go to `violations`.
    pub fn new(plan: Arc<Plan>, stream: Arc<Stream>, violations: Arc<Violations>) -> Checker {
        let rings = (0..plan.rings.len())
            .map(|_| CachePadded::new(RingCheck::default()))
            .collect();
        Checker {
            plan,
            stream,
            rings,
            violations,
        }
    }

    /// The control plane: `unset_dev_id` of ring `ring`'s second device, before segment
    /// `segment`, has returned, and the engine had then published the ring's entries up to
    /// `published` (its `RingProgress`, in the stream's numbering). The barrier says that every
    /// batch translated with the binding was published by then: a window entry of the segment
    /// forwarded with the device's pSID must lie below `published`, whether the hardware
    /// consumed it before this call (checked here) or after (checked as it lands).
    pub fn unset_returned(&self, ring: usize, segment: u64, published: u64) {
        let mut st = lock(&self.rings[ring].state);
        let seen = match st.unbind {
            Some((k, None, seen)) if k == segment => seen,
            _ => 0,
        };
        if seen > published {
            self.violations.report(format!(
                "ring {ring}: entry {} carried the pSID of its second device to the hardware, \
                 but unset_dev_id returned with the ring published only up to entry {published} \
                 (the unbind barrier)",
                seen - 1
            ));
        }
        st.unbind = Some((segment, Some(published), seen));
    }

    /// The control plane starts (`true`) or has finished (`false`) unbinding ring `ring`'s
    /// second device.
    pub fn set_unbinding(&self, ring: usize, on: bool) {
        if on {
            self.rings[ring].held.store(false, Ordering::Relaxed);
        }
        self.rings[ring].unbinding.store(on, Ordering::Release);
    }

    /// Whether a worker holds a batch of ring `ring` carrying its second device's pSID.
    pub fn held(&self, ring: usize) -> bool {
        self.rings[ring].held.load(Ordering::Acquire)
    }

    /// Run by the engine's workers before each publication (`HwConfig::before_publish`),
    /// inside their grace-period pin: a batch carrying the pSID of a device being unbound is
    /// held until the unbind is over, [`HOLD_PUBLISH`] at most. The control plane unbinds
    /// while one is held when it can: with the barrier, `unset_dev_id` waits for the batch;
    /// without, it returns first, and the batch lands past the progress the control plane
    /// reads at the return, which the checker reports.
    pub fn before_publish(&self, cmds: &[RawCommand]) {
        let ring = cmds.iter().find_map(|c| {
            let psid = (c.d0() >> 32) as u32;
            let r = self.plan.ring_of_psid(psid)?;
            (matches!(
                c.opcode(),
                opcode::ATC_INV | opcode::CFGI_CD | opcode::CFGI_CD_ALL
            ) && psid == self.plan.rings[r].psids[1]
                && self.rings[r].unbinding.load(Ordering::Acquire))
            .then_some(r)
        });
        if let Some(r) = ring {
            self.rings[r].held.store(true, Ordering::Release);
            let until = std::time::Instant::now() + HOLD_PUBLISH;
            while self.rings[r].unbinding.load(Ordering::Acquire)
                && std::time::Instant::now() < until
            {
                std::hint::spin_loop();
            }
        }
    }

    /// A window entry `seq` of an odd segment was forwarded with the old binding: it must have
    /// been published before `unset_dev_id` returned.
    fn barrier(&self, ring: usize, seq: u64, st: &mut Cursor) -> Result<(), String> {
        if !self.stream.unbound(seq) {
            return Ok(());
        }
        let k = self.stream.segment(seq);
        match &mut st.unbind {
            Some((s, Some(p), _)) if *s == k && seq >= *p => Err(format!(
                "ring {ring}: entry {seq} carried the pSID of its second device to the hardware, \
                 but unset_dev_id returned with the ring published only up to entry {p} (the \
                 unbind barrier)"
            )),
            Some((s, None, seen)) if *s == k => {
                *seen = (*seen).max(seq + 1);
                Ok(())
            }
            Some((s, Some(_), _)) if *s == k => Ok(()),
            other => {
                *other = Some((k, None, seq + 1));
                Ok(())
            }
        }
    }

    /// The bindings entry `seq` of `ring` is translated with outside a window.
    fn bindings(&self, ring: usize, seq: u64) -> &std::collections::HashMap<u32, u32> {
        self.plan.bindings(ring, self.stream.unbound(seq))
    }

    fn verdict(&self, ring: usize, seq: u64, cmd: RawCommand) -> Verdict {
        let v = self.plan.viommu_of(ring);
        let o = oracle::translate_one(&v.cfg, self.bindings(ring, seq), cmd);
        if self.stream.in_window(seq) {
            let unbound = !self.stream.unbound(seq);
            let other = oracle::translate_one(&v.cfg, self.plan.bindings(ring, unbound), cmd);
            if other != o {
                if let (SlotOutcome::Forwarded(c), _) | (_, SlotOutcome::Forwarded(c)) = (o, other)
                {
                    return Verdict::Either(c);
                }
            }
        }
        Verdict::One(o)
    }

    /// The command entry `seq` of `ring` is forwarded as, if it may be.
    fn forwarded_as(&self, ring: usize, seq: u64) -> Option<RawCommand> {
        match self.verdict(ring, seq, self.stream.entry(ring, seq).cmd) {
            Verdict::One(SlotOutcome::Forwarded(c)) | Verdict::Either(c) => Some(c),
            Verdict::One(_) => None,
        }
    }

    /// Whether entry `seq` of `ring` is a window entry naming the device being bound or
    /// unbound: a CERROR_ILL stop at it is a refusal or a physical fault, and the guest fixes
    /// it either way.
    pub fn either(&self, ring: usize, seq: u64) -> bool {
        matches!(
            self.verdict(ring, seq, self.stream.entry(ring, seq).cmd),
            Verdict::Either(_)
        )
    }

    /// Where violations go.
    pub fn violations(&self) -> &Arc<Violations> {
        &self.violations
    }

    /// The guest of `ring` has written entries `0..n` (call before the doorbell).
    pub fn set_submitted(&self, ring: usize, n: u64) {
        self.rings[ring].submitted.store(n, Ordering::Release);
    }

    /// Entries ring `ring` has written.
    pub fn submitted(&self, ring: usize) -> u64 {
        self.rings[ring].submitted.load(Ordering::Acquire)
    }

    /// One past the last forwarded entry of `ring` the hardware has consumed and verified.
    pub fn cursor(&self, ring: usize) -> u64 {
        self.rings[ring].cursor.load(Ordering::Acquire)
    }

    /// Forwarded commands verified so far, over all rings.
    pub fn verified(&self) -> u64 {
        self.rings
            .iter()
            .map(|r| r.verified.load(Ordering::Relaxed))
            .sum()
    }

    /// The hardware check: `Err` (and a recorded violation) when `cmd` is not the next
    /// forwarded command of the ring it names, translated as the oracle does.
    pub fn check(&self, cmd: &RawCommand) -> Result<(), String> {
        match self.check_inner(cmd) {
            Ok(()) => Ok(()),
            Err(why) => {
                self.violations.report(format!("hardware check: {why}"));
                Err(why)
            }
        }
    }

    /// The ring a physical command names, from its identity fields.
    fn identify(&self, cmd: &RawCommand) -> Result<usize, String> {
        let (d0, d1) = (cmd.d0(), cmd.d1());
        let ring = match cmd.opcode() {
            opcode::TLBI_NH_ASID | opcode::TLBI_NH_VA => Some((d0 >> 56) as usize),
            opcode::TLBI_NH_VAA => Some((d1 >> (SEQ_BITS + 12)) as usize),
            opcode::TLBI_NH_ALL => self.plan.ring_of_vmid((d0 >> 32) as u16),
            opcode::ATC_INV | opcode::CFGI_CD | opcode::CFGI_CD_ALL => {
                let psid = (d0 >> 32) as u32;
                match self.plan.ring_of_psid(psid) {
                    Some(r) => Some(r),
                    None => {
                        return Err(format!(
                            "{}: pSID {psid:#x} is bound to no ring (isolation)",
                            show(cmd)
                        ))
                    }
                }
            }
            op => {
                return Err(format!(
                    "{}: opcode {op:#04x} is never forwarded",
                    show(cmd)
                ))
            }
        };
        match ring {
            Some(r) if r < self.rings.len() => Ok(r),
            _ => Err(format!("{}: names no ring of the soak", show(cmd))),
        }
    }

    fn check_inner(&self, cmd: &RawCommand) -> Result<(), String> {
        if cmd.opcode() == opcode::CMD_SYNC {
            return if *cmd == FIX {
                Ok(())
            } else {
                Err(format!(
                    "{}: a CMD_SYNC the engine did not make (a guest's reached the hardware?)",
                    show(cmd)
                ))
            };
        }
        let ring = self.identify(cmd)?;
        let v = self.plan.viommu_of(ring);
        if has_vmid(cmd.opcode()) && (cmd.d0() >> 32) as u16 != v.cfg.vmid {
            return Err(format!(
                "ring {ring}: {} carries VMID {}, its vIOMMU's is {} (isolation)",
                show(cmd),
                (cmd.d0() >> 32) as u16,
                v.cfg.vmid
            ));
        }
        let rc = &self.rings[ring];
        let mut st = lock(&rc.state);
        let limit = rc.submitted.load(Ordering::Acquire);
        loop {
            let seq = st.next;
            if seq >= limit {
                return Err(format!(
                    "ring {ring}: {} reached the hardware, but every entry the ring wrote \
                     (0..{limit}) is accounted for: a command doubled or invented",
                    show(cmd)
                ));
            }
            let e = self.stream.entry(ring, seq);
            let o = match (e.class, self.verdict(ring, seq, e.cmd)) {
                (Class::Forward, Verdict::Either(want)) => {
                    if want != *cmd {
                        // Refused (or failed) and fixed by the guest.
                        st.tally.window_fixed += 1;
                        st.next = seq + 1;
                        continue;
                    }
                    self.barrier(ring, seq, &mut st)?;
                    SlotOutcome::Forwarded(want)
                }
                (_, Verdict::Either(want)) => SlotOutcome::Forwarded(want),
                (_, Verdict::One(o)) => o,
            };
            match (e.class, o) {
                (Class::Forward, SlotOutcome::Forwarded(want)) => {
                    if want != *cmd {
                        return Err(self.mismatch(ring, seq, limit, &want, cmd, &mut st));
                    }
                    st.next = seq + 1;
                    st.tally.forwarded += 1;
                    if has_vmid(e.cmd.opcode()) && (e.cmd.d0() >> 32) as u16 != v.cfg.vmid {
                        st.tally.spoofed += 1;
                    }
                    rc.verified.store(st.tally.forwarded, Ordering::Relaxed);
                    rc.cursor.store(seq + 1, Ordering::Release);
                    return Ok(());
                }
                (class, o) => {
                    if let Err(why) = account(&mut st.tally, class, &o) {
                        self.violations
                            .report(format!("ring {ring} entry {seq}: {} {why}", show(&e.cmd)));
                    }
                    st.next = seq + 1;
                }
            }
        }
    }

    /// Explains a command that is not the one expected at `seq`, and moves the cursor past the
    /// command when it is a later entry's (so one loss is one violation, not a cascade).
    fn mismatch(
        &self,
        ring: usize,
        seq: u64,
        limit: u64,
        want: &RawCommand,
        got: &RawCommand,
        st: &mut Cursor,
    ) -> String {
        let v = self.plan.viommu_of(ring);
        // Commands with an address carry their whole sequence number.
        let carried = match got.opcode() {
            opcode::TLBI_NH_VA | opcode::TLBI_NH_VAA | opcode::ATC_INV => {
                Some((got.d1() >> 12) & ((1 << SEQ_BITS) - 1))
            }
            _ => None,
        };
        if let Some(s) = carried {
            let translated = |s: u64| self.forwarded_as(ring, s);
            if s < seq && translated(s) == Some(*got) {
                return format!(
                    "ring {ring}: entry {s} reached the hardware again (doubled) while entry {seq} \
                     was due: {}",
                    show(got)
                );
            }
            if s > seq && s < limit && translated(s) == Some(*got) {
                let from = seq;
                // Account for the skipped entries so that the check goes on from here.
                for k in seq..s {
                    let e = self.stream.entry(ring, k);
                    match self.verdict(ring, k, e.cmd) {
                        Verdict::One(SlotOutcome::Forwarded(_)) => {}
                        Verdict::One(o) => {
                            let _ = account(&mut st.tally, e.class, &o);
                        }
                        Verdict::Either(_) => st.tally.window_fixed += 1,
                    }
                }
                st.next = s + 1;
                st.tally.forwarded += 1;
                return format!(
                    "ring {ring}: entry {s} reached the hardware while entry {from} was due \
                     (lost or reordered): {}",
                    show(got)
                );
            }
        }
        let isolation =
            oracle::check_isolation(&v.cfg, &v.bindings.values().copied().collect(), got)
                .err()
                .map(|e| format!(" (isolation: {e})"))
                .unwrap_or_default();
        format!(
            "ring {ring} entry {seq}: the oracle forwards {}, the hardware got {}{isolation}",
            show(want),
            show(got)
        )
    }

    /// After the run, with everything consumed: accounts for each ring's entries from its
    /// cursor to what it submitted (none may be a forwarded one: it never reached the
    /// hardware), and returns the tallies summed. Violations go to the usual place.
    pub fn finish(&self) -> Tally {
        // The guests quit at the first violation without acknowledging a stop they were
        // shown, so a ring left stopped is never read past it: its entries are left behind,
        // not lost, and saying "lost" would send whoever reads the report after a second bug.
        let quit = self.violations.any();
        let mut total = Tally::default();
        for (ring, rc) in self.rings.iter().enumerate() {
            let mut st = lock(&rc.state);
            let limit = rc.submitted.load(Ordering::Acquire);
            let mut lost = 0u64;
            while st.next < limit {
                let seq = st.next;
                let e = self.stream.entry(ring, seq);
                let o = match self.verdict(ring, seq, e.cmd) {
                    Verdict::One(o) => o,
                    Verdict::Either(_) => {
                        // Never forwarded: refused and fixed.
                        st.tally.window_fixed += 1;
                        st.next = seq + 1;
                        continue;
                    }
                };
                if let SlotOutcome::Forwarded(want) = o {
                    lost += 1;
                    if quit {
                        if lost == 1 {
                            self.violations.report(format!(
                                "ring {ring}: entries from {seq} on ({}) never reached the \
                                 hardware: not evidence of loss, the guests quit at the first \
                                 violation and may have left the ring stopped",
                                show(&want)
                            ));
                        }
                    } else if lost <= 4 {
                        self.violations.report(format!(
                            "ring {ring} entry {seq}: {} never reached the hardware (lost)",
                            show(&want)
                        ));
                    }
                } else if let Err(why) = account(&mut st.tally, e.class, &o) {
                    self.violations
                        .report(format!("ring {ring} entry {seq}: {} {why}", show(&e.cmd)));
                }
                st.next = seq + 1;
            }
            if lost > 4 && !quit {
                self.violations
                    .report(format!("ring {ring}: {} more entries lost", lost - 4));
            }
            total.add(&st.tally);
        }
        total
    }
}

/// Counts an entry that is not forwarded; `Err` when the stream and the oracle disagree about it.
fn account(t: &mut Tally, class: Class, o: &SlotOutcome) -> Result<(), String> {
    match (class, o) {
        (Class::Drop, SlotOutcome::Dropped) => t.dropped += 1,
        (Class::Sync { cs, .. }, SlotOutcome::Sync { cs: c, .. }) if cs == *c => t.syncs += 1,
        (Class::Trap, SlotOutcome::Trapped(_)) => t.trapped += 1,
        (Class::Hostile(h), SlotOutcome::Refused { reason, .. }) if h.matches(reason) => {
            t.refused += 1
        }
        _ => {
            return Err(format!(
                "is {class:?} in the stream but {o:?} by the oracle"
            ))
        }
    }
    Ok(())
}
