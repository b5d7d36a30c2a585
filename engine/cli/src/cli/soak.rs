//! `vcmdq soak`: a long run of mixed, partly hostile traffic with physical faults injected,
//! every forwarded command checked online against the oracle (see `vcmdq_tools::soak`).

use super::human::count;
use super::units::{self, Hardware};
use super::CliError;
use clap::Args;
use serde_json::{json, Value};
use std::process::ExitCode;
use std::time::Duration;
use vcmdq::hwmodel::HwPlacement;
use vcmdq_tools::soak::{run, Hostile, Mix, Progress, SoakConfig, SoakReport, PROD_GAMES};

/// Arguments of `vcmdq soak`.
#[derive(Args, Debug)]
#[command(after_help = "\
Exit status: 0 when every check held, 1 on any violation (the first ones are printed), 2 when \
the soak could not be set up.

Examples:
  vcmdq soak --commands 1000000000          (what `make soak` runs)
  vcmdq soak --duration 10m --workers 2 --hardware thread
  vcmdq soak --commands 5000000 --fault-every 20000 --json")]
pub struct SoakArgs {
    /// Guest commands to write over all rings (default 1e9 unless --duration is given; with
    /// both, whichever comes first). Accepts 1e9, 5_000_000, 2M, 1G.
    #[arg(long, value_parser = units::count)]
    commands: Option<u64>,
    /// How long the guests write: 500ms, 90s, 10m, 1h, or a bare number of seconds.
    #[arg(long, value_parser = units::duration, allow_negative_numbers = true)]
    duration: Option<Duration>,
    /// Seed of the streams and the fault schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Guest threads.
    #[arg(long, default_value_t = 1)]
    guests: usize,
    /// Guest rings (spread over the vIOMMUs and the guest threads).
    #[arg(long, default_value_t = 8)]
    rings: usize,
    /// vIOMMUs (alternately kernel and tegra241 profile).
    #[arg(long, default_value_t = 4)]
    viommus: usize,
    /// LOG2SIZE of each guest ring (`--ring-log2size` is a retired spelling of it).
    #[arg(long = "log2size", alias = "ring-log2size", default_value_t = 10)]
    ring_log2size: u8,
    /// Engine workers, each with its own physical queue.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Where the hardware model runs.
    #[arg(long, value_enum, default_value_t = Hardware::Inline)]
    hardware: Hardware,
    /// The engine's cap: commands forwarded per batch (one PROD store) at most (`--batch` is
    /// a retired spelling).
    #[arg(long = "batch-limit", alias = "batch", default_value_t = 64)]
    batch: usize,
    /// About one physical fault every this many physical positions (0: none).
    #[arg(long, default_value_t = 1_000_000, value_parser = units::count)]
    fault_every: u64,
    /// Longest injected stall, in microseconds.
    #[arg(long, default_value_t = 20)]
    max_stall_us: u64,
    /// A slow SMMU: a busy wait of this many nanoseconds per physical command (off by default).
    #[arg(long)]
    slow_ns: Option<u64>,
    /// Hostile entries per million.
    #[arg(long, default_value_t = Mix::default().hostile_ppm)]
    hostile_ppm: u32,
    /// Trapped entries (CFGI_STE*) per million.
    #[arg(long, default_value_t = Mix::default().trap_ppm)]
    trap_ppm: u32,
    /// Dropped entries (PREFETCH_*) per million.
    #[arg(long, default_value_t = Mix::default().prefetch_ppm)]
    prefetch_ppm: u32,
    /// Segments of 2^N entries per ring: at each boundary the ring goes quiet and the control
    /// plane unbinds (or binds again) the ring's second device, and every third boundary
    /// replaces the ring with one of another size (0: no churn, else 4 to 40).
    #[arg(long, default_value_t = Mix::default().churn_log2,
          value_parser = clap::value_parser!(u8).range(0..=40))]
    churn_log2: u8,
    /// One doorbell in N per ring is followed by a hostile PROD game (junk bits, PROD moved
    /// backwards or past a full ring, taken slots rewritten; 0: none).
    #[arg(long, default_value_t = Mix::default().prod_game_every)]
    prod_game_every: u32,
    /// Time between progress lines on standard error, e.g. 5s, 500ms (0: none).
    #[arg(long = "progress", alias = "progress-secs", value_name = "DURATION",
          default_value = "5s", num_args = 0..=1, default_missing_value = "5s",
          value_parser = units::duration_or_off)]
    progress_secs: Duration,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// The most guest threads a soak runs.
