//! The one accept loop every nitro-keystore server runs: the enclave's secret
//! and load ports, the host's credentials service and KMS forwarder, and the
//! KMS emulator.
//!
//! [`serve`] owns the listener, the connection slots and shutdown; a
//! [`Handler`] owns what happens on one admitted connection. For every
//! accepted connection, in this order:
//!
//! 1. **Peer policy**: [`PeerPolicy::check`] sees what the kernel says about
//!    the peer before a single byte is read. A refused peer is told so by
//!    [`Handler::refuse`] ([`Refusal::Denied`]) and closed.
//! 2. **Admission**: at most [`ServeConfig::max_connections`] connections
//!    are served at once. A connection beyond that waits up to
//!    [`ServeConfig::admission_wait`] for a slot (at most as many wait as
//!    there are slots), then is told [`Refusal::Busy`] and closed. Refusals
//!    are bounded too: each gets [`REFUSAL_TIMEOUT`], and when as many
//!    refusals are already under way as there are slots, further ones are
//!    closed without a word.
//!
//!    With [`ServeConfig::evict_idle`] (request/response servers: the
//!    enclave's ports, the agent), a connection that finds every slot taken
//!    first **evicts** one connection that is waiting for its next request
//!    rather than queueing behind it: a peer that connects and says nothing,
//!    or trickles a frame, cannot hold slots that someone else needs. The
//!    victim is chosen among connections that sent a frame that was no
//!    request ([`Watched::misbehaved`]), else among those that never had a
//!    request answered, else among all waiting ones; from the peer (unix
//!    uid; every tcp or vsock peer counts as one) holding the most of them,
//!    so one local user's squatting sockets go before another user's, and
//!    of that peer's the one waiting longest. A connection is never evicted
//!    while its handler marks a request in progress ([`Watched::working`]).
//!    The victim's slot passes
//!    to the newcomer at once, so a burst of newcomers does not queue
//!    behind victims still closing. When every slot is busy with requests,
//!    the newcomer waits as above.
//! 3. **Serving**: [`Handler::handle`] runs on the connection, wrapped so
//!    that no byte moving in either direction for
//!    [`ServeConfig::idle_timeout`] closes it, and so that it never lives
//!    longer than [`ServeConfig::max_lifetime`] when that is set (a peer
//!    that trickles one byte at a time cannot hold a slot forever).
//!
//! **Shutdown** (one behaviour for every server): when the `shutdown` future
//! completes, the listener is closed at once (new clients are refused by the
//! OS, a unix socket file is removed), waiting connections give up, and every
//! handler's [`Accepted::shutdown`] fires so it can stop at a safe point
//! (between requests). Whatever still runs after
//! [`ServeConfig::shutdown_grace`] is aborted. [`serve`] returns only after
//! every connection task has ended.
//!
//! Transient accept errors (aborted handshakes, descriptor exhaustion) back
//! off from 10 ms to 1 s and continue; any other accept error stops the loop
//! (after the same drain) and is returned.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::endpoint::{EndpointError, Listener, Peer, Stream, VSOCK_CID_PARENT};

/// How long a refused peer is given to receive its refusal.
pub const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);
/// First pause after a transient accept error.
const ACCEPT_BACKOFF_INITIAL: Duration = Duration::from_millis(10);
/// Longest pause between accept retries.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Limits and timeouts of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// A short name for logs ("secret server", "forwarder", ...).
    pub name: &'static str,
    /// Connections served at once.
    pub max_connections: usize,
    /// How long a connection beyond the limit waits for a slot.
    pub admission_wait: Duration,
    /// A connection with no byte read or written for this long is closed.
    pub idle_timeout: Duration,
    /// A connection is closed this long after admission, however busy.
    pub max_lifetime: Option<Duration>,
    /// How long connections may finish after shutdown begins.
    pub shutdown_grace: Duration,
    /// Whether a connection finding every slot taken evicts the one that
    /// has waited longest for its next request (see the module docs). Only
    /// for handlers that mark requests in progress with
    /// [`Watched::working`]; a byte pipe (the forwarder) must not turn it on.
    pub evict_idle: bool,
}

