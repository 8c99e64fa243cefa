//! One view of a secrets file, whatever its format: `.env`, JSON or YAML.
//!
//! Every format yields the same thing: a list of values, each with its name
//! (the `.env` variable, or the dotted key path `db.password`,
//! `servers.0.token` of a JSON/YAML scalar), its line, and whether it is a
//! string (only strings can be sealed). A value is replaced by splicing new
//! text over its byte span, so everything else in the file (comments, order,
//! indentation, quoting of other values) stays byte for byte. After all
//! changes, [`SecretsFile::render`] parses the new text again and checks
//! that every value reads back exactly as intended, so a splice the reader
//! would understand differently is refused instead of written.
//!
//! The format comes from the file name (`.json`, `.yaml`/`.yml`, anything
//! else is `.env`, as before this module existed), or from an explicit
//! `--format`.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::str::FromStr;

use keystore_shared::name::{MAX_NAME_LEN, RESERVED_NAMES, is_reserved};
use keystore_shared::protocol::MAX_LOAD_ENTRIES;
use zeroize::Zeroizing;

use super::dotenv::{DotEnv, DotEnvError, MAX_FILE_SIZE};
use super::{json, yaml};

/// Deepest nesting of objects/arrays accepted in JSON and YAML.
pub const MAX_DEPTH: usize = 64;

/// Most scalar values (secret or not) accepted in one JSON/YAML file: ten
/// times what one `Load` carries, so plain settings have room beside the
/// secrets while a hostile file cannot make the reader build millions of
/// paths.
pub const MAX_VALUES: usize = 10 * MAX_LOAD_ENTRIES;

/// How much of a path is echoed in an error.
const ECHOED_PATH: usize = 80;

/// A secrets file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `NAME=value` lines.
    Env,
    /// A JSON object.
    Json,
    /// A YAML mapping (one document, no anchors, aliases or tags).
    Yaml,
}

impl Format {
    /// The format a file name implies: `.json`, `.yaml`/`.yml`, otherwise
    /// `.env` (the only format before JSON and YAML, so older files keep
    /// working under any name). Also used for S3 object keys.
    pub fn from_name(name: &str) -> Format {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".json") {
            Format::Json
        } else if lower.ends_with(".yaml") || lower.ends_with(".yml") {
            Format::Yaml
        } else {
            Format::Env
        }
    }

    /// [`Format::from_name`] of the path's file name.
    pub fn from_path(path: &Path) -> Format {
        path.file_name()
            .map_or(Format::Env, |n| Format::from_name(&n.to_string_lossy()))
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "env" | "dotenv" | ".env" => Ok(Format::Env),
            "json" => Ok(Format::Json),
            "yaml" | "yml" => Ok(Format::Yaml),
            _ => Err(format!("unknown format {s:?}; expected env, json or yaml")),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Env => "env",
            Format::Json => "json",
            Format::Yaml => "yaml",
        })
    }
}

