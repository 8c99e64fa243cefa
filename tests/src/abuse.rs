//! Hostile peers for the abuse tests (issue 15): malformed frames, idle
//! sockets and slow writers, from privileged and unprivileged peers, aimed
//! at any framed-protocol listener (the enclave's ports, the agent's unix
//! socket) or at a raw byte port (the agent's HTTP front).
//!
//! Who a peer is must be what the kernel says, so:
//! - a privileged tcp peer connects from a port below 1024 (this process
//!   must be root); to open more such sockets than there are low ports it
//!   spreads them over loopback addresses `127.0.0.2` and up;
//! - an unprivileged tcp peer connects from an ordinary (ephemeral) port;
//! - a privileged unix peer is this process (root);
//! - an unprivileged peer of either kind is a helper process run as
//!   `nobody` with `setpriv` ([`as_nobody`]).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keystore_shared::frame::{FrameError, decode_frame, encode_frame};
use keystore_shared::protocol::{ErrorCode, Request, RequestOp, Response, ResponseBody};
use keystore_shared::{Endpoint, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bound on every phase of an abuse test.
pub const BOUND: Duration = Duration::from_secs(120);
/// Rounds the normal client completes at least, however fast the abuse is.
pub const MIN_ROUNDS: usize = 5;
/// Idle sockets per target.
pub const IDLE: usize = 1000;
/// Slow writers per target (more than the enclave secret port's 256 slots).
pub const SLOW: usize = 300;
/// How long the slow writers trickle, one byte a second.
pub const SLOW_SECONDS: usize = 8;
/// Malformed frames per target.
pub const MALFORMED: usize = 10_000;

/// Who the hostile peer is, as the kernel will report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// Root; over tcp, from a port below 1024.
    Privileged,
    /// An ordinary process: over tcp from an ephemeral port (in this
    /// process), over unix only through [`as_nobody`].
    Unprivileged,
}

/// Spreads privileged tcp sockets over loopback addresses and low ports.
static NEXT_LOW_PORT: AtomicUsize = AtomicUsize::new(0);

/// Low ports used per loopback address (600..=1019), clear of the range
/// `Endpoint::connect_privileged` uses on 127.0.0.1 only by address.
const LOW_PORTS: usize = 420;

/// Opens a connection to `endpoint` as `who`. An unprivileged unix peer
/// cannot be made in this process: that is an error here.
pub async fn connect(endpoint: &Endpoint, who: Who) -> io::Result<Stream> {
    match (endpoint, who) {
        (Endpoint::Tcp { host, port }, Who::Privileged) => {
            let target: SocketAddr = format!("{host}:{port}")
                .parse()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e}")))?;
            let mut last = io::Error::other("no low port tried");
            for _ in 0..64 {
                let n = NEXT_LOW_PORT.fetch_add(1, Ordering::Relaxed);
                let ip = 2 + (n / LOW_PORTS) % 200;
                let local = SocketAddrV4::new(
                    Ipv4Addr::new(127, 0, 0, u8::try_from(ip).unwrap_or(2)),
                    u16::try_from(600 + n % LOW_PORTS).unwrap_or(600),
                );
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.set_reuseaddr(true)?;
                if let Err(err) = socket.bind(local.into()) {
                    last = err;
                    continue;
                }
                match socket.connect(target).await {
                    Ok(stream) => return Ok(Stream::Tcp(stream)),
                    Err(err) if err.kind() == io::ErrorKind::AddrInUse => last = err,
                    Err(err) => return Err(err),
                }
            }
            Err(last)
        }
        (Endpoint::Tcp { host, port }, Who::Unprivileged) => {
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            let local = stream.local_addr()?.port();
            if local < 1024 {
                return Err(io::Error::other(format!(
                    "the kernel picked the privileged source port {local}"
                )));
            }
            Ok(Stream::Tcp(stream))
        }
        (Endpoint::Unix { .. }, Who::Privileged) => endpoint
            .connect()
            .await
            .map_err(|e| io::Error::other(e.to_string())),
        (other, who) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("cannot connect to {other} as {who:?} in this process"),
        )),
    }
}

