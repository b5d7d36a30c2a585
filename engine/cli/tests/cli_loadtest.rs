//! `vcmdq loadtest` as a person runs it: a short run, its JSON and its plot. Nothing here
//! looks at how fast anything was, only at what a run reports: whether a level is judged the
//! engine's latency depends on how busy the machine is, so the tests check that the verdict is
//! reported consistently (and the judging itself is unit-tested on synthetic counters), except
//! for a rate no machine can hold.

use serde_json::Value;
use std::process::Command;
use std::sync::Mutex;

/// A loadtest spins a generator and a worker on the two cores; two at once would take each
/// other's CPU and a short level could end with nothing sent. The tests run them one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Checks a level's verdict: a flag, its reasons, and one implying the other.
fn verdict(l: &Value) -> bool {
    let trusted = l["trustworthy"].as_bool().expect("a trustworthy flag");
    let reasons = l["reasons"].as_array().expect("a reasons list");
    assert_eq!(trusted, reasons.is_empty(), "{l}");
    assert!(reasons.iter().all(|r| !r.as_str().unwrap().is_empty()));
    trusted
}

/// Exit status 1 exactly when no level is the engine's latency.
fn status_matches(code: i32, j: &Value) {
    let trusted = j["levels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| verdict(l))
        .count();
    assert_eq!(j["trustworthy_levels"].as_u64(), Some(trusted as u64));
    assert_eq!(code, i32::from(trusted == 0), "{j}");
}

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
    assert!(code == 0 || code == 1, "stderr: {err}");
    let j: Value = serde_json::from_str(&out).unwrap();
    status_matches(code, &j);
    assert!(j["not_checked"].is_array());
    assert_eq!(
        (j["rings"].as_u64(), j["batch"].as_u64()),
        (Some(2), Some(8))
    );
    assert_eq!(j["saturation_measured"], true);
    assert!(j["saturation_reasons"].is_array());
    // Pinned by default: two different CPUs, or the reason it could not be done.
    let pin = &j["pinning"];
    match pin["pinned"].as_bool() {
        Some(true) => assert_ne!(pin["generator_cpu"], pin["engine_cpu"], "{pin}"),
        Some(false) => {
            // Only where this process (and so the child) may not run on two CPUs.
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            assert!(cpus < 2, "{cpus} CPUs allowed, yet not pinned: {pin}");
            assert_eq!(pin["asked"], true, "{pin}");
            assert!(!pin["why"].as_str().unwrap().is_empty(), "{pin}");
        }
        None => panic!("no pinning in the JSON: {pin}"),
    }
    let sat = j["saturation_cmd_per_s"].as_f64().unwrap();
    assert!(sat > 0.0);
    let levels = j["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for (l, load) in levels.iter().zip([20.0, 60.0]) {
        assert_eq!(l["load_percent"].as_f64(), Some(load));
        assert!((l["target_cmd_per_s"].as_f64().unwrap() - sat * load / 100.0).abs() < 1.0);
        assert!(l["sent_batches"].as_u64() <= l["scheduled_batches"].as_u64());
        if l["batches"].as_u64().unwrap() == 0 {
            // A machine that gave the generator no CPU during the level measured nothing: the
            // level must say it is not the engine's latency, with its reasons.
            assert_eq!(l["trustworthy"], false, "{l}");
            assert!(!l["reasons"].as_array().unwrap().is_empty(), "{l}");
            continue;
        }
        assert!(l["level_wall_secs"].as_f64().unwrap() > 0.0);
        // Read from /proc where there is one; null (and named in not_checked) where not.
        for what in ["involuntary_switches", "steal_percent"] {
            assert!(l[what].is_number() || l[what].is_null(), "{what}: {l}");
        }
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
    // A level that measured nothing (a machine that gave the generator no CPU) has no curve.
    let measured: Vec<bool> = levels
        .iter()
        .map(|l| l["batches"].as_u64() > Some(0))
        .collect();
    assert_eq!(
        plot.matches("<polyline").count(),
        2 * measured.iter().filter(|&&m| m).count(),
        "publish and sync per level that measured: {measured:?}"
    );
    if measured[0] {
        assert!(plot.contains("20% load: publish"), "{plot}");
    }
    if measured[1] {
        assert!(plot.contains("60% load: CMD_SYNC done"), "{plot}");
    }
}

#[test]
fn a_given_saturation_skips_the_closed_loop_and_text_output_has_the_table() {
    let (code, out, err) = vcmdq(&[
        "--secs",
        "0.1",
        "--loads",
        "50",
        "--saturation",
        "100000",
        "--no-pin",
    ]);
    assert!(code == 0 || code == 1, "stderr: {err}");
    assert!(out.contains("  threads: not pinned (--no-pin)\n"), "{out}");
    // The verdict is said in words, and the status follows it.
    let refused = out.contains("level 50%: NOT the engine's latency: ");
    assert_eq!(code, i32::from(refused), "{out}");
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

#[test]
fn a_rate_no_machine_holds_is_not_presented_as_the_engines_latency_and_exits_1() {
    // One command every nanosecond, each its own batch with its CMD_SYNC: the generator falls
    // behind at once and most of the schedule is never sent, on any machine. (It does not even
    // reach the measured part of the schedule, past the warm-up, so its lateness has no sample:
    // the unsent batches are the reason every run gives.)
    let (code, out, err) = vcmdq(&[
        "--secs",
        "0.1",
        "--loads",
        "100",
        "--saturation",
        "1e9",
        "--batch",
        "1",
        "--json",
    ]);
    let j: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    assert_eq!(code, 1, "no trustworthy level: {err}");
    status_matches(code, &j);
    let l = &j["levels"][0];
    assert_eq!(l["trustworthy"], false);
    let reasons: Vec<&str> = l["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("scheduled batches unsent at the deadline")),
        "{reasons:?}"
    );

    let (code, out, _) = vcmdq(&[
        "--secs",
        "0.1",
        "--loads",
        "100",
        "--saturation",
        "1e9",
        "--batch",
        "1",
    ]);
    assert_eq!(code, 1);
    assert!(
        out.contains("level 100%: NOT the engine's latency: "),
        "{out}"
    );
    assert!(
        out.contains("scheduled batches unsent at the deadline"),
        "{out}"
    );
    assert!(out.contains("no level is the engine's latency"), "{out}");
}
