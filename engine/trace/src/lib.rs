//! Trace files: what guests and the host did, event by event, so a run can be replayed exactly.
//!
//! A trace is a versioned binary file (`traces/FORMAT.md` specifies it byte by byte): a header,
//! then timestamped records: a vIOMMU created, a host device added, a device bound to or unbound
//! from a vSID, a guest ring created, commands written into a ring, a doorbell (PROD written), the
//! guest acknowledging or fixing an error, and, when recorded, what a reference consumer did.
//!
//! - [`TraceFile::open`] maps a file; [`Trace::records`] walks it without copying, yielding
//!   [`Record`]s whose [`Event::Commands`] borrow their 16-byte commands from the mapping. Every
//!   defect of the bytes is a [`TraceError`] with the file offset and what is wrong; nothing
//!   panics on any input.
//! - [`validate`] checks references (a ring that was never created, a slot beyond the ring) and
//!   counts what the trace holds.
//! - [`TraceWriter`] writes records; [`text`] turns a trace into one line per event and back;
//!   [`gen`] makes workloads modelled on real guests; [`qemu`] imports a QEMU `smmuv3_*` log.
//! - [`capture_to_file`] is the engine's capture sink that writes a trace; [`json`] is the JSON
//!   form of a command; [`ring_model`] is the sequential model of one guest ring.

mod capture;
pub mod format;
pub mod gen;
pub mod json;
pub mod qemu;
mod reader;
pub mod ring_model;
pub mod text;
mod validate;
mod writer;

pub use capture::capture_to_file;
pub use format::Kind;
pub use reader::{Records, Trace, TraceFile};
pub use validate::{validate, validate_with, Invalid, Limits, Summary, DEFAULT_MAX_RING_MEMORY};
pub use writer::{to_vec, TraceMeta, TraceWriter, WriteError};

use vcmdq::command::RawCommand;
use vcmdq::queue::CError;

/// The policy a vIOMMU applies to its guest's commands (see `docs/rules.md`, "Policy profiles"):
/// the engine's own type, whose [`Profile::code`] is the byte a ViommuCreate record carries.
pub use vcmdq::viommu::Profile;

/// What a reference consumer did with one guest command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The physical queue received this command.
    Forwarded(RawCommand),
    /// The ring stopped at the command with this CONS.ERR (never [`CError::None`]).
    Refused(CError),
    /// Handed to the control plane.
    Trapped,
    /// Dropped by rule.
    Dropped,
}

/// One event of a trace. Commands are borrowed from the trace's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event<'a> {
    /// The host created a vIOMMU: one VM's view of one physical SMMU.
    ViommuCreate {
        /// The trace's id for it.
        viommu: u32,
        /// The VM's VMID on the SMMU; the engine writes it into every TLBI it forwards.
        vmid: u16,
        /// The physical SMMU.
        smmu: u32,
        /// Its policy.
        profile: Profile,
        /// vSIDs are below 2^sidsize (0..=32).
        sidsize: u8,
        /// Range invalidation (TG/NUM/SCALE) is advertised to the guest.
        range_inv: bool,
        /// The rest of the physical SMMU's features ([`vcmdq::viommu::SmmuFeatures::ANY`] in a trace that does
        /// not record them); its `ril` is `range_inv`.
        features: vcmdq::viommu::SmmuFeatures,
    },
    /// A host device behind a physical SMMU, with its physical StreamID.
    DeviceAdd {
        /// The trace's id for it.
        device: u32,
        /// The SMMU it sits behind.
        smmu: u32,
        /// Its pSID.
        psid: u32,
    },
    /// set_dev_id: the device is the guest's `vsid` in the vIOMMU.
    Bind {
        /// The vIOMMU.
        viommu: u32,
        /// The device.
        device: u32,
        /// The guest's vSID for it.
        vsid: u32,
    },
    /// unset_dev_id: the device's binding is gone.
    Unbind {
        /// The vIOMMU.
        viommu: u32,
        /// The device.
        device: u32,
    },
    /// A guest command ring of 2^log2size entries, PROD = CONS = 0.
    RingCreate {
        /// The trace's id for it.
        ring: u32,
        /// The vIOMMU whose guest writes it.
        viommu: u32,
        /// LOG2SIZE, 0..=19.
        log2size: u8,
    },
    /// The guest wrote `cmds` into consecutive slots starting at pointer `slot`.
    Commands {
        /// The ring.
        ring: u32,
        /// Pointer (index and wrap bit) of the first slot.
        slot: u32,
        /// The commands, never empty.
        cmds: &'a [RawCommand],
    },
    /// The guest wrote `prod` to the ring's PROD.
    Doorbell {
        /// The ring.
        ring: u32,
        /// The whole value written.
        prod: u32,
    },
    /// The guest saw the ring stopped with CONS.ERR and acknowledged it.
    GuestAck {
        /// The ring.
        ring: u32,
    },
    /// The guest saw the ring stopped at `slot` and rewrote that slot.
    GuestFix {
        /// The ring.
        ring: u32,
        /// Pointer of the slot.
        slot: u32,
        /// What it wrote.
        cmd: RawCommand,
    },
    /// What a reference consumer did with the command at `slot`.
    Outcome {
        /// The ring.
        ring: u32,
        /// Pointer of the slot.
        slot: u32,
        /// What happened.
        outcome: Outcome,
    },
}

