//! The `key=value,...` specs `vcmdq serve` takes for vIOMMUs, devices, bindings and rings.
//! Command-line text is untrusted: every malformed spec is a typed error naming the key. The
//! message does not repeat the spec (clap and the config reader already show it, once), and
//! what it quotes is cut to [`SHOWN`] characters, so a huge bad value is never echoed whole.

use super::clip;
use vcmdq::command::text;

/// The most characters of a part of a spec an error message quotes.
pub const SHOWN: usize = 64;
use vcmdq::viommu::{Profile, SmmuFeatures, ViommuConfig};

/// A malformed spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A part that is not `key=value` (or a known flag).
    #[error("{part:?} is not key=value (expected {expected})")]
    Shape {
        /// The spec, cut to [`SHOWN`] characters.
        spec: String,
        /// The part.
        part: String,
        /// The keys the spec takes.
        expected: &'static str,
    },
    /// A key the spec does not take.
    #[error("unknown key {key:?} (expected {expected})")]
    UnknownKey {
        /// The spec, cut to [`SHOWN`] characters.
        spec: String,
        /// The key.
        key: String,
        /// The keys the spec takes.
        expected: &'static str,
    },
    /// A key given twice.
    #[error("{key} given twice")]
    Repeated {
        /// The spec, cut to [`SHOWN`] characters.
        spec: String,
        /// The key.
        key: &'static str,
    },
    /// A required key is missing.
    #[error("{key} is missing (expected {expected})")]
    Missing {
        /// The spec, cut to [`SHOWN`] characters.
        spec: String,
        /// The key.
        key: &'static str,
        /// The keys the spec takes.
        expected: &'static str,
    },
    /// A value that does not parse or does not fit.
    #[error("{key}: {why}")]
    Value {
        /// The spec, cut to [`SHOWN`] characters.
        spec: String,
        /// The key.
        key: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// A host device: `id=1,smmu=0,psid=0x800`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Its id.
    pub id: u32,
    /// The physical SMMU it sits behind.
    pub smmu: u32,
    /// Its physical StreamID.
    pub psid: u32,
}

/// A binding: `viommu=1,device=1,vsid=0x10`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindSpec {
    /// The vIOMMU.
    pub viommu: u32,
    /// The device.
    pub device: u32,
    /// The vSID it gets there.
    pub vsid: u32,
}

/// A ring the engine creates: `viommu=1,log2size=8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateRingSpec {
    /// The vIOMMU whose commands it carries.
    pub viommu: u32,
    /// 2^log2size slots.
    pub log2size: u8,
}

/// The parts of one spec, each key known and given once.
struct Parts<'a> {
    spec: &'a str,
    expected: &'static str,
    values: Vec<(&'static str, &'a str)>,
    flags: Vec<&'static str>,
}

