//! `vcmdq decode`: 16-byte commands, written as two hex words a line, to the text form or JSON.
//!
//! Input is untrusted: a line that is not two hex words, or a command that does not decode, is
//! reported with its file and line number and decoding goes on with the next line, so one bad
//! entry never hides the rest of a queue dump.
//!
//! Exit status: 0 when every command decoded, 1 when a line was malformed or a command did not
//! decode, 2 when a file could not be read (the other files are still decoded) or on a usage
//! error.

use super::input::{LineError, Lines};
use super::out;
use super::CliError;
use clap::Args;
use std::io::{self, BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use vcmdq::command::{decode, RawCommand};
use vcmdq_trace::json;

/// Arguments of `vcmdq decode`.
#[derive(Args, Debug)]
#[command(
    after_help = "Exit status: 0 every command decoded; 1 a line was malformed or a command \
did not decode (reported in place, decoding goes on); 2 a file could not be read, or a usage error."
)]
pub struct DecodeArgs {
    /// Files to read, one command a line as `d0 d1` (64-bit hex words, `0x` and `_` optional;
    /// blank lines and `#` comments skipped). `-` or no file: standard input.
    files: Vec<PathBuf>,
    /// Print one JSON object per command instead of the text form.
    #[arg(long)]
    json: bool,
}

/// What one input line holds.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// Blank or a comment.
    Skip,
    /// Two words.
    Words(RawCommand),
    /// Anything else: why.
    Malformed(String),
}

/// Why a word is not one of the two hex words of the `d0 d1` form.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HexWordError {
    /// Not hex digits (with an optional `0x` and `_` anywhere).
    #[error("{0:?} is not a hex number")]
    NotHex(String),
    /// Hex digits, more than 64 bits of them.
    #[error("{0:?} does not fit 64 bits")]
    TooWide(String),
}

/// One 64-bit hex word of the `d0 d1` form: `0x` optional, `_` anywhere, nothing else.
fn hex_word(w: &str) -> Result<u64, HexWordError> {
    let digits = w
        .strip_prefix("0x")
        .or_else(|| w.strip_prefix("0X"))
        .unwrap_or(w);
    let clean: String = digits.chars().filter(|&c| c != '_').collect();
    if clean.is_empty() || !clean.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(HexWordError::NotHex(w.to_string()));
    }
    u64::from_str_radix(&clean, 16).map_err(|_| HexWordError::TooWide(w.to_string()))
}

/// The command the two hex words `d0 d1` stand for (the form `decode` reads and `encode`
/// prints); the error names the word at fault, `d0` or `d1`.
pub(crate) fn hex_words(d0: &str, d1: &str) -> Result<RawCommand, (&'static str, HexWordError)> {
    let d0 = hex_word(d0).map_err(|e| ("d0", e))?;
    let d1 = hex_word(d1).map_err(|e| ("d1", e))?;
    Ok(RawCommand::new(d0, d1))
}

/// `line` without its `#` comment.
pub(crate) fn strip_comment(line: &str) -> &str {
    line.split_once('#').map_or(line, |(body, _)| body)
}

/// Reads one line of the decode input form.
fn parse_line(line: &str) -> Line {
    let words: Vec<&str> = strip_comment(line).split_whitespace().collect();
    match words[..] {
        [] => Line::Skip,
        [d0, d1] => match hex_words(d0, d1) {
            Ok(raw) => Line::Words(raw),
            Err((which, e)) => Line::Malformed(format!("{which}: {e}")),
        },
        _ => Line::Malformed(format!(
            "expected two 64-bit hex words `d0 d1`, got {} word{}",
            words.len(),
            if words.len() == 1 { "" } else { "s" }
        )),
    }
}

/// Where output goes and how it looks; remembers whether anything failed.
struct Printer<W: Write> {
    out: W,
    json: bool,
    /// Set when files were named, so reports say which one.
    with_file: bool,
    failed: bool,
}

