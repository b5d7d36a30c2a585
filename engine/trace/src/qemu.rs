//! Importing a QEMU log taken with `-trace 'smmuv3_*'` (log backend) into a trace.
//!
//! QEMU's SMMUv3 model traces, for every command it consumes, the queue position
//! (`smmuv3_cmdq_consume prod=.. cons=.. prod.wrap=.. cons.wrap=..`), the opcode's name
//! (`smmuv3_cmdq_opcode <--- SMMU_CMD_..`) and, for most opcodes, some fields
//! (`smmuv3_cmdq_cfgi_ste`, `smmuv3_cmdq_cfgi_cd`, `smmuv3_range_inval`,
//! `smmuv3_cmdq_tlbi_nh_asid`, ...), then `smmuv3_cmdq_consume_error` when it stops and
//! `smmuv3_cmdq_consume_out` at the end of the pass. It never prints the raw 16 bytes, so the
//! importer rebuilds each command from its opcode and the fields the log carries; everything it
//! has to guess is listed in `traces/FORMAT.md`, "Importing QEMU traces".
//!
//! Lines may carry the log backend's `PID@SECONDS.MICROSECONDS:` prefix (timestamps are taken
//! from it) or not (then line N is at N microseconds). Lines of other events and other text are
//! skipped.

use super::format::{FLAG_GUEST_WAITS_SYNC, FLAG_IMPORTED};
use super::{Outcome, Profile, TraceMeta, TraceWriter, WriteError};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, BufRead, Seek, Write};
use vcmdq::command::{opcode, Command, RawCommand, LAYOUTS};
use vcmdq::queue::{CError, QueueShape, MAX_LOG2SIZE};

/// What an import made of a log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportStats {
    /// Lines read.
    pub lines: u64,
    /// Lines of `smmuv3_*` events used.
    pub used: u64,
    /// Consume passes (one per PROD write, GERRORN write or CR0 write that ran the queue).
    pub passes: u64,
    /// Commands reconstructed (observed consumptions).
    pub commands: u64,
    /// Slots the guest wrote but QEMU never consumed, filled with CMD_SYNC.
    pub unobserved: u64,
    /// GuestFix records (a slot consumed again with other contents).
    pub fixes: u64,
    /// GuestAck records (GERRORN writes).
    pub acks: u64,
    /// Refusals QEMU reported.
    pub errors: u64,
    /// LOG2SIZE used.
    pub log2size: u8,
    /// Whether LOG2SIZE was inferred from the indexes seen (no CMDQ_BASE write in the log).
    pub log2size_inferred: bool,
    /// StreamIDs found, each bound 1:1 as a vSID.
    pub sids: u64,
    /// Lines skipped, by why (not an `smmuv3_*` event, an `smmuv3_*` event the import does not
    /// use, not UTF-8, ...): the import's warnings.
    pub skipped: BTreeMap<&'static str, u64>,
    /// Fields or commands reconstructed by a documented rule rather than read from the log, by
    /// what: also warnings.
    pub approximated: BTreeMap<&'static str, u64>,
    /// Fields the log does not print but determines (through what the guest read of the SMMU's
    /// ID registers, or the order its driver writes commands in), by what.
    pub reconstructed: BTreeMap<&'static str, u64>,
    /// Fields read from the log as they are, by what.
    pub exact: BTreeMap<&'static str, u64>,
    /// SMMU_IDR0 as the guest read it (`smmuv3_read_mmio addr: 0x0`), if it did.
    pub idr0: Option<u32>,
    /// SMMU_IDR3 as the guest read it, if it did.
    pub idr3: Option<u32>,
    /// Lines of `smmuv3_*` events without a `PID@SECONDS.MICROSECONDS:` prefix, timed by their
    /// line number.
    pub untimed: u64,
    /// The last line, when the log ends without a newline after it (a QEMU stopped while
    /// writing): that line is not imported.
    pub cut_last_line: Option<u64>,
}

/// What SMMU_IDR0 and SMMU_IDR3 say, by the architecture's field names.
fn idr_features(idr0: Option<u32>, idr3: Option<u32>) -> serde_json::Value {
    let mut j = serde_json::Map::new();
    if let Some(v) = idr0 {
        j.insert("idr0".into(), format!("{v:#x}").into());
        for (name, bit) in [
            ("S2P", 0),
            ("S1P", 1),
            ("COHACC", 4),
            ("ATS", 10),
            ("ASID16", 12),
            ("MSI", 13),
            ("SEV", 14),
            ("PRI", 16),
            ("VMID16", 18),
        ] {
            j.insert(name.into(), (v >> bit & 1 == 1).into());
        }
        j.insert("ST_LEVEL".into(), (v >> 27 & 3).into());
    }
    if let Some(v) = idr3 {
        j.insert("idr3".into(), format!("{v:#x}").into());
        j.insert("RIL".into(), (v >> 10 & 1 == 1).into());
    }
    serde_json::Value::Object(j)
}

impl ImportStats {
    fn skip(&mut self, why: &'static str) {
        *self.skipped.entry(why).or_default() += 1;
    }

    fn approx(&mut self, what: &'static str) {
        *self.approximated.entry(what).or_default() += 1;
    }

    fn derived(&mut self, what: &'static str) {
        *self.reconstructed.entry(what).or_default() += 1;
    }

    fn read(&mut self, what: &'static str) {
        *self.exact.entry(what).or_default() += 1;
    }

    /// One line per kind of skipped line and approximation, with its count: what the CLI
    /// prints on standard error.
    pub fn warnings(&self) -> Vec<String> {
        let cut = self.cut_last_line.map(|n| {
            format!(
                "the log ends mid-line: line {n} has no newline after it and was NOT imported \
                 (was QEMU stopped while writing?); the commands it would have completed are \
                 counted as never consumed"
            )
        });
        let untimed = (self.untimed > 0).then(|| {
            format!(
                "{} smmuv3_* line(s) have no PID@SECONDS.MICROSECONDS: prefix: line N is taken \
                 to be at N microseconds, so the trace's times are NOT the guest's (run QEMU \
                 with -msg timestamp=on)",
                self.untimed
            )
        });
        cut.into_iter()
            .chain(untimed)
            .chain(
                self.skipped
                    .iter()
                    .map(|(why, n)| format!("skipped {n} line(s): {why}")),
            )
            .chain(
                self.approximated
                    .iter()
                    .map(|(what, n)| format!("approximated {n} time(s): {what}")),
            )
            .chain(
                self.reconstructed
                    .iter()
                    .map(|(what, n)| format!("reconstructed {n} time(s): {what}")),
            )
            .collect()
    }

    /// The stats as JSON (`vcmdq trace import-qemu --json`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "lines": self.lines,
            "used": self.used,
            "passes": self.passes,
            "commands": self.commands,
            "unobserved": self.unobserved,
            "fixes": self.fixes,
            "acks": self.acks,
            "errors": self.errors,
            "log2size": self.log2size,
            "log2size_inferred": self.log2size_inferred,
            "sids": self.sids,
            "skipped": self.skipped,
            "approximated": self.approximated,
            "reconstructed": self.reconstructed,
            "exact": self.exact,
            "smmu": idr_features(self.idr0, self.idr3),
            "untimed_lines": self.untimed,
            "cut_last_line": self.cut_last_line,
            "warnings": self.warnings(),
        })
    }
}

/// The longest log line the import reads (64 KiB); a longer one is refused with its number.
pub const MAX_LINE_BYTES: usize = 64 << 10;

/// Bounds on what an import may make of a log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImportLimits {
    /// Slots the guest wrote but QEMU never consumed, filled with CMD_SYNC, in one pass
    /// (`--max-filler-per-pass`).
    pub max_filler_per_pass: u64,
    /// The same, over the whole import (`--max-filler`).
    pub max_filler: u64,
    /// Commands and acknowledgements the import holds in memory (`--max-commands`): a log
    /// without end must not grow it without end.
    pub max_commands: u64,
    /// Distinct StreamIDs, each a device bound in the trace (`--max-sids`).
    pub max_sids: u64,
}

