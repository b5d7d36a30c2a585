//! `memory`: what vcmdq's state costs, measured with a counting global allocator (the bytes
//! asked of the allocator and still live, so without malloc's own overhead) around the creation
//! of the objects, plus the bytes mapped where a ring is a mapping. Markdown on stdout.
//!
//! - Per bound vSID, for 16, 4,096 and 1,048,576 consecutive vSIDs in one vIOMMU: the vIOMMU
//!   itself (`create_viommu`: its vSID table's root among it), the engine's device registry
//!   (`add_device`), the binding (`set_dev_id`: the radix table's nodes and the vIOMMU's own
//!   record of its devices), and the vSID table's own count of its nodes, root included
//!   (`SidTable::stats().bytes`), to cross-check: it is part of the first and third columns.
//! - Per guest ring of 1,024 slots, averaged over `RINGS` rings after one ring warmed the
//!   engine up: a memfd ring (the engine's `HostRing`, then what attaching it and serving one
//!   CMD_SYNC adds: the engine's maps and the worker's state; the memfd's mapping apart), and a
//!   guest VCMDQ in guest RAM served through `vcmdq_vmm::Vmm` (attach, enable, one CMD_SYNC:
//!   the VMM's record, Tegra241Registers, GuestRamSlots, the HostRing, the engine's and the
//!   worker's state; the register page and guest RAM apart).
//!
//! `cargo run --release -p vcmdq-bench --bin memory`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::ExitCode;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vcmdq::command::{opcode, RawCommand};
use vcmdq::hwmodel::HwConfig;
use vcmdq::mock::{FixPolicy, GuestDriver};
use vcmdq::ring::{AttachOptions, GuestRing, HostRing};
use vcmdq::viommu::{DeviceId, ViommuConfig};
use vcmdq_bench::e2e::{bench_engine, bench_engine_config};
use vcmdq_bench::guest_ram::{Ram, RamVcmdq};
use vcmdq_vmm::guest::VCMDQ_SYNC;
use vcmdq_vmm::regs::{VCMDQ_CONFIG, VCMDQ_EN};
use vcmdq_vmm::{VcmdqId, VcmdqRegisterPage, Vmm, VmmConfig};
use vm_memory::GuestAddress;

/// Bytes live in the allocator: allocated and not yet freed, by every thread.
static LIVE: AtomicIsize = AtomicIsize::new(0);

/// The system allocator, counting.
struct Counting;

// SAFETY: every call is forwarded to `System` with the caller's arguments unchanged, so
// `System`'s guarantees are this allocator's; the counter is only arithmetic on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is `System.alloc`'s.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc_zeroed` is `System.alloc_zeroed`'s.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `System` with `layout`; the caller keeps `realloc`'s contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// vSID counts the issue asks about.
const VSID_COUNTS: [u32; 3] = [16, 4096, 1 << 20];
/// Rings (and guest VCMDQs) created per ring measurement; the figure is their average.
const RINGS: usize = 64;
/// LOG2SIZE of every ring: 1,024 slots.
const RING_LOG2: u8 = 10;
/// How long any wait on the engine may take before the measurement gives up.
const WAIT_LIMIT: Duration = Duration::from_secs(30);
/// A guest CMD_SYNC, CS=none.
const GUEST_SYNC: RawCommand = RawCommand::new(opcode::CMD_SYNC as u64, 0);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memory: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    println!(
        "Bytes live in the allocator (requested sizes, malloc's overhead not included), \
         measured around creating the objects; one engine worker, audit off.\n"
    );
    println!("| bound vSIDs | vIOMMU (empty, table root) B/vSID | device registry B/vSID | binding B/vSID | total B/vSID | vSID table (its own count, root included) B/vSID |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for n in VSID_COUNTS {
        let v = vsids(n)?;
        let per = |b: isize| b as f64 / f64::from(n);
        println!(
            "| {n} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            per(v.viommu),
            per(v.devices),
            per(v.binding),
            per(v.viommu + v.devices + v.binding),
            v.table as f64 / f64::from(n),
        );
    }
    println!();
    let m = memfd_rings()?;
    let g = guest_ram_vcmdqs()?;
    let per = |b: isize| b / RINGS as isize;
    println!("| per guest ring of 1,024 slots (average of {RINGS}) | bytes |");
    println!("|---|---:|");
    println!(
        "| memfd ring: HostRing::attach_memory's allocations (heap; the struct itself is boxed at attach) | {} |",
        per(m.host)
    );
    println!(
        "| memfd ring: attached and served (the boxed HostRing, engine maps, worker state; heap) | {} |",
        per(m.attached)
    );
    println!(
        "| memfd ring: engine side, heap total | {} |",
        per(m.host + m.attached)
    );
    println!(
        "| memfd ring: the memfd, mapped (header and slots, shared with the guest) | {} |",
        m.mapped
    );
    println!(
        "| guest-RAM VCMDQ: attached, enabled and served through Vmm (heap) | {} |",
        per(g.per_vcmdq)
    );
    println!(
        "| guest-RAM VCMDQ: its queue in guest RAM (the guest's memory, not the engine's) | {} |",
        g.queue_bytes
    );
    println!(
        "| guest-RAM VCMDQ: the VINTF's register page (heap here; shared by up to 128 VCMDQs) | {} |",
        g.page
    );
    Ok(())
}

