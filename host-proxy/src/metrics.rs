//! The daemon's Prometheus metrics (issue 16), served as OpenMetrics text at
//! `GET /metrics` on `--metrics-listen` (default [`DEFAULT_LISTEN`]).
//!
//! Labels carry only low-cardinality, non-secret data: an operation, an
//! outcome, a caller's numeric uid (capped at [`MAX_UID_LABELS`] distinct
//! values, then `other`). Never a secret's value or its name: names are
//! data an attacker may choose, and would let one grow the registry
//! without bound.
//!
//! What the enclave counts is relayed: [`Metrics::poll_status`] asks the
//! enclave's `Status` over a privileged connection every few seconds and
//! sets the `keystore_enclave_*` gauges from the answer.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use keystore_shared::endpoint::{Endpoint, Listener, Stream};
use keystore_shared::protocol::{
    ErrorCode, KMS_CALL_OUTCOMES, KMS_OPERATIONS, LogLevel, StatusReport,
};
use keystore_shared::serve::{Accepted, Handler, Refusal, ServeConfig, ServeError, serve};
use keystore_shared::{Client, ClientConfig};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Where `/metrics` is served by default (as issue 16 asks).
pub const DEFAULT_LISTEN: &str = "tcp://127.0.0.1:9273";
/// Distinct caller uids given their own denial label; the rest are `other`.
pub const MAX_UID_LABELS: usize = 64;
/// How often the enclave's `Status` is relayed by default.
pub const DEFAULT_STATUS_POLL: Duration = Duration::from_secs(5);
/// Time allowed for one `Status` call (connect and answer).
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds of a scrape: head size, head arrival, connections at once.
const MAX_HEAD_BYTES: usize = 8 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 16;
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// The exposition's content type.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// An agent request: which operation, how it ended.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpOutcome {
    op: &'static str,
    outcome: &'static str,
}

/// An operation alone (latency).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

/// A denied caller's uid, or `other` past the cap, or `none`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UidLabel {
    uid: String,
}

/// Gives at most `cap` distinct values a label of their own; every later
/// one shares `other`, so a caller cannot grow the registry.
#[derive(Debug)]
pub struct LabelCap {
    cap: usize,
    seen: Mutex<HashSet<u32>>,
}

impl LabelCap {
    /// A cap of `cap` distinct values.
    pub fn new(cap: usize) -> Self {
        LabelCap {
            cap,
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// The label for `uid`: itself if already seen or room is left,
    /// otherwise `other`; `none` when the caller has no uid.
    pub fn label(&self, uid: Option<u32>) -> String {
        let Some(uid) = uid else {
            return "none".to_owned();
        };
        let Ok(mut seen) = self.seen.lock() else {
            return "other".to_owned();
        };
        if seen.contains(&uid) || (seen.len() < self.cap && seen.insert(uid)) {
            uid.to_string()
        } else {
            "other".to_owned()
        }
    }
}

/// Every metric the daemon exposes, shared (`Arc`) by the parts that count.
pub struct Metrics {
    registry: Registry,
    agent_requests: Family<OpOutcome, Counter>,
    agent_latency: Family<OpLabel, Histogram>,
    agent_denials: Family<UidLabel, Counter>,
    uid_cap: LabelCap,
    status_polls: Family<OutcomeLabel, Counter>,
    loads: Family<OutcomeLabel, Counter>,
    load_duration: Histogram,
    forwarder_connections: Family<OutcomeLabel, Counter>,
    forwarder_open: Gauge,
    forwarder_bytes: Family<DirectionLabel, Counter>,
    enclave_up: Gauge,
    enclave_ready: Gauge,
    enclave_secrets: Gauge,
    enclave_uptime: Gauge<f64, AtomicU64>,
    enclave_document_age: Gauge<f64, AtomicU64>,
    enclave_decrypt_age: Gauge<f64, AtomicU64>,
    enclave_refreshes: Gauge,
    enclave_audit_buffered: Gauge,
    enclave_audit_dropped: Gauge,
    enclave_audit_gaps: Gauge,
    enclave_audit_last_seq: Gauge,
    /// The daemon's configuration as JSON, for `GET /health` (doctor).
    health: std::sync::OnceLock<String>,
    enclave_kms_calls: Family<KmsCallLabels, Counter>,
    enclave_breaker_state: Gauge,
    enclave_breaker_failures: Gauge,
    enclave_breaker_opened: Counter,
    enclave_log_buffered: Gauge,
    enclave_log_dropped: Gauge,
    audit_drained: Counter,
    audit_drains: Family<OutcomeLabel, Counter>,
    audit_since_drain: Gauge<f64, AtomicU64>,
    last_audit_drain: Mutex<Option<Instant>>,
    s3_fetches: Family<OutcomeLabel, Counter>,
    log_events_relayed: Family<LevelLabel, Counter>,
    log_reads: Family<OutcomeLabel, Counter>,
    relayed: Mutex<Relayed>,
}

/// A relayed KMS call count's labels: both from fixed sets.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KmsCallLabels {
    operation: &'static str,
    outcome: &'static str,
}

/// A relayed log event's level.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LevelLabel {
    level: &'static str,
}

