//! The HTTPS front of the emulator: TLS (rustls, ring), HTTP/1.1 (hyper),
//! bounded bodies and waits, fault injection, SigV4, dispatch to the KMS
//! operations, and the admin endpoint.
//!
//! # KMS requests
//! `POST /` with `X-Amz-Target: TrentService.<Operation>` and a SigV4
//! `Authorization`. Order of checks: body size and read deadline, target,
//! call counted, faults (latency, then throttle / 5xx / drop), SigV4, then
//! the operation. Errors are `{"__type", "message"}` with the
//! `x-amzn-ErrorType` header.
//!
//! # Admin endpoint (no SigV4; answered only to loopback peers)
//! - `GET /__admin/calls`: per-operation [`CallStats`](super::CallStats) as
//!   `{"Decrypt": {"calls", "with_recipient", "plaintext_responses",
//!   "errors", "faulted"}, ...}`; `DELETE` zeroes them.
//! - `POST /__admin/faults`: `{"kind": "latency" | "throttle" |
//!   "internal_error" | "drop_connection", "latency_ms"?, "operation"?:
//!   "Decrypt", "next"?: N | "fraction"?: 0.5}` (default: the next call);
//!   answers `{"pending": n}`. `DELETE` clears all faults.
//! - `POST /__admin/clock`: `{"advance_ms": 360000}` and/or
//!   `{"reset": true}`; answers `{"offset_ms": n}`.
//! - `POST /__admin/credentials`: `{"replace": bool, "credentials":
//!   [{"access_key_id", "secret_access_key", "session_token"?,
//!   "expires_at"? (Unix seconds)}]}`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use keystore_shared::endpoint::Peer;
use keystore_shared::serve::{Accepted, Handler, ServeConfig};
use serde::Deserialize;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::clock::Clock;
use super::faults::{CallCounter, Fault, FaultKind, Faults};
use super::protocol::{CONTENT_TYPE, ErrorKind, KmsError, Operation};
use super::service::Kms;
use super::sigv4::{self, Credential, CredentialStore, SignedRequest};

/// Prefix of the admin endpoint's paths.
pub const ADMIN_PREFIX: &str = "/__admin/";
/// TLS handshake deadline.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for a request's headers, and separately for its body.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once; later ones wait for a slot.
pub const MAX_CONNECTIONS: usize = 256;
/// An idle keep-alive connection is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long shutdown waits for requests in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Everything request handling needs, shared by all connections.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) kms: Kms,
    pub(crate) credentials: CredentialStore,
    pub(crate) faults: Faults,
    pub(crate) calls: CallCounter,
    pub(crate) clock: Arc<Clock>,
    pub(crate) region: String,
    pub(crate) max_body: usize,
}

/// Returned by the service to make hyper close the connection unanswered.
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by fault injection")]
struct DropConnection;

/// Limits of the emulator's listener: connections beyond the slots wait
/// (as the SDK would only retry), idle keep-alive connections close after a
/// while, and shutdown waits [`SHUTDOWN_GRACE`] for requests in flight.
pub(crate) fn serve_config() -> ServeConfig {
    ServeConfig {
        max_connections: MAX_CONNECTIONS,
        admission_wait: Duration::from_secs(30),
        idle_timeout: IDLE_TIMEOUT,
        max_lifetime: None,
        shutdown_grace: SHUTDOWN_GRACE,
        ..ServeConfig::named("mock-kms")
    }
}

/// TLS, then HTTP/1.1, on each connection [`serve`](keystore_shared::serve::serve)
/// admits.
pub(crate) struct KmsHandler {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) shared: Arc<Shared>,
}

