//! The command codec against the SMMUv3 spec tables (IHI 0070, as `docs/rules.md` summarises them), written out again here.
//!
//! Nothing below reads `LAYOUTS` to decide what is right: the expected fields, the RES0 bits and
//! the legal opcodes all come from `SPEC`, copied by hand from the design's table, so a wrong
//! bit in the library's table fails these tests instead of agreeing with itself.

use proptest::prelude::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use vcmdq::command::{
    decode, opcode, opcode_name, res0_bits, text, AtcSpan, Command, DecodeError, Granule,
    RawCommand, SidSpan, TlbiSpan,
};
use vcmdq_trace::json::{error_json, to_json};

/// How the spec shows a field.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum K {
    /// A number.
    N,
    /// A one-bit flag.
    F,
    /// An address: bits in place.
    A,
}

/// `d<word>[hi:lo]`.
#[derive(Clone, Copy, Debug)]
struct F {
    name: &'static str,
    word: usize,
    hi: u32,
    lo: u32,
    kind: K,
}

const fn n(name: &'static str, word: usize, hi: u32, lo: u32) -> F {
    F {
        name,
        word,
        hi,
        lo,
        kind: K::N,
    }
}
const fn flag(name: &'static str, word: usize, bit: u32) -> F {
    F {
        name,
        word,
        hi: bit,
        lo: bit,
        kind: K::F,
    }
}
const fn a(name: &'static str, word: usize, hi: u32, lo: u32) -> F {
    F {
        name,
        word,
        hi,
        lo,
        kind: K::A,
    }
}

// The fields shared by several rows of the spec table.
const SSV: F = flag("ssv", 0, 11);
const SSEC: F = flag("ssec", 0, 10);
const SSID: F = n("ssid", 0, 31, 12);
const SID: F = n("sid", 0, 63, 32);
const VMID: F = n("vmid", 0, 47, 32);
const ASID: F = n("asid", 0, 63, 48);
const NUM: F = n("num", 0, 16, 12);
const SCALE: F = n("scale", 0, 24, 20);
const LEAF: F = flag("leaf", 1, 0);
const TTL: F = n("ttl", 1, 9, 8);
const TG: F = n("tg", 1, 11, 10);
const VA: F = a("addr", 1, 63, 12);

/// The spec's command table, row by row.
const SPEC: &[(u8, &str, &[F])] = &[
    (0x01, "PREFETCH_CONFIG", &[SSV, SSID, SID]),
    (
        0x02,
        "PREFETCH_ADDR",
        &[SSV, SSID, SID, n("size", 1, 4, 0), a("addr", 1, 63, 12)],
    ),
    (0x03, "CFGI_STE", &[SSEC, SID, LEAF]),
    (0x04, "CFGI_STE_RANGE", &[SSEC, SID, n("range", 1, 4, 0)]),
    (0x05, "CFGI_CD", &[SSEC, SSID, SID, LEAF]),
    (0x06, "CFGI_CD_ALL", &[SSEC, SID]),
    (0x10, "TLBI_NH_ALL", &[VMID]),
    (0x11, "TLBI_NH_ASID", &[VMID, ASID]),
    (
        0x12,
        "TLBI_NH_VA",
        &[NUM, SCALE, VMID, ASID, LEAF, TTL, TG, VA],
    ),
    (0x13, "TLBI_NH_VAA", &[NUM, SCALE, VMID, LEAF, TTL, TG, VA]),
    (0x18, "TLBI_EL3_ALL", &[]),
    (0x1a, "TLBI_EL3_VA", &[LEAF, TTL, TG, VA, NUM, SCALE]),
    (0x20, "TLBI_EL2_ALL", &[]),
    (0x21, "TLBI_EL2_ASID", &[ASID]),
    (0x22, "TLBI_EL2_VA", &[NUM, SCALE, ASID, LEAF, TTL, TG, VA]),
    (0x23, "TLBI_EL2_VAA", &[NUM, SCALE, LEAF, TTL, TG, VA]),
    (0x28, "TLBI_S12_VMALL", &[VMID]),
    (
        0x2a,
        "TLBI_S2_IPA",
        &[NUM, SCALE, VMID, LEAF, TTL, TG, a("addr", 1, 51, 12)],
    ),
    (0x30, "TLBI_NSNH_ALL", &[]),
    (
        0x40,
        "ATC_INV",
        &[flag("global", 0, 9), SSV, SSID, SID, n("size", 1, 5, 0), VA],
    ),
    (
        0x41,
        "PRI_RESP",
        &[SSV, SSID, SID, n("grpid", 1, 8, 0), n("resp", 1, 13, 12)],
    ),
    (
        0x44,
        "RESUME",
        &[n("resp", 0, 13, 12), SID, n("stag", 1, 15, 0)],
    ),
    (0x45, "STALL_TERM", &[SID]),
    (
        0x46,
        "CMD_SYNC",
        &[
            n("cs", 0, 13, 12),
            n("msh", 0, 23, 22),
            n("msiattr", 0, 27, 24),
            n("msidata", 0, 63, 32),
            a("msiaddr", 1, 51, 2),
        ],
    ),
];

