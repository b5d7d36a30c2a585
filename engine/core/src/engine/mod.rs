//! The engine: workers that poll guest rings, translate in batches, publish into physical
//! VCMDQs, and carry completions and errors back to the guests.
//!
//! Threads. `workers` translating threads; each owns one physical queue (so the publish path is
//! single-producer: no lock, one PROD store per batch) and a set of guest rings (a ring is
//! served by exactly one worker, so its order holds). The caller hands [`Engine::start`] the
//! physical queues, one per worker, as [`PhysicalQueue`]s: the modelled SMMU
//! ([`crate::hwmodel::ModelQueue`]) or anything else behind that seam. The control plane (this type's
//! methods: vIOMMUs, devices, bindings, rings, traps) reaches a worker through a lock-free
//! queue the worker drains once per pass.
//!
//! One pass of a worker, per ring: read PROD once and copy up to the ring budget (bounded by the
//! physical free space: each guest entry becomes at most one physical entry, and by what is left
//! of the ring's budget of physical entries in flight), translate the copy under one
//! grace-period pin straight into the physical slots after PROD (each slot's provenance beside
//! it), in batches that end at a guest CMD_SYNC, a trapped or refused entry, or `batch_limit`
//! commands forwarded, publish each batch with one PROD store, and queue a pending record per
//! batch: the physical position that must be
//! consumed before the guest's CONS may pass the batch, and what to do then (signal the guest's
//! CMD_SYNC, stop the ring with CONS.ERR, hand a trapped command to the control plane). A batch
//! that ends in a guest CMD_SYNC gets one physical CMD_SYNC; no other batch needs one, since a
//! guest learns nothing from CONS but that its entries were read.
//!
//! Physical faults. The hardware stops at the failing command. Its provenance tag names the
//! guest ring and slot; the worker takes back (retracts into no-op CMD_SYNCs) that ring's later
//! commands still in the physical queue, stops the guest ring at the slot with the same CONS.ERR
//! (so after the guest's acknowledgement, the fixed slot and everything after it are read and
//! forwarded exactly once), and repairs the physical queue as Linux does. Other rings' commands
//! in the same queue are untouched.

mod capture;
#[cfg(feature = "mock")]
#[doc(hidden)]
pub mod hooks;
pub mod phys;
mod stats;
mod worker;

pub use capture::{CaptureError, CaptureEvent, CaptureSink, CaptureTo};
pub use phys::PhysicalQueue;
pub use stats::{slot_outcomes, AuditRecord, EngineStats, RingProgress};
pub use worker::{IDLE_SPIN, SLEEP_TIMEOUT};

use crate::command::RawCommand;
use crate::ring::{HostRing, RingError, RingStats};
use crate::sync::lock;
use crate::viommu::{DeviceId, Devices, GraceDomain, Viommu, ViommuConfig, ViommuError};
use capture::Capture;
use crossbeam_queue::SegQueue;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A guest ring attached to the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RingId(pub u32);

/// How the engine runs.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Translating threads, each with its own physical queue.
    pub workers: usize,
    /// Commands forwarded with one PROD store at most, besides the physical CMD_SYNC of a batch
    /// that ends in a guest CMD_SYNC (a guest CMD_SYNC, a trapped or a refused command closes
    /// a batch early).
    pub batch_limit: usize,
    /// Guest entries taken from one ring per pass at most, and physical entries of one ring
    /// waiting in its physical queue at most: a flooding guest gets its share and no more, even
    /// while the hardware (on its own thread) is slower than the worker's passes.
    pub ring_budget: usize,
    /// Record what became of every guest slot, every batch and every sync completion, with
    /// times ([`EngineReport::audit`]): what replay checks against the oracle and measures
    /// latency from. Costs an allocation now and then on the hot path, so benchmarks leave it off.
    pub audit: bool,
    /// Report what guests submit and what the control plane does to a sink made when the engine
    /// starts (`vcmdq_trace::capture_to_file` writes a trace that `vcmdq replay` reads back).
    /// See [`CaptureEvent`] for what a capture can and cannot see.
    pub capture: Option<CaptureTo>,
    /// The longest an idle worker sleeps before it polls its rings once more ([`SLEEP_TIMEOUT`]
    /// by default): what a guest that moves PROD without the kick (`docs/ring-format.md`,
    /// "Sleeping and the kick") waits at most. Shorter costs a wake-up per interval per idle
    /// worker; a kick or a control-plane message wakes a worker at once whatever this is.
    pub sleep_timeout: Duration,
}

