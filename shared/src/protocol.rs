//! The messages host apps, the host proxy and the enclave exchange.
//!
//! Every message travels as one CBOR frame (see [`crate::frame`]). Requests
//! carry an `id` the response echoes, so a client can match answers, and a
//! protocol version `v` so either side can refuse a peer it does not
//! understand instead of misreading it.
//!
//! Evolution rules: structs ignore map keys they do not know and treat absent
//! `Option` fields as `None`, so fields may be added; renaming or removing
//! one, or adding a request or response variant an old peer must handle,
//! needs a new [`PROTOCOL_VERSION`].
//!
//! Secret values and AWS credentials are held in [`SecretBytes`] /
//! [`SecretString`]: wiped on drop, printed by `Debug` as
//! `[REDACTED N bytes]`, and without `Display`, so logging a whole response
//! cannot leak them.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

use crate::caller::Caller;
use crate::frame::FrameError;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// Largest request frame body accepted from host apps.
pub const DEFAULT_MAX_REQUEST_FRAME: usize = 64 * 1024;

/// Largest `Load` frame body accepted from the host proxy: a whole secrets
/// file of `ENC[...]` envelopes.
pub const DEFAULT_MAX_LOAD_FRAME: usize = 16 * 1024 * 1024;

/// Largest secret value the keystore stores or serves.
pub const DEFAULT_MAX_SECRET_VALUE: usize = 1024 * 1024;

/// Room for everything in a response besides the secret value itself (id,
/// version, variant and field names, the secret's name).
pub const RESPONSE_OVERHEAD: usize = 64 * 1024;

/// The response frame limit that lets a secret of `max_secret_value` bytes
/// through: servers use it as their write limit and clients as their read
/// limit, so both sides agree.
pub const fn max_response_frame(max_secret_value: usize) -> usize {
    max_secret_value.saturating_add(RESPONSE_OVERHEAD)
}

/// Frame limit for responses with the default secret-value limit.
pub const DEFAULT_MAX_RESPONSE_FRAME: usize = max_response_frame(DEFAULT_MAX_SECRET_VALUE);

/// A request, from a host app or the host proxy to the enclave, or from the
/// enclave to the credentials service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the client; echoed in the response.
    pub id: u64,
    /// Protocol version; see [`PROTOCOL_VERSION`].
    pub v: u16,
    /// What is asked.
    pub op: RequestOp,
    /// Whom a `Get` or `List` is made for, asserted by the agent. The
    /// enclave believes it only from a privileged peer; a privileged peer
    /// that names no caller reads as root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<Caller>,
}

/// The operations a [`Request`] can ask for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestOp {
    /// One secret by name.
    Get {
        /// The secret's key path.
        name: String,
    },
    /// The names (never the values) of all loaded secrets.
    List,
    /// Health and freshness of the enclave.
    Status,
    /// A fresh attestation document binding the caller's nonce, so a host
    /// app can check what it is talking to.
    Attest {
        /// Caller-chosen freshness value, copied into the document.
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
        /// Optional extra data copied into the document.
        #[serde(default, with = "serde_bytes")]
        user_data: Option<Vec<u8>>,
    },
    /// A new set of encrypted secrets from the host proxy; replaces the old
    /// set atomically once all of it decrypts.
    Load {
        /// The encrypted entries (at most [`MAX_LOAD_ENTRIES`]; more are
        /// refused while decoding, before they are stored).
        #[serde(deserialize_with = "bounded_entries")]
        entries: Vec<LoadEntry>,
    },
    /// AWS credentials for KMS, asked by the enclave of the credentials
    /// service.
    GetCredentials,
    /// Audit records after `after` (load port, privileged peers only).
    /// Naming a record acknowledges it and every one before it: the
    /// enclave drops them from its buffer, so the daemon names only what
    /// it has durably written, and a crash between read and write loses
    /// nothing. A cursor the enclave does not know (another run, a log
    /// from elsewhere) acknowledges nothing; the answer then starts at the
    /// oldest buffered record.
    AuditRead {
        /// The last record the reader has written, if any.
        #[serde(default)]
        after: Option<AuditCursor>,
        /// Most records wanted (the enclave caps it at
        /// [`MAX_AUDIT_BATCH`]).
        max: u32,
    },
    /// Makes an attested checkpoint now (load port, privileged peers only).
    AuditCheckpoint,
    /// The enclave's recent log events after `after` (load port, privileged
    /// peers only), for the daemon to re-emit into its own log (issue 16).
    /// Like [`RequestOp::AuditRead`], naming an event acknowledges it and
    /// every one before it, so a restarted daemon resumes where the last
    /// one stopped; a cursor of another run acknowledges nothing.
    LogRead {
        /// The last event the reader has re-emitted, if any.
        #[serde(default)]
        after: Option<LogCursor>,
        /// Most events wanted (the enclave caps it at [`MAX_LOG_BATCH`]).
        max: u32,
    },
}