const MAX_GUESTS: usize = 64;
/// The most guest rings (and vIOMMUs) of a soak.
const MAX_RINGS: usize = 1024;
/// The most memory all guest rings of a soak may take together: --rings x 16 x
/// 2^--log2size bytes.
const MAX_RING_BYTES: u64 = 1 << 30;
/// The longest injected stall, in microseconds (--max-stall-us).
const MAX_STALL_US: u64 = 1_000_000;
/// The longest busy wait per physical command, in nanoseconds (--slow-ns).
const MAX_SLOW_NS: u64 = 1_000_000;

/// Refuses what the soak would otherwise clamp, hang on or allocate without bound, naming the
/// flag and its bound.
fn validate(a: &SoakArgs) -> Result<(), CliError> {
    let engine = vcmdq::engine::EngineConfig {
        workers: a.workers,
        batch_limit: a.batch,
        ring_budget: SoakConfig::default().ring_budget,
        ..Default::default()
    };
    engine.validate().map_err(|e| {
        super::engine_limit(
            &e,
            &[("workers", "--workers"), ("batch_limit", "--batch-limit")],
        )
    })?;
    let range = |flag: &str, v: u64, lo: u64, hi: u64| -> Result<(), CliError> {
        if (lo..=hi).contains(&v) {
            Ok(())
        } else {
            Err(format!("{flag} {v} is outside {lo}..={hi}").into())
        }
    };
    range("--guests", a.guests as u64, 1, MAX_GUESTS as u64)?;
    range("--rings", a.rings as u64, 1, MAX_RINGS as u64)?;
    range("--viommus", a.viommus as u64, 1, MAX_RINGS as u64)?;
    range("--log2size", u64::from(a.ring_log2size), 1, 19)?;
    range("--max-stall-us", a.max_stall_us, 0, MAX_STALL_US)?;
    if let Some(ns) = a.slow_ns {
        range("--slow-ns", ns, 0, MAX_SLOW_NS)?;
    }
    let bytes = (a.rings as u64) << (4 + a.ring_log2size);
    if bytes > MAX_RING_BYTES {
        return Err(format!(
            "--rings {} of --log2size {} need {bytes} bytes, above the soak's {MAX_RING_BYTES} \
             (give fewer or smaller rings)",
            a.rings, a.ring_log2size
        )
        .into());
    }
    let ppm = u64::from(a.hostile_ppm) + u64::from(a.trap_ppm) + u64::from(a.prefetch_ppm);
    range(
        "--hostile-ppm + --trap-ppm + --prefetch-ppm",
        ppm,
        0,
        1_000_000,
    )?;
    Ok(())
}

