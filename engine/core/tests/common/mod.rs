//! Helpers shared by the engine's integration tests: a hardware check that logs what the
//! physical queue consumed, the audit read back as one outcome per guest slot, rings over real
//! mapped files, a guest driver that submits batches ended by a CMD_SYNC and handles ring
//! errors the way Linux does, and an engine wrapper and waits that turn a dead engine thread or
//! a wait that never ends into a test failure saying what did not happen, instead of a hang.
#![allow(dead_code)]

pub mod file_ring;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vcmdq::command::{opcode, text, RawCommand};
use vcmdq::engine::{
    slot_outcomes, AuditRecord, CaptureError, CaptureEvent, CaptureSink, CaptureTo, Engine,
    EngineConfig, EngineReport, PhysicalQueue, RingId,
};
use vcmdq::hwmodel::{HwConfig, HwCounters, HwPlacement, ModelCounters, ModelQueue};
use vcmdq::mock::{DriverError, FixPolicy, GuestDriver};
use vcmdq::queue::CError;
use vcmdq::ring::{AttachOptions, GuestRing, HostRing};
use vcmdq::sync::Backoff;
use vcmdq::translate::SlotOutcome;

/// How long any single wait may take before a test calls the engine hung.
pub const T: Duration = Duration::from_secs(10);

/// The physical CMD_SYNC the engine adds (CS=none): the only CMD_SYNC the hardware may see.
pub const PHYS_SYNC: RawCommand = RawCommand::new(opcode::CMD_SYNC as u64, 0);

/// A command in the text form.
pub fn c(s: &str) -> RawCommand {
    text::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// What the hardware consumed, in order (interleaved across physical queues).
pub type Log = Arc<Mutex<Vec<RawCommand>>>;

/// Every command the hardware consumed, and a check that none carries a VMID or pSID the host
/// did not hand out, and that no guest CMD_SYNC (with its guest MSI address) reaches it.
pub fn hw(vmids: &[u16], psids: &[u32]) -> (HwConfig, Log) {
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let vmids: HashSet<u16> = vmids.iter().copied().collect();
    let psids: HashSet<u32> = psids.iter().copied().collect();
    let cfg = HwConfig::default().with_check(move |cmd| {
        l.lock().unwrap().push(*cmd);
        let op = cmd.opcode();
        let vmid = (cmd.d0() >> 32) as u16;
        let sid = (cmd.d0() >> 32) as u32;
        match op {
            opcode::TLBI_NH_ALL
            | opcode::TLBI_NH_ASID
            | opcode::TLBI_NH_VA
            | opcode::TLBI_NH_VAA
                if !vmids.contains(&vmid) =>
            {
                Err(format!("VMID {vmid} was never handed out"))
            }
            opcode::ATC_INV | opcode::CFGI_CD | opcode::CFGI_CD_ALL if !psids.contains(&sid) => {
                Err(format!("pSID {sid:#x} was never handed out"))
            }
            opcode::CMD_SYNC if *cmd != PHYS_SYNC => {
                Err(format!("a CMD_SYNC the engine did not make: {cmd:?}"))
            }
            _ => Ok(()),
        }
    });
    (cfg, log)
}

/// The final outcome of each entry of `ring`, in ring order, after physical faults voided
/// what followed them.
pub fn outcomes(audit: &[AuditRecord], ring: RingId) -> Vec<SlotOutcome> {
    slot_outcomes(audit, ring)
        .into_iter()
        .enumerate()
        .map(|(i, o)| o.unwrap_or_else(|| panic!("ring {ring:?}: no outcome for entry {i}")))
        .collect()
}

/// The commands `outcomes` says were forwarded, in order.
pub fn forwarded(outcomes: &[SlotOutcome]) -> Vec<RawCommand> {
    outcomes
        .iter()
        .filter_map(|o| match o {
            SlotOutcome::Forwarded(c) => Some(*c),
            _ => None,
        })
        .collect()
}

/// The sequence numbers of the guest CMD_SYNCs the audit says `ring` had signalled, in the
/// order they were signalled.
pub fn syncs_done(audit: &[AuditRecord], ring: RingId) -> Vec<u64> {
    audit
        .iter()
        .filter_map(|r| match *r {
            AuditRecord::SyncDone { ring: x, seq, .. } if x == ring => Some(seq),
            _ => None,
        })
        .collect()
}

/// vSID -> pSID.
pub fn bindings(pairs: &[(u32, u32)]) -> HashMap<u32, u32> {
    pairs.iter().copied().collect()
}

/// What a ring lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// A sealed memfd the engine creates; the guest opens `/proc/<pid>/fd/<n>`.
    Sealed,
    /// A plain file the guest creates; the engine attaches it with `allow_unsealed`.
    File,
}

static FILES: AtomicU32 = AtomicU32::new(0);

