//! KMS encryption of a secrets file's plain string values (`.env`, JSON or
//! YAML; see [`super::format`]) into `ENC[v1:kms:...]` envelopes, in place
//! (what `keystore-host encrypt` runs). Names are `.env` variables or
//! dotted key paths (`db.password`, `servers.0.token`); numbers, booleans
//! and null are never sealed.
//!
//! Each chosen value is encrypted by KMS `Encrypt` under the operator's key
//! with the encryption context `{"keystore:name": NAME}`, which binds the
//! ciphertext to its name: the enclave decrypts with the same context, so a
//! host that moves one envelope under another name gets a KMS failure, not
//! the wrong secret. Values already `ENC[...]` are left alone, so running the
//! command twice is harmless. Everything else in the file (comments, order,
//! quoting) is kept byte for byte, and the file is replaced atomically (a
//! temporary file in the same directory, then `rename`) with its
//! permissions, so a crash leaves either the old or the new file.
//!
//! With access rules ([`encrypt_file_with_rules`]), their canonical JSON is
//! encrypted the same way under the reserved name `keystore:rules` (so the
//! host can neither forge nor edit them, nor move another envelope under
//! that name) and written in place of the previous rules entry, or appended.
//! The rules are re-encrypted on every run: the operator cannot decrypt the
//! old entry to compare (the key policy releases plaintext only to the
//! enclave), and a digest kept beside it would be an unauthenticated second
//! copy. Reserved entries are never selected as ordinary values, and a
//! plain (unencrypted) `keystore:rules` line is refused rather than
//! guessed at. In JSON and YAML the rules entry is the top-level key
//! `"keystore:rules"`, added as the mapping's last member.

use std::io::Write;
use std::path::{Path, PathBuf};

use aws_sdk_kms::primitives::Blob;
use keystore_shared::access::{AccessRules, glob_match};
use keystore_shared::envelope::{Envelope, EnvelopeError, NAME_CONTEXT_KEY};
use keystore_shared::name::{NameError, RULES_NAME, SecretName, is_reserved};
use zeroize::Zeroizing;

use crate::secrets_file::{self, Format, FormatError, ReadError, SecretsFile};

/// Largest value KMS `Encrypt` takes directly; larger values need the `dek`
/// envelope kind.
pub const MAX_KMS_PLAINTEXT: usize = 4096;

/// Why encrypting a file failed. Messages name entries, never values.
#[derive(Debug, thiserror::Error)]
pub enum EncryptError {
    /// The file could not be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The file is not valid in its format, or cannot be rewritten as
    /// asked; nothing was changed.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: FormatError,
    },
    /// A chosen value is too large for KMS `Encrypt`; nothing was changed.
    #[error(
        "{name} (line {line}) is {len} bytes; KMS encrypts at most {MAX_KMS_PLAINTEXT} bytes \
         directly (larger values need the file key: `encrypt --file-key`); nothing was changed"
    )]
    TooLarge {
        /// The entry.
        name: String,
        /// Its line.
        line: usize,
        /// Its size.
        len: usize,
    },
    /// A selected name is not a valid secret name (the enclave would refuse
    /// it at load); nothing was changed.
    #[error("line {line}: {source}; nothing was changed")]
    InvalidName {
        /// Its line.
        line: usize,
        /// What is wrong with the name.
        #[source]
        source: NameError,
    },
    /// The access rules are too large for KMS `Encrypt` once encoded.
    #[error(
        "the access rules are {len} bytes as canonical JSON; KMS encrypts at most \
         {MAX_KMS_PLAINTEXT} bytes directly: merge rules or use wider globs; nothing was changed"
    )]
    RulesTooLarge {
        /// Their encoded size.
        len: usize,
    },
    /// A reserved entry holds a plain value: only `encrypt --rules` writes
    /// it, always encrypted.
    #[error(
        "{name} (line {line}) is not encrypted; this reserved entry is written only by \
         `keystore-host encrypt --rules FILE`; nothing was changed"
    )]
    PlainReserved {
        /// The entry.
        name: String,
        /// Its line.
        line: usize,
    },
    /// KMS refused or could not be reached; nothing was changed.
    #[error("KMS Encrypt of {name} failed: {message}; nothing was changed")]
    Kms {
        /// The entry being encrypted.
        name: String,
        /// The SDK's error with its context (no plaintext).
        message: String,
    },
    /// KMS answered without a usable ciphertext.
    #[error("KMS returned an unusable ciphertext for {name}: {source}")]
    Ciphertext {
        /// The entry.
        name: String,
        /// Why it is unusable.
        #[source]
        source: EnvelopeError,
    },
    /// The file-key write was refused (see
    /// [`file_key`](crate::secrets_file::file_key)).
    #[error(transparent)]
    FileKey(#[from] crate::secrets_file::file_key::FileKeyEncryptError),
    /// Writing the new file failed; the old file is untouched.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file being written (the temporary file or the target).
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Which values to encrypt: names matching any of the glob patterns (`*`
/// any run of characters, `?` one character; the matcher the access rules
/// use), or every name if there are none. Reserved `keystore:` entries are
/// never selected.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    patterns: Vec<String>,
}

impl Selection {
    /// Every name.
    pub fn all() -> Self {
        Selection::default()
    }

    /// Names matching any of `patterns`; no patterns means every name.
    pub fn patterns(patterns: Vec<String>) -> Self {
        Selection { patterns }
    }

    /// Whether `name` is selected.
    pub fn matches(&self, name: &str) -> bool {
        !is_reserved(name)
            && (self.patterns.is_empty() || self.patterns.iter().any(|p| glob_match(p, name)))
    }
}

/// What [`encrypt_file`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EncryptReport {
    /// Names newly encrypted.
    pub encrypted: Vec<String>,
    /// Selected names already `ENC[...]`.
    pub already_encrypted: Vec<String>,
    /// Selected names with empty values (nothing to protect; KMS refuses
    /// empty plaintext).
    pub skipped_empty: Vec<String>,
    /// What happened to the rules entry, if rules were given.
    pub rules: Option<RulesWritten>,
    /// The file-key record written, if the file key was used.
    pub file_key: Option<crate::secrets_file::file_key::FileKeyWritten>,
}

