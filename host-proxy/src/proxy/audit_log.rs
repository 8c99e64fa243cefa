//! The audit drain: polls the enclave's audit trail over the load port
//! (`AuditRead`) and appends each record as one JSON line
//! ([`LogLine::Record`]) to the audit log, rotated by size.
//!
//! - **Nothing lost, nothing twice.** A batch is written and `fsync`ed
//!   before the next `AuditRead` acknowledges it (names its last record), so
//!   a crash between reading and writing makes the enclave send the same
//!   records again; after a restart the cursor is the log's last line.
//! - **Checked on arrival.** Each record is decoded from its canonical bytes
//!   and its chain hash recomputed. A hash that does not match is logged
//!   loudly and the record is still written as received, with the hash the
//!   enclave sent: the log holds what the enclave said, and
//!   `keystore-host audit verify` names that sequence number. Bytes that do
//!   not decode cannot be written as a record; they are logged and skipped
//!   (the verifier then sees the chain break there).
//! - **Rotation keeps the chain.** Past `max_bytes` the file is renamed to
//!   `PATH.1` (older ones shift up to `PATH.keep`), and the new file starts
//!   with `{"continues":{"seq":…,"hash":…}}`, the previous file's last
//!   record.
//! - A restarted enclave starts a new run at genesis: its records are
//!   simply appended.
//!
//! Never a reason to stop the daemon: every failure is logged and retried
//! at the next poll.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use keystore_shared::audit::chain::next_hash;
use keystore_shared::audit::line::MAX_LINE_LEN;
use keystore_shared::audit::{AuditEvent, AuditRecord, ChainHash, GENESIS_HASH, LogLine};
use keystore_shared::endpoint::Endpoint;
use keystore_shared::protocol::{
    AuditBatch, AuditCursor, MAX_AUDIT_BATCH, RequestOp, ResponseBody,
};
use keystore_shared::{Client, ClientConfig, ClientError};

/// Where the log is written by default.
pub const DEFAULT_AUDIT_LOG: &str = "/var/log/nitro-keystore/audit.jsonl";
/// Default size at which the log is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Default number of rotated files kept.
pub const DEFAULT_KEEP: usize = 10;
/// Default time between two polls.
pub const DEFAULT_POLL: Duration = Duration::from_secs(1);
/// The `tracing` target of the journal copy (`--audit-journald`).
pub const JOURNAL_TARGET: &str = "keystore_audit";
/// Smallest rotation size accepted: a few checkpoint lines.
pub const MIN_MAX_BYTES: u64 = 64 * 1024;

/// Settings of the drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditLogConfig {
    /// The enclave's load port.
    pub enclave: Endpoint,
    /// The current log file.
    pub path: PathBuf,
    /// Time between two polls when nothing more is waiting.
    pub poll: Duration,
    /// Size past which the file is rotated.
    pub max_bytes: u64,
    /// Rotated files kept (`PATH.1` … `PATH.keep`).
    pub keep: usize,
    /// Also write each record line to the journal (through `tracing`, with
    /// target [`JOURNAL_TARGET`]).
    pub journald: bool,
    /// Bound on connecting and on one `AuditRead`.
    pub timeout: Duration,
}

impl AuditLogConfig {
    /// Defaults for everything but the enclave's load port.
    pub fn new(enclave: Endpoint) -> Self {
        AuditLogConfig {
            enclave,
            path: PathBuf::from(DEFAULT_AUDIT_LOG),
            poll: DEFAULT_POLL,
            max_bytes: DEFAULT_MAX_BYTES,
            keep: DEFAULT_KEEP,
            journald: false,
            timeout: Duration::from_secs(30),
        }
    }

    /// Refuses settings under which the log could not rotate sensibly.
    pub fn validate(&self) -> Result<(), AuditLogError> {
        if self.max_bytes < MIN_MAX_BYTES {
            return Err(AuditLogError::Config(
                "--audit-max-bytes must be at least 65536",
            ));
        }
        if self.keep == 0 {
            return Err(AuditLogError::Config("--audit-keep must be at least 1"));
        }
        if self.poll.is_zero() || self.timeout.is_zero() {
            return Err(AuditLogError::Config("--audit-poll must be > 0"));
        }
        Ok(())
    }
}

