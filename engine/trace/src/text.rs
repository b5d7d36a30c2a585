//! The text form of a trace: one event a line, commands in the codec's text form, so people can
//! read a trace (`vcmdq trace dump`) and write one by hand (`vcmdq trace build`).
//!
//! ```text
//! trace version=1 created=0 synthetic
//! @1200 viommu 1 vmid=5 smmu=0 profile=kernel sidsize=16 range
//! @1300 device 7 smmu=0 psid=0x800
//! @1400 bind viommu=1 device=7 vsid=0x10
//! @1500 ring 3 viommu=1 log2size=8
//! @1600 cmd ring=3 slot=0 TLBI_NH_VA vmid=0 asid=7 addr=0x8000_0000 tg=4k num=3 scale=0 ttl=3 leaf
//! @1600 cmd ring=3 slot=1 CMD_SYNC cs=2 msh=0 msiattr=0 msidata=0x0 msiaddr=0x0
//! @1700 doorbell ring=3 prod=2
//! @1800 fix ring=3 slot=4 CMD_SYNC cs=0 msh=0 msiattr=0 msidata=0x0 msiaddr=0x0
//! @1800 ack ring=3
//! @1900 unbind viommu=1 device=7
//! @2000 outcome ring=3 slot=0 refused ILL
//! ```
//!
//! A Commands record dumps as one `cmd` line per command, each with its own slot; `build` joins
//! consecutive `cmd` lines of one ring with one timestamp and consecutive slots back into one
//! record (never more than the ring holds). So `dump | build | dump` reproduces the text and
//! `build | dump | build` the bytes. `#` starts a comment; numbers are decimal or `0x` hex.
//!
//! Both directions go through the one validation of traces ([`super::validate`]): `dump` prints
//! nothing of a trace that does not validate, and `build` refuses text whose trace would not
//! (a slot beyond its ring, a bind the control plane refuses, an ack on a running ring), naming
//! the line of the record at fault.

use super::format::{FLAG_GUEST_WAITS_SYNC, FLAG_IMPORTED, FLAG_SYNTHETIC, VERSION};
use super::{Event, Outcome, Profile, Trace, TraceError, TraceMeta, TraceWriter, WriteError};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Seek, Write};
use vcmdq::command::text::{format_raw, parse, parse_u64, TextError};
use vcmdq::command::RawCommand;
use vcmdq::queue::{CError, QueueShape};

/// Why `dump` stopped.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// The trace is malformed at some record.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// The output could not be written.
    #[error("writing the dump: {0}")]
    Io(#[from] io::Error),
}

/// Ring geometry learnt from RingCreate records, to number the slots of a Commands record.
#[derive(Default)]
struct Rings(HashMap<u32, QueueShape>);

impl Rings {
    fn learn(&mut self, e: &Event<'_>) {
        if let Event::RingCreate { ring, log2size, .. } = *e {
            if let Ok(shape) = QueueShape::new(log2size) {
                self.0.insert(ring, shape);
            }
        }
    }

    fn advance(&self, ring: u32, slot: u32, n: u32) -> u32 {
        match self.0.get(&ring) {
            Some(s) => s.advance(slot, n),
            None => slot.wrapping_add(n),
        }
    }

    fn entries(&self, ring: u32) -> usize {
        self.0
            .get(&ring)
            .map_or(usize::MAX, |s| s.entries() as usize)
    }
}

/// A pointer or PROD value: decimal while it looks like a pointer, hex when junk bits are set.
fn ptr(v: u32) -> String {
    if v < 1 << 20 {
        v.to_string()
    } else {
        format!("{v:#x}")
    }
}

/// The header line.
pub fn header_line(meta: &TraceMeta) -> String {
    let mut s = format!("trace version={VERSION} created={}", meta.created_unix_ns);
    if meta.flags & FLAG_SYNTHETIC != 0 {
        s.push_str(" synthetic");
    }
    if meta.flags & FLAG_IMPORTED != 0 {
        s.push_str(" imported");
    }
    if meta.flags & FLAG_GUEST_WAITS_SYNC != 0 {
        s.push_str(" waits-sync");
    }
    s
}

