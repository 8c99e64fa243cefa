//! One audit record and its canonical bytes.
//!
//! The canonical encoding is what the chain hashes and what the enclave
//! sends the daemon, so it is written by hand like
//! [`crate::file_record`]: one byte string per record, every length
//! prefixed, no trailing bytes, and every count and size bounded on both
//! encode and decode. A generic serializer could change its output between
//! versions and silently break every chain. Big-endian throughout:
//!
//! ```text
//! format u8 (=1) | seq u64 | time_ms u64 | event tag u8 | event
//! start      (0): run [16]
//! request    (1): op u8 | names u16 {str} | count opt-u64 | caller opt-caller
//!                 | peer str | outcome u8 [| code str]
//! gap        (2): first_seq u64 | count u64 | resume_hash [32]
//! checkpoint (3): document u32-len bytes
//! str = u16 len | UTF-8; opt-X = u8 (0|1) [| X]
//! caller = opt-u32 uid | opt-str user | opt-u32 gid | u16 {u32} groups
//!          | u16 {str} group_names | opt-str unit | opt-str token
//! ```
//!
//! A record never holds a secret value: names, counts, who asked and how
//! it ended.

use serde::{Deserialize, Serialize};

use crate::attestation::MAX_DOCUMENT_SIZE;
use crate::caller::{Caller, MAX_CALLER_GROUPS, MAX_CALLER_NAME};
use crate::name::MAX_NAME_LEN;

use super::chain::ChainHash;

/// The canonical encoding this build writes and reads.
pub const RECORD_FORMAT: u8 = 1;
/// Most names one record carries (a `Get` names one; a `Load` records a
/// count instead of its names).
pub const MAX_RECORD_NAMES: usize = 16;
/// Longest peer description (`vsock:3:1023`, `unix:uid=0,gid=0,pid=1`).
pub const MAX_PEER_LEN: usize = 128;
/// Longest error code in an outcome.
pub const MAX_CODE_LEN: usize = 64;
/// Largest canonical record: a checkpoint with the largest document.
pub const MAX_RECORD_LEN: usize = 1 + 8 + 8 + 1 + 4 + MAX_DOCUMENT_SIZE;

/// Why a record cannot be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The bytes end inside a field.
    #[error("audit record truncated")]
    Truncated,
    /// Bytes follow the record.
    #[error("audit record has {0} trailing bytes")]
    Trailing(usize),
    /// Another encoding than [`RECORD_FORMAT`].
    #[error("audit record format {0} is not supported")]
    Format(u8),
    /// An unknown event, operation or outcome tag.
    #[error("audit record has unknown {field} tag {tag}")]
    Tag {
        /// Which tag.
        field: &'static str,
        /// Its value.
        tag: u8,
    },
    /// A field over its bound.
    #[error("audit record field {field} is {len}; at most {max} allowed")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its size or count.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A string that is not UTF-8.
    #[error("audit record field {0} is not UTF-8")]
    Utf8(&'static str),
    /// A checkpoint document's `user_data` is not a checkpoint claim.
    #[error("checkpoint user_data is not a nitro-keystore audit claim")]
    CheckpointUserData,
}

/// Random id of one enclave run, so a restart is visible in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RunId(pub [u8; 16]);

impl Serialize for RunId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for RunId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0; 16];
        hex::decode_to_slice(&text, &mut out).map_err(serde::de::Error::custom)?;
        Ok(RunId(out))
    }
}

/// What was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditOp {
    /// One secret by name.
    Get,
    /// The names of the readable secrets.
    List,
    /// A new set from the host.
    Load,
    /// An attestation document for a caller.
    Attest,
    /// Health (recorded only when refused).
    Status,
    /// Draining or checkpointing the audit trail (recorded only when refused).
    Audit,
    /// A connection refused before any request was read.
    Connect,
    /// A frame that did not decode as a request.
    Malformed,
}

impl AuditOp {
    const ALL: [AuditOp; 8] = [
        AuditOp::Get,
        AuditOp::List,
        AuditOp::Load,
        AuditOp::Attest,
        AuditOp::Status,
        AuditOp::Audit,
        AuditOp::Connect,
        AuditOp::Malformed,
    ];

    fn tag(self) -> u8 {
        // The position in ALL; fixed by the format.
        match self {
            AuditOp::Get => 0,
            AuditOp::List => 1,
            AuditOp::Load => 2,
            AuditOp::Attest => 3,
            AuditOp::Status => 4,
            AuditOp::Audit => 5,
            AuditOp::Connect => 6,
            AuditOp::Malformed => 7,
        }
    }