/// A guest side and an engine side of one ring over a real shared mapping. Plain files are
/// unlinked at once: both mappings stay valid and nothing is left behind.
pub fn ring_pair(backing: Backing, log2size: u8, viommu: u32) -> (GuestRing, HostRing) {
    match backing {
        Backing::Sealed => {
            let host = HostRing::create_sealed(log2size, viommu).unwrap();
            let guest = GuestRing::open(host.path()).unwrap();
            (guest, host)
        }
        Backing::File => {
            let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
                "ring-{}-{}",
                std::process::id(),
                FILES.fetch_add(1, Ordering::Relaxed)
            ));
            let guest = GuestRing::create(&path, log2size, viommu).unwrap();
            let host = HostRing::attach_with(
                &path,
                AttachOptions {
                    allow_unsealed: true,
                },
            )
            .unwrap();
            std::fs::remove_file(&path).unwrap();
            (guest, host)
        }
    }
}

/// A guest driver over one ring ([`GuestDriver`]) that also keeps what the ring holds in the
/// end (fixes applied) and every stop, by sequence number, for the checks against the oracle.
pub struct Driver {
    /// The driver.
    pub drv: GuestDriver,
    /// The engine's id of the ring.
    pub ring: RingId,
    /// Every entry written, by sequence number, as the ring holds it now.
    pub written: Vec<RawCommand>,
    /// Stops seen: the entry and CONS.ERR.
    pub stops: Vec<(u64, CError)>,
}

impl Driver {
    /// A driver for `guest`, attached to the engine as `ring`, waits bounded by [`T`].
    pub fn new(guest: GuestRing, ring: RingId, fix: FixPolicy) -> Driver {
        let drv = GuestDriver::new(guest, fix)
            .expect("a fresh ring")
            .with_timeout(T)
            .with_backoff(Backoff::SHARED_CORES);
        Driver {
            drv,
            ring,
            written: Vec::new(),
            stops: Vec::new(),
        }
    }

    /// The guest side.
    pub fn guest(&self) -> &GuestRing {
        self.drv.ring()
    }

    /// Submits `cmds` (at most the ring's size) and waits until every CMD_SYNC among them has
    /// completed, acknowledging (and fixing) errors on the way. Returns how many stops it
    /// handled.
    pub fn batch(&mut self, cmds: &[RawCommand]) -> Result<usize, DriverError> {
        self.written.extend_from_slice(cmds);
        let r = self.drv.submit(cmds);
        for s in self.drv.stops() {
            let old = &mut self.written[s.seq as usize];
            assert_eq!(
                s.found, *old,
                "ring {:?}: entry {} as written",
                self.ring, s.seq
            );
            if let Some(new) = s.fixed {
                *old = new;
            }
            self.stops.push((s.seq, s.cerror));
        }
        r.map(|()| self.drv.stops().len())
    }
}

/// Spin, then yield, then sleep: how the tests' busy-waits back off.
pub fn backoff(spins: u32) {
    Backoff::SHARED_CORES.pause(spins);
}

/// An engine under test. A test that fails while it runs (a guest's wait timed out, an
/// assertion) leaves it without joining its threads, since a worker whose hardware died never
/// finishes: the test fails with its message instead of hanging in `Engine`'s drop. Dereferences
/// to the [`Engine`].
pub struct TestEngine {
    engine: Option<Engine>,
    model: ModelCounters,
}

/// The physical queue model of a [`TestEngine`]: each worker's queue, made by
/// `ModelQueue::for_workers`.
#[derive(Clone, Debug)]
pub struct Model {
    pub log2size: u8,
    pub hw: HwConfig,
    pub placement: HwPlacement,
}

impl Default for Model {
    fn default() -> Model {
        Model {
            log2size: vcmdq::hwmodel::DEFAULT_LOG2SIZE,
            hw: HwConfig::default(),
            placement: HwPlacement::Inline,
        }
    }
}

impl Model {
    /// The default model with hardware configuration `hw`.
    pub fn with(hw: HwConfig) -> Model {
        Model {
            hw,
            ..Model::default()
        }
    }
}

/// One model queue per worker of `cfg`, and `Engine::start` on them, unwrapped.
pub fn start_engine(cfg: EngineConfig, model: &Model) -> (Engine, ModelCounters) {
    let (queues, counters) =
        ModelQueue::for_workers(cfg.workers, model.log2size, &model.hw, model.placement)
            .expect("make the physical queues");
    (
        Engine::start(cfg, queues).expect("start the engine"),
        counters,
    )
}

impl TestEngine {
    /// `Engine::start` on the default model, unwrapped.
    pub fn start(cfg: EngineConfig) -> TestEngine {
        TestEngine::with_model(cfg, Model::default())
    }

    /// `Engine::start` on `model`, unwrapped.
    pub fn with_model(cfg: EngineConfig, model: Model) -> TestEngine {
        let (engine, model) = start_engine(cfg, &model);
        TestEngine {
            engine: Some(engine),
            model,
        }
    }

