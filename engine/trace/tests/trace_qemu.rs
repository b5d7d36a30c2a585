//! Importing QEMU `-trace 'smmuv3_*'` logs.

use std::io::Cursor;
use vcmdq::command::{decode, Command, RawCommand};
use vcmdq_trace::gen::linux;
use vcmdq_trace::qemu::{import, ImportProblem};
use vcmdq_trace::text::dump_to_string;
use vcmdq_trace::{validate, Event, Trace};

const SAMPLE: &str = include_str!("../../../traces/qemu-sample.log");

fn import_str(log: &str) -> (Vec<u8>, vcmdq_trace::qemu::ImportStats) {
    let (out, stats) = import(Cursor::new(log), Cursor::new(Vec::new())).unwrap();
    (out.into_inner(), stats)
}

const SAMPLE_DUMP: &str = "\
trace version=1 created=0 imported waits-sync
@0 viommu 0 vmid=1 smmu=0 profile=kernel sidsize=16 range
@0 device 1 smmu=0 psid=0x10
@0 bind viommu=0 device=1 vsid=0x10
@0 device 2 smmu=0 psid=0x18
@0 bind viommu=0 device=2 vsid=0x18
@0 ring 0 viommu=0 log2size=3
@100000 cmd ring=0 slot=0 CFGI_STE sid=0x10
@100000 cmd ring=0 slot=1 CFGI_CD ssid=0x0 sid=0x10
@100000 cmd ring=0 slot=2 TLBI_NH_ASID vmid=0 asid=1
@100000 cmd ring=0 slot=3 CMD_SYNC cs=1 msh=0 msiattr=0 msidata=0x0 msiaddr=0x0
@100000 doorbell ring=0 prod=4
@900000 cmd ring=0 slot=4 TLBI_NH_VA vmid=0 asid=1 addr=0x8000_0000 tg=4k num=4 scale=3 ttl=3 leaf
@900000 cmd ring=0 slot=5 TLBI_NH_VAA vmid=0 addr=0x9000_0000 tg=0 num=0 scale=0 ttl=0 leaf
@900000 cmd ring=0 slot=6 ATC_INV sid=0x10 ssid=0x0 addr=0x0 size=52
@900000 cmd ring=0 slot=7 PREFETCH_CONFIG ssid=0x0 sid=0x10
@900000 cmd ring=0 slot=8 CMD_SYNC cs=0 msh=0 msiattr=0 msidata=0x0 msiaddr=0x0
@900000 doorbell ring=0 prod=9
@1900000 cmd ring=0 slot=9 TLBI_NH_ALL vmid=0
@1900000 cmd ring=0 slot=10 RAW 0x0000000000000047 0x0000000000000000
@1900000 cmd ring=0 slot=11 CMD_SYNC cs=1 msh=0 msiattr=0 msidata=0x0 msiaddr=0x0
@1900000 doorbell ring=0 prod=12
@1908000 outcome ring=0 slot=10 refused ILL
@2100000 fix ring=0 slot=10 CMD_SYNC cs=0 msh=0 msiattr=0 msidata=0x0 msiaddr=0x0
@2100000 ack ring=0
@2900000 cmd ring=0 slot=12 CFGI_STE_RANGE sid=0x10 range=2
@2900000 cmd ring=0 slot=13 CFGI_CD_ALL sid=0x18
@2900000 cmd ring=0 slot=14 TLBI_NH_ASID vmid=0 asid=2
@2900000 cmd ring=0 slot=15 CMD_SYNC cs=0 msh=0 msiattr=0 msidata=0x0 msiaddr=0x0
@2900000 doorbell ring=0 prod=0
";

#[test]
fn the_sample_log_imports_as_documented() {
    let (bytes, stats) = import_str(SAMPLE);
    let t = Trace::parse(&bytes).unwrap();
    validate(&t).unwrap();
    assert_eq!(dump_to_string(&t).unwrap(), SAMPLE_DUMP);
    assert_eq!(stats.passes, 5);
    assert_eq!(stats.fixes, 1);
    assert_eq!(stats.acks, 1);
    assert_eq!(stats.errors, 1);
    assert_eq!(stats.log2size, 3);
    assert!(!stats.log2size_inferred);
    assert_eq!(stats.unobserved, 0);
    // The bundled import is this one.
    let bundled = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../traces/qemu-sample.vct"
    ))
    .unwrap();
    assert!(
        bundled == bytes,
        "traces/qemu-sample.vct is stale: run `make traces`"
    );
}

