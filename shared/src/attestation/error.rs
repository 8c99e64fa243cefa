//! Why a document was refused: one variant per check, so callers (the KMS
//! emulator, the CLI) can report exactly which rule failed.

use std::time::SystemTime;

use super::time::rfc3339;

/// A failed attestation check. Variants name the check, never secret data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestationError {
    /// The document exceeds [`MAX_DOCUMENT_SIZE`](super::MAX_DOCUMENT_SIZE);
    /// refused before any parsing.
    #[error("document is {len} bytes, over the {max}-byte limit")]
    TooLarge {
        /// Size of the input.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not a well-formed COSE_Sign1 / attestation payload.
    #[error("malformed document: {what}")]
    Malformed {
        /// What was wrong.
        what: String,
    },
    /// The COSE protected header or a certificate uses an algorithm other
    /// than ECDSA P-384 with SHA-384.
    #[error("unsupported algorithm: {alg}")]
    UnsupportedAlgorithm {
        /// The algorithm found.
        alg: String,
    },
    /// The COSE ES384 signature does not verify with the leaf certificate's key.
    #[error("COSE signature does not verify with the leaf certificate's key")]
    BadSignature,
    /// A certificate of the chain is expired or not yet valid at the
    /// verification time. Depth 0 is the leaf (the document's `certificate`).
    #[error(
        "certificate at depth {depth} ({subject}) not valid at {} (valid {}..{})",
        rfc3339(.at), rfc3339(.not_before), rfc3339(.not_after)
    )]
    CertificateNotValidAt {
        /// 0 = leaf, counting up towards the root.
        depth: usize,
        /// Subject of that certificate.
        subject: String,
        /// Its notBefore.
        not_before: SystemTime,
        /// Its notAfter.
        not_after: SystemTime,
        /// The verification time.
        at: SystemTime,
    },
    /// The certificate at `depth` is not correctly issued by the next one
    /// (name, signature, CA constraints or key usage).
    #[error("certificate chain broken at depth {depth}: {reason}")]
    ChainBroken {
        /// 0 = leaf, counting up towards the root.
        depth: usize,
        /// The rule that failed.
        reason: String,
    },
    /// The chain is intact but does not end at the pinned root.
    #[error("chain ends at \"{subject}\", which is not (issued by) the pinned root")]
    UntrustedRoot {
        /// Subject of the top certificate of the document's chain.
        subject: String,
    },
    /// A root certificate given to [`Root`](super::Root) is unusable.
    #[error("invalid root certificate: {reason}")]
    InvalidRoot {
        /// Why.
        reason: String,
    },
    /// Root bytes do not have the pinned SHA-256 fingerprint.
    #[error("root certificate fingerprint {actual} does not match the pinned {expected}")]
    RootFingerprintMismatch {
        /// Pinned SHA-256, hex.
        expected: String,
        /// SHA-256 of the given bytes, hex.
        actual: String,
    },
    /// The payload's `digest` is not "SHA384".
    #[error("digest is {digest:?}, expected \"SHA384\"")]
    BadDigest {
        /// The digest found.
        digest: String,
    },
    /// A PCR has an index ≥ 32 or a length other than 32/48/64 bytes.
    #[error("PCR{index}: {reason}")]
    BadPcr {
        /// The PCR index as found in the document.
        index: u64,
        /// Why it is refused.
        reason: String,
    },
    /// A byte field is longer than its limit.
    #[error("{field} is {len} bytes, over the limit")]
    FieldTooLarge {
        /// Field name in the payload.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// An expected PCR value differs from the document's.
    #[error("PCR{index} mismatch: expected {expected_hex}, document has {actual_hex}")]
    PcrMismatch {
        /// PCR index.
        index: u16,
        /// Expected value, hex.
        expected_hex: String,
        /// Value in the document, hex.
        actual_hex: String,
    },
    /// An expected PCR is absent from the document.
    #[error("PCR{index} expected but absent from the document")]
    PcrMissing {
        /// PCR index.
        index: u16,
    },
    /// The document's nonce is absent or differs from the expected one.
    #[error("nonce does not match the expected nonce")]
    NonceMismatch,
    /// The document's public_key is absent or differs from the expected one.
    #[error("public_key does not match the expected public key")]
    PublicKeyMismatch,
    /// The verification time cannot be represented (e.g. before 1970).
    #[error("verification time out of range")]
    BadTime,
}

impl AttestationError {
    /// Short stable name of the variant, for JSON output and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "TooLarge",
            Self::Malformed { .. } => "Malformed",
            Self::UnsupportedAlgorithm { .. } => "UnsupportedAlgorithm",
            Self::BadSignature => "BadSignature",
            Self::CertificateNotValidAt { .. } => "CertificateNotValidAt",
            Self::ChainBroken { .. } => "ChainBroken",
            Self::UntrustedRoot { .. } => "UntrustedRoot",
            Self::InvalidRoot { .. } => "InvalidRoot",
            Self::RootFingerprintMismatch { .. } => "RootFingerprintMismatch",
            Self::BadDigest { .. } => "BadDigest",
            Self::BadPcr { .. } => "BadPcr",
            Self::FieldTooLarge { .. } => "FieldTooLarge",
            Self::PcrMismatch { .. } => "PcrMismatch",
            Self::PcrMissing { .. } => "PcrMissing",
            Self::NonceMismatch => "NonceMismatch",
            Self::PublicKeyMismatch => "PublicKeyMismatch",
            Self::BadTime => "BadTime",
        }
    }

    pub(crate) fn malformed(what: impl Into<String>) -> Self {
        Self::Malformed { what: what.into() }
    }
}
