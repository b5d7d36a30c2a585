//! The one validation of a trace, shared by `trace info`, `trace dump`, `trace build` and
//! `replay`: a trace that validates replays, one that does not is refused by all of them with the
//! same message (record index and byte offset).
//!
//! It checks that records refer to things that exist (a ring that was never created, a slot
//! beyond its ring), runs every control-plane event through the engine's own vIOMMU and device
//! code (so a bind the engine would refuse, EEXIST, EINVAL or ENOENT, is refused here first), and
//! follows each ring with the oracle's model, so that a GuestAck or GuestFix on a ring that is
//! not stopped at that point, or a fix of another slot than the one it stopped at, is refused:
//! replay could not tell whether the engine agreed with such a guest. Whether the engine accepts
//! what the guest wrote (a bad opcode, an unknown vSID) is not checked: that is what replay
//! measures. The rings' memory is bounded by [`Limits::max_ring_memory`], checked at each
//! RingCreate before anything of that ring is allocated.

use super::{Event, Kind, Record, Trace, TraceError};
use crate::ring_model::RingModel;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use vcmdq::command::{opcode_name, RawCommand};
use vcmdq::queue::QueueShape;
use vcmdq::viommu::{check_vmid, DeviceId, Devices, GraceDomain, Viommu};

/// Default of [`Limits::max_ring_memory`]: 256 MiB, 32 rings of the largest size (2^19 entries
/// of 16 bytes).
pub const DEFAULT_MAX_RING_MEMORY: u64 = 256 << 20;