/// What the last `Status` said of the enclave's counters, to turn them into
/// increments of the daemon's own counters (so they stay monotonic across
/// enclave restarts, which `rate()` needs).
#[derive(Debug, Default)]
struct Relayed {
    uptime_ms: u64,
    counts: HashMap<(&'static str, &'static str), u64>,
}

impl Relayed {
    /// The increment from the last value of `key` to `now` (all of `now`
    /// after a restart or when the value went down).
    fn advance(&mut self, key: (&'static str, &'static str), now: u64, restarted: bool) -> u64 {
        let last = self.counts.insert(key, now).unwrap_or(0);
        if restarted || now < last {
            now
        } else {
            now - last
        }
    }
}

/// The numeric breaker state `keystore_enclave_kms_breaker_state` reports.
pub fn breaker_state_value(state: &str) -> i64 {
    match state {
        "closed" => 0,
        "half-open" => 1,
        "open" => 2,
        _ => -1,
    }
}

/// `name` as one of `known`, or `other`: a peer's text never becomes a
/// label value of its own.
fn known_label(known: &'static [&'static str], name: &str) -> &'static str {
    known
        .iter()
        .copied()
        .find(|k| *k == name)
        .unwrap_or("other")
}

/// Which way forwarded bytes went.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

/// Keeps `keystore_forwarder_open_connections` counted while alive.
#[derive(Debug)]
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How a poll, load or connection ended.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Latency buckets from 1 ms to about 16 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Metrics {
    /// A fresh registry with every metric registered (prefix `keystore`).
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("keystore");
        let agent_requests = Family::<OpOutcome, Counter>::default();
        registry.register(
            "agent_requests",
            "Agent requests forwarded to the enclave, by operation and outcome",
            agent_requests.clone(),
        );
        let agent_latency =
            Family::<OpLabel, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        registry.register(
            "agent_request_duration_seconds",
            "Time to answer an agent request, by operation",
            agent_latency.clone(),
        );
        let agent_denials = Family::<UidLabel, Counter>::default();
        registry.register(
            "agent_denials",
            "Agent reads the enclave denied, by caller uid (the first 64 uids, then other)",
            agent_denials.clone(),
        );
        let status_polls = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "enclave_status_polls",
            "Status polls of the enclave, by outcome",
            status_polls.clone(),
        );
        let loads = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "loads",
            "Loads of the secrets file into the enclave, by outcome (ok, or the failing step)",
            loads.clone(),
        );
        let load_duration = latency_histogram();
        registry.register(
            "load_duration_seconds",
            "Time to fetch, check and load the secrets file",
            load_duration.clone(),
        );
        let forwarder_connections = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "forwarder_connections",
            "Connections the KMS forwarders accepted, by outcome (forwarded, upstream_unreachable)",
            forwarder_connections.clone(),
        );
        let forwarder_bytes = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "forwarder_bytes",
            "Bytes the KMS forwarders moved, by direction (to_upstream, to_enclave), counted as each chunk passes",
            forwarder_bytes.clone(),
        );
        let mut gauge = |name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let forwarder_open = gauge(
            "forwarder_open_connections",
            "Connections the KMS forwarders hold open now",
        );
        let enclave_up = gauge(
            "enclave_up",
            "1 when the last Status poll of the enclave answered",
        );
        let enclave_ready = gauge(
            "enclave_ready",
            "1 when the enclave has secrets loaded and serves Get",
        );
        let enclave_secrets = gauge("enclave_secrets_loaded", "Secrets loaded in the enclave");
        let enclave_refreshes = gauge(
            "enclave_refreshes",
            "Background refreshes the enclave completed since it started",
        );
        let enclave_audit_buffered = gauge(
            "enclave_audit_buffered",
            "Audit records waiting in the enclave to be drained",
        );
        let enclave_audit_dropped = gauge(
            "enclave_audit_dropped",
            "Audit records the enclave dropped since start (buffer full)",
        );
        let enclave_audit_gaps = gauge(
            "enclave_audit_gaps",
            "Audit gap records the enclave wrote since start",
        );
        let enclave_audit_last_seq = gauge(
            "enclave_audit_last_seq",
            "Sequence number of the enclave's newest audit record",
        );
        let enclave_breaker_state = gauge(
            "enclave_kms_breaker_state",
            "The enclave's KMS circuit breaker: 0 closed, 1 half-open, 2 open, -1 unknown or no KMS",
        );
        let enclave_breaker_failures = gauge(
            "enclave_kms_breaker_consecutive_failures",
            "KMS service failures in a row, as the enclave's breaker counts them",
        );
        let enclave_log_buffered = gauge(
            "enclave_log_buffered",
            "Log events waiting in the enclave's ring to be relayed",
        );
        let enclave_log_dropped = gauge(
            "enclave_log_dropped",
            "Log events the enclave's ring dropped since start (full before they were relayed)",
        );
        let mut seconds = |name: &str, help: &str| {
            let g = Gauge::<f64, AtomicU64>::default();
            registry.register(name, help, g.clone());
            g
        };
        let enclave_uptime = seconds("enclave_uptime_seconds", "Time since the enclave started");
        let enclave_document_age = seconds(
            "enclave_document_age_seconds",
            "Age of the enclave's attestation document (KMS refuses past 300 s); -1 without one",
        );
        let enclave_decrypt_age = seconds(
            "enclave_last_decrypt_age_seconds",
            "Time since the enclave's last successful load or re-decrypt; -1 before the first",
        );
        let audit_since_drain = seconds(
            "audit_seconds_since_last_drain",
            "Time since the audit drain last read the enclave's trail successfully; -1 before the first",
        );
        audit_since_drain.set(-1.0);
        let enclave_kms_calls = Family::<KmsCallLabels, Counter>::default();
        registry.register(
            "enclave_kms_calls",
            "KMS calls the enclave made, by operation and outcome (ok, KMS's __type, or the failing stage), relayed from Status",
            enclave_kms_calls.clone(),
        );
        let enclave_breaker_opened = Counter::default();
        registry.register(
            "enclave_kms_breaker_opened",
            "Times the enclave's KMS circuit breaker opened, relayed from Status",
            enclave_breaker_opened.clone(),
        );
        let audit_drained = Counter::default();
        registry.register(
            "audit_drained_records",
            "Audit records the drain wrote to the audit log",
            audit_drained.clone(),
        );
        let audit_drains = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "audit_drains",
            "Polls of the enclave's audit trail, by outcome (ok, error)",
            audit_drains.clone(),
        );
        let s3_fetches = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "s3_fetches",
            "Fetches of the S3 secrets file, by outcome (ok, not_modified, or the error kind)",
            s3_fetches.clone(),
        );
        let log_events_relayed = Family::<LevelLabel, Counter>::default();
        registry.register(
            "enclave_log_events_relayed",
            "Enclave log events re-emitted into the daemon's log, by level",
            log_events_relayed.clone(),
        );
        let log_reads = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "enclave_log_reads",
            "Reads of the enclave's log ring, by outcome (ok, error)",
            log_reads.clone(),
        );
        enclave_breaker_state.set(-1);
        Metrics {
            registry,
            agent_requests,
            agent_latency,
            agent_denials,
            uid_cap: LabelCap::new(MAX_UID_LABELS),
            status_polls,
            loads,
            load_duration,
            forwarder_connections,
            forwarder_open,
            forwarder_bytes,
            enclave_up,
            enclave_ready,
            enclave_secrets,
            enclave_uptime,
            enclave_document_age,
            enclave_decrypt_age,
            enclave_refreshes,
            enclave_audit_buffered,
            enclave_audit_dropped,
            enclave_audit_gaps,
            enclave_audit_last_seq,
            enclave_kms_calls,
            enclave_breaker_state,
            enclave_breaker_failures,
            enclave_breaker_opened,
            enclave_log_buffered,
            enclave_log_dropped,
            audit_drained,
            audit_drains,
            audit_since_drain,
            last_audit_drain: Mutex::new(None),
            s3_fetches,
            log_events_relayed,
            log_reads,
            relayed: Mutex::new(Relayed::default()),
            health: std::sync::OnceLock::new(),
        }
    }

    /// Sets what `GET /health` answers (once; later calls are ignored):
    /// the daemon's configuration, for `keystore-host doctor`.
    pub fn set_health(&self, info: &crate::doctor::network::DaemonInfo) {
        if let Ok(json) = serde_json::to_string(info) {
            let _ = self.health.set(json);
        }
    }

    /// Counts one agent request: its operation ([`keystore_shared::protocol::RequestOp::kind`]), how it ended (`ok` or the
    /// protocol error code), its duration, and a denial by `uid`.
    pub fn agent_request(
        &self,
        op: &'static str,
        error: Option<ErrorCode>,
        uid: Option<u32>,
        took: Duration,
    ) {
        let outcome = error.map_or("ok", outcome_name);
        self.agent_requests
            .get_or_create(&OpOutcome { op, outcome })
            .inc();
        self.agent_latency
            .get_or_create(&OpLabel { op })
            .observe(took.as_secs_f64());
        if error == Some(ErrorCode::Denied) {
            self.agent_denials
                .get_or_create(&UidLabel {
                    uid: self.uid_cap.label(uid),
                })
                .inc();
        }
    }

    /// Counts one load attempt: `outcome` is `ok` or the failing step
    /// (`fetch`, `parse`, `enclave`).
    pub fn load(&self, outcome: &'static str, took: Duration) {
        self.loads.get_or_create(&OutcomeLabel { outcome }).inc();
        self.load_duration.observe(took.as_secs_f64());
    }

    /// Counts a forwarder connection whose upstream could not be reached.
    pub fn forwarder_unreachable(&self) {
        self.forwarder_connections
            .get_or_create(&OutcomeLabel {
                outcome: "upstream_unreachable",
            })
            .inc();
    }

    /// Counts a forwarded connection and holds it open until the guard
    /// drops.
    pub fn forwarder_opened(&self) -> OpenConnection {
        self.forwarder_connections
            .get_or_create(&OutcomeLabel {
                outcome: "forwarded",
            })
            .inc();
        self.forwarder_open.inc();
        OpenConnection(self.forwarder_open.clone())
    }

    /// The forwarded-bytes counters (to the upstream, to the enclave), for
    /// a connection to add to as each chunk passes.
    pub fn forwarder_byte_counters(&self) -> (Counter, Counter) {
        let counter = |direction| {
            self.forwarder_bytes
                .get_or_create(&DirectionLabel { direction })
                .clone()
        };
        (counter("to_upstream"), counter("to_enclave"))
    }

    /// Counts one poll of the audit trail: `Some(records written)` when it
    /// succeeded.
    pub fn audit_drain(&self, written: Option<usize>) {
        let outcome = if written.is_some() { "ok" } else { "error" };
        self.audit_drains
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        if let Some(written) = written {
            self.audit_drained
                .inc_by(u64::try_from(written).unwrap_or(u64::MAX));
            *self
                .last_audit_drain
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        }
    }

    /// Counts one fetch of the S3 secrets file: `ok`, `not_modified` or an
    /// error kind (a fixed set, [`crate::proxy::source::S3ErrorKind::as_str`]).
    pub fn s3_fetch(&self, outcome: &'static str) {
        self.s3_fetches
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Counts one read of the enclave's log ring and what it carried.
    pub fn log_read(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.log_reads
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Counts one enclave log event re-emitted at `level`.
    pub fn log_event_relayed(&self, level: LogLevel) {
        let level = match level {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        };
        self.log_events_relayed
            .get_or_create(&LevelLabel { level })
            .inc();
    }

    /// Sets the relayed gauges from an enclave's `Status` answer.
    pub fn set_status(&self, status: &StatusReport) {
        let ms = |v: Option<u64>| v.map_or(-1.0, |ms| ms as f64 / 1000.0);
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.enclave_up.set(1);
        self.enclave_ready.set(i64::from(status.ready));
        self.enclave_secrets.set(int(status.secret_count));
        self.enclave_uptime.set(status.uptime_ms as f64 / 1000.0);
        self.enclave_document_age.set(ms(status.document_age_ms));
        self.enclave_decrypt_age.set(ms(status.last_decrypt_age_ms));
        self.enclave_refreshes.set(int(status.refresh_count));
        if let Some(audit) = &status.audit {
            self.enclave_audit_buffered.set(int(audit.buffered));
            self.enclave_audit_dropped.set(int(audit.dropped));
            self.enclave_audit_gaps.set(int(audit.gaps));
            self.enclave_audit_last_seq
                .set(audit.last_seq.map_or(-1, int));
        }
        match &status.breaker {
            Some(breaker) => {
                self.enclave_breaker_state
                    .set(breaker_state_value(&breaker.state));
                self.enclave_breaker_failures
                    .set(int(breaker.consecutive_failures));
            }
            None => {
                self.enclave_breaker_state.set(-1);
            }
        }
        if let Some(logs) = &status.logs {
            self.enclave_log_buffered.set(int(logs.buffered));
            self.enclave_log_dropped.set(int(logs.dropped));
        }
        let mut relayed = self.relayed.lock().unwrap_or_else(PoisonError::into_inner);
        let restarted = status.uptime_ms < relayed.uptime_ms;
        relayed.uptime_ms = status.uptime_ms;
        if let Some(breaker) = &status.breaker {
            let more = relayed.advance(("breaker", "opened"), breaker.opened, restarted);
            self.enclave_breaker_opened.inc_by(more);
        }
        if restarted {
            // A new run counts from zero: forget the old run's values.
            relayed.counts.retain(|key, _| key.0 == "breaker");
        }
        if let Some(kms) = &status.kms {
            // Sums per label first: two entries mapped to `other` add up.
            let mut now: HashMap<(&'static str, &'static str), u64> = HashMap::new();
            for call in &kms.calls {
                let key = (
                    known_label(KMS_OPERATIONS, &call.operation),
                    known_label(KMS_CALL_OUTCOMES, &call.outcome),
                );
                let sum = now.entry(key).or_default();
                *sum = sum.saturating_add(call.count);
            }
            for ((operation, outcome), count) in now {
                let more = relayed.advance((operation, outcome), count, false);
                self.enclave_kms_calls
                    .get_or_create(&KmsCallLabels { operation, outcome })
                    .inc_by(more);
            }
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let last_drain = *self
            .last_audit_drain
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = last_drain {
            self.audit_since_drain.set(at.elapsed().as_secs_f64());
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// Polls the enclave's `Status` at `enclave` every `every` (over a
    /// privileged connection, as the enclave's ports require) until
    /// `shutdown` completes.
    pub async fn poll_status(
        self: Arc<Self>,
        enclave: Endpoint,
        every: Duration,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Kept open between polls: a connection per poll would put two
        // lines a poll into the enclave's (relayed) log.
        let mut client = None;
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = tick.tick() => {}
            }
            let reused = client.is_some();
            let mut polled =
                tokio::time::timeout(STATUS_TIMEOUT, fetch_status(&enclave, &mut client)).await;
            if !matches!(polled, Ok(Ok(_))) {
                client = None;
                // The kept connection may just have idled out: one retry
                // on a fresh one before the enclave counts as down.
                if reused {
                    polled =
                        tokio::time::timeout(STATUS_TIMEOUT, fetch_status(&enclave, &mut client))
                            .await;
                    if !matches!(polled, Ok(Ok(_))) {
                        client = None;
                    }
                }
            }
            match polled {
                Ok(Ok(status)) => {
                    self.set_status(&status);
                    self.status_polls
                        .get_or_create(&OutcomeLabel { outcome: "ok" })
                        .inc();
                }
                outcome => {
                    if let Ok(Err(err)) = &outcome {
                        tracing::debug!(%enclave, error = %err, "Status poll failed");
                    }
                    self.enclave_up.set(0);
                    self.status_polls
                        .get_or_create(&OutcomeLabel { outcome: "error" })
                        .inc();
                }
            }
        }
    }

    /// Serves `GET /metrics` on `listener` until `shutdown` completes.
    pub async fn serve(
        self: Arc<Self>,
        listener: Listener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let config = ServeConfig {
            max_connections: MAX_CONNECTIONS,
            idle_timeout: HEAD_TIMEOUT,
            max_lifetime: Some(CONNECTION_LIFETIME),
            ..ServeConfig::named("metrics")
        };
        serve(
            listener,
            Arc::new(MetricsHandler { metrics: self }),
            Arc::new(crate::agent::http::LocalPeers),
            config,
            shutdown,
        )
        .await
    }
}

/// An error code as a Prometheus label value.
fn outcome_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::NotFound => "not_found",
        ErrorCode::Denied => "denied",
        ErrorCode::NotReady => "not_ready",
        ErrorCode::BadRequest => "bad_request",
        ErrorCode::TooLarge => "too_large",
        ErrorCode::Unavailable => "unavailable",
        ErrorCode::Internal => "internal",
    }
}

