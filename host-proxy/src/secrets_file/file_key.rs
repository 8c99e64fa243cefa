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
use keystore_shared::name::{FILE_NAME, RULES_NAME, is_reserved};
use rand::TryRng;
use zeroize::Zeroizing;

use crate::secrets_file::encrypt::{
    EncryptError, EncryptReport, Plan, Selection, encrypt_bytes_as, plan, put_rules,
    write_atomically,
};
use crate::secrets_file::format::FormatError;
use crate::secrets_file::{self, Format, SecretsFile};

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

/// The `keystore:file` record of a file, where it is.
pub(crate) struct RecordAt {
    /// Index as numbered by [`SecretsFile::values`].
    pub(crate) index: usize,
    /// 1-based line.
    pub(crate) line: usize,
    /// The decoded record.
    pub(crate) record: FileRecord,
}

/// A file's key facts as read from it.
pub(crate) struct Survey {
    /// The existing record entry.
    pub(crate) record: Option<RecordAt>,
    /// (name, line) of every `fk` value.
    pub(crate) fk: Vec<(String, usize)>,
    /// Whether any `kms` value is present.
    pub(crate) has_kms: bool,
}

/// Reads the record and the kinds of envelopes in `file`: a reserved entry
/// must be sealed, the record must be `keystore:file` and of kind `file`,
/// and every `ENC[...]` string must parse.
pub(crate) fn survey(file: &SecretsFile) -> Result<Survey, EncryptError> {
    let mut out = Survey {
        record: None,
        fk: Vec::new(),
        has_kms: false,
    };
    for (index, entry) in file.values().enumerate() {
        let sealed = entry.is_string && Envelope::is_envelope(entry.value);
        if is_reserved(entry.name) && !sealed {
            return Err(EncryptError::PlainReserved {
                name: entry.name.to_owned(),
                line: entry.line,
            });
        }
        if !sealed {
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
                out.record = Some(RecordAt {
                    index,
                    line: entry.line,
                    record,
                });
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
    }
    Ok(out)
}

/// `encrypt` with the [`KeyMode`] choice: a file key, or one KMS `Encrypt`
/// per value ([`encrypt_file_as`](crate::secrets_file::encrypt::encrypt_file_as)), for a file read as `format`. Nothing is
/// written unless everything succeeded.
pub async fn encrypt(
    client: &aws_sdk_kms::Client,
    key_id: &str,
    path: &Path,
    format: Format,
    selection: &Selection,
    rules: Option<&AccessRules>,
    mode: KeyMode,
) -> Result<EncryptReport, EncryptError> {
    let bytes = secrets_file::read(path).map_err(EncryptError::Read)?;
    let request = Request {
        client,
        key_id,
        label: path,
        format,
        selection,
        rules,
    };
    let (report, new) = encrypt_bytes(&request, bytes, mode).await?;
    if let Some(new) = new {
        write_atomically(path, &new)?;
    }
    Ok(report)
}

/// What an `encrypt` run is asked to do, apart from the contents.
pub struct Request<'a> {
    /// The KMS client.
    pub client: &'a aws_sdk_kms::Client,
    /// The KMS key to encrypt under.
    pub key_id: &'a str,
    /// The file's path or URL, for errors.
    pub label: &'a Path,
    /// The file's format.
    pub format: Format,
    /// Which plain values to seal.
    pub selection: &'a Selection,
    /// Access rules to (re-)write.
    pub rules: Option<&'a AccessRules>,
}

/// The core of [`encrypt`], bytes in and bytes out, wherever the file lives
/// (a local file, an S3 object): returns what was done and the new
/// contents, or `None` when nothing changed. Nothing touches a disk.
pub async fn encrypt_bytes(
    request: &Request<'_>,
    bytes: Zeroizing<Vec<u8>>,
    mode: KeyMode,
) -> Result<(EncryptReport, Option<Zeroizing<Vec<u8>>>), EncryptError> {
    let file = parse(request.label, &bytes, request.format)?;
    let facts = survey(&file)?;
    let file_key = match mode {
        KeyMode::FileKey => true,
        KeyMode::PerValueKms => {
            if let Some(at) = &facts.record {
                return Err(FileKeyEncryptError::PerValueOnFileKeyFile { line: at.line }.into());
            }
            false
        }
        KeyMode::Auto => facts.record.is_some() || !facts.has_kms,
    };
    if file_key {
        encrypt_file_key_parsed(request, file, facts).await
    } else {
        drop(file);
        encrypt_bytes_as(
            request.client,
            request.key_id,
            request.label,
            bytes,
            request.format,
            request.selection,
            request.rules,
        )
        .await
    }
}

