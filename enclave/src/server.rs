//! The secret server: host apps connect over vsock (tcp/unix in tests), send
//! framed [`Request`]s and get [`Response`]s.
//!
//! The accept loop, connection slots, admission wait, idle and lifetime
//! bounds and shutdown are [`keystore_shared::serve`]'s; this module is the
//! [`Handler`] that reads frames on each admitted connection, applies them to
//! the shared [`KeystoreService`] and writes the answers. Everything a peer
//! controls is bounded:
//!
//! - connections: at most [`ServerConfig::max_connections`] are served; a
//!   connection beyond that first evicts the connection that has waited
//!   longest for its next request (`ServeConfig::evict_idle`: idle and
//!   trickling sockets cannot starve a client), and if every slot is busy
//!   answering, waits up to [`ServerConfig::admission_wait`] for a slot,
//!   then is told `Error{Unavailable, "server busy"}` and closed;
//! - time: a complete request frame must arrive within
//!   [`ServerConfig::idle_timeout`] (so a silent or trickling peer is dropped),
//!   answering one within [`ServerConfig::request_timeout`], and no
//!   connection outlives [`ServerConfig::max_lifetime`];
//! - size: request frames over [`ServerConfig::max_request_frame`] are refused
//!   after reading only their 4-byte prefix;
//! - shutdown: the accept loop stops, idle connections close, in-flight
//!   requests get [`ServerConfig::shutdown_grace`] to finish, then the rest are
//!   aborted.
//!
//! **Peers** (DESIGN §3): both ports serve only privileged peers
//! ([`PrivilegedPeers`]: the parent from a source port below 1024, uid 0 on
//! a unix socket), refused with `Error{Denied}` before a byte is read. With
//! [`SecretPeers::Any`] the secret port (never the load port) serves
//! everyone; then only a privileged peer may name the [`Caller`] a request is
//! made for, and anyone else is who the kernel says it is.
//!
//! A bad peer only ever costs its own connection: nothing it sends can make
//! the server panic or stop serving others. Logs carry the peer, operation
//! kind, outcome and duration, never names' values or payloads.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keystore_shared::Caller;
use keystore_shared::endpoint::{
    Endpoint, EndpointError, Listener as EndpointListener, Peer, Stream,
};
use keystore_shared::frame::{Connection, FrameError, FrameLimits, decode_body, encode_frame_into};
use keystore_shared::protocol::{
    DEFAULT_MAX_LOAD_FRAME, DEFAULT_MAX_REQUEST_FRAME, DEFAULT_MAX_RESPONSE_FRAME, ErrorCode,
    PROTOCOL_VERSION, ProtocolError, Request, RequestHeader, RequestOp, Response, ResponseBody,
    SecretBytes,
};
use keystore_shared::serve::{
    Accepted, AnyPeer, Handler, PeerPolicy, PrivilegedPeers, Refusal, ServeConfig, ServeError,
    Shutdown, Watched, Working, serve,
};
use zeroize::{Zeroize, Zeroizing};

use keystore_shared::audit::{AuditOp, Outcome};

use crate::audit::{AuditTrail, outcome_of};
use crate::service::{KeystoreService, ServiceError};

/// Default limit on connections served at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default time a connection beyond the limit waits for a free slot.
pub const DEFAULT_ADMISSION_WAIT: Duration = Duration::from_secs(2);
/// Default time allowed for a whole request frame to arrive.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time allowed to answer one request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time in-flight requests get to finish at shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Connections the load port serves at once (one loader, plus a retry).
pub const DEFAULT_MAX_LOAD_CONNECTIONS: usize = 4;

/// How long the server tries to deliver a "too large" error to a peer
/// before just closing: the peer may not be reading.
const REFUSAL_WRITE_TIMEOUT: Duration = keystore_shared::serve::REFUSAL_TIMEOUT;
/// Default bound on a connection's whole life, so a peer trickling one
/// byte at a time cannot keep a slot.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(3600);