fn event_lines(out: &mut String, rings: &Rings, ts: u64, e: &Event<'_>) {
    // Writing to a String cannot fail.
    let _ = match *e {
        Event::ViommuCreate {
            viommu,
            vmid,
            smmu,
            profile,
            sidsize,
            range_inv,
            features,
        } => writeln!(
            out,
            "@{ts} viommu {viommu} vmid={vmid} smmu={smmu} profile={} sidsize={sidsize}{}{}",
            profile.name(),
            if range_inv { " range" } else { "" },
            if features.is_any_but_ril() {
                String::new()
            } else {
                format!(" features={}", features.to_text())
            }
        ),
        Event::DeviceAdd { device, smmu, psid } => {
            writeln!(out, "@{ts} device {device} smmu={smmu} psid={psid:#x}")
        }
        Event::Bind {
            viommu,
            device,
            vsid,
        } => writeln!(
            out,
            "@{ts} bind viommu={viommu} device={device} vsid={vsid:#x}"
        ),
        Event::Unbind { viommu, device } => {
            writeln!(out, "@{ts} unbind viommu={viommu} device={device}")
        }
        Event::RingCreate {
            ring,
            viommu,
            log2size,
        } => writeln!(out, "@{ts} ring {ring} viommu={viommu} log2size={log2size}"),
        Event::Commands { ring, slot, cmds } => {
            command_lines(out, rings, ts, ring, slot, cmds);
            Ok(())
        }
        Event::Doorbell { ring, prod } => {
            writeln!(out, "@{ts} doorbell ring={ring} prod={}", ptr(prod))
        }
        Event::GuestAck { ring } => writeln!(out, "@{ts} ack ring={ring}"),
        Event::GuestFix { ring, slot, cmd } => writeln!(
            out,
            "@{ts} fix ring={ring} slot={} {}",
            ptr(slot),
            format_raw(&cmd)
        ),
        Event::Outcome {
            ring,
            slot,
            outcome,
        } => writeln!(
            out,
            "@{ts} outcome ring={ring} slot={} {}",
            ptr(slot),
            outcome_text(outcome)
        ),
    };
}

/// One line per command of a Commands record.
fn command_lines(
    out: &mut String,
    rings: &Rings,
    ts: u64,
    ring: u32,
    slot: u32,
    cmds: &[RawCommand],
) {
    for (i, c) in cmds.iter().enumerate() {
        // The record's own slot as written, even one beyond its ring (which validation
        // refuses): masking it here would make a different trace of the text.
        let s = match i {
            0 => slot,
            _ => rings.advance(ring, slot, i as u32),
        };
        let _ = writeln!(
            out,
            "@{ts} cmd ring={ring} slot={} {}",
            ptr(s),
            format_raw(c)
        );
    }
}

fn outcome_text(outcome: Outcome) -> String {
    match outcome {
        Outcome::Forwarded(c) => format!("forwarded {}", format_raw(&c)),
        Outcome::Refused(e) => format!("refused {}", e.name()),
        Outcome::Trapped => "trapped".to_string(),
        Outcome::Dropped => "dropped".to_string(),
    }
}

/// Writes the text form of `trace` to `out`: the header line, then one line per event (one per
/// command for Commands records).
pub fn dump(trace: &Trace<'_>, out: &mut dyn Write) -> Result<(), DumpError> {
    dump_with(trace, out, &super::Limits::default())
}

/// [`dump`] validating under `limits` first.
pub fn dump_with(
    trace: &Trace<'_>,
    out: &mut dyn Write,
    limits: &super::Limits,
) -> Result<(), DumpError> {
    super::validate_with(trace, limits)?;
    dump_unvalidated(trace, out)
}

/// The text form of `trace` whether or not it validates (the format alone: for looking into a
/// trace that [`dump`] refuses, and for tests of the text form).
pub fn dump_unvalidated(trace: &Trace<'_>, out: &mut dyn Write) -> Result<(), DumpError> {
    writeln!(out, "{}", header_line(&trace.meta()))?;
    let mut rings = Rings::default();
    let mut line = String::new();
    for r in trace.records() {
        let r = r?;
        rings.learn(&r.event);
        line.clear();
        event_lines(&mut line, &rings, r.timestamp_ns, &r.event);
        out.write_all(line.as_bytes())?;
    }
    Ok(())
}

