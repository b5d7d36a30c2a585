//! Every example in README.md's ```console blocks that runs offline in a moment is run here, as
//! the README shows it, against the built `vcmdq`, and its output compared with the README's.
//!
//! The rule, line by line (a README line against the command's standard output and standard
//! error, interleaved as a terminal shows them):
//! - A `$ ` line is a command (a trailing `\` continues it). It runs under `sh` from the
//!   repository's root with the built binary first on the PATH, so it is run as typed.
//! - A line `...` stands for any number of lines, none included; a line ending in ` ...` for
//!   any line that begins as it does (under the next rule's looseness, where it applies). Otherwise the README's lines
//!   are the output's lines in order, from the first to the last (trailing spaces aside).
//! - A line that reports time or what timing decides (its first word `throughput:`, `mode:` or
//!   `doorbell`) is matched loosely: each figure, with the unit after it (ns, us, ms, s, k, M),
//!   matches any figure and unit, and the spacing between words is not compared. Every other
//!   line is compared exactly.
//! - The two-terminal example (a `vcmdq serve` block, then a `vcmdq guest` block) is run as a
//!   person runs it: serve in the background (with `--progress` added, since the test's standard
//!   error is not a terminal, where serve prints its counters unasked), the guest against the
//!   ring path serve printed (it stands for the README's `/proc/...` path, and a `path=` word
//!   matches any path), then a `^C` line interrupts serve with SIGINT; the line before `^C`
//!   stands for one or more lines (the counters repeat until the interrupt), and lines whose
//!   first word is `serve:` or `guest:` report rates and times, so they are matched loosely.
//!   Any other `serve` or `guest` example fails the test, so none is skipped unseen.
#![cfg(not(loom))]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// One `$` command and the output lines the README shows for it.
struct Example {
    line: usize,
    command: String,
    output: Vec<String>,
}

fn examples(readme: &str) -> Vec<Example> {
    let mut out = Vec::new();
    let mut in_console = false;
    let mut cur: Option<Example> = None;
    let mut continued = false;
    for (i, l) in readme.lines().enumerate() {
        if !in_console {
            in_console = l.trim_end() == "```console";
            continue;
        }
        if l.trim_end() == "```" {
            in_console = false;
            out.extend(cur.take());
            continue;
        }
        if continued {
            let c = cur.as_mut().unwrap();
            c.command.push(' ');
            c.command
                .push_str(l.trim().trim_end_matches('\\').trim_end());
            continued = l.trim_end().ends_with('\\');
        } else if let Some(cmd) = l.strip_prefix("$ ") {
            out.extend(cur.take());
            continued = cmd.trim_end().ends_with('\\');
            cur = Some(Example {
                line: i + 1,
                command: cmd.trim_end().trim_end_matches('\\').trim_end().to_string(),
                output: Vec::new(),
            });
        } else if let Some(c) = cur.as_mut() {
            c.output.push(l.trim_end().to_string());
        }
    }
    out
}

/// Whether the README line is one of time (see the module comment).
fn loose(line: &str) -> bool {
    matches!(
        line.split_whitespace().next(),
        Some("throughput:" | "mode:" | "doorbell" | "serve:" | "guest:" | "ring")
    )
}

/// The words of a line, each figure (and a unit word after it) as `#`.
fn shape(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut after_figure = false;
    for w in line.split_whitespace() {
        if w.starts_with("path=") {
            words.push("path=#".to_string());
            continue;
        }
        let bare = w.trim_start_matches('(').trim_end_matches([',', ';', ')']);
        // A figure may carry its unit ("1.0s").
        let digits = bare.trim_end_matches(['n', 'u', 'm', 's']);
        let figure = digits.starts_with(|c: char| c.is_ascii_digit())
            && digits
                .chars()
                .all(|c| c.is_ascii_digit() || c == '.' || c == ',');
        if after_figure
            && matches!(
                bare,
                "ns" | "us" | "ms" | "s" | "k" | "M" | "/s" | "k/s" | "M/s" | "G/s"
            )
        {
            after_figure = false;
            if w != bare {
                words.push(w.replacen(bare, "#", 1));
            }
            continue;
        }
        after_figure = figure;
        words.push(if figure {
            w.replacen(bare, "#", 1)
        } else {
            w.to_string()
        });
    }
    // A figure with its unit ("2.51 M") and one without ("537.6 k", "2903 ns") read alike.
    words.dedup_by(|a, b| a == "#" && b == "#");
    words
}

fn line_matches(want: &str, got: &str) -> bool {
    if let Some(head) = want.strip_suffix(" ...") {
        // The rest of the line elided: its words so far begin the output's.
        let (h, g) = if loose(want) {
            (shape(head), shape(got))
        } else {
            (words(head), words(got))
        };
        return g.starts_with(&h) && (loose(want) || got.starts_with(head.trim_end()));
    }
    if loose(want) {
        shape(want) == shape(got)
    } else {
        want == got.trim_end()
    }
}

