//! Socket addresses for every transport nitro-keystore speaks.
//!
//! Production traffic runs over vsock, but build machines and tests have no
//! vsock loopback, so the same servers and clients must also run over TCP and
//! Unix sockets. [`Endpoint`] is the one address type for all three, and
//! [`Endpoint::bind`] / [`Endpoint::connect`] are the only places that know
//! which transport is in use: everything above them handles a single
//! [`Listener`] and a single [`Stream`] type.
//!
//! Text forms (what `FromStr` accepts and `Display` prints):
//!
//! - `vsock://CID:PORT` — `CID` is a number or `ANY` (listen on every CID);
//!   the parent instance is always CID 3.
//! - `tcp://HOST:PORT` — `HOST` is a name, an IPv4 address or a bracketed
//!   IPv6 address such as `[::1]`.
//! - `unix:///absolute/path`.

use std::fmt;
use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use nix::sys::socket::Backlog;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_vsock::{VsockAddr, VsockListener, VsockStream};

/// `VMADDR_CID_ANY`: listen on whatever CID this machine has. Written `ANY`.
pub const VSOCK_CID_ANY: u32 = u32::MAX;

/// The CID of the parent EC2 instance as seen from inside an enclave.
pub const VSOCK_CID_PARENT: u32 = 3;

/// Longest Unix socket path Linux accepts (`sun_path` is 108 bytes including
/// the terminating NUL); checked at parse time so a bad config fails early
/// with a clear message instead of a bare `EINVAL` at bind time.
pub const MAX_UNIX_PATH_LEN: usize = 107;

/// Longest DNS name accepted in a `tcp://` endpoint (RFC 1035 limit).
const MAX_HOST_LEN: usize = 253;

/// How much of a rejected input string is echoed back in an error, so a huge
/// bogus value cannot bloat logs.
const MAX_ECHOED_INPUT: usize = 120;

/// The accepted forms, repeated in every parse error so the operator sees
/// what to write instead.
const ACCEPTED_FORMS: &str = "expected vsock://CID:PORT (CID a number or ANY), \
     tcp://HOST:PORT (HOST a name, IPv4 address or [IPv6] address) \
     or unix:///absolute/path";

/// Where a server listens or a client connects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// An `AF_VSOCK` address; the production transport between enclave and
    /// parent.
    Vsock {
        /// Context id; [`VSOCK_CID_ANY`] means "every CID" (listening only).
        cid: u32,
        /// vsock port.
        port: u32,
    },
    /// A TCP address; used by tests, local runs and the KMS upstream.
    Tcp {
        /// Host name or IP address, without brackets for IPv6.
        host: String,
        /// TCP port; `0` asks the OS for a free one when binding.
        port: u16,
    },
    /// A Unix domain socket path; used by local runs and tests.
    Unix {
        /// Absolute filesystem path of the socket.
        path: PathBuf,
    },
}

