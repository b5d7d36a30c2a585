//! The other backing of the end_to_end benchmarks: guest VCMDQs in guest RAM (a
//! `GuestMemoryMmap`) behind Tegra241 register pages, as `vcmdq-vmm` serves them. The engine
//! side of each is `HostRing::from_parts(Tegra241Registers, GuestRamSlots)`, attached to the
//! engine directly: each VCMDQ is enabled once when it is built (BASE, CONFIG.EN and
//! STATUS.ENABLED written as `Vmm::poll` would), so no control thread polls CONFIG while the
//! benchmark runs.
//!
//! The guest side is [`RamVcmdq`], a lean writer of the register protocol Linux's
//! tegra241-cmdqv driver follows (commands into the queue in guest RAM, then one PROD store in
//! page 0; room from CONS in page 0), posting batches without waiting for their CMD_SYNC, as
//! the memfd side's [`vcmdq::mock::GuestDriver::post`] does. Not `vcmdq_vmm::guest::LinuxVcmdq`:
//! its `batch` busy-polls CONS past every CMD_SYNC before it returns (one batch in flight per
//! queue, where the memfd guest keeps the ring full) and records every command it wrote in a
//! growing vector, so the comparison would measure a different guest, not a different backing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vcmdq::command::RawCommand;
use vcmdq::queue::{cons_err, QueueShape};
use vcmdq::ring::HostRing;
use vcmdq::sync::Backoff;
use vcmdq_vmm::regs::{VCMDQ_CONFIG, VCMDQ_CONS, VCMDQ_EN, VCMDQ_PROD, VCMDQ_STATUS};
use vcmdq_vmm::slots::SLOT_BYTES;
use vcmdq_vmm::{GuestRamSlots, Tegra241Registers, VcmdqRegisterPage};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory};

/// Guest RAM as the benchmark's VMM holds it.
pub type Ram = GuestMemoryMmap<()>;

/// The logical VCMDQ each ring of [`guest_ram_vcmdqs`] is in its VINTF: every ring has a
/// vIOMMU (so a VINTF and a register page) of its own, as the memfd rings do.
const LIDX: u16 = 0;

/// Why the guest side of a guest-RAM VCMDQ gave up.
#[derive(Debug, thiserror::Error)]
pub enum RamVcmdqError {
    /// The engine stopped the queue (CONS.ERR set): the benchmark's mix never should.
    #[error("the engine stopped the VCMDQ: CONS {cons:#x} with CONS.ERR {err}")]
    Stopped {
        /// CONS as the register holds it.
        cons: u32,
        /// CONS.ERR.
        err: u8,
    },
    /// A bounded wait ended.
    #[error("timed out after {waited:?} waiting for {what} (PROD {prod:#x}, CONS {cons:#x})")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        waited: Duration,
        /// The guest's PROD.
        prod: u32,
        /// CONS.
        cons: u32,
    },
    /// More commands than the queue holds.
    #[error("a batch of {len} entries does not fit a queue of {entries}")]
    BatchTooLarge {
        /// Entries in the batch.
        len: usize,
        /// Slots in the queue.
        entries: u32,
    },
    /// Guest RAM refused a store.
    #[error("guest RAM at {addr:#x}: {why}")]
    Ram {
        /// The guest-physical address.
        addr: u64,
        /// What vm-memory said.
        why: String,
    },
}

/// The guest's side of one VCMDQ in guest RAM: writes commands into the queue and moves PROD
/// in page 0, as Linux's tegra241-cmdqv guest does.
pub struct RamVcmdq {
    page: VcmdqRegisterPage,
    lidx: u16,
    mem: Arc<Ram>,
    base: u64,
    shape: QueueShape,
    /// The guest's PROD (index and wrap).
    prod: u32,
    timeout: Duration,
    backoff: Backoff,
}