/// Default of [`ImportLimits::max_commands`].
pub const DEFAULT_MAX_IMPORT_COMMANDS: u64 = 2_000_000;
/// Default of [`ImportLimits::max_sids`].
pub const DEFAULT_MAX_SIDS: u64 = 4096;

/// Default of [`ImportLimits::max_filler_per_pass`].
pub const DEFAULT_MAX_FILLER_PER_PASS: u64 = 256;
/// Default of [`ImportLimits::max_filler`].
pub const DEFAULT_MAX_FILLER: u64 = 4096;

impl Default for ImportLimits {
    fn default() -> Self {
        ImportLimits {
            max_filler_per_pass: DEFAULT_MAX_FILLER_PER_PASS,
            max_filler: DEFAULT_MAX_FILLER,
            max_commands: DEFAULT_MAX_IMPORT_COMMANDS,
            max_sids: DEFAULT_MAX_SIDS,
        }
    }
}

impl core::fmt::Display for ImportStats {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{} lines ({} used): {} passes, {} commands ({} never consumed, filled with CMD_SYNC), {} fixes, {} acks, {} errors, {} SIDs, LOG2SIZE {}{}",
            self.lines,
            self.used,
            self.passes,
            self.commands,
            self.unobserved,
            self.fixes,
            self.acks,
            self.errors,
            self.sids,
            self.log2size,
            if self.log2size_inferred { " (inferred)" } else { "" }
        )?;
        let sum = |m: &BTreeMap<&'static str, u64>| m.values().sum::<u64>();
        write!(
            f,
            "; fields read from the log {}, reconstructed from the rest of it {}, approximated {} (--json lists them by kind)",
            sum(&self.exact),
            sum(&self.reconstructed),
            sum(&self.approximated)
        )
    }
}

/// What is wrong with a log.
#[derive(Debug, thiserror::Error)]
pub enum ImportProblem {
    /// Reading failed.
    #[error("reading the log: {0}")]
    Io(#[from] io::Error),
    /// A field of a recognised event is not a number.
    #[error("{event}: {field}={value:?} is not a number")]
    BadValue {
        /// The event.
        event: String,
        /// The field.
        field: String,
        /// The text.
        value: String,
    },
    /// A field of a recognised event outside what the field can hold.
    #[error("{event}: {field}={value} is out of range: {why}")]
    Invalid {
        /// The event.
        event: String,
        /// The field.
        field: String,
        /// The value.
        value: i64,
        /// Its range.
        why: &'static str,
    },
    /// A line with a `PID@SECONDS.MICROSECONDS:` prefix that does not parse.
    #[error("malformed `PID@SECONDS.MICROSECONDS:` prefix {0:?}")]
    BadPrefix(String),
    /// A line longer than [`MAX_LINE_BYTES`].
    #[error(
        "the line is longer than {MAX_LINE_BYTES} bytes (MAX_LINE_BYTES): not a QEMU trace line"
    )]
    LineTooLong,
    /// An `smmuv3_*` line that is not UTF-8.
    #[error("an smmuv3_* event line that is not UTF-8")]
    NotUtf8,
    /// A TLBI by address whose address the log does not give.
    #[error(
        "{op} with no address: the log has no range event for it (smmuv3_range_inval); take the \
         log with -trace 'smmuv3_*', not only 'smmuv3_cmdq_*'"
    )]
    NoAddress {
        /// The opcode's name.
        op: &'static str,
    },
    /// Slots the guest wrote but QEMU never consumed, more than the limit allows.
    #[error(
        "{filler} slots written but never consumed would be filled with CMD_SYNC {scope}, above \
         the limit of {limit} ({flag} to raise it)"
    )]
    TooMuchFiller {
        /// Filler commands needed.
        filler: u64,
        /// "in one pass" or "in all".
        scope: &'static str,
        /// The limit.
        limit: u64,
        /// The flag that raises it.
        flag: &'static str,
    },
    /// The log holds more of something than a limit allows.
    #[error("more than {limit} {what} (the limit; raise it with {flag})")]
    TooMany {
        /// What.
        what: &'static str,
        /// The limit.
        limit: u64,
        /// The flag that raises it.
        flag: &'static str,
    },
    /// The trace made of the log does not validate (see [`super::validate`]).
    #[error("the imported trace would not replay: {0}")]
    Unreplayable(Box<super::TraceError>),
    /// A queue index beyond the largest command queue.
    #[error("{event}: {field}={value} is not a queue index (0 to 2^19 - 1)")]
    OutOfRange {
        /// The event.
        event: String,
        /// The field.
        field: &'static str,
        /// The value.
        value: i64,
    },
    /// A recognised event lacks a field it always has.
    #[error("{event} has no {field}")]
    Missing {
        /// The event.
        event: String,
        /// The field.
        field: &'static str,
    },
    /// The log shows no command queue activity.
    #[error("no smmuv3_cmdq_consume line: was QEMU run with -trace 'smmuv3_*'?")]
    NoActivity,
    /// Writing the trace failed.
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// An import failure, at a 1-based line of the log (0: not tied to a line).
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct ImportError {
    /// The line.
    pub line: u64,
    /// What is wrong.
    pub problem: ImportProblem,
}

impl From<WriteError> for ImportError {
    fn from(e: WriteError) -> Self {
        ImportError {
            line: 0,
            problem: e.into(),
        }
    }
}

/// A queue position as QEMU prints it: index and wrap bit apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Pos {
    index: u32,
    wrap: bool,
}

impl Pos {
    fn ptr(self, shape: QueueShape) -> u32 {
        shape.index(self.index) | if self.wrap { shape.wrap_bit() } else { 0 }
    }
}

/// Fields gathered for the command being consumed.
#[derive(Clone, Debug, Default)]
struct Fields {
    op: Option<u8>,
    /// The opcode came from `smmuv3_unhandled_cmd` or the guest-error log line (exact).
    exact_op: bool,
    sid: Option<u32>,
    /// CFGI_STE_RANGE's RANGE, from its range line: 2^(RANGE+1) SIDs.
    range: Option<u8>,
    vmid: u16,
    asid: u16,
    addr: Option<u64>,
    tg: u8,
    pages: u64,
    ttl: u8,
    leaf: bool,
    irq: bool,
    /// An ASID printed as -1 (not applicable) taken as 0.
    asid_unknown: bool,
    /// `sid` is the SID of the last CFGI_STE before it (a PREFETCH_CONFIG, which QEMU logs
    /// without fields).
    sid_from_ste: bool,
}

struct Obs {
    pos: Pos,
    fields: Fields,
    name: String,
    /// The log line of its `smmuv3_cmdq_opcode`.
    line: u64,
}

struct Pass {
    ts: u64,
    prod: Pos,
    start: Pos,
    obs: Vec<Obs>,
    /// Index into `obs` of the refused command and its CONS.ERR.
    error: Option<(usize, u8)>,
    end_ts: u64,
    /// The log line that started it.
    line: u64,
}

enum Item {
    Pass(Pass),
    Ack(u64),
}

/// Splits `PID@SEC.USEC:name args` into its time in ns (if any) and the rest. A line whose
/// text before the first `:` has an `@` and is followed by an `smmuv3_` event, but is not a
/// well-formed prefix, is an error rather than an unrelated line.
fn split_line(line: &str) -> Result<(Option<u64>, &str), ImportProblem> {
    let line = line.trim();
    if let Some((pre, post)) = line.split_once(':') {
        if let Some((pid, time)) = pre.split_once('@') {
            let parsed = (|| {
                if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                let (s, us) = time.split_once('.')?;
                let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
                if !digits(s) || !digits(us) || us.len() > 6 {
                    return None;
                }
                let s = s.parse::<u64>().ok()?;
                let us = us.parse::<u64>().ok()?;
                s.checked_mul(1_000_000_000)?.checked_add(us * 1000)
            })();
            match parsed {
                Some(ns) => return Ok((Some(ns), post.trim_start())),
                None if post.trim_start().starts_with("smmuv3_") => {
                    return Err(ImportProblem::BadPrefix(format!("{pre}:")))
                }
                None => {}
            }
        }
    }
    Ok((None, line))
}

