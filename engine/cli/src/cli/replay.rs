//! `vcmdq replay`: the main job. A trace through the real pipeline, checked against the oracle,
//! with throughput, latency percentiles and what became of every command.

use super::{human, CliError};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use vcmdq_tools::latency;
use vcmdq_tools::replay::{
    check_speed, replay_validated, Outcomes, ReplayOptions, ReplayReport, DEFAULT_MAX_PACED_WALL,
};
use vcmdq_trace::{validate_with, Limits, TraceFile, DEFAULT_MAX_RING_MEMORY};

fn speed(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    check_speed(v)
}

/// Arguments of `vcmdq replay`.
#[derive(Args, Debug)]
#[command(after_help = "\
Exit status: 0 when the engine agreed with the oracle (and with --expect, when the summary \
matched), 1 when it did not, 2 when the trace could not be replayed.

Example:
  vcmdq replay traces/mixed.vct
  vcmdq replay traces/hostile.vct --json --hgrm /tmp/lat.hgrm")]
pub struct ReplayArgs {
    /// The trace (`.vct`; see traces/FORMAT.md).
    trace: PathBuf,
    /// Replay at this multiple of the recorded pace (0.001 to 1000) instead of as fast as
    /// possible.
    #[arg(long, value_parser = speed, allow_negative_numbers = true)]
    speed: Option<f64>,
    /// A paced replay (--speed) whose recorded span at that speed would take longer than this
    /// (a duration: 90s, 10m, 1h, or a bare number of seconds) is refused before it starts
    /// [default: 1h]. (`--max-wall-secs` is a retired spelling.)
    #[arg(long = "max-wall", alias = "max-wall-secs", value_name = "DURATION",
          value_parser = super::units::duration, default_value = "1h")]
    max_wall: Duration,
    /// Bytes of guest ring slots the trace may declare in all (2^LOG2SIZE x 16 per ring).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_RING_MEMORY,
          value_parser = super::units::bytes)]
    max_ring_memory: u64,
    /// Engine workers (translating threads).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// The engine's cap: commands forwarded per batch (one PROD store) at most (`--batch` is
    /// a retired spelling).
    #[arg(long = "batch-limit", alias = "batch", default_value_t = 64)]
    batch: usize,
    /// Also show the outcomes of each vIOMMU.
    #[arg(long)]
    per_viommu: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Write the doorbell-to-publish latency distribution here (HdrHistogram percentile text).
    #[arg(long, value_name = "FILE")]
    hgrm: Option<PathBuf>,
    /// Compare the deterministic part of the summary with this expected JSON.
    #[arg(long, value_name = "FILE")]
    expect: Option<PathBuf>,
    /// Write the deterministic part of the summary as expected JSON here.
    #[arg(long, value_name = "FILE")]
    write_expected: Option<PathBuf>,
    /// Capture what the replay's guests submit, as the engine sees it, into this trace file.
    #[arg(long, value_name = "FILE")]
    capture: Option<PathBuf>,
    /// Show a progress bar even when standard error is not a terminal.
    #[arg(long)]
    progress: bool,
    /// Closed loop: after each doorbell, wait for the CMD_SYNCs it published to complete
    /// before writing on, as a guest driver does (the default for traces whose header says
    /// their guests waited: `waits-sync`, every QEMU import).
    #[arg(long, conflicts_with = "open_loop")]
    closed_loop: bool,
    /// Open loop: write the trace as fast (or as paced) as it goes, never waiting for a
    /// CMD_SYNC (the default for other traces); latency then includes the backlog.
    #[arg(long)]
    open_loop: bool,
}

// `--max-wall`'s default, "1h", written out for clap: kept equal to the library's.
const _: () = assert!(DEFAULT_MAX_PACED_WALL.as_secs() == 3600);