impl ServeConfig {
    /// Defaults for a server called `name`: 256 connections, 2 s admission
    /// wait, 60 s idle timeout, no lifetime bound, 5 s shutdown grace, no
    /// eviction.
    pub fn named(name: &'static str) -> Self {
        ServeConfig {
            name,
            max_connections: 256,
            admission_wait: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(60),
            max_lifetime: None,
            shutdown_grace: Duration::from_secs(5),
            evict_idle: false,
        }
    }

    /// Rejects values that would make the server refuse everything or never
    /// time out.
    pub fn validate(&self) -> Result<(), ServeError> {
        let invalid = |what: &'static str| Err(ServeError::InvalidConfig(what));
        if self.max_connections == 0 {
            return invalid("max_connections must be at least 1");
        }
        if self.max_connections > Semaphore::MAX_PERMITS / 4 {
            return invalid("max_connections is unreasonably large");
        }
        if self.idle_timeout.is_zero() {
            return invalid("idle_timeout must be > 0");
        }
        if self.max_lifetime.is_some_and(|d| d.is_zero()) {
            return invalid("max_lifetime must be > 0 when set");
        }
        Ok(())
    }
}

/// Why [`serve`] could not run or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A configuration value is unusable.
    #[error("invalid server configuration: {0}")]
    InvalidConfig(&'static str),
    /// The listener failed in a way that does not pass; open connections
    /// were drained first.
    #[error("stopped accepting: {0}")]
    Accept(EndpointError),
}

/// Why a connection was not served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot stayed taken for the admission wait.
    Busy {
        /// The server's slot count, for the message.
        max_connections: usize,
    },
    /// The peer policy refused this peer.
    Denied(PeerDenied),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Busy { max_connections } => write!(
                f,
                "server busy: all {max_connections} connection slots are in use; try again later"
            ),
            Refusal::Denied(denied) => denied.fmt(f),
        }
    }
}

/// A peer policy's reason for refusing a peer (no secret material: it is
/// sent to the peer and logged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("connection refused: {reason}")]
pub struct PeerDenied {
    /// What about the peer is not allowed.
    pub reason: String,
}

/// Decides from what the kernel reports about a peer whether it may be
/// served; runs before any byte is read from it.
pub trait PeerPolicy: Send + Sync + 'static {
    /// `Ok` to serve `peer`, or why not.
    fn check(&self, peer: &Peer) -> Result<(), PeerDenied>;
}

/// Serves every peer.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnyPeer;

impl PeerPolicy for AnyPeer {
    fn check(&self, _peer: &Peer) -> Result<(), PeerDenied> {
        Ok(())
    }
}

/// Serves only privileged peers, by what the kernel reports (DESIGN §3):
/// on Linux only a process with `CAP_NET_BIND_SERVICE` can bind a port below
/// 1024, for `AF_VSOCK` as for TCP, so the source port proves privilege.
///
/// - vsock: the parent instance (CID 3) from a port below 1024;
/// - tcp: a loopback address and a port below 1024;
/// - unix: `SO_PEERCRED` uid 0, or the uid this server runs as.
///
/// The server's own uid counts as privileged on unix sockets so that a
/// local run as an ordinary user (the demo, in mock mode) works: a process
/// of the same uid can already signal, trace or read the memory of this
/// one, so refusing it protects nothing. When the server runs as root this
/// is just uid 0.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrivilegedPeers;

/// The highest port only a privileged process can bind.
pub const MAX_PRIVILEGED_PORT: u32 = 1023;

impl PrivilegedPeers {
    /// Whether `peer` is privileged (the policy's verdict, as a bool).
    pub fn admits(peer: &Peer) -> bool {
        PrivilegedPeers.check(peer).is_ok()
    }
}

/// The effective uid of this process.
fn own_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

