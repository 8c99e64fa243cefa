//! What an attested checkpoint signs.
//!
//! The enclave asks its NSM for a document whose `user_data` is
//! [`CHECKPOINT_USER_DATA_TAG`] ‖ run id ‖ seq (u64, big-endian) ‖ chain
//! hash: "in run R, the chain up to record `seq` hashes to H". The tag
//! differs from [`crate::attestation::ATTEST_USER_DATA_TAG`], and an
//! `Attest` caller's data always follows that tag, so no `Attest` request
//! can obtain a document that reads as a checkpoint.

use super::chain::ChainHash;
use super::record::{RecordError, RunId};

/// Domain tag in front of every checkpoint's `user_data`.
pub const CHECKPOINT_USER_DATA_TAG: &[u8] = b"nitro-keystore audit v1\0";

/// Bytes of a checkpoint's `user_data`.
pub const CHECKPOINT_USER_DATA_LEN: usize = CHECKPOINT_USER_DATA_TAG.len() + 16 + 8 + 32;

/// What a checkpoint document vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointClaim {
    /// The enclave run the records belong to.
    pub run: RunId,
    /// The last record covered.
    pub seq: u64,
    /// The chain hash after that record.
    pub hash: ChainHash,
}

impl CheckpointClaim {
    /// The `user_data` to have attested.
    pub fn user_data(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(CHECKPOINT_USER_DATA_LEN);
        out.extend_from_slice(CHECKPOINT_USER_DATA_TAG);
        out.extend_from_slice(&self.run.0);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.hash);
        out
    }

    /// Reads a claim back from a document's `user_data`.
    pub fn from_user_data(data: &[u8]) -> Result<CheckpointClaim, RecordError> {
        let rest = data
            .strip_prefix(CHECKPOINT_USER_DATA_TAG)
            .ok_or(RecordError::CheckpointUserData)?;
        if rest.len() != CHECKPOINT_USER_DATA_LEN - CHECKPOINT_USER_DATA_TAG.len() {
            return Err(RecordError::CheckpointUserData);
        }
        let (run, rest) = rest.split_at(16);
        let (seq, hash) = rest.split_at(8);
        let mut claim = CheckpointClaim {
            run: RunId([0; 16]),
            seq: 0,
            hash: [0; 32],
        };
        claim.run.0.copy_from_slice(run);
        let mut seq_bytes = [0; 8];
        seq_bytes.copy_from_slice(seq);
        claim.seq = u64::from_be_bytes(seq_bytes);
        claim.hash.copy_from_slice(hash);
        Ok(claim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attestation::{ATTEST_USER_DATA_TAG, MAX_FIELD_LEN};

    #[test]
    fn user_data_round_trips_and_fits_the_nsm_limit() {
        let claim = CheckpointClaim {
            run: RunId([3; 16]),
            seq: 42,
            hash: [9; 32],
        };
        let data = claim.user_data();
        assert!(data.len() <= MAX_FIELD_LEN);
        assert_eq!(CheckpointClaim::from_user_data(&data).unwrap(), claim);
    }

    #[test]
    fn an_attest_document_never_reads_as_a_checkpoint() {
        assert_ne!(ATTEST_USER_DATA_TAG, CHECKPOINT_USER_DATA_TAG);
        let mut data = ATTEST_USER_DATA_TAG.to_vec();
        data.extend_from_slice(
            &CheckpointClaim {
                run: RunId([3; 16]),
                seq: 1,
                hash: [0; 32],
            }
            .user_data(),
        );
        assert!(CheckpointClaim::from_user_data(&data).is_err());
        let mut short = CHECKPOINT_USER_DATA_TAG.to_vec();
        short.push(1);
        assert!(CheckpointClaim::from_user_data(&short).is_err());
    }
}