/// The opcodes the spec leaves illegal, written as ranges.
fn spec_illegal() -> Vec<u8> {
    let mut v = vec![0x00, 0x19, 0x29, 0x42, 0x43];
    v.extend(0x07..=0x0f);
    v.extend(0x14..=0x17);
    v.extend(0x1b..=0x1f);
    v.extend(0x24..=0x27);
    v.extend(0x2b..=0x2f);
    v.extend(0x31..=0x3f);
    v.extend(0x47..=0xff);
    v
}

fn spec(op: u8) -> Option<(&'static str, &'static [F])> {
    SPEC.iter()
        .find(|(o, _, _)| *o == op)
        .map(|(_, name, f)| (*name, *f))
}

fn fmask(f: &F) -> u64 {
    (u64::MAX >> (63 - (f.hi - f.lo))) << f.lo
}

/// Bits a command of `fields` may set, opcode byte included.
fn allowed(fields: &[F]) -> [u64; 2] {
    let mut m = [0xff, 0];
    for f in fields {
        m[f.word] |= fmask(f);
    }
    m
}

fn is_range_tlbi(fields: &[F]) -> bool {
    fields.iter().any(|f| f.name == "tg")
}

/// What the spec says a field of `w` holds, as JSON.
fn spec_value(f: &F, w: [u64; 2]) -> Value {
    let bits = w[f.word] & fmask(f);
    match f.kind {
        K::F => Value::Bool(bits != 0),
        K::A => bits.into(),
        K::N => (bits >> f.lo).into(),
    }
}

fn spec_json(op: u8, w: [u64; 2]) -> Value {
    let (name, fields) = spec(op).unwrap();
    let mut m = serde_json::Map::new();
    m.insert("op".into(), name.into());
    m.insert("opcode".into(), op.into());
    for f in fields {
        m.insert(f.name.into(), spec_value(f, w));
    }
    Value::Object(m)
}

/// What the spec says `decode` must do with `(d0, d1)`.
fn spec_verdict(d0: u64, d1: u64) -> Result<(), DecodeError> {
    let op = d0 as u8;
    let Some((name, fields)) = spec(op) else {
        return Err(DecodeError::IllegalOpcode { opcode: op });
    };
    let m = allowed(fields);
    if d0 & !m[0] != 0 || d1 & !m[1] != 0 {
        return Err(DecodeError::Res0 {
            opcode: op,
            name,
            d0: d0 & !m[0],
            d1: d1 & !m[1],
        });
    }
    if is_range_tlbi(fields) {
        let (tg, num, scale) = ((d1 >> 10) & 3, (d0 >> 12) & 31, (d0 >> 20) & 31);
        if tg == 0 && (num | scale) != 0 {
            return Err(DecodeError::RangeWithoutGranule {
                opcode: op,
                name,
                num: num as u8,
                scale: scale as u8,
            });
        }
    }
    Ok(())
}

