//! The `.env` secrets file on the parent: reading and rewriting it without
//! disturbing its layout ([`dotenv`]), turning its plain values into KMS
//! envelopes ([`encrypt`]), and the operator's access rules that go with
//! them ([`rules`]).

pub mod dotenv;
pub mod encrypt;
pub mod file_key;
pub mod rules;

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
/// over is enough for [`dotenv::DotEnv::parse`] to refuse the file, and a
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
