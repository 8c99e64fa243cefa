//! Reading an audit log file line by line without trusting it.
//!
//! A log file may be huge, cut short or written by an attacker, so it is
//! never loaded whole: [`LineReader`] hands out one line at a time, holds at
//! most [`MAX_LINE_LEN`] bytes, skips past a longer line without storing it,
//! and says whether each line ended with a newline (the daemon ends every
//! line with one, so a last line without it was cut).

use std::io::{BufRead, BufReader, ErrorKind, Read};

use super::line::MAX_LINE_LEN;

/// Why a line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The underlying file failed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    /// Line `line` is longer than [`MAX_LINE_LEN`]; it was skipped.
    #[error("line {line} is longer than {MAX_LINE_LEN} bytes")]
    TooLong {
        /// Its 1-based number.
        line: u64,
    },
    /// Line `line` is not UTF-8.
    #[error("line {line} is not UTF-8")]
    NotUtf8 {
        /// Its 1-based number.
        line: u64,
    },
}

/// One line, without its newline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line<'a> {
    /// 1-based line number in the file.
    pub number: u64,
    /// The text.
    pub text: &'a str,
    /// Whether a newline ended it (`false` only for a last line that was
    /// cut short).
    pub terminated: bool,
}

/// A bounded line reader over any byte source.
#[derive(Debug)]
pub struct LineReader<R> {
    inner: BufReader<R>,
    buf: Vec<u8>,
    number: u64,
    position: u64,
}

impl<R: Read> LineReader<R> {
    /// Reads lines from `inner`.
    pub fn new(inner: R) -> Self {
        LineReader {
            inner: BufReader::with_capacity(64 * 1024, inner),
            buf: Vec::new(),
            number: 0,
            position: 0,
        }
    }

    /// The number of the last line handed out (0 before the first).
    pub fn line_number(&self) -> u64 {
        self.number
    }

    /// Bytes consumed so far, newlines included: where the next line
    /// starts (for `tail -f`, which re-reads from there as the file grows).
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The next line, `None` at the end. After [`ReadError::TooLong`] or
    /// [`ReadError::NotUtf8`] the reader stands at the following line, so
    /// a reader that only wants to skip bad lines may go on.
    pub fn next_line(&mut self) -> Result<Option<Line<'_>>, ReadError> {
        self.buf.clear();
        let mut too_long = false;
        let terminated = loop {
            let available = match self.inner.fill_buf() {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if available.is_empty() {
                if self.buf.is_empty() && !too_long {
                    return Ok(None);
                }
                break false;
            }
            let (chunk, used, done) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (&available[..i], i + 1, true),
                None => (available, available.len(), false),
            };
            if !too_long && self.buf.len() + chunk.len() > MAX_LINE_LEN {
                // Keep reading to the newline, storing nothing more.
                too_long = true;
                self.buf.clear();
            }
            if !too_long {
                self.buf.extend_from_slice(chunk);
            }
            self.inner.consume(used);
            self.position = self.position.saturating_add(used as u64);
            if done {
                break true;
            }
        };
        self.number += 1;
        if too_long {
            return Err(ReadError::TooLong { line: self.number });
        }
        match std::str::from_utf8(&self.buf) {
            Ok(text) => Ok(Some(Line {
                number: self.number,
                text,
                terminated,
            })),
            Err(_) => Err(ReadError::NotUtf8 { line: self.number }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<Result<(u64, String, bool), String>> {
        let mut reader = LineReader::new(input);
        let mut out = Vec::new();
        loop {
            match reader.next_line() {
                Ok(Some(line)) => {
                    out.push(Ok((line.number, line.text.to_owned(), line.terminated)))
                }
                Ok(None) => return out,
                Err(e) => out.push(Err(e.to_string())),
            }
        }
    }

    #[test]
    fn lines_numbers_and_the_cut_last_line() {
        assert_eq!(lines(b""), vec![]);
        assert_eq!(
            lines(b"a\n\nb"),
            vec![
                Ok((1, "a".into(), true)),
                Ok((2, String::new(), true)),
                Ok((3, "b".into(), false))
            ]
        );
    }

    #[test]
    fn long_and_non_utf8_lines_are_skipped_with_an_error() {
        let mut input = vec![b'x'; MAX_LINE_LEN + 1];
        input.extend_from_slice(b"\n\xff\nok\n");
        let got = lines(&input);
        assert_eq!(got.len(), 3);
        assert!(got[0].as_ref().unwrap_err().contains("line 1 is longer"));
        assert!(got[1].as_ref().unwrap_err().contains("line 2 is not UTF-8"));
        assert_eq!(got[2], Ok((3, "ok".into(), true)));
        // Exactly the bound is fine; a long cut last line is still too long.
        let mut input = vec![b'y'; MAX_LINE_LEN];
        input.push(b'\n');
        input.extend(vec![b'z'; MAX_LINE_LEN + 5]);
        let got = lines(&input);
        assert_eq!(got[0].as_ref().unwrap().1.len(), MAX_LINE_LEN);
        assert!(got[1].as_ref().unwrap_err().contains("line 2 is longer"));
        assert_eq!(got.len(), 2);
    }
}
