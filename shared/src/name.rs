//! Secret names: the one rule both sides apply.
//!
//! A name is the key path a value is bound to (its KMS encryption context),
//! and it travels in `Load`, `Get` and `List`, logs and error messages. The
//! operator's `encrypt` checks it before anything is sealed, and the enclave
//! checks it again before anything is stored, with the same code.

use std::fmt;

/// Longest secret name, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// Names starting with this prefix belong to the keystore itself, never to
/// an operator's secret: only the names in [`RESERVED_NAMES`] may carry it.
pub const RESERVED_PREFIX: &str = "keystore:";

/// The reserved entry holding the operator's access rules (see
/// [`crate::access`]), written by `keystore-host encrypt --rules`.
pub const RULES_NAME: &str = "keystore:rules";

/// The reserved entry holding the file record of a file-key file (see
/// [`crate::file_record`]), written by `keystore-host encrypt --file-key`.
pub const FILE_NAME: &str = "keystore:file";

/// Every reserved name a secrets file may hold. The enclave never serves
/// their values and never lists them.
pub const RESERVED_NAMES: &[&str] = &[RULES_NAME, FILE_NAME];

/// Whether `name` is one of the keystore's own entries (or tries to look
/// like one): it starts with [`RESERVED_PREFIX`].
pub fn is_reserved(name: &str) -> bool {
    name.starts_with(RESERVED_PREFIX)
}

/// How much of a refused name is echoed in an error.
const ECHOED_CHARS: usize = 64;

/// A name that is not a valid secret name. Names are not secret, but a
/// refused one is echoed only in part so a huge input cannot bloat logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid secret name {name:?}: {reason}")]
pub struct NameError {
    /// The first characters of the refused name.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A checked secret name: non-empty, at most [`MAX_NAME_LEN`] bytes,
/// printable ASCII without leading or trailing spaces, and not starting with
/// [`RESERVED_PREFIX`] unless it is one of the [`RESERVED_NAMES`].
///
/// Refusing control characters and look-alike Unicode keeps names in logs,
/// error messages and `List` answers unambiguous.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretName(String);

impl SecretName {
    /// Checks `name` without taking it.
    pub fn check(name: &str) -> Result<(), NameError> {
        let invalid = |reason| {
            Err(NameError {
                name: name.chars().take(ECHOED_CHARS).collect(),
                reason,
            })
        };
        if name.is_empty() {
            return invalid("empty");
        }
        if name.len() > MAX_NAME_LEN {
            return invalid("longer than 256 bytes");
        }
        if !name.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return invalid("only printable ASCII is allowed");
        }
        if name.starts_with(' ') || name.ends_with(' ') {
            return invalid("leading or trailing space");
        }
        if is_reserved(name) && !RESERVED_NAMES.contains(&name) {
            return invalid("the `keystore:` prefix is reserved for the keystore's own entries");
        }
        Ok(())
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as an owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl TryFrom<String> for SecretName {
    type Error = NameError;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        Self::check(&name)?;
        Ok(SecretName(name))
    }
}

impl TryFrom<&str> for SecretName {
    type Error = NameError;

    fn try_from(name: &str) -> Result<Self, Self::Error> {
        Self::check(name)?;
        Ok(SecretName(name.to_owned()))
    }
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for SecretName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_key_paths_and_refuses_the_rest() {
        for good in [
            "DB_PASSWORD",
            "db.primary.password",
            "a",
            "with space inside",
        ] {
            assert_eq!(SecretName::try_from(good).unwrap().as_str(), good);
        }
        let longest = "n".repeat(MAX_NAME_LEN);
        assert!(SecretName::check(&longest).is_ok());
        // The reserved entries themselves are valid names; a colon elsewhere
        // is ordinary.
        assert!(SecretName::check(RULES_NAME).is_ok() && is_reserved(RULES_NAME));
        assert!(SecretName::check("app:keystore:x").is_ok() && !is_reserved("app:keystore:x"));
        assert!(SecretName::check("Keystore:x").is_ok());
        for (bad, reason) in [
            (String::new(), "empty"),
            ("n".repeat(MAX_NAME_LEN + 1), "longer than 256 bytes"),
            ("tab\there".to_owned(), "only printable ASCII is allowed"),
            ("näme".to_owned(), "only printable ASCII is allowed"),
            (" lead".to_owned(), "leading or trailing space"),
            ("trail ".to_owned(), "leading or trailing space"),
            (
                "keystore:mine".to_owned(),
                "the `keystore:` prefix is reserved for the keystore's own entries",
            ),
            (
                "keystore:".to_owned(),
                "the `keystore:` prefix is reserved for the keystore's own entries",
            ),
        ] {
            let err = SecretName::check(&bad).unwrap_err();
            assert_eq!(err.reason, reason, "{bad:?}");
        }
    }

    #[test]
    fn a_refused_name_is_echoed_only_in_part() {
        let err = SecretName::check(&"\u{7f}".repeat(10_000)).unwrap_err();
        assert_eq!(err.name.chars().count(), ECHOED_CHARS);
        assert!(err.to_string().len() < 512);
    }
}
