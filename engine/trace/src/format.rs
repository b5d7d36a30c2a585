//! The bytes of a trace file, as zerocopy structs: a 64-byte header, then records, each a 16-byte
//! prefix and a body whose layout the prefix's kind names. `traces/FORMAT.md` is the same
//! specification in prose; the size assertions below keep the two honest.
//!
//! Every multi-byte integer is little-endian and every struct has alignment 1, so a record can be
//! viewed in place at any offset of a mapped file without copying.

use vcmdq::command::RawCommand;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The first eight bytes of every trace file.
pub const MAGIC: [u8; 8] = *b"VCMDQTRC";

/// The format version this code reads and writes.
pub const VERSION: u32 = 1;

/// Header flag: the trace was made by a generator (`vcmdq gen`), not captured.
pub const FLAG_SYNTHETIC: u32 = 1 << 0;
/// Header flag: the trace was converted from another tool's log (e.g. QEMU's), so some fields are
/// reconstructed rather than recorded.
pub const FLAG_IMPORTED: u32 = 1 << 1;
/// Header flag: the guests that made this trace waited for each of their CMD_SYNCs to complete
/// before writing what follows it (a capture of a real driver, e.g. Linux's arm-smmu-v3 under
/// QEMU): `vcmdq replay` replays it closed-loop unless told otherwise. Traces without it (every
/// trace written before it existed) replay open-loop, as before.
pub const FLAG_GUEST_WAITS_SYNC: u32 = 1 << 2;
/// Every header flag version 1 defines; the others are reserved and must be zero.
pub const KNOWN_FLAGS: u32 = FLAG_SYNTHETIC | FLAG_IMPORTED | FLAG_GUEST_WAITS_SYNC;

/// The file header, at offset 0.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FileHeader {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`VERSION`].
    pub version: U32,
    /// [`FLAG_SYNTHETIC`], [`FLAG_IMPORTED`], [`FLAG_GUEST_WAITS_SYNC`]; other bits zero.
    pub flags: U32,
    /// Records that follow, or 0 when unknown (a capture that was cut short).
    pub record_count: U64,
    /// When the trace was made, in nanoseconds since the Unix epoch; 0 when unknown or when the
    /// file must be reproducible byte for byte (generated traces).
    pub created_unix_ns: U64,
    /// Zero.
    pub reserved: [u8; 32],
}

/// Bytes in [`FileHeader`].
pub const HEADER_LEN: usize = 64;
const _: () = assert!(core::mem::size_of::<FileHeader>() == HEADER_LEN);

/// The start of every record.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RecordPrefix {
    /// What the body holds: one of [`Kind`].
    pub kind: U16,
    /// Zero.
    pub reserved: U16,
    /// Bytes in the whole record, this prefix included; a multiple of 8.
    pub len: U32,
    /// When the event happened, in nanoseconds from an origin the trace chooses (generated
    /// traces: 0 = start). Never decreases from one record to the next.
    pub timestamp_ns: U64,
}

/// Bytes in [`RecordPrefix`].
pub const PREFIX_LEN: usize = 16;
const _: () = assert!(core::mem::size_of::<RecordPrefix>() == PREFIX_LEN);

/// The record kinds of version 1. A reader refuses any other value (see `FORMAT.md`, "Unknown
/// kinds": replay cannot skip an event it does not understand and still be exact).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum Kind {
    /// [`ViommuCreateBody`].
    ViommuCreate = 1,
    /// [`DeviceAddBody`].
    DeviceAdd = 2,
    /// [`BindBody`].
    Bind = 3,
    /// [`UnbindBody`].
    Unbind = 4,
    /// [`RingCreateBody`].
    RingCreate = 5,
    /// [`CommandsHead`] and its commands.
    Commands = 6,
    /// [`DoorbellBody`].
    Doorbell = 7,
    /// [`GuestAckBody`].
    GuestAck = 8,
    /// [`GuestFixBody`].
    GuestFix = 9,
    /// [`OutcomeBody`].
    Outcome = 10,
}

