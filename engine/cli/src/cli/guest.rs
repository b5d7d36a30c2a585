//! `vcmdq guest`: a guest driver in a process of its own. Opens a ring file (the path `vcmdq
//! serve` printed), submits a workload in batches each ended by a CMD_SYNC, waits for each
//! sync, handles errors as Linux does (a CERROR_ILL command is overwritten with a CMD_SYNC, the
//! error acknowledged; ABT and ATC_INV_SYNC are retried), and reports commands/s, syncs,
//! errors and the latency from doorbell to the sync count seen.

use super::CliError;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use vcmdq::command::{opcode, text, Command, RawCommand};
use vcmdq::mock::{Awaited, DriverError, FixPolicy, GuestDriver, Rng};
use vcmdq::queue::CError;
use vcmdq::ring::GuestRing;
use vcmdq::sync::Backoff;

/// What the guest sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// What a guest's DMA unmap costs: a TLBI_NH_VA over the range, then an ATC_INV of it for
    /// each device (--vsid).
    DmaUnmap,
    /// Device TLB (ATS) invalidations: ATC_INV of ranges and whole spaces on each device, an
    /// occasional CFGI_CD and TLBI_NH_ASID.
    Ats,
    /// Everything a guest can write: legal commands of every kind (traps, hints) mixed with
    /// ones the engine refuses (unknown vSIDs, RES0 bits, illegal opcodes, EL2 TLBIs, ...).
    Hostile,
}

/// Arguments of `vcmdq guest`.
#[derive(Args, Debug)]
#[command(after_help = "\
Exit status: 0 when every command was sent and every CMD_SYNC completed (refused commands \
count as errors seen, not failures); 2 when the ring cannot be used or a CMD_SYNC does not \
complete within --timeout.")]
pub struct GuestArgs {
    /// The ring file: the `/proc/<pid>/fd/<n>` path `vcmdq serve --create-ring` printed, or a
    /// ring file serve attached with --ring.
    path: PathBuf,
    /// What to send.
    #[arg(long, value_enum, default_value_t = Workload::DmaUnmap)]
    workload: Workload,
    /// Commands to send (the CMD_SYNCs that end batches not counted): 100000, 1e5, 100k.
    #[arg(long, default_value_t = 100_000, value_parser = super::units::count)]
    commands: u64,
    /// Commands per batch; each batch is ended by a CMD_SYNC (at most the ring's size less one).
    #[arg(long, default_value_t = 63, value_parser = clap::value_parser!(u64).range(1..))]
    batch: u64,
    /// vSIDs of the guest's devices for ATC_INV and CFGI_CD (repeatable) [default: 0x10].
    #[arg(long = "vsid", value_parser = parse_u32)]
    vsids: Vec<u32>,
    /// ASID of the workload's TLB invalidations.
    #[arg(long, default_value_t = 1, value_parser = parse_u16)]
    asid: u16,
    /// Seed of the workload's random addresses and choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long to wait for one CMD_SYNC before giving up: 500ms, 10s, 2m, or a bare number of
    /// seconds (above 0, at most 1e6 s).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_timeout,
          allow_negative_numbers = true)]
    timeout: f64,
    /// The report as one JSON object.
    #[arg(long)]
    json: bool,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let v = text::parse_u64(s)?;
    u32::try_from(v).map_err(|_| format!("{v:#x} does not fit 32 bits"))
}

/// The longest --timeout, in seconds.
const MAX_TIMEOUT_SECS: f64 = 1e6;

fn parse_timeout(s: &str) -> Result<f64, String> {
    match super::units::duration_secs(s)? {
        v if v <= MAX_TIMEOUT_SECS => Ok(v),
        _ => Err(format!(
            "a timeout must be at most {MAX_TIMEOUT_SECS:e} seconds"
        )),
    }
}

fn parse_u16(s: &str) -> Result<u16, String> {
    let v = text::parse_u64(s)?;
    u16::try_from(v).map_err(|_| format!("{v:#x} does not fit 16 bits"))
}