/// One hand-built command per opcode, its words put together from the spec's bit positions and
/// the typed value it must decode to. Also the decode fuzz target's seeds.
fn examples() -> Vec<(&'static str, RawCommand, Command)> {
    let r = RawCommand::new;
    vec![
        (
            "PREFETCH_CONFIG",
            r(0x01 | 1 << 11 | 0xabcde << 12 | 0xdead_beef << 32, 0),
            Command::PrefetchConfig {
                ssv: true,
                ssid: 0xabcde,
                sid: 0xdead_beef,
            },
        ),
        (
            "PREFETCH_ADDR",
            r(0x02 | 0x12345 << 12 | 7 << 32, 0x1f | 0xffff_ffff_ffff_f000),
            Command::PrefetchAddr {
                ssv: false,
                ssid: 0x12345,
                sid: 7,
                size: 31,
                addr: 0xffff_ffff_ffff_f000,
            },
        ),
        (
            "CFGI_STE",
            r(0x03 | 1 << 10 | 0x8000_0001 << 32, 1),
            Command::CfgiSte {
                ssec: true,
                sid: 0x8000_0001,
                leaf: true,
            },
        ),
        (
            "CFGI_STE_RANGE",
            r(0x04 | 0x100 << 32, 31),
            Command::CfgiSteRange {
                ssec: false,
                sid: 0x100,
                range: 31,
            },
        ),
        (
            "CFGI_CD",
            r(0x05 | 1 << 10 | 0xfffff << 12 | 0x42 << 32, 0),
            Command::CfgiCd {
                ssec: true,
                ssid: 0xfffff,
                sid: 0x42,
                leaf: false,
            },
        ),
        (
            "CFGI_CD_ALL",
            r(0x06 | 1 << 10 | 0xffff_ffff << 32, 0),
            Command::CfgiCdAll {
                ssec: true,
                sid: 0xffff_ffff,
            },
        ),
        (
            "TLBI_NH_ALL",
            r(0x10 | 0xffff << 32, 0),
            Command::TlbiNhAll { vmid: 0xffff },
        ),
        (
            "TLBI_NH_ASID",
            r(0x11 | 0x1234 << 32 | 0xfedc << 48, 0),
            Command::TlbiNhAsid {
                vmid: 0x1234,
                asid: 0xfedc,
            },
        ),
        (
            "TLBI_NH_VA",
            r(
                0x12 | 31 << 12 | 17 << 20 | 3 << 32 | 7 << 48,
                1 | 2 << 8 | 3 << 10 | 0x7fff_dead_0000,
            ),
            Command::TlbiNhVa {
                vmid: 3,
                asid: 7,
                addr: 0x7fff_dead_0000,
                tg: 3,
                num: 31,
                scale: 17,
                ttl: 2,
                leaf: true,
            },
        ),
        (
            "TLBI_NH_VAA",
            r(
                0x13 | 1 << 12 | 0xffff << 32,
                1 << 10 | 0xffff_0000_0000_1000,
            ),
            Command::TlbiNhVaa {
                vmid: 0xffff,
                addr: 0xffff_0000_0000_1000,
                tg: 1,
                num: 1,
                scale: 0,
                ttl: 0,
                leaf: false,
            },
        ),
        ("TLBI_EL3_ALL", r(0x18, 0), Command::TlbiEl3All {}),
        (
            "TLBI_EL3_VA",
            r(0x1a, 1 | 3 << 8 | 0x4000_0000),
            Command::TlbiEl3Va {
                addr: 0x4000_0000,
                tg: 0,
                num: 0,
                scale: 0,
                ttl: 3,
                leaf: true,
            },
        ),
        ("TLBI_EL2_ALL", r(0x20, 0), Command::TlbiEl2All {}),
        (
            "TLBI_EL2_ASID",
            r(0x21 | 0xffff << 48, 0),
            Command::TlbiEl2Asid { asid: 0xffff },
        ),
        (
            "TLBI_EL2_VA",
            r(
                0x22 | 2 << 12 | 31 << 20 | 9 << 48,
                1 << 8 | 2 << 10 | 0x1_0000_0000,
            ),
            Command::TlbiEl2Va {
                asid: 9,
                addr: 0x1_0000_0000,
                tg: 2,
                num: 2,
                scale: 31,
                ttl: 1,
                leaf: false,
            },
        ),
        (
            "TLBI_EL2_VAA",
            r(0x23 | 1 << 20, 1 | 3 << 10 | 0xffff_ffff_ffff_f000),
            Command::TlbiEl2Vaa {
                addr: 0xffff_ffff_ffff_f000,
                tg: 3,
                num: 0,
                scale: 1,
                ttl: 0,
                leaf: true,
            },
        ),
        (
            "TLBI_S12_VMALL",
            r(0x28 | 0x8001 << 32, 0),
            Command::TlbiS12Vmall { vmid: 0x8001 },
        ),
        (
            "TLBI_S2_IPA",
            r(
                0x2a | 4 << 12 | 3 << 20 | 0x55 << 32,
                1 | 3 << 8 | 1 << 10 | 0x000f_ffff_ffff_f000,
            ),
            Command::TlbiS2Ipa {
                vmid: 0x55,
                addr: 0x000f_ffff_ffff_f000,
                tg: 1,
                num: 4,
                scale: 3,
                ttl: 3,
                leaf: true,
            },
        ),
        ("TLBI_NSNH_ALL", r(0x30, 0), Command::TlbiNsnhAll {}),
        (
            "ATC_INV",
            r(
                0x40 | 1 << 9 | 1 << 11 | 1 << 12 | 0x0001_0203 << 32,
                52 | 0x8000_0000_0000_0000,
            ),
            Command::AtcInv {
                sid: 0x0001_0203,
                ssv: true,
                ssid: 1,
                global: true,
                addr: 0x8000_0000_0000_0000,
                size: 52,
            },
        ),
        (
            "PRI_RESP",
            r(0x41 | 1 << 11 | 0xfffff << 12 | 0x10 << 32, 0x1ff | 2 << 12),
            Command::PriResp {
                sid: 0x10,
                ssv: true,
                ssid: 0xfffff,
                grpid: 0x1ff,
                resp: 2,
            },
        ),
        (
            "RESUME",
            r(0x44 | 2 << 12 | 0x77 << 32, 0xffff),
            Command::Resume {
                sid: 0x77,
                resp: 2,
                stag: 0xffff,
            },
        ),
        (
            "STALL_TERM",
            r(0x45 | 0xffff_fffe << 32, 0),
            Command::StallTerm { sid: 0xffff_fffe },
        ),
        (
            "CMD_SYNC",
            r(
                0x46 | 1 << 12 | 3 << 22 | 0xf << 24 | 0xcafe_f00d << 32,
                0x000f_ffff_ffff_fffc,
            ),
            Command::CmdSync {
                cs: 1,
                msh: 3,
                msiattr: 0xf,
                msidata: 0xcafe_f00d,
                msiaddr: 0x000f_ffff_ffff_fffc,
            },
        ),
    ]
}