/// Most events one [`ResponseBody::LogRecords`] carries; the decoder
/// refuses the next one.
pub const MAX_LOG_BATCH: usize = 512;

/// Most bytes of events the enclave puts in one batch (at least one event
/// is always sent): well under the response frame limit.
pub const MAX_LOG_BATCH_BYTES: usize = 256 * 1024;

/// Most fields one [`LogEvent`] carries; the decoder refuses the next one.
pub const MAX_LOG_FIELDS: usize = 32;

/// A point in the enclave's log: the run (random per enclave start) and an
/// event's sequence number in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogCursor {
    /// The enclave run the sequence numbers belong to.
    pub run: u64,
    /// The event's sequence number (the first event of a run is 1).
    pub seq: u64,
}

/// A log event's level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LogLevel {
    /// `ERROR`.
    Error,
    /// `WARN`.
    Warn,
    /// `INFO`.
    Info,
    /// `DEBUG`.
    Debug,
    /// `TRACE`.
    Trace,
}

impl LogLevel {
    /// The level as `tracing` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "ERROR",
            LogLevel::Warn => "WARN",
            LogLevel::Info => "INFO",
            LogLevel::Debug => "DEBUG",
            LogLevel::Trace => "TRACE",
        }
    }
}

/// One field of a [`LogEvent`]: its name and its value as text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogField {
    /// The field's name.
    pub name: String,
    /// Its value, formatted (bounded by the enclave).
    pub value: String,
}

/// One event the enclave logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEvent {
    /// Its sequence number in the run.
    pub seq: u64,
    /// When it was logged, in milliseconds since the Unix epoch (the
    /// enclave's clock).
    pub unix_ms: u64,
    /// Its level.
    pub level: LogLevel,
    /// Its `tracing` target (the module that logged it).
    pub target: String,
    /// Its message.
    pub message: String,
    /// Its other fields, in the order logged.
    #[serde(default, deserialize_with = "bounded_log_fields")]
    pub fields: Vec<LogField>,
}

/// Answer to `LogRead`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LogBatch {
    /// The enclave run these events belong to.
    pub run: u64,
    /// Events in sequence order (at most [`MAX_LOG_BATCH`]).
    #[serde(deserialize_with = "bounded_log_events")]
    pub entries: Vec<LogEvent>,
    /// Whether more events are buffered after these.
    #[serde(default)]
    pub more: bool,
    /// Events the enclave dropped since it started (its ring was full
    /// before they were read).
    #[serde(default)]
    pub dropped: u64,
}

/// Deserializes a batch's events, refusing more than [`MAX_LOG_BATCH`].
fn bounded_log_events<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<LogEvent>, D::Error> {
    bounded_seq::<D, LogEvent>(deserializer, MAX_LOG_BATCH, "log events")
}

/// Deserializes an event's fields, refusing more than [`MAX_LOG_FIELDS`].
fn bounded_log_fields<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<LogField>, D::Error> {
    bounded_seq::<D, LogField>(deserializer, MAX_LOG_FIELDS, "log fields")
}

