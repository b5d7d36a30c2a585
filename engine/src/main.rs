//! The `vcmdq` command-line program. Each subcommand lives in its own module under `cli/`.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vcmdq: {e}");
            ExitCode::from(2)
        }
    }
}
