//! Command-line parsing and dispatch. One module per subcommand.

mod decode;
mod encode;
mod guest;
mod serve;
mod spec;
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
    /// Run the engine over guest rings (files, or sealed memfds it creates), with live counters.
    Serve(serve::ServeArgs),
    /// Drive a ring as a guest: batches ended by CMD_SYNC, errors handled as Linux does.
    Guest(guest::GuestArgs),
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.cmd {
        Cmd::Decode(a) => decode::run(a),
        Cmd::Encode(a) => encode::run(a),
        Cmd::Translate(args) => translate::run(args),
        Cmd::Serve(args) => serve::run(args),
        Cmd::Guest(args) => guest::run(args),
    }
}
