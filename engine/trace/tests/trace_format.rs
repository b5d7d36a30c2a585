//! The trace file format: writer and reader agree, every defect is refused with its offset, the
//! text form round-trips, and validate() catches dangling references.

use proptest::prelude::*;
use std::io::Cursor;
use vcmdq::command::text::parse;
use vcmdq::command::RawCommand;
use vcmdq::queue::CError;
use vcmdq::viommu::SmmuFeatures;
use vcmdq_trace::format::{self, Kind, FLAG_IMPORTED, FLAG_SYNTHETIC, HEADER_LEN};
use vcmdq_trace::text::{build_unvalidated as build, dump_to_string};
use vcmdq_trace::{
    to_vec, validate, validate_with, Event, Invalid, Limits, Malformed, Outcome, Profile, Trace,
    TraceError, TraceFile, TraceMeta, TraceWriter, DEFAULT_MAX_RING_MEMORY,
};

fn cmd(s: &str) -> RawCommand {
    parse(s).unwrap()
}

/// One event of every kind, and every outcome, with increasing timestamps.
fn sample_events(cmds: &[RawCommand]) -> Vec<(u64, Event<'_>)> {
    vec![
        (
            1200,
            Event::ViommuCreate {
                viommu: 1,
                vmid: 5,
                smmu: 0,
                profile: Profile::Kernel,
                sidsize: 16,
                range_inv: true,
                features: SmmuFeatures::ANY,
            },
        ),
        (
            1200,
            Event::ViommuCreate {
                viommu: 2,
                vmid: 6,
                smmu: 1,
                profile: Profile::Tegra241,
                sidsize: 32,
                range_inv: false,
                // Recorded in the ViommuCreate's features bytes (flag bit 1).
                features: SmmuFeatures {
                    ril: false,
                    ..SmmuFeatures::preset("qemu").unwrap()
                },
            },
        ),
        (
            1300,
            Event::DeviceAdd {
                device: 7,
                smmu: 0,
                psid: 0x800,
            },
        ),
        (
            1400,
            Event::Bind {
                viommu: 1,
                device: 7,
                vsid: 0x10,
            },
        ),
        (
            1500,
            Event::RingCreate {
                ring: 3,
                viommu: 1,
                log2size: 3,
            },
        ),
        (
            1600,
            Event::Commands {
                ring: 3,
                slot: 6,
                cmds,
            },
        ),
        (1700, Event::Doorbell { ring: 3, prod: 9 }),
        (
            1800,
            Event::GuestFix {
                ring: 3,
                slot: 7,
                cmd: cmd("CMD_SYNC cs=2"),
            },
        ),
        (1800, Event::GuestAck { ring: 3 }),
        (
            1900,
            Event::Outcome {
                ring: 3,
                slot: 6,
                outcome: Outcome::Forwarded(cmd("TLBI_NH_ASID vmid=5 asid=7")),
            },
        ),
        (
            1900,
            Event::Outcome {
                ring: 3,
                slot: 7,
                outcome: Outcome::Refused(CError::Ill),
            },
        ),
        (
            1900,
            Event::Outcome {
                ring: 3,
                slot: 8,
                outcome: Outcome::Trapped,
            },
        ),
        (
            1900,
            Event::Outcome {
                ring: 3,
                slot: 9,
                outcome: Outcome::Dropped,
            },
        ),
        (
            2000,
            Event::Unbind {
                viommu: 1,
                device: 7,
            },
        ),
        (
            u64::MAX,
            Event::Doorbell {
                ring: 3,
                prod: 0xffff_ffff,
            },
        ),
    ]
}

fn sample_cmds() -> Vec<RawCommand> {
    vec![
        cmd("TLBI_NH_VA vmid=0 asid=7 addr=0x8000_0000 tg=4k num=3 scale=0 ttl=3 leaf"),
        RawCommand::new(0x47, 0xdead),
        cmd("CFGI_STE sid=0x10 leaf"),
        cmd("CMD_SYNC cs=1 msiaddr=0x4000_0010"),
    ]
}

fn sample_bytes() -> Vec<u8> {
    let cmds = sample_cmds();
    to_vec(
        TraceMeta {
            flags: FLAG_SYNTHETIC,
            created_unix_ns: 42,
        },
        sample_events(&cmds),
    )
    .unwrap()
}

fn events<'a>(t: &Trace<'a>) -> Vec<(u64, Event<'a>)> {
    t.records()
        .map(|r| {
            let r = r.unwrap();
            (r.timestamp_ns, r.event)
        })
        .collect()
}

fn malformed(bytes: &[u8]) -> (u64, Malformed) {
    let err = match Trace::parse(bytes) {
        Err(e) => e,
        Ok(t) => t
            .records()
            .find_map(Result::err)
            .expect("the trace was accepted"),
    };
    (err.offset().unwrap(), err.malformed().unwrap().clone())
}

