//! `keystore-host edit`: change a sealed file's values in an editor.
//!
//! The file is opened as `decrypt` opens it ([`Opened::open`], the same
//! checks as the enclave) and its plaintext rendering is written to a file
//! (mode 0600) in a fresh private directory (mode 0700) on a memory
//! filesystem: `$XDG_RUNTIME_DIR` if it is tmpfs, else `/dev/shm`; anything
//! that is not tmpfs/ramfs (checked with `statfs`) is refused, so plaintext
//! never reaches a disk. `$EDITOR` (else `$VISUAL`, else `vi`) runs on it;
//! then every file in the directory is overwritten with zeros and the
//! directory removed, whatever happened (editor failure, refused text,
//! KMS error). An editor that exits non-zero changes nothing.
//!
//! The edited text is parsed in the file's format and sealed under a **new**
//! data key (`GenerateDataKey`, new file id, version + 1): every value that
//! was sealed before, plus every plain string the selection (`--keys`,
//! default all) matches. The reserved entries stay sealed in the rendering;
//! `keystore:rules` must come back unchanged (or be deleted, which leaves
//! uid 0 as the only reader) and is re-sealed from its plaintext, and
//! `keystore:file` is rewritten. If the text comes back unchanged, nothing
//! is written and no KMS key is made. If the file on disk changed while the
//! editor was open, the edit is refused rather than overwrite it.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use keystore_shared::envelope::Envelope;
use keystore_shared::file_record::MAX_FK_PLAINTEXT;
use keystore_shared::name::{FILE_NAME, RULES_NAME, SecretName};
use rand::TryRng;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::secrets_file::dotenv::MAX_FILE_SIZE;
use crate::secrets_file::encrypt::{EncryptError, Selection, write_atomically};
use crate::secrets_file::file_key::{DataKey, FileKeyEncryptError, FileKeyWritten, next_version};
use crate::secrets_file::unseal::{Opened, OpsError};
use crate::secrets_file::{self, Format, SecretsFile};

/// What [`edit_file`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EditOutcome {
    /// The text came back unchanged: the file was left alone.
    Unchanged,
    /// The file was sealed again and written.
    Written {
        /// The new record.
        written: FileKeyWritten,
        /// Values sealed under the new data key.
        sealed: Vec<String>,
    },
}

/// How `edit` runs.
#[derive(Debug, Clone)]
pub struct EditOptions {
    /// Which plain strings to seal besides those sealed before.
    pub selection: Selection,
    /// The editor command line (run by `sh -c`, the file as its last
    /// argument).
    pub editor: OsString,
    /// Where the private directory is made; `None` picks
    /// `$XDG_RUNTIME_DIR` or `/dev/shm` ([`private_base`]).
    pub base: Option<PathBuf>,
    /// The KMS key for a file that has no data key yet.
    pub key_id: Option<String>,
}

/// The editor `edit` runs: `$EDITOR`, else `$VISUAL`, else `vi`.
pub fn default_editor() -> OsString {
    ["EDITOR", "VISUAL"]
        .iter()
        .filter_map(std::env::var_os)
        .find(|v| !v.is_empty())
        .unwrap_or_else(|| OsString::from("vi"))
}

/// Whether `dir` is on tmpfs or ramfs.
pub fn is_memory_fs(dir: &Path) -> bool {
    use nix::sys::statfs::{FsType, TMPFS_MAGIC, statfs};
    // ramfs's magic (linux/magic.h); nix names only tmpfs's.
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    statfs(dir).is_ok_and(|fs| {
        let kind = fs.filesystem_type();
        kind == TMPFS_MAGIC || kind == RAMFS_MAGIC
    })
}

/// Where the private directory goes: `$XDG_RUNTIME_DIR` if it is a memory
/// filesystem, else `/dev/shm` if it is; otherwise an error (plaintext is
/// never written to a disk).
pub fn private_base() -> Result<PathBuf, String> {
    let mut tried = Vec::new();
    let candidates = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .into_iter()
        .chain(std::iter::once(PathBuf::from("/dev/shm")));
    for dir in candidates {
        if is_memory_fs(&dir) {
            return Ok(dir);
        }
        tried.push(dir.display().to_string());
    }
    Err(format!(
        "no memory filesystem for the plaintext copy ({} not tmpfs or ramfs); refusing to write \
         plaintext to a disk",
        tried.join(", ")
    ))
}

