//! A Tegra241 CMDQV virtual interface (VINTF) as the guest sees it: its logical VCMDQs' page 0
//! (CONS, PROD, CONFIG, STATUS, GERROR, GERRORN), their page 1 (BASE) and the VINTF's own
//! LVCMDQ_ERR_MAP, all in memory shared with the guest ([`VcmdqRegisterPage`]); and
//! [`Tegra241Registers`], one VCMDQ's registers as the engine's [`QueueRegisters`].
//!
//! Offsets and fields are the ones Linux's `tegra241-cmdqv.c` programs
//! (`drivers/iommu/arm/arm-smmu-v3/`): per logical VCMDQ `q`, page 0 at `0x80 * q` holds CONS
//! (`0x00`, CONS.ERR in bits `[30:24]`), PROD (`0x04`), CONFIG (`0x08`, EN bit 0), STATUS
//! (`0x0c`, ENABLED bit 0), GERROR (`0x10`) and GERRORN (`0x14`); page 1 at `0x80 * q` holds
//! BASE (`0x00`, 64 bits: the address in bits `[47:5]`, LOG2SIZE in bits `[4:0]`); the VINTF's
//! registers hold LVCMDQ_ERR_MAP as two 64-bit words at `0xc0` and `0xc8` (one bit per logical
//! VCMDQ).
//!
//! The memory is laid out as the CMDQV's MMIO has the VINTF: page 0 (64 KiB), then page 1
//! (64 KiB), then a 4 KiB page with the VINTF's own registers at their offsets. A VMM maps
//! page 0 into the guest (PROD writes then need no exit, as QEMU's tegra241-cmdqv does) and
//! traps or maps the rest. Every word is accessed as a 32-bit atomic, whoever writes it: the
//! guest may write any word at any time, so no reference to the bytes other than an atomic ever
//! exists, and 64-bit registers are two words (low first), as a guest's two 32-bit accesses
//! would be.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use vcmdq::queue::CError;
use vcmdq::ring::{
    HeapMemory, MmapMemory, QueueRegisters, RegisterSnapshot, RingError, RingMemory, RING_ALIGN,
};

/// Bytes of a VINTF's logical-VCMDQ page 0 or page 1 (`SZ_64K` in Linux).
pub const PAGE_BYTES: usize = 64 << 10;
/// Byte offset of page 1 in a [`VcmdqRegisterPage`].
pub const PAGE1_OFFSET: usize = PAGE_BYTES;
/// Byte offset of the VINTF's own registers in a [`VcmdqRegisterPage`].
pub const VINTF_OFFSET: usize = 2 * PAGE_BYTES;
/// Bytes of the page that holds the VINTF's own registers.
pub const VINTF_BYTES: usize = 4 << 10;
/// Bytes a [`VcmdqRegisterPage`] spans: page 0, page 1 and the VINTF's registers.
pub const REGISTER_PAGE_BYTES: usize = VINTF_OFFSET + VINTF_BYTES;
/// Bytes between two logical VCMDQs' registers in page 0 and in page 1 (`0x80*(q)`).
pub const VCMDQ_STRIDE: usize = 0x80;
/// Logical VCMDQs one VINTF has at most: LVCMDQ_ERR_MAP holds 128 bits
/// (`LVCMDQ_ERR_MAP_NUM_64` = 2).
pub const MAX_LVCMDQS: u16 = 128;

/// CONS, page 0 (`TEGRA241_VCMDQ_CONS`).
pub const VCMDQ_CONS: usize = 0x00;
/// PROD, page 0 (`TEGRA241_VCMDQ_PROD`).
pub const VCMDQ_PROD: usize = 0x04;
/// CONFIG, page 0 (`TEGRA241_VCMDQ_CONFIG`); bit 0 is EN.
pub const VCMDQ_CONFIG: usize = 0x08;
/// STATUS, page 0 (`TEGRA241_VCMDQ_STATUS`); bit 0 is ENABLED.
pub const VCMDQ_STATUS: usize = 0x0c;
/// GERROR, page 0 (`TEGRA241_VCMDQ_GERROR`); bit 0 is CMDQ_ERR.
pub const VCMDQ_GERROR: usize = 0x10;
/// GERRORN, page 0 (`TEGRA241_VCMDQ_GERRORN`): the guest acknowledges by writing GERROR here.
pub const VCMDQ_GERRORN: usize = 0x14;
/// BASE, page 1 (`TEGRA241_VCMDQ_BASE`), 64 bits.
pub const VCMDQ_BASE: usize = 0x00;
/// LVCMDQ_ERR_MAP_64(m), in the VINTF's registers: `0xc0 + 8 * m`, m in 0..2.
pub const VINTF_LVCMDQ_ERR_MAP: usize = 0xc0;

