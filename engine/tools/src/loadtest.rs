//! Latency under load, measured: first the saturation throughput (a closed loop: the guest
//! submits as fast as the engine takes), then an open-loop generator at fractions of it:
//! batches scheduled at fixed intervals, each latency measured from the batch's scheduled
//! doorbell time (a late generator or a full ring counts against the engine, so coordinated
//! omission cannot hide a stall), to its physical publication and to its guest CMD_SYNC's
//! completion. `vcmdq loadtest` prints what [`run`] returns.
//!
//! Setup as `make bench`'s end-to-end suite: one engine worker with the hardware model inline
//! and free (`HwConfig::zero_cost`), audit and capture off; N heap rings, one vIOMMU each with 16
//! bound vSIDs; batches of B commands of a guest's invalidation mix, each ending in a CMD_SYNC.
//! Publication is seen through [`RingProgress`] (one store per batch in the worker, no clock
//! read); the generator, which spins between sends, timestamps what it sees, so a latency is
//! exact to one turn of its loop (well under a microsecond with few rings). Two diagnostics
//! split a tail between the sides: how late the generator rang each doorbell (the OS
//! preempting it), and the time from the doorbell as actually rung to publication.
//!
//! On a busy machine the generator cannot hold the asked rate and the percentiles measure the
//! machine, not the engine. Each level is therefore judged on its generator's lateness, full
//! rings, batches unsent at its deadline, and, read from /proc before and after it, the
//! involuntary context switches of this process's threads and the CPU steal; a level that
//! fails a check carries its reasons ([`Level::reasons`]) and is NOT the engine's latency.

use hdrhistogram::Histogram;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vcmdq::command::{opcode, RawCommand};
use vcmdq::engine::{Engine, EngineConfig, EngineError, EngineStats, RingProgress};
use vcmdq::hwmodel::{HwConfig, HwPlacement, ModelError, ModelQueue, DEFAULT_LOG2SIZE};
use vcmdq::mock::{guest_command, DriverError, FixPolicy, GuestDriver, Rng};
use vcmdq::queue::CError;
use vcmdq::ring::{AttachOptions, GuestRing, HostRing, RingError};
use vcmdq::viommu::{DeviceId, ViommuConfig};

/// What a load test is asked for (`vcmdq loadtest`'s flags).
#[derive(Clone, Debug, PartialEq)]
pub struct LoadtestOptions {
    /// Guest rings, served round-robin by the generator (1 to [`MAX_RINGS`]).
    pub rings: u32,
    /// Commands per batch, each batch ending in a CMD_SYNC (1 to [`MAX_BATCH`]).
    pub batch: u32,
    /// Measurement per load level and for the saturation run, in seconds (above 0, at most
    /// [`MAX_SECS`]).
    pub secs: f64,
    /// Load levels in percent of the saturation throughput (above 0, at most 100).
    pub loads: Vec<f64>,
    /// This saturation throughput (commands/s, [`MIN_SATURATION`] to [`MAX_SATURATION`])
    /// instead of measuring it.
    pub saturation: Option<f64>,
    /// Pin the generator (the calling thread) and the engine's worker to two separate CPUs for
    /// the run ([`crate::affinity`]); the caller's affinity is restored at the end.
    pub pin: bool,
}

/// Where the generator and the engine ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pinning {
    /// Not asked ([`LoadtestOptions::pin`] false): the scheduler placed the threads.
    Off,
    /// The generator on one CPU, the engine's threads on another.
    Pinned {
        /// The generator's CPU.
        generator: usize,
        /// The engine worker's CPU.
        engine: usize,
    },
    /// Asked, but not possible here (fewer than two CPUs allowed, or the kernel refused): the
    /// reason. The run goes on unpinned.
    Unavailable(String),
}

impl std::fmt::Display for Pinning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pinning::Off => write!(f, "not pinned (--no-pin)"),
            Pinning::Pinned { generator, engine } => {
                write!(f, "generator on CPU {generator}, engine on CPU {engine}")
            }
            Pinning::Unavailable(why) => write!(f, "not pinned: {why}"),
        }
    }
}

