//! The operator's access rules file (`access.yaml`), read for
//! `keystore-host encrypt --rules`.
//!
//! The YAML is parsed here, on the host, into the shared
//! [`RulesDocument`] and checked into [`AccessRules`] with the very code the
//! enclave uses ([`keystore_shared::access`]); what reaches the secrets file
//! is the canonical JSON form, encrypted. The enclave so never links a YAML
//! parser, and a rules file the enclave would refuse is refused here first,
//! with the rule's number.
//!
//! ```yaml
//! rules:
//!   - who: { user: api }          # or uid, group, gid, unit, token
//!     read: ["DB_*", "API_TOKEN"]
//!   - who: { unit: worker.service }
//!     read: ["QUEUE_*"]
//! ```

use std::io::Read;
use std::path::{Path, PathBuf};

use keystore_shared::access::{AccessRules, RulesDocument, RulesError};

/// Largest rules file read. Real rules are a few hundred bytes; whatever is
/// accepted must also fit KMS `Encrypt` (4 KiB) once in canonical JSON.
pub const MAX_RULES_FILE: usize = 256 * 1024;

/// Why a rules file was refused.
#[derive(Debug, thiserror::Error)]
pub enum RulesFileError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file exceeds [`MAX_RULES_FILE`].
    #[error("{path}: {len} bytes or more; a rules file may be at most {MAX_RULES_FILE} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// How much was read before giving up.
        len: usize,
    },
    /// The YAML does not describe rules (syntax, unknown field, a `who`
    /// that is not exactly one known kind, ...).
    #[error("{path}: {message}")]
    Yaml {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The rules parse but break a rule or a bound.
    #[error("{path}: {source}")]
    Rules {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the rule by its 1-based position.
        #[source]
        source: RulesError,
    },
}

/// Reads and checks the rules file at `path`.
pub fn read_rules(path: &Path) -> Result<AccessRules, RulesFileError> {
    let read_err = |source| RulesFileError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_RULES_FILE as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() > MAX_RULES_FILE {
        return Err(RulesFileError::TooLarge {
            path: path.to_owned(),
            len: bytes.len(),
        });
    }
    parse_rules(&bytes).map_err(|err| match err {
        ParseError::Yaml(message) => RulesFileError::Yaml {
            path: path.to_owned(),
            message,
        },
        ParseError::Rules(source) => RulesFileError::Rules {
            path: path.to_owned(),
            source,
        },
    })
}

/// Why YAML text is not acceptable rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not YAML, or not a rules document.
    #[error("{0}")]
    Yaml(String),
    /// A rules document that breaks a rule or a bound.
    #[error(transparent)]
    Rules(#[from] RulesError),
}

/// Parses and checks rules written in YAML (JSON is YAML too).
pub fn parse_rules(yaml: &[u8]) -> Result<AccessRules, ParseError> {
    let document: RulesDocument =
        serde_norway::from_slice(yaml).map_err(|e| ParseError::Yaml(e.to_string()))?;
    Ok(AccessRules::try_from(document)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keystore_shared::Caller;
    use keystore_shared::access::Who;

    #[test]
    fn every_who_kind_reads_from_yaml() {
        let rules = parse_rules(
            br#"
# who may read what
rules:
  - who: { user: api }
    read: ["DB_*", "API_TOKEN"]
  - who: { uid: 1001 }
    read: [A]
  - who: { group: ops }
    read: [B]
  - who: { gid: 50 }
    read: [C]
  - who: { unit: api.service }
    read: [D]
  - who: { token: ci }
    read: [E]
  - who: any
    read:
      - PUBLIC_*
"#,
        )
        .unwrap();
        let who: Vec<&Who> = rules.rules().iter().map(|r| &r.who).collect();
        assert_eq!(
            who,
            [
                &Who::User("api".into()),
                &Who::Uid(1001),
                &Who::Group("ops".into()),
                &Who::Gid(50),
                &Who::Unit("api.service".into()),
                &Who::Token("ci".into()),
                &Who::Any,
            ]
        );
        let api = Caller {
            user: Some("api".into()),
            ..Caller::default()
        };
        assert!(rules.allows(&api, "DB_URL") && !rules.allows(&api, "A"));
        assert!(rules.allows(&Caller::default(), "PUBLIC_KEY"));
        // The canonical JSON reads back to the same rules in the enclave.
        assert_eq!(AccessRules::from_json(&rules.to_json()).unwrap(), rules);
    }

    #[test]
    fn mistakes_are_refused_with_a_location_or_the_rule_number() {
        for (yaml, needle) in [
            (
                "rules:\n  - who: { usr: api }\n    read: [A]\n",
                "unknown variant `usr`",
            ),
            (
                "rules:\n  - who: { user: api }\n    read: [A]\n    write: [B]\n",
                "unknown field `write`",
            ),
            (
                "rules:\n  - who: { user: api, uid: 1 }\n    read: [A]\n",
                "exactly one identity",
            ),
            (
                "rules:\n  - who: !user api\n    read: [A]\n",
                "rules[0].who",
            ),
            ("rules:\n  - who: { user: api }\n    read: A\n", "line 3"),
            ("rule:\n  - who: any\n", "unknown field `rule`"),
            ("rules: [\n", ""),
        ] {
            match parse_rules(yaml.as_bytes()) {
                Err(ParseError::Yaml(message)) => {
                    assert!(message.contains(needle), "{yaml}: {message}")
                }
                other => panic!("{yaml}: expected a YAML error, got {other:?}"),
            }
        }
        let err = parse_rules(
            b"rules:\n  - who: any\n    read: [A]\n  - who: { user: '' }\n    read: [A]\n",
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "rule 2: `who` user \"\": empty");
        let err = parse_rules(b"rules:\n  - who: any\n    read: ['keystore:rules']\n").unwrap_err();
        assert!(err.to_string().starts_with("rule 1: name pattern"), "{err}");
        let err = parse_rules(b"rules:\n  - who: any\n    read: []\n").unwrap_err();
        assert_eq!(err, ParseError::Rules(RulesError::NoPatterns { rule: 1 }));
    }

    /// A small file whose aliases expand to rules the enclave would refuse
    /// as too large (over `MAX_RULES_LEN` bytes of canonical JSON) is
    /// refused here, before anything is encrypted.
    #[test]
    fn aliases_cannot_expand_rules_past_what_the_enclave_accepts() {
        let patterns: Vec<String> = (0..20).map(|i| format!("{i:0>200}")).collect();
        let mut yaml = format!(
            "rules:\n  - who: any\n    read: &p [{}]\n",
            patterns.join(", ")
        );
        for _ in 0..30 {
            yaml.push_str("  - who: any\n    read: *p\n");
        }
        assert!(yaml.len() < 8 * 1024);
        match parse_rules(yaml.as_bytes()) {
            Err(ParseError::Rules(RulesError::TooLarge { len, max })) => assert!(len > max),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }
}
