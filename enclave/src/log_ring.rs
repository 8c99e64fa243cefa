//! The enclave's recent log events, kept in a bounded in-memory ring so the
//! daemon can relay them to the parent's journal (issue 16): an enclave's
//! console is only readable in debug mode, which zeroes its PCRs.
//!
//! [`LogRing::layer`] is a `tracing` layer installed beside the stderr
//! writer; every event it sees (at the ring's own level) becomes a
//! [`LogEvent`] with the next sequence number of this run. The daemon reads
//! them over the load port with `LogRead` ([`LogRing::read`]); like the
//! audit trail, naming an event acknowledges it and everything before it,
//! so a restarted daemon resumes without repeats, and a cursor of another
//! run acknowledges nothing.
//!
//! Bounds: at most `capacity` events and `max_bytes` of their text are
//! kept; past either the **oldest** events go (the newest say most about
//! what is wrong now) and are counted in `dropped`. Each message, target,
//! field name and value is truncated, and an event keeps at most
//! [`MAX_LOG_FIELDS`] fields.
//!
//! What is recorded is what the enclave prints on stderr: operation kinds,
//! outcomes, peers, stages and error texts, never a secret's value (the
//! enclave never logs one: values live in `Zeroizing` buffers with
//! redacting `Debug`). The daemon's routine polls that succeed (`op` =
//! `log_read`, `audit_read` or `status` with `outcome = "ok"`) are not
//! recorded, so the relay does not feed itself nor fill the journal with
//! its own heartbeat; a poll that fails is.

use std::collections::VecDeque;
use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use keystore_shared::protocol::{
    LogBatch, LogCursor, LogEvent, LogField, LogLevel, LogRingStatus, MAX_LOG_BATCH,
    MAX_LOG_BATCH_BYTES, MAX_LOG_FIELDS,
};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;

/// Events kept by default (`--log-ring`).
pub const DEFAULT_CAPACITY: usize = 2048;
/// Bytes of event text kept by default.
pub const DEFAULT_MAX_BYTES: usize = 1024 * 1024;
/// Longest message kept (longer ones are cut, with `…`).
pub const MAX_MESSAGE_LEN: usize = 2048;
/// Longest target kept.
pub const MAX_TARGET_LEN: usize = 128;
/// Longest field name kept.
pub const MAX_FIELD_NAME_LEN: usize = 64;
/// Longest field value kept.
pub const MAX_FIELD_VALUE_LEN: usize = 512;
/// What an event costs beyond its text (sequence, time, level, framing).
const EVENT_OVERHEAD: usize = 64;
/// What a field costs beyond its text.
const FIELD_OVERHEAD: usize = 8;

/// The ring's state behind its lock.
#[derive(Debug, Default)]
struct State {
    events: VecDeque<LogEvent>,
    bytes: usize,
    /// The sequence number of the newest event (0 before the first).
    last_seq: u64,
    dropped: u64,
}

/// A bounded ring of recent log events. Share it with `Arc`.
#[derive(Debug)]
pub struct LogRing {
    run: u64,
    capacity: usize,
    max_bytes: usize,
    state: Mutex<State>,
}

impl LogRing {
    /// A ring keeping at most `capacity` events and `max_bytes` of their
    /// text (each at least 1), for a new run with a random id.
    pub fn new(capacity: usize, max_bytes: usize) -> LogRing {
        LogRing {
            run: rand::random(),
            capacity: capacity.max(1),
            max_bytes: max_bytes.max(1),
            state: Mutex::new(State::default()),
        }
    }

    /// This run's id (in every cursor and batch).
    pub fn run(&self) -> u64 {
        self.run
    }