/// Why a load test did not run or did not finish. The option errors name the `vcmdq loadtest`
/// flag that sets the option.
#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    /// [`LoadtestOptions::secs`] out of range.
    #[error("--duration {secs}s: must be above 0 and at most {MAX_SECS} s")]
    Duration {
        /// What was asked.
        secs: f64,
    },
    /// [`LoadtestOptions::loads`] empty or a level out of range.
    #[error("--loads must be percentages above 0 and at most 100")]
    Loads,
    /// [`LoadtestOptions::saturation`] out of range.
    #[error(
        "--saturation {saturation:e}: must be {MIN_SATURATION:e} to {MAX_SATURATION:e} commands/s"
    )]
    Saturation {
        /// What was asked.
        saturation: f64,
    },
    /// [`LoadtestOptions::rings`] out of range.
    #[error("--rings {rings}: must be 1 to {MAX_RINGS}")]
    Rings {
        /// What was asked.
        rings: u32,
    },
    /// [`LoadtestOptions::batch`] out of range.
    #[error("--batch {batch}: must be 1 to {MAX_BATCH} commands")]
    Batch {
        /// What was asked.
        batch: u32,
    },
    /// The engine refused its setup.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The physical queue model could not be built.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A guest ring could not be made or attached.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// The guest driver refused a ring.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The engine gave no progress counter for a ring it had just attached.
    #[error("the ring just attached has no progress counter")]
    NoProgress,
    /// Batches still unfinished [`DRAIN`] after the last was sent.
    #[error("the engine did not complete {open} batches within {drain:?} of the last")]
    NotDrained {
        /// Batches unfinished.
        open: usize,
        /// [`DRAIN`].
        drain: Duration,
    },
    /// The engine stopped a guest ring with a CONS.ERR: the generator's commands are all valid.
    #[error("the engine stopped a ring at {slot:#x} with {cerror}")]
    RingStopped {
        /// The ring's CONS at the error.
        slot: u32,
        /// The error.
        cerror: CError,
    },
    /// The closed loop measured no usable saturation.
    #[error("saturation measured at {saturation:.0} commands/s: nothing to scale")]
    NoSaturation {
        /// What it measured, commands/s.
        saturation: f64,
    },
    /// The engine's counters do not account for what was submitted.
    #[error("the engine lost track: {submitted} entries and {syncs} syncs submitted, {stats:?}")]
    LostTrack {
        /// Ring entries submitted (commands and CMD_SYNCs).
        submitted: u64,
        /// CMD_SYNCs submitted.
        syncs: u64,
        /// The engine's counters at shutdown (boxed: they would make every `Result` of this
        /// module as large as they are).
        stats: Box<EngineStats>,
    },
}

/// What a load test measured.
#[derive(Debug)]
pub struct LoadtestReport {
    /// The saturation the levels scale from, commands/s.
    pub saturation: f64,
    /// Measured by the closed loop (not given).
    pub saturation_measured: bool,
    /// Why a measured saturation is too low (the machine was busy while it ran); empty when
    /// given, or measured on a quiet machine.
    pub saturation_reasons: Vec<String>,
    /// One per asked load, in order.
    pub levels: Vec<Level>,
    /// What /proc could not tell for some level, so was not checked.
    pub not_checked: Vec<&'static str>,
    /// CPUs available to this process (0 when unknown).
    pub nproc: usize,
    /// /proc/loadavg's three averages before the engine started and after it stopped (empty
    /// without /proc).
    pub loadavg_before: String,
    /// See [`LoadtestReport::loadavg_before`].
    pub loadavg_after: String,
    /// Where the generator and the engine ran.
    pub pinning: Pinning,
}

impl LoadtestReport {
    /// Levels whose latencies are the engine's.
    pub fn trustworthy_levels(&self) -> usize {
        self.levels.iter().filter(|l| l.trustworthy()).count()
    }
}

/// The most guest rings a load test drives.
pub const MAX_RINGS: u32 = 1024;
/// The most commands in a batch (the CMD_SYNC that ends it is one more; both fit a ring).
pub const MAX_BATCH: u32 = 1000;
// A batch and its CMD_SYNC fit an empty ring.
const _: () = assert!((MAX_BATCH as usize) < 1 << RING_LOG2);

/// LOG2SIZE of each guest ring (1,024 slots).
const RING_LOG2: u8 = 10;
/// vSIDs bound in each ring's vIOMMU.
const VSIDS: u32 = 16;
/// Batches in the pre-generated pool.
const POOL: usize = 256;
/// Measurement starts this long after a level starts: the first batches warm caches up.
const WARMUP: Duration = Duration::from_millis(200);
/// The longest measurement per level (`--duration`), in seconds.
pub const MAX_SECS: f64 = 600.0;
/// The lowest given saturation (`--saturation`), in commands/s.
pub const MIN_SATURATION: f64 = 1e3;
/// The highest given saturation, in commands/s: far beyond what one engine worker does, so an
/// open-loop level's schedule stays countable.
pub const MAX_SATURATION: f64 = 1e9;
/// Longest wait for the engine to finish what was submitted.
pub const DRAIN: Duration = Duration::from_secs(10);