/// Limits and timeouts of the secret server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Which operations this listener answers.
    pub role: Role,
    /// Connections served at once.
    pub max_connections: usize,
    /// How long a connection beyond the limit waits for a slot before it is
    /// refused with `Unavailable`.
    pub admission_wait: Duration,
    /// How long a connection may take to deliver each complete request
    /// frame (between requests, or while one trickles in).
    pub idle_timeout: Duration,
    /// How long answering one request (including writing the response) may
    /// take.
    pub request_timeout: Duration,
    /// How long in-flight requests may run after shutdown begins.
    pub shutdown_grace: Duration,
    /// Longest a connection may stay open, however busy.
    pub max_lifetime: Option<Duration>,
    /// Largest request frame body accepted.
    pub max_request_frame: usize,
    /// Largest response frame body sent (sized by the secret-value limit).
    pub max_response_frame: usize,
    /// Who the secret port serves; the load port always serves privileged
    /// peers only, whatever this says.
    pub secret_peers: SecretPeers,
}

/// Who the secret port serves (`--secret-peers`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SecretPeers {
    /// Only privileged peers ([`PrivilegedPeers`]); the default.
    #[default]
    Privileged,
    /// Every peer: an unprivileged one reads as the identity the kernel
    /// reports for it (unix uid/gid, or anonymous) and may not name a
    /// caller. An opt-out, logged at start and shown in `Status`.
    Any,
}

impl SecretPeers {
    /// The flag's spelling, also shown in `Status`.
    pub fn as_str(self) -> &'static str {
        match self {
            SecretPeers::Privileged => "privileged",
            SecretPeers::Any => "any",
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            role: Role::Secrets,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            admission_wait: DEFAULT_ADMISSION_WAIT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_lifetime: Some(DEFAULT_MAX_LIFETIME),
            max_request_frame: DEFAULT_MAX_REQUEST_FRAME,
            max_response_frame: DEFAULT_MAX_RESPONSE_FRAME,
            secret_peers: SecretPeers::Privileged,
        }
    }
}

/// What a listener is for. Host apps and the host proxy's loader reach the
/// enclave on separate ports so each gets the frame limit it needs: secret
/// requests are tiny (64 KiB), a `Load` bundle may be 16 MiB, and a host app
/// must not be able to make the secret port buffer 16 MiB per connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    /// `Get`, `List`, `Status`, `Attest`: the secret server host apps use.
    #[default]
    Secrets,
    /// `Load` and `Status`: the port the host proxy's loader uses.
    Loading,
}

impl ServerConfig {
    /// Defaults for the load port: large frames, few connections, and a
    /// request timeout covering a whole bounded load (`load_duration`).
    pub fn for_loading(load_duration: Duration) -> Self {
        ServerConfig {
            role: Role::Loading,
            max_connections: DEFAULT_MAX_LOAD_CONNECTIONS,
            request_timeout: load_duration + Duration::from_secs(10),
            max_request_frame: DEFAULT_MAX_LOAD_FRAME,
            ..ServerConfig::default()
        }
    }

    /// Rejects values that would make the server refuse everything or never
    /// time out.
    pub fn validate(&self) -> Result<(), ServerError> {
        let invalid = |what: &'static str| Err(ServerError::InvalidConfig(what));
        if self.max_connections == 0 {
            return invalid("max_connections must be at least 1");
        }
        if self.max_connections > tokio::sync::Semaphore::MAX_PERMITS / 4 {
            return invalid("max_connections is unreasonably large");
        }
        if self.max_lifetime.is_some_and(|d| d.is_zero()) {
            return invalid("max_lifetime must be > 0 when set");
        }
        if self.idle_timeout.is_zero() || self.request_timeout.is_zero() {
            return invalid("idle_timeout and request_timeout must be > 0");
        }
        if self.max_request_frame == 0 || self.max_response_frame == 0 {
            return invalid("frame limits must be > 0");
        }
        Ok(())
    }
}

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A configuration value is unusable.
    #[error("invalid server configuration: {0}")]
    InvalidConfig(&'static str),
    /// Binding the listening endpoint failed.
    #[error(transparent)]
    Bind(EndpointError),
    /// The listener failed in a way that is not expected to pass; the server
    /// stopped accepting (in-flight connections were drained first).
    #[error("secret server stopped accepting: {0}")]
    Accept(EndpointError),
}

/// A bound, not yet running secret server.
#[derive(Debug)]
pub struct Server {
    listener: EndpointListener,
    service: Arc<KeystoreService>,
    config: ServerConfig,
}