/// Everything that can go wrong parsing, binding, connecting or accepting.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The text is not one of the accepted endpoint forms.
    #[error("invalid endpoint {input:?}: {reason}; {ACCEPTED_FORMS}")]
    Parse {
        /// The rejected input (truncated if long).
        input: String,
        /// What exactly is wrong with it.
        reason: String,
    },
    /// The OS refused to create the listener.
    #[error("cannot listen on {endpoint}: {source}{}", transport_hint(.endpoint))]
    Bind {
        /// The endpoint we tried to bind.
        endpoint: Endpoint,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
    /// A live server already listens on this Unix socket path, so it is not
    /// removed.
    #[error("cannot listen on unix://{}: another process is listening there", .path.display())]
    UnixSocketInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The Unix socket path exists and is not a socket; we never delete
    /// ordinary files to make room.
    #[error("cannot listen on unix://{}: the path exists and is not a socket", .path.display())]
    NotASocket {
        /// The offending path.
        path: PathBuf,
    },
    /// Connecting failed.
    #[error("cannot connect to {endpoint}: {source}{}", transport_hint(.endpoint))]
    Connect {
        /// The endpoint we tried to reach.
        endpoint: Endpoint,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
    /// `vsock://ANY:PORT` only makes sense for listening.
    #[error("cannot connect to {0}: CID ANY is only valid for listening; give the peer's CID")]
    ConnectToAny(Endpoint),
    /// Accepting a connection failed; see [`EndpointError::is_transient`].
    #[error("accept on {endpoint} failed: {source}")]
    Accept {
        /// The listener's endpoint.
        endpoint: Endpoint,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
}

impl EndpointError {
    /// Whether an accept loop should log this, back off briefly and keep
    /// serving rather than shut down: aborted handshakes and running out of
    /// file descriptors or buffers are conditions that pass.
    pub fn is_transient(&self) -> bool {
        let EndpointError::Accept { source, .. } = self else {
            return false;
        };
        matches!(
            source.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::Interrupted
                | io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::OutOfMemory
        ) || matches!(
            source.raw_os_error(),
            // EMFILE, ENFILE, ENOBUFS, ENOMEM
            Some(24) | Some(23) | Some(105) | Some(12)
        )
    }
}

/// Extra words for vsock failures, which on a machine without the vsock
/// driver are otherwise a puzzling "address family not supported".
fn transport_hint(endpoint: &Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Vsock { .. } => {
            " (vsock needs a Nitro Enclave or its parent instance with the vsock driver loaded)"
        }
        _ => "",
    }
}

fn parse_error(input: &str, reason: impl Into<String>) -> EndpointError {
    let input = match input.char_indices().nth(MAX_ECHOED_INPUT) {
        Some((cut, _)) => format!("{}…", input.get(..cut).unwrap_or_default()),
        None => input.to_owned(),
    };
    EndpointError::Parse {
        input,
        reason: reason.into(),
    }
}

/// Parses a decimal number made only of ASCII digits (`u32::from_str` would
/// also take a leading `+`, which no address form allows).
fn parse_digits<T: FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

impl Endpoint {
    /// A vsock endpoint.
    pub fn vsock(cid: u32, port: u32) -> Self {
        Endpoint::Vsock { cid, port }
    }

    /// A TCP endpoint; `host` is a name or an IP address (IPv6 without
    /// brackets).
    pub fn tcp(host: impl Into<String>, port: u16) -> Self {
        Endpoint::Tcp {
            host: host.into(),
            port,
        }
    }

    /// A Unix socket endpoint.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Endpoint::Unix { path: path.into() }
    }

    /// Starts listening. Unix sockets left behind by a previous run are
    /// replaced if nothing answers on them; the socket file is removed again
    /// when the [`Listener`] is dropped.
    pub async fn bind(&self) -> Result<Listener, EndpointError> {
        let bind_err = |source| EndpointError::Bind {
            endpoint: self.clone(),
            source,
        };
        match self {
            Endpoint::Tcp { host, port } => {
                let listener = TcpListener::bind((host.as_str(), *port))
                    .await
                    .map_err(bind_err)?;
                widen_backlog(&listener, self);
                let local = match listener.local_addr() {
                    Ok(addr) => Endpoint::tcp(addr.ip().to_string(), addr.port()),
                    Err(_) => self.clone(),
                };
                Ok(Listener {
                    inner: ListenerInner::Tcp(listener),
                    local,
                    _unix_file: None,
                })
            }
            Endpoint::Unix { path } => {
                let (listener, file) = bind_unix(self, path).await?;
                widen_backlog(&listener, self);
                Ok(Listener {
                    inner: ListenerInner::Unix(listener),
                    local: self.clone(),
                    _unix_file: file,
                })
            }
            Endpoint::Vsock { cid, port } => {
                let listener =
                    VsockListener::bind(VsockAddr::new(*cid, *port)).map_err(bind_err)?;
                widen_backlog(&listener, self);
                let local = match listener.local_addr() {
                    Ok(addr) => Endpoint::vsock(addr.cid(), addr.port()),
                    Err(_) => self.clone(),
                };
                Ok(Listener {
                    inner: ListenerInner::Vsock(listener),
                    local,
                    _unix_file: None,
                })
            }
        }
    }

    /// Opens a connection from a source port below 1024, which only a
    /// privileged process (root, or `CAP_NET_BIND_SERVICE`) can bind: how a
    /// privileged client proves itself to a server whose peer policy is
    /// [`crate::serve::PrivilegedPeers`]. Unix sockets need nothing extra
    /// (the server reads `SO_PEERCRED`).
    ///
    /// Ports are tried from a per-process starting point so that parallel
    /// clients rarely race for the same one; a port in use (or in
    /// `TIME_WAIT` towards the same peer) is skipped.
    ///
    /// vsock works the same way (the kernel applies the same rule to
    /// `AF_VSOCK` ports): the socket is made, bound and connected with
    /// blocking calls on the blocking pool (a vsock connect gives up after
    /// the kernel's connect timeout, 2 s by default), then handed to the
    /// runtime.
    pub async fn connect_privileged(&self) -> Result<Stream, EndpointError> {
        let connect_err = |source| EndpointError::Connect {
            endpoint: self.clone(),
            source,
        };
        match self {
            Endpoint::Unix { .. } => self.connect().await,
            Endpoint::Vsock { cid, .. } if *cid == VSOCK_CID_ANY => {
                Err(EndpointError::ConnectToAny(self.clone()))
            }
            Endpoint::Vsock { cid, port } => {
                let (cid, port) = (*cid, *port);
                let connected =
                    tokio::task::spawn_blocking(move || connect_vsock_privileged(cid, port))
                        .await
                        .map_err(|e| connect_err(io::Error::other(e.to_string())))?
                        .map_err(connect_err)?;
                let stream = VsockStream::new(connected).map_err(connect_err)?;
                Ok(Stream::Vsock(stream))
            }
            Endpoint::Tcp { host, port } => {
                let stream = connect_tcp_privileged(host, *port)
                    .await
                    .map_err(connect_err)?;
                stream.set_nodelay(true).map_err(connect_err)?;
                Ok(Stream::Tcp(stream))
            }
        }
    }

    /// Opens a connection. TCP connections have Nagle's algorithm disabled:
    /// the protocol is small request/response frames where batching only adds
    /// latency.
    pub async fn connect(&self) -> Result<Stream, EndpointError> {
        let connect_err = |source| EndpointError::Connect {
            endpoint: self.clone(),
            source,
        };
        match self {
            Endpoint::Tcp { host, port } => {
                let stream = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(connect_err)?;
                stream.set_nodelay(true).map_err(connect_err)?;
                Ok(Stream::Tcp(stream))
            }
            Endpoint::Unix { path } => {
                let stream = UnixStream::connect(path).await.map_err(connect_err)?;
                Ok(Stream::Unix(stream))
            }
            Endpoint::Vsock { cid, port } => {
                if *cid == VSOCK_CID_ANY {
                    return Err(EndpointError::ConnectToAny(self.clone()));
                }
                let stream = VsockStream::connect(VsockAddr::new(*cid, *port))
                    .await
                    .map_err(connect_err)?;
                Ok(Stream::Vsock(stream))
            }
        }
    }
}