// When a level is NOT the engine's latency. Each threshold sits far from what an idle machine
// shows and far below what a busy one does, so that the verdict flips on the machine, not on
// noise; tests judge synthetic counters (`judge`), never a run's speed.

/// A generator keeping up is late by one turn of its loop (well under a microsecond). A median
/// lateness of this many batch intervals means it is that many batches behind most of the time:
/// the schedule, not the engine, sets the latencies.
const LATE_INTERVALS: f64 = 10.0;
/// The median lateness always allowed: a few µs are a clock read or a cache miss, and with tiny
/// intervals (1-command batches) 10 intervals would be below the loop's own cost.
const LATE_FLOOR_NS: f64 = 10_000.0;
/// The median lateness never allowed, however long the interval: 100 µs is 100 times the
/// engine's own p50 on an idle machine, so such a run cannot show it.
const LATE_CEIL_NS: f64 = 100_000.0;
/// Full rings in more than this share of submit attempts: the engine (or its CPU) fell behind
/// for long stretches, and the latencies are those of a queue, not of the engine at this load.
const RING_FULL_MAX: f64 = 0.01;
/// Batches of the schedule unsent at the level's deadline, as a share: the rate was not held.
const UNSENT_MAX: f64 = 0.01;
/// Involuntary context switches per second of this process's threads (the generator and the
/// engine worker spin, so any switch is a preemption; an idle worker's sched_yield counts only
/// when another task was waiting for its CPU, which is the same contention). A preempted thread
/// is away for about a scheduler slice (1 ms or more): 50/s is 5% of the time off-CPU, and its
/// stall is in the tail.
const INVOLUNTARY_PER_SEC_MAX: f64 = 50.0;
/// CPU steal (time the hypervisor gave the vCPUs to someone else), percent of all CPU time.
/// Above 5% a stall of the hypervisor's making is in every percentile above the median.
const STEAL_PERCENT_MAX: f64 = 5.0;

/// A guest's invalidations ([`guest_command`]), in batches each ended by a CMD_SYNC.
fn pool(batch: usize) -> Vec<RawCommand> {
    let mut rng = Rng::new(0x5eed_1234_5678_9abd);
    let vsids: Vec<u32> = (0..VSIDS).collect();
    let mut v = Vec::with_capacity(POOL * (batch + 1));
    for _ in 0..POOL {
        v.extend((0..batch).map(|_| guest_command(&vsids, &mut rng)));
        v.push(RawCommand::new(u64::from(opcode::CMD_SYNC), 0));
    }
    v
}

/// One guest ring as the generator sees it.
struct Ring {
    /// Writes and doorbells (never a wait: the generator keeps its own schedule).
    drv: GuestDriver,
    progress: Arc<RingProgress>,
    /// CMD_SYNCs submitted.
    syncs: u64,
    /// Batches waiting for publication or completion, oldest first.
    inflight: VecDeque<Pending>,
}

struct Pending {
    /// Scheduled doorbell, ns since the rig's start.
    due: u64,
    /// When the doorbell was rung.
    sent: u64,
    /// The batch is published once the ring's published count reaches this.
    end: u64,
    /// Its CMD_SYNC has completed once the ring's sync count reaches this.
    sync: u64,
    published: bool,
    record: bool,
}

/// The engine, the guest rings and the batches.
struct Rig {
    engine: Engine,
    rings: Vec<Ring>,
    pool: Vec<RawCommand>,
    batch: usize,
    next: usize,
    start: Instant,
}

/// The engine a load test measures: one worker, the hardware model inline and free, no audit
/// or capture. The one place the load test starts an engine.
fn start_engine() -> Result<Engine, LoadtestError> {
    let (queues, _) = ModelQueue::for_workers(
        1,
        DEFAULT_LOG2SIZE,
        &HwConfig::zero_cost(),
        HwPlacement::Inline,
    )?;
    let cfg = EngineConfig {
        workers: 1,
        audit: false,
        capture: None,
        ..EngineConfig::default()
    };
    Ok(Engine::start(cfg, queues)?)
}

