//! Writing a trace: one method per event kind, buffered, refusing anything a reader would
//! refuse so that every file it finishes reads back.

use super::format::{
    self, outcome, BindBody, CommandsHead, DeviceAddBody, DoorbellBody, FileHeader, GuestAckBody,
    GuestFixBody, Kind, OutcomeBody, RecordPrefix, RingCreateBody, UnbindBody, ViommuCreateBody,
    HEADER_LEN, PREFIX_LEN,
};
use super::{Event, Outcome, Profile};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use vcmdq::command::RawCommand;
use vcmdq::queue::{CError, MAX_LOG2SIZE};
use vcmdq::viommu::SmmuFeatures;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::IntoBytes;

/// Header fields a writer is given and a reader returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceMeta {
    /// [`format::FLAG_SYNTHETIC`], [`format::FLAG_IMPORTED`].
    pub flags: u32,
    /// Creation time in ns since the Unix epoch, 0 when unknown or for reproducible files.
    pub created_unix_ns: u64,
}

/// Why a record was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The underlying writer failed.
    #[error("writing the trace: {0}")]
    Io(#[from] io::Error),
    /// Records must not go back in time.
    #[error("timestamp {ts} ns is before the previous record's {prev} ns")]
    TimestampBackwards {
        /// The previous record's.
        prev: u64,
        /// The one refused.
        ts: u64,
    },
    /// LOG2SIZE above 19.
    #[error("LOG2SIZE {0} is out of range: a command queue has 2^0 to 2^19 entries")]
    Log2Size(u8),
    /// SIDSIZE above 32.
    #[error("SIDSIZE {0} is above 32")]
    Sidsize(u8),
    /// An empty or oversized Commands record.
    #[error("a Commands record holds 1 to {max} commands, not {0}", max = format::MAX_COMMANDS_PER_RECORD)]
    CommandCount(usize),
    /// A refused outcome needs a CONS.ERR other than NONE.
    #[error("a refused outcome needs a CONS.ERR other than CERROR_NONE")]
    RefusedWithoutError,
    /// Header flags version 1 does not define.
    #[error("header flag bits {0:#x} are not defined")]
    Flags(u32),
}

/// Writes records to `W` through a buffer.
///
/// The header goes out first with a record count of 0 (unknown); [`TraceWriter::finish_counted`]
/// fills the count in when `W` can seek, [`TraceWriter::finish`] leaves it unknown.
pub struct TraceWriter<W: Write> {
    out: BufWriter<W>,
    records: u64,
    bytes: u64,
    last_ts: u64,
}

fn prefix(kind: Kind, body_len: usize, ts: u64) -> RecordPrefix {
    RecordPrefix {
        kind: U16::new(kind.code()),
        reserved: U16::new(0),
        len: U32::new((PREFIX_LEN + body_len) as u32),
        timestamp_ns: U64::new(ts),
    }
}

impl<W: Write> TraceWriter<W> {
    /// Starts a trace on `out` (which should be at its start) with the header `meta`.
    pub fn new(out: W, meta: TraceMeta) -> Result<TraceWriter<W>, WriteError> {
        if meta.flags & !format::KNOWN_FLAGS != 0 {
            return Err(WriteError::Flags(meta.flags & !format::KNOWN_FLAGS));
        }
        let mut out = BufWriter::with_capacity(1 << 16, out);
        let header = FileHeader {
            magic: format::MAGIC,
            version: U32::new(format::VERSION),
            flags: U32::new(meta.flags),
            record_count: U64::new(0),
            created_unix_ns: U64::new(meta.created_unix_ns),
            reserved: [0; 32],
        };
        out.write_all(header.as_bytes())?;
        Ok(TraceWriter {
            out,
            records: 0,
            bytes: HEADER_LEN as u64,
            last_ts: 0,
        })
    }

    /// Records written so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Bytes written so far, header included.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The timestamp of the last record written (0 before the first).
    pub fn last_timestamp(&self) -> u64 {
        self.last_ts
    }

    fn begin(&mut self, ts: u64) -> Result<(), WriteError> {
        if ts < self.last_ts {
            return Err(WriteError::TimestampBackwards {
                prev: self.last_ts,
                ts,
            });
        }
        Ok(())
    }

    fn emit(&mut self, kind: Kind, ts: u64, parts: &[&[u8]]) -> Result<(), WriteError> {
        let body_len: usize = parts.iter().map(|p| p.len()).sum();
        self.out.write_all(prefix(kind, body_len, ts).as_bytes())?;
        for p in parts {
            self.out.write_all(p)?;
        }
        self.last_ts = ts;
        self.records += 1;
        self.bytes += (PREFIX_LEN + body_len) as u64;
        Ok(())
    }