impl<W: Write> Printer<W> {
    fn line(&mut self, file: &str, n: u64, line: &str) -> io::Result<()> {
        match parse_line(line) {
            Line::Skip => Ok(()),
            Line::Malformed(why) => {
                self.failed = true;
                self.error(file, n, &why, None)
            }
            Line::Words(raw) => match decode(raw) {
                Ok(cmd) if self.json => writeln!(self.out, "{}", json::to_json(&cmd)),
                Ok(cmd) => writeln!(self.out, "{cmd}"),
                Err(e) => {
                    self.failed = true;
                    if self.json {
                        let mut v = json::error_json(&e);
                        self.locate(&mut v, file, n);
                        writeln!(self.out, "{v}")
                    } else {
                        let why = format!("{e} (RAW {:#018x} {:#018x})", raw.d0(), raw.d1());
                        self.error(file, n, &why, Some(e.opcode()))
                    }
                }
            },
        }
    }

    fn locate(&self, v: &mut serde_json::Value, file: &str, n: u64) {
        if let Some(m) = v.as_object_mut() {
            m.insert("line".into(), n.into());
            if self.with_file {
                m.insert("file".into(), file.into());
            }
        }
    }

    fn error(&mut self, file: &str, n: u64, why: &str, opcode: Option<u8>) -> io::Result<()> {
        if self.json {
            let mut v = serde_json::json!({ "error": why });
            if let Some(op) = opcode {
                v["opcode"] = op.into();
            }
            self.locate(&mut v, file, n);
            writeln!(self.out, "{v}")
        } else if self.with_file {
            writeln!(self.out, "{file}: line {n}: error: {why}")
        } else {
            writeln!(self.out, "line {n}: error: {why}")
        }
    }

    /// Decodes every line of `input`, one at a time (so any length of input is decoded in
    /// constant memory). An error reading it (or a line longer than [`super::input::MAX_LINE_BYTES`]) is
    /// returned as `Ok(Err(..))` so the caller can go on with the next file; an error writing
    /// output is `Err`.
    fn read(&mut self, file: &str, input: impl BufRead) -> io::Result<Result<(), LineError>> {
        let mut lines = Lines::new(input);
        while let Some(line) = lines.next_bytes() {
            let (n, bytes) = match line {
                Ok(l) => l,
                Err(e) => return Ok(Err(e)),
            };
            match std::str::from_utf8(bytes) {
                Ok(s) => self.line(file, n, s)?,
                Err(_) => {
                    self.failed = true;
                    self.error(file, n, "not UTF-8 text", None)?;
                }
            }
        }
        Ok(Ok(()))
    }
}

/// Runs `vcmdq decode`.
pub fn run(args: DecodeArgs) -> Result<ExitCode, CliError> {
    let mut p = Printer {
        out: io::BufWriter::new(out::stdout()),
        json: args.json,
        with_file: !args.files.is_empty(),
        failed: false,
    };
    let mut unreadable = false;
    let sources: Vec<PathBuf> = if args.files.is_empty() {
        vec![PathBuf::from("-")]
    } else {
        args.files
    };
    let result = (|| -> io::Result<()> {
        for path in &sources {
            let name = path.display().to_string();
            let read = if name == "-" {
                p.read(&name, io::stdin().lock())?
            } else {
                match std::fs::File::open(path) {
                    Ok(f) => p.read(&name, BufReader::new(f))?,
                    Err(e) => Err(e.into()),
                }
            };
            if let Err(e) = read {
                // Flush first so the report lands after the lines already decoded.
                p.out.flush()?;
                eprintln!("vcmdq: {name}: {e}");
                unreadable = true;
            }
        }
        p.out.flush()
    })();
    match result {
        Ok(()) => {}
        // The reader went away (`vcmdq decode | head`): nothing left to say to anyone.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        Err(e) => return Err(format!("writing output: {e}").into()),
    }
    Ok(ExitCode::from(if unreadable {
        2
    } else if p.failed {
        1
    } else {
        0
    }))
}

