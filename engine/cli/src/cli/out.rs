//! Standard output for every subcommand, and what a closed standard output means.
//!
//! `vcmdq ... | head -1` closes the pipe while vcmdq still writes. std's `println!` panics
//! then (exit 101), so the binary's `println!`/`print!` are replaced (in `main.rs`) by macros
//! that write here. A write that finds the reader gone marks standard output closed and fails
//! with `BrokenPipe`: a command that streams (decode, encode, translate) stops at the `?`; the
//! macros drop the error, so a long-running command (serve, soak, replay) completes what it
//! took and exits as it would have. `main` ends a command whose error is that `BrokenPipe`
//! quietly, with status 0 (the command had not failed; it only lost its reader).

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a write met a closed standard output.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Whether a write to standard output has found the reader gone.
pub fn closed() -> bool {
    CLOSED.load(Ordering::Relaxed)
}

/// Standard output; every write after the reader went away fails at once with `BrokenPipe`.
pub struct Stdout;

/// Standard output (unbuffered beyond std's line buffer: wrap it in a `BufWriter` to stream).
pub fn stdout() -> Stdout {
    Stdout
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "standard output is closed")
}

fn note(r: io::Result<usize>) -> io::Result<usize> {
    if let Err(e) = &r {
        if e.kind() == io::ErrorKind::BrokenPipe {
            CLOSED.store(true, Ordering::Relaxed);
        }
    }
    r
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if closed() {
            return Err(gone());
        }
        note(io::stdout().lock().write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        if closed() {
            return Err(gone());
        }
        note(io::stdout().lock().flush().map(|()| 0)).map(|_| ())
    }
}

/// What the `println!`/`print!` of the binary call: the text, or nothing once the reader is
/// gone (the command goes on; see the module comment).
pub fn print(args: std::fmt::Arguments<'_>, newline: bool) {
    if closed() {
        return;
    }
    let mut out = io::stdout().lock();
    let r = out.write_fmt(args).and_then(|()| {
        if newline {
            out.write_all(b"\n")
        } else {
            Ok(())
        }
    });
    if let Err(e) = r {
        if e.kind() == io::ErrorKind::BrokenPipe {
            CLOSED.store(true, Ordering::Relaxed);
        }
    }
}

/// What the `eprintln!`/`eprint!` of the binary call: a closed standard error loses the text
/// rather than panicking.
pub fn eprint(args: std::fmt::Arguments<'_>, newline: bool) {
    let mut err = io::stderr().lock();
    let _ = err.write_fmt(args);
    if newline {
        let _ = err.write_all(b"\n");
    }
}

/// Whether `e` is a write to standard output that found the reader gone.
pub fn is_closed_stdout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::BrokenPipe {
                return true;
            }
        }
        cur = err.source();
    }
    false
}
