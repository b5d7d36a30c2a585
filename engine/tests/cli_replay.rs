//! `vcmdq replay` as a person runs it: the summary, JSON, and a damaged trace refused with its
//! offset.

mod common;

use common::vcmdq;
use serde_json::Value;
use std::path::PathBuf;

fn trace(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../traces")
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
    assert_eq!(j["expect_ok"], Value::Bool(true));
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