/// Source ports tried by [`Endpoint::connect_privileged`]: the top half of
/// the privileged range, away from well-known services.
const PRIVILEGED_SOURCE_PORTS: std::ops::RangeInclusive<u16> = 512..=1023;

async fn connect_tcp_privileged(host: &str, port: u16) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the host resolved to no address");
    let count = PRIVILEGED_SOURCE_PORTS.len();
    let first = PRIVILEGED_SOURCE_PORTS.start();
    let offset = std::process::id() as usize;
    // A few addresses at most: each may cost up to one try per source port.
    for addr in tokio::net::lookup_host((host, port)).await?.take(4) {
        for i in 0..count {
            let Ok(step) = u16::try_from((offset + i) % count) else {
                continue;
            };
            let local = SocketAddr::new(
                match addr {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                    SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
                },
                first + step,
            );
            let socket = match addr {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            // A port in TIME_WAIT towards another peer may be reused.
            socket.set_reuseaddr(true)?;
            match socket.bind(local) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::AddrInUse => continue,
                Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
                    return Err(privileged_bind_refused());
                }
                Err(err) => return Err(err),
            }
            match socket.connect(addr).await {
                Ok(stream) => return Ok(stream),
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
                    ) =>
                {
                    last = err;
                }
                Err(err) => {
                    last = err;
                    break;
                }
            }
        }
    }
    Err(last)
}

