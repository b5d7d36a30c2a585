//! vcmdq-vmm: what a VMM embeds to serve guest VCMDQs from guest RAM through Tegra241's
//! register interface.
//!
//! A guest that has a Tegra241 CMDQV virtual interface (a VINTF) programs each of its logical
//! VCMDQs through registers ([`regs`]: CONS, PROD, CONFIG, STATUS, GERROR, GERRORN in page 0,
//! BASE in page 1, the VINTF's LVCMDQ_ERR_MAP) and writes commands into the queue in its own
//! RAM at BASE ([`slots`]). [`Vmm`] serves those queues with the vcmdq engine
//! ([`vcmdq::engine::Engine`]): it translates vSIDs and the VMID, batches into the physical
//! queue, and reports errors the way the hardware does (CONS.ERR, GERROR, LVCMDQ_ERR_MAP) and
//! to the VMM as a [`VmmEvent`] it can turn into the guest's interrupt.
//!
//! The VMM's part, in order: [`Vmm::start`] (one engine per physical SMMU, or one for all);
//! [`Vmm::create_viommu`] with the VM's VMID; [`Vmm::add_device`] and [`Vmm::set_dev_id`] for
//! each device it passes through (vSID -> pSID); [`Vmm::attach_vcmdq`] for each logical VCMDQ
//! of the guest's VINTF, with the guest's memory and the VINTF's [`VcmdqRegisterPage`]; then,
//! from a control thread, [`Vmm::poll`] (which notices CONFIG.EN and BASE changes),
//! [`Vmm::next_event`] (errors), [`Vmm::next_trap`] and [`Vmm::complete_trap`] (CFGI_STE and
//! the other commands the engine hands to the VMM); [`Vmm::detach_vcmdq`] and
//! [`Vmm::shutdown`] at the end.
//!
//! Enable and disable are polled, not trapped: page 0 (CONFIG among it) is mapped into the
//! guest, as QEMU maps it, so the guest's write of CONFIG.EN causes no exit. The VMM calls
//! [`Vmm::poll`] from a thread of its own (every few hundred microseconds, or when it traps a
//! BASE write) and the guest's driver waits, bounded, for STATUS.ENABLED, as Linux's does.
//! BASE is read when a VCMDQ is enabled; a BASE written while it is enabled takes effect at the
//! next enable (the SMMUv3 rule for a command queue's base while the queue is enabled).
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use vcmdq::viommu::{DeviceId, ViommuConfig};
//! use vcmdq_vmm::guest::LinuxVcmdq;
//! use vcmdq_vmm::{VcmdqId, VcmdqRegisterPage, Vmm, VmmConfig};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! let (vmm, _) = Vmm::start_on_model(VmmConfig::default(), &Default::default()).unwrap();
//! vmm.add_device(DeviceId(1), 0, 0x800).unwrap();
//! vmm.create_viommu(ViommuConfig::new(1, 5, 0)).unwrap();
//! vmm.set_dev_id(1, DeviceId(1), 0x10).unwrap();
//!
//! let ram = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
//! let page = VcmdqRegisterPage::heap();
//! let id = VcmdqId { viommu: 1, lidx: 0 };
//! vmm.attach_vcmdq(id, ram.clone(), page.clone()).unwrap();
//!
//! // The guest, as Linux's tegra241-cmdqv driver: program BASE, set CONFIG.EN, wait for
//! // STATUS.ENABLED (the VMM's control thread polls meanwhile), then a batch and a CMD_SYNC.
//! let mut guest = LinuxVcmdq::new(page, 0, ram, 0x4000, 4);
//! let t = Duration::from_secs(10);
//! std::thread::scope(|s| {
//!     let g = s.spawn(move || {
//!         guest.init(t).unwrap();
//!         guest.batch(&[vcmdq::command::text::parse("ATC_INV sid=0x10").unwrap()], t).unwrap();
//!         guest.disable(t).unwrap();
//!     });
//!     while !g.is_finished() {
//!         vmm.poll();
//!         std::thread::sleep(Duration::from_micros(100));
//!     }
//!     g.join().unwrap();
//! });
//! vmm.poll();
//! vmm.detach_vcmdq(id).unwrap();
//! let report = vmm.shutdown();
//! assert_eq!(report.stats.forwarded, 1, "one ATC_INV, with the pSID");
//! ```
#![deny(missing_docs)]

