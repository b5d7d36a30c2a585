//! The command line against hostile use: a closed standard output, endless input, values
//! outside every bound, config files that say more than options, errors in the user's terms.
//! Every run of the binary is bounded: a command that does not end fails its test by name.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vcmdq::engine::{Engine, EngineConfig, EngineError, MAX_BATCH, MAX_BUDGET, MAX_WORKERS};
use vcmdq::hwmodel::{HwConfig, HwPlacement, ModelQueue, DEFAULT_LOG2SIZE};

/// The binary under test; `VCMDQ_BIN` points these tests at another build (e.g. one without a
/// fix, to see its test fail).
fn bin() -> String {
    std::env::var("VCMDQ_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_vcmdq").to_string())
}

/// The longest any one run of the binary may take before its test calls it hung (a debug
/// build on a loaded machine).
const T: Duration = Duration::from_secs(60);

/// What a finished run left.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// A thread reading all of `r`; its text arrives on the channel.
fn drain(mut r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}

/// Waits at most [`T`] for `child`; kills it and fails the test naming `what` if it is not done.
fn finish(mut child: Child, what: &str) -> Ran {
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for vcmdq") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: vcmdq did not end within {T:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = |rx: Option<mpsc::Receiver<String>>| {
        rx.map(|rx| rx.recv_timeout(T).expect("the output of an ended process"))
            .unwrap_or_default()
    };
    Ran {
        code: status.code(),
        stdout: text(out),
        stderr: text(err),
    }
}

/// Input for a child: nothing, these bytes, or an endless supply.
enum Input<'a> {
    Null,
    Bytes(&'a [u8]),
    /// `/dev/zero`.
    Zeros,
    /// This line, written again and again until the child stops reading.
    Forever(&'static [u8]),
}

fn spawn(args: &[&str], input: Input<'_>, stdout: Stdio) -> Child {
    let stdin = match input {
        Input::Null => Stdio::null(),
        Input::Zeros => Stdio::from(std::fs::File::open("/dev/zero").unwrap()),
        Input::Bytes(_) | Input::Forever(_) => Stdio::piped(),
    };
    let mut child = Command::new(bin())
        .args(args)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("vcmdq runs");
    match input {
        Input::Bytes(b) => {
            let mut w = child.stdin.take().unwrap();
            let b = b.to_vec();
            // The child may stop reading early: a failed write is not this test's business.
            std::thread::spawn(move || {
                let _ = w.write_all(&b);
            });
        }
        Input::Forever(line) => {
            let mut w = child.stdin.take().unwrap();
            std::thread::spawn(move || {
                let chunk = line.repeat(4096);
                while w.write_all(&chunk).is_ok() {}
            });
        }
        _ => {}
    }
    child
}

/// Runs vcmdq with its standard output a pipe whose reader is already closed, so that its
/// first write to it fails.
fn with_closed_stdout(args: &[&str], input: Input<'_>) -> Ran {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let child = spawn(args, input, Stdio::from(writer));
    finish(child, &format!("{args:?} with standard output closed"))
}

fn run(args: &[&str], input: Input<'_>) -> Ran {
    let child = spawn(args, input, Stdio::piped());
    finish(child, &format!("{args:?}"))
}

fn assert_quiet(r: &Ran, what: &str) {
    assert!(
        !r.stderr.contains("panicked") && !r.stderr.contains("Broken pipe"),
        "{what}: {}",
        r.stderr
    );
    assert_eq!(r.code, Some(0), "{what}: {}", r.stderr);
}

fn dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("hardening-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
        .display()
        .to_string()
}

fn lines(line: &str, n: usize) -> Vec<u8> {
    line.repeat(n).into_bytes()
}

// --- 1. A closed standard output -----------------------------------------------------------

#[test]
fn decode_ends_quietly_with_status_0_when_its_reader_is_gone() {
    let input = lines("0x10 0\n", 100_000);
    let r = with_closed_stdout(&["decode"], Input::Bytes(&input));
    assert_quiet(&r, "decode");
}

#[test]
fn encode_ends_quietly_with_status_0_when_its_reader_is_gone() {
    let input = lines("TLBI_NH_ALL vmid=3\n", 100_000);
    let r = with_closed_stdout(&["encode"], Input::Bytes(&input));
    assert_quiet(&r, "encode");
}

#[test]
fn decode_and_encode_keep_the_status_of_a_bad_line_read_before_the_reader_went() {
    for (args, bad, good) in [
        ("decode", "not hex\n", "0x10 0\n"),
        ("encode", "NOT_A_COMMAND\n", "TLBI_NH_ALL vmid=3\n"),
    ] {
        let mut input = bad.as_bytes().to_vec();
        input.extend(lines(good, 100_000));
        let r = with_closed_stdout(&[args], Input::Bytes(&input));
        assert!(!r.stderr.contains("panicked"), "{args}: {}", r.stderr);
        assert_eq!(r.code, Some(1), "{args}: {}", r.stderr);
    }
}

#[test]
fn a_closed_standard_error_loses_the_reports_but_not_the_run() {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let mut child = Command::new(bin())
        .arg("encode")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(writer))
        .spawn()
        .unwrap();
    let mut w = child.stdin.take().unwrap();
    std::thread::spawn(move || {
        let _ = w.write_all(b"NOT_A_COMMAND\nTLBI_NH_ALL vmid=3\n");
    });
    let r = finish(child, "encode with standard error closed");
    // The bad line is still counted, the good one still encoded.
    assert_eq!(r.code, Some(1));
    assert_eq!(r.stdout, "0x0000000300000010 0x0000000000000000\n");
}