#[test]
fn opcode_names_match_spec_table() {
    let illegal = spec_illegal();
    assert_eq!(
        SPEC.len() + illegal.len(),
        256,
        "the spec lists every opcode once"
    );
    for op in 0..=255u8 {
        let want = spec(op).map(|(name, _)| name);
        assert_eq!(opcode_name(op), want, "opcode {op:#04x}");
        assert_eq!(want.is_none(), illegal.contains(&op), "opcode {op:#04x}");
    }
    assert_eq!(opcode::TLBI_NH_VA, 0x12);
    assert_eq!(opcode::CMD_SYNC, 0x46);
    assert_eq!(opcode::ATC_INV, 0x40);
}

#[test]
fn every_opcode_decodes_hand_built_words() {
    let ex = examples();
    assert_eq!(ex.len(), SPEC.len(), "one example per legal opcode");
    for (name, raw, want) in ex {
        let got = decode(raw).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, want, "{name}");
        assert_eq!(got.name(), name);
        assert_eq!(got.opcode(), raw.opcode());
        assert_eq!(got.encode(), raw, "{name}: encode(decode(x)) == x");
        assert_eq!(to_json(&got), spec_json(raw.opcode(), [raw.d0(), raw.d1()]));
    }
}

/// Every field at its all-ones value, then at a value with only its top and bottom bits, for
/// every opcode: the JSON shows exactly the spec's fields with exactly those values.
#[test]
fn every_field_at_its_edges() {
    for &(op, name, fields) in SPEC {
        for f in fields {
            for v in [fmask(f), fmask(f) & (1 << f.lo | 1 << f.hi)] {
                let mut w = [u64::from(op), 0];
                w[f.word] |= v;
                if is_range_tlbi(fields) && matches!(f.name, "num" | "scale") {
                    w[1] |= 1 << 10; // TG=4K, so NUM and SCALE are allowed
                }
                let cmd = decode(RawCommand::new(w[0], w[1]))
                    .unwrap_or_else(|e| panic!("{name}.{}: {e}", f.name));
                let j = to_json(&cmd);
                assert_eq!(j, spec_json(op, w), "{name}.{} = {v:#x}", f.name);
                let keys: Vec<&str> = j.as_object().unwrap().keys().map(|k| k.as_str()).collect();
                assert_eq!(keys.len(), fields.len() + 2, "{name}: {keys:?}");
            }
        }
    }
}

