//! Replay: a trace fed through the real pipeline (sealed shared-memory rings, the engine's
//! workers, the physical queue model), then checked against the sequential oracle.
//!
//! The replayer plays every guest and the VMM: it writes each Commands record into the ring's
//! shared memory (waiting, as a guest must, while the slots are not yet free), moves PROD at each
//! Doorbell, acknowledges and fixes stopped rings at GuestAck/GuestFix (after waiting for the
//! engine to report the stop), completes trapped commands in the order they arrive, and applies
//! binds and unbinds once every ring of the vIOMMU is idle, so the order of the trace is the
//! order of their effects and the oracle's verdict is exact. Timing: as fast as possible, or
//! `speed` times the recorded pace.
//!
//! The check: per ring, the engine's audit (what became of every entry it read, in order) must
//! equal the model's history (`model.rs`); every command the hardware consumed must carry a VMID
//! and a pSID the host handed out, and no guest CMD_SYNC may reach it; the hardware must have
//! consumed exactly what was forwarded plus the engine's CMD_SYNCs.
//!
//! The summary carries, per ring, a digest of the physical commands forwarded (see
//! [`Fnv1a`]), so an expected summary pins every byte the hardware received, not just counts.

use hdrhistogram::Histogram;
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vcmdq::command::{opcode, RawCommand};
use vcmdq::engine::{AuditRecord, Engine, EngineConfig, EngineReport, EngineStats, RingId};
use vcmdq::hwmodel::{
    HwConfig, HwPlacement, ModelCounters, ModelQueue, OnCheckFailure, DEFAULT_LOG2SIZE,
};
use vcmdq::queue::QueueShape;
use vcmdq::ring::{GuestRing, HostRing, RingError};
use vcmdq::sync::lock;
use vcmdq::translate::SlotOutcome;
use vcmdq::viommu::{DeviceId, ViommuConfig};
use vcmdq_trace::format::FLAG_GUEST_WAITS_SYNC;
use vcmdq_trace::ring_model::RingModel;
use vcmdq_trace::{validate_with, Event, Limits, Summary, Trace, TraceError};
/// How to replay.
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    /// `None`: as fast as possible; `Some(x)`: x times the recorded pace.
    pub speed: Option<f64>,
    /// Engine workers.
    pub workers: usize,
    /// Guest entries per batch at most.
    pub batch_limit: usize,
    /// How long a guest waits for the engine (free slots, a stop, idle rings) before the replay
    /// gives up.
    pub stall_timeout: Duration,
    /// Capture what the replay's guests submit into this trace file (see the engine's capture).
    pub capture: Option<std::path::PathBuf>,
    /// Resource limits, checked before anything is allocated (see [`Limits`]).
    pub limits: Limits,
    /// A paced replay whose recorded span, at `speed`, would take longer than this is refused
    /// before it starts (`--max-wall`).
    pub max_paced_wall: Duration,
    /// Closed loop: after each doorbell, a ring waits for every guest CMD_SYNC it published to
    /// complete before the replay goes on, as a guest driver waits for its CMD_SYNCs; the
    /// doorbell-to-sync latency is then what such a guest would feel, not the backlog of a
    /// replayer running ahead. `None`: closed loop when the trace's header says its guests
    /// waited ([`FLAG_GUEST_WAITS_SYNC`], set by the QEMU import), open loop otherwise.
    pub closed_loop: Option<bool>,
}

/// The multiples of the recorded pace `--speed` accepts: slower than a thousandth makes a
/// millisecond-long trace take minutes, faster than a thousand times is not distinguishable from
/// "as fast as possible" (omit `--speed` for that).
pub const SPEED_RANGE: std::ops::RangeInclusive<f64> = 0.001..=1000.0;

/// Default of [`ReplayOptions::max_paced_wall`]: one hour.
pub const DEFAULT_MAX_PACED_WALL: Duration = Duration::from_secs(3600);

/// Checks a `--speed` value: finite and within [`SPEED_RANGE`].
pub fn check_speed(speed: f64) -> Result<f64, String> {
    if speed.is_finite() && SPEED_RANGE.contains(&speed) {
        Ok(speed)
    } else {
        Err(format!(
            "speed {speed} is out of range: a multiple of the recorded pace from {} to {} \
             (omit --speed to replay as fast as possible)",
            SPEED_RANGE.start(),
            SPEED_RANGE.end()
        ))
    }
}

/// How long to sleep before an event due at `due` (from the replay's start), given the time
/// `elapsed` so far; `None` once it is due. Never more than `step`, so traps are pumped while
/// waiting. An engine that fell behind the recorded pace is simply late: nothing to wait for.
fn pace_step(due: Duration, elapsed: Duration, step: Duration) -> Option<Duration> {
    (elapsed < due).then(|| due.saturating_sub(elapsed).min(step))
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            speed: None,
            workers: 1,
            batch_limit: 64,
            stall_timeout: Duration::from_secs(20),
            capture: None,
            limits: Limits::default(),
            max_paced_wall: DEFAULT_MAX_PACED_WALL,
            closed_loop: None,
        }
    }
}

/// Why a replay could not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The trace is damaged.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// The trace asks for something the engine refuses (a vIOMMU with a bad SIDSIZE, a bind of
    /// an unknown device, ...).
    #[error("{at}: {what}")]
    Control {
        /// Where in the trace.
        at: String,
        /// What failed.
        what: String,
    },
    /// A ring could not be set up.
    #[error("{at}: ring: {err}")]
    Ring {
        /// Where in the trace.
        at: String,
        /// What failed.
        err: RingError,
    },
    /// An option out of its range, or a paced replay that would outlast its bound.
    #[error("{0}")]
    Refused(String),
    /// The engine did not do what a guest waited for.
    #[error("{at}: {what}")]
    Stalled {
        /// Where in the trace.
        at: String,
        /// What the guest waited for.
        what: String,
    },
}