impl Event<'_> {
    /// The vIOMMU a ViommuCreate asks for, as the engine is configured with it: `None` for any
    /// other event. A trace carries no limits and no VMID sharing, so those keep their defaults.
    pub fn viommu_config(&self) -> Option<vcmdq::viommu::ViommuConfig> {
        let Event::ViommuCreate {
            viommu,
            vmid,
            smmu,
            profile,
            sidsize,
            range_inv,
            features,
        } = *self
        else {
            return None;
        };
        Some(vcmdq::viommu::ViommuConfig {
            id: viommu,
            vmid,
            smmu,
            profile,
            sidsize,
            range_inv,
            features,
            ..Default::default()
        })
    }

    /// The record kind that carries this event.
    pub fn kind(&self) -> Kind {
        match self {
            Event::ViommuCreate { .. } => Kind::ViommuCreate,
            Event::DeviceAdd { .. } => Kind::DeviceAdd,
            Event::Bind { .. } => Kind::Bind,
            Event::Unbind { .. } => Kind::Unbind,
            Event::RingCreate { .. } => Kind::RingCreate,
            Event::Commands { .. } => Kind::Commands,
            Event::Doorbell { .. } => Kind::Doorbell,
            Event::GuestAck { .. } => Kind::GuestAck,
            Event::GuestFix { .. } => Kind::GuestFix,
            Event::Outcome { .. } => Kind::Outcome,
        }
    }
}

/// One record: an event, when it happened, and where it sits in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Record<'a> {
    /// Byte offset of the record's prefix in the file.
    pub offset: u64,
    /// When it happened, in nanoseconds.
    pub timestamp_ns: u64,
    /// What happened.
    pub event: Event<'a>,
}

