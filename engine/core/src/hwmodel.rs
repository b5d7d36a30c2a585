//! The physical VCMDQ model: one SPSC command queue with the SMMUv3 PROD/CONS rules, fed by an
//! engine worker ([`PhysProducer`]) and drained by a consumer that models the SMMU
//! ([`Hardware`]).
//!
//! Each engine worker owns its own physical queue, so there is one producer and one consumer
//! and no lock. The producer writes slots with Relaxed stores and publishes a whole batch with
//! one Release store of PROD; the hardware reads PROD with Acquire, consumes, and publishes its
//! progress with one Release store of CONS per step. Errors follow the spec: the consumer stops
//! with CONS at the failing command, CONS.ERR set and the error flag (GERROR.CMDQ_ERR) toggled;
//! the producer repairs the queue as Linux does ([`PhysProducer::recover`]) and acknowledges
//! (the GERRORN toggle); consumption restarts at CONS.
//!
//! Positions are free-running u64 counts of entries since the queue was made: the engine keeps
//! provenance by position, and a CMD_SYNC at position `p` has completed once
//! [`PhysProducer::consumed`] is above `p`.
//!
//! [`ModelQueue`] is the engine's [`PhysicalQueue`] made of the two ends: the producer, and the
//! hardware either stepped inline by the worker or on a thread of its own ([`HwPlacement`]).
//! The model's counters reach the caller through [`ModelCounters`], not through the engine.

use std::fmt;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use crate::command::{opcode, res0_bits, RawCommand};
use crate::engine::phys::{CmdSlot, ConsError, Full, PhysicalQueue, Slots};
use crate::engine::{ConfigLimit, MAX_WORKERS};
use crate::queue::{cons_err, with_cons_err, CError, QueueError, QueueShape};
use crate::sync::{Arc, AtomicBool, AtomicU32, Ordering};

/// A check the hardware model runs on every command it consumes: `Err` names what is wrong
/// (a VMID or StreamID the host never handed out, ...). A failure is an engine bug. A std `Arc`
/// even under loom: it is configuration, not shared state the model explores.
pub type CommandCheck = std::sync::Arc<dyn Fn(&RawCommand) -> Result<(), String> + Send + Sync>;

/// A test hook run by [`PhysProducer::publish`] with the commands about to be published.
#[doc(hidden)]
pub type PublishHook = std::sync::Arc<dyn Fn(&[RawCommand]) + Send + Sync>;

/// What the hardware does when [`HwConfig::check`] fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnCheckFailure {
    /// Panic with the position, the command and the message (tests).
    #[default]
    Panic,
    /// Record it in [`Hardware::failures`], count it, and consume the command.
    Record,
}

/// A fault to inject. Each fires once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The command at position `at` fails with CERROR_ILL.
    Ill {
        /// Free-running position.
        at: u64,
    },
    /// Fetching the command at position `at` aborts: CERROR_ABT.
    Abt {
        /// Free-running position.
        at: u64,
    },
    /// The first CMD_SYNC at or after position `at` fails with CERROR_ATC_INV_SYNC.
    AtcInvSync {
        /// Free-running position.
        at: u64,
    },
    /// Before consuming position `at`, the consumer stalls for `for_`.
    Stall {
        /// Free-running position.
        at: u64,
        /// How long.
        for_: Duration,
    },
    /// Before consuming position `at`, the consumer holds its [`StallSwitch`] until the test
    /// releases it.
    Hold {
        /// Free-running position.
        at: u64,
    },
}

impl Fault {
    fn at(&self) -> u64 {
        match *self {
            Fault::Ill { at }
            | Fault::Abt { at }
            | Fault::AtcInvSync { at }
            | Fault::Stall { at, .. }
            | Fault::Hold { at } => at,
        }
    }
}