/// The text form of `trace` as a string, as [`dump_unvalidated`] writes it.
pub fn dump_to_string(trace: &Trace<'_>) -> Result<String, TraceError> {
    let mut out = Vec::new();
    match dump_unvalidated(trace, &mut out) {
        Ok(()) => Ok(String::from_utf8_lossy(&out).into_owned()),
        Err(DumpError::Trace(e)) => Err(e),
        // Writing into a Vec cannot fail.
        Err(DumpError::Io(e)) => Err(TraceError::Io {
            path: "<memory>".into(),
            source: e,
        }),
    }
}

/// What is wrong with a line of the text form.
#[derive(Debug, thiserror::Error)]
pub enum BuildProblem {
    /// The `trace` header line is malformed or not first.
    #[error("header: {0}")]
    Header(String),
    /// An event line must start with `@<timestamp>`.
    #[error("an event line starts with @<timestamp in ns>, e.g. `@1200 doorbell ring=0 prod=5`")]
    NoTimestamp,
    /// An unknown event word.
    #[error("unknown event {0:?}; events are viommu, device, bind, unbind, ring, cmd, doorbell, ack, fix, outcome")]
    UnknownEvent(String),
    /// A field the event needs is missing.
    #[error("{event} needs {field}")]
    Missing {
        /// The event word.
        event: &'static str,
        /// The field.
        field: &'static str,
    },
    /// A word the event does not take.
    #[error("{event} does not take {word:?}")]
    Unexpected {
        /// The event word.
        event: &'static str,
        /// The word.
        word: String,
    },
    /// A value that is not a number of the right size, or not a name the field takes.
    #[error("{field}={value:?}: {why}")]
    BadValue {
        /// The field.
        field: &'static str,
        /// The text.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// The command text does not parse.
    #[error("command: {0}")]
    Command(#[from] TextError),
    /// The writer refused the record (e.g. time going backwards).
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The trace the text describes does not validate.
    #[error(transparent)]
    Invalid(Box<TraceError>),
}

/// A line of the text form that could not be built, with its 1-based line number.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct BuildError {
    /// 1-based line number (0 when the error is in finishing the file).
    pub line: usize,
    /// What is wrong.
    pub problem: BuildProblem,
}

struct Words<'a> {
    event: &'static str,
    words: Vec<&'a str>,
    used: Vec<bool>,
}

impl<'a> Words<'a> {
    fn new(event: &'static str, words: Vec<&'a str>) -> Self {
        let used = vec![false; words.len()];
        Words { event, words, used }
    }

