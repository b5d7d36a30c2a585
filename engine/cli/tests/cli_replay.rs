//! `vcmdq replay` as a person runs it: the summary, JSON, and a damaged trace refused with its
//! offset.

mod common;

use common::vcmdq;
use serde_json::Value;
use std::path::PathBuf;

fn trace(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../traces")
        .join(name)
}

#[test]
fn json_summary_has_outcomes_and_latency_per_viommu() {
    let t = trace("hostile.vct");
    let out = vcmdq(&["replay", t.to_str().unwrap(), "--json"], "");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    let j: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(j["oracle_ok"], Value::Bool(true));
    assert_eq!(j["expect_ok"], Value::Null, "no --expect: nothing compared");
    let per = j["per_viommu"].as_object().unwrap();
    let lat = j["latency_per_viommu"].as_object().unwrap();
    assert_eq!(per.len(), 3);
    for v in per.keys() {
        assert!(
            lat[v]["doorbell_to_publish"]["p50_ns"].as_u64().unwrap() > 0,
            "{v}"
        );
    }
    assert!(j["outcomes"]["refused"].as_u64().unwrap() > 0);
}

#[test]
fn an_expectation_that_differs_fails_and_a_damaged_trace_names_its_offset() {
    let dir = std::env::temp_dir().join(format!("vcmdq-cli-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A summary that does not match: exit 1.
    let wrong = dir.join("wrong.json");
    std::fs::write(&wrong, "{\"commands\": 1}").unwrap();
    let t = trace("qemu-sample.vct");
    let out = vcmdq(
        &[
            "replay",
            t.to_str().unwrap(),
            "--expect",
            wrong.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("summary differs"));
    // A truncated trace: exit 2, the file and the offset named.
    let bytes = std::fs::read(&t).unwrap();
    let cut = dir.join("cut.vct");
    std::fs::write(&cut, &bytes[..bytes.len() - 5]).unwrap();
    let out = vcmdq(&["replay", cut.to_str().unwrap()], "");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cut.vct") && err.contains("offset"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `vcmdq args`, killing it and failing with `what` if it has not ended within `secs`.
fn vcmdq_within(secs: u64, what: &str, args: &[&str]) -> std::process::Output {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_vcmdq"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vcmdq");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().expect("wait for vcmdq").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vcmdq {args:?} did not end within {secs} s: {what}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect vcmdq's output")
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("vcmdq-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    /// Builds `text` (the text form, not validated) into a trace file here.
    fn trace(&self, name: &str, text: &str) -> PathBuf {
        let bytes = vcmdq_trace::text::build_unvalidated(text, std::io::Cursor::new(Vec::new()))
            .unwrap()
            .into_inner();
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn speeds_of_zero_negative_nan_or_vanishing_are_refused_up_front() {
    let t = trace("hostile.vct");
    for s in ["0", "-1", "NaN", "1e-9", "inf"] {
        let out = vcmdq_within(
            30,
            "a bad --speed must be refused, not replayed",
            &["replay", t.to_str().unwrap(), "--speed", s],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--speed {s}: {err}");
        assert!(err.contains("0.001 to 1000"), "--speed {s}: {err}");
    }
}

#[test]
fn a_paced_replay_of_timestamps_near_two_to_the_64_is_refused_before_it_starts() {
    let d = TempDir::new("pace");
    let t = d.trace(
        "far.vct",
        "@0 viommu 1 vmid=1 smmu=0 profile=kernel sidsize=16\n\
         @0 ring 2 viommu=1 log2size=2\n\
         @1 cmd ring=2 slot=0 CMD_SYNC\n\
         @18446744073709551000 doorbell ring=2 prod=1\n",
    );
    let out = vcmdq_within(
        30,
        "a paced replay of a 584-year trace must be refused, not slept through",
        &["replay", t.to_str().unwrap(), "--speed", "1"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--max-wall") && err.contains("18446744073709551000 ns"),
        "{err}"
    );
    // As fast as possible, the same trace replays.
    let out = vcmdq_within(60, "an unpaced replay", &["replay", t.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn info_dump_and_replay_refuse_an_invalid_trace_with_the_same_message() {
    let d = TempDir::new("same-message");
    let cases = [
        // An ack on a ring that never stopped.
        "@0 viommu 1 vmid=1 smmu=0 profile=kernel sidsize=16\n@0 ring 2 viommu=1 log2size=2\n@1 ack ring=2\n",
        // A bind the control plane refuses (EINVAL: another SMMU).
        "@0 viommu 1 vmid=1 smmu=0 profile=kernel sidsize=16\n@0 device 3 smmu=1 psid=0x10\n@1 bind viommu=1 device=3 vsid=1\n",
        // A second vIOMMU with the same id (EEXIST).
        "@0 viommu 1 vmid=1 smmu=0 profile=kernel sidsize=16\n@0 viommu 1 vmid=2 smmu=0 profile=kernel sidsize=16\n",
        // Unbinding a device never bound (ENOENT).
        "@0 viommu 1 vmid=1 smmu=0 profile=kernel sidsize=16\n@0 device 3 smmu=0 psid=0x10\n@1 unbind viommu=1 device=3\n",
        // A slot beyond its ring.
        "@0 viommu 1 vmid=1 smmu=0 profile=kernel sidsize=16\n@0 ring 2 viommu=1 log2size=2\n@1 cmd ring=2 slot=8 CMD_SYNC\n",
    ];
    for (i, text) in cases.iter().enumerate() {
        let t = d.trace(&format!("bad{i}.vct"), text);
        let p = t.to_str().unwrap();
        let mut messages = Vec::new();
        for args in [
            vec!["trace", "info", p],
            vec!["trace", "dump", p],
            vec!["replay", p],
        ] {
            let out = vcmdq_within(60, "an invalid trace must be refused", &args);
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            assert!(!out.status.success(), "{args:?} accepted {text}");
            assert!(
                out.stdout.is_empty() || args[0] == "trace" && args[1] == "info",
                "{args:?}"
            );
            assert!(
                err.contains(" record ") && err.contains(" at offset "),
                "{args:?}: {err}"
            );
            messages.push(err.trim_start_matches("vcmdq: ").to_string());
        }
        assert!(
            messages.iter().all(|m| m == &messages[0]),
            "case {i}: {messages:#?}"
        );
    }
}

#[test]
fn an_expected_summary_pins_every_forwarded_byte_through_its_digest() {
    let d = TempDir::new("digest");
    let t = trace("hostile.vct");
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(trace("hostile.expected.json")).unwrap())
            .unwrap();
    let digests = want["forwarded_digest"]
        .as_object()
        .expect("a digest per ring");
    assert_eq!(digests.len(), 3);
    // One bit of one ring's digest changed: the replay no longer matches.
    let mut wrong = want.clone();
    let (ring, d0) = digests.iter().next().unwrap();
    let flipped = u64::from_str_radix(d0.as_str().unwrap(), 16).unwrap() ^ 1;
    wrong["forwarded_digest"][ring] = Value::String(format!("{flipped:016x}"));
    let path = d.0.join("wrong.json");
    std::fs::write(&path, serde_json::to_string(&wrong).unwrap()).unwrap();
    let out = vcmdq_within(
        60,
        "replay --expect",
        &[
            "replay",
            t.to_str().unwrap(),
            "--expect",
            path.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    // The digest does not depend on the number of workers.
    for workers in ["1", "3"] {
        let out = vcmdq_within(
            60,
            "replay --json",
            &[
                "replay",
                t.to_str().unwrap(),
                "--json",
                "--workers",
                workers,
            ],
        );
        let j: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            j["forwarded_digest"], want["forwarded_digest"],
            "--workers {workers}"
        );
    }
}

#[test]
fn a_trace_declaring_more_ring_memory_than_allowed_is_refused_and_the_flag_raises_it() {
    let d = TempDir::new("ring-memory");
    let t = d.trace(
        "rings.vct",
        "@0 viommu 1 vmid=1 smmu=0 profile=kernel sidsize=16\n\
         @0 ring 2 viommu=1 log2size=12\n\
         @0 ring 3 viommu=1 log2size=12\n",
    );
    let p = t.to_str().unwrap();
    // Two rings of 2^12 entries: 128 KiB of slots.
    let out = vcmdq_within(60, "replay", &["replay", p, "--max-ring-memory", "100000"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("record 2 at offset") && err.contains("--max-ring-memory"),
        "{err}"
    );
    let out = vcmdq_within(60, "replay", &["replay", p, "--max-ring-memory", "131072"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_imported_qemu_trace_replays_closed_loop_by_default_and_says_so() {
    let t = trace("qemu-sample.vct");
    let out = vcmdq(&["replay", t.to_str().unwrap()], "");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("  mode: closed-loop (each ring waited for its CMD_SYNCs"),
        "{stdout}"
    );
    assert!(stdout.contains("what the guest would feel"), "{stdout}");
    // --open-loop overrides the header; JSON names the mode.
    let out = vcmdq(
        &["replay", t.to_str().unwrap(), "--open-loop", "--json"],
        "",
    );
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["mode"], "open-loop");
    assert_eq!(j["sync_waits"], 0);
    // A synthetic trace: open loop unless asked.
    let t = trace("mixed.vct");
    let out = vcmdq(&["replay", t.to_str().unwrap()], "");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("  mode: open-loop"), "{stdout}");
    let out = vcmdq(
        &["replay", t.to_str().unwrap(), "--closed-loop", "--json"],
        "",
    );
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["mode"], "closed-loop");
    assert_eq!(j["oracle_ok"], true);
}