/// `key=value` and `key: value` pairs of an event's text, in order; values lose trailing
/// commas and a `(…)` suffix.
fn pairs(args: &str) -> Vec<(String, String)> {
    // Glue `key =value`, `key= value` and `key: value` into one word.
    let mut glued = String::with_capacity(args.len());
    let mut chars = args.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_whitespace() {
            let last = glued.chars().last();
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            let next = chars.peek().copied();
            if matches!(last, Some('=') | Some(':')) || matches!(next, Some('=')) {
                continue;
            }
            glued.push(' ');
        } else {
            glued.push(c);
        }
    }
    glued
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter_map(|w| {
            let i = w.find(['=', ':'])?;
            let (k, v) = (&w[..i], &w[i + 1..]);
            let v = v.split('(').next().unwrap_or(v);
            (!k.is_empty() && !v.is_empty()).then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// A number as QEMU prints it: decimal, `-1`, or `0x` hex.
fn number(v: &str) -> Option<i64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        return u64::from_str_radix(h, 16).ok().map(|x| x as i64);
    }
    v.parse::<i64>()
        .ok()
        .or_else(|| v.parse::<u64>().ok().map(|x| x as i64))
}

struct Args<'a> {
    event: &'a str,
    pairs: Vec<(String, String)>,
}

impl Args<'_> {
    /// A queue position given as an index field and a wrap field.
    fn pos(&self, idx: &[&'static str], wrap: &[&'static str]) -> Result<Pos, ImportProblem> {
        let index = self.need(idx)?;
        if !(0..1 << MAX_LOG2SIZE).contains(&index) {
            return Err(ImportProblem::OutOfRange {
                event: self.event.to_string(),
                field: idx[0],
                value: index,
            });
        }
        Ok(Pos {
            index: index as u32,
            wrap: self.need(wrap)? & 1 == 1,
        })
    }

    fn get(&self, keys: &[&str]) -> Result<Option<i64>, ImportProblem> {
        for (k, v) in &self.pairs {
            if keys.contains(&k.as_str()) {
                return number(v).map(Some).ok_or_else(|| ImportProblem::BadValue {
                    event: self.event.to_string(),
                    field: k.clone(),
                    value: v.clone(),
                });
            }
        }
        Ok(None)
    }

    fn need(&self, keys: &[&'static str]) -> Result<i64, ImportProblem> {
        self.get(keys)?.ok_or(ImportProblem::Missing {
            event: self.event.to_string(),
            field: keys[0],
        })
    }

    /// A field that must be present and within `lo..=hi`.
    fn need_in(
        &self,
        keys: &[&'static str],
        lo: i64,
        hi: i64,
        why: &'static str,
    ) -> Result<i64, ImportProblem> {
        let v = self.need(keys)?;
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(ImportProblem::Invalid {
                event: self.event.to_string(),
                field: keys[0].to_string(),
                value: v,
                why,
            })
        }
    }

    /// A VMID or ASID: 16 bits, or -1 (QEMU's "not applicable"), which is `None`; absent is
    /// `None` too.
    fn id16(&self, key: &'static str) -> Result<Option<u16>, ImportProblem> {
        match self.get(&[key])? {
            None | Some(-1) => Ok(None),
            Some(v) if (0..=0xffff).contains(&v) => Ok(Some(v as u16)),
            Some(v) => Err(ImportProblem::Invalid {
                event: self.event.to_string(),
                field: key.to_string(),
                value: v,
                why: "a VMID or ASID is 0 to 65535 (or -1: not applicable)",
            }),
        }
    }
}

const SID_RANGE: &str = "a StreamID is 0 to 2^32 - 1";

/// The opcode QEMU's name stands for; `None` for its `UNKNOWN`/`INVALID` placeholders.
fn opcode_of(name: &str) -> Option<u8> {
    let n = name.trim().strip_prefix("SMMU_CMD_").unwrap_or(name.trim());
    match n {
        "SYNC" => Some(opcode::CMD_SYNC),
        // QEMU names opcode 0x07 CFGI_ALL; the architecture defines no such opcode.
        "CFGI_ALL" => Some(0x07),
        _ => LAYOUTS
            .iter()
            .flatten()
            .find(|l| l.name == n)
            .map(|l| l.opcode),
    }
}

/// What the whole log says that rebuilding one command needs.
struct Ctx {
    /// Stands in for a SID the log does not give.
    default_sid: u32,
    /// SMMU_IDR0 as the guest read it.
    idr0: Option<u32>,
    /// CMDQ_BASE.ADDR.
    cmdq_base: Option<u64>,
}

/// Linux's CMD_SYNC.MSH: inner shareable (ARM_SMMU_SH_ISH).
const LINUX_SYNC_MSH: u8 = 3;
/// Linux's CMD_SYNC.MSIATTR: inner and outer write-back cacheable (ARM_SMMU_MEMATTR_OIWB).
const LINUX_SYNC_MSIATTR: u8 = 0xf;

/// The 16 bytes of a command from what the log said of it, the command at queue `index`.
/// Every field not read from the log is counted in `stats` as reconstructed (determined by the
/// rest of the log) or approximated; a field the command needs and the log lacks (a TLBI's
/// address) or a value no command can hold is refused.
fn rebuild(
    f: &Fields,
    name: &str,
    index: u32,
    ctx: &Ctx,
    stats: &mut ImportStats,
) -> Result<RawCommand, ImportProblem> {
    let op = rebuild_opcode(f, name, stats);
    let sid = rebuild_sid(f, op, ctx.default_sid, stats);
    let span = rebuild_span(f, op, stats)?;
    let cmd = if op == opcode::CMD_SYNC {
        rebuild_sync(f, index, ctx, stats)
    } else if let Some(cmd) = rebuild_tlbi(op, f, &span) {
        cmd
    } else if let Some(cmd) = rebuild_by_sid(op, f, sid, stats) {
        cmd
    } else {
        // Every other opcode: its fields are not in the log. TLBI_EL2_ALL (0x20) and
        // TLBI_NSNH_ALL (0x30) have no fields: nothing is missing.
        if !matches!(op, 0x20 | 0x30) && vcmdq::command::opcode_name(op).is_some() {
            stats.approx(
                "an opcode QEMU only names (PRI_RESP, RESUME, STALL_TERM, EL2/EL3 TLBIs): its fields written as 0",
            );
        }
        return Ok(RawCommand::new(u64::from(op), 0));
    };
    cmd.try_encode().map_err(|e| ImportProblem::BadValue {
        event: op_name(op).to_string(),
        field: "command".into(),
        value: format!("{e}"),
    })
}

fn op_name(op: u8) -> &'static str {
    vcmdq::command::opcode_name(op).unwrap_or("TLBI")
}

fn rebuild_opcode(f: &Fields, name: &str, stats: &mut ImportStats) -> u8 {
    if f.op.is_some() {
        stats.read("opcode (smmuv3_cmdq_opcode, or the guest-error line)");
    }
    match f.op {
        Some(op) => op,
        None => {
            stats.approx("opcode only named INVALID/UNKNOWN (no guest-error line): illegal opcode 0x00/0x08 written");
            if name == "UNKNOWN" {
                0x08
            } else {
                0x00
            }
        }
    }
}

