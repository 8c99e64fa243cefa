//! The enclave log relay (issue 16): reads the enclave's recent log events
//! over the load port (`LogRead`) and re-emits each through the daemon's
//! own `tracing`, so they reach the journal (and `--log-format json`)
//! without `--debug-mode`, which would zero the enclave's PCRs.
//!
//! Each event keeps its level and comes out with target
//! [`RELAY_TARGET`] and a stable field set: `source = "enclave"`,
//! `enclave_target` (the module that logged it), `enclave_ts` (its time,
//! RFC 3339 on the enclave's clock), `enclave_seq`, `enclave_run` and
//! `enclave_fields` (its other fields, `name=value` joined by spaces); the
//! message is the enclave's.
//!
//! **Nothing lost, nothing twice.** Naming an event in the next `LogRead`
//! acknowledges it; the relay does so right after re-emitting a batch, by
//! reading again until the enclave has nothing more. A restarted daemon
//! (no cursor) therefore starts after the last acknowledged event, and a
//! new enclave run (a cursor it does not know) starts at its oldest event.
//! What the enclave dropped because its ring was full is reported once as
//! a warning with the count. The connection stays open between polls.
//!
//! The relay never stops the daemon: a failure is logged once per outage
//! and retried at the next poll.

use std::sync::Arc;
use std::time::Duration;

use keystore_shared::endpoint::Endpoint;
use keystore_shared::protocol::{LogBatch, LogCursor, LogEvent, LogLevel, MAX_LOG_BATCH};
use keystore_shared::{Client, ClientConfig, ClientError};

use crate::metrics::Metrics;

/// The `tracing` target relayed events are emitted under.
pub const RELAY_TARGET: &str = "keystore_enclave";
/// Default time between two polls (`--enclave-log-poll`).
pub const DEFAULT_POLL: Duration = Duration::from_secs(2);
/// Default bound on connecting and on one `LogRead`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most batches read in one poll, so a chatty enclave cannot keep the
/// relay from sleeping; the rest waits for the next poll.
const MAX_BATCHES_PER_POLL: usize = 32;

/// Settings of the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRelayConfig {
    /// The enclave's load port.
    pub enclave: Endpoint,
    /// Time between two polls.
    pub poll: Duration,
    /// Bound on connecting and on one `LogRead`.
    pub timeout: Duration,
    /// Events asked for per read (at most [`MAX_LOG_BATCH`]).
    pub batch: u32,
}

impl LogRelayConfig {
    /// Defaults for everything but the enclave's load port.
    pub fn new(enclave: Endpoint) -> Self {
        LogRelayConfig {
            enclave,
            poll: DEFAULT_POLL,
            timeout: DEFAULT_TIMEOUT,
            batch: u32::try_from(MAX_LOG_BATCH).unwrap_or(u32::MAX),
        }
    }
}

/// Why a poll failed (retried at the next one).
#[derive(Debug, thiserror::Error)]
pub enum LogRelayError {
    /// Connecting or the exchange failed, or the enclave refused.
    #[error("reading the enclave's log: {0}")]
    Client(#[from] ClientError),
}

/// The relay task's state: its connection and cursor.
#[derive(Debug)]
pub struct LogRelay {
    config: LogRelayConfig,
    client: Option<Client>,
    cursor: Option<LogCursor>,
    /// The enclave's `dropped` count last seen, per run.
    dropped: Option<(u64, u64)>,
    metrics: Option<Arc<Metrics>>,
}

impl LogRelay {
    /// A relay with `config`; nothing is dialed until the first poll.
    pub fn new(config: LogRelayConfig) -> LogRelay {
        LogRelay {
            config,
            client: None,
            cursor: None,
            dropped: None,
            metrics: None,
        }
    }

    /// Counts reads and relayed events into `metrics`.
    pub fn set_metrics(&mut self, metrics: Arc<Metrics>) {
        self.metrics = Some(metrics);
    }

    /// The last event re-emitted (and acknowledged by the next read).
    pub fn cursor(&self) -> Option<LogCursor> {
        self.cursor
    }

    /// Reads and re-emits until the enclave has nothing more (or
    /// [`MAX_BATCHES_PER_POLL`] batches); returns the events relayed.
    pub async fn relay_once(&mut self) -> Result<usize, LogRelayError> {
        let mut total = 0;
        for _ in 0..MAX_BATCHES_PER_POLL {
            let read = self.read().await;
            if let Some(metrics) = &self.metrics {
                metrics.log_read(read.is_ok());
            }
            let batch = read?;
            if self.cursor.is_some_and(|c| c.run != batch.run) {
                tracing::info!(
                    run = %format_args!("{:016x}", batch.run),
                    "the enclave restarted: relaying its new log"
                );
                self.cursor = None;
            }
            self.note_dropped(&batch);
            let Some(last) = batch.entries.last() else {
                return Ok(total);
            };
            let next = LogCursor {
                run: batch.run,
                seq: last.seq,
            };
            for event in &batch.entries {
                emit(batch.run, event);
                if let Some(metrics) = &self.metrics {
                    metrics.log_event_relayed(event.level);
                }
            }
            total += batch.entries.len();
            self.cursor = Some(next);
        }
        Ok(total)
    }