/// Deserializes a sequence of at most `max` items (`what` names them in
/// the error); the item past the bound is refused, not stored.
fn bounded_seq<'de, D, T>(
    deserializer: D,
    max: usize,
    what: &'static str,
) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Bounded<T> {
        max: usize,
        what: &'static str,
        item: std::marker::PhantomData<T>,
    }
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Bounded<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "at most {} {}", self.max, self.what)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let hint = seq.size_hint().unwrap_or(0).min(self.max).min(1024);
            let mut items = Vec::with_capacity(hint);
            while let Some(item) = seq.next_element::<T>()? {
                if items.len() == self.max {
                    return Err(serde::de::Error::invalid_length(self.max + 1, &self));
                }
                items.push(item);
            }
            Ok(items)
        }
    }
    deserializer.deserialize_seq(Bounded {
        max,
        what,
        item: std::marker::PhantomData,
    })
}

/// Most records one [`ResponseBody::AuditRecords`] carries; the decoder
/// refuses the next one.
pub const MAX_AUDIT_BATCH: usize = 1024;

/// Most bytes of canonical records the enclave puts in one batch (at least
/// one record is always sent): well under the response frame limit.
pub const MAX_AUDIT_BATCH_BYTES: usize = 512 * 1024;

/// A point in the audit chain: a record's sequence number and the chain
/// hash after it, as the log's last line shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditCursor {
    /// The record's sequence number.
    pub seq: u64,
    /// The chain hash after it (32 bytes).
    #[serde(with = "serde_bytes")]
    pub hash: Vec<u8>,
}

/// One drained audit record: its canonical bytes
/// ([`crate::audit::AuditRecord::decode`]) and the chain hash after it, so
/// the reader can recompute the hash and compare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Canonical record bytes.
    #[serde(with = "serde_bytes")]
    pub record: Vec<u8>,
    /// The chain hash after this record (32 bytes).
    #[serde(with = "serde_bytes")]
    pub hash: Vec<u8>,
}

/// Answer to `AuditRead`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AuditBatch {
    /// Records in sequence order (at most [`MAX_AUDIT_BATCH`]).
    #[serde(deserialize_with = "bounded_audit_entries")]
    pub entries: Vec<AuditEntry>,
    /// Whether more records are buffered after these.
    #[serde(default)]
    pub more: bool,
}

/// Deserializes a batch's entries, refusing more than [`MAX_AUDIT_BATCH`].
fn bounded_audit_entries<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<AuditEntry>, D::Error> {
    struct Bounded;
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Vec<AuditEntry>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "at most {MAX_AUDIT_BATCH} audit entries")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let hint = seq.size_hint().unwrap_or(0).min(MAX_AUDIT_BATCH);
            let mut entries = Vec::with_capacity(hint);
            while let Some(entry) = seq.next_element::<AuditEntry>()? {
                if entries.len() == MAX_AUDIT_BATCH {
                    return Err(serde::de::Error::invalid_length(MAX_AUDIT_BATCH + 1, &self));
                }
                entries.push(entry);
            }
            Ok(entries)
        }
    }
    deserializer.deserialize_seq(Bounded)
}

/// Most secrets one `Load` may carry.
pub const MAX_LOAD_SECRETS: usize = 10_000;

/// Most entries one `Load` may carry: [`MAX_LOAD_SECRETS`] plus the
/// reserved entries (rules, file record). The decoder refuses the next one
/// instead of building an unbounded vector from a 16 MiB frame.
pub const MAX_LOAD_ENTRIES: usize = MAX_LOAD_SECRETS + crate::name::RESERVED_NAMES.len();

/// Deserializes a `Load`'s entries, refusing more than [`MAX_LOAD_ENTRIES`].
fn bounded_entries<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<LoadEntry>, D::Error> {
    struct Bounded;
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Vec<LoadEntry>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "at most {MAX_LOAD_ENTRIES} entries")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let hint = seq.size_hint().unwrap_or(0).min(MAX_LOAD_ENTRIES);
            let mut entries = Vec::with_capacity(hint.min(1024));
            while let Some(entry) = seq.next_element::<LoadEntry>()? {
                if entries.len() == MAX_LOAD_ENTRIES {
                    return Err(serde::de::Error::invalid_length(
                        MAX_LOAD_ENTRIES + 1,
                        &self,
                    ));
                }
                entries.push(entry);
            }
            Ok(entries)
        }
    }
    deserializer.deserialize_seq(Bounded)
}

