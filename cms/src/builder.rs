//! Producing a `CiphertextForRecipient` in exactly the BER shape real KMS
//! emits, so the KMS emulator exercises the same decoding paths as production.
//!
//! The fixed-shape inner parts (RecipientInfos, AlgorithmIdentifiers) are
//! DER-encoded by the `der`/`cms` crates, as KMS does; only the indefinite
//! length wrappers, which `der` cannot emit, are written here:
//!
//! ```text
//! 30 80  06 09 <envelopedData>  a0 80  30 80  02 01 02  31 82 .. <RecipientInfos>
//!        30 80  06 09 <id-data>  30 1d <AES-256-CBC, IV>
//!               a0 80  (04 82 03 e8 <1000 bytes>)* 04 LL <rest>  00 00
//!        00 00  00 00  00 00  00 00
//! ```

use aes::Aes256;
use cbc::cipher::{BlockModeEncrypt, KeyIvInit, block_padding::Pkcs7};
use cms::content_info::CmsVersion;
use cms::enveloped_data::{
    KeyTransRecipientInfo, RecipientIdentifier, RecipientInfo, RecipientInfos,
};
use const_oid::db::{rfc5911, rfc5912};
use der::asn1::{OctetString, OctetStringRef};
use der::{Any, AnyRef, Encode};
use rsa::{Oaep, PublicKey};
use sha2::Sha256;
use spki::AlgorithmIdentifierOwned;
use x509_cert::ext::pkix::SubjectKeyIdentifier;
use zeroize::Zeroizing;

use super::{
    BLOCK_LEN, CONTENT_KEY_LEN, CmsError, MAX_PLAINTEXT_LEN, OaepParams, rsa_subject_key_identifier,
};

/// Real KMS splits encryptedContent into OCTET STRINGs of this size.
pub(super) const KMS_CHUNK_LEN: usize = 1000;

/// Opening of every BER indefinite-length value (after its tag).
const INDEFINITE: u8 = 0x80;
/// Identifier octet of a constructed universal SEQUENCE.
const SEQUENCE: u8 = 0x30;
/// Identifier octet of a constructed context-specific `[0]`.
const CONTEXT_0_CONSTRUCTED: u8 = 0xA0;
/// End-of-contents marker closing an indefinite-length value.
const EOC: [u8; 2] = [0, 0];

