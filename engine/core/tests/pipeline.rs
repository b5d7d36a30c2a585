//! The pipeline end to end over real shared mappings (sealed memfds and plain files): many
//! guests on several workers with every policy outcome, traps completed by a control-plane
//! thread, physical faults, a flooding guest beside a quiet one, a tiny physical queue, unbind
//! racing traffic, vIOMMUs coming and going, and shutdown with work in flight.
//!
//! Every run is checked against the oracle per ring (the audit's final outcome of every slot
//! equals the oracle's on what the ring holds at the end), and against the hardware's log: the
//! commands of each ring that the hardware consumed are exactly the oracle's forwarded
//! commands of that ring, in ring order: nothing lost, nothing doubled, nothing reordered.
//! No test asserts a time; fairness and the unbind barrier are checked through the order of
//! events in the audit.
#![cfg(not(loom))]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{
    backoff, bindings, c, forwarded, hw, join_named, outcomes, panic_text, ring_pair, syncs_done,
    Backing, Driver, Log, Model, SetOnDrop, TestEngine, T,
};
use vcmdq::command::{opcode, RawCommand};
use vcmdq::engine::{AuditRecord, Engine, EngineConfig, EngineReport, RingId};
use vcmdq::hwmodel::{Fault, HwConfig, HwPlacement};
use vcmdq::mock::{FixPolicy, Rng};
use vcmdq::oracle;
use vcmdq::queue::CError;
use vcmdq::translate::{RefuseReason, SlotOutcome};
use vcmdq::viommu::{DeviceId, Profile, ViommuConfig};

/// The engine every test here runs: two workers with the audit on (every check reads it), on
/// model queues whose hardware is `hw`; `tune` changes what a test needs otherwise.
fn start_engine(hw: HwConfig, tune: impl FnOnce(&mut EngineConfig, &mut Model)) -> TestEngine {
    let mut cfg = EngineConfig {
        workers: 2,
        audit: true,
        ..Default::default()
    };
    let mut model = Model {
        hw,
        ..Model::default()
    };
    tune(&mut cfg, &mut model);
    TestEngine::with_model(cfg, model)
}

/// The pSID of the device a test binds as `vsid` in vIOMMU `viommu`.
fn psid(viommu: u32, vsid: u32) -> u32 {
    (viommu << 8) | vsid
}

/// One guest of a topology: its vIOMMU and the two vSIDs its devices have there.
#[derive(Clone, Copy, Debug)]
struct Seat {
    viommu: u32,
    vsids: [u32; 2],
}

/// vIOMMUs `1..=viommus` (VMID 10 + id; the last one `tegra241` if `tegra_last`), and `guests`
/// guests spread over them round robin, each with two devices of its own.
struct Topology {
    cfgs: Vec<ViommuConfig>,
    seats: Vec<Seat>,
}

impl Topology {
    fn new(viommus: u32, guests: usize, tegra_last: bool) -> Topology {
        let cfgs = (1..=viommus)
            .map(|v| {
                let mut cfg = ViommuConfig::new(v, 10 + v as u16, 0);
                if tegra_last && v == viommus && viommus > 1 {
                    cfg.profile = Profile::Tegra241;
                }
                cfg
            })
            .collect();
        let seats = (0..guests)
            .map(|i| {
                let k = (i as u32) / viommus;
                Seat {
                    viommu: (i as u32) % viommus + 1,
                    vsids: [0x10 + 2 * k, 0x11 + 2 * k],
                }
            })
            .collect();
        Topology { cfgs, seats }
    }

    fn vmids(&self) -> Vec<u16> {
        self.cfgs.iter().map(|c| c.vmid).collect()
    }

    fn psids(&self) -> Vec<u32> {
        self.seats
            .iter()
            .flat_map(|s| s.vsids.map(|v| psid(s.viommu, v)))
            .collect()
    }

    fn cfg(&self, viommu: u32) -> &ViommuConfig {
        &self.cfgs[viommu as usize - 1]
    }

    /// Every binding of `viommu`, vSID -> pSID.
    fn bindings(&self, viommu: u32) -> HashMap<u32, u32> {
        self.seats
            .iter()
            .filter(|s| s.viommu == viommu)
            .flat_map(|s| s.vsids.map(|v| (v, psid(viommu, v))))
            .collect()
    }

    /// Creates the vIOMMUs and devices and binds them.
    fn build(&self, engine: &Engine) {
        for cfg in &self.cfgs {
            engine.create_viommu(*cfg).unwrap();
        }
        for s in &self.seats {
            let v = engine.viommu(s.viommu).unwrap();
            for vsid in s.vsids {
                let p = psid(s.viommu, vsid);
                engine.devices().add_device(DeviceId(p), 0, p).unwrap();
                v.set_dev_id(DeviceId(p), vsid).unwrap();
            }
        }
    }

