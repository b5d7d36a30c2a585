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
//! - Commands that need a second terminal (`vcmdq serve`, `vcmdq guest`) are not run; the test
//!   lists which it skipped and fails if that is anything else, so a new example is not skipped
//!   unseen.
#![cfg(not(loom))]

use std::path::{Path, PathBuf};
use std::process::Command;

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
        Some("throughput:" | "mode:" | "doorbell")
    )
}

/// The words of a line, each figure (and a unit word after it) as `#`.
fn shape(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut after_figure = false;
    for w in line.split_whitespace() {
        let bare = w.trim_start_matches('(').trim_end_matches([',', ';', ')']);
        let figure = bare.starts_with(|c: char| c.is_ascii_digit())
            && bare
                .chars()
                .all(|c| c.is_ascii_digit() || c == '.' || c == ',');
        if after_figure && matches!(bare, "ns" | "us" | "ms" | "s" | "k" | "M") {
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

/// Whether `got` is `want` under the rule: `...` stands for any lines.
fn matches(want: &[String], got: &[&str]) -> bool {
    match want.split_first() {
        None => got.is_empty(),
        Some((w, rest)) if w.trim() == "..." => (0..=got.len()).any(|k| matches(rest, &got[k..])),
        Some((w, rest)) => !got.is_empty() && line_matches(w, got[0]) && matches(rest, &got[1..]),
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(command: &str, root: &Path) -> String {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_vcmdq")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{{ {command} ; }} 2>&1"))
        .current_dir(root)
        .env("PATH", path)
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
    for e in &all {
        let sub = e
            .command
            .split('|')
            .map(str::trim)
            .find_map(|stage| stage.strip_prefix("vcmdq "))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("");
        if matches!(sub, "serve" | "guest") {
            skipped.push(sub);
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
    assert_eq!(
        skipped,
        ["serve", "guest"],
        "only the two-terminal example is skipped"
    );
    assert!(ran >= 7, "ran {ran} examples");
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
        .args(["metadata", "--format-version", "1", "--offline"])
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