/// The most workers (translating threads, each with its own physical queue) one engine runs.
pub const MAX_WORKERS: usize = 64;
/// The largest [`EngineConfig::batch_limit`]: each worker holds buffers of this many commands.
pub const MAX_BATCH: usize = 1 << 16;
/// The largest [`EngineConfig::ring_budget`]: each worker holds a buffer of this many commands.
pub const MAX_BUDGET: usize = 1 << 16;

/// An [`EngineConfig`] setting outside what the engine takes. Every setting is checked before
/// anything is allocated or any thread started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("EINVAL: {setting} = {value} is outside 1..={max} ({max_name})")]
pub struct ConfigLimit {
    /// The [`EngineConfig`] field.
    pub setting: &'static str,
    /// The value given.
    pub value: usize,
    /// The largest value taken.
    pub max: usize,
    /// The name of the constant that holds `max`: [`MAX_WORKERS`], [`MAX_BATCH`] or
    /// [`MAX_BUDGET`].
    pub max_name: &'static str,
}

impl EngineConfig {
    /// Checks `workers`, `batch_limit` and `ring_budget` against their bounds (1 to
    /// [`MAX_WORKERS`], [`MAX_BATCH`], [`MAX_BUDGET`]); [`Engine::start`] does the same first.
    pub fn validate(&self) -> Result<(), ConfigLimit> {
        for (setting, value, max, max_name) in [
            ("workers", self.workers, MAX_WORKERS, "MAX_WORKERS"),
            ("batch_limit", self.batch_limit, MAX_BATCH, "MAX_BATCH"),
            ("ring_budget", self.ring_budget, MAX_BUDGET, "MAX_BUDGET"),
        ] {
            if !(1..=max).contains(&value) {
                return Err(ConfigLimit {
                    setting,
                    value,
                    max,
                    max_name,
                });
            }
        }
        Ok(())
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            workers: 1,
            batch_limit: 64,
            ring_budget: 256,
            audit: false,
            capture: None,
            sleep_timeout: SLEEP_TIMEOUT,
        }
    }
}

/// A command the engine handed to the control plane (CFGI_STE, CFGI_STE_RANGE). The ring it
/// came from is paused at `slot` until [`Engine::complete_trap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrapEvent {
    /// The ring.
    pub ring: RingId,
    /// The ring's vIOMMU.
    pub viommu: u32,
    /// The guest pointer of the trapped command.
    pub slot: u32,
    /// Its sequence number in the ring since attach.
    pub seq: u64,
    /// The command as the guest wrote it.
    pub cmd: RawCommand,
}

/// A failed control-plane operation.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A vIOMMU or device operation failed.
    #[error(transparent)]
    Viommu(#[from] ViommuError),
    /// No vIOMMU has this id.
    #[error("ENOENT: no vIOMMU {0}")]
    UnknownViommu(u32),
    /// The id is taken.
    #[error("EEXIST: vIOMMU {0} exists")]
    ViommuExists(u32),
    /// A capture was asked for and a vIOMMU shares a VMID: trace format version 1 has no field
    /// for it, and a replay of the capture would refuse the second vIOMMU.
    #[error(
        "vIOMMU {viommu} shares VMID {vmid} with vIOMMU {with}, which a capture cannot record \
         (the trace format has no field for it); capture without shares-vmid-with, or do not capture"
    )]
    CaptureSharedVmid {
        /// The vIOMMU.
        viommu: u32,
        /// Its VMID.
        vmid: u16,
        /// The vIOMMU it shares it with.
        with: u32,
    },
    /// A device removal while capturing.
    #[error(
        "{0} cannot be removed while capturing: the trace format has no record for a device \
         leaving; unbind it instead, or do not capture"
    )]
    CaptureDeviceRemove(DeviceId),
    /// The vIOMMU still has rings attached.
    #[error("EBUSY: vIOMMU {viommu} still has {rings} ring(s) attached; detach them first")]
    ViommuBusy {
        /// The vIOMMU.
        viommu: u32,
        /// Rings attached.
        rings: usize,
    },
    /// No ring has this id.
    #[error("ENOENT: no ring {0:?}")]
    UnknownRing(RingId),
    /// The worker did not hand the ring back in time.
    #[error("ETIMEDOUT: ring {0:?} still has commands in flight")]
    DetachTimeout(RingId),
    /// A ring could not be read.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// The capture sink could not be made or its thread started.
    #[error("capture: {0}")]
    Capture(String),
    /// [`Engine::start`] was given a number of physical queues other than
    /// [`EngineConfig::workers`]: each worker owns exactly one.
    #[error("EINVAL: {given} physical queue(s) for {workers} worker(s): give one per worker")]
    PhysQueueCount {
        /// Queues given.
        given: usize,
        /// [`EngineConfig::workers`].
        workers: usize,
    },
    /// A setting is out of bounds.
    #[error(transparent)]
    Config(#[from] ConfigLimit),
    /// A worker thread could not be started (e.g. a thread limit); the threads already started
    /// were stopped.
    #[error("cannot start thread {thread}: {why}")]
    Spawn {
        /// The thread's name.
        thread: String,
        /// What the system said.
        why: std::io::Error,
    },
}

