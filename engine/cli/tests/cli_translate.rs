//! `vcmdq translate` as a person runs it: commands on stdin, one result per line.

mod common;

use common::vcmdq;
use serde_json::Value;

fn run(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut a = vec!["translate"];
    a.extend_from_slice(args);
    let out = vcmdq(&a, stdin);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn json(args: &[&str], stdin: &str) -> Vec<Value> {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let (code, out, err) = run(&a, stdin);
    let v: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    // Exit status 1 exactly when a command was refused.
    let refused = v.iter().any(|o| o["outcome"] == "refused");
    assert_eq!(code, i32::from(refused), "stderr: {err}");
    v
}

const INPUT: &str = "\
# a guest batch
TLBI_NH_ALL vmid=9
0x0000001000000040 0x34
PREFETCH_CONFIG sid=0x10

CFGI_STE sid=0x10
CMD_SYNC cs=1 msidata=0x77 msiaddr=0x1000
ATC_INV sid=0x12 size=52
TLBI_NH_ASID asid=1
";

#[test]
fn every_line_gets_its_outcome() {
    let v = json(&["--vmid", "5", "--bind", "vsid=0x10,psid=0x800"], INPUT);
    assert_eq!(v.len(), 7);
    let outcomes: Vec<&str> = v.iter().map(|o| o["outcome"].as_str().unwrap()).collect();
    assert_eq!(
        outcomes,
        [
            "forwarded",
            "forwarded",
            "dropped",
            "trapped",
            "sync",
            "refused",
            "not_reached"
        ]
    );
    for (i, o) in v.iter().enumerate() {
        assert_eq!(o["slot"], i);
    }
    assert_eq!(v[0]["line"], 2);
    assert_eq!(v[0]["out"][0], "0x0000000500000010");
    assert_eq!(v[0]["out"][1], "0x0000000000000000");
    assert_eq!(v[1]["out"][0], "0x0000080000000040");
    assert_eq!(v[1]["out"][1], "0x0000000000000034");
    assert_eq!(v[4]["msiaddr"], "0x1000");
    assert_eq!(v[5]["cerror"], "ILL");
    assert!(v[5]["reason"].as_str().unwrap().contains("vSID 0x12"));
    assert!(v[6].get("out").is_none());
}

#[test]
fn continue_goes_past_a_refusal() {
    let v = json(
        &[
            "--vmid",
            "5",
            "--bind",
            "vsid=0x10,psid=0x800",
            "--continue",
        ],
        INPUT,
    );
    assert_eq!(v[6]["outcome"], "forwarded");
    assert_eq!(v[6]["out"][0], "0x0001000500000011");
}

#[test]
fn profile_and_range_flags() {
    let input = "TLBI_NH_ALL\nTLBI_NH_VA asid=1 addr=0x1000 tg=4k ttl=3\n";
    let v = json(
        &["--vmid", "5", "--profile", "tegra241", "--continue"],
        input,
    );
    assert_eq!(v[0]["outcome"], "refused");
    assert!(v[0]["reason"].as_str().unwrap().contains("profile"));
    assert_eq!(v[1]["outcome"], "forwarded");
    let v = json(&["--vmid", "5", "--no-range"], input);
    assert_eq!(v[0]["outcome"], "forwarded");
    assert_eq!(v[1]["outcome"], "refused");
    assert!(v[1]["reason"].as_str().unwrap().contains("range"));
}

#[test]
fn bindings_file() {
    let dir = std::env::temp_dir().join(format!("vcmdq-cli-translate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bindings");
    std::fs::write(
        &f,
        "# vSID -> pSID\nvsid=0x10,psid=0x800\nvsid=0x11, psid=0x801\n",
    )
    .unwrap();
    let v = json(
        &["--vmid", "1", "--bindings", f.to_str().unwrap()],
        "CFGI_CD_ALL sid=0x11\n",
    );
    assert_eq!(v[0]["out"][0], "0x0000080100000006");
    std::fs::write(&f, "vsid=0x10\n").unwrap();
    let (code, _, err) = run(&["--vmid", "1", "--bindings", f.to_str().unwrap()], "");
    assert_eq!(code, 2);
    assert!(err.contains(":1:"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn errors_are_named() {
    let (code, _, err) = run(
        &[
            "--vmid",
            "1",
            "--sidsize",
            "8",
            "--bind",
            "vsid=0x100,psid=1",
        ],
        "",
    );
    assert_eq!(code, 2);
    assert!(err.contains("EINVAL"), "{err}");
    let (code, _, err) = run(
        &[
            "--vmid",
            "1",
            "--bind",
            "vsid=1,psid=1",
            "--bind",
            "vsid=1,psid=2",
        ],
        "",
    );
    assert_eq!(code, 2);
    assert!(err.contains("EEXIST"), "{err}");
    let (code, _, err) = run(&["--vmid", "1"], "TLBI_NH_ALL\nnonsense here\n");
    assert_eq!(code, 2);
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn text_output_names_each_slot() {
    let (code, out, _) = run(&["--vmid", "5", "--bind", "vsid=0x10,psid=0x800"], INPUT);
    assert_eq!(code, 1, "slot 5 is refused");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 7);
    assert!(lines[0].contains("forwarded") && lines[0].contains("TLBI_NH_ALL vmid=5"));
    assert!(lines[5].contains("CERROR_ILL"));
    assert!(lines[6].contains("not reached"));
}

/// Each rule of the range encoding and of the SMMU's features is shown with its reason.
#[test]
fn smmu_presets_and_range_rules_show_each_refusals_reason() {
    let input = "\
TLBI_NH_VAA addr=0x1000 ttl=2
TLBI_NH_VA asid=1 addr=0x1000 tg=4k
TLBI_NH_VA asid=1 addr=0x1000 tg=16k ttl=1
TLBI_NH_VA asid=0x100 addr=0x1000 tg=4k ttl=3
ATC_INV sid=0x10 ssv ssid=3 size=52
CFGI_CD sid=0x10 ssid=3
";
    let v = json(
        &[
            "--vmid",
            "5",
            "--smmu",
            "qemu",
            "--bind",
            "vsid=0x10,psid=0x800",
            "--continue",
        ],
        input,
    );
    let reasons: Vec<&str> = v
        .iter()
        .map(|o| o["reason"].as_str().unwrap_or(""))
        .collect();
    for (r, want) in reasons.iter().zip([
        "TTL set with TG=0",
        "NUM=SCALE=TTL=0, a reserved combination",
        "TTL=1, a level the 16K granule cannot have",
        "",
        "no ATS",
        "no substreams",
    ]) {
        assert!(r.contains(want), "{r:?} lacks {want:?}");
    }
    // QEMU's SMMUv3 has 16-bit ASIDs: slot 3 is forwarded.
    assert_eq!(v[3]["outcome"], "forwarded");
    let v = json(
        &["--vmid", "5", "--smmu", "mmu-600"],
        "TLBI_NH_VA asid=1 addr=0x1000 tg=4k ttl=3\n",
    );
    assert!(v[0]["reason"]
        .as_str()
        .unwrap()
        .contains("no range invalidation"));
}
