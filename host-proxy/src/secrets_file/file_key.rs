//! `keystore-host encrypt --file-key`: one KMS `GenerateDataKey` per file,
//! values sealed as `ENC[v1:fk:...]`, and the `keystore:file` record that
//! binds them (see [`keystore_shared::file_record`]).
//!
//! The data key is generated under the operator's key with the encryption
//! context `{"keystore:file": FILE_ID}` (a fresh random 128-bit id); its
//! plaintext lives only in memory for the run. Each selected plain value,
//! and the access rules if given, is sealed with AES-256-GCM bound to its
//! name and the file id. The record names every `ENC[...]` entry of the
//! file (exactly what the daemon's loader sends: `kms` values, `fk` values,
//! the rules), with the version one above the previous record's, and is
//! MACed under a key derived from the data key. The file is then replaced
//! atomically.
//!
//! **Which files can be (re-)encrypted.** Writing a record needs the data
//! key's plaintext, and the operator cannot unwrap an existing data key:
//! the key policy releases plaintext only to the attested enclave. So every
//! write makes a *new* data key (and file id), and the rule is:
//!
//! - nothing to seal (every selected value already `ENC[...]`, no rules):
//!   nothing changes, the file is not rewritten (idempotent);
//! - otherwise, the file may hold plain values and `kms` values, which are
//!   carried over as they are (the new record names them), but no `fk`
//!   values: those are sealed under the old data key, which cannot be
//!   recovered here, so the command refuses and names the first one
//!   (re-sealing them is `rotate`/`edit`'s job, which decrypt through KMS).
//!
//! `--file-key` is the default for a file without `ENC[v1:kms:...]` values
//! or with a record; a file already written value by value keeps that way
//! unless `--file-key` is given. `--per-value-kms` keeps the old way and is
//! refused on a file that has a record (a value added beside the record
//! would be refused by the enclave as not named by it).

use std::collections::BTreeMap;
use std::path::Path;

use aws_sdk_kms::types::DataKeySpec;
use keystore_shared::access::AccessRules;
use keystore_shared::envelope::Envelope;
use keystore_shared::file_record::{
    FILE_CONTEXT_KEY, FILE_ID_LEN, FileId, FileKey, FileRecord, FileRecordError, MAX_FK_PLAINTEXT,
    NONCE_LEN,
};
use keystore_shared::name::{FILE_NAME, RULES_NAME, SecretName, is_reserved};
use rand::TryRng;
use zeroize::Zeroizing;

use crate::secrets_file;
use crate::secrets_file::dotenv::DotEnv;
use crate::secrets_file::encrypt::{
    EncryptError, EncryptReport, RulesWritten, Selection, encrypt_file_with_rules, write_atomically,
};
use crate::secrets_file::format::FormatError;

/// How `encrypt` protects values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyMode {
    /// File key for a file with a record or without `kms` values; per-value
    /// KMS for a file already written that way.
    #[default]
    Auto,
    /// One data key for the file (`--file-key`).
    FileKey,
    /// One KMS `Encrypt` per value (`--per-value-kms`).
    PerValueKms,
}

/// What a file-key write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileKeyWritten {
    /// The new file id (hex).
    pub file_id: String,
    /// The new record's version.
    pub version: u64,
    /// Entries the record names.
    pub entries: usize,
}

