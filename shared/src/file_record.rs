//! The file key: one KMS data key per secrets file, the `fk` values sealed
//! under it, and the file record that binds the whole file together.
//!
//! `keystore-host encrypt --file-key` asks KMS once per file for a data key
//! (`GenerateDataKey`, AES-256, encryption context
//! `{"keystore:file": FILE_ID}`), seals each value as `ENC[v1:fk:...]`
//! (AES-256-GCM, a random 96-bit nonce, AAD = file id ‖ name) and writes
//! one reserved entry, `keystore:file` = `ENC[v1:file:...]`, the
//! [`FileRecord`]: the wrapped data key, the file id, a version number that
//! every write increases, a manifest naming every other entry of the file
//! with the SHA-256 of its envelope text, and an HMAC-SHA-256 over all of
//! it. The enclave unwraps the data key with one KMS `Decrypt` and then:
//!
//! - checks the MAC ([`FileKey::verify`]): the host cannot edit the record
//!   (manifest, version, file id) without the data key;
//! - compares the manifest with the entries it received
//!   ([`FileRecord::check_entries`]): an entry added, dropped, or replaced by
//!   another envelope (moved from another name, swapped, an older copy) is
//!   refused *naming that entry*;
//! - refuses a version lower than the one it serves (no rollback).
//!
//! The MAC thus covers every (name, envelope) pair the file loads — `kms`
//! values, `fk` values and the rules entry alike — and the version.
//!
//! Keys: the data key is never used directly; HKDF-SHA-256 (salt = file id)
//! derives one key for sealing values and one for the MAC, so the two uses
//! can never be confused.
//!
//! Record encoding (big-endian, every length prefixed, no trailing bytes):
//! ```text
//! format u8 (=1) | file id [16] | version u64 | wrapped key len u16 | wrapped key
//! | entry count u32 | { name len u16 | name | SHA-256(envelope text) [32] }*
//! | mac [32]
//! ```
//! Names are valid secret names in strictly increasing byte order (so each
//! file has exactly one encoding), and the MAC is HMAC-SHA-256 under the
//! derived MAC key over a domain string followed by everything before it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use aes_gcm::aead::consts::U12;
use aes_gcm::{AeadInOut, Aes256Gcm, Key, KeyInit, Nonce};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::envelope::{Envelope, MAX_KMS_CIPHERTEXT};
use crate::name::{FILE_NAME, MAX_NAME_LEN, SecretName};
use crate::protocol::{DEFAULT_MAX_SECRET_VALUE, MAX_LOAD_ENTRIES};

/// Encryption-context key binding a wrapped data key to its file id.
pub const FILE_CONTEXT_KEY: &str = "keystore:file";
/// Bytes of a file id (random, 128 bits).
pub const FILE_ID_LEN: usize = 16;
/// Bytes of the data key (AES-256).
pub const DATA_KEY_LEN: usize = 32;
/// Bytes of an `fk` nonce (96 bits, the size GCM is designed for).
pub const NONCE_LEN: usize = 12;
/// Bytes of the GCM tag.
pub const TAG_LEN: usize = 16;
/// What sealing adds to a value: nonce and tag.
pub const FK_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// Largest value sealed as `fk` (the protocol's value limit, 1 MiB).
pub const MAX_FK_PLAINTEXT: usize = DEFAULT_MAX_SECRET_VALUE;
/// Bytes of the record MAC (HMAC-SHA-256).
pub const MAC_LEN: usize = 32;
/// Bytes of a manifest digest (SHA-256).
pub const DIGEST_LEN: usize = 32;
/// The record format this build writes and reads.
pub const RECORD_FORMAT: u8 = 1;
/// Entries a manifest may name: every entry of a load but the record.
pub const MAX_MANIFEST_ENTRIES: usize = MAX_LOAD_ENTRIES - 1;
/// Largest encoded record: a full manifest of the longest names.
pub const MAX_RECORD_LEN: usize = 1
    + FILE_ID_LEN
    + 8
    + 2
    + MAX_KMS_CIPHERTEXT
    + 4
    + MAX_MANIFEST_ENTRIES * (2 + MAX_NAME_LEN + DIGEST_LEN)
    + MAC_LEN;