/// What a failed bind of a port below 1024 means, said plainly.
fn privileged_bind_refused() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "binding a source port below 1024 needs root or CAP_NET_BIND_SERVICE",
    )
}

/// Binds a vsock stream socket to the first free port of
/// [`PRIVILEGED_SOURCE_PORTS`] (from a per-process starting point) and
/// connects it to `cid:port`, blocking.
fn connect_vsock_privileged(cid: u32, port: u32) -> io::Result<vsock::VsockStream> {
    use nix::errno::Errno;
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, VsockAddr as RawVsockAddr, bind, connect, socket,
    };
    use std::os::fd::AsRawFd;

    let count = PRIVILEGED_SOURCE_PORTS.len();
    let first = u32::from(*PRIVILEGED_SOURCE_PORTS.start());
    let offset = std::process::id() as usize;
    let mut last = io::Error::new(
        io::ErrorKind::AddrInUse,
        "every source port from 512 to 1023 is in use",
    );
    for i in 0..count {
        let Ok(step) = u32::try_from((offset + i) % count) else {
            continue;
        };
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        match bind(
            fd.as_raw_fd(),
            &RawVsockAddr::new(VSOCK_CID_ANY, first + step),
        ) {
            Ok(()) => {}
            Err(Errno::EADDRINUSE) => continue,
            Err(Errno::EACCES | Errno::EPERM) => return Err(privileged_bind_refused()),
            Err(err) => return Err(err.into()),
        }
        match connect(fd.as_raw_fd(), &RawVsockAddr::new(cid, port)) {
            Ok(()) => return Ok(vsock::VsockStream::from(fd)),
            Err(err @ (Errno::EADDRINUSE | Errno::EADDRNOTAVAIL)) => last = err.into(),
            Err(err) => return Err(err.into()),
        }
    }
    Err(last)
}

/// Where Linux publishes the largest accept queue a listener may ask for.
const SOMAXCONN_PATH: &str = "/proc/sys/net/core/somaxconn";

/// The accept-queue length used when `somaxconn` cannot be read.
pub const FALLBACK_LISTEN_BACKLOG: i32 = 4096;

/// The accept-queue length every listener asks for: the kernel's limit
/// (`/proc/sys/net/core/somaxconn`), or [`FALLBACK_LISTEN_BACKLOG`] when that
/// cannot be read. tokio's TCP listener asks for 1024 and tokio-vsock's for
/// 128; a burst of more connections than that overflows the queue, and the
/// kernel drops the excess handshakes, which then wait for a retransmit
/// (200 ms to 1 s each). (std's unix listener already asks for the maximum.)
pub fn listen_backlog() -> i32 {
    parse_backlog(std::fs::read_to_string(SOMAXCONN_PATH).ok().as_deref())
}