    /// `Engine::start` on `queues`, unwrapped: an engine on physical queues that are not the
    /// model (whose counters stay empty).
    pub fn on_queues<Q: PhysicalQueue>(cfg: EngineConfig, queues: Vec<Q>) -> TestEngine {
        TestEngine {
            engine: Some(Engine::start(cfg, queues).expect("start the engine")),
            model: ModelCounters::default(),
        }
    }

    /// The model's counters, one per physical queue: complete once the engine is shut down.
    pub fn hardware(&self) -> ModelCounters {
        self.model.clone()
    }

    /// Worker and hardware threads that died.
    fn dead_threads(&self) -> usize {
        self.engine.as_ref().map_or(0, Engine::dead_threads) + self.model.dead_threads()
    }

    fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("the engine is running")
    }

    /// Fails the test if a worker or hardware thread has died: each is a panic (an engine bug,
    /// or a hardware check that failed), whose message the test output shows above.
    pub fn check_alive(&self) {
        let dead = self.dead_threads();
        assert!(
            dead == 0,
            "{dead} engine thread(s) died (a worker or hardware thread panicked: its message is \
             above); the rings it served are no longer served"
        );
    }

    /// Waits (bounded by [`T`]) until `done` holds, failing the test with `what` if it never
    /// does, or at once if an engine thread dies meanwhile.
    pub fn until(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + T;
        let mut spins = 0u32;
        while !done() {
            self.check_alive();
            assert!(Instant::now() < deadline, "{what}: not within {T:?}");
            spins += 1;
            backoff(spins);
        }
    }

    /// `Engine::shutdown`, bounded by [`T`]: fails the test if an engine thread has died (its
    /// panic named), or if shutdown does not finish (everything taken must complete).
    pub fn shutdown(self) -> EngineReport {
        self.shutdown_with_hardware().0
    }

    /// [`TestEngine::shutdown`], with each physical queue's hardware counters.
    pub fn shutdown_with_hardware(mut self) -> (EngineReport, Vec<HwCounters>) {
        self.check_alive();
        let engine = self.engine.take().expect("the engine is running");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("test-shutdown".into())
            .spawn(move || {
                let r =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.shutdown()));
                let _ = tx.send(r);
            })
            .expect("spawn the shutdown thread");
        match rx.recv_timeout(T) {
            Ok(Ok(report)) => (report, self.model.collect()),
            Ok(Err(p)) => std::panic::resume_unwind(p),
            Err(_) => panic!(
                "engine shutdown did not finish within {T:?}: a worker is still waiting for \
                 work it took to complete"
            ),
        }
    }
}

impl std::ops::Deref for TestEngine {
    type Target = Engine;

    fn deref(&self) -> &Engine {
        self.engine()
    }
}

impl Drop for TestEngine {
    fn drop(&mut self) {
        let dead = self.dead_threads();
        let Some(engine) = self.engine.take() else {
            return;
        };
        if std::thread::panicking() || dead > 0 {
            // Joining could wait forever on a worker whose hardware died: leave the threads
            // to the end of the test process.
            eprintln!("test engine abandoned with {dead} dead thread(s)");
            std::mem::forget(engine);
        }
    }
}

/// Waits (bounded by [`T`]) until `done` holds; fails the test with `what` if it never does.
pub fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    let mut spins = 0u32;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {T:?}");
        spins += 1;
        backoff(spins);
    }
}

/// Sets its flag when dropped, so that threads looping until the flag stop even when the test
/// thread fails: a scope whose body panics still joins its threads.
pub struct SetOnDrop<'a>(pub &'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Joins a scoped thread, waiting at most `within`, re-raising its panic with `who` named.
pub fn join_named<R>(who: &str, within: Duration, h: std::thread::ScopedJoinHandle<'_, R>) -> R {
    let deadline = Instant::now() + within;
    let mut spins = 0u32;
    while !h.is_finished() {
        assert!(
            Instant::now() < deadline,
            "{who} did not finish within {within:?}"
        );
        spins += 1;
        backoff(spins);
    }
    match h.join() {
        Ok(r) => r,
        Err(p) => panic!("{who} panicked: {}", panic_text(&p)),
    }
}

/// The message of a panic payload.
pub fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

/// A capture sink that keeps the events in memory: the engine's capture seam without a file.
#[derive(Clone, Default)]
pub struct KeptCapture(pub Arc<Mutex<Vec<CaptureEvent>>>);

impl KeptCapture {
    /// The engine setting that captures into this.
    pub fn to(&self) -> CaptureTo {
        let kept = self.clone();
        CaptureTo::new(move || Ok(Box::new(kept.clone()) as Box<dyn CaptureSink>))
    }
}

impl CaptureSink for KeptCapture {
    fn record(&mut self, event: CaptureEvent) -> Result<(), CaptureError> {
        self.0.lock().unwrap().push(event);
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<u64, CaptureError> {
        Ok(self.0.lock().unwrap().len() as u64)
    }
}