pub mod guest;
pub mod regs;
pub mod slots;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vcmdq::sync::lock;

use vcmdq::engine::{
    Engine, EngineConfig, EngineError, EngineReport, PhysicalQueue, RingId, TrapEvent,
};
use vcmdq::hwmodel::{
    HwConfig, HwPlacement, ModelCounters, ModelError, ModelQueue, DEFAULT_LOG2SIZE,
};
use vcmdq::queue::{cons_err, CError};
use vcmdq::ring::{HostRing, RingStats};
use vcmdq::viommu::{DeviceId, Viommu, ViommuConfig};
use vm_memory::GuestMemory;

pub use regs::{PageError, Tegra241Registers, VcmdqRegisterPage};
pub use slots::{EnableError, GuestRamSlots};

use regs::{VCMDQ_ADDR_MASK, VCMDQ_CONFIG, VCMDQ_EN, VCMDQ_LOG2SIZE_MASK, VCMDQ_STATUS};

/// Events a [`Vmm`] keeps for the VMM to read at most, by default
/// ([`VmmConfig::max_events`]); past it the oldest are dropped and counted.
pub const DEFAULT_MAX_EVENTS: usize = 4096;
/// How long [`Vmm::poll`] and [`Vmm::detach_vcmdq`] wait for a disabled VCMDQ's commands in
/// flight to complete, by default ([`VmmConfig::detach_timeout`]).
pub const DEFAULT_DETACH_TIMEOUT: Duration = Duration::from_secs(1);

/// How a [`Vmm`] runs.
#[derive(Clone, Debug)]
pub struct VmmConfig {
    /// The engine underneath: workers, batch sizes, the physical queue model.
    pub engine: EngineConfig,
    /// Events kept for [`Vmm::next_event`] at most (default [`DEFAULT_MAX_EVENTS`]): a guest
    /// that toggles CONFIG.EN with a bad BASE makes one per toggle, so the channel is bounded;
    /// past it the oldest are dropped and [`Vmm::events_dropped`] counts them.
    pub max_events: usize,
    /// How long disabling a VCMDQ waits for its commands in flight (default
    /// [`DEFAULT_DETACH_TIMEOUT`]); past it the VCMDQ stays enabled, a
    /// [`VmmEvent::DisableTimedOut`] is reported and the next [`Vmm::poll`] tries again.
    pub detach_timeout: Duration,
}

impl Default for VmmConfig {
    fn default() -> Self {
        VmmConfig {
            engine: EngineConfig::default(),
            max_events: DEFAULT_MAX_EVENTS,
            detach_timeout: DEFAULT_DETACH_TIMEOUT,
        }
    }
}

/// A guest VCMDQ: its VINTF's vIOMMU and its logical index in the VINTF.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VcmdqId {
    /// The vIOMMU (one VINTF per vIOMMU, as iommufd has it).
    pub viommu: u32,
    /// The logical VCMDQ index in the VINTF (its page-0 and page-1 slot, its LVCMDQ_ERR_MAP
    /// bit).
    pub lidx: u16,
}

