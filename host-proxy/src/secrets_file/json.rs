//! JSON secrets files: a small tokenizer that records where each scalar
//! sits in the text.
//!
//! Why hand-written: rewriting a file in place needs the byte span of every
//! value, and `serde_json` reports none (its `RawValue` gives text, not
//! positions, and loses duplicate keys). JSON's grammar is small enough that
//! a strict recursive-descent reader (RFC 8259, nothing more: no comments,
//! no trailing commas) is shorter than the glue around a general parser.
//! Recursion is bounded by [`MAX_DEPTH`](super::format::MAX_DEPTH), so
//! hostile nesting fails with an error, not a stack overflow.
//!
//! Every scalar becomes a [`Slot`] with its dotted path (`db.password`,
//! `servers.0.token`); only strings can be sealed, numbers, booleans and
//! `null` stay plain. A UTF-8 byte-order mark at the start is kept and
//! skipped.

use std::collections::HashMap;
use std::ops::Range;

use zeroize::Zeroizing;

use super::format::{FormatError, Kind, Parsed, PathBuilder, Slot, Style, Top};

/// Parses `text` (already bounded in size and checked to be UTF-8).
pub(crate) fn parse(text: &str) -> Result<Parsed, FormatError> {
    let mut p = Reader {
        bytes: text.as_bytes(),
        text,
        pos: 0,
        line: 1,
        paths: PathBuilder::default(),
        slots: Vec::new(),
        top: Top::None,
    };
    if text.starts_with('\u{feff}') {
        p.pos = '\u{feff}'.len_utf8();
    }
    p.ws();
    if p.peek() != Some(b'{') {
        return Err(FormatError::TopLevel { line: p.line });
    }
    p.object("", 0)?;
    p.ws();
    if p.pos < p.bytes.len() {
        return Err(p.syntax("unexpected text after the top-level object"));
    }
    Ok(Parsed {
        slots: p.slots,
        top: p.top,
    })
}

