//! The HTTP connector `aws-sdk-kms` uses inside the enclave (DESIGN.md, "The
//! enclave's KMS transport").
//!
//! The enclave has no network; its only way out is the host proxy's vsock
//! port, which forwards bytes to KMS untouched. So this connector dials an
//! [`Endpoint`] (the proxy), runs TLS *inside the enclave* with rustls and
//! the webpki roots, and names the KMS host (never the proxy) in SNI and
//! certificate verification: the host only ever sees ciphertext, and a
//! compromised host cannot impersonate KMS without a certificate for the KMS
//! name.
//!
//! HTTP/1.1 connections are kept alive in a bounded pool so that a load of
//! many values pays one TLS handshake per concurrent worker, not one per
//! value. Every wait (dial, handshake, whole call) and the response size are
//! bounded, and every failure names its stage through [`TransportError`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use keystore_shared::endpoint::{Endpoint, EndpointError, Stream};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Default time to dial the proxy.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time for the TLS handshake with KMS (through the proxy).
pub const DEFAULT_TLS_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time for one whole HTTP exchange, connection set-up included.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time an idle connection is kept for reuse. KMS closes idle
/// connections itself after a while; staying below that avoids reusing a
/// connection the server is about to drop.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// Default bound on idle connections kept for reuse.
pub const DEFAULT_MAX_IDLE_CONNECTIONS: usize = 16;
/// Default largest response body accepted. A `Decrypt` answer carrying a
/// 4 KiB value is about 8 KiB of JSON; 1 MiB leaves room for error pages
/// while still bounding what an untrusted peer can make us buffer.
pub const DEFAULT_MAX_RESPONSE_LEN: usize = 1024 * 1024;
/// Most PEM certificates accepted in an extra CA bundle.
const MAX_EXTRA_CA_CERTS: usize = 16;

/// How the enclave reaches KMS.
#[derive(Clone, PartialEq, Eq)]
pub struct TransportConfig {
    /// Where to dial: the host proxy's KMS forwarder (vsock://3:800 in
    /// production; tcp/unix in tests).
    pub proxy: Endpoint,
    /// The KMS host name: SNI, certificate name and HTTP `Host`, e.g.
    /// `kms.us-east-1.amazonaws.com`. Never the proxy's address.
    pub kms_host: String,
    /// An extra trusted CA bundle (PEM), on top of the webpki roots. Only
    /// for the KMS emulator's test CA; see
    /// [`crate::kms::KmsConfig::check_extra_ca`].
    pub extra_ca_pem: Option<Vec<u8>>,
    /// Time to dial the proxy.
    pub connect_timeout: Duration,
    /// Time for the TLS handshake.
    pub tls_timeout: Duration,
    /// Time for one whole HTTP exchange (including any connection set-up).
    pub call_timeout: Duration,
    /// How long an idle connection is kept for reuse.
    pub idle_timeout: Duration,
    /// Most idle connections kept for reuse.
    pub max_idle_connections: usize,
    /// Largest response body accepted.
    pub max_response_len: usize,
}

impl TransportConfig {
    /// Defaults for `kms_host` reached through `proxy`.
    pub fn new(proxy: Endpoint, kms_host: impl Into<String>) -> TransportConfig {
        TransportConfig {
            proxy,
            kms_host: kms_host.into(),
            extra_ca_pem: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            tls_timeout: DEFAULT_TLS_TIMEOUT,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_idle_connections: DEFAULT_MAX_IDLE_CONNECTIONS,
            max_response_len: DEFAULT_MAX_RESPONSE_LEN,
        }
    }
}

impl fmt::Debug for TransportConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportConfig")
            .field("proxy", &self.proxy)
            .field("kms_host", &self.kms_host)
            .field("extra_ca", &self.extra_ca_pem.as_ref().map(Vec::len))
            .field("connect_timeout", &self.connect_timeout)
            .field("tls_timeout", &self.tls_timeout)
            .field("call_timeout", &self.call_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_idle_connections", &self.max_idle_connections)
            .field("max_response_len", &self.max_response_len)
            .finish()
    }
}