impl PeerPolicy for PrivilegedPeers {
    fn check(&self, peer: &Peer) -> Result<(), PeerDenied> {
        let reason = match peer {
            Peer::Vsock { cid, .. } if *cid != VSOCK_CID_PARENT => {
                format!("vsock peer CID {cid} is not the parent instance (CID {VSOCK_CID_PARENT})")
            }
            Peer::Vsock { port, .. } if *port > MAX_PRIVILEGED_PORT => {
                format!("{peer} is not privileged: its source port is above {MAX_PRIVILEGED_PORT}")
            }
            Peer::Vsock { .. } => return Ok(()),
            Peer::Tcp(addr) if !addr.ip().is_loopback() => {
                format!("{peer} is not a loopback address")
            }
            Peer::Tcp(addr) if u32::from(addr.port()) > MAX_PRIVILEGED_PORT => {
                format!("{peer} is not privileged: its source port is above {MAX_PRIVILEGED_PORT}")
            }
            Peer::Tcp(_) => return Ok(()),
            Peer::Unix {
                cred: Some(cred), ..
            } if cred.uid == 0 || cred.uid == own_uid() => return Ok(()),
            Peer::Unix {
                cred: Some(cred), ..
            } => match own_uid() {
                0 => format!("unix peer uid {} is not root", cred.uid),
                own => format!(
                    "unix peer uid {} is neither root nor this server's uid {own}",
                    cred.uid
                ),
            },
            Peer::Unix { cred: None, .. } | Peer::Unknown => {
                format!("the kernel did not say who {peer} is")
            }
        };
        Err(PeerDenied { reason })
    }
}

/// Serves only the enclave: for the host's services the enclave reaches
/// (the credentials service, the KMS forwarder), by what the kernel reports.
///
/// - vsock: only peers whose CID is `cid` (the enclave's, given to the
///   daemon with `--enclave-cid`); no other enclave or VM may borrow the
///   instance's credentials or its way to KMS;
/// - tcp (tests and local runs): loopback addresses only;
/// - unix (tests and local runs): any peer; the socket file's permissions
///   decide who can connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VsockCidPeers {
    /// The one vsock CID served.
    pub cid: u32,
}

impl PeerPolicy for VsockCidPeers {
    fn check(&self, peer: &Peer) -> Result<(), PeerDenied> {
        let reason = match peer {
            Peer::Vsock { cid, .. } if *cid == self.cid => return Ok(()),
            Peer::Vsock { cid, .. } => format!(
                "vsock peer CID {cid} is not the enclave (CID {}; see --enclave-cid)",
                self.cid
            ),
            Peer::Tcp(addr) if addr.ip().is_loopback() => return Ok(()),
            Peer::Tcp(_) => format!("{peer} is not a loopback address"),
            Peer::Unix { .. } => return Ok(()),
            Peer::Unknown => format!("the kernel did not say who {peer} is"),
        };
        Err(PeerDenied { reason })
    }
}

/// What a server does with its connections.
pub trait Handler: Send + Sync + 'static {
    /// Serves one admitted connection until it is done. Should return soon
    /// after [`Accepted::shutdown`] fires, at a point where stopping loses
    /// nothing (between requests); it is aborted after the shutdown grace.
    fn handle(&self, conn: Accepted) -> impl Future<Output = ()> + Send;

    /// Tells a peer that is not served why, before it is closed. Bounded by
    /// [`REFUSAL_TIMEOUT`]. The default says nothing.
    fn refuse(&self, stream: &mut Stream, refusal: &Refusal) -> impl Future<Output = ()> + Send {
        let _ = (stream, refusal);
        async {}
    }
}

/// A [`Handler`] made of a closure; see [`handler_fn`].
pub struct HandlerFn<F>(F);

/// Wraps `f(conn)` as a [`Handler`] that refuses silently (for tests and
/// small servers).
pub fn handler_fn<F, Fut>(f: F) -> HandlerFn<F>
where
    F: Fn(Accepted) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    HandlerFn(f)
}

impl<F, Fut> Handler for HandlerFn<F>
where
    F: Fn(Accepted) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    fn handle(&self, conn: Accepted) -> impl Future<Output = ()> + Send {
        (self.0)(conn)
    }
}

/// An admitted connection, handed to [`Handler::handle`].
#[derive(Debug)]
pub struct Accepted {
    /// The byte stream; its traffic keeps the connection from idling out.
    pub stream: Watched<Stream>,
    /// Who the kernel says is on the other end.
    pub peer: Peer,
    /// A number unique within this listener, for logs.
    pub id: u64,
    /// Fires when the server starts shutting down.
    pub shutdown: Shutdown,
}