impl Rig {
    fn new(rings: u32, batch: usize) -> Result<Rig, LoadtestError> {
        let engine = start_engine()?;
        let mut v = Vec::new();
        for r in 0..rings {
            engine.create_viommu(ViommuConfig::new(r, r as u16 + 1, 0))?;
            for s in 0..VSIDS {
                let dev = DeviceId(r * VSIDS + s);
                engine.add_device(dev, 0, 0x10_0000 + r * VSIDS + s)?;
                engine.set_dev_id(r, dev, s)?;
            }
            let guest = GuestRing::heap(RING_LOG2, r)?;
            let host = HostRing::attach_memory(guest.memory(), AttachOptions::default())?;
            let id = engine.attach_ring(host)?;
            let progress = engine.ring_progress(id).ok_or(LoadtestError::NoProgress)?;
            v.push(Ring {
                drv: GuestDriver::new(guest, FixPolicy::Retry)?,
                progress,
                syncs: 0,
                inflight: VecDeque::new(),
            });
        }
        Ok(Rig {
            engine,
            rings: v,
            pool: pool(batch),
            batch,
            next: 0,
            start: Instant::now(),
        })
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Writes the next batch into ring `r` and rings its doorbell, if it has room.
    fn submit(&mut self, r: usize) -> Option<(u64, u64)> {
        let len = self.batch + 1;
        let ring = &mut self.rings[r];
        if (ring.drv.ring().free() as usize) < len {
            return None;
        }
        let k = self.next;
        self.next = (k + 1) % POOL;
        ring.drv.post_now(&self.pool[k * len..(k + 1) * len]);
        ring.syncs += 1;
        Some((ring.drv.seq(), ring.syncs))
    }

    /// Closed loop for `secs`: the commands per second this rig sustains. The same loop as
    /// the open one, every batch due at once, so that the generator's own cost (its clock
    /// reads, its looks at the engine's counters) is in the saturation it scales from.
    fn saturate(&mut self, secs: f64) -> Result<f64, LoadtestError> {
        Ok(self.open_loop(None, secs)?.achieved)
    }

    /// Open loop at `rate` commands/s (closed with `None`) for `secs`, after the warm-up.
    fn open_loop(&mut self, rate: Option<f64>, secs: f64) -> Result<Level, LoadtestError> {
        let n = self.rings.len();
        let interval = rate.map_or(0.0, |r| self.batch as f64 * 1e9 / r);
        let total = match rate {
            Some(_) => ((secs + WARMUP.as_secs_f64()) * 1e9 / interval).ceil() as u64,
            None => u64::MAX,
        };
        let t0 = self.now() + 1_000_000;
        let stop_at =
            t0 + Duration::from_secs_f64(secs).as_nanos() as u64 + WARMUP.as_nanos() as u64;
        let mut total = total;
        let measure_from = t0 + WARMUP.as_nanos() as u64;
        let mut level = Level::new(rate.unwrap_or(0.0));
        level.interval_ns = interval;
        if rate.is_some() {
            level.scheduled = total;
        }
        let mut k = 0u64;
        // Set once everything is sent: how long the engine gets to finish.
        let mut deadline = None;
        let mut open = 0usize;
        loop {
            let now = self.now();
            // The level ends at its deadline whatever the rate: batches still due then were
            // never sent (the engine or the generator fell behind), and are counted.
            if now >= stop_at && k < total {
                if rate.is_some() {
                    level.unsent = total - k;
                }
                total = k;
            }
            // Every batch that is due, oldest first; a full ring holds the rest back (they
            // stay due, and their latency grows).
            while k < total {
                // Closed, a batch is due when the generator gets to it.
                let due = match rate {
                    Some(_) => t0 + (k as f64 * interval) as u64,
                    None => now.max(t0),
                };
                if due > now {
                    break;
                }
                let r = (k % n as u64) as usize;
                let Some((end, sync)) = self.submit(r) else {
                    level.ring_full += 1;
                    break;
                };
                let sent = self.now();
                if due >= measure_from {
                    level
                        .late
                        .saturating_record(sent.saturating_sub(due).max(1));
                }
                self.rings[r].inflight.push_back(Pending {
                    due,
                    sent,
                    end,
                    sync,
                    published: false,
                    record: due >= measure_from,
                });
                open += 1;
                k += 1;
            }
            let now = self.now();
            for ring in &mut self.rings {
                if ring.inflight.is_empty() {
                    continue;
                }
                let published = ring.progress.published();
                let synced = ring.drv.ring().sync_count();
                while let Some(p) = ring.inflight.front_mut() {
                    if !p.published && published >= p.end {
                        p.published = true;
                        if p.record {
                            level
                                .publish
                                .saturating_record(now.saturating_sub(p.due).max(1));
                            level
                                .engine
                                .saturating_record(now.saturating_sub(p.sent).max(1));
                        }
                    }
                    if !p.published || synced < p.sync {
                        break;
                    }
                    if p.record {
                        level
                            .sync
                            .saturating_record(now.saturating_sub(p.due).max(1));
                        level.batches += 1;
                    }
                    ring.inflight.pop_front();
                    open -= 1;
                }
            }
            if k == total && open == 0 {
                break;
            }
            if k == total {
                let d = *deadline.get_or_insert_with(|| Instant::now() + DRAIN);
                if Instant::now() > d {
                    return Err(LoadtestError::NotDrained { open, drain: DRAIN });
                }
            }
            if let Some((slot, cerror)) = self.rings.iter().find_map(|r| r.drv.ring().error()) {
                return Err(LoadtestError::RingStopped { slot, cerror });
            }
        }
        level.sent = k;
        level.elapsed = Duration::from_nanos(self.now().saturating_sub(measure_from));
        level.achieved = level.batches as f64 * self.batch as f64 / level.elapsed.as_secs_f64();
        Ok(level)
    }
}

/// One load level's results (latencies in nanoseconds).
#[derive(Debug)]
pub struct Level {
    /// The asked load, percent of the saturation (0 for the saturation run).
    pub load_percent: f64,
    /// The asked rate, commands/s (0 closed).
    pub target: f64,
    /// The rate measured batches completed at, commands/s.
    pub achieved: f64,
    /// Time measured (after the warm-up).
    pub elapsed: Duration,
    /// Batches measured (scheduled after the warm-up and completed).
    pub batches: u64,
    /// Times the generator found a ring full when a batch was due.
    pub ring_full: u64,
    /// Batches of the schedule not sent by the level's deadline.
    pub unsent: u64,
    /// From the scheduled doorbell to physical publication.
    pub publish: Histogram<u64>,
    /// From the scheduled doorbell to the guest's CMD_SYNC completing.
    pub sync: Histogram<u64>,
    /// How late the generator rang each doorbell: its share of the latencies above (the OS
    /// preempting it), not the engine's.
    pub late: Histogram<u64>,
    /// From the doorbell as rung to publication: the engine's share.
    pub engine: Histogram<u64>,
    /// Scheduled gap between batches, ns (0 closed).
    pub interval_ns: f64,
    /// Batches of the schedule (0 closed).
    pub scheduled: u64,
    /// Batches sent.
    pub sent: u64,
    /// What /proc said of the machine over the level.
    pub machine: Machine,
    /// Why these latencies are the machine's and not the engine's; empty when they are the
    /// engine's.
    pub reasons: Vec<String>,
}

impl Level {
    fn new(target: f64) -> Level {
        let h = crate::latency::histogram;
        Level {
            load_percent: 0.0,
            target,
            achieved: 0.0,
            elapsed: Duration::ZERO,
            batches: 0,
            ring_full: 0,
            unsent: 0,
            publish: h(),
            sync: h(),
            late: h(),
            engine: h(),
            interval_ns: 0.0,
            scheduled: 0,
            sent: 0,
            machine: Machine::default(),
            reasons: Vec::new(),
        }
    }