/// Counts of what became of guest commands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcomes {
    /// Entries the engine read (an entry read again after a stop counts again).
    pub read: u64,
    /// Forwarded to the physical queue.
    pub forwarded: u64,
    /// Guest CMD_SYNCs.
    pub syncs: u64,
    /// Dropped by rule.
    pub dropped: u64,
    /// Trapped to the control plane.
    pub trapped: u64,
    /// Refused, by reason kind.
    pub refused: BTreeMap<String, u64>,
}

impl Outcomes {
    fn add(&mut self, o: &SlotOutcome) {
        self.read += 1;
        match o {
            SlotOutcome::Forwarded(_) => self.forwarded += 1,
            SlotOutcome::Sync { .. } => self.syncs += 1,
            SlotOutcome::Dropped => self.dropped += 1,
            SlotOutcome::Trapped(_) => self.trapped += 1,
            SlotOutcome::Refused { reason, .. } => {
                *self.refused.entry(reason_kind(reason)).or_default() += 1
            }
            SlotOutcome::NotReached => {}
        }
    }

    fn merge(&mut self, o: &Outcomes) {
        self.read += o.read;
        self.forwarded += o.forwarded;
        self.syncs += o.syncs;
        self.dropped += o.dropped;
        self.trapped += o.trapped;
        for (k, v) in &o.refused {
            *self.refused.entry(k.clone()).or_default() += v;
        }
    }

    /// Refused commands of every reason.
    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }
}

/// The variant name of a refusal reason: `UnknownVsid`, `Res0`, ...
fn reason_kind(reason: &impl std::fmt::Debug) -> String {
    let s = format!("{reason:?}");
    s.split([' ', '{', '('])
        .next()
        .unwrap_or_default()
        .to_string()
}

/// One disagreement between the engine and the oracle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The trace's ring id.
    pub ring: u32,
    /// The entry's sequence number in the ring.
    pub seq: u64,
    /// What the oracle expected (`None`: nothing more).
    pub expected: Option<SlotOutcome>,
    /// What the engine did (`None`: nothing more).
    pub got: Option<SlotOutcome>,
}

/// What a replay did and found.
#[derive(Debug)]
pub struct ReplayReport {
    /// Guest commands the trace writes (Commands records).
    pub commands: u64,
    /// Rings in the trace.
    pub rings: usize,
    /// vIOMMUs in the trace.
    pub viommus: usize,
    /// Outcomes over all rings, from the engine's audit.
    pub outcomes: Outcomes,
    /// Outcomes per vIOMMU.
    pub per_viommu: BTreeMap<u32, Outcomes>,
    /// Doorbell-to-publish and doorbell-to-sync-completion latency per vIOMMU.
    pub per_viommu_latency: BTreeMap<u32, (Histogram<u64>, Histogram<u64>)>,
    /// The engine's counters.
    pub stats: EngineStats,
    /// Commands the hardware consumed.
    pub hw_consumed: u64,
    /// From the first event to the last ring going idle.
    pub wall: Duration,
    /// Nanoseconds from the guest's doorbell to the physical publish, per entry.
    pub publish_latency: Histogram<u64>,
    /// Nanoseconds from the guest's doorbell to its CMD_SYNC's completion, per sync.
    pub sync_latency: Histogram<u64>,
    /// Disagreements with the oracle (the first 100) and how many in all.
    pub mismatches: Vec<Mismatch>,
    /// All disagreements.
    pub mismatch_count: u64,
    /// What the hardware's isolation check refused (the first 100) and how many in all.
    pub isolation: Vec<String>,
    /// All isolation failures.
    pub isolation_count: u64,
    /// Other broken invariants (hardware consumed more or less than was forwarded, traps out of
    /// order, ...).
    pub invariant_failures: Vec<String>,
    /// Whether the replay was closed-loop (see [`ReplayOptions::closed_loop`]).
    pub closed_loop: bool,
    /// The most guest CMD_SYNCs of one ring that were published and not yet complete just
    /// after a doorbell (that doorbell's included). Closed loop: at most the CMD_SYNCs one
    /// doorbell publishes.
    pub max_outstanding_syncs: u64,
    /// Doorbells after which the replay waited for CMD_SYNCs (closed loop).
    pub sync_waits: u64,
    /// Per trace ring, the [`Fnv1a`] digest of the physical commands forwarded from it, in ring
    /// order (the same whatever the number of workers).
    pub forwarded_digest: BTreeMap<u32, u64>,
}

/// 64-bit FNV-1a (offset basis 0xcbf29ce484222325, prime 0x100000001b3) over bytes, the
/// digest of a forwarded command stream: each command's D0 then D1, little-endian, 16 bytes a
/// command, in the order the ring forwarded them. Not cryptographic: it pins a replay's output
/// in `*.expected.json` so that one wrong byte is seen, nothing more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fnv1a(pub u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    /// Adds bytes.
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// Adds one command's 16 bytes.
    pub fn command(&mut self, cmd: &RawCommand) {
        self.write(&cmd.d0().to_le_bytes());
        self.write(&cmd.d1().to_le_bytes());
    }
}

impl ReplayReport {
    /// The engine agreed with the oracle and broke no rule.
    pub fn ok(&self) -> bool {
        self.mismatch_count == 0 && self.isolation_count == 0 && self.invariant_failures.is_empty()
    }