impl Handler for KmsHandler {
    async fn handle(&self, mut conn: Accepted) {
        let Peer::Tcp(peer) = conn.peer else {
            // The admin endpoint trusts loopback peers only; a peer without
            // an IP address is not served.
            debug!(peer = %conn.peer, "not a TCP peer; closing");
            return;
        };
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(conn.stream))
            .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        let shared = Arc::clone(&self.shared);
        let service = service_fn(move |request| {
            let shared = Arc::clone(&shared);
            async move { handle(request, peer, &shared).await }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(READ_TIMEOUT)
            .keep_alive(true);
        let http = builder.serve_connection(TokioIo::new(tls), service);
        tokio::pin!(http);
        tokio::select! {
            result = http.as_mut() => {
                if let Err(e) = result {
                    debug!(%peer, error = %e, "connection ended");
                }
            }
            () = conn.shutdown.wait() => {
                http.as_mut().graceful_shutdown();
                let _ = http.await;
            }
        }
    }
}

async fn handle(
    request: Request<Incoming>,
    peer: SocketAddr,
    shared: &Shared,
) -> Result<Response<Full<Bytes>>, DropConnection> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();

    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > shared.max_body as u64) {
        return Ok(too_large(shared.max_body));
    }
    let body =
        match tokio::time::timeout(READ_TIMEOUT, Limited::new(body, shared.max_body).collect())
            .await
        {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) => {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    return Ok(too_large(shared.max_body));
                }
                debug!(%peer, error = %e, "reading body failed");
                return Err(DropConnection);
            }
            Err(_) => {
                debug!(%peer, "body read timed out");
                return Err(DropConnection);
            }
        };

    if let Some(admin_path) = path.strip_prefix(ADMIN_PREFIX) {
        if !peer.ip().is_loopback() {
            return Ok(json(
                StatusCode::FORBIDDEN,
                r#"{"error":"admin endpoint is loopback-only"}"#,
            ));
        }
        return Ok(admin(&parts.method, admin_path, &body, shared));
    }

    if parts.method != Method::POST || path != "/" {
        return Ok(kms_error(&KmsError::new(
            ErrorKind::UnknownOperation,
            "KMS requests are POST / with X-Amz-Target: TrentService.<Operation>",
        )));
    }
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let operation = match Operation::from_target(target) {
        Ok(op) => op,
        Err(e) => return Ok(kms_error(&e)),
    };
    shared.calls.update(operation, |s| s.calls += 1);

    let decision = shared.faults.decide(operation);
    if !decision.delay.is_zero() {
        tokio::time::sleep(decision.delay).await;
    }
    let fault_error = match decision.failure {
        None | Some(FaultKind::Latency(_)) => None,
        Some(FaultKind::DropConnection) => {
            shared.calls.update(operation, |s| s.faulted += 1);
            debug!(%operation, "fault: dropping connection");
            return Err(DropConnection);
        }
        Some(FaultKind::Throttle) => Some(KmsError::new(
            ErrorKind::Throttling,
            "Rate exceeded (injected by mock-kms)",
        )),
        Some(FaultKind::InternalError) => Some(KmsError::new(
            ErrorKind::Internal,
            "Internal failure (injected by mock-kms)",
        )),
    };
    if let Some(error) = fault_error {
        shared.calls.update(operation, |s| {
            s.faulted += 1;
            s.errors += 1;
        });
        return Ok(kms_error(&error));
    }

    let result = check_content_type(&parts.headers).and_then(|()| {
        let signed = SignedRequest {
            method: parts.method.as_str(),
            path_and_query: parts
                .uri
                .path_and_query()
                .map_or("/", http::uri::PathAndQuery::as_str),
            headers: &parts.headers,
            body: &body,
        };
        let caller = sigv4::verify(
            &signed,
            &shared.credentials,
            &shared.region,
            shared.clock.now(),
        )?;
        shared.kms.handle(operation, &caller, &body, &shared.calls)
    });
    match result {
        Ok(body) => Ok(json(StatusCode::OK, body)),
        Err(error) => {
            shared.calls.update(operation, |s| s.errors += 1);
            debug!(%operation, error = %error, "KMS error");
            Ok(kms_error(&error))
        }
    }
}

fn check_content_type(headers: &http::HeaderMap) -> Result<(), KmsError> {
    match headers.get(header::CONTENT_TYPE).map(HeaderValue::to_str) {
        None => Ok(()),
        Some(Ok(ct)) if ct.starts_with("application/x-amz-json-1.") => Ok(()),
        Some(_) => Err(KmsError::new(
            ErrorKind::Serialization,
            format!("Content-Type must be {CONTENT_TYPE}"),
        )),
    }
}

fn too_large(max: usize) -> Response<Full<Bytes>> {
    let mut response = kms_error(&KmsError::new(
        ErrorKind::Validation,
        format!("request body exceeds {max} bytes"),
    ));
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    if let Ok(id) = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()) {
        headers.insert("x-amzn-requestid", id);
    }
    response
}

fn kms_error(error: &KmsError) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(error.kind.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = json(status, error.to_body());
    response.headers_mut().insert(
        "x-amzn-errortype",
        HeaderValue::from_static(error.kind.type_name()),
    );
    response
}