impl Server {
    /// Binds `endpoint` (for `tcp://…:0` the OS picks the port; see
    /// [`Server::local_endpoint`]).
    pub async fn bind(
        endpoint: &Endpoint,
        service: Arc<KeystoreService>,
        config: ServerConfig,
    ) -> Result<Server, ServerError> {
        config.validate()?;
        let listener = endpoint.bind().await.map_err(ServerError::Bind)?;
        Ok(Server {
            listener,
            service,
            config,
        })
    }

    /// Wraps an already bound listener.
    pub fn from_listener(
        listener: EndpointListener,
        service: Arc<KeystoreService>,
        config: ServerConfig,
    ) -> Result<Server, ServerError> {
        config.validate()?;
        Ok(Server {
            listener,
            service,
            config,
        })
    }

    /// Where clients reach this server.
    pub fn local_endpoint(&self) -> &Endpoint {
        self.listener.local_endpoint()
    }

    /// Serves until `shutdown` completes (e.g. a signal), then shuts down the
    /// way every nitro-keystore server does ([`keystore_shared::serve`]):
    /// stops accepting, closes idle connections, gives in-flight requests
    /// [`ServerConfig::shutdown_grace`] and aborts what is left.
    ///
    /// Returns an error only if the listener itself failed for good; even
    /// then the connections already open were drained first.
    pub async fn run(self, shutdown: impl Future) -> Result<(), ServerError> {
        let config = self.config;
        let serve_config = ServeConfig {
            name: match config.role {
                Role::Secrets => "secret server",
                Role::Loading => "load server",
            },
            max_connections: config.max_connections,
            admission_wait: config.admission_wait,
            idle_timeout: config.idle_timeout,
            max_lifetime: config.max_lifetime,
            shutdown_grace: config.shutdown_grace,
            // A peer that holds slots without asking anything (idle or
            // trickling sockets) gives way to a newcomer (issue 15).
            evict_idle: true,
        };
        // The load port never opens to everyone: `Load` replaces the set.
        let policy: Arc<dyn PeerPolicy> = match (config.role, config.secret_peers) {
            (Role::Secrets, SecretPeers::Any) => Arc::new(AnyPeer),
            (Role::Loading, _) | (Role::Secrets, SecretPeers::Privileged) => {
                Arc::new(PrivilegedPeers)
            }
        };
        // A refused peer is recorded before it is told so.
        let policy: Arc<dyn PeerPolicy> = Arc::new(AuditedPolicy {
            inner: policy,
            audit: self.service.audit().clone(),
        });
        let handler = Arc::new(RequestHandler {
            service: self.service,
            role: config.role,
            secret_peers: config.secret_peers,
            limits: FrameLimits::new(config.max_request_frame, config.max_response_frame),
            idle_timeout: config.idle_timeout,
            request_timeout: config.request_timeout,
        });
        serve(self.listener, handler, policy, serve_config, shutdown)
            .await
            .map_err(|err| match err {
                ServeError::InvalidConfig(what) => ServerError::InvalidConfig(what),
                ServeError::Accept(err) => ServerError::Accept(err),
            })
    }
}

/// A peer policy whose refusals are audit records ([`AuditOp::Connect`]).
struct AuditedPolicy {
    inner: Arc<dyn PeerPolicy>,
    audit: Arc<AuditTrail>,
}

impl PeerPolicy for AuditedPolicy {
    fn check(&self, peer: &Peer) -> Result<(), keystore_shared::serve::PeerDenied> {
        let verdict = self.inner.check(peer);
        if verdict.is_err() {
            let caller = match PeerTrust::of(peer) {
                PeerTrust::Unprivileged(caller) => Some(caller),
                PeerTrust::Privileged => None,
            };
            self.audit.request(
                AuditOp::Connect,
                Vec::new(),
                None,
                caller,
                &peer.to_string(),
                Outcome::Denied,
            );
        }
        verdict
    }
}

/// Answers framed requests on each admitted connection.
struct RequestHandler {
    service: Arc<KeystoreService>,
    role: Role,
    secret_peers: SecretPeers,
    limits: FrameLimits,
    idle_timeout: Duration,
    request_timeout: Duration,
}