    /// Guest entries the engine read per second of wall time.
    pub fn rate(&self) -> f64 {
        self.outcomes.read as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

struct RingRt {
    guest: GuestRing,
    viommu: u32,
    shape: QueueShape,
    prod: u32,
    prod_seq: u64,
    /// `(sequence end, ns since the engine's epoch)` of each doorbell.
    doorbells: Vec<(u64, u64)>,
    model: RingModel,
    last_trap_seq: Option<u64>,
    /// Guest CMD_SYNCs the model expects so far, and how much of its history was counted.
    syncs_expected: u64,
    expected_counted: usize,
    /// The ring's completed-CMD_SYNC count when it was created.
    sync_base: u64,
}

struct Replayer<'e> {
    engine: &'e Engine,
    opts: ReplayOptions,
    rings: HashMap<u32, RingRt>,
    by_engine_id: HashMap<RingId, u32>,
    viommus: HashMap<u32, (ViommuConfig, HashMap<u32, u32>)>,
    devices: HashMap<u32, u32>,
    invariant_failures: Vec<String>,
    closed_loop: bool,
    max_outstanding_syncs: u64,
    sync_waits: u64,
}

/// How many commands the hardware's isolation check refused, and the first 100 of them.
type IsolationLog = Arc<Mutex<(u64, Vec<String>)>>;

/// A hardware check: VMIDs and pSIDs the trace hands out, and no guest CMD_SYNC.
fn isolation_check(trace: &Trace<'_>) -> Result<(HwConfig, IsolationLog), TraceError> {
    let mut vmids = vec![false; 1 << 16];
    let mut psids = HashSet::new();
    for r in trace.records() {
        match r?.event {
            Event::ViommuCreate { vmid, .. } => vmids[vmid as usize] = true,
            Event::DeviceAdd { psid, .. } => {
                psids.insert(psid);
            }
            _ => {}
        }
    }
    let seen = Arc::new(Mutex::new((0u64, Vec::new())));
    let s = seen.clone();
    let check = move |cmd: &RawCommand| {
        let field = (cmd.d0() >> 32) as u32;
        let bad = match cmd.opcode() {
            opcode::TLBI_NH_ALL
            | opcode::TLBI_NH_ASID
            | opcode::TLBI_NH_VA
            | opcode::TLBI_NH_VAA => (!vmids[field as u16 as usize])
                .then(|| format!("VMID {} never handed out", field as u16)),
            opcode::ATC_INV | opcode::CFGI_CD | opcode::CFGI_CD_ALL => {
                (!psids.contains(&field)).then(|| format!("pSID {field:#x} never handed out"))
            }
            opcode::CMD_SYNC => (*cmd != RawCommand::new(u64::from(opcode::CMD_SYNC), 0))
                .then(|| "a guest CMD_SYNC reached the hardware".to_string()),
            _ => None,
        };
        match bad {
            None => Ok(()),
            Some(why) => {
                let mut g = lock(&s);
                g.0 += 1;
                if g.1.len() < 100 {
                    g.1.push(format!("{cmd:?}: {why}"));
                }
                Err(why)
            }
        }
    };
    let mut hw = HwConfig::default().with_check(check);
    hw.on_check_failure = OnCheckFailure::Record;
    Ok((hw, seen))
}

/// Replays `trace` and checks the result. `progress` is called with the number of guest
/// commands written so far, every few thousand.
pub fn replay(
    trace: &Trace<'_>,
    opts: &ReplayOptions,
    progress: impl FnMut(u64),
) -> Result<ReplayReport, ReplayError> {
    // One validation for info, dump and replay: what it refuses, replay refuses with the same
    // message before starting anything; what it accepts, the engine's control plane accepts.
    let summary = validate_with(trace, &opts.limits)?;
    replay_validated(trace, &summary, opts, progress)
}

/// [`replay`] of a trace whose `summary` [`validate_with`] returned under `opts.limits`.
pub fn replay_validated(
    trace: &Trace<'_>,
    summary: &Summary,
    opts: &ReplayOptions,
    mut progress: impl FnMut(u64),
) -> Result<ReplayReport, ReplayError> {
    check_pace(summary, opts)?;
    let (hw, isolation) = isolation_check(trace)?;
    let (engine, model) = start_engine(opts, hw)?;
    let mut rp = Replayer::new(&engine, opts, trace);
    let start = Instant::now();
    let commands = rp.play(trace, start, &mut progress)?;
    rp.wait_all_idle("end of trace")?;
    let wall = start.elapsed();
    let played = rp.into_played();
    let report = engine.shutdown();
    let hw_consumed: u64 = model.collect().iter().map(|h| h.consumed).sum();
    Ok(judge(
        played,
        report,
        hw_consumed,
        &isolation,
        commands,
        wall,
    ))
}

/// Refuses a paced replay that would take longer than the wall-time limit.
fn check_pace(summary: &Summary, opts: &ReplayOptions) -> Result<(), ReplayError> {
    let Some(speed) = opts.speed else {
        return Ok(());
    };
    check_speed(speed).map_err(ReplayError::Refused)?;
    let wall = summary.duration_ns() as f64 / speed / 1e9;
    if wall > opts.max_paced_wall.as_secs_f64() {
        return Err(ReplayError::Refused(format!(
            "the trace spans {:.3} s of recorded time ({} ns); at --speed {speed} that is {wall:.3e} s \
             of wall time, above the limit of {} s (raise it with --max-wall, or replay \
             faster or without --speed)",
            summary.duration_ns() as f64 / 1e9,
            summary.duration_ns(),
            opts.max_paced_wall.as_secs()
        )));
    }
    Ok(())
}

/// An engine that audits every entry, on physical queue models whose hardware runs the
/// isolation check; and the models' counters.
fn start_engine(
    opts: &ReplayOptions,
    hw: HwConfig,
) -> Result<(Engine, ModelCounters), ReplayError> {
    let start_failed = |what: String| ReplayError::Control {
        at: "start".into(),
        what,
    };
    let (queues, model) =
        ModelQueue::for_workers(opts.workers, DEFAULT_LOG2SIZE, &hw, HwPlacement::Inline)
            .map_err(|e| start_failed(e.to_string()))?;
    let engine = Engine::start(
        EngineConfig {
            workers: opts.workers,
            batch_limit: opts.batch_limit,
            audit: true,
            capture: opts.capture.as_ref().map(vcmdq_trace::capture_to_file),
            ..Default::default()
        },
        queues,
    )
    .map_err(|e| start_failed(e.to_string()))?;
    Ok((engine, model))
}

/// What the replayer learnt while playing, kept after the engine is shut down.
struct Played {
    rings: HashMap<u32, RingRt>,
    by_engine_id: HashMap<RingId, u32>,
    viommus: usize,
    invariant_failures: Vec<String>,
    closed_loop: bool,
    max_outstanding_syncs: u64,
    sync_waits: u64,
}

/// Checks the engine's audit and counters against the model and sums the verdict.
fn judge(
    played: Played,
    report: EngineReport,
    hw_consumed: u64,
    isolation: &IsolationLog,
    commands: u64,
    wall: Duration,
) -> ReplayReport {
    let mut invariant_failures = played.invariant_failures;
    if let Some(Err(why)) = &report.capture {
        invariant_failures.push(format!("capture failed: {why}"));
    }
    let epoch_rings = played.rings.len();
    let (isolation_count, isolation) = {
        let g = lock(isolation);
        (g.0, g.1.clone())
    };
    let expected_hw = report.stats.forwarded + report.stats.phys_syncs;
    if hw_consumed != expected_hw {
        invariant_failures.push(format!(
            "the hardware consumed {hw_consumed} commands, the engine published {expected_hw}"
        ));
    }
    let audit = Audit::by_ring(&report.audit, &played.by_engine_id, &mut invariant_failures);
    // The comparison, ring by ring across cores (rings of different vIOMMUs are independent).
    let per_ring = audit.ring_inputs(played.rings);
    let checked: Vec<RingCheck> = per_ring.par_iter().map(check_ring).collect();
    let t = Totals::of(&per_ring, checked);
    ReplayReport {
        commands,
        rings: epoch_rings,
        viommus: played.viommus,
        outcomes: t.outcomes,
        per_viommu: t.per_viommu,
        per_viommu_latency: t.per_viommu_latency,
        stats: report.stats,
        hw_consumed,
        wall,
        publish_latency: t.publish_latency,
        sync_latency: t.sync_latency,
        mismatches: t.mismatches,
        mismatch_count: t.mismatch_count,
        isolation,
        isolation_count,
        invariant_failures,
        forwarded_digest: t.forwarded_digest,
        closed_loop: played.closed_loop,
        max_outstanding_syncs: played.max_outstanding_syncs,
        sync_waits: played.sync_waits,
    }
}

/// The engine's audit, per trace ring, in order.
#[derive(Default)]
struct Audit {
    got: HashMap<u32, Vec<(u64, SlotOutcome)>>,
    published: HashMap<u32, Vec<(u64, u64, u64)>>,
    synced: HashMap<u32, Vec<(u64, u64)>>,
}

impl Audit {
    /// Sorts `audit` by ring; a physical fault is an invariant failure (a replay injects none).
    fn by_ring(
        audit: &[AuditRecord],
        by_engine_id: &HashMap<RingId, u32>,
        invariant_failures: &mut Vec<String>,
    ) -> Audit {
        let mut a = Audit::default();
        for rec in audit {
            match *rec {
                AuditRecord::Slot { ring, seq, outcome } => a
                    .got
                    .entry(by_engine_id[&ring])
                    .or_default()
                    .push((seq, outcome)),
                AuditRecord::Published {
                    ring,
                    first,
                    end,
                    t,
                } => a
                    .published
                    .entry(by_engine_id[&ring])
                    .or_default()
                    .push((first, end, t)),
                AuditRecord::SyncDone { ring, seq, t } => a
                    .synced
                    .entry(by_engine_id[&ring])
                    .or_default()
                    .push((seq, t)),
                AuditRecord::PhysFault { ring, seq, .. } => invariant_failures.push(format!(
                    "ring {}: an unexpected physical fault at entry {seq}",
                    by_engine_id[&ring]
                )),
            }
        }
        a
    }

