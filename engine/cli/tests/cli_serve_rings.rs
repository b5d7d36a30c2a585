//! `vcmdq serve` against rings other processes break or share: unsealed files truncated under
//! it (serve lives and reports each), a ring named twice or served by two processes (refused),
//! files it cannot use (errors that say which flag to give), and hostile PROD in the summary.
#![cfg(not(loom))]
#![cfg(not(miri))]

mod common;

use common::file_ring::{ring_file, FileGuest, TempPath};

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use vcmdq::command::RawCommand;
use vcmdq::ring::layout;
use vcmdq::ring::GuestRing;

const BIN: &str = env!("CARGO_BIN_EXE_vcmdq");
/// A guest CMD_SYNC, CS=SIG_NONE: serve forwards it and counts it, whatever is bound.
const SYNC: u64 = 0x46;
/// How long any one wait for serve may take before the test fails saying what did not happen.
const WAIT: Duration = Duration::from_secs(60);

/// A running `vcmdq serve`; closing its stdin stops it.
struct Serve {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr: Receiver<String>,
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
        let err = BufReader::new(child.stderr.take().unwrap());
        let (tx, stderr) = channel();
        std::thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Serve {
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
        }
    }

    /// The paths of the `ring N ... path=P` lines serve prints first.
    fn ring_paths(&mut self, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let mut line = String::new();
                self.stdout.read_line(&mut line).unwrap();
                line.trim_end()
                    .split(" path=")
                    .nth(1)
                    .unwrap_or_else(|| panic!("serve did not print ring {i}: {line:?}"))
                    .to_string()
            })
            .collect()
    }

    /// Waits for `n` stderr lines containing `what`; returns them.
    fn stderr_lines(&mut self, what: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut found = Vec::new();
        while found.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.contains(what) => found.push(line),
                Ok(_) => {}
                Err(_) => panic!(
                    "serve printed {} of {n} lines with {what:?} on stderr: {found:#?} \
                     (serve's exit status so far: {:?})",
                    found.len(),
                    self.child.try_wait()
                ),
            }
        }
        found
    }

    /// Closes stdin, waits (bounded) for serve to end; its status and the rest of stdout.
    fn stop(mut self) -> (ExitStatus, String) {
        drop(self.stdin.take());
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("serve did not stop within {WAIT:?} of its stdin closing");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut rest).unwrap();
        (status, rest)
    }
}