/// Runs `vcmdq soak`.
pub fn run_cli(a: SoakArgs) -> Result<ExitCode, CliError> {
    validate(&a)?;
    let cfg = SoakConfig {
        commands: match (a.commands, a.duration) {
            (None, None) => Some(1_000_000_000),
            (c, _) => c,
        },
        duration: a.duration,
        seed: a.seed,
        guests: a.guests,
        rings: a.rings,
        viommus: a.viommus,
        ring_log2size: a.ring_log2size,
        workers: a.workers,
        hardware: match a.hardware {
            Hardware::Inline => HwPlacement::Inline,
            Hardware::Thread => HwPlacement::Thread,
        },
        batch_limit: a.batch,
        fault_every: a.fault_every,
        max_stall: Duration::from_micros(a.max_stall_us),
        slow: a.slow_ns.map(Duration::from_nanos),
        mix: Mix {
            hostile_ppm: a.hostile_ppm,
            trap_ppm: a.trap_ppm,
            prefetch_ppm: a.prefetch_ppm,
            churn_log2: a.churn_log2,
            prod_game_every: a.prod_game_every,
        },
        progress_every: a.progress_secs.max(Duration::from_millis(100)),
        ..SoakConfig::default()
    };
    let quiet = a.progress_secs.is_zero();
    let mut last = (Duration::ZERO, 0u64);
    let report = run(&cfg, |p| {
        if !quiet {
            progress_line(p, last);
        }
        last = (p.elapsed, p.submitted);
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&report))?);
    } else {
        print_human(&report);
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One line per report: totals, the rate since the start and since the last line.
fn progress_line(p: &Progress, (t0, n0): (Duration, u64)) {
    let s = p.elapsed.as_secs_f64();
    let dt = p.elapsed.saturating_sub(t0).as_secs_f64().max(1e-9);
    eprintln!(
        "soak {:>7.1}s: {:>7.1}M written, {:>7.1}M verified, {:.2} M/s (now {:.2}); faults {} \
         (retracted {}), refused {}, traps {}, violations {}",
        s,
        p.submitted as f64 / 1e6,
        p.verified as f64 / 1e6,
        p.submitted as f64 / 1e6 / s.max(1e-9),
        p.submitted.saturating_sub(n0) as f64 / 1e6 / dt,
        p.engine.phys_faults,
        p.engine.retracted,
        p.engine.refused,
        p.traps,
        p.violations
    );
}

fn hostile_json(counts: &[u64]) -> Value {
    Hostile::ALL
        .iter()
        .zip(counts)
        .map(|(h, n)| (h.name().to_string(), json!(n)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn to_json(r: &SoakReport) -> Value {
    let c = &r.config;
    let g = &r.guests;
    let e = &r.engine;
    json!({
        "ok": r.ok(),
        "config": {
            "commands": c.commands,
            "duration_s": c.duration.map(|d| d.as_secs_f64()),
            "seed": c.seed,
            "guests": c.guests,
            "rings": c.rings,
            "viommus": c.viommus,
            "ring_log2size": c.ring_log2size,
            "workers": c.workers,
            "hardware": format!("{:?}", c.hardware).to_lowercase(),
            "batch_limit": c.batch_limit,
            "fault_every": c.fault_every,
            "max_stall_us": c.max_stall.as_micros() as u64,
            "slow_ns": c.slow.map(|d| d.as_nanos() as u64),
            "hostile_ppm": c.mix.hostile_ppm,
            "trap_ppm": c.mix.trap_ppm,
            "prefetch_ppm": c.mix.prefetch_ppm,
        },
        "elapsed_s": r.elapsed.as_secs_f64(),
        "commands_per_s": r.rate(),
        "submitted": g.submitted,
        "doorbells": g.doorbells,
        "verified": {
            "entries": r.tally.entries(),
            "forwarded_matching_oracle": r.tally.forwarded,
            "spoofed_vmids_replaced": r.tally.spoofed,
            "dropped": r.tally.dropped,
            "guest_syncs": r.tally.syncs,
            "trapped": r.tally.trapped,
            "refused": r.tally.refused,
        },
        "guests": {
            "syncs_written": g.syncs,
            "irq_syncs_written": g.irq_syncs,
            "sync_order_checks": g.sync_order_checks,
            "blocking_waits": g.blocking_waits,
            "hostile_written": hostile_json(&g.hostile),
            "refusals_fixed": hostile_json(&g.refused),
            "phys_stops_acked": {"ill": g.phys_stops[0], "abt": g.phys_stops[1], "atc_inv_sync": g.phys_stops[2]},
        },
        "traps_completed": r.traps,
        "churn": {
            "churn_log2": c.mix.churn_log2,
            "boundaries": g.boundaries,
            "unbinds": r.unbinds,
            "unbinds_with_batch_held": r.unbinds_held,
            "rebinds": r.rebinds,
            "ring_swaps": r.ring_swaps,
            "window_fixes": g.window_fixes,
        },
        "prod_games": PROD_GAMES
            .iter()
            .zip(g.prod_games)
            .map(|(k, n)| (k.to_string(), json!(n)))
            .collect::<serde_json::Map<_, _>>(),
        "faults": {
            "scheduled": {"ill": r.faults_scheduled.ill, "abt": r.faults_scheduled.abt, "atc_inv_sync": r.faults_scheduled.atc_inv_sync, "stall": r.faults_scheduled.stall},
            "fired": {"ill": r.hw_errors.ill, "abt": r.hw_errors.abt, "atc_inv_sync": r.hw_errors.atc_inv_sync, "stall": r.hw_stalls},
            "recovered": e.phys_faults,
            "retracted": e.retracted,
        },
        "engine": {
            "taken": e.taken,
            "forwarded": e.forwarded,
            "dropped": e.dropped,
            "trapped": e.trapped,
            "refused": e.refused,
            "guest_syncs": e.guest_syncs,
            "phys_syncs": e.phys_syncs,
            "batches": e.batches,
        },
        "hardware": {"consumed": r.hw_consumed, "syncs": r.hw_syncs},
        "violation_count": r.violation_count,
        "violations": r.violations,
    })
}

fn print_human(r: &SoakReport) {
    let c = &r.config;
    let g = &r.guests;
    let e = &r.engine;
    let t = &r.tally;
    println!(
        "soak: {}, {} on {} (kernel/tegra241), {}, hardware {:?}, seed {}",
        count(c.guests as u64, "guest thread"),
        count(c.rings as u64, "ring"),
        count(c.viommus as u64, "vIOMMU"),
        count(c.workers as u64, "worker"),
        c.hardware,
        c.seed
    );
    println!(
        "  written   {:>14} entries in {:.1} s: {:.2} M entries/s ({} doorbells)",
        g.submitted,
        r.elapsed.as_secs_f64(),
        r.rate() / 1e6,
        g.doorbells
    );
    println!(
        "  verified  {:>14} entries accounted for: {} forwarded (each equal to the oracle's \
         translation, in ring order; {} spoofed VMIDs replaced), {} dropped, {} guest CMD_SYNCs, \
         {} trapped, {} refused",
        t.entries(),
        t.forwarded,
        t.spoofed,
        t.dropped,
        t.syncs,
        t.trapped,
        t.refused
    );
    let hostile: Vec<String> = Hostile::ALL
        .iter()
        .zip(&g.refused)
        .filter(|(_, n)| **n > 0)
        .map(|(h, n)| format!("{} {n}", h.name()))
        .collect();
    println!(
        "  refusals  {:>14} stopped at exactly the expected slot, fixed, acknowledged ({})",
        g.refused_total(),
        hostile.join(", ")
    );
    println!(
        "  syncs     {:>14} completions checked after the hardware verified what preceded them; {} \
         blocking waits (CONS = PROD, completion word)",
        g.sync_order_checks, g.blocking_waits
    );
    println!(
        "  traps     {:>14} completed by the control plane, each once and in ring order",
        r.traps
    );
    let s = &r.faults_scheduled;
    println!(
        "  faults    {:>14} fired of {} scheduled: ILL {}/{}, ABT {}/{}, ATC_INV_SYNC {}/{}, stalls {}/{}",
        r.hw_errors.total() + r.hw_stalls,
        s.total(),
        r.hw_errors.ill,
        s.ill,
        r.hw_errors.abt,
        s.abt,
        r.hw_errors.atc_inv_sync,
        s.atc_inv_sync,
        r.hw_stalls,
        s.stall
    );
    println!(
        "            {:>14} errors recovered by the engine, {} guest stops acknowledged (ILL {}, ABT {}, \
         ATC_INV_SYNC {}), {} commands retracted and forwarded again",
        e.phys_faults,
        g.phys_stops_total(),
        g.phys_stops[0],
        g.phys_stops[1],
        g.phys_stops[2],
        e.retracted
    );
    println!(
        "  churn     {:>14} segment boundaries with the ring quiet: {} unset_dev_id ({} with a batch of the device held unpublished), {} set_dev_id, {} rings replaced; {} window entries refused and fixed",
        g.boundaries, r.unbinds, r.unbinds_held, r.rebinds, r.ring_swaps, g.window_fixes
    );
    println!(
        "  PROD      {:>14} hostile games: junk bits {}, backwards {}, overrun {}; {} taken slots rewritten",
        g.prod_games[..3].iter().sum::<u64>(),
        g.prod_games[0],
        g.prod_games[1],
        g.prod_games[2],
        g.prod_games[3]
    );
    println!(
        "  engine    {:>14} taken, {} forwarded, {} batches, {} physical CMD_SYNCs; hardware consumed {}",
        e.taken, e.forwarded, e.batches, e.phys_syncs, r.hw_consumed
    );
    if r.ok() {
        println!("  result: every check held");
    } else {
        println!(
            "  result: {}; the first:",
            count(r.violation_count, "violation")
        );
        for v in &r.violations {
            println!("    {v}");
        }
    }
}