/// Why the guest gave up.
#[derive(Debug, thiserror::Error)]
enum GuestError {
    #[error("ring {path}: stopped at slot {slot:#x} with {cerror} before this guest started; another guest owns it")]
    Stopped {
        path: String,
        slot: u32,
        cerror: CError,
    },
    #[error("ring {path}: CONS {cons:#x} is not PROD {prod:#x}: another guest is using it")]
    Busy { path: String, cons: u32, prod: u32 },
    #[error(
        "ring {path}: the ring has {entries} slot(s); a batch and its CMD_SYNC need at least 2"
    )]
    TooSmall { path: String, entries: u32 },
    #[error("ring {path}: --batch {batch} does not fit: the ring has {entries} slots, so a batch \
and its CMD_SYNC take at most {entries} (--batch {max} at most)", max = entries - 1)]
    BatchTooLarge {
        path: String,
        batch: u64,
        entries: u32,
    },
    #[error(
        "CMD_SYNC {n} did not complete within {secs} s (is vcmdq serve running on this ring?)"
    )]
    Timeout { n: u64, secs: f64 },
    #[error("ring {path}: {source}")]
    Driver { path: String, source: DriverError },
}

impl GuestError {
    fn of(path: &str, e: DriverError, timeout: Duration) -> GuestError {
        let path = path.to_string();
        match e {
            DriverError::StoppedBefore { slot, cerror } => {
                GuestError::Stopped { path, slot, cerror }
            }
            DriverError::Busy { cons, prod } => GuestError::Busy { path, cons, prod },
            DriverError::Timeout {
                what: Awaited::Syncs { want, .. },
                ..
            } => GuestError::Timeout {
                n: want,
                secs: timeout.as_secs_f64(),
            },
            source => GuestError::Driver { path, source },
        }
    }
}

/// Generates the commands of a workload.
struct Generator {
    workload: Workload,
    rng: Rng,
    vsids: Vec<u32>,
    asid: u16,
    /// Commands still owed by the current unmap (its ATC_INVs).
    pending: Vec<RawCommand>,
}

impl Generator {
    fn vsid(&mut self) -> u32 {
        *self.rng.pick(&self.vsids)
    }

    /// A 4 KiB-page range: its first address, and NUM/SCALE/ATC SIZE covering `pages`.
    fn range(&mut self) -> (u64, u8) {
        let log2_pages = self.rng.below(6) as u8;
        let addr = (self.rng.below(1 << 24) << 21) & ((1 << 48) - 1);
        (addr, log2_pages)
    }

    fn next(&mut self) -> RawCommand {
        if let Some(c) = self.pending.pop() {
            return c;
        }
        match self.workload {
            Workload::DmaUnmap => self.dma_unmap(),
            Workload::Ats => self.ats(),
            Workload::Hostile => self.hostile(),
        }
    }

    fn dma_unmap(&mut self) -> RawCommand {
        let (addr, log2_pages) = self.range();
        for i in 0..self.vsids.len() {
            let sid = self.vsids[i];
            self.pending.push(
                Command::AtcInv {
                    sid,
                    ssv: false,
                    ssid: 0,
                    global: false,
                    addr,
                    size: log2_pages,
                }
                .encode(),
            );
        }
        // TLBI range: 2^log2_pages pages as NUM+1 = 2^log2_pages with SCALE 0 (NUM < 32).
        let pages = 1u8 << log2_pages;
        Command::TlbiNhVa {
            vmid: 0,
            asid: self.asid,
            addr,
            tg: 1,
            num: pages - 1,
            scale: 0,
            ttl: 3,
            leaf: true,
        }
        .encode()
    }

    fn ats(&mut self) -> RawCommand {
        let sid = self.vsid();
        match self.rng.below(10) {
            0 => Command::CfgiCd {
                ssec: false,
                ssid: 0,
                sid,
                leaf: true,
            }
            .encode(),
            1 => Command::TlbiNhAsid {
                vmid: 0,
                asid: self.asid,
            }
            .encode(),
            2 => Command::AtcInv {
                sid,
                ssv: false,
                ssid: 0,
                global: false,
                addr: 0,
                size: 52,
            }
            .encode(),
            _ => {
                let (addr, size) = self.range();
                Command::AtcInv {
                    sid,
                    ssv: false,
                    ssid: 0,
                    global: false,
                    addr,
                    size,
                }
                .encode()
            }
        }
    }