fn rebuild_sid(f: &Fields, op: u8, default_sid: u32, stats: &mut ImportStats) -> u32 {
    match f.sid {
        Some(sid) if f.sid_from_ste => {
            stats.derived(
                "PREFETCH_CONFIG SID (not logged): the SID of the CFGI_STE before it, as Linux \
                 writes CFGI_STE, CMD_SYNC, PREFETCH_CONFIG for each STE it installs",
            );
            sid
        }
        Some(sid) => {
            stats.read("SID (smmuv3_cmdq_cfgi_ste/_cd/_ste_range)");
            sid
        }
        None => {
            if uses_sid(Some(op)) {
                stats.approx("SID not in the log: the lowest SID the log shows written");
            }
            default_sid
        }
    }
}

/// A TLBI's address and range as the command holds them.
struct Span {
    addr: u64,
    tg: u8,
    num: u8,
    scale: u8,
}

/// The address and range of a TLBI by address (zero for any other command); a range no
/// single TLBI expresses is refused.
fn rebuild_span(f: &Fields, op: u8, stats: &mut ImportStats) -> Result<Span, ImportProblem> {
    let by_address = matches!(
        op,
        opcode::TLBI_NH_VA | opcode::TLBI_NH_VAA | opcode::TLBI_S2_IPA
    );
    if by_address && f.addr.is_none() {
        return Err(ImportProblem::NoAddress { op: op_name(op) });
    }
    if f.asid_unknown && matches!(op, opcode::TLBI_NH_VA | opcode::TLBI_NH_ASID) {
        stats.approx("ASID printed as -1 (not applicable): written as 0");
    }
    if by_address && f.addr.is_some() {
        stats.read("TLBI address, TG, TTL, LEAF, VMID, ASID and page count (range lines)");
    }
    let addr = f.addr.unwrap_or(0) & !0xfff;
    if f.tg == 0 {
        if by_address && f.pages > 1 {
            return Err(ImportProblem::Invalid {
                event: op_name(op).to_string(),
                field: "num_pages".into(),
                value: f.pages as i64,
                why: "with TG 0 (no range) a TLBI covers one address",
            });
        }
        return Ok(Span {
            addr,
            tg: 0,
            num: 0,
            scale: 0,
        });
    }
    // NUM and SCALE as Linux chooses them: SCALE the lowest set bit of the page count.
    let scale = f.pages.trailing_zeros();
    let num = f.pages >> scale;
    if scale > 31 || num > 32 {
        return Err(ImportProblem::Invalid {
            event: op_name(op).to_string(),
            field: "num_pages".into(),
            value: f.pages.min(i64::MAX as u64) as i64,
            why: "the chunks add up to a page count no single TLBI expresses as (NUM+1) x 2^SCALE",
        });
    }
    Ok(Span {
        addr,
        tg: f.tg,
        num: (num - 1) as u8,
        scale: scale as u8,
    })
}

fn rebuild_sync(f: &Fields, index: u32, ctx: &Ctx, stats: &mut ImportStats) -> Command {
    if f.irq {
        stats.read("CMD_SYNC CS=IRQ (smmuv3_trigger_irq)");
    }
    let Some(idr0) = ctx.idr0 else {
        stats.approx(
            "CMD_SYNC: MSH/MSIATTR/MSIDATA/MSIADDR not in the log (and no IDR0 read \
             to tell what the driver chose), written as 0",
        );
        return Command::CmdSync {
            cs: u8::from(f.irq),
            msh: 0,
            msiattr: 0,
            msidata: 0,
            msiaddr: 0,
        };
    };
    // What Linux's arm-smmu-v3 writes (arm_smmu_cmdq_build_sync_cmd): MSH=ISH,
    // MSIATTR=OIWB, and CS=SEV unless it polls an MSI, which it does when IDR0
    // has MSI and COHACC; the MSI then targets the CMD_SYNC's own slot.
    let polls_msi = idr0 >> 13 & 1 == 1 && idr0 >> 4 & 1 == 1;
    let (cs, msiaddr) = match (f.irq, polls_msi, ctx.cmdq_base) {
        (true, true, Some(base)) => {
            stats.derived(
                "CMD_SYNC MSH=3 MSIATTR=0xf MSIADDR=its own slot (not logged): \
                 IDR0.MSI=1 and COHACC=1, Linux's MSI polling",
            );
            (1, (base + u64::from(index) * 16) & ((1 << 52) - 1))
        }
        (true, _, _) => {
            stats.derived("CMD_SYNC MSH=3 MSIATTR=0xf (not logged): as Linux writes them");
            stats.approx("CMD_SYNC CS=IRQ MSIADDR unknown: written as 0");
            (1, 0)
        }
        (false, _, _) => {
            stats.derived(
                "CMD_SYNC CS=SEV MSH=3 MSIATTR=0xf (not logged): no IRQ line, \
                 and IDR0 read by the guest, as Linux's arm-smmu-v3 writes it",
            );
            (2, 0)
        }
    };
    Command::CmdSync {
        cs,
        msh: LINUX_SYNC_MSH,
        msiattr: LINUX_SYNC_MSIATTR,
        msidata: 0,
        msiaddr,
    }
}

/// The TLBIs whose fields the log gives; `None` for any other opcode.
fn rebuild_tlbi(op: u8, f: &Fields, s: &Span) -> Option<Command> {
    let (vmid, asid, addr, ttl, leaf) = (f.vmid, f.asid, s.addr, f.ttl, f.leaf);
    let (tg, num, scale) = (s.tg, s.num, s.scale);
    Some(match op {
        opcode::TLBI_NH_ALL => Command::TlbiNhAll { vmid },
        opcode::TLBI_NH_ASID => Command::TlbiNhAsid { vmid, asid },
        opcode::TLBI_NH_VA => Command::TlbiNhVa {
            vmid,
            asid,
            addr,
            tg,
            num,
            scale,
            ttl,
            leaf,
        },
        opcode::TLBI_NH_VAA => Command::TlbiNhVaa {
            vmid,
            addr,
            tg,
            num,
            scale,
            ttl,
            leaf,
        },
        opcode::TLBI_S12_VMALL => Command::TlbiS12Vmall { vmid },
        opcode::TLBI_S2_IPA => Command::TlbiS2Ipa {
            vmid,
            addr: addr & ((1 << 52) - 1),
            tg,
            num,
            scale,
            ttl,
            leaf,
        },
        _ => return None,
    })
}

/// The commands naming a StreamID (configuration invalidations, prefetches, ATC_INV); `None`
/// for any other opcode.
fn rebuild_by_sid(op: u8, f: &Fields, sid: u32, stats: &mut ImportStats) -> Option<Command> {
    Some(match op {
        opcode::CFGI_STE => {
            stats.approx(LEAF_APPROX);
            Command::CfgiSte {
                ssec: false,
                sid,
                leaf: false,
            }
        }
        opcode::CFGI_STE_RANGE => {
            // QEMU prints the block's first and last SID: 2^(RANGE+1) SIDs.
            let range = match f.range {
                Some(r) => r,
                None => {
                    stats.approx(
                        "CFGI_STE_RANGE without its range line: RANGE 0 (two SIDs) written",
                    );
                    0
                }
            };
            Command::CfgiSteRange {
                ssec: false,
                sid,
                range,
            }
        }
        opcode::CFGI_CD => {
            stats.approx(LEAF_APPROX);
            Command::CfgiCd {
                ssec: false,
                ssid: 0,
                sid,
                leaf: false,
            }
        }
        opcode::CFGI_CD_ALL => Command::CfgiCdAll { ssec: false, sid },
        // QEMU does not model ATS: nothing of an ATC_INV is logged but its opcode. Invalidating
        // everything is the safe reading.
        opcode::ATC_INV => {
            stats.approx("ATC_INV: QEMU logs no ATC_INV field, written as an invalidate-all (SIZE 52) of its SID");
            Command::AtcInv {
                sid,
                ssv: false,
                ssid: 0,
                global: false,
                addr: 0,
                size: 52,
            }
        }
        opcode::PREFETCH_CONFIG => Command::PrefetchConfig {
            ssv: false,
            ssid: 0,
            sid,
        },
        opcode::PREFETCH_ADDR => Command::PrefetchAddr {
            ssv: false,
            ssid: 0,
            sid,
            size: 0,
            addr: 0,
        },
        _ => return None,
    })
}