const MAC_DOMAIN: &[u8] = b"nitro-keystore/file-record/v1";
const AAD_DOMAIN: &[u8] = b"nitro-keystore/fk/v1";
const HKDF_VALUE_INFO: &[u8] = b"nitro-keystore/file-key/value/v1";
const HKDF_MAC_INFO: &[u8] = b"nitro-keystore/file-key/mac/v1";

type HmacSha256 = Hmac<Sha256>;

/// Why a file record, a file key or an `fk` value is unusable. Messages name
/// entries (names are not secret), never values or key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileRecordError {
    /// The record ends before a field it announces.
    #[error("file record is truncated (in {field})")]
    Truncated {
        /// The field being read.
        field: &'static str,
    },
    /// A record format this build does not read.
    #[error("file record format {0} is not supported (this build reads {RECORD_FORMAT})")]
    UnsupportedFormat(u8),
    /// The wrapped data key is empty or longer than any KMS blob.
    #[error("file record: wrapped data key is {len} bytes; expected 1..={MAX_KMS_CIPHERTEXT}")]
    BadWrappedKey {
        /// Its length.
        len: usize,
    },
    /// The manifest names more entries than a load may carry.
    #[error("file record names {count} entries; at most {MAX_MANIFEST_ENTRIES} are accepted")]
    TooManyEntries {
        /// The count announced.
        count: u64,
    },
    /// A manifest name is not a valid secret name.
    #[error("file record: invalid name in the manifest: {0}")]
    BadName(String),
    /// Manifest names out of order or repeated.
    #[error("file record: manifest names out of order or repeated at `{name}`")]
    Unordered {
        /// The offending name.
        name: String,
    },
    /// The record names itself.
    #[error("file record: the manifest may not name `{FILE_NAME}`")]
    NamesItself,
    /// Bytes after the MAC.
    #[error("file record has {0} trailing byte(s)")]
    Trailing(usize),
    /// A file id that is not 32 hex digits.
    #[error("file id must be {} hex digits", FILE_ID_LEN * 2)]
    BadFileId,
    /// KMS returned a data key of the wrong size.
    #[error("data key is {len} bytes; expected {DATA_KEY_LEN}")]
    BadDataKey {
        /// Its length.
        len: usize,
    },
    /// The MAC does not match: the record was edited, or made under
    /// another data key.
    #[error("file record MAC mismatch: the record was altered or belongs to another key")]
    BadMac,
    /// A value larger than `fk` seals.
    #[error("`{name}` is {len} bytes; the file key seals at most {MAX_FK_PLAINTEXT}")]
    ValueTooLarge {
        /// The entry.
        name: String,
        /// Its length.
        len: usize,
    },
    /// Sealing failed (never expected with valid sizes).
    #[error("sealing `{name}` failed")]
    Seal {
        /// The entry.
        name: String,
    },
    /// An `fk` value does not authenticate under this file's key and name:
    /// it was altered, moved from another name or from another file.
    #[error("`{name}`: fk value does not authenticate for this name and file (altered or moved)")]
    Open {
        /// The entry.
        name: String,
    },
    /// The envelope given to open is not `fk`.
    #[error("`{name}`: expected an ENC[v1:fk:...] value")]
    NotFk {
        /// The entry.
        name: String,
    },
    /// The same name twice among the entries a record is built from.
    #[error("`{name}` appears more than once")]
    Duplicate {
        /// The entry.
        name: String,
    },
}

/// How the entries of a load differ from the record's manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestMismatch {
    /// An entry the record does not name.
    #[error("`{name}` is not in the file record (added)")]
    Added {
        /// The entry.
        name: String,
    },
    /// An entry the record names is missing.
    #[error("`{name}` is named by the file record but missing (dropped)")]
    Dropped {
        /// The entry.
        name: String,
    },
    /// An entry whose envelope is not the one the record names.
    #[error("`{name}` is not the value the file record names (swapped, moved or rolled back)")]
    Changed {
        /// The entry.
        name: String,
    },
}

impl ManifestMismatch {
    /// The entry the mismatch is about.
    pub fn name(&self) -> &str {
        match self {
            ManifestMismatch::Added { name }
            | ManifestMismatch::Dropped { name }
            | ManifestMismatch::Changed { name } => name,
        }
    }
}

/// A file's random identifier; bound into every `fk` value's AAD and the
/// wrapped key's encryption context.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId(pub [u8; FILE_ID_LEN]);