/// Why a file is not an acceptable secrets file. Carries lines and paths,
/// never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// An `.env` file's error.
    #[error(transparent)]
    Env(#[from] DotEnvError),
    /// The file exceeds [`MAX_FILE_SIZE`].
    #[error("secrets file is {len} bytes; at most {max} are accepted")]
    TooLarge {
        /// Size of the input.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not UTF-8.
    #[error("line {line}: not valid UTF-8")]
    NotUtf8 {
        /// 1-based line.
        line: usize,
    },
    /// Not valid JSON/YAML.
    #[error("line {line}: {reason}")]
    Syntax {
        /// 1-based line.
        line: usize,
        /// What is wrong, in terms of syntax only.
        reason: String,
    },
    /// The top level is not an object/mapping.
    #[error("line {line}: the top level must be an object (a mapping of names to values)")]
    TopLevel {
        /// 1-based line.
        line: usize,
    },
    /// The same key (or the same dotted path) appears twice.
    #[error("line {line}: {path} is already defined on line {first}")]
    Duplicate {
        /// The repeated path.
        path: String,
        /// Line of the repeat.
        line: usize,
        /// Line of the first definition.
        first: usize,
    },
    /// A YAML feature this reader refuses rather than guesses at.
    #[error("line {line}: {what} (at {path}) are not supported in secrets files")]
    Unsupported {
        /// 1-based line.
        line: usize,
        /// Where.
        path: String,
        /// Which feature.
        what: &'static str,
    },
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("line {line}: {path} is nested deeper than {MAX_DEPTH} levels")]
    TooDeep {
        /// 1-based line.
        line: usize,
        /// Where (shortened).
        path: String,
    },
    /// A dotted path longer than a secret name may be.
    #[error("line {line}: the path {path}... is longer than {MAX_NAME_LEN} bytes")]
    PathTooLong {
        /// 1-based line.
        line: usize,
        /// Its start.
        path: String,
    },
    /// More than [`MAX_VALUES`] values.
    #[error("line {line}: more than {MAX_VALUES} values in one file")]
    TooManyValues {
        /// 1-based line of the value over the limit.
        line: usize,
    },
    /// An empty key.
    #[error("line {line}: empty key under {path:?}")]
    EmptyKey {
        /// 1-based line.
        line: usize,
        /// The parent path.
        path: String,
    },
    /// A `keystore:` path that is not one of the reserved entries.
    #[error(
        "line {line}: {path}: names starting with `keystore:` are reserved; the only one is \
         `keystore:rules`, a top-level string"
    )]
    Reserved {
        /// 1-based line.
        line: usize,
        /// The path.
        path: String,
    },
    /// A value cannot be rewritten in place in this position.
    #[error("line {line}: {path}: {reason}")]
    CannotRewrite {
        /// 1-based line.
        line: usize,
        /// The value's path.
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// After the changes, the file no longer reads back as intended
    /// (nothing is written).
    #[error(
        "after rewriting, the file does not read back as intended (at {path}); nothing was \
         changed"
    )]
    Verify {
        /// The first value that differs, or what failed (shortened).
        path: String,
    },
    /// [`SecretsFile::set_value`] was given an index past the last value.
    #[error("no value number {0}")]
    NoSuchEntry(usize),
}

/// How a JSON/YAML scalar is written, so a replacement keeps its style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Style {
    /// A JSON string.
    Json,
    /// A plain YAML scalar; `flow` inside `[...]`/`{...}`.
    Plain {
        /// Inside a flow collection.
        flow: bool,
    },
    /// `'...'`.
    Single {
        /// Inside a flow collection.
        flow: bool,
    },
    /// `"..."`.
    Double {
        /// Inside a flow collection.
        flow: bool,
    },
    /// `|` or `>` (the span runs from the indicator to the last content
    /// character).
    Block,
    /// `|` or `>` whose indicator could not be located exactly (after a
    /// nested collection in a sequence): read, but never rewritten.
    BlockFixed,
}

/// Whether a scalar is a string (sealable) or something else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A string, in this style.
    String(Style),
    /// A number, boolean or null: never sealed.
    Other,
}

/// One scalar of a JSON/YAML file.
pub(crate) struct Slot {
    pub(crate) path: String,
    pub(crate) line: usize,
    pub(crate) value: Zeroizing<String>,
    pub(crate) kind: Kind,
    /// Byte range of the scalar's text (with quotes or block header).
    pub(crate) span: Range<usize>,
}

/// Where a new top-level entry can go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Top {
    /// Nowhere (no mapping at the top).
    None,
    /// A JSON object.
    Json {
        /// Offset of `{`.
        open: usize,
        /// Offset of `}`.
        close: usize,
        /// End of the last member's value.
        last_end: Option<usize>,
        /// The whitespace before the last member's key.
        separator: String,
    },
    /// A YAML mapping.
    Yaml {
        /// A block mapping (not `{...}`).
        block: bool,
        /// Column of its keys.
        indent: usize,
    },
}

/// What a JSON/YAML reader returns.
pub(crate) struct Parsed {
    pub(crate) slots: Vec<Slot>,
    pub(crate) top: Top,
}

/// Builds and checks dotted paths while a reader walks the tree.
#[derive(Default)]
pub(crate) struct PathBuilder {
    /// Every value's path, with its line: two keys like `a.b` and `a: {b:}`
    /// name the same secret.
    seen: HashMap<String, usize>,
}

impl PathBuilder {
    /// `parent.key`, or `key` at the top.
    pub(crate) fn join(parent: &str, key: &str) -> String {
        let mut path = String::with_capacity(parent.len() + key.len() + 1);
        path.push_str(parent);
        if !parent.is_empty() {
            path.push('.');
        }
        path.push_str(key);
        shorten(&path)
    }