#[test]
fn translate_ends_quietly_with_status_0_when_its_reader_is_gone() {
    let input = lines("TLBI_NH_ALL vmid=0\n", 20_000);
    let r = with_closed_stdout(&["translate", "--vmid", "5"], Input::Bytes(&input));
    assert_quiet(&r, "translate");
}

#[test]
fn replay_ends_quietly_with_status_0_when_its_reader_is_gone() {
    let trace = repo("traces/dma-unmap.vct");
    let r = with_closed_stdout(&["replay", &trace], Input::Null);
    assert_quiet(&r, "replay");
}

#[test]
fn trace_dump_and_info_end_quietly_when_their_reader_is_gone() {
    let trace = repo("traces/dma-unmap.vct");
    for sub in ["dump", "info"] {
        let r = with_closed_stdout(&["trace", sub, &trace], Input::Null);
        assert_quiet(&r, sub);
    }
}

#[test]
fn serve_with_its_reader_gone_still_serves_until_its_duration_and_ends_quietly() {
    let r = with_closed_stdout(
        &[
            "serve",
            "--viommu",
            "id=1,vmid=5,smmu=0",
            "--create-ring",
            "viommu=1",
            "--duration",
            "0.3",
        ],
        Input::Null,
    );
    assert_quiet(&r, "serve");
}

#[test]
fn soak_with_its_reader_gone_completes_its_run_and_ends_quietly() {
    let r = with_closed_stdout(
        &[
            "soak",
            "--commands",
            "20000",
            "--rings",
            "2",
            "--viommus",
            "2",
            "--progress",
            "0",
        ],
        Input::Null,
    );
    assert_quiet(&r, "soak");
}

#[test]
fn loadtest_ends_quietly_when_its_reader_is_gone() {
    let r = with_closed_stdout(
        &[
            "loadtest",
            "--saturation",
            "1e6",
            "--duration",
            "0.05",
            "--loads",
            "10",
        ],
        Input::Null,
    );
    // Its status is its verdict (1: no level was the engine's latency, which on a busy machine
    // it may not be), so only the quiet end is checked here.
    assert!(
        !r.stderr.contains("panicked") && !r.stderr.contains("Broken pipe"),
        "loadtest: {}",
        r.stderr
    );
    assert!(matches!(r.code, Some(0 | 1)), "loadtest: {}", r.stderr);
}

/// A running `vcmdq serve` with one created ring.
struct Serve {
    child: Child,
    path: PathBuf,
}

impl Serve {
    fn start(ring: &str) -> Serve {
        let mut child = Command::new(bin())
            .args([
                "serve",
                "--viommu",
                "id=1,vmid=5,smmu=0",
                "--create-ring",
                ring,
            ])
            .args(["--device", "id=1,smmu=0,psid=0x800"])
            .args(["--bind", "viommu=1,device=1,vsid=0x10"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("vcmdq serve runs");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = out.read_line(&mut line);
            let _ = tx.send(line);
            // Keep reading so serve's summary never blocks on a full pipe.
            let _ = std::io::copy(&mut out, &mut std::io::sink());
        });
        let line = rx
            .recv_timeout(T)
            .expect("serve printed no ring path within the bound");
        let path = PathBuf::from(line.trim_end().split_once("path=").expect(&line).1);
        Serve { child, path }
    }

