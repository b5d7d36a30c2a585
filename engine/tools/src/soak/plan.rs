//! The fixed layout of a soak: vIOMMUs (both profiles, with and without range invalidation,
//! 32- and 16-bit vSIDs), the devices each ring owns, and the numbering that lets the hardware
//! check tell from a physical command alone which ring it came from.
//!
//! Numbering (ring `i`, vIOMMU `v`):
//! - vIOMMU `v` has id `v + 1` and VMID `VMID_BASE + v`; odd `v` are `tegra241`, `v % 4 == 2`
//!   has no range invalidation and 16-bit vSIDs; it sits on physical SMMU `v % 2`.
//! - ring `i` belongs to vIOMMU `i % V` and owns two devices, bound as vSID
//!   `VSID_BASE + 4i + j` to pSID `PSID_BASE + 4i + j` (`j` 0 or 1); vSID `VSID_BASE + 4i + 2`
//!   is never bound. A pSID therefore names its ring.
//! - ring `v` is the owner of vIOMMU `v`: the only ring of it that issues commands carrying
//!   nothing but the VMID (TLBI_NH_ALL, TLBI_NSNH_ALL), so the VMID names the ring.

use std::collections::HashMap;
use vcmdq::viommu::{Profile, ViommuConfig};

/// The VMID of vIOMMU 0; vIOMMU `v` has `VMID_BASE + v`.
pub const VMID_BASE: u16 = 0x100;
/// The vSID of ring 0's first device.
pub const VSID_BASE: u32 = 0x10;
/// The pSID of ring 0's first device.
pub const PSID_BASE: u32 = 0x4000;
/// StreamIDs reserved per ring (two bound, one never bound, one spare).
pub const SIDS_PER_RING: u32 = 4;
/// Rings at most: a ring's number must fit the top byte of a 16-bit ASID.
pub const MAX_RINGS: usize = 256;

/// One vIOMMU of the plan.
#[derive(Clone, Debug)]
pub struct ViommuPlan {
    /// How it is created.
    pub cfg: ViommuConfig,
    /// Its vSID -> pSID bindings, as the oracle takes them.
    pub bindings: HashMap<u32, u32>,
}

/// One guest ring of the plan.
#[derive(Clone, Copy, Debug)]
pub struct RingPlan {
    /// Index into [`Plan::viommus`].
    pub viommu: usize,
    /// Its two bound vSIDs.
    pub vsids: [u32; 2],
    /// The pSIDs they are bound to.
    pub psids: [u32; 2],
    /// vSIDs a hostile command names: never bound in this ring's vIOMMU (one bound in another
    /// vIOMMU when there is one, one bound nowhere).
    pub foreign_vsids: [u32; 2],
    /// Whether this ring is its vIOMMU's owner (issues TLBI_NH_ALL and TLBI_NSNH_ALL).
    pub owner: bool,
}

/// Why a plan cannot be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// No vIOMMU or too few rings.
    #[error("a soak needs at least one vIOMMU and at least one ring per vIOMMU (got {viommus} vIOMMUs, {rings} rings)")]
    Shape {
        /// vIOMMUs asked for.
        viommus: usize,
        /// Rings asked for.
        rings: usize,
    },
    /// More rings than the numbering can tell apart.
    #[error("at most {MAX_RINGS} rings (got {0})")]
    TooManyRings(usize),
}

/// The whole layout.
#[derive(Clone, Debug)]
pub struct Plan {
    /// vIOMMUs, by index.
    pub viommus: Vec<ViommuPlan>,
    /// Rings, by index (the engine's `RingId` when attached in this order).
    pub rings: Vec<RingPlan>,
    /// Per ring: its vIOMMU's bindings while the ring's second device is unbound.
    pub unbound_bindings: Vec<HashMap<u32, u32>>,
}