    /// Checks and returns the child path `parent.key`.
    pub(crate) fn child(
        &self,
        parent: &str,
        key: &str,
        line: usize,
    ) -> Result<String, FormatError> {
        if key.is_empty() {
            return Err(FormatError::EmptyKey {
                line,
                path: parent.to_owned(),
            });
        }
        let len = parent.len() + usize::from(!parent.is_empty()) + key.len();
        if len > MAX_NAME_LEN {
            return Err(FormatError::PathTooLong {
                line,
                path: Self::join(parent, key),
            });
        }
        let mut path = String::with_capacity(len);
        path.push_str(parent);
        if !parent.is_empty() {
            path.push('.');
        }
        path.push_str(key);
        if is_reserved(&path) && !RESERVED_NAMES.contains(&path.as_str()) {
            return Err(FormatError::Reserved {
                line,
                path: shorten(&path),
            });
        }
        Ok(path)
    }

    /// Checks a container's depth.
    pub(crate) fn depth(&self, path: &str, line: usize, depth: usize) -> Result<(), FormatError> {
        if depth > MAX_DEPTH {
            return Err(FormatError::TooDeep {
                line,
                path: shorten(path),
            });
        }
        // A reserved entry is a string, never a container.
        if RESERVED_NAMES.contains(&path) {
            return Err(FormatError::Reserved {
                line,
                path: path.to_owned(),
            });
        }
        Ok(())
    }

    /// Records the value at `path`; `count` values came before it.
    pub(crate) fn leaf(
        &mut self,
        path: &str,
        line: usize,
        count: usize,
    ) -> Result<(), FormatError> {
        if count >= MAX_VALUES {
            return Err(FormatError::TooManyValues { line });
        }
        if let Some(first) = self.seen.get(path) {
            return Err(FormatError::Duplicate {
                path: path.to_owned(),
                line,
                first: *first,
            });
        }
        self.seen.insert(path.to_owned(), line);
        Ok(())
    }
}

/// The first characters of a path, for error messages.
pub(crate) fn shorten(path: &str) -> String {
    path.chars().take(ECHOED_PATH).collect()
}

/// One value of a [`SecretsFile`].
#[derive(Clone, Copy)]
pub struct Value<'a> {
    /// The variable name or dotted key path.
    pub name: &'a str,
    /// The value, unquoted and unescaped. May be a plaintext secret.
    pub value: &'a str,
    /// 1-based line the value starts on.
    pub line: usize,
    /// Whether it is a string (numbers, booleans and null are not, and are
    /// never sealed).
    pub is_string: bool,
}

impl fmt::Debug for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Value")
            .field("name", &self.name)
            .field(
                "value",
                &format_args!("[REDACTED {} bytes]", self.value.len()),
            )
            .field("line", &self.line)
            .field("is_string", &self.is_string)
            .finish()
    }
}

/// The text between consecutive `spans` (borrowed; `None` for a span
/// outside the text).
fn gaps(text: &str, spans: impl Iterator<Item = Range<usize>>) -> Vec<Option<&str>> {
    let mut out = Vec::new();
    let mut at = 0;
    for span in spans {
        out.push(text.get(at..span.start));
        at = span.end;
    }
    out.push(text.get(at..));
    out
}

/// A JSON or YAML file: its text and its scalars.
struct Tree {
    format: Format,
    text: Zeroizing<String>,
    slots: Vec<Slot>,
    top: Top,
    /// The text as parsed, and each slot's span in it: what lies between
    /// the spans must come out unchanged.
    original: Zeroizing<String>,
    original_spans: Vec<Range<usize>>,
}

impl Tree {
    fn parse(format: Format, text: Zeroizing<String>) -> Result<Tree, FormatError> {
        let parsed = match format {
            Format::Yaml => yaml::parse(&text)?,
            _ => json::parse(&text)?,
        };
        Ok(Tree {
            format,
            original: text.clone(),
            original_spans: parsed.slots.iter().map(|s| s.span.clone()).collect(),
            text,
            slots: parsed.slots,
            top: parsed.top,
        })
    }

