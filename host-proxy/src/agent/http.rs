//! The agent's HTTP front, compatible with the AWS Secrets Manager Agent
//! (<https://github.com/aws/aws-secretsmanager-agent>), so code written for
//! it reads keystore secrets unchanged:
//!
//! - `GET /ping` → `200 healthy`, no token needed;
//! - `GET /secretsmanager/get?secretId=NAME` and `GET /v1/NAME` →
//!   `GetSecretValue`-shaped JSON: `ARN`, `Name`, `VersionId`,
//!   `SecretString` (UTF-8 values) or `SecretBinary` (base64), `VersionStages`
//!   `["AWSCURRENT"]`, `CreatedDate`; `versionStage`, `versionId` and
//!   `refreshNow` are accepted as the Secrets Manager Agent accepts them;
//! - every other request needs `X-Aws-Parameters-Secrets-Token` (or
//!   `X-Vault-Token`) holding a token the agent knows ([`super::token`]);
//!   missing or wrong is `403 Bad Token`, a request with `X-Forwarded-For`
//!   is `400 Forwarded`, another method `405 Not allowed`, another path
//!   `404 Not found` — the Secrets Manager Agent's answers;
//! - errors from the enclave use Secrets Manager's `__type` names:
//!   `ResourceNotFoundException`, `AccessDeniedException` (400),
//!   `InvalidParameterException` (400), `InternalServiceError` (503 while
//!   the enclave is not ready or unavailable), and the agent's own
//!   `ConnectionError` (502), `TimeoutError` (504), `InternalFailure` (500).
//!
//! - `POST /` with `X-Amz-Target: secretsmanager.GetSecretValue` (the
//!   Secrets Manager API's own JSON protocol, body at most 16 KiB) answers
//!   the same with a numeric `CreatedDate`, so an AWS SDK whose endpoint is
//!   the agent and which adds the token header works too.
//!
//! The token stands for an identity; that identity is the caller the enclave
//! checks its rules against. Bounds: request heads are limited by hyper's
//! read buffer ([`MAX_HEAD_BYTES`]) and header count, a head must arrive
//! within [`HEAD_TIMEOUT`], a request is answered within
//! [`REQUEST_TIMEOUT`], and connections are `shared::serve`'s (slots, idle
//! and lifetime bounds). The JSON holding a value is built in one exactly
//! sized, wiped-on-drop buffer and handed to hyper without a copy.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use keystore_shared::endpoint::{Peer, Stream};
use keystore_shared::protocol::{ErrorCode, RequestOp, ResponseBody, SecretBytes};
use keystore_shared::serve::{Accepted, Handler, PeerDenied, PeerPolicy, Refusal};
use keystore_shared::{Caller, ClientError};
use serde::Serialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::pool::{Pool, PoolError};
use super::query::{Query, parse_json, parse_path, parse_query};
use super::token::Tokens;

/// The token headers the Secrets Manager Agent checks by default.
pub const TOKEN_HEADERS: [&str; 2] = ["X-Aws-Parameters-Secrets-Token", "X-Vault-Token"];
/// The default address, as the Secrets Manager Agent's.
pub const DEFAULT_HTTP_LISTEN: &str = "tcp://127.0.0.1:2773";
/// Path prefix of path-style requests.
pub const PATH_PREFIX: &str = "/v1/";
/// hyper's read buffer, which bounds a request head (line and headers).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most headers in a request.
const MAX_HEADERS: usize = 64;
/// Time allowed for a request head to arrive.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to answer one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The header naming an AWS JSON-protocol operation.
const AMZ_TARGET: &str = "X-Amz-Target";
/// Largest AWS JSON request body read.
const MAX_JSON_BODY: usize = 16 * 1024;
/// The only staging label the keystore serves.
const AWSCURRENT: &str = "AWSCURRENT";

/// Serves TCP peers on a loopback address (and unix peers, whom file
/// permissions already select), like the Secrets Manager Agent, which
/// listens on localhost only.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalPeers;

impl PeerPolicy for LocalPeers {
    fn check(&self, peer: &Peer) -> Result<(), PeerDenied> {
        match peer {
            Peer::Tcp(addr) if addr.ip().is_loopback() => Ok(()),
            Peer::Unix { .. } => Ok(()),
            other => Err(PeerDenied {
                reason: format!("{other} is not a local peer"),
            }),
        }
    }
}

/// Serves HTTP on each admitted connection.
pub struct HttpHandler {
    shared: Arc<Shared>,
}

