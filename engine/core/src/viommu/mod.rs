//! vIOMMU objects: one VM's view of one physical SMMU, its VMID there, its policy profile and
//! its vSID -> pSID table, with the iommufd `set_dev_id` / `unset_dev_id` semantics.
//!
//! Devices are registered host-side in [`Devices`] with the physical SMMU they sit behind and
//! their pSID. A device has at most one vSID in the whole host (as a device has at most one
//! vdevice in iommufd): two VMs can never both reach one pSID.
//!
//! Limits. A vIOMMU holds at most [`ViommuConfig::max_vsids`] bindings (ENOSPC beyond, as
//! iommufd says of a full table) and its vSID table at most [`ViommuConfig::max_table_bytes`]
//! (ENOMEM for a bind whose radix nodes would take it past that; nodes stay allocated until the
//! vIOMMU goes, so scattering vSIDs and unbinding them does not reset the count). Both are
//! checked before anything is allocated.
//!
//! VMIDs. A VMID tags one stage 2 on one physical SMMU: two vIOMMUs of the same SMMU with the
//! same VMID would invalidate each other's TLB entries. [`check_vmid`] refuses that (EEXIST)
//! unless the configuration says the second shares the first one's stage 2
//! ([`ViommuConfig::shares_vmid_with`]). VMIDs of different SMMUs are independent.
//!
//! The physical SMMU. A vIOMMU inherits its SMMU's features ([`SmmuFeatures`], from ID register
//! values or a preset): the translation rules depend on them, and a VMID above 255 on an SMMU
//! without VMID16 is refused at creation. A `tegra241` vIOMMU has the SID slots of its VINTF.
//!
//! Device removal. [`Viommu::remove_device`] removes a bound device as iommufd does: the vdevice
//! goes (behind the barrier below) and a tombstone stays until the VMM destroys it (ENOENT).
//!
//! `unset_dev_id` is a barrier (rule 5): it removes the entry, waits for a grace period of the
//! engine's [`GraceDomain`] (see [`grace`]) and only then returns and lets the device be bound
//! elsewhere. Until then the device reads as still bound (EEXIST) so that no other vIOMMU gets it
//! while commands translated with its pSID may still be in flight.

pub mod grace;
pub mod sid_table;
pub mod smmu;
mod sync;

pub use grace::{GraceDomain, Pinned, Reader};
pub use sid_table::{SidTable, TableStats, WithLookup};
pub use smmu::{SmmuError, SmmuFeatures};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

// Every update under these locks leaves the maps consistent at each step.
use crate::sync::lock;

/// A host device (an endpoint behind one physical SMMU).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u32);

impl core::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "dev{}", self.0)
    }
}

/// A registered device: where it sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Device {
    /// Its id.
    pub id: DeviceId,
    /// The physical SMMU it sits behind.
    pub smmu: u32,
    /// Its physical StreamID on that SMMU.
    pub psid: u32,
}

/// The translation policy a vIOMMU applies to its guest's commands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Profile {
    /// The kernel's vIOMMU invalidation rules (IOMMU_HWPT_INVALIDATE), with the RES0, Secure,
    /// ATC size and range checks of newer kernels.
    #[default]
    Kernel,
    /// What a guest-owned Tegra241 VCMDQ accepts: TLBI_NH_ASID, TLBI_NH_VA, ATC_INV, CMD_SYNC.
    Tegra241,
}

impl Profile {
    /// Both profiles.
    pub const ALL: [Profile; 2] = [Profile::Kernel, Profile::Tegra241];

    /// The profile's code in trace files: 0 kernel, 1 tegra241.
    pub fn code(self) -> u8 {
        match self {
            Profile::Kernel => 0,
            Profile::Tegra241 => 1,
        }
    }

    /// The profile of a code; `None` for an unknown one.
    pub fn from_code(code: u8) -> Option<Profile> {
        match code {
            0 => Some(Profile::Kernel),
            1 => Some(Profile::Tegra241),
            _ => None,
        }
    }

    /// `kernel` or `tegra241`.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Kernel => "kernel",
            Profile::Tegra241 => "tegra241",
        }
    }
}

impl core::fmt::Display for Profile {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// A profile name that is neither `kernel` nor `tegra241`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown profile {0:?}: the profiles are kernel and tegra241")]
pub struct ProfileError(pub String);

impl core::str::FromStr for Profile {
    type Err = ProfileError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Profile::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| ProfileError(s.to_string()))
    }
}

