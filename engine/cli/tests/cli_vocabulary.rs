//! One option vocabulary across the subcommands: every `--help` offers the shared names (and
//! none of the retired ones), and every flag that takes a count or a duration reads the shared
//! unit forms (README: "Options every subcommand shares").

use std::process::{Command, Output, Stdio};

fn bin() -> String {
    std::env::var("VCMDQ_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_vcmdq").to_string())
}

fn vcmdq(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the vcmdq binary runs")
}

const SUBCOMMANDS: &[&[&str]] = &[
    &["decode"],
    &["encode"],
    &["translate"],
    &["replay"],
    &["trace", "dump"],
    &["trace", "build"],
    &["trace", "info"],
    &["trace", "import-qemu"],
    &["gen"],
    &["soak"],
    &["serve"],
    &["guest"],
    &["loadtest"],
];

/// The long options a subcommand's `--help` lists (the first `--name` of each option line).
fn options(sub: &[&str]) -> Vec<String> {
    let mut a = sub.to_vec();
    a.push("--help");
    let o = vcmdq(&a);
    assert!(o.status.success(), "{sub:?} --help failed");
    let text = String::from_utf8(o.stdout).unwrap();
    text.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            // `-o, --output`: the long name after the short one.
            let l = match l.split_once(", ") {
                Some((short, long)) if short.len() == 2 && !short.starts_with("--") => long,
                _ => l,
            };
            let name = l.strip_prefix("--")?;
            let end = name
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .unwrap_or(name.len());
            Some(format!("--{}", &name[..end]))
        })
        .collect()
}

#[test]
fn no_subcommand_offers_a_retired_spelling() {
    for sub in SUBCOMMANDS {
        let opts = options(sub);
        for retired in [
            "--ring-log2size",
            "--hw-thread",
            "--secs",
            "--progress-secs",
            "--max-wall-secs",
        ] {
            assert!(
                !opts.iter().any(|o| o == retired),
                "{sub:?} lists {retired}: {opts:?}"
            );
        }
        for o in &opts {
            assert!(
                !o.contains("log2size") || o == "--log2size" || o == "--phys-log2size",
                "{sub:?}: a ring size is --log2size (guest rings) or --phys-log2size, not {o}"
            );
        }
    }
}

#[test]
fn the_shared_names_are_where_each_subcommand_takes_the_option() {
    let has = |sub: &[&str], names: &[&str]| {
        let opts = options(sub);
        for n in names {
            assert!(
                opts.iter().any(|o| o == n),
                "{sub:?} does not list {n}: {opts:?}"
            );
        }
        opts
    };
    has(&["gen"], &["--commands", "--log2size"]);
    has(&["guest"], &["--commands", "--batch"]);
    has(
        &["soak"],
        &[
            "--commands",
            "--duration",
            "--log2size",
            "--hardware",
            "--batch-limit",
            "--progress",
        ],
    );
    has(
        &["serve"],
        &[
            "--duration",
            "--phys-log2size",
            "--hardware",
            "--batch-limit",
            "--progress",
        ],
    );
    has(&["loadtest"], &["--duration", "--batch"]);
    has(&["translate"], &["--no-range"]);
    has(&["replay"], &["--max-wall", "--batch-limit"]);
    // --batch is the guest's batch size; the engine's cap is --batch-limit.
    for sub in [&["serve"][..], &["replay"], &["soak"]] {
        let opts = has(sub, &["--batch-limit"]);
        assert!(
            !opts.iter().any(|o| o == "--batch"),
            "{sub:?} lists --batch: {opts:?}"
        );
    }
}