impl RamVcmdq {
    /// The guest side of logical VCMDQ `lidx` of `page`, its queue of 2^`log2size` slots at
    /// guest-physical `base` in `mem`, PROD at 0; every wait bounded by `timeout`. Writes
    /// nothing: the VCMDQ is enabled by whoever built it.
    ///
    /// # Panics
    /// If `lidx` is past a VINTF's VCMDQs or `log2size` above 19.
    pub fn new(
        page: VcmdqRegisterPage,
        lidx: u16,
        mem: Arc<Ram>,
        base: u64,
        log2size: u8,
        timeout: Duration,
    ) -> RamVcmdq {
        assert!(
            lidx < vcmdq_vmm::regs::MAX_LVCMDQS,
            "LVCMDQ {lidx} out of range"
        );
        RamVcmdq {
            page,
            lidx,
            mem,
            base,
            shape: QueueShape::new(log2size).expect("LOG2SIZE at most 19"),
            prod: 0,
            timeout,
            backoff: Backoff::default(),
        }
    }

    /// CONS as page 0 holds it: the pointer, or the stop.
    fn cons(&self) -> Result<u32, RamVcmdqError> {
        let cons = self
            .page
            .read_page0(self.lidx, VCMDQ_CONS)
            .expect("lidx checked at new");
        match cons_err(cons) {
            0 => Ok(self.shape.ptr(cons)),
            err => Err(RamVcmdqError::Stopped { cons, err }),
        }
    }

    /// Waits, bounded, until `done(CONS)`.
    fn wait(&self, what: &'static str, done: impl Fn(u32) -> bool) -> Result<(), RamVcmdqError> {
        let mut start: Option<Instant> = None;
        let mut looks = 0u32;
        loop {
            let cons = self.cons()?;
            if done(cons) {
                return Ok(());
            }
            // The clock every 64 looks, as the memfd guest's driver reads it.
            if looks.is_multiple_of(64) {
                let waited = start.get_or_insert_with(Instant::now).elapsed();
                if waited >= self.timeout {
                    return Err(RamVcmdqError::Timeout {
                        what,
                        waited,
                        prod: self.prod,
                        cons,
                    });
                }
            }
            self.backoff.pause(looks);
            looks = looks.wrapping_add(1);
        }
    }

    /// Writes `cmds` from PROD on (waiting, bounded, for room) and publishes them with one
    /// PROD store.
    pub fn post(&mut self, cmds: &[RawCommand]) -> Result<(), RamVcmdqError> {
        let entries = self.shape.entries();
        let need = u32::try_from(cmds.len())
            .ok()
            .filter(|&n| n <= entries)
            .ok_or(RamVcmdqError::BatchTooLarge {
                len: cmds.len(),
                entries,
            })?;
        let (shape, prod) = (self.shape, self.prod);
        if shape.free(prod, self.cons()?) < need {
            self.wait("room in the queue", |cons| shape.free(prod, cons) >= need)?;
        }
        let len = (SLOT_BYTES as usize) << shape.log2size();
        let ram_err = |addr: u64, e: vm_memory::GuestMemoryError| RamVcmdqError::Ram {
            addr,
            why: e.to_string(),
        };
        // One region lookup per batch; the queue was checked to be in one region at build.
        let slots = self
            .mem
            .get_slice(GuestAddress(self.base), len)
            .map_err(|e| ram_err(self.base, e))?;
        // One bounds and alignment check per batch; then volatile stores, as a guest's plain
        // stores to its RAM (vm-memory's `Bytes::store` checked every word again).
        let words = slots
            .get_array_ref::<u64>(0, len / 8)
            .map_err(|e| RamVcmdqError::Ram {
                addr: self.base,
                why: e.to_string(),
            })?;
        let mut p = prod;
        for cmd in cmds {
            // Two 64-bit stores per slot, as a guest's `arm_smmu_cmdq_write_entries` does.
            let word = shape.index(p) as usize * 2;
            words.store(word, cmd.d0().to_le());
            words.store(word + 1, cmd.d1().to_le());
            p = shape.advance(p, 1);
        }
        self.prod = p;
        // Release: the engine reads PROD with Acquire and then sees every slot written.
        self.page
            .write_page0(self.lidx, VCMDQ_PROD, p)
            .expect("lidx checked at new");
        Ok(())
    }

    /// Waits, bounded, until CONS has reached PROD.
    pub fn drain(&mut self) -> Result<(), RamVcmdqError> {
        let prod = self.prod;
        self.wait("CONS to reach PROD", |cons| cons == prod)
    }

    /// The guest's PROD.
    pub fn prod(&self) -> u32 {
        self.prod
    }
}