/// CONFIG.EN and STATUS.ENABLED.
pub const VCMDQ_EN: u32 = 1;
/// BASE bits `[47:5]`: the queue's guest-physical address (`VCMDQ_ADDR`).
pub const VCMDQ_ADDR_MASK: u64 = ((1 << 48) - 1) & !0x1f;
/// BASE bits `[4:0]`: LOG2SIZE (`VCMDQ_LOG2SIZE`).
pub const VCMDQ_LOG2SIZE_MASK: u64 = 0x1f;
/// The largest LOG2SIZE a VCMDQ takes (`VCMDQ_LOG2SIZE_MAX`).
pub const VCMDQ_LOG2SIZE_MAX: u8 = 19;

/// Why a register page cannot be made or used.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// The memory is shorter than a register page.
    #[error("register page {}: {len} bytes, a VINTF's registers need {REGISTER_PAGE_BYTES} (REGISTER_PAGE_BYTES)", path.display())]
    TooSmall {
        /// The memory.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// Memory that could shrink under the engine (an unsealed file): a guest could make the
    /// engine fault.
    #[error("register page {}: not sealed against shrinking; use VcmdqRegisterPage::memfd or heap memory", path.display())]
    Unsealed {
        /// The memory.
        path: PathBuf,
    },
    /// A logical VCMDQ index past the VINTF's.
    #[error("logical VCMDQ {lidx} is out of range: a VINTF has at most {MAX_LVCMDQS} (MAX_LVCMDQS, the bits of LVCMDQ_ERR_MAP)")]
    BadLvcmdq {
        /// The index asked for.
        lidx: u16,
    },
    /// The memfd could not be made.
    #[error(transparent)]
    Memory(#[from] RingError),
}

/// A VINTF's registers in memory shared with the guest: page 0 and page 1 of its logical
/// VCMDQs and its own registers (see the module documentation for the layout). Cloning shares
/// the memory.
///
/// ```
/// use vcmdq_vmm::regs::{VcmdqRegisterPage, VCMDQ_PROD};
/// let page = VcmdqRegisterPage::heap();
/// page.write_page0(1, VCMDQ_PROD, 5).unwrap();
/// // The same word, by its byte offset in the page, as the guest's MMIO access names it.
/// assert_eq!(page.read_u32(0x80 + 0x04), Some(5));
/// ```
#[derive(Clone, Debug)]
pub struct VcmdqRegisterPage {
    mem: Arc<dyn RingMemory>,
}

impl VcmdqRegisterPage {
    /// A zeroed page on the heap: for a VMM that traps every guest access and forwards it with
    /// [`VcmdqRegisterPage::write_u32`], for tests and the example.
    pub fn heap() -> VcmdqRegisterPage {
        VcmdqRegisterPage {
            mem: Arc::new(HeapMemory::new(REGISTER_PAGE_BYTES)),
        }
    }

    /// A zeroed page in a memfd sealed against shrinking: a VMM maps its first 64 KiB (page 0)
    /// into the guest, so PROD writes need no exit.
    pub fn memfd() -> Result<VcmdqRegisterPage, PageError> {
        let mem = MmapMemory::create_sealed("vcmdq-vintf", REGISTER_PAGE_BYTES)?;
        Self::from_memory(Arc::new(mem))
    }

    /// A page over memory the VMM already has; refuses memory shorter than
    /// [`REGISTER_PAGE_BYTES`] or that may shrink.
    pub fn from_memory(mem: Arc<dyn RingMemory>) -> Result<VcmdqRegisterPage, PageError> {
        if !mem.sealed() {
            return Err(PageError::Unsealed {
                path: mem.name().to_path_buf(),
            });
        }
        if mem.mapped_len() < REGISTER_PAGE_BYTES {
            return Err(PageError::TooSmall {
                path: mem.name().to_path_buf(),
                len: mem.mapped_len(),
            });
        }
        Ok(VcmdqRegisterPage { mem })
    }

    /// The memory: what a VMM maps into the guest.
    pub fn memory(&self) -> &Arc<dyn RingMemory> {
        &self.mem
    }

    /// The word at byte offset `off`, or `None` past the page or off a 4-byte boundary.
    fn word(&self, off: usize) -> Option<&AtomicU32> {
        if off >= REGISTER_PAGE_BYTES || !off.is_multiple_of(4) {
            return None;
        }
        const { assert!(RING_ALIGN.is_multiple_of(align_of::<AtomicU32>())) };
        // SAFETY: `RingMemory` promises `base()` aligned to RING_ALIGN (a multiple of 4) and
        // valid for atomic access of `mapped_len()` bytes while `mem` lives, which `&self`
        // keeps; `from_memory` checked `mapped_len() >= REGISTER_PAGE_BYTES`, `off` is below it
        // and a multiple of 4, so the word is in bounds and aligned. The bytes are only ever
        // accessed through atomics, in this process and (through its mapping) by the guest.
        Some(unsafe { &*self.mem.base().as_ptr().add(off).cast::<AtomicU32>() })
    }

    /// Loads the 32-bit register at byte offset `off` (acquire), as a guest's MMIO read would;
    /// `None` past the page or off a 4-byte boundary.
    pub fn read_u32(&self, off: usize) -> Option<u32> {
        self.word(off).map(|w| w.load(Ordering::Acquire))
    }

    /// Stores the 32-bit register at byte offset `off` (release), as a guest's MMIO write
    /// would: any word, any value (a VMM forwards a trapped access here). `false` past the page
    /// or off a 4-byte boundary.
    pub fn write_u32(&self, off: usize, v: u32) -> bool {
        self.word(off)
            .map(|w| w.store(v, Ordering::Release))
            .is_some()
    }

    fn page0_off(lidx: u16, reg: usize) -> Result<usize, PageError> {
        if lidx >= MAX_LVCMDQS {
            return Err(PageError::BadLvcmdq { lidx });
        }
        Ok(usize::from(lidx) * VCMDQ_STRIDE + reg)
    }

    /// Loads page-0 register `reg` ([`VCMDQ_CONS`], [`VCMDQ_PROD`], ...) of logical VCMDQ
    /// `lidx`, with acquire.
    pub fn read_page0(&self, lidx: u16, reg: usize) -> Result<u32, PageError> {
        let off = Self::page0_off(lidx, reg)?;
        Ok(self
            .read_u32(off)
            .expect("page-0 registers are in the page"))
    }

    /// Stores page-0 register `reg` of logical VCMDQ `lidx`, with release.
    pub fn write_page0(&self, lidx: u16, reg: usize, v: u32) -> Result<(), PageError> {
        let off = Self::page0_off(lidx, reg)?;
        self.write_u32(off, v);
        Ok(())
    }

    /// BASE of logical VCMDQ `lidx` (page 1), as two 32-bit loads, low word first.
    pub fn base(&self, lidx: u16) -> Result<u64, PageError> {
        let off = PAGE1_OFFSET + Self::page0_off(lidx, VCMDQ_BASE)?;
        let lo = self.read_u32(off).expect("in the page");
        let hi = self.read_u32(off + 4).expect("in the page");
        Ok(u64::from(lo) | u64::from(hi) << 32)
    }

    /// Stores BASE of logical VCMDQ `lidx` as two 32-bit stores, low word first (what a guest's
    /// `writeq` is to a VMM that traps page 1).
    pub fn set_base(&self, lidx: u16, base: u64) -> Result<(), PageError> {
        let off = PAGE1_OFFSET + Self::page0_off(lidx, VCMDQ_BASE)?;
        self.write_u32(off, base as u32);
        self.write_u32(off + 4, (base >> 32) as u32);
        Ok(())
    }

    /// LVCMDQ_ERR_MAP: bit `q` of word `q / 64` is set while logical VCMDQ `q` has an error
    /// the guest has not acknowledged.
    pub fn err_map(&self) -> [u64; 2] {
        let word = |m: usize| {
            let off = VINTF_OFFSET + VINTF_LVCMDQ_ERR_MAP + 8 * m;
            u64::from(self.read_u32(off).expect("in the page"))
                | u64::from(self.read_u32(off + 4).expect("in the page")) << 32
        };
        [word(0), word(1)]
    }

    /// Sets or clears logical VCMDQ `lidx`'s bit of LVCMDQ_ERR_MAP (release); `lidx` is below
    /// [`MAX_LVCMDQS`].
    fn set_err_bit(&self, lidx: u16, on: bool) {
        let bit = usize::from(lidx);
        let off = VINTF_OFFSET + VINTF_LVCMDQ_ERR_MAP + 4 * (bit / 32);
        let w = self.word(off).expect("the error map is in the page");
        let mask = 1u32 << (bit % 32);
        if on {
            w.fetch_or(mask, Ordering::Release);
        } else {
            w.fetch_and(!mask, Ordering::Release);
        }
    }
}

/// One logical VCMDQ's registers in a [`VcmdqRegisterPage`], as the engine's
/// [`QueueRegisters`]: PROD is PROD, CONS (with CONS.ERR) is CONS, the error flag is
/// GERROR.CMDQ_ERR (bit 0) and the acknowledgement GERRORN bit 0: GERROR != GERRORN means an
/// error is pending, and the guest acknowledges by writing GERRORN = GERROR. Raising an error
/// also sets the VCMDQ's LVCMDQ_ERR_MAP bit, and tells the VMM through `on_error`; the bit
/// clears when the engine resumes after the acknowledgement.
///
/// A VCMDQ has no register for CMD_SYNC completion: a Tegra241 guest polls CONS past its
/// CMD_SYNC (Linux issues them with CS=NONE on a VCMDQ), and the engine never moves CONS past a
/// CMD_SYNC before it completes. An MSI (CS=IRQ) is not written: its address is a guest address.
pub struct Tegra241Registers {
    page: VcmdqRegisterPage,
    lidx: u16,
    name: PathBuf,
    /// CONS as the engine last stored it: what an error report names (the guest may have
    /// scribbled over the register since).
    cons: AtomicU32,
    /// Whether this VCMDQ's LVCMDQ_ERR_MAP bit is set, so that clearing it costs nothing per
    /// batch while there is no error.
    mapped: std::sync::atomic::AtomicBool,
    syncs: AtomicU64,
    on_error: Box<dyn Fn(u32) + Send + Sync>,
}

impl std::fmt::Debug for Tegra241Registers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tegra241Registers")
            .field("name", &self.name)
            .field("lidx", &self.lidx)
            .finish_non_exhaustive()
    }
}