struct Shared {
    pool: Arc<Pool>,
    tokens: Arc<Tokens>,
    /// Random per process: keys `VersionId`, so it changes with the value
    /// without being a plain hash of it.
    version_key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for HttpHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpHandler")
            .field("tokens", &self.shared.tokens)
            .finish_non_exhaustive()
    }
}

impl HttpHandler {
    /// A handler forwarding through `pool`, admitting `tokens`.
    pub fn new(pool: Arc<Pool>, tokens: Arc<Tokens>) -> Self {
        let mut version_key = Zeroizing::new([0u8; 32]);
        rand::fill(&mut *version_key);
        HttpHandler {
            shared: Arc::new(Shared {
                pool,
                tokens,
                version_key,
            }),
        }
    }
}

impl Handler for HttpHandler {
    async fn handle(&self, mut conn: Accepted) {
        let shared = self.shared.clone();
        let standing = conn.stream.standing();
        let service = service_fn(move |request: Request<Incoming>| {
            let shared = shared.clone();
            // Not evicted for a newcomer while this request is answered.
            let working = standing.working();
            async move {
                let answer = tokio::time::timeout(REQUEST_TIMEOUT, shared.answer(request)).await;
                drop(working);
                Ok::<_, std::convert::Infallible>(answer.unwrap_or_else(|_| {
                    error(StatusCode::GATEWAY_TIMEOUT, "TimeoutError", "Timeout")
                }))
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT)
            .max_buf_size(MAX_HEAD_BYTES)
            .max_headers(MAX_HEADERS)
            .keep_alive(true);
        let http = builder.serve_connection(TokioIo::new(conn.stream), service);
        tokio::pin!(http);
        tokio::select! {
            result = http.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "HTTP connection ended");
                }
            }
            () = conn.shutdown.wait() => {
                http.as_mut().graceful_shutdown();
                let _ = http.await;
            }
        }
    }

    async fn refuse(&self, stream: &mut Stream, refusal: &Refusal) {
        use tokio::io::AsyncWriteExt;
        let (status, text) = match refusal {
            Refusal::Busy { .. } => ("429 Too Many Requests", "Connection limit exceeded"),
            Refusal::Denied(_) => ("403 Forbidden", "Forbidden"),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
            text.len()
        );
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    }
}

/// A plain-text answer, as the Secrets Manager Agent gives for its own
/// refusals.
fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

/// A Secrets Manager error: `{"__type": ..., "message": ...}`.
fn error(status: StatusCode, kind: &str, message: &str) -> Response<Full<Bytes>> {
    let body = if kind == "InternalFailure" || message.is_empty() {
        serde_json::json!({ "__type": "InternalFailure" })
    } else {
        serde_json::json!({ "__type": kind, "message": message })
    };
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-amz-json-1.1"),
    );
    response
}