/// What is wrong with the bytes of a trace.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Fewer bytes than a header.
    #[error("the file is {len} bytes, shorter than the {HEADER_LEN}-byte header", HEADER_LEN = format::HEADER_LEN)]
    TruncatedHeader {
        /// Bytes in the file.
        len: u64,
    },
    /// The first eight bytes are not `VCMDQTRC`.
    #[error("bad magic {}: not a vcmdq trace (expected \"VCMDQTRC\")", show_magic(.found))]
    BadMagic {
        /// The bytes found.
        found: [u8; 8],
    },
    /// A version this build does not read.
    #[error(
        "unknown version {version}; this build reads version {}",
        format::VERSION
    )]
    UnknownVersion {
        /// The version found.
        version: u32,
    },
    /// Header flag bits version 1 does not define.
    #[error("reserved header flag bits {bits:#x} are set")]
    ReservedFlags {
        /// The undefined bits that are set.
        bits: u32,
    },
    /// A reserved field is not zero.
    #[error("{what} must be zero")]
    ReservedNonZero {
        /// Which field.
        what: &'static str,
    },
    /// The file ends in the middle of a record prefix.
    #[error("{remaining} bytes left at the end of the file, too few for a 16-byte record prefix")]
    TruncatedPrefix {
        /// Bytes left.
        remaining: u64,
    },
    /// A record length below 16 or not a multiple of 8.
    #[error("{} record has length {len}; a length is a multiple of 8, at least 16", kind_label(*.kind))]
    BadLength {
        /// The kind code.
        kind: u16,
        /// The length found.
        len: u32,
    },
    /// A record longer than what is left of the file.
    #[error("{} record claims {len} bytes but only {remaining} remain in the file", kind_label(*.kind))]
    RecordOverrun {
        /// The kind code.
        kind: u16,
        /// The length claimed.
        len: u32,
        /// Bytes from the record's start to the end of the file.
        remaining: u64,
    },
    /// A kind version 1 does not define.
    #[error("unknown record kind {kind}; version 1 defines kinds 1 to 10 and skips none")]
    UnknownKind {
        /// The kind code.
        kind: u16,
    },
    /// A fixed-size record of the wrong length.
    #[error("{} record is {len} bytes; it must be {expected}", .kind.name())]
    WrongLength {
        /// The kind.
        kind: Kind,
        /// The length found.
        len: u32,
        /// The length of that kind.
        expected: usize,
    },
    /// A Commands record whose count needs more bytes than the record has.
    #[error("Commands record claims {count} commands but only {available} bytes remain for them")]
    CommandsOverrun {
        /// The count claimed.
        count: u32,
        /// Bytes of the record after its head.
        available: u64,
    },
    /// A Commands record longer than its commands.
    #[error("Commands record has {extra} bytes after its {count} commands")]
    CommandsTrailing {
        /// The count.
        count: u32,
        /// Bytes left over.
        extra: u64,
    },
    /// A Commands record with count 0.
    #[error("Commands record with no commands")]
    EmptyCommands,
    /// A profile code that is not defined.
    #[error("unknown profile {0}; 0 is kernel, 1 is tegra241")]
    BadProfile(u8),
    /// SIDSIZE above 32.
    #[error("SIDSIZE {0} is above 32")]
    BadSidsize(u8),
    /// ViommuCreate flags other than bits 0 and 1.
    #[error(
        "ViommuCreate flags {0:#x}: only bit 0 (range invalidation) and bit 1 (SMMU features) \
         are defined"
    )]
    BadViommuFlags(u8),
    /// ViommuCreate SMMU features the format does not allow.
    #[error("ViommuCreate SMMU features: {0}")]
    BadSmmuFeatures(vcmdq::viommu::SmmuError),
    /// LOG2SIZE above 19.
    #[error("LOG2SIZE {0} is out of range: a command queue has 2^0 to 2^19 entries")]
    BadLog2Size(u8),
    /// An outcome code that is not defined.
    #[error("unknown outcome {0}; 0 forwarded, 1 refused, 2 trapped, 3 dropped")]
    BadOutcome(u8),
    /// A refused outcome without a defined CONS.ERR code.
    #[error("refused outcome with CONS.ERR code {0}; it must be 1 to 4")]
    BadCerror(u8),
    /// A timestamp earlier than the previous record's.
    #[error("timestamp {ts} ns is before the previous record's {prev} ns")]
    TimestampBackwards {
        /// The previous record's timestamp.
        prev: u64,
        /// This record's.
        ts: u64,
    },
    /// The header's record count disagrees with the records present.
    #[error("the header says {header} records but the file holds {found}")]
    RecordCount {
        /// The header's count.
        header: u64,
        /// Records read.
        found: u64,
    },
}

fn show_magic(m: &[u8; 8]) -> String {
    m.iter()
        .map(|&b| {
            if b.is_ascii_graphic() {
                (b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect::<String>()
}

fn kind_label(code: u16) -> String {
    match Kind::from_code(code) {
        Some(k) => k.name().to_string(),
        None => format!("kind-{code}"),
    }
}

fn at(path: &Option<String>) -> String {
    match path {
        Some(p) => format!("{p}: "),
        None => String::new(),
    }
}

/// A trace that cannot be read or used: I/O, malformed bytes, or dangling references.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The bytes are not a well-formed trace.
    #[error("{}offset {offset}: {problem}", at(.path))]
    Malformed {
        /// The file, when known.
        path: Option<String>,
        /// Byte offset of the header field or record at fault.
        offset: u64,
        /// What is wrong.
        problem: Malformed,
    },
    /// Well-formed records that refer to things that do not exist, or that the engine's control
    /// plane or the oracle's model of the rings refuses (see [`validate`]).
    #[error("{}record {record} at offset {offset}: {problem}", at(.path))]
    Invalid {
        /// The file, when known.
        path: Option<String>,
        /// 0-based index of the record at fault.
        record: u64,
        /// Byte offset of the record at fault.
        offset: u64,
        /// What is wrong.
        problem: Invalid,
    },
}

impl TraceError {
    /// The byte offset the error is about, if it is about the bytes.
    pub fn offset(&self) -> Option<u64> {
        match self {
            TraceError::Io { .. } => None,
            TraceError::Malformed { offset, .. } | TraceError::Invalid { offset, .. } => {
                Some(*offset)
            }
        }
    }

    /// The defect, if the bytes are malformed.
    pub fn malformed(&self) -> Option<&Malformed> {
        match self {
            TraceError::Malformed { problem, .. } => Some(problem),
            _ => None,
        }
    }

    /// The dangling reference, if the records are inconsistent.
    pub fn invalid(&self) -> Option<&Invalid> {
        match self {
            TraceError::Invalid { problem, .. } => Some(problem),
            _ => None,
        }
    }
}