/// What a vIOMMU is created with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ViommuConfig {
    /// The vIOMMU's id (unique among the host's vIOMMUs; used in errors and traces).
    pub id: u32,
    /// The VM's VMID on the physical SMMU.
    pub vmid: u16,
    /// The physical SMMU this vIOMMU is a view of.
    pub smmu: u32,
    /// The translation policy.
    pub profile: Profile,
    /// vSIDs have this many bits (1..=32), as the guest's SMMU_IDR1.SIDSIZE says.
    pub sidsize: u8,
    /// Whether the physical SMMU has range invalidation (SMMU_IDR3.RIL): without it, TG, TTL,
    /// NUM and SCALE in a guest TLBI are RES0 and refused. [`ViommuConfig::with_smmu`] sets it
    /// from the features' `ril`; this field, not `features.ril`, is what translation reads.
    pub range_inv: bool,
    /// The rest of what the physical SMMU supports (ASID/VMID sizes, ATS, substreams,
    /// granules): see [`SmmuFeatures`]. Default [`SmmuFeatures::ANY`].
    pub features: SmmuFeatures,
    /// `tegra241` only: the VINTF's SID_MATCH/SID_REPLACE slots, so the vSIDs bound at once at
    /// most (ENOSPC beyond). Default [`DEFAULT_TEGRA241_SID_SLOTS`].
    pub tegra241_sid_slots: u32,
    /// vSIDs bound at once at most (at least 1): `set_dev_id` beyond is ENOSPC. Default
    /// [`DEFAULT_MAX_VSIDS`].
    pub max_vsids: u32,
    /// Bytes the vSID table may take, root included: a `set_dev_id` whose radix nodes would
    /// take it further is ENOMEM. It must hold at least one binding of any vSID. Default
    /// [`DEFAULT_MAX_TABLE_BYTES`].
    pub max_table_bytes: u64,
    /// The vIOMMU (same SMMU, same VMID) whose stage 2 this one shares, and so its VMID: the
    /// operator's word that their invalidations may hit each other's entries. `None`: the VMID
    /// must be this vIOMMU's alone on its SMMU.
    pub shares_vmid_with: Option<u32>,
}

/// Default [`ViommuConfig::max_vsids`]: 65,536, a full 16-bit PCI BDF space.
pub const DEFAULT_MAX_VSIDS: u32 = 1 << 16;

/// Default [`ViommuConfig::tegra241_sid_slots`]: 16, the SID slots of a VINTF in QEMU's
/// emulation and the kernel's default.
pub const DEFAULT_TEGRA241_SID_SLOTS: u32 = 16;

/// Default [`ViommuConfig::max_table_bytes`]: 16 MiB. [`DEFAULT_MAX_VSIDS`] consecutive vSIDs
/// take under 1 MiB at any SIDSIZE; 16 MiB also holds a few hundred vSIDs scattered over the
/// 32-bit space (about 66 KiB each in the worst case), and bounds what a VMM binding vSIDs all
/// over that space can make the host allocate (without a limit: up to 32 GiB per vIOMMU).
pub const DEFAULT_MAX_TABLE_BYTES: u64 = 16 << 20;

impl ViommuConfig {
    /// A `kernel`-profile vIOMMU with 32-bit vSIDs on an SMMU with range invalidation, the
    /// default limits and a VMID of its own.
    pub fn new(id: u32, vmid: u16, smmu: u32) -> ViommuConfig {
        ViommuConfig {
            id,
            vmid,
            smmu,
            profile: Profile::Kernel,
            sidsize: 32,
            range_inv: true,
            features: SmmuFeatures::ANY,
            tegra241_sid_slots: DEFAULT_TEGRA241_SID_SLOTS,
            max_vsids: DEFAULT_MAX_VSIDS,
            max_table_bytes: DEFAULT_MAX_TABLE_BYTES,
            shares_vmid_with: None,
        }
    }
}

impl ViommuConfig {
    /// This configuration on an SMMU with `features` (range invalidation included).
    pub fn with_smmu(self, features: SmmuFeatures) -> ViommuConfig {
        ViommuConfig {
            range_inv: features.ril,
            features,
            ..self
        }
    }
}

impl Default for ViommuConfig {
    /// [`ViommuConfig::new`]`(0, 0, 0)`: for filling in the fields a caller does not set.
    fn default() -> Self {
        ViommuConfig::new(0, 0, 0)
    }
}

