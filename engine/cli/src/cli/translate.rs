//! `vcmdq translate`: runs guest commands through one vIOMMU's translation policy and says what
//! became of each, for people debugging a guest.

use super::decode::{hex_words, strip_comment, HexWordError};
use super::input::{read_small_file, Lines};
use super::{out, CliError};
use clap::Args;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use vcmdq::command::{text, RawCommand};
use vcmdq::translate::{translate_all, SlotOutcome};
use vcmdq::viommu::{
    DeviceId, Devices, GraceDomain, Profile, SmmuFeatures, Viommu, ViommuConfig, ViommuError,
};

/// The physical SMMU of the vIOMMU and of the devices the bindings create.
const SMMU: u32 = 0;

/// Arguments of `vcmdq translate`.
#[derive(Args, Debug)]
#[command(after_help = "\
Input: one command per line, either `d0 d1` (two hex words, as `vcmdq decode` takes them) or the \
text form (`TLBI_NH_VA vmid=3 asid=7 addr=0x8000_0000 tg=4k`, `RAW <d0> <d1>`). Blank lines and \
`#` comments are skipped.

Output: one line per command. With --json, one object per line: slot, line, outcome \
(forwarded, sync, dropped, trapped, refused, not_reached), cerror and reason when refused, \
reason when dropped or trapped, out ([d0, d1] hex) when forwarded, cs/msidata/msiaddr for a sync.

Exit status: 0 when no command was refused, 1 when any was (every line is still printed), 2 on \
a usage error or an input that could not be read.

Example:
  echo 'ATC_INV sid=0x10 size=52' | vcmdq translate --vmid 5 --bind vsid=0x10,psid=0x800 --json")]
pub struct TranslateArgs {
    /// The VM's VMID on the physical SMMU.
    #[arg(long, value_parser = parse_u16)]
    vmid: u16,
    /// The policy profile: kernel or tegra241.
    #[arg(long, default_value_t = Profile::Kernel)]
    profile: Profile,
    /// vSID bits (SMMU_IDR1.SIDSIZE of the guest's SMMU), 1 to 32.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(1..=32))]
    sidsize: u8,
    /// The physical SMMU has no range invalidation: refuse TG/TTL/NUM/SCALE in guest TLBIs
    /// (whatever --smmu says).
    #[arg(long)]
    no_range: bool,
    /// The physical SMMU's features, a preset: any (everything), smmuv3.2, mmu-600 (no range
    /// invalidation), qemu (QEMU's emulated SMMUv3: no ATS, no substreams).
    #[arg(long, value_name = "PRESET", default_value = "any", value_parser = parse_smmu)]
    smmu: SmmuFeatures,
    /// tegra241: the VINTF's SID slots, so the --bind a VINTF takes at most.
    #[arg(long, value_name = "N", default_value_t = vcmdq::viommu::DEFAULT_TEGRA241_SID_SLOTS,
        value_parser = clap::value_parser!(u32).range(1..))]
    sid_slots: u32,
    /// A binding `vsid=0x10,psid=0x800` (repeatable).
    #[arg(long = "bind", value_name = "vsid=V,psid=P", value_parser = parse_binding)]
    binds: Vec<Binding>,
    /// A file of bindings, one `vsid=V,psid=P` per line.
    #[arg(long = "bindings", value_name = "FILE")]
    bindings_file: Option<PathBuf>,
    /// Go on after a refused command instead of stopping the queue there.
    #[arg(long = "continue")]
    keep_going: bool,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// The commands; standard input when absent or `-`.
    input: Option<PathBuf>,
}

/// One vSID -> pSID binding from the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Binding {
    vsid: u32,
    psid: u32,
}

/// A malformed binding or input line.
#[derive(Debug, thiserror::Error)]
enum InputError {
    #[error("binding {0:?}: expected vsid=V,psid=P")]
    BindingShape(String),
    #[error("binding {text:?}: {field}: {why}")]
    BindingValue {
        text: String,
        field: &'static str,
        why: String,
    },
    #[error("{path}:{line}: {why}")]
    BindingsFile {
        path: String,
        line: usize,
        why: String,
    },
    #[error("line {line}: {why}")]
    Command { line: usize, why: String },
}

