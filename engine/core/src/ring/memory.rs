//! Where a ring's bytes live: a file or memfd mapped shared, or a heap block for tests, loom-free
//! miri runs and benches. The ring logic sees only [`RingMemory`] and accesses it through
//! [`Region`], which hands out atomics and nothing else: another process may write any byte at
//! any time, so no `&[u8]` or `&T` over this memory ever exists.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};

use super::layout::{HEADER_SIZE, MAX_RING_BYTES, SLOT_SIZE};
use super::RingError;

/// Alignment of every ring mapping: a cache line (mappings are page-aligned anyway).
pub const RING_ALIGN: usize = 64;

/// Bytes that hold a ring.
///
/// # Safety
/// An implementation promises that `base()` is aligned to [`RING_ALIGN`] and valid for atomic
/// reads and writes of `mapped_len()` bytes for as long as the value lives, that neither changes, and
/// that nothing in this process accesses those bytes other than through atomics. Other
/// processes may write them at any time. If `sealed()` is false the backing file may shrink
/// under the mapping, and touching a page past its new end raises SIGBUS: the engine side
/// therefore never touches unsealed memory through its mapping (it reads [`RingMemory::file`]
/// with system calls instead); a guest side keeps that risk for its own mapping (see
/// `docs/ring-format.md`, "SIGBUS").
pub unsafe trait RingMemory: Send + Sync + fmt::Debug {
    /// The first byte.
    fn base(&self) -> NonNull<u8>;
    /// Bytes mapped.
    fn mapped_len(&self) -> usize;
    /// What to call it in an error message: the file's path, or `<heap>`.
    fn name(&self) -> &Path;
    /// Whether the bytes can never go away while mapped: heap memory, or a memfd sealed with
    /// F_SEAL_SHRINK.
    fn sealed(&self) -> bool;
    /// The current length of the backing object (a syscall for a file): a shrink below
    /// `mapped_len()` means the next access to the lost pages would raise SIGBUS.
    fn backing_len(&self) -> io::Result<u64>;
    /// The file behind the bytes, if any: what an engine side locks so a ring has one engine,
    /// and what it reads with system calls when the file is not sealed.
    fn file(&self) -> Option<&File> {
        None
    }
}

