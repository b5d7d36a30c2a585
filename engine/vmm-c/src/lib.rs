//! The C API of `vcmdq-vmm`: `libvcmdq_vmm_c.so` and `include/vcmdq_vmm.h`, for C VMMs.
//!
//! Every function returns 0 (or a count) on success and a negative errno on failure, with a
//! message [`vcmdq_last_error`] returns on the same thread; a panic inside is caught at the
//! boundary and returned as `-EIO` with its message, never unwound into C. Pointers the caller
//! passes must be valid as each function's documentation says; a null one is `-EINVAL`.
//! `tests/header.rs` checks that the header declares exactly the functions exported here.
#![deny(missing_docs)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use vcmdq::command::RawCommand;
use vcmdq::engine::{EngineConfig, EngineError, RingId, TrapEvent};
use vcmdq::viommu::{DeviceId, ViommuConfig};
use vcmdq_vmm::regs::REGISTER_PAGE_BYTES;
use vcmdq_vmm::{
    PageError, VcmdqId, VcmdqRegisterPage, Vmm, VmmConfig, VmmError, VmmEvent, VmmTrap,
};
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Guest memory regions one call takes at most (`VCMDQ_MAX_RAM_REGIONS` in the header).
pub const MAX_RAM_REGIONS: usize = 64;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// An error crossing the boundary: a negative errno and its message.
struct Error(c_int, String);

impl From<VmmError> for Error {
    fn from(e: VmmError) -> Error {
        let errno = match &e {
            VmmError::UnknownViommu(_) | VmmError::UnknownVcmdq(_) => libc::ENOENT,
            VmmError::VcmdqExists(_) => libc::EEXIST,
            VmmError::Page(PageError::BadLvcmdq { .. }) => libc::EINVAL,
            VmmError::Page(_) => libc::ENOMEM,
            VmmError::Model(_) => libc::EINVAL,
            VmmError::Engine(e) => match e {
                EngineError::UnknownViommu(_) | EngineError::UnknownRing(_) => libc::ENOENT,
                EngineError::ViommuExists(_) => libc::EEXIST,
                EngineError::ViommuBusy { .. } => libc::EBUSY,
                EngineError::DetachTimeout(_) => libc::ETIMEDOUT,
                EngineError::Spawn { .. } => libc::EAGAIN,
                _ => libc::EINVAL,
            },
        };
        Error(-errno, e.to_string())
    }
}

fn invalid(what: &str) -> Error {
    Error(-libc::EINVAL, format!("EINVAL: {what}"))
}

fn set_error(msg: String) {
    let msg = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = msg);
}

/// Runs `f`, turning an error or a panic into a negative errno and the thread's message.
fn guard(f: impl FnOnce() -> Result<c_int, Error>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(Error(errno, msg))) => {
            set_error(msg);
            errno
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(no message)".into());
            set_error(format!("EIO: vcmdq panicked: {msg}"));
            -libc::EIO
        }
    }
}

/// The message of the last failed call on this thread (empty if none); valid until the next
/// failing call on this thread.
#[no_mangle]
pub extern "C" fn vcmdq_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// A running engine (`vcmdq_vmm` in C).
pub struct VcmdqVmm(Vmm);
/// Guest RAM the engine reads queues from (`vcmdq_guest_ram` in C).
pub struct VcmdqGuestRam(Arc<GuestMemoryMmap>);
/// A VINTF register page (`vcmdq_page` in C).
pub struct VcmdqPage(VcmdqRegisterPage);

/// One guest memory region: guest-physical `gpa`, `len` bytes mapped at `host` in this process.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VcmdqRamRegion {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Where the bytes are mapped in this process.
    pub host: *mut u8,
    /// Bytes.
    pub len: u64,
}

