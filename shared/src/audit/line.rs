//! The audit log file: one JSON object per line.
//!
//! A record line is the record's fields plus the chain hash after it:
//! `{"seq":7,"time_ms":…,"event":{"request":{…}},"hash":"<64 hex>"}`.
//! A file started by size rotation opens with
//! `{"continues":{"seq":N,"hash":"<64 hex>"}}`, the last record of the file
//! before it, so the chain can be followed across files. Unknown fields are
//! refused: a field the verifier would not hash must not be there to edit.

use serde::{Deserialize, Serialize};

use super::chain::ChainHash;
use super::record::{AuditEvent, AuditRecord, hex_hash};

/// Longest line read or written: a checkpoint's largest document in base64
/// with room for the rest.
pub const MAX_LINE_LEN: usize = 64 * 1024;

/// Why a line cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// Longer than [`MAX_LINE_LEN`].
    #[error("line is {0} bytes; at most {MAX_LINE_LEN} allowed")]
    TooLong(usize),
    /// Not a record or continuation line.
    #[error("not an audit log line: {0}")]
    Json(#[from] serde_json::Error),
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogLine {
    /// A record and the chain hash after it.
    Record {
        /// The record (boxed: far larger than a continuation).
        record: Box<AuditRecord>,
        /// The chain hash after it, as the writer computed it.
        hash: ChainHash,
    },
    /// The first line of a rotated file: the previous file's last record.
    Continues {
        /// Its sequence number.
        seq: u64,
        /// The chain hash after it.
        hash: ChainHash,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordLine {
    seq: u64,
    time_ms: u64,
    event: AuditEvent,
    #[serde(with = "hex_hash")]
    hash: ChainHash,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContinuesLine {
    continues: Point,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Point {
    seq: u64,
    #[serde(with = "hex_hash")]
    hash: ChainHash,
}

impl LogLine {
    /// The line's JSON text, without the newline.
    pub fn to_json(&self) -> String {
        let result = match self {
            LogLine::Record { record, hash } => serde_json::to_string(&RecordLine {
                seq: record.seq,
                time_ms: record.time_ms,
                event: record.event.clone(),
                hash: *hash,
            }),
            LogLine::Continues { seq, hash } => serde_json::to_string(&ContinuesLine {
                continues: Point {
                    seq: *seq,
                    hash: *hash,
                },
            }),
        };
        // Serializing these plain structs to a String cannot fail.
        result.unwrap_or_default()
    }

    /// Reads one line (without its newline).
    pub fn parse(line: &str) -> Result<LogLine, LineError> {
        if line.len() > MAX_LINE_LEN {
            return Err(LineError::TooLong(line.len()));
        }
        if line.trim_start().starts_with("{\"continues\"") {
            let head: ContinuesLine = serde_json::from_str(line)?;
            return Ok(LogLine::Continues {
                seq: head.continues.seq,
                hash: head.continues.hash,
            });
        }
        let line: RecordLine = serde_json::from_str(line)?;
        Ok(LogLine::Record {
            record: Box::new(AuditRecord {
                seq: line.seq,
                time_ms: line.time_ms,
                event: line.event,
            }),
            hash: line.hash,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::RunId;

    #[test]
    fn both_kinds_round_trip() {
        let lines = [
            LogLine::Record {
                record: Box::new(AuditRecord {
                    seq: 0,
                    time_ms: 5,
                    event: AuditEvent::Start {
                        run: RunId([1; 16]),
                    },
                }),
                hash: [2; 32],
            },
            LogLine::Continues {
                seq: 9,
                hash: [3; 32],
            },
        ];
        for line in lines {
            let json = line.to_json();
            assert!(!json.contains('\n'));
            assert_eq!(LogLine::parse(&json).unwrap(), line);
        }
    }

    #[test]
    fn extra_fields_bad_hashes_and_long_lines_are_refused() {
        let ok = r#"{"seq":0,"time_ms":5,"event":{"start":{"run":"01010101010101010101010101010101"}},"hash":"0202020202020202020202020202020202020202020202020202020202020202"}"#;
        assert!(LogLine::parse(ok).is_ok());
        assert!(LogLine::parse(&ok.replace("\"seq\":0,", "\"seq\":0,\"x\":1,")).is_err());
        assert!(LogLine::parse(&ok.replace("0202\"", "02\"")).is_err());
        assert!(LogLine::parse(&" ".repeat(MAX_LINE_LEN + 1)).is_err());
        assert!(LogLine::parse(r#"{"continues":{"seq":1}}"#).is_err());
    }
}