/// A zeroed, cache-aligned heap block: the backend for tests, miri, and rings one process both
/// writes and reads.
#[derive(Debug)]
pub struct HeapMemory {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the block is only ever accessed through atomics (RingMemory's contract), so sharing
// and sending the owner between threads cannot create a data race.
unsafe impl Send for HeapMemory {}
// SAFETY: as for Send.
unsafe impl Sync for HeapMemory {}

impl HeapMemory {
    /// A zeroed block of `len` bytes (at least 1).
    pub fn new(len: usize) -> HeapMemory {
        let layout = Layout::from_size_align(len.max(1), RING_ALIGN)
            .expect("ring sizes are bounded by MAX_RING_BYTES");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        HeapMemory { ptr, layout }
    }
}

impl Drop for HeapMemory {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout and freed only here.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

// SAFETY: the block is RING_ALIGN-aligned, `layout.size()` bytes long, owned by self and freed
// only on drop; it never shrinks.
unsafe impl RingMemory for HeapMemory {
    fn base(&self) -> NonNull<u8> {
        self.ptr
    }
    fn mapped_len(&self) -> usize {
        self.layout.size()
    }
    fn name(&self) -> &Path {
        Path::new("<heap>")
    }
    fn sealed(&self) -> bool {
        true
    }
    fn backing_len(&self) -> io::Result<u64> {
        Ok(self.layout.size() as u64)
    }
}

/// A file or memfd mapped shared, read-write.
pub struct MmapMemory {
    map: MmapRaw,
    file: File,
    path: PathBuf,
    sealed: bool,
}

impl fmt::Debug for MmapMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmapMemory")
            .field("path", &self.path)
            .field("len", &self.map.len())
            .field("sealed", &self.sealed)
            .finish()
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> RingError + 'a {
    move |source| RingError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

impl MmapMemory {
    /// Creates (or truncates) the file at `path`, `len` bytes of zeros, and maps it.
    pub fn create_file(path: &Path, len: usize) -> Result<MmapMemory, RingError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io_err(path, "create"))?;
        file.set_len(len as u64).map_err(io_err(path, "size"))?;
        let sealed = has_shrink_seal(&file);
        Self::map(file, path.to_path_buf(), len, sealed)
    }

    /// Opens and maps an existing file (or `/proc/<pid>/fd/<n>` of a memfd): the whole file, at
    /// most [`MAX_RING_BYTES`]. A file shorter than a ring header is refused before mapping.
    pub fn open(path: &Path) -> Result<MmapMemory, RingError> {
        Self::from_file(open_rw(path)?, path.to_path_buf())
    }

    /// Maps a file opened read-write (see [`MmapMemory::open`]).
    pub(crate) fn from_file(file: File, path: PathBuf) -> Result<MmapMemory, RingError> {
        let len = file.metadata().map_err(io_err(&path, "stat"))?.len();
        let need = (HEADER_SIZE + SLOT_SIZE) as u64;
        if len < need {
            return Err(RingError::TooSmall { path, len, need });
        }
        let sealed = has_shrink_seal(&file);
        let map_len = len.min(MAX_RING_BYTES as u64) as usize;
        Self::map(file, path, map_len, sealed)
    }

    /// Creates a memfd of `len` zero bytes sealed against shrinking and growing, and maps it.
    /// Its [`name`](RingMemory::name) is `/proc/<pid>/fd/<n>`, a path another process of the
    /// same user can open (and map) while this one keeps the memfd open.
    pub fn create_sealed(label: &str, len: usize) -> Result<MmapMemory, RingError> {
        let file = memfd(label, len)?;
        let path = PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            std::os::fd::AsRawFd::as_raw_fd(&file)
        ));
        Self::map(file, path, len, true)
    }

    fn map(file: File, path: PathBuf, len: usize, sealed: bool) -> Result<MmapMemory, RingError> {
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(io_err(&path, "map"))?;
        Ok(MmapMemory {
            map,
            file,
            path,
            sealed,
        })
    }
}

// SAFETY: mmap returns page-aligned memory (>= RING_ALIGN) valid for `len` bytes until the
// MmapRaw is dropped with self; this module and Region access it only through atomics. The
// SIGBUS caveat of unsealed files is reported through `sealed()`.
unsafe impl RingMemory for MmapMemory {
    fn base(&self) -> NonNull<u8> {
        NonNull::new(self.map.as_mut_ptr()).expect("mmap never returns null")
    }
    fn mapped_len(&self) -> usize {
        self.map.len()
    }
    fn name(&self) -> &Path {
        &self.path
    }
    fn sealed(&self) -> bool {
        self.sealed
    }
    fn backing_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }
}

/// Opens a ring file read-write and refuses one sealed against writes, which no side of a ring
/// can use (the guest writes slots and PROD, the engine CONS).
pub(crate) fn open_rw(path: &Path) -> Result<File, RingError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path, "open"))?;
    if seals(&file) & WRITE_SEALS != 0 {
        return Err(RingError::WriteSealed {
            path: path.to_path_buf(),
        });
    }
    Ok(file)
}

#[cfg(target_os = "linux")]
const WRITE_SEALS: i32 = libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE;
#[cfg(not(target_os = "linux"))]
const WRITE_SEALS: i32 = 0;

/// The file's seals; 0 for a file system without seals.
#[cfg(target_os = "linux")]
fn seals(file: &File) -> i32 {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GET_SEALS takes no argument and only reads the descriptor's seals; a file
    // system without seals answers -1 (EINVAL), which reads as unsealed.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals.max(0)
}

#[cfg(not(target_os = "linux"))]
fn seals(_file: &File) -> i32 {
    0
}

