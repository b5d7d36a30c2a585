//! Reading a trace in place: the file is mapped, the header checked, and records are viewed one
//! by one over the mapping with zerocopy, so iterating a trace copies nothing but the few fixed
//! fields of each record.

use super::format::{
    self, outcome, BindBody, CommandsHead, DeviceAddBody, DoorbellBody, FileHeader, GuestAckBody,
    GuestFixBody, Kind, OutcomeBody, RecordPrefix, RingCreateBody, UnbindBody, ViommuCreateBody,
    HEADER_LEN, PREFIX_LEN,
};
use super::{Event, Malformed, Outcome, Profile, Record, TraceError, TraceMeta};
use std::path::Path;
use vcmdq::command::RawCommand;
use vcmdq::queue::{CError, MAX_LOG2SIZE};
use vcmdq::viommu::SmmuFeatures;
use zerocopy::FromBytes;

enum Data {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

/// A trace file held in memory: mapped read-only, or bytes handed over.
pub struct TraceFile {
    name: String,
    data: Data,
}

impl TraceFile {
    /// Maps the file at `path` read-only. Nothing is parsed yet: see [`TraceFile::trace`].
    pub fn open(path: impl AsRef<Path>) -> Result<TraceFile, TraceError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let io = |source| TraceError::Io {
            path: name.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len == 0 {
            // Nothing to map; an empty mapping is refused by some platforms.
            return Ok(TraceFile {
                name,
                data: Data::Owned(Vec::new()),
            });
        }
        // SAFETY: memmap2 requires that the file is not modified or truncated while mapped,
        // in or out of process. Trace files are written once (by `vcmdq gen`, `trace build`,
        // `trace import-qemu` or a capture that has finished) and only read afterwards; nothing
        // in vcmdq writes a trace it is reading. If someone does rewrite the file underneath
        // us anyway, every byte is still read through bounds-checked safe code, so the worst
        // outcome is a parse error or a SIGBUS on truncation, not a wrong read past the map.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Ok(TraceFile {
            name,
            data: Data::Mapped(map),
        })
    }

    /// A trace from bytes already in memory, named `name` in error messages.
    pub fn from_bytes(name: impl Into<String>, bytes: Vec<u8>) -> TraceFile {
        TraceFile {
            name: name.into(),
            data: Data::Owned(bytes),
        }
    }

    /// The name errors use (the path, for an opened file).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            Data::Mapped(m) => m,
            Data::Owned(v) => v,
        }
    }

    /// Checks the header and returns the trace, whose records are then read one by one.
    pub fn trace(&self) -> Result<Trace<'_>, TraceError> {
        Trace::parse_named(self.bytes(), Some(&self.name))
    }
}

/// A trace over bytes whose header has been checked.
#[derive(Clone, Copy)]
pub struct Trace<'a> {
    bytes: &'a [u8],
    name: Option<&'a str>,
    header: &'a FileHeader,
}

impl core::fmt::Debug for Trace<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Not the bytes: a trace can be hundreds of megabytes.
        f.debug_struct("Trace")
            .field("name", &self.name)
            .field("len", &self.bytes.len())
            .field("header", self.header)
            .finish()
    }
}

impl<'a> Trace<'a> {
    /// Checks the header of `bytes`.
    pub fn parse(bytes: &'a [u8]) -> Result<Trace<'a>, TraceError> {
        Trace::parse_named(bytes, None)
    }

    /// Checks the header of `bytes`, naming them `name` in errors.
    pub fn parse_named(bytes: &'a [u8], name: Option<&'a str>) -> Result<Trace<'a>, TraceError> {
        let err = |offset: usize, problem| TraceError::Malformed {
            path: name.map(str::to_string),
            offset: offset as u64,
            problem,
        };
        let Ok((header, _)) = FileHeader::ref_from_prefix(bytes) else {
            return Err(err(
                0,
                Malformed::TruncatedHeader {
                    len: bytes.len() as u64,
                },
            ));
        };
        if header.magic != format::MAGIC {
            return Err(err(
                0,
                Malformed::BadMagic {
                    found: header.magic,
                },
            ));
        }
        let version = header.version.get();
        if version != format::VERSION {
            return Err(err(8, Malformed::UnknownVersion { version }));
        }
        let bits = header.flags.get() & !format::KNOWN_FLAGS;
        if bits != 0 {
            return Err(err(12, Malformed::ReservedFlags { bits }));
        }
        if header.reserved.iter().any(|&b| b != 0) {
            return Err(err(
                32,
                Malformed::ReservedNonZero {
                    what: "header bytes 32..64",
                },
            ));
        }
        Ok(Trace {
            bytes,
            name,
            header,
        })
    }

