//! `vcmdq encode`: commands in the text form to the two hex words `vcmdq decode` reads.
//!
//! From arguments, a command starts at every word that names one (or `RAW`), so
//! `vcmdq encode CMD_SYNC cs=1 TLBI_NH_ALL vmid=3` and
//! `vcmdq encode 'CMD_SYNC cs=1' 'TLBI_NH_ALL vmid=3'` are the same two commands. Without
//! arguments, standard input is read one command a line, blank lines and `#` comments skipped.
//! A command that does not parse is reported on standard error (which command or line, and what
//! is wrong), the others are still encoded, and the exit status is 1.

use super::decode::{strip_comment, words_line};
use super::input::{LineError, Lines};
use super::{out, CliError};
use clap::Args;
use std::io::{self, Write};
use std::process::ExitCode;
use vcmdq::command::text;

/// Arguments of `vcmdq encode`.
#[derive(Args, Debug)]
#[command(
    after_help = "A command starts at each word that names one, so commands may be given \
quoted or not: `vcmdq encode CMD_SYNC cs=1 TLBI_NH_ALL vmid=3`. Output: `0x<d0> 0x<d1>` a line, \
what `vcmdq decode` reads. Exit status: 0 all encoded; 1 a command did not parse (reported on \
standard error, the others still encoded); 2 a usage error."
)]
pub struct EncodeArgs {
    /// Commands in the text form, e.g. `TLBI_NH_VA vmid=3 asid=7 addr=0x8000_0000 tg=4k num=3
    /// leaf` or `RAW <d0> <d1>`. None: read standard input, one command a line.
    text: Vec<String>,
}

/// The commands in a list of arguments: a new one at each command name.
fn group_args(args: &[String]) -> Vec<String> {
    let mut cmds: Vec<String> = Vec::new();
    for word in args.iter().flat_map(|a| a.split_whitespace()) {
        match cmds.last_mut() {
            Some(cur) if !text::is_command_name(word) => {
                cur.push(' ');
                cur.push_str(word);
            }
            _ => cmds.push(word.to_string()),
        }
    }
    cmds
}

/// Encodes each `(label, text)`; reports failures on standard error. Returns whether all parsed.
/// An error reading the input is `Ok(Err(..))`; an error writing the output is `Err`.
fn encode_all(
    out: &mut impl Write,
    failed: &mut bool,
    items: impl Iterator<Item = Result<(String, String), LineError>>,
) -> io::Result<Result<bool, LineError>> {
    for item in items {
        let (label, line) = match item {
            Ok(i) => i,
            Err(e) => {
                out.flush()?;
                return Ok(Err(e));
            }
        };
        let body = strip_comment(&line);
        if body.trim().is_empty() {
            continue;
        }
        match text::parse(body) {
            Ok(raw) => writeln!(out, "{}", words_line(&raw))?,
            Err(e) => {
                out.flush()?;
                eprintln!("{label}: error: {e}: {:?}", body.trim());
                *failed = true;
            }
        }
    }
    Ok(Ok(!*failed))
}

/// Runs `vcmdq encode`.
pub fn run(args: EncodeArgs) -> Result<ExitCode, CliError> {
    let mut out = io::BufWriter::new(out::stdout());
    let mut failed = false;
    let result = if args.text.is_empty() {
        // One line at a time, each bounded: any length of input in constant memory.
        let mut input = Lines::new(io::stdin().lock());
        let lines = std::iter::from_fn(move || {
            input
                .next_str()
                .map(|r| r.map(|(n, l)| (format!("line {n}"), l.to_string())))
        });
        encode_all(&mut out, &mut failed, lines)
    } else {
        let cmds = group_args(&args.text);
        let items = cmds
            .into_iter()
            .enumerate()
            .map(|(i, c)| Ok((format!("command {}", i + 1), c)));
        encode_all(&mut out, &mut failed, items)
    }
    .and_then(|ok| out.flush().map(|()| ok));
    match result {
        Ok(Ok(true)) => Ok(ExitCode::SUCCESS),
        Ok(Ok(false)) => Ok(ExitCode::from(1)),
        Ok(Err(e)) => Err(format!("standard input: {e}").into()),
        // The reader went away (`vcmdq encode | head`): nobody is left to tell; the status is
        // the one the commands read so far earned.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(ExitCode::from(u8::from(failed))),
        Err(e) => Err(format!("encode: {e}").into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn arguments_split_at_command_names() {
        let quoted = group_args(&s(&["CMD_SYNC cs=1", "TLBI_NH_ALL vmid=3"]));
        let bare = group_args(&s(&["CMD_SYNC", "cs=1", "tlbi_nh_all", "vmid=3"]));
        assert_eq!(quoted, s(&["CMD_SYNC cs=1", "TLBI_NH_ALL vmid=3"]));
        assert_eq!(bare, s(&["CMD_SYNC cs=1", "tlbi_nh_all vmid=3"]));
        assert_eq!(
            group_args(&s(&["RAW", "0x47", "0", "ATC_INV", "size=52"])),
            s(&["RAW 0x47 0", "ATC_INV size=52"])
        );
        // A leading word that names nothing is still a command, so parse reports it.
        assert_eq!(
            group_args(&s(&["vmid=3", "TLBI_NH_ALL"])),
            s(&["vmid=3", "TLBI_NH_ALL"])
        );
    }

    #[test]
    fn bad_command_is_reported_and_others_encoded() {
        let mut out = Vec::new();
        let items = [
            ("line 1", "TLBI_NH_ALL vmid=3"),
            ("line 2", "# comment"),
            ("line 3", "CMD_SYNC cs=9"),
            ("line 4", "TLBI_NH_ASID vmid=1 asid=2 # trailing"),
        ]
        .into_iter()
        .map(|(a, b)| Ok((a.to_string(), b.to_string())));
        let ok = encode_all(&mut out, &mut false, items).unwrap().unwrap();
        assert!(!ok);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "0x0000000300000010 0x0000000000000000\n0x0002000100000011 0x0000000000000000\n"
        );
    }
}
