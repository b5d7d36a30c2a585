//! End to end: N guest rings written by one guest thread, read on a second thread by one of
//! three back ends, the hardware side a consumer that costs nothing.
//!
//! - [`Backend::CopyLimit`]: the limit. The second thread copies every entry out of the guest
//!   rings into one destination ring and moves CONS; no look at what it copies.
//! - [`Backend::Naive`]: the floor. A straightforward engine on the second thread: per command a
//!   locked SipHash `HashMap` lookup with decode and encode ([`NaiveTranslator`]) and one push
//!   into a `Mutex<VecDeque>` physical queue, which it drains itself at each guest CMD_SYNC.
//! - [`Backend::Vcmdq`]: the real thing. An [`Engine`] with one worker and the hardware model
//!   stepped inline by that worker, audit and capture off, the zero-cost consumer
//!   ([`HwConfig::zero_cost`]).
//!
//! The guest (the caller's thread) submits batches of `batch` commands each followed by a
//! CMD_SYNC, round-robin over its rings, waiting for room when a ring is full, never for a
//! sync; [`Pipeline::run`] returns once every ring's CONS has caught up with its PROD, so the
//! time covers every command reaching the physical side (for vcmdq: consumed by the hardware
//! model, every guest CMD_SYNC signalled).
//!
//! The rings have one of two backings ([`Backing`]): the memfd ring format (header and slots in
//! one memory, [`GuestRing`] and [`HostRing::attach_memory`]), or guest VCMDQs in guest RAM
//! behind Tegra241 register pages ([`crate::guest_ram`]); the guest's mix, ring size, batches
//! and the back ends are the same for both.

use crate::guest_ram::{guest_ram_vcmdqs, RamVcmdq};
use crate::{guest_mix, NaiveTranslator, Rng};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vcmdq::command::{opcode, RawCommand};
use vcmdq::engine::{Engine, EngineConfig, EngineStats};
use vcmdq::hwmodel::{HwConfig, HwPlacement, ModelQueue, DEFAULT_LOG2SIZE};
use vcmdq::mock::{FixPolicy, GuestDriver};
use vcmdq::ring::{AttachOptions, GuestRing, HostRing};
use vcmdq::viommu::{DeviceId, ViommuConfig};

/// LOG2SIZE of every guest ring: 1,024 slots (16 KiB), the same for any number of rings.
pub const RING_LOG2: u8 = 10;
/// vSIDs bound in each ring's vIOMMU; the guest's ATC_INV and CFGI_CD name them.
pub const VSIDS_PER_RING: u32 = 16;
/// Entries the copy and naive back ends take from one ring per pass, as the engine's default
/// ring budget.
const BUDGET: usize = 256;
/// A guest CMD_SYNC, CS=none.
const GUEST_SYNC: RawCommand = RawCommand::new(opcode::CMD_SYNC as u64, 0);
/// How long the guest waits for room or for CONS before it calls the back end hung.
const WAIT_LIMIT: Duration = Duration::from_secs(60);
/// Batches in the guest's pre-generated pool (the pool is reused round and round).
const POOL_BATCHES: usize = 1024;

/// Which back end reads the guest rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The two-thread ring-to-ring copy.
    CopyLimit,
    /// Mutex + VecDeque + HashMap, one push per command.
    Naive,
    /// The vcmdq engine.
    Vcmdq,
}

impl Backend {
    /// The three, in the order the reports list them.
    pub const ALL: [Backend; 3] = [Backend::CopyLimit, Backend::Naive, Backend::Vcmdq];

    /// The criterion function name.
    pub fn name(self) -> &'static str {
        match self {
            Backend::CopyLimit => "copy_limit",
            Backend::Naive => "naive",
            Backend::Vcmdq => "vcmdq",
        }
    }
}

/// Where the guest's rings are and how the engine reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// vcmdq's ring format: PROD, CONS and the slots in one shared memory.
    Memfd,
    /// Guest VCMDQs: slots in guest RAM (`vm-memory`), PROD and CONS in a Tegra241 register page.
    GuestRam,
}

impl Backing {
    /// The prefix of the criterion parameter (`rings1_batch64`, `vmm_rings1_batch64`).
    pub fn prefix(self) -> &'static str {
        match self {
            Backing::Memfd => "",
            Backing::GuestRam => "vmm_",
        }
    }
}

/// One guest ring's writer.
enum GuestQueue {
    Memfd(GuestDriver),
    GuestRam(RamVcmdq),
}