    /// These latencies are the engine's: the level passed every check.
    pub fn trustworthy(&self) -> bool {
        self.reasons.is_empty()
    }

    fn counters(&self) -> Counters {
        Counters {
            interval_ns: self.interval_ns,
            late_p50_ns: (!self.late.is_empty()).then(|| self.late.value_at_quantile(0.5)),
            sent: self.sent,
            ring_full: self.ring_full,
            scheduled: self.scheduled,
            unsent: self.unsent,
            machine: self.machine,
        }
    }
}

/// What /proc says at one instant; `None` where it could not be read.
struct Probe {
    at: Instant,
    /// Involuntary context switches of this process's threads so far.
    involuntary: Option<u64>,
    /// (steal, total) CPU time of all CPUs so far, in clock ticks.
    cpu: Option<(u64, u64)>,
}

impl Probe {
    fn read() -> Probe {
        Probe {
            at: Instant::now(),
            involuntary: involuntary_switches(),
            cpu: std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|s| steal_and_total(&s)),
        }
    }

    /// The machine over the time since `before`.
    fn since(&self, before: &Probe) -> Machine {
        Machine {
            secs: self.at.duration_since(before.at).as_secs_f64(),
            involuntary: before
                .involuntary
                .zip(self.involuntary)
                // A thread that ended between the probes takes its count with it.
                .map(|(b, a)| a.saturating_sub(b)),
            steal_percent: before.cpu.zip(self.cpu).and_then(|((s0, t0), (s1, t1))| {
                let total = t1.saturating_sub(t0);
                (total > 0).then(|| s1.saturating_sub(s0) as f64 * 100.0 / total as f64)
            }),
        }
    }
}

/// The machine's share of one level.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Machine {
    /// Wall time between the probes.
    pub secs: f64,
    /// Involuntary context switches of this process's threads; `None`: /proc unreadable.
    pub involuntary: Option<u64>,
    /// CPU steal, percent of all CPUs' time; `None`: /proc/stat unreadable.
    pub steal_percent: Option<f64>,
}

