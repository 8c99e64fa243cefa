//! The KMS keys this enclave decrypts with (DESIGN.md, "Pinned key").
//!
//! The key ARNs come from the measured image (`KEYSTORE_KMS_KEY_ARNS`, set
//! by `scripts/build-eif.sh --kms-key-arn`), so they are part of PCR0 like
//! the region. Every `Decrypt` names one of them as `KeyId`, and an answer
//! whose `KeyId` is not the key asked for is refused: credentials supplied
//! by the host (for another key, or another account) cannot make the
//! enclave accept a value encrypted under a key the operator never chose.
//!
//! Only key ARNs are accepted. KMS answers `Decrypt` with the key ARN
//! whatever `KeyId` named, so a pinned alias could never be matched; and an
//! alias can be re-pointed by whoever may `UpdateAlias`, which would defeat
//! the pin.

use std::fmt;
use std::str::FromStr;

/// Most keys one enclave pins (each `Decrypt` may try every one of them).
pub const MAX_PINNED_KEYS: usize = keystore_shared::protocol::MAX_KMS_PINS;
/// Longest ARN accepted (KMS key ARNs are well under 128 characters).
const MAX_ARN_LEN: usize = 256;

/// Why a key ARN was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyArnError {
    /// Not an ARN at all (a bare key id, or garbage).
    #[error(
        "{0:?} is not a KMS key ARN: give the full key ARN, arn:aws:kms:REGION:ACCOUNT:key/KEY-ID (see `aws kms describe-key --key-id ... --query KeyMetadata.Arn`)"
    )]
    NotAnArn(String),
    /// An alias name or alias ARN.
    #[error(
        "{0:?} is an alias: pin the key ARN it points to (`aws kms describe-key --key-id {0} --query KeyMetadata.Arn`); KMS answers with the key ARN, and an alias can be re-pointed"
    )]
    Alias(String),
    /// An ARN of another service, or a malformed KMS ARN.
    #[error("{arn:?} is not a KMS key ARN: {why}")]
    Malformed {
        /// The ARN as given (truncated).
        arn: String,
        /// What is wrong.
        why: &'static str,
    },
}

/// A validated KMS key ARN, `arn:PARTITION:kms:REGION:ACCOUNT:key/KEY-ID`,
/// kept in lower case (KMS writes key ARNs in lower case).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyArn {
    arn: String,
    region_start: usize,
    region_end: usize,
}

impl KeyArn {
    /// The ARN text.
    pub fn as_str(&self) -> &str {
        &self.arn
    }

    /// The region part (the key can only be used through that region's KMS).
    pub fn region(&self) -> &str {
        self.arn
            .get(self.region_start..self.region_end)
            .unwrap_or("")
    }

    /// Whether `other` (e.g. the `KeyId` of a KMS answer) names this key.
    pub fn matches(&self, other: &str) -> bool {
        self.arn.eq_ignore_ascii_case(other)
    }
}

impl fmt::Debug for KeyArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.arn, f)
    }
}

impl fmt::Display for KeyArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.arn)
    }
}

fn shown(text: &str) -> String {
    text.chars().take(MAX_ARN_LEN).collect()
}

impl FromStr for KeyArn {
    type Err = KeyArnError;

    fn from_str(text: &str) -> Result<KeyArn, KeyArnError> {
        let text = text.trim();
        let malformed = |why| KeyArnError::Malformed {
            arn: shown(text),
            why,
        };
        if text.starts_with("alias/") || text.contains(":alias/") {
            return Err(KeyArnError::Alias(shown(text)));
        }
        let lower = text.to_ascii_lowercase();
        let Some(rest) = lower.strip_prefix("arn:") else {
            return Err(KeyArnError::NotAnArn(shown(text)));
        };
        if text.len() > MAX_ARN_LEN {
            return Err(malformed("longer than 256 characters"));
        }
        let mut parts = rest.splitn(5, ':');
        let (Some(partition), Some(service), Some(region), Some(account), Some(resource)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(malformed("an ARN has six ':'-separated fields"));
        };
        let lower_dash = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if !lower_dash(partition) || !partition.starts_with("aws") {
            return Err(malformed(
                "the partition is not aws, aws-cn, aws-us-gov, ...",
            ));
        }
        if service != "kms" {
            return Err(malformed("the service is not kms"));
        }
        if !lower_dash(region) || region.len() > 32 {
            return Err(malformed("the region is not an AWS region name"));
        }
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed("the account is not 12 digits"));
        }
        let Some(key_id) = resource.strip_prefix("key/") else {
            return Err(malformed("the resource is not key/KEY-ID"));
        };
        // A UUID, or a multi-Region key id (mrk- and 32 hex digits).
        let hex_dash = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        let key_ok = match key_id.strip_prefix("mrk-") {
            Some(hex) => hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            None => key_id.len() == 36 && hex_dash(key_id),
        };
        if !key_ok {
            return Err(malformed(
                "the key id is neither a UUID nor a multi-Region key id (mrk-...)",
            ));
        }
        // "arn:" + partition + ":" + "kms" + ":"
        let region_start = 4 + partition.len() + 1 + service.len() + 1;
        Ok(KeyArn {
            region_end: region_start + region.len(),
            region_start,
            arn: lower,
        })
    }
}