/// [`listen_backlog`] from the text of `somaxconn` (`None`: unreadable).
fn parse_backlog(somaxconn: Option<&str>) -> i32 {
    somaxconn
        .and_then(|text| text.trim().parse::<i32>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(FALLBACK_LISTEN_BACKLOG)
}

/// Raises a bound listener's accept queue to [`listen_backlog`]. Linux lets
/// `listen(2)` be called again on a listening socket (TCP, unix and vsock
/// alike) to change only its backlog, so the listeners keep being created by
/// tokio; the kernel caps the value at `somaxconn`. Failing leaves the
/// listener working with its old queue, so it is logged, not fatal.
fn widen_backlog(listener: &impl AsFd, endpoint: &Endpoint) {
    let wanted = listen_backlog();
    // nix refuses values above libc's SOMAXCONN constant; -1 asks the kernel
    // for its own maximum, which is `somaxconn` again.
    let backlog = Backlog::new(wanted).unwrap_or(Backlog::MAXALLOWABLE);
    if let Err(err) = nix::sys::socket::listen(listener, backlog) {
        tracing::warn!(%endpoint, backlog = wanted, error = %err, "cannot raise the listen backlog; keeping the default");
    }
}

/// Binds a Unix socket, replacing a stale socket file (one nobody accepts
/// on) but never a live socket or a non-socket file.
async fn bind_unix(
    endpoint: &Endpoint,
    path: &Path,
) -> Result<(UnixListener, Option<UnixSocketFile>), EndpointError> {
    let bind_err = |source| EndpointError::Bind {
        endpoint: endpoint.clone(),
        source,
    };
    let listener = match UnixListener::bind(path) {
        Ok(listener) => listener,
        Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
            let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
            if !meta.file_type().is_socket() {
                return Err(EndpointError::NotASocket {
                    path: path.to_path_buf(),
                });
            }
            match UnixStream::connect(path).await {
                Ok(_) => {
                    return Err(EndpointError::UnixSocketInUse {
                        path: path.to_path_buf(),
                    });
                }
                Err(probe) if probe.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "removing stale unix socket");
                    std::fs::remove_file(path).map_err(bind_err)?;
                    UnixListener::bind(path).map_err(bind_err)?
                }
                // Anything else (permissions, a full backlog) means we cannot
                // tell whether the socket is alive: leave it alone.
                Err(probe) => return Err(bind_err(probe)),
            }
        }
        Err(err) => return Err(bind_err(err)),
    };
    let file = std::fs::symlink_metadata(path)
        .ok()
        .map(|meta| UnixSocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        });
    Ok((listener, file))
}

/// The socket file a Unix listener created; removed on drop, but only if it
/// is still the same file (another process may have replaced it since).
#[derive(Debug)]
struct UnixSocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for UnixSocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && meta.file_type().is_socket()
            && meta.dev() == self.dev
            && meta.ino() == self.ino
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Vsock { cid, port } if *cid == VSOCK_CID_ANY => {
                write!(f, "vsock://ANY:{port}")
            }
            Endpoint::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            Endpoint::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp://[{host}]:{port}")
            }
            Endpoint::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            Endpoint::Unix { path } => write!(f, "unix://{}", path.display()),
        }
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = input.strip_prefix("vsock://") {
            parse_vsock(input, rest)
        } else if let Some(rest) = input.strip_prefix("tcp://") {
            parse_tcp(input, rest)
        } else if let Some(rest) = input.strip_prefix("unix://") {
            parse_unix(input, rest)
        } else {
            Err(parse_error(input, "unknown or missing scheme"))
        }
    }
}

fn parse_vsock(input: &str, rest: &str) -> Result<Endpoint, EndpointError> {
    let Some((cid, port)) = rest.split_once(':') else {
        return Err(parse_error(input, "vsock address needs CID:PORT"));
    };
    let cid = if cid == "ANY" {
        VSOCK_CID_ANY
    } else {
        parse_digits::<u32>(cid).ok_or_else(|| {
            parse_error(input, "vsock CID must be a number up to 4294967295 or ANY")
        })?
    };
    let port = parse_digits::<u32>(port)
        .ok_or_else(|| parse_error(input, "vsock port must be a number up to 4294967295"))?;
    Ok(Endpoint::Vsock { cid, port })
}