/// QEMU does not log CFGI_STE's or CFGI_CD's LEAF: 0 asks for more to be invalidated than 1,
/// so replaying it can only be safer than the guest's (Linux writes 1).
const LEAF_APPROX: &str =
    "CFGI_STE/CFGI_CD LEAF not in the log: written as 0 (invalidates more; Linux writes 1)";

/// Whether commands of `op` carry a StreamID.
fn uses_sid(op: Option<u8>) -> bool {
    matches!(
        op,
        Some(
            opcode::CFGI_STE
                | opcode::CFGI_STE_RANGE
                | opcode::CFGI_CD
                | opcode::CFGI_CD_ALL
                | opcode::ATC_INV
                | opcode::PREFETCH_CONFIG
                | opcode::PREFETCH_ADDR
        )
    )
}

/// The command being consumed: its position and what the log has said of it so far.
struct Current {
    pos: Pos,
    fields: Fields,
    name: String,
    seen_opcode: bool,
    line: u64,
}

struct Parser {
    items: Vec<Item>,
    pass: Option<Pass>,
    cur: Option<Current>,
    base_log2size: Option<u8>,
    /// CMDQ_BASE.ADDR (bits [51:5]), where CMD_SYNC's MSI write of a polling Linux lands.
    cmdq_base: Option<u64>,
    /// The SID of the last CFGI_STE consumed.
    last_ste_sid: Option<u32>,
    max_index: u32,
    sids: BTreeSet<u32>,
    stats: ImportStats,
    first_abs: Option<u64>,
    last_ts: u64,
    /// The line being read.
    line: u64,
}

impl Parser {
    fn finish_current(&mut self) {
        let (Some(cur), Some(pass)) = (self.cur.take(), self.pass.as_mut()) else {
            return;
        };
        if !cur.seen_opcode {
            // A consume line with no command after it: QEMU found CMDQ_ERR pending and
            // stopped before reading the slot.
            return;
        }
        pass.obs.push(Obs {
            pos: cur.pos,
            fields: cur.fields,
            name: cur.name,
            line: cur.line,
        });
        self.stats.commands += 1;
    }

    /// Takes in one `smmuv3_*` event; false if the import has no use for it.
    fn event(&mut self, ts: u64, name: &str, rest: &str) -> Result<bool, ImportProblem> {
        let a = Args {
            event: name,
            pairs: pairs(rest),
        };
        for (k, v) in &a.pairs {
            if matches!(k.as_str(), "sid" | "streamid" | "SID") {
                if let Some(s) = number(v).filter(|&s| (0..=i64::from(u32::MAX)).contains(&s)) {
                    self.sids.insert(s as u32);
                }
            }
        }
        match name {
            "smmuv3_cmdq_consume" => self.consume(ts, &a)?,
            "smmuv3_cmdq_opcode" => self.opcode(rest),
            "smmuv3_cmdq_consume_error" => self.consume_error(name, rest)?,
            "smmuv3_cmdq_consume_out" => {
                self.finish_current();
                if let Some(mut p) = self.pass.take() {
                    p.end_ts = ts;
                    self.items.push(Item::Pass(p));
                    self.stats.passes += 1;
                }
            }
            "smmuv3_write_gerrorn" => {
                self.items.push(Item::Ack(ts));
                self.stats.acks += 1;
            }
            "smmuv3_read_mmio" => {
                // What the guest learnt of the SMMU: IDR0 (MSI, SEV, ...) and IDR3 (RIL).
                match a.get(&["addr"])? {
                    Some(0x0) => self.stats.idr0 = Some(a.need(&["val"])? as u32),
                    Some(0xc) => self.stats.idr3 = Some(a.need(&["val"])? as u32),
                    _ => return Ok(false),
                }
            }
            "smmuv3_write_mmio" => self.write_mmio(name, &a)?,
            _ => return self.command_field(name, &a),
        }
        Ok(true)
    }

    /// A consume line: QEMU reads the command at CONS (and starts a pass if none is open).
    fn consume(&mut self, ts: u64, a: &Args<'_>) -> Result<(), ImportProblem> {
        let prod = a.pos(&["prod"], &["prod.wrap"])?;
        let cons = a.pos(&["cons"], &["cons.wrap"])?;
        self.max_index = self.max_index.max(prod.index).max(cons.index);
        self.finish_current();
        if self.pass.is_none() {
            self.pass = Some(Pass {
                ts,
                prod,
                start: cons,
                obs: Vec::new(),
                error: None,
                end_ts: ts,
                line: self.line,
            });
        }
        self.cur = Some(Current {
            pos: cons,
            fields: Fields::default(),
            name: String::new(),
            seen_opcode: false,
            line: self.line,
        });
        Ok(())
    }

    fn opcode(&mut self, rest: &str) {
        let Some(cur) = self.cur.as_mut() else {
            return;
        };
        let n = rest.trim().trim_start_matches("<---").trim().to_string();
        if !cur.fields.exact_op {
            cur.fields.op = opcode_of(&n);
        }
        // QEMU logs PREFETCH_CONFIG without its SID. Linux writes one after
        // each STE it installs (CFGI_STE, CMD_SYNC, PREFETCH_CONFIG of that SID).
        if cur.fields.op == Some(opcode::PREFETCH_CONFIG) && cur.fields.sid.is_none() {
            if let Some(sid) = self.last_ste_sid {
                cur.fields.sid = Some(sid);
                cur.fields.sid_from_ste = true;
            }
        }
        cur.name = n;
        cur.seen_opcode = true;
        cur.line = self.line;
    }

    fn consume_error(&mut self, name: &str, rest: &str) -> Result<(), ImportProblem> {
        // "Error on SMMU_CMD_X command execution: N"
        let code = rest
            .rsplit(':')
            .next()
            .and_then(|c| number(c.trim()))
            .ok_or_else(|| ImportProblem::BadValue {
                event: name.to_string(),
                field: "error".into(),
                value: rest.trim().to_string(),
            })?;
        if !(1..=3).contains(&code) {
            return Err(ImportProblem::Invalid {
                event: name.to_string(),
                field: "error".into(),
                value: code,
                why: "QEMU's CONS.ERR codes are 1 (ILL), 2 (ABT) and 3 (ATC_INV_SYNC)",
            });
        }
        if let (Some(cur), Some(pass)) = (&self.cur, &mut self.pass) {
            if cur.seen_opcode {
                pass.error = Some((pass.obs.len(), code as u8));
            }
        }
        self.finish_current();
        self.stats.errors += 1;
        Ok(())
    }

    fn write_mmio(&mut self, name: &str, a: &Args<'_>) -> Result<(), ImportProblem> {
        // CMDQ_BASE (offset 0x90) holds LOG2SIZE in bits [4:0].
        if a.get(&["addr"])? != Some(0x90) {
            return Ok(());
        }
        let v = a.need(&["val"])?;
        self.cmdq_base = Some(v as u64 & 0x000f_ffff_ffff_ffe0);
        let log2size = (v & 0x1f) as u8;
        if log2size > MAX_LOG2SIZE {
            return Err(ImportProblem::Invalid {
                event: name.to_string(),
                field: "val".into(),
                value: v,
                why: "CMDQ_BASE.LOG2SIZE (bits [4:0]) is 0 to 19",
            });
        }
        self.base_log2size = Some(log2size);
        Ok(())
    }