    /// Attaches one ring per guest, alternating sealed memfds and plain files, of 2^6..2^8
    /// slots; guest `i` is ring `i` if the engine had no ring before.
    fn attach(&self, engine: &Engine, fix: FixPolicy, log2: impl Fn(usize) -> u8) -> Vec<Driver> {
        self.seats
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let backing = if i % 2 == 0 {
                    Backing::Sealed
                } else {
                    Backing::File
                };
                let (guest, host) = ring_pair(backing, log2(i), s.viommu);
                let ring = engine.attach_ring(host).unwrap();
                Driver::new(guest, ring, fix.clone())
            })
            .collect()
    }

    /// The guest whose command the hardware consumed, from its ASID (TLBIs carry the guest's
    /// index) or its pSID; `None` for the engine's CMD_SYNCs.
    fn owner(&self, cmd: &RawCommand) -> Option<usize> {
        match cmd.opcode() {
            opcode::CMD_SYNC => None,
            opcode::TLBI_NH_VA | opcode::TLBI_NH_ASID => Some((cmd.d0() >> 48) as usize),
            opcode::ATC_INV | opcode::CFGI_CD => {
                let sid = (cmd.d0() >> 32) as u32;
                let i = self
                    .seats
                    .iter()
                    .position(|s| s.vsids.iter().any(|&v| psid(s.viommu, v) == sid));
                Some(i.unwrap_or_else(|| panic!("the hardware saw {cmd:?}, of no guest")))
            }
            _ => panic!("the hardware saw {cmd:?}, which no guest sends"),
        }
    }

    /// The hardware's log split by guest, each in the order consumed.
    fn split(&self, log: &Log) -> Vec<Vec<RawCommand>> {
        let mut per = vec![Vec::new(); self.seats.len()];
        for cmd in log.lock().unwrap().iter() {
            if let Some(i) = self.owner(cmd) {
                per[i].push(*cmd);
            }
        }
        per
    }

    /// The checks every test makes: per guest, the audit's final outcomes equal the oracle's
    /// on what the ring holds, the hardware consumed exactly the forwarded commands in ring
    /// order, and the guest CMD_SYNCs were signalled once each, in ring order. Returns each
    /// guest's outcomes.
    fn check(&self, report: &EngineReport, log: &Log, drivers: &[Driver]) -> Vec<Vec<SlotOutcome>> {
        let hw = self.split(log);
        drivers
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let seat = self.seats[i];
                let got = outcomes(&report.audit, d.ring);
                let want = oracle::translate_all(
                    self.cfg(seat.viommu),
                    &self.bindings(seat.viommu),
                    &d.written[..got.len().min(d.written.len())],
                    false,
                );
                assert_eq!(
                    got.len(),
                    d.written.len(),
                    "guest {i}: entries accounted for"
                );
                assert_eq!(got, want, "guest {i}: the audit against the oracle");
                assert_eq!(
                    hw[i],
                    forwarded(&want),
                    "guest {i}: what the hardware consumed of this ring, in order"
                );
                let sync_seqs: Vec<u64> = want
                    .iter()
                    .enumerate()
                    .filter(|(_, o)| matches!(o, SlotOutcome::Sync { .. }))
                    .map(|(s, _)| s as u64)
                    .collect();
                assert_eq!(
                    syncs_done(&report.audit, d.ring),
                    sync_seqs,
                    "guest {i}: every CMD_SYNC signalled once, in ring order"
                );
                assert_eq!(d.guest().sync_count(), sync_seqs.len() as u64);
                got
            })
            .collect()
    }
}

/// One random command of guest `g` (seat `s`), numbered `n`: forwarded, dropped, trapped or
/// (with `hostile`) refused ones. Forwarded commands name the guest (ASID `g` or one of its
/// pSIDs) so that the hardware log can be split by guest.
fn command(rng: &mut Rng, g: usize, s: Seat, n: u64, hostile: bool) -> RawCommand {
    let vsid = s.vsids[rng.below(2) as usize];
    let junk_vmid = rng.below(1 << 16);
    let addr = (n & 0xf_ffff) << 12;
    let roll = rng.below(100);
    match roll {
        // The non-range form: TTL is RES0 without a granule (docs/rules.md).
        0..=29 => c(&format!(
            "TLBI_NH_VA vmid={junk_vmid} asid={g} addr={addr:#x} leaf"
        )),
        30..=37 => c(&format!(
            "TLBI_NH_VA asid={g} addr={addr:#x} tg=4k num={} scale=1",
            rng.below(32)
        )),
        38..=49 => c(&format!("TLBI_NH_ASID vmid={junk_vmid} asid={g}")),
        50..=69 => c(&format!("ATC_INV sid={vsid:#x} addr={addr:#x} size=0")),
        70..=77 => c(&format!(
            "CFGI_CD sid={vsid:#x} ssid={:#x} leaf",
            n & 0xfffff
        )),
        78..=82 => c(&format!("PREFETCH_CONFIG sid={vsid:#x}")),
        83..=85 => c(&format!("PREFETCH_ADDR sid={vsid:#x} addr={addr:#x}")),
        86..=89 => c(&format!("CFGI_STE sid={vsid:#x} leaf")),
        90..=91 => c(&format!("CFGI_STE_RANGE sid={vsid:#x} range=1")),
        _ if !hostile => c(&format!("ATC_INV sid={vsid:#x} size=52")),
        92 => c("ATC_INV sid=0x99 size=52"),
        93 => c("TLBI_EL2_ALL"),
        94 => RawCommand::new(u64::from(opcode::TLBI_NH_ASID) | (1 << 8), 0),
        95 => RawCommand::new(0x42, 0),
        96 => c("CMD_SYNC cs=3"),
        97 => c(&format!("CFGI_CD sid={vsid:#x} ssec")),
        98 => c(&format!("ATC_INV sid={vsid:#x} size=60")),
        // NUM=1 with TG=0: the text form refuses to write it.
        _ => RawCommand::new(
            u64::from(opcode::TLBI_NH_VA) | (1 << 12) | ((g as u64) << 48),
            0,
        ),
    }
}

