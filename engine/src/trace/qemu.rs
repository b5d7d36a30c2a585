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

use super::format::FLAG_IMPORTED;
use super::{Outcome, Profile, TraceMeta, TraceWriter, WriteError};
use crate::command::{opcode, Command, RawCommand, LAYOUTS};
use crate::queue::{CError, QueueShape, MAX_LOG2SIZE};
use std::collections::{BTreeSet, HashMap};
use std::io::{self, BufRead, Seek, Write};

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
    range_end: Option<u32>,
    vmid: u16,
    asid: u16,
    addr: Option<u64>,
    tg: u8,
    pages: u64,
    ttl: u8,
    leaf: bool,
    irq: bool,
}

struct Obs {
    pos: Pos,
    fields: Fields,
    name: String,
}

struct Pass {
    ts: u64,
    prod: Pos,
    start: Pos,
    obs: Vec<Obs>,
    /// Index into `obs` of the refused command and its CONS.ERR.
    error: Option<(usize, u8)>,
    end_ts: u64,
}

enum Item {
    Pass(Pass),
    Ack(u64),
}

/// Splits `PID@SEC.USEC:name args` into its time in ns (if any), the event name and its args.
fn split_line(line: &str) -> (Option<u64>, &str) {
    let line = line.trim();
    if let Some((pre, post)) = line.split_once(':') {
        if let Some((pid, time)) = pre.split_once('@') {
            if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) {
                if let Some((s, us)) = time.split_once('.') {
                    if let (Ok(s), Ok(us)) = (s.parse::<u64>(), us.parse::<u64>()) {
                        let ns = s
                            .saturating_mul(1_000_000_000)
                            .saturating_add(us.saturating_mul(1000));
                        return (Some(ns), post.trim_start());
                    }
                }
            }
        }
    }
    (None, line)
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
}

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

/// The 16 bytes of a command from what the log said of it; `default_sid` stands in for a SID
/// the log does not give.
fn rebuild(f: &Fields, name: &str, default_sid: u32) -> RawCommand {
    let op = f.op.unwrap_or(if name == "UNKNOWN" { 0x08 } else { 0x00 });
    let sid = f.sid.unwrap_or(default_sid);
    let vmid = f.vmid;
    let asid = f.asid;
    let addr = f.addr.unwrap_or(0) & !0xfff;
    let (tg, num, scale) = if f.tg == 0 || f.pages == 0 {
        (0, 0, 0)
    } else {
        let scale = f.pages.trailing_zeros().min(31);
        let num = ((f.pages >> scale) - 1).min(31);
        (f.tg & 3, num as u8, scale as u8)
    };
    let (ttl, leaf) = (f.ttl & 3, f.leaf);
    let cmd = match op {
        opcode::CMD_SYNC => Command::CmdSync {
            cs: u8::from(f.irq),
            msh: 0,
            msiattr: 0,
            msidata: 0,
            msiaddr: 0,
        },
        opcode::CFGI_STE => Command::CfgiSte {
            ssec: false,
            sid,
            leaf: false,
        },
        opcode::CFGI_STE_RANGE => {
            // QEMU prints the block's first and last SID: 2^(RANGE+1) SIDs.
            let n = f
                .range_end
                .map_or(0, |e| u64::from(e.wrapping_sub(sid)) + 1);
            let range = if n.is_power_of_two() && n >= 2 {
                (n.trailing_zeros() - 1) as u8
            } else {
                0
            };
            Command::CfgiSteRange {
                ssec: false,
                sid,
                range,
            }
        }
        opcode::CFGI_CD => Command::CfgiCd {
            ssec: false,
            ssid: 0,
            sid,
            leaf: false,
        },
        opcode::CFGI_CD_ALL => Command::CfgiCdAll { ssec: false, sid },
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
        // QEMU does not model ATS: nothing of an ATC_INV is logged but its opcode. Invalidating
        // everything is the safe reading.
        opcode::ATC_INV => Command::AtcInv {
            sid,
            ssv: false,
            ssid: 0,
            global: false,
            addr: 0,
            size: 52,
        },
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
        opcode::TLBI_S2_IPA => Command::TlbiS2Ipa {
            vmid,
            addr: addr & ((1 << 52) - 1),
            tg,
            num,
            scale,
            ttl,
            leaf,
        },
        // Every other opcode: its fields are not in the log.
        _ => return RawCommand::new(u64::from(op), 0),
    };
    cmd.try_encode()
        .unwrap_or_else(|_| RawCommand::new(u64::from(op), 0))
}

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
}