    fn value(&mut self, key: &'static str) -> Option<&'a str> {
        for (i, w) in self.words.iter().enumerate() {
            if let Some((k, v)) = w.split_once('=') {
                if k == key && !self.used[i] {
                    self.used[i] = true;
                    return Some(v);
                }
            }
        }
        None
    }

    fn flag(&mut self, key: &'static str) -> bool {
        for (i, w) in self.words.iter().enumerate() {
            if *w == key && !self.used[i] {
                self.used[i] = true;
                return true;
            }
        }
        false
    }

    fn num<T: TryFrom<u64>>(&mut self, key: &'static str) -> Result<T, BuildProblem> {
        let v = self.value(key).ok_or(BuildProblem::Missing {
            event: self.event,
            field: key,
        })?;
        number(key, v)
    }

    fn positional<T: TryFrom<u64>>(&mut self, what: &'static str) -> Result<T, BuildProblem> {
        let i = self
            .used
            .iter()
            .position(|u| !u)
            .filter(|&i| !self.words[i].contains('='))
            .ok_or(BuildProblem::Missing {
                event: self.event,
                field: what,
            })?;
        self.used[i] = true;
        number(what, self.words[i])
    }

    fn done(&self) -> Result<(), BuildProblem> {
        match self.used.iter().position(|u| !u) {
            Some(i) => Err(BuildProblem::Unexpected {
                event: self.event,
                word: self.words[i].to_string(),
            }),
            None => Ok(()),
        }
    }
}

fn number<T: TryFrom<u64>>(field: &'static str, v: &str) -> Result<T, BuildProblem> {
    let bad = |why: String| BuildProblem::BadValue {
        field,
        value: v.to_string(),
        why,
    };
    let n = parse_u64(v).map_err(bad)?;
    T::try_from(n).map_err(|_| bad(format!("{n} is too large for {field}")))
}

/// A `cmd`/`fix`/`outcome forwarded` line: leading `ring=`/`slot=` words, then a command.
fn ring_slot_rest<'a>(
    event: &'static str,
    words: &[&'a str],
) -> Result<(u32, u32, Vec<&'a str>), BuildProblem> {
    let (mut ring, mut slot, mut i) = (None, None, 0);
    while i < words.len() {
        match words[i].split_once('=') {
            Some(("ring", v)) if ring.is_none() => ring = Some(number("ring", v)?),
            Some(("slot", v)) if slot.is_none() => slot = Some(number("slot", v)?),
            _ => break,
        }
        i += 1;
    }
    let ring = ring.ok_or(BuildProblem::Missing {
        event,
        field: "ring",
    })?;
    let slot = slot.ok_or(BuildProblem::Missing {
        event,
        field: "slot",
    })?;
    Ok((ring, slot, words[i..].to_vec()))
}

fn command(words: &[&str]) -> Result<RawCommand, BuildProblem> {
    Ok(parse(&words.join(" "))?)
}

fn cerror_by_name(s: &str) -> Option<CError> {
    let name = s.strip_prefix("CERROR_").unwrap_or(s);
    (0..=u8::MAX)
        .map_while(CError::from_code)
        .find(|e| e.name().eq_ignore_ascii_case(name))
}

/// The events [`keyed`] reads.
const KEYED: [&str; 7] = [
    "viommu", "device", "bind", "unbind", "ring", "doorbell", "ack",
];

/// The static name of an event word that [`keyed`] reads.
fn verb_name(verb: &str) -> Result<&'static str, BuildProblem> {
    KEYED
        .into_iter()
        .find(|v| *v == verb)
        .ok_or_else(|| BuildProblem::UnknownEvent(verb.to_string()))
}

