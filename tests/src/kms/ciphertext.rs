//! The emulator's ciphertext blob: a versioned, self-describing envelope
//! that carries the id of the key that made it, like real KMS blobs, so
//! `Decrypt` needs no `KeyId`.
//!
//! ```text
//! "MKMS" | version (1) | key id (16-byte UUID) | nonce (12) | AES-256-GCM ciphertext + tag (16)
//! ```
//!
//! The additional authenticated data is the header (magic, version, key id)
//! followed by the canonicalised encryption context (entries sorted by key,
//! each key and value length-prefixed), so a blob cannot be moved to another
//! key or opened under another context.

use aes_gcm::aead::consts::U12;
use aes_gcm::{AeadInOut, Aes256Gcm, Key, KeyInit, Nonce, Tag};
use rand::TryRng;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::protocol::EncryptionContext;

/// First bytes of every blob.
pub const MAGIC: &[u8; 4] = b"MKMS";
/// The only format version.
pub const VERSION: u8 = 1;
/// AES-GCM nonce length.
const NONCE_LEN: usize = 12;
/// AES-GCM tag length.
const TAG_LEN: usize = 16;
/// Length of magic, version and key id.
const HEADER_LEN: usize = MAGIC.len() + 1 + 16;
/// Smallest possible blob (empty plaintext).
pub const MIN_LEN: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;
/// Largest blob accepted (real KMS caps `CiphertextBlob` at 6144 bytes).
pub const MAX_LEN: usize = 6144;

/// Why a blob could not be opened. Deliberately coarse: all of them become
/// `InvalidCiphertextException`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CiphertextError {
    /// Too short, too long, wrong magic or version.
    #[error("ciphertext blob is not a blob this emulator produced")]
    Malformed,
    /// Authentication failed: wrong key, tampered blob or different context.
    #[error("ciphertext or encryption context does not authenticate")]
    Authentication,
    /// The random source failed.
    #[error("random source failed")]
    Random,
}

/// The parsed, still encrypted blob.
#[derive(Debug)]
pub struct Envelope<'a> {
    /// The key that made the blob.
    pub key_id: Uuid,
    header: &'a [u8],
    nonce: [u8; NONCE_LEN],
    body: &'a [u8],
}

/// Reads the key id and layout of a blob without decrypting it.
///
/// # Errors
/// [`CiphertextError::Malformed`] if it is not an emulator blob.
pub fn parse(blob: &[u8]) -> Result<Envelope<'_>, CiphertextError> {
    if blob.len() < MIN_LEN || blob.len() > MAX_LEN {
        return Err(CiphertextError::Malformed);
    }
    let (header, rest) = blob.split_at(HEADER_LEN);
    let (magic, rest_header) = header.split_at(MAGIC.len());
    if magic != MAGIC {
        return Err(CiphertextError::Malformed);
    }
    let (version, id) = rest_header.split_at(1);
    if version != [VERSION] {
        return Err(CiphertextError::Malformed);
    }
    let key_id = Uuid::from_slice(id).map_err(|_| CiphertextError::Malformed)?;
    let (nonce, body) = rest.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CiphertextError::Malformed)?;
    Ok(Envelope {
        key_id,
        header,
        nonce,
        body,
    })
}

/// Encrypts `plaintext` under `material` for key `key_id`, bound to `context`.
///
/// # Errors
/// [`CiphertextError::Random`] if the nonce cannot be drawn,
/// [`CiphertextError::Malformed`] if the result would exceed [`MAX_LEN`].
pub fn seal(
    key_id: Uuid,
    material: &[u8; 32],
    plaintext: &[u8],
    context: &EncryptionContext,
) -> Result<Vec<u8>, CiphertextError> {
    if MIN_LEN + plaintext.len() > MAX_LEN {
        return Err(CiphertextError::Malformed);
    }
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::SysRng
        .try_fill_bytes(&mut nonce)
        .map_err(|_| CiphertextError::Random)?;

    let mut blob = Vec::with_capacity(MIN_LEN + plaintext.len());
    blob.extend_from_slice(MAGIC);
    blob.push(VERSION);
    blob.extend_from_slice(key_id.as_bytes());
    let aad = aad(&blob, context);
    blob.extend_from_slice(&nonce);

    let mut buf = Zeroizing::new(plaintext.to_vec());
    let tag = cipher(material)
        .encrypt_inout_detached(&Nonce::<U12>::from(nonce), &aad, buf.as_mut_slice().into())
        .map_err(|_| CiphertextError::Authentication)?;
    blob.extend_from_slice(&buf);
    blob.extend_from_slice(tag.as_slice());
    Ok(blob)
}

