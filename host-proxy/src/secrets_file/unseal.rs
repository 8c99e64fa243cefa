//! Opening a whole secrets file through KMS on the operator's side: what
//! `decrypt`, `rotate` and `edit` start from.
//!
//! The file's data key is unwrapped with one KMS `Decrypt` (context
//! `{"keystore:file": ID}`, no `KeyId`: the operator side is not pinned, KMS
//! names the key in its answer), then the file is checked exactly as the
//! enclave checks it before trusting a value: the record's MAC, then the
//! manifest against the file's `ENC[...]` entries (a value added, dropped,
//! moved or swapped is refused naming its path). Only then are values
//! opened: `fk` values with the data key, `kms` values with one `Decrypt`
//! each (context `{"keystore:name": NAME}`). Plaintext lives only in
//! `Zeroizing` buffers.
//!
//! The generated key policy denies `Decrypt` without an attestation document
//! to every principal except the rotation principals (`keystore-host policy
//! --rotator ARN`); an `AccessDeniedException` is reported as
//! [`OpsError::Denied`], which says so.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use aws_sdk_kms::error::ProvideErrorMetadata;
use aws_sdk_kms::primitives::Blob;
use keystore_shared::envelope::{Envelope, NAME_CONTEXT_KEY};
use keystore_shared::file_record::{FileKey, FileRecordError, ManifestMismatch};
use keystore_shared::name::{FILE_NAME, is_reserved};
use zeroize::Zeroizing;

use crate::secrets_file::encrypt::EncryptError;
use crate::secrets_file::file_key::{self, RecordAt, survey};
use crate::secrets_file::{self, Format, FormatError, SecretsFile};

/// Why `decrypt`, `rotate` or `edit` failed. The file is unchanged in every
/// case. Names files, entries and lines, never values.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Reading, parsing, sealing or writing (see [`EncryptError`]).
    #[error(transparent)]
    File(#[from] EncryptError),
    /// KMS refused to release plaintext to this principal.
    #[error(
        "{path}: KMS {operation} of {name} was denied: {message}. The key policy written by \
         `keystore-host policy` releases plaintext only to the attested enclave; to decrypt, \
         rotate or edit a file from here, run as a principal the policy names with \
         `keystore-host policy --rotator ARN`; nothing was changed"
    )]
    Denied {
        /// The file.
        path: PathBuf,
        /// `Decrypt` or `ReEncrypt`.
        operation: &'static str,
        /// The entry (or `keystore:file` for the data key).
        name: String,
        /// KMS's error.
        message: String,
    },
    /// Any other KMS failure.
    #[error("{path}: KMS {operation} of {name} failed: {message}; nothing was changed")]
    Kms {
        /// The file.
        path: PathBuf,
        /// The operation.
        operation: &'static str,
        /// The entry.
        name: String,
        /// The SDK's error with its context (no plaintext).
        message: String,
    },
    /// The record does not authenticate, or a value does not open.
    #[error("{path}: {name} (line {line}): {source}; refusing the file, nothing was changed")]
    Tampered {
        /// The file.
        path: PathBuf,
        /// The entry.
        name: String,
        /// Its line.
        line: usize,
        /// What failed.
        #[source]
        source: FileRecordError,
    },
    /// The file's entries are not the ones its record names.
    #[error("{path}: {source}; refusing the file, nothing was changed")]
    Manifest {
        /// The file.
        path: PathBuf,
        /// The first difference, by name.
        #[source]
        source: ManifestMismatch,
    },
    /// `fk` values without a `keystore:file` record.
    #[error(
        "{path}: {name} (line {line}) is ENC[v1:fk:...] but the file has no {FILE_NAME} record; \
         refusing the file"
    )]
    NoRecordForFk {
        /// The file.
        path: PathBuf,
        /// The first `fk` entry.
        name: String,
        /// Its line.
        line: usize,
    },
    /// A decrypted value is not UTF-8 text, so it cannot be written into
    /// the file's format.
    #[error("{path}: {name} (line {line}) decrypts to bytes that are not UTF-8 text")]
    NotText {
        /// The file.
        path: PathBuf,
        /// The entry.
        name: String,
        /// Its line.
        line: usize,
    },
    /// A command that needs a file key found none.
    #[error(
        "{path}: no {FILE_NAME} record; {what} works on files protected by a file key \
         (`keystore-host encrypt --file-key`)"
    )]
    NoRecord {
        /// The file.
        path: PathBuf,
        /// The command.
        what: &'static str,
    },
    /// `edit`: the editor failed or the edited text is refused.
    #[error("{path}: {message}; nothing was changed")]
    Edit {
        /// The file.
        path: PathBuf,
        /// What happened.
        message: String,
    },
}