/// Why draining failed this time (retried at the next poll).
#[derive(Debug, thiserror::Error)]
pub enum AuditLogError {
    /// A setting is unusable.
    #[error("invalid audit log settings: {0}")]
    Config(&'static str),
    /// The log file could not be read, written or rotated.
    #[error("audit log {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The enclave could not be asked.
    #[error("reading the enclave's audit trail: {0}")]
    Enclave(#[from] ClientError),
    /// The enclave answered something else than records.
    #[error("the enclave answered AuditRead with {0}")]
    Unexpected(&'static str),
    /// The blocking writer task failed (a bug).
    #[error("audit log writer task failed: {0}")]
    Task(String),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> AuditLogError + '_ {
    move |source| AuditLogError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What the drain has seen go wrong since it started (for tests and logs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainStats {
    /// Records written.
    pub written: u64,
    /// Records whose hash did not recompute (written as received).
    pub hash_mismatches: u64,
    /// Entries that did not decode (skipped).
    pub undecodable: u64,
    /// Records that did not follow the one before (logged).
    pub discontinuities: u64,
}

/// The log file being appended to.
#[derive(Debug)]
pub struct AuditLogFile {
    path: PathBuf,
    file: File,
    size: u64,
    /// The last line's record (or continuation): where the chain stands.
    last: Option<(u64, ChainHash)>,
    /// Whether the file holds a record line (a file of only its
    /// continuation line is never rotated).
    has_records: bool,
    max_bytes: u64,
    keep: usize,
    journald: bool,
    stats: DrainStats,
}

impl AuditLogFile {
    /// Opens (creating it and its directory if needed) the log, cuts a
    /// torn last line left by a crash, and resumes after its last line.
    /// An empty or missing file continues the newest rotated one.
    pub fn open(config: &AuditLogConfig) -> Result<AuditLogFile, AuditLogError> {
        let path = config.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            std::fs::create_dir_all(dir).map_err(io_error(dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
                .map_err(io_error(dir))?;
        }
        let mut file = open_append(&path)?;
        let mut last = None;
        let mut has_records = false;
        match last_line(&mut file, &path)? {
            Some(text) => match LogLine::parse(&text) {
                Ok(LogLine::Record { record, hash }) => {
                    last = Some((record.seq, hash));
                    has_records = true;
                }
                Ok(LogLine::Continues { seq, hash }) => last = Some((seq, hash)),
                Err(err) => {
                    // Not ours to repair: set it aside and start afresh.
                    tracing::error!(
                        path = %path.display(),
                        error = %err,
                        "the audit log's last line is not a log line; rotating it away"
                    );
                    has_records = true;
                }
            },
            None => {
                let previous = rotated(&path, 1);
                if let Ok(mut older) = File::open(&previous)
                    && let Some(text) = last_line_read_only(&mut older, &previous)?
                    && let Ok(line) = LogLine::parse(&text)
                {
                    let (seq, hash) = match line {
                        LogLine::Record { record, hash } => (record.seq, hash),
                        LogLine::Continues { seq, hash } => (seq, hash),
                    };
                    last = Some((seq, hash));
                    write_line(
                        &mut file,
                        &path,
                        &LogLine::Continues { seq, hash }.to_json(),
                    )?;
                    file.sync_all().map_err(io_error(&path))?;
                }
            }
        }
        let size = file.metadata().map_err(io_error(&path))?.len();
        let mut log = AuditLogFile {
            path,
            file,
            size,
            last,
            has_records,
            max_bytes: config.max_bytes,
            keep: config.keep,
            journald: config.journald,
            stats: DrainStats::default(),
        };
        if last.is_none() && has_records {
            log.rotate()?;
        }
        Ok(log)
    }

    /// Where the chain stands: what the next `AuditRead` acknowledges.
    pub fn cursor(&self) -> Option<AuditCursor> {
        self.last.map(|(seq, hash)| AuditCursor {
            seq,
            hash: hash.to_vec(),
        })
    }

    /// What went wrong so far.
    pub fn stats(&self) -> DrainStats {
        self.stats
    }

    /// Checks, writes and `fsync`s a batch; returns how many records were
    /// written.
    pub fn append(&mut self, batch: &AuditBatch) -> Result<usize, AuditLogError> {
        let mut written = 0;
        // The batch's lines go out in one write, not a syscall per record
        // (per request served); a crash mid-write leaves a torn line that
        // reopening cuts, as before.
        let mut pending = Vec::new();
        for entry in &batch.entries {
            let Some((record, hash)) = self.check(&entry.record, &entry.hash) else {
                continue;
            };
            let seq = record.seq;
            let line = LogLine::Record {
                record: Box::new(record),
                hash,
            }
            .to_json();
            let len = u64::try_from(line.len())
                .unwrap_or(u64::MAX)
                .saturating_add(1);
            if self.has_records && self.size.saturating_add(len) > self.max_bytes {
                self.write_pending(&mut pending)?;
                self.rotate()?;
            }
            pending.extend_from_slice(line.as_bytes());
            pending.push(b'\n');
            if self.journald {
                tracing::info!(target: JOURNAL_TARGET, "{line}");
            }
            self.size = self.size.saturating_add(len);
            self.has_records = true;
            self.last = Some((seq, hash));
            written += 1;
        }
        self.write_pending(&mut pending)?;
        self.file.sync_data().map_err(io_error(&self.path))?;
        self.stats.written = self.stats.written.saturating_add(written as u64);
        Ok(written)
    }

    fn write_pending(&mut self, pending: &mut Vec<u8>) -> Result<(), AuditLogError> {
        self.file.write_all(pending).map_err(io_error(&self.path))?;
        pending.clear();
        Ok(())
    }

    /// Decodes one entry and recomputes its hash from where the chain
    /// stands. `None`: the bytes cannot be written as a record.
    fn check(&mut self, bytes: &[u8], sent: &[u8]) -> Option<(AuditRecord, ChainHash)> {
        let record = match AuditRecord::decode(bytes) {
            Ok(record) => record,
            Err(err) => {
                self.stats.undecodable += 1;
                tracing::error!(error = %err, "AUDIT: the enclave sent a record that does not decode; skipped");
                return None;
            }
        };
        let Ok(sent) = ChainHash::try_from(sent) else {
            self.stats.undecodable += 1;
            tracing::error!(
                seq = record.seq,
                "AUDIT: the enclave sent a hash that is not 32 bytes; skipped"
            );
            return None;
        };
        let previous = match (&record.event, self.last) {
            (AuditEvent::Start { .. }, _) => Some(GENESIS_HASH),
            (
                AuditEvent::Gap {
                    first_seq,
                    resume_hash,
                    ..
                },
                last,
            ) => {
                if last.is_some_and(|(seq, _)| seq.checked_add(1) != Some(*first_seq)) {
                    self.discontinuity(&record);
                }
                Some(*resume_hash)
            }
            (_, Some((seq, hash))) if seq.checked_add(1) == Some(record.seq) => Some(hash),
            (_, Some(_)) => {
                self.discontinuity(&record);
                None
            }
            // A fresh log starting mid-chain: nothing to check against.
            (_, None) => None,
        };
        if let Some(previous) = previous {
            match next_hash(&previous, &record) {
                Ok(hash) if hash == sent => {}
                _ => {
                    self.stats.hash_mismatches += 1;
                    tracing::error!(
                        seq = record.seq,
                        "AUDIT: record hash does not recompute; written as received so \
                         `keystore-host audit verify` reports it"
                    );
                }
            }
        }
        Some((record, sent))
    }

    fn discontinuity(&mut self, record: &AuditRecord) {
        self.stats.discontinuities += 1;
        tracing::warn!(
            seq = record.seq,
            after = ?self.last.map(|(seq, _)| seq),
            "AUDIT: record does not follow the log's last one (records missing from this log)"
        );
    }

    /// `PATH` → `PATH.1` (older ones shift up, `PATH.keep` is dropped);
    /// the new file starts with the continuation line.
    fn rotate(&mut self) -> Result<(), AuditLogError> {
        self.file.sync_all().map_err(io_error(&self.path))?;
        for k in (1..self.keep).rev() {
            let from = rotated(&self.path, k);
            if from.exists() {
                let to = rotated(&self.path, k + 1);
                std::fs::rename(&from, &to).map_err(io_error(&from))?;
            }
        }
        let first = rotated(&self.path, 1);
        std::fs::rename(&self.path, &first).map_err(io_error(&self.path))?;
        self.file = open_append(&self.path)?;
        self.size = 0;
        self.has_records = false;
        if let Some((seq, hash)) = self.last {
            let line = LogLine::Continues { seq, hash }.to_json();
            write_line(&mut self.file, &self.path, &line)?;
            self.size = u64::try_from(line.len() + 1).unwrap_or(u64::MAX);
        }
        self.file.sync_all().map_err(io_error(&self.path))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The renames are durable once the directory is.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_error(dir))?;
        }
        tracing::info!(path = %self.path.display(), "audit log rotated");
        Ok(())
    }
}

/// `PATH.k`.
pub fn rotated(path: &Path, k: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{k}"));
    PathBuf::from(name)
}

fn open_append(path: &Path) -> Result<File, AuditLogError> {
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
        .map_err(io_error(path))?;
    // The umask (the unit's is 0077) must not make it owner-only.
    file.set_permissions(std::fs::Permissions::from_mode(0o640))
        .map_err(io_error(path))?;
    Ok(file)
}

fn write_line(file: &mut File, path: &Path, line: &str) -> Result<(), AuditLogError> {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    file.write_all(&bytes).map_err(io_error(path))
}

/// The last complete line of an appendable log, after cutting a torn one
/// (a crash mid-write: those records were not acknowledged and come again).
fn last_line(file: &mut File, path: &Path) -> Result<Option<String>, AuditLogError> {
    let (tail, start) = read_tail(file, path)?;
    let Some(end) = tail.iter().rposition(|&b| b == b'\n') else {
        if start > 0 {
            // A "line" longer than any we write: not ours to cut.
            return Ok(Some(String::new()));
        }
        if !tail.is_empty() {
            tracing::warn!(path = %path.display(), "cutting a torn last line from the audit log");
            file.set_len(0).map_err(io_error(path))?;
        }
        return Ok(None);
    };
    if end + 1 < tail.len() {
        tracing::warn!(path = %path.display(), "cutting a torn last line from the audit log");
        file.set_len(start + end as u64 + 1)
            .map_err(io_error(path))?;
    }
    Ok(complete_last(&tail[..end]))
}

/// The last complete line of a file not written to.
fn last_line_read_only(file: &mut File, path: &Path) -> Result<Option<String>, AuditLogError> {
    let (tail, _) = read_tail(file, path)?;
    let Some(end) = tail.iter().rposition(|&b| b == b'\n') else {
        return Ok(None);
    };
    Ok(complete_last(&tail[..end]))
}

/// The last line of `text` (which ended with a newline just after it).
fn complete_last(text: &[u8]) -> Option<String> {
    let start = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    String::from_utf8(text[start..].to_vec()).ok()
}

/// The last `MAX_LINE_LEN + 2` bytes (room for a whole longest line and
/// the newline before it) and where they start.
fn read_tail(file: &mut File, path: &Path) -> Result<(Vec<u8>, u64), AuditLogError> {
    let size = file.metadata().map_err(io_error(path))?.len();
    let want = u64::try_from(MAX_LINE_LEN + 2).unwrap_or(u64::MAX);
    let start = size.saturating_sub(want);
    file.seek(SeekFrom::Start(start)).map_err(io_error(path))?;
    let mut tail = Vec::new();
    file.take(want)
        .read_to_end(&mut tail)
        .map_err(io_error(path))?;
    Ok((tail, start))
}

/// Polls the enclave and appends to the log until stopped.
#[derive(Debug)]
pub struct AuditDrain {
    config: AuditLogConfig,
    log: Option<AuditLogFile>,
    client: Option<Client>,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl AuditDrain {
    /// A drain with `config` (the log is opened at the first poll, and
    /// again after any write failure).
    pub fn new(config: AuditLogConfig) -> Result<AuditDrain, AuditLogError> {
        config.validate()?;
        Ok(AuditDrain {
            config,
            log: None,
            client: None,
            metrics: None,
        })
    }

    /// Counts each poll (outcome, records written, time of the last
    /// success) into `metrics`.
    pub fn set_metrics(&mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) {
        self.metrics = Some(metrics);
    }

    /// What went wrong so far (zero before the log is opened).
    pub fn stats(&self) -> DrainStats {
        self.log
            .as_ref()
            .map(AuditLogFile::stats)
            .unwrap_or_default()
    }

    /// Drains until the enclave has nothing more; returns the records
    /// written. The last batch is acknowledged by the next call.
    pub async fn drain_once(&mut self) -> Result<usize, AuditLogError> {
        let mut total = 0;
        loop {
            let mut log = match self.log.take() {
                Some(log) => log,
                None => {
                    let config = self.config.clone();
                    run_blocking(move || AuditLogFile::open(&config)).await?
                }
            };
            let batch = match self.read(log.cursor()).await {
                Ok(batch) => batch,
                Err(err) => {
                    self.log = Some(log);
                    return Err(err);
                }
            };
            if batch.entries.is_empty() {
                self.log = Some(log);
                return Ok(total);
            }
            let more = batch.more;
            // On failure the file is reopened (and a torn line cut) next time.
            let (log, written) = run_blocking(move || {
                let written = log.append(&batch)?;
                Ok((log, written))
            })
            .await?;
            self.log = Some(log);
            total += written;
            if !more {
                return Ok(total);
            }
        }
    }

    async fn read(&mut self, after: Option<AuditCursor>) -> Result<AuditBatch, AuditLogError> {
        let mut client = match self.client.take() {
            Some(client) => client,
            None => {
                Client::connect_with(
                    &self.config.enclave,
                    ClientConfig {
                        connect_timeout: self.config.timeout,
                        request_timeout: self.config.timeout,
                        // The load port serves privileged peers only.
                        privileged: true,
                        ..ClientConfig::default()
                    },
                )
                .await?
            }
        };
        let max = u32::try_from(MAX_AUDIT_BATCH).unwrap_or(u32::MAX);
        match client.call(RequestOp::AuditRead { after, max }).await? {
            ResponseBody::AuditRecords(batch) => {
                self.client = Some(client);
                Ok(batch)
            }
            other => Err(AuditLogError::Unexpected(other.kind())),
        }
    }

    /// Drains every poll interval until `stop` completes.
    pub async fn run(mut self, stop: impl std::future::Future) {
        tracing::info!(
            path = %self.config.path.display(),
            enclave = %self.config.enclave,
            "audit drain started"
        );
        tokio::pin!(stop);
        let mut outage = super::outage::Outage::new("audit drain");
        loop {
            let drained = self.drain_once().await;
            if let Some(metrics) = &self.metrics {
                metrics.audit_drain(drained.as_ref().ok().copied());
            }
            match drained {
                Ok(written) => {
                    outage.ok();
                    if written > 0 {
                        tracing::debug!(written, "audit records written");
                    }
                }
                Err(err) => {
                    outage.failed(&err);
                    self.client = None;
                }
            }
            tokio::select! {
                _ = &mut stop => return,
                () = tokio::time::sleep(self.config.poll) => {}
            }
        }
    }
}

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AuditLogError> + Send + 'static,
) -> Result<T, AuditLogError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AuditLogError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use keystore_shared::audit::{AuditOp, Outcome, RunId};
    use keystore_shared::protocol::AuditEntry;

    fn config(dir: &Path) -> AuditLogConfig {
        AuditLogConfig {
            path: dir.join("audit.jsonl"),
            max_bytes: MIN_MAX_BYTES,
            keep: 2,
            ..AuditLogConfig::new(Endpoint::unix(dir.join("none.sock")))
        }
    }

    /// A run's records as the enclave would send them.
    fn run(first: u64, count: u64, start: bool) -> (AuditBatch, ChainHash) {
        let mut hash = GENESIS_HASH;
        let mut entries = Vec::new();
        for seq in 0..first + count {
            let event = if seq == 0 && start {
                AuditEvent::Start {
                    run: RunId([1; 16]),
                }
            } else {
                AuditEvent::Request {
                    op: AuditOp::Get,
                    names: vec!["db/password".into()],
                    count: None,
                    caller: None,
                    peer: "vsock:3:1000".into(),
                    outcome: Outcome::Ok,
                }
            };
            let record = AuditRecord {
                seq,
                time_ms: 1,
                event,
            };
            hash = next_hash(&hash, &record).unwrap();
            if seq >= first {
                entries.push(AuditEntry {
                    record: record.canonical_bytes().unwrap(),
                    hash: hash.to_vec(),
                });
            }
        }
        (
            AuditBatch {
                entries,
                more: false,
            },
            hash,
        )
    }

    #[test]
    fn a_torn_last_line_is_cut_and_the_cursor_resumes_at_the_last_whole_one() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let (batch, last_hash) = run(0, 5, true);
        let mut log = AuditLogFile::open(&config).unwrap();
        assert_eq!(log.append(&batch).unwrap(), 5);
        assert_eq!(log.cursor().unwrap().seq, 4);
        drop(log);
        let mode = std::fs::metadata(&config.path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        let mut file = OpenOptions::new().append(true).open(&config.path).unwrap();
        file.write_all(b"{\"seq\":5,\"time").unwrap();
        drop(file);
        let log = AuditLogFile::open(&config).unwrap();
        let cursor = log.cursor().unwrap();
        assert_eq!(
            (cursor.seq, cursor.hash.as_slice()),
            (4, last_hash.as_slice())
        );
        let text = std::fs::read_to_string(&config.path).unwrap();
        assert!(text.ends_with("}\n") && text.lines().count() == 5, "{text}");
    }

    #[test]
    fn a_bad_hash_is_counted_and_written_as_received() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLogFile::open(&config(dir.path())).unwrap();
        let (mut batch, _) = run(0, 3, true);
        batch.entries[2].hash = vec![0; 32];
        batch.entries.push(AuditEntry {
            record: vec![9, 9],
            hash: vec![0; 32],
        });
        assert_eq!(log.append(&batch).unwrap(), 3);
        let stats = log.stats();
        assert_eq!((stats.hash_mismatches, stats.undecodable), (1, 1));
        assert_eq!(log.cursor().unwrap().hash, vec![0; 32]);
    }
}
