//! Who may read which secrets: the operator's access rules.
//!
//! The operator writes rules in YAML; `keystore-host encrypt --rules`
//! parses and checks them on the host and stores their canonical JSON form
//! ([`AccessRules::to_json`]) encrypted under the pinned KMS key as the
//! reserved entry [`RULES_NAME`]. The enclave decrypts that entry with the
//! rest of the set and decodes it with [`AccessRules::from_json`] — it links
//! no YAML parser — then asks [`AccessRules::allows`] on every `Get` and
//! `List`. Both sides run this one module, so what the operator's command
//! accepts is exactly what the enclave enforces.
//!
//! ```yaml
//! rules:
//!   - who: { user: api }          # or uid, group, gid, unit, token, or `any`
//!     read: ["DB_*", "API_TOKEN"]
//! ```
//!
//! A rule grants its `read` patterns to every caller its `who` matches; a
//! caller may read a name when any rule grants it. Without a rules entry the
//! set is governed by [`AccessRules::root_only`]: only uid 0 reads, no worse
//! than a root-owned `0600` file. With rules, root reads what the rules grant
//! it (e.g. `who: { uid: 0 }`) and nothing more: root on the parent can pose
//! as any uid, so it can reach what any rule grants, but a name no rule
//! grants stays unreadable by everyone. Reserved names ([`is_reserved`]) are
//! never granted, whatever the patterns say.
//!
//! # Name patterns
//!
//! `*` matches any run of characters (including none, and including `/`,
//! `.` and `:`), `?` exactly one; every other character matches itself, and
//! there is no escaping (a literal `*` in a name is matched by `?` or `*`).
//! [`glob_match`] is a dozen lines written here rather than a dependency:
//! the glob crates either bring path semantics we do not want (`*` stopping
//! at `/`, `**`, braces, classes) or more code than the enclave's measured
//! image needs for two wildcards. It walks the name once and, on a
//! mismatch, backtracks only to the last `*`, so it costs at most
//! `len(pattern) × len(name)` steps (both at most 256 bytes) on any input —
//! never the exponential blow-up of naive recursive matching on patterns
//! like `*a*a*a*…b`.
//!
//! # Bounds
//!
//! Decoding refuses input over [`MAX_RULES_LEN`] bytes before parsing, and
//! the sequences keep at most [`MAX_RULES`] rules and
//! [`MAX_PATTERNS_PER_RULE`] patterns per rule while decoding (the rest is
//! only counted, so the error can say how many there were). Patterns are at
//! most [`MAX_PATTERN_LEN`] bytes and `who` names at most
//! [`MAX_CALLER_NAME`]. Every violation is a typed [`RulesError`] naming the
//! rule by its 1-based position.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::caller::{Caller, MAX_CALLER_NAME};
use crate::name::{MAX_NAME_LEN, RESERVED_PREFIX};
pub use crate::name::{RULES_NAME, is_reserved};

/// Most rules in one rules entry.
pub const MAX_RULES: usize = 1_000;

/// Most name patterns in one rule's `read` list.
pub const MAX_PATTERNS_PER_RULE: usize = 1_000;

/// Longest name pattern, in bytes: as long as the longest name.
pub const MAX_PATTERN_LEN: usize = MAX_NAME_LEN;

/// Largest encoded rules entry (canonical JSON) accepted, in bytes. A rules
/// entry sealed directly by KMS `Encrypt` is at most 4 KiB anyway; this
/// bound leaves room for larger envelope kinds while keeping the worst-case
/// decode small.
pub const MAX_RULES_LEN: usize = 64 * 1024;

/// How much of a refused pattern or name is echoed in an error.
const ECHOED_CHARS: usize = 64;

