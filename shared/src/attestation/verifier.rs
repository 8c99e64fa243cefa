//! The verification pipeline: COSE_Sign1 → payload → COSE signature → chain
//! → caller's expectations. Each step fails with its own error variant.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use super::chain;
use super::cose::CoseDocument;
use super::document::AttestationDocument;
use super::error::AttestationError;
use super::root::Root;

/// The instant at which certificate validity is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VerifyAt {
    /// The document's own `timestamp`: proves the document was genuine when
    /// made (replays are the caller's problem: check freshness separately).
    Document,
    /// The wall clock when `verify` runs (the safe default).
    #[default]
    Now,
    /// A fixed instant.
    Time(SystemTime),
}

/// Values the verified document must carry, beyond a valid signature.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expectations {
    /// PCR index → exact value.
    pub pcrs: BTreeMap<u16, Vec<u8>>,
    /// Exact nonce (absent in the document = mismatch).
    pub nonce: Option<Vec<u8>>,
    /// Exact public_key (absent in the document = mismatch).
    pub public_key: Option<Vec<u8>>,
}

impl Expectations {
    /// Checks `doc` against these expectations.
    pub fn check(&self, doc: &AttestationDocument) -> Result<(), AttestationError> {
        for (&index, expected) in &self.pcrs {
            let actual = doc
                .pcrs
                .get(&index)
                .ok_or(AttestationError::PcrMissing { index })?;
            if actual != expected {
                return Err(AttestationError::PcrMismatch {
                    index,
                    expected_hex: hex::encode(expected),
                    actual_hex: hex::encode(actual),
                });
            }
        }
        if let Some(nonce) = &self.nonce
            && doc.nonce.as_ref() != Some(nonce)
        {
            return Err(AttestationError::NonceMismatch);
        }
        if let Some(key) = &self.public_key
            && doc.public_key.as_ref() != Some(key)
        {
            return Err(AttestationError::PublicKeyMismatch);
        }
        Ok(())
    }
}

/// Verifies attestation documents against one pinned root.
#[derive(Debug, Clone)]
pub struct Verifier {
    root: Root,
    at: VerifyAt,
    expectations: Expectations,
}

impl Verifier {
    /// A verifier trusting `root`, judging validity at [`VerifyAt::Now`],
    /// with no expectations.
    pub fn new(root: Root) -> Self {
        Self {
            root,
            at: VerifyAt::Now,
            expectations: Expectations::default(),
        }
    }

    /// Sets the instant certificate validity is judged at.
    #[must_use]
    pub fn at(mut self, at: VerifyAt) -> Self {
        self.at = at;
        self
    }

    /// Requires PCR `index` to equal `value`.
    #[must_use]
    pub fn expect_pcr(mut self, index: u16, value: impl Into<Vec<u8>>) -> Self {
        self.expectations.pcrs.insert(index, value.into());
        self
    }

    /// Requires the document's nonce to equal `nonce`.
    #[must_use]
    pub fn expect_nonce(mut self, nonce: impl Into<Vec<u8>>) -> Self {
        self.expectations.nonce = Some(nonce.into());
        self
    }

    /// Requires the document's public_key to equal `key`.
    #[must_use]
    pub fn expect_public_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.expectations.public_key = Some(key.into());
        self
    }

    /// Replaces all expectations at once.
    #[must_use]
    pub fn with_expectations(mut self, expectations: Expectations) -> Self {
        self.expectations = expectations;
        self
    }

    /// The pinned root.
    pub fn root(&self) -> &Root {
        &self.root
    }

    /// Parses `cose_bytes` and runs every check; the document is returned
    /// only if all pass.
    pub fn verify(&self, cose_bytes: &[u8]) -> Result<AttestationDocument, AttestationError> {
        let cose = CoseDocument::parse(cose_bytes)?;
        let doc = AttestationDocument::from_payload(cose.payload())?;
        let path = chain::parse_path(&doc.certificate, &doc.cabundle)?;
        let leaf_key = path
            .first()
            .ok_or_else(|| AttestationError::malformed("no leaf certificate"))?
            .p384_key()?;
        cose.verify(&leaf_key)?;
        let at = match self.at {
            VerifyAt::Document => doc.time().ok_or(AttestationError::BadTime)?,
            VerifyAt::Now => SystemTime::now(),
            VerifyAt::Time(t) => t,
        };
        if at < UNIX_EPOCH {
            return Err(AttestationError::BadTime);
        }
        chain::validate(&path, &self.root, at)?;
        self.expectations.check(&doc)?;
        Ok(doc)
    }
}
