//! The soak: a long run of mixed, partly hostile guest traffic through the whole engine with
//! physical faults injected, every forwarded command checked online against the oracle.
//!
//! Replay's audit keeps every outcome in memory; a soak of a billion commands cannot. Instead
//! every guest entry is a pure function of (seed, ring, sequence number) (`stream.rs`) and every
//! forwarded command names its ring, so the checks need O(rings) state:
//! - the hardware check (`checker.rs`), run by the modelled SMMU on every command it consumes,
//!   regenerates the ring's next entries, runs the oracle on them and requires the command to be
//!   the oracle's translation of the next forwarded one: rules 1 (isolation) and 3 (nothing
//!   lost, doubled or reordered within a ring);
//! - the guests (`guest.rs`) check CONS, stops at exactly the slots they expect, the sync count,
//!   the completion word, and that each CMD_SYNC completed only after the hardware verified what
//!   came before it (rule 2);
//! - the control plane (this module) completes trapped commands and checks they come once, in
//!   ring order, as the stream wrote them;
//! - at the end, every entry every ring wrote is accounted for (forwarded and verified, dropped,
//!   a completed CMD_SYNC, trapped, or refused at its slot and fixed), and the engine's and the
//!   hardware's counters agree with the guests' and the checker's.
//!
//! Layout (`plan.rs`): `viommus` vIOMMUs alternating the kernel and tegra241 profiles (one in
//! four without range invalidation and with 16-bit vSIDs), `rings` rings spread over them, each
//! with two devices of its own, driven by `guests` threads. Physical faults (`faults.rs`) are
//! scheduled from the seed per physical queue; each one that hits a guest's command stops that
//! ring at the command's slot and the guest acknowledges it without fixing anything.
//!
//! Control-plane churn: each ring's stream is cut into segments ([`Mix::churn_log2`]); at each
//! boundary the guest lets its ring go quiet and asks the control plane to unbind the ring's
//! second device (`unset_dev_id`) or bind it again, and at every third boundary to detach the
//! ring and attach a new one of another size on which the guest goes on. While it acts, the
//! guest writes the segment's window, whose commands naming the device may be forwarded or
//! refused; past the window there is one verdict per entry again. When `unset_dev_id` returns,
//! the control plane hands the checker the ring's published progress: every window entry
//! forwarded with the old binding must lie below it (the barrier). See `docs/soak.md`.

mod checker;
mod faults;
mod guest;
mod plan;
mod stream;

pub use checker::{Checker, Tally, Violations, HOLD_PUBLISH, KEEP_VIOLATIONS};
pub use faults::{schedule, FaultCounts};
pub use guest::{GuestStats, PROD_GAMES};
pub use plan::{Plan, PlanError, RingPlan, ViommuPlan, MAX_RINGS};
pub use stream::{ident_addr, ident_asid, Class, Entry, Hostile, Mix, Stream, FIX};

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vcmdq::engine::{Engine, EngineConfig, EngineError, EngineStats, RingId};
use vcmdq::hwmodel::{
    HwConfig, HwPlacement, ModelCounters, ModelError, ModelQueue, OnCheckFailure,
};
use vcmdq::queue::CError;
use vcmdq::ring::{GuestRing, HostRing, RingError};
use vcmdq::sync::lock;
use vcmdq::viommu::DeviceId;

/// How to soak.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// Guest entries to write over all rings (each ring then writes up to its next blocking
    /// CMD_SYNC, so a few hundred more per ring). With `duration` too, whichever comes first.
    pub commands: Option<u64>,
    /// How long the guests write.
    pub duration: Option<Duration>,
    /// Decides every stream, the layout's streams and the fault schedule.
    pub seed: u64,
    /// Guest threads.
    pub guests: usize,
    /// Guest rings, spread over the vIOMMUs round robin and over the guest threads.
    pub rings: usize,
    /// vIOMMUs.
    pub viommus: usize,
    /// LOG2SIZE of each guest ring.
    pub ring_log2size: u8,
    /// Engine workers (each with its own physical queue).
    pub workers: usize,
    /// Where the hardware model runs.
    pub hardware: HwPlacement,
    /// Guest entries per batch at most.
    pub batch_limit: usize,
    /// Guest entries taken from one ring per pass at most.
    pub ring_budget: usize,
    /// LOG2SIZE of each physical queue.
    pub phys_log2size: u8,
    /// About one physical fault every this many physical positions; 0 for none.
    pub fault_every: u64,
    /// Injected stalls last up to this.
    pub max_stall: Duration,
    /// A further busy wait per physical command (a slow SMMU).
    pub slow: Option<Duration>,
    /// What the streams hold.
    pub mix: Mix,
    /// A ring with work outstanding that does not move for this long is a violation.
    pub stall_timeout: Duration,
    /// How often the progress callback runs.
    pub progress_every: Duration,
}