/// Tells a handler the server is shutting down.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Completes once shutdown has begun (at once if it already has).
    pub async fn wait(&mut self) {
        // An error means the sender is gone, which also means shutdown.
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// Whether shutdown has begun.
    pub fn is_started(&self) -> bool {
        *self.0.borrow()
    }
}

/// Runs the accept loop on `listener` until `shutdown` completes, then
/// drains; see the module docs for the whole behaviour.
pub async fn serve<H: Handler>(
    listener: Listener,
    handler: Arc<H>,
    policy: Arc<dyn PeerPolicy>,
    config: ServeConfig,
    shutdown: impl Future,
) -> Result<(), ServeError> {
    config.validate()?;
    let (notify, shutdown_rx) = watch::channel(false);
    let mut state = AcceptLoop {
        admission: Arc::new(Admission {
            slots: Arc::new(Semaphore::new(config.max_connections)),
            waiting: Arc::new(Semaphore::new(config.max_connections)),
            refusing: Arc::new(Semaphore::new(config.max_connections)),
            max_connections: config.max_connections,
            wait: config.admission_wait,
            evict_idle: config.evict_idle,
            epoch: Instant::now(),
            admitted: Mutex::new(HashMap::new()),
        }),
        listener,
        handler,
        policy,
        config,
        shutdown: Shutdown(shutdown_rx),
        tasks: JoinSet::new(),
        next_id: 1,
    };
    tracing::info!(server = state.config.name, endpoint = %state.listener.local_endpoint(), "listening");
    let outcome = tokio::select! {
        outcome = state.run() => outcome,
        _ = shutdown => Ok(()),
    };
    notify.send_replace(true);
    let AcceptLoop {
        listener,
        mut tasks,
        config,
        ..
    } = state;
    drop(listener);
    tracing::info!(
        server = config.name,
        open_connections = tasks.len(),
        "shutting down"
    );
    drain(&mut tasks, &config).await;
    tracing::info!(server = config.name, "stopped");
    outcome
}

/// The accept loop's state.
struct AcceptLoop<H> {
    listener: Listener,
    handler: Arc<H>,
    policy: Arc<dyn PeerPolicy>,
    config: ServeConfig,
    admission: Arc<Admission>,
    shutdown: Shutdown,
    tasks: JoinSet<()>,
    next_id: u64,
}

