//! A guest's driver for one logical VCMDQ, following Linux's `tegra241-cmdqv.c` and
//! `arm-smmu-v3.c` as they run inside a VM: the example, the tests and the fuzz target drive
//! [`crate::Vmm`] through it, and a VMM author can read it as the protocol the engine expects.
//!
//! What it does as Linux does: `init` is `tegra241_vcmdq_hw_init` (reset: CONFIG = 0 and wait
//! for STATUS.ENABLED to clear, PROD = CONS = 0, BASE = 0, a pending error acknowledged; then
//! BASE = address | LOG2SIZE, CONFIG.EN, and a bounded wait for STATUS.ENABLED); `batch` is
//! `arm_smmu_cmdq_issue_cmdlist` with a CMD_SYNC (CS=NONE, as Linux issues it on a VCMDQ) and
//! busy polling of CONS until the queue consumed it; `handle_error` is the CMDQV interrupt's
//! work for one VCMDQ (`tegra241_vintf0_handle_error`): find the VCMDQ in LVCMDQ_ERR_MAP, read
//! GERROR, `__arm_smmu_cmdq_skip_err` (CONS.ERR ILL: the command at CONS is replaced with a
//! CMD_SYNC; ABT and ATC_INV_SYNC: retried as is), then GERRORN = GERROR.
//!
//! One difference: Linux's interrupt handler walks the whole error map; here each VCMDQ's
//! driver handles its own bit, because each test or example thread owns one VCMDQ and records
//! what its queue holds.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vcmdq::command::{opcode, RawCommand};
use vcmdq::queue::{cons_err, CError, QueueShape};
use vcmdq::sync::Backoff;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::regs::{
    VcmdqRegisterPage, VCMDQ_CONFIG, VCMDQ_CONS, VCMDQ_EN, VCMDQ_GERROR, VCMDQ_GERRORN, VCMDQ_PROD,
    VCMDQ_STATUS,
};

/// The CMD_SYNC Linux issues on a VCMDQ: CS=NONE (`ARM_SMMU_OPT_TEGRA241_CMDQV` busy-polls),
/// MSH=ISH, MSIATTR=OIWB.
pub const VCMDQ_SYNC: RawCommand =
    RawCommand::new(opcode::CMD_SYNC as u64 | 3 << 22 | 0xf << 24, 0);

/// Why a guest driver call failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A bounded wait ended.
    #[error("LVCMDQ{lidx}: timed out after {waited:?} waiting for {what}")]
    Timeout {
        /// The logical VCMDQ.
        lidx: u16,
        /// What was awaited.
        what: &'static str,
        /// How long.
        waited: Duration,
    },
    /// Guest RAM could not be written (the queue is outside it).
    #[error("LVCMDQ{lidx}: guest RAM at {addr:#x}: {why}")]
    Ram {
        /// The logical VCMDQ.
        lidx: u16,
        /// The address.
        addr: u64,
        /// What vm-memory said.
        why: String,
    },
    /// More commands than the queue holds.
    #[error(
        "LVCMDQ{lidx}: a batch of {n} commands and a CMD_SYNC does not fit a queue of {entries}"
    )]
    TooLong {
        /// The logical VCMDQ.
        lidx: u16,
        /// Commands in the batch.
        n: usize,
        /// Slots in the queue.
        entries: u32,
    },
}

/// An error [`LinuxVcmdq::handle_error`] handled: where the queue stopped, why, and what the
/// slot held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handled {
    /// The sequence number (since `init`) of the command the queue stopped on.
    pub seq: u64,
    /// CONS.ERR.
    pub cerror: CError,
    /// The command that failed.
    pub cmd: RawCommand,
}

/// A guest's driver for logical VCMDQ `lidx` of a VINTF.
pub struct LinuxVcmdq<M: GuestMemory> {
    page: VcmdqRegisterPage,
    lidx: u16,
    mem: Arc<M>,
    base: u64,
    shape: QueueShape,
    /// The driver's PROD (index and wrap).
    prod: u32,
    /// Every command written since `init`, by sequence number, as the queue holds it now
    /// (a command replaced by a CMD_SYNC after an error shows as that CMD_SYNC).
    written: Vec<RawCommand>,
    handled: Vec<Handled>,
}

impl<M: GuestMemory> LinuxVcmdq<M> {
    /// A driver for logical VCMDQ `lidx` of `page`, its queue of 2^`log2size` slots at
    /// guest-physical `base` in `mem`. Nothing is written until [`LinuxVcmdq::init`].
    ///
    /// # Panics
    /// If `log2size` is above 19.
    pub fn new(
        page: VcmdqRegisterPage,
        lidx: u16,
        mem: Arc<M>,
        base: u64,
        log2size: u8,
    ) -> LinuxVcmdq<M> {
        LinuxVcmdq {
            page,
            lidx,
            mem,
            base,
            shape: QueueShape::new(log2size).expect("LOG2SIZE at most 19"),
            prod: 0,
            written: Vec::new(),
            handled: Vec::new(),
        }
    }