/// Why a rules document is refused. Rules are not secret, so messages may
/// quote (the start of) the offending text; rules are numbered from 1 in the
/// order they are written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    /// The encoded rules are larger than [`MAX_RULES_LEN`]: the input, or
    /// the canonical JSON of rules read or built any other way (YAML, whose
    /// aliases can expand a small file, or [`AccessRules::new`]), so the
    /// host never accepts rules the enclave would refuse.
    #[error("the access rules are {len} bytes; at most {max} are accepted")]
    TooLarge {
        /// Size of the input.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The document is not a rules document: bad syntax, a missing or
    /// unknown field, a `who` that is not exactly one known kind.
    #[error("the access rules do not parse: {0}")]
    Syntax(String),
    /// More than [`MAX_RULES`] rules.
    #[error("{count} access rules; at most {max} are accepted")]
    TooManyRules {
        /// Rules in the document.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A rule lists more than [`MAX_PATTERNS_PER_RULE`] patterns.
    #[error("rule {rule}: {count} name patterns; at most {max} are accepted")]
    TooManyPatterns {
        /// The rule's 1-based position.
        rule: usize,
        /// Patterns in its `read` list.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A rule's `read` list is empty, which grants nothing and is almost
    /// certainly a mistake.
    #[error("rule {rule}: `read` is empty; list at least one name pattern")]
    NoPatterns {
        /// The rule's 1-based position.
        rule: usize,
    },
    /// A name pattern is unusable.
    #[error("rule {rule}: name pattern {pattern:?}: {reason}")]
    Pattern {
        /// The rule's 1-based position.
        rule: usize,
        /// The start of the pattern.
        pattern: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A `who` name (user, group, unit or token) is unusable.
    #[error("rule {rule}: `who` {kind} {name:?}: {reason}")]
    Who {
        /// The rule's 1-based position.
        rule: usize,
        /// `user`, `group`, `unit` or `token`.
        kind: &'static str,
        /// The start of the name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Whom a rule is for. Exactly one kind per rule; write several rules to
/// grant the same names to several identities.
///
/// Encoded as a one-key map (`{ user: api }`, `{ uid: 1000 }`) or, for
/// [`Who::Any`], the bare word `any`. Decoding is written by hand so the
/// same shape reads from JSON and from YAML (whose serde crates otherwise
/// expect enums as `!tags`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Who {
    /// The caller's user name on the parent instance.
    User(String),
    /// The caller's numeric uid.
    Uid(u32),
    /// A group the caller is in (primary or supplementary), by name.
    Group(String),
    /// A group the caller is in (primary or supplementary), by id.
    Gid(u32),
    /// The systemd unit the caller runs in, e.g. `api.service`.
    Unit(String),
    /// The name of the HTTP token the caller presented to the agent.
    Token(String),
    /// Every caller, including one the agent could not identify.
    ///
    /// Meant for setups that open the secret port to every peer
    /// (`--secret-peers any`), where a caller is whatever a peer claims.
    /// Risky: a rule with `any` hands its names to every process that can
    /// reach the agent or the port.
    Any,
}

impl Who {
    /// Whether `caller` is this identity. Names compare as exact text.
    pub fn matches(&self, caller: &Caller) -> bool {
        match self {
            Who::User(user) => caller.user.as_deref() == Some(user.as_str()),
            Who::Uid(uid) => caller.uid == Some(*uid),
            Who::Group(group) => caller.in_group(group),
            Who::Gid(gid) => caller.in_gid(*gid),
            Who::Unit(unit) => caller.unit.as_deref() == Some(unit.as_str()),
            Who::Token(token) => caller.token.as_deref() == Some(token.as_str()),
            Who::Any => true,
        }
    }

    /// The kind and name of a named identity, for validation.
    fn name(&self) -> Option<(&'static str, &str)> {
        match self {
            Who::User(n) => Some(("user", n)),
            Who::Group(n) => Some(("group", n)),
            Who::Unit(n) => Some(("unit", n)),
            Who::Token(n) => Some(("token", n)),
            Who::Uid(_) | Who::Gid(_) | Who::Any => None,
        }
    }
}

/// The keys a `who` map may have.
const WHO_KINDS: &[&str] = &["user", "uid", "group", "gid", "unit", "token"];

impl<'de> Deserialize<'de> for Who {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(WhoVisitor)
    }
}

struct WhoVisitor;

impl<'de> Visitor<'de> for WhoVisitor {
    type Value = Who;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("`any` or a map with exactly one of user, uid, group, gid, unit, token")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Who, E> {
        if v == "any" {
            Ok(Who::Any)
        } else {
            Err(E::invalid_value(serde::de::Unexpected::Str(v), &self))
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Who, A::Error> {
        let Some(kind) = map.next_key::<String>()? else {
            return Err(serde::de::Error::invalid_length(0, &self));
        };
        let who = match kind.as_str() {
            "user" => Who::User(map.next_value()?),
            "uid" => Who::Uid(map.next_value()?),
            "group" => Who::Group(map.next_value()?),
            "gid" => Who::Gid(map.next_value()?),
            "unit" => Who::Unit(map.next_value()?),
            "token" => Who::Token(map.next_value()?),
            other => return Err(serde::de::Error::unknown_variant(other, WHO_KINDS)),
        };
        if map.next_key::<IgnoredAny>()?.is_some() {
            return Err(serde::de::Error::custom(
                "`who` names exactly one identity; write one rule per identity",
            ));
        }
        Ok(who)
    }
}

impl fmt::Display for Who {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Who::User(n) => write!(f, "user {n}"),
            Who::Uid(n) => write!(f, "uid {n}"),
            Who::Group(n) => write!(f, "group {n}"),
            Who::Gid(n) => write!(f, "gid {n}"),
            Who::Unit(n) => write!(f, "unit {n}"),
            Who::Token(n) => write!(f, "token {n}"),
            Who::Any => f.write_str("any caller"),
        }
    }
}

/// A checked name pattern: non-empty, at most [`MAX_PATTERN_LEN`] bytes of
/// printable ASCII (like a name), and not aimed at the reserved
/// `keystore:` entries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct NamePattern(String);

impl NamePattern {
    /// Checks `pattern`, without knowing which rule it belongs to.
    pub fn new(pattern: &str) -> Result<Self, &'static str> {
        if pattern.is_empty() {
            return Err("empty");
        }
        if pattern.len() > MAX_PATTERN_LEN {
            return Err("longer than 256 bytes");
        }
        if !pattern.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err("only printable ASCII is allowed, as in names");
        }
        if pattern.starts_with(' ') || pattern.ends_with(' ') {
            return Err("leading or trailing space (no name has one)");
        }
        if pattern.starts_with(RESERVED_PREFIX) {
            return Err("the `keystore:` entries are reserved and never served");
        }
        Ok(NamePattern(pattern.to_owned()))
    }

    /// Whether `name` matches (see [`glob_match`]).
    pub fn matches(&self, name: &str) -> bool {
        glob_match(&self.0, name)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One rule: `who` may read every name matching one of `read`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// Whom the rule is for.
    pub who: Who,
    /// The names granted, as patterns.
    pub read: Vec<NamePattern>,
}

impl Rule {
    /// Whether this rule lets `caller` read `name`.
    pub fn grants(&self, caller: &Caller, name: &str) -> bool {
        self.who.matches(caller) && self.read.iter().any(|p| p.matches(name))
    }
}

/// A checked set of rules. Build it with [`AccessRules::new`],
/// [`AccessRules::from_json`] or from a [`RulesDocument`]; every
/// constructor enforces the bounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessRules {
    rules: Vec<Rule>,
}

impl Default for AccessRules {
    /// The rules of a set without a rules entry: [`AccessRules::root_only`].
    fn default() -> Self {
        AccessRules::root_only()
    }
}

impl AccessRules {
    /// Checks `rules` against every bound and naming rule.
    pub fn new(rules: Vec<Rule>) -> Result<Self, RulesError> {
        if rules.len() > MAX_RULES {
            return Err(RulesError::TooManyRules {
                count: rules.len(),
                max: MAX_RULES,
            });
        }
        for (i, rule) in rules.iter().enumerate() {
            check_rule(i + 1, rule, rule.read.len())?;
        }
        AccessRules { rules }.check_encoded_len()
    }

    /// Refuses rules whose canonical JSON the enclave would refuse as too
    /// large: the counts alone allow far more than [`MAX_RULES_LEN`] bytes.
    fn check_encoded_len(self) -> Result<Self, RulesError> {
        let len = self.to_json().len();
        if len > MAX_RULES_LEN {
            return Err(RulesError::TooLarge {
                len,
                max: MAX_RULES_LEN,
            });
        }
        Ok(self)
    }

    /// What applies without a rules entry: uid 0 may read every name, and
    /// nobody else anything.
    pub fn root_only() -> Self {
        AccessRules {
            rules: vec![Rule {
                who: Who::Uid(0),
                read: vec![NamePattern("*".to_owned())],
            }],
        }
    }

    /// The rules, in the order written.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether `caller` may read `name`: some rule matching the caller
    /// grants a pattern matching the name. Reserved names are never
    /// readable.
    pub fn allows(&self, caller: &Caller, name: &str) -> bool {
        !is_reserved(name) && self.rules.iter().any(|rule| rule.grants(caller, name))
    }

    /// Decodes the canonical JSON form the enclave receives, enforcing every
    /// bound (see the module documentation).
    pub fn from_json(bytes: &[u8]) -> Result<Self, RulesError> {
        if bytes.len() > MAX_RULES_LEN {
            return Err(RulesError::TooLarge {
                len: bytes.len(),
                max: MAX_RULES_LEN,
            });
        }
        let document: RulesDocument =
            serde_json::from_slice(bytes).map_err(|e| RulesError::Syntax(e.to_string()))?;
        AccessRules::try_from(document)
    }

    /// The canonical JSON form: compact, fields in a fixed order, rules and
    /// patterns in the order written. [`AccessRules::from_json`] reads it
    /// back to an equal value.
    pub fn to_json(&self) -> Vec<u8> {
        // Strings, numbers and sequences only: serializing cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A rules document as decoded from JSON or YAML, before its names and
/// patterns are checked: convert it with `AccessRules::try_from`. Decoding
/// already bounds its sequences and refuses unknown fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesDocument {
    rules: Capped<RawRule, MAX_RULES>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    who: Who,
    read: Capped<String, MAX_PATTERNS_PER_RULE>,
}

impl TryFrom<RulesDocument> for AccessRules {
    type Error = RulesError;

    fn try_from(document: RulesDocument) -> Result<Self, RulesError> {
        let Capped { items, total } = document.rules;
        if total > MAX_RULES {
            return Err(RulesError::TooManyRules {
                count: total,
                max: MAX_RULES,
            });
        }
        let mut rules = Vec::with_capacity(items.len());
        for (i, raw) in items.into_iter().enumerate() {
            let rule_no = i + 1;
            let mut read = Vec::with_capacity(raw.read.items.len());
            for pattern in &raw.read.items {
                read.push(
                    NamePattern::new(pattern).map_err(|reason| RulesError::Pattern {
                        rule: rule_no,
                        pattern: echo(pattern),
                        reason,
                    })?,
                );
            }
            let rule = Rule { who: raw.who, read };
            check_rule(rule_no, &rule, raw.read.total)?;
            rules.push(rule);
        }
        AccessRules { rules }.check_encoded_len()
    }
}

/// Checks one rule; `patterns` is how many its document listed (more than
/// were kept when over the bound).
fn check_rule(rule_no: usize, rule: &Rule, patterns: usize) -> Result<(), RulesError> {
    if patterns > MAX_PATTERNS_PER_RULE {
        return Err(RulesError::TooManyPatterns {
            rule: rule_no,
            count: patterns,
            max: MAX_PATTERNS_PER_RULE,
        });
    }
    if patterns == 0 {
        return Err(RulesError::NoPatterns { rule: rule_no });
    }
    if let Some((kind, name)) = rule.who.name() {
        let reason = if name.is_empty() {
            Some("empty")
        } else if name.len() > MAX_CALLER_NAME {
            Some("longer than 256 bytes")
        } else if name.chars().any(char::is_control) {
            Some("control characters are not allowed")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(RulesError::Who {
                rule: rule_no,
                kind,
                name: echo(name),
                reason,
            });
        }
    }
    Ok(())
}

fn echo(text: &str) -> String {
    text.chars().take(ECHOED_CHARS).collect()
}

/// A sequence that keeps at most `MAX` elements while decoding and only
/// counts the rest (skipping them without building them), so an oversized
/// document costs no more memory than a full one and the error can still
/// say how many elements there were.
#[derive(Debug)]
struct Capped<T, const MAX: usize> {
    items: Vec<T>,
    total: usize,
}

impl<'de, T: Deserialize<'de>, const MAX: usize> Deserialize<'de> for Capped<T, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(CappedVisitor::<T, MAX>(PhantomData))
    }
}

