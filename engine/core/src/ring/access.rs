//! How the engine side reaches a ring's bytes, and how it makes sure a ring has one engine.
//!
//! Two kinds of backend, chosen once at attach and dispatched once per access (an enum match
//! per word or per run of slots, never per slot):
//!
//! - [`HostMemory::Mapped`]: memory that can never shrink (a memfd sealed with F_SEAL_SHRINK,
//!   or the heap), read and written with atomics through the mapping, as fast as memory goes.
//! - [`HostMemory::File`]: an unsealed file. Any process that can write it can truncate it, and
//!   a shared mapping of a file that shrank raises SIGBUS on the next access to a lost page. So
//!   the engine never maps it: it reads and writes with `pread`/`pwrite` (`FileExt::read_at`,
//!   `write_at`). A truncate then shows up as a short read, an error, never a signal; a torn
//!   read is a hostile value like any other. A run of slots is one system call, so the cost is
//!   per poll and per batch, not per command.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};

use super::layout::{self, SLOT_SIZE};
use super::memory::Region;
use super::{load_slot, RingError};
use crate::command::RawCommand;
use crate::sync::lock;

/// Bytes the file backend reads per system call at most, so its buffer stays small whatever
/// the caller asks for: 4096 slots (64 KiB).
const FILE_READ_CHUNK: usize = 4096 * SLOT_SIZE;

/// The engine's access to one ring's bytes. Cloning shares the same bytes: the ring's
/// registers and its slots each hold one when they live in the same memory or file.
#[derive(Clone, Debug)]
pub(crate) enum HostMemory {
    /// Memory that cannot shrink: atomics through the mapping.
    Mapped(Region),
    /// An unsealed file: positioned reads and writes, never a mapping.
    File(Arc<FileRing>),
}

/// An unsealed ring file the engine reads and writes with system calls.
#[derive(Debug)]
pub(crate) struct FileRing {
    file: File,
    path: PathBuf,
}

/// Maps a short read to an error the caller turns into `RingError::Shrunk`.
fn short(off: usize, got: usize, want: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("short read at offset {off}: {got} of {want} bytes (the file shrank)"),
    )
}

impl FileRing {
    pub(crate) fn new(file: File, path: PathBuf) -> Self {
        FileRing { file, path }
    }

    /// Fills `buf` from `off`; a short read (end of file) is an error.
    fn read_exact_at(&self, buf: &mut [u8], off: usize) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], (off + done) as u64) {
                Ok(0) => return Err(short(off, done, buf.len())),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], off: usize) -> io::Result<()> {
        self.file.write_all_at(buf, off as u64)
    }

    /// The whole header, for validation at attach.
    pub(crate) fn read_header(&self) -> io::Result<[u8; layout::HEADER_SIZE]> {
        let mut h = [0u8; layout::HEADER_SIZE];
        self.read_exact_at(&mut h, 0)?;
        Ok(h)
    }
}

impl HostMemory {
    /// The file's path, or `<heap>`.
    pub(crate) fn name(&self) -> &Path {
        match self {
            HostMemory::Mapped(r) => r.memory().name(),
            HostMemory::File(f) => &f.path,
        }
    }

    /// Whether the bytes can never go away: the mapped backend.
    pub(crate) fn sealed(&self) -> bool {
        matches!(self, HostMemory::Mapped(_))
    }

    /// The file backing the ring, if any: what the attachment lock is taken on.
    pub(crate) fn file(&self) -> Option<&File> {
        match self {
            HostMemory::Mapped(r) => r.memory().file(),
            HostMemory::File(f) => Some(&f.file),
        }
    }

    /// The current length of the backing object.
    pub(crate) fn backing_len(&self) -> io::Result<u64> {
        match self {
            HostMemory::Mapped(r) => r.memory().backing_len(),
            HostMemory::File(f) => Ok(f.file.metadata()?.len()),
        }
    }

    /// [`RingError::Shrunk`] if the backing object is now shorter than `need` bytes; else an
    /// I/O error for `op` (a `stat` that failed included). Sealed memory never shrinks.
    pub(crate) fn check_len(&self, need: u64) -> Result<(), RingError> {
        if self.sealed() {
            return Ok(());
        }
        let len = self.backing_len().map_err(|source| RingError::Io {
            path: self.name().to_path_buf(),
            op: "stat",
            source,
        })?;
        if len < need {
            return Err(RingError::Shrunk {
                path: self.name().to_path_buf(),
                len,
                need,
            });
        }
        Ok(())
    }

    /// What a failed access `op` to a ring of `need` bytes means: [`RingError::Shrunk`] if the
    /// file is now shorter (a short read is how a truncate shows), else the I/O error.
    #[cold]
    pub(crate) fn error(&self, e: io::Error, op: &'static str, need: u64) -> RingError {
        match self.check_len(need) {
            Err(shrunk @ RingError::Shrunk { .. }) => shrunk,
            _ => RingError::Io {
                path: self.name().to_path_buf(),
                op,
                source: e,
            },
        }
    }

    /// The u32 at `off` with `order` (Relaxed or Acquire).
    #[inline]
    pub(crate) fn load_u32(&self, off: usize, order: Ordering) -> io::Result<u32> {
        match self {
            HostMemory::Mapped(r) => Ok(r.u32_at(off).load(order)),
            HostMemory::File(f) => {
                let mut b = [0u8; 4];
                f.read_exact_at(&mut b, off)?;
                // The kernel's copy is a plain load; the fence orders the reads that follow
                // after it, as the Acquire load would.
                fence(Ordering::Acquire);
                Ok(u32::from_le_bytes(b))
            }
        }
    }