    /// The register page.
    pub fn page(&self) -> &VcmdqRegisterPage {
        &self.page
    }

    /// The logical VCMDQ index.
    pub fn lidx(&self) -> u16 {
        self.lidx
    }

    /// The queue's shape.
    pub fn shape(&self) -> QueueShape {
        self.shape
    }

    /// Commands written since `init`, as the queue holds them now.
    pub fn written(&self) -> &[RawCommand] {
        &self.written
    }

    /// Errors handled since `init`.
    pub fn handled(&self) -> &[Handled] {
        &self.handled
    }

    /// Reads page-0 register `reg` of this VCMDQ.
    pub fn reg(&self, reg: usize) -> u32 {
        self.page.read_page0(self.lidx, reg).expect("lidx checked")
    }

    /// Writes page-0 register `reg` of this VCMDQ.
    pub fn set_reg(&self, reg: usize, v: u32) {
        self.page
            .write_page0(self.lidx, reg, v)
            .expect("lidx checked")
    }

    fn wait(
        &self,
        what: &'static str,
        t: Duration,
        mut done: impl FnMut() -> bool,
    ) -> Result<(), GuestError> {
        let deadline = Instant::now() + t;
        let mut spins = 0u32;
        while !done() {
            if Instant::now() > deadline {
                return Err(GuestError::Timeout {
                    lidx: self.lidx,
                    what,
                    waited: t,
                });
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        Ok(())
    }

    /// `tegra241_vcmdq_hw_deinit`: CONFIG = 0 and a bounded wait for STATUS.ENABLED to clear,
    /// then PROD = CONS = 0, BASE = 0, and a pending error acknowledged.
    pub fn deinit(&mut self, t: Duration) -> Result<(), GuestError> {
        self.disable(t)?;
        self.set_reg(VCMDQ_PROD, 0);
        self.set_reg(VCMDQ_CONS, 0);
        self.page.set_base(self.lidx, 0).expect("lidx checked");
        let (gerrorn, gerror) = (self.reg(VCMDQ_GERRORN), self.reg(VCMDQ_GERROR));
        if gerror != gerrorn {
            self.set_reg(VCMDQ_GERRORN, gerror);
        }
        Ok(())
    }

    /// `tegra241_vcmdq_hw_init`: reset, BASE = address | LOG2SIZE, CONFIG.EN, and a bounded
    /// wait for STATUS.ENABLED. The driver starts again at PROD = 0 with nothing written.
    pub fn init(&mut self, t: Duration) -> Result<(), GuestError> {
        self.deinit(t)?;
        self.prod = 0;
        self.written.clear();
        self.handled.clear();
        let base = self.base | u64::from(self.shape.log2size());
        self.page.set_base(self.lidx, base).expect("lidx checked");
        self.set_reg(VCMDQ_CONFIG, VCMDQ_EN);
        self.wait("STATUS.ENABLED after CONFIG.EN", t, || {
            self.reg(VCMDQ_STATUS) & VCMDQ_EN != 0
        })
    }

    /// CONFIG = 0 and a bounded wait for STATUS.ENABLED to clear (`vcmdq_write_config(0)`).
    pub fn disable(&mut self, t: Duration) -> Result<(), GuestError> {
        self.set_reg(VCMDQ_CONFIG, 0);
        self.wait("STATUS.ENABLED to clear after CONFIG = 0", t, || {
            self.reg(VCMDQ_STATUS) & VCMDQ_EN == 0
        })
    }

    fn slot_addr(&self, ptr: u32) -> u64 {
        self.base + u64::from(self.shape.index(ptr)) * 16
    }

    /// Writes slot `ptr` with two 64-bit atomic stores.
    pub fn write_slot(&self, ptr: u32, cmd: RawCommand) -> Result<(), GuestError> {
        let addr = self.slot_addr(ptr);
        let err = |why: String| GuestError::Ram {
            lidx: self.lidx,
            addr,
            why,
        };
        self.mem
            .store(cmd.d0().to_le(), GuestAddress(addr), Ordering::Relaxed)
            .map_err(|e| err(e.to_string()))?;
        self.mem
            .store(cmd.d1().to_le(), GuestAddress(addr + 8), Ordering::Relaxed)
            .map_err(|e| err(e.to_string()))
    }

    /// Reads slot `ptr` with two 64-bit atomic loads.
    pub fn read_slot(&self, ptr: u32) -> Result<RawCommand, GuestError> {
        let addr = self.slot_addr(ptr);
        let err = |why: String| GuestError::Ram {
            lidx: self.lidx,
            addr,
            why,
        };
        let d0: u64 = self
            .mem
            .load(GuestAddress(addr), Ordering::Relaxed)
            .map_err(|e| err(e.to_string()))?;
        let d1: u64 = self
            .mem
            .load(GuestAddress(addr + 8), Ordering::Relaxed)
            .map_err(|e| err(e.to_string()))?;
        Ok(RawCommand::new(u64::from_le(d0), u64::from_le(d1)))
    }

    /// CONS as the VCMDQ holds it: the pointer and CONS.ERR.
    pub fn cons(&self) -> (u32, u8) {
        let c = self.reg(VCMDQ_CONS);
        (self.shape.ptr(c), cons_err(c))
    }

    /// The driver's PROD.
    pub fn prod(&self) -> u32 {
        self.prod
    }

    /// Whether an error is pending: GERROR differs from GERRORN.
    pub fn error_pending(&self) -> bool {
        (self.reg(VCMDQ_GERROR) ^ self.reg(VCMDQ_GERRORN)) & 1 != 0
    }

    /// The CMDQV interrupt's work for this VCMDQ, if its LVCMDQ_ERR_MAP bit is set and an
    /// error pending: skip or retry the failing command as Linux does, then GERRORN = GERROR.
    pub fn handle_error(&mut self) -> Result<Option<Handled>, GuestError> {
        let map = self.page.err_map();
        let bit = usize::from(self.lidx);
        if map[bit / 64] >> (bit % 64) & 1 == 0 || !self.error_pending() {
            return Ok(None);
        }
        let gerror = self.reg(VCMDQ_GERROR);
        let cons = self.reg(VCMDQ_CONS);
        let at = self.shape.ptr(cons);
        let cerror = CError::from_code(cons_err(cons)).unwrap_or(CError::Ill);
        let cmd = self.read_slot(at)?;
        // The command's sequence number: the pending one at `at` (the driver's PROD is ahead).
        let behind = self.shape.distance(self.prod, at) as u64;
        let seq = (self.written.len() as u64).saturating_sub(behind);
        if matches!(cerror, CError::Ill | CError::IllAccess) {
            self.write_slot(at, VCMDQ_SYNC)?;
            if let Some(w) = self.written.get_mut(seq as usize) {
                *w = VCMDQ_SYNC;
            }
        }
        self.set_reg(VCMDQ_GERRORN, gerror);
        let h = Handled { seq, cerror, cmd };
        self.handled.push(h);
        Ok(Some(h))
    }

    /// Writes `cmds` and a CMD_SYNC from PROD on (waiting, bounded, for room), publishes them
    /// with one PROD store, then busy-polls CONS until the queue consumed the CMD_SYNC,
    /// handling errors on the way. Returns the errors handled.
    pub fn batch(&mut self, cmds: &[RawCommand], t: Duration) -> Result<Vec<Handled>, GuestError> {
        let n = cmds.len() + 1;
        if n > self.shape.entries() as usize {
            return Err(GuestError::TooLong {
                lidx: self.lidx,
                n: cmds.len(),
                entries: self.shape.entries(),
            });
        }
        let before = self.handled.len();
        let deadline = Instant::now() + t;
        let mut spins = 0u32;
        loop {
            self.handle_error()?;
            if self.shape.free(self.prod, self.cons().0) as usize >= n {
                break;
            }
            if Instant::now() > deadline {
                return Err(GuestError::Timeout {
                    lidx: self.lidx,
                    what: "room in the queue",
                    waited: t,
                });
            }
            spins += 1;
            BACKOFF.pause(spins);
        }
        for cmd in cmds.iter().chain(std::iter::once(&VCMDQ_SYNC)) {
            self.write_slot(self.prod, *cmd)?;
            self.written.push(*cmd);
            self.prod = self.shape.advance(self.prod, 1);
        }
        self.set_reg(VCMDQ_PROD, self.prod);
        let end = self.prod;
        let mut spins = 0u32;
        loop {
            self.handle_error()?;
            let (cons, err) = self.cons();
            if err == 0 && cons == end {
                break;
            }
            if Instant::now() > deadline {
                return Err(GuestError::Timeout {
                    lidx: self.lidx,
                    what: "CONS to pass the CMD_SYNC",
                    waited: t,
                });
            }
            spins += 1;
            BACKOFF.pause(spins);
        }
        Ok(self.handled[before..].to_vec())
    }
}

/// How the guest's waits pass time: spin, yield, then 20 µs asleep.
const BACKOFF: Backoff = Backoff {
    spins: 64,
    yields: 64,
    sleep: Duration::from_micros(20),
};
