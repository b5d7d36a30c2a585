//! `vcmdq serve`: runs the engine over guest rings named on the command line (or created by
//! it), with live counters, until a duration passes, Ctrl-C, or standard input closes; then
//! drains what it took and prints a summary. Trapped commands (CFGI_STE*) are completed at once:
//! serve stands in for the VMM.

use super::decode::strip_comment;
use super::input::read_small_file;
use super::spec::{self, BindSpec, CreateRingSpec, DeviceSpec, SHOWN};
use super::units::{self, Hardware};
use super::{clip, engine_limit, human, out, CliError};
use clap::Parser;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vcmdq::command::text;
use vcmdq::engine::{Engine, EngineConfig, EngineStats, RingId};
use vcmdq::hwmodel::{HwConfig, HwPlacement, ModelQueue, DEFAULT_LOG2SIZE};
use vcmdq::ring::{AttachOptions, HostRing, RingError, RingStats};
use vcmdq::viommu::{DeviceId, ViommuConfig};

/// Arguments of `vcmdq serve`.
#[derive(Parser, Debug, Default)]
#[command(
    name = "serve",
    after_help = "\
Each ring is printed on standard output as it is attached, e.g.
  ring 0 viommu=1 log2size=8 path=/proc/4242/fd/3
A guest process opens that path (`vcmdq guest /proc/4242/fd/3 ...`) while serve runs.

serve stops after --duration, at Ctrl-C (SIGINT) or SIGTERM, or, without --duration, when its \
standard input (a terminal or a pipe) reaches end of file (Ctrl-D). It then completes what it \
took and prints a summary (--json: one object). Counters go to standard error once a second \
when it is a terminal (or with --progress; --progress 5s: every 5 s; --progress 0: none).

A config file holds the same options, one per line, without the leading `--`:
  viommu id=1,vmid=5,smmu=0
  device id=1,smmu=0,psid=0x800
  bind viommu=1,device=1,vsid=0x10
  create-ring viommu=1,log2size=8
  workers 2"
)]
pub struct ServeArgs {
    /// A vIOMMU `id=N,vmid=N,smmu=N[,profile=kernel|tegra241][,sidsize=1..32][,no-range]`, the
    /// physical SMMU's features `[,smmu-features=PRESET | ,idr0=N,idr1=N,idr3=N,idr5=N][,ds=0|1]`,
    /// a tegra241 VINTF's `[,sid-slots=N]`, limits `[,max-vsids=N][,max-table-bytes=N]`
    /// (repeatable).
    #[arg(long = "viommu", value_name = "SPEC", value_parser = spec::parse_viommu)]
    viommus: Vec<ViommuConfig>,
    /// A host device `id=N,smmu=N,psid=N` (repeatable).
    #[arg(long = "device", value_name = "SPEC", value_parser = spec::parse_device)]
    devices: Vec<DeviceSpec>,
    /// Bind a device in a vIOMMU: `viommu=N,device=N,vsid=N` (repeatable).
    #[arg(long = "bind", value_name = "SPEC", value_parser = spec::parse_bind)]
    binds: Vec<BindSpec>,
    /// Attach an existing ring file; its header names its vIOMMU (repeatable). Plain files
    /// need --allow-unsealed.
    #[arg(long = "ring", value_name = "PATH")]
    rings: Vec<PathBuf>,
    /// Create a ring in a sealed memfd for a guest process to open: `viommu=N[,log2size=8]`
    /// (repeatable).
    #[arg(long = "create-ring", value_name = "SPEC", value_parser = spec::parse_create_ring)]
    create_rings: Vec<CreateRingSpec>,
    /// Accept ring files that are not sealed memfds. The engine reads them with system calls
    /// (slower than a mapping); one truncated under it is detached with an error, the others
    /// are served on.
    #[arg(long)]
    allow_unsealed: bool,
    /// Read options from FILE, one per line (see below).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Translating threads, each with its own physical queue [default: 1].
    #[arg(long)]
    workers: Option<usize>,
    /// The engine's cap: commands forwarded per batch (one PROD store) at most [default: 64].
    #[arg(long = "batch-limit", alias = "batch")]
    batch_limit: Option<usize>,
    /// Guest entries taken from one ring per pass, and of its entries in a physical queue, at
    /// most [default: 256].
    #[arg(long = "budget")]
    ring_budget: Option<usize>,
    /// LOG2SIZE of each physical queue [default: 12].
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=19))]
    phys_log2size: Option<u8>,
    /// Where each physical queue's hardware model runs: inline (stepped by its worker) or
    /// thread (a thread of its own) [default: inline].
    #[arg(long, value_enum)]
    hardware: Option<Hardware>,
    /// The retired spelling of `--hardware thread`, kept for scripts.
    #[arg(long, hide = true)]
    hw_thread: bool,
    /// Stop after this long: 500ms, 10s, 2m, 1h, or a bare number of seconds (at most 1e9 s).
    #[arg(long, value_name = "DURATION", value_parser = units::duration_secs,
          allow_negative_numbers = true)]
    duration: Option<f64>,
    /// Counters on standard error every DURATION (bare `--progress`: once a second) even when
    /// it is not a terminal; `--progress 0`: none, even on a terminal.
    #[arg(long, value_name = "DURATION", num_args = 0..=1, default_missing_value = "1s",
          value_parser = units::duration_or_off)]
    progress: Option<Duration>,
    /// Print each trapped command as it is completed.
    #[arg(short, long)]
    verbose: bool,
    /// The final summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// Record what the guests submit and the control-plane events as a trace (`vcmdq replay`
    /// reads it back).
    #[arg(long, value_name = "FILE")]
    capture: Option<PathBuf>,
}

