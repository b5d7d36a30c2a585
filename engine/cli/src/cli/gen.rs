//! `vcmdq gen`: generate a workload trace, deterministically from its parameters.
//!
//! Without options, a workload's parameters are those of its bundled trace in `traces/`, so
//! `vcmdq gen hostile -o traces/hostile.vct` regenerates that file byte for byte.

use super::trace::{output_or_stdout, write_atomically};
use super::{human, CliError};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use vcmdq_trace::format::FLAG_SYNTHETIC;
use vcmdq_trace::gen::{generate_with, GenLimits, Workload, DEFAULT_MAX_GEN_COMMANDS};
use vcmdq_trace::{TraceMeta, TraceWriter, DEFAULT_MAX_RING_MEMORY};

fn workload(s: &str) -> Result<Workload, String> {
    Workload::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
        format!("unknown workload {s:?}; workloads: {}", names.join(", "))
    })
}

/// Arguments of `vcmdq gen`.
#[derive(Args, Debug)]
pub struct GenArgs {
    /// dma-unmap, ats, sva-churn, noisy-neighbour, hot-unplug, hostile or mixed.
    #[arg(value_parser = workload)]
    workload: Workload,
    /// The trace file to write; `-`: standard output [default: `-` when standard output is not
    /// a terminal].
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// VMs (each one vIOMMU).
    #[arg(long)]
    vms: Option<u32>,
    /// Devices per VM.
    #[arg(long)]
    devices: Option<u32>,
    /// Command rings per VM.
    #[arg(long)]
    rings: Option<u32>,
    /// LOG2SIZE of the rings.
    #[arg(long)]
    log2size: Option<u8>,
    /// Ring entries (commands and CMD_SYNCs) to write, across all VMs: 1000000, 1e6, 1M.
    #[arg(long, value_parser = super::units::count)]
    commands: Option<u64>,
    /// Seed of the random choices.
    #[arg(long)]
    seed: Option<u64>,
    /// Bytes of ring slots the trace may declare (VMs x rings x 2^LOG2SIZE x 16).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_RING_MEMORY,
          value_parser = super::units::bytes)]
    max_ring_memory: u64,
    /// Ring entries the generation may write (at most 100000000).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_GEN_COMMANDS,
          value_parser = super::units::count)]
    max_commands: u64,
    /// Print the summary as JSON on standard output.
    #[arg(long)]
    json: bool,
}

/// Runs `vcmdq gen`.
pub fn run(a: GenArgs) -> Result<ExitCode, CliError> {
    let mut p = a.workload.defaults();
    p.vms = a.vms.unwrap_or(p.vms);
    p.devices = a.devices.unwrap_or(p.devices);
    p.rings = a.rings.unwrap_or(p.rings);
    p.log2size = a.log2size.unwrap_or(p.log2size);
    p.commands = a.commands.unwrap_or(p.commands);
    p.seed = a.seed.unwrap_or(p.seed);
    let limits = GenLimits {
        max_ring_memory: a.max_ring_memory,
        max_commands: a.max_commands,
    };
    p.check_with(&limits)?;
    let meta = TraceMeta {
        flags: FLAG_SYNTHETIC,
        created_unix_ns: 0,
    };
    let output = output_or_stdout(a.output.clone(), a.json)?;
    let (stats, bytes) = write_atomically(&output, |w| {
        let mut tw = TraceWriter::new(w, meta)?;
        let stats = generate_with(a.workload, &p, &limits, &mut tw)?;
        let bytes = tw.bytes();
        tw.finish_counted()?.flush()?;
        Ok::<_, CliError>((stats, bytes))
    })??;
    if a.json {
        let j = serde_json::json!({
            "output": output.display().to_string(),
            "workload": a.workload.name(),
            "vms": p.vms,
            "devices_per_vm": p.devices,
            "rings_per_vm": p.rings,
            "log2size": p.log2size,
            "commands_asked": p.commands,
            "seed": p.seed,
            "records": stats.records,
            "ring_entries": stats.commands,
            "duration_ns": stats.last_ns,
            "bytes": bytes,
            "ring_bytes": p.ring_bytes(),
        });
        println!("{j}");
    } else {
        eprintln!(
            "{}: {} workload, {} x {} x {} of 2^{} entries, seed {}",
            output.display(),
            a.workload.name(),
            human::count(p.vms as u64, "VM"),
            human::count(p.devices as u64, "device"),
            human::count(p.rings as u64, "ring"),
            p.log2size,
            p.seed
        );
        eprintln!(
            "  {} records, {} ring entries (asked {}), {:.3} ms of guest time, {} bytes",
            stats.records,
            stats.commands,
            p.commands,
            stats.last_ns as f64 / 1e6,
            bytes
        );
    }
    Ok(ExitCode::SUCCESS)
}