/// Runs `vcmdq replay`.
pub fn run(a: ReplayArgs) -> Result<ExitCode, CliError> {
    let file = TraceFile::open(&a.trace)?;
    let trace = file.trace()?;
    let limits = Limits {
        max_ring_memory: a.max_ring_memory,
    };
    let summary = validate_with(&trace, &limits)?;
    let bar = if a.progress || (std::io::stderr().is_terminal() && std::env::var_os("CI").is_none())
    {
        ProgressBar::with_draw_target(Some(summary.commands), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} replay [{bar:40}] {human_pos}/{human_len} commands, {rate}, eta {eta}",
        )
        .expect("a valid template")
        // indicatif's own {per_sec} prints four decimals ("241,565.2042/s").
        .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = w.write_str(&human::rate(s.per_sec(), "commands"));
        })
        .progress_chars("=> "),
    );
    let opts = ReplayOptions {
        speed: a.speed,
        workers: a.workers,
        batch_limit: a.batch,
        capture: a.capture.clone(),
        limits,
        max_paced_wall: a.max_wall,
        closed_loop: match (a.closed_loop, a.open_loop) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        ..Default::default()
    };
    let report = replay_validated(&trace, &summary, &opts, |n| bar.set_position(n))?;
    bar.finish_and_clear();

    if let Some(path) = &a.hgrm {
        let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        latency::write_hgrm(&mut f, &report.publish_latency)?;
    }
    let expected = deterministic(&report);
    if let Some(path) = &a.write_expected {
        std::fs::write(path, serde_json::to_string_pretty(&expected)? + "\n")
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let mut expect_diff = None;
    if let Some(path) = &a.expect {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let want: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if want != expected {
            let mut lines = Vec::new();
            json_diff("", &want, &expected, &mut lines);
            expect_diff = Some(format!(
                "summary differs from {} ({}):\n{}",
                path.display(),
                human::count(lines.len() as u64, "field"),
                lines.join("\n")
            ));
        }
    }
    let name = a.trace.display().to_string();
    if a.json {
        let mut j = full_json(&report, &name);
        // null when nothing was compared: no --expect is not a passed one.
        j["expect_ok"] = match a.expect {
            Some(_) => json!(expect_diff.is_none()),
            None => Value::Null,
        };
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        print_human(&report, &name, a.per_viommu);
    }
    if let Some(d) = &expect_diff {
        eprintln!("vcmdq replay: {d}");
    }
    Ok(if report.ok() && expect_diff.is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One line per field that differs between `want` and `got` (their dotted path, both values;
/// "absent" for a field only one side has), so a failed `--expect` says what changed.
fn json_diff(path: &str, want: &Value, got: &Value, out: &mut Vec<String>) {
    let at = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            let keys: std::collections::BTreeSet<&String> = w.keys().chain(g.keys()).collect();
            for k in keys {
                match (w.get(k), g.get(k)) {
                    (Some(a), Some(b)) => json_diff(&at(k), a, b, out),
                    (Some(a), None) => out.push(format!("  {}: expected {a}, got absent", at(k))),
                    (None, Some(b)) => out.push(format!("  {}: expected absent, got {b}", at(k))),
                    (None, None) => {}
                }
            }
        }
        _ if want != got => out.push(format!(
            "  {}: expected {want}, got {got}",
            if path.is_empty() { "(summary)" } else { path }
        )),
        _ => {}
    }
}

fn outcomes_json(o: &Outcomes) -> Value {
    json!({
        "read": o.read,
        "forwarded": o.forwarded,
        "syncs": o.syncs,
        "dropped": o.dropped,
        "trapped": o.trapped,
        "refused": o.refused_total(),
        "refused_by_reason": o.refused,
    })
}

/// The part of the summary that does not depend on timing: what `--expect` compares.
fn deterministic(r: &ReplayReport) -> Value {
    json!({
        "commands": r.commands,
        "rings": r.rings,
        "viommus": r.viommus,
        "outcomes": outcomes_json(&r.outcomes),
        "per_viommu": r.per_viommu.iter().map(|(k, v)| (k.to_string(), outcomes_json(v))).collect::<serde_json::Map<_, _>>(),
        "forwarded_digest": r.forwarded_digest.iter().map(|(k, d)| (k.to_string(), json!(format!("{d:016x}")))).collect::<serde_json::Map<_, _>>(),
        "oracle_ok": r.ok(),
    })
}

fn full_json(r: &ReplayReport, name: &str) -> Value {
    let mut j = deterministic(r);
    j["trace"] = json!(name);
    j["mode"] = json!(mode(r));
    j["max_outstanding_syncs"] = json!(r.max_outstanding_syncs);
    j["sync_waits"] = json!(r.sync_waits);
    j["wall_s"] = json!(r.wall.as_secs_f64());
    j["commands_per_s"] = json!(r.rate());
    j["latency"] = json!({
        "doorbell_to_publish": latency::json(&r.publish_latency),
        "doorbell_to_sync_complete": latency::json(&r.sync_latency),
    });
    j["latency_per_viommu"] = r
        .per_viommu_latency
        .iter()
        .map(|(v, (p, s))| {
            (
                v.to_string(),
                json!({"doorbell_to_publish": latency::json(p), "doorbell_to_sync_complete": latency::json(s)}),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    j["engine"] = json!({
        "batches": r.stats.batches,
        "phys_syncs": r.stats.phys_syncs,
        "hw_consumed": r.hw_consumed,
    });
    j["mismatch_count"] = json!(r.mismatch_count);
    j["mismatches"] = r
        .mismatches
        .iter()
        .map(|m| json!({"ring": m.ring, "seq": m.seq, "expected": format!("{:?}", m.expected), "got": format!("{:?}", m.got)}))
        .collect();
    j["isolation_failures"] = json!(r.isolation);
    j["invariant_failures"] = json!(r.invariant_failures);
    j
}

fn print_outcomes(o: &Outcomes, indent: &str) {
    println!(
        "{indent}read {:>9}   forwarded {:>9}   guest CMD_SYNC {:>7}   dropped {:>6}   trapped {:>6}   refused {:>6}",
        o.read, o.forwarded, o.syncs, o.dropped, o.trapped, o.refused_total()
    );
    for (reason, n) in &o.refused {
        println!("{indent}  refused {n:>6}  {reason}");
    }
}

fn mode(r: &ReplayReport) -> &'static str {
    if r.closed_loop {
        "closed-loop"
    } else {
        "open-loop"
    }
}

fn print_human(r: &ReplayReport, name: &str, per_viommu: bool) {
    println!(
        "replay {name}: {} on {} of {}",
        human::count(r.commands, "command"),
        human::count(r.rings as u64, "ring"),
        human::count(r.viommus as u64, "vIOMMU")
    );
    if r.closed_loop {
        println!(
            "  mode: closed-loop (each ring waited for its CMD_SYNCs before writing on, as the guest did: {} waits, at most {} outstanding per ring); sync latency is what the guest would feel",
            r.sync_waits, r.max_outstanding_syncs
        );
    } else {
        println!(
            "  mode: open-loop (written ahead without waiting for CMD_SYNCs: up to {} outstanding per ring); sync latency includes the backlog",
            r.max_outstanding_syncs
        );
    }
    print_outcomes(&r.outcomes, "  ");
    if per_viommu {
        for (v, o) in &r.per_viommu {
            println!("  vIOMMU {v}:");
            print_outcomes(o, "    ");
            if let Some((p, s)) = r.per_viommu_latency.get(v) {
                println!("  {}", latency::summary_line("  doorbell -> publish", p));
                println!("  {}", latency::summary_line("  doorbell -> sync done", s));
            }
        }
    }
    println!(
        "  throughput: {} ({} in {:.3} s; {} batches, {} physical CMD_SYNCs)",
        human::rate(r.rate(), "commands"),
        r.outcomes.read,
        r.wall.as_secs_f64(),
        r.stats.batches,
        r.stats.phys_syncs
    );
    println!("  latency (one run on a shared machine; tails include the OS preempting threads):");
    println!(
        "  {}",
        latency::summary_line("doorbell -> physical publish", &r.publish_latency)
    );
    println!(
        "  {}",
        latency::summary_line("doorbell -> guest sync done", &r.sync_latency)
    );
    let mut all = vcmdq_tools::replay::Fnv1a::default();
    for d in r.forwarded_digest.values() {
        all.write(&d.to_le_bytes());
    }
    println!(
        "  forwarded digest (FNV-1a of each ring's physical commands, then of those): {:016x}",
        all.0
    );
    if r.ok() {
        println!(
            "  oracle: agreed on all {} entries; isolation held; nothing lost or doubled",
            r.outcomes.read
        );
    } else {
        println!(
            "  oracle: {} disagreements, {} isolation failures, {} broken invariants",
            r.mismatch_count,
            r.isolation_count,
            r.invariant_failures.len()
        );
        for m in r.mismatches.iter().take(10) {
            println!(
                "    ring {} entry {}: expected {:?}, got {:?}",
                m.ring, m.seq, m.expected, m.got
            );
        }
        for s in r
            .isolation
            .iter()
            .take(10)
            .chain(r.invariant_failures.iter())
        {
            println!("    {s}");
        }
    }
}
