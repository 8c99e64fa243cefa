//! The KMS forwarder: the enclave's only way out to the network.
//!
//! The enclave has no network interface; its KMS client dials a vsock port on
//! the parent, and this forwarder pipes those bytes to a TCP upstream such as
//! `kms.us-east-1.amazonaws.com:443`. TLS runs end to end between the enclave
//! and KMS, so the bytes pass through untouched: the parent never sees
//! plaintext, and a compromised parent can only drop or delay traffic.
//!
//! Each listen endpoint is bound to exactly one upstream fixed at start-up
//! ([`Forward`]); the configuration *is* the allowlist, so nothing a peer
//! sends can steer a connection anywhere else. The upstream name is resolved
//! for every connection (KMS endpoints change addresses) and every resolved
//! address is tried in order until one accepts.
//!
//! Accepting, slots and shutdown are [`keystore_shared::serve`]'s. Limits:
//! at most `max_connections` at once (further connections wait up to
//! `admission_wait` for a slot rather than being refused at once, since the
//! SDK in the enclave would only retry), a connect timeout per address, and
//! an idle timeout after which a connection with no bytes in either
//! direction is closed. A connection that fails, for whatever reason, ends
//! alone.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keystore_shared::endpoint::{Endpoint, EndpointError, Listener};
use keystore_shared::serve::{Accepted, Handler, ServeConfig, ServeError, VsockCidPeers, serve};
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Copy buffer per direction. 64 KiB matches `socat -b 65536` and the
/// largest TLS records KMS sends fit whole; smaller buffers cost measurably
/// more system calls on bulk transfers.
pub const BUFFER_SIZE: usize = 64 * 1024;

/// At most this many resolved addresses are tried per connection, so a
/// hostile or broken resolver cannot make one connection attempt unbounded.
pub const MAX_RESOLVED_ADDRS: usize = 16;

/// The default KMS port.
pub const KMS_PORT: u16 = 443;

/// Default listen endpoint of the KMS forwarder: a port below 1024, so no
/// unprivileged process on the parent can bind it first and stand in for
/// the forwarder (the enclave's `--kms-proxy` default matches; the old port
/// 8000 still works when both sides are given it).
pub const DEFAULT_LISTEN: &str = "vsock://ANY:800";

/// A TCP destination, `HOST:PORT`; `HOST` is a DNS name or an IP address
/// (IPv6 in brackets).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Upstream {
    /// Name or address, without brackets.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl Upstream {
    /// The regional KMS endpoint, `kms.<region>.amazonaws.com:443`.
    pub fn kms(region: &str) -> Result<Self, ForwardError> {
        format!("kms.{region}.amazonaws.com:{KMS_PORT}").parse()
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for Upstream {
    type Err = ForwardError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| ForwardError::InvalidSpec {
            input: input.chars().take(120).collect(),
            reason: reason.to_owned(),
        };
        let (host, port) = input
            .rsplit_once(':')
            .ok_or_else(|| bad("expected HOST:PORT"))?;
        let host = match host.strip_prefix('[') {
            Some(inner) => inner
                .strip_suffix(']')
                .ok_or_else(|| bad("unbalanced `[` in host"))?,
            None if host.contains(':') => return Err(bad("put IPv6 addresses in brackets")),
            None => host,
        };
        if host.is_empty() || host.len() > 253 {
            return Err(bad("host must be 1 to 253 characters"));
        }
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
        {
            return Err(bad(
                "host may hold only letters, digits, `.`, `-`, `_` and `:`",
            ));
        }
        let port = (!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
            .then(|| port.parse::<u16>().ok())
            .flatten()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("port must be a number from 1 to 65535"))?;
        Ok(Upstream {
            host: host.to_owned(),
            port,
        })
    }
}

/// One allowlisted route: connections accepted on `listen` go to
/// `upstream` and nowhere else. Text form `LISTEN=HOST:PORT`, e.g.
/// `vsock://ANY:800=kms.eu-west-1.amazonaws.com:443`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Where the enclave connects.
    pub listen: Endpoint,
    /// Where its bytes go.
    pub upstream: Upstream,
}

