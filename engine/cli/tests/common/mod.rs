//! Helpers shared by the command line's tests: running the binary, and ring files a test guest
//! drives (shared with the core's ring tests).
#![allow(dead_code)]

#[path = "../../../core/tests/common/file_ring.rs"]
pub mod file_ring;

/// Runs the `vcmdq` binary with `args`, `stdin` on its standard input.
pub fn vcmdq(args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_vcmdq"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vcmdq");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}