    /// Pairs each ring's audit with its model's history, in ring order.
    fn ring_inputs(mut self, rings: HashMap<u32, RingRt>) -> Vec<RingCheckInput> {
        let mut per_ring: Vec<RingCheckInput> = rings
            .into_iter()
            .map(|(id, rt)| RingCheckInput {
                id,
                viommu: rt.viommu,
                expected: rt.model.into_expected(),
                doorbells: rt.doorbells,
                got: self.got.remove(&id).unwrap_or_default(),
                published: self.published.remove(&id).unwrap_or_default(),
                synced: self.synced.remove(&id).unwrap_or_default(),
            })
            .collect();
        per_ring.sort_unstable_by_key(|r| r.id);
        per_ring
    }
}

/// The rings' checks summed, overall and per vIOMMU.
struct Totals {
    outcomes: Outcomes,
    per_viommu: BTreeMap<u32, Outcomes>,
    per_viommu_latency: BTreeMap<u32, (Histogram<u64>, Histogram<u64>)>,
    forwarded_digest: BTreeMap<u32, u64>,
    publish_latency: Histogram<u64>,
    sync_latency: Histogram<u64>,
    mismatches: Vec<Mismatch>,
    mismatch_count: u64,
}

impl Totals {
    fn of(per_ring: &[RingCheckInput], checked: Vec<RingCheck>) -> Totals {
        let mut t = Totals {
            outcomes: Outcomes::default(),
            per_viommu: BTreeMap::new(),
            per_viommu_latency: BTreeMap::new(),
            forwarded_digest: BTreeMap::new(),
            publish_latency: crate::latency::histogram(),
            sync_latency: crate::latency::histogram(),
            mismatches: Vec::new(),
            mismatch_count: 0,
        };
        for (input, c) in per_ring.iter().zip(checked) {
            t.outcomes.merge(&c.outcomes);
            t.forwarded_digest.insert(input.id, c.digest.0);
            t.per_viommu
                .entry(input.viommu)
                .or_default()
                .merge(&c.outcomes);
            let (p, y) = t
                .per_viommu_latency
                .entry(input.viommu)
                .or_insert_with(|| (crate::latency::histogram(), crate::latency::histogram()));
            p.add(&c.publish_latency).expect("same histogram bounds");
            y.add(&c.sync_latency).expect("same histogram bounds");
            t.mismatch_count += c.mismatch_count;
            t.mismatches.extend(
                c.mismatches
                    .into_iter()
                    .take(100 - t.mismatches.len().min(100)),
            );
            t.publish_latency
                .add(&c.publish_latency)
                .expect("same histogram bounds");
            t.sync_latency
                .add(&c.sync_latency)
                .expect("same histogram bounds");
        }
        t
    }
}

/// What the check of one ring needs.
struct RingCheckInput {
    id: u32,
    viommu: u32,
    expected: Vec<(u64, SlotOutcome)>,
    doorbells: Vec<(u64, u64)>,
    got: Vec<(u64, SlotOutcome)>,
    published: Vec<(u64, u64, u64)>,
    synced: Vec<(u64, u64)>,
}

/// What the check of one ring found.
struct RingCheck {
    outcomes: Outcomes,
    mismatches: Vec<Mismatch>,
    mismatch_count: u64,
    publish_latency: Histogram<u64>,
    sync_latency: Histogram<u64>,
    /// What the ring forwarded, as the engine's audit says.
    digest: Fnv1a,
}

/// Compares one ring's audit with its model, and measures its latencies.
fn check_ring(r: &RingCheckInput) -> RingCheck {
    let mut c = RingCheck {
        outcomes: Outcomes::default(),
        mismatches: Vec::new(),
        mismatch_count: 0,
        publish_latency: crate::latency::histogram(),
        sync_latency: crate::latency::histogram(),
        digest: Fnv1a::default(),
    };
    for (_, o) in &r.got {
        c.outcomes.add(o);
        if let SlotOutcome::Forwarded(cmd) = o {
            c.digest.command(cmd);
        }
    }
    for i in 0..r.got.len().max(r.expected.len()) {
        let (g, e) = (r.got.get(i), r.expected.get(i));
        if g != e {
            c.mismatch_count += 1;
            if c.mismatches.len() < 100 {
                c.mismatches.push(Mismatch {
                    ring: r.id,
                    seq: g.or(e).map_or(0, |x| x.0),
                    expected: e.map(|x| x.1),
                    got: g.map(|x| x.1),
                });
            }
        }
    }
    // The doorbell that published entry `seq`: the first whose new PROD is past it.
    let doorbell_t = |seq: u64| -> Option<u64> {
        let i = r.doorbells.partition_point(|&(end, _)| end <= seq);
        r.doorbells.get(i).map(|&(_, t)| t)
    };
    for &(first, end, t) in &r.published {
        for seq in first..end {
            if let Some(td) = doorbell_t(seq) {
                c.publish_latency
                    .saturating_record(t.saturating_sub(td).max(1));
            }
        }
    }
    for &(seq, t) in &r.synced {
        if let Some(td) = doorbell_t(seq) {
            c.sync_latency
                .saturating_record(t.saturating_sub(td).max(1));
        }
    }
    c
}

impl<'e> Replayer<'e> {
    fn new(engine: &'e Engine, opts: &ReplayOptions, trace: &Trace<'_>) -> Self {
        Replayer {
            engine,
            opts: opts.clone(),
            rings: HashMap::new(),
            by_engine_id: HashMap::new(),
            viommus: HashMap::new(),
            devices: HashMap::new(),
            invariant_failures: Vec::new(),
            closed_loop: opts
                .closed_loop
                .unwrap_or(trace.meta().flags & FLAG_GUEST_WAITS_SYNC != 0),
            max_outstanding_syncs: 0,
            sync_waits: 0,
        }
    }

