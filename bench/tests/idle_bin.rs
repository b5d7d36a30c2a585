//! The `idle` measurement runs and reports every figure. Its numbers are not checked: they
//! depend on the machine and its load.

use std::process::Command;

#[test]
fn idle_reports_cpu_and_wake_up_latency() {
    let out = Command::new(env!("CARGO_BIN_EXE_idle"))
        .args(["--idle-secs", "0.1", "--rounds", "20"])
        .output()
        .expect("run the idle binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "idle failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "| sealed memfd (SLEEPING word: the worker sleeps) | 1 |",
        "| sealed memfd (SLEEPING word: the worker sleeps) | 2 |",
        "| unsealed file (no SLEEPING word: the worker polls) | 1 |",
        "| asleep (futex wait) |",
        "| awake (polling) |",
        "| no engine: a thread asleep the same way",
        "p99 us",
    ] {
        assert!(stdout.contains(want), "no {want:?} in:\n{stdout}");
    }
}

#[test]
fn idle_refuses_a_bad_option() {
    let out = Command::new(env!("CARGO_BIN_EXE_idle"))
        .args(["--rounds", "0"])
        .output()
        .expect("run the idle binary");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rounds must be at least 1"));
}