/// An event (`struct vcmdq_event`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VcmdqEvent {
    /// 1: a command error (CONS.ERR), 2: an enable refused, 3: a queue failed, 4: a disable
    /// timed out.
    pub kind: u32,
    /// The VCMDQ's vIOMMU.
    pub viommu: u32,
    /// The VCMDQ's logical index.
    pub lidx: u16,
    /// For a command error: CONS (index, wrap, CONS.ERR).
    pub cons: u32,
    /// For a command error: CONS.ERR.
    pub cerror: u32,
    /// For a command error: LVCMDQ_ERR_MAP.
    pub err_map: [u64; 2],
    /// Why, NUL-terminated (cut short to fit).
    pub reason: [c_char; 160],
}

/// A trapped command (`struct vcmdq_trap`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VcmdqTrap {
    /// The VCMDQ's vIOMMU.
    pub viommu: u32,
    /// The VCMDQ's logical index.
    pub lidx: u16,
    /// The engine's ring (pass the trap back unchanged).
    pub ring: u32,
    /// The guest pointer of the command.
    pub slot: u32,
    /// Its sequence number since the VCMDQ was enabled.
    pub seq: u64,
    /// The command's first 64 bits.
    pub d0: u64,
    /// The command's second 64 bits.
    pub d1: u64,
}

/// Starts an engine with `workers` translating threads (0: one) and stores it in `*out`.
///
/// # Safety
/// `out` is valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn vcmdq_vmm_start(workers: u32, out: *mut *mut VcmdqVmm) -> c_int {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let cfg = VmmConfig {
            engine: EngineConfig {
                workers: (workers as usize).max(1),
                ..Default::default()
            },
            ..Default::default()
        };
        // The C API has no physical queue of the VMM's yet: the model, as `vcmdq_vmm.h` says.
        let (vmm, _) = Vmm::start_on_model(cfg, &Default::default())?;
        let vmm = Box::new(VcmdqVmm(vmm));
        // SAFETY: the caller promises `out` is valid for a write; checked non-null above.
        unsafe { out.write(Box::into_raw(vmm)) };
        Ok(0)
    })
}

/// Shuts the engine down (everything taken from guests completes) and frees it; NULL is a
/// no-op. Returns the guest commands it forwarded, or a negative errno.
///
/// # Safety
/// `vmm` came from [`vcmdq_vmm_start`] and is not used again.
#[no_mangle]
pub unsafe extern "C" fn vcmdq_vmm_shutdown(vmm: *mut VcmdqVmm) -> i64 {
    if vmm.is_null() {
        return 0;
    }
    // SAFETY: the caller hands back the pointer `vcmdq_vmm_start` made with Box::into_raw.
    let vmm = unsafe { Box::from_raw(vmm) };
    let mut forwarded = 0i64;
    let r = guard(|| {
        forwarded = vmm.0.shutdown().stats.forwarded as i64;
        Ok(0)
    });
    if r < 0 {
        r.into()
    } else {
        forwarded
    }
}

/// The engine behind `vmm`, or `-EINVAL`.
///
/// # Safety
/// `vmm` is null or came from [`vcmdq_vmm_start`] and was not shut down.
unsafe fn vmm_ref<'a>(vmm: *const VcmdqVmm) -> Result<&'a Vmm, Error> {
    // SAFETY: the caller's promise; null is refused by `as_ref`.
    unsafe { vmm.as_ref() }
        .map(|v| &v.0)
        .ok_or_else(|| invalid("vmm is NULL"))
}

/// Creates vIOMMU `id` with the VM's `vmid` on physical SMMU `smmu` (the kernel profile).
///
/// # Safety
/// `vmm` came from [`vcmdq_vmm_start`].
#[no_mangle]
pub unsafe extern "C" fn vcmdq_vmm_create_viommu(
    vmm: *const VcmdqVmm,
    id: u32,
    vmid: u16,
    smmu: u32,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let vmm = unsafe { vmm_ref(vmm) }?;
        vmm.create_viommu(ViommuConfig::new(id, vmid, smmu))?;
        Ok(0)
    })
}