/// The most rings one serve attaches (each a mapping and a descriptor, polled every pass).
const MAX_RINGS: usize = 1024;

/// A config file line that is not an option serve takes.
#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}: {why}")]
struct ConfigError {
    path: String,
    line: usize,
    why: String,
}

impl ServeArgs {
    /// Adds the options of `other` (a config file's) before this command line's: lists are
    /// concatenated, a value given here wins.
    fn merge_config(&mut self, other: ServeArgs) {
        fn front<T>(mine: &mut Vec<T>, mut theirs: Vec<T>) {
            theirs.append(mine);
            *mine = theirs;
        }
        front(&mut self.viommus, other.viommus);
        front(&mut self.devices, other.devices);
        front(&mut self.binds, other.binds);
        front(&mut self.rings, other.rings);
        front(&mut self.create_rings, other.create_rings);
        self.allow_unsealed |= other.allow_unsealed;
        self.workers = self.workers.or(other.workers);
        self.batch_limit = self.batch_limit.or(other.batch_limit);
        self.ring_budget = self.ring_budget.or(other.ring_budget);
        self.phys_log2size = self.phys_log2size.or(other.phys_log2size);
        self.hardware = self.hardware.or(other.hardware);
        self.hw_thread |= other.hw_thread;
        self.duration = self.duration.or(other.duration);
        self.progress = self.progress.or(other.progress);
        self.verbose |= other.verbose;
        self.json |= other.json;
        self.capture = self.capture.take().or(other.capture);
    }
}