fn parse_tcp(input: &str, rest: &str) -> Result<Endpoint, EndpointError> {
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let Some((addr, after)) = bracketed.split_once(']') else {
            return Err(parse_error(input, "missing ']' after IPv6 address"));
        };
        if addr.parse::<Ipv6Addr>().is_err() {
            return Err(parse_error(input, "not a valid IPv6 address inside [ ]"));
        }
        let Some(port) = after.strip_prefix(':') else {
            return Err(parse_error(input, "tcp address needs HOST:PORT"));
        };
        (addr, port)
    } else {
        let Some((host, port)) = rest.rsplit_once(':') else {
            return Err(parse_error(input, "tcp address needs HOST:PORT"));
        };
        if host.contains(':') {
            return Err(parse_error(
                input,
                "IPv6 addresses must be written in brackets, e.g. tcp://[::1]:5000",
            ));
        }
        let valid_name = !host.is_empty()
            && host.len() <= MAX_HOST_LEN
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !valid_name {
            return Err(parse_error(
                input,
                "host must be a name (letters, digits, '-', '.', '_') or an IP address",
            ));
        }
        (host, port)
    };
    let port = parse_digits::<u16>(port)
        .ok_or_else(|| parse_error(input, "tcp port must be a number from 0 to 65535"))?;
    Ok(Endpoint::Tcp {
        host: host.to_owned(),
        port,
    })
}

fn parse_unix(input: &str, rest: &str) -> Result<Endpoint, EndpointError> {
    if !rest.starts_with('/') {
        return Err(parse_error(
            input,
            "unix socket path must be absolute (unix:///path)",
        ));
    }
    if rest.contains('\0') {
        return Err(parse_error(input, "unix socket path contains a NUL byte"));
    }
    if rest.len() > MAX_UNIX_PATH_LEN {
        return Err(parse_error(
            input,
            format!(
                "unix socket path is {} bytes; Linux allows at most {MAX_UNIX_PATH_LEN}",
                rest.len()
            ),
        ));
    }
    Ok(Endpoint::Unix {
        path: PathBuf::from(rest),
    })
}

impl serde::Serialize for Endpoint {
    /// Serialized as its text form, so config files read like the CLI flags.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Endpoint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A bound listener on any transport; see [`Endpoint::bind`].
#[derive(Debug)]
pub struct Listener {
    inner: ListenerInner,
    local: Endpoint,
    // Field order matters: the socket closes before its file is removed.
    _unix_file: Option<UnixSocketFile>,
}

#[derive(Debug)]
enum ListenerInner {
    Tcp(TcpListener),
    Unix(UnixListener),
    Vsock(VsockListener),
}

impl Listener {
    /// The endpoint actually bound: for `tcp://127.0.0.1:0` this carries the
    /// port the OS picked, which is what a test hands to its client.
    pub fn local_endpoint(&self) -> &Endpoint {
        &self.local
    }

    /// Waits for the next connection. Errors for which
    /// [`EndpointError::is_transient`] is true should not stop a server.
    pub async fn accept(&self) -> Result<(Stream, Peer), EndpointError> {
        let accept_err = |source| EndpointError::Accept {
            endpoint: self.local.clone(),
            source,
        };
        match &self.inner {
            ListenerInner::Tcp(listener) => {
                let (stream, addr) = listener.accept().await.map_err(accept_err)?;
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(peer = %addr, error = %err, "could not set TCP_NODELAY");
                }
                Ok((Stream::Tcp(stream), Peer::Tcp(addr)))
            }
            ListenerInner::Unix(listener) => {
                let (stream, addr) = listener.accept().await.map_err(accept_err)?;
                let peer = Peer::Unix {
                    path: addr.as_pathname().map(Path::to_path_buf),
                    cred: unix_credentials(&stream),
                };
                Ok((Stream::Unix(stream), peer))
            }
            ListenerInner::Vsock(listener) => {
                let (stream, addr) = listener.accept().await.map_err(accept_err)?;
                let peer = Peer::Vsock {
                    cid: addr.cid(),
                    port: addr.port(),
                };
                Ok((Stream::Vsock(stream), peer))
            }
        }
    }
}

