//! Pinned trust anchors: the AWS Nitro Enclaves root G1 (embedded and
//! fingerprint-checked), or a root given as DER/PEM (the mock NSM's).

use std::fmt;

use sha2::{Digest, Sha256};

use super::chain::Cert;
use super::error::AttestationError;

/// DER of the AWS Nitro Enclaves Root G1, as published by AWS.
const AWS_ROOT_G1_DER: &[u8] = include_bytes!("aws_nitro_enclaves_root_g1.der");

/// SHA-256 of the AWS root DER, from AWS's documentation; the embedded
/// bytes are checked against it so a corrupted copy cannot be trusted.
pub const AWS_ROOT_G1_SHA256: &str =
    "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b";

/// Largest root certificate accepted; real roots are well under 2 KiB.
const MAX_ROOT_LEN: usize = 16 * 1024;

/// A root certificate that document chains must end at.
#[derive(Clone)]
pub struct Root {
    cert: std::sync::Arc<Cert>,
    fingerprint: [u8; 32],
}

impl Root {
    /// The AWS Nitro Enclaves Root G1 (valid 2019-10-28..2049-10-28).
    pub fn aws_nitro_enclaves_g1() -> Result<Self, AttestationError> {
        Self::from_der_pinned(AWS_ROOT_G1_DER, AWS_ROOT_G1_SHA256)
    }

    /// A root from DER, refused unless its SHA-256 equals `expected_sha256_hex`.
    pub fn from_der_pinned(
        der: &[u8],
        expected_sha256_hex: &str,
    ) -> Result<Self, AttestationError> {
        let actual = hex::encode(Sha256::digest(der));
        if !actual.eq_ignore_ascii_case(expected_sha256_hex) {
            return Err(AttestationError::RootFingerprintMismatch {
                expected: expected_sha256_hex.to_ascii_lowercase(),
                actual,
            });
        }
        Self::from_der(der)
    }

    /// A root from one DER certificate. It must be a CA with a P-384 key.
    pub fn from_der(der: &[u8]) -> Result<Self, AttestationError> {
        let invalid = |reason: String| AttestationError::InvalidRoot { reason };
        if der.len() > MAX_ROOT_LEN {
            return Err(invalid(format!("{} bytes is too large", der.len())));
        }
        let cert = Cert::parse(der).map_err(invalid)?;
        cert.check_ca(0).map_err(invalid)?;
        cert.p384_key().map_err(|e| invalid(e.to_string()))?;
        Ok(Self {
            cert: std::sync::Arc::new(cert),
            fingerprint: Sha256::digest(der).into(),
        })
    }

    /// A root from a PEM file holding exactly one `CERTIFICATE` block.
    pub fn from_pem(pem: &str) -> Result<Self, AttestationError> {
        let invalid = |reason: String| AttestationError::InvalidRoot { reason };
        if pem.len() > 2 * MAX_ROOT_LEN {
            return Err(invalid(format!("{} bytes is too large", pem.len())));
        }
        const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
        const END: &str = "-----END CERTIFICATE-----";
        if pem.matches(BEGIN).count() != 1 {
            return Err(invalid("PEM must hold exactly one CERTIFICATE".to_owned()));
        }
        let tail = pem
            .find(BEGIN)
            .and_then(|i| pem.get(i..))
            .unwrap_or_default();
        let block = tail
            .find(END)
            .and_then(|i| tail.get(..i + END.len()))
            .ok_or_else(|| invalid("PEM lacks END CERTIFICATE".to_owned()))?;
        let (label, der) =
            der::pem::decode_vec(block.as_bytes()).map_err(|e| invalid(format!("bad PEM: {e}")))?;
        if label != "CERTIFICATE" {
            return Err(invalid(format!("PEM label {label}, expected CERTIFICATE")));
        }
        Self::from_der(&der)
    }

    /// The certificate's DER bytes.
    pub fn der(&self) -> &[u8] {
        self.cert.der()
    }

    /// Subject name, RFC 4514 string.
    pub fn subject(&self) -> String {
        self.cert.subject()
    }

    /// SHA-256 of the DER certificate.
    pub fn fingerprint_sha256(&self) -> [u8; 32] {
        self.fingerprint
    }

    pub(crate) fn cert(&self) -> &Cert {
        &self.cert
    }
}

impl fmt::Debug for Root {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Root")
            .field("subject", &self.subject())
            .field("sha256", &hex::encode(self.fingerprint))
            .finish()
    }
}
