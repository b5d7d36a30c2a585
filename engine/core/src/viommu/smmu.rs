//! The physical SMMU's features a vIOMMU inherits: the fields of its ID registers that decide
//! whether a guest command is one the SMMU can execute (docs/rules.md, "The physical SMMU").
//!
//! Read from raw register values at the architecture's bit positions (SMMU_IDR0, IDR1, IDR3,
//! IDR5), or taken from a named preset. SMMU_IDR5.DS (52-bit addresses with 4K/16K granules) is
//! a setting of its own: its bit position could not be checked against the sources this model is
//! written from, so it is never guessed out of a register value.

/// SMMU_IDR0.S2P, bit 0: stage 2 translation.
const IDR0_S2P: u32 = 1 << 0;
/// SMMU_IDR0.S1P, bit 1: stage 1 translation.
const IDR0_S1P: u32 = 1 << 1;
/// SMMU_IDR0.ATS, bit 10: PCIe ATS, and so ATC_INV.
const IDR0_ATS: u32 = 1 << 10;
/// SMMU_IDR0.ASID16, bit 12: 16-bit ASIDs (else 8).
const IDR0_ASID16: u32 = 1 << 12;
/// SMMU_IDR0.VMID16, bit 18: 16-bit VMIDs (else 8).
const IDR0_VMID16: u32 = 1 << 18;
/// SMMU_IDR1.SIDSIZE, bits [5:0].
const IDR1_SIDSIZE_SHIFT: u32 = 0;
/// SMMU_IDR1.SSIDSIZE, bits [10:6].
const IDR1_SSIDSIZE_SHIFT: u32 = 6;
/// SMMU_IDR3.RIL, bit 10: range invalidation.
const IDR3_RIL: u32 = 1 << 10;
/// SMMU_IDR5.GRAN4K, bit 4.
const IDR5_GRAN4K: u32 = 1 << 4;
/// SMMU_IDR5.GRAN16K, bit 5.
const IDR5_GRAN16K: u32 = 1 << 5;
/// SMMU_IDR5.GRAN64K, bit 6.
const IDR5_GRAN64K: u32 = 1 << 6;

/// The largest SIDSIZE (SMMU_IDR1.SIDSIZE): StreamIDs are at most 32 bits.
pub const MAX_SIDSIZE: u8 = 32;
/// The largest SSIDSIZE (SMMU_IDR1.SSIDSIZE): SubstreamIDs are at most 20 bits.
pub const MAX_SSIDSIZE: u8 = 20;

/// What one physical SMMU supports, as far as guest commands are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SmmuFeatures {
    /// SMMU_IDR0.ASID16: without it ASIDs are 8 bits and a TLBI with ASID\[15:8\] set is refused.
    pub asid16: bool,
    /// SMMU_IDR0.VMID16: without it a vIOMMU's VMID must fit 8 bits (checked at creation).
    pub vmid16: bool,
    /// SMMU_IDR0.ATS: without it ATC_INV is refused.
    pub ats: bool,
    /// SMMU_IDR0.S1P: stage 1 (recorded; commands do not depend on it here).
    pub s1p: bool,
    /// SMMU_IDR0.S2P: stage 2 (recorded; commands do not depend on it here).
    pub s2p: bool,
    /// SMMU_IDR1.SIDSIZE, 0..=32: pSIDs have this many bits.
    pub sidsize: u8,
    /// SMMU_IDR1.SSIDSIZE, 0..=20: 0 means no substreams (SSV, SSID, GLOBAL refused); else
    /// an SSID needing more bits is refused.
    pub ssidsize: u8,
    /// SMMU_IDR3.RIL: range invalidation (a vIOMMU takes it as its `range_inv`).
    pub ril: bool,
    /// SMMU_IDR5.GRAN4K.
    pub gran4k: bool,
    /// SMMU_IDR5.GRAN16K.
    pub gran16k: bool,
    /// SMMU_IDR5.GRAN64K.
    pub gran64k: bool,
    /// SMMU_IDR5.DS: 52-bit addresses with 4K and 16K granules, which gives the 16K granule a
    /// level-1 leaf (TTL=1).
    pub ds: bool,
}

impl Default for SmmuFeatures {
    /// [`SmmuFeatures::ANY`].
    fn default() -> Self {
        SmmuFeatures::ANY
    }
}

