//! Opening (and, with feature `seal`, producing) KMS `CiphertextForRecipient`.
//!
//! When the enclave calls KMS `Decrypt` with a `Recipient` (an attestation
//! document carrying our RSA public key), KMS does not return the plaintext.
//! It returns a CMS `EnvelopedData`, encoded in **BER with indefinite
//! lengths**, that only the holder of the enclave's private key can open:
//!
//! ```text
//! ContentInfo(envelopedData)
//!   EnvelopedData v2
//!     RecipientInfos: exactly one KeyTransRecipientInfo v2
//!       rid            [0] subjectKeyIdentifier = SHA-256(our SPKI DER)
//!       keyEncryption  RSAES-OAEP(SHA-256, MGF1-SHA-256, empty label)
//!       encryptedKey   RSA-OAEP(32-byte AES key)
//!     EncryptedContentInfo
//!       contentType    id-data
//!       algorithm      AES-256-CBC, parameters = 16-byte IV
//!       [0] ciphertext (primitive, or constructed from OCTET STRING chunks)
//! ```
//!
//! [`open`] is the one function the rest of the enclave needs; [`parse`] is
//! the structural half of it, exposed for diagnostics, tests and fuzzing.
//! Both accept untrusted bytes: sizes and nesting depth are bounded before
//! any decoding, nothing panics, and every decryption failure (RSA-OAEP or
//! CBC padding) collapses into the single [`CmsError::Decryption`] so that a
//! caller who can submit blobs learns nothing about *why* decryption failed.
//!
//! `seal_for_recipient` (feature `seal`, off by default) produces the same
//! shape byte-for-byte (up to the random parts) so a KMS emulator can answer
//! exactly like real KMS. The enclave never needs it, so its image does not
//! carry it.
#![forbid(unsafe_code)]

mod ber;
#[cfg(feature = "seal")]
mod builder;

#[cfg(feature = "seal")]
pub use builder::seal_for_recipient;

use aes::Aes256;
use cbc::cipher::{BlockModeDecrypt, KeyIvInit, block_padding::NoPadding};
use cms::content_info::{CmsVersion, ContentInfo};
use cms::enveloped_data::{EnvelopedData, RecipientIdentifier, RecipientInfo};
use const_oid::ObjectIdentifier;
use const_oid::db::{rfc5911, rfc5912};
use der::asn1::OctetString;
use der::{Decode, EncodingRules, Sequence};
use rsa::pkcs8::EncodePublicKey;
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, PrivateKey, PublicKey};
use sha2::{Digest, Sha256};
use spki::AlgorithmIdentifierOwned;
use zeroize::Zeroizing;

/// Largest plaintext we produce or accept: the design caps a secret value at
/// 1 MiB, so anything larger is not something KMS should be sending us.
pub const MAX_PLAINTEXT_LEN: usize = 1024 * 1024;

/// Largest blob [`open`]/[`parse`] will look at: the 1 MiB plaintext plus one
/// padding block, the 2-byte chunk headers (about 0.4 %), and the envelope
/// itself (under 1 KiB even with an RSA-4096 key), rounded up generously.
pub const MAX_BLOB_LEN: usize = MAX_PLAINTEXT_LEN + 64 * 1024;

/// Deepest TLV nesting we accept (the outermost value is level 1). The KMS
/// shape reaches level 11 (the OID inside the SHA-256 AlgorithmIdentifier
/// inside the MGF1 parameters); the bound keeps
/// hostile input from driving deep recursion or repeated indefinite-length
/// scans.
pub const MAX_NESTING_DEPTH: usize = 16;

/// AES-256 key length; KMS always wraps a 256-bit content key.
const CONTENT_KEY_LEN: usize = 32;

/// AES block size, which is also the CBC IV length.
const BLOCK_LEN: usize = 16;

