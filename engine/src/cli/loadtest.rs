//! `vcmdq loadtest`: latency under load. First the saturation throughput (a closed loop: the
//! guest submits as fast as the engine takes), then an open-loop generator at fractions of it:
//! batches scheduled at fixed intervals, each latency measured from the batch's scheduled
//! doorbell time (a late generator or a full ring counts against the engine, so coordinated
//! omission cannot hide a stall), to its physical publication and to its guest CMD_SYNC's
//! completion.
//!
//! Setup as `make bench`'s end-to-end suite: one engine worker with the hardware model inline
//! and free (`HwConfig::zero_cost`), audit and capture off; N heap rings, one vIOMMU each with 16
//! bound vSIDs; batches of B commands of a guest's invalidation mix, each ending in a CMD_SYNC.
//! Publication is seen through [`RingProgress`] (one store per batch in the worker, no clock
//! read); the generator, which spins between sends, timestamps what it sees, so a latency is
//! exact to one turn of its loop (well under a microsecond with few rings). Two diagnostics
//! split a tail between the sides: how late the generator rang each doorbell (the OS
//! preempting it), and the time from the doorbell as actually rung to publication.

use super::plot::{percentile_svg, Series};
use super::CliError;
use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vcmdq::command::{opcode, RawCommand};
use vcmdq::engine::{Engine, EngineConfig, HwPlacement, RingProgress};
use vcmdq::pqueue::HwConfig;
use vcmdq::ring::{AttachOptions, GuestRing, HostRing};
use vcmdq::viommu::{DeviceId, ViommuConfig};

/// Arguments of `vcmdq loadtest`.
#[derive(Args, Debug)]
#[command(after_help = "\
Example:
  vcmdq loadtest                       # 1 ring, 64-command batches, 10/50/90% load, 3 s each
  vcmdq loadtest --rings 16 --json --svg target/latency.svg")]
pub struct LoadtestArgs {
    /// Guest rings, served round-robin by the generator.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    rings: u32,
    /// Commands per batch; each batch ends in a CMD_SYNC.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1000))]
    batch: u32,
    /// Measurement per load level (and for the saturation run): 500ms, 3s, 2m, or a bare number
    /// of seconds, at most 600 s. Every level ends then, whether or not the engine kept up.
    /// (`--secs` is a retired spelling.)
    #[arg(long = "duration", alias = "secs", value_name = "DURATION", default_value = "3s",
          value_parser = super::units::duration_secs, allow_negative_numbers = true)]
    secs: f64,
    /// Load levels in percent of the saturation throughput (above 0, at most 100).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10,50,90",
        allow_negative_numbers = true
    )]
    loads: Vec<f64>,
    /// Use this saturation throughput (commands/s, 1000 to 1e9) instead of measuring it.
    #[arg(long, allow_negative_numbers = true)]
    saturation: Option<f64>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Write the latency distributions as an SVG percentile plot here.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

/// LOG2SIZE of each guest ring (1,024 slots).
const RING_LOG2: u8 = 10;
/// vSIDs bound in each ring's vIOMMU.
const VSIDS: u32 = 16;
/// Batches in the pre-generated pool.
const POOL: usize = 256;
/// Measurement starts this long after a level starts: the first batches warm caches up.
const WARMUP: Duration = Duration::from_millis(200);
/// The longest --duration, in seconds.
const MAX_SECS: f64 = 600.0;
/// The lowest and highest --saturation, in commands/s: far beyond what one engine worker
/// does, so an open-loop level's schedule stays countable.
const MIN_SATURATION: f64 = 1e3;
const MAX_SATURATION: f64 = 1e9;
/// Longest wait for the engine to finish what was submitted.
const DRAIN: Duration = Duration::from_secs(10);

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((u128::from(self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)) * u128::from(n)) >> 64) as u64
    }
}

/// A guest's invalidations: half TLBI_NH_VA, a quarter ATC_INV, TLBI_NH_ASID, CFGI_CD.
fn pool(batch: usize) -> Vec<RawCommand> {
    let mut rng = Rng(0x5eed_1234_5678_9abd);
    let mut v = Vec::with_capacity(POOL * (batch + 1));
    for _ in 0..POOL {
        for _ in 0..batch {
            let sid = rng.below(u64::from(VSIDS)) << 32;
            let asid = rng.below(1 << 16) << 48;
            let addr = rng.below(1 << 36) << 12;
            v.push(match rng.below(20) {
                0..=9 => RawCommand::new(
                    u64::from(opcode::TLBI_NH_VA) | asid,
                    addr | 1 << 10 | 3 << 8 | 1,
                ),
                10..=14 => RawCommand::new(u64::from(opcode::ATC_INV) | sid, addr | 2),
                15..=17 => RawCommand::new(u64::from(opcode::TLBI_NH_ASID) | asid, 0),
                _ => RawCommand::new(u64::from(opcode::CFGI_CD) | sid | 5 << 12, 1),
            });
        }
        v.push(RawCommand::new(u64::from(opcode::CMD_SYNC), 0));
    }
    v
}

