//! The text form for people: one command a line, `NAME field=value ... flag`, that parses back to
//! the same 16 bytes.
//!
//! Fields print in layout order: numbers in decimal, identifiers (SID, SSID, MSIDATA, STAG) and
//! addresses in hex (addresses grouped by `_` every four digits), TG as `0`/`4k`/`16k`/`64k`, and
//! a flag by its bare name when set. On input, numbers take decimal or `0x` hex with `_`
//! anywhere, fields come in any order, and a missing field is 0. Sixteen bytes that do not
//! decode (an illegal opcode, a RES0 bit) are written `RAW <d0> <d1>` so any queue content,
//! hostile or not, has a text form.

use super::layout::{FieldKind, OpLayout};
use super::{decode, Command, DecodeError, RawCommand, LAYOUTS};
use core::fmt;

/// Why a line is not a command.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    /// The line is empty.
    #[error("empty command")]
    Empty,
    /// The first word names no command.
    #[error(
        "unknown command {0:?}; names are the spec's (TLBI_NH_VA, CMD_SYNC, ...) or RAW <d0> <d1>"
    )]
    UnknownName(String),
    /// A word is not a field of this command.
    #[error("{name} has no field {field:?}; its fields are: {valid}")]
    UnknownField {
        /// The command.
        name: &'static str,
        /// The word given.
        field: String,
        /// The command's fields.
        valid: String,
    },
    /// A field is given twice.
    #[error("{name}: field {field} given twice")]
    Duplicate {
        /// The command.
        name: &'static str,
        /// The field.
        field: &'static str,
    },
    /// A value is not a number, or not one the field takes.
    #[error("{name}: bad value {value:?} for {field}: {why}")]
    BadValue {
        /// The command.
        name: &'static str,
        /// The field.
        field: &'static str,
        /// The text given.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// `RAW` needs exactly two 64-bit words.
    #[error("RAW takes two 64-bit words, d0 and d1: {0}")]
    BadRaw(String),
    /// The fields are well formed but the command is not (e.g. NUM set with TG=0).
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Parses a number: decimal, or hex with a `0x` prefix; `_` is ignored.
pub fn parse_u64(s: &str) -> Result<u64, String> {
    let clean: String = s.chars().filter(|&c| c != '_').collect();
    let r = match clean
        .strip_prefix("0x")
        .or_else(|| clean.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => clean.parse::<u64>(),
    };
    r.map_err(|e| format!("{e} (numbers are decimal or 0x hex)"))
}

fn write_addr(out: &mut impl fmt::Write, v: u64) -> fmt::Result {
    let hex = format!("{v:x}");
    out.write_str("0x")?;
    for (i, c) in hex.chars().enumerate() {
        if i > 0 && (hex.len() - i) % 4 == 0 {
            out.write_char('_')?;
        }
        out.write_char(c)?;
    }
    Ok(())
}

fn write_fields(out: &mut impl fmt::Write, layout: &OpLayout, raw: &RawCommand) -> fmt::Result {
    out.write_str(layout.name)?;
    for f in layout.fields {
        let v = f.get(raw);
        match f.kind {
            FieldKind::Flag if v != 0 => write!(out, " {}", f.name)?,
            FieldKind::Flag => {}
            FieldKind::Num => write!(out, " {}={v}", f.name)?,
            FieldKind::Hex => write!(out, " {}={v:#x}", f.name)?,
            FieldKind::Addr => {
                write!(out, " {}=", f.name)?;
                write_addr(out, v)?;
            }
            FieldKind::Tg => {
                let g = ["0", "4k", "16k", "64k"][v as usize & 3];
                write!(out, " {}={g}", f.name)?;
            }
        }
    }
    Ok(())
}

/// The text form. A command built by hand with a value wider than its field (which
/// [`decode`] never yields) has no text form; it shows as `NAME <unencodable: why>` rather than
/// panicking, since formatting is used in error paths.
impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.try_encode() {
            Ok(raw) => write_fields(f, self.layout(), &raw),
            Err(e) => write!(f, "{} <unencodable: {e}>", self.name()),
        }
    }
}

/// The text form of any 16 bytes: the named form when they decode, `RAW d0 d1` otherwise.
pub fn format_raw(raw: &RawCommand) -> String {
    match decode(*raw) {
        Ok(cmd) => cmd.to_string(),
        Err(_) => format!("RAW {:#018x} {:#018x}", raw.d0(), raw.d1()),
    }
}

/// The layout a command name of the text form stands for (case-insensitive).
fn layout_named(name: &str) -> Option<&'static OpLayout> {
    LAYOUTS
        .iter()
        .flatten()
        .copied()
        .find(|l| l.name.eq_ignore_ascii_case(name))
}

/// Whether `word` begins a command of the text form: a spec name or `RAW`, in any case. No field
/// or value is ever such a word, so a run of words splits into commands at these.
pub fn is_command_name(word: &str) -> bool {
    word.eq_ignore_ascii_case("RAW") || layout_named(word).is_some()
}