impl<'a> Parts<'a> {
    /// Splits `spec` at commas into `key=value` pairs of `keys` and bare `flags`.
    fn parse(
        spec: &'a str,
        keys: &[&'static str],
        flags: &[&'static str],
        expected: &'static str,
    ) -> Result<Parts<'a>, SpecError> {
        let mut p = Parts {
            spec,
            expected,
            values: Vec::new(),
            flags: Vec::new(),
        };
        for part in spec.split(',').map(str::trim) {
            if let Some(&flag) = flags.iter().find(|f| f.eq_ignore_ascii_case(part)) {
                if p.flags.contains(&flag) {
                    return Err(p.repeated(flag));
                }
                p.flags.push(flag);
                continue;
            }
            let Some((k, v)) = part.split_once('=') else {
                return Err(SpecError::Shape {
                    spec: clip(spec, SHOWN),
                    part: clip(part, SHOWN),
                    expected,
                });
            };
            let k = k.trim();
            let Some(&key) = keys.iter().find(|x| x.eq_ignore_ascii_case(k)) else {
                return Err(SpecError::UnknownKey {
                    spec: clip(spec, SHOWN),
                    key: clip(k, SHOWN),
                    expected,
                });
            };
            if p.values.iter().any(|(x, _)| *x == key) {
                return Err(p.repeated(key));
            }
            p.values.push((key, v.trim()));
        }
        Ok(p)
    }

    fn repeated(&self, key: &'static str) -> SpecError {
        SpecError::Repeated {
            spec: clip(self.spec, SHOWN),
            key,
        }
    }

    fn get(&self, key: &'static str) -> Option<&'a str> {
        self.values.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    fn flag(&self, flag: &'static str) -> bool {
        self.flags.contains(&flag)
    }

    fn value_err(&self, key: &'static str, why: String) -> SpecError {
        SpecError::Value {
            spec: clip(self.spec, SHOWN),
            key,
            why: clip(&why, 2 * SHOWN),
        }
    }

    /// The number under `key`, at most `max`; `None` if absent.
    fn num(&self, key: &'static str, max: u64) -> Result<Option<u64>, SpecError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = text::parse_u64(v).map_err(|why| self.value_err(key, why))?;
        if n > max {
            return Err(self.value_err(key, format!("{n} is above {max}")));
        }
        Ok(Some(n))
    }

    /// The number under `key`, which must be there.
    fn required(&self, key: &'static str, max: u64) -> Result<u64, SpecError> {
        self.num(key, max)?.ok_or_else(|| SpecError::Missing {
            spec: clip(self.spec, SHOWN),
            key,
            expected: self.expected,
        })
    }
}

const U32: u64 = u32::MAX as u64;

/// `id=1,vmid=5,smmu=0[,profile=kernel|tegra241][,sidsize=16][,no-range][,max-vsids=N]
/// [,max-table-bytes=N][,shares-vmid-with=ID][,smmu-features=PRESET | ,idr0=..,idr1=..,idr3=..,
/// idr5=..][,ds=0|1][,sid-slots=N]`.
///
/// The physical SMMU's features come from a preset (`smmu-features`) or from the raw values of
/// SMMU_IDR0, IDR1, IDR3 and IDR5 (all four), default `any`; its RIL decides range support, and
/// `no-range` (translate's `--no-range`; `norange`, the older spelling, is still read) then
/// clears it. `ds` sets SMMU_IDR5.DS. `sid-slots` is a `tegra241` VINTF's count
/// of SID slots (default 16).
pub fn parse_viommu(spec: &str) -> Result<ViommuConfig, SpecError> {
    // Short enough that a config error quoting a cut key still fits the config reader's
    // message (the doc comment above has the long form).
    const EXPECTED: &str = "id=N,vmid=N,smmu=N[,profile=P][,sidsize=N][,no-range][,max-vsids=N]\
        [,max-table-bytes=N][,shares-vmid-with=ID][,smmu-features=P][,idr0/1/3/5=N][,ds=B]\
        [,sid-slots=N]";
    let p = Parts::parse(
        spec,
        &[
            "id",
            "vmid",
            "smmu",
            "profile",
            "sidsize",
            "max-vsids",
            "max-table-bytes",
            "shares-vmid-with",
            "smmu-features",
            "idr0",
            "idr1",
            "idr3",
            "idr5",
            "ds",
            "sid-slots",
        ],
        &["no-range", "norange"],
        EXPECTED,
    )?;
    let mut cfg = ViommuConfig::new(
        p.required("id", U32)? as u32,
        p.required("vmid", u64::from(u16::MAX))? as u16,
        p.required("smmu", U32)? as u32,
    );
    if let Some(v) = p.get("profile") {
        cfg.profile = v
            .parse::<Profile>()
            .map_err(|e| p.value_err("profile", e.to_string()))?;
    }
    if let Some(s) = p.num("sidsize", 32)? {
        if s == 0 {
            return Err(p.value_err("sidsize", "0 is below 1".into()));
        }
        cfg.sidsize = s as u8;
    }
    let idrs = ["idr0", "idr1", "idr3", "idr5"]
        .into_iter()
        .map(|k| p.num(k, U32).map(|n| n.map(|n| n as u32)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut features = match (p.get("smmu-features"), &idrs[..]) {
        (Some(_), [None, None, None, None]) | (None, [None, None, None, None]) => {
            let name = p.get("smmu-features").unwrap_or("any");
            SmmuFeatures::preset(name).map_err(|e| p.value_err("smmu-features", e.to_string()))?
        }
        (None, [Some(i0), Some(i1), Some(i3), Some(i5)]) => {
            SmmuFeatures::from_idr(*i0, *i1, *i3, *i5, false)
                .map_err(|e| p.value_err("idr1", e.to_string()))?
        }
        (Some(_), _) => {
            return Err(p.value_err(
                "smmu-features",
                "give a preset or the ID registers, not both".into(),
            ))
        }
        (None, _) => {
            return Err(p.value_err(
                "idr0",
                "give all four of idr0, idr1, idr3 and idr5 (or a preset: smmu-features=)".into(),
            ))
        }
    };
    if let Some(ds) = p.num("ds", 1)? {
        features.ds = ds == 1;
    }
    cfg = cfg.with_smmu(features);
    if p.flag("no-range") || p.flag("norange") {
        cfg.range_inv = false;
    }
    if let Some(n) = p.num("sid-slots", U32)? {
        if n == 0 {
            return Err(p.value_err("sid-slots", "0 is below 1".into()));
        }
        cfg.tegra241_sid_slots = n as u32;
    }
    if let Some(n) = p.num("max-vsids", U32)? {
        if n == 0 {
            return Err(p.value_err("max-vsids", "0 is below 1".into()));
        }
        cfg.max_vsids = n as u32;
    }
    if let Some(n) = p.num("max-table-bytes", u64::MAX)? {
        cfg.max_table_bytes = n;
    }
    cfg.shares_vmid_with = p.num("shares-vmid-with", U32)?.map(|n| n as u32);
    Ok(cfg)
}

/// `id=1,smmu=0,psid=0x800`.
pub fn parse_device(spec: &str) -> Result<DeviceSpec, SpecError> {
    let p = Parts::parse(spec, &["id", "smmu", "psid"], &[], "id=N,smmu=N,psid=N")?;
    Ok(DeviceSpec {
        id: p.required("id", U32)? as u32,
        smmu: p.required("smmu", U32)? as u32,
        psid: p.required("psid", U32)? as u32,
    })
}

/// `viommu=1,device=1,vsid=0x10`.
pub fn parse_bind(spec: &str) -> Result<BindSpec, SpecError> {
    let p = Parts::parse(
        spec,
        &["viommu", "device", "vsid"],
        &[],
        "viommu=N,device=N,vsid=N",
    )?;
    Ok(BindSpec {
        viommu: p.required("viommu", U32)? as u32,
        device: p.required("device", U32)? as u32,
        vsid: p.required("vsid", U32)? as u32,
    })
}

/// `viommu=1[,log2size=8]` (2^8 slots by default).
pub fn parse_create_ring(spec: &str) -> Result<CreateRingSpec, SpecError> {
    let p = Parts::parse(
        spec,
        &["viommu", "log2size"],
        &[],
        "viommu=N[,log2size=0..19]",
    )?;
    Ok(CreateRingSpec {
        viommu: p.required("viommu", U32)? as u32,
        log2size: p.num("log2size", 19)?.unwrap_or(8) as u8,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viommu_specs() {
        let v = parse_viommu("id=1,vmid=5,smmu=0").unwrap();
        assert_eq!(v, ViommuConfig::new(1, 5, 0));
        let v =
            parse_viommu(" smmu=2 , id=0x10, vmid=7,profile=Tegra241,sidsize=16,norange").unwrap();
        assert_eq!(
            (v.id, v.vmid, v.smmu, v.profile, v.sidsize, v.range_inv),
            (16, 7, 2, Profile::Tegra241, 16, false)
        );
        for bad in [
            "id=1,vmid=5",
            "id=1,vmid=70000,smmu=0",
            "id=1,vmid=5,smmu=0,profile=linux",
            "id=1,vmid=5,smmu=0,sidsize=0",
            "id=1,vmid=5,smmu=0,sidsize=33",
            "id=1,vmid=5,smmu=0,id=2",
            "id=1,vmid=5,smmu=0,norange,norange",
            "id=1,vmid=5,smmu=0,colour=red",
            "id=1,vmid=5,smmu=0,range",
            "id=x,vmid=5,smmu=0",
            "",
        ] {
            assert!(parse_viommu(bad).is_err(), "{bad:?}");
        }
        let e = parse_viommu("id=1,vmid=5").unwrap_err().to_string();
        assert!(e.contains("smmu is missing"), "{e}");
    }

    #[test]
    fn viommu_smmu_features_from_a_preset_or_the_id_registers() {
        let v = parse_viommu("id=1,vmid=5,smmu=0").unwrap();
        assert_eq!(v.features, SmmuFeatures::ANY);
        assert!(v.range_inv);
        assert_eq!(v.tegra241_sid_slots, 16);
        let v = parse_viommu("id=1,vmid=5,smmu=0,smmu-features=mmu-600").unwrap();
        assert_eq!(v.features, SmmuFeatures::preset("mmu-600").unwrap());
        assert!(!v.range_inv, "an MMU-600 has no RIL");
        let v = parse_viommu("id=1,vmid=5,smmu=0,smmu-features=qemu,norange,ds=1").unwrap();
        assert!(!v.range_inv && v.features.ds && !v.features.ats);
        let v = parse_viommu("id=1,vmid=5,smmu=0,no-range").unwrap();
        assert!(
            !v.range_inv,
            "no-range, the flag's spelling, clears range invalidation"
        );
        let v = parse_viommu(
            "id=1,vmid=5,smmu=0,idr0=0x1400,idr1=0x0210,idr3=0x400,idr5=0x10,sid-slots=8",
        )
        .unwrap();
        let f = v.features;
        assert!(f.asid16 && f.ats && !f.vmid16 && f.ril && f.gran4k && !f.gran64k);
        assert_eq!((f.sidsize, f.ssidsize, v.tegra241_sid_slots), (16, 8, 8));
        for bad in [
            "id=1,vmid=5,smmu=0,smmu-features=mmu-700",
            "id=1,vmid=5,smmu=0,idr0=1",
            "id=1,vmid=5,smmu=0,smmu-features=qemu,idr0=1,idr1=1,idr3=1,idr5=1",
            "id=1,vmid=5,smmu=0,idr0=0,idr1=33,idr3=0,idr5=0",
            "id=1,vmid=5,smmu=0,ds=2",
            "id=1,vmid=5,smmu=0,sid-slots=0",
        ] {
            assert!(parse_viommu(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn viommu_limits_and_vmid_sharing() {
        let v = parse_viommu("id=2,vmid=5,smmu=0").unwrap();
        assert_eq!(
            (v.max_vsids, v.max_table_bytes, v.shares_vmid_with),
            (
                vcmdq::viommu::DEFAULT_MAX_VSIDS,
                vcmdq::viommu::DEFAULT_MAX_TABLE_BYTES,
                None
            )
        );
        let v = parse_viommu(
            "id=2,vmid=5,smmu=0,max-vsids=1_000_000,max-table-bytes=0x1000_0000,shares-vmid-with=1",
        )
        .unwrap();
        assert_eq!(
            (v.max_vsids, v.max_table_bytes, v.shares_vmid_with),
            (1_000_000, 0x1000_0000, Some(1))
        );
        for bad in [
            "id=1,vmid=5,smmu=0,max-vsids=0",
            "id=1,vmid=5,smmu=0,max-vsids=0x1_0000_0000",
            "id=1,vmid=5,smmu=0,max-vsids=-1",
            "id=1,vmid=5,smmu=0,max-table-bytes=lots",
            "id=1,vmid=5,smmu=0,shares-vmid-with=",
            "id=1,vmid=5,smmu=0,shares-vmid-with=1,shares-vmid-with=2",
        ] {
            assert!(parse_viommu(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn device_bind_and_ring_specs() {
        assert_eq!(
            parse_device("id=1,smmu=0,psid=0x800").unwrap(),
            DeviceSpec {
                id: 1,
                smmu: 0,
                psid: 0x800
            }
        );
        assert_eq!(
            parse_bind("vsid=0x10,device=3,viommu=2").unwrap(),
            BindSpec {
                viommu: 2,
                device: 3,
                vsid: 0x10
            }
        );
        assert_eq!(
            parse_create_ring("viommu=1").unwrap(),
            CreateRingSpec {
                viommu: 1,
                log2size: 8
            }
        );
        assert_eq!(
            parse_create_ring("viommu=1,log2size=0").unwrap().log2size,
            0
        );
        for bad in ["viommu=1,log2size=20", "log2size=4", "viommu=1,size=4"] {
            assert!(parse_create_ring(bad).is_err(), "{bad:?}");
        }
        assert!(parse_device("id=1,smmu=0,psid=0x1_0000_0000").is_err());
        assert!(parse_bind("viommu=1,device=1").is_err());
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        /// Longest message a spec error may have whatever the input: it quotes at most two
        /// parts, each cut to SHOWN characters, and a quoted character takes at most 10 bytes
        /// once escaped (`\u{10ffff}`); the rest, the longest expected form (the --viommu
        /// spec's, about 250 characters) included, is fixed text under 600 bytes. An input of
        /// 2,000 characters would break this bound if it were echoed whole.
        const MAX_MESSAGE: usize = 2 * 10 * SHOWN + 600;

        fn all(s: &str) -> Vec<Result<(), SpecError>> {
            vec![
                parse_viommu(s).map(drop),
                parse_device(s).map(drop),
                parse_bind(s).map(drop),
                parse_create_ring(s).map(drop),
            ]
        }

        proptest! {
            #[test]
            fn any_text_parses_or_gets_a_bounded_error(s in ".{0,2000}") {
                for r in all(&s) {
                    if let Err(e) = r {
                        prop_assert!(e.to_string().len() <= MAX_MESSAGE, "{}", e);
                    }
                }
            }

            #[test]
            fn specs_made_of_known_keys_and_junk_never_panic(
                parts in prop::collection::vec(
                    prop_oneof![
                        "(id|vmid|smmu|psid|viommu|device|vsid|log2size|sidsize|profile)=[0-9a-fx_]{0,24}",
                        Just("norange".to_string()),
                        ".{0,30}",
                    ],
                    0..8,
                )
            ) {
                let s = parts.join(",");
                for r in all(&s) {
                    if let Err(e) = r {
                        prop_assert!(e.to_string().len() <= MAX_MESSAGE, "{}", e);
                    }
                }
            }

            #[test]
            fn written_specs_read_back(id: u32, vmid: u16, smmu: u32, psid: u32, vsid: u32, log2 in 0u8..=19) {
                let v = parse_viommu(&format!("id={id},vmid={vmid:#x},smmu={smmu}")).unwrap();
                prop_assert_eq!((v.id, v.vmid, v.smmu), (id, vmid, smmu));
                let d = parse_device(&format!("psid={psid:#x},id={id},smmu={smmu}")).unwrap();
                prop_assert_eq!(d, DeviceSpec { id, smmu, psid });
                let b = parse_bind(&format!("viommu={id},device={smmu},vsid={vsid}")).unwrap();
                prop_assert_eq!(b, BindSpec { viommu: id, device: smmu, vsid });
                let c = parse_create_ring(&format!("viommu={id},log2size={log2}")).unwrap();
                prop_assert_eq!(c, CreateRingSpec { viommu: id, log2size: log2 });
            }
        }
    }
}
