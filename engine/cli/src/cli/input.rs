//! Bounded reading of the text files and streams the CLI takes: a line is at most
//! [`MAX_LINE_BYTES`], a whole config or bindings file at most [`MAX_FILE_BYTES`], so no input,
//! not even `/dev/zero`, can make vcmdq grow until it aborts. Both are checked while reading,
//! before anything is kept.

use std::io::{self, BufRead, Read};
use std::path::Path;

/// The longest line any text input may have (decode, encode, translate, config and bindings
/// files), in bytes, end of line not counted. Every valid line is far shorter; a longer one is
/// not text vcmdq reads (a binary file, `/dev/zero`).
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// The largest config (`serve --config`) or bindings (`translate --bindings`) file, in bytes.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Why a line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// The line did not end within [`MAX_LINE_BYTES`].
    #[error("line {line} is longer than {max} bytes (MAX_LINE_BYTES), so this is not a text file vcmdq reads")]
    TooLong {
        /// Its 1-based number.
        line: u64,
        /// [`MAX_LINE_BYTES`].
        max: usize,
    },
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error(
        "larger than {max} bytes (MAX_FILE_BYTES), the most a config or bindings file may hold"
    )]
    FileTooLarge {
        /// [`MAX_FILE_BYTES`].
        max: u64,
    },
    /// Not UTF-8.
    #[error("line {line} is not UTF-8 text")]
    NotUtf8 {
        /// Its 1-based number.
        line: u64,
    },
    /// Reading failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads lines of at most `max` bytes, in constant memory whatever the input.
pub struct Lines<R> {
    input: R,
    max: usize,
    line: u64,
    buf: Vec<u8>,
}

impl<R: BufRead> Lines<R> {
    /// Lines of `input`, each at most [`MAX_LINE_BYTES`].
    pub fn new(input: R) -> Lines<R> {
        Lines::with_max(input, MAX_LINE_BYTES)
    }

    /// Lines of `input`, each at most `max` bytes.
    pub fn with_max(input: R, max: usize) -> Lines<R> {
        Lines {
            input,
            max,
            line: 0,
            buf: Vec::new(),
        }
    }

    /// The next line as bytes without its `\n` (or `\r\n`), with its 1-based number; `None` at
    /// end of input. A line longer than the limit is an error; nothing after it is read.
    pub fn next_bytes(&mut self) -> Option<Result<(u64, &[u8]), LineError>> {
        self.buf.clear();
        let mut ended = false;
        loop {
            let chunk = match self.input.fill_buf() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Some(Err(e.into())),
            };
            if chunk.is_empty() {
                break;
            }
            let (take, found) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (chunk.len(), false),
            };
            // `max + 1` so that a `\r` before the `\n` of a line of exactly `max` bytes fits.
            if self.buf.len() + take > self.max + 1 {
                return Some(Err(LineError::TooLong {
                    line: self.line + 1,
                    max: self.max,
                }));
            }
            self.buf.extend_from_slice(&chunk[..take]);
            self.input.consume(take + usize::from(found));
            if found {
                ended = true;
                break;
            }
        }
        if !ended && self.buf.is_empty() {
            return None;
        }
        self.line += 1;
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        if self.buf.len() > self.max {
            return Some(Err(LineError::TooLong {
                line: self.line,
                max: self.max,
            }));
        }
        Some(Ok((self.line, &self.buf)))
    }

    /// The next line as text.
    pub fn next_str(&mut self) -> Option<Result<(u64, &str), LineError>> {
        match self.next_bytes()? {
            Ok((n, b)) => Some(
                std::str::from_utf8(b)
                    .map(|s| (n, s))
                    .map_err(|_| LineError::NotUtf8 { line: n }),
            ),
            Err(e) => Some(Err(e)),
        }
    }
}

/// The whole of a small text file (config, bindings): at most [`MAX_FILE_BYTES`], each line at
/// most [`MAX_LINE_BYTES`], read without ever holding more than that.
pub fn read_small_file(path: &Path) -> Result<Vec<(u64, String)>, LineError> {
    let file = std::fs::File::open(path)?;
    let mut limited = io::BufReader::new(file.take(MAX_FILE_BYTES + 1));
    let mut lines = Lines::new(&mut limited);
    let mut out = Vec::new();
    while let Some(line) = lines.next_str() {
        let (n, s) = line?;
        out.push((n, s.to_string()));
    }
    if limited.into_inner().limit() == 0 {
        return Err(LineError::FileTooLarge {
            max: MAX_FILE_BYTES,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &[u8], max: usize) -> Vec<Result<String, String>> {
        let mut l = Lines::with_max(input, max);
        let mut v = Vec::new();
        while let Some(r) = l.next_bytes() {
            match r {
                Ok((_, b)) => v.push(Ok(String::from_utf8_lossy(b).into_owned())),
                Err(e) => {
                    v.push(Err(e.to_string()));
                    break;
                }
            }
        }
        v
    }

    #[test]
    fn lines_end_at_newline_crlf_or_end_of_input() {
        assert_eq!(
            all(b"ab\r\ncd\n\nef", 4),
            vec![
                Ok("ab".into()),
                Ok("cd".into()),
                Ok("".into()),
                Ok("ef".into())
            ]
        );
        assert_eq!(all(b"abcd\r\n", 4), vec![Ok("abcd".into())]);
        assert!(all(b"", 4).is_empty());
    }

    #[test]
    fn a_line_over_the_limit_is_an_error_naming_its_number() {
        let r = all(b"ok\nabcde\nmore\n", 4);
        assert_eq!(r[0], Ok("ok".into()));
        let e = r[1].clone().unwrap_err();
        assert!(e.contains("line 2") && e.contains("MAX_LINE_BYTES"), "{e}");
        let r = all(b"abcde\r\n", 4);
        assert!(r[0].is_err(), "{r:?}");
    }

    #[test]
    fn an_endless_line_is_refused_after_the_limit_in_constant_memory() {
        let mut zeros = io::BufReader::new(io::repeat(0));
        let mut l = Lines::with_max(&mut zeros, 1000);
        assert!(matches!(
            l.next_bytes(),
            Some(Err(LineError::TooLong { line: 1, .. }))
        ));
    }

    proptest::proptest! {
        #[test]
        fn lines_within_the_limit_read_as_split_at_newlines(
            lines in proptest::collection::vec("[ -~]{0,40}", 0..20),
            max in 40usize..60,
            chunk in 1usize..16,
        ) {
            let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
            // A tiny buffer: lines cross many fill_buf calls.
            let mut l = Lines::with_max(io::BufReader::with_capacity(chunk, text.as_bytes()), max);
            let mut got = Vec::new();
            while let Some(r) = l.next_bytes() {
                let (n, b) = r.unwrap();
                proptest::prop_assert_eq!(n as usize, got.len() + 1);
                got.push(String::from_utf8(b.to_vec()).unwrap());
            }
            proptest::prop_assert_eq!(got, lines);
        }
    }
}
