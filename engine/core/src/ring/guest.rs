//! The guest's side of a ring: what a guest driver (or a test, the trace replayer, `vcmdq
//! guest`) does. Trusts nothing the engine writes beyond using it as the spec says.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::layout::{self, slot_offset};
use super::memory::{HeapMemory, MmapMemory, Region, RingMemory};
use super::{load_slot, new_region, shape_for, store_slot, validate, wake, RingError};
use crate::command::RawCommand;
use crate::queue::{cons_err, runs, CError, QueueShape};
use crate::sync::Backoff;

/// The producer end of a guest ring. One `GuestRing` per ring: two producers on one ring race
/// on PROD exactly as two CPUs without a lock would.
#[derive(Debug)]
pub struct GuestRing {
    region: Region,
    shape: QueueShape,
    viommu_id: u32,
    /// The guest's PROD, ahead of the published one by what `push` wrote since the last
    /// `doorbell`.
    prod: u32,
}

impl GuestRing {
    /// Creates (or truncates) a ring file at `path` of 2^`log2size` slots for vIOMMU `viommu_id`.
    ///
    /// A plain file is not sealed: an engine attaches it only with
    /// [`AttachOptions::allow_unsealed`](super::AttachOptions), and then never maps it. The
    /// guest side does map it: if the file is truncated, this side's next access to a lost page
    /// raises SIGBUS in the guest's process (the engine is unaffected). Prefer
    /// [`GuestRing::create_sealed`] for rings another process maps.
    pub fn create(
        path: impl AsRef<Path>,
        log2size: u8,
        viommu_id: u32,
    ) -> Result<GuestRing, RingError> {
        let shape = shape_for(log2size)?;
        let mem = MmapMemory::create_file(path.as_ref(), layout::ring_bytes(shape))?;
        Ok(Self::fresh(Arc::new(mem), shape, viommu_id))
    }

    /// Creates a ring in a memfd sealed against shrinking; [`GuestRing::path`] is
    /// `/proc/<pid>/fd/<n>`, which an engine can attach while this ring lives.
    pub fn create_sealed(log2size: u8, viommu_id: u32) -> Result<GuestRing, RingError> {
        let shape = shape_for(log2size)?;
        let mem = MmapMemory::create_sealed("vcmdq-ring", layout::ring_bytes(shape))?;
        Ok(Self::fresh(Arc::new(mem), shape, viommu_id))
    }

    /// Creates a ring on the heap; share it with [`HostRing::attach_memory`](super::HostRing)
    /// through [`GuestRing::memory`], or use [`heap_pair`](super::heap_pair).
    pub fn heap(log2size: u8, viommu_id: u32) -> Result<GuestRing, RingError> {
        let shape = shape_for(log2size)?;
        let mem = HeapMemory::new(layout::ring_bytes(shape));
        Ok(Self::fresh(Arc::new(mem), shape, viommu_id))
    }

    fn fresh(mem: Arc<dyn RingMemory>, shape: QueueShape, viommu_id: u32) -> GuestRing {
        GuestRing {
            region: new_region(mem, shape, viommu_id),
            shape,
            viommu_id,
            prod: 0,
        }
    }

    /// Opens an existing ring file (or `/proc/<pid>/fd/<n>` of a sealed one), checking magic,
    /// version, LOG2SIZE and size. The guest's PROD starts at the published PROD.
    pub fn open(path: impl AsRef<Path>) -> Result<GuestRing, RingError> {
        Self::from_memory(Arc::new(MmapMemory::open(path.as_ref())?))
    }

    /// A guest side over memory that already holds a ring.
    pub fn from_memory(mem: Arc<dyn RingMemory>) -> Result<GuestRing, RingError> {
        let region = Region::new(mem);
        let (shape, viommu_id) = validate(&region)?;
        let prod = shape.ptr(region.u32_at(layout::OFF_PROD).load(Ordering::Relaxed));
        Ok(GuestRing {
            region,
            shape,
            viommu_id,
            prod,
        })
    }

    /// The ring's memory, to attach an engine side in the same process.
    pub fn memory(&self) -> Arc<dyn RingMemory> {
        self.region.memory().clone()
    }

    /// The file the ring lives in (`<heap>` for heap memory).
    pub fn path(&self) -> &Path {
        self.region.memory().name()
    }

    /// The queue geometry.
    pub fn shape(&self) -> QueueShape {
        self.shape
    }

    /// The vIOMMU named in the header.
    pub fn viommu_id(&self) -> u32 {
        self.viommu_id
    }