/// Adds host device `device` behind physical SMMU `smmu` with StreamID `psid`.
///
/// # Safety
/// `vmm` came from [`vcmdq_vmm_start`].
#[no_mangle]
pub unsafe extern "C" fn vcmdq_vmm_add_device(
    vmm: *const VcmdqVmm,
    device: u32,
    smmu: u32,
    psid: u32,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let vmm = unsafe { vmm_ref(vmm) }?;
        vmm.add_device(DeviceId(device), smmu, psid)?;
        Ok(0)
    })
}

/// Binds `device` as the guest's `vsid` in vIOMMU `viommu`.
///
/// # Safety
/// `vmm` came from [`vcmdq_vmm_start`].
#[no_mangle]
pub unsafe extern "C" fn vcmdq_vmm_set_dev_id(
    vmm: *const VcmdqVmm,
    viommu: u32,
    device: u32,
    vsid: u32,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let vmm = unsafe { vmm_ref(vmm) }?;
        vmm.set_dev_id(viommu, DeviceId(device), vsid)?;
        Ok(0)
    })
}

/// Unbinds `device` from vIOMMU `viommu` (a barrier); returns the vSID it had.
///
/// # Safety
/// `vmm` came from [`vcmdq_vmm_start`].
#[no_mangle]
pub unsafe extern "C" fn vcmdq_vmm_unset_dev_id(
    vmm: *const VcmdqVmm,
    viommu: u32,
    device: u32,
) -> i64 {
    let mut vsid = 0;
    let r = guard(|| {
        // SAFETY: forwarded from the caller.
        let vmm = unsafe { vmm_ref(vmm) }?;
        vsid = vmm.unset_dev_id(viommu, DeviceId(device))?;
        Ok(0)
    });
    if r < 0 {
        r.into()
    } else {
        vsid.into()
    }
}

/// Describes guest RAM as `n` regions (sorted, not overlapping, at most
/// [`MAX_RAM_REGIONS`]) and stores it in `*out`. The memory stays the caller's: it must stay
/// mapped until every VCMDQ attached with it is detached and the handle freed.
///
/// # Safety
/// `regions` points at `n` regions; each `host` is mapped readable and writable for `len`
/// bytes for as long as the handle is in use; `out` is valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn vcmdq_guest_ram_new(
    regions: *const VcmdqRamRegion,
    n: usize,
    out: *mut *mut VcmdqGuestRam,
) -> c_int {
    guard(|| {
        if regions.is_null() || out.is_null() {
            return Err(invalid("regions or out is NULL"));
        }
        if n == 0 || n > MAX_RAM_REGIONS {
            return Err(invalid(&format!(
                "{n} regions: give 1 to {MAX_RAM_REGIONS} (VCMDQ_MAX_RAM_REGIONS)"
            )));
        }
        // SAFETY: the caller promises `n` valid regions at `regions`; n is bounded above.
        let regions = unsafe { std::slice::from_raw_parts(regions, n) };
        let mut built = Vec::with_capacity(n);
        for (i, r) in regions.iter().enumerate() {
            if r.host.is_null() || r.len == 0 || !(r.host as usize).is_multiple_of(8) {
                return Err(invalid(&format!(
                    "region {i}: a NULL or misaligned host address, or no bytes"
                )));
            }
            // SAFETY: the caller promises `host` is mapped read-write for `len` bytes for as
            // long as the handle lives; a raw region is never unmapped by vm-memory.
            let mapping = unsafe {
                MmapRegion::build_raw(
                    r.host,
                    r.len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                )
            }
            .map_err(|e| invalid(&format!("region {i}: {e}")))?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(r.gpa))
                .ok_or_else(|| invalid(&format!("region {i}: gpa + len overflows")))?;
            built.push(region);
        }
        let mem =
            GuestMemoryMmap::from_regions(built).map_err(|e| invalid(&format!("regions: {e}")))?;
        let ram = Box::new(VcmdqGuestRam(Arc::new(mem)));
        // SAFETY: checked non-null; the caller promises it is valid for a write.
        unsafe { out.write(Box::into_raw(ram)) };
        Ok(0)
    })
}