fn parse_u16(s: &str) -> Result<u16, String> {
    let v = text::parse_u64(s)?;
    u16::try_from(v).map_err(|_| format!("{v} does not fit 16 bits"))
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let v = text::parse_u64(s)?;
    u32::try_from(v).map_err(|_| format!("{v:#x} does not fit 32 bits"))
}

fn parse_binding(s: &str) -> Result<Binding, InputError> {
    let (mut vsid, mut psid) = (None, None);
    for part in s.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or_else(|| InputError::BindingShape(s.to_string()))?;
        let (slot, field) = match k.trim().to_ascii_lowercase().as_str() {
            "vsid" => (&mut vsid, "vsid"),
            "psid" => (&mut psid, "psid"),
            _ => return Err(InputError::BindingShape(s.to_string())),
        };
        if slot.is_some() {
            return Err(InputError::BindingShape(s.to_string()));
        }
        *slot = Some(parse_u32(v.trim()).map_err(|why| InputError::BindingValue {
            text: s.to_string(),
            field,
            why,
        })?);
    }
    match (vsid, psid) {
        (Some(vsid), Some(psid)) => Ok(Binding { vsid, psid }),
        _ => Err(InputError::BindingShape(s.to_string())),
    }
}

/// The bindings of a file, each with where it came from (`FILE:LINE`).
fn read_bindings_file(path: &Path) -> Result<Vec<(Binding, String)>, CliError> {
    let lines =
        read_small_file(path).map_err(|e| format!("bindings file {}: {e}", path.display()))?;
    let mut v = Vec::new();
    for (n, line) in lines {
        let line = strip_comment(&line).trim();
        if line.is_empty() {
            continue;
        }
        let b = parse_binding(line).map_err(|e| InputError::BindingsFile {
            path: path.display().to_string(),
            line: n as usize,
            why: e.to_string(),
        })?;
        v.push((b, format!("{}:{n} ({line})", path.display())));
    }
    Ok(v)
}

/// Why a binding could not be made, in the terms of the bindings the user gave: the vIOMMU
/// and the devices are this command's own, named nowhere on its command line.
fn binding_error(e: &ViommuError, here: &str, binds: &[(Binding, String)], sidsize: u8) -> String {
    let origin = |d: &DeviceId| {
        binds
            .get(d.0 as usize)
            .map_or_else(|| "an earlier binding".to_string(), |(_, o)| o.clone())
    };
    let why = match e {
        ViommuError::VsidTaken { vsid, device, .. } => {
            format!("vSID {vsid:#x} is already bound by {}", origin(device))
        }
        ViommuError::PsidTaken { psid, device, .. } => {
            format!("pSID {psid:#x} is already bound by {}", origin(device))
        }
        ViommuError::VsidTooLarge { vsid, .. } => {
            format!("vSID {vsid:#x} does not fit --sidsize {sidsize} (vSIDs below 2^{sidsize})")
        }
        other => return format!("{here}: {other}"),
    };
    format!("{here}: {}: {why}", e.errno())
}

/// One input line: `d0 d1` in hex, or the text form.
fn parse_command(line: &str) -> Result<RawCommand, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    if let [d0, d1] = words[..] {
        match hex_words(d0, d1) {
            Ok(raw) => return Ok(raw),
            // Hex digits too many for a word: a mistyped pair, which the text form would only
            // call an unknown command.
            Err((which, e @ HexWordError::TooWide(_))) => return Err(format!("{which}: {e}")),
            Err((_, HexWordError::NotHex(_))) => {}
        }
    }
    text::parse(line).map_err(|e| e.to_string())
}

/// The most commands one `vcmdq translate` takes: they are translated as one queue, so all are
/// held at once.
pub const MAX_COMMANDS: usize = 1 << 20;