fn words(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_string).collect()
}

/// What a line before `^C` becomes: it stands for one or more lines.
const REPEATS: &str = "\u{0}repeats\u{0}";

/// Whether `got` is `want` under the rule: `...` stands for any lines, a line marked as
/// repeating (before `^C`) for one or more.
fn matches(want: &[String], got: &[&str]) -> bool {
    match want.split_first() {
        None => got.is_empty(),
        Some((w, rest)) if w.trim() == "..." => (0..=got.len()).any(|k| matches(rest, &got[k..])),
        Some((w, rest)) if w.starts_with(REPEATS) => {
            let w = &w[REPEATS.len()..];
            let n = got.iter().take_while(|g| line_matches(w, g)).count();
            (1..=n).any(|k| matches(rest, &got[k..]))
        }
        Some((w, rest)) => !got.is_empty() && line_matches(w, got[0]) && matches(rest, &got[1..]),
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// PATH with the built `vcmdq` first.
fn path_with_vcmdq() -> String {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_vcmdq")).parent().unwrap();
    format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn run(command: &str, root: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{{ {command} ; }} 2>&1"))
        .current_dir(root)
        .env("PATH", path_with_vcmdq())
        .env("CI", "1")
        .output()
        .expect("sh runs");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_runnable_readme_example_prints_what_the_readme_shows() {
    let root = root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let all = examples(&readme);
    let mut skipped = Vec::new();
    let mut failures = Vec::new();
    let mut ran = 0;
    let mut two_terminals = 0;
    let mut i = 0;
    while i < all.len() {
        let e = &all[i];
        i += 1;
        let sub = e
            .command
            .split('|')
            .map(str::trim)
            .find_map(|stage| stage.strip_prefix("vcmdq "))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("");
        if sub == "serve"
            && all
                .get(i)
                .is_some_and(|g| g.command.starts_with("vcmdq guest "))
        {
            if let Err(why) = run_two_terminals(e, &all[i], &root) {
                failures.push(why);
            }
            i += 1;
            two_terminals += 1;
            continue;
        }
        if matches!(sub, "serve" | "guest") {
            skipped.push(e.line);
            continue;
        }
        let got = run(&e.command, &root);
        let lines: Vec<&str> = got.lines().collect();
        ran += 1;
        if !matches(&e.output, &lines) {
            failures.push(format!(
                "README.md line {}: $ {}\n--- README shows:\n{}\n--- it printed:\n{}",
                e.line,
                e.command,
                e.output.join("\n"),
                got
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(
        skipped.is_empty(),
        "serve or guest examples at README.md lines {skipped:?} are neither a serve block \
         followed by its guest block nor run otherwise"
    );
    assert_eq!(two_terminals, 1, "the two-terminal serve/guest example ran");
    assert!(ran >= 7, "ran {ran} examples");
}

/// The README's serve output with its `^C` rule applied: the line before `^C` repeats.
fn serve_want(output: &[String]) -> Vec<String> {
    let mut want: Vec<String> = Vec::new();
    for l in output {
        if l.trim() == "^C" {
            if let Some(last) = want.last_mut() {
                *last = format!("{REPEATS}{last}");
            }
        } else {
            want.push(l.clone());
        }
    }
    want
}

/// The `path=` of the README's or serve's `ring 0` line.
fn ring_path(lines: &[String]) -> Option<String> {
    lines.iter().find_map(|l| {
        l.strip_prefix("ring 0 ")?
            .split_whitespace()
            .find_map(|w| w.strip_prefix("path=").map(str::to_string))
    })
}

/// Runs the serve example in the background and its guest against the ring it printed, then
/// interrupts serve as `^C` does; compares both outputs with the README's.
fn run_two_terminals(serve: &Example, guest: &Example, root: &Path) -> Result<(), String> {
    const WAIT: Duration = Duration::from_secs(30);
    let at = |what: &str| format!("README.md line {}: $ {}\n{what}", serve.line, serve.command);
    let readme_path =
        ring_path(&serve.output).ok_or_else(|| at("the README shows no ring path"))?;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("exec {} --progress 2>&1", serve.command))
        .current_dir(root)
        .env("PATH", path_with_vcmdq())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| at(&format!("cannot start serve: {e}")))?;
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut got = Vec::new();
    let next = |got: &mut Vec<String>, until: Instant| -> Option<()> {
        let l = rx
            .recv_timeout(until.saturating_duration_since(Instant::now()))
            .ok()?;
        got.push(l);
        Some(())
    };
    let result = (|| {
        let until = Instant::now() + WAIT;
        while ring_path(&got).is_none() {
            next(&mut got, until).ok_or_else(|| {
                at(&format!(
                    "serve printed no ring path within {WAIT:?}: {got:?}"
                ))
            })?;
        }
        let path = ring_path(&got).unwrap();
        let guest_cmd = guest.command.replace(&readme_path, &path);
        let guest_got = run(&guest_cmd, root);
        let guest_lines: Vec<&str> = guest_got.lines().collect();
        if !matches(&guest.output, &guest_lines) {
            return Err(format!(
                "README.md line {}: $ {guest_cmd}\n--- README shows:\n{}\n--- it printed:\n{guest_got}",
                guest.line,
                guest.output.join("\n")
            ));
        }
        // The counters serve prints once a second: one after the guest's traffic.
        let until = Instant::now() + WAIT;
        let progress = |got: &Vec<String>| got.iter().filter(|l| l.starts_with("serve: ")).count();
        let before = progress(&got);
        while progress(&got) == before {
            next(&mut got, until).ok_or_else(|| {
                at(&format!(
                    "serve printed no counters within {WAIT:?}: {got:?}"
                ))
            })?;
        }
        Ok(())
    })();
    // SAFETY: `kill` with a child's pid and a signal number has no memory-safety precondition.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let until = Instant::now() + WAIT;
    let exited = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            _ if Instant::now() >= until => break None,
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    if exited.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    result?;
    let status =
        exited.ok_or_else(|| at(&format!("serve did not stop within {WAIT:?} of SIGINT")))?;
    while let Ok(l) = rx.recv_timeout(WAIT) {
        got.push(l);
    }
    let lines: Vec<&str> = got.iter().map(String::as_str).collect();
    if !status.success() || !matches(&serve_want(&serve.output), &lines) {
        return Err(at(&format!(
            "--- README shows:\n{}\n--- it printed ({status}):\n{}",
            serve.output.join("\n"),
            got.join("\n")
        )));
    }
    Ok(())
}

#[test]
fn the_matching_rule_is_the_documented_one() {
    let w = |s: &[&str]| s.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    assert!(matches(&w(&["a", "...", "d"]), &["a", "b", "c", "d"]));
    assert!(matches(&w(&["a", "...", "b"]), &["a", "b"]));
    assert!(!matches(&w(&["a", "d"]), &["a", "b", "d"]));
    assert!(
        !matches(&w(&["a"]), &["a", "b"]),
        "the last line is the last"
    );
    assert!(line_matches(
        "  throughput: 2.51 M commands/s (10304 in 0.004 s; 3182 batches, 3147 physical CMD_SYNCs)",
        "  throughput: 537.6 k commands/s (10304 in 0.019 s; 3180 batches, 3147 physical CMD_SYNCs)"
    ));
    assert!(line_matches(
        "  doorbell -> physical publish p50   60.2 us  p99  384.3 us  ...",
        "  doorbell -> physical publish p50 2903 ns  p99  554.5 us  ..."
    ));
    assert!(
        line_matches(
            "serve: 6.00 s, 1 ring, 1 worker, 166.6 k/s forwarded over the run",
            "serve: 2.10 s, 1 ring, 1 worker, 1.2 M/s forwarded over the run"
        ),
        "a rate's unit follows its size"
    );
    assert!(!line_matches(
        "  doorbell -> physical publish p50 60.2 us",
        "  doorbell -> guest sync done p50 60.2 us"
    ));
    assert!(
        !line_matches("read 10304", "read 10305"),
        "other lines exactly"
    );
}

/// A version as numbers ("1.95" as [1, 95]).
fn version(v: &str) -> Vec<u64> {
    v.split('.').map(|n| n.parse().unwrap()).collect()
}

/// The workspace's `rust-version` is no lower than that of any dependency the lock file pins,
/// `make loom`'s (loom and its generator) included, so the minimum it states is true.
#[test]
fn the_stated_minimum_rust_is_what_every_locked_dependency_needs() {
    let host = String::from_utf8(
        Command::new("rustc")
            .arg("-vV")
            .output()
            .expect("rustc runs")
            .stdout,
    )
    .unwrap()
    .lines()
    .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
    .expect("rustc -vV names its host");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        // Not --offline: `make loom`'s dependencies (generator) may not be fetched yet when the
        // unit tests run, and cargo reads a package's rust-version from its manifest.
        .args(["metadata", "--format-version", "1"])
        .args(["--filter-platform", &host])
        .env("RUSTFLAGS", "--cfg loom")
        .current_dir(root())
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = j["packages"].as_array().unwrap();
    let ours = packages
        .iter()
        .find(|p| p["name"] == "vcmdq")
        .and_then(|p| p["rust_version"].as_str())
        .map(version)
        .expect("vcmdq states a rust-version");
    let needed = packages
        .iter()
        .filter_map(|p| Some((version(p["rust_version"].as_str()?), p["name"].as_str()?)))
        .max()
        .unwrap();
    assert!(
        ours >= needed.0,
        "the workspace says rust-version {ours:?}; {} needs {:?}",
        needed.1,
        needed.0
    );
    assert!(
        packages.iter().any(|p| p["name"] == "loom"),
        "loom's dependencies were looked at"
    );
}