impl Tegra241Registers {
    /// Guest CMD_SYNCs the engine completed on this VCMDQ since it was enabled.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Logical VCMDQ `lidx` of `page`; `on_error` is called with CONS (index, wrap and
    /// CONS.ERR) each time the engine raises GERROR, after the registers show it.
    pub fn new(
        page: VcmdqRegisterPage,
        lidx: u16,
        on_error: impl Fn(u32) + Send + Sync + 'static,
    ) -> Result<Tegra241Registers, PageError> {
        if lidx >= MAX_LVCMDQS {
            return Err(PageError::BadLvcmdq { lidx });
        }
        let name = PathBuf::from(format!("{}:LVCMDQ{lidx}", page.memory().name().display()));
        Ok(Tegra241Registers {
            page,
            lidx,
            name,
            cons: AtomicU32::new(0),
            mapped: std::sync::atomic::AtomicBool::new(false),
            syncs: AtomicU64::new(0),
            on_error: Box::new(on_error),
        })
    }

    fn load(&self, reg: usize) -> u32 {
        self.page
            .read_page0(self.lidx, reg)
            .expect("lidx checked at new")
    }

    fn store(&self, reg: usize, v: u32) {
        self.page
            .write_page0(self.lidx, reg, v)
            .expect("lidx checked at new")
    }
}