/// Frees a guest RAM handle (VCMDQs attached with it keep what they need); NULL is a no-op.
///
/// # Safety
/// `ram` came from [`vcmdq_guest_ram_new`] and is not used again.
#[no_mangle]
pub unsafe extern "C" fn vcmdq_guest_ram_free(ram: *mut VcmdqGuestRam) {
    if !ram.is_null() {
        // SAFETY: the pointer `vcmdq_guest_ram_new` made with Box::into_raw, handed back once.
        drop(unsafe { Box::from_raw(ram) });
    }
}

/// Creates a zeroed VINTF register page and stores it in `*out`.
///
/// # Safety
/// `out` is valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn vcmdq_page_new(out: *mut *mut VcmdqPage) -> c_int {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let page = Box::new(VcmdqPage(VcmdqRegisterPage::heap()));
        // SAFETY: checked non-null; the caller promises it is valid for a write.
        unsafe { out.write(Box::into_raw(page)) };
        Ok(0)
    })
}

/// A zeroed register page in a memfd sealed against shrinking, for a VMM that maps page 0 into
/// the guest so that PROD writes need no exit: `*fd` is a new descriptor of the memfd, which
/// the caller owns (maps with `MAP_SHARED`, passes on, closes); the page stays valid while
/// the page handle lives, whatever the caller does with its descriptor. `-ENOMEM` (with the
/// reason) if the memfd cannot be made, `-EMFILE` and the like if the descriptor cannot be
/// duplicated.
///
/// # Safety
/// `out` and `fd` are valid for a write each.
#[no_mangle]
pub unsafe extern "C" fn vcmdq_page_new_memfd(out: *mut *mut VcmdqPage, fd: *mut c_int) -> c_int {
    guard(|| {
        if out.is_null() || fd.is_null() {
            return Err(invalid("out or fd is NULL"));
        }
        let page = VcmdqRegisterPage::memfd().map_err(|e| Error::from(VmmError::Page(e)))?;
        let file = page
            .memory()
            .file()
            .ok_or_else(|| invalid("the page has no file"))?
            .try_clone()
            .map_err(|e| {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                Error(-errno, format!("duplicating the page's memfd: {e}"))
            })?;
        let page = Box::new(VcmdqPage(page));
        // SAFETY: both checked non-null; the caller promises they are valid for a write.
        unsafe {
            fd.write(std::os::fd::IntoRawFd::into_raw_fd(file));
            out.write(Box::into_raw(page));
        }
        Ok(0)
    })
}

/// The page's 32-bit words (`VCMDQ_PAGE_BYTES` bytes): page 0, page 1, the VINTF's
/// registers. The guest (or the VMM on its behalf) accesses them as volatile 32-bit words,
/// never as bytes; NULL for a NULL page.
///
/// # Safety
/// `page` came from [`vcmdq_page_new`] or [`vcmdq_page_new_memfd`]; the words are valid
/// while it lives.
#[no_mangle]
pub unsafe extern "C" fn vcmdq_page_words(page: *const VcmdqPage) -> *mut AtomicU32 {
    // SAFETY: the caller's promise; null is refused by `as_ref`.
    match unsafe { page.as_ref() } {
        Some(p) => {
            debug_assert!(p.0.memory().mapped_len() >= REGISTER_PAGE_BYTES);
            p.0.memory().base().as_ptr().cast()
        }
        None => std::ptr::null_mut(),
    }
}