impl RequestOp {
    /// A short, stable name for logs and metrics (no arguments, so no
    /// secret names or payloads).
    pub fn kind(&self) -> &'static str {
        match self {
            RequestOp::Get { .. } => "get",
            RequestOp::List => "list",
            RequestOp::Status => "status",
            RequestOp::Attest { .. } => "attest",
            RequestOp::Load { .. } => "load",
            RequestOp::GetCredentials => "get_credentials",
            RequestOp::AuditRead { .. } => "audit_read",
            RequestOp::AuditCheckpoint => "audit_checkpoint",
            RequestOp::LogRead { .. } => "log_read",
        }
    }

    /// The [`ResponseBody::kind`] of a successful answer to this operation.
    pub fn answer_kind(&self) -> &'static str {
        match self {
            RequestOp::Get { .. } => "Secret",
            RequestOp::List => "Names",
            RequestOp::Status => "Status",
            RequestOp::Attest { .. } => "Attestation",
            RequestOp::Load { .. } => "Loaded",
            RequestOp::GetCredentials => "Credentials",
            RequestOp::AuditRead { .. } => "AuditRecords",
            RequestOp::AuditCheckpoint => "AuditCheckpointed",
            RequestOp::LogRead { .. } => "LogRecords",
        }
    }
}

/// One encrypted secret in a `Load`. The envelope is ciphertext, not a
/// secret; the enclave parses and decrypts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadEntry {
    /// The secret's key path, bound into its encryption context.
    pub name: String,
    /// The `ENC[v1:...]` text as it appears in the secrets file.
    pub envelope: String,
}

impl Request {
    /// A request at the current [`PROTOCOL_VERSION`].
    pub fn new(id: u64, op: RequestOp) -> Self {
        Request {
            id,
            v: PROTOCOL_VERSION,
            op,
            caller: None,
        }
    }

    /// The same request, made on behalf of `caller`.
    pub fn on_behalf_of(mut self, caller: Caller) -> Self {
        self.caller = Some(caller);
        self
    }

    /// Refuses requests from a peer speaking another protocol version.
    pub fn check_version(&self) -> Result<(), ProtocolError> {
        check_version(self.v)
    }
}

/// What can be read of any request frame before its operation: `id` and
/// `v`, with `op` skipped unread (no allocation, whatever it holds). A
/// server reads this first so that a request with a bad operation is still
/// answered with its id, and checks the version before decoding the rest.
///
/// It reads both forms the CBOR decoder accepts for a [`Request`]: a map,
/// and a packed array (`[id, v, op, caller]`, fields in declaration order),
/// so every request that decodes has a header that decodes too.
#[derive(Debug)]
pub struct RequestHeader {
    /// The request's id, if it has one.
    pub id: Option<u64>,
    /// The protocol version, if given.
    pub v: Option<u16>,
    op: Option<serde::de::IgnoredAny>,
}

/// [`RequestHeader`] as a map: the derived field-by-name decoding.
#[derive(Deserialize)]
struct HeaderMap {
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    v: Option<u16>,
    #[serde(default)]
    op: Option<serde::de::IgnoredAny>,
}

impl<'de> Deserialize<'de> for RequestHeader {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HeaderVisitor;
        impl<'de> serde::de::Visitor<'de> for HeaderVisitor {
            type Value = RequestHeader;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a request")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                let HeaderMap { id, v, op } =
                    HeaderMap::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(RequestHeader { id, v, op })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let id = seq.next_element::<u64>()?;
                let v = seq.next_element::<u16>()?;
                let op = seq.next_element::<serde::de::IgnoredAny>()?;
                // The caller and anything after it: skipped unread, as the
                // map form skips unknown keys.
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(RequestHeader { id, v, op })
            }
        }
        deserializer.deserialize_struct("RequestHeader", &["id", "v", "op"], HeaderVisitor)
    }
}

impl RequestHeader {
    /// Whether the frame carries an operation at all.
    pub fn has_op(&self) -> bool {
        self.op.is_some()
    }
}

