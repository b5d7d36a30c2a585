//! Command-line parsing and dispatch. One module per subcommand.

mod gen;
mod trace;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// A CLI failure: printed as `vcmdq: <message>`, exit status 2.
pub type CliError = Box<dyn std::error::Error>;

/// vcmdq: a software VCMDQ for SMMUv3 command queues.
#[derive(Parser, Debug)]
#[command(name = "vcmdq", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Look into trace files and make them: dump, build, info, import-qemu.
    Trace(trace::TraceArgs),
    /// Generate a workload trace (deterministic from its parameters).
    Gen(gen::GenArgs),
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.cmd {
        Cmd::Trace(a) => trace::run(a),
        Cmd::Gen(a) => gen::run(a),
    }
}