impl FileId {
    /// Lowercase hex, as used in the encryption context.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 32 hex digits.
    pub fn from_hex(text: &str) -> Result<FileId, FileRecordError> {
        let mut id = [0u8; FILE_ID_LEN];
        hex::decode_to_slice(text, &mut id).map_err(|_| FileRecordError::BadFileId)?;
        Ok(FileId(id))
    }

    /// The encryption context of the file's wrapped data key.
    pub fn context(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(FILE_CONTEXT_KEY.to_owned(), self.to_hex())])
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileId({})", self.to_hex())
    }
}

/// One manifest line: an entry of the file and the digest of its envelope.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ManifestEntry {
    /// The entry's name.
    pub name: String,
    /// SHA-256 of its canonical envelope text ([`envelope_digest`]).
    pub digest: [u8; DIGEST_LEN],
}

/// SHA-256 of an envelope's canonical text (what the manifest records).
pub fn envelope_digest(envelope: &Envelope) -> [u8; DIGEST_LEN] {
    Sha256::digest(envelope.to_string().as_bytes()).into()
}

/// The decoded `keystore:file` record.
#[derive(Clone, PartialEq, Eq)]
pub struct FileRecord {
    /// The file's id.
    pub file_id: FileId,
    /// Increased by every write of the file.
    pub version: u64,
    /// The data key as KMS `GenerateDataKey` wrapped it.
    pub wrapped_key: Vec<u8>,
    /// Every other entry of the file, sorted by name.
    pub manifest: Vec<ManifestEntry>,
    /// HMAC-SHA-256 under the derived MAC key.
    pub mac: [u8; MAC_LEN],
}

impl fmt::Debug for FileRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileRecord")
            .field("file_id", &self.file_id)
            .field("version", &self.version)
            .field("wrapped_key_len", &self.wrapped_key.len())
            .field("entries", &self.manifest.len())
            .finish_non_exhaustive()
    }
}