#[test]
fn writer_and_reader_agree_on_every_kind() {
    let cmds = sample_cmds();
    let want = sample_events(&cmds);
    let bytes = sample_bytes();
    let t = Trace::parse(&bytes).unwrap();
    assert_eq!(
        t.meta(),
        TraceMeta {
            flags: FLAG_SYNTHETIC,
            created_unix_ns: 42
        }
    );
    assert_eq!(t.declared_records(), Some(want.len() as u64));
    assert_eq!(events(&t), want);
    // Offsets: the header, then each record's length.
    let offs: Vec<u64> = t.records().map(|r| r.unwrap().offset).collect();
    assert_eq!(offs[0], HEADER_LEN as u64);
    assert_eq!(offs[1], 64 + 32);
    // Each kind appears with its documented length.
    let mut lens = std::collections::HashMap::new();
    for w in offs.windows(2) {
        let r = t
            .records()
            .find(|r| r.as_ref().unwrap().offset == w[0])
            .unwrap()
            .unwrap();
        lens.insert(r.event.kind(), w[1] - w[0]);
    }
    assert_eq!(lens[&Kind::ViommuCreate], 32);
    assert_eq!(lens[&Kind::DeviceAdd], 32);
    assert_eq!(lens[&Kind::Bind], 32);
    assert_eq!(lens[&Kind::RingCreate], 32);
    assert_eq!(lens[&Kind::Commands], 32 + 16 * 4);
    assert_eq!(lens[&Kind::Doorbell], 24);
    assert_eq!(lens[&Kind::GuestFix], 40);
    assert_eq!(lens[&Kind::GuestAck], 24);
    assert_eq!(lens[&Kind::Outcome], 48);
    assert_eq!(lens[&Kind::Unbind], 24);
}

#[test]
fn header_bytes_are_as_documented() {
    let bytes = sample_bytes();
    assert_eq!(&bytes[0..8], b"VCMDQTRC");
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 1);
    assert_eq!(
        u32::from_le_bytes(bytes[12..16].try_into().unwrap()),
        FLAG_SYNTHETIC
    );
    assert_eq!(u64::from_le_bytes(bytes[16..24].try_into().unwrap()), 15);
    assert_eq!(u64::from_le_bytes(bytes[24..32].try_into().unwrap()), 42);
    assert!(bytes[32..64].iter().all(|&b| b == 0));
    // The first record: kind 1, reserved 0, len 32, timestamp 1200, viommu 1, smmu 0, vmid 5.
    assert_eq!(&bytes[64..68], &[1, 0, 0, 0]);
    assert_eq!(u32::from_le_bytes(bytes[68..72].try_into().unwrap()), 32);
    assert_eq!(u64::from_le_bytes(bytes[72..80].try_into().unwrap()), 1200);
    assert_eq!(u32::from_le_bytes(bytes[80..84].try_into().unwrap()), 1);
    assert_eq!(u16::from_le_bytes(bytes[88..90].try_into().unwrap()), 5);
    assert_eq!(bytes[90], 0, "profile kernel");
    assert_eq!(bytes[91], 16, "sidsize");
    assert_eq!(bytes[92], 1, "range flag");
}

#[test]
fn unknown_record_count_and_finish_without_seek() {
    let mut w = TraceWriter::new(Vec::new(), TraceMeta::default()).unwrap();
    w.doorbell(5, 1, 2).unwrap();
    let bytes = w.finish().unwrap();
    let t = Trace::parse(&bytes).unwrap();
    assert_eq!(t.declared_records(), None);
    assert_eq!(events(&t), vec![(5, Event::Doorbell { ring: 1, prod: 2 })]);
}

#[test]
fn writer_refuses_what_the_reader_would() {
    let mut w = TraceWriter::new(Vec::new(), TraceMeta::default()).unwrap();
    w.doorbell(10, 0, 0).unwrap();
    assert!(w.doorbell(9, 0, 0).is_err(), "time going backwards");
    assert!(w.ring_create(10, 0, 0, 20).is_err(), "LOG2SIZE 20");
    assert!(w.commands(10, 0, 0, &[]).is_err(), "no commands");
    assert!(w
        .viommu_create(10, 0, 0, 0, Profile::Kernel, 33, false)
        .is_err());
    assert!(w.outcome(10, 0, 0, Outcome::Refused(CError::None)).is_err());
    assert!(TraceWriter::new(
        Vec::new(),
        TraceMeta {
            flags: 8,
            created_unix_ns: 0
        }
    )
    .is_err());
}

fn patch(bytes: &mut [u8], at: usize, v: &[u8]) {
    bytes[at..at + v.len()].copy_from_slice(v);
}

#[test]
fn header_defects_are_refused_with_offsets() {
    let good = sample_bytes();
    assert_eq!(
        malformed(&good[..10]),
        (0, Malformed::TruncatedHeader { len: 10 })
    );
    assert_eq!(malformed(&[]), (0, Malformed::TruncatedHeader { len: 0 }));
    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(malformed(&b), (0, Malformed::BadMagic { .. })));
    let mut b = good.clone();
    patch(&mut b, 8, &2u32.to_le_bytes());
    assert_eq!(malformed(&b), (8, Malformed::UnknownVersion { version: 2 }));
    let mut b = good.clone();
    patch(&mut b, 12, &(FLAG_IMPORTED | 0x100).to_le_bytes());
    assert_eq!(
        malformed(&b),
        (12, Malformed::ReservedFlags { bits: 0x100 })
    );
    let mut b = good.clone();
    b[40] = 1;
    assert!(matches!(
        malformed(&b),
        (32, Malformed::ReservedNonZero { .. })
    ));
}