/// Reads a config file: each line `[--]option [value]`, parsed as that option would be on the
/// command line. The file and its lines are bounded (`MAX_FILE_BYTES`, `MAX_LINE_BYTES`).
fn read_config(path: &Path) -> Result<ServeArgs, CliError> {
    let lines =
        read_small_file(path).map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
    let mut args = ServeArgs::default();
    for (n, line) in lines {
        let body = strip_comment(&line).trim();
        if body.is_empty() {
            continue;
        }
        let err = |why: String| ConfigError {
            path: path.display().to_string(),
            line: n as usize,
            why,
        };
        let (key, value) = match body.split_once(char::is_whitespace) {
            Some((k, v)) => (k, Some(v.trim())),
            None => (body, None),
        };
        let key = key.trim_start_matches('-');
        if key == "config" {
            return Err(err("a config file cannot name another".into()).into());
        }
        let not_an_option = || {
            err(format!(
                "{:?} is not an option serve takes (`vcmdq serve --help` lists them; a config \
                 line is an option without its `--`)",
                clip(key, SHOWN)
            ))
        };
        // Would print clap's help or version text under a file:line instead of an error.
        if ["help", "h", "version", "V"].contains(&key) {
            return Err(not_an_option().into());
        }
        let mut argv = vec!["serve".to_string(), format!("--{key}")];
        argv.extend(value.map(str::to_string));
        let one = ServeArgs::try_parse_from(&argv).map_err(|e| {
            use clap::error::ErrorKind;
            match e.kind() {
                ErrorKind::UnknownArgument | ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    not_an_option()
                }
                // The value once, cut short; then why it is wrong.
                ErrorKind::ValueValidation | ErrorKind::InvalidValue
                    if value.is_some() && std::error::Error::source(&e).is_some() =>
                {
                    let why = std::error::Error::source(&e).map(ToString::to_string);
                    // Room for a cut value and the longest expected form (the --viommu spec's).
                    let why = clip(&why.unwrap_or_default(), 5 * SHOWN);
                    // A spec's error quotes the part that is wrong: the line number and that
                    // say enough without the whole value again.
                    if ["viommu", "device", "bind", "create-ring"].contains(&key) {
                        err(format!("{key}: {why}"))
                    } else {
                        err(format!(
                            "{key} {}: {why}",
                            clip(value.unwrap_or_default(), SHOWN)
                        ))
                    }
                }
                _ => {
                    let msg = e.to_string();
                    let first = msg
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim_start_matches("error: ");
                    let first = match value {
                        Some(v) if !v.is_empty() => first.replace(v, &clip(v, SHOWN)),
                        _ => first.to_string(),
                    };
                    err(clip(&first, 4 * SHOWN))
                }
            }
        })?;
        let mut merged = one;
        merged.merge_config(args);
        args = merged;
    }
    Ok(args)
}

/// Set by SIGINT and SIGTERM.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    SIGNALLED.store(true, Ordering::Relaxed);
}

/// Makes SIGINT and SIGTERM ask for a clean stop instead of killing the process, so that what
/// was taken is completed and the summary printed.
fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `on_signal` is an `extern "C" fn(c_int)` that only stores to a static atomic,
        // which is async-signal-safe; installing a handler has no other precondition.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

/// Whether to stop when standard input ends: a pipe or socket, or a terminal this process is
/// in the foreground of (reading the terminal from the background would stop the process).
/// Not a regular file or /dev/null: those end at once.
fn stdin_is_a_stop_switch() -> bool {
    use std::os::unix::fs::FileTypeExt;
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        // SAFETY: plain queries of the calling process and of descriptor 0; no memory is passed.
        return unsafe { libc::tcgetpgrp(0) == libc::getpgrp() };
    }
    std::fs::metadata("/proc/self/fd/0")
        .map(|m| m.file_type().is_fifo() || m.file_type().is_socket())
        .unwrap_or(false)
}