/// A control message for one worker.
enum Ctrl {
    Attach {
        id: RingId,
        host: Box<HostRing>,
        viommu: Arc<Viommu>,
        progress: Arc<RingProgress>,
    },
    Detach {
        id: RingId,
    },
    TrapDone {
        id: RingId,
    },
}

/// What the control plane and the workers share.
struct Shared {
    grace: Arc<GraceDomain>,
    ctrl: Vec<SegQueue<Ctrl>>,
    traps: SegQueue<TrapEvent>,
    /// 1 while a control-plane thread sleeps in [`Engine::wait_for_trap`]: the worker that
    /// pushes a trap kicks it.
    trap_wake: AtomicU32,
    /// Rings handed back by workers (detached, or failed), by id.
    detached: Mutex<HashMap<RingId, (HostRing, Option<RingError>)>>,
    stopping: AtomicBool,
    /// Per worker: the word it sleeps on besides its rings' SLEEPING words, set to 1 when it
    /// announces sleep; the control plane kicks it after each message and at shutdown.
    wake: Vec<AtomicU32>,
    stats: Vec<stats::Shared>,
    epoch: Instant,
    capture: Option<Arc<SegQueue<CaptureEvent>>>,
}

impl Shared {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Hands `msg` to `worker` and wakes it if it sleeps.
    fn send(&self, worker: usize, msg: Ctrl) {
        self.ctrl[worker].push(msg);
        crate::ring::wake::kick(&self.wake[worker]);
    }

    /// Asks every worker to stop, waking those that sleep.
    fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        for w in &self.wake {
            crate::ring::wake::kick(w);
        }
    }

    fn capture(&self, ev: impl FnOnce(u64) -> CaptureEvent) {
        if let Some(q) = &self.capture {
            q.push(ev(self.now()));
        }
    }
}

/// What [`Engine::shutdown`] returns.
#[derive(Debug, Default)]
pub struct EngineReport {
    /// Counters summed over workers.
    pub stats: EngineStats,
    /// Every worker's audit, concatenated (empty unless [`EngineConfig::audit`]).
    pub audit: Vec<AuditRecord>,
    /// When the engine started: the zero of every audit time.
    pub epoch: Option<Instant>,
    /// With [`EngineConfig::capture`]: the records written, or why the capture failed.
    pub capture: Option<Result<u64, String>>,
    /// Each ring's counters (hostile PROD activity among them), by id: as of shutdown, or as
    /// of its failure for a ring [`Engine::failed_rings`] gave up. Not rings detached by
    /// [`Engine::detach_ring`], whose caller has them.
    pub rings: Vec<(RingId, RingStats)>,
}

/// A running engine.
pub struct Engine {
    shared: Arc<Shared>,
    devices: Arc<Devices>,
    viommus: Mutex<HashMap<u32, Arc<Viommu>>>,
    /// Attached rings: their worker and vIOMMU.
    rings: Mutex<HashMap<RingId, (usize, u32)>>,
    /// Attached rings: how far their worker has published them.
    progress: Mutex<HashMap<RingId, Arc<RingProgress>>>,
    next_ring: AtomicU32,
    /// Counters of the rings `failed_rings` gave up, for the report.
    failed_stats: Mutex<Vec<(RingId, RingStats)>>,
    workers: Vec<JoinHandle<worker::Report>>,
    capture: Option<Capture>,
}