impl Default for SoakConfig {
    fn default() -> Self {
        SoakConfig {
            commands: Some(1_000_000),
            duration: None,
            seed: 1,
            guests: 1,
            rings: 8,
            viommus: 4,
            ring_log2size: 10,
            workers: 1,
            hardware: HwPlacement::Inline,
            batch_limit: 64,
            ring_budget: 256,
            phys_log2size: vcmdq::hwmodel::DEFAULT_LOG2SIZE,
            fault_every: 1_000_000,
            max_stall: Duration::from_micros(20),
            slow: None,
            mix: Mix::default(),
            stall_timeout: Duration::from_secs(60),
            progress_every: Duration::from_secs(5),
        }
    }
}

/// Why a soak could not run (its findings are in [`SoakReport`], not here).
#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    /// The layout asked for is impossible.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Neither a command count nor a duration, or zero guests.
    #[error("{0}")]
    Config(String),
    /// The engine refused the setup.
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    /// The physical queue model could not be built.
    #[error("physical queue model: {0}")]
    Model(#[from] ModelError),
    /// A ring could not be made.
    #[error("ring: {0}")]
    Ring(#[from] RingError),
}

/// A snapshot for progress reports.
#[derive(Clone, Debug)]
pub struct Progress {
    /// Since the guests started.
    pub elapsed: Duration,
    /// Guest entries written.
    pub submitted: u64,
    /// Forwarded commands the hardware check verified.
    pub verified: u64,
    /// Trapped commands completed.
    pub traps: u64,
    /// The engine's counters.
    pub engine: EngineStats,
    /// Violations so far.
    pub violations: u64,
}

/// Physical errors the hardware raised, by CONS.ERR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HwErrors {
    /// CERROR_ILL.
    pub ill: u64,
    /// CERROR_ABT.
    pub abt: u64,
    /// CERROR_ATC_INV_SYNC.
    pub atc_inv_sync: u64,
}

impl HwErrors {
    /// Of every kind.
    pub fn total(&self) -> u64 {
        self.ill + self.abt + self.atc_inv_sync
    }
}

/// What a soak did and found.
#[derive(Clone, Debug)]
pub struct SoakReport {
    /// The configuration.
    pub config: SoakConfig,
    /// From the first guest write to the last ring's last CMD_SYNC.
    pub elapsed: Duration,
    /// What the guests did and saw.
    pub guests: GuestStats,
    /// What the hardware check and the final accounting verified.
    pub tally: Tally,
    /// Trapped commands the control plane completed, each checked.
    pub traps: u64,
    /// The engine's counters.
    pub engine: EngineStats,
    /// Commands the hardware consumed.
    pub hw_consumed: u64,
    /// Physical CMD_SYNCs the hardware completed.
    pub hw_syncs: u64,
    /// Physical errors the hardware raised (injected faults that fired).
    pub hw_errors: HwErrors,
    /// Stalls injected that fired.
    pub hw_stalls: u64,
    /// Faults scheduled over all physical queues (those past the last position reached do
    /// not fire).
    pub faults_scheduled: FaultCounts,
    /// `unset_dev_id` calls the control plane made at segment boundaries, each checked.
    pub unbinds: u64,
    /// Of the unbinds, those made while a worker held a batch carrying the device's pSID
    /// between translating and publishing it (which the unbind must wait for).
    pub unbinds_held: u64,
    /// `set_dev_id` calls that bound a device again.
    pub rebinds: u64,
    /// Rings detached and replaced by a new one of another size.
    pub ring_swaps: u64,
    /// Violations, all kinds.
    pub violation_count: u64,
    /// The first [`KEEP_VIOLATIONS`].
    pub violations: Vec<String>,
}