/// A response to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The `id` of the request this answers (0 if the request could not be
    /// decoded far enough to know it).
    pub id: u64,
    /// Protocol version; see [`PROTOCOL_VERSION`].
    pub v: u16,
    /// The outcome.
    pub result: ResponseBody,
}

/// The outcome of a request: the success matching its operation, or an
/// error.
// `Status` is the large variant: a response lives for one exchange, and
// boxing it would change every reader of `ResponseBody::Status`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseBody {
    /// Answer to `Get`.
    Secret {
        /// The secret's key path.
        name: String,
        /// The plaintext value.
        value: SecretBytes,
    },
    /// Answer to `List`.
    Names {
        /// Key paths of all loaded secrets.
        names: Vec<String>,
    },
    /// Answer to `Status`.
    Status(StatusReport),
    /// Answer to `Attest`.
    Attestation {
        /// The COSE_Sign1 attestation document as produced by the NSM.
        #[serde(with = "serde_bytes")]
        document: Vec<u8>,
    },
    /// Answer to `Load`: the new set is in place.
    Loaded {
        /// Number of secrets now loaded.
        count: u64,
    },
    /// Answer to `GetCredentials`.
    Credentials(Credentials),
    /// Answer to `AuditRead`.
    AuditRecords(AuditBatch),
    /// Answer to `AuditCheckpoint`: the checkpoint record's sequence number.
    AuditCheckpointed {
        /// Its sequence number.
        seq: u64,
    },
    /// Answer to `LogRead`.
    LogRecords(LogBatch),
    /// The request failed. The message never contains secret material.
    Error {
        /// Machine-readable category.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

impl ResponseBody {
    /// The variant's name, for logs and errors (never its content).
    pub fn kind(&self) -> &'static str {
        match self {
            ResponseBody::Secret { .. } => "Secret",
            ResponseBody::Names { .. } => "Names",
            ResponseBody::Status(_) => "Status",
            ResponseBody::Attestation { .. } => "Attestation",
            ResponseBody::Loaded { .. } => "Loaded",
            ResponseBody::Credentials(_) => "Credentials",
            ResponseBody::AuditRecords(_) => "AuditRecords",
            ResponseBody::AuditCheckpointed { .. } => "AuditCheckpointed",
            ResponseBody::LogRecords(_) => "LogRecords",
            ResponseBody::Error { .. } => "Error",
        }
    }
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// No secret by that name.
    NotFound,
    /// The caller may not do this.
    Denied,
    /// No secrets loaded yet (or the enclave is still starting).
    NotReady,
    /// The request is malformed or uses another protocol version.
    BadRequest,
    /// A frame or value exceeds a size limit.
    TooLarge,
    /// A dependency (KMS, credentials service) is unreachable; retry later.
    Unavailable,
    /// A bug or unexpected failure on the server.
    Internal,
}

impl ErrorCode {
    /// The variant name, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "NotFound",
            ErrorCode::Denied => "Denied",
            ErrorCode::NotReady => "NotReady",
            ErrorCode::BadRequest => "BadRequest",
            ErrorCode::TooLarge => "TooLarge",
            ErrorCode::Unavailable => "Unavailable",
            ErrorCode::Internal => "Internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&FrameError> for ErrorCode {
    /// The code a server answers with when reading a request failed.
    fn from(err: &FrameError) -> Self {
        match err {
            FrameError::TooLarge { .. } | FrameError::OutgoingTooLarge { .. } => {
                ErrorCode::TooLarge
            }
            FrameError::Truncated { .. } | FrameError::Decode(_) => ErrorCode::BadRequest,
            FrameError::Encode(_) | FrameError::Io(_) => ErrorCode::Internal,
        }
    }
}

impl Response {
    /// A response at the current [`PROTOCOL_VERSION`].
    pub fn new(id: u64, result: ResponseBody) -> Self {
        Response {
            id,
            v: PROTOCOL_VERSION,
            result,
        }
    }

    /// An error response. `message` must not contain secret material.
    pub fn error(id: u64, code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(
            id,
            ResponseBody::Error {
                code,
                message: message.into(),
            },
        )
    }