    /// Writes any event.
    pub fn write(&mut self, ts: u64, event: &Event<'_>) -> Result<(), WriteError> {
        match *event {
            Event::ViommuCreate {
                viommu,
                vmid,
                smmu,
                profile,
                sidsize,
                range_inv,
                features,
            } => self.viommu_create_on(
                ts, viommu, vmid, smmu, profile, sidsize, range_inv, features,
            ),
            Event::DeviceAdd { device, smmu, psid } => self.device_add(ts, device, smmu, psid),
            Event::Bind {
                viommu,
                device,
                vsid,
            } => self.bind(ts, viommu, device, vsid),
            Event::Unbind { viommu, device } => self.unbind(ts, viommu, device),
            Event::RingCreate {
                ring,
                viommu,
                log2size,
            } => self.ring_create(ts, ring, viommu, log2size),
            Event::Commands { ring, slot, cmds } => self.commands(ts, ring, slot, cmds),
            Event::Doorbell { ring, prod } => self.doorbell(ts, ring, prod),
            Event::GuestAck { ring } => self.guest_ack(ts, ring),
            Event::GuestFix { ring, slot, cmd } => self.guest_fix(ts, ring, slot, cmd),
            Event::Outcome {
                ring,
                slot,
                outcome,
            } => self.outcome(ts, ring, slot, outcome),
        }
    }

    /// `ViommuCreate`.
    #[allow(clippy::too_many_arguments)]
    pub fn viommu_create(
        &mut self,
        ts: u64,
        viommu: u32,
        vmid: u16,
        smmu: u32,
        profile: Profile,
        sidsize: u8,
        range_inv: bool,
    ) -> Result<(), WriteError> {
        let features = SmmuFeatures {
            ril: range_inv,
            ..SmmuFeatures::ANY
        };
        self.viommu_create_on(
            ts, viommu, vmid, smmu, profile, sidsize, range_inv, features,
        )
    }

    /// `ViommuCreate` on an SMMU with `features` (its `ril` is ignored: `range_inv` is RIL).
    /// Features that are `any` but for RIL are written as a trace without the field has them,
    /// so such traces stay byte for byte what they were.
    #[allow(clippy::too_many_arguments)]
    pub fn viommu_create_on(
        &mut self,
        ts: u64,
        viommu: u32,
        vmid: u16,
        smmu: u32,
        profile: Profile,
        sidsize: u8,
        range_inv: bool,
        features: SmmuFeatures,
    ) -> Result<(), WriteError> {
        self.begin(ts)?;
        if sidsize > 32 {
            return Err(WriteError::Sidsize(sidsize));
        }
        let (flag, bytes) = if features.is_any_but_ril() {
            (0, [0; 3])
        } else {
            (format::VIOMMU_SMMU_FEATURES, features.to_trace_bytes())
        };
        let body = ViommuCreateBody {
            viommu: U32::new(viommu),
            smmu: U32::new(smmu),
            vmid: U16::new(vmid),
            profile: profile.code(),
            sidsize,
            flags: flag
                | if range_inv {
                    format::VIOMMU_RANGE_INV
                } else {
                    0
                },
            features: bytes,
        };
        self.emit(Kind::ViommuCreate, ts, &[body.as_bytes()])
    }

    /// `DeviceAdd`.
    pub fn device_add(
        &mut self,
        ts: u64,
        device: u32,
        smmu: u32,
        psid: u32,
    ) -> Result<(), WriteError> {
        self.begin(ts)?;
        let body = DeviceAddBody {
            device: U32::new(device),
            smmu: U32::new(smmu),
            psid: U32::new(psid),
            reserved: U32::new(0),
        };
        self.emit(Kind::DeviceAdd, ts, &[body.as_bytes()])
    }

    /// `Bind` (set_dev_id).
    pub fn bind(&mut self, ts: u64, viommu: u32, device: u32, vsid: u32) -> Result<(), WriteError> {
        self.begin(ts)?;
        let body = BindBody {
            viommu: U32::new(viommu),
            device: U32::new(device),
            vsid: U32::new(vsid),
            reserved: U32::new(0),
        };
        self.emit(Kind::Bind, ts, &[body.as_bytes()])
    }

    /// `Unbind` (unset_dev_id).
    pub fn unbind(&mut self, ts: u64, viommu: u32, device: u32) -> Result<(), WriteError> {
        self.begin(ts)?;
        let body = UnbindBody {
            viommu: U32::new(viommu),
            device: U32::new(device),
        };
        self.emit(Kind::Unbind, ts, &[body.as_bytes()])
    }