#[test]
fn every_res0_bit_of_every_opcode_is_refused() {
    let mut refused = 0;
    let mut accepted = 0;
    for &(op, name, fields) in SPEC {
        let m = allowed(fields);
        for bit in 8..128 {
            let word = bit / 64;
            let b = 1u64 << (bit % 64);
            let mut w = [u64::from(op), 0];
            w[word] |= b;
            let raw = RawCommand::new(w[0], w[1]);
            if m[word] & b == 0 {
                let mut bits = [0, 0];
                bits[word] = b;
                assert_eq!(
                    decode(raw),
                    Err(DecodeError::Res0 {
                        opcode: op,
                        name,
                        d0: bits[0],
                        d1: bits[1]
                    }),
                    "{name} d{word}[{}]",
                    bit % 64
                );
                assert_eq!(res0_bits(&raw), Some(bits));
                refused += 1;
            } else {
                let f = fields
                    .iter()
                    .find(|f| f.word == word && fmask(f) & b != 0)
                    .unwrap();
                if is_range_tlbi(fields) && matches!(f.name, "num" | "scale") {
                    assert!(
                        matches!(decode(raw), Err(DecodeError::RangeWithoutGranule { .. })),
                        "{name}.{} with TG=0",
                        f.name
                    );
                    w[1] |= 1 << 10;
                }
                let raw = RawCommand::new(w[0], w[1]);
                let cmd = decode(raw).unwrap_or_else(|e| panic!("{name} bit {bit}: {e}"));
                assert_eq!(cmd.encode(), raw);
                assert_eq!(res0_bits(&raw), Some([0, 0]));
                accepted += 1;
            }
        }
        // Everything outside the fields at once: one error naming every bit.
        let all = RawCommand::new(!m[0] | u64::from(op), !m[1]);
        assert_eq!(
            decode(all),
            Err(DecodeError::Res0 {
                opcode: op,
                name,
                d0: !m[0],
                d1: !m[1]
            })
        );
    }
    // 24 opcodes x 120 bits; count both sides so neither loop can silently be empty.
    assert_eq!(refused + accepted, SPEC.len() * 120);
    assert!(refused > 1500 && accepted > 500, "{refused} {accepted}");
}

#[test]
fn every_illegal_opcode_is_refused() {
    for op in spec_illegal() {
        for (d0, d1) in [(0, 0), (!0xff, !0), (0x1234_5678_0000_0000, 1)] {
            let d0 = d0 | u64::from(op);
            let raw = RawCommand::new(d0, d1);
            assert_eq!(decode(raw), Err(DecodeError::IllegalOpcode { opcode: op }));
            assert_eq!(res0_bits(&raw), None);
            assert_eq!(text::format_raw(&raw), format!("RAW {d0:#018x} {d1:#018x}"));
        }
    }
}

#[test]
fn errors_name_opcode_and_bits() {
    // Bit 31 of d0 and bit 5 of d1 are RES0 for TLBI_NH_VA.
    let e = decode(RawCommand::new(0x12 | 1 << 31, 1 << 5)).unwrap_err();
    assert_eq!(
        e,
        DecodeError::Res0 {
            opcode: 0x12,
            name: "TLBI_NH_VA",
            d0: 1 << 31,
            d1: 1 << 5
        }
    );
    let msg = e.to_string();
    assert!(msg.contains("TLBI_NH_VA") && msg.contains("0x12"), "{msg}");
    assert!(
        msg.contains("0x0000000080000000") && msg.contains("0x0000000000000020"),
        "{msg}"
    );
    assert_eq!(e.opcode(), 0x12);
    let e = decode(RawCommand::new(0x47, 0)).unwrap_err();
    assert_eq!(e.to_string(), "illegal opcode 0x47");
    let e = decode(RawCommand::new(0x2a | 3 << 12 | 2 << 20, 0)).unwrap_err();
    assert_eq!(
        e,
        DecodeError::RangeWithoutGranule {
            opcode: 0x2a,
            name: "TLBI_S2_IPA",
            num: 3,
            scale: 2
        }
    );
}

fn tlbi(d0: u64, d1: u64) -> TlbiSpan {
    decode(RawCommand::new(d0, d1))
        .unwrap()
        .tlbi_span()
        .unwrap()
}