    /// Warns once about events the enclave dropped since the last batch.
    fn note_dropped(&mut self, batch: &LogBatch) {
        let before = match self.dropped {
            Some((run, dropped)) if run == batch.run => dropped,
            _ => 0,
        };
        if batch.dropped > before {
            tracing::warn!(
                dropped = batch.dropped - before,
                "the enclave dropped log events before they were relayed (its ring was full; --log-ring)"
            );
        }
        self.dropped = Some((batch.run, batch.dropped));
    }

    async fn read(&mut self) -> Result<LogBatch, LogRelayError> {
        if let Some(mut client) = self.client.take() {
            match client.log_read(self.cursor, self.config.batch).await {
                Ok(batch) => {
                    self.client = Some(client);
                    return Ok(batch);
                }
                // The kept connection may have idled out (a poll longer
                // than the enclave's idle timeout): once more on a new one.
                Err(err) => tracing::debug!(error = %err, "kept enclave connection failed"),
            }
        }
        let mut client = Client::connect_with(
            &self.config.enclave,
            ClientConfig {
                connect_timeout: self.config.timeout,
                request_timeout: self.config.timeout,
                // The load port serves privileged peers only.
                privileged: true,
                ..ClientConfig::default()
            },
        )
        .await?;
        let batch = client.log_read(self.cursor, self.config.batch).await?;
        self.client = Some(client);
        Ok(batch)
    }

    /// Relays every poll interval until `stop` completes.
    pub async fn run(mut self, stop: impl std::future::Future) {
        tracing::info!(enclave = %self.config.enclave, "enclave log relay started");
        tokio::pin!(stop);
        let mut outage = super::outage::Outage::new("enclave log relay");
        loop {
            match self.relay_once().await {
                Ok(_) => outage.ok(),
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

/// The enclave's other fields as `name=value` pairs joined by spaces
/// (values with spaces or quotes are quoted, so the text splits back).
pub fn fields_text(event: &LogEvent) -> String {
    let mut text = String::new();
    for field in &event.fields {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(&field.name);
        text.push('=');
        if field.value.is_empty() || field.value.contains([' ', '"', '=']) {
            text.push_str(&format!("{:?}", field.value));
        } else {
            text.push_str(&field.value);
        }
    }
    text
}

/// The event's time as RFC 3339 (milliseconds, UTC).
fn timestamp(event: &LogEvent) -> String {
    let nanos = i128::from(event.unix_ms) * 1_000_000;
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|at| at.format(&format).ok())
        .unwrap_or_else(|| event.unix_ms.to_string())
}

/// Re-emits one enclave event at its own level.
fn emit(run: u64, event: &LogEvent) {
    let enclave_target = event.target.as_str();
    let enclave_ts = timestamp(event);
    let enclave_fields = fields_text(event);
    let enclave_run = format!("{run:016x}");
    let message = event.message.as_str();
    macro_rules! relay {
        ($level:expr) => {
            tracing::event!(
                target: RELAY_TARGET,
                $level,
                source = "enclave",
                enclave_target,
                enclave_ts = %enclave_ts,
                enclave_seq = event.seq,
                enclave_run = %enclave_run,
                enclave_fields = %enclave_fields,
                "{message}"
            )
        };
    }
    match event.level {
        LogLevel::Error => relay!(tracing::Level::ERROR),
        LogLevel::Warn => relay!(tracing::Level::WARN),
        LogLevel::Info => relay!(tracing::Level::INFO),
        LogLevel::Debug => relay!(tracing::Level::DEBUG),
        LogLevel::Trace => relay!(tracing::Level::TRACE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keystore_shared::protocol::LogField;

    #[test]
    fn fields_are_name_value_pairs_quoted_when_needed() {
        let event = LogEvent {
            seq: 1,
            unix_ms: 1_700_000_000_123,
            level: LogLevel::Info,
            target: "t".into(),
            message: "m".into(),
            fields: vec![
                LogField {
                    name: "op".into(),
                    value: "get".into(),
                },
                LogField {
                    name: "error".into(),
                    value: "KMS refused: \"x\"".into(),
                },
                LogField {
                    name: "empty".into(),
                    value: String::new(),
                },
            ],
        };
        assert_eq!(
            fields_text(&event),
            r#"op=get error="KMS refused: \"x\"" empty="""#
        );
        assert_eq!(timestamp(&event), "2023-11-14T22:13:20.123Z");
    }
}