    /// `RingCreate`.
    pub fn ring_create(
        &mut self,
        ts: u64,
        ring: u32,
        viommu: u32,
        log2size: u8,
    ) -> Result<(), WriteError> {
        self.begin(ts)?;
        if log2size > MAX_LOG2SIZE {
            return Err(WriteError::Log2Size(log2size));
        }
        let body = RingCreateBody {
            ring: U32::new(ring),
            viommu: U32::new(viommu),
            log2size,
            reserved: [0; 7],
        };
        self.emit(Kind::RingCreate, ts, &[body.as_bytes()])
    }

    /// `Commands`: `cmds` written from slot pointer `slot`.
    pub fn commands(
        &mut self,
        ts: u64,
        ring: u32,
        slot: u32,
        cmds: &[RawCommand],
    ) -> Result<(), WriteError> {
        self.begin(ts)?;
        if cmds.is_empty() || cmds.len() > format::MAX_COMMANDS_PER_RECORD as usize {
            return Err(WriteError::CommandCount(cmds.len()));
        }
        let head = CommandsHead {
            ring: U32::new(ring),
            slot: U32::new(slot),
            count: U32::new(cmds.len() as u32),
            reserved: U32::new(0),
        };
        self.emit(Kind::Commands, ts, &[head.as_bytes(), cmds.as_bytes()])
    }

    /// `Doorbell`: PROD written with `prod`.
    pub fn doorbell(&mut self, ts: u64, ring: u32, prod: u32) -> Result<(), WriteError> {
        self.begin(ts)?;
        let body = DoorbellBody {
            ring: U32::new(ring),
            prod: U32::new(prod),
        };
        self.emit(Kind::Doorbell, ts, &[body.as_bytes()])
    }

    /// `GuestAck`.
    pub fn guest_ack(&mut self, ts: u64, ring: u32) -> Result<(), WriteError> {
        self.begin(ts)?;
        let body = GuestAckBody {
            ring: U32::new(ring),
            reserved: U32::new(0),
        };
        self.emit(Kind::GuestAck, ts, &[body.as_bytes()])
    }

    /// `GuestFix`: slot pointer `slot` rewritten with `cmd`.
    pub fn guest_fix(
        &mut self,
        ts: u64,
        ring: u32,
        slot: u32,
        cmd: RawCommand,
    ) -> Result<(), WriteError> {
        self.begin(ts)?;
        let body = GuestFixBody {
            ring: U32::new(ring),
            slot: U32::new(slot),
            cmd,
        };
        self.emit(Kind::GuestFix, ts, &[body.as_bytes()])
    }

    /// `Outcome`.
    pub fn outcome(
        &mut self,
        ts: u64,
        ring: u32,
        slot: u32,
        what: Outcome,
    ) -> Result<(), WriteError> {
        self.begin(ts)?;
        let (code, cerror, out) = match what {
            Outcome::Forwarded(c) => (outcome::FORWARDED, 0, c),
            Outcome::Refused(CError::None) => return Err(WriteError::RefusedWithoutError),
            Outcome::Refused(e) => (outcome::REFUSED, e.code(), RawCommand::default()),
            Outcome::Trapped => (outcome::TRAPPED, 0, RawCommand::default()),
            Outcome::Dropped => (outcome::DROPPED, 0, RawCommand::default()),
        };
        let body = OutcomeBody {
            ring: U32::new(ring),
            slot: U32::new(slot),
            outcome: code,
            cerror,
            reserved: [0; 6],
            out,
        };
        self.emit(Kind::Outcome, ts, &[body.as_bytes()])
    }

    /// Flushes and returns `W`; the header's record count stays 0 (unknown).
    pub fn finish(self) -> Result<W, WriteError> {
        self.out
            .into_inner()
            .map_err(|e| WriteError::Io(e.into_error()))
    }
}

impl<W: Write + Seek> TraceWriter<W> {
    /// Flushes, writes the record count into the header, and returns `W` positioned at the end.
    pub fn finish_counted(self) -> Result<W, WriteError> {
        let (records, bytes) = (self.records, self.bytes);
        let mut w = self.finish()?;
        let end = w.stream_position()?;
        let start = end.checked_sub(bytes).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the writer moved under the trace",
            )
        })?;
        // record_count sits at header offset 16.
        w.seek(SeekFrom::Start(start + 16))?;
        w.write_all(&records.to_le_bytes())?;
        w.seek(SeekFrom::Start(end))?;
        w.flush()?;
        Ok(w)
    }
}

/// Writes `events` with their timestamps into a counted trace in memory.
pub fn to_vec<'a>(
    meta: TraceMeta,
    events: impl IntoIterator<Item = (u64, Event<'a>)>,
) -> Result<Vec<u8>, WriteError> {
    let mut w = TraceWriter::new(io::Cursor::new(Vec::new()), meta)?;
    for (ts, e) in events {
        w.write(ts, &e)?;
    }
    Ok(w.finish_counted()?.into_inner())
}