/// The commands of the input with their 1-based line numbers.
fn read_commands(input: Option<&PathBuf>) -> Result<Vec<(usize, RawCommand)>, CliError> {
    let (name, reader): (String, Box<dyn BufRead>) = match input {
        Some(p) if p.as_os_str() != "-" => (
            p.display().to_string(),
            Box::new(std::io::BufReader::new(
                std::fs::File::open(p).map_err(|e| format!("cannot open {}: {e}", p.display()))?,
            )),
        ),
        _ => ("standard input".into(), Box::new(std::io::stdin().lock())),
    };
    let mut lines = Lines::new(reader);
    let mut cmds = Vec::new();
    while let Some(line) = lines.next_str() {
        let (n, line) = line.map_err(|e| format!("{name}: {e}"))?;
        let n = n as usize;
        let body = strip_comment(line).trim();
        if body.is_empty() {
            continue;
        }
        if cmds.len() == MAX_COMMANDS {
            return Err(format!(
                "{name}: line {n}: more than {MAX_COMMANDS} commands (MAX_COMMANDS), the most one \
                 translate takes; split the input"
            )
            .into());
        }
        let cmd = parse_command(body).map_err(|why| InputError::Command { line: n, why })?;
        cmds.push((n, cmd));
    }
    Ok(cmds)
}

fn hex(v: u64) -> String {
    format!("{v:#018x}")
}

/// What happened to a dropped or trapped command, in words.
fn rule_reason(o: &SlotOutcome, cmd: &RawCommand) -> Option<String> {
    let name = vcmdq::command::opcode_name(cmd.opcode()).unwrap_or("?");
    match o {
        SlotOutcome::Dropped => Some(format!("{name} is a hint: dropped")),
        SlotOutcome::Trapped(_) => Some(format!("{name} is handed to the control plane")),
        _ => None,
    }
}

fn json_line(slot: usize, line: usize, cmd: &RawCommand, o: &SlotOutcome) -> serde_json::Value {
    use serde_json::json;
    let mut v = json!({ "slot": slot, "line": line });
    let m = v.as_object_mut().expect("a JSON object");
    let outcome = match o {
        SlotOutcome::Forwarded(c) => {
            m.insert("out".into(), json!([hex(c.d0()), hex(c.d1())]));
            "forwarded"
        }
        SlotOutcome::Sync {
            cs,
            msidata,
            msiaddr,
        } => {
            m.insert("cs".into(), json!(cs));
            m.insert("msidata".into(), json!(format!("{msidata:#x}")));
            m.insert("msiaddr".into(), json!(format!("{msiaddr:#x}")));
            "sync"
        }
        SlotOutcome::Dropped => "dropped",
        SlotOutcome::Trapped(_) => "trapped",
        SlotOutcome::Refused { cerror, reason } => {
            m.insert("cerror".into(), json!(cerror.name()));
            m.insert("reason".into(), json!(reason.to_string()));
            "refused"
        }
        SlotOutcome::NotReached => "not_reached",
    };
    if let Some(r) = rule_reason(o, cmd) {
        m.insert("reason".into(), json!(r));
    }
    m.insert("outcome".into(), json!(outcome));
    v
}

fn text_line(slot: usize, cmd: &RawCommand, o: &SlotOutcome) -> String {
    let what = match o {
        SlotOutcome::Forwarded(c) => format!(
            "forwarded    {}  ({} {})",
            text::format_raw(c),
            hex(c.d0()),
            hex(c.d1())
        ),
        SlotOutcome::Sync {
            cs,
            msidata,
            msiaddr,
        } => format!(
            "sync         completion point: cs={cs} msidata={msidata:#x} msiaddr={msiaddr:#x} (guest address, never forwarded)"
        ),
        SlotOutcome::Dropped | SlotOutcome::Trapped(_) => format!(
            "{:<12} {}",
            if matches!(o, SlotOutcome::Dropped) {
                "dropped"
            } else {
                "trapped"
            },
            rule_reason(o, cmd).unwrap_or_default()
        ),
        SlotOutcome::Refused { cerror, reason } => format!("refused      {cerror}: {reason}"),
        SlotOutcome::NotReached => "not reached  (the queue stopped at the refused command)".into(),
    };
    format!("slot {slot:>4}: {what}")
}

fn parse_smmu(s: &str) -> Result<SmmuFeatures, String> {
    SmmuFeatures::preset(s).map_err(|e| e.to_string())
}