/// Frees a register page (VCMDQs attached with it keep what they need); NULL is a no-op.
///
/// # Safety
/// `page` came from [`vcmdq_page_new`] or [`vcmdq_page_new_memfd`] and is not used again
/// (nor its words; a mapping of the memfd stays valid).
#[no_mangle]
pub unsafe extern "C" fn vcmdq_page_free(page: *mut VcmdqPage) {
    if !page.is_null() {
        // SAFETY: the pointer `vcmdq_page_new` made with Box::into_raw, handed back once.
        drop(unsafe { Box::from_raw(page) });
    }
}

/// Attaches logical VCMDQ `lidx` of vIOMMU `viommu`'s VINTF: registers in `page`, queue in
/// `ram`. Served once the guest sets CONFIG.EN and [`vcmdq_vmm_poll`] sees it.
///
/// # Safety
/// The three handles came from their constructors and are live.
#[no_mangle]
pub unsafe extern "C" fn vcmdq_vmm_attach_vcmdq(
    vmm: *const VcmdqVmm,
    viommu: u32,
    lidx: u16,
    ram: *const VcmdqGuestRam,
    page: *const VcmdqPage,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let vmm = unsafe { vmm_ref(vmm) }?;
        // SAFETY: the caller's promise; null is refused.
        let (ram, page) = unsafe { (ram.as_ref(), page.as_ref()) };
        let (Some(ram), Some(page)) = (ram, page) else {
            return Err(invalid("ram or page is NULL"));
        };
        vmm.attach_vcmdq(VcmdqId { viommu, lidx }, ram.0.clone(), page.0.clone())?;
        Ok(0)
    })
}

/// Detaches a VCMDQ (waiting, bounded, for its commands in flight).
///
/// # Safety
/// `vmm` came from [`vcmdq_vmm_start`].
#[no_mangle]
pub unsafe extern "C" fn vcmdq_vmm_detach_vcmdq(
    vmm: *const VcmdqVmm,
    viommu: u32,
    lidx: u16,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let vmm = unsafe { vmm_ref(vmm) }?;
        vmm.detach_vcmdq(VcmdqId { viommu, lidx })?;
        Ok(0)
    })
}

/// Notices CONFIG.EN changes (enable: BASE checked, STATUS.ENABLED set or an event; disable:
/// detached, STATUS.ENABLED cleared). Returns how many VCMDQs changed state.
///
/// # Safety
/// `vmm` came from [`vcmdq_vmm_start`].
#[no_mangle]
pub unsafe extern "C" fn vcmdq_vmm_poll(vmm: *const VcmdqVmm) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let vmm = unsafe { vmm_ref(vmm) }?;
        Ok(vmm.poll().min(c_int::MAX as usize) as c_int)
    })
}

fn fill_reason(out: &mut [c_char; 160], s: &str) {
    let n = s.len().min(out.len() - 1);
    for (o, b) in out.iter_mut().zip(&s.as_bytes()[..n]) {
        *o = *b as c_char;
    }
    out[n] = 0;
}

/// Takes the next event into `*out`: 1 if there was one, 0 if not.
///
/// # Safety
/// `vmm` came from [`vcmdq_vmm_start`]; `out` is valid for a write of one event.
#[no_mangle]
pub unsafe extern "C" fn vcmdq_vmm_next_event(vmm: *const VcmdqVmm, out: *mut VcmdqEvent) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let vmm = unsafe { vmm_ref(vmm) }?;
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let Some(ev) = vmm.next_event() else {
            return Ok(0);
        };
        let mut e = VcmdqEvent {
            kind: 0,
            viommu: 0,
            lidx: 0,
            cons: 0,
            cerror: 0,
            err_map: [0; 2],
            reason: [0; 160],
        };
        let (kind, id, reason) = match &ev {
            VmmEvent::CommandError {
                vcmdq,
                cons,
                cerror,
                err_map,
            } => {
                (e.cons, e.cerror, e.err_map) = (*cons, cerror.code().into(), *err_map);
                (1, *vcmdq, format!("CONS.ERR {}", cerror.name()))
            }
            VmmEvent::EnableRefused { vcmdq, reason } => (2, *vcmdq, reason.to_string()),
            VmmEvent::QueueFailed { vcmdq, reason } => (3, *vcmdq, reason.clone()),
            VmmEvent::DisableTimedOut { vcmdq } => (4, *vcmdq, "disable timed out".into()),
        };
        (e.kind, e.viommu, e.lidx) = (kind, id.viommu, id.lidx);
        fill_reason(&mut e.reason, &reason);
        // SAFETY: checked non-null; the caller promises it is valid for a write.
        unsafe { out.write(e) };
        Ok(1)
    })
}