/// What the VMM learns from [`Vmm::next_event`]: each one is a reason to raise the guest's
/// CMDQV interrupt (the vEVENTQ of iommufd's Tegra241 vIOMMU reports the same
/// LVCMDQ_ERR_MAP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmEvent {
    /// The engine stopped a VCMDQ on a command: CONS holds the slot and CONS.ERR, GERROR
    /// differs from GERRORN and the VCMDQ's LVCMDQ_ERR_MAP bit is set until the guest
    /// acknowledges.
    CommandError {
        /// The VCMDQ.
        vcmdq: VcmdqId,
        /// CONS as the engine stored it (index, wrap, CONS.ERR).
        cons: u32,
        /// CONS.ERR.
        cerror: CError,
        /// LVCMDQ_ERR_MAP of the VINTF when the error was raised.
        err_map: [u64; 2],
    },
    /// The guest set CONFIG.EN but its BASE was refused: STATUS.ENABLED stays clear.
    EnableRefused {
        /// The VCMDQ.
        vcmdq: VcmdqId,
        /// Why.
        reason: EnableError,
    },
    /// The engine gave up a VCMDQ whose memory failed; STATUS.ENABLED was cleared.
    QueueFailed {
        /// The VCMDQ.
        vcmdq: VcmdqId,
        /// The engine's error.
        reason: String,
    },
    /// The guest cleared CONFIG.EN but the VCMDQ's commands in flight did not complete within
    /// [`VmmConfig::detach_timeout`]; the next [`Vmm::poll`] tries again.
    DisableTimedOut {
        /// The VCMDQ.
        vcmdq: VcmdqId,
    },
}

/// A command the engine handed to the VMM ([`Vmm::next_trap`]); its VCMDQ is paused at the
/// command until [`Vmm::complete_trap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmmTrap {
    /// The VCMDQ it came from.
    pub vcmdq: VcmdqId,
    /// The engine's record: the command, its slot and sequence number.
    pub trap: TrapEvent,
}

/// A failed [`Vmm`] operation.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The engine refused it.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The physical queue model could not be built ([`Vmm::start_on_model`]).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The register page refused it (a logical VCMDQ index out of range).
    #[error(transparent)]
    Page(#[from] PageError),
    /// No such vIOMMU.
    #[error("ENOENT: no vIOMMU {0}")]
    UnknownViommu(u32),
    /// The VCMDQ is attached already.
    #[error("EEXIST: VCMDQ {0:?} is attached already")]
    VcmdqExists(VcmdqId),
    /// No such VCMDQ attached.
    #[error("ENOENT: no VCMDQ {0:?} attached")]
    UnknownVcmdq(VcmdqId),
}

/// Guest RAM behind a type the [`Vmm`] need not name: builds a queue's engine side once BASE
/// is checked.
trait GuestRam: Send + Sync {
    fn host_ring(
        &self,
        regs: Tegra241Registers,
        base: u64,
        log2size: u8,
        viommu: u32,
    ) -> Result<HostRing, EnableError>;
}

struct Ram<M: GuestMemory>(Arc<M>);