/// Sums `nonvoluntary_ctxt_switches` over /proc/self/task/*/status. A thread that ends while
/// the directory is read is skipped; `None` when no thread's count could be read.
fn involuntary_switches() -> Option<u64> {
    let mut sum = None;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        if let Some(n) = nonvoluntary(&status) {
            sum = Some(sum.unwrap_or(0) + n);
        }
    }
    sum
}

/// The `nonvoluntary_ctxt_switches` of a /proc/PID/status text.
fn nonvoluntary(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("nonvoluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
}

/// (steal, total) from /proc/stat's aggregate `cpu` line: user nice system idle iowait irq
/// softirq steal (guest and guest_nice are already inside user and nice). `None` on a kernel
/// too old to have the steal column or a text that is not /proc/stat.
fn steal_and_total(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    (v.len() == 8).then(|| (v[7], v.iter().sum()))
}

/// The counters a level is judged by.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    interval_ns: f64,
    /// Median generator lateness (`None`: no batch measured).
    late_p50_ns: Option<u64>,
    sent: u64,
    ring_full: u64,
    scheduled: u64,
    unsent: u64,
    machine: Machine,
}

/// Why a level's latencies are the machine's and not the engine's; empty when they are the
/// engine's. A pure function of the counters, so its thresholds are tested without a run.
fn judge(c: &Counters) -> Vec<String> {
    let mut why = Vec::new();
    let late_limit = (LATE_INTERVALS * c.interval_ns).clamp(LATE_FLOOR_NS, LATE_CEIL_NS);
    if let Some(late) = c.late_p50_ns {
        if late as f64 > late_limit {
            why.push(format!(
                "generator late p50 {:.3} ms (limit {:.3} ms)",
                late as f64 / 1e6,
                late_limit / 1e6
            ));
        }
    }
    let attempts = c.sent + c.ring_full;
    if attempts > 0 && c.ring_full as f64 > RING_FULL_MAX * attempts as f64 {
        why.push(format!(
            "a ring was full in {} of {attempts} submit attempts ({:.1}%, limit {}%)",
            c.ring_full,
            c.ring_full as f64 * 100.0 / attempts as f64,
            RING_FULL_MAX * 100.0
        ));
    }
    if c.scheduled > 0 && c.unsent as f64 > UNSENT_MAX * c.scheduled as f64 {
        why.push(format!(
            "{} of {} scheduled batches unsent at the deadline (limit {}%)",
            c.unsent,
            c.scheduled,
            UNSENT_MAX * 100.0
        ));
    }
    if let Some(n) = c.machine.involuntary {
        let per_sec = n as f64 / c.machine.secs.max(1e-3);
        if per_sec > INVOLUNTARY_PER_SEC_MAX {
            why.push(format!(
                "{n} involuntary switches ({per_sec:.0}/s, limit {INVOLUNTARY_PER_SEC_MAX}/s)"
            ));
        }
    }
    if let Some(steal) = c.machine.steal_percent {
        if steal > STEAL_PERCENT_MAX {
            why.push(format!("steal {steal:.1}% (limit {STEAL_PERCENT_MAX}%)"));
        }
    }
    why
}

impl LoadtestOptions {
    /// Checks every option against its range.
    pub fn check(&self) -> Result<(), LoadtestError> {
        if !(self.secs > 0.0 && self.secs <= MAX_SECS) {
            return Err(LoadtestError::Duration { secs: self.secs });
        }
        if self.loads.is_empty() || self.loads.iter().any(|l| !(*l > 0.0 && *l <= 100.0)) {
            return Err(LoadtestError::Loads);
        }
        if let Some(saturation) = self.saturation {
            if !(MIN_SATURATION..=MAX_SATURATION).contains(&saturation) {
                return Err(LoadtestError::Saturation { saturation });
            }
        }
        if !(1..=MAX_RINGS).contains(&self.rings) {
            return Err(LoadtestError::Rings { rings: self.rings });
        }
        if !(1..=MAX_BATCH).contains(&self.batch) {
            return Err(LoadtestError::Batch { batch: self.batch });
        }
        Ok(())
    }
}