/// Reads and parses the file at `path` as `format`.
pub(crate) fn read(path: &Path, format: Format) -> Result<SecretsFile, EncryptError> {
    let bytes = secrets_file::read(path).map_err(EncryptError::Read)?;
    parse(path, &bytes, format)
}

/// Parses `bytes` as `format`; `label` (a path or URL) names the file in
/// errors.
pub(crate) fn parse(
    label: &Path,
    bytes: &[u8],
    format: Format,
) -> Result<SecretsFile, EncryptError> {
    SecretsFile::parse(bytes, format).map_err(|source| EncryptError::Parse {
        path: label.to_owned(),
        source,
    })
}

/// Seals the selected plain values (and `rules`) of the file at `path`,
/// read as `format`, under a new data key from `key_id`, and writes the
/// record. See the module documentation for which files qualify.
pub async fn encrypt_file_key(
    client: &aws_sdk_kms::Client,
    key_id: &str,
    path: &Path,
    format: Format,
    selection: &Selection,
    rules: Option<&AccessRules>,
) -> Result<EncryptReport, EncryptError> {
    let file = read(path, format)?;
    let facts = survey(&file)?;
    let request = Request {
        client,
        key_id,
        label: path,
        format,
        selection,
        rules,
    };
    let (report, new) = encrypt_file_key_parsed(&request, file, facts).await?;
    if let Some(new) = new {
        write_atomically(path, &new)?;
    }
    Ok(report)
}