impl Handler for RequestHandler {
    async fn handle(&self, conn: Accepted) {
        let opened = Instant::now();
        tracing::info!("connection opened");
        let peer = PeerTrust::of(&conn.peer);
        let mut session = Session {
            peer_text: conn.peer.to_string(),
            connection: Connection::with_limits(conn.stream, self.limits),
            service: &self.service,
            role: self.role,
            secret_peers: self.secret_peers,
            peer,
            idle_timeout: self.idle_timeout,
            request_timeout: self.request_timeout,
            shutdown: conn.shutdown,
            out: Zeroizing::new(Vec::new()),
        };
        let (requests, reason) = session.run().await;
        tracing::info!(
            requests,
            reason,
            duration_ms = millis(opened.elapsed()),
            "connection closed"
        );
    }

    async fn refuse(&self, stream: &mut Stream, refusal: &Refusal) {
        let code = match refusal {
            Refusal::Busy { .. } => ErrorCode::Unavailable,
            Refusal::Denied(_) => ErrorCode::Denied,
        };
        let mut connection = Connection::with_limits(stream, self.limits);
        let response = Response::error(0, code, refusal.to_string());
        if connection.write_message(&response).await.is_ok() {
            let _ = connection.shutdown().await;
        }
    }
}

/// A request frame, decoded as far as it goes.
struct Decoded {
    /// The id to answer with (0 when the request has none).
    id: u64,
    /// The typed request, or why it is not one.
    request: Result<Request, ServiceError>,
}

/// Decodes a request frame: straight into its typed, bounded form, which
/// is all a well-formed request costs. Only a frame that is not a valid
/// request is decoded again, as a bare header, to answer with its id and
/// say what is wrong. A frame that is not even a map is a frame error.
fn decode_request(body: &[u8]) -> Result<Decoded, FrameError> {
    if let Ok(request) = decode_body::<Request>(body) {
        let id = request.id;
        let request = if request.v == PROTOCOL_VERSION {
            Ok(request)
        } else {
            Err(ServiceError::BadRequest(
                ProtocolError::UnsupportedVersion {
                    got: request.v,
                    expected: PROTOCOL_VERSION,
                }
                .to_string(),
            ))
        };
        return Ok(Decoded { id, request });
    }
    let header: RequestHeader = decode_body(body)?;
    let request = check_header(&header).and_then(|()| {
        decode_body::<Request>(body).map_err(|err| {
            ServiceError::BadRequest(format!(
                "`op` is not a valid operation of protocol version {PROTOCOL_VERSION} \
                 (Get, List, Status, Attest, Load, AuditRead, AuditCheckpoint, LogRead): {}",
                match err {
                    // Redacted by the frame layer: schema names only.
                    FrameError::Decode(reason) => reason,
                    other => other.to_string(),
                }
            ))
        })
    });
    Ok(Decoded {
        id: header.id.unwrap_or(0),
        request,
    })
}

/// Checks id, version and the presence of an operation.
fn check_header(header: &RequestHeader) -> Result<(), ServiceError> {
    let Some(v) = header.v else {
        return Err(ServiceError::BadRequest(format!(
            "request has no protocol version `v`; this server speaks version {PROTOCOL_VERSION}"
        )));
    };
    if header.id.is_none() {
        return Err(ServiceError::BadRequest("request has no `id`".to_owned()));
    }
    if v != PROTOCOL_VERSION {
        let err = ProtocolError::UnsupportedVersion {
            got: v,
            expected: PROTOCOL_VERSION,
        };
        return Err(ServiceError::BadRequest(err.to_string()));
    }
    if !header.has_op() {
        return Err(ServiceError::BadRequest(
            "request has no operation `op`".to_owned(),
        ));
    }
    Ok(())
}

/// What the server believes about the peer of one connection, decided once
/// from what the kernel reported when it connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerTrust {
    /// A privileged peer ([`PrivilegedPeers`]): the caller it names is
    /// believed, and one that names none is root.
    Privileged,
    /// Anyone else (only with [`SecretPeers::Any`]): it is this caller, the
    /// identity the kernel gives it, and may not name another.
    Unprivileged(Caller),
}