/// Runs a load test: the saturation (measured unless given), then each level, each judged;
/// then checks that the engine accounted for every command and CMD_SYNC submitted.
pub fn run(opts: &LoadtestOptions) -> Result<LoadtestReport, LoadtestError> {
    opts.check()?;
    let loadavg_before = loadavg();
    let mut rig = Rig::new(opts.rings, opts.batch as usize)?;
    let restore = opts.pin.then(crate::affinity::Restore::save);
    let pinning = match (opts.pin, crate::affinity::other_threads()) {
        (false, _) => Pinning::Off,
        (true, Err(why)) => Pinning::Unavailable(why),
        (true, Ok(engine)) => match crate::affinity::pin_apart(&engine) {
            Ok((generator, engine)) => Pinning::Pinned { generator, engine },
            Err(why) => Pinning::Unavailable(why),
        },
    };
    let before = Probe::read();
    let (saturation, measured) = match opts.saturation {
        Some(s) => (s, false),
        None => (rig.saturate(opts.secs)?, true),
    };
    // A saturation measured while preempted is too low, and every level scales from it: its
    // machine checks are reported (the closed loop has no schedule to be late on or miss).
    let saturation_reasons = if measured {
        judge(&Counters {
            machine: Probe::read().since(&before),
            ..Counters::default()
        })
    } else {
        Vec::new()
    };
    if saturation.is_nan() || saturation < MIN_SATURATION {
        return Err(LoadtestError::NoSaturation { saturation });
    }
    let mut levels = Vec::new();
    for &load in &opts.loads {
        let before = Probe::read();
        let mut level = rig.open_loop(Some(saturation * load / 100.0), opts.secs)?;
        level.load_percent = load;
        level.machine = Probe::read().since(&before);
        level.reasons = judge(&level.counters());
        levels.push(level);
    }
    // Either counter missing from /proc means it was not checked.
    let not_checked: Vec<&str> = [
        levels
            .iter()
            .any(|l| l.machine.involuntary.is_none())
            .then_some("involuntary context switches (/proc/self/task/*/status)"),
        levels
            .iter()
            .any(|l| l.machine.steal_percent.is_none())
            .then_some("CPU steal (/proc/stat)"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let submitted: u64 = rig.rings.iter().map(|r| r.drv.seq()).sum();
    let syncs: u64 = rig.rings.iter().map(|r| r.syncs).sum();
    let stats = rig.engine.shutdown().stats;
    drop(restore);
    // Every command forwarded once, every sync signalled, nothing refused: a load test that
    // lost work would measure nothing.
    if stats.forwarded + stats.guest_syncs != submitted
        || stats.guest_syncs != syncs
        || stats.refused != 0
    {
        return Err(LoadtestError::LostTrack {
            submitted,
            syncs,
            stats: Box::new(stats),
        });
    }
    Ok(LoadtestReport {
        saturation,
        saturation_measured: measured,
        saturation_reasons,
        levels,
        not_checked,
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg_before,
        loadavg_after: loadavg(),
        pinning,
    })
}

/// /proc/loadavg's three load averages; empty without /proc.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A level at 10% of 50 M cmd/s with 64-command batches: one batch every 12.8 µs, all sent,
    /// a quiet machine.
    fn clean() -> Counters {
        Counters {
            interval_ns: 12_800.0,
            late_p50_ns: Some(300),
            sent: 234_375,
            ring_full: 0,
            scheduled: 234_375,
            unsent: 0,
            machine: Machine {
                secs: 3.2,
                involuntary: Some(4),
                steal_percent: Some(0.0),
            },
        }
    }

    #[test]
    fn options_out_of_range_are_refused_naming_their_flag_before_an_engine_starts() {
        let ok = LoadtestOptions {
            rings: 1,
            batch: 64,
            secs: 3.0,
            loads: vec![10.0, 50.0, 90.0],
            saturation: None,
            pin: true,
        };
        assert!(ok.check().is_ok());
        for (bad, flag) in [
            (
                LoadtestOptions {
                    secs: 0.0,
                    ..ok.clone()
                },
                "--duration",
            ),
            (
                LoadtestOptions {
                    secs: f64::NAN,
                    ..ok.clone()
                },
                "--duration",
            ),
            (
                LoadtestOptions {
                    secs: MAX_SECS + 1.0,
                    ..ok.clone()
                },
                "--duration",
            ),
            (
                LoadtestOptions {
                    loads: vec![],
                    ..ok.clone()
                },
                "--loads",
            ),
            (
                LoadtestOptions {
                    loads: vec![50.0, 101.0],
                    ..ok.clone()
                },
                "--loads",
            ),
            (
                LoadtestOptions {
                    saturation: Some(5.0),
                    ..ok.clone()
                },
                "--saturation",
            ),
            (
                LoadtestOptions {
                    rings: 0,
                    ..ok.clone()
                },
                "--rings",
            ),
            (
                LoadtestOptions {
                    rings: MAX_RINGS + 1,
                    ..ok.clone()
                },
                "--rings",
            ),
            (
                LoadtestOptions {
                    batch: 0,
                    ..ok.clone()
                },
                "--batch",
            ),
            (
                LoadtestOptions {
                    batch: MAX_BATCH + 1,
                    ..ok.clone()
                },
                "--batch",
            ),
        ] {
            // `run` checks first: no engine, no ring, no pool for options out of range.
            let e = run(&bad).expect_err(flag);
            assert!(e.to_string().starts_with(flag), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_clean_level_is_trustworthy() {
        assert_eq!(judge(&clean()), Vec::<String>::new());
    }

    #[test]
    fn a_level_whose_generator_was_milliseconds_late_is_not_the_engines_latency() {
        let c = Counters {
            late_p50_ns: Some(8_000_000),
            ..clean()
        };
        let why = judge(&c);
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(why[0].starts_with("generator late p50 8.000 ms"), "{why:?}");
    }

    #[test]
    fn generator_lateness_is_allowed_up_to_ten_intervals_between_the_floor_and_the_ceiling() {
        let at = |interval_ns: f64, late: u64| {
            judge(&Counters {
                interval_ns,
                late_p50_ns: Some(late),
                ..clean()
            })
            .is_empty()
        };
        // 10 intervals of 5 µs: 50 µs.
        assert!(at(5_000.0, 50_000) && !at(5_000.0, 50_001));
        // Tiny intervals: the 10 µs floor.
        assert!(at(10.0, 10_000) && !at(10.0, 10_001));
        // Long intervals: the 100 µs ceiling.
        assert!(at(1e6, 100_000) && !at(1e6, 100_001));
        // No measured batch: nothing to judge lateness by.
        assert!(judge(&Counters {
            late_p50_ns: None,
            ..clean()
        })
        .is_empty());
    }

    #[test]
    fn full_rings_unsent_batches_preemption_and_steal_each_give_their_reason() {
        let c = Counters {
            ring_full: 30_000_000,
            unsent: 100_000,
            machine: Machine {
                secs: 3.2,
                involuntary: Some(2_000),
                steal_percent: Some(12.5),
            },
            ..clean()
        };
        let why = judge(&c);
        assert_eq!(why.len(), 4, "{why:?}");
        assert!(
            why[0].starts_with("a ring was full in 30000000 of"),
            "{why:?}"
        );
        assert!(why[1].starts_with("100000 of 234375 scheduled batches unsent"));
        assert!(
            why[2].starts_with("2000 involuntary switches (625/s"),
            "{why:?}"
        );
        assert!(why[3].starts_with("steal 12.5%"), "{why:?}");
        // Just under each limit: trustworthy.
        let under = Counters {
            ring_full: 2_000,
            unsent: 2_000,
            machine: Machine {
                secs: 3.2,
                involuntary: Some(150),
                steal_percent: Some(4.9),
            },
            ..clean()
        };
        assert_eq!(judge(&under), Vec::<String>::new());
    }

    #[test]
    fn without_proc_the_machine_checks_are_skipped_not_failed() {
        let c = Counters {
            machine: Machine {
                secs: 3.2,
                involuntary: None,
                steal_percent: None,
            },
            ..clean()
        };
        assert!(judge(&c).is_empty());
        // Two probes of which one could not read /proc: nothing is made up.
        let t = Instant::now();
        let read = Probe {
            at: t,
            involuntary: Some(10),
            cpu: Some((1, 100)),
        };
        let unread = Probe {
            at: t,
            involuntary: None,
            cpu: None,
        };
        let m = unread.since(&read);
        assert_eq!((m.involuntary, m.steal_percent), (None, None));
        assert_eq!(steal_and_total("not /proc/stat"), None);
        assert_eq!(nonvoluntary("Name:\tvcmdq\n"), None);
    }

    #[test]
    fn proc_texts_are_parsed_and_differenced() {
        let stat = "cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 50 0 25 400 5 0 0 20 0 0\n";
        assert_eq!(steal_and_total(stat), Some((40, 1000)));
        let status = "Name:\tvcmdq\nvoluntary_ctxt_switches:\t7\nnonvoluntary_ctxt_switches:\t42\n";
        assert_eq!(nonvoluntary(status), Some(42));
        let t = Instant::now();
        let before = Probe {
            at: t,
            involuntary: Some(42),
            cpu: Some((40, 1000)),
        };
        let after = Probe {
            at: t + Duration::from_secs(2),
            involuntary: Some(142),
            cpu: Some((100, 2000)),
        };
        assert_eq!(
            after.since(&before),
            Machine {
                secs: 2.0,
                involuntary: Some(100),
                steal_percent: Some(6.0),
            }
        );
        // This machine's /proc, if it has one, parses.
        if std::path::Path::new("/proc/self/task").exists() {
            assert!(involuntary_switches().is_some());
            assert!(Probe::read().cpu.is_some());
        }
    }
}