/// A batch of 1..=63 random commands of guest `g` and the CMD_SYNC that ends it.
fn batch(rng: &mut Rng, g: usize, s: Seat, n: &mut u64, hostile: bool) -> Vec<RawCommand> {
    let len = 1 + rng.below(63) as usize;
    let mut cmds: Vec<RawCommand> = (0..len)
        .map(|_| {
            *n += 1;
            command(rng, g, s, *n, hostile)
        })
        .collect();
    let cs = rng.below(3);
    cmds.push(c(&format!(
        "CMD_SYNC cs={cs} msidata={:#x} msiaddr=0xfee0_0000",
        *n as u32
    )));
    cmds
}

/// Hands each trapped command back in order, checking that each ring's traps come in ring
/// order and only from the ring's own vIOMMU; records them by ring.
fn complete_traps(engine: &Engine, done: &AtomicBool, seen: &Mutex<HashMap<RingId, Vec<u64>>>) {
    let mut spins = 0;
    while !done.load(Ordering::Acquire) {
        let Some(t) = engine.next_trap() else {
            spins += 1;
            backoff(spins);
            continue;
        };
        spins = 0;
        assert!(
            matches!(t.cmd.opcode(), opcode::CFGI_STE | opcode::CFGI_STE_RANGE),
            "{t:?}"
        );
        let mut seen = seen.lock().unwrap();
        let ring = seen.entry(t.ring).or_default();
        assert!(
            ring.last().is_none_or(|&l| l < t.seq),
            "trap {t:?} after {ring:?}: out of order or twice"
        );
        ring.push(t.seq);
        drop(seen);
        engine.complete_trap(t.ring).unwrap();
    }
}

/// The sequence numbers of the trapped entries in `outcomes`.
fn trapped(outcomes: &[SlotOutcome]) -> Vec<u64> {
    outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o, SlotOutcome::Trapped(_)))
        .map(|(s, _)| s as u64)
        .collect()
}

fn count(outcomes: &[Vec<SlotOutcome>], f: impl Fn(&SlotOutcome) -> bool) -> u64 {
    outcomes.iter().flatten().filter(|o| f(o)).count() as u64
}

/// Runs at least `batches` random batches on every guest, each guest on a thread of its own,
/// while a control-plane thread completes traps and `beside` runs on another thread; guests go
/// on until `beside` returns. Returns the traps seen per ring.
fn run_guests(
    engine: &TestEngine,
    topo: &Topology,
    drivers: &mut [Driver],
    batches: usize,
    hostile: bool,
    beside: impl FnOnce() + Send,
) -> HashMap<RingId, Vec<u64>> {
    let done = AtomicBool::new(false);
    let beside_done = AtomicBool::new(false);
    let traps = Mutex::new(HashMap::new());
    std::thread::scope(|s| {
        s.spawn(|| complete_traps(engine, &done, &traps));
        let beside = s.spawn(|| {
            // Set even if `beside` panics, so that the guests stop.
            struct Done<'a>(&'a AtomicBool);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Release);
                }
            }
            let _done = Done(&beside_done);
            beside();
        });
        let guests: Vec<_> = drivers
            .iter_mut()
            .enumerate()
            .map(|(g, d)| {
                let seat = topo.seats[g];
                let beside_done = &beside_done;
                s.spawn(move || {
                    let mut rng = Rng::new(0x5eed_0000 + g as u64);
                    let mut n = 0;
                    let mut i = 0;
                    while i < batches || !beside_done.load(Ordering::Acquire) {
                        let cmds = batch(&mut rng, g, seat, &mut n, hostile);
                        d.batch(&cmds).unwrap_or_else(|e| panic!("guest {g}: {e}"));
                        i += 1;
                    }
                })
            })
            .collect();
        let mut results = vec![(
            "the control plane beside the guests".to_string(),
            beside.join(),
        )];
        // Join every guest before stopping the trap thread (each of their waits is bounded),
        // then fail naming a dead engine thread (the cause of a guest's timeout) or a guest.
        results.extend(
            guests
                .into_iter()
                .enumerate()
                .map(|(g, h)| (format!("guest {g}"), h.join())),
        );
        done.store(true, Ordering::Release);
        engine.check_alive();
        for (who, r) in results {
            if let Err(p) = r {
                panic!("{who} panicked: {}", panic_text(&p));
            }
        }
    });
    traps.into_inner().unwrap()
}