/// The private directory and the plaintext file in it; on drop every file
/// in it is overwritten with zeros and the directory is removed.
struct Scratch {
    dir: PathBuf,
    file: PathBuf,
}

impl Scratch {
    fn create(base: &Path, file_name: &str, contents: &[u8]) -> std::io::Result<Scratch> {
        let mut suffix = [0u8; 8];
        rand::rngs::SysRng
            .try_fill_bytes(&mut suffix)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let dir = base.join(format!("keystore-edit-{}", hex::encode(suffix)));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let scratch = Scratch {
            file: dir.join(file_name),
            dir,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&scratch.file)?;
        file.write_all(contents)?;
        file.sync_all()?;
        Ok(scratch)
    }

    /// The edited text, bounded like any secrets file.
    fn read(&self) -> std::io::Result<Zeroizing<Vec<u8>>> {
        let mut bytes = Zeroizing::new(Vec::new());
        std::fs::File::open(&self.file)?
            .take(MAX_FILE_SIZE as u64 + 1)
            .read_to_end(&mut bytes)?;
        Ok(bytes)
    }
}

/// Overwrites the regular file at `path` with zeros, in place.
fn wipe(path: &Path) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if !meta.is_file() {
        return;
    }
    if let Ok(mut file) = std::fs::OpenOptions::new().write(true).open(path) {
        let zeros = vec![0u8; 64 * 1024];
        let mut left = meta.len();
        while left > 0 {
            let n = usize::try_from(left.min(zeros.len() as u64)).unwrap_or(zeros.len());
            if file.write_all(zeros.get(..n).unwrap_or_default()).is_err() {
                break;
            }
            left -= n as u64;
        }
        let _ = file.sync_all();
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // The editor may have left swap or backup files beside ours.
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                wipe(&entry.path());
            }
        }
        if let Err(err) = std::fs::remove_dir_all(&self.dir) {
            tracing::error!(dir = %self.dir.display(), %err, "could not remove the edit directory");
        }
    }
}