impl Kind {
    /// Every kind, in code order.
    pub const ALL: [Kind; 10] = [
        Kind::ViommuCreate,
        Kind::DeviceAdd,
        Kind::Bind,
        Kind::Unbind,
        Kind::RingCreate,
        Kind::Commands,
        Kind::Doorbell,
        Kind::GuestAck,
        Kind::GuestFix,
        Kind::Outcome,
    ];

    /// The kind a prefix names, `None` for a value version 1 does not define.
    pub fn from_code(code: u16) -> Option<Kind> {
        Kind::ALL.get(usize::from(code).wrapping_sub(1)).copied()
    }

    /// The on-disk code.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// Index into per-kind tables, 0-based.
    pub fn index(self) -> usize {
        self as usize - 1
    }

    /// The name used in messages and in `FORMAT.md`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::ViommuCreate => "ViommuCreate",
            Kind::DeviceAdd => "DeviceAdd",
            Kind::Bind => "Bind",
            Kind::Unbind => "Unbind",
            Kind::RingCreate => "RingCreate",
            Kind::Commands => "Commands",
            Kind::Doorbell => "Doorbell",
            Kind::GuestAck => "GuestAck",
            Kind::GuestFix => "GuestFix",
            Kind::Outcome => "Outcome",
        }
    }

    /// Bytes of the body after the prefix; for `Commands`, of its fixed head only.
    pub fn body_len(self) -> usize {
        match self {
            Kind::ViommuCreate => core::mem::size_of::<ViommuCreateBody>(),
            Kind::DeviceAdd => core::mem::size_of::<DeviceAddBody>(),
            Kind::Bind => core::mem::size_of::<BindBody>(),
            Kind::Unbind => core::mem::size_of::<UnbindBody>(),
            Kind::RingCreate => core::mem::size_of::<RingCreateBody>(),
            Kind::Commands => core::mem::size_of::<CommandsHead>(),
            Kind::Doorbell => core::mem::size_of::<DoorbellBody>(),
            Kind::GuestAck => core::mem::size_of::<GuestAckBody>(),
            Kind::GuestFix => core::mem::size_of::<GuestFixBody>(),
            Kind::Outcome => core::mem::size_of::<OutcomeBody>(),
        }
    }
}

/// `ViommuCreate`: the host created vIOMMU `viommu` for a VM on physical SMMU `smmu`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ViommuCreateBody {
    /// The trace's id of the vIOMMU.
    pub viommu: U32,
    /// The trace's id of the physical SMMU.
    pub smmu: U32,
    /// The VM's VMID on that SMMU.
    pub vmid: U16,
    /// Policy profile: 0 kernel, 1 tegra241.
    pub profile: u8,
    /// SIDSIZE of the vIOMMU: vSIDs are below 2^sidsize; 0..=32.
    pub sidsize: u8,
    /// Bit 0: range invalidation (TG/NUM/SCALE) is advertised to the guest. Bit 1: `features`
    /// holds the physical SMMU's features. Other bits zero.
    pub flags: u8,
    /// With flag bit 1, the SMMU's features
    /// ([`SmmuFeatures::to_trace_bytes`](vcmdq::viommu::SmmuFeatures::to_trace_bytes)); without
    /// it zero, and the SMMU has every feature (`any`), as in traces written before the field.
    pub features: [u8; 3],
}

/// `ViommuCreateBody::flags`: range invalidation supported.
pub const VIOMMU_RANGE_INV: u8 = 1;
/// `ViommuCreateBody::flags`: `features` holds the SMMU's features.
pub const VIOMMU_SMMU_FEATURES: u8 = 2;

/// `DeviceAdd`: a host device behind a physical SMMU, with its physical StreamID.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DeviceAddBody {
    /// The trace's id of the device.
    pub device: U32,
    /// The physical SMMU it sits behind.
    pub smmu: U32,
    /// Its physical StreamID.
    pub psid: U32,
    /// Zero.
    pub reserved: U32,
}

/// `Bind`: set_dev_id, device bound to vSID `vsid` in vIOMMU `viommu`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct BindBody {
    /// The vIOMMU.
    pub viommu: U32,
    /// The device.
    pub device: U32,
    /// The guest's virtual StreamID for it.
    pub vsid: U32,
    /// Zero.
    pub reserved: U32,
}

