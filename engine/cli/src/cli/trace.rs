//! `vcmdq trace`: look into trace files and make them: `dump` (binary to text), `build` (text
//! to binary), `info` (check and count), `import-qemu` (a QEMU `smmuv3_*` log to a trace).
//!
//! Exit status: 0 success; 1 the trace (or text, or log) is malformed or refers to things that
//! do not exist, reported with the byte offset or line; 2 a file could not be read or written,
//! or a usage error.

use super::CliError;
use clap::{Args, Subcommand};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use vcmdq_trace::{
    qemu, text, validate_with, Limits, TraceError, TraceFile, DEFAULT_MAX_RING_MEMORY,
};

/// Arguments of `vcmdq trace`.
#[derive(Args, Debug)]
pub struct TraceArgs {
    #[command(subcommand)]
    cmd: TraceCmd,
}

#[derive(Subcommand, Debug)]
enum TraceCmd {
    /// Print a trace in its text form, one event a line (commands in the codec's text form).
    Dump {
        /// The trace file.
        file: PathBuf,
        /// Bytes of guest ring slots the trace may declare in all.
        #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_RING_MEMORY,
          value_parser = super::units::bytes)]
        max_ring_memory: u64,
    },
    /// Build a trace from its text form (what `dump` prints, or written by hand).
    Build {
        /// The text file; `-` or none: standard input.
        text: Option<PathBuf>,
        /// The trace file to write; `-`: standard output [default: `-` when standard output is
        /// not a terminal].
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Bytes of guest ring slots the trace may declare in all.
        #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_RING_MEMORY,
          value_parser = super::units::bytes)]
        max_ring_memory: u64,
        /// Bytes of text read at most.
        #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_TEXT_BYTES)]
        max_text_bytes: u64,
    },
    /// Check a trace (format, references, what the control plane accepts, acks and fixes only
    /// on stopped rings: what replay checks first) and print what it holds.
    Info {
        /// The trace file.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Bytes of guest ring slots the trace may declare in all.
        #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_RING_MEMORY,
          value_parser = super::units::bytes)]
        max_ring_memory: u64,
    },
    /// Import a QEMU log taken with `-trace 'smmuv3_*'` (see traces/FORMAT.md for what is
    /// reconstructed and what is approximated).
    ImportQemu {
        /// The QEMU log; `-`: standard input.
        log: PathBuf,
        /// The trace file to write; `-`: standard output [default: `-` when standard output is
        /// not a terminal].
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Print what the import made of the log (counts, skipped lines, approximations) as
        /// JSON on standard output.
        #[arg(long)]
        json: bool,
        /// Slots written but never consumed that one pass may fill with CMD_SYNC.
        #[arg(long, value_name = "N", default_value_t = qemu::DEFAULT_MAX_FILLER_PER_PASS)]
        max_filler_per_pass: u64,
        /// Slots written but never consumed that the whole import may fill with CMD_SYNC.
        #[arg(long, value_name = "N", default_value_t = qemu::DEFAULT_MAX_FILLER)]
        max_filler: u64,
        /// Commands and acknowledgements the log may hold.
        #[arg(long, value_name = "N", default_value_t = qemu::DEFAULT_MAX_IMPORT_COMMANDS)]
        max_commands: u64,
        /// Distinct StreamIDs the log may show (each becomes a bound device).
        #[arg(long, value_name = "N", default_value_t = qemu::DEFAULT_MAX_SIDS)]
        max_sids: u64,
    },
}

/// Runs `vcmdq trace`.
pub fn run(args: TraceArgs) -> Result<ExitCode, CliError> {
    match args.cmd {
        TraceCmd::Dump {
            file,
            max_ring_memory,
        } => dump(&file, &limits(max_ring_memory)),
        TraceCmd::Build {
            text,
            output,
            max_ring_memory,
            max_text_bytes,
        } => build(
            text.as_deref(),
            &output_or_stdout(output, false)?,
            &limits(max_ring_memory),
            max_text_bytes,
        ),
        TraceCmd::Info {
            file,
            json,
            max_ring_memory,
        } => info(&file, json, &limits(max_ring_memory)),
        TraceCmd::ImportQemu {
            log,
            output,
            json,
            max_filler_per_pass,
            max_filler,
            max_commands,
            max_sids,
        } => import(
            &log,
            &output_or_stdout(output, json)?,
            json,
            &qemu::ImportLimits {
                max_filler_per_pass,
                max_filler,
                max_commands,
                max_sids,
            },
        ),
    }
}