/// Whether a vIOMMU `cfg` may have its VMID next to the vIOMMUs `others` already has: EEXIST if
/// one on the same SMMU has the same VMID and `cfg` does not say it shares that one's stage 2;
/// ENOENT if it names a vIOMMU that does not exist; EINVAL if that one has another VMID or SMMU.
pub fn check_vmid<'a>(
    cfg: &ViommuConfig,
    others: impl IntoIterator<Item = &'a ViommuConfig>,
) -> Result<(), ViommuError> {
    let mut holder: Option<u32> = None;
    let mut shared = None;
    for o in others {
        if Some(o.id) == cfg.shares_vmid_with {
            shared = Some(*o);
        }
        if o.smmu == cfg.smmu && o.vmid == cfg.vmid {
            holder = Some(holder.map_or(o.id, |h| h.min(o.id)));
        }
    }
    match (cfg.shares_vmid_with, shared) {
        (Some(with), None) => Err(ViommuError::ShareUnknown {
            viommu: cfg.id,
            with,
        }),
        (Some(with), Some(o)) if o.smmu != cfg.smmu || o.vmid != cfg.vmid => {
            Err(ViommuError::ShareMismatch {
                viommu: cfg.id,
                vmid: cfg.vmid,
                smmu: cfg.smmu,
                with,
                with_vmid: o.vmid,
                with_smmu: o.smmu,
            })
        }
        (Some(_), Some(_)) => Ok(()),
        (None, _) => match holder {
            Some(holder) => Err(ViommuError::VmidTaken {
                viommu: cfg.id,
                vmid: cfg.vmid,
                smmu: cfg.smmu,
                holder,
            }),
            None => Ok(()),
        },
    }
}