/// How the `keystore:rules` entry was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RulesWritten {
    /// A new line was appended.
    Added {
        /// Rules in it.
        rules: usize,
    },
    /// The existing entry was replaced in place.
    Replaced {
        /// Rules in it.
        rules: usize,
    },
}

/// Encrypts the selected plain values of the secrets file at `path` (its
/// format from its name) under `key_id`, replacing the file atomically.
/// Nothing is written unless every selected value was encrypted.
pub async fn encrypt_file(
    client: &aws_sdk_kms::Client,
    key_id: &str,
    path: &Path,
    selection: &Selection,
) -> Result<EncryptReport, EncryptError> {
    encrypt_file_with_rules(client, key_id, path, selection, None).await
}

/// [`encrypt_file`], and with `rules`, (re-)writes the `keystore:rules`
/// entry: their canonical JSON encrypted under `key_id`, bound to the name
/// `keystore:rules`. Nothing is written unless everything succeeded.
pub async fn encrypt_file_with_rules(
    client: &aws_sdk_kms::Client,
    key_id: &str,
    path: &Path,
    selection: &Selection,
    rules: Option<&AccessRules>,
) -> Result<EncryptReport, EncryptError> {
    let format = Format::from_path(path);
    encrypt_file_as(client, key_id, path, format, selection, rules).await
}

/// [`encrypt_file_with_rules`] for a file read as `format`, whatever its
/// name.
pub async fn encrypt_file_as(
    client: &aws_sdk_kms::Client,
    key_id: &str,
    path: &Path,
    format: Format,
    selection: &Selection,
    rules: Option<&AccessRules>,
) -> Result<EncryptReport, EncryptError> {
    let bytes = secrets_file::read(path)?;
    let (report, new) =
        encrypt_bytes_as(client, key_id, path, bytes, format, selection, rules).await?;
    if let Some(new) = new {
        write_atomically(path, &new)?;
    }
    Ok(report)
}

