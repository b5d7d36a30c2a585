//! A guest driver over one [`GuestRing`]: what `vcmdq guest`, the end-to-end benchmark, the
//! soak's guests and the engine's tests all do with a ring. It writes batches (each ended by a
//! CMD_SYNC), rings the doorbell, waits for its CMD_SYNCs, and when the ring stops with
//! CONS.ERR it does what Linux's SMMUv3 driver does: overwrites an illegal command with a
//! CMD_SYNC (or retries, or what a [`FixPolicy::Custom`] says) and acknowledges.
//!
//! Every wait is bounded ([`GuestDriver::with_timeout`]) and ends in a [`DriverError`] naming
//! what did not happen. Posting a batch does not allocate: the hot path of the end-to-end
//! benchmark is a ring push, one PROD store and a scan of the batch for CMD_SYNCs.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::command::{opcode, RawCommand};
use crate::queue::CError;
use crate::ring::GuestRing;
use crate::sync::Backoff;

/// How long a wait may take by default before it fails with [`DriverError::Timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Stops one [`GuestDriver::post`], [`GuestDriver::complete`] or [`GuestDriver::drain`] keeps
/// in [`GuestDriver::stops`]; stops beyond it are handled and counted, not kept. A ring holds
/// at most 2^19 entries, and a correct engine stops at most once per entry that fails.
pub const MAX_KEPT_STOPS: usize = 1 << 12;

/// The CMD_SYNC a Linux guest writes over a command the SMMU refused (CS=none).
pub const FIX_SYNC: RawCommand = RawCommand::new(opcode::CMD_SYNC as u64, 0);

/// What a guest does with the command its ring stopped on.
#[derive(Clone)]
pub enum FixPolicy {
    /// Linux's way: a CERROR_ILL command is overwritten with a CMD_SYNC ([`FIX_SYNC`]);
    /// CERROR_ABT, CERROR_ATC_INV_SYNC and CERROR_ILL_ACCESS are acknowledged as they are, so
    /// the engine retries the command.
    LikeLinux,
    /// Acknowledge without fixing: for commands that failed in the physical queue through no
    /// fault of their own.
    Retry,
    /// `Some(cmd)` writes `cmd` over the failing command before acknowledging, `None`
    /// acknowledges as is. Called with CONS.ERR and the command as the ring holds it.
    Custom(Arc<dyn Fn(CError, RawCommand) -> Option<RawCommand> + Send + Sync>),
}

impl FixPolicy {
    /// What to write over `cmd`, which stopped the ring with `cerror`.
    pub fn fix(&self, cerror: CError, cmd: RawCommand) -> Option<RawCommand> {
        match self {
            FixPolicy::LikeLinux => (cerror == CError::Ill).then_some(FIX_SYNC),
            FixPolicy::Retry => None,
            FixPolicy::Custom(f) => f(cerror, cmd),
        }
    }
}

impl fmt::Debug for FixPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FixPolicy::LikeLinux => "LikeLinux",
            FixPolicy::Retry => "Retry",
            FixPolicy::Custom(_) => "Custom(..)",
        })
    }
}

/// A stop the driver handled: where the ring stopped, why, and what it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stop {
    /// The entry's sequence number: entries this driver wrote before it.
    pub seq: u64,
    /// CONS: the ring pointer of the failing entry.
    pub slot: u32,
    /// CONS.ERR.
    pub cerror: CError,
    /// The command the slot held.
    pub found: RawCommand,
    /// What the driver wrote over it before acknowledging (`None`: acknowledged as is).
    pub fixed: Option<RawCommand>,
}

/// What a driver did and saw since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverCounters {
    /// Batches posted.
    pub batches: u64,
    /// Entries written (a fix is not counted again).
    pub submitted: u64,
    /// CMD_SYNCs among them, plus commands fixed into one.
    pub syncs: u64,
    /// CMD_SYNCs seen completed (the ring's sync count, from when the driver started).
    pub completed: u64,
    /// Stops handled, by CONS.ERR code (index [`CError::code`]: ILL, ABT, ATC_INV_SYNC,
    /// ILL_ACCESS; codes this engine never writes read as ILL).
    pub errors: [u64; 8],
    /// Stops where a command was written over the failing one.
    pub fixes: u64,
}

impl DriverCounters {
    /// Stops handled with `cerror`.
    pub fn errors_of(&self, cerror: CError) -> u64 {
        self.errors[usize::from(cerror.code()) & 7]
    }

