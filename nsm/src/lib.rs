//! The Nitro Security Module: attestation documents, randomness and PCRs.
//!
//! The enclave sees only the [`Nsm`] trait, so the real device and the
//! local mock are interchangeable and every caller is tested against the
//! same contract. The mock (feature `mock`, off by default) lives here and
//! not in the enclave so the production enclave image cannot contain it.
#![forbid(unsafe_code)]

use std::path::PathBuf;

pub mod device;
pub mod entropy;
#[cfg(feature = "mock")]
pub mod mock;

pub use device::{DeviceNsm, NSM_DEVICE_PATH};
#[cfg(feature = "mock")]
pub use mock::{MOCK_NSM_MARKER, MockConfig, MockNsm, MockPki};

/// The most bytes NSM accepts in each of `public_key`, `user_data` and
/// `nonce` (real documents carry exactly 1024 of each).
pub const MAX_ATTESTATION_FIELD: usize = 1024;

/// What an attestation document should bind, besides the PCRs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttestationRequest {
    /// DER SubjectPublicKeyInfo of the key KMS should encrypt to.
    pub public_key: Option<Vec<u8>>,
    /// Application data, e.g. a hash the caller wants bound.
    pub user_data: Option<Vec<u8>>,
    /// A caller's challenge, proving freshness.
    pub nonce: Option<Vec<u8>>,
}

/// One platform configuration register as the NSM reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcrDescription {
    /// Register index (0..=31 on real hardware).
    pub index: u16,
    /// Whether the register can still be extended.
    pub locked: bool,
    /// The register value (48 bytes, SHA-384).
    pub data: Vec<u8>,
}

/// Why an NSM request failed.
#[derive(Debug, thiserror::Error)]
pub enum NsmError {
    /// The device could not be opened (not inside an enclave?).
    #[error(
        "NSM device unavailable at {path}: {reason} (is this running inside a Nitro Enclave? use --nsm mock locally)"
    )]
    DeviceUnavailable {
        /// Device path tried.
        path: String,
        /// What the OS said.
        reason: String,
    },
    /// The NSM answered with an error code.
    #[error("NSM refused the request: {0}")]
    Rejected(String),
    /// The NSM answered with something other than what was asked for.
    #[error("NSM returned an unexpected response: {0}")]
    UnexpectedResponse(String),
    /// An attestation field exceeds what NSM accepts.
    #[error("attestation field `{field}` is {len} bytes; NSM accepts at most {max}")]
    FieldTooLarge {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A PCR index outside what this NSM has.
    #[error("PCR index {0} is out of range")]
    BadPcrIndex(u16),
    /// The mock NSM's PKI directory could not be created or read.
    #[error("mock NSM PKI at {path}: {reason}")]
    MockPki {
        /// The PKI directory.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The mock NSM's configuration was refused.
    #[error("invalid mock NSM configuration: {0}")]
    InvalidConfig(String),
    /// A local failure (OS random generator, clock, signing).
    #[error("NSM internal error: {0}")]
    Internal(String),
}

impl AttestationRequest {
    /// Checks every field against [`MAX_ATTESTATION_FIELD`].
    pub fn check_sizes(&self) -> Result<(), NsmError> {
        let fields = [
            ("public_key", &self.public_key),
            ("user_data", &self.user_data),
            ("nonce", &self.nonce),
        ];
        for (field, value) in fields {
            let len = value.as_ref().map_or(0, Vec::len);
            if len > MAX_ATTESTATION_FIELD {
                return Err(NsmError::FieldTooLarge {
                    field,
                    len,
                    max: MAX_ATTESTATION_FIELD,
                });
            }
        }
        Ok(())
    }
}

/// A Nitro Security Module, real or mock.
///
/// Calls block briefly (an ioctl, or a P-384 signature for the mock): async
/// code calls them from `spawn_blocking`.
pub trait Nsm: Send + Sync + 'static {
    /// Returns a raw, untagged `COSE_Sign1` attestation document binding `req`.
    fn attest(&self, req: &AttestationRequest) -> Result<Vec<u8>, NsmError>;
    /// Fills `buf` with randomness from the NSM.
    fn fill_random(&self, buf: &mut [u8]) -> Result<(), NsmError>;
    /// Describes one PCR.
    fn describe_pcr(&self, index: u16) -> Result<PcrDescription, NsmError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversize_fields_are_named() {
        let req = AttestationRequest {
            nonce: Some(vec![0; MAX_ATTESTATION_FIELD + 1]),
            ..Default::default()
        };
        let err = req.check_sizes().unwrap_err();
        assert!(err.to_string().contains("`nonce` is 1025 bytes"), "{err}");
        let ok = AttestationRequest {
            public_key: Some(vec![0; MAX_ATTESTATION_FIELD]),
            ..Default::default()
        };
        assert!(ok.check_sizes().is_ok());
    }
}
