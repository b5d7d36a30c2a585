//! The sequential model replay checks the engine against: one guest ring, read eagerly at every
//! doorbell, each entry judged by the HashMap oracle with the bindings of that moment.
//!
//! It matches the engine exactly because replay applies binds and unbinds only once the rings
//! of the vIOMMU are idle, and guests change no slot between its doorbell and its consumption
//! except the one a stop names (the fix Linux writes before it acknowledges).

use std::collections::HashMap;
use vcmdq::command::RawCommand;
use vcmdq::oracle;
use vcmdq::queue::QueueShape;
use vcmdq::translate::SlotOutcome;
use vcmdq::viommu::ViommuConfig;

/// One ring's expected history: `(seq, outcome)` in the order the engine must produce them.
pub struct RingModel {
    shape: QueueShape,
    slots: Vec<RawCommand>,
    /// Pointer and sequence number of the next entry to read.
    read: u32,
    read_seq: u64,
    /// Pointer of CONS (the oldest entry not yet judged).
    cons: u32,
    /// PROD as the guest last wrote it (masked).
    prod: u32,
    stopped: bool,
    /// Whether `expected` is kept (validation needs only whether and where a ring stops).
    history: bool,
    expected: Vec<(u64, SlotOutcome)>,
}

impl RingModel {
    /// A model of an empty ring of this shape that keeps the expected history.
    pub fn new(shape: QueueShape) -> RingModel {
        RingModel {
            history: true,
            ..RingModel::without_history(shape)
        }
    }

    /// A model that keeps no history, so its memory is the ring's slots alone.
    pub fn without_history(shape: QueueShape) -> RingModel {
        RingModel {
            history: false,
            shape,
            slots: vec![RawCommand::default(); shape.entries() as usize],
            read: 0,
            read_seq: 0,
            cons: 0,
            prod: 0,
            stopped: false,
            expected: Vec::new(),
        }
    }

    /// The model's ring is stopped on a refused entry, waiting for the acknowledgement.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The pointer of the slot the ring is stopped at, if it is stopped.
    pub fn stopped_at(&self) -> Option<u32> {
        self.stopped.then_some(self.cons)
    }

    /// The guest wrote `cmd` into the slot `ptr` points at.
    pub fn write(&mut self, ptr: u32, cmd: RawCommand) {
        self.slots[self.shape.index(ptr) as usize] = cmd;
    }

    /// The guest moved PROD: the model reads up to it (or to the first refused entry) with the
    /// bindings of this moment.
    pub fn doorbell(&mut self, prod: u32, cfg: &ViommuConfig, bindings: &HashMap<u32, u32>) {
        self.prod = self.shape.ptr(prod);
        self.read_on(cfg, bindings);
    }

    /// What the engine must produce for this ring so far: `(seq, outcome)` in order.
    pub fn expected(&self) -> &[(u64, SlotOutcome)] {
        &self.expected
    }

    /// The expected history, taken.
    pub fn into_expected(self) -> Vec<(u64, SlotOutcome)> {
        self.expected
    }

    /// The guest acknowledged a stop: reading resumes at the stopped slot.
    pub fn ack(&mut self, cfg: &ViommuConfig, bindings: &HashMap<u32, u32>) {
        if self.stopped {
            self.stopped = false;
            self.read_on(cfg, bindings);
        }
    }

    fn read_on(&mut self, cfg: &ViommuConfig, bindings: &HashMap<u32, u32>) {
        if self.stopped {
            return;
        }
        // What the engine does with a hostile PROD: nothing is read while it is more than a
        // ring ahead of CONS, or behind what was already read.
        let ahead = self.shape.distance(self.prod, self.cons);
        let taken = self.shape.distance(self.read, self.cons);
        if ahead > self.shape.entries() || ahead < taken {
            return;
        }
        for _ in taken..ahead {
            let cmd = self.slots[self.shape.index(self.read) as usize];
            let outcome = oracle::translate_one(cfg, bindings, cmd);
            if self.history {
                self.expected.push((self.read_seq, outcome));
            }
            if matches!(outcome, SlotOutcome::Refused { .. }) {
                // CONS stops here; the entry is read again after the acknowledgement.
                self.cons = self.read;
                self.stopped = true;
                return;
            }
            self.read = self.shape.advance(self.read, 1);
            self.read_seq += 1;
            self.cons = self.read;
        }
    }
}