struct Parser {
    items: Vec<Item>,
    pass: Option<Pass>,
    cur: Option<Current>,
    base_log2size: Option<u8>,
    max_index: u32,
    sids: BTreeSet<u32>,
    stats: ImportStats,
    first_abs: Option<u64>,
    last_ts: u64,
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
        });
        self.stats.commands += 1;
    }

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
        let pos = |idx: &[&'static str], wrap: &[&'static str]| -> Result<Pos, ImportProblem> {
            let index = a.need(idx)?;
            if !(0..1 << MAX_LOG2SIZE).contains(&index) {
                return Err(ImportProblem::OutOfRange {
                    event: name.to_string(),
                    field: idx[0],
                    value: index,
                });
            }
            Ok(Pos {
                index: index as u32,
                wrap: a.need(wrap)? & 1 == 1,
            })
        };
        match name {
            "smmuv3_cmdq_consume" => {
                let prod = pos(&["prod"], &["prod.wrap"])?;
                let cons = pos(&["cons"], &["cons.wrap"])?;
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
                    });
                }
                self.cur = Some(Current {
                    pos: cons,
                    fields: Fields::default(),
                    name: String::new(),
                    seen_opcode: false,
                });
            }
            "smmuv3_cmdq_opcode" => {
                if let Some(cur) = self.cur.as_mut() {
                    let n = rest.trim().trim_start_matches("<---").trim().to_string();
                    if !cur.fields.exact_op {
                        cur.fields.op = opcode_of(&n);
                    }
                    cur.name = n;
                    cur.seen_opcode = true;
                }
            }
            "smmuv3_cmdq_consume_error" => {
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
                if let (Some(cur), Some(pass)) = (&self.cur, &mut self.pass) {
                    if cur.seen_opcode {
                        pass.error = Some((pass.obs.len(), code.clamp(1, 0x7f) as u8));
                    }
                }
                self.finish_current();
                self.stats.errors += 1;
            }
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
            "smmuv3_write_mmio" => {
                // CMDQ_BASE (offset 0x90) holds LOG2SIZE in bits [4:0].
                if a.get(&["addr"])? == Some(0x90) {
                    let v = a.need(&["val"])?;
                    self.base_log2size = Some(((v & 0x1f) as u8).min(MAX_LOG2SIZE));
                }
            }
            _ => {
                let Some(cur) = self.cur.as_mut().filter(|c| c.seen_opcode) else {
                    return Ok(false);
                };
                let f = &mut cur.fields;
                let small = |v: i64| if v < 0 { 0 } else { v as u16 };
                match name {
                    "smmuv3_cmdq_cfgi_ste" | "smmuv3_cmdq_cfgi_cd" => {
                        f.sid = Some(a.need(&["sid", "streamid"])? as u32);
                    }
                    "smmuv3_cmdq_cfgi_ste_range" => {
                        f.sid = Some(a.need(&["start"])? as u32);
                        f.range_end = Some(a.need(&["end"])? as u32);
                    }
                    "smmuv3_cmdq_tlbi_nh_asid" => {
                        f.asid = small(a.need(&["asid"])?);
                        f.vmid = small(a.get(&["vmid"])?.unwrap_or(0));
                    }
                    "smmuv3_cmdq_tlbi_nh" | "smmuv3_cmdq_tlbi_s12_vmid" => {
                        f.vmid = small(a.get(&["vmid"])?.unwrap_or(0));
                    }
                    "smmuv3_range_inval"
                    | "smmuv3_s1_range_inval"
                    | "smmuv3_cmdq_tlbi_nh_va"
                    | "smmuv3_cmdq_tlbi_nh_vaa" => {
                        // A range is traced once per power-of-two chunk: the first chunk gives
                        // the start, the chunks add up to the whole.
                        let addr = a.need(&["addr"])? as u64;
                        if f.addr.is_none() {
                            f.addr = Some(addr);
                            f.vmid = small(a.get(&["vmid"])?.unwrap_or(0));
                            f.asid = small(a.get(&["asid"])?.unwrap_or(0));
                            f.tg = a.get(&["tg"])?.unwrap_or(0) as u8;
                            f.ttl = a.get(&["ttl"])?.unwrap_or(0) as u8;
                            f.leaf = a.get(&["leaf"])?.unwrap_or(0) != 0;
                        }
                        f.pages = f
                            .pages
                            .saturating_add(a.get(&["num_pages"])?.unwrap_or(1) as u64);
                    }
                    "smmuv3_unhandled_cmd" => {
                        f.op = Some(a.need(&["type"])? as u8);
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
            }
        }
        Ok(true)
    }

    /// QEMU's guest-error log line `Illegal command type: N` names the exact opcode.
    fn guest_error(&mut self, line: &str) {
        if let Some(n) = line
            .split_once("Illegal command type:")
            .and_then(|(_, n)| number(n.trim()))
        {
            // QEMU logs it while the refused command is still the current one, before
            // smmuv3_cmdq_consume_error.
            if let Some(cur) = self.cur.as_mut() {
                cur.fields.op = Some(n as u8);
                cur.fields.exact_op = true;
            }
        }
    }
}