/// Why a file-key `encrypt` was refused. Names entries, never values.
#[derive(Debug, thiserror::Error)]
pub enum FileKeyEncryptError {
    /// The file holds `fk` values sealed under a data key the operator
    /// cannot unwrap.
    #[error(
        "{name} (line {line}) is sealed under the file's current data key, which only the \
         enclave can unwrap; new values cannot join this file without re-sealing its \
         {count} ENC[v1:fk:...] value(s): use `keystore-host rotate` or `edit`; nothing was changed"
    )]
    SealedUnderOldKey {
        /// The first such entry.
        name: String,
        /// Its line.
        line: usize,
        /// How many there are.
        count: usize,
    },
    /// `--per-value-kms` on a file with a record.
    #[error(
        "{FILE_NAME} (line {line}): this file is protected by a file key; a value added \
         with --per-value-kms would not be named by its record and the enclave would refuse \
         the file; nothing was changed"
    )]
    PerValueOnFileKeyFile {
        /// The record's line.
        line: usize,
    },
    /// An `ENC[...]` value that does not parse (the record would not match
    /// what the loader sends).
    #[error("{name} (line {line}): {source}; nothing was changed")]
    Envelope {
        /// The entry.
        name: String,
        /// Its line.
        line: usize,
        /// Why.
        #[source]
        source: keystore_shared::envelope::EnvelopeError,
    },
    /// The existing record does not decode.
    #[error("{FILE_NAME} (line {line}): {source}; nothing was changed")]
    Record {
        /// Its line.
        line: usize,
        /// Why.
        #[source]
        source: FileRecordError,
    },
    /// A value too large for the file key.
    #[error(
        "{name} (line {line}) is {len} bytes; the file key seals at most {MAX_FK_PLAINTEXT}; \
         nothing was changed"
    )]
    TooLarge {
        /// The entry.
        name: String,
        /// Its line.
        line: usize,
        /// Its size.
        len: usize,
    },
    /// The previous version is the largest possible.
    #[error("{FILE_NAME}: version {0} cannot be increased; nothing was changed")]
    VersionExhausted(u64),
    /// KMS `GenerateDataKey` failed.
    #[error("KMS GenerateDataKey failed: {0}; nothing was changed")]
    Kms(String),
    /// KMS answered without a usable data key.
    #[error("KMS GenerateDataKey returned an unusable answer: {0}; nothing was changed")]
    BadDataKey(String),
    /// Sealing or signing failed.
    #[error("{0}; nothing was changed")]
    Seal(#[source] FileRecordError),
    /// The OS random source failed.
    #[error("operating system randomness unavailable: {0}; nothing was changed")]
    Random(String),
}

/// A file's key facts as read from it.
struct Survey {
    /// Index and line of the existing record entry, and its version.
    record: Option<(usize, usize, u64)>,
    /// Index of the rules entry.
    rules: Option<usize>,
    /// (name, line) of every `fk` value.
    fk: Vec<(String, usize)>,
    /// Whether any `kms` value is present.
    has_kms: bool,
}

fn survey(file: &DotEnv) -> Result<Survey, EncryptError> {
    let mut out = Survey {
        record: None,
        rules: None,
        fk: Vec::new(),
        has_kms: false,
    };
    for (index, entry) in file.entries().enumerate() {
        if is_reserved(entry.name) && !Envelope::is_envelope(entry.value) {
            return Err(EncryptError::PlainReserved {
                name: entry.name.to_owned(),
                line: entry.line,
            });
        }
        if !Envelope::is_envelope(entry.value) {
            continue;
        }
        let envelope =
            Envelope::parse(entry.value).map_err(|source| FileKeyEncryptError::Envelope {
                name: entry.name.to_owned(),
                line: entry.line,
                source,
            })?;
        match (entry.name, &envelope) {
            (FILE_NAME, Envelope::File { record }) => {
                let record =
                    FileRecord::decode(record).map_err(|source| FileKeyEncryptError::Record {
                        line: entry.line,
                        source,
                    })?;
                out.record = Some((index, entry.line, record.version));
            }
            (FILE_NAME, _) | (_, Envelope::File { .. }) => {
                return Err(FileKeyEncryptError::Record {
                    line: entry.line,
                    source: FileRecordError::BadName(format!(
                        "`{}` holds an ENC[v1:{}:...] value; only {FILE_NAME} holds the record, \
                         as ENC[v1:file:...]",
                        entry.name,
                        envelope.kind()
                    )),
                }
                .into());
            }
            (_, Envelope::Fk { .. }) => out.fk.push((entry.name.to_owned(), entry.line)),
            (_, Envelope::Kms { .. }) => out.has_kms = true,
        }
        if entry.name == RULES_NAME {
            out.rules = Some(index);
        }
    }
    Ok(out)
}