    /// Header fields: flags, creation time, declared record count.
    pub fn meta(&self) -> TraceMeta {
        TraceMeta {
            flags: self.header.flags.get(),
            created_unix_ns: self.header.created_unix_ns.get(),
        }
    }

    /// The header's record count; `None` when it says 0 (unknown).
    pub fn declared_records(&self) -> Option<u64> {
        match self.header.record_count.get() {
            0 => None,
            n => Some(n),
        }
    }

    /// Bytes in the file.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True when the file is only a header.
    pub fn is_empty(&self) -> bool {
        self.bytes.len() <= HEADER_LEN
    }

    /// The name errors use, if any.
    pub fn name(&self) -> Option<&'a str> {
        self.name
    }

    /// The records, in file order. The iterator yields an error at the first defect and then
    /// ends; a trace that iterates without error is well formed.
    pub fn records(&self) -> Records<'a> {
        Records {
            trace: *self,
            offset: HEADER_LEN,
            prev_ts: 0,
            count: 0,
            done: false,
        }
    }

    pub(super) fn error(&self, offset: u64, problem: Malformed) -> TraceError {
        TraceError::Malformed {
            path: self.name.map(str::to_string),
            offset,
            problem,
        }
    }
}

/// Iterator over the records of a [`Trace`].
#[derive(Clone, Debug)]
pub struct Records<'a> {
    trace: Trace<'a>,
    offset: usize,
    prev_ts: u64,
    count: u64,
    done: bool,
}

impl<'a> Records<'a> {
    /// Byte offset of the next record.
    pub fn offset(&self) -> u64 {
        self.offset as u64
    }

    fn step(&mut self) -> Result<Option<Record<'a>>, TraceError> {
        let bytes = self.trace.bytes;
        let off = self.offset;
        let rest = &bytes[off.min(bytes.len())..];
        if rest.is_empty() {
            if let Some(header) = self.trace.declared_records() {
                if header != self.count {
                    return Err(self.trace.error(
                        off as u64,
                        Malformed::RecordCount {
                            header,
                            found: self.count,
                        },
                    ));
                }
            }
            return Ok(None);
        }
        let err = |problem| self.trace.error(off as u64, problem);
        let Ok((prefix, _)) = RecordPrefix::ref_from_prefix(rest) else {
            return Err(err(Malformed::TruncatedPrefix {
                remaining: rest.len() as u64,
            }));
        };
        let (kind, len) = (prefix.kind.get(), prefix.len.get());
        if (len as usize) < PREFIX_LEN || len % 8 != 0 {
            return Err(err(Malformed::BadLength { kind, len }));
        }
        if len as usize > rest.len() {
            return Err(err(Malformed::RecordOverrun {
                kind,
                len,
                remaining: rest.len() as u64,
            }));
        }
        if prefix.reserved.get() != 0 {
            return Err(err(Malformed::ReservedNonZero {
                what: "record prefix bytes 2..4",
            }));
        }
        let kind = Kind::from_code(kind).ok_or_else(|| err(Malformed::UnknownKind { kind }))?;
        let ts = prefix.timestamp_ns.get();
        if ts < self.prev_ts {
            return Err(err(Malformed::TimestampBackwards {
                prev: self.prev_ts,
                ts,
            }));
        }
        let body = &rest[PREFIX_LEN..len as usize];
        let event = parse_body(kind, len, body).map_err(err)?;
        self.offset = off + len as usize;
        self.prev_ts = ts;
        self.count += 1;
        Ok(Some(Record {
            offset: off as u64,
            timestamp_ns: ts,
            event,
        }))
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.step() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

impl core::iter::FusedIterator for Records<'_> {}

/// Views `body` as the fixed body `T`, refusing any other length.
fn fixed<T: FromBytes + zerocopy::KnownLayout + zerocopy::Immutable>(
    kind: Kind,
    len: u32,
    body: &[u8],
) -> Result<&T, Malformed> {
    T::ref_from_bytes(body).map_err(|_| Malformed::WrongLength {
        kind,
        len,
        expected: PREFIX_LEN + kind.body_len(),
    })
}

fn zero_u32(v: zerocopy::little_endian::U32, what: &'static str) -> Result<(), Malformed> {
    if v.get() != 0 {
        return Err(Malformed::ReservedNonZero { what });
    }
    Ok(())
}

fn zero_bytes(v: &[u8], what: &'static str) -> Result<(), Malformed> {
    if v.iter().any(|&b| b != 0) {
        return Err(Malformed::ReservedNonZero { what });
    }
    Ok(())
}

/// The event of a record of `kind` and total length `len`, from its body.
fn parse_body(kind: Kind, len: u32, body: &[u8]) -> Result<Event<'_>, Malformed> {
    match kind {
        Kind::ViommuCreate => parse_viommu_create(kind, len, body),
        Kind::DeviceAdd => parse_device_add(kind, len, body),
        Kind::Bind => parse_bind(kind, len, body),
        Kind::Unbind => parse_unbind(kind, len, body),
        Kind::RingCreate => parse_ring_create(kind, len, body),
        Kind::Commands => parse_commands(kind, len, body),
        Kind::Doorbell => parse_doorbell(kind, len, body),
        Kind::GuestAck => parse_guest_ack(kind, len, body),
        Kind::GuestFix => parse_guest_fix(kind, len, body),
        Kind::Outcome => parse_outcome(kind, len, body),
    }
}