impl SoakReport {
    /// Nothing broke.
    pub fn ok(&self) -> bool {
        self.violation_count == 0
    }

    /// Guest entries written per second.
    pub fn rate(&self) -> f64 {
        self.guests.submitted as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The control plane's view of an attached ring.
#[derive(Clone, Copy)]
struct Attached {
    /// Its index in the plan.
    ring: usize,
    /// The sequence number of the stream's entry at its pointer 0.
    base: u64,
    shape: vcmdq::queue::QueueShape,
}

/// Control-plane state per ring: the next trapped entry must come after this one.
struct TrapCheck {
    next: Vec<u64>,
    delivered: Vec<u64>,
}

impl TrapCheck {
    fn new(rings: usize) -> Self {
        TrapCheck {
            next: vec![0; rings],
            delivered: vec![0; rings],
        }
    }
}

/// Runs a soak; `progress` is called every [`SoakConfig::progress_every`] from the control
/// thread (the caller's).
pub fn run(cfg: &SoakConfig, mut progress: impl FnMut(&Progress)) -> Result<SoakReport, SoakError> {
    check_config(cfg)?;
    let checks = Checks::new(cfg)?;
    let (plan, violations, checker) = (&checks.plan, &checks.violations, &checks.checker);
    let (hw, faults_scheduled) = hardware_model(cfg, checker);
    let (engine, model) = start_engine(cfg, plan, hw)?;
    let (mut control, drivers) = attach_rings(cfg, plan, &engine)?;
    let churn = guest::Churn::new(plan.rings.len());
    let mut traps = TrapCheck::new(plan.rings.len());
    let drive = Drive {
        cfg,
        plan,
        engine: &engine,
        model: &model,
        ctx: checks.guest_ctx(cfg, &churn),
    };
    let start = Instant::now();
    let (guests, traps_written) =
        drive.until_done(drivers, &mut control, &mut traps, start, &mut progress);
    let elapsed = start.elapsed();
    let end = shut_down(engine, &model, violations);
    let tally = checker.finish();
    // After a panic or a violation the counters no longer add up, and saying so would bury
    // the first finding.
    if end.clean && !violations.any() {
        check_churn(violations, &control, &guests);
        accounting(
            violations,
            &guests,
            &tally,
            &traps,
            &traps_written,
            &end.stats,
            &end.hw,
        );
    }
    Ok(SoakReport {
        config: cfg.clone(),
        elapsed,
        guests,
        tally,
        traps: traps.delivered.iter().sum(),
        engine: end.stats,
        hw_consumed: end.hw.consumed,
        hw_syncs: end.hw.syncs,
        hw_errors: end.hw.errors,
        hw_stalls: end.hw.stalls,
        faults_scheduled,
        unbinds: control.unbinds,
        unbinds_held: control.unbinds_held,
        rebinds: control.rebinds,
        ring_swaps: control.swaps,
        violation_count: violations.count(),
        violations: violations.first(),
    })
}

/// The layout and the checks that every thread of the run consults.
struct Checks {
    plan: Arc<Plan>,
    stream: Arc<Stream>,
    violations: Arc<Violations>,
    checker: Arc<Checker>,
}

impl Checks {
    fn new(cfg: &SoakConfig) -> Result<Self, SoakError> {
        let plan = Arc::new(Plan::new(cfg.viommus, cfg.rings)?);
        let stream = Arc::new(Stream::new(&plan, cfg.seed, cfg.mix));
        let violations = Arc::new(Violations::default());
        let checker = Arc::new(Checker::new(
            plan.clone(),
            stream.clone(),
            violations.clone(),
        ));
        Ok(Checks {
            plan,
            stream,
            violations,
            checker,
        })
    }

    fn guest_ctx<'a>(&'a self, cfg: &SoakConfig, churn: &'a guest::Churn) -> guest::Ctx<'a> {
        guest::Ctx {
            stream: &self.stream,
            checker: &self.checker,
            violations: &self.violations,
            stall_timeout: cfg.stall_timeout,
            churn,
        }
    }
}

/// Refuses a configuration the soak cannot run, before anything is set up.
fn check_config(cfg: &SoakConfig) -> Result<(), SoakError> {
    if cfg.commands.is_none() && cfg.duration.is_none() {
        return Err(SoakError::Config(
            "give a command count, a duration, or both".into(),
        ));
    }
    if (1..4).contains(&cfg.mix.churn_log2) {
        return Err(SoakError::Config(format!(
            "segments of 2^{} entries: the churn needs at least 2^4 (or 0 for none)",
            cfg.mix.churn_log2
        )));
    }
    if cfg.guests == 0 || cfg.guests > cfg.rings {
        return Err(SoakError::Config(format!(
            "{} guest threads for {} rings: each thread needs a ring",
            cfg.guests, cfg.rings
        )));
    }
    Ok(())
}

/// The modelled SMMU behind each physical queue: it checks every command it consumes against
/// the oracle and raises the faults scheduled from the seed. Also returns the faults scheduled
/// over all the queues.
fn hardware_model(cfg: &SoakConfig, checker: &Arc<Checker>) -> (HwConfig, FaultCounts) {
    // Physical positions per queue: forwarded commands plus about one CMD_SYNC in twenty.
    let workers = cfg.workers.max(1) as u64;
    let horizon = match (cfg.commands, cfg.duration) {
        (Some(n), _) => n / workers + n / workers / 8 + cfg.fault_every,
        (None, Some(d)) => d.as_secs().max(1) * 30_000_000 / workers,
        (None, None) => 0,
    };
    let faults = schedule(cfg.seed, cfg.fault_every, horizon, cfg.max_stall);
    let fc = FaultCounts::of(&faults);
    let faults_scheduled = FaultCounts {
        ill: fc.ill * workers,
        abt: fc.abt * workers,
        atc_inv_sync: fc.atc_inv_sync * workers,
        stall: fc.stall * workers,
    };
    let c = checker.clone();
    let mut hw = HwConfig::default().with_check(move |cmd| c.check(cmd));
    if cfg.mix.churn_log2 != 0 {
        let c = checker.clone();
        hw.before_publish = Some(Arc::new(move |cmds: &[vcmdq::command::RawCommand]| {
            c.before_publish(cmds)
        }));
    }
    hw.on_check_failure = OnCheckFailure::Record;
    hw.faults = faults;
    hw.slow = cfg.slow;
    (hw, faults_scheduled)
}

/// Starts the engine on physical queue models and gives it the plan's vIOMMUs and devices,
/// every device bound; returns it with the models' counters.
fn start_engine(
    cfg: &SoakConfig,
    plan: &Plan,
    hw: HwConfig,
) -> Result<(Engine, ModelCounters), SoakError> {
    let (queues, model) =
        ModelQueue::for_workers(cfg.workers, cfg.phys_log2size, &hw, cfg.hardware)?;
    let engine = Engine::start(
        EngineConfig {
            workers: cfg.workers,
            batch_limit: cfg.batch_limit,
            ring_budget: cfg.ring_budget,
            audit: false,
            capture: None,
            ..Default::default()
        },
        queues,
    )?;
    for v in &plan.viommus {
        engine.create_viommu(v.cfg)?;
    }
    for (device, smmu, psid, v, vsid) in plan.devices() {
        engine.add_device(DeviceId(device), smmu, psid)?;
        engine.set_dev_id(plan.viommus[v].cfg.id, DeviceId(device), vsid)?;
    }
    Ok((engine, model))
}

/// Makes and attaches the plan's rings; returns the control plane that knows them and, per
/// guest thread, the drivers of the rings it writes (round robin).
fn attach_rings(
    cfg: &SoakConfig,
    plan: &Plan,
    engine: &Engine,
) -> Result<(Control, Vec<Vec<guest::Driver>>), SoakError> {
    let mut ring_of_id: std::collections::HashMap<RingId, Attached> =
        std::collections::HashMap::new();
    let mut ids = Vec::with_capacity(plan.rings.len());
    let mut drivers: Vec<Vec<guest::Driver>> = (0..cfg.guests).map(|_| Vec::new()).collect();
    for (i, r) in plan.rings.iter().enumerate() {
        let host = HostRing::create_sealed(cfg.ring_log2size, plan.viommus[r.viommu].cfg.id)?;
        let g = GuestRing::open(host.path())?;
        let shape = g.shape();
        let id = engine.attach_ring(host)?;
        ring_of_id.insert(
            id,
            Attached {
                ring: i,
                base: 0,
                shape,
            },
        );
        ids.push(id);
        drivers[i % cfg.guests].push(guest::Driver::new(i, g, cfg.seed));
    }
    let control = Control {
        ids,
        ring_of_id,
        unbinds: 0,
        unbinds_held: 0,
        rebinds: 0,
        swaps: 0,
    };
    Ok((control, drivers))
}

/// What the guest threads and the control plane share while the soak runs.
struct Drive<'a> {
    cfg: &'a SoakConfig,
    plan: &'a Plan,
    engine: &'a Engine,
    model: &'a ModelCounters,
    ctx: guest::Ctx<'a>,
}

impl Drive<'_> {
    /// Runs the guest threads to their end with this thread as the control plane; returns what
    /// the guests did and each ring's trapped entries written.
    fn until_done(
        &self,
        drivers: Vec<Vec<guest::Driver>>,
        control: &mut Control,
        traps: &mut TrapCheck,
        start: Instant,
        progress: &mut impl FnMut(&Progress),
    ) -> (GuestStats, Vec<u64>) {
        let deadline = self.cfg.duration.map(|d| start + d);
        let finished = AtomicUsize::new(0);
        std::thread::scope(|s| {
            let handles = self.spawn_guests(s, drivers, &finished, deadline);
            self.control_plane(control, traps, &finished, start, progress);
            self.join_guests(handles)
        })
    }