    /// Refuses responses from a peer speaking another protocol version.
    pub fn check_version(&self) -> Result<(), ProtocolError> {
        check_version(self.v)
    }
}

/// Protocol-level errors (the frame decoded but its content is not
/// acceptable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The peer speaks a protocol version we do not.
    #[error("unsupported protocol version {got}; this build speaks version {expected}")]
    UnsupportedVersion {
        /// The version the peer sent.
        got: u16,
        /// [`PROTOCOL_VERSION`].
        expected: u16,
    },
}

impl ProtocolError {
    /// The code to answer with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::UnsupportedVersion { .. } => ErrorCode::BadRequest,
        }
    }
}

fn check_version(got: u16) -> Result<(), ProtocolError> {
    if got == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(ProtocolError::UnsupportedVersion {
            got,
            expected: PROTOCOL_VERSION,
        })
    }
}

/// Enclave health, answered to `Status`. New fields may be appended; old
/// readers ignore them and new readers see `None` or the default for fields
/// an old writer did not send.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StatusReport {
    /// Whether secrets are loaded and `Get` can succeed.
    pub ready: bool,
    /// Number of loaded secrets.
    #[serde(default)]
    pub secret_count: u64,
    /// Age of the current attestation document, if there is one; KMS
    /// rejects documents older than 5 minutes.
    #[serde(default)]
    pub document_age_ms: Option<u64>,
    /// Time since the enclave process started.
    #[serde(default)]
    pub uptime_ms: u64,
    /// Version of the enclave build.
    #[serde(default)]
    pub version: String,
    /// Size of the RSA recipient key, once generated.
    #[serde(default)]
    pub recipient_key_bits: Option<u32>,
    /// Completed background refreshes (key + document, or re-decrypts).
    #[serde(default)]
    pub refresh_count: u64,
    /// The last refresh or load failure, if any; never secret material.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Who the secret port serves: `privileged` (the default) or `any`
    /// (`--secret-peers any`, an opt-out worth seeing). `None` from an
    /// enclave too old to say.
    #[serde(default)]
    pub secret_peers: Option<String>,
    /// Time since the last successful load or re-decrypt, once there was
    /// one; after `--max-stale` of failures the enclave wipes its set.
    #[serde(default)]
    pub last_decrypt_age_ms: Option<u64>,
    /// The audit trail: records buffered, dropped for want of draining,
    /// gap records written. `None` from an enclave too old to say.
    #[serde(default)]
    pub audit: Option<AuditStatus>,
    /// When a `Load` last succeeded, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub last_good_load_unix_ms: Option<u64>,
    /// The `--max-stale` bound on `last_decrypt_age_ms` (0: none); `None`
    /// from an enclave too old to say.
    #[serde(default)]
    pub max_stale_ms: Option<u64>,
    /// The circuit breaker around KMS calls; `None` from an enclave too old
    /// to say or without KMS.
    #[serde(default)]
    pub breaker: Option<BreakerStatus>,
    /// What the enclave's image pins for KMS (its `--region` and
    /// `--kms-key-arn`); `None` from an enclave too old to say or without
    /// KMS. Boxed to keep [`ResponseBody`] small.
    #[serde(default)]
    pub kms_pins: Option<Box<KmsPins>>,
    /// KMS calls since start by operation and outcome (issue 16); `None`
    /// from an enclave too old to say or without KMS.
    #[serde(default)]
    pub kms: Option<KmsCallStats>,
    /// The in-enclave log ring the daemon relays (issue 16); `None` from
    /// an enclave too old to say or with the ring off.
    #[serde(default)]
    pub logs: Option<LogRingStatus>,
}

/// The outcomes a KMS call is counted under ([`KmsCallCount::outcome`]):
/// `ok`, KMS's own `__type`s, then failures before or around an answer.
/// A fixed set, so a peer cannot grow a metric's label values: anything
/// else is counted as `other`.
pub const KMS_CALL_OUTCOMES: &[&str] = &[
    "ok",
    "AccessDeniedException",
    "DisabledException",
    "KMSInvalidStateException",
    "NotFoundException",
    "InvalidCiphertextException",
    "IncorrectKeyException",
    "ValidationException",
    "InvalidRequestException",
    "ThrottlingException",
    "KMSInternalException",
    "DependencyTimeoutException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "ExpiredTokenException",
    "proxy_connect",
    "tls",
    "transport",
    "timeout",
    "credentials",
    "breaker_open",
    "other",
];