impl PeerTrust {
    /// The trust `peer` earns: privileged by [`PrivilegedPeers`], else its
    /// `SO_PEERCRED` uid and gid on a unix socket, else anonymous.
    pub fn of(peer: &Peer) -> PeerTrust {
        if PrivilegedPeers::admits(peer) {
            return PeerTrust::Privileged;
        }
        let caller = match peer {
            Peer::Unix {
                cred: Some(cred), ..
            } => Caller {
                uid: Some(cred.uid),
                gid: Some(cred.gid),
                ..Caller::default()
            },
            _ => Caller::default(),
        };
        PeerTrust::Unprivileged(caller)
    }

    /// Who a request asserting `asserted` (or nothing) is made for.
    pub fn caller(&self, asserted: Option<Caller>) -> Result<Caller, ServiceError> {
        match (self, asserted) {
            (PeerTrust::Privileged, Some(caller)) => Ok(caller),
            (PeerTrust::Privileged, None) => Ok(Caller::root()),
            (PeerTrust::Unprivileged(own), Some(asserted)) => Err(ServiceError::Denied(format!(
                "this connection ({own}) is not privileged, so it may not name the caller \
                 `{asserted}`; only a peer from a port below 1024 (or root on a unix socket) may"
            ))),
            (PeerTrust::Unprivileged(own), None) => Ok(own.clone()),
        }
    }
}

/// One connection being served.
struct Session<'a> {
    connection: Connection<Watched<Stream>>,
    service: &'a KeystoreService,
    role: Role,
    secret_peers: SecretPeers,
    peer: PeerTrust,
    /// The peer as the kernel reported it, for audit records.
    peer_text: String,
    idle_timeout: Duration,
    request_timeout: Duration,
    shutdown: Shutdown,
    /// Encoded answers not yet written: every request one read delivered is
    /// answered, then the answers leave in one write. May hold secrets, so
    /// it is wiped after each write and on drop.
    out: Zeroizing<Vec<u8>>,
}

/// Pending answers are written once they reach this many bytes even if more
/// requests are buffered, so a pipelining peer costs at most this plus one
/// response frame of memory.
const FLUSH_AT: usize = 64 * 1024;

/// An answer buffer grown past this (by a large secret) is released after
/// its write instead of kept for the connection's life.
const OUT_KEEP: usize = 2 * FLUSH_AT;

/// Whether the connection continues after a request.
enum Next {
    Continue,
    Close(&'static str),
}

impl Next {
    /// The first reason to close of the two, if any.
    fn or(self, other: Next) -> Next {
        match self {
            Next::Continue => other,
            close => close,
        }
    }
}

impl Session<'_> {
    /// Reads and answers requests until the peer leaves, misbehaves, idles
    /// out, or the server shuts down. Every whole request a read delivered
    /// is answered, in order, before the answers are written together (one
    /// write per batch under pipelining). Returns the number of requests
    /// answered and why the connection ended.
    async fn run(&mut self) -> (u64, &'static str) {
        let mut answered = 0u64;
        // One timer for the connection's life: `deadline` moves on after
        // every batch, and the sleep is re-armed only when it fires before
        // it (a timeout per read registered a timer per request).
        let mut deadline = tokio::time::Instant::now() + self.idle_timeout;
        let idle = tokio::time::sleep_until(deadline);
        tokio::pin!(idle);
        loop {
            let read = tokio::select! {
                () = self.shutdown.wait() => return (answered, "server shutdown"),
                () = &mut idle => {
                    if tokio::time::Instant::now() < deadline {
                        idle.as_mut().reset(deadline);
                        continue;
                    }
                    return (answered, "idle timeout");
                }
                // Cancellation safe: a partial frame stays buffered.
                read = self.connection.read_frame_with(decode_request) => read,
            };
            // A real request keeps the connection from being evicted for a
            // newcomer until its answer is written.
            let mut working = None;
            let first = read.and_then(Option::transpose);
            let mut next = self
                .take(first, &mut working, &mut answered)
                .await
                .unwrap_or(Next::Close("peer closed"));
            // The rest of what that read delivered; a partial frame at the
            // end stays buffered for the next read.
            while let Next::Continue = next {
                let buffered = self
                    .connection
                    .next_buffered_with(decode_request)
                    .and_then(Option::transpose);
                match self.take(buffered, &mut working, &mut answered).await {
                    Some(then) => next = then,
                    None => break,
                }
            }
            // Answers already made are delivered even when closing (the
            // peer may only have shut its write side).
            let flushed = self.flush().await;
            drop(working);
            if let Next::Close(reason) = next.or(flushed) {
                return (answered, reason);
            }
            deadline = tokio::time::Instant::now() + self.idle_timeout;
        }
    }