/// Imports a QEMU `smmuv3_*` log into a trace written to `out`.
pub fn import<R: BufRead, W: Write + Seek>(
    log: R,
    out: W,
) -> Result<(W, ImportStats), ImportError> {
    let mut p = Parser {
        items: Vec::new(),
        pass: None,
        cur: None,
        base_log2size: None,
        max_index: 0,
        sids: BTreeSet::new(),
        stats: ImportStats::default(),
        first_abs: None,
        last_ts: 0,
    };
    let mut n = 0u64;
    for line in log.lines() {
        n += 1;
        let line = line.map_err(|e| ImportError {
            line: n,
            problem: e.into(),
        })?;
        let (abs, rest) = split_line(&line);
        let ts = match abs {
            Some(abs) => abs.saturating_sub(*p.first_abs.get_or_insert(abs)),
            None => n * 1000,
        };
        let ts = ts.max(p.last_ts);
        p.last_ts = ts;
        if line.contains("Illegal command type:") {
            p.guest_error(&line);
            p.stats.used += 1;
            continue;
        }
        let (name, args) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        if !name.starts_with("smmuv3_") {
            continue;
        }
        let used = p
            .event(ts, name, args)
            .map_err(|problem| ImportError { line: n, problem })?;
        p.stats.used += u64::from(used);
    }
    p.stats.lines = n;
    p.finish_current();
    if let Some(mut pass) = p.pass.take() {
        pass.end_ts = p.last_ts;
        p.items.push(Item::Pass(pass));
        p.stats.passes += 1;
    }
    emit(p, out).map_err(|problem| ImportError { line: 0, problem })
}

