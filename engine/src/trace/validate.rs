//! Checking that the records of a trace refer to things that exist, and counting them.
//!
//! This is the structural half of a trace's meaning: a Commands record for a ring never created,
//! a slot beyond the ring's size or a bind to an unknown vIOMMU make a trace that cannot be
//! replayed at all. Whether the engine accepts what the guest wrote (a bad opcode, an unknown
//! vSID, a bind the control plane refuses) is not checked here: that is what replay measures.

use super::{Event, Kind, Record, Trace, TraceError};
use crate::command::opcode_name;
use crate::queue::QueueShape;
use std::collections::{BTreeMap, HashMap, HashSet};

/// A reference to something the trace never created, or an id created twice.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// A vIOMMU id that no earlier ViommuCreate made.
    #[error("{kind} refers to vIOMMU {viommu}, which was never created")]
    UnknownViommu {
        /// The record's kind.
        kind: &'static str,
        /// The id.
        viommu: u32,
    },
    /// A device id that no earlier DeviceAdd made.
    #[error("{kind} refers to device {device}, which was never added")]
    UnknownDevice {
        /// The record's kind.
        kind: &'static str,
        /// The id.
        device: u32,
    },
    /// A ring id that no earlier RingCreate made.
    #[error("{kind} refers to ring {ring}, which was never created")]
    UnknownRing {
        /// The record's kind.
        kind: &'static str,
        /// The id.
        ring: u32,
    },
    /// An id created twice.
    #[error("{kind} creates {what} {id}, which already exists")]
    Duplicate {
        /// The record's kind.
        kind: &'static str,
        /// vIOMMU, device or ring.
        what: &'static str,
        /// The id.
        id: u32,
    },
    /// A slot pointer with bits above the wrap bit of its ring.
    #[error(
        "{kind} names slot {slot:#x} of ring {ring}, beyond its 2^{log2size} entries and wrap bit"
    )]
    SlotOutOfRange {
        /// The record's kind.
        kind: &'static str,
        /// The ring.
        ring: u32,
        /// The slot pointer.
        slot: u32,
        /// The ring's LOG2SIZE.
        log2size: u8,
    },
    /// More commands in one record than the ring holds.
    #[error("Commands writes {count} commands into ring {ring}, which holds {entries}")]
    TooManyCommands {
        /// The ring.
        ring: u32,
        /// Commands in the record.
        count: usize,
        /// Ring entries.
        entries: u32,
    },
}

/// What a trace holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Records.
    pub records: u64,
    /// Bytes in the file.
    pub bytes: u64,
    /// Records by kind, indexed by [`Kind::index`].
    pub by_kind: [u64; Kind::ALL.len()],
    /// Guest commands written (Commands records; GuestFix not counted).
    pub commands: u64,
    /// Commands per ring.
    pub commands_by_ring: BTreeMap<u32, u64>,
    /// Commands by opcode name (`illegal-0xNN` for opcodes the spec does not define).
    pub commands_by_opcode: BTreeMap<String, u64>,
    /// Timestamp of the first record.
    pub first_ns: u64,
    /// Timestamp of the last record.
    pub last_ns: u64,
}

impl Summary {
    /// `last_ns - first_ns`.
    pub fn duration_ns(&self) -> u64 {
        self.last_ns - self.first_ns
    }

    /// Records of one kind.
    pub fn count(&self, kind: Kind) -> u64 {
        self.by_kind[kind.index()]
    }

    /// The summary as JSON (what `vcmdq trace info --json` prints).
    pub fn to_json(&self) -> serde_json::Value {
        let kinds: serde_json::Map<String, serde_json::Value> = Kind::ALL
            .iter()
            .map(|k| (k.name().to_string(), self.count(*k).into()))
            .collect();
        let rings: serde_json::Map<String, serde_json::Value> = self
            .commands_by_ring
            .iter()
            .map(|(r, n)| (r.to_string(), (*n).into()))
            .collect();
        let ops: serde_json::Map<String, serde_json::Value> = self
            .commands_by_opcode
            .iter()
            .map(|(o, n)| (o.clone(), (*n).into()))
            .collect();
        serde_json::json!({
            "records": self.records,
            "bytes": self.bytes,
            "records_by_kind": kinds,
            "commands": self.commands,
            "commands_by_ring": rings,
            "commands_by_opcode": ops,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
            "duration_ns": self.duration_ns(),
        })
    }
}

impl core::fmt::Display for Summary {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        writeln!(f, "records   {} ({} bytes)", self.records, self.bytes)?;
        writeln!(
            f,
            "duration  {} ns ({} .. {})",
            self.duration_ns(),
            self.first_ns,
            self.last_ns
        )?;
        for k in Kind::ALL {
            if self.count(k) > 0 {
                writeln!(f, "  {:<13} {}", k.name(), self.count(k))?;
            }
        }
        writeln!(f, "commands  {}", self.commands)?;
        for (op, n) in &self.commands_by_opcode {
            writeln!(f, "  {op:<16} {n}")?;
        }
        for (ring, n) in &self.commands_by_ring {
            writeln!(f, "  ring {ring:<11} {n}")?;
        }
        Ok(())
    }
}