fn parse_viommu_create(kind: Kind, len: u32, body: &[u8]) -> Result<Event<'_>, Malformed> {
    let b: &ViommuCreateBody = fixed(kind, len, body)?;
    let profile = Profile::from_code(b.profile).ok_or(Malformed::BadProfile(b.profile))?;
    if b.sidsize > 32 {
        return Err(Malformed::BadSidsize(b.sidsize));
    }
    if b.flags & !(format::VIOMMU_RANGE_INV | format::VIOMMU_SMMU_FEATURES) != 0 {
        return Err(Malformed::BadViommuFlags(b.flags));
    }
    let range_inv = b.flags & format::VIOMMU_RANGE_INV != 0;
    let features = if b.flags & format::VIOMMU_SMMU_FEATURES != 0 {
        SmmuFeatures::from_trace_bytes(b.features, range_inv).map_err(Malformed::BadSmmuFeatures)?
    } else {
        zero_bytes(&b.features, "ViommuCreate bytes 13..16 without flag bit 1")?;
        SmmuFeatures {
            ril: range_inv,
            ..SmmuFeatures::ANY
        }
    };
    Ok(Event::ViommuCreate {
        viommu: b.viommu.get(),
        vmid: b.vmid.get(),
        smmu: b.smmu.get(),
        profile,
        sidsize: b.sidsize,
        range_inv,
        features,
    })
}

fn parse_device_add(kind: Kind, len: u32, body: &[u8]) -> Result<Event<'_>, Malformed> {
    let b: &DeviceAddBody = fixed(kind, len, body)?;
    zero_u32(b.reserved, "DeviceAdd reserved word")?;
    Ok(Event::DeviceAdd {
        device: b.device.get(),
        smmu: b.smmu.get(),
        psid: b.psid.get(),
    })
}

fn parse_bind(kind: Kind, len: u32, body: &[u8]) -> Result<Event<'_>, Malformed> {
    let b: &BindBody = fixed(kind, len, body)?;
    zero_u32(b.reserved, "Bind reserved word")?;
    Ok(Event::Bind {
        viommu: b.viommu.get(),
        device: b.device.get(),
        vsid: b.vsid.get(),
    })
}

fn parse_unbind(kind: Kind, len: u32, body: &[u8]) -> Result<Event<'_>, Malformed> {
    let b: &UnbindBody = fixed(kind, len, body)?;
    Ok(Event::Unbind {
        viommu: b.viommu.get(),
        device: b.device.get(),
    })
}

