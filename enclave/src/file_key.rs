//! The file key on the enclave side (DESIGN.md, "File key"): what a `Load`
//! carrying the reserved `keystore:file` record must satisfy before any of
//! its values is served.
//!
//! [`split`] takes the record out of the entries before any KMS call (it is
//! never stored), [`Loader`](crate::load::Loader) unwraps the data key with
//! exactly one KMS `Decrypt` (with `Recipient`, the pinned `KeyId`, context
//! `{"keystore:file": FILE_ID}`), and [`check`] then verifies, in this
//! order, the record's MAC, the manifest against the entries received (the
//! first added, dropped or changed entry is named) and the version against
//! the highest one this enclave has served (no rollback while it runs). Only
//! then are the `fk` values opened, each under the name it was sent with.

use keystore_shared::envelope::Envelope;
use keystore_shared::file_record::{FileKey, FileRecord, FileRecordError, ManifestMismatch};
use keystore_shared::name::FILE_NAME;

/// Why a file-key load was refused. Names entries, never values.
#[derive(Debug, thiserror::Error)]
pub enum FileKeyError {
    /// `keystore:file` is not an `ENC[v1:file:...]` value.
    #[error("`{FILE_NAME}` must be an ENC[v1:file:...] value, not `{kind}`")]
    NotARecord {
        /// The kind it has.
        kind: &'static str,
    },
    /// An `ENC[v1:file:...]` value under another name.
    #[error("`{name}`: ENC[v1:file:...] is only valid as `{FILE_NAME}`")]
    MisplacedRecord {
        /// The entry.
        name: String,
    },
    /// An `fk` value in a load without a file record.
    #[error("`{name}` is an ENC[v1:fk:...] value but the load has no `{FILE_NAME}` record")]
    NoRecord {
        /// The entry.
        name: String,
    },
    /// The record does not decode, or its MAC does not match.
    #[error("`{FILE_NAME}`: {0}")]
    Record(#[source] FileRecordError),
    /// The entries are not those the record names.
    #[error("file record: {0}")]
    Manifest(#[source] ManifestMismatch),
    /// An older version than the one served.
    #[error(
        "file version {version} is older than version {served}, which this enclave has \
         already served: refused (no rollback)"
    )]
    Rollback {
        /// The version loaded.
        version: u64,
        /// The highest version served.
        served: u64,
    },
    /// A load without a record after a file-key file was served: it would
    /// bypass the version check.
    #[error(
        "the load has no `{FILE_NAME}` record, but this enclave has served file version \
         {served}: refused (a file without a record cannot be checked for rollback)"
    )]
    Downgrade {
        /// The highest version served.
        served: u64,
    },
    /// An `fk` value that does not authenticate under its name.
    #[error("{0}")]
    Open(#[source] FileRecordError),
}

impl FileKeyError {
    /// The entry the error is about.
    pub fn name(&self) -> Option<&str> {
        match self {
            FileKeyError::MisplacedRecord { name } | FileKeyError::NoRecord { name } => Some(name),
            FileKeyError::NotARecord { .. } | FileKeyError::Record(_) => Some(FILE_NAME),
            FileKeyError::Manifest(m) => Some(m.name()),
            FileKeyError::Open(
                FileRecordError::Open { name } | FileRecordError::NotFk { name },
            ) => Some(name),
            FileKeyError::Open(_) => None,
            FileKeyError::Rollback { .. } | FileKeyError::Downgrade { .. } => Some(FILE_NAME),
        }
    }

    /// Whether the load is well-formed but refused as an attack (the host
    /// sent a set the operator did not write), as opposed to malformed.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            FileKeyError::Record(FileRecordError::BadMac)
                | FileKeyError::Manifest(_)
                | FileKeyError::Rollback { .. }
                | FileKeyError::Downgrade { .. }
                | FileKeyError::Open(_)
        )
    }
}

/// Takes the `keystore:file` record out of `items` and decodes it; checks
/// that `fk` values come with a record and that no other entry is a record.
/// No KMS call has been made yet.
pub fn split(items: &mut Vec<(String, Envelope)>) -> Result<Option<FileRecord>, FileKeyError> {
    let mut record = None;
    let mut index = None;
    for (i, (name, envelope)) in items.iter().enumerate() {
        match (name.as_str() == FILE_NAME, envelope) {
            (true, Envelope::File { record: bytes }) => {
                record = Some(FileRecord::decode(bytes).map_err(FileKeyError::Record)?);
                index = Some(i);
            }
            (true, other) => {
                return Err(FileKeyError::NotARecord { kind: other.kind() });
            }
            (false, Envelope::File { .. }) => {
                return Err(FileKeyError::MisplacedRecord { name: name.clone() });
            }
            _ => {}
        }
    }
    if let Some(i) = index {
        items.remove(i);
    } else if let Some((name, _)) = items
        .iter()
        .find(|(_, envelope)| matches!(envelope, Envelope::Fk { .. }))
    {
        return Err(FileKeyError::NoRecord { name: name.clone() });
    }
    Ok(record)
}