    /// Whether everything outside the values' spans is byte for byte what
    /// was parsed (a splice that ate a comment or a quote is caught here).
    fn layout_kept(&self) -> bool {
        if self.original_spans.len() != self.slots.len() {
            return false;
        }
        let before = gaps(&self.original, self.original_spans.iter().cloned());
        let after = gaps(&self.text, self.slots.iter().map(|s| s.span.clone()));
        before.iter().all(Option::is_some) && before == after
    }

    fn set_value(&mut self, index: usize, value: &str) -> Result<(), FormatError> {
        let slot = self
            .slots
            .get(index)
            .ok_or(FormatError::NoSuchEntry(index))?;
        let (style, encoded) = match (self.format, slot.kind) {
            (Format::Yaml, Kind::String(Style::BlockFixed)) => {
                return Err(FormatError::CannotRewrite {
                    line: slot.line,
                    path: slot.path.clone(),
                    reason: "a block scalar (`|` or `>`) right after a nested collection in a \
                             sequence cannot be rewritten in place; write it as a quoted string",
                });
            }
            (Format::Yaml, Kind::String(style)) => yaml::encode(style, value),
            (Format::Yaml, Kind::Other) => yaml::encode(Style::Double { flow: true }, value),
            _ => (Style::Json, json::encode(value)),
        };
        let span = slot.span.clone();
        self.splice(span, &encoded);
        if let Some(slot) = self.slots.get_mut(index) {
            slot.value = Zeroizing::new(value.to_owned());
            slot.kind = Kind::String(style);
        }
        Ok(())
    }

    /// Replaces `span` with `new`, moving the spans after it.
    fn splice(&mut self, span: Range<usize>, new: &str) {
        let mut text = Zeroizing::new(String::with_capacity(
            self.text.len() - span.len() + new.len(),
        ));
        text.push_str(self.text.get(..span.start).unwrap_or_default());
        text.push_str(new);
        text.push_str(self.text.get(span.end..).unwrap_or_default());
        self.text = text;
        let shift = |at: usize| {
            if at >= span.end {
                at - span.len() + new.len()
            } else {
                at
            }
        };
        for slot in &mut self.slots {
            if slot.span.start >= span.end {
                slot.span = shift(slot.span.start)..shift(slot.span.end);
            } else if slot.span == span {
                slot.span = span.start..span.start + new.len();
            }
        }
        if let Top::Json {
            open,
            close,
            last_end,
            ..
        } = &mut self.top
        {
            *open = shift(*open);
            *close = shift(*close);
            *last_end = last_end.map(shift);
        }
    }
}

/// A parsed secrets file in any [`Format`]: written back unchanged except
/// for the values replaced through [`SecretsFile::set_value`].
pub struct SecretsFile {
    inner: Inner,
}

enum Inner {
    Env(DotEnv),
    Tree(Tree),
}

impl fmt::Debug for SecretsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretsFile")
            .field("format", &self.format())
            .field("names", &self.values().map(|v| v.name).collect::<Vec<_>>())
            .finish()
    }
}

impl SecretsFile {
    /// Parses file contents in `format`. The input is copied into a wiped
    /// buffer; the caller should wipe its own copy.
    pub fn parse(bytes: &[u8], format: Format) -> Result<Self, FormatError> {
        if format == Format::Env {
            return Ok(SecretsFile {
                inner: Inner::Env(DotEnv::parse(bytes)?),
            });
        }
        if bytes.len() > MAX_FILE_SIZE {
            return Err(FormatError::TooLarge {
                len: bytes.len(),
                max: MAX_FILE_SIZE,
            });
        }
        let text = match std::str::from_utf8(bytes) {
            Ok(text) => Zeroizing::new(text.to_owned()),
            Err(e) => {
                let valid = bytes.get(..e.valid_up_to()).unwrap_or_default();
                let line = 1 + valid.iter().filter(|&&b| b == b'\n').count();
                return Err(FormatError::NotUtf8 { line });
            }
        };
        Ok(SecretsFile {
            inner: Inner::Tree(Tree::parse(format, text)?),
        })
    }

    /// The file's format.
    pub fn format(&self) -> Format {
        match &self.inner {
            Inner::Env(_) => Format::Env,
            Inner::Tree(tree) => tree.format,
        }
    }

