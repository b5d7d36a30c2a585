//! Command-line parsing and dispatch. One module per subcommand.

mod decode;
mod encode;
mod gen;
mod loadtest;
mod plot;
mod replay;
mod trace;
mod translate;

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
    /// Decode commands given as two 64-bit hex words a line (`d0 d1`) to the text form or JSON.
    Decode(decode::DecodeArgs),
    /// Encode commands in the text form to the two hex words `decode` reads.
    Encode(encode::EncodeArgs),
    /// Run guest commands through one vIOMMU's translation policy and show what became of each.
    Translate(translate::TranslateArgs),
    /// Replay a trace through the real pipeline, check it against the oracle, and show
    /// throughput, latency and what became of every command.
    Replay(replay::ReplayArgs),
    /// Look into trace files and make them: dump, build, info, import-qemu.
    Trace(trace::TraceArgs),
    /// Generate a workload trace (deterministic from its parameters).
    Gen(gen::GenArgs),
    /// Latency under load: saturation throughput, then an open-loop generator at fractions of
    /// it, percentiles from guest doorbell to physical publish and to CMD_SYNC completion.
    Loadtest(loadtest::LoadtestArgs),
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.cmd {
        Cmd::Decode(a) => decode::run(a),
        Cmd::Encode(a) => encode::run(a),
        Cmd::Translate(args) => translate::run(args),
        Cmd::Replay(a) => replay::run(a),
        Cmd::Trace(a) => trace::run(a),
        Cmd::Gen(a) => gen::run(a),
        Cmd::Loadtest(a) => loadtest::run(a),
    }
}