struct CappedVisitor<T, const MAX: usize>(PhantomData<T>);

impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for CappedVisitor<T, MAX> {
    type Value = Capped<T, MAX>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list of at most {MAX} elements")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(16));
        let mut total = 0usize;
        loop {
            if items.len() < MAX {
                match seq.next_element::<T>()? {
                    Some(item) => items.push(item),
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            total = total.saturating_add(1);
        }
        Ok(Capped { items, total })
    }
}

/// Glob matching over bytes: `*` any run (possibly empty), `?` one byte,
/// anything else itself. Iterative, backtracking only to the last `*`: at
/// most `pattern.len() × name.len()` steps, whatever the input.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0usize, 0usize);
    // Where the last `*` was, and the name position it currently absorbs up
    // to.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == b'?' || Some(&c) == n.get(ni) => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                // Let the last `*` absorb one more byte and retry after it.
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..)
        .is_some_and(|rest| rest.iter().all(|&c| c == b'*'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (pattern, name, expected) in [
            ("*", "ANY", true),
            ("*", "", true),
            ("", "", true),
            ("", "x", false),
            ("DB_*", "DB_PASSWORD", true),
            ("DB_*", "DB_", true),
            ("DB_*", "API_KEY", false),
            ("*_KEY", "API_KEY", true),
            ("A?C", "ABC", true),
            ("A?C", "AC", false),
            ("*a*b*", "xxaxxbxx", true),
            ("*a*b*", "xxbxxaxx", false),
            ("db/*", "db/primary/password", true),
            ("EXACT", "EXACT", true),
            ("EXACT", "EXACTLY", false),
            ("a*c", "abcbc", true),
            ("a*c", "abcb", false),
            ("**x", "x", true),
            ("?", "", false),
        ] {
            assert_eq!(
                glob_match(pattern, name),
                expected,
                "{pattern:?} vs {name:?}"
            );
        }
    }

    /// Found while writing the `rules_parse` fuzz property "rules that
    /// parse re-encode to JSON the enclave reads back": the counts allow
    /// 1000 rules of 1000 patterns, megabytes of canonical JSON, but the
    /// enclave refuses more than `MAX_RULES_LEN` bytes, so the host's
    /// `encrypt --file-key` stored rules the enclave then refused, failing
    /// every load.
    #[test]
    fn rules_the_enclave_would_refuse_as_too_large_are_refused_when_built() {
        let long = "P".repeat(MAX_PATTERN_LEN);
        let rule = |n: usize| Rule {
            who: Who::Any,
            read: vec![NamePattern::new(&long).unwrap(); n],
        };
        // 300 patterns of 256 bytes: under every count, over 64 KiB.
        let err = AccessRules::new(vec![rule(300)]).unwrap_err();
        assert!(
            matches!(err, RulesError::TooLarge { len, max: MAX_RULES_LEN } if len > MAX_RULES_LEN),
            "{err:?}"
        );
        let document: RulesDocument = serde_json::from_value(serde_json::json!({
            "rules": [{ "who": "any", "read": vec![long.as_str(); 300] }]
        }))
        .unwrap();
        assert!(matches!(
            AccessRules::try_from(document),
            Err(RulesError::TooLarge { .. })
        ));
        // Just under the bound: accepted, and the enclave reads it back.
        let fits = AccessRules::new(vec![rule(200)]).unwrap();
        assert!(fits.to_json().len() <= MAX_RULES_LEN);
        assert_eq!(AccessRules::from_json(&fits.to_json()).unwrap(), fits);
    }
}