    /// The values in file order.
    pub fn values(&self) -> Box<dyn ExactSizeIterator<Item = Value<'_>> + '_> {
        match &self.inner {
            Inner::Env(env) => Box::new(env.entries().map(|e| Value {
                name: e.name,
                value: e.value,
                line: e.line,
                is_string: true,
            })),
            Inner::Tree(tree) => Box::new(tree.slots.iter().map(|s| Value {
                name: &s.path,
                value: &s.value,
                line: s.line,
                is_string: matches!(s.kind, Kind::String(_)),
            })),
        }
    }

    /// The value at `name`, if any.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values().find(|v| v.name == name).map(|v| v.value)
    }

    /// Replaces value `index` (as numbered by [`SecretsFile::values`]) with
    /// the string `value`, and nothing else in the text.
    pub fn set_value(&mut self, index: usize, value: &str) -> Result<(), FormatError> {
        match &mut self.inner {
            Inner::Env(env) => env.set_value(index, value).map_err(|e| match e {
                DotEnvError::NoSuchEntry(i) => FormatError::NoSuchEntry(i),
                e => FormatError::Env(e),
            }),
            Inner::Tree(tree) => tree.set_value(index, value),
        }
    }

    /// Adds the top-level string entry `name: value` at the end (after an
    /// optional `# comment` line where the format has comments), keeping
    /// everything before it.
    pub fn append(
        &mut self,
        comment: Option<&str>,
        name: &str,
        value: &str,
    ) -> Result<(), FormatError> {
        match &mut self.inner {
            Inner::Env(env) => Ok(env.append(comment, name, value)?),
            Inner::Tree(tree) => {
                let line = tree.text.lines().count().max(1);
                let refuse = |reason| FormatError::CannotRewrite {
                    line,
                    path: name.to_owned(),
                    reason,
                };
                let (span, new) = match tree.format {
                    Format::Yaml => yaml::insertion(&tree.text, &tree.top, comment, name, value)
                        .ok_or(refuse(
                            "a new entry can only be added to a top-level block mapping; \
                             add it by hand",
                        ))?,
                    _ => json::insertion(&tree.text, &tree.top, name, value)
                        .ok_or(refuse("no top-level object to add the entry to"))?,
                };
                let mut text = Zeroizing::new(String::with_capacity(tree.text.len() + new.len()));
                text.push_str(tree.text.get(..span.start).unwrap_or_default());
                text.push_str(&new);
                text.push_str(tree.text.get(span.end..).unwrap_or_default());
                let new = Tree::parse(tree.format, text).map_err(|_| FormatError::Verify {
                    path: name.to_owned(),
                })?;
                // Everything that was there reads back the same, and the
                // new entry is the only addition.
                let mut old = tree.slots.iter();
                for slot in &new.slots {
                    if slot.path == name && *slot.value == *value {
                        continue;
                    }
                    match old.next() {
                        Some(o) if o.path == slot.path && o.value == slot.value => {}
                        _ => {
                            return Err(FormatError::Verify {
                                path: slot.path.clone(),
                            });
                        }
                    }
                }
                if old.next().is_some() || new.slots.len() != tree.slots.len() + 1 {
                    return Err(FormatError::Verify {
                        path: name.to_owned(),
                    });
                }
                *tree = new;
                Ok(())
            }
        }
    }

    /// The text with every change, after checking that it reads back to
    /// the same values in the same places (a rewrite the format would read
    /// differently is refused, never written).
    pub fn render(&self) -> Result<Zeroizing<String>, FormatError> {
        let text = match &self.inner {
            Inner::Env(env) => Zeroizing::new(env.text().to_owned()),
            Inner::Tree(tree) => tree.text.clone(),
        };
        if let Inner::Tree(tree) = &self.inner
            && !tree.layout_kept()
        {
            return Err(FormatError::Verify {
                path: "(the text between the values)".to_owned(),
            });
        }
        let again = SecretsFile::parse(text.as_bytes(), self.format()).map_err(|e| {
            FormatError::Verify {
                path: shorten(&e.to_string()),
            }
        })?;
        if again.values().len() != self.values().len() {
            return Err(FormatError::Verify {
                path: "(the number of values)".to_owned(),
            });
        }
        for (now, want) in again.values().zip(self.values()) {
            if now.name != want.name || now.value != want.value {
                return Err(FormatError::Verify {
                    path: want.name.to_owned(),
                });
            }
        }
        Ok(text)
    }
}
