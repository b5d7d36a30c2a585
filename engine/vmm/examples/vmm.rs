//! A small VMM: guest RAM through vm-memory, one vIOMMU whose Tegra241 VINTF has two logical
//! VCMDQs, two guest threads (two vCPUs' worth) each driving its own VCMDQ the way Linux's
//! tegra241-cmdqv driver does (init and the enable handshake, batches ended by a CMD_SYNC,
//! busy-polling CONS, CONS.ERR handled through GERROR and LVCMDQ_ERR_MAP, disable and
//! re-enable), the engine and its physical queue model underneath, and the VMM's control loop
//! (polling CONFIG, completing trapped CFGI_STEs, taking error events). At the end every
//! guest command's outcome is checked against the oracle, and every command the physical queue
//! consumed against the VM's VMID and pSIDs. Exits non-zero on any mismatch.
//!
//! `cargo run --release -p vcmdq-vmm --example vmm [-- ROUNDS]`

use std::collections::{HashMap, HashSet};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vcmdq::command::{opcode, text, RawCommand};
use vcmdq::engine::{slot_outcomes, EngineConfig, RingId};
use vcmdq::hwmodel::HwConfig;
use vcmdq::mock::Rng;
use vcmdq::oracle;
use vcmdq::viommu::{DeviceId, ViommuConfig};
use vcmdq_vmm::guest::LinuxVcmdq;
use vcmdq_vmm::{VcmdqId, VcmdqRegisterPage, Vmm, VmmConfig, VmmEvent};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const VIOMMU: u32 = 1;
const VMID: u16 = 5;
/// (vSID, pSID) of the devices passed through.
const DEVICES: [(u32, u32); 3] = [(0x10, 0x800), (0x11, 0x801), (0x12, 0x802)];
/// Each queue: 2^6 slots, at its own 1 KiB-aligned address in guest RAM.
const LOG2SIZE: u8 = 6;
const QUEUE_BASES: [u64; 2] = [0x10_0000, 0x20_0000];
const T: Duration = Duration::from_secs(20);

/// One enable-to-disable span of a VCMDQ: the engine's ring and what the guest wrote.
struct Session {
    vcmdq: VcmdqId,
    ring: RingId,
    written: Vec<RawCommand>,
}