/// Takes the next trapped command into `*out`: 1 if there was one, 0 if not. The VCMDQ is
/// paused until [`vcmdq_vmm_complete_trap`].
///
/// # Safety
/// `vmm` came from [`vcmdq_vmm_start`]; `out` is valid for a write of one trap.
#[no_mangle]
pub unsafe extern "C" fn vcmdq_vmm_next_trap(vmm: *const VcmdqVmm, out: *mut VcmdqTrap) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let vmm = unsafe { vmm_ref(vmm) }?;
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let Some(t) = vmm.next_trap() else {
            return Ok(0);
        };
        let trap = VcmdqTrap {
            viommu: t.vcmdq.viommu,
            lidx: t.vcmdq.lidx,
            ring: t.trap.ring.0,
            slot: t.trap.slot,
            seq: t.trap.seq,
            d0: t.trap.cmd.d0(),
            d1: t.trap.cmd.d1(),
        };
        // SAFETY: checked non-null; the caller promises it is valid for a write.
        unsafe { out.write(trap) };
        Ok(1)
    })
}

/// The VMM is done with `trap`: its VCMDQ is served again.
///
/// # Safety
/// `vmm` came from [`vcmdq_vmm_start`]; `trap` points at a trap `vcmdq_vmm_next_trap` filled.
#[no_mangle]
pub unsafe extern "C" fn vcmdq_vmm_complete_trap(
    vmm: *const VcmdqVmm,
    trap: *const VcmdqTrap,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded from the caller.
        let vmm = unsafe { vmm_ref(vmm) }?;
        // SAFETY: the caller's promise; null is refused.
        let t = unsafe { trap.as_ref() }.ok_or_else(|| invalid("trap is NULL"))?;
        let trap = VmmTrap {
            vcmdq: VcmdqId {
                viommu: t.viommu,
                lidx: t.lidx,
            },
            trap: TrapEvent {
                ring: RingId(t.ring),
                viommu: t.viommu,
                slot: t.slot,
                seq: t.seq,
                cmd: RawCommand::new(t.d0, t.d1),
            },
        };
        vmm.complete_trap(&trap)?;
        Ok(0)
    })
}

/// Guest commands the engine forwarded so far (all vIOMMUs), or a negative errno.
///
/// # Safety
/// `vmm` came from [`vcmdq_vmm_start`].
#[no_mangle]
pub unsafe extern "C" fn vcmdq_vmm_forwarded(vmm: *const VcmdqVmm) -> i64 {
    let mut n = 0i64;
    let r = guard(|| {
        // SAFETY: forwarded from the caller.
        let vmm = unsafe { vmm_ref(vmm) }?;
        n = vmm.engine().stats().forwarded as i64;
        Ok(0)
    });
    if r < 0 {
        r.into()
    } else {
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_is_eio_with_its_message_and_does_not_unwind_into_c() {
        let r = guard(|| panic!("boom at the boundary"));
        assert_eq!(r, -libc::EIO);
        // SAFETY: the message is NUL-terminated and valid until the next failing call.
        let msg = unsafe { std::ffi::CStr::from_ptr(vcmdq_last_error()) };
        let msg = msg.to_str().unwrap();
        assert!(
            msg.contains("EIO") && msg.contains("boom at the boundary"),
            "{msg}"
        );
    }
}