impl Shared {
    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path();
        if path == "/ping" {
            return text(StatusCode::OK, "healthy");
        }
        let headers = request.headers();
        if headers.contains_key("X-Forwarded-For") {
            tracing::warn!("HTTP request with X-Forwarded-For refused");
            return text(StatusCode::BAD_REQUEST, "Forwarded");
        }
        let Some(caller) = self.caller(headers) else {
            tracing::warn!("HTTP request with a missing or unknown token refused");
            return text(StatusCode::FORBIDDEN, "Bad Token");
        };
        if request.method() == Method::POST && path == "/" && headers.contains_key(AMZ_TARGET) {
            return self.aws_json(request, caller).await;
        }
        if request.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "Not allowed");
        }
        let query = if path == "/secretsmanager/get" {
            parse_query(request.uri().query().unwrap_or_default())
        } else if let Some(rest) = path.strip_prefix(PATH_PREFIX) {
            parse_path(rest, request.uri().query().unwrap_or_default())
        } else {
            return text(StatusCode::NOT_FOUND, "Not found");
        };
        let query = match query {
            Ok(query) => query,
            Err(message) => {
                let mut response = Response::new(Full::new(Bytes::from(message)));
                *response.status_mut() = StatusCode::BAD_REQUEST;
                return response;
            }
        };
        self.get_secret_value(&query, caller, Dates::AgentString)
            .await
    }

    /// `POST /` with `X-Amz-Target: secretsmanager.GetSecretValue` and a
    /// JSON body: the Secrets Manager API itself, so an AWS SDK pointed at
    /// the agent (`endpoint_url`) can call `get_secret_value` (the request
    /// signature is not checked: the token is what authenticates).
    async fn aws_json(&self, request: Request<Incoming>, caller: Caller) -> Response<Full<Bytes>> {
        let target = request
            .headers()
            .get(AMZ_TARGET)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        if target != "secretsmanager.GetSecretValue" {
            return error(
                StatusCode::BAD_REQUEST,
                "UnknownOperationException",
                "the agent answers secretsmanager.GetSecretValue only",
            );
        }
        let body = Limited::new(request.into_body(), MAX_JSON_BODY);
        let bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequestException",
                    "the request body is unreadable or larger than 16 KiB",
                );
            }
        };
        let query = match parse_json(&bytes) {
            Ok(query) => query,
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidParameterException",
                    "the body must be a JSON object with a string SecretId",
                );
            }
        };
        self.get_secret_value(&query, caller, Dates::ApiNumber)
            .await
    }

    /// The identity of the first known token among the token headers.
    fn caller(&self, headers: &HeaderMap) -> Option<Caller> {
        TOKEN_HEADERS
            .iter()
            .flat_map(|name| headers.get_all(*name))
            .find_map(|value| self.tokens.check(value.as_bytes()))
    }

    async fn get_secret_value(
        &self,
        query: &Query,
        caller: Caller,
        dates: Dates,
    ) -> Response<Full<Bytes>> {
        let not_found = |what: String| {
            error(
                StatusCode::BAD_REQUEST,
                "ResourceNotFoundException",
                &format!("Secrets Manager can't find the specified secret value for {what}"),
            )
        };
        if let Some(stage) = &query.version_stage
            && stage != AWSCURRENT
        {
            return not_found(format!("staging label: {stage}"));
        }
        let who = caller.to_string();
        let op = RequestOp::Get {
            name: query.secret_id.clone(),
        };
        let value = match self.pool.call(op, Some(caller)).await {
            Ok(ResponseBody::Secret { name, value }) if name == query.secret_id => value,
            Ok(_) => {
                return error(StatusCode::INTERNAL_SERVER_ERROR, "InternalFailure", "");
            }
            Err(err) => {
                tracing::info!(caller = %who, outcome = err.code().as_str(), "HTTP get");
                return pool_error(&err);
            }
        };
        let version_id = self.version_id(&query.secret_id, &value);
        if let Some(asked) = &query.version_id
            && *asked != version_id
        {
            return not_found(format!("VersionId: {asked}"));
        }
        tracing::info!(caller = %who, outcome = "ok", "HTTP get");
        match secret_json(&query.secret_id, &version_id, &value, dates) {
            Ok(body) => {
                let mut response = Response::new(Full::new(Bytes::from_owner(Wiped(body))));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                response
            }
            Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "InternalFailure", ""),
        }
    }

    /// A UUID-shaped id of this value of this secret: a keyed hash, so it
    /// changes when the value does but says nothing about the value to
    /// anyone who sees only the id.
    fn version_id(&self, name: &str, value: &SecretBytes) -> String {
        let mut hash = Sha256::new();
        hash.update(*self.version_key);
        hash.update((name.len() as u64).to_be_bytes());
        hash.update(name.as_bytes());
        hash.update(value.expose());
        let digest = hex::encode(&hash.finalize()[..16]);
        format!(
            "{}-{}-{}-{}-{}",
            &digest[0..8],
            &digest[8..12],
            &digest[12..16],
            &digest[16..20],
            &digest[20..32]
        )
    }
}

/// The answer to a failed read, as Secrets Manager (or its agent) names it.
fn pool_error(err: &PoolError) -> Response<Full<Bytes>> {
    let message = err.message();
    match err {
        PoolError::Busy { .. } => text(StatusCode::TOO_MANY_REQUESTS, "Connection limit exceeded"),
        PoolError::Client(ClientError::Timeout { .. } | ClientError::ConnectTimeout { .. }) => {
            error(StatusCode::GATEWAY_TIMEOUT, "TimeoutError", "Timeout")
        }
        PoolError::Client(ClientError::Server { code, .. }) => match code {
            ErrorCode::NotFound => error(
                StatusCode::BAD_REQUEST,
                "ResourceNotFoundException",
                &message,
            ),
            ErrorCode::Denied => error(StatusCode::BAD_REQUEST, "AccessDeniedException", &message),
            ErrorCode::BadRequest | ErrorCode::TooLarge => error(
                StatusCode::BAD_REQUEST,
                "InvalidParameterException",
                &message,
            ),
            ErrorCode::NotReady | ErrorCode::Unavailable => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "InternalServiceError",
                &message,
            ),
            ErrorCode::Internal => error(StatusCode::INTERNAL_SERVER_ERROR, "InternalFailure", ""),
        },
        PoolError::Client(_) => error(StatusCode::BAD_GATEWAY, "ConnectionError", "Read Error"),
    }
}