/// A thread that raises `stop` when standard input reaches end of file.
fn watch_stdin(stop: Arc<AtomicBool>) -> Result<(), CliError> {
    std::thread::Builder::new()
        .name("vcmdq-stdin".into())
        .spawn(move || {
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin().lock();
            loop {
                match std::io::Read::read(&mut stdin, &mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            stop.store(true, Ordering::Relaxed);
        })
        .map_err(|e| format!("cannot start the standard input watcher thread: {e}"))?;
    Ok(())
}

/// One attached ring.
struct Attached {
    id: RingId,
    viommu: u32,
    log2size: u8,
    path: PathBuf,
}

/// Builds the host side: devices, vIOMMUs, bindings, rings.
fn set_up(engine: &Engine, args: &ServeArgs) -> Result<Vec<Attached>, CliError> {
    for d in &args.devices {
        engine
            .add_device(DeviceId(d.id), d.smmu, d.psid)
            .map_err(|e| format!("--device id={}: {e}", d.id))?;
    }
    for v in &args.viommus {
        engine
            .create_viommu(*v)
            .map_err(|e| format!("--viommu id={}: {e}", v.id))?;
        if let Some(with) = v.shares_vmid_with {
            eprintln!(
                "serve: vIOMMU {} shares VMID {} on SMMU {} with vIOMMU {with} (one stage 2: \
                 their TLB invalidations reach each other's entries)",
                v.id, v.vmid, v.smmu
            );
        }
    }
    for b in &args.binds {
        engine
            .set_dev_id(b.viommu, DeviceId(b.device), b.vsid)
            .map_err(|e| {
                format!(
                    "--bind viommu={},device={},vsid={:#x}: {e}",
                    b.viommu, b.device, b.vsid
                )
            })?;
    }
    let mut hosts = Vec::new();
    for path in &args.rings {
        let host = HostRing::attach_with(
            path,
            AttachOptions {
                allow_unsealed: args.allow_unsealed,
            },
        )
        .map_err(|e| ring_error(path, e))?;
        hosts.push(host);
    }
    for c in &args.create_rings {
        hosts.push(HostRing::create_sealed(c.log2size, c.viommu)?);
    }
    let mut attached = Vec::new();
    for host in hosts {
        let (viommu, log2size, path) = (
            host.viommu_id(),
            host.shape().log2size(),
            host.path().to_path_buf(),
        );
        let id = engine
            .attach_ring(host)
            .map_err(|e| format!("ring {}: {e}", path.display()))?;
        attached.push(Attached {
            id,
            viommu,
            log2size,
            path,
        });
    }
    Ok(attached)
}

/// A ring that cannot be attached, said in serve's terms: the flags to give, not library calls.
fn ring_error(path: &Path, e: RingError) -> String {
    let p = path.display();
    match e {
        RingError::Unsealed { .. } => format!(
            "--ring {p}: not sealed against shrinking (not a sealed memfd), so another process \
             could truncate it under the engine. Give --allow-unsealed to serve it anyway (the engine then reads it with \
             system calls, and detaches only this ring if the file shrinks), or let serve create \
             the ring with --create-ring viommu=N (a sealed memfd; the guest opens the \
             /proc/<pid>/fd/<n> path serve prints)"
        ),
        RingError::AlreadyAttached { .. } => format!(
            "--ring {p}: already attached to an engine: named twice (or through two paths to \
             the same file), or served by another vcmdq process. A ring has one engine, or \
             every command would be forwarded twice"
        ),
        e => format!("--ring {p}: {e}"),
    }
}

/// When guest entries flowed: the last sample that saw none taken, to the last that saw the
/// count move. Sampled every [`Traffic::EVERY`], so the span errs long by at most that much and
/// the rate over it errs low, never high.
struct Traffic {
    next: Instant,
    idle_until: Instant,
    last_change: Option<Instant>,
    seen: u64,
}

impl Traffic {
    const EVERY: Duration = Duration::from_millis(10);

    fn new(start: Instant) -> Traffic {
        Traffic {
            next: start,
            idle_until: start,
            last_change: None,
            seen: 0,
        }
    }

    fn sample(&mut self, now: Instant, taken: impl FnOnce() -> u64) {
        if now < self.next {
            return;
        }
        self.next = now + Self::EVERY;
        let t = taken();
        if t == 0 {
            self.idle_until = now;
        } else if t != self.seen {
            self.seen = t;
            self.last_change = Some(now);
        }
    }

    /// Seconds traffic flowed, given the final count and when serving stopped (`None`: none).
    fn secs(&self, taken: u64, stopped: Instant) -> Option<f64> {
        if taken == 0 {
            return None;
        }
        let end = if taken != self.seen {
            stopped
        } else {
            self.last_change.unwrap_or(stopped)
        };
        Some(end.duration_since(self.idle_until).as_secs_f64())
    }
}

/// Rate per second, as people read it.
fn per_sec(n: u64, secs: f64) -> String {
    let r = if secs > 0.0 { n as f64 / secs } else { 0.0 };
    if r >= 1e6 {
        format!("{:.2} M/s", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.1} k/s", r / 1e3)
    } else {
        format!("{r:.0}/s")
    }
}

fn counters_line(s: &EngineStats, secs: f64, rate: &str) -> String {
    format!(
        "serve: {secs:>6.1}s  forwarded {} ({rate})  syncs {}  dropped {}  trapped {}  refused {}  faults {}",
        s.forwarded, s.guest_syncs, s.dropped, s.trapped, s.refused, s.phys_faults
    )
}

/// Hostile PROD activity of one ring, for the summary.
struct RingLine<'a> {
    id: RingId,
    path: &'a Path,
    stats: RingStats,
}

fn ring_lines<'a>(attached: &'a [Attached], stats: &[(RingId, RingStats)]) -> Vec<RingLine<'a>> {
    attached
        .iter()
        .map(|a| RingLine {
            id: a.id,
            path: &a.path,
            stats: stats
                .iter()
                .find(|(id, _)| *id == a.id)
                .map(|(_, s)| *s)
                .unwrap_or_default(),
        })
        .collect()
}