    /// Handles one frame a read or the buffer delivered; `None` when there
    /// was no whole frame. A frame that is a request marks the connection
    /// `working` (a frame that is no request proves nothing).
    async fn take(
        &mut self,
        frame: Result<Option<Decoded>, FrameError>,
        working: &mut Option<Working>,
        answered: &mut u64,
    ) -> Option<Next> {
        match frame {
            Ok(None) => None,
            Ok(Some(decoded)) => {
                if decoded.request.is_ok() {
                    working.get_or_insert_with(|| self.connection.get_ref().working());
                } else {
                    self.connection.get_ref().misbehaved();
                }
                *answered += 1;
                Some(self.answer(decoded).await)
            }
            Err(err) => Some(self.frame_failed(err).await),
        }
    }

    /// Answers one decoded frame (into the pending answers), logging the
    /// outcome.
    async fn answer(&mut self, decoded: Decoded) -> Next {
        let started = Instant::now();
        let id = decoded.id;
        let mut audit = Audited::default();
        let (kind, result) = match decoded.request {
            Ok(request) => {
                let kind = request.op.kind();
                audit = Audited::of(&request.op);
                if let PeerTrust::Unprivileged(own) = &self.peer {
                    // Refused below if it names anyone else; who it is
                    // stays in the record.
                    audit.caller = Some(own.clone());
                }
                let result = match self.peer.caller(request.caller) {
                    Ok(caller) => {
                        let context = Context {
                            role: self.role,
                            secret_peers: self.secret_peers,
                            privileged: self.peer == PeerTrust::Privileged,
                        };
                        let result = tokio::time::timeout(
                            self.request_timeout,
                            apply(self.service, context, request.op, &caller),
                        )
                        .await
                        .unwrap_or_else(|_| {
                            Err(ServiceError::Unavailable(format!(
                                "request timed out after {} ms",
                                millis(self.request_timeout)
                            )))
                        });
                        audit.caller = Some(caller);
                        result
                    }
                    Err(err) => Err(err),
                };
                (kind, result)
            }
            Err(err) => ("invalid", Err(err)),
        };
        let body = match result {
            Ok(body) => body,
            Err(err) => ResponseBody::Error {
                code: err.code(),
                message: err.to_string(),
            },
        };
        let outcome = match &body {
            ResponseBody::Error { code, .. } => code.as_str(),
            _ => "ok",
        };
        // Recorded before the answer leaves: a read the peer received is
        // never missing from the trail.
        audit.record(self.service.audit(), &self.peer_text, &body);
        let next = self.queue(Response::new(id, body)).await;
        tracing::info!(
            request_id = id,
            op = kind,
            outcome,
            duration_ms = millis(started.elapsed()),
            "request"
        );
        next
    }

    /// Adds a response to the pending answers, writing them if they reached
    /// [`FLUSH_AT`]. A response over the write limit (a secret larger than
    /// the configured response frame) is replaced by a `TooLarge` error;
    /// nothing of it was queued.
    async fn queue(&mut self, response: Response) -> Next {
        let id = response.id;
        let max = self.connection.limits().max_write;
        let encoded = encode_frame_into(&response, max, &mut self.out);
        drop(response);
        match encoded {
            Ok(()) => {}
            Err(FrameError::OutgoingTooLarge { len, max }) => {
                let error = Response::error(
                    id,
                    ErrorCode::TooLarge,
                    format!("the response would be {len} bytes; this server sends at most {max}"),
                );
                if let Err(err) = encode_frame_into(&error, max, &mut self.out) {
                    tracing::debug!(error = %err, "encoding an error response failed");
                    return Next::Close("write failed");
                }
            }
            Err(err) => {
                tracing::debug!(error = %err, "encoding a response failed");
                return Next::Close("write failed");
            }
        }
        if self.out.len() >= FLUSH_AT {
            self.flush().await
        } else {
            Next::Continue
        }
    }