/// Whether the file can never shrink: a memfd sealed with F_SEAL_SHRINK.
#[cfg(target_os = "linux")]
pub(crate) fn has_shrink_seal(file: &File) -> bool {
    seals(file) & libc::F_SEAL_SHRINK != 0
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn has_shrink_seal(_file: &File) -> bool {
    false
}

#[cfg(target_os = "linux")]
fn memfd(label: &str, len: usize) -> Result<File, RingError> {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd};
    let path = PathBuf::from(format!("memfd:{label}"));
    let name = CString::new(label.replace('\0', "_")).expect("NULs were replaced");
    // SAFETY: `name` is a NUL-terminated string that outlives the call; the flags are valid.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io_err(&path, "memfd_create")(io::Error::last_os_error()));
    }
    // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len as u64).map_err(io_err(&path, "size"))?;
    // Allocate every page now: a page the kernel cannot allocate on first touch is a SIGBUS.
    // SAFETY: a plain fallocate on a descriptor we own; mode 0 only allocates.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if rc != 0 {
        return Err(io_err(&path, "fallocate")(io::Error::last_os_error()));
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS takes an int of seal bits; the memfd allows sealing.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if rc != 0 {
        return Err(io_err(&path, "seal")(io::Error::last_os_error()));
    }
    Ok(file)
}

#[cfg(not(target_os = "linux"))]
fn memfd(label: &str, _len: usize) -> Result<File, RingError> {
    Err(RingError::Io {
        path: PathBuf::from(format!("memfd:{label}")),
        op: "memfd_create",
        source: io::Error::new(io::ErrorKind::Unsupported, "sealed memfds need Linux"),
    })
}

/// Checked atomic access to a ring's memory: the only place that turns its address into
/// references, each an atomic over bytes inside the mapping.
///
/// The base and length are read from the memory once: `RingMemory` promises they never change,
/// and asking a trait object for them on every access costs the hot path two indirect calls.
#[derive(Clone, Debug)]
pub(crate) struct Region {
    mem: Arc<dyn RingMemory>,
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: `base` is a copy of `mem.base()`, which `mem` (Send + Sync) keeps valid; the region
// hands out only atomics over it, as the memory itself would.
unsafe impl Send for Region {}
// SAFETY: as for Send.
unsafe impl Sync for Region {}

impl Region {
    pub(crate) fn new(mem: Arc<dyn RingMemory>) -> Region {
        let (base, len) = (mem.base(), mem.mapped_len());
        Region { mem, base, len }
    }

    pub(crate) fn memory(&self) -> &Arc<dyn RingMemory> {
        &self.mem
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The u32 at `off`.
    ///
    /// # Panics
    /// If `off` is unaligned or out of the mapping: offsets come from the layout, so that is a
    /// bug in this module, never guest input.
    #[inline]
    pub(crate) fn u32_at(&self, off: usize) -> &AtomicU32 {
        assert!(
            off.is_multiple_of(4) && off + 4 <= self.len,
            "ring offset {off}"
        );
        // SAFETY: in bounds and 4-aligned (base is RING_ALIGN-aligned); RingMemory promises the
        // bytes stay valid while `self.mem` lives, which outlives the returned reference, and
        // that they are only accessed atomically in this process.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(off).cast()) }
    }

    /// The u64 at `off`.
    ///
    /// # Panics
    /// As [`Region::u32_at`].
    #[inline]
    pub(crate) fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(
            off.is_multiple_of(8) && off + 8 <= self.len,
            "ring offset {off}"
        );
        // SAFETY: as in u32_at, with 8-byte alignment.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(off).cast()) }
    }

    /// `n` slots starting at `off`, each two little-endian u64 words.
    ///
    /// # Panics
    /// As [`Region::u32_at`].
    #[inline]
    pub(crate) fn slots(&self, off: usize, n: usize) -> &[[AtomicU64; 2]] {
        assert!(
            off.is_multiple_of(8) && off + n * SLOT_SIZE <= self.len,
            "ring slots {off}+{n}"
        );
        // SAFETY: `n` 16-byte, 8-aligned elements inside the mapping; validity and atomic-only
        // access as in u32_at. [AtomicU64; 2] has size 16 and no padding.
        unsafe {
            std::slice::from_raw_parts(self.base.as_ptr().add(off).cast::<[AtomicU64; 2]>(), n)
        }
    }
}