/// [`encrypt_file_key`] on a parsed file and its [`survey`]: returns the
/// new contents, or `None` when there was nothing to seal.
async fn encrypt_file_key_parsed(
    request: &Request<'_>,
    mut file: SecretsFile,
    facts: Survey,
) -> Result<(EncryptReport, Option<Zeroizing<Vec<u8>>>), EncryptError> {
    let path = request.label;
    let rules = request.rules;
    let parse_err = |source| EncryptError::Parse {
        path: path.to_owned(),
        source,
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
    let Plan {
        mut report,
        todo,
        rules_index,
    } = plan(
        &file,
        request.selection,
        MAX_FK_PLAINTEXT,
        |name, line, len| FileKeyEncryptError::TooLarge { name, line, len }.into(),
    )?;
    // Idempotent: with nothing to seal, a file with a record stays as it
    // is, and so does one with no ENC[...] value at all. (A file of `kms`
    // values only, given `--file-key`, gets a record naming them.)
    if todo.is_empty()
        && rules.is_none()
        && (facts.record.is_some() || (!facts.has_kms && facts.fk.is_empty()))
    {
        return Ok((report, None));
    }
    if let Some((name, line)) = facts.fk.first() {
        return Err(FileKeyEncryptError::SealedUnderOldKey {
            name: name.clone(),
            line: *line,
            count: facts.fk.len(),
        }
        .into());
    }
    let version = next_version(facts.record.as_ref().map(|at| at.record.version))?;

    // The one KMS call.
    let key = DataKey::generate(request.client, request.key_id).await?;
    let mut plaintexts = Vec::with_capacity(todo.len());
    for index in todo {
        if let Some(entry) = file.values().nth(index) {
            plaintexts.push((index, Zeroizing::new(entry.value.as_bytes().to_vec())));
        }
    }
    report.encrypted = key
        .seal_values(&mut file, plaintexts)
        .map_err(|e| e.at(path))?;
    if let Some((rules, json)) = rules.zip(rules_json) {
        let envelope = key.seal(RULES_NAME, &json)?;
        let count = rules.rules().len();
        report.rules = Some(
            put_rules(&mut file, rules_index, &envelope.to_string(), count).map_err(parse_err)?,
        );
    }
    let written = key
        .write_record(&mut file, version, facts.record.as_ref().map(|at| at.index))
        .map_err(|e| e.at(path))?;
    report.file_key = Some(written);
    let text = file.render().map_err(parse_err)?;
    Ok((report, Some(Zeroizing::new(text.as_bytes().to_vec()))))
}

/// The version after `previous` (1 for a file without a record).
pub(crate) fn next_version(previous: Option<u64>) -> Result<u64, FileKeyEncryptError> {
    match previous {
        Some(previous) => previous
            .checked_add(1)
            .ok_or(FileKeyEncryptError::VersionExhausted(previous)),
        None => Ok(1),
    }
}

/// A fresh data key for a file: its new file id, the key wrapped by KMS,
/// and the value and MAC keys derived from it (the plaintext data key
/// itself is wiped as soon as they are derived).
pub(crate) struct DataKey {
    file_id: FileId,
    wrapped: Vec<u8>,
    key: FileKey,
}

/// Why [`DataKey::write_record`] failed.
pub(crate) enum RecordWriteError {
    /// Building or signing the record.
    Key(FileKeyEncryptError),
    /// Putting it into the file.
    Format(FormatError),
}

impl RecordWriteError {
    /// As an [`EncryptError`] naming `path`.
    pub(crate) fn at(self, path: &Path) -> EncryptError {
        match self {
            RecordWriteError::Key(e) => e.into(),
            RecordWriteError::Format(source) => EncryptError::Parse {
                path: path.to_owned(),
                source,
            },
        }
    }
}

impl From<FileKeyEncryptError> for RecordWriteError {
    fn from(e: FileKeyEncryptError) -> Self {
        RecordWriteError::Key(e)
    }
}

impl From<FormatError> for RecordWriteError {
    fn from(e: FormatError) -> Self {
        RecordWriteError::Format(e)
    }
}

impl DataKey {
    /// One KMS `GenerateDataKey` (AES-256) under `key_id`, bound to a new
    /// random file id by the context `{"keystore:file": ID}`.
    pub(crate) async fn generate(
        client: &aws_sdk_kms::Client,
        key_id: &str,
    ) -> Result<DataKey, FileKeyEncryptError> {
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
        Ok(DataKey {
            file_id,
            wrapped,
            key,
        })
    }

    /// Seals `value` as the `fk` value of `name` under a fresh nonce.
    pub(crate) fn seal(&self, name: &str, value: &[u8]) -> Result<Envelope, FileKeyEncryptError> {
        self.key
            .seal(name, value, random::<NONCE_LEN>()?)
            .map_err(FileKeyEncryptError::Seal)
    }

    /// Seals each (index, plaintext) into `file` under the value's own
    /// name; returns the names sealed, in order.
    pub(crate) fn seal_values(
        &self,
        file: &mut SecretsFile,
        values: Vec<(usize, Zeroizing<Vec<u8>>)>,
    ) -> Result<Vec<String>, SealValuesError> {
        let mut sealed = Vec::with_capacity(values.len());
        for (index, plaintext) in values {
            let Some(name) = file.values().nth(index).map(|v| v.name.to_owned()) else {
                return Err(FormatError::NoSuchEntry(index).into());
            };
            let envelope = self.seal(&name, &plaintext)?;
            file.set_value(index, &envelope.to_string())?;
            tracing::info!(name = %name, "sealed under the file key");
            sealed.push(name);
        }
        Ok(sealed)
    }

    /// Writes the `keystore:file` record for `file` as it now is: every
    /// `ENC[...]` string but the record, at `version`, MACed, over the
    /// entry at `record_index` or appended.
    pub(crate) fn write_record(
        &self,
        file: &mut SecretsFile,
        version: u64,
        record_index: Option<usize>,
    ) -> Result<FileKeyWritten, RecordWriteError> {
        let mut named: BTreeMap<String, Envelope> = BTreeMap::new();
        for entry in file.values() {
            if entry.name == FILE_NAME || !entry.is_string || !Envelope::is_envelope(entry.value) {
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
            self.file_id,
            version,
            self.wrapped.clone(),
            named.iter().map(|(n, e)| (n.as_str(), e)),
        )
        .map_err(FileKeyEncryptError::Seal)?;
        self.key
            .sign(&mut record)
            .map_err(FileKeyEncryptError::Seal)?;
        let record_text = record
            .to_envelope()
            .map_err(|e| FileKeyEncryptError::BadDataKey(e.to_string()))?
            .to_string();
        match record_index {
            Some(index) => file.set_value(index, &record_text)?,
            None => file.append(
                Some("file key record: written by `keystore-host encrypt`; do not edit"),
                FILE_NAME,
                &record_text,
            )?,
        }
        tracing::info!(file_id = %self.file_id, version, entries = record.manifest.len(), "file key record written");
        Ok(FileKeyWritten {
            file_id: self.file_id.to_hex(),
            version,
            entries: record.manifest.len(),
        })
    }
}

/// Why [`DataKey::seal_values`] failed.
pub(crate) type SealValuesError = RecordWriteError;

/// `N` bytes from the OS random source.
fn random<const N: usize>() -> Result<[u8; N], FileKeyEncryptError> {
    let mut out = [0u8; N];
    rand::rngs::SysRng
        .try_fill_bytes(&mut out)
        .map_err(|e| FileKeyEncryptError::Random(e.to_string()))?;
    Ok(out)
}