/// Why a set of pinned keys was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinnedKeysError {
    /// One ARN is unusable.
    #[error(transparent)]
    Arn(#[from] KeyArnError),
    /// More than [`MAX_PINNED_KEYS`].
    #[error("at most {MAX_PINNED_KEYS} KMS keys can be pinned, not {0}")]
    TooMany(usize),
}

/// The ordered, duplicate-free list of pinned key ARNs (possibly empty:
/// such an enclave refuses every `Load`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinnedKeys {
    keys: Vec<KeyArn>,
}

impl PinnedKeys {
    /// Pins `keys` in order, dropping repeats.
    pub fn new(keys: impl IntoIterator<Item = KeyArn>) -> Result<PinnedKeys, PinnedKeysError> {
        let mut pinned: Vec<KeyArn> = Vec::new();
        for key in keys {
            if !pinned.contains(&key) {
                if pinned.len() == MAX_PINNED_KEYS {
                    return Err(PinnedKeysError::TooMany(MAX_PINNED_KEYS + 1));
                }
                pinned.push(key);
            }
        }
        Ok(PinnedKeys { keys: pinned })
    }

    /// Parses ARNs (each may itself be a comma-separated list, as in
    /// `KEYSTORE_KMS_KEY_ARNS`); empty items are ignored.
    pub fn parse<S: AsRef<str>>(
        items: impl IntoIterator<Item = S>,
    ) -> Result<PinnedKeys, PinnedKeysError> {
        let mut keys = Vec::new();
        for item in items {
            for arn in item.as_ref().split(',').filter(|s| !s.trim().is_empty()) {
                keys.push(arn.parse::<KeyArn>()?);
                if keys.len() > MAX_PINNED_KEYS * 4 {
                    return Err(PinnedKeysError::TooMany(keys.len()));
                }
            }
        }
        PinnedKeys::new(keys)
    }

    /// The keys, in the order they are tried.
    pub fn keys(&self) -> &[KeyArn] {
        &self.keys
    }

    /// Whether no key is pinned.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// How many keys are pinned.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether `key_id` (a KMS answer's `KeyId`) is one of the pinned keys.
    pub fn contains(&self, key_id: &str) -> bool {
        self.keys.iter().any(|k| k.matches(key_id))
    }
}

impl fmt::Display for PinnedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.keys.is_empty() {
            return f.write_str("(none)");
        }
        for (i, key) in self.keys.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(key.as_str())?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const KEY: &str = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

    #[test]
    fn key_arns_parse_and_keep_their_region() {
        let arn: KeyArn = KEY.parse().unwrap();
        assert_eq!(arn.as_str(), KEY);
        assert_eq!(arn.region(), "us-east-1");
        assert!(arn.matches(&KEY.to_ascii_uppercase()));
        let mrk: KeyArn = "arn:aws-us-gov:kms:us-gov-west-1:111122223333:key/mrk-1234abcd12ab34cd56ef1234567890ab"
            .parse()
            .unwrap();
        assert_eq!(mrk.region(), "us-gov-west-1");
        let upper: KeyArn = KEY.to_ascii_uppercase().parse().unwrap();
        assert_eq!(upper, arn);
    }

    #[test]
    fn aliases_bare_ids_and_other_arns_are_refused_with_a_reason() {
        for alias in [
            "alias/keystore",
            "arn:aws:kms:us-east-1:111122223333:alias/keystore",
        ] {
            let err = alias.parse::<KeyArn>().unwrap_err();
            assert!(matches!(err, KeyArnError::Alias(_)), "{err}");
            assert!(err.to_string().contains("describe-key"), "{err}");
        }
        assert!(matches!(
            "1234abcd-12ab-34cd-56ef-1234567890ab".parse::<KeyArn>(),
            Err(KeyArnError::NotAnArn(_))
        ));
        for bad in [
            "arn:aws:s3:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws:kms:us-east-1:1111:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws:kms:us-east-1:111122223333:key/nope",
            "arn:aws:kms:us east:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws:kms:us-east-1:111122223333",
            "arn:x:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        ] {
            assert!(
                matches!(bad.parse::<KeyArn>(), Err(KeyArnError::Malformed { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn lists_split_on_commas_drop_repeats_and_are_bounded() {
        let other = KEY.replace("1234abcd-", "9999abcd-");
        let pinned = PinnedKeys::parse([format!("{KEY}, {other}"), KEY.to_owned()]).unwrap();
        assert_eq!(pinned.len(), 2);
        assert_eq!(pinned.keys()[0].as_str(), KEY);
        assert!(pinned.contains(&other));
        assert!(!pinned.contains("arn:aws:kms:us-east-1:111122223333:key/other"));
        assert!(PinnedKeys::parse([""]).unwrap().is_empty());
        assert_eq!(PinnedKeys::default().to_string(), "(none)");
        let many: Vec<String> = (0..=MAX_PINNED_KEYS)
            .map(|i| KEY.replace("1234abcd-", &format!("{i:08x}-")))
            .collect();
        assert!(matches!(
            PinnedKeys::parse(&many),
            Err(PinnedKeysError::TooMany(_))
        ));
    }
}
