//! `.env` secret files, read and rewritten without disturbing their layout.
//!
//! Operators keep secrets files under version control and review their
//! diffs, so `keystore-host encrypt` must change the chosen values and
//! nothing else: comments, blank lines, `export ` prefixes, quoting style,
//! ordering and line endings all survive byte for byte. [`DotEnv`] therefore
//! keeps the original text and remembers where each value sits in it, rather
//! than rebuilding the file from parsed pairs.
//!
//! Accepted syntax, one assignment per line:
//!
//! ```text
//! # comment
//! [export ]NAME=value            # unquoted; a ` #` starts a trailing comment
//! [export ]NAME='literal'        # single quotes: no escapes
//! [export ]NAME="with \"escapes\"\n"  # double quotes: \n \r \t \" \\ \$
//! ```
//!
//! Quoted values may span lines (PEM keys). Names are
//! `[A-Za-z_][A-Za-z0-9_.-]*`, or one of the keystore's reserved names
//! (`keystore:rules`, written by `keystore-host encrypt --rules`); any other
//! name starting with `keystore:` is refused. `$VAR` is never expanded: values are taken
//! literally, so a secret containing `$` stays what it is. A name defined
//! twice is an error, since "last one wins" would make it unclear which
//! secret the enclave holds.
//!
//! The text holds plaintext secrets until they are encrypted, so it lives in
//! [`Zeroizing`] buffers, `Debug` shows only names, and errors carry line
//! numbers and names, never values.

use std::fmt;
use std::ops::Range;

use zeroize::Zeroizing;

/// Largest secrets file accepted: the same bound as a `Load` frame, since the
/// whole file's envelopes travel in one.
pub const MAX_FILE_SIZE: usize = keystore_shared::protocol::DEFAULT_MAX_LOAD_FRAME;

/// Longest name accepted: the secret-name limit both sides share.
pub use keystore_shared::name::MAX_NAME_LEN;
use keystore_shared::name::{RESERVED_NAMES, RESERVED_PREFIX};

/// How a value is quoted in the file; a rewritten value keeps its style
/// when the new text allows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quote {
    /// `NAME=value`.
    None,
    /// `NAME='value'`.
    Single,
    /// `NAME="value"`.
    Double,
}

/// Why a file is not an acceptable `.env` file. Never contains a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DotEnvError {
    /// The file exceeds [`MAX_FILE_SIZE`].
    #[error("secrets file is {len} bytes; at most {max} are accepted")]
    TooLarge {
        /// Size of the input.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes on this line are not UTF-8.
    #[error("line {line}: not valid UTF-8")]
    NotUtf8 {
        /// 1-based line number.
        line: usize,
    },
    /// The line is not a comment, a blank line or an assignment.
    #[error("line {line}: {reason}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// What is wrong, in terms of syntax only.
        reason: &'static str,
    },
    /// The same name is assigned twice.
    #[error("line {line}: {name} is already defined on line {first}")]
    Duplicate {
        /// The repeated name.
        name: String,
        /// Line of the repeat.
        line: usize,
        /// Line of the first definition.
        first: usize,
    },
    /// [`DotEnv::set_value`] was given an index past the last entry.
    #[error("no entry number {0}")]
    NoSuchEntry(usize),
}

/// One assignment as parsed: where its value sits in the text.
struct Slot {
    name: String,
    line: usize,
    quote: Quote,
    /// Byte range of the raw value text (inside the quotes, if any).
    raw: Range<usize>,
    /// The value with quoting and escapes resolved.
    value: Zeroizing<String>,
}

/// One assignment of a [`DotEnv`] file.
#[derive(Clone, Copy)]
pub struct Entry<'a> {
    /// The variable name.
    pub name: &'a str,
    /// The value, unquoted and unescaped. May be a plaintext secret.
    pub value: &'a str,
    /// 1-based line the assignment starts on.
    pub line: usize,
    /// The quoting style in the file.
    pub quote: Quote,
}

impl fmt::Debug for Entry<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("name", &self.name)
            .field(
                "value",
                &format_args!("[REDACTED {} bytes]", self.value.len()),
            )
            .field("line", &self.line)
            .field("quote", &self.quote)
            .finish()
    }
}

/// A parsed `.env` file that can be written back unchanged or with chosen
/// values replaced in place.
pub struct DotEnv {
    text: Zeroizing<String>,
    slots: Vec<Slot>,
}

