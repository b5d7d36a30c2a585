//! `idle`: what an idle engine costs and how fast a sleeping worker wakes. Markdown on stdout.
//!
//! - Idle CPU: an engine of 1 and of 2 workers, each serving `RINGS_PER_WORKER` sealed memfd
//!   rings (one CMD_SYNC served on each first), left alone for the idle time; the process's
//!   CPU time (`getrusage`, user and system, every thread) over that time, as a percentage of
//!   one core. The same with unsealed-file rings, which have no SLEEPING word the engine can
//!   sleep on, so their worker polls with its backoff as every worker did before the sleep:
//!   the cost the sleep removes.
//! - Wake-up latency: one worker, one memfd ring. Each round waits until the worker has
//!   announced that it sleeps (SLEEPING = 1) and a little longer so that it is in its futex
//!   wait, then times from just before the guest writes one CMD_SYNC and rings the doorbell
//!   (which kicks) until the guest sees the CMD_SYNC completed (SYNC_COUNT): the kick, the
//!   wake-up, the translation, the publication into the physical queue (the zero-cost model,
//!   consumed inline) and the completion. The same with the worker awake: each round submits at
//!   once after the last completed, while the worker still polls (its `IDLE_SPIN`). And, for
//!   what the platform costs without the engine, a bare thread that sleeps with the same
//!   protocol (`vcmdq::ring::wake`) and answers a kick by storing a counter: the kernel's
//!   futex wake and the scheduler's wake-up of an idle CPU, which no engine can go below.
//!
//! The latency runs put the guest on CPU 0 and the worker (or the bare sleeper) on CPU 1, as a
//! guest's vCPU and an engine worker would be on their own cores: left to the scheduler, a
//! kicked worker is often woken on the CPU its guest spins on and waits for a scheduler tick
//! (milliseconds). With fewer than two CPUs nothing is pinned.
//!
//! `cargo run --release -p vcmdq-bench --bin idle [-- --idle-secs S --rounds N]`; `make idle`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use vcmdq::command::{opcode, RawCommand};
use vcmdq::engine::{Engine, EngineConfig, EngineStats};
use vcmdq::hwmodel::{HwConfig, HwPlacement, ModelQueue, DEFAULT_LOG2SIZE};
use vcmdq::ring::wake::{self, Wait};
use vcmdq::ring::{AttachOptions, GuestRing, HostRing};
use vcmdq::viommu::ViommuConfig;
use vcmdq_tools::affinity::{self, gettid, other_threads};

/// Rings each worker serves in the idle measurement.
const RINGS_PER_WORKER: usize = 4;
/// LOG2SIZE of every ring.
const RING_LOG2: u8 = 8;
/// How long any wait on the engine may take before the measurement gives up.
const WAIT_LIMIT: Duration = Duration::from_secs(30);
/// How long a round of the sleeping measurement waits after SLEEPING = 1 before it submits:
/// the worker sets the word before its re-check and its futex wait, both microseconds.
const SETTLE: Duration = Duration::from_millis(1);
/// A guest CMD_SYNC, CS=none.
const GUEST_SYNC: RawCommand = RawCommand::new(opcode::CMD_SYNC as u64, 0);

struct Args {
    idle: Duration,
    rounds: u64,
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("idle: {e}\nusage: idle [--idle-secs S] [--rounds N]");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("idle: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        idle: Duration::from_secs(2),
        rounds: 2000,
    };
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--idle-secs" => {
                let s: f64 = value
                    .parse()
                    .map_err(|e| format!("--idle-secs {value}: {e}"))?;
                a.idle = Duration::try_from_secs_f64(s)
                    .map_err(|e| format!("--idle-secs {value}: {e}"))?;
            }
            "--rounds" => {
                a.rounds = value
                    .parse()
                    .map_err(|e| format!("--rounds {value}: {e}"))?;
                if a.rounds == 0 {
                    return Err("--rounds must be at least 1".into());
                }
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(a)
}