/// What binding `n` vSIDs cost.
struct Vsids {
    viommu: isize,
    devices: isize,
    binding: isize,
    table: usize,
}

fn vsids(n: u32) -> Result<Vsids, String> {
    let engine = bench_engine();
    let mut cfg = ViommuConfig::new(0, 1, 0);
    cfg.max_vsids = cfg.max_vsids.max(n);
    let before = live();
    let viommu = engine.create_viommu(cfg).map_err(|e| e.to_string())?;
    let m0 = live();
    for i in 0..n {
        engine
            .add_device(DeviceId(i), 0, 0x10_0000 + i)
            .map_err(|e| format!("add_device {i}: {e}"))?;
    }
    let m1 = live();
    for i in 0..n {
        engine
            .set_dev_id(0, DeviceId(i), i)
            .map_err(|e| format!("set_dev_id vSID {i}: {e}"))?;
    }
    let m2 = live();
    let stats = viommu.table().stats();
    if stats.bound != n as usize {
        return Err(format!("{} vSIDs bound, {n} asked", stats.bound));
    }
    drop(viommu);
    engine.shutdown();
    Ok(Vsids {
        viommu: m0 - before,
        devices: m1 - m0,
        binding: m2 - m1,
        table: stats.bytes,
    })
}

/// What `RINGS` memfd rings cost the engine side, in total; `mapped` per ring.
struct MemfdRings {
    host: isize,
    attached: isize,
    mapped: usize,
}

fn driver(ring: GuestRing) -> Result<GuestDriver, String> {
    let stop = FixPolicy::Custom(Arc::new(|cerror, cmd| {
        panic!("the engine stopped a ring on {cmd:?} with {cerror}")
    }));
    Ok(GuestDriver::new(ring, stop)
        .map_err(|e| e.to_string())?
        .with_timeout(WAIT_LIMIT))
}

/// One CMD_SYNC through the ring, so that the worker has taken it on.
fn serve_one(d: &mut GuestDriver) -> Result<(), String> {
    d.post(&[GUEST_SYNC]).map_err(|e| e.to_string())?;
    d.drain().map_err(|e| e.to_string())
}

fn attach_memfd(ring: &GuestRing) -> Result<HostRing, String> {
    HostRing::attach_memory(ring.memory(), AttachOptions::default()).map_err(|e| e.to_string())
}