/// Decrypts a parsed blob with its key's material under `context`.
///
/// # Errors
/// [`CiphertextError::Authentication`] if the key, blob or context is wrong.
pub fn open(
    envelope: &Envelope<'_>,
    material: &[u8; 32],
    context: &EncryptionContext,
) -> Result<Zeroizing<Vec<u8>>, CiphertextError> {
    let split = envelope
        .body
        .len()
        .checked_sub(TAG_LEN)
        .ok_or(CiphertextError::Malformed)?;
    let (ciphertext, tag) = envelope.body.split_at(split);
    let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| CiphertextError::Malformed)?;
    let aad = aad(envelope.header, context);
    let mut buf = Zeroizing::new(ciphertext.to_vec());
    cipher(material)
        .decrypt_inout_detached(
            &Nonce::<U12>::from(envelope.nonce),
            &aad,
            buf.as_mut_slice().into(),
            &Tag::from(tag),
        )
        .map_err(|_| CiphertextError::Authentication)?;
    Ok(buf)
}

fn cipher(material: &[u8; 32]) -> Aes256Gcm {
    Aes256Gcm::new(&Key::<Aes256Gcm>::from(*material))
}

/// Header followed by the canonical encryption context: the entry count,
/// then each key and value as a 4-byte big-endian length and its bytes, in
/// key order (the map is already sorted).
fn aad(header: &[u8], context: &EncryptionContext) -> Vec<u8> {
    let mut aad = header.to_vec();
    let count = u32::try_from(context.len()).unwrap_or(u32::MAX);
    aad.extend_from_slice(&count.to_be_bytes());
    for (k, v) in context {
        for part in [k, v] {
            let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
            aad.extend_from_slice(&len.to_be_bytes());
            aad.extend_from_slice(part.as_bytes());
        }
    }
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> EncryptionContext {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn round_trip_binds_key_and_context() {
        let id = Uuid::new_v4();
        let material = [7u8; 32];
        let context = ctx(&[("a", "1"), ("b", "2")]);
        let blob = seal(id, &material, b"secret", &context).unwrap();
        let env = parse(&blob).unwrap();
        assert_eq!(env.key_id, id);
        assert_eq!(
            open(&env, &material, &context).unwrap().as_slice(),
            b"secret"
        );
        assert_eq!(
            open(&env, &material, &ctx(&[("a", "1")])).unwrap_err(),
            CiphertextError::Authentication
        );
        // Moving a value between keys must not authenticate ("ab"="" vs "a"="b").
        let blob2 = seal(id, &material, b"x", &ctx(&[("ab", "")])).unwrap();
        let env2 = parse(&blob2).unwrap();
        assert!(open(&env2, &material, &ctx(&[("a", "b")])).is_err());
        assert!(open(&env, &[8u8; 32], &context).is_err());
    }

    #[test]
    fn tampering_and_garbage_are_refused() {
        let id = Uuid::new_v4();
        let material = [1u8; 32];
        let blob = seal(id, &material, b"secret", &EncryptionContext::new()).unwrap();
        for i in 0..blob.len() {
            let mut bad = blob.clone();
            bad[i] ^= 1;
            let ok = parse(&bad)
                .and_then(|env| open(&env, &material, &EncryptionContext::new()))
                .is_ok();
            assert!(!ok, "flipping byte {i} went unnoticed");
        }
        assert_eq!(parse(b"").unwrap_err(), CiphertextError::Malformed);
        assert_eq!(parse(&[0u8; 40]).unwrap_err(), CiphertextError::Malformed);
        assert!(parse(&vec![0u8; MAX_LEN + 1]).is_err());
    }
}
