//! YAML secrets files, read with an event parser that reports where each
//! scalar sits, so a value can be replaced without touching the rest.
//!
//! Parser: [`saphyr_parser`], the maintained YAML 1.2 event parser of the
//! saphyr project (the successor of yaml-rust/yaml-rust2), safe Rust, with
//! a span on every event. `serde_norway` (used for the access rules) gives
//! no positions. Spans count characters; they are turned into byte offsets
//! here.
//!
//! Accepted: one document whose top level is a mapping, nested mappings
//! and sequences (block or flow), scalars in any style, comments anywhere.
//! Refused with the line and path, because guessing would be unsafe:
//! anchors and aliases (one secret reachable under two names), tags
//! (`!!binary`, custom types), several documents, and keys that are not
//! scalars. A plain scalar is a string unless the YAML 1.2 core schema reads
//! it as null, a boolean or a number (or it is a YAML 1.1 boolean such as
//! `yes`); only strings are sealed.
//!
//! A replaced scalar keeps its quoting where the new text allows it: an
//! envelope (`ENC[v1:...]`, only base64 and `:[]`) stays plain in block
//! context and single/double quoted if it was; inside `[...]`/`{...}` a plain
//! scalar becomes double quoted (`[` and `]` end plain scalars there). A
//! block scalar (`|`, `>`) is replaced from its indicator to its last
//! content character by a one-line scalar.

use std::collections::HashMap;
use std::ops::Range;

use saphyr_parser::{Event, Parser, ScalarStyle};
use zeroize::Zeroizing;

use super::format::{FormatError, Kind, Parsed, PathBuilder, Slot, Style, Top, shorten};

/// Turns the parser's character indexes into byte offsets, walking
/// forward from the last answer (event spans mostly increase).
struct Offsets<'a> {
    text: &'a str,
    chars: usize,
    bytes: usize,
}

impl Offsets<'_> {
    fn byte(&mut self, char_index: usize) -> usize {
        if char_index < self.chars {
            self.chars = 0;
            self.bytes = 0;
        }
        let rest = self.text.get(self.bytes..).unwrap_or_default();
        let mut iter = rest.char_indices();
        while self.chars < char_index {
            match iter.next() {
                Some(_) => self.chars += 1,
                None => break,
            }
            self.bytes = self.text.len() - iter.as_str().len();
        }
        self.bytes
    }
}

enum Frame {
    Map {
        path: String,
        flow: bool,
        /// The pending key: its text, line and byte end.
        key: Option<(String, usize, usize)>,
        keys: HashMap<String, usize>,
    },
    Seq {
        path: String,
        flow: bool,
        index: usize,
        /// Byte offset after the previous item's scalar (or the sequence's
        /// start); `None` after a nested collection, whose end is not
        /// exactly known.
        last_end: Option<usize>,
    },
}