    /// Writes the pending answers in one write within the request timeout,
    /// then wipes them (also when the write failed).
    async fn flush(&mut self) -> Next {
        if self.out.is_empty() {
            return Next::Continue;
        }
        let written = tokio::time::timeout(
            self.request_timeout,
            self.connection.write_frames(&self.out),
        )
        .await;
        self.out.as_mut_slice().zeroize();
        self.out.clear();
        if self.out.capacity() > OUT_KEEP {
            self.out = Zeroizing::new(Vec::new());
        }
        match written {
            Ok(Ok(())) => Next::Continue,
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "writing responses failed");
                Next::Close("write failed")
            }
            // A cancelled write may have left half a frame on the wire.
            Err(_elapsed) => Next::Close("write timeout"),
        }
    }

    /// Handles a frame that could not be read as a request.
    async fn frame_failed(&mut self, err: FrameError) -> Next {
        match err {
            FrameError::TooLarge { len, max } => {
                tracing::warn!(announced = len, max, "request frame too large; closing");
                self.service.audit().request(
                    AuditOp::Malformed,
                    Vec::new(),
                    None,
                    None,
                    &self.peer_text,
                    outcome_of(ErrorCode::TooLarge),
                );
                let message = format!(
                    "request frame of {len} bytes exceeds the limit of {max} bytes; closing the connection"
                );
                // The answers to the requests before it go first.
                if let Next::Continue = self.flush().await {
                    self.refuse(Response::error(0, ErrorCode::TooLarge, message))
                        .await;
                }
                Next::Close("frame too large")
            }
            FrameError::Decode(reason) => {
                self.connection.get_ref().misbehaved();
                // The frame was consumed, so the stream is still in sync.
                tracing::info!(
                    op = "invalid",
                    outcome = "BadRequest",
                    "undecodable request frame"
                );
                self.service.audit().request(
                    AuditOp::Malformed,
                    Vec::new(),
                    None,
                    None,
                    &self.peer_text,
                    outcome_of(ErrorCode::BadRequest),
                );
                let message = format!("request frame is not a valid request: {reason}");
                self.queue(Response::error(0, ErrorCode::BadRequest, message))
                    .await
            }
            FrameError::Truncated { .. } => Next::Close("peer closed mid-frame"),
            other => {
                tracing::debug!(error = %other, "reading request failed");
                Next::Close("read failed")
            }
        }
    }

    /// Sends a final error (bounded, best effort) and closes the write side.
    async fn refuse(&mut self, response: Response) {
        let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
            if self.connection.write_message(&response).await.is_ok() {
                let _ = self.connection.shutdown().await;
            }
        })
        .await;
    }
}

/// What a request is answered in the context of.
#[derive(Clone, Copy)]
struct Context {
    role: Role,
    secret_peers: SecretPeers,
    privileged: bool,
}