/// `keystore-host edit`: see the module documentation.
pub async fn edit_file(
    client: &aws_sdk_kms::Client,
    path: &Path,
    format: Format,
    options: &EditOptions,
) -> Result<EditOutcome, OpsError> {
    let edit_err = |message: String| OpsError::Edit {
        path: path.to_owned(),
        message,
    };
    let original = secrets_file::read(path).map_err(EncryptError::Read)?;
    let original_digest = Sha256::digest(&*original);
    drop(original);

    let mut opened = Opened::open(client, path, format).await?;
    let sealed_before = opened.sealed_names();
    // The rules entry as written, and its plaintext if it is sealed under
    // the data key (it must be sealed again under the new one).
    let mut rules: Option<(String, Option<Zeroizing<Vec<u8>>>)> = None;
    for (index, envelope) in opened.sealed()? {
        let is_rules = opened
            .file
            .values()
            .nth(index)
            .is_some_and(|v| v.name == RULES_NAME);
        if !is_rules {
            continue;
        }
        let text = envelope.to_string();
        let plaintext = match envelope {
            Envelope::Fk { .. } => Some(opened.open_value(client, index, &envelope).await?),
            _ => None,
        };
        rules = Some((text, plaintext));
    }
    let previous = opened.record.as_ref().map(|at| at.record.version);
    let key_id = options
        .key_id
        .clone()
        .or_else(|| opened.key_arn.clone())
        .ok_or_else(|| {
            edit_err(format!(
                "the file has no {FILE_NAME} record to take the KMS key from; give --key-id"
            ))
        })?;
    opened.reveal(client).await?;
    let rendering = opened.file.render().map_err(|e| opened.format_error(e))?;
    drop(opened);

    let base = match &options.base {
        Some(base) => {
            if !is_memory_fs(base) {
                return Err(edit_err(format!(
                    "{} is not tmpfs or ramfs; refusing to write plaintext to a disk",
                    base.display()
                )));
            }
            base.clone()
        }
        None => private_base().map_err(edit_err)?,
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "secrets".to_owned());
    let edited = {
        let scratch = Scratch::create(&base, &file_name, rendering.as_bytes())
            .map_err(|e| edit_err(format!("cannot write the plaintext copy: {e}")))?;
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{} \"$1\"", options.editor.to_string_lossy()))
            .arg("keystore-edit")
            .arg(&scratch.file)
            .status()
            .map_err(|e| edit_err(format!("cannot run the editor: {e}")))?;
        if !status.success() {
            return Err(edit_err(format!("the editor exited with {status}")));
        }
        scratch
            .read()
            .map_err(|e| edit_err(format!("cannot read the edited copy: {e}")))?
        // `scratch` is wiped and removed here.
    };
    if *edited == *rendering.as_bytes() {
        return Ok(EditOutcome::Unchanged);
    }
    drop(rendering);

    let mut file = SecretsFile::parse(&edited, format)
        .map_err(|e| edit_err(format!("the edited copy: {e}")))?;
    drop(edited);
    let mut todo: Vec<(usize, Zeroizing<Vec<u8>>)> = Vec::new();
    let mut record_index = None;
    let mut rules_seen = false;
    for (index, value) in file.values().enumerate() {
        if value.name == FILE_NAME {
            record_index = Some(index);
            continue;
        }
        if value.name == RULES_NAME {
            rules_seen = true;
            let Some((text, plaintext)) = &rules else {
                return Err(edit_err(format!(
                    "the edited copy adds {RULES_NAME} (line {}); rules are written by \
                     `keystore-host encrypt --rules`",
                    value.line
                )));
            };
            if value.value.trim() != text {
                return Err(edit_err(format!(
                    "{RULES_NAME} (line {}) was changed; it must stay as it was (or be deleted)",
                    value.line
                )));
            }
            if let Some(plaintext) = plaintext {
                todo.push((index, plaintext.clone()));
            }
            continue;
        }
        if value.is_string && Envelope::is_envelope(value.value) {
            match Envelope::parse(value.value) {
                Ok(Envelope::Kms { .. }) => continue,
                _ => {
                    return Err(edit_err(format!(
                        "{} (line {}) holds an ENC[...] value that is not ENC[v1:kms:...]; \
                         write the plaintext instead",
                        value.name, value.line
                    )));
                }
            }
        }
        let selected = value.is_string && options.selection.matches(value.name);
        if !sealed_before.contains(value.name) && !selected {
            continue;
        }
        if value.value.is_empty() {
            continue;
        }
        SecretName::check(value.name).map_err(|source| EncryptError::InvalidName {
            line: value.line,
            source,
        })?;
        if value.value.len() > MAX_FK_PLAINTEXT {
            return Err(EncryptError::from(FileKeyEncryptError::TooLarge {
                name: value.name.to_owned(),
                line: value.line,
                len: value.value.len(),
            })
            .into());
        }
        todo.push((index, Zeroizing::new(value.value.as_bytes().to_vec())));
    }
    if rules.is_some() && !rules_seen {
        tracing::warn!("{RULES_NAME} was deleted: only uid 0 may read until rules are written");
    }
    let version = next_version(previous).map_err(EncryptError::from)?;

    // The file must still be the one that was opened.
    let now = secrets_file::read(path).map_err(EncryptError::Read)?;
    if Sha256::digest(&*now) != original_digest {
        return Err(edit_err(
            "the file changed on disk while the editor was open; edit it again".to_owned(),
        ));
    }
    drop(now);

    let key = DataKey::generate(client, &key_id)
        .await
        .map_err(EncryptError::from)?;
    let sealed = key.seal_values(&mut file, todo).map_err(|e| e.at(path))?;
    let written = key
        .write_record(&mut file, version, record_index)
        .map_err(|e| e.at(path))?;
    let text = file.render().map_err(|source| EncryptError::Parse {
        path: path.to_owned(),
        source,
    })?;
    write_atomically(path, text.as_bytes())?;
    Ok(EditOutcome::Written { written, sealed })
}