impl fmt::Debug for DotEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DotEnv")
            .field("len", &self.text.len())
            .field(
                "names",
                &self
                    .slots
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl DotEnv {
    /// Parses file contents. The input is copied into a wiped buffer; the
    /// caller should wipe its own copy.
    pub fn parse(bytes: &[u8]) -> Result<Self, DotEnvError> {
        if bytes.len() > MAX_FILE_SIZE {
            return Err(DotEnvError::TooLarge {
                len: bytes.len(),
                max: MAX_FILE_SIZE,
            });
        }
        let text = match std::str::from_utf8(bytes) {
            Ok(text) => Zeroizing::new(text.to_owned()),
            Err(e) => {
                let valid = bytes.get(..e.valid_up_to()).unwrap_or_default();
                let line = 1 + valid.iter().filter(|&&b| b == b'\n').count();
                return Err(DotEnvError::NotUtf8 { line });
            }
        };
        let slots = Parser::new(&text).parse()?;
        Ok(DotEnv { text, slots })
    }

    /// The assignments in file order.
    pub fn entries(&self) -> impl ExactSizeIterator<Item = Entry<'_>> {
        self.slots.iter().map(|s| Entry {
            name: &s.name,
            value: &s.value,
            line: s.line,
            quote: s.quote,
        })
    }

    /// Number of assignments.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the file has no assignments.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The value of `name`, if assigned.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.slots
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.value.as_str())
    }

    /// Adds `NAME=value` as a new last line, after an optional `# comment`
    /// line, keeping everything before it byte for byte. The value is
    /// written unquoted when it can be, as [`DotEnv::set_value`] would.
    pub fn append(
        &mut self,
        comment: Option<&str>,
        name: &str,
        value: &str,
    ) -> Result<(), DotEnvError> {
        let (quote, encoded) = encode(Quote::None, value);
        let mut text = Zeroizing::new(String::with_capacity(
            self.text.len() + name.len() + encoded.len() + 64,
        ));
        text.push_str(&self.text);
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        if let Some(comment) = comment {
            text.push_str("# ");
            text.push_str(comment);
            text.push('\n');
        }
        text.push_str(name);
        text.push('=');
        text.push_str(quote_char(quote));
        text.push_str(&encoded);
        text.push_str(quote_char(quote));
        text.push('\n');
        *self = DotEnv::parse(text.as_bytes())?;
        Ok(())
    }

    /// The file text, including every change made so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Replaces the value of entry `index` (as numbered by
    /// [`DotEnv::entries`]) and nothing else in the text. The quoting style
    /// is kept if it can hold `value`; otherwise the value is written in
    /// double quotes with escapes.
    pub fn set_value(&mut self, index: usize, value: &str) -> Result<(), DotEnvError> {
        let slot = self
            .slots
            .get(index)
            .ok_or(DotEnvError::NoSuchEntry(index))?;
        let (quote, encoded) = encode(slot.quote, value);
        let mut start = slot.raw.start;
        let mut end = slot.raw.end;
        if quote != slot.quote {
            // Widen the replaced range to take in the old quotes, if any.
            if slot.quote != Quote::None {
                start -= 1;
                end += 1;
            }
        }
        let mut text = Zeroizing::new(String::with_capacity(
            self.text.len() - (end - start) + encoded.len(),
        ));
        text.push_str(self.text.get(..start).unwrap_or_default());
        let value_start = text.len() + usize::from(quote != slot.quote && quote != Quote::None);
        if quote != slot.quote {
            text.push_str(quote_char(quote));
        }
        text.push_str(&encoded);
        let value_end = value_start + encoded.len();
        if quote != slot.quote {
            text.push_str(quote_char(quote));
        }
        text.push_str(self.text.get(end..).unwrap_or_default());
        let old_len = self.text.len();
        let new_len = text.len();
        self.text = text;
        if let Some(slot) = self.slots.get_mut(index) {
            slot.raw = value_start..value_end;
            slot.quote = quote;
            slot.value = Zeroizing::new(value.to_owned());
        }
        for later in self.slots.iter_mut().skip(index + 1) {
            later.raw = (later.raw.start + new_len - old_len)..(later.raw.end + new_len - old_len);
        }
        Ok(())
    }
}

fn quote_char(quote: Quote) -> &'static str {
    match quote {
        Quote::None => "",
        Quote::Single => "'",
        Quote::Double => "\"",
    }
}

