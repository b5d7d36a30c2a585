//! The `vcmdq` command-line program. Each subcommand lives in its own module under `cli/`.

// These shadow std's macros in every module below (textual scope wins over the prelude), so no
// subcommand can panic on a closed standard output or standard error: see `cli::out`.
macro_rules! println {
    () => {
        $crate::cli::out::print(format_args!(""), true)
    };
    ($($arg:tt)*) => {
        $crate::cli::out::print(format_args!($($arg)*), true)
    };
}
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::cli::out::print(format_args!($($arg)*), false)
    };
}
macro_rules! eprintln {
    () => {
        $crate::cli::out::eprint(format_args!(""), true)
    };
    ($($arg:tt)*) => {
        $crate::cli::out::eprint(format_args!($($arg)*), true)
    };
}
macro_rules! eprint {
    ($($arg:tt)*) => {
        $crate::cli::out::eprint(format_args!($($arg)*), false)
    };
}

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        // The reader of standard output went away (`vcmdq ... | head`): nobody is left to
        // tell, and the command had not failed.
        Err(e) if cli::out::is_closed_stdout(e.as_ref()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vcmdq: {e}");
            ExitCode::from(2)
        }
    }
}