impl<H: Handler> AcceptLoop<H> {
    async fn run(&mut self) -> Result<(), ServeError> {
        let mut backoff = ACCEPT_BACKOFF_INITIAL;
        loop {
            tokio::select! {
                // Reap finished connections so the set stays small, and
                // surface a handler panic (a bug) in the logs.
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    log_join(self.config.name, joined);
                }
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        backoff = ACCEPT_BACKOFF_INITIAL;
                        self.spawn(stream, peer);
                    }
                    Err(err) if err.is_transient() => {
                        tracing::warn!(
                            server = self.config.name,
                            error = %err,
                            backoff_ms = millis(backoff),
                            "transient accept error; retrying"
                        );
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    }
                    Err(err) => {
                        tracing::error!(server = self.config.name, error = %err, "accept failed; no longer accepting");
                        return Err(ServeError::Accept(err));
                    }
                },
            }
        }
    }

    fn spawn(&mut self, stream: Stream, peer: Peer) {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let span = tracing::info_span!("conn", server = self.config.name, id, peer = %peer);
        let handler = self.handler.clone();
        let admission = self.admission.clone();
        let mut shutdown = self.shutdown.clone();
        let verdict = self.policy.check(&peer);
        let idle_timeout = self.config.idle_timeout;
        let max_lifetime = self.config.max_lifetime;
        self.tasks.spawn(
            async move {
                let mut stream = stream;
                if let Err(denied) = verdict {
                    tracing::warn!(reason = %denied.reason, "peer refused by policy");
                    admission
                        .refuse(&*handler, &mut stream, Refusal::Denied(denied))
                        .await;
                    return;
                }
                let owner = match &peer {
                    Peer::Unix {
                        cred: Some(cred), ..
                    } => Some(cred.uid),
                    _ => None,
                };
                let Some(slot) = admission.admit(&mut shutdown).await else {
                    if !shutdown.is_started() {
                        tracing::warn!(
                            max_connections = admission.max_connections,
                            "connection refused: server busy"
                        );
                        let busy = Refusal::Busy {
                            max_connections: admission.max_connections,
                        };
                        admission.refuse(&*handler, &mut stream, busy).await;
                    }
                    return;
                };
                let opened = Instant::now();
                let activity = Arc::new(Activity::new());
                let standing = admission.register(id, owner, slot);
                let conn = Accepted {
                    stream: Watched::new(stream, activity.clone(), standing.standing.clone()),
                    peer,
                    id,
                    shutdown,
                };
                let lifetime = async {
                    match max_lifetime {
                        Some(limit) => tokio::time::sleep(limit).await,
                        None => std::future::pending().await,
                    }
                };
                let reason = tokio::select! {
                    () = handler.handle(conn) => "done",
                    () = activity.idle(idle_timeout) => "idle timeout",
                    () = lifetime => "lifetime limit",
                    () = standing.standing.evicted.notified() => "evicted for a new connection",
                };
                let (read, written) = (
                    activity.read.load(Ordering::Relaxed),
                    activity.written.load(Ordering::Relaxed),
                );
                let duration_ms = millis(opened.elapsed());
                if reason == "done" {
                    // The handler has logged its own ending.
                    tracing::debug!(reason, read, written, duration_ms, "connection closed");
                } else {
                    tracing::info!(reason, read, written, duration_ms, "connection cut");
                }
                // Frees the slot, unless a newcomer took it (eviction).
                drop(standing);
            }
            .instrument(span),
        );
    }
}

/// Slot bookkeeping shared by the connection tasks.
struct Admission {
    /// One permit per connection being served.
    slots: Arc<Semaphore>,
    /// One permit per connection waiting for a slot.
    waiting: Arc<Semaphore>,
    /// One permit per refusal being delivered.
    refusing: Arc<Semaphore>,
    max_connections: usize,
    wait: Duration,
    /// Whether a newcomer evicts a connection waiting for a request.
    evict_idle: bool,
    /// The zero of every [`Standing`]'s clock.
    epoch: Instant,
    /// Where each admitted connection stands, by connection id.
    admitted: Mutex<HashMap<u64, Arc<Standing>>>,
}