/// Parses `text` (already bounded in size and checked to be UTF-8).
pub(crate) fn parse(text: &str) -> Result<Parsed, FormatError> {
    let mut offsets = Offsets {
        text,
        chars: 0,
        bytes: 0,
    };
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut paths = PathBuilder::default();
    let mut slots: Vec<Slot> = Vec::new();
    let mut top = Top::Yaml {
        block: true,
        indent: 0,
    };
    let mut documents = 0usize;
    let mut top_seen = false;
    while let Some(next) = parser.next_event() {
        let (event, span) = next.map_err(|e| {
            let info = e.info();
            // The scanner's one message that quotes input.
            let reason = if info.starts_with("unexpected character") {
                "unexpected character".to_owned()
            } else {
                info.to_owned()
            };
            FormatError::Syntax {
                line: e.marker().line(),
                reason,
            }
        })?;
        let line = span.start.line();
        let here = |stack: &[Frame]| match stack.last() {
            Some(Frame::Map { path, key, .. }) => match key {
                Some((k, _, _)) => PathBuilder::join(path, k),
                None => shorten(path),
            },
            Some(Frame::Seq { path, index, .. }) => PathBuilder::join(path, &index.to_string()),
            None => "(top level)".to_owned(),
        };
        let unsupported = |what, stack: &[Frame]| FormatError::Unsupported {
            line,
            path: here(stack),
            what,
        };
        match event {
            Event::StreamStart | Event::StreamEnd | Event::Nothing | Event::DocumentEnd => {}
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(unsupported("several documents", &stack));
                }
            }
            Event::Alias(_) => return Err(unsupported("aliases", &stack)),
            Event::Scalar(value, style, anchor, tag) => {
                if anchor != 0 {
                    return Err(unsupported("anchors", &stack));
                }
                if tag.is_some() {
                    return Err(unsupported("tags", &stack));
                }
                let start = offsets.byte(span.start.index());
                let end = offsets.byte(span.end.index());
                if stack.is_empty() {
                    // An empty document (`---` alone) is an empty file.
                    if style == ScalarStyle::Plain && value.is_empty() && !top_seen {
                        top_seen = true;
                        continue;
                    }
                    return Err(FormatError::TopLevel { line });
                }
                let value = Zeroizing::new(value.into_owned());
                let Some(frame) = stack.last_mut() else {
                    continue;
                };
                let (path, flow, header_from) = match frame {
                    Frame::Map {
                        path,
                        flow,
                        key,
                        keys,
                    } => match key.take() {
                        None => {
                            if let Some(first) = keys.get(value.as_str()) {
                                return Err(FormatError::Duplicate {
                                    path: PathBuilder::join(path, &value),
                                    line,
                                    first: *first,
                                });
                            }
                            keys.insert(value.as_str().to_owned(), line);
                            *key = Some((value.as_str().to_owned(), line, end));
                            continue;
                        }
                        Some((k, key_line, key_end)) => {
                            (paths.child(path, &k, key_line)?, *flow, Some(key_end))
                        }
                    },
                    Frame::Seq {
                        path,
                        flow,
                        index,
                        last_end,
                    } => {
                        let child = paths.child(path, &index.to_string(), line)?;
                        *index += 1;
                        let from = *last_end;
                        *last_end = Some(end);
                        (child, *flow, from)
                    }
                };
                let (kind, span) = match style {
                    // A plain scalar never holds ` #` (a comment) nor ends
                    // in a blank: a span that does is not just the scalar.
                    ScalarStyle::Plain
                        if text.get(start..end).is_none_or(|t| {
                            t.contains(" #") || t.contains("\t#") || t.ends_with([' ', '\t', '\n'])
                        }) =>
                    {
                        return Err(FormatError::Syntax {
                            line,
                            reason: "cannot locate the end of a plain scalar".into(),
                        });
                    }
                    ScalarStyle::Plain if is_plain_string(&value) => {
                        (Kind::String(Style::Plain { flow }), start..end)
                    }
                    ScalarStyle::Plain => (Kind::Other, start..end),
                    ScalarStyle::SingleQuoted => (
                        Kind::String(Style::Single { flow }),
                        start..quoted_end(text, start, end, '\'')?,
                    ),
                    ScalarStyle::DoubleQuoted => (
                        Kind::String(Style::Double { flow }),
                        start..quoted_end(text, start, end, '"')?,
                    ),
                    ScalarStyle::Literal | ScalarStyle::Folded => {
                        match header_from.and_then(|from| block_span(text, from, start, end)) {
                            Some(span) => (Kind::String(Style::Block), span),
                            None => (Kind::String(Style::BlockFixed), start..end),
                        }
                    }
                };
                paths.leaf(&path, line, slots.len())?;
                slots.push(Slot {
                    path,
                    line,
                    value,
                    kind,
                    span,
                });
            }
            Event::MappingStart(anchor, ref tag) | Event::SequenceStart(anchor, ref tag) => {
                if anchor != 0 {
                    return Err(unsupported("anchors", &stack));
                }
                if tag.is_some() {
                    return Err(unsupported("tags", &stack));
                }
                let is_map = matches!(event, Event::MappingStart(..));
                let start = offsets.byte(span.start.index());
                let opens_flow = matches!(text.as_bytes().get(start), Some(b'{' | b'['));
                let (path, flow) = match stack.last_mut() {
                    None => {
                        if !is_map || top_seen {
                            return Err(FormatError::TopLevel { line });
                        }
                        top_seen = true;
                        top = Top::Yaml {
                            block: !opens_flow,
                            indent: span.start.col(),
                        };
                        (String::new(), opens_flow)
                    }
                    Some(Frame::Map {
                        path, flow, key, ..
                    }) => match key.take() {
                        None => return Err(unsupported("keys that are not scalars", &stack)),
                        Some((k, key_line, _)) => {
                            (paths.child(path, &k, key_line)?, *flow || opens_flow)
                        }
                    },
                    Some(Frame::Seq {
                        path,
                        flow,
                        index,
                        last_end,
                    }) => {
                        let child = paths.child(path, &index.to_string(), line)?;
                        *index += 1;
                        *last_end = None;
                        (child, *flow || opens_flow)
                    }
                };
                paths.depth(&path, line, stack.len() + 1)?;
                stack.push(if is_map {
                    Frame::Map {
                        path,
                        flow,
                        key: None,
                        keys: HashMap::new(),
                    }
                } else {
                    Frame::Seq {
                        path,
                        flow,
                        index: 0,
                        last_end: Some(start),
                    }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
            }
        }
    }
    Ok(Parsed { slots, top })
}