    /// One thread per entry of `drivers`, each writing its share of the command count.
    fn spawn_guests<'s>(
        &'s self,
        s: &'s std::thread::Scope<'s, '_>,
        drivers: Vec<Vec<guest::Driver>>,
        finished: &'s AtomicUsize,
        deadline: Option<Instant>,
    ) -> Vec<std::thread::ScopedJoinHandle<'s, Vec<guest::Driver>>> {
        let nguests = self.cfg.guests as u64;
        drivers
            .into_iter()
            .enumerate()
            .map(|(g, mut ds)| {
                let ctx = &self.ctx;
                let budget = self
                    .cfg
                    .commands
                    .map(|n| n / nguests + u64::from((g as u64) < n % nguests));
                std::thread::Builder::new()
                    .name(format!("soak-guest{g}"))
                    .spawn_scoped(s, move || {
                        guest::run(ctx, &mut ds, budget, deadline);
                        finished.fetch_add(1, Ordering::Release);
                        ds
                    })
                    .expect("spawn a guest thread")
            })
            .collect()
    }

    /// The control plane, until every guest thread has finished: trapped commands, segment
    /// requests, progress.
    fn control_plane(
        &self,
        control: &mut Control,
        traps: &mut TrapCheck,
        finished: &AtomicUsize,
        start: Instant,
        progress: &mut impl FnMut(&Progress),
    ) {
        let violations = self.ctx.violations;
        let mut next_report = Instant::now() + self.cfg.progress_every;
        let mut idle = 0u32;
        loop {
            let mut got = self.complete_traps(&control.ring_of_id, traps);
            let all_finished = finished.load(Ordering::Acquire) == self.cfg.guests;
            // After the guests' last requests too: a guest may finish with its request made.
            let (engine, plan, cfg) = (self.engine, self.plan, self.cfg);
            got |= control.serve(
                engine,
                plan,
                self.ctx.checker,
                self.ctx.churn,
                cfg,
                violations,
            );
            if all_finished {
                break;
            }
            if idle.is_multiple_of(256) && !violations.any() {
                let dead = engine.dead_threads() + self.model.dead_threads();
                if dead > 0 {
                    violations.report(format!(
                        "{dead} engine thread(s) died (panicked) while the soak ran"
                    ));
                }
            }
            if Instant::now() >= next_report {
                next_report += cfg.progress_every;
                progress(&self.snapshot(start, traps));
            }
            if got {
                idle = 0;
            } else {
                idle = idle.saturating_add(1);
                if idle < 64 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(20));
                }
            }
        }
    }

    /// Checks and completes every trapped command waiting; true if there was one.
    fn complete_traps(
        &self,
        ring_of_id: &std::collections::HashMap<RingId, Attached>,
        traps: &mut TrapCheck,
    ) -> bool {
        let mut got = false;
        while let Some(t) = self.engine.next_trap() {
            got = true;
            let violations = self.ctx.violations;
            check_trap(
                self.plan,
                self.ctx.stream,
                ring_of_id,
                traps,
                violations,
                &t,
            );
            if let Err(e) = self.engine.complete_trap(t.ring) {
                violations.report(format!("control plane: complete_trap: {e}"));
            }
        }
        got
    }

    fn snapshot(&self, start: Instant, traps: &TrapCheck) -> Progress {
        let checker = self.ctx.checker;
        Progress {
            elapsed: start.elapsed(),
            submitted: (0..self.plan.rings.len())
                .map(|r| checker.submitted(r))
                .sum(),
            verified: checker.verified(),
            traps: traps.delivered.iter().sum(),
            engine: self.engine.stats(),
            violations: self.ctx.violations.count(),
        }
    }

    /// Sums what the guest threads did; a thread that panicked is a violation.
    fn join_guests(
        &self,
        handles: Vec<std::thread::ScopedJoinHandle<'_, Vec<guest::Driver>>>,
    ) -> (GuestStats, Vec<u64>) {
        let mut stats = GuestStats::default();
        let mut traps_written = vec![0u64; self.plan.rings.len()];
        for h in handles {
            match h.join() {
                Ok(ds) => {
                    for d in &ds {
                        stats.add(&d.stats);
                        traps_written[d.ring()] = d.stats.traps;
                    }
                }
                Err(p) => self
                    .ctx
                    .violations
                    .report(format!("a guest thread panicked: {}", panic_text(&p))),
            }
        }
        (stats, traps_written)
    }
}