/// An event written as an id and `key=value` words.
fn keyed(a: &mut Words<'_>) -> Result<Event<'static>, BuildProblem> {
    Ok(match a.event {
        "viommu" => {
            let viommu = a.positional("vIOMMU id")?;
            let vmid = a.num("vmid")?;
            let smmu = a.num("smmu")?;
            let p = a.value("profile").ok_or(BuildProblem::Missing {
                event: "viommu",
                field: "profile",
            })?;
            let profile = p.parse::<Profile>().map_err(|_| BuildProblem::BadValue {
                field: "profile",
                value: p.to_string(),
                why: "profiles are kernel and tegra241".into(),
            })?;
            let range_inv = a.flag("range");
            let features = match a.value("features") {
                None => vcmdq::viommu::SmmuFeatures {
                    ril: range_inv,
                    ..vcmdq::viommu::SmmuFeatures::ANY
                },
                Some(f) => vcmdq::viommu::SmmuFeatures::from_text(f, range_inv).map_err(|e| {
                    BuildProblem::BadValue {
                        field: "features",
                        value: f.to_string(),
                        why: e.to_string(),
                    }
                })?,
            };
            Event::ViommuCreate {
                viommu,
                vmid,
                smmu,
                profile,
                sidsize: a.num("sidsize")?,
                range_inv,
                features,
            }
        }
        "device" => Event::DeviceAdd {
            device: a.positional("device id")?,
            smmu: a.num("smmu")?,
            psid: a.num("psid")?,
        },
        "bind" => Event::Bind {
            viommu: a.num("viommu")?,
            device: a.num("device")?,
            vsid: a.num("vsid")?,
        },
        "unbind" => Event::Unbind {
            viommu: a.num("viommu")?,
            device: a.num("device")?,
        },
        "ring" => Event::RingCreate {
            ring: a.positional("ring id")?,
            viommu: a.num("viommu")?,
            log2size: a.num("log2size")?,
        },
        "doorbell" => Event::Doorbell {
            ring: a.num("ring")?,
            prod: a.num("prod")?,
        },
        "ack" => Event::GuestAck {
            ring: a.num("ring")?,
        },
        other => return Err(BuildProblem::UnknownEvent(other.to_string())),
    })
}

/// Commands lines waiting to be joined into one record.
struct Pending {
    ts: u64,
    ring: u32,
    slot: u32,
    next: u32,
    cmds: Vec<RawCommand>,
    line: usize,
}

/// Builds a trace from its text form into `out`, with the record count filled in, once it
/// validates under the default [`super::Limits`].
pub fn build<W: Write + Seek>(text: &str, out: W) -> Result<W, BuildError> {
    build_with(text, out, &super::Limits::default())
}

/// [`build`] validating under `limits`.
pub fn build_with<W: Write + Seek>(
    text: &str,
    mut out: W,
    limits: &super::Limits,
) -> Result<W, BuildError> {
    let mut lines = Vec::new();
    let bytes = build_unchecked(text, io::Cursor::new(Vec::new()), &mut lines)?.into_inner();
    let trace = Trace::parse(&bytes).map_err(|e| BuildError {
        line: 0,
        problem: BuildProblem::Invalid(Box::new(e)),
    })?;
    if let Err(e) = super::validate_with(&trace, limits) {
        let line = match &e {
            TraceError::Invalid { record, .. } => lines.get(*record as usize).copied(),
            _ => None,
        };
        return Err(BuildError {
            line: line.unwrap_or(0),
            problem: BuildProblem::Invalid(Box::new(e)),
        });
    }
    out.write_all(&bytes)
        .and_then(|()| out.flush())
        .map_err(|e| BuildError {
            line: 0,
            problem: BuildProblem::Write(WriteError::Io(e)),
        })?;
    Ok(out)
}

/// Builds a trace from its text form whether or not it validates (the format alone: for tests
/// of the text form and for making damaged traces on purpose).
pub fn build_unvalidated<W: Write + Seek>(text: &str, out: W) -> Result<W, BuildError> {
    build_unchecked(text, out, &mut Vec::new())
}

/// Builds without validating; `lines` gets the line of each record written.
fn build_unchecked<W: Write + Seek>(
    text: &str,
    out: W,
    record_lines: &mut Vec<usize>,
) -> Result<W, BuildError> {
    let at = |line: usize| move |problem: BuildProblem| BuildError { line, problem };
    let mut meta = TraceMeta::default();
    let mut lines = text.lines().enumerate().map(|(i, l)| {
        let l = l.split_once('#').map_or(l, |(code, _)| code);
        (i + 1, l.trim())
    });
    let mut first = lines.find(|(_, l)| !l.is_empty());
    if let Some((n, l)) = first {
        if let Some(rest) = l.strip_prefix("trace") {
            if rest.is_empty() || rest.starts_with(' ') {
                meta = header(rest).map_err(at(n))?;
                first = None;
            }
        }
    }
    let mut w = TraceWriter::new(out, meta).map_err(|e| at(0)(e.into()))?;
    let mut rings = Rings::default();
    let mut pending: Option<Pending> = None;
    for (n, l) in first.into_iter().chain(lines) {
        if l.is_empty() {
            continue;
        }
        line(&mut w, &mut rings, &mut pending, record_lines, n, l).map_err(at(n))?;
    }
    if let Some(p) = pending.take() {
        record_lines.push(p.line);
        flush(&mut w, p)?;
    }
    w.finish_counted().map_err(|e| at(0)(e.into()))
}

fn flush<W: Write>(w: &mut TraceWriter<W>, p: Pending) -> Result<(), BuildError> {
    w.commands(p.ts, p.ring, p.slot, &p.cmds)
        .map_err(|e| BuildError {
            line: p.line,
            problem: e.into(),
        })
}

fn header(rest: &str) -> Result<TraceMeta, BuildProblem> {
    let mut meta = TraceMeta::default();
    for word in rest.split_whitespace() {
        match word.split_once('=') {
            Some(("version", v)) => {
                let v: u32 = number("version", v)?;
                if v != VERSION {
                    return Err(BuildProblem::Header(format!(
                        "version {v}; this build writes version {VERSION}"
                    )));
                }
            }
            Some(("created", v)) => meta.created_unix_ns = number("created", v)?,
            None if word == "synthetic" => meta.flags |= FLAG_SYNTHETIC,
            None if word == "imported" => meta.flags |= FLAG_IMPORTED,
            None if word == "waits-sync" => meta.flags |= FLAG_GUEST_WAITS_SYNC,
            _ => {
                return Err(BuildProblem::Header(format!(
                "unknown word {word:?}; the header takes version=, created=, synthetic, imported, waits-sync"
            )))
            }
        }
    }
    Ok(meta)
}

fn line<W: Write + Seek>(
    w: &mut TraceWriter<W>,
    rings: &mut Rings,
    pending: &mut Option<Pending>,
    record_lines: &mut Vec<usize>,
    n: usize,
    l: &str,
) -> Result<(), BuildProblem> {
    let mut words = l.split_whitespace();
    let first = words.next().unwrap_or_default();
    if first == "trace" {
        return Err(BuildProblem::Header(
            "the trace header must be the first line".into(),
        ));
    }
    let ts_text = first.strip_prefix('@').ok_or(BuildProblem::NoTimestamp)?;
    let ts: u64 = number("timestamp", ts_text)?;
    let verb = words.next().ok_or(BuildProblem::NoTimestamp)?;
    let rest: Vec<&str> = words.collect();

    if verb == "cmd" {
        return cmd_line(w, rings, pending, record_lines, n, ts, &rest);
    }
    write_pending(w, pending, record_lines)?;
    let event = match verb {
        "fix" => {
            let (ring, slot, cmd) = ring_slot_rest("fix", &rest)?;
            Event::GuestFix {
                ring,
                slot,
                cmd: command(&cmd)?,
            }
        }
        "outcome" => {
            let (ring, slot, what) = ring_slot_rest("outcome", &rest)?;
            Event::Outcome {
                ring,
                slot,
                outcome: outcome_words(&what)?,
            }
        }
        other => {
            let mut a = Words::new(verb_name(other)?, rest);
            let e = keyed(&mut a)?;
            a.done()?;
            e
        }
    };
    rings.learn(&event);
    record_lines.push(n);
    w.write(ts, &event)?;
    Ok(())
}

/// A `cmd` line: joins the pending Commands record if it continues it (same time and ring,
/// the next slot, room in the ring), else starts a new one.
fn cmd_line<W: Write + Seek>(
    w: &mut TraceWriter<W>,
    rings: &Rings,
    pending: &mut Option<Pending>,
    record_lines: &mut Vec<usize>,
    n: usize,
    ts: u64,
    rest: &[&str],
) -> Result<(), BuildProblem> {
    let (ring, slot, cmd) = ring_slot_rest("cmd", rest)?;
    let cmd = command(&cmd)?;
    if let Some(p) = pending {
        if p.ts == ts && p.ring == ring && p.next == slot && p.cmds.len() < rings.entries(ring) {
            p.cmds.push(cmd);
            p.next = rings.advance(ring, slot, 1);
            return Ok(());
        }
    }
    write_pending(w, pending, record_lines)?;
    *pending = Some(Pending {
        ts,
        ring,
        slot,
        next: rings.advance(ring, slot, 1),
        cmds: vec![cmd],
        line: n,
    });
    Ok(())
}

fn write_pending<W: Write + Seek>(
    w: &mut TraceWriter<W>,
    pending: &mut Option<Pending>,
    record_lines: &mut Vec<usize>,
) -> Result<(), BuildProblem> {
    if let Some(p) = pending.take() {
        record_lines.push(p.line);
        w.commands(p.ts, p.ring, p.slot, &p.cmds)?;
    }
    Ok(())
}

/// The words after `outcome ring=R slot=S`.
fn outcome_words(what: &[&str]) -> Result<Outcome, BuildProblem> {
    Ok(match what.split_first() {
        Some((&"forwarded", cmd)) => Outcome::Forwarded(command(cmd)?),
        Some((&"refused", [code])) => match cerror_by_name(code).filter(|e| *e != CError::None) {
            Some(e) => Outcome::Refused(e),
            None => {
                return Err(BuildProblem::BadValue {
                    field: "refused",
                    value: code.to_string(),
                    why: "the CONS.ERR is ILL, ABT, ATC_INV_SYNC or ILL_ACCESS".into(),
                })
            }
        },
        Some((&"trapped", [])) => Outcome::Trapped,
        Some((&"dropped", [])) => Outcome::Dropped,
        _ => return Err(BuildProblem::BadValue {
            field: "outcome",
            value: what.join(" "),
            why: "an outcome is `forwarded <command>`, `refused <CERROR>`, `trapped` or `dropped`"
                .into(),
        }),
    })
}