/// Why an HTTP exchange with KMS failed, by stage.
///
/// Cloneable (reasons are kept as text) so the KMS client can recover it
/// from the SDK's error chain. Never carries request or response bodies.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The TLS or transport configuration is unusable.
    #[error("KMS transport configuration: {0}")]
    Config(String),
    /// Dialing the proxy failed.
    #[error("proxy connect: cannot reach the KMS proxy at {endpoint}: {reason}")]
    Connect {
        /// The proxy endpoint.
        endpoint: String,
        /// The OS error.
        reason: String,
    },
    /// Dialing the proxy took too long.
    #[error("proxy connect: dialing the KMS proxy at {endpoint} timed out after {after:?}")]
    ConnectTimeout {
        /// The proxy endpoint.
        endpoint: String,
        /// The configured limit.
        after: Duration,
    },
    /// The TLS handshake with KMS failed (untrusted or misnamed
    /// certificate, or the proxy closed the connection).
    #[error("TLS: handshake with {host} through the proxy failed: {reason}")]
    Tls {
        /// The KMS host name that was verified.
        host: String,
        /// What rustls (or the socket) reported.
        reason: String,
        /// Whether the failure was about the peer's certificate or protocol
        /// (retrying will not help) rather than a dropped connection.
        certificate_or_protocol: bool,
    },
    /// The TLS handshake took too long.
    #[error("TLS: handshake with {host} timed out after {after:?}")]
    TlsTimeout {
        /// The KMS host name.
        host: String,
        /// The configured limit.
        after: Duration,
    },
    /// The HTTP exchange failed after the connection was up (dropped
    /// connection, malformed HTTP).
    #[error("HTTP exchange with {host} failed: {reason}")]
    Http {
        /// The KMS host name.
        host: String,
        /// What hyper reported.
        reason: String,
    },
    /// The whole call took too long.
    #[error("KMS call to {host} timed out after {after:?}")]
    CallTimeout {
        /// The KMS host name.
        host: String,
        /// The configured limit.
        after: Duration,
    },
    /// The response body is larger than allowed.
    #[error("response from {host} exceeds {max} bytes")]
    ResponseTooLarge {
        /// The KMS host name.
        host: String,
        /// The configured limit.
        max: usize,
    },
    /// The SDK asked for something this connector refuses (another host,
    /// plain HTTP, a streaming body).
    #[error("refused request: {0}")]
    Refused(String),
}

impl TransportError {
    /// Whether a retry can help: dropped connections and timeouts can pass;
    /// a certificate that does not verify or a refused request cannot.
    pub fn is_retryable(&self) -> bool {
        match self {
            TransportError::Connect { .. }
            | TransportError::ConnectTimeout { .. }
            | TransportError::TlsTimeout { .. }
            | TransportError::Http { .. }
            | TransportError::CallTimeout { .. } => true,
            TransportError::Tls {
                certificate_or_protocol,
                ..
            } => !certificate_or_protocol,
            TransportError::Config(_)
            | TransportError::ResponseTooLarge { .. }
            | TransportError::Refused(_) => false,
        }
    }

    /// Whether this failure happened before any byte reached KMS (dialing
    /// the proxy).
    pub fn is_proxy_connect(&self) -> bool {
        matches!(
            self,
            TransportError::Connect { .. } | TransportError::ConnectTimeout { .. }
        )
    }

    /// Whether this is a TLS-stage failure.
    pub fn is_tls(&self) -> bool {
        matches!(
            self,
            TransportError::Tls { .. } | TransportError::TlsTimeout { .. }
        )
    }

    fn to_connector_error(&self) -> ConnectorError {
        let boxed = Box::new(self.clone());
        match self {
            TransportError::ConnectTimeout { .. }
            | TransportError::TlsTimeout { .. }
            | TransportError::CallTimeout { .. } => ConnectorError::timeout(boxed),
            TransportError::Connect { .. } | TransportError::Http { .. } => {
                ConnectorError::io(boxed)
            }
            TransportError::Refused(_) => ConnectorError::user(boxed),
            _ => ConnectorError::other(boxed, None),
        }
    }
}

/// Connection counters, for status output and to prove keep-alive works.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Connections dialed to the proxy.
    pub connections_opened: u64,
    /// TLS handshakes completed.
    pub tls_handshakes: u64,
    /// HTTP requests sent.
    pub requests: u64,
}

#[derive(Default)]
struct Counters {
    connections_opened: AtomicU64,
    tls_handshakes: AtomicU64,
    requests: AtomicU64,
}