fn cmd(s: &str) -> RawCommand {
    text::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// A random batch of what a Linux guest sends on a VCMDQ, with now and then a command the
/// engine refuses (an unbound vSID: CONS.ERR ILL) or traps (CFGI_STE).
fn random_batch(rng: &mut Rng) -> Vec<RawCommand> {
    let n = rng.range(1, 12) as usize;
    (0..n)
        .map(|_| match rng.below(100) {
            0..=29 => cmd(&format!("TLBI_NH_ASID asid={}", rng.below(64))),
            30..=59 => cmd(&format!(
                "TLBI_NH_VA asid={} addr={:#x} leaf",
                rng.below(64),
                rng.below(1 << 20) << 12
            )),
            60..=93 => cmd(&format!(
                "ATC_INV sid={:#x} addr={:#x} size=0",
                DEVICES[rng.below(3) as usize].0,
                rng.below(1 << 20) << 12
            )),
            94..=96 => cmd("ATC_INV sid=0x99"),
            _ => cmd(&format!("CFGI_STE sid={:#x}", DEVICES[0].0)),
        })
        .collect()
}

/// A guest vCPU: `rounds` times, enable its VCMDQ, run batches, disable it.
fn guest(
    vmm: &Vmm,
    mut q: LinuxVcmdq<GuestMemoryMmap>,
    seed: u64,
    rounds: usize,
    sessions: &Mutex<Vec<Session>>,
    errors: &AtomicU64,
) -> Result<(), String> {
    let id = VcmdqId {
        viommu: VIOMMU,
        lidx: q.lidx(),
    };
    let mut rng = Rng::new(seed);
    for _ in 0..rounds {
        q.init(T).map_err(|e| e.to_string())?;
        let ring = vmm
            .ring_of(id)
            .ok_or_else(|| format!("{id:?}: STATUS.ENABLED is set but no ring serves it"))?;
        for _ in 0..rng.range(20, 60) {
            let handled = q
                .batch(&random_batch(&mut rng), T)
                .map_err(|e| e.to_string())?;
            errors.fetch_add(handled.len() as u64, Ordering::Relaxed);
        }
        q.disable(T).map_err(|e| e.to_string())?;
        sessions.lock().unwrap().push(Session {
            vcmdq: id,
            ring,
            written: q.written().to_vec(),
        });
    }
    Ok(())
}

fn main() -> ExitCode {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("ROUNDS is a number"))
        .unwrap_or(4);
    let consumed: Arc<Mutex<Vec<RawCommand>>> = Arc::default();
    let log = consumed.clone();
    let hw = HwConfig::default().with_check(move |c| {
        log.lock().unwrap().push(*c);
        Ok(())
    });
    let (vmm, _) = Vmm::start_on_model(
        VmmConfig {
            engine: EngineConfig {
                audit: true,
                ..Default::default()
            },
            ..Default::default()
        },
        &hw,
    )
    .expect("start the engine");
    let cfg = ViommuConfig::new(VIOMMU, VMID, 0);
    vmm.create_viommu(cfg).expect("create the vIOMMU");
    for (i, &(vsid, psid)) in DEVICES.iter().enumerate() {
        vmm.add_device(DeviceId(i as u32), 0, psid).unwrap();
        vmm.set_dev_id(VIOMMU, DeviceId(i as u32), vsid).unwrap();
    }
    let ram = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("guest RAM"),
    );
    let page = VcmdqRegisterPage::heap();
    let mut drivers = Vec::new();
    for (lidx, &base) in QUEUE_BASES.iter().enumerate() {
        let id = VcmdqId {
            viommu: VIOMMU,
            lidx: lidx as u16,
        };
        vmm.attach_vcmdq(id, ram.clone(), page.clone()).unwrap();
        drivers.push(LinuxVcmdq::new(
            page.clone(),
            lidx as u16,
            ram.clone(),
            base,
            LOG2SIZE,
        ));
    }

    let sessions = Mutex::new(Vec::new());
    let errors_handled = AtomicU64::new(0);
    let (mut events, mut traps) = (Vec::new(), 0u64);
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let guests: Vec<_> = drivers
            .into_iter()
            .enumerate()
            .map(|(i, q)| {
                let (vmm, sessions, errors) = (&vmm, &sessions, &errors_handled);
                s.spawn(move || guest(vmm, q, 0x5eed + i as u64, rounds, sessions, errors))
            })
            .collect();
        // The VMM's control loop: CONFIG changes, trapped commands, error events.
        while !guests.iter().all(|g| g.is_finished()) {
            let mut busy = vmm.poll() > 0;
            while let Some(trap) = vmm.next_trap() {
                // A real VMM installs the guest's STE here.
                vmm.complete_trap(&trap).expect("complete the trap");
                traps += 1;
                busy = true;
            }
            while let Some(ev) = vmm.next_event() {
                // A real VMM raises the guest's CMDQV interrupt here.
                events.push(ev);
                busy = true;
            }
            if !busy {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        guests
            .into_iter()
            .map(|g| g.join().unwrap_or_else(|_| Err("a guest panicked".into())))
            .collect()
    });
    vmm.poll();
    events.extend(std::iter::from_fn(|| vmm.next_event()));
    for lidx in 0..QUEUE_BASES.len() as u16 {
        vmm.detach_vcmdq(VcmdqId {
            viommu: VIOMMU,
            lidx,
        })
        .expect("detach");
    }
    let report = vmm.shutdown();

    let mut failures = Vec::new();
    for r in results {
        if let Err(e) = r {
            failures.push(format!("guest: {e}"));
        }
    }
    let bindings: HashMap<u32, u32> = DEVICES.iter().copied().collect();
    let psids: HashSet<u32> = DEVICES.iter().map(|d| d.1).collect();
    let sessions = sessions.into_inner().unwrap();
    let mut checked = 0usize;
    for s in &sessions {
        let want = oracle::translate_all(&cfg, &bindings, &s.written, false);
        let got = slot_outcomes(&report.audit, s.ring);
        if got.len() != want.len() {
            failures.push(format!(
                "{:?} ring {:?}: {} outcomes for {} commands written",
                s.vcmdq,
                s.ring,
                got.len(),
                want.len()
            ));
            continue;
        }
        for (seq, (g, w)) in got.iter().zip(&want).enumerate() {
            if g.as_ref() != Some(w) {
                failures.push(format!(
                    "{:?} ring {:?} entry {seq} ({:?}): engine {g:?}, oracle {w:?}",
                    s.vcmdq, s.ring, s.written[seq]
                ));
            }
        }
        checked += s.written.len();
    }
    let consumed = consumed.lock().unwrap().clone();
    for c in &consumed {
        if c.opcode() == opcode::CMD_SYNC {
            continue;
        }
        if let Err(e) = oracle::check_isolation(&cfg, &psids, c) {
            failures.push(format!("the physical queue consumed {c:?}: {e}"));
        }
    }
    let refused = events
        .iter()
        .filter(|e| matches!(e, VmmEvent::CommandError { .. }))
        .count() as u64;
    let handled = errors_handled.load(Ordering::Relaxed);
    if refused != handled {
        failures.push(format!(
            "{refused} error events for {handled} errors the guests handled"
        ));
    }
    let other: Vec<_> = events
        .iter()
        .filter(|e| !matches!(e, VmmEvent::CommandError { .. }))
        .collect();
    if !other.is_empty() {
        failures.push(format!("unexpected events: {other:?}"));
    }
    println!(
        "vmm example: 2 VCMDQs, {} enable/disable sessions, {checked} guest commands checked \
         against the oracle, {} forwarded, {} consumed by the physical queue, {handled} \
         CONS.ERR stops handled as Linux does, {traps} CFGI_STE traps completed",
        sessions.len(),
        report.stats.forwarded,
        consumed.len()
    );
    if failures.is_empty() {
        println!("vmm example: every command matches the oracle");
        ExitCode::SUCCESS
    } else {
        for f in failures.iter().take(20) {
            eprintln!("MISMATCH: {f}");
        }
        eprintln!("vmm example: {} mismatch(es)", failures.len());
        ExitCode::FAILURE
    }
}