impl Engine {
    /// Starts the workers with no vIOMMU and no ring, giving worker `i` `queues[i]`: one
    /// physical queue per worker ([`EngineError::PhysQueueCount`] otherwise). Each queue is
    /// dropped on its worker's thread when the worker ends (at shutdown).
    ///
    /// Generic over the queue so that each worker calls its queue statically; queues of
    /// different kinds go in as `Box<dyn PhysicalQueue>`.
    pub fn start<Q: PhysicalQueue>(
        cfg: EngineConfig,
        queues: Vec<Q>,
    ) -> Result<Engine, EngineError> {
        cfg.validate()?;
        let n = cfg.workers;
        if queues.len() != n {
            return Err(EngineError::PhysQueueCount {
                given: queues.len(),
                workers: n,
            });
        }
        let capture = match &cfg.capture {
            Some(to) => Some(Capture::start(to).map_err(EngineError::Capture)?),
            None => None,
        };
        let shared = Arc::new(Shared {
            grace: GraceDomain::new(),
            ctrl: (0..n).map(|_| SegQueue::new()).collect(),
            traps: SegQueue::new(),
            trap_wake: AtomicU32::new(0),
            detached: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            wake: (0..n).map(|_| AtomicU32::new(0)).collect(),
            stats: (0..n).map(|_| stats::Shared::default()).collect(),
            epoch: Instant::now(),
            capture: capture.as_ref().map(|c| c.queue.clone()),
        });
        let mut workers = Vec::with_capacity(n);
        // Any failure below stops what was started, so a failed start leaves no thread behind
        // (the queues not yet handed to a worker drop here).
        let undo = |workers: Vec<JoinHandle<worker::Report>>| {
            shared.stop();
            for w in workers {
                let _ = w.join();
            }
        };
        for (index, queue) in queues.into_iter().enumerate() {
            let w = worker::Worker::new(index, &cfg, shared.clone(), queue);
            let thread = format!("vcmdq-worker{index}");
            match std::thread::Builder::new()
                .name(thread.clone())
                .spawn(move || w.run())
            {
                Ok(h) => workers.push(h),
                Err(why) => {
                    undo(workers);
                    return Err(EngineError::Spawn { thread, why });
                }
            }
        }
        Ok(Engine {
            shared,
            devices: Devices::new(),
            viommus: Mutex::new(HashMap::new()),
            rings: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            next_ring: AtomicU32::new(0),
            failed_stats: Mutex::new(Vec::new()),
            workers,
            capture,
        })
    }

    /// The host's devices: add them here before binding them in a vIOMMU.
    pub fn devices(&self) -> &Arc<Devices> {
        &self.devices
    }

    /// Creates a vIOMMU whose commands this engine's workers translate. Its VMID must be its
    /// own on its SMMU (EEXIST), unless [`ViommuConfig::shares_vmid_with`] names a vIOMMU with
    /// that VMID there; a removed vIOMMU's VMID is free again.
    pub fn create_viommu(&self, cfg: ViommuConfig) -> Result<Arc<Viommu>, EngineError> {
        let mut map = lock(&self.viommus);
        if map.contains_key(&cfg.id) {
            return Err(EngineError::ViommuExists(cfg.id));
        }
        crate::viommu::check_vmid(&cfg, map.values().map(|v| v.config()))?;
        if let (Some(with), Some(_)) = (cfg.shares_vmid_with, &self.shared.capture) {
            return Err(EngineError::CaptureSharedVmid {
                viommu: cfg.id,
                vmid: cfg.vmid,
                with,
            });
        }
        let v = Arc::new(Viommu::new(
            cfg,
            self.devices.clone(),
            self.shared.grace.clone(),
        )?);
        map.insert(cfg.id, v.clone());
        self.shared
            .capture(|t| CaptureEvent::Viommu { at: t, config: cfg });
        Ok(v)
    }

    /// Adds a host device behind physical SMMU `smmu` with StreamID `psid`.
    pub fn add_device(&self, device: DeviceId, smmu: u32, psid: u32) -> Result<(), EngineError> {
        self.devices.add_device(device, smmu, psid)?;
        self.shared.capture(|t| CaptureEvent::Device {
            at: t,
            device: device.0,
            smmu,
            psid,
        });
        Ok(())
    }