impl FileRecord {
    /// A record naming `entries` (any order), with a zero MAC: sign it with
    /// [`FileKey::sign`].
    pub fn new<'a>(
        file_id: FileId,
        version: u64,
        wrapped_key: Vec<u8>,
        entries: impl IntoIterator<Item = (&'a str, &'a Envelope)>,
    ) -> Result<FileRecord, FileRecordError> {
        if wrapped_key.is_empty() || wrapped_key.len() > MAX_KMS_CIPHERTEXT {
            return Err(FileRecordError::BadWrappedKey {
                len: wrapped_key.len(),
            });
        }
        let mut manifest = Vec::new();
        for (name, envelope) in entries {
            SecretName::check(name).map_err(|e| FileRecordError::BadName(e.to_string()))?;
            if name == FILE_NAME {
                return Err(FileRecordError::NamesItself);
            }
            manifest.push(ManifestEntry {
                name: name.to_owned(),
                digest: envelope_digest(envelope),
            });
        }
        if manifest.len() > MAX_MANIFEST_ENTRIES {
            return Err(FileRecordError::TooManyEntries {
                count: manifest.len() as u64,
            });
        }
        manifest.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(pair) = manifest.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(FileRecordError::Duplicate {
                name: pair[0].name.clone(),
            });
        }
        Ok(FileRecord {
            file_id,
            version,
            wrapped_key,
            manifest,
            mac: [0; MAC_LEN],
        })
    }

    /// Everything the MAC covers: the record without its MAC.
    fn body(&self) -> Vec<u8> {
        let names: usize = self.manifest.iter().map(|e| 2 + e.name.len()).sum();
        let mut out = Vec::with_capacity(
            1 + FILE_ID_LEN
                + 8
                + 2
                + self.wrapped_key.len()
                + 4
                + names
                + self.manifest.len() * DIGEST_LEN
                + MAC_LEN,
        );
        out.push(RECORD_FORMAT);
        out.extend_from_slice(&self.file_id.0);
        out.extend_from_slice(&self.version.to_be_bytes());
        // Lengths are bounded by `new`/`decode`: wrapped key ≤ 6144, names
        // ≤ 256, entries ≤ MAX_MANIFEST_ENTRIES.
        out.extend_from_slice(&(self.wrapped_key.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.wrapped_key);
        out.extend_from_slice(&(self.manifest.len() as u32).to_be_bytes());
        for entry in &self.manifest {
            out.extend_from_slice(&(entry.name.len() as u16).to_be_bytes());
            out.extend_from_slice(entry.name.as_bytes());
            out.extend_from_slice(&entry.digest);
        }
        out
    }

    /// The binary form (the payload of `ENC[v1:file:...]`).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.body();
        out.extend_from_slice(&self.mac);
        out
    }

    /// The `ENC[v1:file:...]` envelope of this record.
    pub fn to_envelope(&self) -> Result<Envelope, crate::envelope::EnvelopeError> {
        Envelope::file(self.encode())
    }

    /// Decodes a record, checking every length against what remains and
    /// every bound before allocating.
    pub fn decode(bytes: &[u8]) -> Result<FileRecord, FileRecordError> {
        let mut r = Reader { bytes };
        let format = r.take::<1>("format")?[0];
        if format != RECORD_FORMAT {
            return Err(FileRecordError::UnsupportedFormat(format));
        }
        let file_id = FileId(r.take::<FILE_ID_LEN>("file id")?);
        let version = u64::from_be_bytes(r.take::<8>("version")?);
        let key_len = usize::from(u16::from_be_bytes(r.take::<2>("wrapped key length")?));
        if key_len == 0 || key_len > MAX_KMS_CIPHERTEXT {
            return Err(FileRecordError::BadWrappedKey { len: key_len });
        }
        let wrapped_key = r.slice(key_len, "wrapped key")?.to_vec();
        let count = u32::from_be_bytes(r.take::<4>("entry count")?);
        if count as usize > MAX_MANIFEST_ENTRIES {
            return Err(FileRecordError::TooManyEntries {
                count: u64::from(count),
            });
        }
        let mut manifest: Vec<ManifestEntry> = Vec::with_capacity((count as usize).min(1024));
        for _ in 0..count {
            let name_len = usize::from(u16::from_be_bytes(r.take::<2>("name length")?));
            if name_len > MAX_NAME_LEN {
                return Err(FileRecordError::BadName(format!(
                    "a name of {name_len} bytes (at most {MAX_NAME_LEN})"
                )));
            }
            let name = std::str::from_utf8(r.slice(name_len, "name")?)
                .map_err(|_| FileRecordError::BadName("a name that is not UTF-8".into()))?;
            SecretName::check(name).map_err(|e| FileRecordError::BadName(e.to_string()))?;
            if name == FILE_NAME {
                return Err(FileRecordError::NamesItself);
            }
            if manifest
                .last()
                .is_some_and(|prev| prev.name.as_str() >= name)
            {
                return Err(FileRecordError::Unordered {
                    name: name.to_owned(),
                });
            }
            let digest = r.take::<DIGEST_LEN>("digest")?;
            manifest.push(ManifestEntry {
                name: name.to_owned(),
                digest,
            });
        }
        let mac = r.take::<MAC_LEN>("mac")?;
        if !r.bytes.is_empty() {
            return Err(FileRecordError::Trailing(r.bytes.len()));
        }
        Ok(FileRecord {
            file_id,
            version,
            wrapped_key,
            manifest,
            mac,
        })
    }

    /// Compares the entries of a load (every entry but the record itself,
    /// as (name, envelope) pairs) with the manifest. Of all differences, the
    /// first in name order is reported, naming its entry.
    pub fn check_entries<'a>(
        &self,
        entries: impl IntoIterator<Item = (&'a str, &'a Envelope)>,
    ) -> Result<(), ManifestMismatch> {
        let expected: HashMap<&str, &[u8; DIGEST_LEN]> = self
            .manifest
            .iter()
            .map(|e| (e.name.as_str(), &e.digest))
            .collect();
        let mut present = HashSet::with_capacity(expected.len());
        let mut problems = Vec::new();
        for (name, envelope) in entries {
            match expected.get(name) {
                None => problems.push(ManifestMismatch::Added {
                    name: name.to_owned(),
                }),
                Some(digest) => {
                    present.insert(name);
                    if envelope_digest(envelope) != **digest {
                        problems.push(ManifestMismatch::Changed {
                            name: name.to_owned(),
                        });
                    }
                }
            }
        }
        if present.len() < self.manifest.len() {
            problems.extend(
                self.manifest
                    .iter()
                    .filter(|e| !present.contains(e.name.as_str()))
                    .map(|e| ManifestMismatch::Dropped {
                        name: e.name.clone(),
                    }),
            );
        }
        match problems.into_iter().min_by(|a, b| a.name().cmp(b.name())) {
            Some(problem) => Err(problem),
            None => Ok(()),
        }
    }
}

