//! `vcmdq decode` and `vcmdq encode` run as a person runs them.

mod common;

use common::vcmdq;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Output;

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn temp_file(name: &str, body: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// A queue with a bad command and a malformed line in the middle.
const QUEUE: &str = "\
# comment
0x0005000000202012 0x00000000fff00701

0x0000000000000042 0x0000000000000000
0x46 1 2
0000_0000_0fc0_1046 0000_0004_0001_0020   # a CMD_SYNC
";

#[test]
fn decode_file_goes_on_after_errors() {
    let f = temp_file("decode_file.txt", QUEUE);
    let name = f.display().to_string();
    let o = vcmdq(&["decode", &name], "");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let want = format!(
        "TLBI_NH_VA vmid=0 asid=5 addr=0xfff0_0000 tg=4k num=2 scale=2 ttl=3 leaf\n\
         {name}: line 4: error: illegal opcode 0x42 (RAW 0x0000000000000042 0x0000000000000000)\n\
         {name}: line 5: error: expected two 64-bit hex words `d0 d1`, got 3 words\n\
         CMD_SYNC cs=1 msh=3 msiattr=15 msidata=0x0 msiaddr=0x4_0001_0020\n"
    );
    assert_eq!(stdout(&o), want);
    assert_eq!(stderr(&o), "");
}

#[test]
fn decode_stdin_json() {
    let o = vcmdq(&["decode", "--json"], QUEUE);
    assert_eq!(o.status.code(), Some(1));
    let v: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(v.len(), 4);
    assert_eq!(
        v[0],
        serde_json::json!({"op": "TLBI_NH_VA", "opcode": 18, "vmid": 0, "asid": 5,
            "addr": 0xfff0_0000u64, "tg": 1, "num": 2, "scale": 2, "ttl": 3, "leaf": true})
    );
    assert_eq!(
        v[1],
        serde_json::json!({"error": "illegal opcode 0x42", "opcode": 0x42, "line": 4})
    );
    assert_eq!(v[2]["line"], 5);
    assert!(v[2].get("opcode").is_none());
    assert!(v[2].get("file").is_none(), "stdin has no file name");
    assert_eq!(v[3]["op"], "CMD_SYNC");
    assert_eq!(v[3]["msiaddr"], 0x4_0001_0020u64);
}

#[test]
fn decode_all_good_exits_zero_and_json_names_files() {
    let f = temp_file("decode_good.txt", "0x10 0\n0x11 0\n");
    let g = temp_file("decode_bad.txt", "0x12 0x2\n");
    let (f, g) = (f.display().to_string(), g.display().to_string());
    let o = vcmdq(&["decode", &f], "");
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        stdout(&o),
        "TLBI_NH_ALL vmid=0\nTLBI_NH_ASID vmid=0 asid=0\n"
    );
    // `-` is standard input, between two files.
    let o = vcmdq(&["decode", "--json", &f, "-", &g], "0x18 0\n");
    assert_eq!(o.status.code(), Some(1));
    let v: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(v.len(), 4);
    assert_eq!(v[2]["op"], "TLBI_EL3_ALL");
    assert_eq!(v[3]["file"], g.as_str());
    assert_eq!(v[3]["line"], 1);
    assert_eq!(v[3]["res0_d1"], 2);
    assert_eq!(v[3]["op"], "TLBI_NH_VA");
}

#[test]
fn decode_unreadable_file_is_status_two_and_others_still_decode() {
    let f = temp_file("decode_ok.txt", "0x46 0\n");
    let f = f.display().to_string();
    let missing = format!("{f}.does-not-exist");
    let o = vcmdq(&["decode", &missing, &f], "");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("does-not-exist"), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "CMD_SYNC cs=0 msh=0 msiattr=0 msidata=0x0 msiaddr=0x0\n"
    );
}

#[test]
fn usage_error_is_status_two() {
    let o = vcmdq(&["decode", "--no-such-flag"], "");
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn encode_then_decode_round_trips() {
    let cmds = [
        "TLBI_NH_VA vmid=3 asid=7 addr=0x8000_0000 tg=4k num=3 scale=0 ttl=3 leaf",
        "ATC_INV sid=0x100 ssid=0x0 addr=0xfff0_0000 size=4",
        "CMD_SYNC cs=1 msh=3 msiattr=15 msidata=0x0 msiaddr=0x4_0001_0020",
        "RAW 0x0000000000000047 0x0000000000000005",
    ];
    // Quoted, one argument per command.
    let enc = vcmdq(&[&["encode"], &cmds[..]].concat(), "");
    assert_eq!(enc.status.code(), Some(0), "{}", stderr(&enc));
    // Unquoted: the words of all commands as separate arguments.
    let words: Vec<&str> = cmds.iter().flat_map(|c| c.split_whitespace()).collect();
    let enc2 = vcmdq(&[&["encode"], &words[..]].concat(), "");
    assert_eq!(stdout(&enc2), stdout(&enc));
    // From standard input, with a comment and a blank line.
    let input = format!("# burst\n{}\n\n", cmds.join("\n"));
    let enc3 = vcmdq(&["encode"], &input);
    assert_eq!(stdout(&enc3), stdout(&enc));

    let dec = vcmdq(&["decode"], &stdout(&enc));
    let lines: Vec<String> = stdout(&dec).lines().map(String::from).collect();
    assert_eq!(&lines[..3], &cmds[..3]);
    // The RAW bytes do not decode: reported, status 1.
    assert!(lines[3].starts_with("line 4: error: illegal opcode 0x47"));
    assert_eq!(dec.status.code(), Some(1));
}

#[test]
fn encode_reports_bad_lines_and_goes_on() {
    let o = vcmdq(
        &["encode"],
        "TLBI_NH_ALL vmid=1\nTLBI_NH_ALL vmid=0x10000\nNOT_A_COMMAND\nTLBI_NH_ALL vmid=2\n",
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stdout(&o),
        "0x0000000100000010 0x0000000000000000\n0x0000000200000010 0x0000000000000000\n"
    );
    let err = stderr(&o);
    assert!(
        err.contains("line 2: error: TLBI_NH_ALL: bad value"),
        "{err}"
    );
    assert!(err.contains("line 3: error: unknown command"), "{err}");
    let o = vcmdq(&["encode", "TLBI_NH_VA", "num=1"], "");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("command 1: error:"), "{}", stderr(&o));
    assert!(stderr(&o).contains("TG=0"), "{}", stderr(&o));
}

#[test]
fn bundled_sample_queue_decodes_with_one_error() {
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/../../traces/sample-queue.txt");
    let o = vcmdq(&["decode", sample], "");
    assert_eq!(
        o.status.code(),
        Some(1),
        "the sample holds one illegal command"
    );
    let out = stdout(&o);
    let errors: Vec<&str> = out.lines().filter(|l| l.contains(": error: ")).collect();
    assert_eq!(errors.len(), 1, "{out}");
    assert!(errors[0].contains("illegal opcode 0x42"));
    let ops: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for op in ["TLBI_NH_VA", "CMD_SYNC", "ATC_INV", "CFGI_CD"] {
        assert!(ops.contains(&op), "{op} missing from the sample: {out}");
    }
    assert_eq!(out.lines().count(), 9);
}