/// 16 guests on 4 vIOMMUs (one `tegra241`) and 2 workers, every policy outcome in the mix:
/// forwarded, dropped, trapped (completed in order by a control-plane thread), refused (the
/// guest overwrites the slot with a CMD_SYNC and acknowledges, as Linux does).
#[test]
fn many_guests_every_outcome_against_the_oracle() {
    let topo = Topology::new(4, 16, true);
    let (hwcfg, log) = hw(&topo.vmids(), &topo.psids());
    let engine = start_engine(hwcfg, |_, _| {});
    topo.build(&engine);
    let mut drivers = topo.attach(&engine, FixPolicy::LikeLinux, |i| 6 + (i % 3) as u8);
    let traps = run_guests(&engine, &topo, &mut drivers, 30, true, || {});
    assert!(engine.failed_rings().is_empty());
    let report = engine.shutdown();
    let all = topo.check(&report, &log, &drivers);

    for (g, d) in drivers.iter().enumerate() {
        let want = trapped(&all[g]);
        assert_eq!(
            traps.get(&d.ring).cloned().unwrap_or_default(),
            want,
            "guest {g}: every trapped command reached the control plane once, in ring order"
        );
        // Each stop the guest saw is a command the policy refuses, at the slot the audit says.
        let refused: Vec<u64> = report
            .audit
            .iter()
            .filter_map(|r| match *r {
                AuditRecord::Slot {
                    ring,
                    seq,
                    outcome: SlotOutcome::Refused { .. },
                } if ring == d.ring => Some(seq),
                _ => None,
            })
            .collect();
        let stops: Vec<u64> = d.stops.iter().map(|&(s, _)| s).collect();
        assert_eq!(stops, refused, "guest {g}: stops where the policy refused");
        assert!(d.stops.iter().all(|&(_, e)| e == CError::Ill));
    }
    let s = report.stats;
    let is = |f: fn(&SlotOutcome) -> bool| count(&all, f);
    assert_eq!(s.forwarded, is(|o| matches!(o, SlotOutcome::Forwarded(_))));
    assert_eq!(s.dropped, is(|o| matches!(o, SlotOutcome::Dropped)));
    assert_eq!(s.trapped, is(|o| matches!(o, SlotOutcome::Trapped(_))));
    assert_eq!(s.guest_syncs, is(|o| matches!(o, SlotOutcome::Sync { .. })));
    assert_eq!(
        s.refused,
        drivers.iter().map(|d| d.stops.len() as u64).sum::<u64>()
    );
    // The mix really had every outcome, on both profiles.
    assert!(s.forwarded > 0 && s.dropped > 0 && s.trapped > 0 && s.refused > 0);
    let tegra_refused = drivers
        .iter()
        .enumerate()
        .filter(|(g, _)| topo.seats[*g].viommu == 4)
        .map(|(_, d)| d.stops.len())
        .sum::<usize>();
    assert!(tegra_refused > 0);
}

/// Injected physical faults (CERROR_ILL, CERROR_ABT, CERROR_ATC_INV_SYNC, a stall) and a slow
/// consumer, with the hardware inline or on its own thread, and (`hostile`) refused commands
/// in the mix: each fault stops the ring whose command failed, at that command; the guest
/// acknowledges (retrying, or overwriting an ILL command with a CMD_SYNC as Linux does); every
/// command still reaches the hardware exactly once, in ring order.
fn faults(placement: HwPlacement, fix: FixPolicy, hostile: bool) {
    let topo = Topology::new(2, 4, false);
    let (mut hwcfg, log) = hw(&topo.vmids(), &topo.psids());
    for f in [
        Fault::Ill { at: 3 },
        Fault::Ill { at: 50 },
        Fault::Abt { at: 120 },
        Fault::AtcInvSync { at: 200 },
        Fault::Stall {
            at: 300,
            for_: Duration::from_millis(2),
        },
        Fault::Ill { at: 400 },
        Fault::Abt { at: 401 },
        Fault::AtcInvSync { at: 700 },
    ] {
        hwcfg = hwcfg.with_fault(f);
    }
    hwcfg.slow = Some(Duration::from_micros(1));
    let engine = start_engine(hwcfg, |_, m| m.placement = placement);
    topo.build(&engine);
    let mut drivers = topo.attach(&engine, fix, |_| 7);
    run_guests(&engine, &topo, &mut drivers, 30, hostile, || {});
    let (report, hardware) = engine.shutdown_with_hardware();
    topo.check(&report, &log, &drivers);
    let hw_errors: u64 = hardware.iter().map(|h| h.total_errors()).sum();
    assert_eq!(report.stats.phys_faults, hw_errors);
    assert!(hardware.iter().all(|h| h.stalls == 1));
    let mut phys_stops = 0;
    for (g, d) in drivers.iter().enumerate() {
        // Where the ring stopped: each physical fault, and each refusal that a fault on an
        // earlier entry did not void before it took effect.
        let mut want: Vec<(u64, CError, bool)> = Vec::new();
        for r in &report.audit {
            match *r {
                AuditRecord::PhysFault { ring, seq, cerror } if ring == d.ring => {
                    want.retain(|&(s, _, phys)| phys || s <= seq);
                    want.push((seq, cerror, true));
                }
                AuditRecord::Slot {
                    ring,
                    seq,
                    outcome: SlotOutcome::Refused { cerror, .. },
                } if ring == d.ring => want.push((seq, cerror, false)),
                _ => {}
            }
        }
        phys_stops += want.iter().filter(|w| w.2).count();
        let want: Vec<(u64, CError)> = want.into_iter().map(|(s, e, _)| (s, e)).collect();
        assert_eq!(
            d.stops, want,
            "guest {g}: stopped exactly where its commands failed or were refused"
        );
    }
    // A fault on a command taken back (a no-op CMD_SYNC now) stops no guest.
    assert!(
        phys_stops > 0 && phys_stops as u64 <= hw_errors,
        "{phys_stops} stops, {hw_errors} faults"
    );
    for e in [CError::Ill, CError::Abt, CError::AtcInvSync] {
        assert!(
            hardware.iter().any(|h| h.errors[e.code() as usize] > 0),
            "no {e} raised"
        );
    }
}

#[test]
fn physical_faults_with_inline_hardware_lose_and_double_nothing() {
    faults(HwPlacement::Inline, FixPolicy::Retry, false);
}