/// A failed vIOMMU or device operation. Each carries the errno iommufd returns for it; the
/// message starts with that name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ViommuError {
    /// `set_dev_id`: the vSID is bound to another device of this vIOMMU.
    #[error("EEXIST: vSID {vsid:#x} of vIOMMU {viommu} is already bound to {device}")]
    VsidTaken {
        /// The vIOMMU.
        viommu: u32,
        /// The vSID.
        vsid: u32,
        /// The device holding it.
        device: DeviceId,
    },
    /// `set_dev_id`: the device already has a vSID (here or in another vIOMMU), or its unbind is
    /// still waiting for its grace period.
    #[error("EEXIST: {device} is already bound in vIOMMU {viommu}{}",
        match vsid { Some(v) => format!(" as vSID {v:#x}"), None => " (unbind in progress)".into() })]
    DeviceBound {
        /// The device.
        device: DeviceId,
        /// The vIOMMU it is bound in.
        viommu: u32,
        /// Its vSID there; `None` while an unbind waits for its grace period.
        vsid: Option<u32>,
    },
    /// `set_dev_id`: the device sits behind another physical SMMU than the vIOMMU.
    #[error(
        "EINVAL: {device} sits behind SMMU {device_smmu}, vIOMMU {viommu} is on SMMU {viommu_smmu}"
    )]
    WrongSmmu {
        /// The device.
        device: DeviceId,
        /// Its SMMU.
        device_smmu: u32,
        /// The vIOMMU.
        viommu: u32,
        /// The vIOMMU's SMMU.
        viommu_smmu: u32,
    },
    /// `set_dev_id`: the vSID needs more bits than the vIOMMU's SIDSIZE.
    #[error("EINVAL: vSID {vsid:#x} does not fit the SIDSIZE {sidsize} of vIOMMU {viommu}")]
    VsidTooLarge {
        /// The vIOMMU.
        viommu: u32,
        /// The vSID.
        vsid: u32,
        /// The vIOMMU's SIDSIZE.
        sidsize: u8,
    },
    /// `unset_dev_id`: the device is not bound in this vIOMMU.
    #[error("ENOENT: {device} is not bound in vIOMMU {viommu}")]
    NotBound {
        /// The device.
        device: DeviceId,
        /// The vIOMMU.
        viommu: u32,
    },
    /// `unset_dev_id` of a vdevice destroyed when its device was removed: the tombstone is
    /// cleared (iommufd's IOMMU_DESTROY of a tombstoned vdevice).
    #[error(
        "ENOENT: the vdevice of {device} in vIOMMU {viommu} was destroyed when the device was \
         removed; its tombstone is cleared now"
    )]
    VdeviceGone {
        /// The device.
        device: DeviceId,
        /// The vIOMMU.
        viommu: u32,
    },
    /// No device has this id.
    #[error("ENOENT: no device {device}")]
    NoDevice {
        /// The id.
        device: DeviceId,
    },
    /// `add_device`: the id is taken.
    #[error("EEXIST: {device} is already registered")]
    DeviceExists {
        /// The id.
        device: DeviceId,
    },
    /// `add_device`: another device already has this pSID on this SMMU.
    #[error("EEXIST: pSID {psid:#x} of SMMU {smmu} already belongs to {device}")]
    PsidTaken {
        /// The SMMU.
        smmu: u32,
        /// The pSID.
        psid: u32,
        /// The device that has it.
        device: DeviceId,
    },
    /// `remove_device`: the device is bound.
    #[error("EBUSY: {device} is bound in vIOMMU {viommu}")]
    DeviceBusy {
        /// The device.
        device: DeviceId,
        /// The vIOMMU it is bound in.
        viommu: u32,
    },
    /// A vIOMMU configuration with SIDSIZE outside 1..=32.
    #[error("EINVAL: SIDSIZE {0} is outside 1..=32")]
    BadSidsize(u8),
    /// `set_dev_id`: the vIOMMU has as many vSIDs bound as its configuration allows.
    #[error(
        "ENOSPC: vIOMMU {viommu} already has {max} vSIDs bound, its limit; unbind one or raise \
         max_vsids (serve: max-vsids=N in the --viommu spec)"
    )]
    VsidsFull {
        /// The vIOMMU.
        viommu: u32,
        /// Its [`ViommuConfig::max_vsids`].
        max: u32,
    },
    /// `set_dev_id`: the radix nodes the vSID needs would take the vSID table past its limit.
    #[error(
        "ENOMEM: vSID {vsid:#x} needs {need} more bytes of vSID table in vIOMMU {viommu}, which \
         has {used} of its {max} in use; bind vSIDs closer together or raise max_table_bytes \
         (serve: max-table-bytes=N in the --viommu spec)"
    )]
    TableFull {
        /// The vIOMMU.
        viommu: u32,
        /// The vSID.
        vsid: u32,
        /// Bytes its nodes would add.
        need: u64,
        /// Bytes the table has.
        used: u64,
        /// Its [`ViommuConfig::max_table_bytes`].
        max: u64,
    },
    /// A vIOMMU configuration whose limits cannot hold one binding.
    #[error(
        "EINVAL: vIOMMU {viommu}: max_vsids {max_vsids} and max_table_bytes {max_table_bytes} \
         cannot hold one binding (at least 1 vSID and, at SIDSIZE {sidsize}, {need} bytes)"
    )]
    BadLimits {
        /// The vIOMMU.
        viommu: u32,
        /// Its SIDSIZE.
        sidsize: u8,
        /// Its [`ViommuConfig::max_vsids`].
        max_vsids: u32,
        /// Its [`ViommuConfig::max_table_bytes`].
        max_table_bytes: u64,
        /// The bytes a table with one binding may take at this SIDSIZE.
        need: u64,
    },
    /// A new vIOMMU's VMID is in use on its SMMU by a vIOMMU it does not say it shares with.
    #[error(
        "EEXIST: VMID {vmid} on SMMU {smmu} belongs to vIOMMU {holder}; vIOMMU {viommu} needs a \
         VMID of its own there, or, if it shares vIOMMU {holder}'s stage 2, to say so \
         (shares_vmid_with; serve: shares-vmid-with={holder} in the --viommu spec)"
    )]
    VmidTaken {
        /// The new vIOMMU.
        viommu: u32,
        /// The VMID.
        vmid: u16,
        /// The SMMU.
        smmu: u32,
        /// The vIOMMU that has it (the lowest id, when several share it).
        holder: u32,
    },
    /// A new vIOMMU's VMID needs 16 bits and its SMMU has 8-bit VMIDs (no SMMU_IDR0.VMID16): a
    /// configuration error of the host, not of the guest.
    #[error(
        "EINVAL: vIOMMU {viommu} has VMID {vmid}, and its SMMU has 8-bit VMIDs (no VMID16): \
         give it a VMID below 256"
    )]
    VmidTooLarge {
        /// The vIOMMU.
        viommu: u32,
        /// Its VMID.
        vmid: u16,
    },
    /// `set_dev_id` on a `tegra241` vIOMMU whose VINTF has every SID slot in use.
    #[error(
        "ENOSPC: the VINTF of vIOMMU {viommu} has all its {slots} SID slots in use; unbind one or \
         raise tegra241_sid_slots (serve: sid-slots=N in the --viommu spec)"
    )]
    SidSlotsFull {
        /// The vIOMMU.
        viommu: u32,
        /// Its [`ViommuConfig::tegra241_sid_slots`].
        slots: u32,
    },
    /// A new vIOMMU says it shares the stage 2 of a vIOMMU that does not exist.
    #[error("ENOENT: vIOMMU {viommu} would share the VMID of vIOMMU {with}, which does not exist")]
    ShareUnknown {
        /// The new vIOMMU.
        viommu: u32,
        /// The vIOMMU named.
        with: u32,
    },
    /// A new vIOMMU says it shares the stage 2 of a vIOMMU with another VMID or SMMU.
    #[error(
        "EINVAL: vIOMMU {viommu} (VMID {vmid} on SMMU {smmu}) would share the stage 2 of \
         vIOMMU {with}, which has VMID {with_vmid} on SMMU {with_smmu}: sharing needs the same \
         VMID on the same SMMU"
    )]
    ShareMismatch {
        /// The new vIOMMU.
        viommu: u32,
        /// Its VMID.
        vmid: u16,
        /// Its SMMU.
        smmu: u32,
        /// The vIOMMU named.
        with: u32,
        /// That one's VMID.
        with_vmid: u16,
        /// That one's SMMU.
        with_smmu: u32,
    },
}