/// The KMS operations the enclave counts ([`KmsCallCount::operation`]).
pub const KMS_OPERATIONS: &[&str] = &["Decrypt"];

/// Most entries of [`KmsCallStats::calls`] a reader accepts.
pub const MAX_KMS_CALL_COUNTS: usize = 256;

/// KMS calls in [`StatusReport`], one entry per (operation, outcome) seen.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KmsCallStats {
    /// Counts since the enclave started (only non-zero ones are sent).
    #[serde(default, deserialize_with = "bounded_kms_calls")]
    pub calls: Vec<KmsCallCount>,
}

/// Deserializes KMS call counts, refusing more than [`MAX_KMS_CALL_COUNTS`].
fn bounded_kms_calls<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<KmsCallCount>, D::Error> {
    bounded_seq::<D, KmsCallCount>(deserializer, MAX_KMS_CALL_COUNTS, "KMS call counts")
}

/// Calls of one KMS operation that ended one way.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KmsCallCount {
    /// One of [`KMS_OPERATIONS`].
    pub operation: String,
    /// One of [`KMS_CALL_OUTCOMES`].
    pub outcome: String,
    /// How many.
    pub count: u64,
}

/// The enclave's log ring in [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LogRingStatus {
    /// Events waiting to be read.
    #[serde(default)]
    pub buffered: u64,
    /// Events dropped since start (the ring was full).
    #[serde(default)]
    pub dropped: u64,
    /// Sequence number of the newest event (0 before the first).
    #[serde(default)]
    pub last_seq: u64,
}

/// Most key ARNs a [`KmsPins`] reader accepts (the enclave pins at most 8).
pub const MAX_KMS_PINS: usize = 8;

/// Deserializes pinned key ARNs, refusing more than [`MAX_KMS_PINS`].
fn bounded_kms_pins<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    bounded_seq::<D, String>(deserializer, MAX_KMS_PINS, "pinned KMS keys")
}

/// What an enclave's image pins for KMS, in [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KmsPins {
    /// The AWS region KMS calls are sent to.
    #[serde(default)]
    pub region: String,
    /// The key ARNs `Decrypt` may use (at most [`MAX_KMS_PINS`]).
    #[serde(default, deserialize_with = "bounded_kms_pins")]
    pub key_arns: Vec<String>,
}

/// The KMS circuit breaker's state in [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BreakerStatus {
    /// `closed`, `open` or `half-open`.
    #[serde(default)]
    pub state: String,
    /// KMS service failures in a row.
    #[serde(default)]
    pub consecutive_failures: u64,
    /// While open: milliseconds until the next probe may go.
    #[serde(default)]
    pub next_probe_in_ms: Option<u64>,
    /// Times the breaker opened since the enclave started.
    #[serde(default)]
    pub opened: u64,
    /// The last KMS service failure the breaker counted (why it opened,
    /// while it is open); never secret material.
    #[serde(default)]
    pub last_failure: Option<String>,
}

/// The audit trail's state in [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AuditStatus {
    /// Sequence number of the newest record.
    #[serde(default)]
    pub last_seq: Option<u64>,
    /// Records waiting to be drained.
    #[serde(default)]
    pub buffered: u64,
    /// Records dropped since start because the buffer was full.
    #[serde(default)]
    pub dropped: u64,
    /// Gap records written since start.
    #[serde(default)]
    pub gaps: u64,
    /// Whether records are being dropped right now.
    #[serde(default)]
    pub dropping: bool,
}