#[test]
fn physical_faults_with_a_hardware_thread_and_a_hostile_guest_lose_and_double_nothing() {
    faults(HwPlacement::Thread, FixPolicy::LikeLinux, true);
}

/// A guest that keeps its ring full beside a quiet guest that sends one command and a
/// CMD_SYNC, one worker, a slow consumer (inline or on its own thread). Between the quiet
/// guest's doorbell and its sync's completion the flooder gets a few ring budgets published,
/// not a physical queue's worth: without the budget (per pass, and of entries in flight) the
/// flooder would fill the physical queue and the quiet sync would wait behind all of it.
fn flood(placement: HwPlacement) {
    const BUDGET: usize = 32;
    let (mut hwcfg, _log) = hw(&[11, 12], &[]);
    hwcfg.slow = Some(Duration::from_micros(5));
    let engine = start_engine(hwcfg, |cfg, m| {
        cfg.workers = 1;
        cfg.ring_budget = BUDGET;
        cfg.batch_limit = BUDGET;
        m.log2size = 10;
        m.placement = placement;
    });
    engine.create_viommu(ViommuConfig::new(1, 11, 0)).unwrap();
    engine.create_viommu(ViommuConfig::new(2, 12, 0)).unwrap();
    let (mut flooder, host) = ring_pair(Backing::Sealed, 12, 1);
    let flood = engine.attach_ring(host).unwrap();
    let (mut quiet, host) = ring_pair(Backing::File, 4, 2);
    let quiet_ring = engine.attach_ring(host).unwrap();
    let stop = AtomicBool::new(false);
    let (t_quiet, rounds) = std::thread::scope(|s| {
        // The flooder stops even when this thread fails.
        let _stop = SetOnDrop(&stop);
        let flooding = s.spawn(|| {
            let cmds: Vec<RawCommand> = (0..4096u64)
                .map(|n| RawCommand::new(u64::from(opcode::TLBI_NH_ASID) | (n << 48), 0))
                .collect();
            let mut spins = 0;
            while !stop.load(Ordering::Acquire) {
                if flooder.submit(&cmds) == 0 {
                    spins += 1;
                    backoff(spins);
                } else {
                    spins = 0;
                }
            }
        });
        engine.until("the engine takes the flooder's first entries", || {
            engine.stats().taken > 0
        });
        let mut t_quiet = Vec::new();
        // A few rounds: each one a quiet sync in the middle of the flood.
        for round in 1..=5u64 {
            quiet.submit(&[c("TLBI_NH_ASID asid=1"), c("CMD_SYNC")]);
            // After the doorbell: the window measured below can only be shorter than the real
            // one, never longer, whatever the scheduler does.
            t_quiet.push(Instant::now());
            quiet.wait_syncs(round, T).unwrap();
        }
        stop.store(true, Ordering::Release);
        join_named("the flooding guest", T, flooding);
        (t_quiet, 5)
    });
    let report = engine.shutdown();
    let epoch = report.epoch.unwrap();
    let done: Vec<usize> = report
        .audit
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r, AuditRecord::SyncDone { ring, .. } if *ring == quiet_ring))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(done.len(), rounds);
    for (round, (&at, t)) in done.iter().zip(&t_quiet).enumerate() {
        let since = t.duration_since(epoch).as_nanos() as u64;
        // One worker: its audit is in the order things happened.
        let flooded: u64 = report.audit[..at]
            .iter()
            .filter_map(|r| match *r {
                AuditRecord::Published {
                    ring,
                    first,
                    end,
                    t,
                } if ring == flood && t >= since => Some(end - first),
                _ => None,
            })
            .sum();
        assert!(
            flooded <= 4 * BUDGET as u64,
            "round {round}: {flooded} flooder entries were published while the quiet guest waited for its sync"
        );
    }
    let flooded: u64 = report.audit[..*done.last().unwrap()]
        .iter()
        .filter_map(|r| match *r {
            AuditRecord::Published {
                ring, first, end, ..
            } if ring == flood => Some(end - first),
            _ => None,
        })
        .sum();
    assert!(flooded > 0, "the flooder was served beside the quiet guest");
}

#[test]
fn a_flooding_guest_gets_its_budget_and_the_quiet_one_is_served_beside_it() {
    flood(HwPlacement::Inline);
}

/// The hardware on its own thread: passes come fast while it works, so the budget per pass
/// alone would let the flooder fill the physical queue; its budget of entries in flight holds
/// it to its share.
#[test]
fn a_flooding_guest_is_held_to_its_share_of_a_hardware_thread() {
    flood(HwPlacement::Thread);
}