/// A bounds-checked cursor over the record bytes.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn slice(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], FileRecordError> {
        if self.bytes.len() < len {
            return Err(FileRecordError::Truncated { field });
        }
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(head)
    }

    fn take<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], FileRecordError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.slice(N, field)?);
        Ok(out)
    }
}

/// The keys derived from one file's data key: the value cipher and the MAC
/// key. Held only in memory, wiped on drop, never printed.
pub struct FileKey {
    file_id: FileId,
    cipher: Aes256Gcm,
    mac_key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for FileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileKey({}, ..)", self.file_id)
    }
}

impl FileKey {
    /// Derives the value and MAC keys of the file `file_id` from its
    /// plaintext data key (HKDF-SHA-256, salt = file id).
    pub fn derive(data_key: &[u8], file_id: FileId) -> Result<FileKey, FileRecordError> {
        if data_key.len() != DATA_KEY_LEN {
            return Err(FileRecordError::BadDataKey {
                len: data_key.len(),
            });
        }
        let prk = hmac_sha256(&file_id.0, &[data_key]);
        let mut value_key = hkdf_expand_one(&prk, HKDF_VALUE_INFO);
        let mac_key = hkdf_expand_one(&prk, HKDF_MAC_INFO);
        let mut key = Key::<Aes256Gcm>::from(*value_key);
        let cipher = Aes256Gcm::new(&key);
        key.zeroize();
        value_key.zeroize();
        Ok(FileKey {
            file_id,
            cipher,
            mac_key,
        })
    }

    /// The file this key belongs to.
    pub fn file_id(&self) -> FileId {
        self.file_id
    }

    /// Seals `value` as the `fk` value of `name` under the given nonce.
    /// The caller draws `nonce` fresh from a CSPRNG for every value.
    pub fn seal(
        &self,
        name: &str,
        value: &[u8],
        nonce: [u8; NONCE_LEN],
    ) -> Result<Envelope, FileRecordError> {
        if value.len() > MAX_FK_PLAINTEXT {
            return Err(FileRecordError::ValueTooLarge {
                name: name.to_owned(),
                len: value.len(),
            });
        }
        let mut buf = Vec::with_capacity(NONCE_LEN + value.len() + TAG_LEN);
        buf.extend_from_slice(&nonce);
        buf.extend_from_slice(value);
        let mut body = buf.split_off(NONCE_LEN);
        let seal_err = || FileRecordError::Seal {
            name: name.to_owned(),
        };
        self.cipher
            .encrypt_in_place(&Nonce::<U12>::from(nonce), &self.aad(name), &mut body)
            .map_err(|_| seal_err())?;
        buf.extend_from_slice(&body);
        Envelope::fk(buf).map_err(|_| seal_err())
    }

    /// Opens the `fk` value of `name`; fails unless it was sealed for this
    /// name under this file's key.
    pub fn open(
        &self,
        name: &str,
        envelope: &Envelope,
    ) -> Result<Zeroizing<Vec<u8>>, FileRecordError> {
        let Envelope::Fk { sealed } = envelope else {
            return Err(FileRecordError::NotFk {
                name: name.to_owned(),
            });
        };
        let open_err = || FileRecordError::Open {
            name: name.to_owned(),
        };
        let (nonce, body) = sealed.split_at_checked(NONCE_LEN).ok_or_else(open_err)?;
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| open_err())?;
        let mut buf = Zeroizing::new(Vec::with_capacity(body.len()));
        buf.extend_from_slice(body);
        self.cipher
            .decrypt_in_place(&Nonce::<U12>::from(nonce), &self.aad(name), &mut *buf)
            .map_err(|_| open_err())?;
        Ok(buf)
    }

    /// AAD = domain ‖ file id ‖ name length (u16) ‖ name.
    fn aad(&self, name: &str) -> Vec<u8> {
        let mut aad = Vec::with_capacity(AAD_DOMAIN.len() + FILE_ID_LEN + 2 + name.len());
        aad.extend_from_slice(AAD_DOMAIN);
        aad.extend_from_slice(&self.file_id.0);
        let len = u16::try_from(name.len()).unwrap_or(u16::MAX);
        aad.extend_from_slice(&len.to_be_bytes());
        aad.extend_from_slice(name.as_bytes());
        aad
    }

    fn mac_of(&self, record: &FileRecord) -> Result<HmacSha256, FileRecordError> {
        let mut mac = <HmacSha256 as hmac::KeyInit>::new_from_slice(&*self.mac_key)
            .map_err(|_| FileRecordError::BadMac)?;
        mac.update(MAC_DOMAIN);
        mac.update(&record.body());
        Ok(mac)
    }

    /// Sets the record's MAC (the record must belong to this file).
    pub fn sign(&self, record: &mut FileRecord) -> Result<(), FileRecordError> {
        if record.file_id != self.file_id {
            return Err(FileRecordError::BadMac);
        }
        record.mac = self.mac_of(record)?.finalize().into_bytes().into();
        Ok(())
    }

    /// Checks the record's MAC in constant time.
    pub fn verify(&self, record: &FileRecord) -> Result<(), FileRecordError> {
        if record.file_id != self.file_id {
            return Err(FileRecordError::BadMac);
        }
        self.mac_of(record)?
            .verify_slice(&record.mac)
            .map_err(|_| FileRecordError::BadMac)
    }
}