/// The pSID vIOMMU `ring` binds its vSID `vsid` to: distinct over all rings.
pub fn e2e_psid(ring: u32, vsid: u32) -> u32 {
    0x10_0000 + ring * VSIDS_PER_RING + vsid
}

/// The VMID of ring `ring`'s vIOMMU.
pub fn e2e_vmid(ring: u32) -> u16 {
    ring as u16 + 1
}

/// The guest: a driver per ring and the batches it writes into them.
pub struct Guest {
    rings: Vec<GuestQueue>,
    /// `POOL_BATCHES` batches of `batch` commands and a CMD_SYNC, back to back.
    pool: Vec<RawCommand>,
    batch: usize,
    next_batch: usize,
    next_ring: usize,
}

impl Guest {
    fn new(rings: Vec<GuestQueue>, batch: usize, seed: u64) -> Guest {
        let mut rng = Rng::new(seed);
        let vsids: Vec<u32> = (0..VSIDS_PER_RING).collect();
        let mut pool = Vec::with_capacity(POOL_BATCHES * (batch + 1));
        for _ in 0..POOL_BATCHES {
            pool.extend(guest_mix(batch, &vsids, &mut rng));
            pool.push(GUEST_SYNC);
        }
        Guest {
            rings,
            pool,
            batch,
            next_batch: 0,
            next_ring: 0,
        }
    }

    /// Submits `batches` batches, round-robin over the rings, waiting for room in a full ring.
    pub fn submit(&mut self, batches: u64) {
        let len = self.batch + 1;
        for _ in 0..batches {
            let k = self.next_batch;
            self.next_batch = (k + 1) % POOL_BATCHES;
            let r = self.next_ring;
            self.next_ring = (r + 1) % self.rings.len();
            let cmds = &self.pool[k * len..(k + 1) * len];
            match &mut self.rings[r] {
                GuestQueue::Memfd(d) => d.post(cmds).map_err(|e| e.to_string()),
                GuestQueue::GuestRam(q) => q.post(cmds).map_err(|e| e.to_string()),
            }
            .unwrap_or_else(|e| panic!("guest ring {r}: {e}"));
        }
    }

    /// Waits until every ring's CONS has reached its PROD.
    pub fn drain(&mut self) {
        for (r, ring) in self.rings.iter_mut().enumerate() {
            match ring {
                GuestQueue::Memfd(d) => d.drain().map_err(|e| e.to_string()),
                GuestQueue::GuestRam(q) => q.drain().map_err(|e| e.to_string()),
            }
            .unwrap_or_else(|e| panic!("guest ring {r}: {e}"));
        }
    }

    /// The guest's rings.
    pub fn rings(&self) -> usize {
        self.rings.len()
    }
}

/// What a back end delivered, counted at its physical side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delivered {
    /// Entries that reached the physical side (copy: every entry; naive and vcmdq: the guest's
    /// commands, CMD_SYNCs not included).
    pub entries: u64,
    /// Guest CMD_SYNCs signalled (0 for the copy).
    pub syncs: u64,
    /// The engine's counters (vcmdq only).
    pub engine: Option<EngineStats>,
}

enum Side {
    Thread {
        stop: Arc<AtomicBool>,
        handle: JoinHandle<Delivered>,
    },
    Engine(Box<Engine>),
}

/// A guest, its rings and a back end reading them.
pub struct Pipeline {
    guest: Guest,
    side: Side,
}

impl Pipeline {
    /// `rings` memfd-format guest rings with `batch`-command batches, read by `backend`.
    pub fn new(backend: Backend, rings: usize, batch: usize) -> Pipeline {
        Pipeline::with_backing(backend, Backing::Memfd, rings, batch)
    }