/// One frame with `body` as its body, whatever the body is.
fn raw_frame(body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut frame = len.to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

/// A request-shaped map: with an operation nobody serves, or a protocol
/// version nobody speaks.
#[derive(serde::Serialize)]
struct Bogus {
    v: u32,
    id: u64,
    op: &'static str,
}

/// Per-connection payloads of malformed frames, `total` frames in all: most
/// connections carry 100 frames the server answers and keeps reading after
/// (random bytes, valid CBOR that is not a map, an empty body, an unknown
/// operation, a wrong version); every 25th carries one frame after which
/// the server must close (an announced 4 GiB, a frame over the limit with
/// part of its body, a frame cut short by the peer closing).
pub fn malformed_payloads(total: usize) -> Vec<Vec<u8>> {
    let mut payloads = Vec::new();
    let mut frames = 0usize;
    let mut n = 0usize;
    while frames < total {
        n += 1;
        if n.is_multiple_of(25) {
            let payload = match n / 25 % 3 {
                0 => {
                    let mut p = u32::MAX.to_be_bytes().to_vec();
                    p.extend_from_slice(&[0x42; 512]);
                    p
                }
                1 => {
                    // Just over the secret port's 64 KiB request limit.
                    let mut p = (64 * 1024 + 1u32).to_be_bytes().to_vec();
                    p.extend_from_slice(&[0xa1; 2048]);
                    p
                }
                _ => {
                    let mut p = 100u32.to_be_bytes().to_vec();
                    p.extend_from_slice(&[0xa3; 40]);
                    p
                }
            };
            payloads.push(payload);
            frames += 1;
            continue;
        }
        let count = 100.min(total - frames);
        let mut payload = Vec::new();
        for i in 0..count {
            let id = u64::try_from(frames + i).unwrap_or(u64::MAX);
            let body = match i % 5 {
                0 => {
                    let mut garbage = vec![0u8; 1 + i % 61];
                    rand::fill(&mut garbage[..]);
                    // Never a valid map: start with a CBOR break byte.
                    garbage[0] = 0xff;
                    garbage
                }
                1 => vec![0x83, 0x01, 0x02, 0x03],
                2 => Vec::new(),
                3 => encode_body(&Bogus {
                    v: 1,
                    id,
                    op: "Frobnicate",
                }),
                _ => encode_body(&Bogus {
                    v: 99,
                    id,
                    op: "List",
                }),
            };
            payload.extend_from_slice(&raw_frame(&body));
        }
        payloads.push(payload);
        frames += count;
    }
    payloads
}

/// The CBOR body of `value` (its frame minus the length prefix).
fn encode_body<T: serde::Serialize>(value: &T) -> Vec<u8> {
    encode_frame(value, 64 * 1024)
        .map(|frame| frame[4..].to_vec())
        .unwrap_or_default()
}

/// A valid framed request, for slow writers to trickle.
pub fn trickled_request() -> Vec<u8> {
    encode_frame(&Request::new(7, RequestOp::List), 64 * 1024)
        .map(|frame| frame.to_vec())
        .unwrap_or_default()
}

/// Writes `payload` (then closes the write side) while reading everything
/// the server sends until it closes; gives up after `bound`. Write errors
/// are expected (the server may close first) and ignored.
pub async fn send_and_drain(
    stream: Stream,
    payload: &[u8],
    bound: Duration,
) -> io::Result<Vec<u8>> {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let write = async {
        if writer.write_all(payload).await.is_ok() {
            let _ = writer.shutdown().await;
        }
    };
    let read = async {
        let mut received = Vec::new();
        // A reset after the server's answer still leaves what was read.
        let _ = reader.read_to_end(&mut received).await;
        received
    };
    let ((), received) = tokio::time::timeout(bound, async { tokio::join!(write, read) })
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the server never closed"))?;
    Ok(received)
}

/// The error codes of the frames in `bytes`, or why they are not all error
/// answers (a frame cut short at the end counts as none).
pub fn error_codes(mut bytes: &[u8]) -> Result<Vec<ErrorCode>, String> {
    let mut codes = Vec::new();
    loop {
        match decode_frame::<Response>(bytes, 1024 * 1024) {
            Ok(Some((response, used))) => {
                match response.result {
                    ResponseBody::Error { code, .. } => codes.push(code),
                    other => return Err(format!("a non-error answer: {other:?}")),
                }
                bytes = &bytes[used..];
            }
            Ok(None) => return Ok(codes),
            Err(FrameError::Truncated { .. }) => return Ok(codes),
            Err(err) => return Err(format!("not a frame: {err}")),
        }
    }
}

/// Sends one byte of `payload` a second to each of `streams`, for `seconds`
/// seconds or until the payload is out (it never is: pass a longer one),
/// dropping a stream the server has closed. Returns how many streams were
/// still open at the end.
pub async fn trickle(mut streams: Vec<Stream>, payload: &[u8], seconds: usize) -> usize {
    for second in 0..seconds {
        let Some(&byte) = payload.get(second) else {
            break;
        };
        let mut open = Vec::with_capacity(streams.len());
        for mut stream in streams {
            if stream.write_all(&[byte]).await.is_ok() {
                open.push(stream);
            }
        }
        streams = open;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    streams.len()
}

/// What a helper process run as `nobody` does.
#[derive(Debug, Clone, Copy)]
pub enum Abuse {
    /// Opens this many connections, each sending the payload and then
    /// reading until the server closes.
    Send(usize),
    /// Opens this many connections and says nothing for this many seconds.
    Idle(usize, u64),
    /// Opens this many connections and sends one byte of the payload a
    /// second to each, for this many seconds.
    Slow(usize, u64),
}

/// The helper run as `nobody`: prints, per connection, the hex of what the
/// server sent.
const NOBODY: &str = r#"
import os, resource, select, selectors, socket, sys, time
from concurrent.futures import ThreadPoolExecutor
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
target, mode, count, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
payload = sys.stdin.buffer.read()
def connect():
    if target.startswith('unix:'):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(target[5:])
    else:
        host, port = target.rsplit(':', 1)
        s = socket.create_connection((host, int(port)), timeout=30)
    return s
def drain(s, wait):
    out = b''
    s.setblocking(False)
    end = time.monotonic() + wait
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([s], [], [], left)
        if not r:
            break
        try:
            b = s.recv(65536)
        except OSError:
            break
        if not b:
            break
        out += b
    s.close()
    return out
def drain_all(socks, wait):
    # All at once (epoll: more than 1024 descriptors), one deadline.
    out = [b''] * len(socks)
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    end = time.monotonic() + wait
    while sel.get_map():
        left = end - time.monotonic()
        if left <= 0:
            break
        for key, _ in sel.select(left):
            try:
                b = key.fileobj.recv(65536)
            except OSError:
                b = b''
            if b:
                out[key.data] += b
            else:
                sel.unregister(key.fileobj)
    for s in socks:
        s.close()
    return out
def send_one(_):
    s = connect()
    try:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    return drain(s, 60)
if mode == 'send':
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send_one, range(count)))
else:
    socks = [connect() for _ in range(count)]
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds:
        if mode == 'slow' and i < len(payload):
            for s in socks:
                try:
                    s.send(payload[i:i+1])
                except OSError:
                    pass
            i += 1
        time.sleep(1 if mode == 'slow' else 0.1)
    results = drain_all(socks, 1.0)