/// The core of [`encrypt_file_as`], bytes in and bytes out, wherever they
/// live (a local file, an S3 object): `bytes` are the file's contents,
/// `label` names it in errors. Returns what was done and the new contents,
/// or `None` when nothing changed. Nothing touches a disk.
pub async fn encrypt_bytes_as(
    client: &aws_sdk_kms::Client,
    key_id: &str,
    label: &Path,
    bytes: Zeroizing<Vec<u8>>,
    format: Format,
    selection: &Selection,
    rules: Option<&AccessRules>,
) -> Result<(EncryptReport, Option<Zeroizing<Vec<u8>>>), EncryptError> {
    let parse_err = |source| EncryptError::Parse {
        path: label.to_owned(),
        source,
    };
    let mut file = SecretsFile::parse(&bytes, format).map_err(parse_err)?;
    drop(bytes);

    // Every check comes before the first KMS call.
    let rules_json = rules.map(|rules| Zeroizing::new(rules.to_json()));
    if let Some(json) = &rules_json
        && json.len() > MAX_KMS_PLAINTEXT
    {
        return Err(EncryptError::RulesTooLarge { len: json.len() });
    }
    let Plan {
        mut report,
        todo,
        rules_index,
    } = plan(&file, selection, MAX_KMS_PLAINTEXT, |name, line, len| {
        EncryptError::TooLarge { name, line, len }
    })?;

    for index in todo {
        let (name, plaintext) = match file.values().nth(index) {
            Some(entry) => (
                entry.name.to_owned(),
                Zeroizing::new(entry.value.as_bytes().to_vec()),
            ),
            None => continue,
        };
        let envelope = encrypt_value(client, key_id, &name, &plaintext).await?;
        file.set_value(index, &envelope.to_string())
            .map_err(parse_err)?;
        tracing::info!(name = %name, "encrypted");
        report.encrypted.push(name);
    }

    if let Some((rules, json)) = rules.zip(rules_json) {
        let envelope = encrypt_value(client, key_id, RULES_NAME, &json).await?;
        let count = rules.rules().len();
        report.rules = Some(
            put_rules(&mut file, rules_index, &envelope.to_string(), count).map_err(parse_err)?,
        );
        tracing::info!(rules = count, "access rules encrypted");
    }

    if report.encrypted.is_empty() && report.rules.is_none() {
        return Ok((report, None));
    }
    let text = file.render().map_err(parse_err)?;
    Ok((report, Some(Zeroizing::new(text.as_bytes().to_vec()))))
}

/// What `encrypt` will do to a file, worked out before any KMS call.
pub(crate) struct Plan {
    /// The selected values that are already `ENC[...]` or empty.
    pub(crate) report: EncryptReport,
    /// Indexes (as numbered by [`SecretsFile::values`]) of the plain
    /// values to seal.
    pub(crate) todo: Vec<usize>,
    /// Index of the existing `keystore:rules` entry.
    pub(crate) rules_index: Option<usize>,
}

/// Classifies the values of `file` for `encrypt`, whichever way values are
/// sealed: reserved entries must be sealed already, numbers/booleans/null
/// stay settings, selected names must be valid secret names, and a value
/// over `limit` bytes is refused through `too_large(name, line, len)`.
pub(crate) fn plan(
    file: &SecretsFile,
    selection: &Selection,
    limit: usize,
    too_large: impl Fn(String, usize, usize) -> EncryptError,
) -> Result<Plan, EncryptError> {
    let mut plan = Plan {
        report: EncryptReport::default(),
        todo: Vec::new(),
        rules_index: None,
    };
    for (index, entry) in file.values().enumerate() {
        if is_reserved(entry.name) {
            if !entry.is_string || !Envelope::is_envelope(entry.value) {
                return Err(EncryptError::PlainReserved {
                    name: entry.name.to_owned(),
                    line: entry.line,
                });
            }
            if entry.name == RULES_NAME {
                plan.rules_index = Some(index);
            }
        }
        // Numbers, booleans and null stay readable settings.
        if !entry.is_string || !selection.matches(entry.name) {
            continue;
        }
        SecretName::check(entry.name).map_err(|source| EncryptError::InvalidName {
            line: entry.line,
            source,
        })?;
        if Envelope::is_envelope(entry.value) {
            plan.report.already_encrypted.push(entry.name.to_owned());
        } else if entry.value.is_empty() {
            plan.report.skipped_empty.push(entry.name.to_owned());
        } else if entry.value.len() > limit {
            return Err(too_large(
                entry.name.to_owned(),
                entry.line,
                entry.value.len(),
            ));
        } else {
            plan.todo.push(index);
        }
    }
    Ok(plan)
}

/// Writes the sealed rules `envelope` over the existing entry at
/// `rules_index`, or appends it as a new top-level entry.
pub(crate) fn put_rules(
    file: &mut SecretsFile,
    rules_index: Option<usize>,
    envelope: &str,
    count: usize,
) -> Result<RulesWritten, FormatError> {
    Ok(match rules_index {
        Some(index) => {
            file.set_value(index, envelope)?;
            RulesWritten::Replaced { rules: count }
        }
        None => {
            file.append(
                Some("access rules: written by `keystore-host encrypt --rules`"),
                RULES_NAME,
                envelope,
            )?;
            RulesWritten::Added { rules: count }
        }
    })
}