    /// Plays every record of `trace`, at its recorded pace with `opts.speed`; returns the
    /// guest commands written.
    fn play(
        &mut self,
        trace: &Trace<'_>,
        start: Instant,
        progress: &mut impl FnMut(u64),
    ) -> Result<u64, ReplayError> {
        let mut first_ts = None;
        let mut commands = 0u64;
        let mut next_progress = 0u64;
        for (n, rec) in trace.records().enumerate() {
            let rec = rec?;
            let at = format!(
                "{}offset {}",
                trace.name().map(|n| format!("{n}: ")).unwrap_or_default(),
                rec.offset
            );
            if let Some(speed) = self.opts.speed {
                let t0 = *first_ts.get_or_insert(rec.timestamp_ns);
                let due = Duration::from_nanos(
                    (rec.timestamp_ns.saturating_sub(t0) as f64 / speed) as u64,
                );
                while let Some(pause) = pace_step(due, start.elapsed(), Duration::from_millis(1)) {
                    self.pump();
                    std::thread::sleep(pause);
                }
            }
            if n % 64 == 0 {
                self.pump();
            }
            if let Event::Commands { cmds, .. } = rec.event {
                commands += cmds.len() as u64;
                if commands >= next_progress {
                    progress(commands);
                    next_progress = commands + 4096;
                }
            }
            self.event(&at, rec.event)?;
        }
        progress(commands);
        Ok(commands)
    }

    fn into_played(self) -> Played {
        Played {
            rings: self.rings,
            by_engine_id: self.by_engine_id,
            viommus: self.viommus.len(),
            invariant_failures: self.invariant_failures,
            closed_loop: self.closed_loop,
            max_outstanding_syncs: self.max_outstanding_syncs,
            sync_waits: self.sync_waits,
        }
    }

    fn now(&self) -> u64 {
        self.engine.epoch().elapsed().as_nanos() as u64
    }