/// How the hardware model behaves.
#[derive(Clone)]
pub struct HwConfig {
    /// Run on every command consumed; `None` checks nothing beyond legality.
    pub check: Option<CommandCheck>,
    /// What a failed check does.
    pub on_check_failure: OnCheckFailure,
    /// Nanoseconds each opcode costs (a busy wait), indexed by opcode; all 0 by default.
    pub cost_ns: Box<[u32; 256]>,
    /// A further busy wait per command: a slow consumer.
    pub slow: Option<Duration>,
    /// Faults to inject.
    pub faults: Vec<Fault>,
    /// The zero-cost consumer, which consumes unread (not the producer's free slots, which are
    /// [`PhysProducer::room`]): it takes whatever is published without reading it (no
    /// legality check, no per-opcode or CMD_SYNC counts; [`HwCounters::consumed`] still
    /// counts). What the end-to-end benchmarks model: the SMMU's own work is not the engine's
    /// CPU time, even when the model is stepped inline by a worker. Has no effect when a
    /// check, a cost, a slow consumer or a fault is configured.
    pub consume_unread: bool,
    /// For tests and the soak only: run by the producer's `commit` with the commands about to
    /// be published, after they are written and before the PROD store, so that a test can hold
    /// a worker between translating a batch and publishing it (inside its grace-period pin) and
    /// see what the unbind barrier does then. `None` costs one branch per publication.
    #[doc(hidden)]
    pub before_publish: Option<PublishHook>,
}

impl Default for HwConfig {
    fn default() -> Self {
        HwConfig {
            check: None,
            on_check_failure: OnCheckFailure::default(),
            cost_ns: Box::new([0; 256]),
            slow: None,
            faults: Vec::new(),
            consume_unread: false,
            before_publish: None,
        }
    }
}

impl fmt::Debug for HwConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HwConfig")
            .field("check", &self.check.as_ref().map(|_| "<fn>"))
            .field("on_check_failure", &self.on_check_failure)
            .field(
                "cost_ns",
                &self
                    .cost_ns
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| **c != 0)
                    .collect::<Vec<_>>(),
            )
            .field("slow", &self.slow)
            .field("faults", &self.faults)
            .field("consume_unread", &self.consume_unread)
            .finish()
    }
}

impl HwConfig {
    /// The zero-cost consumer ([`HwConfig::consume_unread`]).
    pub fn zero_cost() -> Self {
        HwConfig {
            consume_unread: true,
            ..HwConfig::default()
        }
    }

    /// Whether the consumer may take commands without reading them.
    fn consumes_unread(&self) -> bool {
        self.consume_unread
            && self.check.is_none()
            && self.slow.is_none()
            && self.faults.is_empty()
            && self.cost_ns.iter().all(|&c| c == 0)
    }

    /// With `check` run on every command.
    pub fn with_check(
        mut self,
        check: impl Fn(&RawCommand) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.check = Some(std::sync::Arc::new(check));
        self
    }

    /// With opcode `op` costing `ns` nanoseconds.
    pub fn with_cost(mut self, op: u8, ns: u32) -> Self {
        self.cost_ns[op as usize] = ns;
        self
    }

    /// With `fault` injected.
    pub fn with_fault(mut self, fault: Fault) -> Self {
        self.faults.push(fault);
        self
    }
}

/// The queue the producer and the hardware share.
#[derive(Debug)]
pub struct PhysQueue {
    shape: QueueShape,
    slots: Box<[CmdSlot]>,
    /// Written by the producer (Release), read by the hardware (Acquire).
    prod: CachePadded<AtomicU32>,
    /// Written by the hardware (Release): index, wrap and CONS.ERR.
    cons: CachePadded<AtomicU32>,
    /// GERROR.CMDQ_ERR: bit 0 toggled by the hardware when it stops on an error.
    gerror: CachePadded<AtomicU32>,
    /// GERRORN.CMDQ_ERR: bit 0 made equal to GERROR's by the producer to acknowledge.
    gerrorn: CachePadded<AtomicU32>,
    /// Held: the consumer consumes nothing.
    stall: AtomicBool,
}

impl PhysQueue {
    /// A queue of 2^`log2size` entries: its producer end and its hardware end.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(log2size: u8, cfg: HwConfig) -> Result<(PhysProducer, Hardware), QueueError> {
        let shape = QueueShape::new(log2size)?;
        let q = Arc::new(PhysQueue {
            shape,
            slots: (0..shape.entries()).map(|_| CmdSlot::new()).collect(),
            prod: CachePadded::new(AtomicU32::new(0)),
            cons: CachePadded::new(AtomicU32::new(0)),
            gerror: CachePadded::new(AtomicU32::new(0)),
            gerrorn: CachePadded::new(AtomicU32::new(0)),
            stall: AtomicBool::new(false),
        });
        let mut faults = cfg.faults.clone();
        faults.sort_by_key(Fault::at);
        let before_publish = HookSlot(cfg.before_publish.clone());
        let hw = Hardware {
            q: q.clone(),
            cons: 0,
            pos: 0,
            halted: false,
            stalled_until: None,
            next_fault_at: faults.first().map_or(u64::MAX, Fault::at),
            faults: faults.into_iter().map(|f| (f, false)).collect(),
            first_unfired: 0,
            consume_unread: cfg.consumes_unread(),
            cfg,
            counters: HwCounters::default(),
            failures: Vec::new(),
        };
        let producer = PhysProducer {
            before_publish,
            q,
            prod: 0,
            room_seen: 0,
            gerrorn: 0,
        };
        Ok((producer, hw))
    }

    fn slot(&self, ptr: u32) -> &CmdSlot {
        &self.slots[self.shape.index(ptr) as usize]
    }
}