impl Forward {
    /// The default route: [`DEFAULT_LISTEN`] to the regional KMS endpoint.
    pub fn kms(region: &str) -> Result<Self, ForwardError> {
        Ok(Forward {
            listen: DEFAULT_LISTEN.parse().map_err(ForwardError::Endpoint)?,
            upstream: Upstream::kms(region)?,
        })
    }
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.listen, self.upstream)
    }
}

impl FromStr for Forward {
    type Err = ForwardError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let (listen, upstream) =
            input
                .rsplit_once('=')
                .ok_or_else(|| ForwardError::InvalidSpec {
                    input: input.chars().take(120).collect(),
                    reason: "expected LISTEN=HOST:PORT".to_owned(),
                })?;
        Ok(Forward {
            listen: listen.parse().map_err(ForwardError::Endpoint)?,
            upstream: upstream.parse()?,
        })
    }
}

/// Everything that can go wrong configuring the forwarder or opening one
/// upstream connection.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// A `--forward` or upstream text is malformed.
    #[error("invalid forward {input:?}: {reason}")]
    InvalidSpec {
        /// The rejected text (truncated).
        input: String,
        /// What is wrong.
        reason: String,
    },
    /// The listen endpoint is malformed or cannot be bound.
    #[error(transparent)]
    Endpoint(EndpointError),
    /// Name resolution failed.
    #[error("cannot resolve {upstream}: {source}")]
    Resolve {
        /// The upstream being resolved.
        upstream: Upstream,
        /// The resolver's error.
        #[source]
        source: io::Error,
    },
    /// Name resolution did not finish within the connect timeout.
    #[error("resolving {upstream} took longer than {timeout:?}")]
    ResolveTimeout {
        /// The upstream being resolved.
        upstream: Upstream,
        /// The limit.
        timeout: Duration,
    },
    /// The name resolved to no addresses.
    #[error("{0} resolved to no addresses")]
    NoAddresses(Upstream),
    /// Every resolved address refused or timed out.
    #[error("cannot connect to {upstream}: {tried} address(es) tried, last {last_addr}: {last}")]
    Connect {
        /// The upstream.
        upstream: Upstream,
        /// How many addresses were tried.
        tried: usize,
        /// The last address tried.
        last_addr: SocketAddr,
        /// Its error.
        #[source]
        last: io::Error,
    },
}

/// A future returned by [`Resolve::resolve`].
pub type ResolveFuture<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;

/// Turns an upstream name into addresses. Injectable so tests can make a
/// name resolve to several loopback addresses.
pub trait Resolve: Send + Sync + 'static {
    /// All addresses for `host:port`, in the order to try them.
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a>;
}

/// The system resolver (`getaddrinfo` on a blocking thread).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> ResolveFuture<'a> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host, port))
                .await?
                .take(MAX_RESOLVED_ADDRS)
                .collect())
        })
    }
}

/// Limits of a [`Forwarder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwarderLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// How long a connection beyond the limit waits for a slot before it is
    /// closed (the enclave's SDK then retries).
    pub admission_wait: Duration,
    /// Bound on resolving the upstream, and on connecting to each address.
    pub connect_timeout: Duration,
    /// A connection with no bytes in either direction for this long is
    /// closed.
    pub idle_timeout: Duration,
    /// On shutdown, how long open connections may finish before they are
    /// cut.
    pub drain_timeout: Duration,
}