    /// A `tracing` layer that records every event it is given into the
    /// ring (filter it with `Layer::with_filter`).
    pub fn layer(self: &Arc<Self>) -> RingLayer {
        RingLayer { ring: self.clone() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves a consistent ring: every
        // mutation below completes or changes nothing.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds an event, dropping the oldest while the ring is over a bound.
    pub fn push(&self, level: LogLevel, target: &str, message: &str, fields: Vec<LogField>) {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut state = self.lock();
        state.last_seq = state.last_seq.saturating_add(1);
        let event = LogEvent {
            seq: state.last_seq,
            unix_ms,
            level,
            target: truncate(target, MAX_TARGET_LEN),
            message: truncate(message, MAX_MESSAGE_LEN),
            fields,
        };
        let size = size_of(&event);
        state.events.push_back(event);
        state.bytes = state.bytes.saturating_add(size);
        while state.events.len() > self.capacity || state.bytes > self.max_bytes {
            let Some(old) = state.events.pop_front() else {
                break;
            };
            state.bytes = state.bytes.saturating_sub(size_of(&old));
            state.dropped = state.dropped.saturating_add(1);
        }
    }

    /// Acknowledges the events up to `after` (when it is of this run and
    /// not past the newest event), then returns the oldest buffered ones:
    /// at most `max` (capped at [`MAX_LOG_BATCH`]) and about
    /// [`MAX_LOG_BATCH_BYTES`], but at least one when any is buffered.
    pub fn read(&self, after: Option<&LogCursor>, max: u32) -> LogBatch {
        let max = usize::try_from(max)
            .unwrap_or(usize::MAX)
            .min(MAX_LOG_BATCH);
        let mut state = self.lock();
        if let Some(after) = after
            && after.run == self.run
            && after.seq <= state.last_seq
        {
            while state.events.front().is_some_and(|e| e.seq <= after.seq) {
                if let Some(old) = state.events.pop_front() {
                    state.bytes = state.bytes.saturating_sub(size_of(&old));
                }
            }
        }
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        for event in state.events.iter().take(max) {
            let size = size_of(event);
            if !entries.is_empty() && bytes.saturating_add(size) > MAX_LOG_BATCH_BYTES {
                break;
            }
            bytes = bytes.saturating_add(size);
            entries.push(event.clone());
        }
        LogBatch {
            run: self.run,
            more: state.events.len() > entries.len(),
            entries,
            dropped: state.dropped,
        }
    }

    /// Buffered and dropped counts, for `Status`.
    pub fn status(&self) -> LogRingStatus {
        let state = self.lock();
        LogRingStatus {
            buffered: u64::try_from(state.events.len()).unwrap_or(u64::MAX),
            dropped: state.dropped,
            last_seq: state.last_seq,
        }
    }
}

/// The text an event holds, plus fixed overheads: what the byte bound
/// counts.
fn size_of(event: &LogEvent) -> usize {
    event.fields.iter().fold(
        EVENT_OVERHEAD + event.target.len() + event.message.len(),
        |sum, f| sum + FIELD_OVERHEAD + f.name.len() + f.value.len(),
    )
}

/// `text` cut to at most `max` bytes on a character boundary, marked `…`.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut cut = text[..end].to_owned();
    cut.push('…');
    cut
}

/// The `tracing` layer feeding a [`LogRing`].
#[derive(Debug, Clone)]
pub struct RingLayer {
    ring: Arc<LogRing>,
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for RingLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut visitor = Collect::default();
        event.record(&mut visitor);
        if visitor.is_routine_poll() {
            return;
        }
        let metadata = event.metadata();
        self.ring.push(
            level_of(*metadata.level()),
            metadata.target(),
            &visitor.message,
            visitor.fields,
        );
    }
}

/// The protocol's name for a `tracing` level.
fn level_of(level: Level) -> LogLevel {
    match level {
        Level::ERROR => LogLevel::Error,
        Level::WARN => LogLevel::Warn,
        Level::INFO => LogLevel::Info,
        Level::DEBUG => LogLevel::Debug,
        Level::TRACE => LogLevel::Trace,
    }
}

/// Gathers an event's message and fields, bounded.
#[derive(Default)]
struct Collect {
    message: String,
    fields: Vec<LogField>,
    /// The event is about a polling request (`op`).
    poll: bool,
    /// The event says its request succeeded (`outcome = "ok"`).
    ok: bool,
}

