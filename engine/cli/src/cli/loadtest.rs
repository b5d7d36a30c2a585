//! `vcmdq loadtest`: latency under load. The measurement (the generator, the engine, the
//! levels and the judgement of whether each is the engine's latency) is
//! [`vcmdq_tools::loadtest`]; this module takes the flags and prints what it reports, as text or
//! JSON, and the SVG plot.

use super::human::count;
use super::CliError;
use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use vcmdq_tools::latency;
use vcmdq_tools::loadtest::{LoadtestOptions, LoadtestReport, Pinning, MAX_BATCH, MAX_RINGS};
use vcmdq_tools::plot::{percentile_svg, Series};

/// Arguments of `vcmdq loadtest`.
#[derive(Args, Debug)]
#[command(after_help = "\
Each level is checked for a machine that could not hold the asked rate: the generator's median \
lateness (above 10 batch intervals, clamped to 10-100 µs), a ring full in more than 1% of \
attempts, more than 1% of the scheduled batches unsent at the level's end, more than 50 \
involuntary context switches per second of this process's threads, or CPU steal above 5% \
(the last two from /proc; without /proc they are not checked and the report says so). A level \
failing one is printed as NOT the engine's latency, with its reasons (JSON: \"trustworthy\": \
false, \"reasons\"), and its plot label is marked.

Exit status: 0 when at least one level is trustworthy; 1 when none is (the run measured the \
machine, not the engine; the report is still printed); 2 on bad arguments or a failed run.

Example:
  vcmdq loadtest                       # 1 ring, 64-command batches, 10/50/90% load, 3 s each
  vcmdq loadtest --rings 16 --json --svg target/latency.svg")]
pub struct LoadtestArgs {
    /// Guest rings, served round-robin by the generator.
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_RINGS)))]
    rings: u32,
    /// Commands per batch; each batch ends in a CMD_SYNC.
    #[arg(long, default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_BATCH)))]
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
    /// Leave the generator and the engine worker where the scheduler puts them. By default
    /// they are pinned to two separate CPUs (the output says which, or why it could not).
    #[arg(long)]
    no_pin: bool,
    /// Write the latency distributions as an SVG percentile plot here.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#8c564b",
];

/// Runs `vcmdq loadtest`.
pub fn run(a: LoadtestArgs) -> Result<ExitCode, CliError> {
    let r = vcmdq_tools::loadtest::run(&LoadtestOptions {
        rings: a.rings,
        batch: a.batch,
        secs: a.secs,
        loads: a.loads.clone(),
        saturation: a.saturation,
        pin: !a.no_pin,
    })?;
    if a.json {
        print_json(&a, &r)?;
    } else {
        print_text(&a, &r);
    }
    if let Some(path) = &a.svg {
        write_svg(path, &a, &r)?;
    }
    Ok(ExitCode::from(u8::from(r.trustworthy_levels() == 0)))
}

fn print_json(a: &LoadtestArgs, r: &LoadtestReport) -> Result<(), CliError> {
    let j = json!({
        "rings": a.rings,
        "batch": a.batch,
        "secs_per_level": a.secs,
        "nproc": r.nproc,
        "loadavg_before": r.loadavg_before,
        "loadavg_after": r.loadavg_after,
        "pinning": match &r.pinning {
            Pinning::Off => json!({"pinned": false, "asked": false}),
            Pinning::Pinned { generator, engine } => {
                json!({"pinned": true, "generator_cpu": generator, "engine_cpu": engine})
            }
            Pinning::Unavailable(why) => json!({"pinned": false, "asked": true, "why": why}),
        },
        "saturation_cmd_per_s": r.saturation,
        "saturation_measured": r.saturation_measured,
        "saturation_reasons": r.saturation_reasons,
        "not_checked": r.not_checked,
        "trustworthy_levels": r.trustworthy_levels(),
        "levels": r.levels.iter().map(|l| json!({
            "load_percent": l.load_percent,
            "target_cmd_per_s": l.target,
            "achieved_cmd_per_s": l.achieved,
            "batches": l.batches,
            "ring_full": l.ring_full,
            "unsent_at_deadline": l.unsent,
            "doorbell_to_publish": latency::json(&l.publish),
            "doorbell_to_sync": latency::json(&l.sync),
            "generator_late": latency::json(&l.late),
            "rung_to_publish": latency::json(&l.engine),
            "trustworthy": l.trustworthy(),
            "reasons": l.reasons,
            "scheduled_batches": l.scheduled,
            "sent_batches": l.sent,
            "involuntary_switches": l.machine.involuntary,
            "steal_percent": l.machine.steal_percent,
            "level_wall_secs": l.machine.secs,
        })).collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&j)?);
    Ok(())
}

fn print_text(a: &LoadtestArgs, r: &LoadtestReport) {
    println!(
        "loadtest: {}, batches of {} + CMD_SYNC, {} s per level; {}, load average {} before, {} after",
        count(a.rings, "ring"),
        count(a.batch, "command"),
        a.secs,
        count(r.nproc as u64, "CPU"),
        r.loadavg_before,
        r.loadavg_after
    );
    println!("  threads: {}", r.pinning);
    println!(
        "  saturation ({}): {:.1} M commands/s",
        if r.saturation_measured {
            "closed loop"
        } else {
            "given"
        },
        r.saturation / 1e6
    );
    if !r.saturation_reasons.is_empty() {
        println!(
            "  saturation measured on a busy machine (too low; every level scales from it): {}",
            r.saturation_reasons.join(", ")
        );
    }
    if !r.not_checked.is_empty() {
        println!(
            "  /proc not readable: {} not checked",
            r.not_checked.join(" and ")
        );
    }
    for l in &r.levels {
        let load = l.load_percent;
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
            "    {}",
            latency::table_header("latency (µs) from doorbell")
        );
        for (label, h) in [
            ("to physical publish", &l.publish),
            ("to guest CMD_SYNC done", &l.sync),
            ("(generator late by)", &l.late),
            ("(rung doorbell to publish)", &l.engine),
        ] {
            println!("    {}", latency::table_row(label, h));
        }
        if !l.trustworthy() {
            println!(
                "  level {load}%: NOT the engine's latency: {}",
                l.reasons.join(", ")
            );
        }
    }
    if r.trustworthy_levels() == 0 {
        println!(
            "  no level is the engine's latency: the machine could not hold the asked rates \
             (run it on an idle machine, or at lower --loads)"
        );
    }
}

fn write_svg(path: &std::path::Path, a: &LoadtestArgs, r: &LoadtestReport) -> Result<(), CliError> {
    let mut series = Vec::new();
    for (i, l) in r.levels.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mark = if l.trustworthy() {
            ""
        } else {
            " (NOT the engine's latency)"
        };
        let load = l.load_percent;
        series.push(Series {
            label: format!("{load}% load: publish{mark}"),
            color,
            dashed: false,
            hist: &l.publish,
        });
        series.push(Series {
            label: format!("{load}% load: CMD_SYNC done{mark}"),
            color,
            dashed: true,
            hist: &l.sync,
        });
    }
    let title = format!(
        "vcmdq: latency from guest doorbell, {}, {}-command batches, saturation {:.1} M cmd/s",
        count(a.rings, "ring"),
        a.batch,
        r.saturation / 1e6
    );
    std::fs::write(path, percentile_svg(&title, &series))
        .map_err(|e| format!("{}: {e}", path.display()).into())
}