/// Encrypts `plaintext` to `recipient` as a KMS-shaped `CiphertextForRecipient`:
/// a fresh AES-256 key and IV from `rng`, AES-256-CBC with PKCS#7 padding,
/// the key wrapped with RSAES-OAEP (SHA-256, MGF1-SHA-256, empty label), the
/// recipient named by `[0]` subjectKeyIdentifier = SHA-256 of its SPKI DER,
/// all in indefinite-length BER with 1000-byte ciphertext chunks.
///
/// # Errors
/// [`CmsError::PlaintextTooLarge`] over [`MAX_PLAINTEXT_LEN`] (so that every
/// sealed blob can also be opened), [`CmsError::PublicKeyEncoding`], or
/// [`CmsError::KeyWrap`] if the key is too small for OAEP-SHA-256.
pub fn seal_for_recipient<R>(
    plaintext: &[u8],
    recipient: &PublicKey,
    rng: &mut R,
) -> Result<Vec<u8>, CmsError>
where
    R: rand::CryptoRng + ?Sized,
{
    if plaintext.len() > MAX_PLAINTEXT_LEN {
        return Err(CmsError::PlaintextTooLarge {
            len: plaintext.len(),
            max: MAX_PLAINTEXT_LEN,
        });
    }
    let ski = rsa_subject_key_identifier(recipient)?;

    let mut content_key = Zeroizing::new([0u8; CONTENT_KEY_LEN]);
    rng.fill_bytes(content_key.as_mut_slice());
    let mut iv = [0u8; BLOCK_LEN];
    rng.fill_bytes(&mut iv);

    // Encrypt in place in a wiped buffer: the plaintext copy never outlives
    // this function.
    let padded_len = (plaintext.len() / BLOCK_LEN + 1) * BLOCK_LEN;
    let mut buf = Zeroizing::new(vec![0u8; padded_len]);
    buf.get_mut(..plaintext.len())
        .ok_or(CmsError::PlaintextTooLarge {
            len: plaintext.len(),
            max: MAX_PLAINTEXT_LEN,
        })?
        .copy_from_slice(plaintext);
    let ciphertext_len = cbc::Encryptor::<Aes256>::new((&*content_key).into(), (&iv).into())
        .encrypt_padded::<Pkcs7>(buf.as_mut_slice(), plaintext.len())
        .map_err(|_| CmsError::ContentEncryption)?
        .len();
    let ciphertext = buf.get(..ciphertext_len).unwrap_or_default();

    let encrypted_key = recipient
        .encrypt(rng, Oaep::<Sha256>::new(), content_key.as_slice())
        .map_err(|_| CmsError::KeyWrap)?;

    let recipient_infos =
        RecipientInfos::try_from(vec![RecipientInfo::Ktri(KeyTransRecipientInfo {
            version: CmsVersion::V2,
            rid: RecipientIdentifier::SubjectKeyIdentifier(SubjectKeyIdentifier(OctetString::new(
                ski,
            )?)),
            key_enc_alg: AlgorithmIdentifierOwned {
                oid: rfc5912::ID_RSAES_OAEP,
                parameters: Some(Any::encode_from(&kms_oaep_params()?)?),
            },
            enc_key: OctetString::new(encrypted_key)?,
        })])?;
    let content_enc_alg = AlgorithmIdentifierOwned {
        oid: rfc5911::ID_AES_256_CBC,
        parameters: Some(Any::encode_from(&OctetStringRef::new(&iv)?)?),
    };

    let mut out = Vec::with_capacity(ciphertext.len() + ciphertext.len() / 200 + 1024);
    open_indefinite(&mut out, SEQUENCE); // ContentInfo
    encode_into(&mut out, &rfc5911::ID_ENVELOPED_DATA)?;
    open_indefinite(&mut out, CONTEXT_0_CONSTRUCTED); // [0] content
    open_indefinite(&mut out, SEQUENCE); // EnvelopedData
    encode_into(&mut out, &CmsVersion::V2)?;
    encode_into(&mut out, &recipient_infos)?;
    open_indefinite(&mut out, SEQUENCE); // EncryptedContentInfo
    encode_into(&mut out, &rfc5911::ID_DATA)?;
    encode_into(&mut out, &content_enc_alg)?;
    open_indefinite(&mut out, CONTEXT_0_CONSTRUCTED); // [0] IMPLICIT encryptedContent
    for chunk in ciphertext.chunks(KMS_CHUNK_LEN) {
        encode_into(&mut out, &OctetStringRef::new(chunk)?)?;
    }
    for _ in 0..5 {
        // encryptedContent, EncryptedContentInfo, EnvelopedData, [0], ContentInfo
        out.extend_from_slice(&EOC);
    }
    Ok(out)
}

/// The RSAES-OAEP parameters exactly as KMS writes them: explicit SHA-256
/// hash and MGF1-SHA-256, both AlgorithmIdentifiers carrying NULL, default
/// (empty) label omitted.
fn kms_oaep_params() -> Result<OaepParams, CmsError> {
    let sha256 = AlgorithmIdentifierOwned {
        oid: rfc5912::ID_SHA_256,
        parameters: Some(Any::from(AnyRef::NULL)),
    };
    Ok(OaepParams {
        mask_gen: Some(AlgorithmIdentifierOwned {
            oid: rfc5912::ID_MGF_1,
            parameters: Some(Any::encode_from(&sha256)?),
        }),
        hash: Some(sha256),
        p_source: None,
    })
}

fn open_indefinite(out: &mut Vec<u8>, identifier: u8) {
    out.extend_from_slice(&[identifier, INDEFINITE]);
}

fn encode_into(out: &mut Vec<u8>, value: &impl Encode) -> Result<(), CmsError> {
    value.encode_to_vec(out)?;
    Ok(())
}