#[test]
fn record_defects_are_refused_with_offsets() {
    let good = sample_bytes();
    // The file ends inside the second record's prefix.
    let cut = &good[..64 + 32 + 8];
    assert_eq!(
        malformed(cut),
        (96, Malformed::TruncatedPrefix { remaining: 8 })
    );
    // The file ends inside the second record's body: its length overruns.
    let cut = &good[..64 + 32 + 20];
    assert_eq!(
        malformed(cut),
        (
            96,
            Malformed::RecordOverrun {
                kind: 1,
                len: 32,
                remaining: 20
            }
        )
    );
    // A length that is not a multiple of 8, or below the prefix.
    let mut b = good.clone();
    patch(&mut b, 64 + 4, &33u32.to_le_bytes());
    assert_eq!(
        malformed(&b),
        (64, Malformed::BadLength { kind: 1, len: 33 })
    );
    let mut b = good.clone();
    patch(&mut b, 64 + 4, &8u32.to_le_bytes());
    assert_eq!(
        malformed(&b),
        (64, Malformed::BadLength { kind: 1, len: 8 })
    );
    // A record too short for its kind: a Bind of 24 bytes.
    let mut w = TraceWriter::new(Cursor::new(Vec::new()), TraceMeta::default()).unwrap();
    w.bind(1, 1, 2, 3).unwrap();
    let mut b = w.finish().unwrap().into_inner();
    patch(&mut b, 64 + 4, &24u32.to_le_bytes());
    b.truncate(64 + 24);
    assert_eq!(
        malformed(&b),
        (
            64,
            Malformed::WrongLength {
                kind: Kind::Bind,
                len: 24,
                expected: 32
            }
        )
    );
    // Unknown kinds are refused, not skipped.
    let mut b = good.clone();
    patch(&mut b, 64, &99u16.to_le_bytes());
    assert_eq!(malformed(&b), (64, Malformed::UnknownKind { kind: 99 }));
    // Reserved prefix bytes.
    let mut b = good.clone();
    patch(&mut b, 66, &1u16.to_le_bytes());
    assert!(matches!(
        malformed(&b),
        (64, Malformed::ReservedNonZero { .. })
    ));
    // The header's count disagrees.
    let mut b = good.clone();
    patch(&mut b, 16, &99u64.to_le_bytes());
    assert_eq!(
        malformed(&b),
        (
            good.len() as u64,
            Malformed::RecordCount {
                header: 99,
                found: 15
            }
        )
    );
}

fn single<F: FnOnce(&mut TraceWriter<Cursor<Vec<u8>>>)>(f: F) -> Vec<u8> {
    let mut w = TraceWriter::new(Cursor::new(Vec::new()), TraceMeta::default()).unwrap();
    f(&mut w);
    w.finish().unwrap().into_inner()
}

#[test]
fn commands_count_that_overruns_is_refused() {
    let mut b = single(|w| w.commands(7, 0, 0, &[RawCommand::new(0x46, 0)]).unwrap());
    // count sits at record offset 16 + 8.
    patch(&mut b, 64 + 24, &5000u32.to_le_bytes());
    let (off, m) = malformed(&b);
    assert_eq!(
        (off, &m),
        (
            64,
            &Malformed::CommandsOverrun {
                count: 5000,
                available: 16
            }
        )
    );
    let err = TraceFile::from_bytes("trace.vct", b)
        .trace()
        .unwrap()
        .records()
        .find_map(Result::err)
        .unwrap();
    assert_eq!(
        err.to_string(),
        "trace.vct: offset 64: Commands record claims 5000 commands but only 16 bytes remain for them"
    );
    // Count 0, and a count smaller than the payload.
    let mut b = single(|w| w.commands(7, 0, 0, &[RawCommand::new(0x46, 0); 2]).unwrap());
    patch(&mut b, 64 + 24, &0u32.to_le_bytes());
    assert_eq!(malformed(&b), (64, Malformed::EmptyCommands));
    patch(&mut b, 64 + 24, &1u32.to_le_bytes());
    assert_eq!(
        malformed(&b),
        (
            64,
            Malformed::CommandsTrailing {
                count: 1,
                extra: 16
            }
        )
    );
}

#[test]
fn an_unknown_profile_code_is_refused_naming_its_record_offset() {
    // A second record, so the offset is not the first record's by accident.
    let mut b = single(|w| {
        w.viommu_create(0, 1, 2, 3, Profile::Kernel, 16, false)
            .unwrap();
        w.viommu_create(0, 2, 3, 3, Profile::Tegra241, 16, false)
            .unwrap();
    });
    // The first record's length is at bytes 4..8 of its prefix.
    let second = 64 + u64::from(u32::from_le_bytes(b[68..72].try_into().unwrap()));
    b[second as usize + 26] = 9;
    let err = Trace::parse(&b)
        .err()
        .or_else(|| Trace::parse(&b).unwrap().records().find_map(Result::err))
        .expect("the unknown profile is refused");
    assert_eq!(err.malformed(), Some(&Malformed::BadProfile(9)));
    assert_eq!(err.offset(), Some(second));
    assert!(
        err.to_string().contains(&format!("offset {second}"))
            && err.to_string().contains("unknown profile 9"),
        "{err}"
    );
    // The code on disk is the engine's own.
    for p in Profile::ALL {
        assert_eq!(Profile::from_code(p.code()), Some(p));
    }
}