    /// The u64 at `off` with `order`.
    #[inline]
    pub(crate) fn load_u64(&self, off: usize, order: Ordering) -> io::Result<u64> {
        match self {
            HostMemory::Mapped(r) => Ok(r.u64_at(off).load(order)),
            HostMemory::File(f) => {
                let mut b = [0u8; 8];
                f.read_exact_at(&mut b, off)?;
                fence(Ordering::Acquire);
                Ok(u64::from_le_bytes(b))
            }
        }
    }

    /// Stores `v` at `off` with `order` (Relaxed or Release).
    #[inline]
    pub(crate) fn store_u32(&self, off: usize, v: u32, order: Ordering) -> io::Result<()> {
        match self {
            HostMemory::Mapped(r) => {
                r.u32_at(off).store(v, order);
                Ok(())
            }
            HostMemory::File(f) => {
                // Every read before this store is done before the guest can see it.
                fence(Ordering::Release);
                f.write_all_at(&v.to_le_bytes(), off)
            }
        }
    }

    /// Stores `v` at `off` with `order`.
    #[inline]
    pub(crate) fn store_u64(&self, off: usize, v: u64, order: Ordering) -> io::Result<()> {
        match self {
            HostMemory::Mapped(r) => {
                r.u64_at(off).store(v, order);
                Ok(())
            }
            HostMemory::File(f) => {
                fence(Ordering::Release);
                f.write_all_at(&v.to_le_bytes(), off)
            }
        }
    }

    /// Copies `out.len()` consecutive slots starting at byte `off` out of the ring: atomic
    /// loads for mapped memory, one `pread` per [`FILE_READ_CHUNK`] for a file, through `buf`
    /// (kept by the caller so it is allocated once).
    ///
    /// # Panics
    /// If the run leaves the ring (mapped: see [`Region::slots`]): offsets come from the ring's
    /// own shape, never from guest input.
    #[inline]
    pub(crate) fn copy_slots(
        &self,
        off: usize,
        out: &mut [RawCommand],
        buf: &mut Vec<u8>,
    ) -> io::Result<()> {
        match self {
            HostMemory::Mapped(r) => {
                let n = out.len();
                for (o, s) in out.iter_mut().zip(r.slots(off, n)) {
                    *o = load_slot(s);
                }
                Ok(())
            }
            HostMemory::File(f) => {
                let per = FILE_READ_CHUNK / SLOT_SIZE;
                for (i, chunk) in out.chunks_mut(per).enumerate() {
                    let bytes = chunk.len() * SLOT_SIZE;
                    buf.resize(bytes, 0);
                    f.read_exact_at(&mut buf[..bytes], off + i * FILE_READ_CHUNK)?;
                    for (o, b) in chunk.iter_mut().zip(buf.chunks_exact(SLOT_SIZE)) {
                        let d0 = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
                        let d1 = u64::from_le_bytes(b[8..].try_into().expect("8 bytes"));
                        *o = RawCommand::new(d0, d1);
                    }
                }
                Ok(())
            }
        }
    }
}

/// A ring's one-engine lock, held for the life of its attachment; dropping it releases it.
///
/// For a ring in a file or memfd: `flock(LOCK_EX | LOCK_NB)` on an open file description of its
/// own (the file reopened through `/proc/self/fd/<n>`). `flock` locks belong to the open file
/// description, so any second attachment conflicts: another `HostRing` in this process (a
/// second `--ring` for the same file, through any path to the inode) or another process
/// (which opens `/proc/<pid>/fd/<n>` of a memfd, a new description of the same inode). Guests
/// never take it. For heap memory, which no other process can reach: the block's address in a
/// process-wide set.
#[derive(Debug)]
pub(crate) enum Claim {
    /// The locked description; closing it releases the lock.
    File(#[allow(dead_code)] File),
    /// The heap block's address.
    Heap(usize),
}

fn heap_claims() -> &'static Mutex<BTreeSet<usize>> {
    static CLAIMS: Mutex<BTreeSet<usize>> = Mutex::new(BTreeSet::new());
    &CLAIMS
}

impl Claim {
    /// Takes the lock for the ring in `mem`, or says who holds it.
    pub(crate) fn take(mem: &HostMemory) -> Result<Claim, RingError> {
        let path = mem.name();
        let Some(file) = mem.file() else {
            let HostMemory::Mapped(r) = mem else {
                unreachable!("a file ring has a file")
            };
            let addr = r.memory().base().as_ptr() as usize;
            let mut claims = lock(heap_claims());
            if !claims.insert(addr) {
                return Err(RingError::AlreadyAttached {
                    path: path.to_path_buf(),
                });
            }
            return Ok(Claim::Heap(addr));
        };
        let io = |op, source| RingError::Io {
            path: path.to_path_buf(),
            op,
            source,
        };
        let own = reopen(file).map_err(|e| io("lock", e))?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&own),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                RingError::AlreadyAttached {
                    path: path.to_path_buf(),
                }
            } else {
                io("lock", e)
            });
        }
        Ok(Claim::File(own))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Claim::Heap(addr) = self {
            lock(heap_claims()).remove(addr);
        }
    }
}

/// A new open file description of the same file (read-only is enough to hold a flock).
fn reopen(file: &File) -> io::Result<File> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(file);
    File::open(format!("/proc/self/fd/{fd}"))
}