/// The engine's counters at its end.
struct End {
    stats: EngineStats,
    hw: HwTotals,
    /// False if the shutdown panicked: then `stats` are as last read and `hw` is empty.
    clean: bool,
}

/// The hardware counters summed over the physical queues.
#[derive(Default)]
struct HwTotals {
    consumed: u64,
    syncs: u64,
    stalls: u64,
    check_failures: u64,
    errors: HwErrors,
}

impl HwTotals {
    fn of(hw: &[vcmdq::hwmodel::HwCounters]) -> Self {
        let mut t = HwTotals::default();
        for h in hw {
            t.consumed += h.consumed;
            t.syncs += h.syncs;
            t.stalls += h.stalls;
            t.check_failures += h.check_failures;
            t.errors.ill += h.errors[CError::Ill.code() as usize & 7];
            t.errors.abt += h.errors[CError::Abt.code() as usize & 7];
            t.errors.atc_inv_sync += h.errors[CError::AtcInvSync.code() as usize & 7];
        }
        t
    }
}

/// Shuts the engine down; a panic in it is a violation, not the end of the report.
fn shut_down(engine: Engine, model: &ModelCounters, violations: &Violations) -> End {
    let last_stats = engine.stats();
    match std::panic::catch_unwind(AssertUnwindSafe(|| engine.shutdown())) {
        Ok(r) => End {
            stats: r.stats,
            hw: HwTotals::of(&model.collect()),
            clean: true,
        },
        Err(p) => {
            violations.report(format!("the engine panicked: {}", panic_text(&p)));
            End {
                stats: last_stats,
                hw: HwTotals::default(),
                clean: false,
            }
        }
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

/// A trapped command: from a ring of the soak, its vIOMMU's, at the slot of its sequence
/// number, after the ring's previous trap, and exactly the entry the stream wrote there.
fn check_trap(
    plan: &Plan,
    stream: &Stream,
    ring_of_id: &std::collections::HashMap<RingId, Attached>,
    traps: &mut TrapCheck,
    violations: &Violations,
    t: &vcmdq::engine::TrapEvent,
) {
    let Some(&Attached { ring, base, shape }) = ring_of_id.get(&t.ring) else {
        violations.report(format!(
            "control plane: a trap from unknown ring {:?}",
            t.ring
        ));
        return;
    };
    // The engine numbers a ring's entries from its attach; the stream from the ring's start.
    let seq = base + t.seq;
    let mut bad = Vec::new();
    if t.viommu != plan.viommu_of(ring).cfg.id {
        bad.push(format!("vIOMMU {}", t.viommu));
    }
    if seq < traps.next[ring] {
        bad.push(format!(
            "after the trap of entry {} (doubled or out of order)",
            traps.next[ring] - 1
        ));
    }
    if t.slot != shape.ptr(t.seq as u32) {
        bad.push(format!("slot {:#x} is not that of its entry", t.slot));
    }
    let e = stream.entry(ring, seq);
    if e.class != Class::Trap || e.cmd != t.cmd {
        bad.push(format!(
            "the ring wrote {} ({:?}) there",
            vcmdq::command::text::format_raw(&e.cmd),
            e.class
        ));
    }
    if bad.is_empty() {
        traps.delivered[ring] += 1;
    } else {
        violations.report(format!(
            "control plane: ring {ring} trapped entry {seq} ({}): {}",
            vcmdq::command::text::format_raw(&t.cmd),
            bad.join("; ")
        ));
    }
    traps.next[ring] = traps.next[ring].max(seq + 1);
}

/// The control plane's side of the segment protocol.
struct Control {
    /// The engine's id of each ring of the plan now.
    ids: Vec<RingId>,
    /// Every ring attached during the run (a trap event names the id).
    ring_of_id: std::collections::HashMap<RingId, Attached>,
    unbinds: u64,
    unbinds_held: u64,
    rebinds: u64,
    swaps: u64,
}

/// How long the control plane waits for a worker to hold a batch of the window before it
/// unbinds anyway.
const UNBIND_MEET: Duration = Duration::from_millis(1);

/// How long a detach of a quiet ring may take before it is a violation.
const DETACH_TIMEOUT: Duration = Duration::from_secs(10);

impl Control {
    /// Acts on every ring's pending request; true if there was one.
    fn serve(
        &mut self,
        engine: &Engine,
        plan: &Plan,
        checker: &Checker,
        churn: &guest::Churn,
        cfg: &SoakConfig,
        violations: &Violations,
    ) -> bool {
        let mut any = false;
        for ring in 0..plan.rings.len() {
            let k = churn.request[ring].load(Ordering::Acquire);
            if k > churn.ack[ring].load(Ordering::Relaxed) {
                any = true;
                if let Err(e) = self.act(engine, plan, checker, churn, cfg, ring, k) {
                    violations.report(format!("control plane: ring {ring} segment {k}: {e}"));
                }
                churn.ack[ring].store(k, Ordering::Release);
            }
        }
        any
    }

    /// Prepares ring `ring` (quiet: CONS = PROD, nothing pending) for segment `k`: its second
    /// device unbound for odd `k`, bound for even; every third boundary a new ring.
    #[allow(clippy::too_many_arguments)]
    fn act(
        &mut self,
        engine: &Engine,
        plan: &Plan,
        checker: &Checker,
        churn: &guest::Churn,
        cfg: &SoakConfig,
        ring: usize,
        k: u64,
    ) -> Result<(), String> {
        let r = &plan.rings[ring];
        let vcfg = &plan.viommu_of(ring).cfg;
        let v = engine
            .viommu(vcfg.id)
            .ok_or_else(|| format!("vIOMMU {} is gone", vcfg.id))?;
        let device = DeviceId(plan.device(ring, 1));
        if k % 2 == 1 {
            // Other rings keep the workers translating meanwhile: the grace period waits for
            // their batches.
            // Unbind while a worker holds one of the window's batches carrying the device's
            // pSID, if one comes within a while (the guest is writing the window now).
            checker.set_unbinding(ring, true);
            let wait = Instant::now() + UNBIND_MEET;
            while !checker.held(ring) && Instant::now() < wait {
                std::thread::yield_now();
            }
            self.unbinds_held += u64::from(checker.held(ring));
            let vsid = v.unset_dev_id(device);
            let progress = engine.ring_progress(self.ids[ring]).map(|p| p.published());
            checker.set_unbinding(ring, false);
            let vsid = vsid.map_err(|e| e.to_string())?;
            if vsid != r.vsids[1] {
                return Err(format!(
                    "unset_dev_id returned vSID {vsid:#x}, it was {:#x}",
                    r.vsids[1]
                ));
            }
            // How far the engine had published the ring when the unbind returned: every batch
            // translated with the binding is below it.
            let id = self.ids[ring];
            let base = self.ring_of_id[&id].base;
            let published = progress.ok_or_else(|| format!("ring {id:?} has no progress"))?;
            checker.unset_returned(ring, k, base + published);
            self.unbinds += 1;
        } else {
            v.set_dev_id(device, r.vsids[1])
                .map_err(|e| e.to_string())?;
            self.rebinds += 1;
        }
        if k.is_multiple_of(3) {
            engine
                .detach_ring(self.ids[ring], DETACH_TIMEOUT)
                .map_err(|e| format!("detach: {e}"))?;
            let sizes = [cfg.ring_log2size, 6, 8, 5];
            let log2 = sizes[(k / 3) as usize % sizes.len()];
            let host = HostRing::create_sealed(log2, vcfg.id).map_err(|e| e.to_string())?;
            let g = GuestRing::open(host.path()).map_err(|e| e.to_string())?;
            let shape = g.shape();
            let id = engine.attach_ring(host).map_err(|e| e.to_string())?;
            self.ids[ring] = id;
            self.ring_of_id.insert(
                id,
                Attached {
                    ring,
                    base: k << cfg.mix.churn_log2,
                    shape,
                },
            );
            *lock(&churn.mailbox[ring]) = Some(g);
            self.swaps += 1;
        }
        Ok(())
    }
}

/// Every segment boundary a guest crossed was acted on once.
fn check_churn(violations: &Violations, control: &Control, g: &GuestStats) {
    let expect = |what: &str, got: u64, want: u64| {
        if got != want {
            violations.report(format!("accounting: {what}: {got}, expected {want}"));
        }
    };
    expect(
        "unbinds and rebinds vs segment boundaries the guests crossed",
        control.unbinds + control.rebinds,
        g.boundaries,
    );
    expect(
        "rings replaced vs boundaries the guests reached that replace one",
        control.swaps,
        g.ring_swaps,
    );
}

/// The final cross-checks between what the guests wrote and saw, what the checker verified,
/// and the engine's and the hardware's counters.
fn accounting(
    violations: &Violations,
    g: &GuestStats,
    tally: &Tally,
    traps: &TrapCheck,
    traps_written: &[u64],
    e: &EngineStats,
    hw: &HwTotals,
) {
    let expect = |what: &str, got: u64, want: u64| {
        if got != want {
            violations.report(format!("accounting: {what}: {got}, expected {want}"));
        }
    };
    expect(
        "entries the checker accounted for vs entries written",
        tally.entries(),
        g.submitted,
    );
    expect("CMD_SYNCs accounted vs written", tally.syncs, g.syncs);
    expect(
        "PREFETCHes accounted vs written",
        tally.dropped,
        g.prefetches,
    );
    expect("trapped accounted vs written", tally.trapped, g.traps);
    expect(
        "refused accounted vs written",
        tally.refused,
        g.hostile_total(),
    );
    expect(
        "refusals the guests saw vs hostile entries written",
        g.refused_total(),
        g.hostile_total(),
    );
    for (ring, (&d, &w)) in traps.delivered.iter().zip(traps_written).enumerate() {
        expect(&format!("ring {ring}: traps completed vs written"), d, w);
    }
    expect(
        "window entries that did not reach the hardware vs those the guests fixed",
        tally.window_fixed,
        g.window_fixes,
    );
    expect(
        "guest CMD_SYNCs the engine completed vs written (fixes included)",
        e.guest_syncs,
        g.syncs + g.hostile_total() + g.window_fixes,
    );
    expect(
        "commands the hardware consumed vs forwarded + physical CMD_SYNCs",
        hw.consumed,
        e.forwarded + e.phys_syncs,
    );
    expect(
        "physical errors recovered vs raised",
        e.phys_faults,
        hw.errors.total(),
    );
    expect("failed hardware checks", hw.check_failures, 0);
    if g.phys_stops_total() > e.phys_faults {
        violations.report(format!(
            "accounting: the guests saw {} physical-fault stops, the engine recovered {} faults",
            g.phys_stops_total(),
            e.phys_faults
        ));
    }
    if e.refused < g.refused_total() {
        violations.report(format!(
            "accounting: the engine refused {} entries, the guests saw {} refusals",
            e.refused,
            g.refused_total()
        ));
    }
}
