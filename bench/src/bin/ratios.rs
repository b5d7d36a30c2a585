//! `ratios [DIR]`: vcmdq against the copy limit and the naive floor, from criterion's medians in
//! DIR (default `target/criterion`, or `$CARGO_TARGET_DIR/criterion`). Markdown on stdout.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target =
                std::env::var_os("CARGO_TARGET_DIR").map_or("target".into(), PathBuf::from);
            target.join("criterion")
        });
    match vcmdq_bench::report::load(&dir) {
        Ok(all) if all.is_empty() => {
            eprintln!("ratios: no criterion results under {}", dir.display());
            ExitCode::from(2)
        }
        Ok(all) => {
            print!("{}", vcmdq_bench::report::render(&all));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ratios: {e}");
            ExitCode::from(2)
        }
    }
}