/// One `Status` call over `client`'s privileged connection, opened first
/// if there is none.
async fn fetch_status(
    enclave: &Endpoint,
    client: &mut Option<Client>,
) -> Result<StatusReport, keystore_shared::ClientError> {
    let connected = match client {
        Some(connected) => connected,
        None => client.insert(
            Client::connect_with(
                enclave,
                ClientConfig {
                    privileged: true,
                    ..ClientConfig::default()
                },
            )
            .await?,
        ),
    };
    connected.status().await
}

/// Answers scrapes.
struct MetricsHandler {
    metrics: Arc<Metrics>,
}

impl MetricsHandler {
    fn answer(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let plain = |status, body: &'static str| {
            let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            *response.status_mut() = status;
            response
        };
        let path = request.uri().path();
        if path != "/metrics" && path != crate::doctor::network::HEALTH_PATH {
            return plain(StatusCode::NOT_FOUND, "Not found\n");
        }
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed\n");
        }
        if path == crate::doctor::network::HEALTH_PATH {
            return match self.metrics.health.get() {
                Some(json) => {
                    let mut response = Response::new(Full::new(Bytes::from(json.clone())));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/json"),
                    );
                    response
                }
                None => plain(StatusCode::NOT_FOUND, "Not found\n"),
            };
        }
        match self.metrics.encode() {
            Ok(text) => {
                let mut response = Response::new(Full::new(Bytes::from(text)));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(CONTENT_TYPE),
                );
                response
            }
            Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
        }
    }
}