/// One guest ring as the generator sees it.
struct Ring {
    guest: GuestRing,
    progress: Arc<RingProgress>,
    /// Entries submitted since attach.
    seq: u64,
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

impl Rig {
    fn new(rings: u32, batch: usize) -> Result<Rig, CliError> {
        let engine = Engine::start(EngineConfig {
            workers: 1,
            hardware: HwPlacement::Inline,
            hw: HwConfig::zero_cost(),
            audit: false,
            capture: None,
            ..EngineConfig::default()
        })?;
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
            let progress = engine
                .ring_progress(id)
                .ok_or("the ring just attached has no progress counter")?;
            v.push(Ring {
                guest,
                progress,
                seq: 0,
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
        if (ring.guest.free() as usize) < len {
            return None;
        }
        let k = self.next;
        self.next = (k + 1) % POOL;
        ring.guest.push(&self.pool[k * len..(k + 1) * len]);
        ring.guest.doorbell();
        ring.seq += len as u64;
        ring.syncs += 1;
        Some((ring.seq, ring.syncs))
    }

    /// Closed loop for `secs`: the commands per second this rig sustains. The same loop as
    /// the open one, every batch due at once, so that the generator's own cost (its clock
    /// reads, its looks at the engine's counters) is in the saturation it scales from.
    fn saturate(&mut self, secs: f64) -> Result<f64, CliError> {
        Ok(self.open_loop(None, secs)?.achieved)
    }

    /// Open loop at `rate` commands/s (closed with `None`) for `secs`, after the warm-up.
    fn open_loop(&mut self, rate: Option<f64>, secs: f64) -> Result<Level, CliError> {
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
                let synced = ring.guest.sync_count();
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
                    return Err(format!(
                        "the engine did not complete {open} batches within {DRAIN:?} of the last"
                    )
                    .into());
                }
            }
            if let Some((slot, cerror)) = self.rings.iter().find_map(|r| r.guest.error()) {
                return Err(format!("the engine stopped a ring at {slot:#x} with {cerror}").into());
            }
        }
        level.elapsed = Duration::from_nanos(self.now().saturating_sub(measure_from));
        level.achieved = level.batches as f64 * self.batch as f64 / level.elapsed.as_secs_f64();
        Ok(level)
    }
}

/// One load level's results.
struct Level {
    target: f64,
    achieved: f64,
    elapsed: Duration,
    batches: u64,
    /// Times the generator found a ring full when a batch was due.
    ring_full: u64,
    /// Batches of the schedule not sent by the level's deadline.
    unsent: u64,
    publish: Histogram<u64>,
    sync: Histogram<u64>,
    /// How late the generator rang each doorbell: its share of the latencies above (the OS
    /// preempting it), not the engine's.
    late: Histogram<u64>,
    /// From the doorbell as rung to publication: the engine's share.
    engine: Histogram<u64>,
}

impl Level {
    fn new(target: f64) -> Level {
        let h = || Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
        Level {
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
        }
    }
}

fn percentiles(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    json!({
        "count": h.len(),
        "p50_ns": h.value_at_quantile(0.50),
        "p90_ns": h.value_at_quantile(0.90),
        "p99_ns": h.value_at_quantile(0.99),
        "p999_ns": h.value_at_quantile(0.999),
        "max_ns": h.max(),
    })
}

fn us(ns: u64) -> String {
    format!("{:.2}", ns as f64 / 1e3)
}

fn line(label: &str, h: &Histogram<u64>) {
    if h.is_empty() {
        println!("    {label:<26} (no samples)");
        return;
    }
    println!(
        "    {label:<26} {:>9} {:>9} {:>9} {:>9} {:>10}",
        us(h.value_at_quantile(0.5)),
        us(h.value_at_quantile(0.9)),
        us(h.value_at_quantile(0.99)),
        us(h.value_at_quantile(0.999)),
        us(h.max())
    );
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#8c564b",
];

