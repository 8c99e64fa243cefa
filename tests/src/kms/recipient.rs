//! The `Recipient` parameter: verifying the attestation document (with the
//! project's shared verifier, against the configured root, at the
//! emulator's clock, no older than five minutes), turning its PCRs into the
//! `kms:RecipientAttestation:*` condition keys, and sealing the answer for
//! its RSA public key with the project's KMS-shaped CMS builder.
//!
//! A document that fails verification (signature, chain, root, age, key)
//! is answered with `ValidationException` naming the failed check; a
//! document that verifies but whose PCRs the key policy does not accept is
//! an `AccessDeniedException` from the policy.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keystore_shared::attestation::{Root, Verifier, VerifyAt};
use rsa::PublicKey;
use rsa::pkcs8::DecodePublicKey;

use super::policy::{IMAGE_SHA384, PCR_PREFIX, RequestContext};
use super::protocol::{ErrorKind, KmsError, RecipientInfo};

/// The only key encryption algorithm KMS offers for recipients.
pub const KEY_ENCRYPTION_ALGORITHM: &str = "RSAES_OAEP_SHA_256";
/// KMS refuses attestation documents older than this.
pub const MAX_DOCUMENT_AGE: Duration = Duration::from_secs(5 * 60);
/// How far in the future a document's timestamp may be (clock skew).
pub const MAX_FUTURE_SKEW: Duration = Duration::from_secs(5 * 60);

/// A verified recipient: the key to seal for and the measurements the key
/// policy is checked against.
#[derive(Clone, Debug)]
pub struct AttestedRecipient {
    /// The RSA key from the document's `public_key`.
    pub public_key: PublicKey,
    /// PCR index → value.
    pub pcrs: BTreeMap<u16, Vec<u8>>,
}

impl AttestedRecipient {
    /// Verifies `recipient` against `root` at `now`.
    ///
    /// # Errors
    /// `ValidationException` naming the failed check: unsupported algorithm,
    /// missing, invalid, stale or future document, missing or non-RSA
    /// public key, or no root configured.
    pub fn verify(
        recipient: &RecipientInfo,
        root: Option<&Root>,
        now: SystemTime,
    ) -> Result<AttestedRecipient, KmsError> {
        let algorithm = recipient
            .key_encryption_algorithm
            .as_deref()
            .unwrap_or(KEY_ENCRYPTION_ALGORITHM);
        if algorithm != KEY_ENCRYPTION_ALGORITHM {
            return Err(invalid(format!(
                "KeyEncryptionAlgorithm {algorithm:?} is not supported; use {KEY_ENCRYPTION_ALGORITHM}"
            )));
        }
        let document = recipient
            .attestation_document
            .as_ref()
            .ok_or_else(|| invalid("Recipient requires an AttestationDocument"))?;
        let root = root.ok_or_else(|| {
            invalid(
                "the emulator has no attestation root configured, so it cannot accept a Recipient",
            )
        })?;
        let doc = Verifier::new(root.clone())
            .at(VerifyAt::Time(now))
            .verify(&document.0)
            .map_err(|e| invalid(format!("the attestation document is invalid: {e}")))?;

        let issued = UNIX_EPOCH + Duration::from_millis(doc.timestamp);
        if let Ok(age) = now.duration_since(issued)
            && age > MAX_DOCUMENT_AGE
        {
            return Err(invalid(format!(
                "the attestation document is {} s old; documents older than {} s are refused",
                age.as_secs(),
                MAX_DOCUMENT_AGE.as_secs()
            )));
        }
        if let Ok(ahead) = issued.duration_since(now)
            && ahead > MAX_FUTURE_SKEW
        {
            return Err(invalid(format!(
                "the attestation document's timestamp is {} s in the future",
                ahead.as_secs()
            )));
        }
        let spki = doc
            .public_key
            .as_deref()
            .ok_or_else(|| invalid("the attestation document carries no public_key"))?;
        let public_key = PublicKey::from_public_key_der(spki).map_err(|_| {
            invalid("the attestation document's public_key is not an RSA SubjectPublicKeyInfo")
        })?;
        Ok(AttestedRecipient {
            public_key,
            pcrs: doc.pcrs,
        })
    }