fn limits(max_ring_memory: u64) -> Limits {
    Limits { max_ring_memory }
}

/// A trace error: content problems exit 1, I/O exits 2.
fn trace_failure(e: TraceError) -> Result<ExitCode, CliError> {
    match e {
        TraceError::Io { .. } => Err(e.into()),
        _ => {
            eprintln!("vcmdq: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

fn dump(file: &Path, limits: &Limits) -> Result<ExitCode, CliError> {
    let f = match TraceFile::open(file) {
        Ok(f) => f,
        Err(e) => return trace_failure(e),
    };
    let trace = match f.trace() {
        Ok(t) => t,
        Err(e) => return trace_failure(e),
    };
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let r =
        text::dump_with(&trace, &mut out, limits).and_then(|()| out.flush().map_err(Into::into));
    match r {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // `vcmdq trace dump x | head` is not an error.
        Err(text::DumpError::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
            Ok(ExitCode::SUCCESS)
        }
        Err(text::DumpError::Io(e)) => Err(e.into()),
        Err(text::DumpError::Trace(e)) => trace_failure(e),
    }
}

/// Default of `trace build --max-text-bytes`.
const DEFAULT_MAX_TEXT_BYTES: u64 = 256 << 20;

/// Reads the whole text, refusing more than `limit` bytes (endless input such as /dev/zero
/// would otherwise grow until the allocation aborts).
fn read_input(path: Option<&Path>, limit: u64) -> Result<String, CliError> {
    let mut s = String::new();
    let name = path.map_or("<stdin>".to_string(), |p| p.display().to_string());
    let read = |r: &mut dyn Read, s: &mut String| r.take(limit.saturating_add(1)).read_to_string(s);
    match path {
        None => read(&mut io::stdin(), &mut s)?,
        Some(p) if p == Path::new("-") => read(&mut io::stdin(), &mut s)?,
        Some(p) => File::open(p)
            .and_then(|mut f| read(&mut f, &mut s))
            .map_err(|e| format!("{}: {e}", p.display()))?,
    };
    if s.len() as u64 > limit {
        return Err(format!(
            "{name}: more than {limit} bytes of text, the limit (raise it with --max-text-bytes BYTES)"
        )
        .into());
    }
    Ok(s)
}

/// The trace file a command writes: `-o FILE`, `-o -` (standard output), or without `-o`,
/// standard output when it is not a terminal. `json`: the command also prints JSON there, so a
/// trace cannot go there too.
pub(super) fn output_or_stdout(output: Option<PathBuf>, json: bool) -> Result<PathBuf, CliError> {
    use std::io::IsTerminal;
    let out = match output {
        Some(p) => p,
        None if !io::stdout().is_terminal() => PathBuf::from("-"),
        None => return Err(
            "give -o FILE for the trace (or -o - for standard output, which is a terminal here)"
                .into(),
        ),
    };
    if json && out == Path::new("-") {
        return Err(
            "--json prints on standard output, where the trace would go: give -o FILE with --json"
                .into(),
        );
    }
    Ok(out)
}

/// Writes `output` through a temporary file beside it, renamed into place only when `f`
/// succeeds, so a failure never leaves half a trace (or clobbers a trace being read). `-` is
/// standard output: the trace is made in an unlinked temporary file (its writer seeks back to
/// patch counts, which a pipe cannot) and copied out once `f` succeeds. The outer error is I/O
/// on the files; the inner one is `f`'s.
pub(super) fn write_atomically<T, E>(
    output: &Path,
    f: impl FnOnce(BufWriter<File>) -> Result<T, E>,
) -> Result<Result<T, E>, CliError> {
    if output == Path::new("-") {
        use std::io::Seek;
        let tmp = std::env::temp_dir().join(format!("vcmdq-{}-stdout.vct.tmp", std::process::id()));
        let mut file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        // Unlinked at once: the file goes with the process, whatever happens next.
        let _ = std::fs::remove_file(&tmp);
        let writer = file
            .try_clone()
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        let r = f(BufWriter::new(writer));
        if r.is_ok() {
            file.seek(io::SeekFrom::Start(0))?;
            let mut out = super::out::stdout();
            io::copy(&mut file, &mut out)?;
            out.flush()?;
        }
        return Ok(r);
    }
    let mut tmp = output.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let file = File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let r = f(BufWriter::new(file));
    if r.is_ok() {
        std::fs::rename(&tmp, output).map_err(|e| format!("{}: {e}", output.display()))?;
    } else {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(r)
}

fn build(
    input: Option<&Path>,
    output: &Path,
    limits: &Limits,
    max_text_bytes: u64,
) -> Result<ExitCode, CliError> {
    let src = read_input(input, max_text_bytes)?;
    let name = input.map_or("<stdin>".to_string(), |p| p.display().to_string());
    let r = write_atomically(output, |w| {
        let mut w = text::build_with(&src, w, limits).map_err(|e| e.to_string())?;
        w.flush().map_err(|e| format!("{}: {e}", output.display()))
    })?;
    match r {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("vcmdq: {name}: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

fn info(file: &Path, json: bool, limits: &Limits) -> Result<ExitCode, CliError> {
    let f = match TraceFile::open(file) {
        Ok(f) => f,
        Err(e) => return trace_failure(e),
    };
    let summary = match f.trace().and_then(|t| {
        let meta = t.meta();
        validate_with(&t, limits).map(|s| (meta, s))
    }) {
        Ok(s) => s,
        Err(e) => return trace_failure(e),
    };
    let (meta, s) = summary;
    if json {
        let mut v = s.to_json();
        v["file"] = file.display().to_string().into();
        v["synthetic"] = (meta.flags & vcmdq_trace::format::FLAG_SYNTHETIC != 0).into();
        v["imported"] = (meta.flags & vcmdq_trace::format::FLAG_IMPORTED != 0).into();
        v["guest_waits_sync"] =
            (meta.flags & vcmdq_trace::format::FLAG_GUEST_WAITS_SYNC != 0).into();
        v["created_unix_ns"] = meta.created_unix_ns.into();
        println!("{v}");
    } else {
        println!("{}: {}", file.display(), text::header_line(&meta));
        print!("{s}");
    }
    Ok(ExitCode::SUCCESS)
}

fn import(
    log: &Path,
    output: &Path,
    json: bool,
    limits: &qemu::ImportLimits,
) -> Result<ExitCode, CliError> {
    let reader: Box<dyn io::BufRead> = if log == Path::new("-") {
        Box::new(BufReader::new(io::stdin()))
    } else {
        Box::new(BufReader::new(
            File::open(log).map_err(|e| format!("{}: {e}", log.display()))?,
        ))
    };
    let r = write_atomically(output, |w| {
        let (mut w, stats) = qemu::import_with(reader, w, limits).map_err(|e| e.to_string())?;
        w.flush()
            .map_err(|e| format!("{}: {e}", output.display()))?;
        Ok::<_, String>(stats)
    })?;
    match r {
        Ok(stats) => {
            eprintln!("{}: {stats}", output.display());
            for w in stats.warnings() {
                eprintln!("vcmdq: warning: {}: {w}", log.display());
            }
            if json {
                let mut j = stats.to_json();
                j["log"] = log.display().to_string().into();
                j["output"] = output.display().to_string().into();
                println!("{j}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("vcmdq: {}: {e}", log.display());
            Ok(ExitCode::from(1))
        }
    }
}