fn dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vcmdq-vocabulary-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn counts_take_k_m_g_exponents_and_underscores_in_gen_guest_and_soak() {
    let out = dir().join("gen.vct");
    let out = out.to_str().unwrap();
    for n in ["2k", "2e3", "2_000"] {
        let o = vcmdq(&["gen", "dma-unmap", "--commands", n, "-o", out, "--json"]);
        assert!(
            o.status.success(),
            "gen --commands {n}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let o = vcmdq(&["gen", "dma-unmap", "--commands", "5X", "-o", out]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("5M") && err.contains("1e6"),
        "{err}"
    );
    // guest: the count parses, so what fails is the missing ring, not the value.
    let o = vcmdq(&["guest", "/nonexistent/ring", "--commands", "1M"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !err.contains("--commands"), "{err}");
    let o = vcmdq(&[
        "soak",
        "--commands",
        "2k",
        "--rings",
        "1",
        "--viommus",
        "1",
        "--progress",
        "0",
    ]);
    assert!(
        o.status.success(),
        "soak --commands 2k: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn durations_take_units_in_serve_soak_and_loadtest() {
    let serve = |extra: &[&str]| {
        let mut a = vec![
            "serve",
            "--viommu",
            "id=1,vmid=5,smmu=0",
            "--create-ring",
            "viommu=1",
        ];
        a.extend(extra);
        vcmdq(&a)
    };
    for args in [
        &["--duration", "10ms"][..],
        &["--duration", "0.01"],
        &["--duration", "10ms", "--hardware", "thread"],
        &["--duration", "10ms", "--progress", "5ms"],
        &["--duration", "10ms", "--progress"],
    ] {
        let o = serve(args);
        assert!(
            o.status.success(),
            "serve {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let o = vcmdq(&[
        "soak",
        "--duration",
        "10ms",
        "--rings",
        "1",
        "--viommus",
        "1",
        "--progress",
        "0",
    ]);
    assert!(
        o.status.success(),
        "soak --duration 10ms: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = vcmdq(&[
        "loadtest",
        "--duration",
        "10ms",
        "--saturation",
        "1e6",
        "--loads",
        "10",
    ]);
    // 0 or 1: the run happened (1 says no level was the engine's latency, as a 10 ms level on
    // a shared machine may well not be); 2 would be the value refused.
    assert!(
        matches!(o.status.code(), Some(0 | 1)),
        "loadtest --duration 10ms: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // guest --timeout: the duration parses, so what fails is the missing ring, not the value.
    let o = vcmdq(&["guest", "/nonexistent/ring", "--timeout", "500ms"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !err.contains("--timeout"), "{err}");
    for sub in [
        &["serve"][..],
        &["soak"],
        &["loadtest"],
        &["guest", "/nonexistent/ring"],
    ] {
        let mut a = sub.to_vec();
        let flag = if sub[0] == "guest" {
            "--timeout"
        } else {
            "--duration"
        };
        a.extend([flag, "10 fortnights"]);
        let o = vcmdq(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("500ms") && err.contains("bare number"),
            "{sub:?}: {err}"
        );
    }
}

#[test]
fn retired_spellings_still_work_for_scripts() {
    let o = vcmdq(&[
        "serve",
        "--viommu",
        "id=1,vmid=5,smmu=0",
        "--create-ring",
        "viommu=1",
        "--duration",
        "10ms",
        "--hw-thread",
        "--batch",
        "8",
    ]);
    assert!(
        o.status.success(),
        "serve --hw-thread --batch: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = vcmdq(&[
        "soak",
        "--commands",
        "1000",
        "--rings",
        "1",
        "--viommus",
        "1",
        "--ring-log2size",
        "6",
        "--progress-secs",
        "0",
        "--batch",
        "8",
    ]);
    assert!(
        o.status.success(),
        "soak's old spellings: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = vcmdq(&[
        "loadtest",
        "--secs",
        "0.01",
        "--saturation",
        "1e6",
        "--loads",
        "10",
    ]);
    // 0 or 1: the run happened (1 says no level was the engine's latency, as a 10 ms level on
    // a shared machine may well not be); 2 would be the value refused.
    assert!(
        matches!(o.status.code(), Some(0 | 1)),
        "loadtest --secs: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn gen_trace_build_and_import_write_the_trace_to_standard_output_with_o_dash_or_without_o() {
    let d = dir();
    let file = d.join("to-file.vct");
    let f = file.to_str().unwrap();
    let o = vcmdq(&["gen", "ats", "--commands", "1k", "-o", f]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = std::fs::read(&file).unwrap();
    // Standard output here is a pipe, not a terminal: no -o means standard output.
    for args in [
        &["gen", "ats", "--commands", "1k", "-o", "-"][..],
        &["gen", "ats", "--commands", "1k"],
    ] {
        let o = vcmdq(args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            o.stdout, want,
            "{args:?} wrote another trace to standard output"
        );
    }
    // A trace and JSON cannot share standard output.
    let o = vcmdq(&["gen", "ats", "--commands", "1k", "-o", "-", "--json"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("-o FILE"), "{err}");
    // trace dump | trace build gives the same bytes, through standard output.
    let dump = vcmdq(&["trace", "dump", f]);
    assert!(dump.status.success());
    let mut build = Command::new(bin())
        .args(["trace", "build", "-o", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    build.stdin.take().unwrap().write_all(&dump.stdout).unwrap();
    let built = build.wait_with_output().unwrap();
    assert!(built.status.success());
    assert_eq!(built.stdout, want, "trace build -o - wrote another trace");
    let qemu = concat!(env!("CARGO_MANIFEST_DIR"), "/../../traces/qemu-sample.log");
    let o = vcmdq(&["trace", "import-qemu", qemu]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../traces/qemu-sample.vct"
    ))
    .unwrap();
    assert_eq!(o.stdout, want, "trace import-qemu without -o");
}

#[test]
fn sizes_in_bytes_take_binary_units_and_refuse_decimal_ones() {
    let t = concat!(env!("CARGO_MANIFEST_DIR"), "/../../traces/mixed.vct");
    // Its rings need less than 64 KiB: 1KiB is refused naming the limit, 64KiB replays.
    let o = vcmdq(&["replay", t, "--max-ring-memory", "1KiB"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "1KiB accepted: {err}");
    assert!(err.contains("1024"), "{err}");
    let o = vcmdq(&["replay", t, "--max-ring-memory", "64KiB"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = vcmdq(&["replay", t, "--max-ring-memory", "256MB"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("say KiB, MiB, GiB"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