/// The `GetSecretValue` answer, in the Secrets Manager Agent's field order.
#[derive(Serialize)]
struct SecretValueJson<'a> {
    #[serde(rename = "ARN")]
    arn: String,
    #[serde(rename = "Name")]
    name: &'a str,
    #[serde(rename = "VersionId")]
    version_id: &'a str,
    #[serde(rename = "SecretString", skip_serializing_if = "Option::is_none")]
    secret_string: Option<&'a str>,
    #[serde(rename = "SecretBinary", skip_serializing_if = "Option::is_none")]
    secret_binary: Option<&'a str>,
    #[serde(rename = "VersionStages")]
    version_stages: [&'static str; 1],
    #[serde(rename = "CreatedDate")]
    created_date: serde_json::Value,
}

/// How `CreatedDate` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dates {
    /// As the Secrets Manager Agent writes it: a string of fractional
    /// seconds.
    AgentString,
    /// As the Secrets Manager API does: a number of seconds.
    ApiNumber,
}

/// The ARN the agent reports for a secret: keystore secrets have no AWS
/// ARN, so this names the keystore instead of pretending to be one.
pub fn secret_arn(name: &str) -> String {
    format!("arn:nitro-keystore:secretsmanager:local:secret:{name}")
}

/// Serializes the answer into one exactly sized buffer that is wiped on
/// drop (a first pass counts the bytes, so nothing is reallocated).
fn secret_json(
    name: &str,
    version_id: &str,
    value: &SecretBytes,
    dates: Dates,
) -> Result<Zeroizing<Vec<u8>>, serde_json::Error> {
    let binary;
    let (secret_string, secret_binary) = match std::str::from_utf8(value.expose()) {
        Ok(text) => (Some(text), None),
        Err(_) => {
            let engine = &base64::engine::general_purpose::STANDARD;
            let mut encoded =
                Zeroizing::new(String::with_capacity(value.len().div_ceil(3) * 4 + 4));
            engine.encode_string(value.expose(), &mut encoded);
            binary = encoded;
            (None, Some(binary.as_str()))
        }
    };
    // The time of this answer: the keystore keeps no creation date, and
    // Secrets Manager Agent clients only display it.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let answer = SecretValueJson {
        arn: secret_arn(name),
        name,
        version_id,
        secret_string,
        secret_binary,
        version_stages: [AWSCURRENT],
        created_date: match dates {
            Dates::AgentString => format!("{}.{:03}", now.as_secs(), now.subsec_millis()).into(),
            Dates::ApiNumber => serde_json::json!(now.as_millis() as f64 / 1000.0),
        },
    };
    let mut counter = Counter(0);
    serde_json::to_writer(&mut counter, &answer)?;
    let mut out = Zeroizing::new(Vec::with_capacity(counter.0));
    serde_json::to_writer(&mut *out, &answer)?;
    Ok(out)
}

/// Counts bytes written.
struct Counter(usize);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 = self.0.saturating_add(buf.len());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A response body hyper can hold without copying, wiped when dropped.
struct Wiped(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for Wiped {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_get_secret_value_shape() {
        let value = SecretBytes::new(b"hunter2".to_vec());
        let json: serde_json::Value = serde_json::from_slice(
            &secret_json("db/password", "v-1", &value, Dates::AgentString).unwrap(),
        )
        .unwrap();
        assert_eq!(json["Name"], "db/password");
        assert_eq!(json["SecretString"], "hunter2");
        assert!(json.get("SecretBinary").is_none());
        assert_eq!(json["VersionStages"], serde_json::json!(["AWSCURRENT"]));
        assert_eq!(json["VersionId"], "v-1");
        assert_eq!(json["ARN"], secret_arn("db/password"));
        assert!(json["CreatedDate"].as_str().unwrap().contains('.'));

        let binary = SecretBytes::new(vec![0xff, 0x00, 0xfe]);
        let json: serde_json::Value =
            serde_json::from_slice(&secret_json("bin", "v", &binary, Dates::ApiNumber).unwrap())
                .unwrap();
        assert_eq!(json["SecretBinary"], "/wD+");
        assert!(json["CreatedDate"].is_f64());
        assert!(json.get("SecretString").is_none());
    }
}