/// A bad SMMU description.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SmmuError {
    /// A field of a register value outside what the architecture allows.
    #[error("{field} is {value}, above {max}")]
    FieldTooLarge {
        /// The field, e.g. `SMMU_IDR1.SIDSIZE`.
        field: &'static str,
        /// The value read.
        value: u8,
        /// The largest allowed.
        max: u8,
    },
    /// A name that is no preset.
    #[error("unknown SMMU preset {0:?}: the presets are {list}", list = SmmuFeatures::preset_names())]
    UnknownPreset(String),
}

impl SmmuFeatures {
    /// Everything a command may use: what the `kernel` profile accepted before SMMU features
    /// were modelled, and so the default (16-bit ASIDs and VMIDs, ATS, 32-bit SIDs, 20-bit
    /// SSIDs, range invalidation, every granule, DS).
    pub const ANY: SmmuFeatures = SmmuFeatures {
        asid16: true,
        vmid16: true,
        ats: true,
        s1p: true,
        s2p: true,
        sidsize: MAX_SIDSIZE,
        ssidsize: MAX_SSIDSIZE,
        ril: true,
        gran4k: true,
        gran16k: true,
        gran64k: true,
        ds: true,
    };

    /// The named presets: name, SMMU_IDR0, IDR1, IDR3, IDR5 and DS.
    ///
    /// - `any`: [`SmmuFeatures::ANY`];
    /// - `smmuv3.2`: an SMMUv3.2 with both stages, 16-bit ASIDs/VMIDs, ATS, 32-bit SIDs,
    ///   20-bit SSIDs, range invalidation, 4K/16K/64K granules;
    /// - `mmu-600`: an SMMUv3.1 part like Arm's MMU-600: as `smmuv3.2` without range
    ///   invalidation (RIL came with SMMUv3.2);
    /// - `qemu`: QEMU's emulated SMMUv3 as its `smmuv3_init_regs` sets it up by default
    ///   (stage 1 only, 16-bit ASIDs and VMIDs, no ATS, 16-bit SIDs, no substreams, RIL,
    ///   every granule, 44-bit OAS).
    pub const PRESETS: [(&'static str, [u32; 4], bool); 4] = [
        ("any", [0, 0, 0, 0], true),
        (
            "smmuv3.2",
            [
                IDR0_S1P | IDR0_S2P | IDR0_ATS | IDR0_ASID16 | IDR0_VMID16,
                32 << IDR1_SIDSIZE_SHIFT | 20 << IDR1_SSIDSIZE_SHIFT,
                IDR3_RIL,
                IDR5_GRAN4K | IDR5_GRAN16K | IDR5_GRAN64K | 5,
            ],
            false,
        ),
        (
            "mmu-600",
            [
                IDR0_S1P | IDR0_S2P | IDR0_ATS | IDR0_ASID16 | IDR0_VMID16,
                32 << IDR1_SIDSIZE_SHIFT | 20 << IDR1_SSIDSIZE_SHIFT,
                0,
                IDR5_GRAN4K | IDR5_GRAN16K | IDR5_GRAN64K | 5,
            ],
            false,
        ),
        (
            "qemu",
            // IDR0: S1P, TTF=AArch64, COHACC, ASID16, VMID16, TTENDIAN=LE, STALL_MODEL=1,
            // TERM_MODEL, ST_LEVEL=2-level. IDR1: SIDSIZE 16, EVENTQS 19, CMDQS 19.
            // IDR3: HAD, RIL, BBML=2. IDR5: OAS 44 bits, every granule.
            [0x0d44_101a, 0x0273_0010, 0x0000_1404, 0x0000_0074],
            false,
        ),
    ];

    /// The features in SMMU_IDR0, IDR1, IDR3 and IDR5 as the architecture lays them out, with
    /// DS as given. Fields commands do not depend on are ignored.
    pub fn from_idr(
        idr0: u32,
        idr1: u32,
        idr3: u32,
        idr5: u32,
        ds: bool,
    ) -> Result<SmmuFeatures, SmmuError> {
        let sidsize = ((idr1 >> IDR1_SIDSIZE_SHIFT) & 0x3f) as u8;
        let ssidsize = ((idr1 >> IDR1_SSIDSIZE_SHIFT) & 0x1f) as u8;
        if sidsize > MAX_SIDSIZE {
            return Err(SmmuError::FieldTooLarge {
                field: "SMMU_IDR1.SIDSIZE",
                value: sidsize,
                max: MAX_SIDSIZE,
            });
        }
        if ssidsize > MAX_SSIDSIZE {
            return Err(SmmuError::FieldTooLarge {
                field: "SMMU_IDR1.SSIDSIZE",
                value: ssidsize,
                max: MAX_SSIDSIZE,
            });
        }
        Ok(SmmuFeatures {
            asid16: idr0 & IDR0_ASID16 != 0,
            vmid16: idr0 & IDR0_VMID16 != 0,
            ats: idr0 & IDR0_ATS != 0,
            s1p: idr0 & IDR0_S1P != 0,
            s2p: idr0 & IDR0_S2P != 0,
            sidsize,
            ssidsize,
            ril: idr3 & IDR3_RIL != 0,
            gran4k: idr5 & IDR5_GRAN4K != 0,
            gran16k: idr5 & IDR5_GRAN16K != 0,
            gran64k: idr5 & IDR5_GRAN64K != 0,
            ds,
        })
    }

    /// The preset `name` (case-insensitive).
    pub fn preset(name: &str) -> Result<SmmuFeatures, SmmuError> {
        let Some(&(_, idr, ds)) = Self::PRESETS
            .iter()
            .find(|(n, _, _)| n.eq_ignore_ascii_case(name))
        else {
            return Err(SmmuError::UnknownPreset(name.to_string()));
        };
        if name.eq_ignore_ascii_case("any") {
            return Ok(SmmuFeatures::ANY);
        }
        Self::from_idr(idr[0], idr[1], idr[2], idr[3], ds)
    }

    /// The preset names, comma-separated (for messages).
    pub fn preset_names() -> String {
        Self::PRESETS
            .iter()
            .map(|(n, _, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The name of the preset these features are, if any.
    pub fn preset_name(&self) -> Option<&'static str> {
        Self::PRESETS
            .iter()
            .map(|(n, _, _)| *n)
            .find(|n| Self::preset(n).as_ref() == Ok(self))
    }

    /// Whether the SMMU supports the granule TG encodes (1 = 4K, 2 = 16K, 3 = 64K).
    pub fn granule(&self, tg: u8) -> bool {
        match tg {
            1 => self.gran4k,
            2 => self.gran16k,
            3 => self.gran64k,
            _ => false,
        }
    }

    /// Whether TTL (the level of the leaf, 1..=3) is one the granule TG can have: with 4K
    /// levels 1 to 3; with 16K level 1 only with DS (52-bit addresses), 2 and 3 always; with
    /// 64K levels 1 to 3. TTL=0 (no level given) is handled by the caller.
    pub fn ttl(&self, tg: u8, ttl: u8) -> bool {
        match (tg, ttl) {
            (2, 1) => self.ds,
            (1..=3, 1..=3) => true,
            _ => false,
        }
    }

    /// One line for tools: the preset's name or the fields.
    pub fn describe(&self) -> String {
        if let Some(n) = self.preset_name() {
            return n.to_string();
        }
        let b = |x: bool| u8::from(x);
        format!(
            "asid16={} vmid16={} ats={} s1p={} s2p={} sidsize={} ssidsize={} ril={} \
             gran4k={} gran16k={} gran64k={} ds={}",
            b(self.asid16),
            b(self.vmid16),
            b(self.ats),
            b(self.s1p),
            b(self.s2p),
            self.sidsize,
            self.ssidsize,
            b(self.ril),
            b(self.gran4k),
            b(self.gran16k),
            b(self.gran64k),
            b(self.ds)
        )
    }
}

impl SmmuFeatures {
    /// Whether these are [`SmmuFeatures::ANY`] but for RIL, which a vIOMMU records on its own
    /// (`range_inv`): what a trace writes without a features field.
    pub fn is_any_but_ril(&self) -> bool {
        SmmuFeatures { ril: true, ..*self } == SmmuFeatures::ANY
    }

    /// The three bytes a trace's ViommuCreate records them in (traces/FORMAT.md), RIL aside:
    /// byte 0 ASID16, VMID16, ATS, GRAN4K, GRAN16K, GRAN64K, DS, S1P from bit 0 up; byte 1
    /// SSIDSIZE in bits \[4:0\] and S2P in bit 5; byte 2 SIDSIZE.
    pub fn to_trace_bytes(&self) -> [u8; 3] {
        let bits = [
            self.asid16,
            self.vmid16,
            self.ats,
            self.gran4k,
            self.gran16k,
            self.gran64k,
            self.ds,
            self.s1p,
        ];
        let b0 = bits
            .iter()
            .enumerate()
            .fold(0u8, |acc, (i, &b)| acc | u8::from(b) << i);
        [b0, self.ssidsize | u8::from(self.s2p) << 5, self.sidsize]
    }

    /// The features in a trace's three bytes, with `ril` from the record's flags; an error
    /// names the first value the format does not allow.
    pub fn from_trace_bytes(b: [u8; 3], ril: bool) -> Result<SmmuFeatures, SmmuError> {
        let bit = |i: u32| b[0] >> i & 1 != 0;
        if b[1] & 0xc0 != 0 {
            return Err(SmmuError::FieldTooLarge {
                field: "features byte 30 (bits 6 and 7 are 0)",
                value: b[1],
                max: 0x3f,
            });
        }
        let ssidsize = b[1] & 0x1f;
        for (field, value, max) in [
            ("SSIDSIZE (features byte 30)", ssidsize, MAX_SSIDSIZE),
            ("SIDSIZE (features byte 31)", b[2], MAX_SIDSIZE),
        ] {
            if value > max {
                return Err(SmmuError::FieldTooLarge { field, value, max });
            }
        }
        Ok(SmmuFeatures {
            asid16: bit(0),
            vmid16: bit(1),
            ats: bit(2),
            gran4k: bit(3),
            gran16k: bit(4),
            gran64k: bit(5),
            ds: bit(6),
            s1p: bit(7),
            s2p: b[1] & 0x20 != 0,
            ssidsize,
            sidsize: b[2],
            ril,
        })
    }

    /// The text form a trace dump writes: a preset's name when one matches (RIL aside), else
    /// the three trace bytes as `0xSSIIAA` (byte 2, byte 1, byte 0).
    pub fn to_text(&self) -> String {
        let b = self.to_trace_bytes();
        Self::PRESETS
            .iter()
            .map(|(n, _, _)| *n)
            .find(|n| {
                Self::preset(n)
                    .map(|p| p.to_trace_bytes() == b)
                    .unwrap_or(false)
            })
            .map_or_else(
                || format!("{:#08x}", u32::from_le_bytes([b[0], b[1], b[2], 0])),
                str::to_string,
            )
    }

    /// Reads [`SmmuFeatures::to_text`] back, with `ril` from the record.
    pub fn from_text(s: &str, ril: bool) -> Result<SmmuFeatures, SmmuError> {
        if let Ok(p) = Self::preset(s) {
            return Ok(SmmuFeatures { ril, ..p });
        }
        let hex = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"));
        match hex.and_then(|h| u32::from_str_radix(&h.replace('_', ""), 16).ok()) {
            Some(v) if v >> 24 == 0 => {
                let [b0, b1, b2, _] = v.to_le_bytes();
                Self::from_trace_bytes([b0, b1, b2], ril)
            }
            _ => Err(SmmuError::UnknownPreset(s.to_string())),
        }
    }
}

impl core::str::FromStr for SmmuFeatures {
    type Err = SmmuError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SmmuFeatures::preset(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_register_fields_are_read_at_the_architectures_bit_positions() {
        let f = SmmuFeatures::from_idr(
            IDR0_ASID16 | IDR0_ATS,
            7 << 6 | 24,
            IDR3_RIL,
            IDR5_GRAN64K,
            false,
        )
        .unwrap();
        assert!(f.asid16 && f.ats && !f.vmid16 && !f.s1p && !f.s2p);
        assert_eq!((f.sidsize, f.ssidsize), (24, 7));
        assert!(f.ril && f.gran64k && !f.gran4k && !f.gran16k && !f.ds);
        // Each bit alone.
        for (bit, get) in [
            (0, (|f: &SmmuFeatures| f.s2p) as fn(&SmmuFeatures) -> bool),
            (1, |f| f.s1p),
            (10, |f| f.ats),
            (12, |f| f.asid16),
            (18, |f| f.vmid16),
        ] {
            let f = SmmuFeatures::from_idr(1 << bit, 0, 0, 0, false).unwrap();
            assert!(get(&f), "IDR0 bit {bit}");
            let g = SmmuFeatures::from_idr(!(1 << bit), 0, 0, 0, false).unwrap();
            assert!(!get(&g), "IDR0 without bit {bit}");
        }
        for (bit, get) in [
            (
                4,
                (|f: &SmmuFeatures| f.gran4k) as fn(&SmmuFeatures) -> bool,
            ),
            (5, |f| f.gran16k),
            (6, |f| f.gran64k),
        ] {
            assert!(get(
                &SmmuFeatures::from_idr(0, 0, 0, 1 << bit, false).unwrap()
            ));
        }
        assert!(
            !SmmuFeatures::from_idr(0, 0, !IDR3_RIL, 0, false)
                .unwrap()
                .ril
        );
    }

    #[test]
    fn qemus_default_registers_read_as_its_smmuv3() {
        let q = SmmuFeatures::preset("qemu").unwrap();
        assert!(q.s1p && !q.s2p && q.asid16 && q.vmid16 && !q.ats && q.ril);
        assert_eq!((q.sidsize, q.ssidsize), (16, 0));
        assert!(q.gran4k && q.gran16k && q.gran64k && !q.ds);
        let m = SmmuFeatures::preset("MMU-600").unwrap();
        assert!(!m.ril && m.ats && m.ssidsize == 20);
        let s = SmmuFeatures::preset("smmuv3.2").unwrap();
        assert!(s.ril && s.ats && s.sidsize == 32);
        assert_eq!(SmmuFeatures::preset("any"), Ok(SmmuFeatures::default()));
        assert_eq!(s.preset_name(), Some("smmuv3.2"));
    }

    #[test]
    fn sizes_beyond_the_architecture_are_refused_and_unknown_presets_named() {
        assert!(SmmuFeatures::from_idr(0, 33, 0, 0, false).is_err());
        assert!(SmmuFeatures::from_idr(0, 21 << 6, 0, 0, false).is_err());
        let e = SmmuFeatures::preset("mmu-700").unwrap_err().to_string();
        assert!(e.contains("mmu-700") && e.contains("smmuv3.2"), "{e}");
    }

    #[test]
    fn trace_bytes_and_text_read_back_for_every_preset_and_odd_sets() {
        let odd = SmmuFeatures {
            asid16: false,
            gran16k: false,
            ssidsize: 7,
            sidsize: 12,
            s2p: false,
            ..SmmuFeatures::ANY
        };
        for (name, _, _) in SmmuFeatures::PRESETS {
            let f = SmmuFeatures::preset(name).unwrap();
            for ril in [false, true] {
                let f = SmmuFeatures { ril, ..f };
                let back = SmmuFeatures::from_trace_bytes(f.to_trace_bytes(), ril).unwrap();
                assert_eq!(back, f, "{name}");
                assert_eq!(
                    SmmuFeatures::from_text(&f.to_text(), ril).unwrap(),
                    f,
                    "{name}"
                );
            }
        }
        let back = SmmuFeatures::from_trace_bytes(odd.to_trace_bytes(), true).unwrap();
        assert_eq!(back, odd);
        assert!(odd.to_text().starts_with("0x"), "{}", odd.to_text());
        assert_eq!(SmmuFeatures::from_text(&odd.to_text(), true).unwrap(), odd);
        assert!(SmmuFeatures::ANY.is_any_but_ril());
        assert!(SmmuFeatures {
            ril: false,
            ..SmmuFeatures::ANY
        }
        .is_any_but_ril());
        assert!(!odd.is_any_but_ril());
        assert!(SmmuFeatures::from_trace_bytes([0, 0x40, 0], true).is_err());
        assert!(SmmuFeatures::from_trace_bytes([0, 21, 0], true).is_err());
        assert!(SmmuFeatures::from_trace_bytes([0, 0, 33], true).is_err());
    }

    #[test]
    fn ttl_per_granule_follows_the_level_each_granule_can_have() {
        let no_ds = SmmuFeatures {
            ds: false,
            ..SmmuFeatures::ANY
        };
        for tg in 1..=3 {
            for ttl in 2..=3 {
                assert!(no_ds.ttl(tg, ttl));
            }
        }
        assert!(no_ds.ttl(1, 1) && no_ds.ttl(3, 1));
        assert!(!no_ds.ttl(2, 1), "16K level 1 needs DS");
        assert!(SmmuFeatures::ANY.ttl(2, 1));
    }
}