/// The operations the daemon polls.
const POLLED_OPS: &[&str] = &["log_read", "audit_read", "status"];

impl Collect {
    /// A successful daemon poll: not worth a journal line.
    fn is_routine_poll(&self) -> bool {
        self.poll && self.ok
    }

    fn add(&mut self, field: &Field, value: String) {
        if field.name() == "message" {
            self.message = truncate(&value, MAX_MESSAGE_LEN);
            return;
        }
        match field.name() {
            "op" => self.poll = POLLED_OPS.contains(&value.as_str()),
            "outcome" => self.ok = value == "ok",
            _ => {}
        }
        if self.fields.len() < MAX_LOG_FIELDS {
            self.fields.push(LogField {
                name: truncate(field.name(), MAX_FIELD_NAME_LEN),
                value: truncate(&value, MAX_FIELD_VALUE_LEN),
            });
        }
    }
}

impl Visit for Collect {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.add(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // Formatted into a bounded buffer: a huge Debug value is cut, not
        // copied whole.
        let mut text = Bounded::new(MAX_MESSAGE_LEN.max(MAX_FIELD_VALUE_LEN) + 4);
        let _ = write!(text, "{value:?}");
        self.add(field, text.into_string());
    }
}

/// A `fmt::Write` sink that keeps at most `max` bytes and ignores the rest.
struct Bounded {
    text: String,
    max: usize,
    cut: bool,
}

impl Bounded {
    fn new(max: usize) -> Self {
        Bounded {
            text: String::new(),
            max,
            cut: false,
        }
    }

    fn into_string(self) -> String {
        self.text
    }
}