/// The checks after the data key is unwrapped: MAC, manifest, version.
/// `served` is the highest file version this enclave has served.
pub fn check(
    key: &FileKey,
    record: &FileRecord,
    items: &[(String, Envelope)],
    served: Option<u64>,
) -> Result<(), FileKeyError> {
    key.verify(record).map_err(FileKeyError::Record)?;
    record
        .check_entries(
            items
                .iter()
                .map(|(name, envelope)| (name.as_str(), envelope)),
        )
        .map_err(FileKeyError::Manifest)?;
    if let Some(served) = served
        && record.version < served
    {
        return Err(FileKeyError::Rollback {
            version: record.version,
            served,
        });
    }
    Ok(())
}

/// Refuses a load without a record once a file-key file was served.
pub fn check_without_record(served: Option<u64>) -> Result<(), FileKeyError> {
    match served {
        Some(served) => Err(FileKeyError::Downgrade { served }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keystore_shared::file_record::{DATA_KEY_LEN, FileId, NONCE_LEN};

    fn fixture() -> (FileKey, FileRecord, Vec<(String, Envelope)>) {
        let id = FileId([1; 16]);
        let key = FileKey::derive(&[2; DATA_KEY_LEN], id).unwrap();
        let items = vec![
            ("A".to_owned(), key.seal("A", b"a", [0; NONCE_LEN]).unwrap()),
            ("K".to_owned(), Envelope::kms(vec![1; 30]).unwrap()),
        ];
        let mut record = FileRecord::new(
            id,
            5,
            vec![9; 50],
            items.iter().map(|(n, e)| (n.as_str(), e)),
        )
        .unwrap();
        key.sign(&mut record).unwrap();
        (key, record, items)
    }

    #[test]
    fn split_takes_the_record_out_and_refuses_misplaced_kinds() {
        let (_, record, items) = fixture();
        let mut with = items.clone();
        with.push((FILE_NAME.into(), record.to_envelope().unwrap()));
        assert_eq!(split(&mut with).unwrap(), Some(record.clone()));
        assert_eq!(with, items);

        let mut without = items.clone();
        assert!(matches!(
            split(&mut without),
            Err(FileKeyError::NoRecord { name }) if name == "A"
        ));
        let mut misplaced = vec![("X".to_owned(), record.to_envelope().unwrap())];
        assert!(matches!(
            split(&mut misplaced),
            Err(FileKeyError::MisplacedRecord { name }) if name == "X"
        ));
        let mut wrong_kind = vec![(FILE_NAME.to_owned(), Envelope::kms(vec![1]).unwrap())];
        assert!(matches!(
            split(&mut wrong_kind),
            Err(FileKeyError::NotARecord { kind: "kms" })
        ));
        let mut kms_only = vec![("K".to_owned(), Envelope::kms(vec![1]).unwrap())];
        assert_eq!(split(&mut kms_only).unwrap(), None);
    }

    #[test]
    fn check_refuses_rollback_but_not_a_reload() {
        let (key, record, items) = fixture();
        check(&key, &record, &items, None).unwrap();
        check(&key, &record, &items, Some(5)).unwrap();
        check(&key, &record, &items, Some(4)).unwrap();
        let err = check(&key, &record, &items, Some(6)).unwrap_err();
        assert!(matches!(
            err,
            FileKeyError::Rollback {
                version: 5,
                served: 6
            }
        ));
        assert_eq!(err.name(), Some(FILE_NAME));
        assert!(check_without_record(Some(1)).is_err());
        check_without_record(None).unwrap();
    }

    #[test]
    fn check_names_the_entry_that_differs() {
        let (key, record, mut items) = fixture();
        items.pop();
        let err = check(&key, &record, &items, None).unwrap_err();
        assert_eq!(err.name(), Some("K"));
        assert!(err.is_refusal());
        assert!(err.to_string().contains("dropped"), "{err}");
    }
}