/// One KMS `Encrypt` with the name-binding encryption context.
async fn encrypt_value(
    client: &aws_sdk_kms::Client,
    key_id: &str,
    name: &str,
    plaintext: &[u8],
) -> Result<Envelope, EncryptError> {
    let output = client
        .encrypt()
        .key_id(key_id)
        .plaintext(Blob::new(plaintext.to_vec()))
        .encryption_context(NAME_CONTEXT_KEY, name)
        .send()
        .await
        .map_err(|err| EncryptError::Kms {
            name: name.to_owned(),
            message: aws_smithy_types::error::display::DisplayErrorContext(&err).to_string(),
        })?;
    let blob = output
        .ciphertext_blob
        .map(Blob::into_inner)
        .unwrap_or_default();
    Envelope::kms(blob).map_err(|source| EncryptError::Ciphertext {
        name: name.to_owned(),
        source,
    })
}

/// Replaces `path` with `contents`: a new file in the same directory (so
/// `rename` is atomic) with the old file's permissions, synced, renamed
/// over the old one, and the directory synced.
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), EncryptError> {
    let permissions = std::fs::metadata(path)
        .map_err(|source| EncryptError::Write {
            path: path.to_owned(),
            source,
        })?
        .permissions();
    write_via_temp(path, contents, permissions)
}

/// Writes `contents` to `path` (new or replaced) atomically with mode 0600,
/// whatever the old file's mode: for plaintext (`decrypt -o`).
pub fn write_private_atomically(path: &Path, contents: &[u8]) -> Result<(), EncryptError> {
    use std::os::unix::fs::PermissionsExt;
    write_via_temp(path, contents, std::fs::Permissions::from_mode(0o600))
}

/// A temporary file beside `path`, created 0600 (never wider while it is
/// written), given `permissions`, filled, synced and renamed over `path`;
/// then the directory is synced. On any failure the temporary file is
/// removed and `path` is untouched.
fn write_via_temp(
    path: &Path,
    contents: &[u8],
    permissions: std::fs::Permissions,
) -> Result<(), EncryptError> {
    use std::os::unix::fs::OpenOptionsExt;
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| EncryptError::Write { path, source }
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "secrets".to_owned());
    let mut attempt = 0u32;
    let (tmp_path, mut tmp) = loop {
        let candidate = dir.join(format!(
            ".{file_name}.keystore-tmp-{}-{attempt}",
            std::process::id()
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&candidate)
        {
            Ok(file) => break (candidate, file),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1;
            }
            Err(err) => return Err(write_err(&candidate)(err)),
        }
    };
    let result = (|| {
        tmp.set_permissions(permissions)?;
        tmp.write_all(contents)?;
        tmp.sync_all()
    })();
    drop(tmp);
    if let Err(err) = result.and_then(|()| std::fs::rename(&tmp_path, path)) {
        let _ = std::fs::remove_file(&tmp_path);
        return Err(write_err(path)(err));
    }
    if let Ok(dir) = std::fs::File::open(&dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", "ANY"));
        assert!(glob_match("DB_*", "DB_PASSWORD"));
        assert!(!glob_match("DB_*", "API_KEY"));
        assert!(glob_match("*_KEY", "API_KEY"));
        assert!(glob_match("A?C", "ABC"));
        assert!(!glob_match("A?C", "AC"));
        assert!(glob_match("*a*b*", "xxaxxbxx"));
        assert!(!glob_match("*a*b*", "xxbxxaxx"));
        assert!(glob_match("EXACT", "EXACT"));
        assert!(!glob_match("EXACT", "EXACTLY"));
        assert!(glob_match(&"*".repeat(100), &"a".repeat(100)));
        assert!(!glob_match(&"*a".repeat(30), &"a".repeat(29)));
        assert!(Selection::all().matches("X"));
        assert!(!Selection::patterns(vec!["A*".into()]).matches("B"));
        // Reserved entries are never selected as values.
        assert!(!Selection::all().matches(RULES_NAME));
        assert!(!Selection::patterns(vec!["*".into()]).matches(RULES_NAME));
    }
}