/// The decode input form of `raw`, `0x<d0> 0x<d1>`: what `vcmdq encode` prints.
pub(crate) fn words_line(raw: &RawCommand) -> String {
    format!("{:#018x} {:#018x}", raw.d0(), raw.d1())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vcmdq::command::text;

    #[test]
    fn input_tolerance() {
        let want = Line::Words(RawCommand::new(0x12, 0x8000_0000));
        assert_eq!(parse_line("0x12 0x8000_0000"), want);
        assert_eq!(parse_line("  12\t80000000  # a comment"), want);
        assert_eq!(parse_line("0X0000_0012 0x0000_0000_8000_0000"), want);
        assert_eq!(parse_line(""), Line::Skip);
        assert_eq!(parse_line("   # only a comment"), Line::Skip);
        for bad in [
            "0x12",
            "0x12 0x0 0x0",
            "0x12 zz",
            "+12 0",
            "0x 0",
            "_ 0",
            "0x12 0x1_0000_0000_0000_0000",
        ] {
            assert!(
                matches!(parse_line(bad), Line::Malformed(_)),
                "{bad:?} should be malformed"
            );
        }
    }

    fn run_printer(json: bool, input: &str) -> (String, bool) {
        let mut p = Printer {
            out: Vec::new(),
            json,
            with_file: true,
            failed: false,
        };
        p.read("q.txt", input.as_bytes()).unwrap().unwrap();
        (String::from_utf8(p.out).unwrap(), p.failed)
    }

    #[test]
    fn errors_do_not_stop_decoding() {
        let (out, failed) = run_printer(
            false,
            "0x46 0\n0x47 0\nnot two words\n\n0x10 0\n\u{0}\u{ff}\n0x10 0\n",
        );
        assert!(failed);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 6, "{out}");
        assert_eq!(
            lines[0],
            "CMD_SYNC cs=0 msh=0 msiattr=0 msidata=0x0 msiaddr=0x0"
        );
        assert!(lines[1].starts_with("q.txt: line 2: error: illegal opcode 0x47"));
        assert!(lines[2].starts_with("q.txt: line 3: error: expected two"));
        assert_eq!(lines[3], "TLBI_NH_ALL vmid=0");
        assert!(
            lines[4].starts_with("q.txt: line 6: error:"),
            "{}",
            lines[4]
        );
        assert_eq!(lines[5], "TLBI_NH_ALL vmid=0");
    }

    #[test]
    fn non_utf8_line_is_reported() {
        let mut p = Printer {
            out: Vec::new(),
            json: false,
            with_file: false,
            failed: false,
        };
        p.read("-", &b"0x10 0\n\xff\xfe\n0x10 0\n"[..])
            .unwrap()
            .unwrap();
        let out = String::from_utf8(p.out).unwrap();
        assert_eq!(
            out,
            "TLBI_NH_ALL vmid=0\nline 2: error: not UTF-8 text\nTLBI_NH_ALL vmid=0\n"
        );
        assert!(p.failed);
    }

    #[test]
    fn json_errors_carry_line_file_opcode() {
        let (out, failed) = run_printer(true, "0x11 0x1\nnope\n");
        assert!(failed);
        let v: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(v[0]["op"], "TLBI_NH_ASID");
        assert_eq!(v[0]["opcode"], 0x11);
        assert_eq!(v[0]["line"], 1);
        assert_eq!(v[0]["file"], "q.txt");
        assert_eq!(v[0]["res0_d1"], 1);
        assert_eq!(v[1]["line"], 2);
        assert!(v[1].get("opcode").is_none());
        assert!(v[1]["error"]
            .as_str()
            .unwrap()
            .contains("two 64-bit hex words"));
    }

    #[test]
    fn words_line_is_decode_input() {
        let raw = RawCommand::new(0x46 | 1 << 12, 0xfee0_0000);
        assert_eq!(parse_line(&words_line(&raw)), Line::Words(raw));
    }

    #[test]
    fn text_form_matches_library() {
        let raw = RawCommand::new(0x40 | 1 << 32, 52);
        let (out, _) = run_printer(false, &words_line(&raw));
        assert_eq!(out.trim_end(), text::format_raw(&raw));
    }
}