#[test]
fn tlbi_spans() {
    // TG=0: the one entry at ADDR, whatever its size; TTL passes through.
    assert_eq!(
        tlbi(0x12 | 3 << 32, 0x1234_5000 | 3 << 8),
        TlbiSpan::Entry {
            addr: 0x1234_5000,
            ttl: 3
        }
    );
    // TG=1 (4K), NUM=3, SCALE=0: 4 pages.
    assert_eq!(
        tlbi(0x12 | 3 << 12, 0x8000_0000 | 1 << 10),
        TlbiSpan::Range {
            start: 0x8000_0000,
            granule: Granule::K4,
            pages: 4,
            bytes: 16 << 10
        }
    );
    // TG=2 (16K), NUM=0, SCALE=5: 32 granules.
    assert_eq!(
        tlbi(0x13 | 5 << 20, 0x10_0000 | 2 << 10),
        TlbiSpan::Range {
            start: 0x10_0000,
            granule: Granule::K16,
            pages: 32,
            bytes: 32 * (16 << 10)
        }
    );
    // TG=3 (64K), NUM=31, SCALE=31: the largest, 32 * 2^31 granules, 2^52 bytes, no overflow.
    assert_eq!(
        tlbi(0x2a | 31 << 12 | 31 << 20, 3 << 10),
        TlbiSpan::Range {
            start: 0,
            granule: Granule::K64,
            pages: 1 << 36,
            bytes: 1 << 52
        }
    );
    // NUM=2, SCALE=1 with 4K: (2+1) * 2 = 6 pages.
    assert_eq!(
        tlbi(0x22 | 2 << 12 | 1 << 20, 0xffff_0000_0000_0000 | 1 << 10),
        TlbiSpan::Range {
            start: 0xffff_0000_0000_0000,
            granule: Granule::K4,
            pages: 6,
            bytes: 6 << 12
        }
    );
    assert_eq!(Granule::from_tg(0), None);
    let not_range = decode(RawCommand::new(0x11, 0)).unwrap();
    assert_eq!(not_range.tlbi_span(), None);
    assert_eq!(not_range.range_fields(), None);
}

fn sids(d0: u64, d1: u64) -> SidSpan {
    decode(RawCommand::new(d0, d1)).unwrap().sid_span().unwrap()
}

#[test]
fn cfgi_ste_spans() {
    assert_eq!(
        sids(0x03 | 77 << 32, 1),
        SidSpan {
            first: 77,
            count: 1
        }
    );
    // RANGE=0: the aligned pair holding SID.
    assert_eq!(sids(0x04 | 5 << 32, 0), SidSpan { first: 4, count: 2 });
    assert_eq!(sids(0x04 | 4 << 32, 0), SidSpan { first: 4, count: 2 });
    // RANGE=4: 32 SIDs.
    assert_eq!(
        sids(0x04 | 0x1234_5678 << 32, 4),
        SidSpan {
            first: 0x1234_5660,
            count: 32
        }
    );
    // RANGE=31 is CFGI_ALL: every SID, whatever SID says.
    assert_eq!(
        sids(0x04 | 0xdead_beef << 32, 31),
        SidSpan {
            first: 0,
            count: 1 << 32
        }
    );
    assert_eq!(
        sids(0x04 | 0xffff_ffff << 32, 30),
        SidSpan {
            first: 0x8000_0000,
            count: 1 << 31
        }
    );
    assert_eq!(decode(RawCommand::new(0x05, 0)).unwrap().sid_span(), None);
}

fn atc(d0: u64, d1: u64) -> AtcSpan {
    decode(RawCommand::new(d0, d1)).unwrap().atc_span().unwrap()
}

#[test]
fn atc_inv_spans() {
    // SIZE=0: the one 4 KiB page.
    assert_eq!(
        atc(0x40, 0x1234_5000),
        AtcSpan {
            start: 0x1234_5000,
            bytes: 4096,
            all: false
        }
    );
    // SIZE=12: 2^12 pages = 16 MiB, aligned down.
    assert_eq!(
        atc(0x40, 0x1234_5000 | 12),
        AtcSpan {
            start: 0x1200_0000,
            bytes: 16 << 20,
            all: false
        }
    );
    // SIZE=51: the largest finite span, 2^63 bytes.
    assert_eq!(
        atc(0x40, 0x8000_0000_0000_1000 | 51),
        AtcSpan {
            start: 1 << 63,
            bytes: 1 << 63,
            all: false
        }
    );
    // SIZE=52: everything, ADDR ignored.
    let all = AtcSpan {
        start: 0,
        bytes: u64::MAX,
        all: true,
    };
    assert_eq!(atc(0x40, 0x1234_5000 | 52), all);
    // Above 52 (the kernel policy refuses it; decode does not): read as everything, no overflow.
    assert_eq!(atc(0x40, 63), all);
    assert_eq!(decode(RawCommand::new(0x41, 0)).unwrap().atc_span(), None);
}