/// The end of a quoted scalar opening at `start` (the parser's span may run
/// on over trailing blanks and a comment): just after its closing quote.
fn quoted_end(text: &str, start: usize, end: usize, quote: char) -> Result<usize, FormatError> {
    let line = 1 + text
        .get(..start)
        .unwrap_or_default()
        .bytes()
        .filter(|&b| b == b'\n')
        .count();
    let lost = || FormatError::Syntax {
        line,
        reason: "cannot locate the end of a quoted scalar".into(),
    };
    let body = text.get(start..end).ok_or_else(lost)?;
    let mut chars = body.char_indices().skip(1).peekable();
    while let Some((i, c)) = chars.next() {
        if quote == '"' && c == '\\' {
            chars.next();
        } else if c == quote {
            if quote == '\'' && chars.peek().is_some_and(|&(_, n)| n == '\'') {
                chars.next();
            } else {
                return Ok(start + i + 1);
            }
        }
    }
    Err(lost())
}

/// The byte range to replace for a block scalar whose content spans
/// `start..end`: from its `|`/`>` indicator, found by scanning forward from
/// `from` (the end of its key, or of the previous item) over what may sit
/// between them (blanks, line breaks, `:`, `-`, comments), to the end of its
/// last non-blank content line.
fn block_span(text: &str, from: usize, start: usize, end: usize) -> Option<Range<usize>> {
    let between = text.get(from..start)?;
    let mut indicator = None;
    let mut chars = between.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            ' ' | '\t' | '\r' | '\n' | ':' | '-' | '?' => {}
            '#' => {
                for (_, c) in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '|' | '>' => {
                indicator = Some(from + i);
                break;
            }
            _ => return None,
        }
    }
    let indicator = indicator?;
    let mut content = text.get(start..end)?;
    loop {
        let trimmed = content.trim_end_matches([' ', '\t']);
        match trimmed.strip_suffix('\n') {
            Some(t) => content = t.strip_suffix('\r').unwrap_or(t),
            None => break,
        }
    }
    Some(indicator..start + content.len())
}