impl Handler for MetricsHandler {
    async fn handle(&self, mut conn: Accepted) {
        let service = service_fn(|request: Request<Incoming>| {
            let response = self.answer(&request);
            async move { Ok::<_, std::convert::Infallible>(response) }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT)
            .max_buf_size(MAX_HEAD_BYTES)
            .max_headers(32)
            .keep_alive(false);
        let http = builder.serve_connection(TokioIo::new(conn.stream), service);
        tokio::pin!(http);
        tokio::select! {
            result = http.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "metrics connection ended");
                }
            }
            () = conn.shutdown.wait() => {
                http.as_mut().graceful_shutdown();
                let _ = http.await;
            }
        }
    }

    async fn refuse(&self, stream: &mut Stream, _refusal: &Refusal) {
        use tokio::io::AsyncWriteExt;
        let _ = stream
            .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await;
        let _ = stream.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_labels_are_capped() {
        let cap = LabelCap::new(3);
        assert_eq!(cap.label(Some(10)), "10");
        assert_eq!(cap.label(Some(11)), "11");
        assert_eq!(cap.label(Some(12)), "12");
        assert_eq!(cap.label(Some(13)), "other");
        assert_eq!(cap.label(Some(99)), "other");
        // Already seen values keep their own label.
        assert_eq!(cap.label(Some(11)), "11");
        assert_eq!(cap.label(None), "none");
    }

    #[test]
    fn denials_by_many_uids_stay_bounded() {
        let metrics = Metrics::new();
        let op = keystore_shared::protocol::RequestOp::List.kind();
        for uid in 0..1000 {
            metrics.agent_request(op, Some(ErrorCode::Denied), Some(uid), Duration::ZERO);
        }
        let text = metrics.encode().unwrap();
        let series = text
            .lines()
            .filter(|l| l.starts_with("keystore_agent_denials_total{"))
            .count();
        assert_eq!(series, MAX_UID_LABELS + 1);
        assert!(text.contains("keystore_agent_denials_total{uid=\"other\"} 936"));
        assert!(
            text.contains("keystore_agent_requests_total{op=\"list\",outcome=\"denied\"} 1000")
        );
    }

    /// `StatusReport` with these KMS counts, breaker opened count and
    /// uptime.
    fn status_with(calls: &[(&str, &str, u64)], opened: u64, uptime_ms: u64) -> StatusReport {
        use keystore_shared::protocol::{BreakerStatus, KmsCallCount, KmsCallStats};
        StatusReport {
            uptime_ms,
            kms: Some(KmsCallStats {
                calls: calls
                    .iter()
                    .map(|(operation, outcome, count)| KmsCallCount {
                        operation: (*operation).to_owned(),
                        outcome: (*outcome).to_owned(),
                        count: *count,
                    })
                    .collect(),
            }),
            breaker: Some(BreakerStatus {
                state: "open".into(),
                consecutive_failures: 4,
                next_probe_in_ms: Some(100),
                opened,
                last_failure: None,
            }),
            ..StatusReport::default()
        }
    }

    #[test]
    fn relayed_kms_counts_stay_monotonic_and_bounded() {
        let metrics = Metrics::new();
        metrics.set_status(&status_with(
            &[("Decrypt", "ok", 5), ("Decrypt", "ThrottlingException", 2)],
            1,
            1_000,
        ));
        metrics.set_status(&status_with(
            &[
                ("Decrypt", "ok", 7),
                ("Decrypt", "ThrottlingException", 2),
                // Labels a peer made up are counted as `other`, summed.
                ("Decrypt", "EvilException<script>", 1),
                ("Decrypt", "AnotherMadeUp", 2),
                ("Encrypt", "ok", 1),
            ],
            2,
            2_000,
        ));
        let text = metrics.encode().unwrap();
        let has = |line: &str| assert!(text.contains(line), "{line} missing:\n{text}");
        has("keystore_enclave_kms_calls_total{operation=\"Decrypt\",outcome=\"ok\"} 7\n");
        has(
            "keystore_enclave_kms_calls_total{operation=\"Decrypt\",outcome=\"ThrottlingException\"} 2\n",
        );
        has("keystore_enclave_kms_calls_total{operation=\"Decrypt\",outcome=\"other\"} 3\n");
        has("keystore_enclave_kms_calls_total{operation=\"other\",outcome=\"ok\"} 1\n");
        has("keystore_enclave_kms_breaker_opened_total 2\n");
        has("keystore_enclave_kms_breaker_state 2\n");
        has("keystore_enclave_kms_breaker_consecutive_failures 4\n");
        assert!(!text.contains("Evil"), "{text}");
        // The enclave restarts (uptime went down): its counts start over,
        // the daemon's counters keep growing.
        metrics.set_status(&status_with(&[("Decrypt", "ok", 3)], 1, 500));
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(
                "keystore_enclave_kms_calls_total{operation=\"Decrypt\",outcome=\"ok\"} 10\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("keystore_enclave_kms_breaker_opened_total 3\n"),
            "{text}"
        );
    }

    #[test]
    fn breaker_states_have_documented_values() {
        assert_eq!(breaker_state_value("closed"), 0);
        assert_eq!(breaker_state_value("half-open"), 1);
        assert_eq!(breaker_state_value("open"), 2);
        assert_eq!(breaker_state_value("melted"), -1);
        let text = Metrics::new().encode().unwrap();
        // No enclave seen yet: unknown.
        assert!(
            text.contains("keystore_enclave_kms_breaker_state -1\n"),
            "{text}"
        );
    }

    #[test]
    fn audit_drains_s3_fetches_and_relayed_logs_are_counted() {
        let metrics = Metrics::new();
        let text = metrics.encode().unwrap();
        assert!(
            text.contains("keystore_audit_seconds_since_last_drain -1.0\n"),
            "{text}"
        );
        metrics.audit_drain(Some(3));
        metrics.audit_drain(None);
        metrics.audit_drain(Some(0));
        metrics.s3_fetch("ok");
        metrics.s3_fetch("not_modified");
        metrics.s3_fetch("not_modified");
        metrics.log_read(true);
        metrics.log_event_relayed(LogLevel::Warn);
        metrics.log_event_relayed(LogLevel::Warn);
        let (up, down) = metrics.forwarder_byte_counters();
        up.inc_by(10);
        down.inc_by(20);
        let text = metrics.encode().unwrap();
        for line in [
            "keystore_audit_drained_records_total 3\n",
            "keystore_audit_drains_total{outcome=\"ok\"} 2\n",
            "keystore_audit_drains_total{outcome=\"error\"} 1\n",
            "keystore_s3_fetches_total{outcome=\"not_modified\"} 2\n",
            "keystore_enclave_log_reads_total{outcome=\"ok\"} 1\n",
            "keystore_enclave_log_events_relayed_total{level=\"warn\"} 2\n",
            "keystore_forwarder_bytes_total{direction=\"to_upstream\"} 10\n",
            "keystore_forwarder_bytes_total{direction=\"to_enclave\"} 20\n",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        let since = text
            .lines()
            .find_map(|l| l.strip_prefix("keystore_audit_seconds_since_last_drain "))
            .unwrap()
            .parse::<f64>()
            .unwrap();
        assert!(since >= 0.0, "{since}");
    }

    #[test]
    fn status_sets_gauges() {
        let metrics = Metrics::new();
        metrics.set_status(&StatusReport {
            ready: true,
            secret_count: 7,
            document_age_ms: Some(1500),
            ..StatusReport::default()
        });
        let text = metrics.encode().unwrap();
        assert!(text.contains("keystore_enclave_ready 1\n"), "{text}");
        assert!(text.contains("keystore_enclave_secrets_loaded 7\n"));
        assert!(text.contains("keystore_enclave_document_age_seconds 1.5\n"));
        assert!(text.contains("keystore_enclave_last_decrypt_age_seconds -1.0\n"));
    }
}
