//! `vcmdq serve` and `vcmdq guest` as two processes sharing rings: serve creates sealed memfd
//! rings (or attaches ring files), prints their paths, guests in other processes open them and
//! drive workloads; both sides' counts must agree.
#![cfg(not(loom))]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vcmdq");

/// The host side both tests use: vIOMMU 1 with devices 1 and 2 as vSIDs 0x10 and 0x11, and
/// vIOMMU 2 (tegra241) with device 3 as vSID 0x10.
const HOST: &[&str] = &[
    "--viommu",
    "id=1,vmid=5,smmu=0",
    "--viommu",
    "id=2,vmid=6,smmu=0,profile=tegra241,sidsize=16",
    "--device",
    "id=1,smmu=0,psid=0x800",
    "--device",
    "id=2,smmu=0,psid=0x801",
    "--device",
    "id=3,smmu=0,psid=0x900",
    "--bind",
    "viommu=1,device=1,vsid=0x10",
    "--bind",
    "viommu=1,device=2,vsid=0x11",
    "--bind",
    "viommu=2,device=3,vsid=0x10",
];

/// A running `vcmdq serve`: its stdin (closing it stops serve) and stdout.
struct Serve {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Serve {
    fn start(args: &[&str]) -> Serve {
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("vcmdq serve runs");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Serve { child, stdout }
    }

    /// The `ring N viommu=V log2size=L path=P` lines serve prints first: the paths.
    fn ring_paths(&mut self, n: usize) -> Vec<PathBuf> {
        (0..n)
            .map(|i| {
                let mut line = String::new();
                self.stdout.read_line(&mut line).unwrap();
                assert!(line.starts_with(&format!("ring {i} ")), "{line:?}");
                PathBuf::from(line.trim_end().split_once("path=").unwrap().1)
            })
            .collect()
    }

    /// Closes serve's stdin and returns its exit status, the rest of its stdout, and its
    /// stderr.
    fn stop(mut self) -> (i32, String, String) {
        drop(self.child.stdin.take());
        let mut out = String::new();
        self.stdout.read_to_string(&mut out).unwrap();
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let status = self.child.wait().unwrap();
        (status.code().unwrap_or(-1), out, err)
    }
}

fn guest(path: &PathBuf, args: &[&str]) -> Value {
    let out = Command::new(BIN)
        .arg("guest")
        .arg(path)
        .args(args)
        .arg("--json")
        .output()
        .expect("vcmdq guest runs");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "guest {args:?}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{stdout:?}: {e}"))
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