/// A physical queue of 4, 8 and 16 entries under guest rings of 1024 and batches of up to 63
/// commands and one of 900: the engine never publishes more than fits, waits while the queue
/// is full, and loses, doubles and reorders nothing.
#[test]
fn a_tiny_physical_queue_applies_back_pressure() {
    for phys in 2..=4u8 {
        let topo = Topology::new(2, 4, false);
        let (mut hwcfg, log) = hw(&topo.vmids(), &topo.psids());
        hwcfg.slow = Some(Duration::from_micros(1));
        let engine = start_engine(hwcfg, |_, m| {
            m.log2size = phys;
            m.placement = HwPlacement::Thread;
        });
        topo.build(&engine);
        let mut drivers = topo.attach(&engine, FixPolicy::LikeLinux, |_| 10);
        let big = std::thread::scope(|s| {
            // One guest sends a batch far larger than the physical queue in one doorbell.
            let d = &mut drivers[0];
            let seat = topo.seats[0];
            let h = s.spawn(move || {
                let mut rng = Rng::new(7);
                let mut cmds: Vec<RawCommand> = (0..900)
                    .map(|n| command(&mut rng, 0, seat, n, false))
                    .filter(|c| !matches!(c.opcode(), opcode::CFGI_STE | opcode::CFGI_STE_RANGE))
                    .collect();
                cmds.push(c("CMD_SYNC"));
                d.batch(&cmds).unwrap();
                cmds.len()
            });
            join_named("the guest with the big batch", 3 * T, h)
        });
        run_guests(&engine, &topo, &mut drivers, 8, false, || {});
        let report = engine.shutdown();
        let all = topo.check(&report, &log, &drivers);
        let entries = 1u64 << phys;
        let s = report.stats;
        // Each batch went into the queue in one publish, so none was larger than the queue.
        assert!(
            s.batches * entries >= s.forwarded + s.phys_syncs,
            "phys {phys}: {s:?}"
        );
        assert!(all[0].len() >= big);
    }
}

/// ATC_INV of guest ring `g`, numbered `n` (in its address, so the hardware log tells rings
/// and commands apart).
fn atc_inv(vsid: u32, g: usize, n: u64) -> RawCommand {
    c(&format!(
        "ATC_INV sid={vsid:#x} addr={:#x} size=0",
        (((g as u64) << 24) | n) << 12
    ))
}