/// What a repair or a retraction leaves in a slot: a CMD_SYNC with CS=none, a no-op.
const NOOP_SYNC: RawCommand = RawCommand::new(opcode::CMD_SYNC as u64, 0);

/// [`HwConfig::before_publish`], printable.
struct HookSlot(Option<PublishHook>);

impl fmt::Debug for HookSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Some(<fn>)"
        } else {
            "None"
        })
    }
}

/// The engine worker's end of a physical queue.
#[derive(Debug)]
pub struct PhysProducer {
    before_publish: HookSlot,
    q: Arc<PhysQueue>,
    /// Free-running PROD.
    prod: u64,
    /// Free slots as last read from CONS, less what was published since: a lower bound of
    /// [`PhysProducer::room`] (CONS only moves on), so `commit` after `reserve` reads CONS no
    /// second time.
    room_seen: u32,
    /// GERRORN as last written.
    gerrorn: u32,
}

impl PhysProducer {
    /// The queue geometry.
    #[inline]
    pub fn shape(&self) -> QueueShape {
        self.q.shape
    }

    /// Slots free for a batch.
    #[inline]
    pub fn room(&self) -> u32 {
        self.q.shape.entries() - (self.prod - self.consumed()) as u32
    }

    /// The ring index of the slot at PROD.
    #[inline]
    fn prod_index(&self) -> usize {
        self.q.shape.index(self.q.shape.ptr(self.prod as u32)) as usize
    }