    fn hostile(&mut self) -> RawCommand {
        let sid = self.vsid();
        match self.rng.below(20) {
            0 => Command::AtcInv {
                sid: 0xdead,
                ssv: false,
                ssid: 0,
                global: false,
                addr: 0,
                size: 52,
            }
            .encode(),
            1 => Command::TlbiEl2All {}.encode(),
            2 => RawCommand::new(u64::from(opcode::TLBI_NH_ASID) | (1 << 9), 0),
            3 => RawCommand::new(0x42 | (self.rng.next_u64() & !0xff), self.rng.next_u64()),
            4 => Command::CfgiCd {
                ssec: true,
                ssid: 0,
                sid,
                leaf: false,
            }
            .encode(),
            5 => Command::CmdSync {
                cs: 3,
                msh: 0,
                msiattr: 0,
                msidata: 0,
                msiaddr: 0,
            }
            .encode(),
            6 => Command::CfgiSte {
                ssec: false,
                sid,
                leaf: true,
            }
            .encode(),
            7 => Command::PrefetchConfig {
                ssv: false,
                ssid: 0,
                sid,
            }
            .encode(),
            8 => Command::TlbiNsnhAll {}.encode(),
            9 => Command::TlbiNhAll { vmid: 0x7777 }.encode(),
            10..=14 => self.dma_unmap(),
            _ => self.ats(),
        }
    }
}

/// What the guest did.
struct Report {
    commands: u64,
    entries: u64,
    batches: u64,
    syncs: u64,
    errors: [u64; 8],
    secs: f64,
    latency: Histogram<u64>,
}

impl Report {
    fn errors(&self) -> u64 {
        self.errors.iter().sum()
    }

    fn json(&self) -> serde_json::Value {
        let q = |p: f64| self.latency.value_at_quantile(p);
        serde_json::json!({
            "commands": self.commands,
            "entries": self.entries,
            "batches": self.batches,
            "syncs": self.syncs,
            "errors": self.errors(),
            "errors_by_kind": {
                "ill": self.errors[CError::Ill.code() as usize],
                "abt": self.errors[CError::Abt.code() as usize],
                "atc_inv_sync": self.errors[CError::AtcInvSync.code() as usize],
                "ill_access": self.errors[CError::IllAccess.code() as usize],
            },
            "seconds": self.secs,
            "commands_per_sec": if self.secs > 0.0 { self.commands as f64 / self.secs } else { 0.0 },
            "sync_latency_ns": {
                "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999),
                "max": self.latency.max(),
            },
        })
    }

    fn text(&self) -> String {
        let us = |p: f64| self.latency.value_at_quantile(p) as f64 / 1e3;
        let rate = if self.secs > 0.0 {
            self.commands as f64 / self.secs
        } else {
            0.0
        };
        format!(
            "guest: {} commands in {} batches ({} ring entries), {:.3} s: {:.0} commands/s\n\
             guest: {} CMD_SYNCs completed, {} errors seen (ill {}, abt {}, atc_inv_sync {}, ill_access {})\n\
             guest: sync latency, doorbell to sync count: p50 {:.1} us, p90 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us\n",
            self.commands,
            self.batches,
            self.entries,
            self.secs,
            rate,
            self.syncs,
            self.errors(),
            self.errors[CError::Ill.code() as usize],
            self.errors[CError::Abt.code() as usize],
            self.errors[CError::AtcInvSync.code() as usize],
            self.errors[CError::IllAccess.code() as usize],
            us(0.5),
            us(0.9),
            us(0.99),
            us(0.999),
            self.latency.max() as f64 / 1e3,
        )
    }
}

