//! Capture: a replay captured by the engine replays to the same outcomes as the trace it came
//! from, and what it costs is each poll's copy.
#![cfg(not(loom))]

use vcmdq::replay::{replay, ReplayOptions};
use vcmdq::trace::{validate, TraceFile};

fn outcomes_of(
    path: &std::path::Path,
    capture: Option<std::path::PathBuf>,
) -> vcmdq::replay::ReplayReport {
    let f = TraceFile::open(path).unwrap();
    let t = f.trace().unwrap();
    let r = replay(
        &t,
        &ReplayOptions {
            capture,
            ..Default::default()
        },
        |_| {},
    )
    .unwrap();
    assert!(
        r.ok(),
        "{}: {:?} {:?}",
        path.display(),
        r.mismatches,
        r.invariant_failures
    );
    r
}

#[test]
fn a_captured_replay_replays_to_the_same_outcomes() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../traces");
    for name in ["hostile.vct", "hot-unplug.vct", "qemu-sample.vct"] {
        let dir = std::env::temp_dir().join(format!("vcmdq-capture-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join(name);
        let original = outcomes_of(&root.join(name), Some(out.clone()));
        let f = TraceFile::open(&out).unwrap();
        let summary = validate(&f.trace().unwrap()).unwrap();
        assert_eq!(
            summary.commands, original.commands,
            "{name}: every entry captured once"
        );
        let again = outcomes_of(&out, None);
        assert_eq!(again.outcomes, original.outcomes, "{name}");
        assert_eq!(again.per_viommu, original.per_viommu, "{name}");
        std::fs::remove_file(&out).unwrap();
    }
}
