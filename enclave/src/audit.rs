//! The audit trail inside the enclave (DESIGN §3 "Audit").
//!
//! Every `Get`, `List`, `Load` and `Attest`, and every refused request
//! (a refused peer, an undecodable frame, a refused `Status` or audit
//! operation) becomes one [`AuditRecord`], chained by
//! `hash = SHA-256(previous hash ‖ canonical record)` and kept in a bounded
//! buffer until the host daemon drains it over the load port
//! ([`AuditTrail::read`]). Recording is on the request path, so it costs one
//! lock, one SHA-256 over a few hundred bytes and the record's own
//! allocation: no I/O. Writing the log is the daemon's job.
//!
//! A run starts with a [`AuditEvent::Start`] naming a random [`RunId`],
//! followed at once by an attested checkpoint; more checkpoints follow every
//! [`AuditConfig::checkpoint_interval`] and on demand. A checkpoint is an NSM
//! document whose `user_data` is a [`CheckpointClaim`] over the record just
//! before it, appended as a record itself.
//!
//! When the buffer is full (nobody drains it), new records are still
//! chained — so sequence numbers and hashes go on — but not kept. Once a
//! drain frees space, a [`AuditEvent::Gap`] names the dropped range and the
//! hash after its last record, so a verifier can tell a gap the enclave
//! admits from records the host removed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keystore_nsm::{AttestationRequest, Nsm, NsmError};
use keystore_shared::Caller;
use keystore_shared::audit::record::{MAX_PEER_LEN, MAX_RECORD_NAMES};
use keystore_shared::audit::{
    AuditEvent, AuditOp, AuditRecord, ChainHash, ChainState, CheckpointClaim, Outcome, RunId,
};
use keystore_shared::name::MAX_NAME_LEN;
use keystore_shared::protocol::{
    AuditBatch, AuditCursor, AuditEntry, AuditStatus, ErrorCode, MAX_AUDIT_BATCH,
    MAX_AUDIT_BATCH_BYTES,
};
use rand::TryRng;
use sha2::{Digest, Sha256};

/// Default number of records the buffer keeps (`--audit-buffer`).
pub const DEFAULT_BUFFER_RECORDS: usize = 100_000;
/// Default bound on the bytes of buffered records (`--audit-buffer-bytes`).
pub const DEFAULT_BUFFER_BYTES: usize = 16 * 1024 * 1024;
/// Default time between two attested checkpoints.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(300);
/// Smallest byte bound accepted: room for a few checkpoints.
pub const MIN_BUFFER_BYTES: usize = 64 * 1024;

/// How many times a checkpoint is attested without holding the chain lock
/// before it is made under it (requests kept landing in between).
const OPTIMISTIC_CHECKPOINT_TRIES: usize = 3;

/// Settings of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// Records kept at most until drained.
    pub buffer_records: usize,
    /// Bytes of canonical records kept at most until drained.
    pub buffer_bytes: usize,
    /// Time between two attested checkpoints.
    pub checkpoint_interval: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            buffer_records: DEFAULT_BUFFER_RECORDS,
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
        }
    }
}

impl AuditConfig {
    /// Refuses settings under which the trail could keep nothing or never
    /// checkpoint.
    pub fn validate(&self) -> Result<(), AuditError> {
        if self.buffer_records < 2 {
            return Err(AuditError::Config(
                "the audit buffer must hold at least 2 records",
            ));
        }
        if self.buffer_bytes < MIN_BUFFER_BYTES {
            return Err(AuditError::Config(
                "the audit buffer must hold at least 64 KiB",
            ));
        }
        if self.checkpoint_interval.is_zero() {
            return Err(AuditError::Config(
                "the audit checkpoint interval must be > 0",
            ));
        }
        Ok(())
    }
}