    fn stop(mut self) -> Ran {
        drop(self.child.stdin.take());
        finish(self.child, "serve, its standard input closed")
    }
}

#[test]
fn guest_ends_quietly_when_its_reader_is_gone() {
    let serve = Serve::start("viommu=1");
    let path = serve.path.display().to_string();
    let r = with_closed_stdout(&["guest", &path, "--commands", "1000"], Input::Null);
    assert_quiet(&r, "guest");
    let s = serve.stop();
    assert_eq!(s.code, Some(0), "{}", s.stderr);
}

// --- 2. Engine limits -----------------------------------------------------------------------

fn start_err(cfg: EngineConfig) -> EngineError {
    // No physical queue: the settings are checked before the queue count.
    match Engine::start(cfg, Vec::<ModelQueue>::new()) {
        Ok(e) => {
            e.shutdown();
            panic!("the engine started");
        }
        Err(e) => e,
    }
}

#[test]
fn the_engine_refuses_workers_batch_and_budget_outside_its_limits_before_starting() {
    for (cfg, name) in [
        (
            EngineConfig {
                workers: MAX_WORKERS + 1,
                ..Default::default()
            },
            "MAX_WORKERS",
        ),
        (
            EngineConfig {
                workers: 0,
                ..Default::default()
            },
            "MAX_WORKERS",
        ),
        (
            EngineConfig {
                batch_limit: MAX_BATCH + 1,
                ..Default::default()
            },
            "MAX_BATCH",
        ),
        (
            EngineConfig {
                batch_limit: 0,
                ..Default::default()
            },
            "MAX_BATCH",
        ),
        (
            EngineConfig {
                ring_budget: MAX_BUDGET + 1,
                ..Default::default()
            },
            "MAX_BUDGET",
        ),
        (
            EngineConfig {
                ring_budget: 0,
                ..Default::default()
            },
            "MAX_BUDGET",
        ),
    ] {
        match start_err(cfg) {
            EngineError::Config(limit) => assert_eq!(limit.max_name, name),
            other => panic!("{name}: {other}"),
        }
    }
    let max = EngineConfig {
        workers: 2,
        batch_limit: MAX_BATCH,
        ring_budget: MAX_BUDGET,
        ..Default::default()
    };
    let (queues, _) = ModelQueue::for_workers(
        2,
        DEFAULT_LOG2SIZE,
        &HwConfig::default(),
        HwPlacement::Inline,
    )
    .unwrap();
    Engine::start(max, queues)
        .expect("the limits themselves")
        .shutdown();
}

#[test]
fn serve_refuses_workers_batch_and_budget_beyond_the_engine_naming_the_flag_and_limit() {
    for (flag, value, want) in [
        ("--workers", "10000", "MAX_WORKERS"),
        ("--batch-limit", "1000000000", "MAX_BATCH"),
        ("--budget", "1000000000", "MAX_BUDGET"),
        ("--workers", "0", "must be at least 1"),
        ("--batch-limit", "0", "--batch-limit 0: must be at least 1"),
        ("--budget", "0", "must be at least 1"),
    ] {
        let r = run(
            &[
                "serve",
                "--viommu",
                "id=1,vmid=5,smmu=0",
                "--create-ring",
                "viommu=1",
                "--duration",
                "0.1",
                flag,
                value,
            ],
            Input::Null,
        );
        assert_eq!(r.code, Some(2), "{flag} {value}: {}", r.stderr);
        assert!(
            r.stderr.contains(&format!("{flag} {value}")) && r.stderr.contains(want),
            "{flag} {value}: {}",
            r.stderr
        );
    }
}

#[test]
fn replay_gets_the_engine_limits_from_the_library() {
    let trace = repo("traces/dma-unmap.vct");
    for workers in ["10000", "0"] {
        let r = run(&["replay", &trace, "--workers", workers], Input::Null);
        assert_eq!(r.code, Some(2), "--workers {workers}: {}", r.stderr);
        assert!(r.stderr.contains("MAX_WORKERS"), "{}", r.stderr);
    }
}