/// Reads every record of `trace`, checks that each refers only to vIOMMUs, devices and rings
/// created before it and that slots fit their ring, and counts what it holds.
pub fn validate(trace: &Trace<'_>) -> Result<Summary, TraceError> {
    let mut s = Summary {
        bytes: trace.len() as u64,
        ..Summary::default()
    };
    let mut viommus = HashSet::new();
    let mut devices = HashSet::new();
    let mut rings: HashMap<u32, QueueShape> = HashMap::new();
    let mut opcodes = [0u64; 256];
    for r in trace.records() {
        let r = r?;
        check(&r, &mut viommus, &mut devices, &mut rings, &mut opcodes).map_err(|problem| {
            TraceError::Invalid {
                path: trace.name().map(str::to_string),
                offset: r.offset,
                problem,
            }
        })?;
        if s.records == 0 {
            s.first_ns = r.timestamp_ns;
        }
        s.last_ns = r.timestamp_ns;
        s.records += 1;
        s.by_kind[r.event.kind().index()] += 1;
        if let Event::Commands { ring, cmds, .. } = r.event {
            s.commands += cmds.len() as u64;
            *s.commands_by_ring.entry(ring).or_default() += cmds.len() as u64;
        }
    }
    for (op, &n) in opcodes.iter().enumerate() {
        if n > 0 {
            let name = match opcode_name(op as u8) {
                Some(name) => name.to_string(),
                None => format!("illegal-{op:#04x}"),
            };
            s.commands_by_opcode.insert(name, n);
        }
    }
    Ok(s)
}

fn check(
    r: &Record<'_>,
    viommus: &mut HashSet<u32>,
    devices: &mut HashSet<u32>,
    rings: &mut HashMap<u32, QueueShape>,
    opcodes: &mut [u64; 256],
) -> Result<(), Invalid> {
    let kind = r.event.kind().name();
    let viommu_known = |v: u32| {
        if viommus.contains(&v) {
            Ok(())
        } else {
            Err(Invalid::UnknownViommu { kind, viommu: v })
        }
    };
    let device_known = |d: u32| {
        if devices.contains(&d) {
            Ok(())
        } else {
            Err(Invalid::UnknownDevice { kind, device: d })
        }
    };
    let ring_shape = |ring: u32| {
        rings
            .get(&ring)
            .copied()
            .ok_or(Invalid::UnknownRing { kind, ring })
    };
    let slot_fits = |ring: u32, shape: QueueShape, slot: u32| {
        if shape.ptr(slot) == slot {
            Ok(())
        } else {
            Err(Invalid::SlotOutOfRange {
                kind,
                ring,
                slot,
                log2size: shape.log2size(),
            })
        }
    };
    match r.event {
        Event::ViommuCreate { viommu, .. } => {
            if !viommus.insert(viommu) {
                return Err(Invalid::Duplicate {
                    kind,
                    what: "vIOMMU",
                    id: viommu,
                });
            }
        }
        Event::DeviceAdd { device, .. } => {
            if !devices.insert(device) {
                return Err(Invalid::Duplicate {
                    kind,
                    what: "device",
                    id: device,
                });
            }
        }
        Event::Bind { viommu, device, .. } | Event::Unbind { viommu, device } => {
            viommu_known(viommu)?;
            device_known(device)?;
        }
        Event::RingCreate {
            ring,
            viommu,
            log2size,
        } => {
            viommu_known(viommu)?;
            // The reader has already refused LOG2SIZE above 19.
            let shape = QueueShape::new(log2size).map_err(|_| Invalid::SlotOutOfRange {
                kind,
                ring,
                slot: 0,
                log2size,
            })?;
            if rings.insert(ring, shape).is_some() {
                return Err(Invalid::Duplicate {
                    kind,
                    what: "ring",
                    id: ring,
                });
            }
        }
        Event::Commands { ring, slot, cmds } => {
            let shape = ring_shape(ring)?;
            slot_fits(ring, shape, slot)?;
            if cmds.len() > shape.entries() as usize {
                return Err(Invalid::TooManyCommands {
                    ring,
                    count: cmds.len(),
                    entries: shape.entries(),
                });
            }
            for c in cmds {
                opcodes[c.opcode() as usize] += 1;
            }
        }
        Event::Doorbell { ring, .. } | Event::GuestAck { ring } => {
            ring_shape(ring)?;
        }
        Event::GuestFix { ring, slot, .. } | Event::Outcome { ring, slot, .. } => {
            let shape = ring_shape(ring)?;
            slot_fits(ring, shape, slot)?;
        }
    }
    Ok(())
}
