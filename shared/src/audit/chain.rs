//! The hash chain over audit records.
//!
//! Record `n`'s hash is `SHA-256(hash(n-1) ‖ canonical(record n))`; the
//! first record of an enclave run (its `start`) chains onto
//! [`GENESIS_HASH`]. Editing, dropping, reordering or inserting a record
//! changes every hash after it, so one attested checkpoint over
//! `(seq, hash)` vouches for every record up to `seq`.

use sha2::{Digest, Sha256};

use super::record::{AuditRecord, RecordError};

/// A chain hash (SHA-256).
pub type ChainHash = [u8; 32];

/// The hash a run's first record chains onto.
pub const GENESIS_HASH: ChainHash = [0; 32];

/// The hash after `record`, given the hash before it.
pub fn next_hash(previous: &ChainHash, record: &AuditRecord) -> Result<ChainHash, RecordError> {
    let bytes = record.canonical_bytes()?;
    let mut hasher = Sha256::new();
    hasher.update(previous);
    hasher.update(&bytes);
    Ok(hasher.finalize().into())
}

/// Where a chain stands: the last record's sequence number and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainState {
    /// Sequence number of the last record (`None` before the first).
    pub seq: Option<u64>,
    /// Hash after the last record ([`GENESIS_HASH`] before the first).
    pub hash: ChainHash,
}

impl Default for ChainState {
    fn default() -> Self {
        ChainState {
            seq: None,
            hash: GENESIS_HASH,
        }
    }
}

impl ChainState {
    /// The sequence number the next record must carry.
    pub fn next_seq(&self) -> u64 {
        self.seq.map_or(0, |seq| seq.saturating_add(1))
    }

    /// Appends `record` (whose `seq` the caller set to [`Self::next_seq`])
    /// and returns its hash.
    pub fn append(&mut self, record: &AuditRecord) -> Result<ChainHash, RecordError> {
        let hash = next_hash(&self.hash, record)?;
        self.seq = Some(record.seq);
        self.hash = hash;
        Ok(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{AuditEvent, RunId};

    fn start(seq: u64) -> AuditRecord {
        AuditRecord {
            seq,
            time_ms: 1,
            event: AuditEvent::Start {
                run: RunId([7; 16]),
            },
        }
    }

    #[test]
    fn each_hash_depends_on_the_one_before() {
        let mut a = ChainState::default();
        let first = a.append(&start(0)).unwrap();
        assert_ne!(first, GENESIS_HASH);
        let second = a.append(&start(1)).unwrap();
        let mut b = ChainState {
            hash: [1; 32],
            ..ChainState::default()
        };
        assert_ne!(b.append(&start(0)).unwrap(), first);
        assert_ne!(first, second);
        assert_eq!(a.next_seq(), 2);
    }
}
