//! `vcmdq trace` and `vcmdq gen` as a person runs them: exit statuses, messages, files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn vcmdq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vcmdq"))
        .args(args)
        .output()
        .unwrap()
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vcmdq-cli-trace-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn bundled(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../traces")
        .join(name)
}

#[test]
fn gen_defaults_reproduce_the_bundled_trace() {
    let d = tmpdir("gen");
    let out = d.join("hostile.vct");
    let o = vcmdq(&["gen", "hostile", "-o", s(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(bundled("hostile.vct")).unwrap()
    );
    let o = vcmdq(&["gen", "hostile", "-o", s(&out), "--log2size", "1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("log2size=1 is out of range"));
    let o = vcmdq(&["gen", "nonsense", "-o", s(&out)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("workloads: dma-unmap"));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn dump_build_info_round_trip_through_files() {
    let d = tmpdir("rt");
    let src = bundled("mixed.vct");
    let o = vcmdq(&["trace", "dump", s(&src)]);
    assert!(o.status.success());
    let text = d.join("mixed.txt");
    std::fs::write(&text, &o.stdout).unwrap();
    let built = d.join("mixed.vct");
    let o = vcmdq(&["trace", "build", s(&text), "-o", s(&built)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&built).unwrap(), std::fs::read(&src).unwrap());
    let o = vcmdq(&["trace", "info", s(&built), "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["commands"], 10272);
    assert_eq!(v["synthetic"], true);
    let o = vcmdq(&["trace", "info", s(&built)]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("GuestFix"));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn damaged_inputs_exit_1_with_the_place() {
    let d = tmpdir("bad");
    let mut bytes = std::fs::read(bundled("qemu-sample.vct")).unwrap();
    bytes.truncate(bytes.len() - 4);
    let bad = d.join("cut.vct");
    std::fs::write(&bad, &bytes).unwrap();
    for sub in ["info", "dump"] {
        let o = vcmdq(&["trace", sub, s(&bad)]);
        assert_eq!(o.status.code(), Some(1), "{sub}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!("{}: offset ", bad.display())),
            "{err}"
        );
        assert!(err.contains("remain in the file"), "{err}");
    }
    // A text that does not build leaves no output behind, not even a partial one.
    let text = d.join("bad.txt");
    std::fs::write(&text, "@1 doorbell ring=0 prod=1\n@2 nonsense\n").unwrap();
    let out = d.join("out.vct");
    let o = vcmdq(&["trace", "build", s(&text), "-o", s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("line 2: unknown event"));
    assert!(!out.exists());
    assert!(!d.join("out.vct.tmp").exists());
    // A missing file is an I/O error: exit 2.
    let o = vcmdq(&["trace", "info", s(&d.join("missing.vct"))]);
    assert_eq!(o.status.code(), Some(2));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn import_qemu_writes_the_bundled_sample() {
    let d = tmpdir("qemu");
    let out = d.join("q.vct");
    let o = vcmdq(&[
        "trace",
        "import-qemu",
        s(&bundled("qemu-sample.log")),
        "-o",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("1 fixes, 1 acks, 1 errors"));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(bundled("qemu-sample.vct")).unwrap()
    );
    let log = d.join("empty.log");
    std::fs::write(&log, "nothing\n").unwrap();
    let o = vcmdq(&["trace", "import-qemu", s(&log), "-o", s(&d.join("e.vct"))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!d.join("e.vct").exists());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn gen_prints_a_human_summary_not_debug_output_and_json_on_request() {
    let d = tmpdir("gen-summary");
    let out = vcmdq(&["gen", "hostile", "-o", s(&d.join("h.vct"))]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("GenParams") && !err.contains('{'), "{err}");
    assert!(
        err.contains("hostile workload, 3 VMs x 4 devices x 1 ring of 2^6 entries, seed 6")
            && err.contains("3043 ring entries"),
        "{err}"
    );
    let out = vcmdq(&["gen", "hostile", "--json", "-o", s(&d.join("h.vct"))]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["ring_entries"], 3043);
    assert_eq!(j["workload"], "hostile");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn gen_refuses_parameters_whose_rings_or_commands_exceed_their_limits() {
    let d = tmpdir("gen-limits");
    let o = d.join("x.vct");
    // 4096 VMs x 16 rings x 2^19 entries: 512 GiB of rings.
    let out = vcmdq(&[
        "gen",
        "mixed",
        "--vms",
        "4096",
        "--rings",
        "16",
        "--log2size",
        "19",
        "-o",
        s(&o),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("549755813888") && err.contains("--max-ring-memory"),
        "{err}"
    );
    let out = vcmdq(&["gen", "mixed", "--commands", "50000000", "-o", s(&o)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--max-commands"), "{err}");
    assert!(
        !o.exists(),
        "nothing is written when parameters are refused"
    );
    // The flag raises the limit.
    let out = vcmdq(&[
        "gen",
        "hostile",
        "--log2size",
        "19",
        "--max-ring-memory",
        "30000000",
        "-o",
        s(&o),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = vcmdq(&[
        "gen",
        "hostile",
        "--log2size",
        "19",
        "--max-ring-memory",
        "20000000",
        "-o",
        s(&o),
    ]);
    assert_eq!(out.status.code(), Some(2));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn import_qemu_warns_on_stderr_and_in_json() {
    let d = tmpdir("import-warn");
    let out = vcmdq(&[
        "trace",
        "import-qemu",
        s(&bundled("qemu-sample.log")),
        "-o",
        s(&d.join("q.vct")),
        "--json",
    ]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning") && err.contains("skipped 1 line(s): not an smmuv3_* event"),
        "{err}"
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["skipped"]["not an smmuv3_* event"], 1);
    assert!(!j["warnings"].as_array().unwrap().is_empty());
    // A refusal names the line.
    let bad = d.join("bad.log");
    std::fs::write(
        &bad,
        std::fs::read_to_string(bundled("qemu-sample.log"))
            .unwrap()
            .replacen("tg=1", "tg=7", 1),
    )
    .unwrap();
    let out = vcmdq(&["trace", "import-qemu", s(&bad), "-o", s(&d.join("b.vct"))]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("line 23:") && err.contains("tg=7"), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn build_refuses_endless_text_at_its_limit() {
    use std::io::Write;
    use std::process::Stdio;
    let d = tmpdir("build-endless");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vcmdq"))
        .args([
            "trace",
            "build",
            "--max-text-bytes",
            "100000",
            "-o",
            s(&d.join("z.vct")),
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A stream of zeros longer than the limit, as `< /dev/zero` gives; the build stops reading
    // at the limit, so the write may see a closed pipe.
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(&vec![0u8; 300_000]);
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("more than 100000 bytes of text") && err.contains("--max-text-bytes"),
        "{err}"
    );
    assert!(!d.join("z.vct").exists());
    std::fs::remove_dir_all(&d).unwrap();
}