/// Builds the rustls client configuration: webpki roots plus the optional
/// extra CA, `ring` provider, ALPN `http/1.1`.
pub fn tls_config(extra_ca_pem: Option<&[u8]>) -> Result<Arc<ClientConfig>, TransportError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(pem) = extra_ca_pem {
        let mut added = 0usize;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert
                .map_err(|e| TransportError::Config(format!("extra CA is not valid PEM: {e}")))?;
            added += 1;
            if added > MAX_EXTRA_CA_CERTS {
                return Err(TransportError::Config(format!(
                    "extra CA bundle holds more than {MAX_EXTRA_CA_CERTS} certificates"
                )));
            }
            roots.add(cert).map_err(|e| {
                TransportError::Config(format!("extra CA certificate refused: {e}"))
            })?;
        }
        if added == 0 {
            return Err(TransportError::Config(
                "extra CA bundle holds no PEM certificate".to_owned(),
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Config(format!("TLS protocol versions: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Checks that `host` is a bare DNS name or IP address usable for SNI and
/// certificate verification (no scheme, port or path).
pub fn check_kms_host(host: &str) -> Result<ServerName<'static>, TransportError> {
    if host.is_empty()
        || host.len() > 253
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    {
        return Err(TransportError::Config(format!(
            "KMS host {:?} is not a bare host name (like kms.us-east-1.amazonaws.com)",
            host.chars().take(64).collect::<String>()
        )));
    }
    ServerName::try_from(host.to_owned())
        .map_err(|e| TransportError::Config(format!("KMS host {host:?}: {e}")))
}

/// The dialer hyper's pool calls for each new connection: proxy, then TLS.
#[derive(Clone)]
struct ProxyConnector {
    proxy: Endpoint,
    host: String,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    connect_timeout: Duration,
    tls_timeout: Duration,
    counters: Arc<Counters>,
}

impl ProxyConnector {
    async fn dial(self) -> Result<ProxiedTls, TransportError> {
        let stream: Stream = tokio::time::timeout(self.connect_timeout, self.proxy.connect())
            .await
            .map_err(|_| TransportError::ConnectTimeout {
                endpoint: self.proxy.to_string(),
                after: self.connect_timeout,
            })?
            .map_err(|e: EndpointError| TransportError::Connect {
                endpoint: self.proxy.to_string(),
                reason: e.to_string(),
            })?;
        self.counters
            .connections_opened
            .fetch_add(1, Ordering::Relaxed);
        let tls = tokio::time::timeout(
            self.tls_timeout,
            self.tls.connect(self.server_name.clone(), stream),
        )
        .await
        .map_err(|_| TransportError::TlsTimeout {
            host: self.host.clone(),
            after: self.tls_timeout,
        })?
        .map_err(|e| {
            // rustls reports certificate and protocol failures as
            // InvalidData wrapping its own error; anything else is the
            // socket (typically the proxy closing the connection).
            let certificate_or_protocol = e.kind() == std::io::ErrorKind::InvalidData;
            TransportError::Tls {
                host: self.host.clone(),
                reason: e.to_string(),
                certificate_or_protocol,
            }
        })?;
        self.counters.tls_handshakes.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(proxy = %self.proxy, host = %self.host, "KMS connection established");
        Ok(ProxiedTls(TokioIo::new(tls)))
    }
}

impl tower_service::Service<http::Uri> for ProxyConnector {
    type Response = ProxiedTls;
    type Error = TransportError;
    type Future = Pin<Box<dyn Future<Output = Result<ProxiedTls, TransportError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            // The pool keys connections by URI; `send` already refused any
            // other host, so this is a second line of defence.
            if !host_matches(&uri, &this.host) {
                return Err(TransportError::Refused(format!(
                    "connection to {uri} requested; this client only talks to {}",
                    this.host
                )));
            }
            this.dial().await
        })
    }
}

/// A TLS connection to KMS through the proxy, in hyper's I/O traits.
struct ProxiedTls(TokioIo<TlsStream<Stream>>);

impl Connection for ProxiedTls {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for ProxiedTls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for ProxiedTls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

fn host_matches(uri: &http::Uri, host: &str) -> bool {
    uri.scheme_str() == Some("https")
        && uri.host().is_some_and(|h| h.eq_ignore_ascii_case(host))
        && uri.port_u16().is_none_or(|p| p == 443)
}

struct Inner {
    client: Client<ProxyConnector, Full<Bytes>>,
    host: String,
    proxy: Endpoint,
    call_timeout: Duration,
    max_response_len: usize,
    counters: Arc<Counters>,
}

/// The SDK's HTTP client: HTTP/1.1 over TLS over the proxy, with a bounded
/// keep-alive pool. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct KmsTransport {
    inner: Arc<Inner>,
}

impl fmt::Debug for KmsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsTransport")
            .field("proxy", &self.inner.proxy)
            .field("host", &self.inner.host)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl KmsTransport {
    /// Builds the TLS configuration and the connection pool. Must be called
    /// within a tokio runtime context only when requests are sent.
    pub fn new(config: &TransportConfig) -> Result<KmsTransport, TransportError> {
        let server_name = check_kms_host(&config.kms_host)?;
        let tls = TlsConnector::from(tls_config(config.extra_ca_pem.as_deref())?);
        let counters = Arc::new(Counters::default());
        let connector = ProxyConnector {
            proxy: config.proxy.clone(),
            host: config.kms_host.clone(),
            server_name,
            tls,
            connect_timeout: config.connect_timeout,
            tls_timeout: config.tls_timeout,
            counters: counters.clone(),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.idle_timeout)
            .pool_max_idle_per_host(config.max_idle_connections)
            .build(connector);
        Ok(KmsTransport {
            inner: Arc::new(Inner {
                client,
                host: config.kms_host.clone(),
                proxy: config.proxy.clone(),
                call_timeout: config.call_timeout,
                max_response_len: config.max_response_len,
                counters,
            }),
        })
    }

    /// Connection, handshake and request counts so far.
    pub fn stats(&self) -> TransportStats {
        let c = &self.inner.counters;
        TransportStats {
            connections_opened: c.connections_opened.load(Ordering::Relaxed),
            tls_handshakes: c.tls_handshakes.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
        }
    }

    /// The KMS host this transport talks to.
    pub fn kms_host(&self) -> &str {
        &self.inner.host
    }

    /// Sends one request and buffers the (bounded) response. Exposed so
    /// the transport can be exercised without the SDK.
    pub async fn send(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, TransportError> {
        let inner = &self.inner;
        if !host_matches(request.uri(), &inner.host) {
            return Err(TransportError::Refused(format!(
                "request for {} refused; this client only talks to https://{}",
                request.uri(),
                inner.host
            )));
        }
        let request = request.map(Full::new);
        inner.counters.requests.fetch_add(1, Ordering::Relaxed);
        let exchange = async {
            let response = inner
                .client
                .request(request)
                .await
                .map_err(|e| self.classify(&e))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, inner.max_response_len)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        TransportError::ResponseTooLarge {
                            host: inner.host.clone(),
                            max: inner.max_response_len,
                        }
                    } else {
                        TransportError::Http {
                            host: inner.host.clone(),
                            reason: format!("reading the response body: {e}"),
                        }
                    }
                })?
                .to_bytes();
            Ok(http::Response::from_parts(parts, body))
        };
        tokio::time::timeout(inner.call_timeout, exchange)
            .await
            .map_err(|_| TransportError::CallTimeout {
                host: inner.host.clone(),
                after: inner.call_timeout,
            })?
    }

    /// Recovers our own error from hyper-util's wrapper, or describes
    /// hyper's.
    fn classify(&self, err: &hyper_util::client::legacy::Error) -> TransportError {
        if let Some(ours) = find_source::<TransportError>(err) {
            return ours.clone();
        }
        TransportError::Http {
            host: self.inner.host.clone(),
            reason: error_chain(err),
        }
    }

    async fn call_sdk(&self, request: HttpRequest) -> Result<HttpResponse, ConnectorError> {
        let request = request.try_into_http1x().map_err(|e| {
            TransportError::Refused(format!("cannot convert the SDK request: {e}"))
                .to_connector_error()
        })?;
        let (parts, body) = request.into_parts();
        // KMS requests are small JSON documents held in memory; a streaming
        // body would mean something else is using this client.
        let body = body.bytes().map(Bytes::copy_from_slice).ok_or_else(|| {
            TransportError::Refused("streaming request bodies are not supported".to_owned())
                .to_connector_error()
        })?;
        let response = self
            .send(http::Request::from_parts(parts, body))
            .await
            .map_err(|e| e.to_connector_error())?;
        let response = response.map(SdkBody::from);
        HttpResponse::try_from(response).map_err(|e| {
            TransportError::Http {
                host: self.inner.host.clone(),
                reason: format!("unusable response: {e}"),
            }
            .to_connector_error()
        })
    }
}

impl HttpConnector for KmsTransport {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let this = self.clone();
        HttpConnectorFuture::new(async move { this.call_sdk(request).await })
    }
}

impl HttpClient for KmsTransport {
    fn http_connector(
        &self,
        _settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        // Our own timeouts apply (TransportConfig); the SDK's settings are
        // not used so that one place bounds every wait.
        SharedHttpConnector::new(self.clone())
    }
}

/// The first error of type `T` in `err`'s source chain (including `err`).
pub(crate) fn find_source<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(err);
    let mut depth = 0;
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        depth += 1;
        if depth > 32 {
            return None;
        }
        current = e.source();
    }
    None
}

/// `err` and its sources joined with ": " (bounded in depth).
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut current = err.source();
    let mut depth = 0;
    while let Some(e) = current {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        depth += 1;
        if depth > 16 {
            break;
        }
        current = e.source();
    }
    text
}