/// Two guests on two workers hammer ATC_INV on vSID 0x10 while the control plane unbinds it,
/// leaves it unbound a moment, binds it again, a hundred times, and finally unbinds it for good.
/// Rule 5: no command carrying its pSID is published between an `unset_dev_id` returning and
/// the next `set_dev_id` starting; while it is unbound, commands on the vSID are refused with
/// CERROR_ILL at their slot; after the last unbind every such command is refused.
#[test]
fn unbind_is_a_barrier_while_guests_hammer_the_vsid() {
    const CYCLES: usize = 100;
    let (hwcfg, log) = hw(&[11], &[0x800, 0x801]);
    let engine = start_engine(hwcfg, |_, _| {});
    let cfg = ViommuConfig::new(1, 11, 0);
    let v = engine.create_viommu(cfg).unwrap();
    engine.devices().add_device(DeviceId(1), 0, 0x800).unwrap();
    engine.devices().add_device(DeviceId(2), 0, 0x801).unwrap();
    v.set_dev_id(DeviceId(1), 0x10).unwrap();
    v.set_dev_id(DeviceId(2), 0x11).unwrap();
    let mut drivers: Vec<Driver> = [Backing::Sealed, Backing::File]
        .into_iter()
        .map(|b| {
            let (guest, host) = ring_pair(b, 8, 1);
            Driver::new(
                guest,
                engine.attach_ring(host).unwrap(),
                FixPolicy::LikeLinux,
            )
        })
        .collect();
    let gone = AtomicBool::new(false);
    // Bumped at each rebind; each guest stores the value it read when it started its last
    // completed batch, so the control plane can wait for a batch run wholly while bound.
    let bound_epoch = AtomicU64::new(1);
    let seen = [AtomicU64::new(0), AtomicU64::new(0)];
    // (unbind returned, rebind started): the windows in which the vSID is unbound.
    let windows = std::thread::scope(|s| {
        // The hammering guests stop even when this thread fails.
        let _gone = SetOnDrop(&gone);
        let hammers: Vec<_> = drivers
            .iter_mut()
            .enumerate()
            .map(|(g, d)| {
                let (gone, bound_epoch, seen) = (&gone, &bound_epoch, &seen[g]);
                s.spawn(move || {
                    let mut n = 0;
                    while !gone.load(Ordering::Acquire) {
                        let epoch = bound_epoch.load(Ordering::Acquire);
                        let mut cmds = Vec::new();
                        for _ in 0..15 {
                            n += 1;
                            cmds.push(atc_inv(0x10, g, n));
                        }
                        n += 1;
                        cmds.push(atc_inv(0x11, g, n));
                        cmds.push(c("CMD_SYNC"));
                        d.batch(&cmds).unwrap();
                        seen.store(epoch, Ordering::Release);
                    }
                    // After the last unbind returned, the vSID is refused.
                    let before = d.stops.len();
                    d.batch(&[
                        atc_inv(0x11, g, n + 1),
                        atc_inv(0x10, g, n + 2),
                        c("CMD_SYNC"),
                    ])
                    .unwrap();
                    assert_eq!(d.stops.len(), before + 1, "guest {g}: refused after unbind");
                })
            })
            .collect();
        let mut windows = Vec::new();
        for _ in 0..CYCLES {
            // Each guest ran a batch while bound, so that both forward and get refused.
            let e = bound_epoch.load(Ordering::Acquire);
            engine.until(
                "each guest completes a batch while the vSID is bound",
                || seen.iter().all(|x| x.load(Ordering::Acquire) >= e),
            );
            assert_eq!(v.unset_dev_id(DeviceId(1)).unwrap(), 0x10);
            let unbound = Instant::now();
            // Unbound for a while: commands translated before the unbind that were published
            // late would land in this window.
            std::thread::sleep(Duration::from_millis(1));
            let rebind = Instant::now();
            v.set_dev_id(DeviceId(1), 0x10).unwrap();
            bound_epoch.fetch_add(1, Ordering::AcqRel);
            windows.push((unbound, rebind));
        }
        v.unset_dev_id(DeviceId(1)).unwrap();
        windows.push((Instant::now(), Instant::now() + Duration::from_secs(3600)));
        gone.store(true, Ordering::Release);
        // The device is free for another VM at once.
        let v2 = engine.create_viommu(ViommuConfig::new(2, 12, 0)).unwrap();
        v2.set_dev_id(DeviceId(1), 0x20).unwrap();
        for (g, h) in hammers.into_iter().enumerate() {
            join_named(&format!("hammering guest {g}"), 3 * T, h);
        }
        windows
    });
    let report = engine.shutdown();
    let epoch = report.epoch.unwrap();
    let ns = |t: Instant| t.saturating_duration_since(epoch).as_nanos() as u64;
    let windows: Vec<(u64, u64)> = windows.iter().map(|&(a, b)| (ns(a), ns(b))).collect();
    let hwlog = log.lock().unwrap().clone();
    let bound = bindings(&[(0x10, 0x800), (0x11, 0x801)]);
    let unbound = bindings(&[(0x11, 0x801)]);
    let mut refusals = 0;
    for (g, d) in drivers.iter().enumerate() {
        let got = outcomes(&report.audit, d.ring);
        assert_eq!(got.len(), d.written.len());
        // Each slot was translated either with the binding or without it.
        for (seq, (o, cmd)) in got.iter().zip(&d.written).enumerate() {
            let with = oracle::translate_one(&cfg, &bound, *cmd);
            let without = oracle::translate_one(&cfg, &unbound, *cmd);
            assert!(
                *o == with || *o == without,
                "guest {g} entry {seq}: {o:?}, neither {with:?} nor {without:?}"
            );
        }
        let stops: Vec<u64> = d.stops.iter().map(|&(s, _)| s).collect();
        let refused: Vec<u64> = report
            .audit
            .iter()
            .filter_map(|r| match *r {
                AuditRecord::Slot {
                    ring,
                    seq,
                    outcome:
                        SlotOutcome::Refused {
                            reason: RefuseReason::UnknownVsid { vsid: 0x10, .. },
                            cerror: CError::Ill,
                        },
                } if ring == d.ring => Some(seq),
                _ => None,
            })
            .collect();
        assert_eq!(
            stops, refused,
            "guest {g}: stopped where the vSID was refused"
        );
        refusals += stops.len();
        // No entry carrying the pSID was published while the vSID was unbound.
        let mut with_psid = 0;
        for rec in &report.audit {
            let AuditRecord::Published {
                ring,
                first,
                end,
                t,
            } = *rec
            else {
                continue;
            };
            if ring != d.ring {
                continue;
            }
            let carries = (first..end).any(|seq| {
                matches!(got[seq as usize], SlotOutcome::Forwarded(x) if (x.d0() >> 32) as u32 == 0x800)
            });
            if carries {
                with_psid += 1;
                for &(from, to) in &windows {
                    assert!(
                        !(from..to).contains(&t),
                        "guest {g}: entries {first}..{end} with pSID 0x800 published at {t} ns, \
                         while unbound ({from}..{to} ns)"
                    );
                }
            }
        }
        assert!(
            with_psid > CYCLES,
            "guest {g}: {with_psid} batches with the pSID"
        );
        // The hardware consumed this guest's commands exactly once, in order.
        let mine: Vec<RawCommand> = hwlog
            .iter()
            .filter(|x| x.opcode() == opcode::ATC_INV && (x.d1() >> 36) as usize == g)
            .copied()
            .collect();
        assert_eq!(mine, forwarded(&got), "guest {g}");
    }
    // Refusals while unbound: at least the final one of each guest.
    assert!(refusals >= 2, "{refusals}");
}