/// Three guest processes at once on three rings serve created: a DMA-unmap workload on the
/// tegra241 vIOMMU, an ATS one, and a hostile one whose refused commands the guest fixes. What
/// the guests saw and what serve counted agree entry for entry.
#[test]
fn guests_in_other_processes_drive_rings_serve_created() {
    let mut args = HOST.to_vec();
    args.extend([
        "--create-ring",
        "viommu=2,log2size=8",
        "--create-ring",
        "viommu=1",
        "--create-ring",
        "viommu=1,log2size=6",
        "--workers",
        "2",
        "--json",
    ]);
    let mut serve = Serve::start(&args);
    let paths = serve.ring_paths(3);
    assert!(paths.iter().all(|p| p.starts_with("/proc/")), "{paths:?}");
    let runs = [
        (
            &paths[0],
            vec![
                "--workload",
                "dma-unmap",
                "--commands",
                "3000",
                "--vsid",
                "0x10",
            ],
        ),
        (
            &paths[1],
            vec![
                "--workload",
                "ats",
                "--commands",
                "2000",
                "--batch",
                "31",
                "--vsid",
                "0x10",
                "--vsid",
                "0x11",
            ],
        ),
        (
            &paths[2],
            vec![
                "--workload",
                "hostile",
                "--commands",
                "1500",
                "--vsid",
                "0x10",
                "--vsid",
                "0x11",
                "--seed",
                "9",
            ],
        ),
    ];
    let reports: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = runs
            .iter()
            .map(|(p, a)| s.spawn(move || guest(p, a)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (code, out, err) = serve.stop();
    assert_eq!(code, 0, "{err}");
    let summary: Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out:?}: {e}"));

    assert_eq!(
        reports.iter().map(|r| n(r, "commands")).collect::<Vec<_>>(),
        [3000, 2000, 1500]
    );
    // dma-unmap and ats are well formed for their vIOMMUs: nothing refused.
    assert_eq!(n(&reports[0], "errors"), 0);
    assert_eq!(n(&reports[1], "errors"), 0);
    assert!(
        n(&reports[2], "errors") > 0,
        "the hostile guest was refused"
    );
    assert_eq!(n(&reports[0], "batches"), 3000u64.div_ceil(63));
    assert_eq!(n(&reports[1], "batches"), 2000u64.div_ceil(31));
    let sum = |k: &str| reports.iter().map(|r| n(r, k)).sum::<u64>();
    assert_eq!(n(&summary, "guest_syncs"), sum("syncs"));
    assert_eq!(n(&summary, "refused"), sum("errors"));
    // Every entry a guest wrote (a refused one rewritten as a CMD_SYNC) ended one way.
    assert_eq!(
        n(&summary, "forwarded")
            + n(&summary, "dropped")
            + n(&summary, "trapped")
            + n(&summary, "guest_syncs"),
        sum("entries")
    );
    assert!(
        n(&summary, "trapped") > 0,
        "serve completed the hostile guest's CFGI_STEs"
    );
    assert_eq!(n(&summary, "rings"), 3);
    assert_eq!(n(&summary, "phys_faults"), 0);
    for r in &reports {
        let lat = &r["sync_latency_ns"];
        assert!(n(lat, "p50") <= n(lat, "p99") && n(lat, "p99") <= n(lat, "max"));
    }
}

/// A ring file the guest side created, attached with --ring from a config file; serve refuses
/// it without --allow-unsealed. Serve ends by itself after --duration, and on SIGINT with its
/// summary.
#[test]
fn ring_files_config_files_duration_and_sigint() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cli-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ring = dir.join("guest.ring");
    let g = vcmdq::ring::GuestRing::create(&ring, 5, 1).unwrap();
    drop(g);

    // Unsealed without the flag: refused, naming the file.
    let out = Command::new(BIN)
        .arg("serve")
        .args(HOST)
        .arg("--ring")
        .arg(&ring)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not sealed") && err.contains("guest.ring"),
        "{err}"
    );

    let config = dir.join("serve.conf");
    let mut lines = String::from("# the host side\n");
    for pair in HOST.chunks(2) {
        lines.push_str(&format!(
            "{} {}\n",
            pair[0].trim_start_matches("--"),
            pair[1]
        ));
    }
    lines.push_str(&format!("ring {}\nallow-unsealed\n", ring.display()));
    std::fs::write(&config, lines).unwrap();
    let mut serve = Serve::start(&["--config", config.to_str().unwrap(), "--json", "--progress"]);
    let paths = serve.ring_paths(1);
    assert_eq!(paths[0], ring);
    let r = guest(&ring, &["--commands", "500", "--batch", "10"]);
    assert_eq!(n(&r, "syncs"), 50);
    let (code, out, err) = serve.stop();
    assert_eq!(code, 0, "{err}");
    let summary: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(n(&summary, "guest_syncs"), 50);
    assert_eq!(n(&summary, "forwarded"), n(&r, "entries") - 50);

    // --duration: serve stops by itself (stdin stays open).
    let start = Instant::now();
    let mut serve = Serve::start(&[
        "--config",
        config.to_str().unwrap(),
        "--duration",
        "0.3",
        "--json",
    ]);
    serve.ring_paths(1);
    let status = serve.child.wait().unwrap();
    assert!(status.success());
    let mut out = String::new();
    serve.stdout.read_to_string(&mut out).unwrap();
    let summary: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(n(&summary, "taken"), 0);
    assert!(start.elapsed() < Duration::from_secs(60));

    // SIGINT: a clean stop with the summary, stdin still open.
    let mut serve = Serve::start(&["--config", config.to_str().unwrap()]);
    serve.ring_paths(1);
    // SAFETY: kill(2) on our own child's pid with a valid signal number.
    let rc = unsafe { libc::kill(serve.child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(rc, 0);
    let status = serve.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let mut out = String::new();
    serve.stdout.read_to_string(&mut out).unwrap();
    assert!(
        out.contains("forwarded") && out.contains("guest syncs"),
        "{out}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_options_are_reported_with_what_is_wrong() {
    for (args, want) in [
        (vec!["--viommu", "id=1,vmid=5"], "smmu is missing"),
        (vec!["--create-ring", "viommu=1,log2size=30"], "log2size"),
        (vec!["--viommu", "id=1,vmid=5,smmu=0"], "no rings"),
        (
            vec![
                "--viommu",
                "id=1,vmid=5,smmu=0",
                "--bind",
                "viommu=1,device=9,vsid=1",
                "--create-ring",
                "viommu=1",
            ],
            "no device dev9",
        ),
        (vec!["--create-ring", "viommu=4"], "no vIOMMU 4"),
    ] {
        let out = Command::new(BIN).arg("serve").args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let out = Command::new(BIN)
        .args(["guest", "/nonexistent/ring"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ring"));
}

/// `serve --capture` records a hostile guest process's traffic, and replaying the capture
/// agrees with the oracle and sees every entry the guest wrote.
#[test]
fn serve_capture_replays_against_the_oracle() {
    let cap = std::env::temp_dir().join(format!("vcmdq-serve-capture-{}.vct", std::process::id()));
    let mut serve = Serve::start(&[
        "--viommu",
        "id=1,vmid=5,smmu=0",
        "--device",
        "id=1,smmu=0,psid=0x800",
        "--bind",
        "viommu=1,device=1,vsid=0x10",
        "--create-ring",
        "viommu=1,log2size=6",
        "--capture",
        cap.to_str().unwrap(),
    ]);
    let paths = serve.ring_paths(1);
    let g = guest(
        &paths[0],
        &[
            "--workload",
            "hostile",
            "--commands",
            "3000",
            "--vsid",
            "0x10",
        ],
    );
    let (status, _, err) = serve.stop();
    assert_eq!(status, 0, "{err}");
    assert!(err.contains("captured"), "{err}");
    let out = Command::new(BIN)
        .args(["replay", cap.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&cap);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["oracle_ok"], Value::Bool(true));
    assert!(
        n(&r["outcomes"], "refused") > 0,
        "the hostile guest's refusals are in the capture"
    );
    assert!(n(&r, "commands") >= n(&g, "commands"), "{r}\n{g}");
}