fn parse_ring_create(kind: Kind, len: u32, body: &[u8]) -> Result<Event<'_>, Malformed> {
    let b: &RingCreateBody = fixed(kind, len, body)?;
    if b.log2size > MAX_LOG2SIZE {
        return Err(Malformed::BadLog2Size(b.log2size));
    }
    zero_bytes(&b.reserved, "RingCreate bytes 9..16")?;
    Ok(Event::RingCreate {
        ring: b.ring.get(),
        viommu: b.viommu.get(),
        log2size: b.log2size,
    })
}

/// The commands are viewed in place: a record of a million commands costs no copy.
fn parse_commands(kind: Kind, len: u32, body: &[u8]) -> Result<Event<'_>, Malformed> {
    let Ok((head, payload)) = CommandsHead::ref_from_prefix(body) else {
        return Err(Malformed::WrongLength {
            kind,
            len,
            expected: PREFIX_LEN + kind.body_len() + RawCommand::SIZE,
        });
    };
    zero_u32(head.reserved, "Commands reserved word")?;
    let count = head.count.get();
    if count == 0 {
        return Err(Malformed::EmptyCommands);
    }
    let need = u64::from(count) * RawCommand::SIZE as u64;
    let have = payload.len() as u64;
    if need > have {
        return Err(Malformed::CommandsOverrun {
            count,
            available: have,
        });
    }
    if need < have {
        return Err(Malformed::CommandsTrailing {
            count,
            extra: have - need,
        });
    }
    let cmds = <[RawCommand]>::ref_from_bytes(payload).map_err(|_| Malformed::CommandsOverrun {
        count,
        available: have,
    })?;
    Ok(Event::Commands {
        ring: head.ring.get(),
        slot: head.slot.get(),
        cmds,
    })
}

fn parse_doorbell(kind: Kind, len: u32, body: &[u8]) -> Result<Event<'_>, Malformed> {
    let b: &DoorbellBody = fixed(kind, len, body)?;
    Ok(Event::Doorbell {
        ring: b.ring.get(),
        prod: b.prod.get(),
    })
}

fn parse_guest_ack(kind: Kind, len: u32, body: &[u8]) -> Result<Event<'_>, Malformed> {
    let b: &GuestAckBody = fixed(kind, len, body)?;
    zero_u32(b.reserved, "GuestAck reserved word")?;
    Ok(Event::GuestAck { ring: b.ring.get() })
}

fn parse_guest_fix(kind: Kind, len: u32, body: &[u8]) -> Result<Event<'_>, Malformed> {
    let b: &GuestFixBody = fixed(kind, len, body)?;
    Ok(Event::GuestFix {
        ring: b.ring.get(),
        slot: b.slot.get(),
        cmd: b.cmd,
    })
}

/// Each outcome carries only its own fields; the others must be zero.
fn parse_outcome(kind: Kind, len: u32, body: &[u8]) -> Result<Event<'_>, Malformed> {
    let b: &OutcomeBody = fixed(kind, len, body)?;
    zero_bytes(&b.reserved, "Outcome bytes 10..16")?;
    let no_cerror = || {
        if b.cerror != 0 {
            return Err(Malformed::ReservedNonZero {
                what: "Outcome CONS.ERR unless refused",
            });
        }
        Ok(())
    };
    let no_out = || {
        if b.out != RawCommand::default() {
            return Err(Malformed::ReservedNonZero {
                what: "Outcome command unless forwarded",
            });
        }
        Ok(())
    };
    let outcome = match b.outcome {
        outcome::FORWARDED => {
            no_cerror()?;
            Outcome::Forwarded(b.out)
        }
        outcome::REFUSED => {
            no_out()?;
            match CError::from_code(b.cerror) {
                Some(CError::None) | None => return Err(Malformed::BadCerror(b.cerror)),
                Some(e) => Outcome::Refused(e),
            }
        }
        outcome::TRAPPED => {
            no_cerror()?;
            no_out()?;
            Outcome::Trapped
        }
        outcome::DROPPED => {
            no_cerror()?;
            no_out()?;
            Outcome::Dropped
        }
        other => return Err(Malformed::BadOutcome(other)),
    };
    Ok(Event::Outcome {
        ring: b.ring.get(),
        slot: b.slot.get(),
        outcome,
    })
}