fn summary_json(
    s: &EngineStats,
    secs: f64,
    traffic_secs: Option<f64>,
    rings: &[RingLine],
    workers: usize,
) -> serde_json::Value {
    let per_ring: Vec<_> = rings
        .iter()
        .map(|r| {
            serde_json::json!({
                "ring": r.id.0,
                "path": r.path.display().to_string(),
                "prod_overruns": r.stats.prod_overrun,
                "prod_backwards": r.stats.prod_backwards,
            })
        })
        .collect();
    let rings_n = rings.len();
    let overruns: u64 = rings.iter().map(|r| r.stats.prod_overrun).sum();
    let backwards: u64 = rings.iter().map(|r| r.stats.prod_backwards).sum();
    serde_json::json!({
        "seconds": secs,
        "rings": rings_n,
        "workers": workers,
        "taken": s.taken,
        "forwarded": s.forwarded,
        "dropped": s.dropped,
        "trapped": s.trapped,
        "refused": s.refused,
        "guest_syncs": s.guest_syncs,
        "phys_syncs": s.phys_syncs,
        "batches": s.batches,
        "phys_faults": s.phys_faults,
        "retracted": s.retracted,
        "ring_failures": s.ring_failures,
        "prod_overruns": overruns,
        "prod_backwards": backwards,
        "per_ring": per_ring,
        "forwarded_per_sec": if secs > 0.0 { s.forwarded as f64 / secs } else { 0.0 },
        "traffic_seconds": traffic_secs,
        "forwarded_per_traffic_sec": traffic_secs.map(|t| s.forwarded as f64 / t.max(1e-9)),
    })
}