/// Why a `CiphertextForRecipient` could not be parsed, opened or built.
///
/// Structural variants say what was wrong so that operators can diagnose a
/// misbehaving KMS (or emulator); [`CmsError::Decryption`] deliberately says
/// nothing more. No variant ever carries key material or plaintext.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CmsError {
    /// The blob is over [`MAX_BLOB_LEN`].
    #[error("CMS blob is {len} bytes, over the {max}-byte limit")]
    TooLarge {
        /// Size of the rejected blob.
        len: usize,
        /// The limit it exceeded.
        max: usize,
    },
    /// The blob nests deeper than [`MAX_NESTING_DEPTH`].
    #[error("CMS blob nests deeper than {max} levels")]
    TooDeep {
        /// The limit it exceeded.
        max: usize,
    },
    /// The blob is not well-formed BER for the CMS schema.
    #[error("CMS blob is malformed: {0}")]
    Malformed(#[from] der::Error),
    /// The outer ContentInfo is not `envelopedData`.
    #[error("content type is {0}, expected envelopedData")]
    NotEnvelopedData(ObjectIdentifier),
    /// A version field is not the one the KMS shape uses.
    #[error("{structure} version is {found}, expected {expected}")]
    Version {
        /// Which structure carried the version.
        structure: &'static str,
        /// The version found.
        found: u8,
        /// The version required.
        expected: u8,
    },
    /// An optional field KMS never sends is present.
    #[error("unexpected {0} in EnvelopedData")]
    UnexpectedField(&'static str),
    /// There is not exactly one recipient.
    #[error("expected exactly one recipient, found {0}")]
    RecipientCount(usize),
    /// The recipient is not a KeyTransRecipientInfo (RSA key transport).
    #[error("recipient is not a KeyTransRecipientInfo")]
    NotKeyTransport,
    /// The recipient is named by issuer and serial number, not by key identifier.
    #[error("recipient identifier is not a subjectKeyIdentifier")]
    NotSubjectKeyIdentifier,
    /// The recipient's subjectKeyIdentifier is not SHA-256 of our public key:
    /// the blob was made for another (for example an older) recipient key.
    #[error("blob is addressed to another recipient key")]
    RecipientMismatch,
    /// The key encryption algorithm is not RSAES-OAEP with SHA-256/MGF1-SHA-256
    /// and an empty label.
    #[error("unsupported key encryption: {0}")]
    UnsupportedKeyEncryption(&'static str),
    /// The encrypted key cannot be an RSA ciphertext for our key size.
    #[error("encrypted key is {found} bytes, expected {expected}")]
    EncryptedKeyLength {
        /// Length found.
        found: usize,
        /// The modulus size of our key.
        expected: usize,
    },
    /// The inner content type is not `id-data`.
    #[error("encrypted content type is {0}, expected id-data")]
    ContentType(ObjectIdentifier),
    /// The content encryption algorithm is not AES-256-CBC.
    #[error("content encryption algorithm is {0}, expected AES-256-CBC")]
    UnsupportedContentEncryption(ObjectIdentifier),
    /// The AES-256-CBC parameters are not a 16-byte OCTET STRING IV.
    #[error("AES-256-CBC parameters are not a 16-byte IV")]
    BadIv,
    /// There is no encryptedContent (detached content is not supported).
    #[error("encryptedContent is missing")]
    MissingContent,
    /// The ciphertext length is not a non-zero multiple of the AES block size.
    #[error("ciphertext is {0} bytes, not a non-zero multiple of 16")]
    CiphertextLength(usize),
    /// Unwrapping the content key or removing the CBC padding failed. One
    /// opaque variant on purpose: telling these apart would hand a padding
    /// oracle to whoever can submit blobs.
    #[error("decryption failed")]
    Decryption,
    /// `seal_for_recipient` was given more than [`MAX_PLAINTEXT_LEN`] bytes.
    #[error("plaintext is {len} bytes, over the {max}-byte limit")]
    PlaintextTooLarge {
        /// Size of the rejected plaintext.
        len: usize,
        /// The limit it exceeded.
        max: usize,
    },
    /// The recipient public key could not be encoded as SubjectPublicKeyInfo.
    #[error("cannot encode the recipient public key")]
    PublicKeyEncoding,
    /// AES-256-CBC encryption of the content failed (buffer sizing).
    #[error("content encryption failed")]
    ContentEncryption,
    /// RSA-OAEP encryption of the content key failed (key too small).
    #[error("RSA-OAEP encryption of the content key failed")]
    KeyWrap,
}

/// The parts of a `CiphertextForRecipient` that [`open`] uses, after every
/// structural check has passed. Everything here is ciphertext or public
/// metadata, so deriving `Debug` is safe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvelopeInfo {
    /// The recipient's subjectKeyIdentifier (32 bytes for KMS).
    pub subject_key_identifier: Vec<u8>,
    /// RSA-OAEP ciphertext of the content key.
    pub encrypted_key: Vec<u8>,
    /// AES-256-CBC initialisation vector.
    pub iv: [u8; BLOCK_LEN],
    /// AES-256-CBC ciphertext, chunks already joined.
    pub ciphertext: Vec<u8>,
}

/// `RSAES-OAEP-params` (RFC 8017 A.2.1); every field is optional because each
/// has a DEFAULT (SHA-1, MGF1-SHA-1, empty label) which we must then reject.
#[derive(Sequence)]
struct OaepParams {
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    hash: Option<AlgorithmIdentifierOwned>,
    #[asn1(context_specific = "1", tag_mode = "EXPLICIT", optional = "true")]
    mask_gen: Option<AlgorithmIdentifierOwned>,
    #[asn1(context_specific = "2", tag_mode = "EXPLICIT", optional = "true")]
    p_source: Option<AlgorithmIdentifierOwned>,
}

/// SHA-256 of a DER SubjectPublicKeyInfo: the subjectKeyIdentifier that KMS
/// puts in `rid` (over the whole SPKI, unlike the RFC 5280/7093 methods that
/// hash only the key bits), so the enclave can tell whether a blob was made
/// for its current recipient key or for a rotated-out one.
pub fn subject_key_identifier(spki_der: &[u8]) -> [u8; 32] {
    Sha256::digest(spki_der).into()
}

/// The subjectKeyIdentifier of an RSA public key (SHA-256 of its SPKI DER).
///
/// # Errors
/// [`CmsError::PublicKeyEncoding`] if the key cannot be DER-encoded.
pub fn rsa_subject_key_identifier(key: &PublicKey) -> Result<[u8; 32], CmsError> {
    let spki = key
        .to_public_key_der()
        .map_err(|_| CmsError::PublicKeyEncoding)?;
    Ok(subject_key_identifier(spki.as_bytes()))
}

/// Parses and checks everything about a `CiphertextForRecipient` that does
/// not need the private key, and returns the pieces [`open`] decrypts.
///
/// Accepts BER (indefinite lengths, constructed `[0]` encryptedContent made
/// of OCTET STRING chunks) as real KMS sends it, and DER as openssl sends it.
///
/// # Errors
/// A structural [`CmsError`] variant saying what is wrong.
pub fn parse(blob: &[u8]) -> Result<EnvelopeInfo, CmsError> {
    if blob.len() > MAX_BLOB_LEN {
        return Err(CmsError::TooLarge {
            len: blob.len(),
            max: MAX_BLOB_LEN,
        });
    }
    ber::check_depth(blob, MAX_NESTING_DEPTH)?;

    let content_info = ContentInfo::from_ber(blob)?;
    if content_info.content_type != rfc5911::ID_ENVELOPED_DATA {
        return Err(CmsError::NotEnvelopedData(content_info.content_type));
    }
    let enveloped: EnvelopedData = content_info
        .content
        .decode_as_encoding(EncodingRules::Ber)?;

    check_version("EnvelopedData", enveloped.version, CmsVersion::V2)?;
    if enveloped.originator_info.is_some() {
        return Err(CmsError::UnexpectedField("originatorInfo"));
    }
    if enveloped.unprotected_attrs.is_some() {
        return Err(CmsError::UnexpectedField("unprotectedAttrs"));
    }

    let recipients = enveloped.recip_infos.0.as_slice();
    let [recipient] = recipients else {
        return Err(CmsError::RecipientCount(recipients.len()));
    };
    let RecipientInfo::Ktri(ktri) = recipient else {
        return Err(CmsError::NotKeyTransport);
    };
    check_version("KeyTransRecipientInfo", ktri.version, CmsVersion::V2)?;
    let RecipientIdentifier::SubjectKeyIdentifier(ski) = &ktri.rid else {
        return Err(CmsError::NotSubjectKeyIdentifier);
    };
    check_key_encryption(&ktri.key_enc_alg)?;

    let eci = &enveloped.encrypted_content;
    if eci.content_type != rfc5911::ID_DATA {
        return Err(CmsError::ContentType(eci.content_type));
    }
    let iv = check_content_encryption(&eci.content_enc_alg)?;
    let ciphertext = eci
        .encrypted_content
        .as_ref()
        .ok_or(CmsError::MissingContent)?
        .as_bytes();
    if ciphertext.is_empty() || !ciphertext.len().is_multiple_of(BLOCK_LEN) {
        return Err(CmsError::CiphertextLength(ciphertext.len()));
    }

    Ok(EnvelopeInfo {
        subject_key_identifier: ski.0.as_bytes().to_vec(),
        encrypted_key: ktri.enc_key.as_bytes().to_vec(),
        iv,
        ciphertext: ciphertext.to_vec(),
    })
}

/// Opens a KMS `CiphertextForRecipient` with the enclave's recipient key and
/// returns the plaintext.
///
/// Checks, in order: the structure ([`parse`]), that the blob is addressed to
/// `key` (subjectKeyIdentifier == SHA-256 of its SPKI DER, so a blob for a
/// rotated-out key is reported as such rather than as a decryption failure),
/// then unwraps the 32-byte AES key with RSA-OAEP and decrypts AES-256-CBC.
///
/// # Errors
/// A structural [`CmsError`], [`CmsError::RecipientMismatch`], or the opaque
/// [`CmsError::Decryption`].
pub fn open(blob: &[u8], key: &PrivateKey) -> Result<Zeroizing<Vec<u8>>, CmsError> {
    let info = parse(blob)?;

    let ours = rsa_subject_key_identifier(&key.to_public_key())?;
    if info.subject_key_identifier.as_slice() != ours.as_slice() {
        return Err(CmsError::RecipientMismatch);
    }
    // A wrong-length encryptedKey is public information, not a decryption
    // failure: report it structurally.
    let modulus_len = key.to_public_key().size();
    if info.encrypted_key.len() != modulus_len {
        return Err(CmsError::EncryptedKeyLength {
            found: info.encrypted_key.len(),
            expected: modulus_len,
        });
    }

    let content_key = Zeroizing::new(
        key.decrypt(Oaep::<Sha256>::new(), &info.encrypted_key)
            .map_err(|_| CmsError::Decryption)?,
    );
    // Anyone can RSA-encrypt to our public key, so a wrong-length key leaks
    // nothing; it still joins the opaque error to keep one failure path.
    let content_key: &[u8; CONTENT_KEY_LEN] = content_key
        .as_slice()
        .try_into()
        .map_err(|_| CmsError::Decryption)?;

    decrypt_cbc(content_key, &info.iv, &info.ciphertext)
}

/// AES-256-CBC decryption with a PKCS#7 check that does not branch on the
/// padding bytes, into a buffer that is wiped on drop.
fn decrypt_cbc(
    key: &[u8; CONTENT_KEY_LEN],
    iv: &[u8; BLOCK_LEN],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CmsError> {
    let mut buf = Zeroizing::new(ciphertext.to_vec());
    let plaintext_len = {
        let padded = cbc::Decryptor::<Aes256>::new(key.into(), iv.into())
            .decrypt_padded::<NoPadding>(buf.as_mut_slice())
            .map_err(|_| CmsError::Decryption)?;
        let pad = pkcs7_pad_len(padded).ok_or(CmsError::Decryption)?;
        padded.len().checked_sub(pad).ok_or(CmsError::Decryption)?
    };
    buf.truncate(plaintext_len);
    Ok(buf)
}

/// Length of a valid PKCS#7 pad at the end of `data`, or `None`. The whole
/// last block is always examined and the bytes are folded without early
/// exits, so timing does not depend on where the padding goes wrong.
fn pkcs7_pad_len(data: &[u8]) -> Option<usize> {
    let start = data.len().checked_sub(BLOCK_LEN)?;
    let last_block = data.get(start..)?;
    let pad = *last_block.last()?;
    let mut bad: u8 = u8::from(pad == 0) | u8::from(usize::from(pad) > BLOCK_LEN);
    for (i, &byte) in last_block.iter().rev().enumerate() {
        // For positions inside the claimed pad, the byte must equal `pad`.
        let inside = u8::from(i < usize::from(pad));
        bad |= inside & u8::from(byte != pad);
    }
    (bad == 0).then_some(usize::from(pad))
}

fn check_version(
    structure: &'static str,
    found: CmsVersion,
    expected: CmsVersion,
) -> Result<(), CmsError> {
    if found == expected {
        Ok(())
    } else {
        Err(CmsError::Version {
            structure,
            found: found as u8,
            expected: expected as u8,
        })
    }
}

/// A SHA-256 AlgorithmIdentifier, with NULL parameters (as KMS and RFC 8017
/// write it) or with absent parameters (as openssl and RFC 5754 write it).
fn is_sha256(alg: &AlgorithmIdentifierOwned) -> bool {
    alg.oid == rfc5912::ID_SHA_256 && alg.parameters.as_ref().is_none_or(|p| p.is_null())
}

fn check_key_encryption(alg: &AlgorithmIdentifierOwned) -> Result<(), CmsError> {
    if alg.oid != rfc5912::ID_RSAES_OAEP {
        return Err(CmsError::UnsupportedKeyEncryption("not RSAES-OAEP"));
    }
    // Absent parameters mean all defaults, i.e. SHA-1: not what KMS uses.
    let params = alg
        .parameters
        .as_ref()
        .ok_or(CmsError::UnsupportedKeyEncryption("OAEP with SHA-1"))?;
    let params: OaepParams = params.decode_as_encoding(EncodingRules::Ber)?;

    if !params.hash.as_ref().is_some_and(is_sha256) {
        return Err(CmsError::UnsupportedKeyEncryption(
            "OAEP hash is not SHA-256",
        ));
    }
    let mgf = params
        .mask_gen
        .as_ref()
        .ok_or(CmsError::UnsupportedKeyEncryption(
            "MGF1 hash is not SHA-256",
        ))?;
    if mgf.oid != rfc5912::ID_MGF_1 {
        return Err(CmsError::UnsupportedKeyEncryption(
            "mask generation is not MGF1",
        ));
    }
    let mgf_hash: AlgorithmIdentifierOwned = mgf
        .parameters
        .as_ref()
        .ok_or(CmsError::UnsupportedKeyEncryption(
            "MGF1 hash is not SHA-256",
        ))?
        .decode_as_encoding(EncodingRules::Ber)?;
    if !is_sha256(&mgf_hash) {
        return Err(CmsError::UnsupportedKeyEncryption(
            "MGF1 hash is not SHA-256",
        ));
    }
    if let Some(p_source) = &params.p_source {
        // DER omits the default, but accept it spelled out: pSpecified with
        // an empty label.
        let empty_label = p_source.oid == rfc5912::ID_P_SPECIFIED
            && p_source
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as_encoding::<OctetString>(EncodingRules::Ber).ok())
                .is_some_and(|label| label.is_empty());
        if !empty_label {
            return Err(CmsError::UnsupportedKeyEncryption(
                "OAEP label is not empty",
            ));
        }
    }
    Ok(())
}

fn check_content_encryption(alg: &AlgorithmIdentifierOwned) -> Result<[u8; BLOCK_LEN], CmsError> {
    if alg.oid != rfc5911::ID_AES_256_CBC {
        return Err(CmsError::UnsupportedContentEncryption(alg.oid));
    }
    let iv: OctetString = alg
        .parameters
        .as_ref()
        .ok_or(CmsError::BadIv)?
        .decode_as_encoding(EncodingRules::Ber)
        .map_err(|_| CmsError::BadIv)?;
    iv.as_bytes().try_into().map_err(|_| CmsError::BadIv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkcs7_accepts_valid_pads_only() {
        for pad in 1..=16u8 {
            let mut block = vec![0xAB; 32];
            let start = 32 - usize::from(pad);
            block[start..].fill(pad);
            assert_eq!(pkcs7_pad_len(&block), Some(usize::from(pad)), "pad {pad}");
            // Corrupt the first pad byte: must be refused (for pad 1 the
            // first byte is the last byte, which changes the claimed pad).
            block[start] ^= 0x40;
            assert_eq!(pkcs7_pad_len(&block), None, "corrupt pad {pad}");
        }
        assert_eq!(pkcs7_pad_len(&[0u8; 16]), None, "zero pad");
        assert_eq!(pkcs7_pad_len(&[17u8; 32]), None, "pad over a block");
        assert_eq!(pkcs7_pad_len(&[1u8; 15]), None, "short input");
    }
}