/// `encrypt` with the [`KeyMode`] choice: a file key, or one KMS `Encrypt`
/// per value ([`encrypt_file_with_rules`]). Nothing is written unless
/// everything succeeded.
pub async fn encrypt(
    client: &aws_sdk_kms::Client,
    key_id: &str,
    path: &Path,
    selection: &Selection,
    rules: Option<&AccessRules>,
    mode: KeyMode,
) -> Result<EncryptReport, EncryptError> {
    let file = read(path)?;
    let facts = survey(&file)?;
    drop(file);
    let file_key = match mode {
        KeyMode::FileKey => true,
        KeyMode::PerValueKms => {
            if let Some((_, line, _)) = facts.record {
                return Err(FileKeyEncryptError::PerValueOnFileKeyFile { line }.into());
            }
            false
        }
        KeyMode::Auto => facts.record.is_some() || !facts.has_kms,
    };
    if file_key {
        encrypt_file_key(client, key_id, path, selection, rules).await
    } else {
        encrypt_file_with_rules(client, key_id, path, selection, rules).await
    }
}

fn read(path: &Path) -> Result<DotEnv, EncryptError> {
    let bytes = secrets_file::read(path).map_err(EncryptError::Read)?;
    DotEnv::parse(&bytes).map_err(|source| EncryptError::Parse {
        path: path.to_owned(),
        source: FormatError::Env(source),
    })
}