/// While guests stream on vIOMMUs 1 and 2, the control plane creates vIOMMUs, binds devices,
/// attaches rings, runs traffic on them, detaches, unbinds and removes them again, and binds
/// and unbinds spare devices of the busy vIOMMUs. The busy guests see nothing of it; each
/// transient vIOMMU's commands run exactly once, with its own VMID and pSID.
#[test]
fn viommus_and_bindings_come_and_go_while_traffic_flows() {
    const ROUNDS: u32 = 8;
    let topo = Topology::new(2, 4, false);
    let mut vmids = topo.vmids();
    vmids.extend((0..ROUNDS).map(|i| 100 + i as u16));
    let mut psids = topo.psids();
    psids.extend((0..ROUNDS).map(|i| 0x2000 + i));
    let (hwcfg, log) = hw(&vmids, &psids);
    let engine = start_engine(hwcfg, |_, _| {});
    topo.build(&engine);
    let mut drivers = topo.attach(&engine, FixPolicy::LikeLinux, |_| 7);
    let engine_ref = &engine;
    run_guests(&engine, &topo, &mut drivers, 4, false, move || {
        let engine = engine_ref;
        for i in 0..ROUNDS {
            let id = 100 + i;
            let v = engine
                .create_viommu(ViommuConfig::new(id, 100 + i as u16, 0))
                .unwrap();
            let dev = DeviceId(0x2000 + i);
            engine.devices().add_device(dev, 0, 0x2000 + i).unwrap();
            v.set_dev_id(dev, 0x10).unwrap();
            let (mut guest, host) = ring_pair(Backing::Sealed, 4, id);
            let ring = engine.attach_ring(host).unwrap();
            guest.submit(&[
                c("ATC_INV sid=0x10 size=52"),
                c("TLBI_NH_ALL vmid=1"),
                c("CFGI_STE sid=0x10"),
                c("CMD_SYNC"),
            ]);
            guest.wait_syncs(1, T).unwrap();
            assert!(
                engine.remove_viommu(id).is_err(),
                "a vIOMMU with a ring is busy"
            );
            engine.detach_ring(ring, T).unwrap();
            if i % 2 == 0 {
                v.unset_dev_id(dev).unwrap();
            }
            engine.remove_viommu(id).unwrap();
            engine.devices().remove_device(dev).unwrap();
            // A spare device of a busy vIOMMU, bound and unbound under its traffic.
            let busy = engine.viommu(1 + i % 2).unwrap();
            let spare = DeviceId(0x3000 + i);
            engine.devices().add_device(spare, 0, 0x3000 + i).unwrap();
            busy.set_dev_id(spare, 0x40 + i).unwrap();
            assert_eq!(busy.unset_dev_id(spare).unwrap(), 0x40 + i);
        }
    });
    let report = engine.shutdown();
    // Take the transient vIOMMUs' commands out of the log before checking the busy guests.
    let mut transient = Vec::new();
    log.lock().unwrap().retain(|x| {
        let vmid = (x.d0() >> 32) as u16;
        let sid = (x.d0() >> 32) as u32;
        let mine = match x.opcode() {
            opcode::TLBI_NH_ALL => vmid >= 100,
            opcode::ATC_INV => sid >= 0x2000,
            _ => false,
        };
        if mine {
            transient.push(*x);
        }
        !mine
    });
    topo.check(&report, &log, &drivers);
    let mut want = Vec::new();
    for i in 0..ROUNDS {
        want.push(c(&format!("ATC_INV sid={:#x} size=52", 0x2000 + i)));
        want.push(c(&format!("TLBI_NH_ALL vmid={}", 100 + i)));
    }
    transient.sort_by_key(|x| (x.d0() >> 32, x.opcode()));
    want.sort_by_key(|x| (x.d0() >> 32, x.opcode()));
    assert_eq!(transient, want);
}

/// Shutdown while guests have thousands of entries pending and a slow hardware thread: the
/// engine stops taking, completes everything it took and nothing more. Each ring's CONS is
/// exactly past the entries the audit accounts for, each of them done (forwarded and
/// consumed, its CMD_SYNC signalled); the physical queue is empty.
#[test]
fn shutdown_with_work_in_flight_completes_what_was_taken_and_nothing_more() {
    let topo = Topology::new(2, 4, false);
    let (mut hwcfg, log) = hw(&topo.vmids(), &topo.psids());
    hwcfg.slow = Some(Duration::from_micros(20));
    let engine = start_engine(hwcfg, |cfg, m| {
        cfg.ring_budget = 64;
        m.log2size = 6;
        m.placement = HwPlacement::Thread;
    });
    topo.build(&engine);
    let mut drivers = topo.attach(&engine, FixPolicy::LikeLinux, |_| 12);
    for (g, d) in drivers.iter_mut().enumerate() {
        let s = topo.seats[g];
        let cmds: Vec<RawCommand> = (0..4095u64)
            .map(|n| match n % 64 {
                63 => c("CMD_SYNC cs=1"),
                k if k % 2 == 0 => atc_inv(s.vsids[0], g, n),
                _ => c(&format!("TLBI_NH_VA asid={g} addr={:#x}", n << 12)),
            })
            .collect();
        assert_eq!(d.drv.post_now(&cmds), cmds.len());
        d.written = cmds;
    }
    engine.until("the engine takes 200 entries", || {
        engine.stats().taken >= 200
    });
    let (report, hardware) = engine.shutdown_with_hardware();
    let hw = topo.split(&log);
    let mut untaken = 0;
    let mut accounted = 0;
    for (g, d) in drivers.iter().enumerate() {
        let got = outcomes(&report.audit, d.ring);
        let cons = d.guest().cons();
        assert_eq!(cons.1, CError::None);
        assert_eq!(
            u64::from(d.guest().shape().distance(cons.0, 0)),
            got.len() as u64,
            "guest {g}: CONS is exactly past what the engine took"
        );
        let want = oracle::translate_all(
            topo.cfg(topo.seats[g].viommu),
            &topo.bindings(topo.seats[g].viommu),
            &d.written[..got.len()],
            false,
        );
        assert_eq!(got, want, "guest {g}");
        assert_eq!(hw[g], forwarded(&got), "guest {g}: all of it consumed");
        let syncs = got
            .iter()
            .filter(|o| matches!(o, SlotOutcome::Sync { .. }))
            .count();
        assert_eq!(d.guest().sync_count(), syncs as u64, "guest {g}");
        accounted += got.len() as u64;
        untaken += d.written.len() - got.len();
    }
    assert_eq!(
        report.stats.taken, accounted,
        "nothing taken twice or left half-done"
    );
    let consumed: u64 = hardware.iter().map(|h| h.consumed).sum();
    assert_eq!(consumed, report.stats.forwarded + report.stats.phys_syncs);
    assert!(
        untaken > 0,
        "the guests still had work the engine never took"
    );
}