/// Why the audit trail could not do something.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A setting is unusable.
    #[error("invalid audit settings: {0}")]
    Config(&'static str),
    /// The NSM refused or failed the checkpoint's attestation.
    #[error("audit checkpoint attestation failed: {0}")]
    Nsm(#[from] NsmError),
    /// The attestation task did not finish (a bug or shutdown).
    #[error("audit checkpoint task failed: {0}")]
    Task(String),
    /// A cursor whose hash is not 32 bytes.
    #[error("an audit cursor's hash must be 32 bytes, not {0}")]
    Cursor(usize),
}

/// One buffered record, as the daemon receives it.
struct Buffered {
    seq: u64,
    bytes: Vec<u8>,
    hash: ChainHash,
}

/// Records dropped since the buffer filled, not yet named by a gap record.
#[derive(Clone, Copy)]
struct Dropping {
    first_seq: u64,
    count: u64,
}

struct State {
    chain: ChainState,
    buffer: VecDeque<Buffered>,
    bytes: usize,
    dropping: Option<Dropping>,
    dropped_total: u64,
    gaps: u64,
    /// The last record the daemon acknowledged (already out of the buffer).
    acked: Option<(u64, ChainHash)>,
}

/// The enclave's audit trail; see the module docs. Shared behind an `Arc`.
pub struct AuditTrail {
    state: Mutex<State>,
    run: RunId,
    nsm: Arc<dyn Nsm>,
    config: AuditConfig,
    /// One checkpoint at a time, so two never race for the same record.
    checkpointing: tokio::sync::Mutex<()>,
    /// Set only by [`AuditTrail::skip_requests_for_benchmark`].
    #[cfg(feature = "mock")]
    skip_requests: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for AuditTrail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditTrail")
            .field("run", &self.run)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl AuditTrail {
    /// A new run: a random [`RunId`] (from the NSM, else the OS) and its
    /// `Start` record. The caller makes the first checkpoint
    /// ([`AuditTrail::checkpoint`]) at once.
    pub fn new(nsm: Arc<dyn Nsm>, config: AuditConfig) -> Result<AuditTrail, AuditError> {
        config.validate()?;
        let mut run = [0u8; 16];
        if let Err(err) = nsm.fill_random(&mut run) {
            tracing::warn!(error = %err, "NSM randomness failed; the audit run id comes from the OS");
            rand::rngs::SysRng
                .try_fill_bytes(&mut run)
                .map_err(|e| AuditError::Nsm(NsmError::Internal(format!("OS RNG failed: {e}"))))?;
        }
        let trail = AuditTrail {
            state: Mutex::new(State {
                chain: ChainState::default(),
                buffer: VecDeque::new(),
                bytes: 0,
                dropping: None,
                dropped_total: 0,
                gaps: 0,
                acked: None,
            }),
            run: RunId(run),
            nsm,
            config,
            #[cfg(feature = "mock")]
            skip_requests: std::sync::atomic::AtomicBool::new(false),
            checkpointing: tokio::sync::Mutex::new(()),
        };
        trail.append(AuditEvent::Start { run: trail.run });
        tracing::info!(run = %hex::encode(run), "audit trail started");
        Ok(trail)
    }

    /// This run's id.
    pub fn run(&self) -> RunId {
        self.run
    }

    /// The settings in force.
    pub fn config(&self) -> &AuditConfig {
        &self.config
    }

    /// Records one request. `peer` is the kernel's view of the connection
    /// (cut to [`MAX_PEER_LEN`]); names longer than a valid name are cut,
    /// and beyond [`MAX_RECORD_NAMES`] dropped, so hostile input always
    /// makes a record.
    pub fn request(
        &self,
        op: AuditOp,
        names: Vec<String>,
        count: Option<u64>,
        caller: Option<Caller>,
        peer: &str,
        outcome: Outcome,
    ) {
        #[cfg(feature = "mock")]
        if self
            .skip_requests
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let mut names = names;
        names.truncate(MAX_RECORD_NAMES);
        for name in &mut names {
            cut(name, MAX_NAME_LEN);
        }
        let mut peer = peer.to_owned();
        cut(&mut peer, MAX_PEER_LEN);
        self.append(AuditEvent::Request {
            op,
            names,
            count,
            caller,
            peer,
            outcome,
        });
    }

    /// Stops recording requests (start, checkpoints and gaps still are), so
    /// `scripts/bench.sh` can measure what the trail costs a `Get` against
    /// the same binary. Only in builds with feature `mock` (the mock NSM),
    /// which never run in a real enclave; the production build has no way
    /// to turn the trail off.
    #[cfg(feature = "mock")]
    pub fn skip_requests_for_benchmark(&self) {
        self.skip_requests
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Appends `event` as the next record and returns its sequence number.
    fn append(&self, event: AuditEvent) -> u64 {
        let mut state = self.lock();
        self.append_locked(&mut state, event)
    }

    fn append_locked(&self, state: &mut State, event: AuditEvent) -> u64 {
        let seq = state.chain.next_seq();
        let record = AuditRecord {
            seq,
            time_ms: now_ms(),
            event,
        };
        let bytes = match record.canonical_bytes() {
            Ok(bytes) => bytes,
            Err(err) => {
                // Only a caller field over its bound can get here (names and
                // peer were cut): keep the record, without the caller.
                tracing::warn!(error = %err, "audit record over a bound; recorded without its caller");
                match stripped(record).canonical_bytes() {
                    Ok(bytes) => bytes,
                    Err(err) => {
                        tracing::error!(error = %err, "audit record cannot be encoded; not recorded");
                        return seq;
                    }
                }
            }
        };
        let hash = chain_hash(&state.chain.hash, &bytes);
        state.chain.seq = Some(seq);
        state.chain.hash = hash;
        if state.dropping.is_none() && self.fits(state, bytes.len()) {
            state.bytes += bytes.len();
            state.buffer.push_back(Buffered { seq, bytes, hash });
        } else {
            state.dropped_total = state.dropped_total.saturating_add(1);
            match &mut state.dropping {
                Some(dropping) => dropping.count = dropping.count.saturating_add(1),
                None => {
                    tracing::warn!(
                        seq,
                        "audit buffer full (is the host draining it?): records are dropped \
                         until it is drained; a gap record will name them"
                    );
                    state.dropping = Some(Dropping {
                        first_seq: seq,
                        count: 1,
                    });
                }
            }
        }
        seq
    }

    fn fits(&self, state: &State, len: usize) -> bool {
        state.buffer.len() < self.config.buffer_records
            && state.bytes.saturating_add(len) <= self.config.buffer_bytes
    }

    /// Writes the gap record once there is room for it.
    fn close_gap(&self, state: &mut State) {
        let Some(dropping) = state.dropping else {
            return;
        };
        // A gap record is small; leave room for it and one more record.
        if state.buffer.len() + 2 > self.config.buffer_records
            || state.bytes.saturating_add(1024) > self.config.buffer_bytes
        {
            return;
        }
        state.dropping = None;
        state.gaps = state.gaps.saturating_add(1);
        tracing::warn!(
            first_seq = dropping.first_seq,
            count = dropping.count,
            "audit records were dropped while the buffer was full; gap recorded"
        );
        let resume_hash = state.chain.hash;
        self.append_locked(
            state,
            AuditEvent::Gap {
                first_seq: dropping.first_seq,
                count: dropping.count,
                resume_hash,
            },
        );
    }

    /// Acknowledges `after` (drops it and every record before it from the
    /// buffer) if it names a buffered record of this run, then returns up
    /// to `max` records after it (at most [`MAX_AUDIT_BATCH`] and about
    /// [`MAX_AUDIT_BATCH_BYTES`], at least one when any is buffered).
    pub fn read(&self, after: Option<&AuditCursor>, max: u32) -> Result<AuditBatch, AuditError> {
        let after = after
            .map(|cursor| {
                let hash: ChainHash = cursor
                    .hash
                    .as_slice()
                    .try_into()
                    .map_err(|_| AuditError::Cursor(cursor.hash.len()))?;
                Ok::<_, AuditError>((cursor.seq, hash))
            })
            .transpose()?;
        let mut state = self.lock();
        if let Some((seq, hash)) = after {
            match state.buffer.binary_search_by_key(&seq, |b| b.seq) {
                Ok(pos) if state.buffer[pos].hash == hash => {
                    let freed: usize = state.buffer.drain(..=pos).map(|b| b.bytes.len()).sum();
                    state.bytes -= freed;
                    state.acked = Some((seq, hash));
                }
                // Already acknowledged: nothing more to drop.
                _ if state.acked == Some((seq, hash)) => {}
                // Another run's cursor, or a point this buffer never had:
                // acknowledge nothing, answer from the oldest record.
                _ => {
                    tracing::warn!(
                        seq,
                        "audit read after a record this run does not know; nothing acknowledged"
                    );
                }
            }
        }
        self.close_gap(&mut state);
        let max = usize::try_from(max)
            .unwrap_or(usize::MAX)
            .clamp(1, MAX_AUDIT_BATCH);
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        for buffered in state.buffer.iter() {
            if entries.len() == max
                || (!entries.is_empty() && bytes + buffered.bytes.len() > MAX_AUDIT_BATCH_BYTES)
            {
                break;
            }
            bytes += buffered.bytes.len();
            entries.push(AuditEntry {
                record: buffered.bytes.clone(),
                hash: buffered.hash.to_vec(),
            });
        }
        let more = state.buffer.len() > entries.len();
        Ok(AuditBatch { entries, more })
    }

    /// Makes an attested checkpoint over the newest record and appends it;
    /// returns the checkpoint record's sequence number.
    ///
    /// The NSM call blocks, so it runs on the blocking pool, first without
    /// the chain lock (a request landing meanwhile means trying again);
    /// after a few such tries it is made under the lock so it cannot
    /// starve.
    pub async fn checkpoint(self: &Arc<Self>) -> Result<u64, AuditError> {
        let _one = self.checkpointing.lock().await;
        for _ in 0..OPTIMISTIC_CHECKPOINT_TRIES {
            let claim = self.claim(&self.lock());
            let nsm = self.nsm.clone();
            let document = tokio::task::spawn_blocking(move || attest(nsm.as_ref(), &claim))
                .await
                .map_err(|e| AuditError::Task(e.to_string()))??;
            let mut state = self.lock();
            if self.claim(&state) == claim {
                return Ok(self.append_locked(&mut state, AuditEvent::Checkpoint { document }));
            }
        }
        let trail = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut state = trail.lock();
            let claim = trail.claim(&state);
            let document = attest(trail.nsm.as_ref(), &claim)?;
            Ok(trail.append_locked(&mut state, AuditEvent::Checkpoint { document }))
        })
        .await
        .map_err(|e| AuditError::Task(e.to_string()))?
    }

    fn claim(&self, state: &State) -> CheckpointClaim {
        CheckpointClaim {
            run: self.run,
            // The Start record exists from construction on.
            seq: state.chain.seq.unwrap_or(0),
            hash: state.chain.hash,
        }
    }

    /// Checkpoints every [`AuditConfig::checkpoint_interval`] until `stop`
    /// completes. A failed checkpoint is logged and tried at the next tick.
    pub async fn checkpoint_periodically(self: Arc<Self>, stop: impl std::future::Future) {
        let mut ticks = tokio::time::interval_at(
            tokio::time::Instant::now() + self.config.checkpoint_interval,
            self.config.checkpoint_interval,
        );
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = ticks.tick() => {
                    match self.checkpoint().await {
                        Ok(seq) => tracing::debug!(seq, "audit checkpoint"),
                        Err(err) => tracing::warn!(error = %err, "audit checkpoint failed"),
                    }
                }
            }
        }
    }

    /// What `Status` shows of the trail.
    pub fn status(&self) -> AuditStatus {
        let state = self.lock();
        AuditStatus {
            last_seq: state.chain.seq,
            buffered: u64::try_from(state.buffer.len()).unwrap_or(u64::MAX),
            dropped: state.dropped_total,
            gaps: state.gaps,
            dropping: state.dropping.is_some(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent before anything that
        // could panic, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How a failed request ends in its record.
pub fn outcome_of(code: ErrorCode) -> Outcome {
    match code {
        ErrorCode::Denied => Outcome::Denied,
        ErrorCode::NotFound => Outcome::NotFound,
        other => Outcome::Error(other.as_str().to_owned()),
    }
}

fn attest(nsm: &dyn Nsm, claim: &CheckpointClaim) -> Result<Vec<u8>, AuditError> {
    Ok(nsm.attest(&AttestationRequest {
        public_key: None,
        user_data: Some(claim.user_data()),
        nonce: None,
    })?)
}

/// `SHA-256(previous ‖ canonical)`, as [`keystore_shared::audit::chain::next_hash`]
/// computes it, over bytes already encoded.
fn chain_hash(previous: &ChainHash, canonical: &[u8]) -> ChainHash {
    let mut hasher = Sha256::new();
    hasher.update(previous);
    hasher.update(canonical);
    hasher.finalize().into()
}

/// The record without its caller (the only field not bounded upstream).
fn stripped(mut record: AuditRecord) -> AuditRecord {
    if let AuditEvent::Request { caller, .. } = &mut record.event {
        *caller = None;
    }
    record
}

/// Cuts `text` to at most `max` bytes, on a character boundary.
fn cut(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_millis()).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keystore_shared::audit::chain::next_hash;

    #[test]
    fn the_recorded_hash_is_the_shared_chain_hash() {
        let record = AuditRecord {
            seq: 3,
            time_ms: 9,
            event: AuditEvent::Start {
                run: RunId([1; 16]),
            },
        };
        let previous = [4; 32];
        assert_eq!(
            chain_hash(&previous, &record.canonical_bytes().unwrap()),
            next_hash(&previous, &record).unwrap()
        );
    }

    #[test]
    fn cut_keeps_whole_characters() {
        let mut text = "aé".repeat(100);
        cut(&mut text, 4);
        assert_eq!(text, "aéa");
        let mut short = "abc".to_owned();
        cut(&mut short, 10);
        assert_eq!(short, "abc");
    }

    #[test]
    fn settings_that_keep_nothing_are_refused() {
        assert!(AuditConfig::default().validate().is_ok());
        for bad in [
            AuditConfig {
                buffer_records: 1,
                ..AuditConfig::default()
            },
            AuditConfig {
                buffer_bytes: 100,
                ..AuditConfig::default()
            },
            AuditConfig {
                checkpoint_interval: Duration::ZERO,
                ..AuditConfig::default()
            },
        ] {
            assert!(bad.validate().is_err());
        }
    }
}