/// Temporary AWS credentials from the credentials service (IMDSv2 on the
/// parent). Every field is secret, including the expiry, which says when a
/// stolen key would stop working.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// `AccessKeyId`.
    pub access_key_id: SecretString,
    /// `SecretAccessKey`.
    pub secret_access_key: SecretString,
    /// `Token`; absent for long-term credentials.
    #[serde(default)]
    pub session_token: Option<SecretString>,
    /// `Expiration` in Unix seconds; absent for long-term credentials.
    #[serde(default)]
    pub expires_at: Option<u64>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The expiry is a plain number, so it is hidden here by hand.
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key)
            .field("session_token", &self.session_token)
            .field("expires_at", &self.expires_at.map(|_| "[REDACTED]"))
            .finish()
    }
}

/// Secret bytes: wiped on drop, redacted in `Debug`, no `Display`.
/// Serialized as a CBOR byte string.
#[derive(Clone, Default)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Takes ownership of `bytes` without copying them.
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretBytes(Zeroizing::new(bytes))
    }

    /// The plaintext. Named so call sites that touch it stand out in review.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes (not secret).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self::new(bytes)
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[REDACTED {} bytes]", self.0.len())
    }
}

impl PartialEq for SecretBytes {
    /// Compares without an early exit on the first differing byte.
    fn eq(&self, other: &Self) -> bool {
        constant_time_eq(&self.0, &other.0)
    }
}

impl Eq for SecretBytes {}

impl Serialize for SecretBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for SecretBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // ByteBuf copies straight into an exactly-sized Vec we then own.
        let buf = serde_bytes::ByteBuf::deserialize(deserializer)?;
        Ok(Self::new(buf.into_vec()))
    }
}

/// Secret text: wiped on drop, redacted in `Debug`, no `Display`.
#[derive(Clone, Default)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    /// Takes ownership of `text` without copying it.
    pub fn new(text: String) -> Self {
        SecretString(Zeroizing::new(text))
    }

    /// The plaintext. Named so call sites that touch it stand out in review.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Length in bytes (not secret).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the text is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for SecretString {
    fn from(text: String) -> Self {
        Self::new(text)
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[REDACTED {} bytes]", self.0.len())
    }
}

impl PartialEq for SecretString {
    /// Compares without an early exit on the first differing byte.
    fn eq(&self, other: &Self) -> bool {
        constant_time_eq(self.0.as_bytes(), other.0.as_bytes())
    }
}

impl Eq for SecretString {}

impl Serialize for SecretString {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SecretString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Self::new(String::deserialize(deserializer)?))
    }
}

/// Equality whose running time depends only on the lengths (`subtle`).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    bool::from(subtle::ConstantTimeEq::ct_eq(a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::decode_body;

    /// Found by the `frame_decode` fuzz target's property: `[1, 1, "List",
    /// null]` (a request packed as an array, caller included) decoded as a
    /// `Request` while its header was refused as trailing data, so the
    /// server refused a request it could read.
    #[test]
    fn packed_request_has_a_header() {
        let body = [0x84, 0x01, 0x01, 0x64, b'L', b'i', b's', b't', 0xf6];
        let request: Request = decode_body(&body).unwrap();
        let header: RequestHeader = decode_body(&body).unwrap();
        assert_eq!(header.id, Some(request.id));
        assert_eq!(header.v, Some(request.v));
        assert!(header.has_op());
        // Shorter and longer arrays: the header reads what is there.
        let header: RequestHeader = decode_body(&[0x82, 0x07, 0x01]).unwrap();
        assert_eq!(
            (header.id, header.v, header.has_op()),
            (Some(7), Some(1), false)
        );
        let header: RequestHeader = decode_body(&[
            0x85, 0x07, 0x01, 0x66, b'S', b't', b'a', b't', b'u', b's', 0xf6, 0x00,
        ])
        .unwrap();
        assert_eq!((header.id, header.has_op()), (Some(7), true));
    }

    #[test]
    fn map_header_reads_id_and_version_only() {
        let body = crate::frame::encode_frame(&Request::new(9, RequestOp::Status), 1024).unwrap();
        let header: RequestHeader = decode_body(&body[4..]).unwrap();
        assert_eq!(
            (header.id, header.v, header.has_op()),
            (Some(9), Some(1), true)
        );
        let header: RequestHeader = decode_body(&[0xa0]).unwrap();
        assert_eq!((header.id, header.v, header.has_op()), (None, None, false));
    }
}