#[test]
fn without_timestamps_or_queue_base() {
    // No `PID@time:` prefixes: line N is at N microseconds. No CMDQ_BASE write: LOG2SIZE from
    // the highest index seen (7 -> 3).
    let log: String = SAMPLE
        .lines()
        .filter(|l| !l.contains("addr: 0x90"))
        .map(|l| match l.split_once(':') {
            Some((pre, rest)) if pre.contains('@') => format!("{rest}\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    let (bytes, stats) = import_str(&log);
    assert!(stats.log2size_inferred);
    assert_eq!(stats.log2size, 3);
    let t = Trace::parse(&bytes).unwrap();
    let strip_ts = |s: &str| -> Vec<String> {
        s.lines()
            .map(|l| l.split_once(' ').map_or(l, |(_, r)| r).to_string())
            .collect()
    };
    assert_eq!(
        strip_ts(&dump_to_string(&t).unwrap()),
        strip_ts(SAMPLE_DUMP)
    );
    let first_cmd = t
        .records()
        .map(Result::unwrap)
        .find(|r| matches!(r.event, Event::Commands { .. }))
        .unwrap();
    assert_eq!(
        first_cmd.timestamp_ns,
        2 * 1000,
        "the first consume line is line 2"
    );
}

#[test]
fn slots_never_consumed_are_filled_and_counted() {
    // Cut the log right after the error: the guest's slot 11 was written but QEMU never got
    // to it.
    let cut: String = SAMPLE
        .lines()
        .take_while(|l| !l.contains("smmuv3_read_mmio"))
        .map(|l| format!("{l}\n"))
        .collect();
    let (bytes, stats) = import_str(&cut);
    assert_eq!(stats.unobserved, 1);
    let t = Trace::parse(&bytes).unwrap();
    let text = dump_to_string(&t).unwrap();
    assert!(
        text.contains("@1900000 cmd ring=0 slot=11 CMD_SYNC cs=0"),
        "{text}"
    );
    assert!(!text.contains(" ack "));
}

#[test]
fn malformed_logs_are_refused_with_the_line() {
    let e = import(
        Cursor::new("junk\nsmmuv3_cmdq_consume prod=x cons=0 prod.wrap=0 cons.wrap=0\n"),
        Cursor::new(Vec::new()),
    )
    .unwrap_err();
    assert_eq!(e.line, 2);
    assert!(matches!(e.problem, ImportProblem::BadValue { .. }), "{e}");
    let e = import(
        Cursor::new("smmuv3_cmdq_consume prod=1 cons=0 cons.wrap=0\n"),
        Cursor::new(Vec::new()),
    )
    .unwrap_err();
    assert!(e.to_string().contains("prod.wrap"), "{e}");
    let e = import(
        Cursor::new("smmuv3_cmdq_consume prod=-1 cons=0 prod.wrap=0 cons.wrap=0\n"),
        Cursor::new(Vec::new()),
    )
    .unwrap_err();
    assert!(
        matches!(e.problem, ImportProblem::OutOfRange { value: -1, .. }),
        "{e}"
    );
    let e = import(Cursor::new("nothing here\n"), Cursor::new(Vec::new())).unwrap_err();
    assert!(matches!(e.problem, ImportProblem::NoActivity));
}

/// QEMU's view of one command: the lines `smmuv3_cmdq_consume` loop prints for it.
fn qemu_lines(cmd: RawCommand, index: u32, wrap: u32, prod: (u32, u32)) -> String {
    let mut s = format!(
        "smmuv3_cmdq_consume prod={} cons={index} prod.wrap={} cons.wrap={wrap}\n",
        prod.0, prod.1
    );
    let c = decode(cmd).unwrap();
    s += &format!(
        "smmuv3_cmdq_opcode <--- SMMU_CMD_{}\n",
        match c {
            Command::CmdSync { .. } => "SYNC",
            _ => c.name(),
        }
    );
    match c {
        Command::TlbiNhVa {
            asid,
            addr,
            tg,
            num,
            scale,
            ttl,
            leaf,
            ..
        } => {
            if tg == 0 {
                s += &format!("smmuv3_range_inval vmid=-1 asid={asid} addr={addr:#x} tg=0 num_pages=0x1 ttl={ttl} leaf={} stage=1\n", u8::from(leaf));
            } else {
                // QEMU splits the range into naturally aligned power-of-two chunks.
                let mut a = addr;
                let end = addr + ((u64::from(num) + 1) << scale << 12);
                while a < end {
                    let align = if a == 0 { 63 } else { a.trailing_zeros() };
                    let fit = 63 - (end - a).leading_zeros();
                    let chunk = 1u64 << align.min(fit);
                    s += &format!(
                        "smmuv3_range_inval vmid=-1 asid={asid} addr={a:#x} tg={tg} num_pages={:#x} ttl={ttl} leaf={} stage=1\n",
                        chunk >> 12,
                        u8::from(leaf)
                    );
                    a += chunk;
                }
            }
        }
        Command::TlbiNhAsid { asid, .. } => s += &format!("smmuv3_cmdq_tlbi_nh_asid asid={asid}\n"),
        Command::CfgiCd { sid, .. } => s += &format!("smmuv3_cmdq_cfgi_cd sid={sid:#x}\n"),
        _ => {}
    }
    s
}

#[test]
fn linux_range_invalidations_survive_qemus_split() {
    // What Linux would send for unmaps of many sizes, as QEMU would log it, imports back to the
    // same 16 bytes: QEMU's per-chunk lines add up to the command's range, and Linux's choice of
    // NUM and SCALE is the one the importer makes.
    let mut cmds = Vec::new();
    for pages in [
        1u64, 2, 3, 5, 31, 32, 33, 64, 96, 100, 511, 512, 4096, 12345,
    ] {
        cmds.extend(linux::tlbi_va(
            0,
            9,
            0x4000_0000,
            pages << 12,
            4096,
            true,
            true,
        ));
    }
    cmds.extend(linux::tlbi_va(
        0,
        9,
        0x4000_0000,
        3 << 12,
        4096,
        true,
        false,
    ));
    cmds.push(linux::tlbi_asid(0, 9));
    cmds.push(linux::cfgi_cd(0x20, 0));
    cmds.push(RawCommand::new(0x46, 0));
    let log2size = 7u32;
    let n = cmds.len() as u32;
    assert!(n <= 1 << log2size);
    let prod = (n & ((1 << log2size) - 1), n >> log2size);
    let mut log = format!(
        "smmuv3_write_mmio addr: 0x90 val:{:#x} size: 0x8(0)\n",
        0x4000_0000u64 | u64::from(log2size)
    );
    for (i, c) in cmds.iter().enumerate() {
        log += &qemu_lines(*c, i as u32, 0, prod);
    }
    log += &format!(
        "smmuv3_cmdq_consume_out prod:{}, cons:{}, prod_wrap:{}, cons_wrap:{}\n",
        prod.0, prod.0, prod.1, prod.1
    );
    let (bytes, _) = import_str(&log);
    let t = Trace::parse(&bytes).unwrap();
    let got: Vec<RawCommand> = t
        .records()
        .filter_map(|r| match r.unwrap().event {
            Event::Commands { cmds, .. } => Some(cmds.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    // CFGI_CD: QEMU does not log SSID or LEAF; the importer writes 0 for both.
    let mut want = cmds.clone();
    let cd = want.len() - 2;
    want[cd] = Command::CfgiCd {
        ssec: false,
        ssid: 0,
        sid: 0x20,
        leaf: false,
    }
    .encode();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g,
            w,
            "command {i}: {} vs {}",
            vcmdq::command::text::format_raw(g),
            vcmdq::command::text::format_raw(w)
        );
    }
}

mod no_panic {
    use super::*;
    use proptest::prelude::*;

    const EVENTS: &[&str] = &[
        "smmuv3_cmdq_consume prod={a} cons={b} prod.wrap={c} cons.wrap={d}",
        "smmuv3_cmdq_opcode <--- SMMU_CMD_{op}",
        "smmuv3_cmdq_consume_out prod:{a}, cons:{b}, prod_wrap:{c}, cons_wrap:{d} ",
        "smmuv3_cmdq_consume_error Error on SMMU_CMD_{op} command execution: {a}",
        "smmuv3_range_inval vmid={a} asid={b} addr={x} tg={c} num_pages={x} ttl={d} leaf={c} stage=1",
        "smmuv3_cmdq_cfgi_ste_range start={x} - end={x}",
        "smmuv3_cmdq_cfgi_cd sid={x}",
        "smmuv3_cmdq_tlbi_nh_asid asid={a}",
        "smmuv3_unhandled_cmd Unhandled command type={a}",
        "smmuv3_write_gerrorn acked=0x1, new GERRORN=0x1",
        "smmuv3_write_mmio addr: 0x90 val:{l} size: 0x8(0)",
        "smmuv3_trigger_irq irq={a}",
        "Illegal command type: {a}",
        "smmuv3_cmdq_consume prod={a}",
        "garbage {x}",
    ];
    const OPS: &[&str] = &[
        "SYNC",
        "TLBI_NH_VA",
        "CFGI_STE_RANGE",
        "ATC_INV",
        "INVALID",
        "UNKNOWN",
        "CFGI_ALL",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any sequence of plausible and implausible lines imports or is refused, never panics,
        /// and what imports is a valid trace.
        #[test]
        fn any_log(lines in prop::collection::vec((0usize..15, 0usize..7, any::<[i64; 4]>(), any::<u64>(), any::<bool>()), 0..60)) {
            let mut log = String::new();
            for (e, op, v, x, ts) in lines {
                if ts {
                    log += &format!("1@{}.{:06}:", v[0].unsigned_abs() % 100, v[1].unsigned_abs() % 1_000_000);
                }
                let small = |i: usize| {
                    if v[i] % 7 == 0 {
                        "-1".to_string()
                    } else {
                        (v[i].unsigned_abs() % 40).to_string()
                    }
                };
                log += &EVENTS[e]
                    .replace("{op}", OPS[op])
                    .replace("{a}", &small(0))
                    .replace("{b}", &small(1))
                    .replace("{c}", &(v[2] & 1).to_string())
                    .replace("{d}", &(v[3] & 3).to_string())
                    // LOG2SIZE up to 8: larger rings only make each case slower.
                    .replace("{l}", &format!("{:#x}", 0x4000_0000 | (v[0].unsigned_abs() % 9)))
                    .replace("{x}", &format!("{x:#x}"));
                log.push('\n');
            }
            if let Ok((out, _)) = import(Cursor::new(log), Cursor::new(Vec::new())) {
                let bytes = out.into_inner();
                let t = Trace::parse(&bytes).unwrap();
                validate(&t).unwrap();
            }
        }
    }
}

fn import_err(log: &[u8]) -> vcmdq_trace::qemu::ImportError {
    match import(Cursor::new(log.to_vec()), Cursor::new(Vec::new())) {
        Ok((_, stats)) => panic!("imported: {stats}"),
        Err(e) => e,
    }
}

/// The sample with `from` replaced by `to` on the first line containing `from`; returns the log
/// and that line's number.
fn sample_with(from: &str, to: &str) -> (String, u64) {
    let mut n = 0;
    let mut done = false;
    let log = SAMPLE
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if !done && l.contains(from) {
                done = true;
                n = i as u64 + 1;
                format!("{}\n", l.replacen(from, to, 1))
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert!(done, "{from:?} is not in the sample");
    (log, n)
}

#[test]
fn out_of_range_fields_are_refused_with_their_line_not_wrapped() {
    for (from, to, field) in [
        (
            "vmid=-1 asid=1 addr=0x80000000",
            "vmid=99999 asid=1 addr=0x80000000",
            "vmid",
        ),
        (
            "asid=1 addr=0x80000000",
            "asid=70000 addr=0x80000000",
            "asid",
        ),
        ("addr=0x80000000 tg=1", "addr=0x80000000 tg=7", "tg"),
        ("num_pages=0x20 ttl=3", "num_pages=0x20 ttl=4", "ttl"),
        ("ttl=3 leaf=1 stage=1", "ttl=3 leaf=2 stage=1", "leaf"),
        ("num_pages=0x20", "num_pages=0", "num_pages"),
        ("streamid= 0x10", "streamid= 0x100000000", "sid"),
        ("type=64", "type=300", "type"),
        ("execution: 1", "execution: 9", "error"),
        ("val:0x40000003", "val:0x40000015", "val"),
        ("start=0x10 - end=0x17", "start=0x10 - end=0x16", "end"),
    ] {
        let (log, line) = sample_with(from, to);
        let e = import_err(log.as_bytes());
        assert_eq!(e.line, line, "{to}: {e}");
        assert!(
            matches!(&e.problem, ImportProblem::Invalid { field: f, .. } if f == field),
            "{to}: {e}"
        );
    }
    // A count of pages that no single TLBI expresses is refused, not clipped.
    let (log, line) = sample_with("num_pages=0x8 ttl=3", "num_pages=0x9 ttl=3");
    let e = import_err(log.as_bytes());
    assert!(e.to_string().contains("(NUM+1) x 2^SCALE"), "{e}");
    assert_eq!(e.line, line - 2, "named at the command's opcode line");
    let e = import_err(
        b"smmuv3_write_mmio addr: 0x90 val:0x40000003 size: 0x8(0)\nIllegal command type: 999\n",
    );
    assert_eq!(e.line, 2, "{e}");
}

#[test]
fn a_range_line_missing_a_field_or_cut_mid_line_is_refused_not_rebuilt_with_zeros() {
    for (from, to) in [
        (" tg=1 num_pages=0x20", " num_pages=0x20"),
        (" num_pages=0x20", ""),
        (" ttl=3 leaf=1 stage=1", " leaf=1 stage=1"),
        (" leaf=1 stage=1", " stage=1"),
        // A QEMU killed mid-line.
        (" tg=1 num_pages=0x20 ttl=3 leaf=1 stage=1", " tg=1 num_pa"),
        (" num_pages=0x20 ttl=3 leaf=1 stage=1", " num_pages=0x"),
    ] {
        let (log, line) = sample_with(
            "addr=0x80000000 tg=1 num_pages=0x20 ttl=3 leaf=1 stage=1",
            &"addr=0x80000000 tg=1 num_pages=0x20 ttl=3 leaf=1 stage=1".replacen(from, to, 1),
        );
        let e = import_err(log.as_bytes());
        assert_eq!(e.line, line, "{to:?}: {e}");
        assert!(
            matches!(
                e.problem,
                ImportProblem::Missing { .. } | ImportProblem::BadValue { .. }
            ),
            "{to:?}: {e}"
        );
    }
}

#[test]
fn a_log_without_range_events_is_refused_rather_than_imported_with_address_zero() {
    // What `-trace 'smmuv3_cmdq_*'` records: no smmuv3_range_inval.
    let log: String = SAMPLE
        .lines()
        .filter(|l| !l.contains("smmuv3_range_inval"))
        .map(|l| format!("{l}\n"))
        .collect();
    let e = import_err(log.as_bytes());
    assert!(
        matches!(e.problem, ImportProblem::NoAddress { op: "TLBI_NH_VA" }),
        "{e}"
    );
    assert!(e.to_string().contains("-trace 'smmuv3_*'"), "{e}");
    let want = SAMPLE
        .lines()
        .filter(|l| !l.contains("smmuv3_range_inval"))
        .position(|l| l.contains("<--- SMMU_CMD_TLBI_NH_VA"))
        .unwrap() as u64
        + 1;
    assert_eq!(e.line, want);
}

#[test]
fn a_malformed_time_prefix_on_an_smmuv3_line_is_refused_not_skipped() {
    for bad in [
        "12345@1700000000x000200:",
        "12345@1700000000:",
        "x@1.000200:",
        "12345@1.2.3:",
    ] {
        let (log, line) = sample_with("12345@1700000000.000200:", bad);
        let e = import_err(log.as_bytes());
        assert_eq!(e.line, line, "{bad}: {e}");
        assert!(
            matches!(e.problem, ImportProblem::BadPrefix(_)),
            "{bad}: {e}"
        );
    }
}

#[test]
fn a_non_utf8_byte_costs_an_unrelated_line_only_and_refuses_an_smmuv3_line() {
    let mut log = SAMPLE.as_bytes().to_vec();
    let at = SAMPLE.find("pci_cfg_write").unwrap();
    log[at + 3] = 0xff;
    let (_, stats) = import(Cursor::new(log), Cursor::new(Vec::new())).unwrap();
    assert_eq!(stats.skipped["not UTF-8 (and not an smmuv3_* event)"], 1);
    assert!(stats.warnings().iter().any(|w| w.contains("not UTF-8")));
    let mut log = SAMPLE.as_bytes().to_vec();
    let at = SAMPLE.find("smmuv3_cmdq_cfgi_cd sid=0x10").unwrap();
    log[at + 25] = 0xfe;
    let e = import_err(&log);
    assert!(matches!(e.problem, ImportProblem::NotUtf8), "{e}");
    assert_eq!(e.line, 9);
}

#[test]
fn what_is_skipped_or_approximated_is_counted_in_the_warnings_and_json() {
    let (_, stats) = import_str(SAMPLE);
    assert_eq!(stats.skipped["not an smmuv3_* event"], 1);
    assert_eq!(
        stats.skipped["an smmuv3_* event the import does not use"],
        9
    );
    let approx = |key: &str| {
        stats
            .approximated
            .iter()
            .find(|(k, _)| k.starts_with(key))
            .map_or(0, |(_, n)| *n)
    };
    assert_eq!(approx("ATC_INV"), 1);
    // ATC_INV's; PREFETCH_CONFIG's is the CFGI_STE's before it.
    assert_eq!(approx("SID not in the log"), 1);
    assert_eq!(approx("CMD_SYNC"), 5);
    let j = stats.to_json();
    assert_eq!(
        j["warnings"].as_array().unwrap().len(),
        stats.warnings().len()
    );
    assert_eq!(j["skipped"]["not an smmuv3_* event"], 1);
}

#[test]
fn filler_for_slots_never_consumed_is_bounded_per_pass_and_in_all() {
    // A ring of 2^19 entries, PROD 100000 ahead, one command consumed: a few lines that would
    // make 99,999 filler commands.
    let log = "smmuv3_write_mmio addr: 0x90 val:0x40000013 size: 0x8(0)\n\
               smmuv3_cmdq_consume prod=100000 cons=0 prod.wrap=0 cons.wrap=0\n\
               smmuv3_cmdq_opcode <--- SMMU_CMD_SYNC\n\
               smmuv3_cmdq_consume_out prod:100000, cons:1, prod_wrap:0, cons_wrap:0\n";
    let e = import_err(log.as_bytes());
    assert_eq!(e.line, 2);
    assert!(
        matches!(
            e.problem,
            ImportProblem::TooMuchFiller { filler: 99_999, .. }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("--max-filler-per-pass"), "{e}");
    let limits = |per_pass, all| vcmdq_trace::qemu::ImportLimits {
        max_filler_per_pass: per_pass,
        max_filler: all,
        ..Default::default()
    };
    let e = vcmdq_trace::qemu::import_with(
        Cursor::new(log),
        Cursor::new(Vec::new()),
        &limits(1 << 20, 1000),
    )
    .unwrap_err();
    assert!(e.to_string().contains("--max-filler "), "{e}");
    let (_, stats) = vcmdq_trace::qemu::import_with(
        Cursor::new(log),
        Cursor::new(Vec::new()),
        &limits(1 << 20, 1 << 20),
    )
    .unwrap();
    assert_eq!(stats.unobserved, 99_999);
}

#[test]
fn an_endless_line_is_refused_at_its_limit() {
    let mut log = b"smmuv3_cmdq_consume ".to_vec();
    log.resize(vcmdq_trace::qemu::MAX_LINE_BYTES + 10, b'x');
    let e = import_err(&log);
    assert!(matches!(e.problem, ImportProblem::LineTooLong), "{e}");
    assert!(e.to_string().contains("MAX_LINE_BYTES"), "{e}");
}

#[test]
fn a_range_line_then_another_sid_for_the_same_command_does_not_panic() {
    // Found by the qemu_import fuzz target: the RANGE was computed from the last SID seen, not
    // the range's own start, and underflowed.
    let log = "smmuv3_cmdq_consume prod=2 cons=0 prod.wrap=0 cons.wrap=0\n\
               smmuv3_cmdq_opcode <--- SMMU_CMD_CFGI_STE_RANGE\n\
               smmuv3_cmdq_cfgi_ste_range start=0x10 - end=0x17\n\
               smmuv3_cmdq_cfgi_ste streamid=0x40\n\
               smmuv3_cmdq_consume prod=2 cons=1 prod.wrap=0 cons.wrap=0\n\
               smmuv3_cmdq_opcode <--- SMMU_CMD_SYNC\n\
               smmuv3_cmdq_consume_out prod:2, cons:2, prod_wrap:0, cons_wrap:0\n";
    let (bytes, _) = import_str(log);
    let text = dump_to_string(&Trace::parse(&bytes).unwrap()).unwrap();
    assert!(text.contains("CFGI_STE_RANGE sid=0x40 range=2"), "{text}");
}

#[test]
fn a_log_without_end_is_refused_at_the_command_and_sid_limits() {
    let limits = vcmdq_trace::qemu::ImportLimits {
        max_commands: 100,
        max_sids: 10,
        ..Default::default()
    };
    let one = "smmuv3_cmdq_consume prod=1 cons=0 prod.wrap=0 cons.wrap=0\nsmmuv3_cmdq_opcode <--- SMMU_CMD_SYNC\n";
    let e = vcmdq_trace::qemu::import_with(
        Cursor::new(one.repeat(1000)),
        Cursor::new(Vec::new()),
        &limits,
    )
    .unwrap_err();
    assert!(
        matches!(
            e.problem,
            ImportProblem::TooMany {
                flag: "--max-commands",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.line, 203, "the line that went over");
    let sids: String = (0..20)
        .map(|i| format!("smmuv3_config_cache_inv Config cache INV for sid={i:#x}\n"))
        .collect();
    let e = vcmdq_trace::qemu::import_with(Cursor::new(sids), Cursor::new(Vec::new()), &limits)
        .unwrap_err();
    assert!(
        matches!(
            e.problem,
            ImportProblem::TooMany {
                flag: "--max-sids",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.line, 11);
}

/// The first 260 lines of a real capture (`traces/linux/README.md`): Linux 6.1's arm-smmu-v3
/// probing QEMU 7.2's SMMU, installing three STEs, then its first unmaps.
const REAL: &str = include_str!("../../../traces/linux/strict-excerpt.log");

fn dump_of(log: &str) -> (String, vcmdq_trace::qemu::ImportStats) {
    let (bytes, stats) = import_str(log);
    (
        dump_to_string(&Trace::parse(&bytes).unwrap()).unwrap(),
        stats,
    )
}

/// The dump lines of commands with `op`, without their timestamps and slots.
fn cmds_of(dump: &str, op: &str) -> Vec<String> {
    dump.lines()
        .filter_map(|l| l.split_once(&format!(" {op} ")).map(|(_, r)| r.to_string()))
        .collect()
}

fn count(map: &std::collections::BTreeMap<&'static str, u64>, prefix: &str) -> u64 {
    map.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, n)| *n)
        .sum()
}

#[test]
fn a_real_linux_log_gives_the_queue_size_of_its_cmdq_base_write() {
    let (_, stats) = import_str(REAL);
    assert_eq!(stats.log2size, 16, "CMDQ_BASE val 0x400000007ad00010");
    assert!(!stats.log2size_inferred);
    assert_eq!(count(&stats.exact, "LOG2SIZE"), 1);
}

#[test]
fn prefetch_config_takes_the_sid_of_the_cfgi_ste_before_it_in_a_real_linux_log() {
    // Lines 79, 119 and 159 of the capture follow CFGI_STE of 0x8, 0x10 and 0x18.
    let (dump, stats) = dump_of(REAL);
    assert_eq!(
        cmds_of(&dump, "PREFETCH_CONFIG"),
        ["ssid=0x0 sid=0x8", "ssid=0x0 sid=0x10", "ssid=0x0 sid=0x18"]
    );
    assert_eq!(count(&stats.reconstructed, "PREFETCH_CONFIG SID"), 3);
    assert_eq!(count(&stats.approximated, "SID not in the log"), 0);
}

#[test]
fn cmd_sync_of_a_real_linux_log_is_rebuilt_as_linux_writes_it_on_an_smmu_without_msi() {
    let (dump, stats) = dump_of(REAL);
    let syncs = cmds_of(&dump, "CMD_SYNC");
    assert_eq!(syncs.len(), 21);
    for s in &syncs {
        // CS=SEV, MSH=ISH, MSIATTR=OIWB: IDR0 0xd40101a has no MSI.
        assert_eq!(s, "cs=2 msh=3 msiattr=15 msidata=0x0 msiaddr=0x0");
    }
    assert_eq!(count(&stats.reconstructed, "CMD_SYNC CS=SEV"), 21);
    assert_eq!(count(&stats.approximated, "CMD_SYNC"), 0);
    assert_eq!(stats.idr0, Some(0xd40_101a));
    let j = stats.to_json();
    assert_eq!(j["smmu"]["MSI"], false);
    assert_eq!(j["smmu"]["RIL"], true);
    // Without the guest's IDR0 read nothing says what the driver chose: 0, approximated.
    let no_idr: String = REAL
        .lines()
        .filter(|l| !l.contains("read_mmio addr: 0x0 "))
        .map(|l| format!("{l}\n"))
        .collect();
    let (dump, stats) = dump_of(&no_idr);
    assert!(cmds_of(&dump, "CMD_SYNC")
        .iter()
        .all(|s| s.starts_with("cs=0 msh=0 msiattr=0")));
    assert_eq!(count(&stats.approximated, "CMD_SYNC"), 21);
    assert_eq!(count(&stats.reconstructed, "CMD_SYNC"), 0);
}

#[test]
fn an_smmu_with_msis_and_an_irq_line_gives_linux_s_msi_polling_sync() {
    // The same log as if IDR0 had MSI (bit 13) and QEMU had raised the CMD_SYNC IRQ after the
    // first CMD_SYNC (line 23, slot 1): Linux then polls an MSI written to the sync's own slot.
    let log: String = REAL
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let l = l.replace("val:0xd40101a", "val:0xd40301a");
            if i + 1 == 23 {
                format!("{l}\n29553@1796140979.209386:smmuv3_trigger_irq irq=2\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let (dump, stats) = dump_of(&log);
    let syncs = cmds_of(&dump, "CMD_SYNC");
    assert_eq!(
        syncs[0], "cs=1 msh=3 msiattr=15 msidata=0x0 msiaddr=0x7ad0_0010",
        "CMDQ_BASE 0x7ad00000 + slot 1 x 16"
    );
    assert_eq!(count(&stats.exact, "CMD_SYNC CS=IRQ"), 1);
    assert_eq!(
        count(&stats.reconstructed, "CMD_SYNC MSH=3 MSIATTR=0xf MSIADDR"),
        1
    );
}

#[test]
fn cfgi_ste_leaf_which_qemu_does_not_log_is_counted_as_approximated() {
    let (dump, stats) = dump_of(REAL);
    assert_eq!(cmds_of(&dump, "CFGI_STE").len(), 6);
    assert_eq!(count(&stats.approximated, "CFGI_STE/CFGI_CD LEAF"), 6);
    assert!(stats.warnings().iter().any(|w| w.contains("LEAF")));
}

/// The real log's TLBI_NH_VA commands.
fn real_tlbis(log: &str) -> Vec<String> {
    cmds_of(&dump_of(log).0, "TLBI_NH_VA")
}

#[test]
fn qemu_7_2_spelling_smmuv3_s1_range_inval_of_a_real_log_is_imported() {
    assert!(REAL.contains(
        "smmuv3_s1_range_inval vmid=0 asid=1 addr=0xffff6000 tg=1 num_pages=0x1 ttl=3 leaf=1"
    ));
    assert_eq!(
        real_tlbis(REAL),
        [
            "vmid=0 asid=1 addr=0xffff_6000 tg=4k num=0 scale=0 ttl=3 leaf",
            "vmid=0 asid=1 addr=0xffff_9000 tg=4k num=0 scale=0 ttl=3 leaf",
            "vmid=0 asid=1 addr=0xffff_8000 tg=4k num=0 scale=0 ttl=3 leaf",
            "vmid=0 asid=1 addr=0xffff_7000 tg=4k num=0 scale=0 ttl=3 leaf",
        ]
    );
}

#[test]
fn current_qemu_spelling_smmuv3_range_inval_with_its_stage_is_imported_alike() {
    // QEMU since 9.x (hw/arm/trace-events): `smmuv3_range_inval(int vmid, int asid, uint64_t
    // addr, uint8_t tg, uint64_t num_pages, uint8_t ttl, bool leaf, int stage)`, and CFGI
    // events print `sid=0x%x`.
    let current: String = REAL
        .lines()
        .map(|l| {
            let l = l.replace("streamid= ", "sid=");
            match l.split_once("smmuv3_s1_range_inval ") {
                Some((pre, rest)) => format!("{pre}smmuv3_range_inval {rest} stage=1\n"),
                None => format!("{l}\n"),
            }
        })
        .collect();
    assert!(!current.contains("s1_range_inval"));
    assert_eq!(real_tlbis(&current), real_tlbis(REAL));
    assert_eq!(dump_of(&current).0, dump_of(REAL).0);
}

#[test]
fn a_real_log_without_timestamps_imports_with_a_warning_that_its_times_are_line_numbers() {
    // QEMU 7.2 without `-msg timestamp=on` prints bare event lines.
    let bare: String = REAL
        .lines()
        .map(|l| format!("{}\n", l.split_once(':').map_or(l, |(_, r)| r)))
        .collect();
    let (_, stats) = import_str(&bare);
    assert_eq!(stats.untimed, 260);
    assert!(
        stats.warnings()[0].contains("-msg timestamp=on"),
        "{:?}",
        stats.warnings()
    );
    assert_eq!(stats.to_json()["untimed_lines"], 260);
    let (_, timed) = import_str(REAL);
    assert_eq!(timed.untimed, 0);
    assert!(!timed.warnings().iter().any(|w| w.contains("timestamp")));
}

#[test]
fn a_real_log_cut_mid_line_warns_with_the_line_number_and_does_not_import_the_cut_line() {
    // What a QEMU killed while writing leaves (seen in a real capture), and a range line cut
    // short, which would otherwise read as a one-page TLBI.
    for tail in [
        "29555@1796140988.",
        "29555@1796140980.714435:smmuv3_s1_range_inval vmid=0 asid=1 addr=0xffff6000 tg=1 num_pages=0x1 ttl=3 le",
    ] {
        let log = format!("{REAL}{tail}");
        let (_, stats) = import_str(&log);
        assert_eq!(stats.cut_last_line, Some(261), "{tail}");
        let w = &stats.warnings()[0];
        assert!(
            w.contains("line 261") && w.contains("NOT imported"),
            "{tail}: {w}"
        );
        assert_eq!(stats.to_json()["cut_last_line"], 261);
    }
    let (_, whole) = import_str(REAL);
    assert_eq!(whole.cut_last_line, None);
}
