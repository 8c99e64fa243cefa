//! `keystore-host rotate`: new key material for a file-key file.
//!
//! The old data key is unwrapped and the file checked as the enclave would
//! ([`Opened::open`]); every `fk` value (and an `fk` rules entry) is opened
//! in memory, a new data key is generated (`GenerateDataKey`, new file id)
//! under the file's KMS key or `--key-id NEW`, the values are sealed again,
//! and the record is rewritten with version = old + 1. With `--key-id NEW`,
//! `kms` values move to the new key with `ReEncrypt` (their plaintext never
//! leaves KMS; `SourceKeyId` is the key KMS named for the data key, which a
//! loadable file's values share since the enclave pins one key); without it they stay as they are and the new record names
//! them.
//!
//! The data key itself is not `ReEncrypt`ed: rotation is for new key
//! material (a data key that may have leaked must not survive it), and the
//! record's MAC and every value's seal are keyed by the data key, so they
//! are remade anyway. Every KMS call comes before the write; a failure
//! anywhere leaves the file byte for byte as it was, and plaintext never
//! touches the disk.

use std::path::Path;

use aws_sdk_kms::primitives::Blob;
use keystore_shared::envelope::{Envelope, NAME_CONTEXT_KEY};
use zeroize::Zeroizing;

use crate::secrets_file::encrypt::{EncryptError, write_atomically};
use crate::secrets_file::file_key::{DataKey, FileKeyWritten, next_version};
use crate::secrets_file::unseal::{Opened, OpsError, kms_error};
use crate::secrets_file::{self, Format};

/// What [`rotate_file`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotateReport {
    /// The new record.
    pub written: FileKeyWritten,
    /// The KMS key the new data key is under.
    pub key_id: String,
    /// `fk` values sealed again under the new data key.
    pub resealed: Vec<String>,
    /// `kms` values moved to `--key-id` with `ReEncrypt`.
    pub moved: Vec<String>,
}

/// Rotates the data key of the file at `path` (read as `format`), and with
/// `new_key_id` moves the file to that KMS key. Writes atomically, keeping
/// the file's mode; nothing is written unless everything succeeded.
pub async fn rotate_file(
    client: &aws_sdk_kms::Client,
    path: &Path,
    format: Format,
    new_key_id: Option<&str>,
) -> Result<RotateReport, OpsError> {
    let bytes = secrets_file::read(path).map_err(EncryptError::Read)?;
    let (report, new) = rotate_bytes(client, path, bytes, format, new_key_id).await?;
    write_atomically(path, &new)?;
    Ok(report)
}

/// The core of [`rotate_file`], bytes in and bytes out, wherever the file
/// lives (a local file, an S3 object); `path` (a path or URL) names it in
/// errors. Returns the new contents (rotation always changes them);
/// plaintext stays in memory.
pub async fn rotate_bytes(
    client: &aws_sdk_kms::Client,
    path: &Path,
    bytes: Zeroizing<Vec<u8>>,
    format: Format,
    new_key_id: Option<&str>,
) -> Result<(RotateReport, Zeroizing<Vec<u8>>), OpsError> {
    let mut opened = Opened::open_bytes(client, path, &bytes, format).await?;
    drop(bytes);
    let (record_index, previous) = match &opened.record {
        Some(at) => (at.index, at.record.version),
        None => {
            return Err(OpsError::NoRecord {
                path: path.to_owned(),
                what: "rotate",
            });
        }
    };
    let version = next_version(Some(previous)).map_err(EncryptError::from)?;
    let key_id = match (new_key_id, &opened.key_arn) {
        (Some(new), _) => new.to_owned(),
        (None, Some(arn)) => arn.clone(),
        (None, None) => {
            return Err(OpsError::Kms {
                path: path.to_owned(),
                operation: "Decrypt",
                name: keystore_shared::name::FILE_NAME.to_owned(),
                message: "the answer names no KeyId; give --key-id".to_owned(),
            });
        }
    };

    let mut plaintexts: Vec<(usize, Zeroizing<Vec<u8>>)> = Vec::new();
    let mut moved = Vec::new();
    for (index, envelope) in opened.sealed()? {
        match &envelope {
            Envelope::Fk { .. } => {
                plaintexts.push((index, opened.open_value(client, index, &envelope).await?));
            }
            Envelope::Kms { ciphertext } => {
                let Some(new) = new_key_id else { continue };
                let name = opened
                    .file
                    .values()
                    .nth(index)
                    .map(|v| v.name.to_owned())
                    .unwrap_or_default();
                // The source key named: the one the data key is under,
                // which a loadable file's `kms` values share (the enclave
                // pins one key). KMS then refuses a value under any other
                // key, and LocalStack's ReEncrypt needs it.
                let output = client
                    .re_encrypt()
                    .set_source_key_id(opened.key_arn.clone())
                    .ciphertext_blob(Blob::new(ciphertext.clone()))
                    .source_encryption_context(NAME_CONTEXT_KEY, &name)
                    .destination_key_id(new)
                    .destination_encryption_context(NAME_CONTEXT_KEY, &name)
                    .send()
                    .await
                    .map_err(|e| kms_error(path, "ReEncrypt", &name, &e))?;
                let blob = output
                    .ciphertext_blob
                    .map(Blob::into_inner)
                    .unwrap_or_default();
                let moved_envelope =
                    Envelope::kms(blob).map_err(|source| EncryptError::Ciphertext {
                        name: name.clone(),
                        source,
                    })?;
                opened
                    .file
                    .set_value(index, &moved_envelope.to_string())
                    .map_err(|e| opened.format_error(e))?;
                moved.push(name);
            }
            // `sealed` leaves the record out, and `Opened::open` refused
            // any other `file` envelope.
            Envelope::File { .. } => {}
        }
    }

    let key = DataKey::generate(client, &key_id)
        .await
        .map_err(EncryptError::from)?;
    let resealed = key
        .seal_values(&mut opened.file, plaintexts)
        .map_err(|e| e.at(path))?;
    let written = key
        .write_record(&mut opened.file, version, Some(record_index))
        .map_err(|e| e.at(path))?;
    let text = opened.file.render().map_err(|e| opened.format_error(e))?;
    tracing::info!(
        version,
        resealed = resealed.len(),
        moved = moved.len(),
        "rotated"
    );
    Ok((
        RotateReport {
            written,
            key_id,
            resealed,
            moved,
        },
        Zeroizing::new(text.as_bytes().to_vec()),
    ))
}