/// Runs `vcmdq guest`.
pub fn run(args: GuestArgs) -> Result<ExitCode, CliError> {
    let ring = GuestRing::open(&args.path)?;
    let path = args.path.display().to_string();
    let entries = ring.shape().entries();
    let timeout = Duration::from_secs_f64(args.timeout);
    let fail = |e| GuestError::of(&path, e, timeout);
    // Linux's way with errors; spin a while before yielding, as a guest on a core of its own.
    let mut drv = GuestDriver::new(ring, FixPolicy::LikeLinux)
        .map_err(fail)?
        .with_timeout(timeout)
        .with_backoff(Backoff {
            spins: 1024,
            ..Backoff::SPIN_THEN_YIELD
        });
    if entries < 2 {
        return Err(GuestError::TooSmall { path, entries }.into());
    }
    if args.batch > u64::from(entries) - 1 {
        return Err(GuestError::BatchTooLarge {
            path,
            batch: args.batch,
            entries,
        }
        .into());
    }
    let batch = args.batch as usize;
    let mut gen = Generator {
        workload: args.workload,
        rng: Rng::new(args.seed),
        vsids: if args.vsids.is_empty() {
            vec![0x10]
        } else {
            args.vsids.clone()
        },
        asid: args.asid,
        pending: Vec::new(),
    };
    let mut latency = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)?;
    let mut sent = 0u64;
    let mut batches = 0u64;
    let mut cmds: Vec<RawCommand> = Vec::with_capacity(batch + 1);
    let start = Instant::now();
    while sent < args.commands {
        let n = (args.commands - sent).min(batch as u64) as usize;
        cmds.clear();
        cmds.extend((0..n).map(|_| gen.next()));
        batches += 1;
        cmds.push(
            Command::CmdSync {
                cs: 1,
                msh: 0,
                msiattr: 0,
                msidata: batches as u32,
                msiaddr: 0,
            }
            .encode(),
        );
        // The previous batch completed, so the whole ring is free: post rings the doorbell at once.
        drv.post(&cmds).map_err(fail)?;
        let t0 = Instant::now();
        drv.complete().map_err(fail)?;
        latency.saturating_record(t0.elapsed().as_nanos() as u64);
        sent += n as u64;
    }
    let counters = drv.counters();
    let report = Report {
        commands: sent,
        entries: counters.submitted,
        batches,
        syncs: counters.completed,
        errors: counters.errors,
        secs: start.elapsed().as_secs_f64(),
        latency,
    };
    let mut out = super::out::stdout();
    if args.json {
        writeln!(out, "{}", report.json())?;
    } else {
        write!(out, "{}", report.text())?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vcmdq::command::decode;

    fn generator(workload: Workload) -> Generator {
        Generator {
            workload,
            rng: Rng::new(3),
            vsids: vec![0x10, 0x11],
            asid: 9,
            pending: Vec::new(),
        }
    }

    #[test]
    fn the_text_report_counts_ill_access_errors_as_the_json_does() {
        let mut errors = [0u64; 8];
        errors[CError::IllAccess.code() as usize] = 3;
        let r = Report {
            commands: 10,
            entries: 12,
            batches: 2,
            syncs: 2,
            errors,
            secs: 1.0,
            latency: Histogram::new_with_bounds(1, 1_000_000, 3).expect("valid bounds"),
        };
        let text = r.text();
        assert!(
            text.contains("3 errors seen (ill 0, abt 0, atc_inv_sync 0, ill_access 3)"),
            "{text}"
        );
        assert_eq!(r.json()["errors_by_kind"]["ill_access"], 3);
    }

    #[test]
    fn dma_unmap_and_ats_send_only_legal_commands_on_the_given_vsids() {
        for w in [Workload::DmaUnmap, Workload::Ats] {
            let mut g = generator(w);
            for _ in 0..2000 {
                let c = g.next();
                let d = decode(c).unwrap_or_else(|e| panic!("{w:?}: {c:?}: {e}"));
                match d {
                    Command::AtcInv { sid, .. } | Command::CfgiCd { sid, .. } => {
                        assert!(sid == 0x10 || sid == 0x11)
                    }
                    Command::TlbiNhVa { asid, .. } | Command::TlbiNhAsid { asid, .. } => {
                        assert_eq!(asid, 9)
                    }
                    other => panic!("{w:?} sent {other:?}"),
                }
            }
        }
        // An unmap is one TLBI and one ATC_INV per device, of the same range.
        let mut g = generator(Workload::DmaUnmap);
        let (a, b, c) = (g.next(), g.next(), g.next());
        assert_eq!(a.opcode(), opcode::TLBI_NH_VA);
        assert_eq!([b.opcode(), c.opcode()], [opcode::ATC_INV; 2]);
        assert_eq!(a.d1() >> 12, b.d1() >> 12);
    }

    #[test]
    fn hostile_sends_illegal_and_legal_commands() {
        let mut g = generator(Workload::Hostile);
        let cmds: Vec<RawCommand> = (0..2000).map(|_| g.next()).collect();
        let illegal = cmds.iter().filter(|c| decode(**c).is_err()).count();
        assert!(illegal > 50 && illegal < 500, "{illegal}");
        assert!(cmds.iter().any(|c| c.opcode() == opcode::CFGI_STE));
        assert!(cmds.iter().any(|c| c.opcode() == opcode::TLBI_EL2_ALL));
    }
}