    /// `rings` guest rings with `backing` and `batch`-command batches, read by `backend`.
    pub fn with_backing(
        backend: Backend,
        backing: Backing,
        rings: usize,
        batch: usize,
    ) -> Pipeline {
        assert!(rings > 0 && batch > 0 && batch < 1 << RING_LOG2);
        let (guests, hosts) = match backing {
            Backing::Memfd => memfd_rings(rings),
            Backing::GuestRam => {
                let (g, h) = guest_ram_vcmdqs(rings, RING_LOG2, WAIT_LIMIT);
                (g.into_iter().map(GuestQueue::GuestRam).collect(), h)
            }
        };
        let side = match backend {
            Backend::Vcmdq => Side::Engine(Box::new(start_engine(hosts))),
            Backend::CopyLimit | Backend::Naive => {
                let stop = Arc::new(AtomicBool::new(false));
                let s = stop.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("bench-{}", backend.name()))
                    .spawn(move || match backend {
                        Backend::CopyLimit => copy_side(hosts, &s),
                        _ => naive_side(hosts, &s),
                    })
                    .expect("spawn the back end");
                Side::Thread { stop, handle }
            }
        };
        Pipeline {
            guest: Guest::new(guests, batch, 0x5eed ^ rings as u64 ^ (batch as u64) << 20),
            side,
        }
    }

    /// Submits `batches` batches and waits until the back end has taken all of them; the time
    /// that took.
    pub fn run(&mut self, batches: u64) -> Duration {
        let t = Instant::now();
        self.guest.submit(batches);
        self.guest.drain();
        t.elapsed()
    }

    /// The guest, for checks.
    pub fn guest(&self) -> &Guest {
        &self.guest
    }

    /// Stops the back end; what it delivered.
    pub fn finish(self) -> Delivered {
        match self.side {
            Side::Thread { stop, handle } => {
                stop.store(true, Ordering::Release);
                handle.join().expect("the back end panicked")
            }
            Side::Engine(engine) => {
                let report = engine.shutdown();
                Delivered {
                    entries: report.stats.forwarded,
                    syncs: report.stats.guest_syncs,
                    engine: Some(report.stats),
                }
            }
        }
    }
}

/// `rings` rings of vcmdq's format on the heap, their guest sides driven by [`GuestDriver`].
fn memfd_rings(rings: usize) -> (Vec<GuestQueue>, Vec<HostRing>) {
    // No back end stops a ring of this mix: a stop is a bug, not a case to handle.
    let stop: FixPolicy = FixPolicy::Custom(Arc::new(|cerror, cmd| {
        panic!("the back end stopped a guest ring on {cmd:?} with {cerror}")
    }));
    let mut guests = Vec::with_capacity(rings);
    let mut hosts = Vec::with_capacity(rings);
    for r in 0..rings as u32 {
        let g = GuestRing::heap(RING_LOG2, r).expect("a valid ring size");
        let h = HostRing::attach_memory(g.memory(), AttachOptions::default())
            .expect("a fresh heap ring");
        let d = GuestDriver::new(g, stop.clone())
            .expect("a fresh ring")
            .with_timeout(WAIT_LIMIT);
        guests.push(GuestQueue::Memfd(d));
        hosts.push(h);
    }
    (guests, hosts)
}

/// The engine a benchmark measures: one worker, the hardware inline and free
/// ([`HwConfig::zero_cost`]), no audit, no capture; nothing attached.
pub fn bench_engine() -> Engine {
    let (queues, _) = ModelQueue::for_workers(
        1,
        DEFAULT_LOG2SIZE,
        &HwConfig::zero_cost(),
        HwPlacement::Inline,
    )
    .expect("a valid physical queue");
    Engine::start(bench_engine_config(), queues).expect("a valid engine config")
}

/// [`bench_engine`]'s configuration.
pub fn bench_engine_config() -> EngineConfig {
    EngineConfig {
        workers: 1,
        audit: false,
        capture: None,
        ..EngineConfig::default()
    }
}

/// [`bench_engine`] with one vIOMMU per ring binding `VSIDS_PER_RING` vSIDs, the rings attached.
fn start_engine(hosts: Vec<HostRing>) -> Engine {
    let engine = bench_engine();
    for (r, host) in hosts.into_iter().enumerate() {
        let r = r as u32;
        engine
            .create_viommu(ViommuConfig::new(r, e2e_vmid(r), 0))
            .expect("a fresh vIOMMU id");
        for vsid in 0..VSIDS_PER_RING {
            let dev = DeviceId(r * VSIDS_PER_RING + vsid);
            engine
                .add_device(dev, 0, e2e_psid(r, vsid))
                .expect("distinct devices");
            engine.set_dev_id(r, dev, vsid).expect("distinct vSIDs");
        }
        engine.attach_ring(host).expect("the ring's vIOMMU exists");
    }
    engine
}