/// Runs serve to completion (stdin closed at once); its status, stdout and stderr.
fn serve_once(args: &[&str]) -> (ExitStatus, String, String) {
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vcmdq serve runs");
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const VIOMMU: &[&str] = &["--viommu", "id=1,vmid=5,smmu=0"];

/// One serve, `cuts.len()` unsealed rings its guests truncate while serve polls them, and a
/// sealed ring that must still be served afterwards.
fn truncate_under_serve(cuts: &[u64]) {
    let log2size = 4;
    let files: Vec<_> = (0..cuts.len())
        .map(|i| ring_file(&format!("cut{i}"), log2size))
        .collect();
    let mut args: Vec<&str> = VIOMMU.to_vec();
    args.extend(["--allow-unsealed", "--json", "--budget", "4"]);
    for f in &files {
        args.extend(["--ring", f.s()]);
    }
    args.extend(["--create-ring", "viommu=1,log2size=4"]);
    let mut serve = Serve::start(&args);
    let paths = serve.ring_paths(files.len() + 1);
    let guests: Vec<_> = files
        .iter()
        .zip(cuts)
        .map(|(f, &cut)| {
            let path = f.0.clone();
            std::thread::spawn(move || {
                let mut g = FileGuest::open(&path, log2size);
                // Keep the ring busy until serve has consumed some of it: it is polling.
                let deadline = Instant::now() + WAIT;
                while g.consumed() < 3 * g.entries {
                    assert!(
                        Instant::now() < deadline,
                        "serve consumed nothing of {}",
                        path.display()
                    );
                    g.fill(|_| RawCommand::new(SYNC, 0));
                    std::thread::yield_now();
                }
                g.fill(|_| RawCommand::new(SYNC, 0));
                g.truncate(cut);
            })
        })
        .collect();
    for g in guests {
        g.join().expect("a guest thread");
    }
    let detached = serve.stderr_lines("detached", cuts.len());
    for line in &detached {
        assert!(line.contains("shrank"), "{line}");
    }
    // The sealed ring next to them is still served.
    let mut guest = GuestRing::open(paths.last().unwrap()).unwrap();
    guest.submit(&[RawCommand::new(SYNC, 0)]);
    guest
        .wait_syncs(1, WAIT)
        .expect("serve still serves the sealed ring after the others were truncated");
    let (status, rest) = serve.stop();
    assert!(status.success(), "serve ended with {status}: {rest}");
    let summary: Value = serde_json::from_str(rest.trim()).unwrap();
    assert_eq!(summary["ring_failures"], cuts.len() as u64, "{summary}");
    assert_eq!(summary["rings"], cuts.len() as u64 + 1, "{summary}");
}

#[test]
fn serve_outlives_unsealed_rings_truncated_under_it_and_reports_each() {
    let need = layout::HEADER_SIZE as u64 + 16 * 16;
    // To 0, inside the header (before, in and after PROD and CONS), inside the slots.
    truncate_under_serve(&[0, 1, 64, 66, 100, 130, 255, 256, 300, need - 1]);
    // More serve processes, cuts from a fixed seed.
    let mut rng = vcmdq::mock::Rng::new(0x2545_f491_4f6c_dd1d);
    for _ in 0..6 {
        let cuts: Vec<u64> = (0..8).map(|_| rng.below(need)).collect();
        truncate_under_serve(&cuts);
    }
}

#[test]
fn serve_refuses_a_ring_named_twice_or_through_a_second_path() {
    let f = ring_file("twice", 3);
    let mut args: Vec<&str> = VIOMMU.to_vec();
    args.extend(["--allow-unsealed", "--ring", f.s(), "--ring", f.s()]);
    let (status, _, err) = serve_once(&args);
    assert!(!status.success());
    assert!(err.contains("already attached"), "{err}");
    assert!(err.contains("forwarded twice"), "{err}");

    let link = TempPath::new("link");
    std::fs::hard_link(&f.0, &link.0).unwrap();
    let mut args: Vec<&str> = VIOMMU.to_vec();
    args.extend(["--allow-unsealed", "--ring", f.s(), "--ring", link.s()]);
    let (status, _, err) = serve_once(&args);
    assert!(!status.success());
    assert!(
        err.contains("already attached") && err.contains(link.s()),
        "{err}"
    );
}

#[test]
fn a_second_serve_is_refused_a_ring_the_first_serves() {
    let mut args: Vec<&str> = VIOMMU.to_vec();
    args.extend(["--create-ring", "viommu=1,log2size=3"]);
    let mut first = Serve::start(&args);
    let path = first.ring_paths(1).remove(0);
    let mut args: Vec<&str> = VIOMMU.to_vec();
    args.extend(["--ring", &path]);
    let (status, _, err) = serve_once(&args);
    assert!(!status.success(), "a second serve took {path}");
    assert!(err.contains("already attached"), "{err}");
    // The first one is undisturbed and serves the ring once.
    let mut guest = GuestRing::open(&path).unwrap();
    guest.submit(&[RawCommand::new(SYNC, 0)]);
    guest.wait_syncs(1, WAIT).unwrap();
    let (status, _) = first.stop();
    assert!(status.success());
}

#[test]
fn serve_says_which_flags_to_give_for_an_unsealed_ring() {
    let f = ring_file("noflag", 3);
    let mut args: Vec<&str> = VIOMMU.to_vec();
    args.extend(["--ring", f.s()]);
    let (status, _, err) = serve_once(&args);
    assert!(!status.success());
    assert!(
        err.contains("--allow-unsealed") && err.contains("--create-ring") && err.contains(f.s()),
        "{err}"
    );
    assert!(!err.contains("HostRing"), "{err}");
}

#[test]
fn serve_says_a_write_sealed_memfd_is_sealed_against_writes() {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::fs::FileExt;
    // SAFETY: a NUL-terminated name and valid flags.
    let fd = unsafe { libc::memfd_create(c"vcmdq-wseal".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(layout::HEADER_SIZE as u64 + 16 * 8).unwrap();
    file.write_all_at(&layout::MAGIC.to_le_bytes(), 0).unwrap();
    file.write_all_at(&1u32.to_le_bytes(), 8).unwrap();
    file.write_all_at(&256u32.to_le_bytes(), 12).unwrap();
    file.write_all_at(&3u32.to_le_bytes(), 16).unwrap();
    file.write_all_at(&1u32.to_le_bytes(), 20).unwrap();
    for seal in [libc::F_SEAL_WRITE, libc::F_SEAL_FUTURE_WRITE] {
        // SAFETY: F_ADD_SEALS with an int of seal bits on a memfd that allows sealing.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seal) };
        assert_eq!(rc, 0);
        let path = format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd());
        let mut args: Vec<&str> = VIOMMU.to_vec();
        args.extend(["--ring", &path]);
        let (status, _, err) = serve_once(&args);
        assert!(!status.success());
        assert!(
            err.contains("sealed against writes") && err.contains("CONS"),
            "{err}"
        );
        assert!(!err.contains("Operation not permitted"), "{err}");
    }
}

/// PROD moved past a full ring on one ring and backwards on another: the summary counts each,
/// per ring and in total, in text and JSON.
#[test]
fn serve_summary_counts_hostile_prod_per_ring_and_in_total() {
    for json in [true, false] {
        let log2size = 3;
        let (over, back, good) = (
            ring_file("over", log2size),
            ring_file("back", log2size),
            ring_file("good", log2size),
        );
        let mut args: Vec<&str> = VIOMMU.to_vec();
        args.extend(["--allow-unsealed", "--workers", "1"]);
        for f in [&over, &back, &good] {
            args.extend(["--ring", f.s()]);
        }
        if json {
            args.push("--json");
        }
        let mut serve = Serve::start(&args);
        serve.ring_paths(3);
        // Ring 0: PROD more than a ring ahead of CONS.
        let g0 = FileGuest::open(&over.0, log2size);
        g0.write_prod(9);
        // Ring 1: entries taken, then PROD moved back over them.
        let mut g1 = FileGuest::open(&back.0, log2size);
        g1.fill(|_| RawCommand::new(SYNC, 0));
        let deadline = Instant::now() + WAIT;
        while g1.consumed() < g1.entries {
            assert!(
                Instant::now() < deadline,
                "serve consumed nothing of ring 1"
            );
            std::thread::yield_now();
        }
        g1.prod += 4;
        g1.write_prod((g1.prod & g1.mask()) as u32);
        // ... wait for serve to take those four, then move PROD back by two.
        let deadline = Instant::now() + WAIT;
        while g1.consumed() < g1.prod {
            assert!(
                Instant::now() < deadline,
                "serve did not take ring 1's last four"
            );
            std::thread::yield_now();
        }
        g1.write_prod(((g1.prod - 2) & g1.mask()) as u32);
        // Two rounds on the good ring, each waited for: the one worker has polled the hostile
        // rings at least once since their PROD was written.
        let mut g2 = FileGuest::open(&good.0, log2size);
        for _ in 0..2 {
            g2.fill(|_| RawCommand::new(SYNC, 0));
            let deadline = Instant::now() + WAIT;
            while g2.consumed() < g2.prod {
                assert!(Instant::now() < deadline, "serve did not serve ring 2");
                std::thread::yield_now();
            }
        }
        let (status, out) = serve.stop();
        assert!(status.success(), "{out}");
        if json {
            let s: Value = serde_json::from_str(out.trim()).unwrap();
            let per = s["per_ring"].as_array().expect("per_ring");
            let field = |i: usize, k: &str| per[i][k].as_u64().unwrap();
            assert!(field(0, "prod_overruns") >= 1, "{s}");
            assert_eq!(field(0, "prod_backwards"), 0, "{s}");
            assert_eq!(field(2, "prod_overruns") + field(2, "prod_backwards"), 0);
            // Moved back over taken entries, but CONS there too: an overrun or a move back,
            // depending on whether serve completed them first.
            assert!(
                field(1, "prod_overruns") + field(1, "prod_backwards") >= 1,
                "{s}"
            );
            let total = |k: &str| s[k].as_u64().unwrap();
            assert_eq!(
                total("prod_overruns"),
                (0..3).map(|i| field(i, "prod_overruns")).sum::<u64>()
            );
            assert_eq!(
                total("prod_backwards"),
                (0..3).map(|i| field(i, "prod_backwards")).sum::<u64>()
            );
            assert_eq!(per[0]["path"], over.s());
        } else {
            assert!(out.contains("prod overruns"), "{out}");
            assert!(out.contains("prod backwards"), "{out}");
            let line = out
                .lines()
                .find(|l| l.trim_start().starts_with("ring 0:"))
                .unwrap_or_else(|| panic!("no line for ring 0: {out}"));
            assert!(!line.contains("prod overruns 0,"), "{line}");
            assert!(line.contains(over.s()), "{line}");
        }
    }
}