fn summary_text(
    s: &EngineStats,
    secs: f64,
    traffic_secs: Option<f64>,
    rings: &[RingLine],
    workers: usize,
) -> String {
    let overruns: u64 = rings.iter().map(|r| r.stats.prod_overrun).sum();
    let backwards: u64 = rings.iter().map(|r| r.stats.prod_backwards).sum();
    let rows = [
        (
            "taken",
            s.taken,
            "guest entries copied out (re-reads after a trap or error count again)",
        ),
        (
            "forwarded",
            s.forwarded,
            "commands into the physical queues",
        ),
        ("dropped", s.dropped, "PREFETCH_*"),
        ("trapped", s.trapped, "CFGI_STE*, completed by serve"),
        ("refused", s.refused, "rings stopped with CERROR_ILL"),
        ("guest syncs", s.guest_syncs, "guest CMD_SYNCs completed"),
        ("phys syncs", s.phys_syncs, "CMD_SYNCs the engine added"),
        ("batches", s.batches, ""),
        (
            "phys faults",
            s.phys_faults,
            "physical queue errors recovered",
        ),
        (
            "ring failures",
            s.ring_failures,
            "rings detached because their file shrank or failed",
        ),
        (
            "prod overruns",
            overruns,
            "polls that found PROD past a full ring or behind CONS",
        ),
        (
            "prod backwards",
            backwards,
            "polls that found PROD moved back over entries already read",
        ),
    ];
    let flowed = match traffic_secs {
        Some(t) => format!(
            "; {} over the {t:.3} s traffic flowed",
            per_sec(s.forwarded, t)
        ),
        None => "; no traffic".into(),
    };
    let mut out = format!(
        "serve: {secs:.2} s, {}, {}, {} forwarded over the run{flowed}\n",
        human::count(rings.len() as u64, "ring"),
        human::count(workers as u64, "worker"),
        per_sec(s.forwarded, secs)
    );
    for (name, n, what) in rows {
        out.push_str(&format!("  {name:<14}{n:>12}  {what}\n"));
    }
    for r in rings {
        out.push_str(&format!(
            "  ring {}: prod overruns {}, prod backwards {}  ({})\n",
            r.id.0,
            r.stats.prod_overrun,
            r.stats.prod_backwards,
            r.path.display()
        ));
    }
    out
}