    /// `set_dev_id`: `device` becomes the guest's `vsid` in vIOMMU `viommu`.
    pub fn set_dev_id(&self, viommu: u32, device: DeviceId, vsid: u32) -> Result<(), EngineError> {
        let v = self
            .viommu(viommu)
            .ok_or(EngineError::UnknownViommu(viommu))?;
        v.set_dev_id(device, vsid)?;
        self.shared.capture(|t| CaptureEvent::Bind {
            at: t,
            viommu,
            device: device.0,
            vsid,
        });
        Ok(())
    }

    /// `unset_dev_id`: a barrier; when it returns, nothing translated through the binding is
    /// still to be published. Returns the vSID the device had.
    pub fn unset_dev_id(&self, viommu: u32, device: DeviceId) -> Result<u32, EngineError> {
        let v = self
            .viommu(viommu)
            .ok_or(EngineError::UnknownViommu(viommu))?;
        let vsid = v.unset_dev_id(device)?;
        self.shared.capture(|t| CaptureEvent::Unbind {
            at: t,
            viommu,
            device: device.0,
        });
        Ok(vsid)
    }

    /// Removes a host device. One still bound goes as iommufd has it: its vdevice is destroyed
    /// (the vSID freed, with the unbind barrier) and leaves a tombstone, so the VMM's later
    /// `unset_dev_id` of it is ENOENT ([`Viommu::remove_device`]). Refused while capturing: the
    /// trace format has no record for a device leaving.
    pub fn remove_device(&self, device: DeviceId) -> Result<(), EngineError> {
        if self.shared.capture.is_some() {
            return Err(EngineError::CaptureDeviceRemove(device));
        }
        if let Some(v) = self.devices.bound_in(device).and_then(|v| self.viommu(v)) {
            match v.remove_device(device) {
                Ok(_) => return Ok(()),
                // Unbound meanwhile (or its unbind still waiting): the registry decides.
                Err(crate::viommu::ViommuError::NotBound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(self.devices.remove_device(device)?)
    }

    /// The vIOMMU `id`; bind and unbind devices through it (`set_dev_id`, `unset_dev_id`).
    pub fn viommu(&self, id: u32) -> Option<Arc<Viommu>> {
        lock(&self.viommus).get(&id).cloned()
    }

    /// Removes a vIOMMU that has no ring attached, unbinding its devices first (each unbind a
    /// barrier).
    pub fn remove_viommu(&self, id: u32) -> Result<(), EngineError> {
        let rings = lock(&self.rings).values().filter(|(_, v)| *v == id).count();
        if rings > 0 {
            return Err(EngineError::ViommuBusy { viommu: id, rings });
        }
        let v = lock(&self.viommus)
            .remove(&id)
            .ok_or(EngineError::UnknownViommu(id))?;
        for (device, _, _) in v.bindings() {
            v.unset_dev_id(device)?;
        }
        Ok(())
    }

    /// Attaches a guest ring to the vIOMMU its header names; a worker starts serving it.
    pub fn attach_ring(&self, host: HostRing) -> Result<RingId, EngineError> {
        let viommu_id = host.viommu_id();
        let viommu = self
            .viommu(viommu_id)
            .ok_or(EngineError::UnknownViommu(viommu_id))?;
        let id = RingId(self.next_ring.fetch_add(1, Ordering::Relaxed));
        let worker = id.0 as usize % self.shared.ctrl.len();
        lock(&self.rings).insert(id, (worker, viommu_id));
        let progress = Arc::new(RingProgress::default());
        lock(&self.progress).insert(id, progress.clone());
        let log2size = host.shape().log2size();
        self.shared.capture(|t| CaptureEvent::Ring {
            at: t,
            ring: id.0,
            viommu: viommu_id,
            log2size,
        });
        self.shared.send(
            worker,
            Ctrl::Attach {
                id,
                host: Box::new(host),
                viommu,
                progress,
            },
        );
        Ok(id)
    }

    /// How far the engine has published ring `id` (see [`RingProgress`]); `None` for a ring
    /// not attached.
    pub fn ring_progress(&self, id: RingId) -> Option<Arc<RingProgress>> {
        lock(&self.progress).get(&id).cloned()
    }

    /// Detaches a ring once nothing of it is in flight and gives it back.
    pub fn detach_ring(&self, id: RingId, timeout: Duration) -> Result<HostRing, EngineError> {
        let (worker, _) = *lock(&self.rings)
            .get(&id)
            .ok_or(EngineError::UnknownRing(id))?;
        self.shared.send(worker, Ctrl::Detach { id });
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((host, _)) = lock(&self.shared.detached).remove(&id) {
                lock(&self.rings).remove(&id);
                lock(&self.progress).remove(&id);
                return Ok(host);
            }
            if Instant::now() > deadline {
                return Err(EngineError::DetachTimeout(id));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Rings a worker gave up on (their memory failed, e.g. an unsealed file shrank), with why.
    pub fn failed_rings(&self) -> Vec<(RingId, RingError)> {
        let mut d = lock(&self.shared.detached);
        let failed: Vec<RingId> = d
            .iter()
            .filter(|(_, (_, e))| e.is_some())
            .map(|(id, _)| *id)
            .collect();
        let mut rings = lock(&self.rings);
        failed
            .into_iter()
            .filter_map(|id| {
                rings.remove(&id);
                lock(&self.progress).remove(&id);
                let (host, e) = d.remove(&id)?;
                lock(&self.failed_stats).push((id, host.stats()));
                e.map(|e| (id, e))
            })
            .collect()
    }

    /// The next trapped command, in the order each ring issued them.
    pub fn next_trap(&self) -> Option<TrapEvent> {
        self.shared.traps.pop()
    }

    /// Waits until a trapped command is waiting for [`Engine::next_trap`] (true) or `timeout`
    /// passes (false), sleeping meanwhile: a control plane's loop that would otherwise poll
    /// [`Engine::next_trap`] costs no CPU while nothing traps, and still hears of a trap at
    /// once. The worker that traps a command wakes it with the protocol of the rings
    /// (`docs/ring-format.md`, "Sleeping and the kick"). Where futexes cannot be used, it polls
    /// every 200 us until `timeout`.
    pub fn wait_for_trap(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let word = &self.shared.trap_wake;
        loop {
            if !self.shared.traps.is_empty() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            word.store(1, Ordering::SeqCst);
            // Pairs with the worker's kick after its push: either the check below sees the
            // trap, or the worker sees the word set and wakes this thread.
            std::sync::atomic::fence(Ordering::SeqCst);
            let slept = if self.shared.traps.is_empty() {
                crate::ring::wake::wait_any(&[word], left)
            } else {
                crate::ring::wake::Wait::Woken
            };
            word.store(0, Ordering::Relaxed);
            if slept == crate::ring::wake::Wait::Unsupported {
                std::thread::sleep(left.min(Duration::from_micros(200)));
            }
        }
    }

    /// The control plane is done with the trapped command of `ring`: its CONS moves past it and
    /// the ring is served again.
    pub fn complete_trap(&self, ring: RingId) -> Result<(), EngineError> {
        let (worker, _) = *lock(&self.rings)
            .get(&ring)
            .ok_or(EngineError::UnknownRing(ring))?;
        self.shared.send(worker, Ctrl::TrapDone { id: ring });
        Ok(())
    }

    /// When the engine started: the zero of every audit time.
    pub fn epoch(&self) -> Instant {
        self.shared.epoch
    }

    /// Worker threads that have ended before shutdown: each one a panic (an engine bug, or
    /// its physical queue's), its rings no longer served. 0 while the engine is healthy. A
    /// physical queue's own threads are its implementation's to report
    /// ([`crate::hwmodel::ModelCounters::dead_threads`] for the model).
    pub fn dead_threads(&self) -> usize {
        self.workers.iter().filter(|h| h.is_finished()).count()
    }

    /// Counters summed over workers, as of their last pass.
    pub fn stats(&self) -> EngineStats {
        self.shared.stats.iter().map(stats::Shared::load).sum()
    }

    /// Stops taking new guest entries, publishes and completes everything already taken, and
    /// stops the threads.
    pub fn shutdown(mut self) -> EngineReport {
        self.shared.stop();
        let mut report = EngineReport {
            epoch: Some(self.shared.epoch),
            ..Default::default()
        };
        for w in self.workers.drain(..) {
            match w.join() {
                Ok(r) => report.audit.extend(r.audit),
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        report.stats = self.stats();
        report.rings = std::mem::take(&mut *lock(&self.failed_stats));
        let rest = lock(&self.shared.detached)
            .iter()
            .map(|(id, (host, _))| (*id, host.stats()))
            .collect::<Vec<_>>();
        report.rings.extend(rest);
        report.rings.sort_by_key(|(id, _)| *id);
        report.capture = self.capture.as_mut().map(Capture::finish);
        report
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.stop();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        if let Some(c) = self.capture.as_mut() {
            let _ = c.finish();
        }
    }
}