impl Plan {
    /// `viommus` vIOMMUs and `rings` rings spread over them round robin.
    pub fn new(viommus: usize, rings: usize) -> Result<Plan, PlanError> {
        if viommus == 0 || rings < viommus {
            return Err(PlanError::Shape { viommus, rings });
        }
        if rings > MAX_RINGS {
            return Err(PlanError::TooManyRings(rings));
        }
        let mut vs: Vec<ViommuPlan> = (0..viommus)
            .map(|v| {
                let mut cfg = ViommuConfig::new(v as u32 + 1, VMID_BASE + v as u16, v as u32 % 2);
                if v % 2 == 1 {
                    cfg.profile = Profile::Tegra241;
                }
                if v % 4 == 2 {
                    cfg.range_inv = false;
                    cfg.sidsize = 16;
                }
                ViommuPlan {
                    cfg,
                    bindings: HashMap::new(),
                }
            })
            .collect();
        let sid = |base: u32, i: usize, j: u32| base + SIDS_PER_RING * i as u32 + j;
        let ring_plans: Vec<RingPlan> = (0..rings)
            .map(|i| {
                let v = i % viommus;
                // A vSID bound in another vIOMMU (the next ring's, if it belongs elsewhere).
                let other = (i + 1) % rings;
                let foreign = if other % viommus != v {
                    sid(VSID_BASE, other, 0)
                } else {
                    sid(VSID_BASE, i, 3)
                };
                RingPlan {
                    viommu: v,
                    vsids: [sid(VSID_BASE, i, 0), sid(VSID_BASE, i, 1)],
                    psids: [sid(PSID_BASE, i, 0), sid(PSID_BASE, i, 1)],
                    foreign_vsids: [foreign, sid(VSID_BASE, i, 2)],
                    owner: i == v,
                }
            })
            .collect();
        for r in &ring_plans {
            for j in 0..2 {
                vs[r.viommu].bindings.insert(r.vsids[j], r.psids[j]);
            }
        }
        let unbound_bindings = ring_plans
            .iter()
            .map(|r| {
                let mut b = vs[r.viommu].bindings.clone();
                b.remove(&r.vsids[1]);
                b
            })
            .collect();
        Ok(Plan {
            viommus: vs,
            rings: ring_plans,
            unbound_bindings,
        })
    }

    /// The vIOMMU of ring `ring`.
    pub fn viommu_of(&self, ring: usize) -> &ViommuPlan {
        &self.viommus[self.rings[ring].viommu]
    }

    /// The bindings ring `ring`'s commands are translated with: its vIOMMU's, less its second
    /// device while that is `unbound`.
    pub fn bindings(&self, ring: usize, unbound: bool) -> &HashMap<u32, u32> {
        if unbound {
            &self.unbound_bindings[ring]
        } else {
            &self.viommu_of(ring).bindings
        }
    }

    /// The engine's id of ring `ring`'s device `j` (0 or 1).
    pub fn device(&self, ring: usize, j: usize) -> u32 {
        (ring * 2 + j) as u32
    }

    /// The ring that owns pSID `psid`, if any.
    pub fn ring_of_psid(&self, psid: u32) -> Option<usize> {
        let off = psid.checked_sub(PSID_BASE)?;
        let ring = (off / SIDS_PER_RING) as usize;
        (off % SIDS_PER_RING < 2 && ring < self.rings.len()).then_some(ring)
    }

    /// The owner ring of the vIOMMU whose VMID is `vmid`, if any.
    pub fn ring_of_vmid(&self, vmid: u16) -> Option<usize> {
        let v = vmid.checked_sub(VMID_BASE)? as usize;
        (v < self.viommus.len()).then_some(v)
    }

    /// The devices to add: (device id, physical SMMU, pSID) and the vIOMMU index and vSID to
    /// bind each to.
    pub fn devices(&self) -> impl Iterator<Item = (u32, u32, u32, usize, u32)> + '_ {
        self.rings.iter().enumerate().flat_map(move |(i, r)| {
            let smmu = self.viommus[r.viommu].cfg.smmu;
            (0..2).map(move |j| ((i * 2 + j) as u32, smmu, r.psids[j], r.viommu, r.vsids[j]))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psids_and_vmids_name_their_ring() {
        let p = Plan::new(4, 9).unwrap();
        for (i, r) in p.rings.iter().enumerate() {
            assert_eq!(p.ring_of_psid(r.psids[0]), Some(i));
            assert_eq!(p.ring_of_psid(r.psids[1]), Some(i));
            assert_eq!(p.ring_of_psid(r.psids[1] + 1), None);
            for f in r.foreign_vsids {
                assert!(!p.viommu_of(i).bindings.contains_key(&f));
            }
            if r.owner {
                assert_eq!(p.ring_of_vmid(p.viommu_of(i).cfg.vmid), Some(i));
            }
        }
        assert_eq!(p.rings.iter().filter(|r| r.owner).count(), 4);
        assert_eq!(p.ring_of_psid(PSID_BASE + 9 * SIDS_PER_RING), None);
        assert_eq!(p.ring_of_vmid(VMID_BASE + 4), None);
        assert!(Plan::new(4, 3).is_err());
        assert!(Plan::new(1, MAX_RINGS + 1).is_err());
    }
}