/// Runs `vcmdq serve`.
pub fn run(mut args: ServeArgs) -> Result<ExitCode, CliError> {
    // Before any ring path is printed: a guest side may signal as soon as it sees one.
    catch_signals();
    if let Some(path) = args.config.take() {
        let from_file = read_config(&path)?;
        args.merge_config(from_file);
    }
    if args.rings.is_empty() && args.create_rings.is_empty() {
        return Err("no rings to serve: give --ring PATH or --create-ring viommu=N".into());
    }
    let rings = args.rings.len() + args.create_rings.len();
    if rings > MAX_RINGS {
        return Err(format!(
            "{rings} rings (--ring and --create-ring): one serve serves at most {MAX_RINGS} \
             (MAX_RINGS); run another serve for the rest"
        )
        .into());
    }
    let workers = args.workers.unwrap_or(1);
    let defaults = EngineConfig::default();
    let cfg = EngineConfig {
        workers,
        batch_limit: args.batch_limit.unwrap_or(defaults.batch_limit),
        ring_budget: args.ring_budget.unwrap_or(defaults.ring_budget),
        capture: args.capture.as_ref().map(vcmdq_trace::capture_to_file),
        ..defaults
    };
    // Checked here too so the error names serve's flags; a config file line sets the same.
    cfg.validate().map_err(|e| {
        engine_limit(
            &e,
            &[
                ("workers", "--workers"),
                ("batch_limit", "--batch-limit"),
                ("ring_budget", "--budget"),
            ],
        )
    })?;
    let placement = if args.hw_thread || args.hardware == Some(Hardware::Thread) {
        HwPlacement::Thread
    } else {
        HwPlacement::Inline
    };
    let (queues, _) = ModelQueue::for_workers(
        workers,
        args.phys_log2size.unwrap_or(DEFAULT_LOG2SIZE),
        &HwConfig::default(),
        placement,
    )?;
    let engine = Engine::start(cfg, queues)?;
    let attached = set_up(&engine, &args)?;
    let listed = (|| -> std::io::Result<()> {
        let mut out = out::stdout();
        for a in &attached {
            writeln!(
                out,
                "ring {} viommu={} log2size={} path={}",
                a.id.0,
                a.viommu,
                a.log2size,
                a.path.display()
            )?;
        }
        out.flush()
    })();
    match listed {
        // Nobody reads the paths (`serve | head -0`): serve still serves the rings, which a
        // guest may know of otherwise (--ring), and stops as it would have.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
        _ => {}
    }

    let stop = Arc::new(AtomicBool::new(false));
    if args.duration.is_none() && stdin_is_a_stop_switch() {
        watch_stdin(stop.clone())?;
    }
    let stderr_tty = std::io::stderr().is_terminal();
    // Once a second on a terminal unless --progress says otherwise.
    let every = args.progress.unwrap_or(Duration::from_secs(1));
    let live = !every.is_zero() && (stderr_tty || args.progress.is_some());
    let start = Instant::now();
    let deadline = args.duration.map(|d| start + Duration::from_secs_f64(d));
    let mut next_tick = start + every;
    let mut last = (start, 0u64);
    let mut traffic = Traffic::new(start);
    loop {
        let mut traps = 0;
        while let Some(t) = engine.next_trap() {
            traps += 1;
            if args.verbose {
                eprintln!(
                    "trap: ring {} viommu {} slot {:#x} entry {}: {}",
                    t.ring.0,
                    t.viommu,
                    t.slot,
                    t.seq,
                    text::format_raw(&t.cmd)
                );
            }
            // The ring may have failed meanwhile: nothing then waits for the trap.
            let _ = engine.complete_trap(t.ring);
        }
        for (ring, e) in engine.failed_rings() {
            eprintln!("serve: ring {} detached: {e}", ring.0);
        }
        let now = Instant::now();
        traffic.sample(now, || engine.stats().taken);
        if stop.load(Ordering::Relaxed)
            || SIGNALLED.load(Ordering::Relaxed)
            || deadline.is_some_and(|d| now >= d)
        {
            break;
        }
        if live && now >= next_tick {
            let s = engine.stats();
            let rate = per_sec(
                s.forwarded - last.1,
                now.duration_since(last.0).as_secs_f64(),
            );
            last = (now, s.forwarded);
            let line = counters_line(&s, now.duration_since(start).as_secs_f64(), &rate);
            if stderr_tty {
                eprint!("\r{line}\x1b[K");
            } else {
                eprintln!("{line}");
            }
            next_tick += every;
        }
        // A trapped command pauses its ring until it is completed: the engine wakes this
        // thread as soon as one comes, so it sleeps otherwise, yet no longer than the traffic
        // sampling, the next progress line or the deadline allow (nor than a signal may wait).
        if traps == 0 {
            let mut wait = Traffic::EVERY;
            if live {
                wait = wait.min(next_tick.saturating_duration_since(now));
            }
            if let Some(d) = deadline {
                wait = wait.min(d.saturating_duration_since(now));
            }
            engine.wait_for_trap(wait);
        }
    }
    if live && stderr_tty {
        eprintln!();
    }
    let stopped = Instant::now();
    let report = engine.shutdown();
    let secs = start.elapsed().as_secs_f64();
    let traffic_secs = traffic.secs(report.stats.taken, stopped);
    match (&report.capture, &args.capture) {
        (Some(Ok(records)), Some(path)) => {
            eprintln!("serve: captured {records} records to {}", path.display())
        }
        (Some(Err(why)), Some(path)) => {
            return Err(format!("capture to {}: {why}", path.display()).into())
        }
        _ => {}
    }
    let rings = ring_lines(&attached, &report.rings);
    let mut out = out::stdout();
    if args.json {
        writeln!(
            out,
            "{}",
            summary_json(&report.stats, secs, traffic_secs, &rings, workers)
        )?;
    } else {
        write!(
            out,
            "{}",
            summary_text(&report.stats, secs, traffic_secs, &rings, workers)
        )?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_lines_parse_like_options_and_the_command_line_wins() {
        let dir = std::env::temp_dir().join(format!("vcmdq-serve-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serve.conf");
        std::fs::write(
            &path,
            "# host\nviommu id=1,vmid=5,smmu=0\n--device id=1,smmu=0,psid=0x800\n\
             bind viommu=1,device=1,vsid=0x10\ncreate-ring viommu=1,log2size=4\n\
             workers 2\nallow-unsealed\n",
        )
        .unwrap();
        let cfg = read_config(&path).unwrap();
        assert_eq!(cfg.viommus, vec![ViommuConfig::new(1, 5, 0)]);
        assert_eq!(cfg.devices.len(), 1);
        assert_eq!(cfg.binds.len(), 1);
        assert_eq!(cfg.create_rings[0].log2size, 4);
        assert_eq!(cfg.workers, Some(2));
        assert!(cfg.allow_unsealed);
        let mut cli = ServeArgs::try_parse_from([
            "serve",
            "--workers",
            "3",
            "--viommu",
            "id=2,vmid=6,smmu=0",
        ])
        .unwrap();
        cli.merge_config(cfg);
        assert_eq!(cli.workers, Some(3));
        assert_eq!(cli.viommus.iter().map(|v| v.id).collect::<Vec<_>>(), [1, 2]);

        std::fs::write(&path, "viommu id=1,vmid=5,smmu=0\nviommu id=1,vmid=5\n").unwrap();
        let e = read_config(&path).unwrap_err().to_string();
        assert!(
            e.contains("serve.conf:2:") && e.contains("smmu is missing"),
            "{e}"
        );
        std::fs::write(&path, "frobnicate 3\n").unwrap();
        let e = read_config(&path).unwrap_err().to_string();
        assert!(
            e.contains("serve.conf:1:") && e.contains("frobnicate"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A value each option takes in a config file, so that a new option without one fails
    /// the test below until it is given one.
    fn sample(id: &str) -> Option<&'static str> {
        Some(match id {
            "viommu" => "id=1,vmid=5,smmu=0",
            "device" => "id=1,smmu=0,psid=0x800",
            "bind" => "viommu=1,device=1,vsid=0x10",
            "ring" => "/tmp/ring",
            "create-ring" => "viommu=1",
            "workers" => "2",
            "batch-limit" => "8",
            "hardware" => "thread",
            "progress" => "2s",
            "budget" => "16",
            "phys-log2size" => "4",
            "duration" => "1",
            "capture" => "/tmp/capture.vct",
            "config" => "/tmp/other.conf",
            _ => return None,
        })
    }

    #[test]
    fn every_option_in_a_config_file_reaches_the_command_or_is_refused() {
        use clap::CommandFactory;
        let dir = std::env::temp_dir().join(format!("vcmdq-serve-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serve.conf");
        // What a config file gives, as `run` merges it into an empty command line.
        let merged = |body: &str| {
            std::fs::write(&path, body).unwrap();
            let mut cli = ServeArgs::default();
            read_config(&path).map(|cfg| {
                cli.merge_config(cfg);
                format!("{cli:?}")
            })
        };
        let cmd = ServeArgs::command();
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if ["help", "version"].contains(&long) {
                continue;
            }
            // Another line after it: a later line must not undo an earlier one.
            let follower = if long == "verbose" {
                "progress"
            } else {
                "verbose"
            };
            let line = if arg.get_action().takes_values() {
                let v = sample(long).unwrap_or_else(|| panic!("give --{long} a sample value"));
                format!("{long} {v}")
            } else {
                long.to_string()
            };
            let got = merged(&format!("{line}\n{follower}\n"));
            if long == "config" {
                assert!(got.is_err(), "a config file naming another is refused");
                continue;
            }
            let got = got.unwrap_or_else(|e| panic!("{line}: {e}"));
            let without = merged(&format!("{follower}\n")).unwrap();
            assert_ne!(got, without, "`{line}` in a config file changed nothing");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