/// A secrets file whose record (if any) was authenticated with its data
/// key, ready to open values.
pub(crate) struct Opened {
    /// The file's path (for errors).
    pub(crate) path: PathBuf,
    /// The parsed file.
    pub(crate) file: SecretsFile,
    /// Its record.
    pub(crate) record: Option<RecordAt>,
    /// The data key's value and MAC keys.
    pub(crate) key: Option<FileKey>,
    /// The ARN of the KMS key the data key is under (KMS's `Decrypt`
    /// answer).
    pub(crate) key_arn: Option<String>,
}

/// The first `AccessDeniedException` is [`OpsError::Denied`], anything else
/// [`OpsError::Kms`].
pub(crate) fn kms_error<E>(
    path: &Path,
    operation: &'static str,
    name: &str,
    err: &aws_sdk_kms::error::SdkError<E, aws_smithy_runtime_api::http::Response>,
) -> OpsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let message = aws_smithy_types::error::display::DisplayErrorContext(err).to_string();
    if err.code() == Some("AccessDeniedException") {
        OpsError::Denied {
            path: path.to_owned(),
            operation,
            name: name.to_owned(),
            message,
        }
    } else {
        OpsError::Kms {
            path: path.to_owned(),
            operation,
            name: name.to_owned(),
            message,
        }
    }
}

impl Opened {
    /// Reads `path` as `format`, unwraps its data key (one KMS `Decrypt`)
    /// and checks the record's MAC and manifest. A file without a record
    /// (per-value `kms` only) opens without a KMS call.
    pub(crate) async fn open(
        client: &aws_sdk_kms::Client,
        path: &Path,
        format: Format,
    ) -> Result<Opened, OpsError> {
        let bytes = secrets_file::read(path).map_err(EncryptError::Read)?;
        Opened::open_bytes(client, path, &bytes, format).await
    }

    /// [`Opened::open`] on the file's contents; `path` (a path or URL)
    /// names it in errors.
    pub(crate) async fn open_bytes(
        client: &aws_sdk_kms::Client,
        path: &Path,
        bytes: &[u8],
        format: Format,
    ) -> Result<Opened, OpsError> {
        let file = file_key::parse(path, bytes, format)?;
        let facts = survey(&file)?;
        let Some(at) = facts.record else {
            if let Some((name, line)) = facts.fk.first() {
                return Err(OpsError::NoRecordForFk {
                    path: path.to_owned(),
                    name: name.clone(),
                    line: *line,
                });
            }
            return Ok(Opened {
                path: path.to_owned(),
                file,
                record: None,
                key: None,
                key_arn: None,
            });
        };
        let mut request = client
            .decrypt()
            .ciphertext_blob(Blob::new(at.record.wrapped_key.clone()));
        for (k, v) in at.record.file_id.context() {
            request = request.encryption_context(k, v);
        }
        let output = request
            .send()
            .await
            .map_err(|e| kms_error(path, "Decrypt", FILE_NAME, &e))?;
        let key_arn = output.key_id.clone();
        let data_key = Zeroizing::new(output.plaintext.map(Blob::into_inner).unwrap_or_default());
        let tampered = |source| OpsError::Tampered {
            path: path.to_owned(),
            name: FILE_NAME.to_owned(),
            line: at.line,
            source,
        };
        let key = FileKey::derive(&data_key, at.record.file_id).map_err(tampered)?;
        drop(data_key);
        key.verify(&at.record).map_err(tampered)?;
        // What the enclave's loader would be sent: every ENC[...] string
        // but the record.
        let mut sent = Vec::new();
        for value in file.values() {
            if value.name == FILE_NAME || !value.is_string || !Envelope::is_envelope(value.value) {
                continue;
            }
            let envelope = Envelope::parse(value.value).map_err(|source| {
                EncryptError::from(file_key::FileKeyEncryptError::Envelope {
                    name: value.name.to_owned(),
                    line: value.line,
                    source,
                })
            })?;
            sent.push((value.name.to_owned(), envelope));
        }
        at.record
            .check_entries(sent.iter().map(|(n, e)| (n.as_str(), e)))
            .map_err(|source| OpsError::Manifest {
                path: path.to_owned(),
                source,
            })?;
        Ok(Opened {
            path: path.to_owned(),
            file,
            record: Some(at),
            key: Some(key),
            key_arn,
        })
    }

    /// The indexes of every `ENC[...]` string but the record, with the
    /// envelope.
    pub(crate) fn sealed(&self) -> Result<Vec<(usize, Envelope)>, OpsError> {
        let mut out = Vec::new();
        for (index, value) in self.file.values().enumerate() {
            if value.name == FILE_NAME || !value.is_string || !Envelope::is_envelope(value.value) {
                continue;
            }
            let envelope = Envelope::parse(value.value).map_err(|source| {
                EncryptError::from(file_key::FileKeyEncryptError::Envelope {
                    name: value.name.to_owned(),
                    line: value.line,
                    source,
                })
            })?;
            out.push((index, envelope));
        }
        Ok(out)
    }