impl Default for ForwarderLimits {
    fn default() -> Self {
        ForwarderLimits {
            max_connections: 256,
            admission_wait: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Pipes connections from one listener to one [`Upstream`].
#[derive(Clone)]
pub struct Forwarder {
    upstream: Upstream,
    limits: ForwarderLimits,
    resolver: Arc<dyn Resolve>,
    peers: VsockCidPeers,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forwarder")
            .field("upstream", &self.upstream)
            .field("limits", &self.limits)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

impl Handler for Forwarder {
    /// Bytes only: on shutdown a connection keeps flowing until the drain
    /// timeout, since a TLS stream has no boundary to stop at.
    async fn handle(&self, conn: Accepted) {
        self.forward(conn).await;
    }
}

impl Forwarder {
    /// A forwarder to `upstream` using the system resolver.
    pub fn new(upstream: Upstream, limits: ForwarderLimits) -> Self {
        Forwarder {
            upstream,
            limits,
            resolver: Arc::new(SystemResolver),
            peers: VsockCidPeers {
                cid: super::DEFAULT_ENCLAVE_CID,
            },
            metrics: None,
        }
    }

    /// Serves only vsock peers with this CID (the enclave's); the default
    /// is [`super::DEFAULT_ENCLAVE_CID`]. Other enclaves or VMs on the
    /// instance must not use its way to KMS.
    pub fn for_enclave_cid(mut self, cid: u32) -> Self {
        self.peers = VsockCidPeers { cid };
        self
    }

    /// Counts connections and bytes into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Replaces the resolver.
    pub fn with_resolver(mut self, resolver: Arc<dyn Resolve>) -> Self {
        self.resolver = resolver;
        self
    }

    /// The configured upstream.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Serves `listener` with [`keystore_shared::serve`] until `shutdown`
    /// completes, then lets open connections finish for up to the drain
    /// timeout. Returns an error only if the listener itself fails for good.
    pub async fn serve(
        self,
        listener: Listener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        tracing::info!(listen = %listener.local_endpoint(), upstream = %self.upstream, "forwarding");
        let config = ServeConfig {
            max_connections: self.limits.max_connections,
            admission_wait: self.limits.admission_wait,
            idle_timeout: self.limits.idle_timeout,
            max_lifetime: None,
            shutdown_grace: self.limits.drain_timeout,
            ..ServeConfig::named("forwarder")
        };
        let peers = Arc::new(self.peers);
        serve(listener, Arc::new(self), peers, config, shutdown).await
    }

    /// Opens a TCP connection to the upstream: resolve (bounded), then try
    /// each address in order, each bounded by the connect timeout.
    pub async fn connect_upstream(&self) -> Result<(TcpStream, SocketAddr), ForwardError> {
        let timeout = self.limits.connect_timeout;
        let upstream = &self.upstream;
        let addrs = tokio::time::timeout(
            timeout,
            self.resolver.resolve(&upstream.host, upstream.port),
        )
        .await
        .map_err(|_| ForwardError::ResolveTimeout {
            upstream: upstream.clone(),
            timeout,
        })?
        .map_err(|source| ForwardError::Resolve {
            upstream: upstream.clone(),
            source,
        })?;
        let mut last = None;
        let mut tried = 0;
        for addr in addrs.into_iter().take(MAX_RESOLVED_ADDRS) {
            tried += 1;
            let attempt = tokio::time::timeout(timeout, TcpStream::connect(addr)).await;
            let err = match attempt {
                Ok(Ok(stream)) => {
                    if let Err(err) = stream.set_nodelay(true) {
                        tracing::debug!(%addr, error = %err, "could not set TCP_NODELAY");
                    }
                    return Ok((stream, addr));
                }
                Ok(Err(err)) => err,
                Err(_) => io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?}"),
                ),
            };
            tracing::debug!(upstream = %upstream, %addr, error = %err, "upstream address failed");
            last = Some((addr, err));
        }
        match last {
            Some((last_addr, last)) => Err(ForwardError::Connect {
                upstream: upstream.clone(),
                tried,
                last_addr,
                last,
            }),
            None => Err(ForwardError::NoAddresses(upstream.clone())),
        }
    }

    async fn forward(&self, conn: Accepted) {
        let Accepted {
            stream: mut client,
            peer,
            id,
            ..
        } = conn;
        let started = Instant::now();
        let (upstream, addr) = match self.connect_upstream().await {
            Ok(connected) => connected,
            Err(err) => {
                tracing::warn!(conn = id, %peer, error = %err, "upstream unreachable; closing");
                if let Some(metrics) = &self.metrics {
                    metrics.forwarder_unreachable();
                }
                return;
            }
        };
        tracing::debug!(conn = id, %peer, upstream = %addr, "connected");
        // An idle or over-long connection is cut by the accept loop, which
        // logs it; the counts below come from the stream it watches.
        let open = self.metrics.as_ref().map(|m| m.forwarder_opened());
        // Counted live, per chunk: the enclave keeps its KMS connection
        // open for a long time, so a count at close would hardly move.
        let (up, down) = self
            .metrics
            .as_ref()
            .map(|m| m.forwarder_byte_counters())
            .unzip();
        let ended = pipe(Metered::new(&mut client, up, down), upstream).await;
        drop(open);
        let (to_upstream, to_client) = (client.bytes_read(), client.bytes_written());
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match ended {
            Ok(_) => tracing::info!(
                conn = id, %peer, upstream = %addr, to_upstream, to_client,
                elapsed_ms, "connection closed"
            ),
            Err(err) => tracing::warn!(
                conn = id, %peer, upstream = %addr, to_upstream, to_client,
                elapsed_ms, error = %err, "connection failed"
            ),
        }
    }
}

/// A stream whose bytes read and written are added to counters as they
/// pass (reads from the enclave go upstream, writes go to the enclave).
struct Metered<S> {
    inner: S,
    read: Option<Counter>,
    written: Option<Counter>,
}

impl<S> Metered<S> {
    fn new(inner: S, read: Option<Counter>, written: Option<Counter>) -> Self {
        Metered {
            inner,
            read,
            written,
        }
    }
}

fn add(counter: Option<&Counter>, bytes: usize) {
    if let Some(counter) = counter
        && bytes > 0
    {
        counter.inc_by(u64::try_from(bytes).unwrap_or(u64::MAX));
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            add(
                self.read.as_ref(),
                buf.filled().len().saturating_sub(before),
            );
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &polled {
            add(self.written.as_ref(), *n);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Bytes moved by a [`pipe`] that ended with both sides closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipeStats {
    /// Bytes written to the upstream.
    pub to_upstream: u64,
    /// Bytes written to the client.
    pub to_client: u64,
}

/// Copies both directions until both are done, with half-close: when one
/// side stops writing, the other side's write half is shut down and the
/// opposite direction keeps flowing. Time bounds are the caller's (the
/// accept loop's idle timeout, for the forwarder).
pub async fn pipe<A, B>(mut client: A, mut upstream: B) -> io::Result<PipeStats>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (to_upstream, to_client) = tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut upstream,
        BUFFER_SIZE,
        BUFFER_SIZE,
    )
    .await?;
    Ok(PipeStats {
        to_upstream,
        to_client,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_routes() {
        let f: Forward = "vsock://ANY:8000=kms.eu-west-1.amazonaws.com:443"
            .parse()
            .unwrap();
        assert_eq!(f.upstream.host, "kms.eu-west-1.amazonaws.com");
        assert_eq!(f.upstream.port, 443);
        assert_eq!(
            f.to_string(),
            "vsock://ANY:8000=kms.eu-west-1.amazonaws.com:443"
        );
        let v6: Upstream = "[::1]:8443".parse().unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 8443));
        assert_eq!(v6.to_string(), "[::1]:8443");
        assert_eq!(
            Forward::kms("us-east-1").unwrap().to_string(),
            "vsock://ANY:800=kms.us-east-1.amazonaws.com:443"
        );
        for bad in [
            "tcp://127.0.0.1:1",
            "tcp://127.0.0.1:1=host",
            "tcp://127.0.0.1:1=host:0",
            "tcp://127.0.0.1:1=host:99999",
            "tcp://127.0.0.1:1=::1:443",
            "tcp://127.0.0.1:1=ho st:443",
            "tcp://127.0.0.1:1=:443",
            "nope=host:443",
        ] {
            assert!(bad.parse::<Forward>().is_err(), "{bad}");
        }
        assert!(Upstream::kms("us-east-1/../x").is_err());
    }
}