    /// Slots the guest may still fill: entries minus those between CONS and the guest's PROD
    /// (0 if CONS is not a pointer a correct engine could have written).
    pub fn free(&self) -> u32 {
        self.shape.free(self.prod, self.cons().0)
    }

    /// Writes as many of `cmds` as fit at the guest's PROD, without publishing them; the count
    /// written. [`GuestRing::doorbell`] publishes.
    pub fn push(&mut self, cmds: &[RawCommand]) -> usize {
        let n = (self.free() as usize).min(cmds.len());
        let entries = self.shape.entries() as usize;
        let mut cmds = &cmds[..n];
        for run in runs(entries, self.shape.index(self.prod) as usize, n) {
            let offset = slot_offset(self.shape, run.start as u32);
            let (now, rest) = cmds.split_at(run.len());
            for (s, c) in self.region.slots(offset, run.len()).iter().zip(now) {
                store_slot(s, c);
            }
            cmds = rest;
        }
        self.prod = self.shape.advance(self.prod, n as u32);
        n
    }

    /// Publishes the guest's PROD: one Release store, so the engine that reads PROD with
    /// Acquire sees every slot written before; then kicks the engine if it announced that it
    /// sleeps (SLEEPING, [`wake::kick`]).
    pub fn doorbell(&self) {
        self.region
            .u32_at(layout::OFF_PROD)
            .store(self.prod, Ordering::Release);
        self.kick();
    }

    /// Publishes the guest's PROD as [`GuestRing::doorbell`] does, but without the kick: a guest
    /// written before the kick existed, which the engine serves at its next poll (after at
    /// most its sleep timeout). For tests of that guest, and of the engine's re-check.
    pub fn doorbell_without_kick(&self) {
        self.region
            .u32_at(layout::OFF_PROD)
            .store(self.prod, Ordering::Release);
    }

    /// Wakes the engine if it sleeps on this ring (SLEEPING = 1): what [`GuestRing::doorbell`]
    /// and [`GuestRing::ack_error`] do after their store.
    pub fn kick(&self) {
        wake::kick(self.region.u32_at(layout::OFF_SLEEPING));
    }

    /// Whether the engine has announced that it sleeps on this ring (SLEEPING = 1).
    pub fn engine_sleeping(&self) -> bool {
        self.region
            .u32_at(layout::OFF_SLEEPING)
            .load(Ordering::SeqCst)
            != 0
    }

    /// [`GuestRing::push`] then [`GuestRing::doorbell`]; the count written.
    pub fn submit(&mut self, cmds: &[RawCommand]) -> usize {
        let n = self.push(cmds);
        self.doorbell();
        n
    }

    /// The guest's PROD (index and wrap), including pushed but unpublished slots.
    pub fn prod(&self) -> u32 {
        self.prod
    }

    /// Moves the guest's PROD without writing slots (the next doorbell publishes it).
    pub fn set_prod(&mut self, ptr: u32) {
        self.prod = self.shape.ptr(ptr);
    }

    /// The PROD word as it is in memory, unmasked.
    pub fn published_prod(&self) -> u32 {
        self.region.u32_at(layout::OFF_PROD).load(Ordering::Relaxed)
    }

    /// CONS (index and wrap) and CONS.ERR. An error code this engine never writes reads as
    /// CERROR_ILL.
    pub fn cons(&self) -> (u32, CError) {
        let cons = self.region.u32_at(layout::OFF_CONS).load(Ordering::Acquire);
        let err = CError::from_code(cons_err(cons)).unwrap_or(CError::Ill);
        (self.shape.ptr(cons), err)
    }

    /// Waits until CONS has reached `target` (a pointer between CONS and the guest's PROD):
    /// everything before `target` is consumed. Returns CONS; ends early with
    /// [`RingError::Stopped`] when the ring stops on an error first, and with
    /// [`RingError::Timeout`] after `timeout`.
    pub fn wait_cons(&self, target: u32, timeout: Duration) -> Result<u32, RingError> {
        let want = self.shape.distance(self.prod, target);
        self.wait(timeout, "CONS", || {
            let cons = self.cons().0;
            (self.shape.distance(self.prod, cons) <= want).then_some(cons)
        })
    }

    /// Guest CMD_SYNCs the engine has completed on this ring, ever: a guest that issued its
    /// n-th CMD_SYNC waits for this to reach n.
    pub fn sync_count(&self) -> u64 {
        self.region
            .u64_at(layout::OFF_SYNC_COUNT)
            .load(Ordering::Acquire)
    }