impl QueueRegisters for Tegra241Registers {
    fn name(&self) -> &Path {
        &self.name
    }

    fn snapshot(&self) -> Result<RegisterSnapshot, RingError> {
        Ok(RegisterSnapshot {
            cons: self.load(VCMDQ_CONS),
            err: self.load(VCMDQ_GERROR),
            err_ack: self.load(VCMDQ_GERRORN),
            sync_count: 0,
        })
    }

    fn prod(&self) -> Result<u32, RingError> {
        Ok(self.load(VCMDQ_PROD))
    }

    fn err_ack(&self) -> Result<u32, RingError> {
        Ok(self.load(VCMDQ_GERRORN))
    }

    fn set_cons(&self, cons: u32) -> Result<(), RingError> {
        if vcmdq::queue::cons_err(cons) == CError::None.code()
            && self.mapped.swap(false, Ordering::Relaxed)
        {
            // The engine stores CONS without CONS.ERR only once the guest acknowledged: the
            // VCMDQ has no error left to map.
            self.page.set_err_bit(self.lidx, false);
        }
        self.cons.store(cons, Ordering::Relaxed);
        self.store(VCMDQ_CONS, cons);
        Ok(())
    }

    fn set_err(&self, err: u32) -> Result<(), RingError> {
        // GERROR keeps the guest's other bits as the engine last wrote them: only CMDQ_ERR
        // (bit 0) is the engine's. The map bit first: a guest that sees GERROR toggled finds
        // its queue in the map.
        self.mapped.store(true, Ordering::Relaxed);
        self.page.set_err_bit(self.lidx, true);
        self.store(VCMDQ_GERROR, err & 1);
        (self.on_error)(self.cons.load(Ordering::Relaxed));
        Ok(())
    }

    fn sync_completed(&self, _msidata: Option<u32>, count: u64) -> Result<(), RingError> {
        self.syncs.store(count, Ordering::Relaxed);
        Ok(())
    }
}