    /// Stops handled.
    pub fn total_errors(&self) -> u64 {
        self.errors.iter().sum()
    }
}

/// What a wait was for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Awaited {
    /// The ring's sync count to reach `want` (counted from when the driver started).
    Syncs {
        /// The count every CMD_SYNC written makes.
        want: u64,
        /// The count reached.
        seen: u64,
    },
    /// `need` free slots for a batch.
    Room {
        /// Slots the batch needs.
        need: u32,
        /// Slots free at the end.
        free: u32,
    },
    /// CONS to reach PROD.
    Drain,
}

impl fmt::Display for Awaited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Awaited::Syncs { want, seen } => write!(
                f,
                "CMD_SYNC {want} to complete (the ring's sync count reached {seen} of {want})"
            ),
            Awaited::Room { need, free } => {
                write!(f, "room for a batch of {need} entries ({free} slots free)")
            }
            Awaited::Drain => f.write_str("CONS to reach PROD"),
        }
    }
}

/// Why a driver gave up.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The ring was stopped on an error before this driver started.
    #[error("ring stopped at slot {slot:#x} with {cerror} before this guest started; another guest owns it")]
    StoppedBefore {
        /// CONS.
        slot: u32,
        /// CONS.ERR.
        cerror: CError,
    },
    /// CONS was not PROD when this driver started.
    #[error("CONS {cons:#x} is not PROD {prod:#x}: another guest is using the ring")]
    Busy {
        /// CONS.
        cons: u32,
        /// PROD.
        prod: u32,
    },
    /// A batch longer than the ring.
    #[error("a batch of {len} entries does not fit a ring of {entries} slots")]
    BatchTooLarge {
        /// The batch's entries.
        len: usize,
        /// The ring's slots.
        entries: u32,
    },
    /// A wait did not end within the driver's timeout.
    #[error("timed out after {waited:?} waiting for {what}; CONS {cons:#x}, PROD {prod:#x}")]
    Timeout {
        /// What did not happen.
        what: Awaited,
        /// How long the driver waited.
        waited: Duration,
        /// CONS at the end (with CONS.ERR cleared).
        cons: u32,
        /// The guest's PROD.
        prod: u32,
    },
    /// The ring stopped at a slot that holds no entry this driver has in flight.
    #[error("ring stopped at slot {slot:#x} with {cerror}, which holds no entry in flight (PROD {prod:#x}, {in_flight} entries in flight)")]
    StopNotInFlight {
        /// CONS.
        slot: u32,
        /// CONS.ERR.
        cerror: CError,
        /// The guest's PROD.
        prod: u32,
        /// Entries written and not known consumed.
        in_flight: u64,
    },
    /// The sync count passed the last CMD_SYNC written while CONS had not: the engine signalled
    /// a CMD_SYNC before it consumed it.
    #[error("the sync count reached {syncs} but CONS {cons:#x} ({cerror}) is not past the last CMD_SYNC, at PROD {prod:#x}")]
    SyncBeforeCons {
        /// The sync count, from when the driver started.
        syncs: u64,
        /// CONS.
        cons: u32,
        /// CONS.ERR.
        cerror: CError,
        /// The guest's PROD.
        prod: u32,
    },
}

/// A guest driver over one ring. See the module docs.
#[derive(Debug)]
pub struct GuestDriver {
    ring: GuestRing,
    fix: FixPolicy,
    timeout: Duration,
    backoff: Backoff,
    /// The sequence number of the guest's PROD.
    seq: u64,
    /// The sequence number of the oldest entry not known consumed.
    unconsumed: u64,
    /// The ring's sync count when the driver started.
    sync_base: u64,
    /// The last entry written is a CMD_SYNC.
    last_is_sync: bool,
    stops: Vec<Stop>,
    counters: DriverCounters,
}

fn is_sync(cmd: &RawCommand) -> bool {
    cmd.opcode() == opcode::CMD_SYNC
}

impl GuestDriver {
    /// A driver for `ring`, which must be idle: not stopped, CONS at PROD (another guest's ring
    /// is refused with [`DriverError::StoppedBefore`] or [`DriverError::Busy`]).
    pub fn new(ring: GuestRing, fix: FixPolicy) -> Result<GuestDriver, DriverError> {
        if let Some((slot, cerror)) = ring.error() {
            return Err(DriverError::StoppedBefore { slot, cerror });
        }
        let (cons, _) = ring.cons();
        if cons != ring.prod() {
            return Err(DriverError::Busy {
                cons,
                prod: ring.prod(),
            });
        }
        let sync_base = ring.sync_count();
        Ok(GuestDriver {
            ring,
            fix,
            timeout: DEFAULT_TIMEOUT,
            backoff: Backoff::default(),
            seq: 0,
            unconsumed: 0,
            sync_base,
            last_is_sync: false,
            stops: Vec::new(),
            counters: DriverCounters::default(),
        })
    }