/// Writes `value` as a JSON string literal, quotes included.
pub(crate) fn encode(value: &str) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(value.len() + 2));
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Text to insert for a new last member `"name": value` of the top-level
/// object, and where: after the last member, with the same separator
/// (newline and indentation) that precedes it, or into an empty object.
pub(crate) fn insertion(
    text: &str,
    top: &Top,
    name: &str,
    value: &str,
) -> Option<(Range<usize>, Zeroizing<String>)> {
    let Top::Json {
        open,
        close,
        last_end,
        separator,
    } = top
    else {
        return None;
    };
    let member = format!("{}: {}", encode(name).as_str(), encode(value).as_str());
    let mut out = Zeroizing::new(String::new());
    match last_end {
        Some(end) => {
            out.push(',');
            out.push_str(if separator.is_empty() { " " } else { separator });
            out.push_str(&member);
            Some((*end..*end, out))
        }
        None => {
            let multiline = text.get(*open..*close).is_some_and(|t| t.contains('\n'));
            out.push('{');
            out.push_str(if multiline { "\n  " } else { "" });
            out.push_str(&member);
            out.push_str(if multiline { "\n}" } else { "}" });
            Some((*open..*close + 1, out))
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    text: &'a str,
    pos: usize,
    line: usize,
    paths: PathBuilder,
    slots: Vec<Slot>,
    top: Top,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn syntax(&self, reason: &'static str) -> FormatError {
        FormatError::Syntax {
            line: self.line,
            reason: reason.into(),
        }
    }

    fn ws(&mut self) {
        while let Some(b) = self.peek() {
            match b {
                b'\n' => self.line += 1,
                b' ' | b'\t' | b'\r' => {}
                _ => return,
            }
            self.pos += 1;
        }
    }

    fn expect(&mut self, b: u8, reason: &'static str) -> Result<(), FormatError> {
        if self.peek() == Some(b) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.syntax(reason))
        }
    }

    fn value(&mut self, path: &str, depth: usize) -> Result<(), FormatError> {
        match self.peek() {
            Some(b'{') => self.object(path, depth + 1),
            Some(b'[') => self.array(path, depth + 1),
            Some(b'"') => {
                let line = self.line;
                let start = self.pos;
                let value = self.string()?;
                self.leaf(path, line, value, start, Kind::String(Style::Json))
            }
            Some(b't' | b'f' | b'n') => {
                let line = self.line;
                let start = self.pos;
                let rest = self.bytes.get(self.pos..).unwrap_or_default();
                let word = ["true", "false", "null"]
                    .into_iter()
                    .find(|w| rest.starts_with(w.as_bytes()))
                    .ok_or_else(|| self.syntax("expected a value"))?;
                self.pos += word.len();
                self.leaf(
                    path,
                    line,
                    Zeroizing::new(word.to_owned()),
                    start,
                    Kind::Other,
                )
            }
            Some(b'-' | b'0'..=b'9') => {
                let line = self.line;
                let start = self.pos;
                self.number()?;
                let text = self.text.get(start..self.pos).unwrap_or_default();
                self.leaf(
                    path,
                    line,
                    Zeroizing::new(text.to_owned()),
                    start,
                    Kind::Other,
                )
            }
            _ => Err(self.syntax("expected a value")),
        }
    }

    fn leaf(
        &mut self,
        path: &str,
        line: usize,
        value: Zeroizing<String>,
        start: usize,
        kind: Kind,
    ) -> Result<(), FormatError> {
        self.paths.leaf(path, line, self.slots.len())?;
        self.slots.push(Slot {
            path: path.to_owned(),
            line,
            value,
            kind,
            span: start..self.pos,
        });
        Ok(())
    }

    fn object(&mut self, path: &str, depth: usize) -> Result<(), FormatError> {
        self.paths.depth(path, self.line, depth)?;
        let open = self.pos;
        self.expect(b'{', "expected `{`")?;
        let mut keys: HashMap<String, usize> = HashMap::new();
        let mut last_end = None;
        let mut separator = String::new();
        self.ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
        } else {
            loop {
                let before_ws = self.pos;
                self.ws();
                if depth == 0 {
                    // Whitespace before the member, reused for an appended
                    // one (`,` or `{` was just before it).
                    separator = self
                        .text
                        .get(before_ws..self.pos)
                        .unwrap_or_default()
                        .to_owned();
                }
                if self.peek() != Some(b'"') {
                    return Err(self.syntax("expected a string key"));
                }
                let line = self.line;
                let key = self.string()?;
                if let Some(first) = keys.get(key.as_str()) {
                    return Err(FormatError::Duplicate {
                        path: PathBuilder::join(path, &key),
                        line,
                        first: *first,
                    });
                }
                let child = self.paths.child(path, &key, line)?;
                keys.insert(key.as_str().to_owned(), line);
                self.ws();
                self.expect(b':', "expected `:` after the key")?;
                self.ws();
                self.value(&child, depth)?;
                last_end = Some(self.pos);
                self.ws();
                match self.peek() {
                    Some(b',') => self.pos += 1,
                    Some(b'}') => {
                        self.pos += 1;
                        break;
                    }
                    _ => return Err(self.syntax("expected `,` or `}` after a member")),
                }
            }
        }
        if depth == 0 {
            self.top = Top::Json {
                open,
                close: self.pos - 1,
                last_end,
                separator,
            };
        }
        Ok(())
    }

    fn array(&mut self, path: &str, depth: usize) -> Result<(), FormatError> {
        self.paths.depth(path, self.line, depth)?;
        self.expect(b'[', "expected `[`")?;
        self.ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        let mut index = 0usize;
        loop {
            self.ws();
            let line = self.line;
            let child = self.paths.child(path, &index.to_string(), line)?;
            self.value(&child, depth)?;
            index += 1;
            self.ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(self.syntax("expected `,` or `]` after an element")),
            }
        }
    }

    fn number(&mut self) -> Result<(), FormatError> {
        let digits = |r: &mut Self| {
            let start = r.pos;
            while r.peek().is_some_and(|b| b.is_ascii_digit()) {
                r.pos += 1;
            }
            r.pos > start
        };
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        if self.peek() == Some(b'0') {
            self.pos += 1;
        } else if !digits(self) {
            return Err(self.syntax("malformed number"));
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !digits(self) {
                return Err(self.syntax("malformed number"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if !digits(self) {
                return Err(self.syntax("malformed number"));
            }
        }
        Ok(())
    }

    /// A string literal at `pos`; returns it unescaped.
    fn string(&mut self) -> Result<Zeroizing<String>, FormatError> {
        self.expect(b'"', "expected `\"`")?;
        let mut out = Zeroizing::new(String::new());
        loop {
            let rest = self.text.get(self.pos..).unwrap_or_default();
            let Some(c) = rest.chars().next() else {
                return Err(self.syntax("unterminated string"));
            };
            self.pos += c.len_utf8();
            match c {
                '"' => return Ok(out),
                '\\' => {
                    let esc = self
                        .peek()
                        .ok_or_else(|| self.syntax("unterminated string"))?;
                    self.pos += 1;
                    match esc {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let c = self.unicode_escape()?;
                            out.push(c);
                        }
                        _ => return Err(self.syntax("unknown escape in a string")),
                    }
                }
                c if u32::from(c) < 0x20 => {
                    return Err(self.syntax("control character in a string (escape it)"));
                }
                c => out.push(c),
            }
        }
    }

    /// The `XXXX` of a `\uXXXX` escape (and its low half, for a surrogate
    /// pair).
    fn unicode_escape(&mut self) -> Result<char, FormatError> {
        let high = self.hex4()?;
        if (0xd800..0xdc00).contains(&high) {
            let rest = self.bytes.get(self.pos..).unwrap_or_default();
            if !rest.starts_with(b"\\u") {
                return Err(self.syntax("unpaired surrogate in a \\u escape"));
            }
            self.pos += 2;
            let low = self.hex4()?;
            if !(0xdc00..0xe000).contains(&low) {
                return Err(self.syntax("unpaired surrogate in a \\u escape"));
            }
            let code = 0x10000 + ((high - 0xd800) << 10) + (low - 0xdc00);
            return char::from_u32(code).ok_or_else(|| self.syntax("invalid \\u escape"));
        }
        char::from_u32(high).ok_or_else(|| self.syntax("unpaired surrogate in a \\u escape"))
    }

    fn hex4(&mut self) -> Result<u32, FormatError> {
        let digits = self
            .text
            .get(self.pos..self.pos + 4)
            .filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| self.syntax("malformed \\u escape"))?;
        self.pos += 4;
        u32::from_str_radix(digits, 16).map_err(|_| self.syntax("malformed \\u escape"))
    }
}