    fn from_tag(tag: u8) -> Result<AuditOp, RecordError> {
        AuditOp::ALL
            .get(usize::from(tag))
            .copied()
            .ok_or(RecordError::Tag { field: "op", tag })
    }
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Answered.
    Ok,
    /// Refused by the peer policy or the access rules.
    Denied,
    /// No such secret.
    NotFound,
    /// Failed with this protocol error code.
    Error(String),
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditEvent {
    /// The first record of an enclave run.
    Start {
        /// The run's random id.
        run: RunId,
    },
    /// A request, answered or refused.
    Request {
        /// What was asked.
        op: AuditOp,
        /// The names concerned (a `Get`'s name; never a value).
        #[serde(default)]
        names: Vec<String>,
        /// A count where names would be too many (entries loaded, names
        /// listed).
        #[serde(default)]
        count: Option<u64>,
        /// Whom it was for, as the agent asserted it (or as the kernel
        /// showed an unprivileged peer).
        #[serde(default)]
        caller: Option<Caller>,
        /// The peer as the kernel showed it (transport, CID/port or uid).
        peer: String,
        /// How it ended.
        outcome: Outcome,
    },
    /// Records `first_seq .. first_seq + count` were dropped because the
    /// buffer was full; the chain continues from `resume_hash`, the hash
    /// after the last dropped record.
    Gap {
        /// The first dropped sequence number.
        first_seq: u64,
        /// How many were dropped.
        count: u64,
        /// Chain hash after the last dropped record.
        #[serde(with = "hex_hash")]
        resume_hash: ChainHash,
    },
    /// An NSM attestation document whose `user_data` is a
    /// [`super::CheckpointClaim`] over the record before this one.
    Checkpoint {
        /// The COSE_Sign1 document.
        #[serde(with = "base64_bytes")]
        document: Vec<u8>,
    },
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// Position in the run's chain, from 0.
    pub seq: u64,
    /// Enclave clock, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// What happened.
    pub event: AuditEvent,
}

impl AuditRecord {
    /// The bytes the chain hashes. Fails only if a field is over its bound.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, RecordError> {
        let mut w = Writer(Vec::with_capacity(128));
        w.u8(RECORD_FORMAT);
        w.u64(self.seq);
        w.u64(self.time_ms);
        match &self.event {
            AuditEvent::Start { run } => {
                w.u8(0);
                w.bytes(&run.0);
            }
            AuditEvent::Request {
                op,
                names,
                count,
                caller,
                peer,
                outcome,
            } => {
                w.u8(1);
                w.u8(op.tag());
                check_count("names", names.len(), MAX_RECORD_NAMES)?;
                w.u16_len(names.len());
                for name in names {
                    w.str("name", name, MAX_NAME_LEN)?;
                }
                match count {
                    None => w.u8(0),
                    Some(count) => {
                        w.u8(1);
                        w.u64(*count);
                    }
                }
                match caller {
                    None => w.u8(0),
                    Some(caller) => {
                        w.u8(1);
                        write_caller(&mut w, caller)?;
                    }
                }
                w.str("peer", peer, MAX_PEER_LEN)?;
                match outcome {
                    Outcome::Ok => w.u8(0),
                    Outcome::Denied => w.u8(1),
                    Outcome::NotFound => w.u8(2),
                    Outcome::Error(code) => {
                        w.u8(3);
                        w.str("code", code, MAX_CODE_LEN)?;
                    }
                }
            }
            AuditEvent::Gap {
                first_seq,
                count,
                resume_hash,
            } => {
                w.u8(2);
                w.u64(*first_seq);
                w.u64(*count);
                w.bytes(resume_hash);
            }
            AuditEvent::Checkpoint { document } => {
                w.u8(3);
                check_count("document", document.len(), MAX_DOCUMENT_SIZE)?;
                // Bounded above, so it fits a u32.
                w.bytes(
                    &u32::try_from(document.len())
                        .unwrap_or(u32::MAX)
                        .to_be_bytes(),
                );
                w.bytes(document);
            }
        }
        Ok(w.0)
    }