    /// The plaintext of value `index` sealed as `envelope`: an `fk` value
    /// opened with the data key, a `kms` value by one KMS `Decrypt` bound
    /// to its name.
    pub(crate) async fn open_value(
        &self,
        client: &aws_sdk_kms::Client,
        index: usize,
        envelope: &Envelope,
    ) -> Result<Zeroizing<Vec<u8>>, OpsError> {
        let (name, line) = self
            .file
            .values()
            .nth(index)
            .map(|v| (v.name.to_owned(), v.line))
            .ok_or_else(|| self.format_error(FormatError::NoSuchEntry(index)))?;
        match envelope {
            Envelope::Fk { .. } => {
                let key = self.key.as_ref().ok_or_else(|| OpsError::NoRecordForFk {
                    path: self.path.clone(),
                    name: name.clone(),
                    line,
                })?;
                key.open(&name, envelope)
                    .map_err(|source| OpsError::Tampered {
                        path: self.path.clone(),
                        name,
                        line,
                        source,
                    })
            }
            Envelope::Kms { ciphertext } => {
                let output = client
                    .decrypt()
                    .ciphertext_blob(Blob::new(ciphertext.clone()))
                    .encryption_context(NAME_CONTEXT_KEY, &name)
                    .send()
                    .await
                    .map_err(|e| kms_error(&self.path, "Decrypt", &name, &e))?;
                Ok(Zeroizing::new(
                    output.plaintext.map(Blob::into_inner).unwrap_or_default(),
                ))
            }
            Envelope::File { .. } => Err(OpsError::Tampered {
                path: self.path.clone(),
                name,
                line,
                source: FileRecordError::BadName(format!(
                    "only {FILE_NAME} holds an ENC[v1:file:...] value"
                )),
            }),
        }
    }

    /// Replaces every sealed ordinary value (not the reserved `keystore:`
    /// entries, which stay sealed) with its plaintext, in the file's own
    /// format. Returns the names revealed.
    pub(crate) async fn reveal(
        &mut self,
        client: &aws_sdk_kms::Client,
    ) -> Result<Vec<String>, OpsError> {
        let mut revealed = Vec::new();
        for (index, envelope) in self.sealed()? {
            let Some((name, line)) = self
                .file
                .values()
                .nth(index)
                .map(|v| (v.name.to_owned(), v.line))
            else {
                continue;
            };
            if is_reserved(&name) {
                continue;
            }
            let plaintext = self.open_value(client, index, &envelope).await?;
            let text = std::str::from_utf8(&plaintext).map_err(|_| OpsError::NotText {
                path: self.path.clone(),
                name: name.clone(),
                line,
            })?;
            self.file
                .set_value(index, text)
                .map_err(|e| self.format_error(e))?;
            revealed.push(name);
        }
        Ok(revealed)
    }

    /// Names of the ordinary values that are sealed now.
    pub(crate) fn sealed_names(&self) -> HashSet<String> {
        self.file
            .values()
            .filter(|v| !is_reserved(v.name) && v.is_string && Envelope::is_envelope(v.value))
            .map(|v| v.name.to_owned())
            .collect()
    }

    /// A format error about this file.
    pub(crate) fn format_error(&self, source: FormatError) -> OpsError {
        EncryptError::Parse {
            path: self.path.clone(),
            source,
        }
        .into()
    }
}

/// What [`decrypt_file`] produced.
pub struct Plaintext {
    /// The file in its own format with every value in plaintext (the
    /// reserved `keystore:rules` and `keystore:file` entries left sealed).
    pub text: Zeroizing<String>,
    /// Names of the values revealed.
    pub revealed: Vec<String>,
}

impl std::fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plaintext")
            .field(
                "text",
                &format_args!("[REDACTED {} bytes]", self.text.len()),
            )
            .field("revealed", &self.revealed)
            .finish()
    }
}

/// `keystore-host decrypt`: the file at `path` (read as `format`) with
/// every value in plaintext, after the same checks the enclave makes. The
/// file itself is not changed.
pub async fn decrypt_file(
    client: &aws_sdk_kms::Client,
    path: &Path,
    format: Format,
) -> Result<Plaintext, OpsError> {
    let bytes = secrets_file::read(path).map_err(EncryptError::Read)?;
    decrypt_bytes(client, path, bytes, format).await
}

/// [`decrypt_file`] on the file's contents (a local file's or an S3
/// object's); `label` names it in errors.
pub async fn decrypt_bytes(
    client: &aws_sdk_kms::Client,
    label: &Path,
    bytes: Zeroizing<Vec<u8>>,
    format: Format,
) -> Result<Plaintext, OpsError> {
    let mut opened = Opened::open_bytes(client, label, &bytes, format).await?;
    drop(bytes);
    let revealed = opened.reveal(client).await?;
    let text = opened.file.render().map_err(|e| opened.format_error(e))?;
    Ok(Plaintext { text, revealed })
}
