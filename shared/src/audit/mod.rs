//! The audit trail: what the enclave records about every read, how the
//! records are chained, how an attested checkpoint seals the chain, and the
//! JSON-lines form the daemon writes and `keystore-host audit` reads.
//!
//! - [`record`]: one [`AuditRecord`] and its canonical bytes;
//! - [`chain`]: `hash = SHA-256(previous hash ‖ canonical record)`;
//! - [`checkpoint`]: the `user_data` an attested checkpoint signs;
//! - [`line`]: a record as one line of the log file;
//! - [`reader`]: reading a log file line by line, bounded;
//! - [`verify`]: checking a log offline, file by file.

pub mod chain;
pub mod checkpoint;
pub mod line;
pub mod reader;
pub mod record;
pub mod verify;

pub use chain::{ChainHash, ChainState, GENESIS_HASH};
pub use checkpoint::{CHECKPOINT_USER_DATA_TAG, CheckpointClaim};
pub use line::{LogLine, MAX_LINE_LEN};
pub use reader::{Line, LineReader, ReadError};
pub use record::{AuditEvent, AuditOp, AuditRecord, Outcome, RecordError, RunId};
pub use verify::{Failure, LogVerifier, Problem, RunSummary, Summary, VerifyError};