/// Whether a plain scalar is a string under the YAML 1.2 core schema (not
/// null, a boolean, an integer or a float). The YAML 1.1 booleans (`yes`,
/// `no`, `on`, `off`) count as booleans too: many applications' YAML
/// readers still take them so, and sealing one would turn a setting into a
/// secret; quote a value to have it sealed.
pub(crate) fn is_plain_string(s: &str) -> bool {
    const NOT_STRINGS: &[&str] = &[
        "", "~", "null", "Null", "NULL", "true", "True", "TRUE", "false", "False", "FALSE", ".inf",
        ".Inf", ".INF", "+.inf", "+.Inf", "+.INF", "-.inf", "-.Inf", "-.INF", ".nan", ".NaN",
        ".NAN", "yes", "Yes", "YES", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF",
    ];
    if NOT_STRINGS.contains(&s) {
        return false;
    }
    let digits = |t: &str, radix: u32| !t.is_empty() && t.chars().all(|c| c.is_digit(radix));
    if let Some(hex) = s.strip_prefix("0x") {
        return !digits(hex, 16);
    }
    if let Some(oct) = s.strip_prefix("0o") {
        return !digits(oct, 8);
    }
    // [-+]? ( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?
    let body = s.strip_prefix(['-', '+']).unwrap_or(s);
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(i) => (body.get(..i).unwrap_or_default(), body.get(i + 1..)),
        None => (body, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        None => digits(mantissa, 10),
        Some((int, frac)) => {
            (int.is_empty() && digits(frac, 10))
                || (digits(int, 10) && (frac.is_empty() || digits(frac, 10)))
        }
    };
    let exponent_ok = exponent.is_none_or(|e| digits(e.strip_prefix(['-', '+']).unwrap_or(e), 10));
    !(mantissa_ok && exponent_ok)
}

/// Whether `value` can be written as a plain scalar and read back as the
/// same string: a conservative character set (enough for envelopes).
fn plain_ok(value: &str, flow: bool) -> bool {
    let Some(first) = value.chars().next() else {
        return false;
    };
    (first.is_ascii_alphanumeric() || first == '_')
        && value.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, '_' | '.' | '/' | '+' | '=' | '@' | '-')
                || (!flow && matches!(c, ':' | '[' | ']'))
        })
        && !value.ends_with(':')
        && is_plain_string(value)
}

/// Writes `value` for a scalar written in `style`; returns the style used.
pub(crate) fn encode(style: Style, value: &str) -> (Style, Zeroizing<String>) {
    let flow = match style {
        Style::Plain { flow } | Style::Single { flow } | Style::Double { flow } => flow,
        Style::Block | Style::BlockFixed | Style::Json => false,
    };
    let keep_plain = matches!(style, Style::Plain { .. } | Style::Block);
    if keep_plain && plain_ok(value, flow) {
        return (Style::Plain { flow }, Zeroizing::new(value.to_owned()));
    }
    if matches!(style, Style::Single { .. })
        && value
            .chars()
            .all(|c| c != '\'' && !c.is_control() && !matches!(c, '\u{2028}' | '\u{2029}'))
    {
        let mut out = Zeroizing::new(String::with_capacity(value.len() + 2));
        out.push('\'');
        out.push_str(value);
        out.push('\'');
        return (Style::Single { flow }, out);
    }
    let mut out = Zeroizing::new(String::with_capacity(value.len() + 2));
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{feff}' | '\u{fffe}' | '\u{ffff}' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    (Style::Double { flow }, out)
}

/// Text to add a top-level `name: value` entry (after a `# comment`) at the
/// end of a block mapping, at the mapping's indentation.
pub(crate) fn insertion(
    text: &str,
    top: &Top,
    comment: Option<&str>,
    name: &str,
    value: &str,
) -> Option<(Range<usize>, Zeroizing<String>)> {
    let Top::Yaml {
        block: true,
        indent,
    } = top
    else {
        return None;
    };
    let pad = " ".repeat(*indent);
    let key = encode(Style::Plain { flow: false }, name).1;
    let value = encode(Style::Plain { flow: false }, value).1;
    let mut out = Zeroizing::new(String::new());
    if !text.is_empty() && !text.ends_with('\n') {
        out.push('\n');
    }
    if let Some(comment) = comment {
        out.push_str(&pad);
        out.push_str("# ");
        out.push_str(comment);
        out.push('\n');
    }
    out.push_str(&pad);
    out.push_str(&key);
    out.push_str(": ");
    out.push_str(&value);
    out.push('\n');
    Some((text.len()..text.len(), out))
}
