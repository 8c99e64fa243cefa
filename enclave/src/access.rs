//! The access policy of a loaded set: the operator's rules from the
//! reserved `keystore:rules` entry, or the uid-0 default without one.
//!
//! The rules travel like any value: encrypted by the operator under the
//! pinned KMS key, bound to the name `keystore:rules`, decrypted with the
//! rest of the set by the loader. The store decodes them the moment the
//! entry arrives ([`AccessPolicy::from_entry`]), so a set whose rules do not
//! parse is refused at load and the previous set (with its own policy) keeps
//! serving; a set without the entry gets [`AccessPolicy::default`]. The
//! policy lives inside the [`SecretSet`](crate::store::SecretSet), so values
//! and the rules that govern them are swapped in one atomic step.

use std::fmt;

use keystore_shared::Caller;
use keystore_shared::access::{AccessRules, RULES_NAME, RulesError, is_reserved};

/// Why a read was refused. Names the secret and the caller, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{caller} may not read `{name}`: {why}")]
pub struct AccessDenied {
    /// The secret asked for.
    pub name: String,
    /// The caller, as [`Caller`]'s `Display` writes it.
    pub caller: String,
    /// Why, in terms of the policy (no secret material).
    pub why: &'static str,
}

/// Where a set's access rules came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicySource {
    /// The set had no `keystore:rules` entry: only uid 0 reads.
    Default,
    /// The operator's rules entry.
    Operator,
}

/// The rules governing one set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPolicy {
    rules: AccessRules,
    source: PolicySource,
}

impl Default for AccessPolicy {
    /// No rules entry: only uid 0 may read (no worse than a root-owned
    /// `0600` file).
    fn default() -> Self {
        AccessPolicy {
            rules: AccessRules::root_only(),
            source: PolicySource::Default,
        }
    }
}

impl AccessPolicy {
    /// Decodes the decrypted value of the `keystore:rules` entry (the
    /// canonical JSON `keystore-host encrypt --rules` writes).
    pub fn from_entry(value: &[u8]) -> Result<Self, RulesError> {
        Ok(AccessPolicy {
            rules: AccessRules::from_json(value)?,
            source: PolicySource::Operator,
        })
    }

    /// The rules in force.
    pub fn rules(&self) -> &AccessRules {
        &self.rules
    }

    /// Whether they came from the operator or are the default.
    pub fn source(&self) -> PolicySource {
        self.source
    }

    /// Whether `caller` may read `name`.
    pub fn allows(&self, caller: &Caller, name: &str) -> bool {
        self.rules.allows(caller, name)
    }

    /// `Ok` if `caller` may read `name`; otherwise why not. The answer
    /// depends only on the name and the caller, not on whether the name is
    /// loaded, so a refused caller cannot probe which names exist.
    pub fn check(&self, caller: &Caller, name: &str) -> Result<(), AccessDenied> {
        if self.allows(caller, name) {
            return Ok(());
        }
        let why = if is_reserved(name) {
            "the keystore's own entries are never served"
        } else {
            match self.source {
                PolicySource::Default => {
                    "no access rules are loaded, so only uid 0 may read \
                     (add a rule with `keystore-host encrypt --rules`)"
                }
                PolicySource::Operator => "no access rule grants it",
            }
        };
        Err(AccessDenied {
            name: name.to_owned(),
            caller: caller.to_string(),
            why,
        })
    }
}

impl fmt::Display for AccessPolicy {
    /// A one-line summary for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.source {
            PolicySource::Default => write!(f, "no {RULES_NAME} entry: only uid 0 may read"),
            PolicySource::Operator => {
                write!(
                    f,
                    "{} access rule(s) from {RULES_NAME}",
                    self.rules.rules().len()
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denials_name_the_secret_and_the_caller_and_say_why() {
        let user = Caller {
            uid: Some(1000),
            user: Some("app".into()),
            ..Caller::default()
        };
        let default = AccessPolicy::default();
        assert_eq!(default.source(), PolicySource::Default);
        assert!(default.check(&Caller::root(), "DB").is_ok());
        let denied = default.check(&user, "DB").unwrap_err();
        assert_eq!(
            denied.to_string(),
            "uid 1000 (app) may not read `DB`: no access rules are loaded, so only uid 0 \
             may read (add a rule with `keystore-host encrypt --rules`)"
        );
        let reserved = default.check(&Caller::root(), RULES_NAME).unwrap_err();
        assert!(reserved.to_string().contains("never served"), "{reserved}");

        let operator =
            AccessPolicy::from_entry(br#"{"rules":[{"who":{"user":"app"},"read":["APP_*"]}]}"#)
                .unwrap();
        assert_eq!(operator.source(), PolicySource::Operator);
        assert!(operator.check(&user, "APP_KEY").is_ok());
        assert_eq!(
            operator.check(&user, "DB").unwrap_err().to_string(),
            "uid 1000 (app) may not read `DB`: no access rule grants it"
        );
        assert_eq!(operator.to_string(), "1 access rule(s) from keystore:rules");
        assert!(matches!(
            AccessPolicy::from_entry(b"{}"),
            Err(RulesError::Syntax(_))
        ));
    }
}