    /// Reads canonical bytes back, treating every byte as hostile.
    pub fn decode(bytes: &[u8]) -> Result<AuditRecord, RecordError> {
        check_count("record", bytes.len(), MAX_RECORD_LEN)?;
        let mut r = Reader(bytes);
        let format = r.u8()?;
        if format != RECORD_FORMAT {
            return Err(RecordError::Format(format));
        }
        let seq = r.u64()?;
        let time_ms = r.u64()?;
        let event = match r.u8()? {
            0 => {
                let mut run = [0; 16];
                run.copy_from_slice(r.take(16)?);
                AuditEvent::Start { run: RunId(run) }
            }
            1 => {
                let op = AuditOp::from_tag(r.u8()?)?;
                let n = usize::from(r.u16()?);
                check_count("names", n, MAX_RECORD_NAMES)?;
                let mut names = Vec::with_capacity(n);
                for _ in 0..n {
                    names.push(r.str("name", MAX_NAME_LEN)?);
                }
                let count = match r.flag("count")? {
                    false => None,
                    true => Some(r.u64()?),
                };
                let caller = match r.flag("caller")? {
                    false => None,
                    true => Some(read_caller(&mut r)?),
                };
                let peer = r.str("peer", MAX_PEER_LEN)?;
                let outcome = match r.u8()? {
                    0 => Outcome::Ok,
                    1 => Outcome::Denied,
                    2 => Outcome::NotFound,
                    3 => Outcome::Error(r.str("code", MAX_CODE_LEN)?),
                    tag => {
                        return Err(RecordError::Tag {
                            field: "outcome",
                            tag,
                        });
                    }
                };
                AuditEvent::Request {
                    op,
                    names,
                    count,
                    caller,
                    peer,
                    outcome,
                }
            }
            2 => {
                let first_seq = r.u64()?;
                let count = r.u64()?;
                let mut resume_hash = [0; 32];
                resume_hash.copy_from_slice(r.take(32)?);
                AuditEvent::Gap {
                    first_seq,
                    count,
                    resume_hash,
                }
            }
            3 => {
                let mut len = [0; 4];
                len.copy_from_slice(r.take(4)?);
                let len = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
                check_count("document", len, MAX_DOCUMENT_SIZE)?;
                AuditEvent::Checkpoint {
                    document: r.take(len)?.to_vec(),
                }
            }
            tag => {
                return Err(RecordError::Tag {
                    field: "event",
                    tag,
                });
            }
        };
        if !r.0.is_empty() {
            return Err(RecordError::Trailing(r.0.len()));
        }
        Ok(AuditRecord {
            seq,
            time_ms,
            event,
        })
    }
}

fn check_count(field: &'static str, len: usize, max: usize) -> Result<(), RecordError> {
    if len > max {
        return Err(RecordError::TooLong { field, len, max });
    }
    Ok(())
}

fn write_caller(w: &mut Writer, caller: &Caller) -> Result<(), RecordError> {
    w.opt_u32(caller.uid);
    w.opt_str("user", caller.user.as_deref(), MAX_CALLER_NAME)?;
    w.opt_u32(caller.gid);
    check_count("groups", caller.groups.len(), MAX_CALLER_GROUPS)?;
    w.u16_len(caller.groups.len());
    for gid in &caller.groups {
        w.bytes(&gid.to_be_bytes());
    }
    check_count("group_names", caller.group_names.len(), MAX_CALLER_GROUPS)?;
    w.u16_len(caller.group_names.len());
    for name in &caller.group_names {
        w.str("group_name", name, MAX_CALLER_NAME)?;
    }
    w.opt_str("unit", caller.unit.as_deref(), MAX_CALLER_NAME)?;
    w.opt_str("token", caller.token.as_deref(), MAX_CALLER_NAME)?;
    Ok(())
}

fn read_caller(r: &mut Reader<'_>) -> Result<Caller, RecordError> {
    let uid = r.opt_u32("uid")?;
    let user = r.opt_str("user", MAX_CALLER_NAME)?;
    let gid = r.opt_u32("gid")?;
    let n = usize::from(r.u16()?);
    check_count("groups", n, MAX_CALLER_GROUPS)?;
    let mut groups = Vec::with_capacity(n);
    for _ in 0..n {
        groups.push(r.u32()?);
    }
    let n = usize::from(r.u16()?);
    check_count("group_names", n, MAX_CALLER_GROUPS)?;
    let mut group_names = Vec::with_capacity(n);
    for _ in 0..n {
        group_names.push(r.str("group_name", MAX_CALLER_NAME)?);
    }
    Ok(Caller {
        uid,
        user,
        gid,
        groups,
        group_names,
        unit: r.opt_str("unit", MAX_CALLER_NAME)?,
        token: r.opt_str("token", MAX_CALLER_NAME)?,
    })
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    /// A length already checked against a bound below `u16::MAX`.
    fn u16_len(&mut self, len: usize) {
        self.0
            .extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
    }
    fn str(&mut self, field: &'static str, v: &str, max: usize) -> Result<(), RecordError> {
        check_count(field, v.len(), max)?;
        self.u16_len(v.len());
        self.bytes(v.as_bytes());
        Ok(())
    }
    fn opt_u32(&mut self, v: Option<u32>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.bytes(&v.to_be_bytes());
            }
        }
    }
    fn opt_str(
        &mut self,
        field: &'static str,
        v: Option<&str>,
        max: usize,
    ) -> Result<(), RecordError> {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.str(field, v, max)?;
            }
        }
        Ok(())
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.0.len() < n {
            return Err(RecordError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        let mut b = [0; 2];
        b.copy_from_slice(self.take(2)?);
        Ok(u16::from_be_bytes(b))
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        let mut b = [0; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }
    fn flag(&mut self, field: &'static str) -> Result<bool, RecordError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(RecordError::Tag { field, tag }),
        }
    }
    fn str(&mut self, field: &'static str, max: usize) -> Result<String, RecordError> {
        let len = usize::from(self.u16()?);
        check_count(field, len, max)?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| RecordError::Utf8(field))
    }
    fn opt_u32(&mut self, field: &'static str) -> Result<Option<u32>, RecordError> {
        Ok(match self.flag(field)? {
            false => None,
            true => Some(self.u32()?),
        })
    }
    fn opt_str(&mut self, field: &'static str, max: usize) -> Result<Option<String>, RecordError> {
        Ok(match self.flag(field)? {
            false => None,
            true => Some(self.str(field, max)?),
        })
    }
}