/// Seals the selected plain values (and `rules`) of the `.env` file at
/// `path` under a new data key from `key_id`, and writes the record. See
/// the module documentation for which files qualify.
pub async fn encrypt_file_key(
    client: &aws_sdk_kms::Client,
    key_id: &str,
    path: &Path,
    selection: &Selection,
    rules: Option<&AccessRules>,
) -> Result<EncryptReport, EncryptError> {
    let mut file = read(path)?;
    let facts = survey(&file)?;
    let parse_err = |source| EncryptError::Parse {
        path: path.to_owned(),
        source: FormatError::Env(source),
    };

    // Every check before the KMS call.
    let rules_json = rules.map(|rules| Zeroizing::new(rules.to_json()));
    if let Some(json) = &rules_json
        && json.len() > MAX_FK_PLAINTEXT
    {
        return Err(FileKeyEncryptError::TooLarge {
            name: RULES_NAME.to_owned(),
            line: 0,
            len: json.len(),
        }
        .into());
    }
    let mut report = EncryptReport::default();
    let mut todo = Vec::new();
    for (index, entry) in file.entries().enumerate() {
        if !selection.matches(entry.name) {
            continue;
        }
        SecretName::check(entry.name).map_err(|source| EncryptError::InvalidName {
            line: entry.line,
            source,
        })?;
        if Envelope::is_envelope(entry.value) {
            report.already_encrypted.push(entry.name.to_owned());
        } else if entry.value.is_empty() {
            report.skipped_empty.push(entry.name.to_owned());
        } else if entry.value.len() > MAX_FK_PLAINTEXT {
            return Err(FileKeyEncryptError::TooLarge {
                name: entry.name.to_owned(),
                line: entry.line,
                len: entry.value.len(),
            }
            .into());
        } else {
            todo.push(index);
        }
    }
    // Idempotent: with nothing to seal, a file with a record stays as it
    // is, and so does one with no ENC[...] value at all. (A file of `kms`
    // values only, given `--file-key`, gets a record naming them.)
    if todo.is_empty()
        && rules.is_none()
        && (facts.record.is_some() || (!facts.has_kms && facts.fk.is_empty()))
    {
        return Ok(report);
    }
    if let Some((name, line)) = facts.fk.first() {
        return Err(FileKeyEncryptError::SealedUnderOldKey {
            name: name.clone(),
            line: *line,
            count: facts.fk.len(),
        }
        .into());
    }
    let version = match facts.record {
        Some((_, _, previous)) => previous
            .checked_add(1)
            .ok_or(FileKeyEncryptError::VersionExhausted(previous))?,
        None => 1,
    };

    // The one KMS call.
    let file_id = FileId(random::<FILE_ID_LEN>()?);
    let output = client
        .generate_data_key()
        .key_id(key_id)
        .key_spec(DataKeySpec::Aes256)
        .encryption_context(FILE_CONTEXT_KEY, file_id.to_hex())
        .send()
        .await
        .map_err(|err| {
            FileKeyEncryptError::Kms(
                aws_smithy_types::error::display::DisplayErrorContext(&err).to_string(),
            )
        })?;
    let wrapped = output
        .ciphertext_blob
        .map(|b| b.into_inner())
        .ok_or_else(|| FileKeyEncryptError::BadDataKey("no CiphertextBlob".into()))?;
    let data_key = Zeroizing::new(
        output
            .plaintext
            .map(|b| b.into_inner())
            .ok_or_else(|| FileKeyEncryptError::BadDataKey("no Plaintext".into()))?,
    );
    let key = FileKey::derive(&data_key, file_id)
        .map_err(|e| FileKeyEncryptError::BadDataKey(e.to_string()))?;
    drop(data_key);

    for index in todo {
        let (name, plaintext) = match file.entries().nth(index) {
            Some(entry) => (
                entry.name.to_owned(),
                Zeroizing::new(entry.value.as_bytes().to_vec()),
            ),
            None => continue,
        };
        let envelope = key
            .seal(&name, &plaintext, random::<NONCE_LEN>()?)
            .map_err(FileKeyEncryptError::Seal)?;
        file.set_value(index, &envelope.to_string())
            .map_err(parse_err)?;
        tracing::info!(name = %name, "sealed under the file key");
        report.encrypted.push(name);
    }
    if let Some((rules, json)) = rules.zip(rules_json) {
        let envelope = key
            .seal(RULES_NAME, &json, random::<NONCE_LEN>()?)
            .map_err(FileKeyEncryptError::Seal)?;
        let count = rules.rules().len();
        report.rules = Some(match facts.rules {
            Some(index) => {
                file.set_value(index, &envelope.to_string())
                    .map_err(parse_err)?;
                RulesWritten::Replaced { rules: count }
            }
            None => {
                file.append(
                    Some("access rules: written by `keystore-host encrypt --rules`"),
                    RULES_NAME,
                    &envelope.to_string(),
                )
                .map_err(parse_err)?;
                RulesWritten::Added { rules: count }
            }
        });
    }

    // The record names every ENC[...] entry the loader will send.
    let mut named: BTreeMap<String, Envelope> = BTreeMap::new();
    for entry in file.entries() {
        if entry.name == FILE_NAME || !Envelope::is_envelope(entry.value) {
            continue;
        }
        let envelope =
            Envelope::parse(entry.value).map_err(|source| FileKeyEncryptError::Envelope {
                name: entry.name.to_owned(),
                line: entry.line,
                source,
            })?;
        named.insert(entry.name.to_owned(), envelope);
    }
    let mut record = FileRecord::new(
        file_id,
        version,
        wrapped,
        named.iter().map(|(n, e)| (n.as_str(), e)),
    )
    .map_err(FileKeyEncryptError::Seal)?;
    key.sign(&mut record).map_err(FileKeyEncryptError::Seal)?;
    let record_text = record
        .to_envelope()
        .map_err(|e| FileKeyEncryptError::BadDataKey(e.to_string()))?
        .to_string();
    match facts.record {
        Some((index, _, _)) => file.set_value(index, &record_text).map_err(parse_err)?,
        None => file
            .append(
                Some("file key record: written by `keystore-host encrypt`; do not edit"),
                FILE_NAME,
                &record_text,
            )
            .map_err(parse_err)?,
    }
    report.file_key = Some(FileKeyWritten {
        file_id: file_id.to_hex(),
        version,
        entries: record.manifest.len(),
    });
    tracing::info!(file_id = %file_id, version, entries = record.manifest.len(), "file key record written");
    write_atomically(path, file.text().as_bytes())?;
    Ok(report)
}

/// `N` bytes from the OS random source.
fn random<const N: usize>() -> Result<[u8; N], FileKeyEncryptError> {
    let mut out = [0u8; N];
    rand::rngs::SysRng
        .try_fill_bytes(&mut out)
        .map_err(|e| FileKeyEncryptError::Random(e.to_string()))?;
    Ok(out)
}