impl Admission {
    /// Records an admitted connection as a candidate for eviction until the
    /// returned guard is dropped.
    fn register(
        self: &Arc<Self>,
        id: u64,
        owner: Option<u32>,
        slot: OwnedSemaphorePermit,
    ) -> Registered {
        let standing = Arc::new(Standing {
            epoch: self.epoch,
            state: AtomicU64::new(millis(self.epoch.elapsed())),
            evicted: Notify::new(),
            owner,
            proven: AtomicBool::new(false),
            misbehaved: AtomicBool::new(false),
            slot: Mutex::new(Some(slot)),
        });
        self.lock().insert(id, standing.clone());
        Registered {
            admission: self.clone(),
            id,
            standing,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Standing>>> {
        // The map stays consistent whatever panicked while holding it.
        self.admitted.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the slot of one connection waiting for a request, and tells
    /// it to close. Connections that sent garbage go first, then those
    /// that never had a request answered (a newcomer that has not spoken
    /// yet is not outranked by a stream of garbage senders), then the rest;
    /// within that class, the owner with the most waiting connections, and
    /// of its, the one waiting longest. The slot passes straight to the
    /// newcomer, so a burst of newcomers never queues behind victims still
    /// closing.
    fn evict_one(&self) -> Option<OwnedSemaphorePermit> {
        let admitted = self.lock();
        // A candidate may start a request between the choice and the
        // swap below; then the next candidate is tried (bounded).
        for _ in 0..4 {
            let waiting = || {
                admitted
                    .values()
                    .filter_map(|s| s.waiting_since().map(|since| (since, s)))
            };
            let rank = waiting().map(|(_, s)| s.rank()).min()?;
            let class = || waiting().filter(|(_, s)| s.rank() == rank);
            let mut per_owner: HashMap<Option<u32>, usize> = HashMap::new();
            for (_, standing) in class() {
                *per_owner.entry(standing.owner).or_default() += 1;
            }
            let (&owner, _) = per_owner.iter().max_by_key(|(_, count)| **count)?;
            let victim = class()
                .filter(|(_, s)| s.owner == owner)
                .min_by_key(|(since, _)| *since);
            let (since, victim) = victim?;
            if victim
                .state
                .compare_exchange(since, EVICTED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                victim.evicted.notify_one();
                let slot = victim
                    .slot
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                if slot.is_some() {
                    return slot;
                }
            }
        }
        None
    }

    /// A slot, or `None` when none frees up within the wait (or on
    /// shutdown).
    async fn admit(&self, shutdown: &mut Shutdown) -> Option<OwnedSemaphorePermit> {
        match self.slots.clone().try_acquire_owned() {
            Ok(slot) => return Some(slot),
            Err(TryAcquireError::Closed) => return None,
            Err(TryAcquireError::NoPermits) => {}
        }
        if self.evict_idle
            && let Some(slot) = self.evict_one()
        {
            tracing::debug!("every slot taken: evicted the connection waiting longest");
            return Some(slot);
        }
        let _waiter = self.waiting.clone().try_acquire_owned().ok()?;
        tokio::select! {
            slot = tokio::time::timeout(self.wait, self.slots.clone().acquire_owned()) => {
                slot.ok()?.ok()
            }
            () = shutdown.wait() => None,
        }
    }

    /// Delivers a refusal within [`REFUSAL_TIMEOUT`], unless too many are
    /// already being delivered.
    async fn refuse<H: Handler>(&self, handler: &H, stream: &mut Stream, refusal: Refusal) {
        let Ok(_permit) = self.refusing.clone().try_acquire_owned() else {
            return;
        };
        let _ = tokio::time::timeout(REFUSAL_TIMEOUT, handler.refuse(stream, &refusal)).await;
    }
}

/// Lets connections finish within the grace, then aborts the rest.
async fn drain(tasks: &mut JoinSet<()>, config: &ServeConfig) {
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        while let Some(joined) = tasks.join_next().await {
            log_join(config.name, joined);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            server = config.name,
            remaining = tasks.len(),
            grace_ms = millis(config.shutdown_grace),
            "connections did not finish within the shutdown grace; aborting them"
        );
        tasks.abort_all();
        while let Some(joined) = tasks.join_next().await {
            log_join(config.name, joined);
        }
    }
}

fn log_join(server: &str, joined: Result<(), tokio::task::JoinError>) {
    if let Err(err) = joined
        && err.is_panic()
    {
        tracing::error!(server, error = %err, "connection handler panicked");
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// When bytes last moved on a connection, and how many.
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    read: AtomicU64,
    written: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        millis(self.start.elapsed())
    }

    fn touch(&self, counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Completes once no byte has moved for `limit`.
    async fn idle(&self, limit: Duration) {
        loop {
            let idle = Duration::from_millis(
                self.now_ms()
                    .saturating_sub(self.last_ms.load(Ordering::Relaxed)),
            );
            if idle >= limit {
                return;
            }
            tokio::time::sleep(limit - idle).await;
        }
    }
}

/// [`Standing::state`] while a request is in progress.
const WORKING: u64 = u64::MAX;
/// [`Standing::state`] once the connection was told to close.
const EVICTED: u64 = u64::MAX - 1;

/// Where an admitted connection stands, for eviction.
#[derive(Debug)]
struct Standing {
    /// [`Admission::epoch`].
    epoch: Instant,
    /// Milliseconds since `epoch` at which it began waiting for a request
    /// (admission, or the end of its last request), or [`WORKING`], or
    /// [`EVICTED`].
    state: AtomicU64,
    /// Fires when the connection is evicted.
    evicted: Notify,
    /// The unix uid of the peer; `None` for tcp and vsock peers.
    owner: Option<u32>,
    /// Whether a request was ever in progress on it ([`Watched::working`]).
    proven: AtomicBool,
    /// Whether it ever sent a frame that was no request
    /// ([`Watched::misbehaved`]).
    misbehaved: AtomicBool,
    /// The connection's slot, until it ends or a newcomer evicts it.
    slot: Mutex<Option<OwnedSemaphorePermit>>,
}

impl Standing {
    /// Its eviction class, lowest first: sent garbage, never had a request
    /// answered, the rest.
    fn rank(&self) -> u8 {
        if self.misbehaved.load(Ordering::Acquire) {
            0
        } else if !self.proven.load(Ordering::Acquire) {
            1
        } else {
            2
        }
    }

    /// Since when it has been waiting for a request, if it is.
    fn waiting_since(&self) -> Option<u64> {
        let state = self.state.load(Ordering::Acquire);
        (state < EVICTED).then_some(state)
    }
}

/// Removes a connection from the eviction candidates when it ends.
struct Registered {
    admission: Arc<Admission>,
    id: u64,
    standing: Arc<Standing>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.admission.lock().remove(&self.id);
        // Frees the slot now, whoever still holds the standing.
        drop(
            self.standing
                .slot
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
    }
}

/// Marks a request in progress on its connection while it lives
/// ([`Watched::working`]); dropping it makes the connection a candidate for
/// eviction again, as waiting since then.
#[derive(Debug)]
#[must_use = "the request counts as in progress only while this lives"]
pub struct Working {
    standing: Arc<Standing>,
}

impl Drop for Working {
    fn drop(&mut self) {
        let now = millis(self.standing.epoch.elapsed());
        // An evicted connection stays evicted.
        let _ =
            self.standing
                .state
                .compare_exchange(WORKING, now, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// A stream whose reads and writes count as activity for the idle timeout.
#[derive(Debug)]
pub struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
    standing: Arc<Standing>,
}

impl<S> Watched<S> {
    fn new(inner: S, activity: Arc<Activity>, standing: Arc<Standing>) -> Self {
        Watched {
            inner,
            activity,
            standing,
        }
    }

    /// Marks a request in progress until the guard is dropped, so that
    /// [`ServeConfig::evict_idle`] never closes this connection mid-request.
    /// A handler takes it once a complete request has been read and drops
    /// it once the answer is written; in between requests (and before the
    /// first) the connection may be evicted for a newcomer when every slot
    /// is taken.
    pub fn working(&self) -> Working {
        self.standing().working()
    }

    /// Records that the peer sent a frame that is no request: such a
    /// connection is the first to be evicted for a newcomer.
    pub fn misbehaved(&self) {
        self.standing.misbehaved.store(true, Ordering::Release);
    }

    /// A handle that marks requests in progress on this connection, for a
    /// handler that hands the stream itself to a protocol library (HTTP).
    pub fn standing(&self) -> RequestMarker {
        RequestMarker(self.standing.clone())
    }
}

/// Marks requests in progress on one connection; see [`Watched::working`].
#[derive(Debug, Clone)]
pub struct RequestMarker(Arc<Standing>);

impl RequestMarker {
    /// As [`Watched::working`].
    pub fn working(&self) -> Working {
        let standing = self.0.clone();
        standing.proven.store(true, Ordering::Release);
        let mut state = standing.state.load(Ordering::Acquire);
        // Too late if already evicted: the connection is being closed.
        while state < EVICTED {
            match standing.state.compare_exchange(
                state,
                WORKING,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => state = now,
            }
        }
        Working { standing }
    }
}

impl<S> Watched<S> {
    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Bytes read from the peer so far.
    pub fn bytes_read(&self) -> u64 {
        self.activity.read.load(Ordering::Relaxed)
    }

    /// Bytes written to the peer so far.
    pub fn bytes_written(&self) -> u64 {
        self.activity.written.load(Ordering::Relaxed)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            this.activity.touch(&this.activity.read, n);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result
            && n > 0
        {
            this.activity.touch(&this.activity.written, n);
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = result
            && n > 0
        {
            this.activity.touch(&this.activity.written, n);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
