//! The `vcmdq` command-line program.

fn main() {
    eprintln!("vcmdq: no subcommands yet");
    std::process::exit(2);
}