    /// Adds `kms:RecipientAttestation:ImageSha384` (PCR0) and
    /// `kms:RecipientAttestation:PCR<n>` as lower-case hex to `ctx`.
    pub fn add_condition_keys(&self, ctx: &mut RequestContext) {
        for (index, value) in &self.pcrs {
            let hex = hex::encode(value);
            if *index == 0 {
                ctx.set(IMAGE_SHA384, &hex);
            }
            ctx.set(&format!("{PCR_PREFIX}{index}"), &hex);
        }
    }

    /// Seals `plaintext` for the recipient as a KMS-shaped
    /// `CiphertextForRecipient`.
    ///
    /// # Errors
    /// `ValidationException` if the key cannot wrap (too small for OAEP),
    /// `KMSInternalException` for anything else.
    pub fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, KmsError> {
        keystore_cms::seal_for_recipient(plaintext, &self.public_key, &mut rand::rng()).map_err(
            |e| match e {
                keystore_cms::CmsError::KeyWrap => {
                    invalid("the recipient's RSA key is too small for RSAES_OAEP_SHA_256")
                }
                other => KmsError::new(
                    ErrorKind::Internal,
                    format!("CiphertextForRecipient: {other}"),
                ),
            },
        )
    }
}

fn invalid(message: impl Into<String>) -> KmsError {
    KmsError::new(ErrorKind::Validation, message)
}

/// Where the emulator's attestation root comes from. A mock NSM creates its
/// chain on first use, so the emulator may start before the file exists: it
/// is then read on the first request that needs it (and kept once parsed).
#[derive(Debug, Default)]
pub struct AttestationRoot {
    path: Option<std::path::PathBuf>,
    loaded: std::sync::OnceLock<Root>,
}

impl AttestationRoot {
    /// No root: every `Recipient` is refused.
    pub fn none() -> Self {
        Self::default()
    }

    /// A root already parsed.
    pub fn loaded(root: Root) -> Self {
        let loaded = std::sync::OnceLock::new();
        let _ = loaded.set(root);
        Self { path: None, loaded }
    }

    /// A root read from `path` when first needed.
    pub fn later(path: std::path::PathBuf) -> Self {
        Self {
            path: Some(path),
            loaded: std::sync::OnceLock::new(),
        }
    }

    /// The root, reading it now if it was deferred.
    ///
    /// # Errors
    /// `ValidationException` when the deferred file is still missing or is
    /// not a root certificate.
    pub fn get(&self) -> Result<Option<&Root>, KmsError> {
        if let Some(root) = self.loaded.get() {
            return Ok(Some(root));
        }
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let pem = std::fs::read_to_string(path).map_err(|e| {
            invalid(format!(
                "the attestation root {} cannot be read yet: {e}",
                path.display()
            ))
        })?;
        let root = Root::from_pem(&pem).map_err(|e| {
            invalid(format!(
                "the attestation root {} is not usable: {e}",
                path.display()
            ))
        })?;
        Ok(Some(self.loaded.get_or_init(|| root)))
    }
}

#[cfg(test)]
mod root_tests {
    use super::*;
    use keystore_nsm::{MockConfig, MockNsm};

    #[test]
    fn a_deferred_root_is_read_once_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        let root = AttestationRoot::later(pki.join("root.pem"));
        let err = root.get().unwrap_err();
        assert!(err.to_string().contains("cannot be read yet"), "{err}");

        let nsm = MockNsm::open(&pki, MockConfig::default()).unwrap();
        let got = root.get().unwrap().expect("root now present");
        assert_eq!(got.der(), nsm.pki().root_der());
        assert!(AttestationRoot::none().get().unwrap().is_none());
    }
}
