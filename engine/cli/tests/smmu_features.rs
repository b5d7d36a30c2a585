//! A trace records its vIOMMUs' SMMU features, and a replay applies them: the same commands on
//! an SMMU without ATS have their ATC_INV refused.

use std::process::Command;

fn vcmdq(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vcmdq"))
        .args(args)
        .output()
        .unwrap()
}

const TRACE: &str = "\
trace version=1 created=0
@0 viommu 0 vmid=1 smmu=0 profile=kernel sidsize=16 range FEATURES
@0 device 1 smmu=0 psid=0x10
@0 bind viommu=0 device=1 vsid=0x10
@0 ring 0 viommu=0 log2size=3
@100000 cmd ring=0 slot=0 TLBI_NH_ASID vmid=0 asid=1
@100000 cmd ring=0 slot=1 ATC_INV sid=0x10 size=52
@100000 doorbell ring=0 prod=2
";

fn replay(features: &str) -> serde_json::Value {
    let d = std::env::temp_dir().join(format!("vcmdq-smmu-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let name = if features.is_empty() { "any" } else { "set" };
    let (txt, vct) = (d.join(format!("{name}.txt")), d.join(format!("{name}.vct")));
    std::fs::write(&txt, TRACE.replace(" FEATURES", features)).unwrap();
    let o = vcmdq(&[
        "trace",
        "build",
        txt.to_str().unwrap(),
        "-o",
        vct.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The dump shows the features as written.
    let o = vcmdq(&["trace", "dump", vct.to_str().unwrap()]);
    let dump = String::from_utf8(o.stdout).unwrap();
    assert_eq!(
        dump.contains(" features=qemu"),
        !features.is_empty(),
        "{dump}"
    );
    let o = vcmdq(&["replay", vct.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn a_replay_applies_the_smmu_features_its_trace_records() {
    let any = replay("");
    assert_eq!(any["outcomes"]["forwarded"], 2);
    let qemu = replay(" features=qemu");
    assert_eq!(qemu["oracle_ok"], true);
    assert_eq!(qemu["outcomes"]["forwarded"], 1);
    assert_eq!(qemu["outcomes"]["refused_by_reason"]["AtsUnsupported"], 1);
}
