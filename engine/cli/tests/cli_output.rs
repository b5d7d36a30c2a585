//! What the subcommands print says the right thing: counts with their plurals, rates in a unit
//! that fits, HdrHistogram's own format, `--expect` only when asked and its differences field by
//! field, `translate`'s exit status, and serve's rate over the time traffic flowed.
#![cfg(not(loom))]

mod common;

use common::vcmdq;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_vcmdq");

fn trace(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../traces")
        .join(name)
        .display()
        .to_string()
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vcmdq-cli-output-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn stdout_of(args: &[&str]) -> (i32, String, String) {
    let out = vcmdq(args, "");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// RingCreate and ViommuCreate records of a trace, from `vcmdq trace info --json`.
fn declared(t: &str) -> (u64, u64) {
    let (code, out, err) = stdout_of(&["trace", "info", t, "--json"]);
    assert_eq!(code, 0, "{err}");
    let j: Value = serde_json::from_str(&out).unwrap();
    let k = &j["records_by_kind"];
    (
        k["RingCreate"].as_u64().expect("RingCreate count"),
        k["ViommuCreate"].as_u64().expect("ViommuCreate count"),
    )
}

#[test]
fn replay_counts_the_rings_the_trace_declares_with_plurals() {
    let t = trace("mixed.vct");
    let (rings, viommus) = declared(&t);
    assert_eq!((rings, viommus), (12, 6));
    let (code, out, err) = stdout_of(&["replay", &t]);
    assert_eq!(code, 0, "{err}");
    let first = out.lines().next().unwrap();
    assert_eq!(
        first,
        format!("replay {t}: 10272 commands on 12 rings of 6 vIOMMUs")
    );

    let t = trace("qemu-sample.vct");
    assert_eq!(declared(&t), (1, 1));
    let (code, out, err) = stdout_of(&["replay", &t]);
    assert_eq!(code, 0, "{err}");
    let first = out.lines().next().unwrap();
    assert!(
        first.ends_with(" on 1 ring of 1 vIOMMU"),
        "one ring, one vIOMMU, no plural: {first}"
    );
}

#[test]
fn replay_throughput_takes_a_unit_that_fits_the_rate() {
    // A small trace replays at thousands, not millions, of commands a second: "0.00 M" says
    // nothing. Whatever the machine's speed, the figure before the unit is at least 1 when
    // the unit is k or M, and below 1000 when it is k or none.
    let (code, out, err) = stdout_of(&["replay", &trace("qemu-sample.vct")]);
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("throughput: "))
        .unwrap_or_else(|| panic!("no throughput line in {out}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let n: f64 = words[1].parse().unwrap_or_else(|_| panic!("{line}"));
    match words[2] {
        "M" => assert!(n >= 1.0, "{line}"),
        "k" => assert!((1.0..1000.0).contains(&n), "{line}"),
        "commands/s" => assert!(n < 1000.0, "{line}"),
        _ => panic!("unexpected unit in {line}"),
    }
    assert!(!line.contains(" 0.00 M"), "{line}");
}

#[test]
fn hgrm_total_count_is_cumulative_as_hdrhistogram_writes_it() {
    let d = tmpdir("hgrm");
    let h = d.join("lat.hgrm");
    let (code, _, err) = stdout_of(&[
        "replay",
        &trace("hostile.vct"),
        "--hgrm",
        h.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&h).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
    );
    let mut last_count = 0u64;
    let mut last_pct = 0f64;
    let mut rows = 0;
    let mut total = None;
    for l in lines {
        if let Some(rest) = l.strip_prefix("#[Max") {
            let n = rest
                .rsplit('=')
                .next()
                .unwrap()
                .trim_end_matches(']')
                .trim();
            total = Some(n.parse::<u64>().unwrap());
            continue;
        }
        if l.trim().is_empty() || l.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = l.split_whitespace().collect();
        let pct: f64 = f[1].parse().unwrap();
        let count: u64 = f[2].parse().unwrap();
        assert!(count >= last_count, "TotalCount went down at {l:?}");
        assert!(pct >= last_pct, "Percentile went down at {l:?}");
        if pct < 1.0 {
            assert_eq!(f.len(), 4, "{l:?}");
        }
        (last_count, last_pct) = (count, pct);
        rows += 1;
    }
    // How many rows depends on how spread the latencies were (a run whose samples fall in a
    // few buckets writes few), not on the format: two at least, so that the order is checked.
    assert!(rows >= 2, "{text}");
    assert_eq!(last_pct, 1.0, "the last row is the 100th percentile");
    assert_eq!(
        Some(last_count),
        total,
        "the last row's TotalCount is every sample"
    );
}

#[test]
fn json_has_no_expect_verdict_without_expect_and_a_failed_expect_names_the_fields() {
    let t = trace("hostile.vct");
    let (code, out, err) = stdout_of(&["replay", &t, "--json"]);
    assert_eq!(code, 0, "{err}");
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["expect_ok"], Value::Null);

    let want = trace("hostile.expected.json");
    let (code, out, err) = stdout_of(&["replay", &t, "--json", "--expect", &want]);
    assert_eq!(code, 0, "{err}");
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["expect_ok"], Value::Bool(true));

    let d = tmpdir("expect");
    let mut e: Value = serde_json::from_str(&std::fs::read_to_string(&want).unwrap()).unwrap();
    e["commands"] = Value::from(1);
    e["outcomes"]["dropped"] = Value::from(12345);
    e["extra"] = Value::from("x");
    let bad = d.join("bad.expected.json");
    std::fs::write(&bad, e.to_string()).unwrap();
    let (code, out, err) = stdout_of(&["replay", &t, "--json", "--expect", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["expect_ok"], Value::Bool(false));
    assert!(err.contains("(3 fields)"), "{err}");
    assert!(err.contains("  commands: expected 1, got "), "{err}");
    assert!(
        err.contains("  outcomes.dropped: expected 12345, got "),
        "{err}"
    );
    assert!(err.contains("  extra: expected \"x\", got absent"), "{err}");
    assert!(
        !err.contains("forwarded_digest"),
        "only what differs is printed: {err}"
    );
}

#[test]
fn translate_exits_1_when_a_command_was_refused_and_still_prints_every_line() {
    let args = ["translate", "--vmid", "5", "--bind", "vsid=0x10,psid=0x800"];
    let out = vcmdq(&args, "CFGI_CD sid=0x10\nCMD_SYNC\n");
    assert_eq!(out.status.code(), Some(0));
    let out = vcmdq(&args, "ATC_INV sid=0x12 size=52\nCMD_SYNC\n");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.contains("refused"), "{text}");
    let help = String::from_utf8(vcmdq(&["translate", "--help"], "").stdout).unwrap();
    assert!(help.contains("1 when any was"), "{help}");
}

#[test]
fn serve_reports_its_rate_over_the_run_and_over_the_time_traffic_flowed() {
    let mut serve = Command::new(BIN)
        .args([
            "serve",
            "--viommu",
            "id=1,vmid=5,smmu=0",
            "--device",
            "id=1,smmu=0,psid=0x800",
            "--bind",
            "viommu=1,device=1,vsid=0x10",
            "--create-ring",
            "viommu=1,log2size=8",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(serve.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let path = line.trim_end().split_once("path=").unwrap().1.to_string();
    let guest = Command::new(BIN)
        .args([
            "guest",
            &path,
            "--workload",
            "dma-unmap",
            "--commands",
            "20000",
            "--vsid",
            "0x10",
            "--timeout",
            "30",
        ])
        .output()
        .unwrap();
    assert!(
        guest.status.success(),
        "{}",
        String::from_utf8_lossy(&guest.stderr)
    );
    drop(serve.stdin.take());
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    let status = serve.wait().unwrap();
    assert!(status.success(), "{out}");
    let first = out.lines().next().unwrap();
    assert!(
        first.contains(", 1 ring, 1 worker, ")
            && first.contains(" forwarded over the run; ")
            && first.contains(" s traffic flowed"),
        "{first}"
    );
}

/// `make loadtest`'s recipe, as make would run it (`make -n`: nothing is built or run).
fn make_loadtest_recipe(extra: &[&str]) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("make")
        .arg("-n")
        .arg("-C")
        .arg(&root)
        .arg("--no-print-directory")
        .args(extra)
        .arg("loadtest")
        .output()
        .expect("make runs (the Makefile is how the repository is driven)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn make_loadtest_draws_under_target_and_rewrites_the_tracked_plot_only_when_asked() {
    let recipe = make_loadtest_recipe(&[]);
    assert!(
        recipe.contains("loadtest --svg target/loadtest/latency.svg"),
        "{recipe}"
    );
    assert!(!recipe.contains("docs/"), "{recipe}");
    let recipe = make_loadtest_recipe(&["LOADTEST_SVG=docs/latency.svg"]);
    assert!(
        recipe.contains("loadtest --svg docs/latency.svg"),
        "{recipe}"
    );
}

/// A number as the READMEs write it ("116,728").
fn figure(s: &str) -> u64 {
    s.trim()
        .replace(',', "")
        .parse()
        .unwrap_or_else(|_| panic!("not a figure: {s:?}"))
}

/// traces/README.md's table: each bundled trace's bytes, rings, ring entries and records are
/// what `vcmdq trace info` finds, and a count of refusals it gives is its expected summary's.
#[test]
fn the_traces_readme_table_agrees_with_the_traces_and_their_expected_summaries() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../traces");
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let mut rows = 0;
    for line in readme.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`');
        let t = dir.join(name);
        let ts = t.to_str().unwrap();
        let (code, out, err) = stdout_of(&["trace", "info", ts, "--json"]);
        assert_eq!(code, 0, "{name}: {err}");
        let info: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            figure(cells[2]),
            std::fs::metadata(&t).unwrap().len(),
            "{name}: bytes"
        );
        // "VMs × devices × rings, LOG2SIZE": rings are per VM.
        let shape: Vec<u64> = cells[3]
            .split(',')
            .next()
            .unwrap()
            .split('×')
            .map(figure)
            .collect();
        assert_eq!(
            shape[0] * shape[2],
            info["records_by_kind"]["RingCreate"].as_u64().unwrap(),
            "{name}: rings"
        );
        assert_eq!(
            figure(cells[4]),
            info["commands"].as_u64().unwrap(),
            "{name}: entries"
        );
        assert_eq!(
            figure(cells[5]),
            info["records"].as_u64().unwrap(),
            "{name}: records"
        );
        let expected: Value = serde_json::from_str(
            &std::fs::read_to_string(t.with_extension("expected.json")).unwrap(),
        )
        .unwrap();
        let words: Vec<&str> = cells[6].split_whitespace().collect();
        for w in words.windows(2) {
            if w[1].trim_end_matches([',', ';', ')']) == "refusals" {
                assert_eq!(
                    figure(w[0]),
                    expected["outcomes"]["refused"].as_u64().unwrap(),
                    "{name}: refusals in {:?}",
                    cells[6]
                );
            }
        }
        rows += 1;
    }
    assert_eq!(rows, 10, "every bundled trace has its row");
}

#[test]
fn soak_and_loadtest_count_threads_rings_and_workers_with_plurals() {
    let (code, out, err) = stdout_of(&[
        "soak",
        "--commands",
        "2000",
        "--guests",
        "1",
        "--workers",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    let first = out.lines().next().unwrap();
    assert!(
        first.starts_with("soak: 1 guest thread, ")
            && first.contains(" rings on ")
            && first.contains(", 1 worker, ")
            && !first.contains("(s)"),
        "{first}"
    );
    let (code, out, err) = stdout_of(&[
        "loadtest", "--secs", "0.2", "--loads", "20", "--rings", "1", "--batch", "8",
    ]);
    assert!(code == 0 || code == 1, "{err}");
    let first = out.lines().next().unwrap();
    assert!(
        first.starts_with("loadtest: 1 ring, batches of 8 commands + CMD_SYNC, ")
            && !first.contains("(s)"),
        "{first}"
    );
}