impl ViommuError {
    /// The errno name: `EEXIST`, `EINVAL`, `ENOENT`, `EBUSY`, `ENOSPC` or `ENOMEM`.
    pub fn errno(&self) -> &'static str {
        match self {
            ViommuError::VsidTaken { .. }
            | ViommuError::DeviceBound { .. }
            | ViommuError::DeviceExists { .. }
            | ViommuError::PsidTaken { .. }
            | ViommuError::VmidTaken { .. } => "EEXIST",
            ViommuError::WrongSmmu { .. }
            | ViommuError::VsidTooLarge { .. }
            | ViommuError::BadSidsize(_)
            | ViommuError::BadLimits { .. }
            | ViommuError::VmidTooLarge { .. }
            | ViommuError::ShareMismatch { .. } => "EINVAL",
            ViommuError::NotBound { .. }
            | ViommuError::VdeviceGone { .. }
            | ViommuError::NoDevice { .. }
            | ViommuError::ShareUnknown { .. } => "ENOENT",
            ViommuError::DeviceBusy { .. } => "EBUSY",
            ViommuError::VsidsFull { .. } | ViommuError::SidSlotsFull { .. } => "ENOSPC",
            ViommuError::TableFull { .. } => "ENOMEM",
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Binding {
    Free,
    Bound {
        viommu: u32,
        vsid: u32,
    },
    /// Removed from the table; waiting for the grace period before the device is free.
    Unbinding {
        viommu: u32,
    },
}

#[derive(Debug)]
struct DeviceState {
    smmu: u32,
    psid: u32,
    binding: Binding,
}

/// The host's devices: which SMMU each sits behind, its pSID, and where it is bound.
#[derive(Debug, Default)]
pub struct Devices {
    inner: Mutex<DevicesInner>,
}

#[derive(Debug, Default)]
struct DevicesInner {
    by_id: HashMap<DeviceId, DeviceState>,
    by_psid: HashMap<(u32, u32), DeviceId>,
}

impl Devices {
    /// An empty registry.
    pub fn new() -> Arc<Devices> {
        Arc::new(Devices::default())
    }

    /// Registers a device behind `smmu` with `psid`. EEXIST if the id or the (SMMU, pSID) pair
    /// is taken.
    pub fn add_device(&self, id: DeviceId, smmu: u32, psid: u32) -> Result<(), ViommuError> {
        let mut d = lock(&self.inner);
        if d.by_id.contains_key(&id) {
            return Err(ViommuError::DeviceExists { device: id });
        }
        if let Some(&device) = d.by_psid.get(&(smmu, psid)) {
            return Err(ViommuError::PsidTaken { smmu, psid, device });
        }
        d.by_psid.insert((smmu, psid), id);
        d.by_id.insert(
            id,
            DeviceState {
                smmu,
                psid,
                binding: Binding::Free,
            },
        );
        Ok(())
    }

    /// Forgets an unbound device. ENOENT if unknown, EBUSY if bound: the registry cannot reach
    /// the vIOMMU; [`Viommu::remove_device`] (or the engine's `remove_device`) removes a bound
    /// device as iommufd does.
    pub fn remove_device(&self, id: DeviceId) -> Result<(), ViommuError> {
        let mut d = lock(&self.inner);
        let st = d
            .by_id
            .get(&id)
            .ok_or(ViommuError::NoDevice { device: id })?;
        match st.binding {
            Binding::Free => {}
            Binding::Bound { viommu, .. } | Binding::Unbinding { viommu } => {
                return Err(ViommuError::DeviceBusy { device: id, viommu })
            }
        }
        let key = (st.smmu, st.psid);
        d.by_psid.remove(&key);
        d.by_id.remove(&id);
        Ok(())
    }

    /// The device `id`, if registered.
    pub fn get(&self, id: DeviceId) -> Option<Device> {
        lock(&self.inner).by_id.get(&id).map(|s| Device {
            id,
            smmu: s.smmu,
            psid: s.psid,
        })
    }

    /// Registered devices.
    pub fn len(&self) -> usize {
        lock(&self.inner).by_id.len()
    }

    /// Whether no device is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The vIOMMU `id` is bound in (or being unbound from), if any.
    pub fn bound_in(&self, id: DeviceId) -> Option<u32> {
        match lock(&self.inner).by_id.get(&id)?.binding {
            Binding::Free => None,
            Binding::Bound { viommu, .. } | Binding::Unbinding { viommu } => Some(viommu),
        }
    }

    /// Drops `id` from the registry whatever its binding (the caller has unbound it).
    fn forget(&self, id: DeviceId) {
        let mut d = lock(&self.inner);
        if let Some(st) = d.by_id.remove(&id) {
            d.by_psid.remove(&(st.smmu, st.psid));
        }
    }

    fn set_binding(&self, id: DeviceId, binding: Binding) {
        if let Some(s) = lock(&self.inner).by_id.get_mut(&id) {
            s.binding = binding;
        }
    }
}

/// One VM's view of one physical SMMU.
pub struct Viommu {
    cfg: ViommuConfig,
    /// The translation rules for this vIOMMU's profile and SMMU, shared with every vIOMMU
    /// configured alike.
    rules: std::sync::Arc<crate::translate::RuleTable>,
    table: SidTable,
    devices: Arc<Devices>,
    grace: Arc<GraceDomain>,
    /// device -> vSID of the devices bound here. Also the lock that serialises this vIOMMU's
    /// updates; taken before the device registry's.
    bound: Mutex<HashMap<DeviceId, u32>>,
    /// Devices removed while bound here whose vdevice the VMM has not destroyed yet. Taken
    /// after `bound` when both are held.
    tombstones: Mutex<std::collections::HashSet<DeviceId>>,
}

impl Viommu {
    /// A vIOMMU with no bindings. `devices` is the host's registry, `grace` the engine's domain
    /// (shared by every vIOMMU whose commands the same workers translate).
    pub fn new(
        cfg: ViommuConfig,
        devices: Arc<Devices>,
        grace: Arc<GraceDomain>,
    ) -> Result<Viommu, ViommuError> {
        if !cfg.features.vmid16 && cfg.vmid > 0xff {
            return Err(ViommuError::VmidTooLarge {
                viommu: cfg.id,
                vmid: cfg.vmid,
            });
        }
        let table = SidTable::new(cfg.sidsize).ok_or(ViommuError::BadSidsize(cfg.sidsize))?;
        let need = (table.stats().bytes + table.growth_max()) as u64;
        let no_slots = cfg.profile == Profile::Tegra241 && cfg.tegra241_sid_slots == 0;
        if cfg.max_vsids == 0 || no_slots || cfg.max_table_bytes < need {
            return Err(ViommuError::BadLimits {
                viommu: cfg.id,
                sidsize: cfg.sidsize,
                max_vsids: cfg.max_vsids,
                max_table_bytes: cfg.max_table_bytes,
                need,
            });
        }
        Ok(Viommu {
            cfg,
            rules: crate::translate::RuleTable::for_config(&cfg),
            table,
            devices,
            grace,
            bound: Mutex::new(HashMap::new()),
            tombstones: Mutex::new(Default::default()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ViommuConfig {
        &self.cfg
    }

    /// The id.
    pub fn id(&self) -> u32 {
        self.cfg.id
    }

    /// The VM's VMID on the physical SMMU.
    pub fn vmid(&self) -> u16 {
        self.cfg.vmid
    }

    /// The policy profile.
    pub fn profile(&self) -> Profile {
        self.cfg.profile
    }

    /// The translation rules of this vIOMMU's profile on its SMMU.
    pub(crate) fn rules(&self) -> &crate::translate::RuleTable {
        &self.rules
    }

    /// The grace domain unbinds wait in.
    pub fn grace(&self) -> &Arc<GraceDomain> {
        &self.grace
    }

    /// The vSID table (for lookups and statistics).
    pub fn table(&self) -> &SidTable {
        &self.table
    }

    /// The pSID bound to `vsid`: lock-free, for translating threads.
    #[inline]
    pub fn lookup(&self, vsid: u32) -> Option<u32> {
        self.table.get(vsid)
    }

    /// Every binding as `(device, vSID, pSID)`, sorted by vSID.
    pub fn bindings(&self) -> Vec<(DeviceId, u32, u32)> {
        let bound = lock(&self.bound);
        let mut v: Vec<_> = bound
            .iter()
            .filter_map(|(&d, &vsid)| Some((d, vsid, self.table.get(vsid)?)))
            .collect();
        v.sort_by_key(|&(_, vsid, _)| vsid);
        v
    }

    /// Binds `device` to `vsid` in this vIOMMU.
    ///
    /// Errors, checked in this order: ENOENT (no such device), EINVAL (the device sits behind
    /// another SMMU; the vSID does not fit SIDSIZE), EEXIST (the device already has a vSID,
    /// here or elsewhere, or is being unbound; the vSID is taken), ENOSPC (a `tegra241` VINTF's
    /// `tegra241_sid_slots` are in use; `max_vsids` are bound), ENOMEM (the vSID's table nodes would pass `max_table_bytes`).
    pub fn set_dev_id(&self, device: DeviceId, vsid: u32) -> Result<(), ViommuError> {
        let viommu = self.cfg.id;
        let mut bound = lock(&self.bound);
        let mut devs = lock(&self.devices.inner);
        let st = devs
            .by_id
            .get_mut(&device)
            .ok_or(ViommuError::NoDevice { device })?;
        self.check_bindable(device, st, vsid)?;
        self.check_vsid_free(&bound, vsid)?;
        // The limits, before the insert allocates anything; under this vIOMMU's lock, so the
        // table cannot grow between the check and the insert.
        self.check_limits(&bound, vsid)?;
        // Both checks above ran under this vIOMMU's lock: the insert cannot fail.
        if let Err(e) = self.table.insert(vsid, st.psid) {
            unreachable!("checked under the lock: {e}");
        }
        st.binding = Binding::Bound { viommu, vsid };
        bound.insert(device, vsid);
        // A new vdevice of a device id that had one here before it was removed.
        lock(&self.tombstones).remove(&device);
        Ok(())
    }

    /// Whether `device` may be bound here at `vsid`: it sits behind this vIOMMU's SMMU, `vsid`
    /// is within SIDSIZE, and the device is not bound (or being unbound) already.
    fn check_bindable(
        &self,
        device: DeviceId,
        st: &DeviceState,
        vsid: u32,
    ) -> Result<(), ViommuError> {
        let viommu = self.cfg.id;
        if st.smmu != self.cfg.smmu {
            return Err(ViommuError::WrongSmmu {
                device,
                device_smmu: st.smmu,
                viommu,
                viommu_smmu: self.cfg.smmu,
            });
        }
        if !self.table.fits(vsid) {
            return Err(ViommuError::VsidTooLarge {
                viommu,
                vsid,
                sidsize: self.cfg.sidsize,
            });
        }
        match st.binding {
            Binding::Free => {}
            Binding::Bound { viommu, vsid } => {
                return Err(ViommuError::DeviceBound {
                    device,
                    viommu,
                    vsid: Some(vsid),
                })
            }
            Binding::Unbinding { viommu } => {
                return Err(ViommuError::DeviceBound {
                    device,
                    viommu,
                    vsid: None,
                })
            }
        }
        Ok(())
    }

    /// Whether `vsid` is free here: not bound to another device.
    fn check_vsid_free(
        &self,
        bound: &HashMap<DeviceId, u32>,
        vsid: u32,
    ) -> Result<(), ViommuError> {
        let viommu = self.cfg.id;
        if self.table.get(vsid).is_some() {
            let holder = bound
                .iter()
                .find(|&(_, &v)| v == vsid)
                .map_or(DeviceId(u32::MAX), |(&d, _)| d);
            return Err(ViommuError::VsidTaken {
                viommu,
                vsid,
                device: holder,
            });
        }
        Ok(())
    }

    /// Whether one more binding (of `vsid`) fits the configured limits: the Tegra241 SID slots,
    /// `max_vsids`, `max_table_bytes`.
    fn check_limits(&self, bound: &HashMap<DeviceId, u32>, vsid: u32) -> Result<(), ViommuError> {
        let viommu = self.cfg.id;
        if self.cfg.profile == Profile::Tegra241
            && bound.len() >= self.cfg.tegra241_sid_slots as usize
        {
            return Err(ViommuError::SidSlotsFull {
                viommu,
                slots: self.cfg.tegra241_sid_slots,
            });
        }
        if bound.len() >= self.cfg.max_vsids as usize {
            return Err(ViommuError::VsidsFull {
                viommu,
                max: self.cfg.max_vsids,
            });
        }
        let need = self.table.growth(vsid) as u64;
        let used = self.table.stats().bytes as u64;
        if need > 0 && used + need > self.cfg.max_table_bytes {
            return Err(ViommuError::TableFull {
                viommu,
                vsid,
                need,
                used,
                max: self.cfg.max_table_bytes,
            });
        }
        Ok(())
    }

    /// Unbinds `device` from this vIOMMU and returns the vSID it had. ENOENT if it is not bound
    /// here.
    ///
    /// A barrier: when this returns, every batch that looked the old binding up has been
    /// published, and no batch translated afterwards can see it. Blocks for one grace period of
    /// the engine's [`GraceDomain`] (the time the workers take to finish their current batch).
    pub fn unset_dev_id(&self, device: DeviceId) -> Result<u32, ViommuError> {
        self.unbind(device, false)
    }

    /// The host removes `device`, bound here, as iommufd does when a device goes while it still
    /// has a vdevice: the vdevice is destroyed (its vSID freed, with the barrier of
    /// [`Viommu::unset_dev_id`]), the device leaves the registry, and a tombstone stays for the
    /// vdevice: the VMM's later `unset_dev_id` of it is ENOENT ([`ViommuError::VdeviceGone`])
    /// and clears it. Returns the vSID the device had. ENOENT if it is not bound here.
    pub fn remove_device(&self, device: DeviceId) -> Result<u32, ViommuError> {
        self.unbind(device, true)
    }

    /// Whether a tombstone of `device`'s vdevice is here (its device was removed while bound,
    /// and the VMM has not destroyed the vdevice since).
    pub fn has_tombstone(&self, device: DeviceId) -> bool {
        lock(&self.tombstones).contains(&device)
    }

    fn unbind(&self, device: DeviceId, remove: bool) -> Result<u32, ViommuError> {
        let vsid = {
            let mut bound = lock(&self.bound);
            let Some(vsid) = bound.remove(&device) else {
                let viommu = self.cfg.id;
                if !remove && lock(&self.tombstones).remove(&device) {
                    return Err(ViommuError::VdeviceGone { device, viommu });
                }
                return Err(ViommuError::NotBound { device, viommu });
            };
            self.table.remove(vsid);
            self.devices.set_binding(
                device,
                Binding::Unbinding {
                    viommu: self.cfg.id,
                },
            );
            if remove {
                lock(&self.tombstones).insert(device);
            }
            vsid
        };
        // Outside the lock: other bindings of this vIOMMU may change meanwhile; only this
        // device stays reserved until no batch can still carry its pSID.
        self.grace.synchronize();
        if remove {
            // Reserved (Unbinding) until now, so nobody bound it meanwhile: it goes.
            self.devices.forget(device);
        } else {
            self.devices.set_binding(device, Binding::Free);
        }
        Ok(vsid)
    }
}

impl Drop for Viommu {
    fn drop(&mut self) {
        // Nobody can be translating through a vIOMMU that is being dropped: its devices are free.
        let bound = lock(&self.bound);
        for &device in bound.keys() {
            self.devices.set_binding(device, Binding::Free);
        }
    }
}

impl core::fmt::Debug for Viommu {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Viommu")
            .field("cfg", &self.cfg)
            .field("table", &self.table)
            .finish()
    }
}

#[cfg(test)]
mod tests;