impl fmt::Write for Bounded {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.cut {
            return Ok(());
        }
        let room = self.max.saturating_sub(self.text.len());
        if s.len() <= room {
            self.text.push_str(s);
        } else {
            let mut end = room;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            self.text.push_str(&s[..end]);
            // Marks the cut; `truncate` then bounds it precisely.
            self.text.push('…');
            self.cut = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    fn push(ring: &LogRing, message: &str) {
        ring.push(LogLevel::Info, "test", message, Vec::new());
    }

    fn seqs(batch: &LogBatch) -> Vec<u64> {
        batch.entries.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn a_full_ring_drops_the_oldest_and_counts_them() {
        let ring = LogRing::new(3, usize::MAX);
        for i in 0..5 {
            push(&ring, &format!("event {i}"));
        }
        let batch = ring.read(None, 100);
        assert_eq!(seqs(&batch), [3, 4, 5]);
        assert_eq!(batch.dropped, 2);
        assert_eq!(batch.entries[0].message, "event 2");
        let status = ring.status();
        assert_eq!(
            (status.buffered, status.dropped, status.last_seq),
            (3, 2, 5)
        );
    }

    #[test]
    fn the_byte_bound_drops_too() {
        let ring = LogRing::new(1000, 3 * (EVENT_OVERHEAD + 4 + 10));
        for _ in 0..10 {
            push(&ring, "0123456789");
        }
        let status = ring.status();
        assert_eq!(status.buffered, 3);
        assert_eq!(status.dropped, 7);
    }

    #[test]
    fn the_cursor_acknowledges_so_nothing_repeats_or_is_lost() {
        let ring = LogRing::new(100, usize::MAX);
        for i in 0..5 {
            push(&ring, &format!("{i}"));
        }
        let first = ring.read(None, 2);
        assert_eq!(seqs(&first), [1, 2]);
        assert!(first.more);
        // Reading again without acknowledging returns the same events (a
        // daemon that crashed before re-emitting them).
        assert_eq!(seqs(&ring.read(None, 2)), [1, 2]);
        let cursor = LogCursor {
            run: ring.run(),
            seq: 2,
        };
        let second = ring.read(Some(&cursor), 10);
        assert_eq!(seqs(&second), [3, 4, 5]);
        assert!(!second.more);
        // A restarted daemon (no cursor) starts after what was acknowledged.
        assert_eq!(seqs(&ring.read(None, 10)), [3, 4, 5]);
        let done = LogCursor {
            run: ring.run(),
            seq: 5,
        };
        assert!(ring.read(Some(&done), 10).entries.is_empty());
        assert_eq!(ring.status().buffered, 0);
    }

    #[test]
    fn a_cursor_of_another_run_or_the_future_acknowledges_nothing() {
        let ring = LogRing::new(100, usize::MAX);
        for i in 0..3 {
            push(&ring, &format!("{i}"));
        }
        let other = LogCursor {
            run: ring.run().wrapping_add(1),
            seq: 2,
        };
        assert_eq!(seqs(&ring.read(Some(&other), 10)), [1, 2, 3]);
        let future = LogCursor {
            run: ring.run(),
            seq: 99,
        };
        assert_eq!(seqs(&ring.read(Some(&future), 10)), [1, 2, 3]);
    }

    #[test]
    fn a_batch_is_bounded_by_count_and_bytes_but_never_empty() {
        let ring = LogRing::new(10_000, usize::MAX);
        for _ in 0..(MAX_LOG_BATCH + 10) {
            push(&ring, "x");
        }
        assert_eq!(ring.read(None, u32::MAX).entries.len(), MAX_LOG_BATCH);
        let big = LogRing::new(1000, usize::MAX);
        let long = "y".repeat(MAX_MESSAGE_LEN);
        for _ in 0..300 {
            big.push(LogLevel::Warn, "t", &long, Vec::new());
        }
        let batch = big.read(None, u32::MAX);
        let bytes: usize = batch.entries.iter().map(size_of).sum();
        assert!(bytes <= MAX_LOG_BATCH_BYTES, "{bytes}");
        assert!(batch.more);
        assert!(!batch.entries.is_empty());
        assert_eq!(ring.read(None, 0).entries.len(), 0);
    }

    #[test]
    fn the_layer_records_level_target_message_and_bounded_fields() {
        let ring = Arc::new(LogRing::new(100, usize::MAX));
        let subscriber = tracing_subscriber::registry().with(ring.layer());
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "keystore_enclave::load", stage = "tls", attempts = 3u32, "load failed");
            let long = "z".repeat(10 * MAX_FIELD_VALUE_LEN);
            tracing::info!(detail = ?long, "long");
            tracing::info!(op = "log_read", outcome = "ok", "request");
            tracing::info!(op = "audit_read", outcome = "ok", "request");
            tracing::info!(op = "status", outcome = "ok", "request");
            tracing::info!(op = "status", outcome = "Denied", "request");
            tracing::info!(op = "get", outcome = "ok", "request");
        });
        let batch = ring.read(None, 10);
        assert_eq!(batch.entries.len(), 4, "{batch:?}");
        let first = &batch.entries[0];
        assert_eq!(first.level, LogLevel::Warn);
        assert_eq!(first.target, "keystore_enclave::load");
        assert_eq!(first.message, "load failed");
        assert_eq!(
            first.fields,
            [
                LogField {
                    name: "stage".into(),
                    value: "tls".into()
                },
                LogField {
                    name: "attempts".into(),
                    value: "3".into()
                },
            ]
        );
        let long = &batch.entries[1].fields[0].value;
        assert!(long.len() <= MAX_FIELD_VALUE_LEN, "{}", long.len());
        assert!(long.ends_with('…'));
        // Routine polls that succeed are not recorded; failed ones and
        // other requests are.
        let ops: Vec<_> = batch.entries[2..]
            .iter()
            .map(|e| (e.fields[0].value.as_str(), e.fields[1].value.as_str()))
            .collect();
        assert_eq!(ops, [("status", "Denied"), ("get", "ok")]);
    }

    #[test]
    fn a_huge_debug_value_is_cut_once_while_formatting() {
        let mut sink = Bounded::new(10);
        for _ in 0..100 {
            write!(sink, "abcdef").unwrap();
        }
        assert_eq!(sink.into_string(), "abcdefabcd…");
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("abc", 3), "abc");
        let cut = truncate("ééééé", 6);
        assert!(cut.len() <= 6 && cut.ends_with('…'), "{cut}");
    }
}