/// `rings` guest VCMDQs of 2^`log2size` slots, back to back in one guest RAM region, each
/// behind a register page of its own and enabled; the guest sides (waits bounded by
/// `timeout`) and the engine sides for vIOMMUs 0, 1, ... in ring order.
pub fn guest_ram_vcmdqs(
    rings: usize,
    log2size: u8,
    timeout: Duration,
) -> (Vec<RamVcmdq>, Vec<HostRing>) {
    let queue_bytes = SLOT_BYTES << log2size;
    let mem = Arc::new(
        Ram::from_ranges(&[(GuestAddress(0), rings * queue_bytes as usize)])
            .expect("anonymous guest RAM"),
    );
    let mut guests = Vec::with_capacity(rings);
    let mut hosts = Vec::with_capacity(rings);
    for r in 0..rings {
        let base = r as u64 * queue_bytes;
        let page = VcmdqRegisterPage::heap();
        // What the guest's `tegra241_vcmdq_hw_init` and the VMM's enable leave in the page.
        page.set_base(LIDX, base | u64::from(log2size))
            .expect("LIDX is in range");
        page.write_page0(LIDX, VCMDQ_CONFIG, VCMDQ_EN)
            .expect("LIDX is in range");
        // The guest's side sees CONS.ERR itself and gives up: nothing to tell a VMM here.
        let regs = Tegra241Registers::new(page.clone(), LIDX, |_| {}).expect("LIDX is in range");
        let slots = GuestRamSlots::new(mem.clone(), base, log2size).expect("the queue is in RAM");
        hosts.push(
            HostRing::from_parts(regs, slots, log2size, r as u32).expect("a valid guest queue"),
        );
        page.write_page0(LIDX, VCMDQ_STATUS, VCMDQ_EN)
            .expect("LIDX is in range");
        guests.push(RamVcmdq::new(
            page,
            LIDX,
            mem.clone(),
            base,
            log2size,
            timeout,
        ));
    }
    (guests, hosts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vcmdq::command::opcode;

    const SYNC: RawCommand = RawCommand::new(opcode::CMD_SYNC as u64, 0);

    /// One VCMDQ of 8 slots with nobody serving it.
    fn unserved(timeout: Duration) -> (RamVcmdq, HostRing) {
        let (mut g, mut h) = guest_ram_vcmdqs(1, 3, timeout);
        (g.pop().unwrap(), h.pop().unwrap())
    }

    #[test]
    fn a_posted_batch_is_in_guest_ram_and_prod_moved_in_page_0() {
        let (mut g, mut host) = unserved(Duration::from_secs(10));
        let cmds = [RawCommand::new(0x11, 0x22), SYNC];
        g.post(&cmds).unwrap();
        assert_eq!(g.page.read_page0(LIDX, VCMDQ_PROD).unwrap(), 2);
        let mut out = [RawCommand::default(); 8];
        let p = host.poll(&mut out).unwrap();
        assert_eq!(
            &out[..p.n],
            &cmds,
            "the engine side reads what the guest wrote"
        );
    }

    #[test]
    fn a_stopped_vcmdq_is_an_error_naming_cons_err_not_a_hang() {
        let (mut g, _host) = unserved(Duration::from_secs(10));
        // CONS.ERR ILL (1) at slot 0, as the engine stores it.
        g.page.write_page0(LIDX, VCMDQ_CONS, 1 << 24).unwrap();
        let e = g.post(&[SYNC]).unwrap_err();
        assert!(matches!(e, RamVcmdqError::Stopped { err: 1, .. }), "{e}");
        assert!(g.drain().is_err(), "drain sees the stop too");
    }

    #[test]
    fn waiting_for_room_nobody_makes_times_out_bounded() {
        let (mut g, _host) = unserved(Duration::from_millis(20));
        g.post(&[SYNC; 8]).unwrap();
        let e = g.post(&[SYNC]).unwrap_err();
        assert!(
            matches!(
                e,
                RamVcmdqError::Timeout {
                    what: "room in the queue",
                    prod: 8,
                    cons: 0,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_batch_longer_than_the_queue_is_refused() {
        let (mut g, _host) = unserved(Duration::from_secs(10));
        let e = g.post(&[SYNC; 9]).unwrap_err();
        assert!(
            matches!(e, RamVcmdqError::BatchTooLarge { len: 9, entries: 8 }),
            "{e}"
        );
    }
}