    /// The `n` slots after PROD, for [`PhysProducer::commit`]; [`Full`] if they are not free.
    #[inline]
    pub fn reserve(&mut self, n: usize) -> Result<Slots<'_>, Full> {
        self.room_seen = self.room();
        if n > self.room_seen as usize {
            return Err(Full {
                room: self.room_seen,
                wanted: n,
            });
        }
        let start = self.prod_index();
        // SAFETY: these `n` slots are after PROD and free: the Acquire load of CONS in `room`
        // saw the hardware finished reading them (it stores CONS with Release after its slot
        // loads), and it reads none of them again before a PROD store covers them, which only
        // `commit` (on this producer, `&mut self` like this borrow) makes. `retract` and
        // `recover` write only slots below PROD.
        Ok(unsafe { Slots::reserved(&self.q.slots, start, n) })
    }

    /// Publishes the first `n` slots after PROD (written through [`PhysProducer::reserve`])
    /// with one Release store of PROD. Returns the new free-running PROD.
    #[inline]
    pub fn commit(&mut self, n: usize) -> Result<u64, Full> {
        if n > self.room_seen as usize {
            self.room_seen = self.room();
            if n > self.room_seen as usize {
                return Err(Full {
                    room: self.room_seen,
                    wanted: n,
                });
            }
        }
        if let Some(hook) = &self.before_publish.0 {
            let slots = Slots::of_ring(&self.q.slots, self.prod_index(), n);
            let cmds: Vec<RawCommand> = (0..n).map(|i| slots.read(i)).collect();
            hook(&cmds);
        }
        self.room_seen -= n as u32;
        let shape = self.q.shape;
        let ptr = shape.ptr(self.prod as u32);
        self.prod += n as u64;
        // Release: the slot stores before it (Relaxed, or plain through a lent reservation)
        // are visible to the hardware's Acquire.
        self.q
            .prod
            .store(shape.advance(ptr, n as u32), Ordering::Release);
        Ok(self.prod)
    }

    /// Writes `cmds` and publishes them with one Release store of PROD: all or nothing.
    /// Returns the position just after the last command (the new free-running PROD).
    #[inline]
    pub fn publish(&mut self, cmds: &[RawCommand]) -> Result<u64, Full> {
        self.reserve(cmds.len())?.fill(cmds);
        self.commit(cmds.len())
    }

    /// The free-running PROD: entries published so far.
    #[inline]
    pub fn published(&self) -> u64 {
        self.prod
    }

    /// Entries the hardware has consumed, free-running: from CONS (Acquire) and the producer's
    /// own PROD. Never above [`PhysProducer::published`].
    #[inline]
    pub fn consumed(&self) -> u64 {
        let shape = self.q.shape;
        let cons = shape.ptr(self.q.cons.load(Ordering::Acquire));
        self.prod - shape.distance(self.prod as u32, cons) as u64
    }

    /// The error the hardware is stopped on, if any.
    #[inline]
    pub fn error(&self) -> Option<ConsError> {
        let gerror = self.q.gerror.load(Ordering::Acquire) & 1;
        if gerror == self.gerrorn {
            return None;
        }
        let cons = self.q.cons.load(Ordering::Acquire);
        Some(ConsError {
            pos: self.consumed(),
            cerror: CError::from_code(cons_err(cons)).unwrap_or(CError::Ill),
            cmd: self.q.slot(cons).read(),
        })
    }

    /// Overwrites the unconsumed command at `pos` with a CMD_SYNC (CS=none), a no-op, while the
    /// hardware is stopped on an error: how the engine takes back commands it published for a
    /// guest ring that the error stops, so that they are read and forwarded again once, after
    /// the guest acknowledges. Returns false (and writes nothing) when the queue is not stopped
    /// or `pos` is not in [error position, published).
    pub fn retract(&mut self, pos: u64) -> bool {
        let Some(err) = self.error() else {
            return false;
        };
        if pos < err.pos || pos >= self.prod {
            return false;
        }
        // Relaxed: the hardware reads it only after the Release of GERRORN in `recover`.
        self.q.slot(self.q.shape.ptr(pos as u32)).write(NOOP_SYNC);
        true
    }

    /// Repairs the queue after an error as Linux does, acknowledges it, and returns it.
    ///
    /// CERROR_ILL (and any code Linux does not know, ILL_ACCESS included): the failing command
    /// is overwritten with a CMD_SYNC (CS=none), so it is skipped and the commands after it
    /// still run. CERROR_ABT: the fetch is retried, command unchanged. CERROR_ATC_INV_SYNC:
    /// the CMD_SYNC is retried. Then GERRORN is toggled to match GERROR (Release, so the
    /// hardware sees the repaired slot) and the hardware restarts at CONS.
    pub fn recover(&mut self) -> Option<ConsError> {
        let err = self.error()?;
        match err.cerror {
            CError::Abt | CError::AtcInvSync => {}
            CError::None | CError::Ill | CError::IllAccess => {
                let cons = self.q.cons.load(Ordering::Acquire);
                self.q.slot(cons).write(NOOP_SYNC);
            }
        }
        self.gerrorn ^= 1;
        self.q.gerrorn.store(self.gerrorn, Ordering::Release);
        Some(err)
    }
}

/// Counters of the hardware model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HwCounters {
    /// Commands consumed, by opcode.
    pub per_opcode: Box<[u64; 256]>,
    /// Commands consumed.
    pub consumed: u64,
    /// CMD_SYNCs completed.
    pub syncs: u64,
    /// Errors raised, by CONS.ERR code.
    pub errors: [u64; 8],
    /// Failed checks ([`OnCheckFailure::Record`]).
    pub check_failures: u64,
    /// Stalls and holds injected.
    pub stalls: u64,
}

impl Default for HwCounters {
    fn default() -> Self {
        HwCounters {
            per_opcode: Box::new([0; 256]),
            consumed: 0,
            syncs: 0,
            errors: [0; 8],
            check_failures: 0,
            stalls: 0,
        }
    }
}

impl HwCounters {
    /// Errors raised of every kind.
    pub fn total_errors(&self) -> u64 {
        self.errors.iter().sum()
    }
}

/// A failed [`HwConfig::check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckFailure {
    /// Free-running position of the command.
    pub pos: u64,
    /// The command.
    pub cmd: RawCommand,
    /// What the check said.
    pub message: String,
}

/// Stops and restarts a [`Hardware`] consumer from another thread.
#[derive(Clone, Debug)]
pub struct StallSwitch {
    q: Arc<PhysQueue>,
}

impl StallSwitch {
    /// The consumer consumes nothing until released.
    pub fn hold(&self) {
        self.q.stall.store(true, Ordering::Release);
    }