/// What the kernel says about the process at the other end of a Unix
/// socket (`SO_PEERCRED`, taken when it connected): not something the peer
/// can claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixCredentials {
    /// Its user id.
    pub uid: u32,
    /// Its primary group id.
    pub gid: u32,
    /// Its process id, when the kernel reports one.
    pub pid: Option<i32>,
}

/// `SO_PEERCRED` of a connected Unix stream, if the OS reports it.
fn unix_credentials(stream: &UnixStream) -> Option<UnixCredentials> {
    stream.peer_cred().ok().map(|cred| UnixCredentials {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    })
}

/// Who is on the other end of a [`Stream`], as the kernel reports it: for
/// logs and for peer policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A TCP peer address.
    Tcp(SocketAddr),
    /// A Unix peer.
    Unix {
        /// Its bound path; clients usually have none.
        path: Option<PathBuf>,
        /// Its credentials (`SO_PEERCRED`).
        cred: Option<UnixCredentials>,
    },
    /// A vsock peer (the enclave sees the parent as CID 3).
    Vsock {
        /// The peer's context id.
        cid: u32,
        /// The peer's port.
        port: u32,
    },
    /// The OS could not tell (the socket may already be closed).
    Unknown,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(addr) => write!(f, "tcp:{addr}"),
            Peer::Unix { path, cred } => {
                match path {
                    Some(path) => write!(f, "unix:{}", path.display())?,
                    None => f.write_str("unix:unnamed")?,
                }
                match cred {
                    Some(cred) => write!(f, " (uid {})", cred.uid),
                    None => Ok(()),
                }
            }
            Peer::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Peer::Unknown => f.write_str("unknown"),
        }
    }
}

/// A connected byte stream on any transport. All three socket types are
/// `Unpin`, so the I/O traits simply delegate.
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix socket connection.
    Unix(UnixStream),
    /// A vsock connection.
    Vsock(VsockStream),
}

impl Stream {
    /// The other end, for logs; [`Peer::Unknown`] if the OS cannot say.
    pub fn peer(&self) -> Peer {
        match self {
            Stream::Tcp(stream) => stream.peer_addr().map_or(Peer::Unknown, Peer::Tcp),
            Stream::Unix(stream) => stream.peer_addr().map_or(Peer::Unknown, |addr| Peer::Unix {
                path: addr.as_pathname().map(Path::to_path_buf),
                cred: unix_credentials(stream),
            }),
            Stream::Vsock(stream) => stream
                .peer_addr()
                .map_or(Peer::Unknown, |addr| Peer::Vsock {
                    cid: addr.cid(),
                    port: addr.port(),
                }),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Vsock(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Vsock(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Vsock(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
            Stream::Vsock(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Vsock(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Vsock(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod backlog_tests {
    use super::*;

    #[test]
    fn backlog_is_somaxconn_or_the_fallback() {
        assert_eq!(parse_backlog(Some("4096\n")), 4096);
        assert_eq!(parse_backlog(Some("65535")), 65535);
        assert_eq!(parse_backlog(Some("  128 \n")), 128);
        assert_eq!(parse_backlog(None), FALLBACK_LISTEN_BACKLOG);
        assert_eq!(parse_backlog(Some("")), FALLBACK_LISTEN_BACKLOG);
        assert_eq!(parse_backlog(Some("lots")), FALLBACK_LISTEN_BACKLOG);
        assert_eq!(parse_backlog(Some("0")), FALLBACK_LISTEN_BACKLOG);
        assert_eq!(parse_backlog(Some("-5")), FALLBACK_LISTEN_BACKLOG);
        assert_eq!(parse_backlog(Some("99999999999")), FALLBACK_LISTEN_BACKLOG);
    }
}