fn run(args: &Args) -> Result<(), String> {
    println!(
        "Idle CPU: process CPU time (user + system, all threads) over {:.1} s of an engine \
         left alone, in percent of one core; {RINGS_PER_WORKER} rings per worker, each served \
         one CMD_SYNC first.\n",
        args.idle.as_secs_f64()
    );
    println!("| rings | workers | idle CPU % of a core | sleeps | sleep timeouts |");
    println!("|---|---:|---:|---:|---:|");
    for (label, backing) in [
        (
            "sealed memfd (SLEEPING word: the worker sleeps)",
            Backing::Memfd,
        ),
        (
            "unsealed file (no SLEEPING word: the worker polls)",
            Backing::File,
        ),
    ] {
        for workers in [1, 2] {
            let m = idle_cpu(workers, backing, args.idle)?;
            println!(
                "| {label} | {workers} | {:.2} | {} | {} |",
                m.percent, m.stats.sleeps, m.stats.sleep_timeouts
            );
        }
    }
    println!();
    println!(
        "Wake-up latency: from just before the guest writes one CMD_SYNC and rings the doorbell \
         (with its kick) until it sees the CMD_SYNC completed; one worker, one memfd ring, {} \
         rounds, in microseconds.\n",
        args.rounds
    );
    println!("| worker | p50 us | p99 us | p99.9 us | max us | rounds it slept before | kicks that woke it |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let bare = bare_futex(args.rounds)?;
    let us = |q: f64| bare.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "| no engine: a thread asleep the same way (SLEEPING, fence, futex_waitv), kicked, answers | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
        us(0.5),
        us(0.99),
        us(0.999),
        bare.max() as f64 / 1000.0,
        args.rounds,
        args.rounds,
    );
    for asleep in [true, false] {
        let w = wake_latency(asleep, args.rounds)?;
        let us = |q: f64| w.hist.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
            if asleep {
                "asleep (futex wait)"
            } else {
                "awake (polling)"
            },
            us(0.5),
            us(0.99),
            us(0.999),
            w.hist.max() as f64 / 1000.0,
            w.slept,
            w.stats.sleeps - w.stats.sleep_timeouts,
        );
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Backing {
    Memfd,
    File,
}

fn engine(workers: usize) -> Result<Engine, String> {
    let (queues, _) = ModelQueue::for_workers(
        workers,
        DEFAULT_LOG2SIZE,
        &HwConfig::zero_cost(),
        HwPlacement::Inline,
    )
    .map_err(|e| format!("physical queues: {e}"))?;
    let engine = Engine::start(
        EngineConfig {
            workers,
            ..Default::default()
        },
        queues,
    )
    .map_err(|e| format!("engine: {e}"))?;
    engine
        .create_viommu(ViommuConfig::new(1, 1, 0))
        .map_err(|e| format!("vIOMMU: {e}"))?;
    Ok(engine)
}

fn ring(engine: &Engine, backing: Backing, n: usize) -> Result<GuestRing, String> {
    let (guest, host) = match backing {
        Backing::Memfd => {
            let host =
                HostRing::create_sealed(RING_LOG2, 1).map_err(|e| format!("memfd ring: {e}"))?;
            let guest = GuestRing::open(host.path()).map_err(|e| format!("guest side: {e}"))?;
            (guest, host)
        }
        Backing::File => {
            let path = std::env::temp_dir().join(format!("vcmdq-idle-{}-{n}", std::process::id()));
            let guest = GuestRing::create(&path, RING_LOG2, 1)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let host = HostRing::attach_with(
                &path,
                AttachOptions {
                    allow_unsealed: true,
                },
            )
            .map_err(|e| format!("{}: {e}", path.display()))?;
            remove(&path);
            (guest, host)
        }
    };
    engine
        .attach_ring(host)
        .map_err(|e| format!("attach: {e}"))?;
    Ok(guest)
}

fn remove(path: &PathBuf) {
    // Both sides keep their mapping or descriptor: the name is no longer needed.
    let _ = std::fs::remove_file(path);
}

/// This process's CPU time so far, every thread, user and system.
fn cpu_time() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes a whole `rusage` into the pointer it is given, which points to
    // one; RUSAGE_SELF is always valid, so the call cannot fail and the value is initialised.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

struct Idle {
    percent: f64,
    stats: EngineStats,
}

fn idle_cpu(workers: usize, backing: Backing, idle: Duration) -> Result<Idle, String> {
    let engine = engine(workers)?;
    let mut guests = Vec::new();
    for n in 0..workers * RINGS_PER_WORKER {
        let mut g = ring(&engine, backing, n)?;
        g.submit(&[GUEST_SYNC]);
        g.wait_syncs(1, WAIT_LIMIT)
            .map_err(|e| format!("warm-up CMD_SYNC: {e}"))?;
        guests.push(g);
    }
    // Past the workers' spin after the last CMD_SYNC.
    std::thread::sleep(Duration::from_millis(50));
    let before = engine.stats();
    let (cpu0, t0) = (cpu_time(), Instant::now());
    std::thread::sleep(idle);
    let (cpu1, t1) = (cpu_time(), Instant::now());
    let report = engine.shutdown();
    let mut stats = report.stats;
    stats.sleeps -= before.sleeps;
    stats.sleep_timeouts -= before.sleep_timeouts;
    drop(guests);
    Ok(Idle {
        percent: 100.0 * (cpu1 - cpu0).as_secs_f64() / (t1 - t0).as_secs_f64(),
        stats,
    })
}

struct Wake {
    hist: Histogram<u64>,
    /// Rounds in which the worker had announced its sleep before the guest submitted.
    slept: u64,
    stats: EngineStats,
}

fn wake_latency(asleep: bool, rounds: u64) -> Result<Wake, String> {
    let engine = engine(1)?;
    let mut guest = ring(&engine, Backing::Memfd, 0)?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)
        .map_err(|e| format!("histogram: {e}"))?;
    // The engine's only thread here (one worker, its hardware inline) is the one that is not
    // this one.
    pin_apart(other_threads()?)?;
    let mut slept = 0;
    let before = engine.stats();
    for round in 1..=rounds {
        if asleep {
            let deadline = Instant::now() + WAIT_LIMIT;
            while !guest.engine_sleeping() {
                if Instant::now() > deadline {
                    return Err(format!(
                        "round {round}: the worker did not announce its sleep within {WAIT_LIMIT:?}"
                    ));
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            std::thread::sleep(SETTLE);
        }
        slept += u64::from(guest.engine_sleeping());
        let t0 = Instant::now();
        guest.push(&[GUEST_SYNC]);
        guest.doorbell();
        while guest.sync_count() < round {
            if t0.elapsed() > WAIT_LIMIT {
                return Err(format!(
                    "round {round}: the CMD_SYNC did not complete within {WAIT_LIMIT:?}"
                ));
            }
            std::hint::spin_loop();
        }
        let ns = t0.elapsed().as_nanos() as u64;
        hist.record(ns.max(1))
            .map_err(|e| format!("histogram: {e}"))?;
    }
    let mut stats = engine.shutdown().stats;
    stats.sleeps -= before.sleeps;
    stats.sleep_timeouts -= before.sleep_timeouts;
    Ok(Wake { hist, slept, stats })
}

/// Kick to answer of a thread sleeping as a worker does, with nothing else to do: the floor
/// under [`wake_latency`]'s sleeping figure.
fn bare_futex(rounds: u64) -> Result<Histogram<u64>, String> {
    let sleeping = AtomicU32::new(0);
    let (req, resp) = (AtomicU64::new(0), AtomicU64::new(0));
    let stop = AtomicBool::new(false);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)
        .map_err(|e| format!("histogram: {e}"))?;
    std::thread::scope(|s| {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (sleeping, req, resp, stop) = (&sleeping, &req, &resp, &stop);
        let sleeper = s.spawn(move || {
            let _ = tid_tx.send(gettid());
            loop {
                sleeping.store(1, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                let asked = req.load(Ordering::Acquire);
                let done = stop.load(Ordering::Acquire);
                if asked == resp.load(Ordering::Relaxed)
                    && !done
                    && wake::wait_any(&[sleeping], Duration::from_millis(100)) == Wait::Unsupported
                {
                    std::thread::sleep(Duration::from_micros(50));
                }
                sleeping.store(0, Ordering::Relaxed);
                resp.store(req.load(Ordering::Acquire), Ordering::Release);
                if done {
                    break;
                }
            }
        });
        let result = (|| {
            let tid = tid_rx.recv().map_err(|_| "the sleeper thread died")?;
            pin_apart(vec![tid])?;
            for round in 1..=rounds {
                let deadline = Instant::now() + WAIT_LIMIT;
                while sleeping.load(Ordering::SeqCst) == 0 {
                    if Instant::now() > deadline {
                        return Err(format!("bare futex round {round}: the thread never slept"));
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
                std::thread::sleep(SETTLE);
                let t0 = Instant::now();
                req.store(round, Ordering::Release);
                wake::kick(sleeping);
                while resp.load(Ordering::Acquire) < round {
                    if t0.elapsed() > WAIT_LIMIT {
                        return Err(format!("bare futex round {round}: no answer"));
                    }
                    std::hint::spin_loop();
                }
                hist.record((t0.elapsed().as_nanos() as u64).max(1))
                    .map_err(|e| format!("histogram: {e}"))?;
            }
            Ok(())
        })();
        stop.store(true, Ordering::Release);
        wake::kick(sleeping);
        let _ = sleeper.join();
        result
    })?;
    Ok(hist)
}

/// Pins the calling thread (the guest) and `others` apart, if there are two CPUs; one CPU
/// runs unpinned.
fn pin_apart(others: Vec<libc::pid_t>) -> Result<(), String> {
    // Not available_parallelism: it counts the CPUs this thread may run on, one once pinned.
    // SAFETY: sysconf only reads the configuration value named.
    if unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } < 2 {
        return Ok(());
    }
    // CPUs 0 and 1, not `affinity::pin_apart`'s first two allowed ones: this thread is pinned
    // more than once, and after the first time it is allowed one CPU only.
    affinity::pin(0, 0)?;
    for tid in others {
        affinity::pin(tid, 1)?;
    }
    Ok(())
}