/// The engine worker's idle policy, so that the baselines wait as it does: spin, then yield,
/// then sleep 50 µs.
fn idle(spins: &mut u32) {
    *spins = spins.saturating_add(1);
    if *spins < 64 {
        std::hint::spin_loop();
    } else if *spins < 512 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// The limit: every entry copied once into a destination ring, CONS moved at once.
fn copy_side(mut hosts: Vec<HostRing>, stop: &AtomicBool) -> Delivered {
    let mut dest = vec![RawCommand::default(); 1 << 12];
    let mask = dest.len() - 1;
    let mut at = 0usize;
    let mut copied = 0u64;
    let mut spins = 0;
    while !stop.load(Ordering::Acquire) {
        let mut work = false;
        for h in &mut hosts {
            let i = at & mask;
            let room = (dest.len() - i).min(BUDGET);
            let p = h
                .poll(&mut dest[i..i + room])
                .expect("heap rings never fail");
            if p.n > 0 {
                at += p.n;
                copied += p.n as u64;
                h.complete(h.read_ptr());
                work = true;
            }
        }
        if work {
            spins = 0;
        } else {
            idle(&mut spins);
        }
    }
    std::hint::black_box(&dest);
    Delivered {
        entries: copied,
        ..Delivered::default()
    }
}

/// The floor: per command a lock, decode, SipHash lookup, encode, and a locked push.
fn naive_side(mut hosts: Vec<HostRing>, stop: &AtomicBool) -> Delivered {
    let translators: Vec<NaiveTranslator> = (0..hosts.len() as u32)
        .map(|r| {
            NaiveTranslator::new(
                e2e_vmid(r),
                (0..VSIDS_PER_RING).map(|v| (v, e2e_psid(r, v))),
            )
        })
        .collect();
    let phys: Mutex<VecDeque<RawCommand>> = Mutex::new(VecDeque::with_capacity(1 << 12));
    let consume = |n: &mut u64| {
        let mut q = phys.lock().unwrap_or_else(|e| e.into_inner());
        *n += q.len() as u64;
        std::hint::black_box(q.drain(..).count());
    };
    let mut inbuf = vec![RawCommand::default(); BUDGET];
    let mut delivered = Delivered::default();
    let mut spins = 0;
    while !stop.load(Ordering::Acquire) {
        let mut work = false;
        for (h, tr) in hosts.iter_mut().zip(&translators) {
            let p = h.poll(&mut inbuf).expect("heap rings never fail");
            if p.n == 0 {
                continue;
            }
            work = true;
            let shape = h.shape();
            for (i, cmd) in inbuf[..p.n].iter().enumerate() {
                if cmd.opcode() == opcode::CMD_SYNC {
                    consume(&mut delivered.entries);
                    h.complete(shape.advance(p.first, i as u32 + 1));
                    h.signal_sync_of(cmd);
                    delivered.syncs += 1;
                    continue;
                }
                let mut out = [RawCommand::default()];
                assert_eq!(
                    tr.translate(&[*cmd], &mut out),
                    1,
                    "the floor refused {cmd:?}"
                );
                phys.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_back(out[0]);
            }
            consume(&mut delivered.entries);
            h.complete(h.read_ptr());
        }
        if work {
            spins = 0;
        } else {
            idle(&mut spins);
        }
    }
    delivered
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every back end takes every entry from either backing; naive and vcmdq deliver every
    /// command and signal every sync, and vcmdq refuses nothing and adds one physical CMD_SYNC
    /// per guest one.
    #[test]
    fn every_backend_delivers_everything_from_either_backing() {
        for (backing, backend) in [Backing::Memfd, Backing::GuestRam]
            .into_iter()
            .flat_map(|b| Backend::ALL.map(|e| (b, e)))
        {
            for (rings, batch) in [(1usize, 1usize), (3, 8), (2, 64)] {
                let mut p = Pipeline::with_backing(backend, backing, rings, batch);
                let batches = 50u64;
                p.run(batches);
                p.run(batches);
                let d = p.finish();
                let cmds = 2 * batches * batch as u64;
                let syncs = 2 * batches;
                let case = format!("{backend:?} on {backing:?}, {rings} rings, batch {batch}");
                match backend {
                    Backend::CopyLimit => assert_eq!(d.entries, cmds + syncs, "{case}"),
                    Backend::Naive => {
                        assert_eq!((d.entries, d.syncs), (cmds, syncs), "{case}");
                    }
                    Backend::Vcmdq => {
                        assert_eq!((d.entries, d.syncs), (cmds, syncs), "{case}");
                        let s = d.engine.unwrap();
                        assert_eq!(
                            (s.refused, s.dropped, s.phys_syncs),
                            (0, 0, syncs),
                            "{case}"
                        );
                    }
                }
            }
        }
    }
}