/// A fault as the admin endpoint takes it:
/// `{"kind": "throttle" | "internal_error" | "drop_connection" | "latency",
///   "latency_ms": 200, "operation": "Decrypt", "next": 2 | "fraction": 0.5}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultSpec {
    kind: String,
    #[serde(default)]
    latency_ms: Option<u64>,
    #[serde(default)]
    operation: Option<String>,
    #[serde(default)]
    next: Option<u32>,
    #[serde(default)]
    fraction: Option<f64>,
}

impl FaultSpec {
    fn into_fault(self) -> Result<Fault, String> {
        let kind = match (self.kind.as_str(), self.latency_ms) {
            ("latency", Some(ms)) => FaultKind::Latency(Duration::from_millis(ms)),
            ("latency", None) => return Err("latency needs latency_ms".into()),
            (_, Some(_)) => return Err("latency_ms only applies to kind \"latency\"".into()),
            ("throttle", None) => FaultKind::Throttle,
            ("internal_error", None) => FaultKind::InternalError,
            ("drop_connection", None) => FaultKind::DropConnection,
            (other, None) => return Err(format!("unknown fault kind {other:?}")),
        };
        let mut fault = Fault::new(kind);
        fault = match (self.next, self.fraction) {
            (Some(n), None) => fault.next(n),
            (None, Some(f)) if (0.0..=1.0).contains(&f) => fault.fraction(f),
            (None, Some(_)) => return Err("fraction must be within 0.0..=1.0".into()),
            (None, None) => fault,
            (Some(_), Some(_)) => return Err("give next or fraction, not both".into()),
        };
        if let Some(op) = self.operation {
            let op =
                Operation::from_name(&op).ok_or_else(|| format!("unknown operation {op:?}"))?;
            fault = fault.on(op);
        }
        Ok(fault)
    }
}

/// `{"advance_ms": 360000}` or `{"reset": true}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockSpec {
    #[serde(default)]
    advance_ms: Option<u64>,
    #[serde(default)]
    reset: bool,
}

/// `{"credentials": [{"access_key_id": ..., "secret_access_key": ...,
///   "session_token": ..., "expires_at": <unix seconds>}], "replace": true}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsSpec {
    credentials: Vec<Credential>,
    #[serde(default)]
    replace: bool,
}

fn admin(method: &Method, path: &str, body: &[u8], shared: &Shared) -> Response<Full<Bytes>> {
    let bad = |message: String| {
        json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "error": message }).to_string(),
        )
    };
    let ok = |value: serde_json::Value| json(StatusCode::OK, value.to_string());
    match (method, path) {
        (&Method::GET, "calls") => {
            let all: BTreeMap<String, _> = shared
                .calls
                .all()
                .into_iter()
                .map(|(op, stats)| (op.name().to_owned(), stats))
                .collect();
            ok(serde_json::to_value(all).unwrap_or_default())
        }
        (&Method::DELETE, "calls") => {
            shared.calls.reset();
            ok(serde_json::json!({}))
        }
        (&Method::POST, "faults") => {
            match serde_json::from_slice::<FaultSpec>(body)
                .map_err(|e| e.to_string())
                .and_then(FaultSpec::into_fault)
            {
                Ok(fault) if shared.faults.inject(fault) => {
                    ok(serde_json::json!({ "pending": shared.faults.pending() }))
                }
                Ok(_) => bad("too many faults pending".into()),
                Err(e) => bad(e),
            }
        }
        (&Method::DELETE, "faults") => {
            shared.faults.clear();
            ok(serde_json::json!({ "pending": 0 }))
        }
        (&Method::POST, "clock") => match serde_json::from_slice::<ClockSpec>(body) {
            Ok(spec) => {
                if spec.reset {
                    shared.clock.reset();
                }
                if let Some(ms) = spec.advance_ms {
                    shared.clock.advance(Duration::from_millis(ms));
                }
                let offset = u64::try_from(shared.clock.offset().as_millis()).unwrap_or(u64::MAX);
                ok(serde_json::json!({ "offset_ms": offset }))
            }
            Err(e) => bad(e.to_string()),
        },
        (&Method::POST, "credentials") => match serde_json::from_slice::<CredentialsSpec>(body) {
            Ok(spec) => {
                let count = spec.credentials.len();
                if spec.replace {
                    shared.credentials.replace(spec.credentials);
                } else {
                    spec.credentials
                        .into_iter()
                        .for_each(|c| shared.credentials.insert(c));
                }
                ok(serde_json::json!({ "updated": count }))
            }
            Err(e) => bad(e.to_string()),
        },
        _ => json(
            StatusCode::NOT_FOUND,
            r#"{"error":"admin paths: GET|DELETE calls, POST|DELETE faults, POST clock, POST credentials"}"#,
        ),
    }
}