#[test]
fn json_of_a_few_commands() {
    let j = |d0, d1| to_json(&decode(RawCommand::new(d0, d1)).unwrap());
    assert_eq!(
        j(0x46 | 1 << 12 | 0x1234_5678 << 32, 0xfee0_0004),
        json!({"op": "CMD_SYNC", "opcode": 70, "cs": 1, "msh": 0, "msiattr": 0,
               "msidata": 0x1234_5678, "msiaddr": 0xfee0_0004u64})
    );
    assert_eq!(
        j(0x40 | 1 << 9 | 5 << 32, 0xabc0_0000 | 9),
        json!({"op": "ATC_INV", "opcode": 64, "global": true, "ssv": false, "ssid": 0,
               "sid": 5, "size": 9, "addr": 0xabc0_0000u64})
    );
    assert_eq!(
        j(0x44 | 1 << 12 | 9 << 32, 0x55),
        json!({"op": "RESUME", "opcode": 68, "resp": 1, "sid": 9, "stag": 0x55})
    );
    assert_eq!(j(0x18, 0), json!({"op": "TLBI_EL3_ALL", "opcode": 24}));
    assert_eq!(
        error_json(&decode(RawCommand::new(0x10 | 1 << 8, 0)).unwrap_err()),
        json!({"error": "TLBI_NH_ALL (opcode 0x10) has RES0 bits set: d0 0x0000000000000100, d1 0x0000000000000000",
               "opcode": 16, "op": "TLBI_NH_ALL", "res0_d0": 256, "res0_d1": 0})
    );
}

#[test]
fn text_form_of_every_example_round_trips() {
    for (name, raw, cmd) in examples() {
        let t = text::format_raw(&raw);
        assert!(t.starts_with(name), "{t}");
        assert_eq!(t, cmd.to_string());
        assert_eq!(text::parse(&t), Ok(raw), "{t}");
        assert_eq!(t.parse::<Command>(), Ok(cmd));
        // Case, order and spacing do not matter on input.
        let shuffled: Vec<String> = t
            .split_whitespace()
            .rev()
            .map(|w| w.to_ascii_lowercase())
            .collect();
        let (name_word, rest) = shuffled.split_last().unwrap();
        let again = format!("  {name_word}\t{}  ", rest.join("   "));
        assert_eq!(text::parse(&again), Ok(raw), "{again}");
    }
}

#[test]
fn text_form_spot_checks() {
    let line = text::format_raw(&examples()[8].1);
    assert_eq!(
        line,
        "TLBI_NH_VA vmid=3 asid=7 addr=0x7fff_dead_0000 tg=64k num=31 scale=17 ttl=2 leaf"
    );
    assert_eq!(
        text::parse("CMD_SYNC cs=1 msiaddr=0xfee0_0000 msidata=7"),
        Ok(RawCommand::new(0x46 | 1 << 12 | 7 << 32, 0xfee0_0000))
    );
    // A missing field is zero; a flag given as =0 is clear.
    assert_eq!(
        text::parse("CFGI_STE sid=0x10 leaf=0"),
        Ok(RawCommand::new(0x03 | 0x10 << 32, 0))
    );
    // MSIADDR keeps bits [1:0] zero; ADDR of TLBI_S2_IPA stops at bit 51.
    assert!(text::parse("CMD_SYNC msiaddr=0x1002").is_err());
    assert!(text::parse("TLBI_S2_IPA addr=0x10_0000_0000_0000").is_err());
    assert!(text::parse("TLBI_S2_IPA addr=0xf_ffff_ffff_f000").is_ok());
    assert!(text::parse("RAW 1").is_err());
    assert!(text::parse("RAW 0x47 zz").is_err());
}

/// The arguments of a proptest case that decodes: a legal opcode, arbitrary field bits.
fn legal_words() -> impl Strategy<Value = (u64, u64)> {
    (0..SPEC.len(), any::<u64>(), any::<u64>()).prop_map(|(i, d0, d1)| {
        let (op, _, fields) = SPEC[i];
        let m = allowed(fields);
        let mut w = [(d0 & m[0] & !0xff) | u64::from(op), d1 & m[1]];
        if is_range_tlbi(fields) && (w[1] >> 10) & 3 == 0 {
            // TG=0 takes no NUM/SCALE: clear them, so half the TLBI cases are the entry form.
            w[0] &= !(0x1f << 12 | 0x1f << 20);
        }
        (w[0], w[1])
    })
}