    /// The consumer goes on.
    pub fn release(&self) {
        self.q.stall.store(false, Ordering::Release);
    }

    /// Whether the consumer is held.
    pub fn is_held(&self) -> bool {
        self.q.stall.load(Ordering::Acquire)
    }
}

enum Fired {
    Error(CError),
    Stall(Duration),
    Hold,
}

/// The consumer that models the SMMU: checks every command, charges its cost, completes
/// CMD_SYNCs and raises injected faults.
pub struct Hardware {
    q: Arc<PhysQueue>,
    /// CONS as index and wrap.
    cons: u32,
    /// Free-running CONS: entries consumed.
    pos: u64,
    /// Stopped on an error until GERRORN matches GERROR.
    halted: bool,
    stalled_until: Option<Instant>,
    /// Faults sorted by position, each with whether it fired.
    faults: Vec<(Fault, bool)>,
    /// Every fault before this index has fired.
    first_unfired: usize,
    /// Smallest position of an unfired fault.
    next_fault_at: u64,
    cfg: HwConfig,
    /// [`HwConfig::consume_unread`] in effect.
    consume_unread: bool,
    counters: HwCounters,
    failures: Vec<CheckFailure>,
}

impl fmt::Debug for Hardware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hardware")
            .field("cons", &self.cons)
            .field("pos", &self.pos)
            .field("halted", &self.halted)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Hardware {
    /// Commands consumed so far (the free-running CONS).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Counters.
    pub fn counters(&self) -> &HwCounters {
        &self.counters
    }

    /// Failed checks, in [`OnCheckFailure::Record`] mode.
    pub fn failures(&self) -> &[CheckFailure] {
        &self.failures
    }

    /// Whether the consumer is stopped on an error, waiting for the acknowledgement.
    pub fn halted(&self) -> bool {
        self.halted
    }

    /// A handle that stalls this consumer from another thread.
    pub fn stall_switch(&self) -> StallSwitch {
        StallSwitch { q: self.q.clone() }
    }

    /// Consumes until `stop` is set, spinning and then yielding while there is nothing to do.
    pub fn run(&mut self, stop: &AtomicBool) {
        let mut idle = 0u32;
        while !stop.load(Ordering::Acquire) {
            if self.step(256) > 0 {
                idle = 0;
            } else {
                idle = idle.saturating_add(1);
                if idle < 128 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }

    /// Consumes at most `max` commands; the count consumed. 0 while halted on an error,
    /// stalled, or with nothing published.
    pub fn step(&mut self, max: usize) -> usize {
        if !self.acknowledged() || self.stalled() {
            return 0;
        }
        let shape = self.q.shape;
        let prod = shape.ptr(self.q.prod.load(Ordering::Acquire));
        let pending = match shape.pending(prod, self.cons) {
            Ok(p) => p as usize,
            Err(e) => panic!("physical queue: the engine wrote a bad PROD: {e}"),
        };
        let n = pending.min(max);
        if self.consume_unread {
            self.skip(n);
            return n;
        }
        let done = self.consume(shape, n);
        self.counters.consumed += done as u64;
        // After an error, `raise` has published CONS (with CONS.ERR) already.
        if done > 0 && !self.halted {
            // Release: the producer that sees CONS past a slot may overwrite it; our loads of
            // it are done.
            self.q.cons.store(self.cons, Ordering::Release);
        }
        done
    }

    /// False while halted on an error the producer has not acknowledged (GERRORN); once it
    /// has, leaves the halt and publishes CONS without CONS.ERR.
    #[inline]
    fn acknowledged(&mut self) -> bool {
        // No Arc clone here: its count shares a line with what the producer reads.
        if self.halted {
            // Acquire: the slot the producer repaired before acknowledging is visible.
            let gerrorn = self.q.gerrorn.load(Ordering::Acquire) & 1;
            if gerrorn != self.q.gerror.load(Ordering::Relaxed) & 1 {
                return false;
            }
            self.halted = false;
            self.q.cons.store(self.cons, Ordering::Release);
        }
        true
    }

    /// Whether the consumer is held ([`StallSwitch`], [`Fault::Hold`]) or in an injected stall
    /// that has not run out.
    #[inline]
    fn stalled(&mut self) -> bool {
        if self.q.stall.load(Ordering::Acquire) {
            return true;
        }
        if let Some(until) = self.stalled_until {
            if Instant::now() < until {
                return true;
            }
            self.stalled_until = None;
        }
        false
    }

    /// The zero-cost consumer ([`HwConfig::consume_unread`]): takes `n` published commands
    /// without reading them.
    #[inline]
    fn skip(&mut self, n: usize) {
        if n > 0 {
            self.cons = self.q.shape.advance(self.cons, n as u32);
            self.pos += n as u64;
            self.counters.consumed += n as u64;
            // Release: the producer that sees CONS past a slot may overwrite it.
            self.q.cons.store(self.cons, Ordering::Release);
        }
    }

    /// Reads and executes at most `n` published commands, stopping early at an injected fault
    /// or stall or an illegal command; the count consumed. CONS is left to the caller.
    fn consume(&mut self, shape: QueueShape, n: usize) -> usize {
        let slow_ns = self.cfg.slow.map_or(0, |d| d.as_nanos() as u64);
        let mut done = 0;
        while done < n {
            let cmd = self.q.slot(self.cons).read();
            if self.pos >= self.next_fault_at && self.injected(&cmd) {
                break;
            }
            if !matches!(res0_bits(&cmd), Some([0, 0])) {
                // An illegal opcode or a RES0 bit set: what the SMMU refuses.
                self.raise(CError::Ill);
                break;
            }
            self.execute(cmd, slow_ns);
            self.cons = shape.advance(self.cons, 1);
            self.pos += 1;
            done += 1;
        }
        done
    }

    /// Fires the fault due at `cmd`, if any; true if it stops consumption here.
    #[cold]
    fn injected(&mut self, cmd: &RawCommand) -> bool {
        match self.fire(cmd) {
            Some(Fired::Error(cerror)) => self.raise(cerror),
            Some(Fired::Stall(d)) => {
                self.counters.stalls += 1;
                self.stalled_until = Some(Instant::now() + d);
            }
            Some(Fired::Hold) => {
                self.counters.stalls += 1;
                self.q.stall.store(true, Ordering::Release);
            }
            None => return false,
        }
        true
    }

    /// Runs the configured check on a legal command, charges its cost and counts it.
    #[inline]
    fn execute(&mut self, cmd: RawCommand, slow_ns: u64) {
        if let Some(check) = &self.cfg.check {
            if let Err(message) = check(&cmd) {
                self.check_failed(cmd, message);
            }
        }
        let op = cmd.opcode();
        let cost = u64::from(self.cfg.cost_ns[op as usize]) + slow_ns;
        if cost > 0 {
            busy_wait(cost);
        }
        self.counters.per_opcode[op as usize] += 1;
        if op == opcode::CMD_SYNC {
            self.counters.syncs += 1;
        }
    }

    fn raise(&mut self, cerror: CError) {
        self.counters.errors[cerror.code() as usize & 7] += 1;
        self.halted = true;
        self.q
            .cons
            .store(with_cons_err(self.cons, cerror.code()), Ordering::Release);
        let gerrorn = self.q.gerrorn.load(Ordering::Relaxed) & 1;
        // Release: the producer that sees the flag sees CONS and CONS.ERR.
        self.q.gerror.store(gerrorn ^ 1, Ordering::Release);
    }

    #[cold]
    fn check_failed(&mut self, cmd: RawCommand, message: String) {
        match self.cfg.on_check_failure {
            OnCheckFailure::Panic => panic!(
                "physical queue: command at position {} failed the hardware check (an engine bug): {cmd:?}: {message}",
                self.pos
            ),
            OnCheckFailure::Record => {
                self.counters.check_failures += 1;
                self.failures.push(CheckFailure {
                    pos: self.pos,
                    cmd,
                    message,
                });
            }
        }
    }

    /// The unfired fault that applies to `cmd` at the current position, marked fired.
    #[cold]
    fn fire(&mut self, cmd: &RawCommand) -> Option<Fired> {
        let pos = self.pos;
        let mut fired = None;
        // Sorted by position: only faults at or before `pos` can fire, and those before the
        // first unfired one have all fired. A long soak schedules many thousands; scanning them
        // all on every command while a CERROR_ATC_INV_SYNC waits for its CMD_SYNC was
        // quadratic.
        while self.faults.get(self.first_unfired).is_some_and(|f| f.1) {
            self.first_unfired += 1;
        }
        for (fault, done) in self.faults[self.first_unfired..].iter_mut() {
            if fault.at() > pos {
                break;
            }
            if *done {
                continue;
            }
            let hit = match *fault {
                Fault::Ill { at } => (at == pos).then_some(Fired::Error(CError::Ill)),
                Fault::Abt { at } => (at == pos).then_some(Fired::Error(CError::Abt)),
                Fault::AtcInvSync { at } => (at <= pos && cmd.opcode() == opcode::CMD_SYNC)
                    .then_some(Fired::Error(CError::AtcInvSync)),
                Fault::Stall { at, for_ } => (at <= pos).then_some(Fired::Stall(for_)),
                Fault::Hold { at } => (at <= pos).then_some(Fired::Hold),
            };
            if hit.is_some() {
                *done = true;
                fired = hit;
                break;
            }
        }
        while self.faults.get(self.first_unfired).is_some_and(|f| f.1) {
            self.first_unfired += 1;
        }
        self.next_fault_at = self
            .faults
            .get(self.first_unfired)
            .map_or(u64::MAX, |(f, _)| f.at());
        fired
    }
}

fn busy_wait(ns: u64) {
    let start = Instant::now();
    while (start.elapsed().as_nanos() as u64) < ns {
        std::hint::spin_loop();
    }
}

/// LOG2SIZE of a model queue unless the caller says otherwise (`vcmdq serve --phys-log2size`,
/// `SoakConfig::phys_log2size`): 4096 entries.
pub const DEFAULT_LOG2SIZE: u8 = 12;

/// Where the model's hardware consumer runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HwPlacement {
    /// Stepped by the worker that owns the queue, once per pass ([`PhysicalQueue::progress`]):
    /// no extra thread. The default: on a 2-core machine a third busy thread only steals time.
    #[default]
    Inline,
    /// A thread per physical queue, stopped and joined when the queue is dropped.
    Thread,
}

/// The model could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The queue geometry is invalid.
    #[error("physical queue: {0}")]
    Queue(#[from] QueueError),
    /// More queues than an engine has workers.
    #[error(transparent)]
    Workers(#[from] ConfigLimit),
    /// A hardware thread could not be started (e.g. a thread limit); the queues already made
    /// were dropped, their threads stopped.
    #[error("cannot start thread {thread}: {why}")]
    Spawn {
        /// The thread's name.
        thread: String,
        /// What the system said.
        why: std::io::Error,
    },
}

/// The caller's view of the counters of the model queues made together by
/// [`ModelQueue::for_workers`]. Each queue leaves its hardware's counters here when it is
/// dropped, which the engine does as each worker ends: after `Engine::shutdown` they are all
/// here. A std `Mutex`, touched only when a queue is dropped and when the caller reads.
#[derive(Clone, Debug, Default)]
pub struct ModelCounters {
    counters: std::sync::Arc<std::sync::Mutex<Vec<Option<HwCounters>>>>,
    dead: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl ModelCounters {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Option<HwCounters>>> {
        // A panic while holding it cannot leave it half-written: one slot is set at a time.
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The counters of every queue dropped so far, in queue order.
    pub fn collect(&self) -> Vec<HwCounters> {
        self.lock().iter().flatten().cloned().collect()
    }

    /// Hardware threads ([`HwPlacement::Thread`]) that ended in a panic (a failed
    /// [`OnCheckFailure::Panic`] check, a bad PROD): the worker that owns such a queue waits
    /// for it forever. 0 while the model is healthy.
    pub fn dead_threads(&self) -> usize {
        self.dead.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Counts its thread as dead if dropped while that thread unwinds.
struct DeathNote(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for DeathNote {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Release);
        }
    }
}

// Unboxed: one per queue, made once, and the inline step reaches it without a pointer.
#[allow(clippy::large_enum_variant)]
enum Consumer {
    Inline(Hardware),
    Thread {
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<HwCounters>>,
    },
}

/// The physical queue model as the engine's [`PhysicalQueue`]: a [`PhysProducer`] and its
/// [`Hardware`], placed as [`HwPlacement`] says.
pub struct ModelQueue {
    producer: PhysProducer,
    consumer: Consumer,
    index: usize,
    counters: ModelCounters,
}

impl fmt::Debug for ModelQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelQueue")
            .field("index", &self.index)
            .field("producer", &self.producer)
            .field(
                "placement",
                &match self.consumer {
                    Consumer::Inline(_) => HwPlacement::Inline,
                    Consumer::Thread { .. } => HwPlacement::Thread,
                },
            )
            .finish_non_exhaustive()
    }
}

impl ModelQueue {
    /// `n` queues of 2^`log2size` entries, one per engine worker, each with a hardware model
    /// configured by `cfg` and placed by `placement` (a thread named `vcmdq-hw{i}` each for
    /// [`HwPlacement::Thread`]), and the handle their counters reach the caller through.
    /// `n` is bounded like the engine's workers (1 to [`MAX_WORKERS`]), checked first.
    pub fn for_workers(
        n: usize,
        log2size: u8,
        cfg: &HwConfig,
        placement: HwPlacement,
    ) -> Result<(Vec<ModelQueue>, ModelCounters), ModelError> {
        if !(1..=MAX_WORKERS).contains(&n) {
            return Err(ModelError::Workers(ConfigLimit {
                setting: "workers",
                value: n,
                max: MAX_WORKERS,
                max_name: "MAX_WORKERS",
            }));
        }
        let counters = ModelCounters {
            counters: std::sync::Arc::new(std::sync::Mutex::new(vec![None; n])),
            dead: Default::default(),
        };
        let mut queues = Vec::with_capacity(n);
        for index in 0..n {
            let (producer, mut hardware) = PhysQueue::new(log2size, cfg.clone())?;
            let consumer = match placement {
                HwPlacement::Inline => Consumer::Inline(hardware),
                HwPlacement::Thread => {
                    let stop = Arc::new(AtomicBool::new(false));
                    let thread = format!("vcmdq-hw{index}");
                    let note = DeathNote(counters.dead.clone());
                    let stop2 = stop.clone();
                    let spawned = std::thread::Builder::new()
                        .name(thread.clone())
                        .spawn(move || {
                            let _note = note;
                            hardware.run(&stop2);
                            hardware.counters().clone()
                        })
                        // The queues made so far stop their threads as they drop.
                        .map_err(|why| ModelError::Spawn { thread, why })?;
                    Consumer::Thread {
                        stop,
                        thread: Some(spawned),
                    }
                }
            };
            queues.push(ModelQueue {
                producer,
                consumer,
                index,
                counters: counters.clone(),
            });
        }
        Ok((queues, counters))
    }
}

impl Drop for ModelQueue {
    fn drop(&mut self) {
        let counters = match &mut self.consumer {
            Consumer::Inline(hw) => Some(hw.counters().clone()),
            Consumer::Thread { stop, thread } => {
                stop.store(true, Ordering::Release);
                match thread.take().map(std::thread::JoinHandle::join) {
                    Some(Ok(c)) => Some(c),
                    // The hardware thread's panic becomes the owner's (the engine reports a
                    // worker's), unless the owner is unwinding already.
                    Some(Err(p)) if !std::thread::panicking() => std::panic::resume_unwind(p),
                    _ => None,
                }
            }
        };
        if let Some(c) = counters {
            self.counters.lock()[self.index] = Some(c);
        }
    }
}

impl PhysicalQueue for ModelQueue {
    #[inline]
    fn shape(&self) -> QueueShape {
        self.producer.shape()
    }

    #[inline]
    fn room(&self) -> u32 {
        self.producer.room()
    }

    #[inline]
    fn reserve(&mut self, n: usize) -> Result<Slots<'_>, Full> {
        self.producer.reserve(n)
    }

    #[inline]
    fn commit(&mut self, n: usize) -> Result<u64, Full> {
        self.producer.commit(n)
    }

    #[inline]
    fn publish(&mut self, cmds: &[RawCommand]) -> Result<u64, Full> {
        // The model's own `publish`: it runs `HwConfig::before_publish` first.
        self.producer.publish(cmds)
    }

    #[inline]
    fn published(&self) -> u64 {
        self.producer.published()
    }

    #[inline]
    fn consumed(&self) -> u64 {
        self.producer.consumed()
    }

    #[inline]
    fn error(&self) -> Option<ConsError> {
        self.producer.error()
    }

    fn retract(&mut self, pos: u64) -> bool {
        self.producer.retract(pos)
    }

    fn recover(&mut self) -> Option<ConsError> {
        self.producer.recover()
    }

    #[inline]
    fn progress(&mut self) -> bool {
        match &mut self.consumer {
            Consumer::Inline(hw) => hw.step(usize::MAX) > 0,
            Consumer::Thread { .. } => false,
        }
    }
}
