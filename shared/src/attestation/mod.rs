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

/// The domain tag the enclave puts in front of a caller's `user_data` in
/// every document it makes for an `Attest` request.
///
/// The enclave's NSM signs whatever `user_data` it is given, and other
/// protocols (the audit trail's checkpoints, a third party's own scheme)
/// also rely on NSM-signed `user_data`. Prefixing the caller's bytes with a
/// fixed tag means an `Attest` caller can never obtain a document whose
/// `user_data` another protocol would accept as its own. The tag counts
/// toward the NSM's [`MAX_FIELD_LEN`], so a caller has
/// [`MAX_ATTEST_USER_DATA`] bytes left. A verifier that expects caller data
/// reads it back with [`attest_caller_data`].
pub const ATTEST_USER_DATA_TAG: &[u8] = b"nitro-keystore attest v1\0";

/// Most `user_data` bytes an `Attest` caller may send: the NSM limit less
/// the domain tag.
pub const MAX_ATTEST_USER_DATA: usize = MAX_FIELD_LEN - ATTEST_USER_DATA_TAG.len();

/// The `user_data` the enclave attests for an `Attest` request carrying
/// `caller_data` (none is the same as empty): the tag, then the data.
pub fn attest_user_data(caller_data: Option<&[u8]>) -> Vec<u8> {
    let data = caller_data.unwrap_or_default();
    let mut out = Vec::with_capacity(ATTEST_USER_DATA_TAG.len() + data.len());
    out.extend_from_slice(ATTEST_USER_DATA_TAG);
    out.extend_from_slice(data);
    out
}

/// The caller's data in a document made for an `Attest` request, or `None`
/// when the document's `user_data` does not start with
/// [`ATTEST_USER_DATA_TAG`] (it was not made for an `Attest` request).
pub fn attest_caller_data(user_data: Option<&[u8]>) -> Option<&[u8]> {
    user_data?.strip_prefix(ATTEST_USER_DATA_TAG)
}

/// Limit for one DER certificate (the NSM spec says 1024; leave headroom
/// for mock chains with longer names).
pub const MAX_CERT_LEN: usize = 4096;

/// Most certificates accepted in `cabundle` (real documents carry 4).
pub const MAX_CABUNDLE_LEN: usize = 8;

/// PCR indices must be below this (and so at most this many PCRs).
pub const MAX_PCRS: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attest_user_data_is_tagged_and_read_back() {
        let tagged = attest_user_data(Some(b"mine"));
        assert!(tagged.starts_with(ATTEST_USER_DATA_TAG));
        assert_eq!(attest_caller_data(Some(&tagged)), Some(&b"mine"[..]));
        let empty = attest_user_data(None);
        assert_eq!(empty, ATTEST_USER_DATA_TAG);
        assert_eq!(attest_caller_data(Some(&empty)), Some(&b""[..]));
        assert_eq!(attest_caller_data(Some(b"mine")), None);
        assert_eq!(attest_caller_data(None), None);
        assert_eq!(
            attest_user_data(Some(&[0; MAX_ATTEST_USER_DATA])).len(),
            MAX_FIELD_LEN
        );
    }
}