#[test]
fn serve_refuses_more_rings_than_it_serves_before_making_any() {
    let mut body = String::from("viommu id=1,vmid=5,smmu=0\nduration 0.1\n");
    body.push_str(&"create-ring viommu=1\n".repeat(1025));
    let r = serve_config("many-rings", &body);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(
        r.stderr.contains("1025 rings") && r.stderr.contains("MAX_RINGS"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_thread_the_system_will_not_start_is_an_error_not_a_panic() {
    // A stack no system maps: every thread spawn fails, as under a thread limit.
    let child = Command::new(bin())
        .args([
            "serve",
            "--viommu",
            "id=1,vmid=5,smmu=0",
            "--create-ring",
            "viommu=1",
            "--duration",
            "0.1",
        ])
        .env("RUST_MIN_STACK", (1u64 << 44).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let r = finish(child, "serve without threads");
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot start thread") && !r.stderr.contains("panicked"),
        "{}",
        r.stderr
    );
}

#[test]
fn soak_refuses_zero_workers_and_unbounded_guests_rings_and_stalls() {
    for (args, want) in [
        (vec!["--workers", "0"], "--workers 0: must be at least 1"),
        (vec!["--workers", "10000"], "MAX_WORKERS"),
        (
            vec!["--batch-limit", "0"],
            "--batch-limit 0: must be at least 1",
        ),
        (vec!["--guests", "10000"], "--guests 10000"),
        (vec!["--rings", "100000"], "--rings 100000"),
        (vec!["--rings", "1024", "--log2size", "19"], "bytes"),
        (vec!["--max-stall-us", "100000000000"], "--max-stall-us"),
        (vec!["--duration", "-1"], "must be positive"),
    ] {
        let mut a = vec!["soak", "--commands", "1000"];
        a.extend(&args);
        let r = run(&a, Input::Null);
        assert_eq!(r.code, Some(2), "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{args:?}: {}", r.stderr);
    }
}

#[test]
fn guest_refuses_a_batch_that_does_not_fit_its_ring_instead_of_shrinking_it() {
    let serve = Serve::start("viommu=1,log2size=2");
    let path = serve.path.display().to_string();
    let r = run(
        &["guest", &path, "--batch", "10", "--commands", "20"],
        Input::Null,
    );
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(
        r.stderr.contains("--batch 10 does not fit") && r.stderr.contains("--batch 3 at most"),
        "{}",
        r.stderr
    );
    let r = run(
        &["guest", &path, "--batch", "3", "--commands", "20"],
        Input::Null,
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let s = serve.stop();
    assert_eq!(s.code, Some(0), "{}", s.stderr);
}

// --- 3. Endless input -----------------------------------------------------------------------

fn assert_refused_endless(r: &Ran, what: &str, want: &str) {
    assert_eq!(r.code, Some(2), "{what}: {}", r.stderr);
    assert!(r.stderr.contains(want), "{what}: {}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{what}: {}", r.stderr);
}

#[test]
fn decode_of_dev_zero_stops_at_the_line_limit_naming_file_and_line() {
    let r = run(&["decode", "/dev/zero"], Input::Null);
    assert_refused_endless(&r, "decode /dev/zero", "/dev/zero: line 1 is longer than");
    assert!(r.stderr.contains("MAX_LINE_BYTES"), "{}", r.stderr);
}

#[test]
fn encode_of_endless_standard_input_stops_at_the_line_limit() {
    let r = run(&["encode"], Input::Zeros);
    assert_refused_endless(&r, "encode < /dev/zero", "MAX_LINE_BYTES");
}

#[test]
fn translate_of_endless_input_or_bindings_stops_at_a_limit() {
    let r = run(
        &["translate", "--vmid", "1", "--bindings", "/dev/zero"],
        Input::Null,
    );
    assert_refused_endless(&r, "translate --bindings /dev/zero", "MAX_LINE_BYTES");
    let r = run(&["translate", "--vmid", "1"], Input::Zeros);
    assert_refused_endless(&r, "translate < /dev/zero", "MAX_LINE_BYTES");
    // Endless short lines: the file size limit.
    let r = run(
        &["translate", "--vmid", "1", "--bindings", "/dev/stdin"],
        Input::Forever(b"# a comment\n"),
    );
    assert_refused_endless(&r, "translate --bindings (endless lines)", "MAX_FILE_BYTES");
    // Endless valid commands: the command limit.
    let r = run(
        &["translate", "--vmid", "1"],
        Input::Forever(b"TLBI_NH_ALL vmid=0\n"),
    );
    assert_refused_endless(&r, "translate < (endless commands)", "MAX_COMMANDS");
}

#[test]
fn serve_with_an_endless_config_stops_at_a_limit() {
    let r = run(&["serve", "--config", "/dev/zero"], Input::Null);
    assert_refused_endless(&r, "serve --config /dev/zero", "MAX_LINE_BYTES");
    let r = run(
        &["serve", "--config", "/dev/stdin"],
        Input::Forever(b"# a comment\n"),
    );
    assert_refused_endless(&r, "serve --config (endless lines)", "MAX_FILE_BYTES");
}

#[test]
fn decode_and_encode_answer_each_line_before_their_input_ends() {
    for (args, line) in [
        (vec!["decode"], "0x10 0\n"),
        (vec!["encode"], "TLBI_NH_ALL vmid=3\n"),
    ] {
        let mut child = Command::new(bin())
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut l = String::new();
            let _ = out.read_line(&mut l);
            let _ = tx.send(l);
        });
        // Many lines, then an open input: the answers must come while it is still open. The
        // output is block-buffered, so give it more than one buffer's worth.
        stdin.write_all(line.repeat(2000).as_bytes()).unwrap();
        stdin.flush().unwrap();
        let got = rx.recv_timeout(T);
        drop(stdin);
        let r = finish(child, &format!("{args:?}"));
        let got = got.unwrap_or_else(|_| panic!("{args:?}: no output while input was open"));
        assert!(!got.is_empty(), "{args:?}");
        assert_eq!(r.code, Some(0), "{args:?}: {}", r.stderr);
    }
}

// --- 4. Rates and durations -----------------------------------------------------------------

#[test]
fn loadtest_refuses_rates_and_durations_outside_their_ranges() {
    for (args, want) in [
        (vec!["--saturation", "1e300"], "--saturation"),
        (vec!["--saturation", "NaN"], "--saturation"),
        (vec!["--saturation", "-5"], "--saturation"),
        (vec!["--duration", "-1"], "must be positive"),
        (vec!["--duration", "inf"], "--duration"),
        (
            vec!["--duration", "601"],
            "--duration 601s: must be above 0 and at most 600 s",
        ),
        (vec!["--loads", "-10"], "--loads"),
    ] {
        let mut a = vec!["loadtest"];
        a.extend(&args);
        let r = run(&a, Input::Null);
        assert_eq!(r.code, Some(2), "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains(want) && !r.stderr.contains("unexpected argument"),
            "{args:?}: {}",
            r.stderr
        );
    }
}

#[test]
fn an_open_loop_level_the_engine_cannot_keep_up_with_ends_at_its_deadline() {
    // A billion commands a second: no engine keeps up, so without a deadline the level would
    // run until every scheduled batch was sent.
    let r = run(
        &[
            "loadtest",
            "--saturation",
            "1e9",
            "--secs",
            "0.2",
            "--loads",
            "100",
            "--json",
        ],
        Input::Null,
    );
    // Its only level did not hold the rate, so none is the engine's latency: status 1.
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).expect(&r.stdout);
    let unsent = j["levels"][0]["unsent_at_deadline"].as_u64().unwrap();
    assert!(unsent > 0, "{}", r.stdout);
    assert_eq!(j["levels"][0]["trustworthy"], false, "{}", r.stdout);
}

// --- 5. Every config key works or is refused; no silent clamp -------------------------------

#[test]
fn capture_in_a_config_file_records_the_run() {
    let d = dir("capture");
    let trace = d.join("run.vct");
    let config = d.join("serve.conf");
    std::fs::write(
        &config,
        format!(
            "viommu id=1,vmid=5,smmu=0\ncreate-ring viommu=1\nduration 0.2\ncapture {}\n",
            trace.display()
        ),
    )
    .unwrap();
    let r = run(
        &["serve", "--config", config.to_str().unwrap()],
        Input::Null,
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains("captured"), "{}", r.stderr);
    let info = run(&["trace", "info", trace.to_str().unwrap()], Input::Null);
    assert_eq!(info.code, Some(0), "{}", info.stderr);
}

// --- 6. Errors that say what is wrong -------------------------------------------------------

fn serve_config(name: &str, body: &str) -> Ran {
    let d = dir(name);
    let config = d.join("serve.conf");
    std::fs::write(&config, body).unwrap();
    run(
        &["serve", "--config", config.to_str().unwrap()],
        Input::Null,
    )
}

#[test]
fn help_in_a_config_file_is_said_to_be_no_option() {
    for key in ["help", "--help", "version", "h"] {
        let r = serve_config("help", &format!("viommu id=1,vmid=5,smmu=0\n{key}\n"));
        assert_eq!(r.code, Some(2), "{key}: {}", r.stderr);
        assert!(
            r.stderr.contains("serve.conf:2:")
                && r.stderr.contains("is not an option")
                && r.stderr.contains("vcmdq serve --help")
                && !r.stderr.contains("Usage"),
            "{key}: {}",
            r.stderr
        );
    }
    let r = serve_config("frob", "frobnicate 3\n");
    assert!(
        r.stderr.contains("\"frobnicate\" is not an option"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_huge_bad_config_value_is_echoed_once_and_cut_short() {
    // Just under the line limit (a longer line is refused as such).
    let huge = "x".repeat(60_000);
    for (name, line) in [
        ("huge-key", format!("viommu id=1,vmid=5,smmu=0,{huge}=1\n")),
        ("huge-shape", format!("viommu {huge}\n")),
        ("huge-number", format!("workers 1{}\n", "9".repeat(60_000))),
        ("huge-device", format!("device id=1,smmu=0,psid=0x{huge}\n")),
    ] {
        let r = serve_config(name, &line);
        assert_eq!(r.code, Some(2), "{name}");
        assert!(
            r.stderr.len() < 1000,
            "{name}: {} bytes of error: {}",
            r.stderr.len(),
            &r.stderr[..2000.min(r.stderr.len())]
        );
        assert!(r.stderr.contains("serve.conf:1:"), "{name}: {}", r.stderr);
        // Each echo of a cut value ends in `... (N bytes)`.
        assert!(
            r.stderr.matches("... (").count() <= 1,
            "{name}: {}",
            r.stderr
        );
    }
}

#[test]
fn a_negative_duration_is_said_to_need_a_positive_one() {
    for args in [
        vec!["serve", "--duration", "-1"],
        vec!["serve", "--duration", "0"],
        vec!["soak", "--duration", "-1"],
        vec!["guest", "/nonexistent", "--timeout", "-1"],
    ] {
        let r = run(&args, Input::Null);
        assert_eq!(r.code, Some(2), "{args:?}");
        assert!(
            r.stderr.contains("must be positive") && !r.stderr.contains("unexpected argument"),
            "{args:?}: {}",
            r.stderr
        );
    }
}

#[test]
fn translate_binding_errors_name_the_bindings_the_user_gave() {
    let r = run(
        &[
            "translate",
            "--vmid",
            "5",
            "--bind",
            "vsid=0x10,psid=0x800",
            "--bind",
            "vsid=0x10,psid=0x801",
        ],
        Input::Null,
    );
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    let mut errors = vec![r.stderr.clone()];
    assert!(
        r.stderr.contains("--bind vsid=0x10,psid=0x801: EEXIST: vSID 0x10 is already bound by --bind vsid=0x10,psid=0x800"),
        "{}",
        r.stderr
    );
    let d = dir("bindings");
    let file = d.join("binds.txt");
    std::fs::write(&file, "# host\nvsid=0x20,psid=0x800\n").unwrap();
    let r = run(
        &[
            "translate",
            "--vmid",
            "5",
            "--bind",
            "vsid=0x10,psid=0x800",
            "--bindings",
            file.to_str().unwrap(),
        ],
        Input::Null,
    );
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    errors.push(r.stderr.clone());
    assert!(
        r.stderr.contains("binds.txt:2 (vsid=0x20,psid=0x800): EEXIST: pSID 0x800 is already bound by --bind vsid=0x10,psid=0x800"),
        "{}",
        r.stderr
    );
    let r = run(
        &[
            "translate",
            "--vmid",
            "5",
            "--sidsize",
            "4",
            "--bind",
            "vsid=0x10,psid=1",
        ],
        Input::Null,
    );
    assert!(r.stderr.contains("--sidsize 4"), "{}", r.stderr);
    errors.push(r.stderr);
    // Only what the user named: no vIOMMU or device of translate's own making.
    for e in errors {
        assert!(!e.contains("vIOMMU") && !e.contains("dev"), "{e}");
    }
}