/// Encodes `value` for `preferred` quoting, falling back to double quotes
/// when the style cannot represent it.
fn encode(preferred: Quote, value: &str) -> (Quote, Zeroizing<String>) {
    let unquoted_ok = !value.is_empty()
        && !value.starts_with(['"', '\''])
        && !value.chars().any(|c| c.is_whitespace() || c == '#');
    match preferred {
        Quote::None if unquoted_ok => (Quote::None, Zeroizing::new(value.to_owned())),
        Quote::None if value.is_empty() => (Quote::None, Zeroizing::new(String::new())),
        Quote::Single if !value.contains('\'') => (Quote::Single, Zeroizing::new(value.to_owned())),
        _ => {
            let mut out = Zeroizing::new(String::with_capacity(value.len() + 2));
            for c in value.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c => out.push(c),
                }
            }
            (Quote::Double, out)
        }
    }
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
    line: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Parser {
            text,
            pos: 0,
            line: 1,
        }
    }

    fn rest(&self) -> &'a str {
        self.text.get(self.pos..).unwrap_or_default()
    }

    fn err(&self, reason: &'static str) -> DotEnvError {
        DotEnvError::Syntax {
            line: self.line,
            reason,
        }
    }

    /// Skips spaces and tabs (not newlines).
    fn skip_blanks(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start_matches([' ', '\t']).len();
    }

    /// Consumes the rest of the current line including its `\n`.
    fn skip_line(&mut self) {
        match self.rest().find('\n') {
            Some(i) => {
                self.pos += i + 1;
                self.line += 1;
            }
            None => self.pos = self.text.len(),
        }
    }

    fn parse(mut self) -> Result<Vec<Slot>, DotEnvError> {
        let mut slots: Vec<Slot> = Vec::new();
        while self.pos < self.text.len() {
            self.skip_blanks();
            let rest = self.rest();
            if rest.is_empty() {
                break;
            }
            if rest.starts_with(['\n', '#']) || rest.starts_with("\r\n") {
                self.skip_line();
                continue;
            }
            let slot = self.assignment()?;
            if let Some(first) = slots.iter().find(|s| s.name == slot.name) {
                return Err(DotEnvError::Duplicate {
                    name: slot.name,
                    line: slot.line,
                    first: first.line,
                });
            }
            slots.push(slot);
        }
        Ok(slots)
    }

    fn assignment(&mut self) -> Result<Slot, DotEnvError> {
        let line = self.line;
        if let Some(after) = self.rest().strip_prefix("export")
            && after.starts_with([' ', '\t'])
        {
            self.pos += "export".len();
            self.skip_blanks();
        }
        let rest = self.rest();
        // The reserved prefix is the one place a `:` may appear.
        let prefix = if rest.starts_with(RESERVED_PREFIX) {
            RESERVED_PREFIX.len()
        } else {
            0
        };
        let rest_of_name = rest.get(prefix..).unwrap_or_default();
        let name_len = prefix
            + rest_of_name
                .char_indices()
                .find(|&(i, c)| {
                    !(c == '_'
                        || c.is_ascii_alphabetic()
                        || (i > 0 && (c.is_ascii_digit() || c == '.' || c == '-')))
                })
                .map_or(rest_of_name.len(), |(i, _)| i);
        if name_len == 0 {
            return Err(self.err("expected NAME=value, a comment or a blank line"));
        }
        if name_len > MAX_NAME_LEN {
            return Err(self.err("name is longer than 256 characters"));
        }
        let name = rest.get(..name_len).unwrap_or_default().to_owned();
        if prefix > 0 && !RESERVED_NAMES.contains(&name.as_str()) {
            return Err(self.err(
                "names starting with `keystore:` are reserved; the only one is `keystore:rules`",
            ));
        }
        self.pos += name_len;
        self.skip_blanks();
        if !self.rest().starts_with('=') {
            return Err(self.err("expected `=` after the name"));
        }
        self.pos += 1;
        self.skip_blanks();
        let (quote, raw, value) = match self.rest().chars().next() {
            Some('\'') => self.quoted('\'')?,
            Some('"') => self.quoted('"')?,
            _ => self.unquoted(),
        };
        self.end_of_line()?;
        Ok(Slot {
            name,
            line,
            quote,
            raw,
            value,
        })
    }

    /// An unquoted value: up to the end of the line or a ` #` comment,
    /// without trailing blanks.
    fn unquoted(&mut self) -> (Quote, Range<usize>, Zeroizing<String>) {
        let rest = self.rest();
        let line_end = rest.find('\n').unwrap_or(rest.len());
        let line = rest.get(..line_end).unwrap_or_default();
        let line = line.strip_suffix('\r').unwrap_or(line);
        // A `#` after a blank starts a comment; the byte before the value
        // (at `pos - 1`) is the `=` or a blank, so look back into the text.
        let all = self.text.as_bytes();
        let end = line
            .bytes()
            .enumerate()
            .find(|&(i, b)| {
                b == b'#'
                    && (self.pos + i)
                        .checked_sub(1)
                        .and_then(|p| all.get(p))
                        .is_some_and(|p| *p == b' ' || *p == b'\t')
            })
            .map_or(line.len(), |(i, _)| i);
        let value = line
            .get(..end)
            .unwrap_or_default()
            .trim_end_matches([' ', '\t']);
        let raw = self.pos..self.pos + value.len();
        self.pos += value.len();
        (Quote::None, raw, Zeroizing::new(value.to_owned()))
    }

    /// A quoted value; the opening quote is at `self.pos`.
    fn quoted(&mut self, q: char) -> Result<(Quote, Range<usize>, Zeroizing<String>), DotEnvError> {
        let start_line = self.line;
        self.pos += 1;
        let start = self.pos;
        let mut value = Zeroizing::new(String::new());
        let mut chars = self.rest().char_indices();
        loop {
            let Some((i, c)) = chars.next() else {
                return Err(DotEnvError::Syntax {
                    line: start_line,
                    reason: "unterminated quoted value",
                });
            };
            match c {
                c if c == q => {
                    self.pos = start + i + 1;
                    let quote = if q == '"' {
                        Quote::Double
                    } else {
                        Quote::Single
                    };
                    return Ok((quote, start..start + i, value));
                }
                '\\' if q == '"' => {
                    let Some((_, next)) = chars.next() else {
                        continue;
                    };
                    match next {
                        'n' => value.push('\n'),
                        'r' => value.push('\r'),
                        't' => value.push('\t'),
                        '"' | '\\' | '$' => value.push(next),
                        other => {
                            if other == '\n' {
                                self.line += 1;
                            }
                            value.push('\\');
                            value.push(other);
                        }
                    }
                }
                c => {
                    if c == '\n' {
                        self.line += 1;
                    }
                    value.push(c);
                }
            }
        }
    }

    /// After a value: optional blanks, an optional comment, then the end
    /// of the line.
    fn end_of_line(&mut self) -> Result<(), DotEnvError> {
        self.skip_blanks();
        let rest = self.rest();
        if rest.is_empty() || rest.starts_with('\n') || rest.starts_with("\r\n") {
            self.skip_line();
            return Ok(());
        }
        if rest.starts_with('#') {
            self.skip_line();
            return Ok(());
        }
        Err(self.err("unexpected text after the value"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_values_and_names() {
        let env = DotEnv::parse(b"A=\nB=''\nC=\"\"\n").unwrap();
        let values: Vec<_> = env.entries().map(|e| (e.name, e.value)).collect();
        assert_eq!(values, [("A", ""), ("B", ""), ("C", "")]);
    }

    #[test]
    fn reserved_names_only_with_the_reserved_prefix() {
        let env = DotEnv::parse(b"A=1\nkeystore:rules=ENC[v1:kms:AQ==]\n").unwrap();
        let names: Vec<_> = env.entries().map(|e| e.name).collect();
        assert_eq!(names, ["A", "keystore:rules"]);
        for bad in ["keystore:other=1\n", "keystore:=1\n", "A:B=1\n", ":x=1\n"] {
            assert!(
                matches!(
                    DotEnv::parse(bad.as_bytes()),
                    Err(DotEnvError::Syntax { line: 1, .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn append_adds_a_line_and_keeps_the_rest() {
        let mut env = DotEnv::parse(b"# top\nA=1").unwrap();
        env.append(Some("rules"), "keystore:rules", "ENC[v1:kms:AQ==]")
            .unwrap();
        assert_eq!(
            env.text(),
            "# top\nA=1\n# rules\nkeystore:rules=ENC[v1:kms:AQ==]\n"
        );
        assert_eq!(env.get("keystore:rules"), Some("ENC[v1:kms:AQ==]"));
        let mut empty = DotEnv::parse(b"").unwrap();
        empty.append(None, "B", "two words").unwrap();
        assert_eq!(empty.text(), "B=\"two words\"\n");
        assert!(matches!(
            empty.append(None, "B", "again"),
            Err(DotEnvError::Duplicate { .. })
        ));
    }

    #[test]
    fn encode_falls_back_to_double_quotes() {
        assert_eq!(encode(Quote::None, "a b").0, Quote::Double);
        assert_eq!(encode(Quote::None, "a#b").0, Quote::Double);
        assert_eq!(encode(Quote::None, "ENC[v1:kms:AQ==]").0, Quote::None);
        assert_eq!(encode(Quote::Single, "it's").0, Quote::Double);
        assert_eq!(&*encode(Quote::Double, "a\"b\\\n").1, "a\\\"b\\\\\\n");
    }
}