#[test]
fn field_defects_are_refused() {
    let v = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = single(|w| {
            w.viommu_create(0, 1, 2, 3, Profile::Kernel, 16, false)
                .unwrap()
        });
        f(&mut b);
        malformed(&b).1
    };
    assert_eq!(v(&|b| b[64 + 26] = 7), Malformed::BadProfile(7));
    assert_eq!(v(&|b| b[64 + 27] = 33), Malformed::BadSidsize(33));
    assert_eq!(v(&|b| b[64 + 28] = 4), Malformed::BadViommuFlags(4));
    // The features bytes are zero unless flag bit 1 says they hold the SMMU's features.
    assert!(matches!(
        v(&|b| b[64 + 29] = 1),
        Malformed::ReservedNonZero { .. }
    ));
    assert!(matches!(
        v(&|b| {
            b[64 + 28] = 2;
            b[64 + 30] = 21;
        }),
        Malformed::BadSmmuFeatures(_)
    ));
    assert!(matches!(
        v(&|b| {
            b[64 + 28] = 2;
            b[64 + 31] = 33;
        }),
        Malformed::BadSmmuFeatures(_)
    ));
    let mut b = single(|w| w.ring_create(0, 1, 2, 19).unwrap());
    b[64 + 24] = 20;
    assert_eq!(malformed(&b).1, Malformed::BadLog2Size(20));
    let o = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = single(|w| w.outcome(0, 1, 2, Outcome::Trapped).unwrap());
        f(&mut b);
        malformed(&b).1
    };
    assert_eq!(o(&|b| b[64 + 24] = 9), Malformed::BadOutcome(9));
    assert!(matches!(
        o(&|b| b[64 + 25] = 1),
        Malformed::ReservedNonZero { .. }
    ));
    assert!(matches!(
        o(&|b| b[64 + 40] = 1),
        Malformed::ReservedNonZero { .. }
    ));
    assert_eq!(
        o(&|b| {
            b[64 + 24] = format::outcome::REFUSED;
            b[64 + 25] = 0;
        }),
        Malformed::BadCerror(0)
    );
    // Time going backwards.
    let mut b = single(|w| {
        w.doorbell(100, 0, 0).unwrap();
        w.doorbell(200, 0, 0).unwrap();
    });
    patch(&mut b, 64 + 24 + 8, &50u64.to_le_bytes());
    assert_eq!(
        malformed(&b),
        (88, Malformed::TimestampBackwards { prev: 100, ts: 50 })
    );
}