/// A chain hash as 64 hex digits in JSON.
pub(crate) mod hex_hash {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(hash: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(hash))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = <&str>::deserialize(d)?;
        let mut out = [0; 32];
        hex::decode_to_slice(text, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

/// A checkpoint document as standard base64 in JSON, bounded before
/// decoding.
mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::attestation::MAX_DOCUMENT_SIZE;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <&str>::deserialize(d)?;
        if text.len() > MAX_DOCUMENT_SIZE.div_ceil(3) * 4 {
            return Err(serde::de::Error::custom("checkpoint document too large"));
        }
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn samples() -> Vec<AuditRecord> {
        let events = vec![
            AuditEvent::Start {
                run: RunId([5; 16]),
            },
            AuditEvent::Request {
                op: AuditOp::Get,
                names: vec!["DB_PASSWORD".into()],
                count: None,
                caller: Some(Caller {
                    uid: Some(1000),
                    user: Some("api".into()),
                    gid: Some(1000),
                    groups: vec![1000, 27],
                    group_names: vec!["api".into(), "sudo".into()],
                    unit: Some("api.service".into()),
                    token: None,
                }),
                peer: "unix:uid=0".into(),
                outcome: Outcome::Denied,
            },
            AuditEvent::Request {
                op: AuditOp::Load,
                names: vec![],
                count: Some(10_000),
                caller: None,
                peer: "vsock:3:700".into(),
                outcome: Outcome::Error("Decrypt".into()),
            },
            AuditEvent::Gap {
                first_seq: 9,
                count: 3,
                resume_hash: [8; 32],
            },
            AuditEvent::Checkpoint {
                document: vec![1, 2, 3],
            },
        ];
        events
            .into_iter()
            .enumerate()
            .map(|(seq, event)| AuditRecord {
                seq: seq as u64,
                time_ms: 1_764_000_000_000 + seq as u64,
                event,
            })
            .collect()
    }

    #[test]
    fn canonical_bytes_and_json_round_trip() {
        for record in samples() {
            let bytes = record.canonical_bytes().unwrap();
            assert_eq!(AuditRecord::decode(&bytes).unwrap(), record);
            let json = serde_json::to_string(&record).unwrap();
            let back: AuditRecord = serde_json::from_str(&json).unwrap();
            assert_eq!(back.canonical_bytes().unwrap(), bytes);
        }
    }

    #[test]
    fn every_truncation_and_trailing_byte_is_refused() {
        for record in samples() {
            let bytes = record.canonical_bytes().unwrap();
            for cut in 0..bytes.len() {
                assert!(AuditRecord::decode(&bytes[..cut]).is_err(), "cut {cut}");
            }
            let mut long = bytes.clone();
            long.push(0);
            assert_eq!(AuditRecord::decode(&long), Err(RecordError::Trailing(1)));
        }
    }

    #[test]
    fn over_bound_fields_are_refused_on_both_sides() {
        let mut record = samples().remove(1);
        if let AuditEvent::Request { names, .. } = &mut record.event {
            *names = vec!["N".into(); MAX_RECORD_NAMES + 1];
        }
        assert!(matches!(
            record.canonical_bytes(),
            Err(RecordError::TooLong { field: "names", .. })
        ));
        // A hand-made encoding claiming 17 names is refused before reading them.
        let mut bytes = samples()[1].canonical_bytes().unwrap();
        bytes[19] = 0;
        bytes[20] = 17;
        assert!(matches!(
            AuditRecord::decode(&bytes),
            Err(RecordError::TooLong { field: "names", .. })
        ));
    }

    #[test]
    fn unknown_json_fields_are_refused() {
        let json = r#"{"seq":0,"time_ms":1,"event":{"start":{"run":"05050505050505050505050505050505"}},"value":"x"}"#;
        assert!(serde_json::from_str::<AuditRecord>(json).is_err());
    }
}