/// `cases` per property natively; under Miri, which runs a case thousands of times slower, a
/// handful, and no regression file (its isolation forbids the file system).
fn config(cases: u32) -> ProptestConfig {
    if cfg!(miri) {
        ProptestConfig {
            cases: 8,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    } else {
        ProptestConfig::with_cases(cases)
    }
}

proptest! {
    #![proptest_config(config(2048))]

    /// Any 16 bytes: decode agrees with the spec's verdict, and what decodes encodes back.
    #[test]
    fn arbitrary_bytes_decode_as_spec_says(d0 in any::<u64>(), d1 in any::<u64>()) {
        let raw = RawCommand::new(d0, d1);
        let got = decode(raw);
        prop_assert_eq!(got.map(|_| ()), spec_verdict(d0, d1));
        if let Ok(cmd) = got {
            prop_assert_eq!(cmd.encode(), raw);
        }
        prop_assert_eq!(text::parse(&text::format_raw(&raw)), Ok(raw));
    }

    /// Arbitrary RES0 noise on a legal opcode is always refused with exactly that noise.
    #[test]
    fn res0_noise_is_reported_exactly(
        i in 0..SPEC.len(), d0 in any::<u64>(), d1 in any::<u64>()
    ) {
        let (op, name, fields) = SPEC[i];
        let m = allowed(fields);
        let raw = RawCommand::new((d0 & !0xff) | u64::from(op), d1);
        let (n0, n1) = (d0 & !m[0], d1 & !m[1]);
        prop_assume!(n0 | n1 != 0);
        prop_assert_eq!(decode(raw), Err(DecodeError::Res0 { opcode: op, name, d0: n0, d1: n1 }));
    }

    /// Legal opcodes with arbitrary fields: decode, encode, text, FromStr and JSON all agree.
    #[test]
    fn legal_commands_round_trip((d0, d1) in legal_words()) {
        let raw = RawCommand::new(d0, d1);
        let cmd = decode(raw).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(cmd.encode(), raw);
        prop_assert_eq!(cmd.try_encode(), Ok(raw));
        let t = text::format_raw(&raw);
        prop_assert_eq!(text::parse(&t), Ok(raw));
        prop_assert_eq!(t.parse::<Command>(), Ok(cmd));
        prop_assert_eq!(to_json(&cmd), spec_json(raw.opcode(), [d0, d1]));
        prop_assert_eq!(RawCommand::from_bytes(raw.to_bytes()), raw);
    }
}

/// The decode fuzz target's seeds: one file per legal opcode (the examples above) and a few that
/// must be refused. `VCMDQ_WRITE_SEEDS=1 cargo test --test codec fuzz_seeds` writes them; without
/// it the test checks that the committed files are exactly these.
#[test]
#[cfg_attr(miri, ignore)]
fn fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let mut decode_seeds: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (name, raw, _) in examples() {
        decode_seeds.insert(name.to_ascii_lowercase(), raw.to_bytes().to_vec());
    }
    for (name, d0, d1) in [
        ("illegal-00", 0x00, 0),
        ("illegal-47", 0x47, 0),
        ("illegal-ff", u64::MAX, u64::MAX),
        ("res0-cmd_sync-d0", 0x46 | 1 << 8, 0),
        ("res0-tlbi_nh_va-d1", 0x12, 1 << 7),
        ("range-without-tg", 0x12 | 1 << 12, 0),
    ] {
        decode_seeds.insert(name.into(), RawCommand::new(d0, d1).to_bytes().to_vec());
    }
    let mut text_seeds: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (name, raw, _) in examples().into_iter().step_by(3) {
        text_seeds.insert(
            name.to_ascii_lowercase(),
            text::format_raw(&raw).into_bytes(),
        );
    }
    for (name, line) in [
        ("raw", "RAW 0x0000000000000047 0x0000000000000005"),
        (
            "lower-case-any-order",
            "tlbi_nh_va leaf num=3 tg=4k addr=0x8000_0000 vmid=3",
        ),
        ("bad-value", "CMD_SYNC cs=9"),
        ("range-without-tg", "TLBI_NH_VA num=1"),
    ] {
        text_seeds.insert(name.into(), line.as_bytes().to_vec());
    }
    let write = std::env::var_os("VCMDQ_WRITE_SEEDS").is_some();
    for (target, seeds) in [("decode", &decode_seeds), ("text", &text_seeds)] {
        let d = dir.join(target);
        if write {
            std::fs::create_dir_all(&d).unwrap();
        }
        for (name, bytes) in seeds {
            let p = d.join(format!("seed-{name}"));
            if write {
                std::fs::write(&p, bytes).unwrap();
            } else {
                let have = std::fs::read(&p).unwrap_or_else(|e| {
                    panic!("{}: {e}; VCMDQ_WRITE_SEEDS=1 writes it", p.display())
                });
                assert_eq!(&have, bytes, "{} is stale", p.display());
            }
        }
    }
}
