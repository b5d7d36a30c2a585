//! Command-line parsing and dispatch. One module per subcommand.

mod decode;
mod encode;
mod gen;
mod guest;
mod human;
mod input;
mod loadtest;
pub mod out;
mod replay;
mod serve;
mod soak;
mod spec;
mod trace;
mod translate;
mod units;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// A CLI failure: printed as `vcmdq: <message>`, exit status 2.
pub type CliError = Box<dyn std::error::Error>;

/// vcmdq: a software VCMDQ for SMMUv3 command queues.
#[derive(Parser, Debug)]
#[command(
    name = "vcmdq",
    version,
    about,
    long_about = None,
    after_help = "A closed standard output (`vcmdq ... | head`) ends a command quietly: commands \
that stream stop, long-running ones (serve, soak, replay, loadtest, guest) finish and complete \
what they took; the exit status is the one the command would have had. `vcmdq COMMAND --help` \
gives each command's exit statuses."
)]
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
    /// Soak: mixed, partly hostile traffic with physical faults, every forwarded command
    /// checked online against the oracle, until a command count or a duration.
    Soak(soak::SoakArgs),
    /// Run the engine over guest rings (files, or sealed memfds it creates), with live counters.
    Serve(serve::ServeArgs),
    /// Drive a ring as a guest: batches ended by CMD_SYNC, errors handled as Linux does.
    Guest(guest::GuestArgs),
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
        Cmd::Soak(a) => soak::run_cli(a),
        Cmd::Serve(args) => serve::run(args),
        Cmd::Guest(args) => guest::run(args),
        Cmd::Loadtest(a) => loadtest::run(a),
    }
}

/// An engine limit said in the terms of a command's flags: `flags` maps each
/// [`vcmdq::engine::EngineConfig`] field to the flag that sets it.
pub(crate) fn engine_limit(e: &vcmdq::engine::ConfigLimit, flags: &[(&str, &str)]) -> String {
    let flag = flags
        .iter()
        .find(|(setting, _)| *setting == e.setting)
        .map_or(e.setting, |(_, f)| f);
    if e.value == 0 {
        format!("{flag} 0: must be at least 1")
    } else {
        format!(
            "{flag} {} is above {}, the most the engine takes (vcmdq::engine::{}, a build-time \
             constant: raise it there and rebuild)",
            e.value, e.max, e.max_name
        )
    }
}

/// At most `max` characters of `s` for an error message, saying how long it was when cut:
/// a huge value is never echoed whole.
pub(crate) fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((i, _)) => format!("{}... ({} bytes)", &s[..i], s.len()),
    }
}