/// Runs `vcmdq loadtest`.
pub fn run(a: LoadtestArgs) -> Result<ExitCode, CliError> {
    if !(a.secs > 0.0 && a.secs <= MAX_SECS) {
        return Err(format!(
            "--duration {}s: must be above 0 and at most {MAX_SECS} s",
            a.secs
        )
        .into());
    }
    if a.loads.is_empty() || a.loads.iter().any(|l| !(*l > 0.0 && *l <= 100.0)) {
        return Err("--loads must be percentages above 0 and at most 100".into());
    }
    if let Some(s) = a.saturation {
        if !(MIN_SATURATION..=MAX_SATURATION).contains(&s) {
            return Err(format!(
                "--saturation {s:e}: must be {MIN_SATURATION:e} to {MAX_SATURATION:e} commands/s"
            )
            .into());
        }
    }
    let load_before = loadavg();
    let mut rig = Rig::new(a.rings, a.batch as usize)?;
    let (saturation, measured) = match a.saturation {
        Some(s) => (s, false),
        None => (rig.saturate(a.secs)?, true),
    };
    if saturation.is_nan() || saturation < 1000.0 {
        return Err(
            format!("saturation measured at {saturation:.0} commands/s: nothing to scale").into(),
        );
    }
    let mut levels = Vec::new();
    for &load in &a.loads {
        levels.push((
            load,
            rig.open_loop(Some(saturation * load / 100.0), a.secs)?,
        ));
    }
    let submitted: u64 = rig.rings.iter().map(|r| r.seq).sum();
    let syncs: u64 = rig.rings.iter().map(|r| r.syncs).sum();
    let report = rig.engine.shutdown();
    let s = report.stats;
    // Every command forwarded once, every sync signalled, nothing refused: a load test that
    // lost work would measure nothing.
    if s.forwarded + s.guest_syncs != submitted || s.guest_syncs != syncs || s.refused != 0 {
        return Err(format!(
            "the engine lost track: {submitted} entries and {syncs} syncs submitted, {s:?}"
        )
        .into());
    }
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load_after = loadavg();
    if a.json {
        let j = json!({
            "rings": a.rings,
            "batch": a.batch,
            "secs_per_level": a.secs,
            "nproc": nproc,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "saturation_cmd_per_s": saturation,
            "saturation_measured": measured,
            "levels": levels.iter().map(|(load, l)| json!({
                "load_percent": load,
                "target_cmd_per_s": l.target,
                "achieved_cmd_per_s": l.achieved,
                "batches": l.batches,
                "ring_full": l.ring_full,
                "unsent_at_deadline": l.unsent,
                "doorbell_to_publish": percentiles(&l.publish),
                "doorbell_to_sync": percentiles(&l.sync),
                "generator_late": percentiles(&l.late),
                "rung_to_publish": percentiles(&l.engine),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        println!(
            "loadtest: {} ring(s), batches of {} commands + CMD_SYNC, {} s per level; {nproc} CPUs, load average {load_before} before, {load_after} after",
            a.rings, a.batch, a.secs
        );
        println!(
            "  saturation ({}): {:.1} M commands/s",
            if measured { "closed loop" } else { "given" },
            saturation / 1e6
        );
        for (load, l) in &levels {
            println!(
                "  {load}% load: target {:.1} M/s, achieved {:.1} M/s, {} batches measured{}",
                l.target / 1e6,
                l.achieved / 1e6,
                l.batches,
                if l.ring_full > 0 {
                    format!(
                        ", a ring was full {} times when a batch was due",
                        l.ring_full
                    )
                } else {
                    String::new()
                }
            );
            if l.unsent > 0 {
                println!(
                    "    {} scheduled batches were not sent by the level's end: the rate was not \
                     reached",
                    l.unsent
                );
            }
            println!(
                "    {:<26} {:>9} {:>9} {:>9} {:>9} {:>10}",
                "latency (µs) from doorbell", "p50", "p90", "p99", "p99.9", "max"
            );
            line("to physical publish", &l.publish);
            line("to guest CMD_SYNC done", &l.sync);
            line("(generator late by)", &l.late);
            line("(rung doorbell to publish)", &l.engine);
        }
    }
    if let Some(path) = &a.svg {
        let mut series = Vec::new();
        for (i, (load, l)) in levels.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            series.push(Series {
                label: format!("{load}% load: publish"),
                color,
                dashed: false,
                hist: &l.publish,
            });
            series.push(Series {
                label: format!("{load}% load: CMD_SYNC done"),
                color,
                dashed: true,
                hist: &l.sync,
            });
        }
        let title = format!(
            "vcmdq: latency from guest doorbell, {} ring(s), {}-command batches, saturation {:.1} M cmd/s",
            a.rings,
            a.batch,
            saturation / 1e6
        );
        std::fs::write(path, percentile_svg(&title, &series))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