/// Bounds on what a trace may make a consumer allocate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of guest ring slots (2^LOG2SIZE x 16 per RingCreate) a trace may declare in all
    /// (`--max-ring-memory`); replay maps each ring and models it, so it needs about twice this.
    pub max_ring_memory: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_ring_memory: DEFAULT_MAX_RING_MEMORY,
        }
    }
}

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
    /// The engine's control plane refuses the event (the errno it returns leads the message).
    #[error("{kind} is refused by the control plane: {why}")]
    ControlPlane {
        /// The record's kind.
        kind: &'static str,
        /// The engine's error.
        why: String,
    },
    /// The rings declared so far need more memory than the limit allows.
    #[error(
        "RingCreate of ring {ring} brings the rings' memory to {needed} bytes, above the limit of \
         {limit} bytes (raise it with --max-ring-memory BYTES)"
    )]
    RingMemory {
        /// The ring.
        ring: u32,
        /// Bytes of all rings declared so far, this one included.
        needed: u64,
        /// The limit.
        limit: u64,
    },
    /// A GuestAck or GuestFix on a ring that is not stopped at that point of the trace.
    #[error(
        "{kind} on ring {ring}, which is not stopped there (no refused command waits for an \
         acknowledgement); replay could not check what the engine does with it"
    )]
    NotStopped {
        /// The record's kind.
        kind: &'static str,
        /// The ring.
        ring: u32,
    },
    /// A GuestFix of another slot than the one its ring stopped at.
    #[error("GuestFix rewrites slot {slot:#x} of ring {ring}, which stopped at slot {stopped:#x}")]
    FixElsewhere {
        /// The ring.
        ring: u32,
        /// The slot rewritten.
        slot: u32,
        /// Where the ring stopped.
        stopped: u32,
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
    /// Bytes of guest ring slots the trace declares (2^LOG2SIZE x 16 per RingCreate).
    pub ring_bytes: u64,
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
            "ring_bytes": self.ring_bytes,
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
        writeln!(f, "rings     {} bytes of slots", self.ring_bytes)?;
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

/// [`validate_with`] under the default [`Limits`].
pub fn validate(trace: &Trace<'_>) -> Result<Summary, TraceError> {
    validate_with(trace, &Limits::default())
}

/// Reads every record of `trace`, checks it as the module documentation says, and counts what
/// it holds. The first problem is a [`TraceError::Invalid`] with the record's index and offset.
pub fn validate_with(trace: &Trace<'_>, limits: &Limits) -> Result<Summary, TraceError> {
    let mut s = Summary {
        bytes: trace.len() as u64,
        ..Summary::default()
    };
    let mut st = State {
        devices: Devices::new(),
        grace: GraceDomain::new(),
        viommus: HashMap::new(),
        device_ids: HashSet::new(),
        rings: HashMap::new(),
        ring_bytes: 0,
        limits: *limits,
        opcodes: [0; 256],
    };
    for (index, r) in trace.records().enumerate() {
        let r = r?;
        st.check(&r).map_err(|problem| TraceError::Invalid {
            path: trace.name().map(str::to_string),
            record: index as u64,
            offset: r.offset,
            problem,
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
    s.ring_bytes = st.ring_bytes;
    for (op, &n) in st.opcodes.iter().enumerate() {
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

struct ViommuState {
    viommu: Viommu,
    /// vSID -> pSID, what the oracle's model reads.
    bindings: HashMap<u32, u32>,
}

struct RingState {
    viommu: u32,
    shape: QueueShape,
    model: RingModel,
}

struct State {
    devices: Arc<Devices>,
    grace: Arc<GraceDomain>,
    viommus: HashMap<u32, ViommuState>,
    device_ids: HashSet<u32>,
    rings: HashMap<u32, RingState>,
    ring_bytes: u64,
    limits: Limits,
    opcodes: [u64; 256],
}

impl State {
    fn check(&mut self, r: &Record<'_>) -> Result<(), Invalid> {
        let kind = r.event.kind().name();
        match r.event {
            ev @ Event::ViommuCreate { viommu, .. } => self.create_viommu(kind, viommu, ev),
            Event::DeviceAdd { device, smmu, psid } => {
                if !self.device_ids.insert(device) {
                    return Err(Invalid::Duplicate {
                        kind,
                        what: "device",
                        id: device,
                    });
                }
                self.devices
                    .add_device(DeviceId(device), smmu, psid)
                    .map_err(refused(kind))
            }
            Event::Bind {
                viommu,
                device,
                vsid,
            } => self.bind(kind, viommu, device, vsid),
            Event::Unbind { viommu, device } => self.unbind(kind, viommu, device),
            Event::RingCreate {
                ring,
                viommu,
                log2size,
            } => self.create_ring(kind, ring, viommu, log2size),
            Event::Commands { ring, slot, cmds } => self.write_commands(kind, ring, slot, cmds),
            Event::Doorbell { ring, prod } => {
                let rt = self.rings.get_mut(&ring).ok_or(unknown_ring(kind, ring))?;
                let v = &self.viommus[&rt.viommu];
                rt.model.doorbell(prod, v.viommu.config(), &v.bindings);
                Ok(())
            }
            Event::GuestAck { ring } => {
                let rt = self.rings.get_mut(&ring).ok_or(unknown_ring(kind, ring))?;
                if !rt.model.stopped() {
                    return Err(Invalid::NotStopped { kind, ring });
                }
                let v = &self.viommus[&rt.viommu];
                rt.model.ack(v.viommu.config(), &v.bindings);
                Ok(())
            }
            Event::GuestFix { ring, slot, cmd } => self.guest_fix(kind, ring, slot, cmd),
            Event::Outcome { ring, slot, .. } => {
                let rt = self.rings.get(&ring).ok_or(unknown_ring(kind, ring))?;
                slot_fits(kind, ring, rt.shape, slot)
            }
        }
    }

    fn create_viommu(
        &mut self,
        kind: &'static str,
        viommu: u32,
        ev: Event<'_>,
    ) -> Result<(), Invalid> {
        if self.viommus.contains_key(&viommu) {
            return Err(Invalid::Duplicate {
                kind,
                what: "vIOMMU",
                id: viommu,
            });
        }
        let cfg = ev.viommu_config().expect("a ViommuCreate");
        // The engine's own rule (one VMID per vIOMMU per SMMU), so that a trace that
        // validates is one the engine's control plane accepts.
        check_vmid(&cfg, self.viommus.values().map(|s| s.viommu.config()))
            .map_err(refused(kind))?;
        let v =
            Viommu::new(cfg, self.devices.clone(), self.grace.clone()).map_err(refused(kind))?;
        self.viommus.insert(
            viommu,
            ViommuState {
                viommu: v,
                bindings: HashMap::new(),
            },
        );
        Ok(())
    }

    fn bind(
        &mut self,
        kind: &'static str,
        viommu: u32,
        device: u32,
        vsid: u32,
    ) -> Result<(), Invalid> {
        let v = self
            .viommus
            .get_mut(&viommu)
            .ok_or(Invalid::UnknownViommu { kind, viommu })?;
        if !self.device_ids.contains(&device) {
            return Err(Invalid::UnknownDevice { kind, device });
        }
        v.viommu
            .set_dev_id(DeviceId(device), vsid)
            .map_err(refused(kind))?;
        let psid = v.viommu.lookup(vsid).unwrap_or_default();
        v.bindings.insert(vsid, psid);
        Ok(())
    }

    fn unbind(&mut self, kind: &'static str, viommu: u32, device: u32) -> Result<(), Invalid> {
        let v = self
            .viommus
            .get_mut(&viommu)
            .ok_or(Invalid::UnknownViommu { kind, viommu })?;
        if !self.device_ids.contains(&device) {
            return Err(Invalid::UnknownDevice { kind, device });
        }
        let vsid = v
            .viommu
            .unset_dev_id(DeviceId(device))
            .map_err(refused(kind))?;
        v.bindings.remove(&vsid);
        Ok(())
    }

    fn create_ring(
        &mut self,
        kind: &'static str,
        ring: u32,
        viommu: u32,
        log2size: u8,
    ) -> Result<(), Invalid> {
        if !self.viommus.contains_key(&viommu) {
            return Err(Invalid::UnknownViommu { kind, viommu });
        }
        // The reader has already refused LOG2SIZE above 19.
        let shape = QueueShape::new(log2size).map_err(|_| Invalid::SlotOutOfRange {
            kind,
            ring,
            slot: 0,
            log2size,
        })?;
        if self.rings.contains_key(&ring) {
            return Err(Invalid::Duplicate {
                kind,
                what: "ring",
                id: ring,
            });
        }
        let needed = self
            .ring_bytes
            .saturating_add(u64::from(shape.entries()) * 16);
        if needed > self.limits.max_ring_memory {
            return Err(Invalid::RingMemory {
                ring,
                needed,
                limit: self.limits.max_ring_memory,
            });
        }
        self.ring_bytes = needed;
        self.rings.insert(
            ring,
            RingState {
                viommu,
                shape,
                model: RingModel::without_history(shape),
            },
        );
        Ok(())
    }

    fn write_commands(
        &mut self,
        kind: &'static str,
        ring: u32,
        slot: u32,
        cmds: &[RawCommand],
    ) -> Result<(), Invalid> {
        let rt = self.rings.get_mut(&ring).ok_or(unknown_ring(kind, ring))?;
        slot_fits(kind, ring, rt.shape, slot)?;
        if cmds.len() > rt.shape.entries() as usize {
            return Err(Invalid::TooManyCommands {
                ring,
                count: cmds.len(),
                entries: rt.shape.entries(),
            });
        }
        for (i, c) in cmds.iter().enumerate() {
            self.opcodes[c.opcode() as usize] += 1;
            rt.model.write(rt.shape.advance(slot, i as u32), *c);
        }
        Ok(())
    }

    fn guest_fix(
        &mut self,
        kind: &'static str,
        ring: u32,
        slot: u32,
        cmd: RawCommand,
    ) -> Result<(), Invalid> {
        let rt = self.rings.get_mut(&ring).ok_or(unknown_ring(kind, ring))?;
        slot_fits(kind, ring, rt.shape, slot)?;
        let Some(stopped) = rt.model.stopped_at() else {
            return Err(Invalid::NotStopped { kind, ring });
        };
        if stopped != slot {
            return Err(Invalid::FixElsewhere {
                ring,
                slot,
                stopped,
            });
        }
        rt.model.write(slot, cmd);
        Ok(())
    }
}

/// The control plane's refusal of a record of `kind`, as the record's problem.
fn refused(kind: &'static str) -> impl Fn(vcmdq::viommu::ViommuError) -> Invalid {
    move |e| Invalid::ControlPlane {
        kind,
        why: e.to_string(),
    }
}

fn unknown_ring(kind: &'static str, ring: u32) -> Invalid {
    Invalid::UnknownRing { kind, ring }
}

/// A slot pointer must name a slot of the ring (no bits above the wrap bit).
fn slot_fits(kind: &'static str, ring: u32, shape: QueueShape, slot: u32) -> Result<(), Invalid> {
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
}
