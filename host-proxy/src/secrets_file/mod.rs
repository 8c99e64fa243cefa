//! The secrets file on the parent: reading and rewriting it without
//! disturbing its layout, in any of its formats ([`format`]: `.env` in
//! [`dotenv`], [`json`], [`yaml`]), turning its plain values into KMS
//! envelopes ([`encrypt`], [`file_key`]), the operator's access rules that
//! go with them ([`rules`]), the envelopes the loader sends ([`entries`]),
//! and the commands that need plaintext back through KMS: [`unseal`]
//! (`decrypt`), [`rotate`], [`edit`].

pub mod dotenv;
pub mod edit;
pub mod encrypt;
pub mod file_key;
pub mod format;
pub mod json;
pub mod location;
pub mod rotate;
pub mod rules;
pub mod unseal;
pub mod yaml;

pub use format::{Format, FormatError, SecretsFile};

use keystore_shared::envelope::{Envelope, EnvelopeError};
use keystore_shared::protocol::{LoadEntry, MAX_LOAD_ENTRIES};

use std::io::Read;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use dotenv::MAX_FILE_SIZE;

/// The secrets file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
pub struct ReadError {
    /// The file.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

/// Reads at most [`MAX_FILE_SIZE`] + 1 bytes into a wiped buffer: one byte
/// over is enough for [`SecretsFile::parse`] to refuse the file, and a
/// huge file is never buffered whole.
pub fn read(path: &Path) -> Result<Zeroizing<Vec<u8>>, ReadError> {
    let read_err = |source| ReadError {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Zeroizing::new(Vec::new());
    file.take(MAX_FILE_SIZE as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    Ok(bytes)
}

/// Why a file's envelopes cannot be sent. Names lines and paths, never
/// values.
#[derive(Debug, thiserror::Error)]
pub enum EntriesError {
    /// The file is not valid in its format.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A value looks like `ENC[...]` but is not a readable envelope.
    #[error("line {line} ({name}): {source}")]
    Envelope {
        /// 1-based line.
        line: usize,
        /// The value's name or path.
        name: String,
        /// What is wrong.
        #[source]
        source: EnvelopeError,
    },
    /// More envelopes than one `Load` carries.
    #[error("{count} encrypted values; one load carries at most {MAX_LOAD_ENTRIES}")]
    TooMany {
        /// How many there are.
        count: usize,
    },
}

/// The `Load` entries of a secrets file in `format`: every `ENC[...]`
/// string, checked to be a readable envelope, named by its variable or
/// dotted path. Plain values stay on the parent. The one function the
/// loader needs, wherever its bytes come from.
pub fn entries(bytes: &[u8], format: Format) -> Result<Vec<LoadEntry>, EntriesError> {
    let file = SecretsFile::parse(bytes, format)?;
    let mut entries = Vec::new();
    for value in file.values() {
        if !value.is_string || !Envelope::is_envelope(value.value) {
            continue;
        }
        Envelope::parse(value.value).map_err(|source| EntriesError::Envelope {
            line: value.line,
            name: value.name.to_owned(),
            source,
        })?;
        if entries.len() == MAX_LOAD_ENTRIES {
            return Err(EntriesError::TooMany {
                count: file
                    .values()
                    .filter(|v| v.is_string && Envelope::is_envelope(v.value))
                    .count(),
            });
        }
        entries.push(LoadEntry {
            name: value.name.to_owned(),
            envelope: value.value.trim().to_owned(),
        });
    }
    Ok(entries)
}