/// Parses one line of the text form into its 16 bytes. A named command must decode; `RAW`
/// takes any two words.
pub fn parse(line: &str) -> Result<RawCommand, TextError> {
    let mut words = line.split_whitespace();
    let name = words.next().ok_or(TextError::Empty)?;
    if name.eq_ignore_ascii_case("RAW") {
        let rest: Vec<&str> = words.collect();
        let [d0, d1] = rest[..] else {
            return Err(TextError::BadRaw(format!("got {} words", rest.len())));
        };
        let d0 = parse_u64(d0).map_err(|e| TextError::BadRaw(format!("d0 {d0:?}: {e}")))?;
        let d1 = parse_u64(d1).map_err(|e| TextError::BadRaw(format!("d1 {d1:?}: {e}")))?;
        return Ok(RawCommand::new(d0, d1));
    }
    let layout = layout_named(name).ok_or_else(|| TextError::UnknownName(name.to_string()))?;
    let mut w = [u64::from(layout.opcode), 0];
    let mut seen = 0u64;
    for word in words {
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word, None),
        };
        let (i, f) = layout
            .fields
            .iter()
            .enumerate()
            .find(|(_, f)| f.name.eq_ignore_ascii_case(key))
            .ok_or_else(|| TextError::UnknownField {
                name: layout.name,
                field: key.to_string(),
                valid: layout
                    .fields
                    .iter()
                    .map(|f| f.name)
                    .collect::<Vec<_>>()
                    .join(" "),
            })?;
        if seen & (1 << i) != 0 {
            return Err(TextError::Duplicate {
                name: layout.name,
                field: f.name,
            });
        }
        seen |= 1 << i;
        let bad = |why: String| TextError::BadValue {
            name: layout.name,
            field: f.name,
            value: value.unwrap_or("").to_string(),
            why,
        };
        let v = match (f.kind, value) {
            (FieldKind::Flag, None) => 1,
            (FieldKind::Flag, Some(v)) => match v {
                "0" | "false" => 0,
                "1" | "true" => 1,
                _ => return Err(bad("a flag is written bare, or =0/=1".into())),
            },
            (_, None) => return Err(bad("needs =value".into())),
            (FieldKind::Tg, Some(v)) => match v.to_ascii_lowercase().as_str() {
                "0" | "none" => 0,
                "1" | "4k" => 1,
                "2" | "16k" => 2,
                "3" | "64k" => 3,
                _ => return Err(bad("TG is 0, 4k, 16k or 64k".into())),
            },
            (_, Some(v)) => parse_u64(v).map_err(bad)?,
        };
        f.put(&mut w, v).map_err(|e| bad(e.to_string()))?;
    }
    let raw = RawCommand::new(w[0], w[1]);
    decode(raw)?;
    Ok(raw)
}

impl core::str::FromStr for Command {
    type Err = TextError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(decode(parse(s)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_example_round_trips() {
        let line = "TLBI_NH_VA vmid=3 asid=7 addr=0x8000_0000 tg=4k num=3 scale=0 ttl=3 leaf";
        let raw = parse(line).unwrap();
        assert_eq!(raw.opcode(), 0x12);
        assert_eq!(raw.d0(), 0x12 | 3 << 12 | 3 << 32 | 7 << 48);
        assert_eq!(raw.d1(), 0x8000_0000 | 1 << 10 | 3 << 8 | 1);
        assert_eq!(format_raw(&raw), line);
        assert_eq!(parse(&format_raw(&raw)).unwrap(), raw);
    }

    #[test]
    fn command_names_never_collide_with_fields() {
        assert!(is_command_name("cmd_sync") && is_command_name("RAW") && is_command_name("raw"));
        assert!(!is_command_name("vmid=3") && !is_command_name("4k") && !is_command_name(""));
        for l in LAYOUTS.iter().flatten() {
            assert!(is_command_name(l.name));
            for f in l.fields {
                assert!(!is_command_name(f.name), "{} is a field and a name", f.name);
            }
        }
    }

    #[test]
    fn undecodable_bytes_use_raw() {
        let raw = RawCommand::new(0x47, 5);
        let t = format_raw(&raw);
        assert_eq!(t, "RAW 0x0000000000000047 0x0000000000000005");
        assert_eq!(parse(&t).unwrap(), raw);
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(matches!(
            parse("TLBI_NH_VA bogus=1"),
            Err(TextError::UnknownField { .. })
        ));
        assert!(matches!(parse("NOPE"), Err(TextError::UnknownName(_))));
        assert!(matches!(
            parse("CMD_SYNC cs=4"),
            Err(TextError::BadValue { .. })
        ));
        assert!(matches!(
            parse("TLBI_NH_ALL vmid=1 vmid=2"),
            Err(TextError::Duplicate { .. })
        ));
        assert!(matches!(
            parse("TLBI_NH_VA num=1"),
            Err(TextError::Decode(DecodeError::RangeWithoutGranule { .. }))
        ));
        assert!(matches!(
            parse("ATC_INV addr=0x1001"),
            Err(TextError::BadValue { .. })
        ));
        assert_eq!(parse(""), Err(TextError::Empty));
    }
}