for r in results:
    print(r.hex())
"#;

/// Runs `abuse` against `endpoint` from a process running as `nobody`
/// (uid/gid 65534, no groups) and returns, per connection, what the server
/// sent. Needs root (for `setpriv`) and python3.
pub fn as_nobody(endpoint: &Endpoint, abuse: Abuse, payload: &[u8]) -> io::Result<Vec<Vec<u8>>> {
    let target = match endpoint {
        Endpoint::Tcp { host, port } => format!("{host}:{port}"),
        Endpoint::Unix { path } => format!("unix:{}", path.display()),
        other => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{other}: tcp or unix only"),
            ));
        }
    };
    let (mode, count, seconds) = match abuse {
        Abuse::Send(count) => ("send", count, 0),
        Abuse::Idle(count, seconds) => ("idle", count, seconds),
        Abuse::Slow(count, seconds) => ("slow", count, seconds),
    };
    let mut child = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .args(["/usr/bin/python3", "-c", NOBODY, &target, mode])
        .args([count.to_string(), seconds.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        io::Write::write_all(&mut stdin, payload)?;
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "the helper run as nobody failed: {}",
            output.status
        )));
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| hex::decode(line).map_err(|e| io::Error::other(e.to_string())))
        .collect()
}

/// Lets `nobody` connect to the unix socket at `path`: the socket file
/// 0666 and its directory 0755 (test directories are 0700).
pub fn open_socket_to_everyone(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
}

/// Raises this process's soft limit on open files to its hard limit, so a
/// test can hold a thousand sockets and the server its side of them.
pub fn raise_fd_limit() -> io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    }
    Ok(hard)
}

/// Whether this process runs as root (privileged ports, `setpriv`).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
