//! `vcmdq loadtest` as a person runs it: a short run, its JSON and its plot. Nothing here
//! looks at how fast anything was, only at what a run reports.

use serde_json::Value;
use std::process::Command;
use std::sync::Mutex;

/// A loadtest spins a generator and a worker on the two cores; two at once would take each
/// other's CPU and a short level could end with nothing sent. The tests run them one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn vcmdq(args: &[&str]) -> (i32, String, String) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(env!("CARGO_BIN_EXE_vcmdq"))
        .arg("loadtest")
        .args(args)
        .output()
        .expect("vcmdq runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn a_short_run_reports_every_level_and_draws_it() {
    let svg = std::env::temp_dir().join(format!("vcmdq-loadtest-{}.svg", std::process::id()));
    let (code, out, err) = vcmdq(&[
        "--secs",
        "0.5",
        "--loads",
        "20,60",
        "--rings",
        "2",
        "--batch",
        "8",
        "--json",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "stderr: {err}");
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (j["rings"].as_u64(), j["batch"].as_u64()),
        (Some(2), Some(8))
    );
    assert_eq!(j["saturation_measured"], true);
    let sat = j["saturation_cmd_per_s"].as_f64().unwrap();
    assert!(sat > 0.0);
    let levels = j["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for (l, load) in levels.iter().zip([20.0, 60.0]) {
        assert_eq!(l["load_percent"].as_f64(), Some(load));
        assert!((l["target_cmd_per_s"].as_f64().unwrap() - sat * load / 100.0).abs() < 1.0);
        assert!(l["batches"].as_u64().unwrap() > 0);
        for what in ["doorbell_to_publish", "doorbell_to_sync"] {
            let p = &l[what];
            assert_eq!(p["count"], l["batches"], "{what}: one sample per batch");
            let q = |k: &str| p[k].as_u64().unwrap();
            assert!(q("p50_ns") > 0);
            assert!(q("p50_ns") <= q("p90_ns") && q("p90_ns") <= q("p99_ns"));
            assert!(q("p99_ns") <= q("p999_ns") && q("p999_ns") <= q("max_ns"));
        }
        // The two diagnostics: one sample per doorbell rung, and per batch published.
        assert!(l["generator_late"]["count"].as_u64() >= l["batches"].as_u64());
        assert_eq!(l["rung_to_publish"]["count"], l["batches"]);
        // Measured from the doorbell as rung, a latency is no longer than from the schedule.
        assert!(
            l["rung_to_publish"]["max_ns"].as_u64() <= l["doorbell_to_publish"]["max_ns"].as_u64()
        );
        // A batch's sync completes after it is published.
        assert!(
            l["doorbell_to_sync"]["max_ns"].as_u64() >= l["doorbell_to_publish"]["max_ns"].as_u64()
        );
    }
    let plot = std::fs::read_to_string(&svg).unwrap();
    std::fs::remove_file(&svg).unwrap();
    assert!(plot.starts_with("<svg"));
    assert_eq!(
        plot.matches("<polyline").count(),
        4,
        "publish and sync per level"
    );
    assert!(plot.contains("20% load: publish") && plot.contains("60% load: CMD_SYNC done"));
}

#[test]
fn a_given_saturation_skips_the_closed_loop_and_text_output_has_the_table() {
    let (code, out, err) = vcmdq(&["--secs", "0.1", "--loads", "50", "--saturation", "100000"]);
    assert_eq!(code, 0, "stderr: {err}");
    assert!(
        out.contains("saturation (given): 0.1 M commands/s"),
        "{out}"
    );
    assert!(out.contains("50% load: target 0.1 M/s"), "{out}");
    assert!(out.contains("to physical publish") && out.contains("to guest CMD_SYNC done"));
}

#[test]
fn bad_arguments_are_refused() {
    for args in [
        &["--loads", "0"][..],
        &["--loads", "150"],
        &["--secs", "0"],
        &["--secs", "nan"],
        &["--saturation", "5"],
        &["--rings", "0"],
        &["--batch", "0"],
    ] {
        let (code, _, err) = vcmdq(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(!err.is_empty());
    }
}