/// Runs `vcmdq translate`.
pub fn run(args: TranslateArgs) -> Result<ExitCode, CliError> {
    let mut cfg = ViommuConfig {
        profile: args.profile,
        sidsize: args.sidsize,
        tegra241_sid_slots: args.sid_slots,
        ..ViommuConfig::new(1, args.vmid, SMMU)
    }
    .with_smmu(args.smmu);
    if args.no_range {
        cfg.range_inv = false;
    }
    let devices = Devices::new();
    let viommu = Viommu::new(cfg, Arc::clone(&devices), GraceDomain::new())?;
    let mut binds: Vec<(Binding, String)> = args
        .binds
        .iter()
        .map(|b| (*b, format!("--bind vsid={:#x},psid={:#x}", b.vsid, b.psid)))
        .collect();
    if let Some(p) = &args.bindings_file {
        binds.extend(read_bindings_file(p)?);
    }
    for (i, (b, here)) in binds.iter().enumerate() {
        let dev = DeviceId(i as u32);
        devices
            .add_device(dev, SMMU, b.psid)
            .and_then(|()| viommu.set_dev_id(dev, b.vsid))
            .map_err(|e| binding_error(&e, here, &binds, args.sidsize))?;
    }

    let cmds = read_commands(args.input.as_ref())?;
    let input: Vec<RawCommand> = cmds.iter().map(|&(_, c)| c).collect();
    let outcomes = translate_all(&viommu, &input, args.keep_going);

    // A refused command is what a guest driver must fix: say so in the status, as decode does
    // for a line it could not read.
    let refused = outcomes
        .iter()
        .any(|o| matches!(o, SlotOutcome::Refused { .. }));
    let status = ExitCode::from(u8::from(refused));
    let mut out = std::io::BufWriter::new(out::stdout());
    let written = (|| -> std::io::Result<()> {
        for (slot, ((line, cmd), o)) in cmds.iter().zip(&outcomes).enumerate() {
            if args.json {
                writeln!(out, "{}", json_line(slot, *line, cmd, o))?;
            } else {
                writeln!(out, "{}", text_line(slot, cmd, o))?;
            }
        }
        out.flush()
    })();
    match written {
        Ok(()) => Ok(status),
        // The reader went away: the status is still the one the commands earned.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(status),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_parse_in_any_order() {
        assert_eq!(
            parse_binding("vsid=0x10,psid=0x800").unwrap(),
            Binding {
                vsid: 0x10,
                psid: 0x800
            }
        );
        assert_eq!(
            parse_binding(" psid=2048 , vsid=16 ").unwrap(),
            Binding {
                vsid: 16,
                psid: 2048
            }
        );
        for bad in [
            "vsid=1",
            "vsid=1,psid=2,vsid=3",
            "vsid=1;psid=2",
            "sid=1,psid=2",
            "vsid=0x1_0000_0000,psid=1",
            "vsid=x,psid=1",
        ] {
            assert!(parse_binding(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lines_are_hex_pairs_or_text() {
        assert_eq!(
            parse_command("0x12 0x1000").unwrap(),
            RawCommand::new(0x12, 0x1000)
        );
        assert_eq!(parse_command("46 0").unwrap(), RawCommand::new(0x46, 0));
        assert_eq!(
            parse_command("TLBI_NH_ALL vmid=3").unwrap(),
            RawCommand::new(0x10 | 3 << 32, 0)
        );
        assert_eq!(
            parse_command("RAW 0x47 0x0").unwrap(),
            RawCommand::new(0x47, 0)
        );
        assert!(parse_command("0x12").is_err());
        assert!(parse_command("0x1_0000_0000_0000_0000 0").is_err());
        assert!(parse_command("TLBI_NH_ALL bogus=1").is_err());
    }

    #[test]
    fn a_pair_too_wide_is_a_hex_error_and_a_non_hex_pair_is_the_text_form() {
        assert_eq!(
            parse_command("0 0x1_0000_0000_0000_0000").unwrap_err(),
            "d1: \"0x1_0000_0000_0000_0000\" does not fit 64 bits"
        );
        // Same words as decode reads them: `0X`, `_` anywhere.
        assert_eq!(
            parse_command("0X4_6 0_0").unwrap(),
            RawCommand::new(0x46, 0)
        );
        assert!(parse_command("zz 0")
            .unwrap_err()
            .starts_with("unknown command \"zz\""));
    }
}