    /// Waits until [`GuestRing::sync_count`] reaches `count`; returns it. Ends early on an
    /// error as [`GuestRing::wait_cons`] does.
    pub fn wait_syncs(&self, count: u64, timeout: Duration) -> Result<u64, RingError> {
        self.wait(timeout, "CMD_SYNC completions", || {
            let n = self.sync_count();
            (n >= count).then_some(n)
        })
    }

    fn wait<T>(
        &self,
        timeout: Duration,
        what: &'static str,
        mut done: impl FnMut() -> Option<T>,
    ) -> Result<T, RingError> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if let Some(v) = done() {
                return Ok(v);
            }
            if let Some((slot, cerror)) = self.error() {
                return Err(RingError::Stopped { slot, cerror });
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(RingError::Timeout { what, waited });
            }
            spins += 1;
            Backoff::SPIN_THEN_YIELD.pause(spins);
        }
    }

    /// The completion word: MSIDATA of the last completed CMD_SYNC with CS=IRQ.
    pub fn completion(&self) -> u32 {
        // Acquire on the count orders this load after the engine's store of the word.
        let _ = self.sync_count();
        self.region
            .u32_at(layout::OFF_COMPLETION)
            .load(Ordering::Relaxed)
    }

    /// The error the ring is stopped on, if any: CONS (the failing slot) and CONS.ERR.
    pub fn error(&self) -> Option<(u32, CError)> {
        let err = self.region.u32_at(layout::OFF_ERR).load(Ordering::Acquire);
        let ack = self
            .region
            .u32_at(layout::OFF_ERR_ACK)
            .load(Ordering::Relaxed);
        ((err ^ ack) & 1 != 0).then(|| self.cons())
    }

    /// Acknowledges the error (the GERRORN toggle): the engine resumes at CONS, re-reading the
    /// slot there, so fix it first with [`GuestRing::write_slot`]. A no-op without an error.
    pub fn ack_error(&self) {
        let err = self.region.u32_at(layout::OFF_ERR).load(Ordering::Acquire);
        // Release: the engine that sees the acknowledgement sees the fixed slot.
        self.region
            .u32_at(layout::OFF_ERR_ACK)
            .store(err & 1, Ordering::Release);
        self.kick();
    }

    /// Writes `cmd` into the slot `ptr` names: the way to fix a failing command (Linux
    /// overwrites it with a CMD_SYNC) and the way a hostile test scribbles.
    pub fn write_slot(&self, ptr: u32, cmd: RawCommand) {
        store_slot(&self.region.slots(slot_offset(self.shape, ptr), 1)[0], &cmd);
    }

    /// The slot `ptr` names, as it is in memory now.
    pub fn read_slot(&self, ptr: u32) -> RawCommand {
        load_slot(&self.region.slots(slot_offset(self.shape, ptr), 1)[0])
    }

    /// Stores `value` into PROD exactly as given (junk bits, a pointer behind CONS or past a
    /// full ring), leaving the guest's own PROD alone: for tests of hostile guests.
    pub fn write_prod_raw(&self, value: u32) {
        self.region
            .u32_at(layout::OFF_PROD)
            .store(value, Ordering::Release);
        self.kick();
    }

    /// Stores `value` into the 32-bit header word at byte `offset`: for tests of guests that
    /// scribble over words the engine owns.
    ///
    /// # Panics
    /// If `offset` is unaligned, outside the header, or inside a 64-bit field (MAGIC,
    /// SYNC_COUNT; use [`GuestRing::write_header_u64`]): mixing access sizes on one word is
    /// outside Rust's memory model.
    pub fn write_header_u32(&self, offset: usize, value: u32) {
        assert!(
            offset < layout::HEADER_SIZE && !is_u64_field(offset),
            "header offset {offset} is not a 32-bit word"
        );
        self.region.u32_at(offset).store(value, Ordering::Release);
    }

    /// Stores `value` into a 64-bit header field (MAGIC at 0, SYNC_COUNT at 144).
    ///
    /// # Panics
    /// If `offset` is not one of those.
    pub fn write_header_u64(&self, offset: usize, value: u64) {
        assert!(
            offset == layout::OFF_MAGIC || offset == layout::OFF_SYNC_COUNT,
            "header offset {offset} is not a 64-bit field"
        );
        self.region.u64_at(offset).store(value, Ordering::Release);
    }
}

fn is_u64_field(offset: usize) -> bool {
    (layout::OFF_MAGIC..layout::OFF_MAGIC + 8).contains(&offset)
        || (layout::OFF_SYNC_COUNT..layout::OFF_SYNC_COUNT + 8).contains(&offset)
}