fn emit<W: Write + Seek>(mut p: Parser, out: W) -> Result<(W, ImportStats), ImportProblem> {
    let passes: Vec<&Pass> = p
        .items
        .iter()
        .filter_map(|i| match i {
            Item::Pass(x) => Some(x),
            Item::Ack(_) => None,
        })
        .collect();
    let Some(first) = passes.first() else {
        return Err(ImportProblem::NoActivity);
    };
    let (log2size, inferred) = match p.base_log2size {
        Some(l) => (l, false),
        None => (
            ((32 - p.max_index.leading_zeros()) as u8).clamp(1, MAX_LOG2SIZE),
            true,
        ),
    };
    let shape = QueueShape::new(log2size).map_err(|_| ImportProblem::NoActivity)?;
    p.stats.log2size = log2size;
    p.stats.log2size_inferred = inferred;
    // Slots are renumbered so the first CONS seen is slot 0, where a new ring starts.
    let base = first.start.ptr(shape);
    let rebase = |pos: Pos| shape.advance(pos.ptr(shape), shape.ptr_mask() + 1 - base);

    // Every observation in log order, and for each slot the observations' positions in it, to
    // find what a slot held when PROD was written: its first consumption afterwards.
    // A SID the log does not give is taken to be the lowest SID it shows (a device of this
    // VM), or 0 bound to a placeholder device when it shows none, so that a command QEMU
    // consumed without error is not refused on replay for want of a binding.
    let needs_default = passes
        .iter()
        .flat_map(|p| &p.obs)
        .any(|o| o.fields.sid.is_none() && uses_sid(o.fields.op));
    if p.sids.is_empty() && needs_default {
        p.sids.insert(0);
    }
    let default_sid = p.sids.iter().next().copied().unwrap_or(0);
    let mut all: Vec<(u32, RawCommand)> = Vec::new();
    let mut pass_start = Vec::new();
    let mut cmds_of: Vec<Vec<RawCommand>> = Vec::new();
    for pass in &passes {
        pass_start.push(all.len());
        let cmds: Vec<RawCommand> = pass
            .obs
            .iter()
            .map(|o| rebuild(&o.fields, &o.name, default_sid))
            .collect();
        all.extend(pass.obs.iter().zip(&cmds).map(|(o, c)| (rebase(o.pos), *c)));
        cmds_of.push(cmds);
    }
    let mut by_slot: HashMap<u32, Vec<usize>> = HashMap::new();
    for (i, (slot, _)) in all.iter().enumerate() {
        by_slot.entry(*slot).or_default().push(i);
    }
    let first_from = |slot: u32, from: usize| -> Option<RawCommand> {
        let v = by_slot.get(&slot)?;
        let k = v.partition_point(|&i| i < from);
        v.get(k).map(|&i| all[i].1)
    };

    let meta = TraceMeta {
        flags: FLAG_IMPORTED,
        created_unix_ns: 0,
    };
    let mut w = TraceWriter::new(out, meta)?;
    let sidsize = p
        .sids
        .iter()
        .next_back()
        .map_or(16, |&s| (32 - s.leading_zeros()).max(16) as u8);
    w.viommu_create(0, 0, 1, 0, Profile::Kernel, sidsize, true)?;
    for (k, &sid) in p.sids.iter().enumerate() {
        let device = k as u32 + 1;
        w.device_add(0, device, 0, sid)?;
        w.bind(0, 0, device, sid)?;
    }
    p.stats.sids = p.sids.len() as u64;
    w.ring_create(0, 0, 0, log2size)?;

    let mut written = 0u32;
    let mut content: HashMap<u32, RawCommand> = HashMap::new();
    let mut ack: Option<u64> = None;
    let mut pass_no = 0usize;
    for item in &p.items {
        let pass = match item {
            Item::Ack(ts) => {
                ack = Some(*ts);
                continue;
            }
            Item::Pass(pass) => pass,
        };
        let from = pass_start[pass_no];
        pass_no += 1;
        let prod = rebase(pass.prod);
        let new = shape.distance(prod, written).min(shape.entries());
        let in_new = |slot: u32| shape.distance(slot, written) < new;
        // The guest rewrote slots QEMU had stopped at: GuestFix, then its acknowledgement.
        let fix_ts = ack.unwrap_or(pass.ts).max(w.last_timestamp());
        for (o, &cmd) in pass.obs.iter().zip(&cmds_of[pass_no - 1]) {
            let slot = rebase(o.pos);
            if !in_new(slot) && content.get(&slot).is_some_and(|c| *c != cmd) {
                w.guest_fix(fix_ts, 0, slot, cmd)?;
                content.insert(slot, cmd);
                p.stats.fixes += 1;
            }
        }
        if ack.take().is_some() {
            w.guest_ack(fix_ts, 0)?;
        }
        if new > 0 {
            let ts = pass.ts.max(w.last_timestamp());
            let mut cmds = Vec::with_capacity(new as usize);
            for i in 0..new {
                let slot = shape.advance(written, i);
                let c = first_from(slot, from).unwrap_or_else(|| {
                    p.stats.unobserved += 1;
                    Command::CmdSync {
                        cs: 0,
                        msh: 0,
                        msiattr: 0,
                        msidata: 0,
                        msiaddr: 0,
                    }
                    .encode()
                });
                content.insert(slot, c);
                cmds.push(c);
            }
            w.commands(ts, 0, written, &cmds)?;
            w.doorbell(ts, 0, prod)?;
            written = prod;
        }
        if let Some((i, code)) = pass.error {
            if let Some(o) = pass.obs.get(i) {
                let e = CError::from_code(code)
                    .filter(|e| *e != CError::None)
                    .unwrap_or(CError::Ill);
                w.outcome(
                    pass.end_ts.max(w.last_timestamp()),
                    0,
                    rebase(o.pos),
                    Outcome::Refused(e),
                )?;
            }
        }
    }
    if let Some(ts) = ack {
        w.guest_ack(ts.max(w.last_timestamp()), 0)?;
    }
    let out = w.finish_counted()?;
    Ok((out, p.stats))
}