/// `Unbind`: unset_dev_id, the device's binding in the vIOMMU destroyed.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct UnbindBody {
    /// The vIOMMU.
    pub viommu: U32,
    /// The device.
    pub device: U32,
}

/// `RingCreate`: a guest command ring of 2^log2size entries owned by a vIOMMU, PROD = CONS = 0.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RingCreateBody {
    /// The trace's id of the ring.
    pub ring: U32,
    /// The vIOMMU whose commands it carries.
    pub viommu: U32,
    /// LOG2SIZE, 0..=19.
    pub log2size: u8,
    /// Zero.
    pub reserved: [u8; 7],
}

/// `Commands`: the guest wrote `count` commands into consecutive slots from `slot`. The commands
/// follow this head, 16 bytes each.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CommandsHead {
    /// The ring.
    pub ring: U32,
    /// The pointer (index and wrap bit, as PROD would hold it) of the first slot written.
    pub slot: U32,
    /// Commands that follow; at least 1.
    pub count: U32,
    /// Zero.
    pub reserved: U32,
}

/// `Doorbell`: the guest wrote PROD.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DoorbellBody {
    /// The ring.
    pub ring: U32,
    /// The whole 32-bit value written, junk bits included.
    pub prod: U32,
}

/// `GuestAck`: the guest, having seen CONS.ERR, acknowledged the error (GERRORN toggle).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct GuestAckBody {
    /// The ring.
    pub ring: U32,
    /// Zero.
    pub reserved: U32,
}

/// `GuestFix`: the guest, having seen CONS.ERR at `slot`, rewrote that slot (Linux writes a
/// CMD_SYNC there).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct GuestFixBody {
    /// The ring.
    pub ring: U32,
    /// The pointer of the rewritten slot.
    pub slot: U32,
    /// What the guest wrote there.
    pub cmd: RawCommand,
}

/// `Outcome`: what a reference consumer (the physical queue in a capture, QEMU's SMMU in an
/// import) did with the guest's command at `slot`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OutcomeBody {
    /// The ring.
    pub ring: U32,
    /// The pointer of the guest's slot.
    pub slot: U32,
    /// 0 forwarded, 1 refused, 2 trapped, 3 dropped.
    pub outcome: u8,
    /// For refused: the CONS.ERR code (1..=4). Otherwise 0.
    pub cerror: u8,
    /// Zero.
    pub reserved: [u8; 6],
    /// For forwarded: the command the physical queue received. Otherwise zero.
    pub out: RawCommand,
}

/// `OutcomeBody::outcome` values.
pub mod outcome {
    /// Forwarded to the physical queue.
    pub const FORWARDED: u8 = 0;
    /// Refused: the ring stopped with CONS.ERR.
    pub const REFUSED: u8 = 1;
    /// Handed to the control plane.
    pub const TRAPPED: u8 = 2;
    /// Dropped by rule (PREFETCH_*).
    pub const DROPPED: u8 = 3;
}

const _: () = {
    assert!(core::mem::size_of::<ViommuCreateBody>() == 16);
    assert!(core::mem::size_of::<DeviceAddBody>() == 16);
    assert!(core::mem::size_of::<BindBody>() == 16);
    assert!(core::mem::size_of::<UnbindBody>() == 8);
    assert!(core::mem::size_of::<RingCreateBody>() == 16);
    assert!(core::mem::size_of::<CommandsHead>() == 16);
    assert!(core::mem::size_of::<DoorbellBody>() == 8);
    assert!(core::mem::size_of::<GuestAckBody>() == 8);
    assert!(core::mem::size_of::<GuestFixBody>() == 24);
    assert!(core::mem::size_of::<OutcomeBody>() == 32);
};

/// The largest command count one `Commands` record can hold (its length is a u32).
pub const MAX_COMMANDS_PER_RECORD: u32 =
    ((u32::MAX as usize - PREFIX_LEN - core::mem::size_of::<CommandsHead>()) / RawCommand::SIZE)
        as u32;