    /// A line that gives fields of the command being consumed; false if it gives none.
    fn command_field(&mut self, name: &str, a: &Args<'_>) -> Result<bool, ImportProblem> {
        let Some(cur) = self.cur.as_mut().filter(|c| c.seen_opcode) else {
            return Ok(false);
        };
        let f = &mut cur.fields;
        match name {
            "smmuv3_cmdq_cfgi_ste" | "smmuv3_cmdq_cfgi_cd" => {
                let sid = a.need_in(&["sid", "streamid"], 0, i64::from(u32::MAX), SID_RANGE)?;
                f.sid = Some(sid as u32);
                f.sid_from_ste = false;
                if name == "smmuv3_cmdq_cfgi_ste" {
                    self.last_ste_sid = Some(sid as u32);
                }
            }
            "smmuv3_cmdq_cfgi_ste_range" => ste_range(f, name, a)?,
            "smmuv3_cmdq_tlbi_nh_asid" => {
                a.need(&["asid"])?;
                f.asid_unknown = a.id16("asid")?.is_none();
                f.asid = a.id16("asid")?.unwrap_or(0);
                f.vmid = a.id16("vmid")?.unwrap_or(0);
            }
            "smmuv3_cmdq_tlbi_nh" | "smmuv3_cmdq_tlbi_s12_vmid" => {
                f.vmid = a.id16("vmid")?.unwrap_or(0);
            }
            "smmuv3_range_inval"
            | "smmuv3_s1_range_inval"
            | "smmuv3_cmdq_tlbi_nh_va"
            | "smmuv3_cmdq_tlbi_nh_vaa" => tlbi_address(f, name, a)?,
            "smmuv3_unhandled_cmd" => {
                f.op = Some(a.need_in(&["type"], 0, 255, "an opcode is 0 to 255")? as u8);
                f.exact_op = true;
            }
            "smmuv3_trigger_irq" => {
                // SMMU_IRQ_CMD_SYNC is 2 in QEMU's numbering.
                if a.get(&["irq"])? == Some(2) && f.op == Some(opcode::CMD_SYNC) {
                    f.irq = true;
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// QEMU's guest-error log line `Illegal command type: N` names the exact opcode.
    fn guest_error(&mut self, line: &str) -> Result<(), ImportProblem> {
        let text = line
            .split_once("Illegal command type:")
            .map_or("", |(_, n)| n.trim());
        let n = number(text)
            .filter(|n| (0..=255).contains(n))
            .ok_or_else(|| ImportProblem::BadValue {
                event: "Illegal command type".into(),
                field: "type".into(),
                value: text.to_string(),
            })?;
        // QEMU logs it while the refused command is still the current one, before
        // smmuv3_cmdq_consume_error.
        if let Some(cur) = self.cur.as_mut() {
            cur.fields.op = Some(n as u8);
            cur.fields.exact_op = true;
        }
        Ok(())
    }
}

/// CFGI_STE_RANGE's block, which QEMU prints as its first and last SID.
fn ste_range(f: &mut Fields, name: &str, a: &Args<'_>) -> Result<(), ImportProblem> {
    let u32_max = i64::from(u32::MAX);
    let start = a.need_in(&["start"], 0, u32_max, SID_RANGE)?;
    let end = a.need_in(&["end"], 0, u32_max, SID_RANGE)?;
    // QEMU prints the block's first and last SID: 2^(RANGE+1) SIDs, aligned.
    let n = (end - start + 1) as u64;
    if end < start || n < 2 || !n.is_power_of_two() || !(start as u64).is_multiple_of(n) {
        return Err(ImportProblem::Invalid {
            event: name.to_string(),
            field: "end".into(),
            value: end,
            why: "a CFGI_STE_RANGE block is an aligned power of two of at least 2 SIDs",
        });
    }
    f.sid = Some(start as u32);
    f.range = Some((n.trailing_zeros() - 1) as u8);
    Ok(())
}

/// A TLBI by address. The range events print every field of the command; the older
/// per-opcode events (QEMU without range invalidation) print the address and LEAF of a
/// single-address TLBI, which is all such a QEMU executed.
fn tlbi_address(f: &mut Fields, name: &str, a: &Args<'_>) -> Result<(), ImportProblem> {
    let range = matches!(name, "smmuv3_range_inval" | "smmuv3_s1_range_inval");
    let addr = a.need(&["addr"])? as u64;
    let leaf = a.need_in(&["leaf"], 0, 1, "LEAF is 0 or 1")? != 0;
    let (tg, ttl, pages) = if range {
        (
            a.need_in(&["tg"], 0, 3, "TG is 0 to 3")? as u8,
            a.need_in(&["ttl"], 0, 3, "TTL is 0 to 3")? as u8,
            a.need_in(
                &["num_pages"],
                1,
                i64::from(u32::MAX),
                "a chunk is 1 to 2^32 - 1 pages",
            )? as u64,
        )
    } else {
        (0, 0, 1)
    };
    // A range is traced once per power-of-two chunk: the first chunk gives
    // the start, the chunks add up to the whole.
    if f.addr.is_none() {
        f.addr = Some(addr);
        f.vmid = a.id16("vmid")?.unwrap_or(0);
        let asid = a.id16("asid")?;
        f.asid_unknown = asid.is_none();
        f.asid = asid.unwrap_or(0);
        f.tg = tg;
        f.ttl = ttl;
        f.leaf = leaf;
    }
    f.pages = f.pages.saturating_add(pages);
    Ok(())
}

/// Reads one line of at most [`MAX_LINE_BYTES`] into `buf` (without its newline): `None` at
/// the end of the input, else whether a newline ended it.
fn read_line(log: &mut impl BufRead, buf: &mut Vec<u8>) -> Result<Option<bool>, ImportProblem> {
    buf.clear();
    loop {
        let chunk = log.fill_buf()?;
        if chunk.is_empty() {
            return Ok((!buf.is_empty()).then_some(false));
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        if buf.len() + take > MAX_LINE_BYTES {
            return Err(ImportProblem::LineTooLong);
        }
        buf.extend_from_slice(&chunk[..take]);
        log.consume(take + usize::from(done));
        if done {
            return Ok(Some(true));
        }
    }
}

/// Imports a QEMU `smmuv3_*` log into a trace written to `out`, under the default
/// [`ImportLimits`].
pub fn import<R: BufRead, W: Write + Seek>(
    log: R,
    out: W,
) -> Result<(W, ImportStats), ImportError> {
    import_with(log, out, &ImportLimits::default())
}

/// Imports a QEMU `smmuv3_*` log into a trace written to `out`. What is wrong is refused with
/// its line; what is skipped or approximated is counted in the stats (their warnings).
pub fn import_with<R: BufRead, W: Write + Seek>(
    mut log: R,
    out: W,
    limits: &ImportLimits,
) -> Result<(W, ImportStats), ImportError> {
    let mut p = Parser::new();
    p.read(&mut log, limits)?;
    // Made in memory and validated before a byte reaches `out`: an import that would not
    // replay is refused like any other trace.
    let (bytes, stats) = emit(p, io::Cursor::new(Vec::new()), limits)?;
    let bytes = bytes.into_inner();
    let whole = |problem| ImportError { line: 0, problem };
    let trace =
        super::Trace::parse(&bytes).map_err(|e| whole(ImportProblem::Unreplayable(Box::new(e))))?;
    super::validate(&trace).map_err(|e| whole(ImportProblem::Unreplayable(Box::new(e))))?;
    let mut out = out;
    out.write_all(&bytes)
        .map_err(|e| whole(ImportProblem::Write(WriteError::Io(e))))?;
    Ok((out, stats))
}

impl Parser {
    fn new() -> Parser {
        Parser {
            items: Vec::new(),
            pass: None,
            cur: None,
            base_log2size: None,
            cmdq_base: None,
            last_ste_sid: None,
            max_index: 0,
            sids: BTreeSet::new(),
            stats: ImportStats::default(),
            first_abs: None,
            last_ts: 0,
            line: 0,
        }
    }

    /// Reads the whole log, then closes the pass still open at its end.
    fn read(&mut self, log: &mut impl BufRead, limits: &ImportLimits) -> Result<(), ImportError> {
        let mut n = 0u64;
        let mut buf = Vec::new();
        loop {
            let at = |line| move |problem| ImportError { line, problem };
            let Some(terminated) = read_line(&mut *log, &mut buf).map_err(at(n + 1))? else {
                break;
            };
            n += 1;
            self.line = n;
            if !terminated {
                // The last line without its newline: QEMU stopped mid-write, and what was
                // written of it may parse as a line with fields missing or cut short.
                self.stats.cut_last_line = Some(n);
                break;
            }
            self.take_line(&buf, limits).map_err(at(n))?;
        }
        self.stats.lines = n;
        self.finish_current();
        if let Some(mut pass) = self.pass.take() {
            pass.end_ts = self.last_ts;
            self.items.push(Item::Pass(pass));
            self.stats.passes += 1;
        }
        Ok(())
    }

    /// One whole line of the log, line number `self.line`.
    fn take_line(&mut self, buf: &[u8], limits: &ImportLimits) -> Result<(), ImportProblem> {
        let line = match std::str::from_utf8(buf) {
            Ok(l) => l,
            // A byte that is not UTF-8 in an unrelated line (a guest's console, another
            // device) costs that line only; in an smmuv3 event it is a damaged log.
            Err(_) if buf.windows(7).any(|w| w == b"smmuv3_") => {
                return Err(ImportProblem::NotUtf8)
            }
            Err(_) => {
                self.stats.skip("not UTF-8 (and not an smmuv3_* event)");
                return Ok(());
            }
        };
        let (abs, rest) = split_line(line)?;
        let ts = match abs {
            Some(abs) => abs.saturating_sub(*self.first_abs.get_or_insert(abs)),
            None => {
                if rest.starts_with("smmuv3_") {
                    self.stats.untimed += 1;
                }
                self.line * 1000
            }
        };
        let ts = ts.max(self.last_ts);
        self.last_ts = ts;
        if line.contains("Illegal command type:") {
            self.guest_error(line)?;
            self.stats.used += 1;
            return Ok(());
        }
        let (name, args) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        if !name.starts_with("smmuv3_") {
            self.stats.skip("not an smmuv3_* event");
            return Ok(());
        }
        let used = self.event(ts, name, args)?;
        self.check_limits(limits)?;
        if used {
            self.stats.used += 1;
        } else {
            self.stats.skip("an smmuv3_* event the import does not use");
        }
        Ok(())
    }

    fn check_limits(&self, limits: &ImportLimits) -> Result<(), ImportProblem> {
        if self.stats.commands + self.stats.acks > limits.max_commands {
            return Err(ImportProblem::TooMany {
                what: "commands and acknowledgements",
                limit: limits.max_commands,
                flag: "--max-commands",
            });
        }
        if self.sids.len() as u64 > limits.max_sids {
            return Err(ImportProblem::TooMany {
                what: "distinct StreamIDs",
                limit: limits.max_sids,
                flag: "--max-sids",
            });
        }
        Ok(())
    }
}

fn emit<W: Write + Seek>(
    p: Parser,
    out: W,
    limits: &ImportLimits,
) -> Result<(W, ImportStats), ImportError> {
    let Parser {
        items,
        mut stats,
        mut sids,
        base_log2size,
        max_index,
        cmdq_base,
        ..
    } = p;
    let passes: Vec<&Pass> = items
        .iter()
        .filter_map(|i| match i {
            Item::Pass(x) => Some(x),
            Item::Ack(_) => None,
        })
        .collect();
    let no_activity = ImportError {
        line: 0,
        problem: ImportProblem::NoActivity,
    };
    let Some(first) = passes.first() else {
        return Err(no_activity);
    };
    let shape = ring_shape(base_log2size, max_index, &mut stats).ok_or(no_activity)?;
    // Slots are renumbered so the first CONS seen is slot 0, where a new ring starts.
    let rebase = Rebase {
        shape,
        base: first.start.ptr(shape),
    };
    let ctx = rebuild_ctx(&passes, &mut sids, stats.idr0, cmdq_base);
    let observed = Observed::rebuild(&passes, &ctx, rebase, &mut stats)?;
    let meta = TraceMeta {
        // A guest of QEMU's SMMU waits for its CMD_SYNCs (that is what they are for).
        flags: FLAG_IMPORTED | FLAG_GUEST_WAITS_SYNC,
        created_unix_ns: 0,
    };
    let mut e = Emitter {
        w: TraceWriter::new(out, meta)?,
        rebase,
        observed: &observed,
        limits,
        stats,
        written: 0,
        content: HashMap::new(),
    };
    e.control_plane(&sids)?;
    e.passes(&items)?;
    let out = e.w.finish_counted()?;
    Ok((out, e.stats))
}

/// The ring's size: CMDQ_BASE.LOG2SIZE as the guest wrote it or, without that write, the
/// smallest that holds every index seen.
fn ring_shape(
    base_log2size: Option<u8>,
    max_index: u32,
    stats: &mut ImportStats,
) -> Option<QueueShape> {
    let (log2size, inferred) = match base_log2size {
        Some(l) => (l, false),
        None => (
            ((32 - max_index.leading_zeros()) as u8).clamp(1, MAX_LOG2SIZE),
            true,
        ),
    };
    let shape = QueueShape::new(log2size).ok()?;
    stats.log2size = log2size;
    stats.log2size_inferred = inferred;
    if inferred {
        stats.approx("LOG2SIZE (no CMDQ_BASE write in the log): from the highest index seen");
    } else {
        stats.read("LOG2SIZE (the CMDQ_BASE write)");
    }
    Some(shape)
}

/// A SID the log does not give is taken to be the lowest SID it shows (a device of this VM),
/// or 0 bound to a placeholder device when it shows none, so that a command QEMU consumed
/// without error is not refused on replay for want of a binding.
fn rebuild_ctx(
    passes: &[&Pass],
    sids: &mut BTreeSet<u32>,
    idr0: Option<u32>,
    cmdq_base: Option<u64>,
) -> Ctx {
    let needs_default = passes
        .iter()
        .flat_map(|p| &p.obs)
        .any(|o| o.fields.sid.is_none() && uses_sid(o.fields.op));
    if sids.is_empty() && needs_default {
        sids.insert(0);
    }
    Ctx {
        default_sid: sids.iter().next().copied().unwrap_or(0),
        idr0,
        cmdq_base,
    }
}

/// QEMU's queue positions as slots of the trace's ring, whose slot 0 is the first CONS seen.
#[derive(Clone, Copy)]
struct Rebase {
    shape: QueueShape,
    base: u32,
}

impl Rebase {
    fn slot(self, pos: Pos) -> u32 {
        let shape = self.shape;
        shape.advance(pos.ptr(shape), shape.ptr_mask() + 1 - self.base)
    }
}

/// Every observation in log order, and for each slot the observations' positions in it, to
/// find what a slot held when PROD was written: its first consumption afterwards.
struct Observed {
    all: Vec<(u32, RawCommand)>,
    /// Index in `all` of each pass's first observation.
    pass_start: Vec<usize>,
    /// Each pass's commands, rebuilt.
    cmds_of: Vec<Vec<RawCommand>>,
    by_slot: HashMap<u32, Vec<usize>>,
}

impl Observed {
    fn rebuild(
        passes: &[&Pass],
        ctx: &Ctx,
        rebase: Rebase,
        stats: &mut ImportStats,
    ) -> Result<Observed, ImportError> {
        let mut all: Vec<(u32, RawCommand)> = Vec::new();
        let mut pass_start = Vec::new();
        let mut cmds_of: Vec<Vec<RawCommand>> = Vec::new();
        for pass in passes {
            pass_start.push(all.len());
            let mut cmds = Vec::with_capacity(pass.obs.len());
            for o in &pass.obs {
                let c =
                    rebuild(&o.fields, &o.name, o.pos.index, ctx, stats).map_err(|problem| {
                        ImportError {
                            line: o.line,
                            problem,
                        }
                    })?;
                cmds.push(c);
            }
            all.extend(
                pass.obs
                    .iter()
                    .zip(&cmds)
                    .map(|(o, c)| (rebase.slot(o.pos), *c)),
            );
            cmds_of.push(cmds);
        }
        let mut by_slot: HashMap<u32, Vec<usize>> = HashMap::new();
        for (i, (slot, _)) in all.iter().enumerate() {
            by_slot.entry(*slot).or_default().push(i);
        }
        Ok(Observed {
            all,
            pass_start,
            cmds_of,
            by_slot,
        })
    }

    /// What `slot` held at observation `from`: its first consumption from then on.
    fn first_from(&self, slot: u32, from: usize) -> Option<RawCommand> {
        let v = self.by_slot.get(&slot)?;
        let k = v.partition_point(|&i| i < from);
        v.get(k).map(|&i| self.all[i].1)
    }
}

/// Writes the imported trace: one vIOMMU, its devices, one ring, and the log's passes over it.
struct Emitter<'a, W: Write + Seek> {
    w: TraceWriter<W>,
    rebase: Rebase,
    observed: &'a Observed,
    limits: &'a ImportLimits,
    stats: ImportStats,
    /// PROD as the trace's guest last wrote it.
    written: u32,
    /// What each slot of the trace's ring holds.
    content: HashMap<u32, RawCommand>,
}

impl<W: Write + Seek> Emitter<'_, W> {
    /// The vIOMMU as the guest saw it offered, a device bound for each SID seen, the ring.
    fn control_plane(&mut self, sids: &BTreeSet<u32>) -> Result<(), ImportError> {
        let sidsize = sids
            .iter()
            .next_back()
            .map_or(16, |&s| (32 - s.leading_zeros()).max(16) as u8);
        // Range invalidation as the guest saw it offered (IDR3.RIL); QEMU 7.2 and later offer it.
        let range_inv = match self.stats.idr3 {
            Some(idr3) => {
                self.stats
                    .read("range invalidation (IDR3.RIL read by the guest)");
                idr3 >> 10 & 1 == 1
            }
            None => true,
        };
        self.w
            .viommu_create(0, 0, 1, 0, Profile::Kernel, sidsize, range_inv)?;
        for (k, &sid) in sids.iter().enumerate() {
            let device = k as u32 + 1;
            self.w.device_add(0, device, 0, sid)?;
            self.w.bind(0, 0, device, sid)?;
        }
        self.stats.sids = sids.len() as u64;
        self.w.ring_create(0, 0, 0, self.rebase.shape.log2size())?;
        Ok(())
    }

    /// Each pass as the guest's doing: the slots it rewrote, its acknowledgement of the error
    /// before, the slots PROD newly covers, and the command QEMU refused.
    fn passes(&mut self, items: &[Item]) -> Result<(), ImportError> {
        let shape = self.rebase.shape;
        let observed = self.observed;
        let mut ack: Option<u64> = None;
        let mut pass_no = 0usize;
        for item in items {
            let pass = match item {
                Item::Ack(ts) => {
                    ack = Some(*ts);
                    continue;
                }
                Item::Pass(pass) => pass,
            };
            let from = observed.pass_start[pass_no];
            let cmds = &observed.cmds_of[pass_no];
            pass_no += 1;
            let prod = self.rebase.slot(pass.prod);
            let new = shape.distance(prod, self.written).min(shape.entries());
            // The guest rewrote slots QEMU had stopped at: GuestFix, then its acknowledgement.
            let fix_ts = ack.unwrap_or(pass.ts).max(self.w.last_timestamp());
            self.fixes(pass, cmds, new, fix_ts)?;
            if ack.take().is_some() {
                self.w.guest_ack(fix_ts, 0)?;
            }
            if new > 0 {
                self.publish(pass, from, new, prod)?;
            }
            self.refusal(pass)?;
        }
        if let Some(ts) = ack {
            self.w.guest_ack(ts.max(self.w.last_timestamp()), 0)?;
        }
        Ok(())
    }

    /// Slots outside the `new` ones PROD covers whose command differs from what they held.
    fn fixes(
        &mut self,
        pass: &Pass,
        cmds: &[RawCommand],
        new: u32,
        fix_ts: u64,
    ) -> Result<(), ImportError> {
        let shape = self.rebase.shape;
        for (o, &cmd) in pass.obs.iter().zip(cmds) {
            let slot = self.rebase.slot(o.pos);
            let in_new = shape.distance(slot, self.written) < new;
            if !in_new && self.content.get(&slot).is_some_and(|c| *c != cmd) {
                self.w.guest_fix(fix_ts, 0, slot, cmd)?;
                self.content.insert(slot, cmd);
                self.stats.fixes += 1;
            }
        }
        Ok(())
    }

    /// The `new` slots up to `prod`, written and published with one doorbell.
    fn publish(
        &mut self,
        pass: &Pass,
        from: usize,
        new: u32,
        prod: u32,
    ) -> Result<(), ImportError> {
        let shape = self.rebase.shape;
        let observed = self.observed;
        let ts = pass.ts.max(self.w.last_timestamp());
        let filler = (0..new)
            .filter(|&i| {
                observed
                    .first_from(shape.advance(self.written, i), from)
                    .is_none()
            })
            .count() as u64;
        self.check_filler(pass, filler)?;
        let mut cmds = Vec::with_capacity(new as usize);
        for i in 0..new {
            let slot = shape.advance(self.written, i);
            let c = observed.first_from(slot, from).unwrap_or_else(|| {
                self.stats.unobserved += 1;
                self.stats
                    .approx("a slot written but never consumed: filled with CMD_SYNC");
                Command::CmdSync {
                    cs: 0,
                    msh: 0,
                    msiattr: 0,
                    msidata: 0,
                    msiaddr: 0,
                }
                .encode()
            });
            self.content.insert(slot, c);
            cmds.push(c);
        }
        self.w.commands(ts, 0, self.written, &cmds)?;
        self.w.doorbell(ts, 0, prod)?;
        self.written = prod;
        Ok(())
    }

    /// Slots PROD covers that QEMU never read are filled: bounded, since a few lines of log
    /// with PROD far ahead of CONS would otherwise make megabytes of filler.
    fn check_filler(&self, pass: &Pass, filler: u64) -> Result<(), ImportError> {
        let too_much = |filler, scope, limit, flag| ImportError {
            line: pass.line,
            problem: ImportProblem::TooMuchFiller {
                filler,
                scope,
                limit,
                flag,
            },
        };
        if filler > self.limits.max_filler_per_pass {
            return Err(too_much(
                filler,
                "in one pass",
                self.limits.max_filler_per_pass,
                "--max-filler-per-pass",
            ));
        }
        if self.stats.unobserved + filler > self.limits.max_filler {
            return Err(too_much(
                self.stats.unobserved + filler,
                "in all",
                self.limits.max_filler,
                "--max-filler",
            ));
        }
        Ok(())
    }

    /// The command QEMU refused in the pass, with its CONS.ERR.
    fn refusal(&mut self, pass: &Pass) -> Result<(), ImportError> {
        let Some((i, code)) = pass.error else {
            return Ok(());
        };
        let Some(o) = pass.obs.get(i) else {
            return Ok(());
        };
        let e = CError::from_code(code)
            .filter(|e| *e != CError::None)
            .unwrap_or(CError::Ill);
        self.w.outcome(
            pass.end_ts.max(self.w.last_timestamp()),
            0,
            self.rebase.slot(o.pos),
            Outcome::Refused(e),
        )?;
        Ok(())
    }
}