impl<M: GuestMemory + Send + Sync + 'static> GuestRam for Ram<M> {
    fn host_ring(
        &self,
        regs: Tegra241Registers,
        base: u64,
        log2size: u8,
        viommu: u32,
    ) -> Result<HostRing, EnableError> {
        let slots = GuestRamSlots::new(self.0.clone(), base, log2size)?;
        HostRing::from_parts(regs, slots, log2size, viommu)
            .map_err(|e| EnableError::Engine(e.to_string()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// CONFIG.EN clear (or not yet seen set).
    Disabled,
    /// Served by the engine as this ring.
    Enabled(RingId),
    /// CONFIG.EN set with a BASE that was refused, or the engine gave the ring up: waits for
    /// the guest to clear CONFIG.EN before an enable is tried again.
    Refused,
}

struct Vcmdq {
    page: VcmdqRegisterPage,
    ram: Box<dyn GuestRam>,
    state: State,
}

/// The bounded event channel, shared with the registers' error callbacks.
struct Events {
    queue: Mutex<VecDeque<VmmEvent>>,
    max: usize,
    dropped: AtomicU64,
}

impl Events {
    fn push(&self, ev: VmmEvent) {
        let mut q = lock(&self.queue);
        if q.len() >= self.max {
            q.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(ev);
    }
}

/// A VMM's view of the vcmdq engine: vIOMMUs, devices, and guest VCMDQs served from guest RAM
/// through Tegra241 register pages. All methods take `&self`; call [`Vmm::poll`] from one
/// control thread (see the crate documentation).
pub struct Vmm {
    engine: Engine,
    events: Arc<Events>,
    queues: Mutex<HashMap<VcmdqId, Vcmdq>>,
    rings: Mutex<HashMap<RingId, VcmdqId>>,
    /// Each VCMDQ's counters as of its last disable.
    last_stats: Mutex<HashMap<VcmdqId, RingStats>>,
    detach_timeout: Duration,
}

impl Vmm {
    /// [`Vmm::start`] on vcmdq's physical queue model (the modelled SMMU, stepped by each
    /// worker), whose hardware checks every command with `hw`: for tests, examples and a VMM
    /// without a physical VCMDQ of its own. Returns the models' counters too.
    pub fn start_on_model(cfg: VmmConfig, hw: &HwConfig) -> Result<(Vmm, ModelCounters), VmmError> {
        let (queues, model) = ModelQueue::for_workers(
            cfg.engine.workers,
            DEFAULT_LOG2SIZE,
            hw,
            HwPlacement::Inline,
        )?;
        Ok((Vmm::start(cfg, queues)?, model))
    }

    /// Starts the engine with `cfg` on the VMM's physical command queues, one per
    /// [`EngineConfig::workers`] (each worker owns one); no vIOMMU, no VCMDQ yet.
    pub fn start<Q: PhysicalQueue>(cfg: VmmConfig, queues: Vec<Q>) -> Result<Vmm, VmmError> {
        let engine = Engine::start(cfg.engine.clone(), queues)?;
        Ok(Vmm {
            engine,
            events: Arc::new(Events {
                queue: Mutex::new(VecDeque::new()),
                max: cfg.max_events.max(1),
                dropped: AtomicU64::new(0),
            }),
            queues: Mutex::new(HashMap::new()),
            rings: Mutex::new(HashMap::new()),
            last_stats: Mutex::new(HashMap::new()),
            detach_timeout: cfg.detach_timeout,
        })
    }

    /// The engine underneath: statistics, ring progress, the vIOMMUs' tables.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Creates a vIOMMU (its id, the VM's VMID on the physical SMMU `cfg.smmu`, its profile).
    pub fn create_viommu(&self, cfg: ViommuConfig) -> Result<Arc<Viommu>, VmmError> {
        Ok(self.engine.create_viommu(cfg)?)
    }

    /// Removes a vIOMMU that has no VCMDQ enabled.
    pub fn remove_viommu(&self, id: u32) -> Result<(), VmmError> {
        Ok(self.engine.remove_viommu(id)?)
    }

    /// Adds a host device behind physical SMMU `smmu` with StreamID `psid`.
    pub fn add_device(&self, device: DeviceId, smmu: u32, psid: u32) -> Result<(), VmmError> {
        Ok(self.engine.add_device(device, smmu, psid)?)
    }

    /// Removes a host device (unbinding it first, as iommufd does).
    pub fn remove_device(&self, device: DeviceId) -> Result<(), VmmError> {
        Ok(self.engine.remove_device(device)?)
    }

    /// Binds `device` as the guest's `vsid` in vIOMMU `viommu` (iommufd's vdevice).
    pub fn set_dev_id(&self, viommu: u32, device: DeviceId, vsid: u32) -> Result<(), VmmError> {
        Ok(self.engine.set_dev_id(viommu, device, vsid)?)
    }

    /// Unbinds `device` from `viommu`; a barrier: nothing translated through the binding is
    /// still to be published when it returns. Returns the vSID it had.
    pub fn unset_dev_id(&self, viommu: u32, device: DeviceId) -> Result<u32, VmmError> {
        Ok(self.engine.unset_dev_id(viommu, device)?)
    }

    /// Attaches logical VCMDQ `id.lidx` of vIOMMU `id.viommu`'s VINTF, whose registers are in
    /// `page` and whose queue is in `mem`. Nothing is read until the guest sets CONFIG.EN and
    /// [`Vmm::poll`] sees it. The VCMDQs of one VINTF share one page (clones of it).
    pub fn attach_vcmdq<M>(
        &self,
        id: VcmdqId,
        mem: Arc<M>,
        page: VcmdqRegisterPage,
    ) -> Result<(), VmmError>
    where
        M: GuestMemory + Send + Sync + 'static,
    {
        if self.engine.viommu(id.viommu).is_none() {
            return Err(VmmError::UnknownViommu(id.viommu));
        }
        // Checks the index against the VINTF's.
        page.read_page0(id.lidx, VCMDQ_STATUS)?;
        let mut queues = lock(&self.queues);
        if queues.contains_key(&id) {
            return Err(VmmError::VcmdqExists(id));
        }
        page.write_page0(id.lidx, VCMDQ_STATUS, 0)?;
        queues.insert(
            id,
            Vcmdq {
                page,
                ram: Box::new(Ram(mem)),
                state: State::Disabled,
            },
        );
        Ok(())
    }

    /// Notices what the guests did to their VCMDQs' CONFIG since the last call, and the
    /// engine's failed queues: a VCMDQ whose CONFIG.EN was set is checked (BASE against guest
    /// RAM) and enabled (STATUS.ENABLED set) or refused ([`VmmEvent::EnableRefused`]); one whose
    /// CONFIG.EN was cleared is detached once its commands in flight completed (bounded by
    /// [`VmmConfig::detach_timeout`]) and STATUS.ENABLED cleared. Returns how many VCMDQs
    /// changed state.
    pub fn poll(&self) -> usize {
        let mut changed = 0;
        let mut queues = lock(&self.queues);
        for (ring, err) in self.engine.failed_rings() {
            let Some(id) = lock(&self.rings).remove(&ring) else {
                continue;
            };
            if let Some(q) = queues.get_mut(&id) {
                q.state = State::Refused;
                let _ = q.page.write_page0(id.lidx, VCMDQ_STATUS, 0);
                changed += 1;
            }
            self.events.push(VmmEvent::QueueFailed {
                vcmdq: id,
                reason: err.to_string(),
            });
        }
        for (&id, q) in queues.iter_mut() {
            let en = q.page.read_page0(id.lidx, VCMDQ_CONFIG).unwrap_or(0) & VCMDQ_EN != 0;
            match (q.state, en) {
                (State::Disabled, true) => {
                    self.enable(id, q);
                    changed += 1;
                }
                (State::Enabled(ring), false) if self.disable(id, q, ring) => {
                    changed += 1;
                }
                (State::Refused, false) => {
                    q.state = State::Disabled;
                    changed += 1;
                }
                _ => {}
            }
        }
        changed
    }

    fn enable(&self, id: VcmdqId, q: &mut Vcmdq) {
        let base = q.page.base(id.lidx).unwrap_or(0);
        let addr = base & VCMDQ_ADDR_MASK;
        let log2size = (base & VCMDQ_LOG2SIZE_MASK) as u8;
        let events = self.events.clone();
        let page = q.page.clone();
        let on_error = move |cons: u32| {
            events.push(VmmEvent::CommandError {
                vcmdq: id,
                cons,
                cerror: CError::from_code(cons_err(cons)).unwrap_or(CError::Ill),
                err_map: page.err_map(),
            })
        };
        let built = Tegra241Registers::new(q.page.clone(), id.lidx, on_error)
            .map_err(|e| EnableError::Engine(e.to_string()))
            .and_then(|regs| q.ram.host_ring(regs, addr, log2size, id.viommu));
        let host = match built {
            Ok(h) => h,
            Err(reason) => {
                q.state = State::Refused;
                self.events
                    .push(VmmEvent::EnableRefused { vcmdq: id, reason });
                return;
            }
        };
        // The ring map stays locked until the new ring is in it: a command the engine traps
        // the moment it serves the queue must find its VCMDQ in `next_trap`.
        let mut rings = lock(&self.rings);
        match self.engine.attach_ring(host) {
            Ok(ring) => {
                rings.insert(ring, id);
                q.state = State::Enabled(ring);
                // Release: a guest that sees ENABLED finds the engine serving the queue.
                let _ = q.page.write_page0(id.lidx, VCMDQ_STATUS, VCMDQ_EN);
            }
            Err(e) => {
                q.state = State::Refused;
                self.events.push(VmmEvent::EnableRefused {
                    vcmdq: id,
                    reason: EnableError::Engine(e.to_string()),
                });
            }
        }
    }

    /// Detaches `ring`; `true` once it is off the engine (or gone already).
    fn disable(&self, id: VcmdqId, q: &mut Vcmdq, ring: RingId) -> bool {
        match self.engine.detach_ring(ring, self.detach_timeout) {
            Ok(host) => {
                lock(&self.last_stats).insert(id, host.stats());
            }
            Err(EngineError::DetachTimeout(_)) => {
                self.events.push(VmmEvent::DisableTimedOut { vcmdq: id });
                return false;
            }
            // Failed meanwhile: the next poll's failed_rings has it, or it is gone.
            Err(_) => {}
        }
        lock(&self.rings).remove(&ring);
        q.state = State::Disabled;
        let _ = q.page.write_page0(id.lidx, VCMDQ_STATUS, 0);
        true
    }

    /// Detaches a VCMDQ from the engine (waiting, bounded, for its commands in flight) and
    /// forgets it; STATUS.ENABLED is cleared.
    pub fn detach_vcmdq(&self, id: VcmdqId) -> Result<(), VmmError> {
        let mut queues = lock(&self.queues);
        let q = queues.get_mut(&id).ok_or(VmmError::UnknownVcmdq(id))?;
        if let State::Enabled(ring) = q.state {
            let host = self.engine.detach_ring(ring, self.detach_timeout)?;
            lock(&self.last_stats).insert(id, host.stats());
            lock(&self.rings).remove(&ring);
        }
        let _ = q.page.write_page0(id.lidx, VCMDQ_STATUS, 0);
        queues.remove(&id);
        Ok(())
    }

    /// The engine's ring serving VCMDQ `id` while it is enabled: what the engine's audit and
    /// statistics name it by.
    pub fn ring_of(&self, id: VcmdqId) -> Option<RingId> {
        match lock(&self.queues).get(&id)?.state {
            State::Enabled(ring) => Some(ring),
            _ => None,
        }
    }

    /// VCMDQ `id`'s counters (hostile PROD values seen, stops, acknowledgements) as of the
    /// last time it was disabled or detached.
    pub fn last_ring_stats(&self, id: VcmdqId) -> Option<RingStats> {
        lock(&self.last_stats).get(&id).copied()
    }

    /// The next error event, oldest first.
    pub fn next_event(&self) -> Option<VmmEvent> {
        lock(&self.events.queue).pop_front()
    }

    /// Events dropped because the channel was full ([`VmmConfig::max_events`]).
    pub fn events_dropped(&self) -> u64 {
        self.events.dropped.load(Ordering::Relaxed)
    }

    /// The next command the engine handed to the VMM (CFGI_STE, CFGI_STE_RANGE), in each
    /// VCMDQ's order. A trap from a VCMDQ detached since is skipped.
    pub fn next_trap(&self) -> Option<VmmTrap> {
        loop {
            let trap = self.engine.next_trap()?;
            if let Some(&vcmdq) = lock(&self.rings).get(&trap.ring) {
                return Some(VmmTrap { vcmdq, trap });
            }
        }
    }

    /// The VMM is done with `trap` (it installed the STE, say): the VCMDQ's CONS moves past
    /// it and the queue is served again. A VCMDQ the guest disabled while the trap was pending
    /// was detached with CONS at the trapped command; completing it then is
    /// [`EngineError::UnknownRing`].
    pub fn complete_trap(&self, trap: &VmmTrap) -> Result<(), VmmError> {
        Ok(self.engine.complete_trap(trap.trap.ring)?)
    }

    /// Stops the engine: everything already taken from the guests is published and completed.
    /// The VCMDQs' STATUS.ENABLED is cleared.
    pub fn shutdown(self) -> EngineReport {
        for (id, q) in lock(&self.queues).iter() {
            let _ = q.page.write_page0(id.lidx, VCMDQ_STATUS, 0);
        }
        self.engine.shutdown()
    }
}
