//! The COSE_Sign1 structure (RFC 9052 §4.2) with ES384, checked in pure Rust.
//!
//! `aws-nitro-enclaves-cose` parses the structure and builds the
//! Sig_structure from the protected header and payload bytes exactly as
//! received; without its openssl feature we plug in SHA-384 and a p384
//! verifying key through its `Hash` / `SigningPublicKey` traits.

use aws_nitro_enclaves_cose::CoseSign1;
use aws_nitro_enclaves_cose::crypto::{Hash, MessageDigest, SignatureAlgorithm, SigningPublicKey};
use aws_nitro_enclaves_cose::error::CoseError;
use aws_nitro_enclaves_cose::header_map::{CborInteger, CborValue};
use p384::ecdsa::signature::hazmat::PrehashVerifier;
use p384::ecdsa::{Signature, VerifyingKey};
use sha2::Digest;

use super::MAX_DOCUMENT_SIZE;
use super::error::AttestationError;

/// COSE algorithm id of ECDSA P-384 with SHA-384.
const ES384: i128 = -35;

/// A parsed COSE_Sign1 whose protected header says ES384.
pub(crate) struct CoseDocument {
    sign1: CoseSign1,
    payload: Vec<u8>,
}

impl CoseDocument {
    /// Bounds the size, parses the structure (untagged or tag 18) and checks
    /// that the protected header names ES384.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self, AttestationError> {
        if bytes.len() > MAX_DOCUMENT_SIZE {
            return Err(AttestationError::TooLarge {
                len: bytes.len(),
                max: MAX_DOCUMENT_SIZE,
            });
        }
        let sign1 = CoseSign1::from_bytes(bytes)
            .map_err(|e| AttestationError::malformed(format!("COSE_Sign1: {e}")))?;
        let (protected, payload) = sign1
            .get_protected_and_payload::<Sha>(None)
            .map_err(|e| AttestationError::malformed(format!("COSE_Sign1: {e}")))?;
        match protected.get(&CborValue::Integer(CborInteger::from(1u8))) {
            Some(CborValue::Integer(alg)) if i128::from(*alg) == ES384 => {}
            Some(CborValue::Integer(alg)) => {
                return Err(AttestationError::UnsupportedAlgorithm {
                    alg: format!("COSE alg {}", i128::from(*alg)),
                });
            }
            Some(other) => {
                return Err(AttestationError::UnsupportedAlgorithm {
                    alg: format!("COSE alg {other:?}"),
                });
            }
            None => {
                return Err(AttestationError::UnsupportedAlgorithm {
                    alg: "no alg in the protected header".to_owned(),
                });
            }
        }
        Ok(Self { sign1, payload })
    }

    /// The payload bytes exactly as they appear in the COSE_Sign1 structure.
    pub(crate) fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Checks the ES384 signature (raw r‖s, 96 bytes) with `key`.
    pub(crate) fn verify(&self, key: &VerifyingKey) -> Result<(), AttestationError> {
        match self.sign1.verify_signature::<Sha>(&Es384Key(key)) {
            Ok(true) => Ok(()),
            Ok(false) => Err(AttestationError::BadSignature),
            Err(e) => Err(AttestationError::malformed(format!("COSE_Sign1: {e}"))),
        }
    }
}

/// SHA-2 for the COSE crate's `Hash` trait.
pub(crate) struct Sha;

impl Hash for Sha {
    fn hash(digest: MessageDigest, data: &[u8]) -> Result<Vec<u8>, CoseError> {
        Ok(match digest {
            MessageDigest::Sha256 => sha2::Sha256::digest(data).to_vec(),
            MessageDigest::Sha384 => sha2::Sha384::digest(data).to_vec(),
            MessageDigest::Sha512 => sha2::Sha512::digest(data).to_vec(),
        })
    }
}

/// A P-384 public key for the COSE crate's `SigningPublicKey` trait.
struct Es384Key<'a>(&'a VerifyingKey);

impl SigningPublicKey for Es384Key<'_> {
    fn get_parameters(&self) -> Result<(SignatureAlgorithm, MessageDigest), CoseError> {
        Ok((SignatureAlgorithm::ES384, MessageDigest::Sha384))
    }

    fn verify(&self, digest: &[u8], signature: &[u8]) -> Result<bool, CoseError> {
        // COSE carries ECDSA signatures as fixed-size r‖s, not DER.
        let Ok(sig) = Signature::from_slice(signature) else {
            return Ok(false);
        };
        Ok(self.0.verify_prehash(digest, &sig).is_ok())
    }
}