/// HMAC-SHA-256 of the concatenated `parts` under `key`.
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    // HMAC takes keys of any length, so this cannot fail.
    let mut out = Zeroizing::new([0u8; 32]);
    if let Ok(mut mac) = <HmacSha256 as hmac::KeyInit>::new_from_slice(key) {
        for part in parts {
            mac.update(part);
        }
        out.copy_from_slice(&mac.finalize().into_bytes());
    }
    out
}

/// HKDF-Expand (RFC 5869) for one 32-byte block: T(1) = HMAC(PRK, info ‖ 1).
fn hkdf_expand_one(prk: &[u8; 32], info: &[u8]) -> Zeroizing<[u8; 32]> {
    hmac_sha256(prk, &[info, &[1]])
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: FileId = FileId([9; FILE_ID_LEN]);

    fn key() -> FileKey {
        FileKey::derive(&[7; DATA_KEY_LEN], ID).unwrap()
    }

    fn sealed(key: &FileKey, name: &str, value: &[u8]) -> Envelope {
        key.seal(name, value, [1; NONCE_LEN]).unwrap()
    }

    /// A signed record over `entries` and the entries themselves.
    fn file(key: &FileKey, version: u64) -> (FileRecord, Vec<(String, Envelope)>) {
        let entries = vec![
            ("B".to_owned(), sealed(key, "B", b"bee")),
            ("A".to_owned(), sealed(key, "A", b"ay")),
            (
                "keystore:rules".to_owned(),
                Envelope::kms(vec![5; 40]).unwrap(),
            ),
        ];
        let mut record = FileRecord::new(
            ID,
            version,
            vec![3; 100],
            entries.iter().map(|(n, e)| (n.as_str(), e)),
        )
        .unwrap();
        key.sign(&mut record).unwrap();
        (record, entries)
    }

    fn pairs(entries: &[(String, Envelope)]) -> impl Iterator<Item = (&str, &Envelope)> {
        entries.iter().map(|(n, e)| (n.as_str(), e))
    }

    #[test]
    fn values_open_only_under_their_name_and_file() {
        let key = key();
        let env = sealed(&key, "DB", b"secret");
        assert_eq!(key.open("DB", &env).unwrap().as_slice(), b"secret");
        assert_eq!(
            key.open("DB2", &env).unwrap_err(),
            FileRecordError::Open { name: "DB2".into() }
        );
        let other_file = FileKey::derive(&[7; DATA_KEY_LEN], FileId([8; FILE_ID_LEN])).unwrap();
        assert!(other_file.open("DB", &env).is_err());
        let other_key = FileKey::derive(&[6; DATA_KEY_LEN], ID).unwrap();
        assert!(other_key.open("DB", &env).is_err());
        let mut bytes = env.ciphertext().to_vec();
        bytes[NONCE_LEN] ^= 1;
        assert!(key.open("DB", &Envelope::fk(bytes).unwrap()).is_err());
        assert!(matches!(
            key.open("DB", &Envelope::kms(vec![1]).unwrap()),
            Err(FileRecordError::NotFk { .. })
        ));
        assert!(matches!(
            FileKey::derive(&[0; 16], ID),
            Err(FileRecordError::BadDataKey { len: 16 })
        ));
    }

    #[test]
    fn the_largest_value_seals_and_one_byte_more_does_not() {
        let key = key();
        let big = vec![0xab; MAX_FK_PLAINTEXT];
        let env = key.seal("BIG", &big, [2; NONCE_LEN]).unwrap();
        let parsed = Envelope::parse(&env.to_string()).unwrap();
        assert_eq!(key.open("BIG", &parsed).unwrap().as_slice(), big.as_slice());
        assert!(matches!(
            key.seal("BIG", &[0; MAX_FK_PLAINTEXT + 1], [2; NONCE_LEN]),
            Err(FileRecordError::ValueTooLarge { .. })
        ));
    }

    #[test]
    fn a_record_round_trips_and_its_mac_covers_every_field() {
        let key = key();
        let (record, entries) = file(&key, 4);
        let decoded = FileRecord::decode(&record.encode()).unwrap();
        assert_eq!(decoded, record);
        key.verify(&decoded).unwrap();
        decoded.check_entries(pairs(&entries)).unwrap();
        let names: Vec<_> = decoded.manifest.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["A", "B", "keystore:rules"]);

        let mut bumped = record.clone();
        bumped.version += 1;
        assert_eq!(key.verify(&bumped), Err(FileRecordError::BadMac));
        let mut rewrapped = record.clone();
        rewrapped.wrapped_key[0] ^= 1;
        assert_eq!(key.verify(&rewrapped), Err(FileRecordError::BadMac));
        let mut edited = record.clone();
        edited.manifest[0].digest[0] ^= 1;
        assert_eq!(key.verify(&edited), Err(FileRecordError::BadMac));
        let mut shorter = record.clone();
        shorter.manifest.pop();
        assert_eq!(key.verify(&shorter), Err(FileRecordError::BadMac));
        let other = FileKey::derive(&[6; DATA_KEY_LEN], ID).unwrap();
        assert_eq!(other.verify(&record), Err(FileRecordError::BadMac));
        // Every single flipped byte of the encoding is caught by decode or MAC.
        let bytes = record.encode();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            if let Ok(r) = FileRecord::decode(&bad) {
                assert_eq!(key.verify(&r), Err(FileRecordError::BadMac), "byte {i}");
            }
        }
    }

    #[test]
    fn added_dropped_changed_and_moved_entries_are_named() {
        let key = key();
        let (record, entries) = file(&key, 1);
        let check = |entries: &[(String, Envelope)]| record.check_entries(pairs(entries));

        let mut added = entries.clone();
        added.push(("C".into(), sealed(&key, "C", b"new")));
        assert_eq!(
            check(&added),
            Err(ManifestMismatch::Added { name: "C".into() })
        );

        let dropped: Vec<_> = entries.iter().filter(|(n, _)| n != "B").cloned().collect();
        assert_eq!(
            check(&dropped),
            Err(ManifestMismatch::Dropped { name: "B".into() })
        );

        let mut swapped = entries.clone();
        let (a, b) = (swapped[1].1.clone(), swapped[0].1.clone());
        swapped[0].1 = a;
        swapped[1].1 = b;
        assert_eq!(
            check(&swapped),
            Err(ManifestMismatch::Changed { name: "A".into() })
        );

        // An older value of the same name, even a valid one, is refused.
        let mut rolled = entries.clone();
        rolled[0].1 = key.seal("B", b"old", [3; NONCE_LEN]).unwrap();
        assert_eq!(
            check(&rolled),
            Err(ManifestMismatch::Changed { name: "B".into() })
        );

        // Moved: B's envelope under a new name, B gone.
        let mut moved: Vec<_> = entries.iter().filter(|(n, _)| n != "B").cloned().collect();
        moved.push(("Z".into(), entries[0].1.clone()));
        assert_eq!(
            check(&moved),
            Err(ManifestMismatch::Dropped { name: "B".into() })
        );
    }

    #[test]
    fn malformed_records_are_refused_with_what_is_wrong() {
        let key = key();
        let (record, _) = file(&key, 1);
        let bytes = record.encode();
        assert_eq!(
            FileRecord::decode(&bytes[..bytes.len() - 1]),
            Err(FileRecordError::Truncated { field: "mac" })
        );
        assert_eq!(
            FileRecord::decode(&[bytes.as_slice(), &[0]].concat()),
            Err(FileRecordError::Trailing(1))
        );
        let mut v2 = bytes.clone();
        v2[0] = 2;
        assert_eq!(
            FileRecord::decode(&v2),
            Err(FileRecordError::UnsupportedFormat(2))
        );
        assert_eq!(
            FileRecord::decode(&[]),
            Err(FileRecordError::Truncated { field: "format" })
        );
        // A huge announced count is refused before anything is allocated.
        let mut huge = Vec::new();
        huge.push(RECORD_FORMAT);
        huge.extend_from_slice(&[0; FILE_ID_LEN + 8]);
        huge.extend_from_slice(&1u16.to_be_bytes());
        huge.push(0);
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            FileRecord::decode(&huge),
            Err(FileRecordError::TooManyEntries {
                count: u64::from(u32::MAX)
            })
        );
        // Out of order names.
        let swapped = FileRecord {
            manifest: record.manifest.iter().rev().cloned().collect(),
            ..record.clone()
        };
        assert!(matches!(
            FileRecord::decode(&swapped.encode()),
            Err(FileRecordError::Unordered { .. })
        ));
        // The record may not name itself, nor hold the same name twice.
        let env = Envelope::kms(vec![1]).unwrap();
        assert_eq!(
            FileRecord::new(ID, 1, vec![1], [(FILE_NAME, &env)]).unwrap_err(),
            FileRecordError::NamesItself
        );
        assert_eq!(
            FileRecord::new(ID, 1, vec![1], [("A", &env), ("A", &env)]).unwrap_err(),
            FileRecordError::Duplicate { name: "A".into() }
        );
        assert_eq!(
            FileRecord::new(ID, 1, vec![], [("A", &env)]).unwrap_err(),
            FileRecordError::BadWrappedKey { len: 0 }
        );
    }

    #[test]
    fn file_ids_are_hex_and_the_context_names_them() {
        assert_eq!(FileId::from_hex(&ID.to_hex()).unwrap(), ID);
        assert!(FileId::from_hex("abc").is_err());
        assert_eq!(
            ID.context().get(FILE_CONTEXT_KEY).map(String::as_str),
            Some("09090909090909090909090909090909")
        );
        assert!(!format!("{:?}", key()).contains("07"));
    }

    #[test]
    fn the_largest_record_fits_its_envelope() {
        let mut record = FileRecord::new(ID, u64::MAX, vec![0xff; MAX_KMS_CIPHERTEXT], []).unwrap();
        record.manifest = (0..MAX_MANIFEST_ENTRIES)
            .map(|i| ManifestEntry {
                name: format!("{i:0>256}"),
                digest: [0; DIGEST_LEN],
            })
            .collect();
        let bytes = record.encode();
        assert_eq!(bytes.len(), MAX_RECORD_LEN);
        let env = Envelope::file(bytes).unwrap();
        let back = Envelope::parse(&env.to_string()).unwrap();
        assert_eq!(FileRecord::decode(back.ciphertext()).unwrap(), record);
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = FileRecord::decode(&bytes);
            let mut prefixed = vec![RECORD_FORMAT];
            prefixed.extend_from_slice(&bytes);
            let _ = FileRecord::decode(&prefixed);
        }

        #[test]
        fn records_round_trip(
            version in proptest::num::u64::ANY,
            names in proptest::collection::btree_set("[A-Za-z0-9_.]{1,20}", 0..20),
            value in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
        ) {
            let key = key();
            let entries: Vec<(String, Envelope)> = names
                .iter()
                .map(|n| (n.clone(), key.seal(n, &value, [4; NONCE_LEN]).unwrap()))
                .collect();
            let mut record = FileRecord::new(ID, version, vec![1; 10], pairs(&entries)).unwrap();
            key.sign(&mut record).unwrap();
            let text = record.to_envelope().unwrap().to_string();
            let back = FileRecord::decode(Envelope::parse(&text).unwrap().ciphertext()).unwrap();
            proptest::prop_assert_eq!(&back, &record);
            proptest::prop_assert!(key.verify(&back).is_ok());
            proptest::prop_assert!(back.check_entries(pairs(&entries)).is_ok());
            for (name, env) in &entries {
                let opened = key.open(name, env).unwrap();
                proptest::prop_assert_eq!(opened.as_slice(), value.as_slice());
            }
        }
    }
}
