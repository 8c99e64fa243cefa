//! AWS Nitro attestation documents: parse the NSM's COSE_Sign1, verify its
//! ES384 signature and certificate chain to a pinned root, and check the
//! PCRs / nonce / public key a caller expects.
//!
//! ```no_run
//! use keystore_shared::attestation::{Root, Verifier, VerifyAt};
//! # fn demo(doc: &[u8], pcr0: Vec<u8>) -> Result<(), keystore_shared::attestation::AttestationError> {
//! let verified = Verifier::new(Root::aws_nitro_enclaves_g1()?)
//!     .at(VerifyAt::Now)
//!     .expect_pcr(0, pcr0)
//!     .verify(doc)?;
//! println!("{}", verified.module_id);
//! # Ok(()) }
//! ```

mod chain;
mod cose;
mod document;
mod error;
mod root;
mod time;
mod verifier;

pub use chain::CertificateInfo;
pub use document::AttestationDocument;
pub use error::AttestationError;
pub use root::{AWS_ROOT_G1_SHA256, Root};
pub use time::rfc3339;
pub use verifier::{Expectations, Verifier, VerifyAt};

/// Largest COSE document accepted, checked before parsing. Real NSM output
/// with 1024-byte public_key, user_data and nonce is about 7.5 KiB.
pub const MAX_DOCUMENT_SIZE: usize = 32 * 1024;

/// Limit for public_key, user_data and nonce (the NSM's own limit).
pub const MAX_FIELD_LEN: usize = 1024;

/// Limit for one DER certificate (the NSM spec says 1024; leave headroom
/// for mock chains with longer names).
pub const MAX_CERT_LEN: usize = 4096;

/// Most certificates accepted in `cabundle` (real documents carry 4).
pub const MAX_CABUNDLE_LEN: usize = 8;

/// PCR indices must be below this (and so at most this many PCRs).
pub const MAX_PCRS: usize = 32;