    /// Every wait fails with [`DriverError::Timeout`] after `timeout` (default
    /// [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> GuestDriver {
        self.timeout = timeout;
        self
    }

    /// How waits pass the time (default [`Backoff::SPIN_THEN_YIELD`]).
    pub fn with_backoff(mut self, backoff: Backoff) -> GuestDriver {
        self.backoff = backoff;
        self
    }

    /// The ring, for what the driver does not do (hostile PROD writes, scribbles).
    pub fn ring(&self) -> &GuestRing {
        &self.ring
    }

    /// The ring, mutably: moving the guest's PROD behind the driver's back breaks its
    /// bookkeeping; this is for guests that mean to.
    pub fn ring_mut(&mut self) -> &mut GuestRing {
        &mut self.ring
    }

    /// The ring, the driver gone.
    pub fn into_ring(self) -> GuestRing {
        self.ring
    }

    /// What the driver did so far.
    pub fn counters(&self) -> DriverCounters {
        let mut c = self.counters;
        c.completed = self.ring.sync_count().wrapping_sub(self.sync_base);
        c
    }

    /// Entries written: the sequence number the next entry gets.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The stops handled since the last batch was posted (at most [`MAX_KEPT_STOPS`]).
    pub fn stops(&self) -> &[Stop] {
        &self.stops
    }

    /// Writes `cmds` (one batch, normally ended by a CMD_SYNC) and rings the doorbell, first
    /// waiting for room for all of it, handling stops meanwhile. Does not wait for the batch
    /// to complete ([`GuestDriver::complete`] does). Allocates nothing unless a stop is kept.
    pub fn post(&mut self, cmds: &[RawCommand]) -> Result<(), DriverError> {
        self.stops.clear();
        let entries = self.ring.shape().entries();
        let need = u32::try_from(cmds.len())
            .ok()
            .filter(|&n| n <= entries)
            .ok_or(DriverError::BatchTooLarge {
                len: cmds.len(),
                entries,
            })?;
        if self.ring.free() < need {
            self.wait(
                |d| d.ring.free() >= need,
                |d| Awaited::Room {
                    need,
                    free: d.ring.free(),
                },
            )?;
        }
        let n = self.post_now(cmds);
        debug_assert_eq!(n, cmds.len(), "the room was there");
        Ok(())
    }

    /// Writes as many of `cmds` as fit now and rings the doorbell, without waiting or looking
    /// for stops: for a guest that polls several rings itself. Returns the count written.
    pub fn post_now(&mut self, cmds: &[RawCommand]) -> usize {
        let n = self.ring.push(cmds);
        self.ring.doorbell();
        let written = &cmds[..n];
        let syncs = written.iter().filter(|c| is_sync(c)).count() as u64;
        self.seq += n as u64;
        self.counters.batches += 1;
        self.counters.submitted += n as u64;
        self.counters.syncs += syncs;
        if let Some(last) = written.last() {
            self.last_is_sync = is_sync(last);
        }
        n
    }

    /// Waits until every CMD_SYNC written has completed, handling stops on the way. When the
    /// last entry written is a CMD_SYNC, CONS must then be at PROD.
    pub fn complete(&mut self) -> Result<(), DriverError> {
        // The count wanted grows when a fix turns a command into a CMD_SYNC.
        self.wait(
            |d| d.ring.sync_count().wrapping_sub(d.sync_base) >= d.counters.syncs,
            |d| Awaited::Syncs {
                want: d.counters.syncs,
                seen: d.ring.sync_count().wrapping_sub(d.sync_base),
            },
        )?;
        if self.last_is_sync {
            // The engine stores CONS before it publishes the count (Release; the count is read
            // with Acquire): CONS must be past the last CMD_SYNC.
            let (cons, cerror) = self.ring.cons();
            if cons != self.ring.prod() || cerror != CError::None {
                return Err(DriverError::SyncBeforeCons {
                    syncs: self.ring.sync_count().wrapping_sub(self.sync_base),
                    cons,
                    cerror,
                    prod: self.ring.prod(),
                });
            }
            self.unconsumed = self.seq;
        }
        Ok(())
    }

    /// [`GuestDriver::post`] then [`GuestDriver::complete`]: one batch, waited for.
    pub fn submit(&mut self, cmds: &[RawCommand]) -> Result<(), DriverError> {
        self.post(cmds)?;
        self.complete()
    }

    /// Waits until CONS reaches PROD (everything written consumed), handling stops on the way.
    pub fn drain(&mut self) -> Result<(), DriverError> {
        self.wait(|d| d.ring.cons().0 == d.ring.prod(), |_| Awaited::Drain)?;
        self.unconsumed = self.seq;
        Ok(())
    }

    /// The stop the ring is on, if any, with the entry it names (its `fixed` is `None`): for a
    /// guest that decides itself what to do, then calls [`GuestDriver::acknowledge`].
    pub fn stopped(&mut self) -> Result<Option<Stop>, DriverError> {
        let Some((slot, cerror)) = self.ring.error() else {
            return Ok(None);
        };
        let prod = self.ring.prod();
        let shape = self.ring.shape();
        // CONS, if sane, is between the oldest entry not known consumed and PROD.
        let cons_back = u64::from(shape.distance(prod, self.ring.cons().0));
        if cons_back <= self.seq - self.unconsumed {
            self.unconsumed = self.seq - cons_back;
        }
        let in_flight = self.seq - self.unconsumed;
        let back = u64::from(shape.distance(prod, slot));
        if back == 0 || back > in_flight {
            return Err(DriverError::StopNotInFlight {
                slot,
                cerror,
                prod,
                in_flight,
            });
        }
        Ok(Some(Stop {
            seq: self.seq - back,
            slot,
            cerror,
            found: self.ring.read_slot(slot),
            fixed: None,
        }))
    }

    /// Resolves a stop at `slot`: writes `fix` (if any) over the failing command, counts it and
    /// acknowledges, so that the engine resumes at CONS (re-reading the slot).
    pub fn acknowledge(&mut self, slot: u32, cerror: CError, fix: Option<RawCommand>) {
        if let Some(new) = fix {
            let old = self.ring.read_slot(slot);
            self.ring.write_slot(slot, new);
            self.counters.fixes += 1;
            // A command fixed into a CMD_SYNC is one more for the guest to wait for.
            self.counters.syncs =
                self.counters.syncs + u64::from(is_sync(&new)) - u64::from(is_sync(&old));
        }
        self.counters.errors[usize::from(cerror.code()) & 7] += 1;
        self.ring.ack_error();
    }

    /// Handles the stop the ring is on, if any, by the driver's [`FixPolicy`]; true if there
    /// was one.
    pub fn handle_stop(&mut self) -> Result<bool, DriverError> {
        let Some(mut stop) = self.stopped()? else {
            return Ok(false);
        };
        stop.fixed = self.fix.fix(stop.cerror, stop.found);
        self.acknowledge(stop.slot, stop.cerror, stop.fixed);
        if self.stops.len() < MAX_KEPT_STOPS {
            self.stops.push(stop);
        }
        Ok(true)
    }

    /// Looks until `done`, handling stops; fails with `what` after the timeout.
    fn wait(
        &mut self,
        done: impl Fn(&GuestDriver) -> bool,
        what: impl Fn(&GuestDriver) -> Awaited,
    ) -> Result<(), DriverError> {
        // The clock starts at the first look that failed.
        let mut start: Option<Instant> = None;
        let mut looks = 0u32;
        let mut stops = 0u32;
        loop {
            if done(self) {
                return Ok(());
            }
            let stopped = self.handle_stop()?;
            // The clock every 64 looks (a waiting guest spins on two loads, not on the clock),
            // and every 64 stops: a ring that stops again and again times out too.
            if (stopped && stops.is_multiple_of(64)) || (!stopped && looks.is_multiple_of(64)) {
                let waited = start.get_or_insert_with(Instant::now).elapsed();
                if waited >= self.timeout {
                    return Err(DriverError::Timeout {
                        what: what(self),
                        waited,
                        cons: self.ring.cons().0,
                        prod: self.ring.prod(),
                    });
                }
            }
            if stopped {
                stops = stops.wrapping_add(1);
                looks = 0;
                continue;
            }
            self.backoff.pause(looks);
            looks = looks.saturating_add(1);
        }
    }
}