    /// Completes trapped commands, checking they arrive in ring order.
    fn pump(&mut self) {
        while let Some(t) = self.engine.next_trap() {
            if let Some(id) = self.by_engine_id.get(&t.ring) {
                let rt = self.rings.get_mut(id).expect("ring of a trap");
                if rt.last_trap_seq.is_some_and(|s| s >= t.seq) {
                    self.invariant_failures.push(format!(
                        "ring {id}: trap at entry {} after one at {:?}",
                        t.seq, rt.last_trap_seq
                    ));
                }
                rt.last_trap_seq = Some(t.seq);
            }
            // A ring detached meanwhile has nothing to resume.
            let _ = self.engine.complete_trap(t.ring);
        }
    }

    /// Waits for `done` (pumping traps), or fails after the stall timeout.
    fn wait(
        &mut self,
        at: &str,
        what: impl Fn() -> String,
        mut done: impl FnMut(&mut Self) -> bool,
    ) -> Result<(), ReplayError> {
        let deadline = Instant::now() + self.opts.stall_timeout;
        let mut spins = 0u32;
        while !done(self) {
            self.pump();
            if Instant::now() > deadline {
                return Err(ReplayError::Stalled {
                    at: at.to_string(),
                    what: what(),
                });
            }
            spins += 1;
            if spins < 256 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        Ok(())
    }

    fn ring(&mut self, at: &str, ring: u32) -> Result<&mut RingRt, ReplayError> {
        self.rings
            .get_mut(&ring)
            .ok_or_else(|| ReplayError::Control {
                at: at.to_string(),
                what: format!("ring {ring} was never created"),
            })
    }

    /// A ring is idle: the engine consumed everything published, or it stopped on an error the
    /// guest has not acknowledged, or PROD is not a value it reads. (An acknowledged stop is not
    /// idle: CONS.ERR stays set until the engine sees the acknowledgement and reads on.)
    fn idle(rt: &RingRt) -> bool {
        let cons = rt.guest.cons().0;
        rt.guest.error().is_some()
            || rt.shape.distance(rt.prod, cons) == 0
            || rt.shape.distance(rt.prod, cons) > rt.shape.entries()
    }

    fn wait_all_idle(&mut self, at: &str) -> Result<(), ReplayError> {
        let ids: Vec<u32> = self.rings.keys().copied().collect();
        for id in ids {
            self.wait(
                at,
                || format!("ring {id} to consume what it was given"),
                |rp| Self::idle(&rp.rings[&id]),
            )?;
        }
        Ok(())
    }

    fn control_err(at: &str, e: impl std::fmt::Display) -> ReplayError {
        ReplayError::Control {
            at: at.to_string(),
            what: e.to_string(),
        }
    }

    fn event(&mut self, at: &str, ev: Event<'_>) -> Result<(), ReplayError> {
        match ev {
            ev @ Event::ViommuCreate { viommu, .. } => {
                let cfg = ev.viommu_config().expect("a ViommuCreate");
                self.engine
                    .create_viommu(cfg)
                    .map_err(|e| Self::control_err(at, e))?;
                self.viommus.insert(viommu, (cfg, HashMap::new()));
            }
            Event::DeviceAdd { device, smmu, psid } => {
                self.engine
                    .add_device(DeviceId(device), smmu, psid)
                    .map_err(|e| Self::control_err(at, e))?;
                self.devices.insert(device, psid);
            }
            Event::Bind {
                viommu,
                device,
                vsid,
            } => self.bind(at, viommu, device, vsid)?,
            Event::Unbind { viommu, device } => self.unbind(at, viommu, device)?,
            Event::RingCreate {
                ring,
                viommu,
                log2size,
            } => self.create_ring(at, ring, viommu, log2size)?,
            Event::Commands { ring, slot, cmds } => self.write_commands(at, ring, slot, cmds)?,
            Event::Doorbell { ring, prod } => self.doorbell(at, ring, prod)?,
            Event::GuestAck { ring } => self.guest_ack(at, ring)?,
            Event::GuestFix { ring, slot, cmd } => self.guest_fix(at, ring, slot, cmd)?,
            Event::Outcome { .. } => {}
        }
        Ok(())
    }

    fn bind(&mut self, at: &str, viommu: u32, device: u32, vsid: u32) -> Result<(), ReplayError> {
        self.quiesce(at, viommu)?;
        self.engine
            .set_dev_id(viommu, DeviceId(device), vsid)
            .map_err(|e| Self::control_err(at, e))?;
        let psid = self.devices[&device];
        if let Some((_, b)) = self.viommus.get_mut(&viommu) {
            b.insert(vsid, psid);
        }
        Ok(())
    }

    fn unbind(&mut self, at: &str, viommu: u32, device: u32) -> Result<(), ReplayError> {
        self.quiesce(at, viommu)?;
        let vsid = self
            .engine
            .unset_dev_id(viommu, DeviceId(device))
            .map_err(|e| Self::control_err(at, e))?;
        if let Some((_, b)) = self.viommus.get_mut(&viommu) {
            b.remove(&vsid);
        }
        Ok(())
    }

    fn create_ring(
        &mut self,
        at: &str,
        ring: u32,
        viommu: u32,
        log2size: u8,
    ) -> Result<(), ReplayError> {
        let host = HostRing::create_sealed(log2size, viommu).map_err(|err| ReplayError::Ring {
            at: at.to_string(),
            err,
        })?;
        let guest = GuestRing::open(host.path()).map_err(|err| ReplayError::Ring {
            at: at.to_string(),
            err,
        })?;
        let shape = host.shape();
        let guest_syncs = guest.sync_count();
        let id = self
            .engine
            .attach_ring(host)
            .map_err(|e| Self::control_err(at, e))?;
        self.by_engine_id.insert(id, ring);
        self.rings.insert(
            ring,
            RingRt {
                guest,
                viommu,
                shape,
                prod: 0,
                prod_seq: 0,
                doorbells: Vec::new(),
                model: RingModel::new(shape),
                last_trap_seq: None,
                syncs_expected: 0,
                expected_counted: 0,
                sync_base: guest_syncs,
            },
        );
        Ok(())
    }

    fn write_commands(
        &mut self,
        at: &str,
        ring: u32,
        slot: u32,
        cmds: &[RawCommand],
    ) -> Result<(), ReplayError> {
        let rt = self.ring(at, ring)?;
        let shape = rt.shape;
        let end = shape.advance(slot, cmds.len() as u32);
        // A guest writes a slot only once CONS has freed it. Counted from PROD, which
        // is within a lap of CONS, so a record two laps ahead of a slow engine cannot
        // alias a free slot. A record reaching more than a ring past PROD rewrites old
        // slots (a hostile guest): nothing to wait for.
        let prod = self.ring(at, ring)?.prod;
        let past_prod = shape.distance(end, prod);
        if past_prod <= shape.entries() {
            self.wait(
                at,
                || format!("ring {ring}: slots up to {end:#x} to be free (is it stopped without an ack in the trace?)"),
                |rp| {
                    let cons = rp.rings[&ring].guest.cons().0;
                    shape.distance(prod, cons) + past_prod <= shape.entries()
                },
            )?;
        }
        let rt = self.ring(at, ring)?;
        for (i, &cmd) in cmds.iter().enumerate() {
            let p = shape.advance(slot, i as u32);
            rt.guest.write_slot(p, cmd);
            rt.model.write(p, cmd);
        }
        Ok(())
    }

    fn doorbell(&mut self, at: &str, ring: u32, prod: u32) -> Result<(), ReplayError> {
        let t = self.now();
        let rt = self.ring(at, ring)?;
        let masked = rt.shape.ptr(prod);
        let d = rt.shape.distance(masked, rt.prod);
        if d <= rt.shape.entries() {
            rt.prod_seq += u64::from(d);
            rt.prod = masked;
            rt.doorbells.push((rt.prod_seq, t));
        }
        rt.guest.write_prod_raw(prod);
        let viommu = rt.viommu;
        let (cfg, b) = &self.viommus[&viommu];
        let (cfg, b) = (*cfg, b.clone());
        self.ring(at, ring)?.model.doorbell(prod, &cfg, &b);
        self.after_model_step(at, ring)
    }

    fn guest_ack(&mut self, at: &str, ring: u32) -> Result<(), ReplayError> {
        // The guest acknowledged a stop it saw: wait for the engine's. An ack with no
        // stop (a hostile or confused guest) goes straight in; the engine ignores it.
        if self.ring(at, ring)?.model.stopped() {
            self.wait(
                at,
                || format!("ring {ring} to stop with CONS.ERR, as the guest saw it do"),
                |rp| rp.rings[&ring].guest.error().is_some(),
            )?;
        }
        let viommu = self.ring(at, ring)?.viommu;
        let (cfg, b) = &self.viommus[&viommu];
        let (cfg, b) = (*cfg, b.clone());
        let rt = self.ring(at, ring)?;
        rt.guest.ack_error();
        rt.model.ack(&cfg, &b);
        self.after_model_step(at, ring)
    }

    fn guest_fix(
        &mut self,
        at: &str,
        ring: u32,
        slot: u32,
        cmd: RawCommand,
    ) -> Result<(), ReplayError> {
        if self.ring(at, ring)?.model.stopped() {
            self.wait(
                at,
                || format!("ring {ring} to stop at {slot:#x}, as the guest saw it do"),
                |rp| rp.rings[&ring].guest.error().is_some(),
            )?;
        }
        let rt = self.ring(at, ring)?;
        rt.guest.write_slot(slot, cmd);
        rt.model.write(slot, cmd);
        Ok(())
    }

    /// After the guest moved a ring on (a doorbell, an acknowledgement): counts the CMD_SYNCs
    /// the oracle now expects the ring to complete and, closed loop, waits for them, as the
    /// guest did before writing anything more.
    fn after_model_step(&mut self, at: &str, ring: u32) -> Result<(), ReplayError> {
        let rt = self.ring(at, ring)?;
        let new = rt.model.expected()[rt.expected_counted..]
            .iter()
            .filter(|(_, o)| matches!(o, SlotOutcome::Sync { .. }))
            .count() as u64;
        rt.expected_counted = rt.model.expected().len();
        rt.syncs_expected += new;
        let target = rt.syncs_expected;
        let done = rt.guest.sync_count().wrapping_sub(rt.sync_base);
        let outstanding = target.saturating_sub(done);
        self.max_outstanding_syncs = self.max_outstanding_syncs.max(outstanding);
        if !self.closed_loop || outstanding == 0 {
            return Ok(());
        }
        self.sync_waits += 1;
        self.wait(
            at,
            || format!("ring {ring}: its CMD_SYNC number {target} to complete (closed-loop replay: the guest waits for it)"),
            |rp| {
                let rt = &rp.rings[&ring];
                rt.guest.sync_count().wrapping_sub(rt.sync_base) >= target
            },
        )
    }

    /// Waits until every ring of `viommu` is idle, so a binding changes between commands
    /// exactly where the trace puts it.
    fn quiesce(&mut self, at: &str, viommu: u32) -> Result<(), ReplayError> {
        let ids: Vec<u32> = self
            .rings
            .iter()
            .filter(|(_, r)| r.viommu == viommu)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.wait(
                at,
                || format!("ring {id} to go idle before a bind or unbind"),
                |rp| Self::idle(&rp.rings[&id]),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_input(expected: Vec<SlotOutcome>, got: Vec<SlotOutcome>) -> RingCheckInput {
        let seq = |v: Vec<SlotOutcome>| {
            v.into_iter()
                .enumerate()
                .map(|(i, o)| (i as u64, o))
                .collect()
        };
        RingCheckInput {
            id: 0,
            viommu: 0,
            expected: seq(expected),
            doorbells: Vec::new(),
            got: seq(got),
            published: Vec::new(),
            synced: Vec::new(),
        }
    }

    #[test]
    fn one_wrong_byte_in_a_forwarded_command_is_a_mismatch_and_changes_the_digest() {
        let cmd = RawCommand::new(0x0000_0005_0000_0012, 0x8000_0000);
        let sync = SlotOutcome::Sync {
            cs: 0,
            msidata: 0,
            msiaddr: 0,
        };
        let right = ring_input(
            vec![SlotOutcome::Forwarded(cmd), sync],
            vec![SlotOutcome::Forwarded(cmd), sync],
        );
        let ok = check_ring(&right);
        assert_eq!(ok.mismatch_count, 0);
        // Each byte of D0 and D1 in turn: the comparison and the digest both see it.
        for byte in 0..16 {
            let (mut d0, mut d1) = (cmd.d0(), cmd.d1());
            if byte < 8 {
                d0 ^= 1 << (8 * byte);
            } else {
                d1 ^= 1 << (8 * (byte - 8));
            }
            let wrong = RawCommand::new(d0, d1);
            let c = check_ring(&ring_input(
                vec![SlotOutcome::Forwarded(cmd), sync],
                vec![SlotOutcome::Forwarded(wrong), sync],
            ));
            assert_eq!(c.mismatch_count, 1, "byte {byte} of the forwarded command");
            assert_eq!(c.mismatches[0].got, Some(SlotOutcome::Forwarded(wrong)));
            assert_ne!(c.digest, ok.digest, "byte {byte} left the digest unchanged");
        }
    }

    #[test]
    fn the_forwarded_digest_depends_on_order_and_is_fnv1a() {
        // FNV-1a 64 of the empty input and of "a" (the published test vectors).
        assert_eq!(Fnv1a::default().0, 0xcbf2_9ce4_8422_2325);
        let mut a = Fnv1a::default();
        a.write(b"a");
        assert_eq!(a.0, 0xaf63_dc4c_8601_ec8c);
        let (x, y) = (RawCommand::new(1, 2), RawCommand::new(3, 4));
        let digest = |cmds: &[RawCommand]| {
            let mut d = Fnv1a::default();
            cmds.iter().for_each(|c| d.command(c));
            d
        };
        assert_ne!(digest(&[x, y]), digest(&[y, x]));
    }

    #[test]
    fn a_replay_behind_its_recorded_pace_does_not_wait_and_does_not_panic() {
        let ms = Duration::from_millis;
        // Due at 1 ms, the clock already at 2 ms: nothing to wait for (the old pacing read the
        // clock twice and subtracted the later reading from `due`, which overflowed).
        assert_eq!(pace_step(ms(1), ms(2), ms(1)), None);
        assert_eq!(pace_step(ms(1), ms(1), ms(1)), None);
        assert_eq!(
            pace_step(ms(10), ms(4), ms(1)),
            Some(ms(1)),
            "waits at most a step"
        );
        assert_eq!(
            pace_step(ms(10), Duration::from_micros(9_700), ms(1)),
            Some(Duration::from_micros(300))
        );
    }

    /// A trace whose guest writes, `n` times, a TLBI and a CMD_SYNC and rings the doorbell,
    /// with `header` as its first line.
    fn sync_per_doorbell(header: &str, n: u32) -> Vec<u8> {
        let mut text = format!(
            "{header}\n@0 viommu 0 vmid=1 smmu=0 profile=kernel sidsize=16 range\n\
             @0 ring 0 viommu=0 log2size=8\n"
        );
        for i in 0..n {
            let slot = (2 * i) % 512;
            text += &format!(
                "@{t} cmd ring=0 slot={slot} TLBI_NH_ASID vmid=0 asid=1\n\
                 @{t} cmd ring=0 slot={s1} CMD_SYNC cs=2 msh=3 msiattr=15 msidata=0x0 msiaddr=0x0\n\
                 @{t} doorbell ring=0 prod={p}\n",
                t = i * 1000,
                s1 = slot + 1,
                p = (2 * i + 2) % 512,
            );
        }
        vcmdq_trace::text::build(&text, std::io::Cursor::new(Vec::new()))
            .expect("a valid trace")
            .into_inner()
    }

    #[test]
    fn closed_loop_replay_never_has_more_than_one_outstanding_sync_per_ring() {
        let bytes = sync_per_doorbell("trace version=1 created=0 imported waits-sync", 2000);
        let trace = Trace::parse(&bytes).unwrap();
        // The header's waits-sync makes it the default.
        let r = replay(&trace, &ReplayOptions::default(), |_| {}).unwrap();
        assert!(r.ok(), "{:?}", r.mismatches);
        assert!(r.closed_loop);
        assert_eq!(r.outcomes.syncs, 2000);
        // Each doorbell publishes one CMD_SYNC and the ring waits for it before the next: no
        // doorbell ever finds an earlier one outstanding, whatever the engine's speed.
        assert!(
            r.max_outstanding_syncs <= 1,
            "{} CMD_SYNCs outstanding at once",
            r.max_outstanding_syncs
        );
        assert_eq!(r.sync_latency.len(), 2000, "a latency per CMD_SYNC");
        // Told otherwise, or without the flag: open loop, as every trace replayed before.
        let open = ReplayOptions {
            closed_loop: Some(false),
            ..Default::default()
        };
        let r = replay(&trace, &open, |_| {}).unwrap();
        assert!(r.ok() && !r.closed_loop && r.sync_waits == 0);
        let bytes = sync_per_doorbell("trace version=1 created=0", 10);
        let r = replay(
            &Trace::parse(&bytes).unwrap(),
            &ReplayOptions::default(),
            |_| {},
        )
        .unwrap();
        assert!(r.ok() && !r.closed_loop && r.sync_waits == 0);
    }

    #[test]
    fn speeds_outside_their_range_are_refused() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-9, 1e9] {
            let e = check_speed(bad).unwrap_err();
            assert!(e.contains("0.001 to 1000"), "{bad}: {e}");
        }
        for good in [0.001, 1.0, 1000.0] {
            assert_eq!(check_speed(good), Ok(good));
        }
    }
}