fn memfd_rings() -> Result<MemfdRings, String> {
    let engine = bench_engine();
    engine
        .create_viommu(ViommuConfig::new(0, 1, 0))
        .map_err(|e| e.to_string())?;
    let new_ring = || GuestRing::create_sealed(RING_LOG2, 0).map_err(|e| e.to_string());
    // A first ring, so that what the engine allocates once is not counted per ring.
    let warm = new_ring()?;
    let host = attach_memfd(&warm)?;
    engine.attach_ring(host).map_err(|e| e.to_string())?;
    serve_one(&mut driver(warm)?)?;

    let guests = (0..RINGS)
        .map(|_| new_ring())
        .collect::<Result<Vec<_>, _>>()?;
    let mapped = guests[0].memory().mapped_len();
    let m0 = live();
    let hosts = guests
        .iter()
        .map(attach_memfd)
        .collect::<Result<Vec<_>, _>>()?;
    let m1 = live();
    let mut drivers = guests
        .into_iter()
        .map(driver)
        .collect::<Result<Vec<_>, _>>()?;
    let m2 = live();
    for h in hosts {
        engine.attach_ring(h).map_err(|e| e.to_string())?;
    }
    for d in &mut drivers {
        serve_one(d)?;
    }
    let m3 = live();
    engine.shutdown();
    Ok(MemfdRings {
        // The Vec that held the hosts is freed at attach; its bytes are not the rings'.
        host: m1 - m0 - (RINGS * size_of::<HostRing>()) as isize,
        attached: m3 - m2 + (RINGS * size_of::<HostRing>()) as isize,
        mapped,
    })
}

/// What guest-RAM VCMDQs cost: per VCMDQ (heap, engine and VMM), the queue, the page.
struct GuestRamVcmdqs {
    per_vcmdq: isize,
    queue_bytes: u64,
    page: isize,
}

fn guest_ram_vcmdqs() -> Result<GuestRamVcmdqs, String> {
    let cfg = VmmConfig {
        engine: bench_engine_config(),
        ..VmmConfig::default()
    };
    let (vmm, _) = Vmm::start_on_model(cfg, &HwConfig::zero_cost()).map_err(|e| e.to_string())?;
    vmm.create_viommu(ViommuConfig::new(0, 1, 0))
        .map_err(|e| e.to_string())?;
    let queue_bytes = 16u64 << RING_LOG2;
    // Queue 0 warms the engine up; queues 1..=RINGS are measured.
    let ram = Arc::new(
        Ram::from_ranges(&[(GuestAddress(0), (RINGS + 1) * queue_bytes as usize)])
            .map_err(|e| format!("guest RAM: {e}"))?,
    );
    let m0 = live();
    let page = VcmdqRegisterPage::heap();
    let page_bytes = live() - m0;
    let mut guests: Vec<(VcmdqId, RamVcmdq)> = (0..=RINGS as u16)
        .map(|lidx| {
            let base = u64::from(lidx) * queue_bytes;
            let g = RamVcmdq::new(page.clone(), lidx, ram.clone(), base, RING_LOG2, WAIT_LIMIT);
            (VcmdqId { viommu: 0, lidx }, g)
        })
        .collect();
    let enable = |(id, _): &(VcmdqId, RamVcmdq)| -> Result<(), String> {
        let base = (u64::from(id.lidx) * queue_bytes) | u64::from(RING_LOG2);
        page.set_base(id.lidx, base).map_err(|e| e.to_string())?;
        page.write_page0(id.lidx, VCMDQ_CONFIG, VCMDQ_EN)
            .map_err(|e| e.to_string())
    };
    let serve = |(id, g): &mut (VcmdqId, RamVcmdq)| -> Result<(), String> {
        g.post(&[VCMDQ_SYNC])
            .and_then(|()| g.drain())
            .map_err(|e| format!("{id:?}: {e}"))
    };
    let attach_all = |gs: &mut [(VcmdqId, RamVcmdq)]| -> Result<(), String> {
        for q in gs.iter() {
            vmm.attach_vcmdq(q.0, ram.clone(), page.clone())
                .map_err(|e| e.to_string())?;
            enable(q)?;
        }
        let t = Instant::now();
        while gs.iter().any(|(id, _)| vmm.ring_of(*id).is_none()) {
            vmm.poll();
            if let Some(ev) = vmm.next_event() {
                return Err(format!("the VMM refused a VCMDQ: {ev:?}"));
            }
            if t.elapsed() > WAIT_LIMIT {
                return Err(format!("VCMDQs not enabled after {WAIT_LIMIT:?}"));
            }
        }
        gs.iter_mut().try_for_each(&serve)
    };
    let (warm, measured) = guests.split_at_mut(1);
    attach_all(warm)?;
    let m1 = live();
    attach_all(measured)?;
    let m2 = live();
    vmm.shutdown();
    Ok(GuestRamVcmdqs {
        per_vcmdq: m2 - m1,
        queue_bytes,
        page: page_bytes,
    })
}
