//! Ring files that nothing in the test process maps: a guest that writes them with `pwrite`
//! only, so a truncate under test can fault only the engine side, which must not fault.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use vcmdq::command::RawCommand;
use vcmdq::ring::layout::{self, OFF_CONS, OFF_PROD};
use vcmdq::ring::GuestRing;

/// A file under the temp dir, removed when dropped.
pub struct TempPath(pub PathBuf);

impl TempPath {
    pub fn new(name: &str) -> TempPath {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        TempPath(
            std::env::temp_dir().join(format!("vcmdq-file-ring-{}-{n}-{name}", std::process::id())),
        )
    }

    /// The path as a command-line argument.
    pub fn s(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl AsRef<Path> for TempPath {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

/// A ring file of 2^`log2size` slots for vIOMMU 1, unmapped once made.
pub fn ring_file(name: &str, log2size: u8) -> TempPath {
    let path = TempPath::new(name);
    drop(GuestRing::create(&path, log2size, 1).unwrap());
    path
}

/// A guest that writes its ring file with `pwrite`, never through a mapping.
pub struct FileGuest {
    file: File,
    pub entries: u64,
    pub prod: u64,
}

impl FileGuest {
    pub fn open(path: &Path, log2size: u8) -> FileGuest {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        FileGuest {
            file,
            entries: 1 << log2size,
            prod: 0,
        }
    }

    /// The PROD/CONS bits that count: index and wrap.
    pub fn mask(&self) -> u64 {
        (self.entries << 1) - 1
    }

    /// Entries consumed so far, from CONS (index and wrap only; the engine's CONS is within
    /// one lap behind PROD).
    pub fn consumed(&self) -> u64 {
        let mut b = [0u8; 4];
        self.file.read_exact_at(&mut b, OFF_CONS as u64).unwrap();
        let c = u64::from(u32::from_le_bytes(b)) & self.mask();
        self.prod - ((self.prod & self.mask()).wrapping_sub(c) & self.mask())
    }

    /// Writes `cmd(seq)` into every free slot, `seq` counting entries from the first, and
    /// publishes PROD; the count written.
    pub fn fill(&mut self, cmd: impl Fn(u64) -> RawCommand) -> u64 {
        let free = self.entries - (self.prod - self.consumed());
        for i in 0..free {
            let seq = self.prod + i;
            let c = cmd(seq);
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&c.d0().to_le_bytes());
            b[8..].copy_from_slice(&c.d1().to_le_bytes());
            let off = layout::HEADER_SIZE as u64 + 16 * (seq % self.entries);
            self.file.write_all_at(&b, off).unwrap();
        }
        self.prod += free;
        self.write_prod((self.prod & self.mask()) as u32);
        free
    }

    /// Cuts or extends the file to `len` bytes, as another process may at any time.
    pub fn truncate(&self, len: u64) {
        self.file.set_len(len).unwrap();
    }

    /// Writes a raw PROD value, hostile or not.
    pub fn write_prod(&self, raw: u32) {
        self.file
            .write_all_at(&raw.to_le_bytes(), OFF_PROD as u64)
            .unwrap();
    }
}