/// Runs one operation against the service, if this listener's role serves it.
async fn apply(
    service: &KeystoreService,
    context: Context,
    op: RequestOp,
    caller: &Caller,
) -> Result<ResponseBody, ServiceError> {
    let role = context.role;
    // The load port's peer policy already refused anyone else; this keeps
    // `Load` privileged even if a listener is ever misconfigured.
    let load_port_op = matches!(
        op,
        RequestOp::Load { .. }
            | RequestOp::AuditRead { .. }
            | RequestOp::AuditCheckpoint
            | RequestOp::LogRead { .. }
    );
    if load_port_op && !context.privileged {
        return Err(ServiceError::Denied(format!(
            "{} is accepted only from a privileged peer",
            op.kind()
        )));
    }
    match (role, &op) {
        (Role::Secrets, _) if load_port_op => {
            return Err(ServiceError::BadRequest(format!(
                "{} is accepted only on the enclave's load port (--load-listen, default 5001)",
                op.kind()
            )));
        }
        (Role::Loading, _) if load_port_op => {}
        (Role::Loading, RequestOp::Status) => {}
        (Role::Loading, _) => {
            return Err(ServiceError::BadRequest(format!(
                "the load port answers Load, Status, the audit operations and LogRead only, not {}; \
                 host apps use the secret port",
                op.kind()
            )));
        }
        (Role::Secrets, _) => {}
    }
    match op {
        RequestOp::Get { name } => {
            let mut value = service.get(&name, caller)?;
            // Moves the plaintext into the response without another copy;
            // the emptied wrapper has nothing left to wipe.
            let value = SecretBytes::new(std::mem::take(&mut *value));
            Ok(ResponseBody::Secret { name, value })
        }
        RequestOp::List => Ok(ResponseBody::Names {
            names: service.list(caller)?,
        }),
        RequestOp::Status => {
            let mut status = service.status();
            status.secret_peers = Some(context.secret_peers.as_str().to_owned());
            Ok(ResponseBody::Status(status))
        }
        RequestOp::Attest { nonce, user_data } => {
            let document = service.attest(nonce, user_data).await?;
            Ok(ResponseBody::Attestation { document })
        }
        RequestOp::Load { entries } => {
            let count = service.load(entries).await?;
            Ok(ResponseBody::Loaded { count })
        }
        RequestOp::AuditRead { after, max } => {
            let batch = service
                .audit()
                .read(after.as_ref(), max)
                .map_err(|e| ServiceError::BadRequest(e.to_string()))?;
            Ok(ResponseBody::AuditRecords(batch))
        }
        RequestOp::AuditCheckpoint => {
            let seq = service
                .audit()
                .checkpoint()
                .await
                .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
            Ok(ResponseBody::AuditCheckpointed { seq })
        }
        RequestOp::LogRead { after, max } => match service.log_ring() {
            Some(ring) => Ok(ResponseBody::LogRecords(ring.read(after.as_ref(), max))),
            None => Err(ServiceError::Unavailable(
                "this enclave keeps no log ring (--log-ring 0)".to_owned(),
            )),
        },
        RequestOp::GetCredentials => Err(ServiceError::Unsupported(
            "GetCredentials is served by the host's credentials service, not by the enclave"
                .to_owned(),
        )),
    }
}

/// What the audit record of one request says, gathered before the
/// operation consumes the request.
struct Audited {
    op: AuditOp,
    names: Vec<String>,
    count: Option<u64>,
    caller: Option<keystore_shared::Caller>,
    /// Recorded only when refused (`Status`, audit reads: the daemon polls
    /// them, and a checkpoint is its own record).
    only_refusals: bool,
}

impl Default for Audited {
    /// A frame that did not decode as a request.
    fn default() -> Self {
        Audited {
            op: AuditOp::Malformed,
            names: Vec::new(),
            count: None,
            caller: None,
            only_refusals: false,
        }
    }
}

impl Audited {
    fn of(op: &RequestOp) -> Audited {
        let (op, names, count, only_refusals) = match op {
            RequestOp::Get { name } => (AuditOp::Get, vec![name.clone()], None, false),
            RequestOp::List => (AuditOp::List, Vec::new(), None, false),
            RequestOp::Attest { .. } => (AuditOp::Attest, Vec::new(), None, false),
            // The entry count, never the names.
            RequestOp::Load { entries } => (
                AuditOp::Load,
                Vec::new(),
                Some(u64::try_from(entries.len()).unwrap_or(u64::MAX)),
                false,
            ),
            RequestOp::Status => (AuditOp::Status, Vec::new(), None, true),
            RequestOp::AuditRead { .. }
            | RequestOp::AuditCheckpoint
            | RequestOp::LogRead { .. } => (AuditOp::Audit, Vec::new(), None, true),
            // Valid CBOR, but not a request this server takes.
            RequestOp::GetCredentials => (AuditOp::Malformed, Vec::new(), None, false),
        };
        Audited {
            op,
            names,
            count,
            caller: None,
            only_refusals,
        }
    }

    fn record(self, audit: &AuditTrail, peer: &str, body: &ResponseBody) {
        let (outcome, count) = match body {
            ResponseBody::Error { code, .. } => (outcome_of(*code), self.count),
            _ if self.only_refusals => return,
            // How many names the caller was shown.
            ResponseBody::Names { names } => (
                Outcome::Ok,
                Some(u64::try_from(names.len()).unwrap_or(u64::MAX)),
            ),
            _ => (Outcome::Ok, self.count),
        };
        audit.request(self.op, self.names, count, self.caller, peer, outcome);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