#[test]
fn a_file_is_mapped_and_named_in_errors() {
    let dir = std::env::temp_dir().join(format!("vcmdq-trace-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("t.vct");
    std::fs::write(&path, sample_bytes()).unwrap();
    let f = TraceFile::open(&path).unwrap();
    let t = f.trace().unwrap();
    assert_eq!(events(&t).len(), 15);
    let mut b = sample_bytes();
    b[0] = 0;
    std::fs::write(&path, &b).unwrap();
    let e = TraceFile::open(&path).unwrap().trace().unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{}: offset 0: bad magic", path.display())),
        "{e}"
    );
    std::fs::write(&path, b"").unwrap();
    let e = TraceFile::open(&path).unwrap().trace().unwrap_err();
    assert_eq!(e.malformed(), Some(&Malformed::TruncatedHeader { len: 0 }));
    let e = TraceFile::open(dir.join("missing.vct")).err().unwrap();
    assert!(matches!(e, TraceError::Io { .. }));
    std::fs::remove_dir_all(&dir).unwrap();
}

const HAND: &str = "\
# A hand-written trace.
trace version=1 created=0 synthetic
@1200 viommu 1 vmid=5 smmu=0 profile=kernel sidsize=16 range
@1300 device 7 smmu=0 psid=0x800
@1400 bind viommu=1 device=7 vsid=0x10
@1500 ring 3 viommu=1 log2size=2
@1600 cmd ring=3 slot=6 TLBI_NH_VA vmid=0 asid=7 addr=0x8000_0000 tg=4k num=3 scale=0 ttl=3 leaf
@1600 cmd ring=3 slot=7 RAW 0x47 0x0   # an illegal opcode
@1600 cmd ring=3 slot=0 ATC_INV sid=0x10 size=52
@1600 cmd ring=3 slot=1 CMD_SYNC cs=2
@1650 cmd ring=3 slot=2 CMD_SYNC cs=2
@1700 doorbell ring=3 prod=4
@1800 fix ring=3 slot=3 CMD_SYNC cs=2
@1800 ack ring=3
@1900 outcome ring=3 slot=7 refused ILL
@1900 outcome ring=3 slot=6 forwarded TLBI_NH_VA vmid=5 asid=7 addr=0x8000_0000 tg=4k num=3 scale=0 ttl=3 leaf
@1900 outcome ring=3 slot=0 trapped
@1900 outcome ring=3 slot=1 dropped
@2000 unbind viommu=1 device=7
";

#[test]
fn text_builds_coalesces_and_round_trips() {
    let bytes = build(HAND, Cursor::new(Vec::new())).unwrap().into_inner();
    let t = Trace::parse(&bytes).unwrap();
    let ev = events(&t);
    // Four cmd lines at one timestamp with consecutive slots (6, 7, then 0, 1 after the wrap of
    // a 4-entry ring: pointer 7 + 1 = 8 = index 0 with the wrap bit back to 0) join into one
    // record; the fifth has another timestamp.
    let Event::Commands {
        ring: 3,
        slot: 6,
        cmds,
    } = ev[4].1
    else {
        panic!("{:?}", ev[4])
    };
    assert_eq!(cmds.len(), 4);
    assert_eq!(cmds[1], RawCommand::new(0x47, 0));
    assert!(matches!(ev[5].1, Event::Commands { slot: 2, .. }));
    assert_eq!(t.meta().flags, FLAG_SYNTHETIC);
    // dump -> build -> dump is the same text, build -> dump -> build the same bytes.
    let text = dump_to_string(&t).unwrap();
    let again = build(&text, Cursor::new(Vec::new())).unwrap().into_inner();
    assert_eq!(again, bytes);
    assert_eq!(
        dump_to_string(&Trace::parse(&again).unwrap()).unwrap(),
        text
    );
    // The dump keeps every line's meaning: one line per command.
    assert_eq!(text.lines().filter(|l| l.contains(" cmd ")).count(), 5);
    assert!(text.contains("@1600 cmd ring=3 slot=7 RAW 0x0000000000000047 0x0000000000000000"));
}

#[test]
fn sample_dump_round_trips() {
    let bytes = sample_bytes();
    let text = dump_to_string(&Trace::parse(&bytes).unwrap()).unwrap();
    let again = build(&text, Cursor::new(Vec::new())).unwrap().into_inner();
    assert_eq!(again, bytes, "{text}");
    assert!(text.contains("prod=0xffffffff"));
}

#[test]
fn text_errors_name_the_line() {
    let err = |s: &str| build(s, Cursor::new(Vec::new())).unwrap_err();
    let e = err("@1 doorbell ring=0 prod=1\n\n@2 frobnicate");
    assert_eq!(e.line, 3);
    assert!(
        e.to_string().contains("unknown event \"frobnicate\""),
        "{e}"
    );
    assert_eq!(
        err("@1 doorbell ring=0").to_string(),
        "line 1: doorbell needs prod"
    );
    assert!(err("doorbell ring=0 prod=1")
        .to_string()
        .contains("@<timestamp"));
    assert!(err("@5 cmd ring=0 slot=0 TLBI_NH_VA bogus=1")
        .to_string()
        .contains("command:"));
    assert!(err("@5 doorbell ring=0 prod=1\n@4 doorbell ring=0 prod=2")
        .to_string()
        .starts_with("line 2:"));
    assert!(err("@5 ack ring=0\ntrace version=1")
        .to_string()
        .contains("first line"));
    assert!(err("trace version=2").to_string().contains("version 2"));
    assert!(err("@1 ring 0 viommu=0 log2size=20")
        .to_string()
        .contains("LOG2SIZE"));
    assert!(err("@1 doorbell ring=0 prod=0x1_0000_0000")
        .to_string()
        .contains("too large"));
    assert!(err("@1 ack ring=0 extra")
        .to_string()
        .contains("does not take"));
    assert!(err("@1 outcome ring=0 slot=0 refused NONE")
        .to_string()
        .contains("CONS.ERR"));
    assert!(err("@1 viommu 1 vmid=1 smmu=0 profile=arm sidsize=16")
        .to_string()
        .contains("profile"));
}

fn validate_text(s: &str) -> Result<vcmdq_trace::Summary, TraceError> {
    let bytes = build(s, Cursor::new(Vec::new())).unwrap().into_inner();
    validate(&Trace::parse(&bytes).unwrap())
}

#[test]
fn validate_counts_and_catches_dangling_references() {
    let s = validate_text(HAND).unwrap();
    assert_eq!(s.records, 14);
    assert_eq!(s.commands, 5);
    assert_eq!(s.count(Kind::Commands), 2);
    assert_eq!(s.count(Kind::Outcome), 4);
    assert_eq!(s.commands_by_ring[&3], 5);
    assert_eq!(s.commands_by_opcode["CMD_SYNC"], 2);
    assert_eq!(s.commands_by_opcode["illegal-0x47"], 1);
    assert_eq!(s.duration_ns(), 800);
    let j = s.to_json();
    assert_eq!(j["records_by_kind"]["Commands"], 2);

    let bad = |s: &str| validate_text(s).unwrap_err().invalid().cloned().unwrap();
    let base = "@0 viommu 1 vmid=1 smmu=0 profile=kernel sidsize=16\n@0 ring 2 viommu=1 log2size=2\n@0 device 3 smmu=0 psid=0x10\n";
    assert_eq!(
        bad(&format!("{base}@1 doorbell ring=9 prod=0")),
        Invalid::UnknownRing {
            kind: "Doorbell",
            ring: 9
        }
    );
    assert_eq!(
        bad(&format!("{base}@1 cmd ring=9 slot=0 CMD_SYNC")),
        Invalid::UnknownRing {
            kind: "Commands",
            ring: 9
        }
    );
    assert_eq!(
        bad(&format!("{base}@1 bind viommu=4 device=3 vsid=1")),
        Invalid::UnknownViommu {
            kind: "Bind",
            viommu: 4
        }
    );
    assert_eq!(
        bad(&format!("{base}@1 unbind viommu=1 device=4")),
        Invalid::UnknownDevice {
            kind: "Unbind",
            device: 4
        }
    );
    assert_eq!(
        bad(&format!("{base}@1 ring 5 viommu=6 log2size=2")),
        Invalid::UnknownViommu {
            kind: "RingCreate",
            viommu: 6
        }
    );
    assert_eq!(
        bad(&format!("{base}@1 ring 2 viommu=1 log2size=2")),
        Invalid::Duplicate {
            kind: "RingCreate",
            what: "ring",
            id: 2
        }
    );
    assert_eq!(
        bad(&format!("{base}@1 device 3 smmu=0 psid=1")),
        Invalid::Duplicate {
            kind: "DeviceAdd",
            what: "device",
            id: 3
        }
    );
    assert_eq!(
        bad(&format!("{base}@1 cmd ring=2 slot=8 CMD_SYNC")),
        Invalid::SlotOutOfRange {
            kind: "Commands",
            ring: 2,
            slot: 8,
            log2size: 2
        }
    );
    assert_eq!(
        bad(&format!("{base}@1 fix ring=2 slot=9 CMD_SYNC")),
        Invalid::SlotOutOfRange {
            kind: "GuestFix",
            ring: 2,
            slot: 9,
            log2size: 2
        }
    );
    // Five commands into a four-entry ring, written as one record by hand.
    let mut w = TraceWriter::new(Cursor::new(Vec::new()), TraceMeta::default()).unwrap();
    w.viommu_create(0, 1, 1, 0, Profile::Kernel, 16, false)
        .unwrap();
    w.ring_create(0, 2, 1, 2).unwrap();
    w.commands(1, 2, 0, &[RawCommand::new(0x46, 0); 5]).unwrap();
    let b = w.finish_counted().unwrap().into_inner();
    let e = validate(&Trace::parse(&b).unwrap()).unwrap_err();
    assert_eq!(
        e.invalid(),
        Some(&Invalid::TooManyCommands {
            ring: 2,
            count: 5,
            entries: 4
        })
    );
    assert_eq!(e.offset(), Some(64 + 32 + 32));
}

#[test]
fn validation_refuses_what_the_control_plane_refuses_with_record_index_and_offset() {
    let base = "@0 viommu 1 vmid=1 smmu=0 profile=kernel sidsize=8\n@0 device 3 smmu=0 psid=0x10\n@0 device 4 smmu=1 psid=0x10\n@0 bind viommu=1 device=3 vsid=1\n";
    let err = |s: &str| validate_text(s).unwrap_err();
    let control = |s: &str| match err(s).invalid().cloned() {
        Some(Invalid::ControlPlane { why, .. }) => why,
        other => panic!("{s}: {other:?}"),
    };
    // EEXIST: the vSID is taken; the device is already bound.
    assert!(control(&format!(
        "{base}@1 device 5 smmu=0 psid=0x11\n@1 bind viommu=1 device=5 vsid=1"
    ))
    .starts_with("EEXIST"));
    assert!(control(&format!("{base}@1 bind viommu=1 device=3 vsid=2")).starts_with("EEXIST"));
    // EEXIST: a pSID taken on its SMMU.
    assert!(control(&format!("{base}@1 device 6 smmu=0 psid=0x10")).starts_with("EEXIST"));
    // EINVAL: a device behind another SMMU; a vSID beyond SIDSIZE; SIDSIZE 0.
    assert!(control(&format!("{base}@1 bind viommu=1 device=4 vsid=2")).starts_with("EINVAL"));
    assert!(control(&format!(
        "{base}@1 device 5 smmu=0 psid=0x11\n@1 bind viommu=1 device=5 vsid=0x100"
    ))
    .starts_with("EINVAL"));
    assert!(control("@0 viommu 2 vmid=1 smmu=0 profile=kernel sidsize=0").contains("SIDSIZE"));
    // ENOENT: unbinding a device that is not bound there.
    assert!(control(&format!("{base}@1 unbind viommu=1 device=4")).starts_with("ENOENT"));
    // The message names the record's index and its offset.
    let e = err(&format!("{base}@1 unbind viommu=1 device=4"));
    assert_eq!(e.offset(), Some(64 + 4 * 32));
    assert!(
        e.to_string()
            .starts_with("record 4 at offset 192: Unbind is refused by the control plane: ENOENT"),
        "{e}"
    );
}

#[test]
fn validation_refuses_two_viommus_with_one_vmid_on_one_smmu_as_the_engine_does() {
    let base = "@0 viommu 1 vmid=5 smmu=0 profile=kernel sidsize=8\n";
    let why = match validate_text(&format!(
        "{base}@0 viommu 2 vmid=5 smmu=0 profile=kernel sidsize=8"
    ))
    .unwrap_err()
    .invalid()
    .cloned()
    {
        Some(Invalid::ControlPlane { why, .. }) => why,
        other => panic!("{other:?}"),
    };
    assert!(why.starts_with("EEXIST"), "{why}");
    // The same VMID on another SMMU is another VMID.
    validate_text(&format!(
        "{base}@0 viommu 2 vmid=5 smmu=1 profile=kernel sidsize=8"
    ))
    .unwrap();
}

#[test]
fn an_ack_or_fix_on_a_ring_that_never_stopped_is_refused() {
    let base = "@0 viommu 1 vmid=1 smmu=0 profile=kernel sidsize=16\n@0 ring 2 viommu=1 log2size=2\n@1 cmd ring=2 slot=0 CMD_SYNC\n@1 cmd ring=2 slot=1 RAW 0x47 0x0\n";
    let bad = |s: &str| validate_text(s).unwrap_err().invalid().cloned().unwrap();
    // Written but never published: the ring has not stopped.
    assert_eq!(
        bad(&format!("{base}@2 ack ring=2")),
        Invalid::NotStopped {
            kind: "GuestAck",
            ring: 2
        }
    );
    assert_eq!(
        bad(&format!("{base}@2 fix ring=2 slot=1 CMD_SYNC")),
        Invalid::NotStopped {
            kind: "GuestFix",
            ring: 2
        }
    );
    // Published: it stops at slot 1; a fix there and an ack are what a guest does.
    let stopped = format!("{base}@2 doorbell ring=2 prod=2\n");
    validate_text(&format!(
        "{stopped}@3 fix ring=2 slot=1 CMD_SYNC\n@3 ack ring=2"
    ))
    .unwrap();
    assert_eq!(
        bad(&format!("{stopped}@3 fix ring=2 slot=0 CMD_SYNC")),
        Invalid::FixElsewhere {
            ring: 2,
            slot: 0,
            stopped: 1
        }
    );
    // After the ack it runs again: a second ack has nothing to acknowledge.
    assert_eq!(
        bad(&format!(
            "{stopped}@3 fix ring=2 slot=1 CMD_SYNC\n@3 ack ring=2\n@4 ack ring=2"
        )),
        Invalid::NotStopped {
            kind: "GuestAck",
            ring: 2
        }
    );
}

#[test]
fn rings_beyond_the_memory_limit_are_refused_before_they_are_allocated() {
    // 40 rings of 2^19 entries: 320 MiB of slots, above the default 256 MiB.
    let mut text = String::from("@0 viommu 1 vmid=1 smmu=0 profile=kernel sidsize=16\n");
    for r in 0..40 {
        text.push_str(&format!("@0 ring {r} viommu=1 log2size=19\n"));
    }
    let e = validate_text(&text).unwrap_err();
    assert_eq!(
        e.invalid(),
        Some(&Invalid::RingMemory {
            ring: 32,
            needed: 33 << 23,
            limit: DEFAULT_MAX_RING_MEMORY
        })
    );
    assert!(e.to_string().contains("--max-ring-memory"), "{e}");
    let bytes = build(&text, Cursor::new(Vec::new())).unwrap().into_inner();
    let t = Trace::parse(&bytes).unwrap();
    let s = validate_with(
        &t,
        &Limits {
            max_ring_memory: 40 << 23,
        },
    )
    .unwrap();
    assert_eq!(s.ring_bytes, 40 << 23);
}

#[test]
fn build_refuses_a_slot_beyond_its_ring_so_build_dump_build_is_byte_identical() {
    let text = "@0 viommu 1 vmid=1 smmu=0 profile=kernel sidsize=16\n@0 ring 2 viommu=1 log2size=2\n@1 cmd ring=2 slot=8 CMD_SYNC\n";
    let e = vcmdq_trace::text::build(text, Cursor::new(Vec::new())).unwrap_err();
    assert_eq!(e.line, 3);
    assert!(e.to_string().contains("slot 0x8 of ring 2"), "{e}");
    // dump refuses what validation refuses, with the same message.
    let bytes = build(text, Cursor::new(Vec::new())).unwrap().into_inner();
    let t = Trace::parse(&bytes).unwrap();
    let d = vcmdq_trace::text::dump(&t, &mut Vec::new()).unwrap_err();
    assert_eq!(d.to_string(), validate(&t).unwrap_err().to_string());
    // What validates goes round byte for byte through the validating build and dump.
    let ok = vcmdq_trace::text::build(HAND, Cursor::new(Vec::new()))
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    vcmdq_trace::text::dump(&Trace::parse(&ok).unwrap(), &mut out).unwrap();
    let again =
        vcmdq_trace::text::build(std::str::from_utf8(&out).unwrap(), Cursor::new(Vec::new()))
            .unwrap()
            .into_inner();
    assert_eq!(again, ok);
}

/// Any sequence of well-formed events survives writer -> reader and text dump -> build.
fn arb_event() -> impl Strategy<Value = (u64, u8, [u32; 4], Vec<(u64, u64)>)> {
    (
        0u64..1000,
        0u8..10,
        any::<[u32; 4]>(),
        prop::collection::vec(any::<(u64, u64)>(), 1..4),
    )
}

fn make_event(kind: u8, v: [u32; 4], cmds: &[RawCommand]) -> Event<'_> {
    let c = cmds[0];
    match kind {
        0 => Event::ViommuCreate {
            viommu: v[0],
            vmid: v[1] as u16,
            smmu: v[2],
            profile: if v[3] & 1 == 0 {
                Profile::Kernel
            } else {
                Profile::Tegra241
            },
            sidsize: (v[3] >> 8) as u8 % 33,
            range_inv: v[3] & 2 != 0,
            features: if v[3] & 4 == 0 {
                SmmuFeatures {
                    ril: v[3] & 2 != 0,
                    ..SmmuFeatures::ANY
                }
            } else {
                let b1 = ((v[3] >> 24) as u8 % 21) | (((v[3] >> 29) & 1) as u8) << 5;
                SmmuFeatures::from_trace_bytes(
                    [(v[3] >> 16) as u8, b1, (v[2] % 33) as u8],
                    v[3] & 2 != 0,
                )
                .unwrap()
            },
        },
        1 => Event::DeviceAdd {
            device: v[0],
            smmu: v[1],
            psid: v[2],
        },
        2 => Event::Bind {
            viommu: v[0],
            device: v[1],
            vsid: v[2],
        },
        3 => Event::Unbind {
            viommu: v[0],
            device: v[1],
        },
        4 => Event::RingCreate {
            ring: v[0],
            viommu: v[1],
            log2size: (v[2] % 20) as u8,
        },
        5 => Event::Commands {
            ring: v[0],
            slot: v[1],
            cmds,
        },
        6 => Event::Doorbell {
            ring: v[0],
            prod: v[1],
        },
        7 => Event::GuestAck { ring: v[0] },
        8 => Event::GuestFix {
            ring: v[0],
            slot: v[1],
            cmd: c,
        },
        _ => Event::Outcome {
            ring: v[0],
            slot: v[1],
            outcome: match v[2] % 4 {
                0 => Outcome::Forwarded(c),
                1 => Outcome::Refused(CError::from_code(1 + (v[3] % 4) as u8).unwrap()),
                2 => Outcome::Trapped,
                _ => Outcome::Dropped,
            },
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_events_round_trip(evs in prop::collection::vec(arb_event(), 0..24)) {
        let cmds: Vec<Vec<RawCommand>> = evs
            .iter()
            .map(|(_, _, _, c)| c.iter().map(|&(a, b)| RawCommand::new(a, b)).collect())
            .collect();
        let mut ts = 0;
        let want: Vec<(u64, Event<'_>)> = evs
            .iter()
            .zip(&cmds)
            .map(|((dt, kind, v, _), c)| {
                ts += dt;
                (ts, make_event(*kind, *v, c))
            })
            .collect();
        let bytes = to_vec(TraceMeta::default(), want.clone()).unwrap();
        let t = Trace::parse(&bytes).unwrap();
        prop_assert_eq!(events(&t), want);
        let text = dump_to_string(&t).unwrap();
        let rebuilt = build(&text, Cursor::new(Vec::new())).unwrap().into_inner();
        let t2 = Trace::parse(&rebuilt).unwrap();
        prop_assert_eq!(dump_to_string(&t2).unwrap(), text);
        let rebuilt2 = build(&dump_to_string(&t2).unwrap(), Cursor::new(Vec::new())).unwrap().into_inner();
        prop_assert_eq!(rebuilt2, rebuilt);
    }

    #[test]
    fn arbitrary_bytes_never_panic(mut bytes in prop::collection::vec(any::<u8>(), 0..512), keep in 0usize..4) {
        // Half the time start from a valid header so the record parser is reached.
        if keep > 1 {
            let good = sample_bytes();
            let n = bytes.len().min(good.len());
            let k = (keep * 40).min(n);
            bytes[..k].copy_from_slice(&good[..k]);
            if bytes.len() >= 64 { bytes[..64].copy_from_slice(&good[..64]); }
        }
        if let Ok(t) = Trace::parse(&bytes) {
            for r in t.records() { let _ = r; }
            let _ = validate(&t);
            let _ = dump_to_string(&t);
        }
    }
}

#[test]
fn the_text_form_keeps_a_slot_beyond_its_ring_as_written() {
    // Validation refuses such a trace; the text form must still not turn it into another one,
    // or `build` of a `dump` would make a trace that validates out of one that does not.
    let text = "@0 viommu 1 vmid=1 smmu=0 profile=kernel sidsize=16\n@0 ring 2 viommu=1 log2size=2\n@1 cmd ring=2 slot=0xfff8000e CMD_SYNC\n@1 cmd ring=2 slot=7 CMD_SYNC\n";
    let bytes = build(text, Cursor::new(Vec::new())).unwrap().into_inner();
    let t = Trace::parse(&bytes).unwrap();
    let dumped = dump_to_string(&t).unwrap();
    assert!(dumped.contains("slot=0xfff8000e"), "{dumped}");
    let again = build(&dumped, Cursor::new(Vec::new()))
        .unwrap()
        .into_inner();
    assert_eq!(again, bytes);
    assert!(validate(&Trace::parse(&again).unwrap()).is_err());
}
