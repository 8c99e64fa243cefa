//! The KMS forwarder against local TCP upstreams: byte-exact relaying,
//! half-close, failure isolation, limits and timeouts.
#![allow(clippy::unwrap_used)]

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keystore_host::proxy::forwarder::{
    Forwarder, ForwarderLimits, Resolve, ResolveFuture, Upstream, pipe,
};
use keystore_shared::endpoint::{Endpoint, Stream};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on every wait in these tests, so a broken forwarder fails the test
/// instead of hanging it.
const WAIT: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// An echo server; counts connections open at once and the maximum seen.
struct Echo {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
    max_open: Arc<AtomicUsize>,
}

async fn echo_server() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let max_open = Arc::new(AtomicUsize::new(0));
    let (o, m) = (open.clone(), max_open.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let now = o.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            let o = o.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Echo {
        addr,
        open,
        max_open,
    }
}

/// A port nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

fn upstream(addr: SocketAddr) -> Upstream {
    Upstream {
        host: addr.ip().to_string(),
        port: addr.port(),
    }
}

/// Resolves every name to whatever list the test currently sets.
#[derive(Clone, Default)]
struct TestResolver(Arc<Mutex<Vec<SocketAddr>>>);

impl TestResolver {
    fn set(&self, addrs: Vec<SocketAddr>) {
        *self.0.lock().unwrap() = addrs;
    }
}

impl Resolve for TestResolver {
    fn resolve<'a>(&'a self, _host: &'a str, _port: u16) -> ResolveFuture<'a> {
        let addrs = self.0.lock().unwrap().clone();
        Box::pin(async move { Ok(addrs) })
    }
}

fn limits() -> ForwarderLimits {
    ForwarderLimits {
        max_connections: 16,
        admission_wait: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(30),
        drain_timeout: Duration::from_secs(1),
    }
}

/// Starts `forwarder` on `listen`; returns the bound endpoint.
async fn start(forwarder: Forwarder, listen: Endpoint) -> Endpoint {
    let listener = listen.bind().await.unwrap();
    let local = listener.local_endpoint().clone();
    tokio::spawn(forwarder.serve(listener, std::future::pending()));
    local
}

async fn round_trip(stream: &mut Stream, msg: &[u8]) -> io::Result<Vec<u8>> {
    stream.write_all(msg).await?;
    let mut buf = vec![0; msg.len()];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

#[tokio::test]
async fn echoes_over_tcp_and_unix_listeners() {
    let echo = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    for listen in [
        Endpoint::tcp("127.0.0.1", 0),
        Endpoint::unix(dir.path().join("fwd.sock")),
    ] {
        let at = start(Forwarder::new(upstream(echo.addr), limits()), listen).await;
        let mut client = at.connect().await.unwrap();
        let got = within("echo", round_trip(&mut client, b"hello through the proxy")).await;
        assert_eq!(got.unwrap(), b"hello through the proxy", "via {at}");
    }
}

/// Deterministic pseudo-random bytes (xorshift), so corruption anywhere in
/// the stream changes the hash.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfer_is_byte_exact_both_ways_with_half_close() {
    const LEN: usize = 64 * 1024 * 1024;
    let echo = echo_server().await;
    let at = start(
        Forwarder::new(upstream(echo.addr), limits()),
        Endpoint::tcp("127.0.0.1", 0),
    )
    .await;
    let client = at.connect().await.unwrap();
    let (mut r, mut w) = tokio::io::split(client);
    let data = pattern(LEN, 0x5eed);
    let sent_hash = Sha256::digest(&data);
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(100_003) {
            w.write_all(chunk).await.unwrap();
        }
        // Half-close: we are done sending but still expect the echo.
        w.shutdown().await.unwrap();
        w
    });
    let reader = async {
        let mut hasher = Sha256::new();
        let mut buf = vec![0; 256 * 1024];
        let mut total = 0;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n;
        }
        (total, hasher.finalize())
    };
    let (total, got_hash) = within("64 MiB echo", reader).await;
    within("writer", writer).await.unwrap();
    assert_eq!(total, LEN);
    assert_eq!(got_hash, sent_hash);
}

#[tokio::test]
async fn half_close_keeps_the_other_direction_open() {
    // The upstream answers only after it saw the client's end of stream.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let reply = format!("received {} bytes", got.len());
        stream.write_all(reply.as_bytes()).await.unwrap();
        stream.shutdown().await.unwrap();
    });
    let at = start(
        Forwarder::new(upstream(addr), limits()),
        Endpoint::tcp("127.0.0.1", 0),
    )
    .await;
    let mut client = at.connect().await.unwrap();
    client.write_all(&[7u8; 12345]).await.unwrap();
    client.shutdown().await.unwrap();
    let mut reply = String::new();
    within("reply after half-close", client.read_to_string(&mut reply))
        .await
        .unwrap();
    assert_eq!(reply, "received 12345 bytes");
}

#[tokio::test]
async fn an_unreachable_upstream_fails_only_its_own_connection() {
    let echo = echo_server().await;
    let dead = closed_port().await;
    let resolver = TestResolver::default();
    resolver.set(vec![echo.addr]);
    let forwarder =
        Forwarder::new(upstream(echo.addr), limits()).with_resolver(Arc::new(resolver.clone()));
    let at = start(forwarder, Endpoint::tcp("127.0.0.1", 0)).await;

    let mut healthy = at.connect().await.unwrap();
    assert_eq!(
        within("first", round_trip(&mut healthy, b"one"))
            .await
            .unwrap(),
        b"one"
    );

    resolver.set(vec![dead]);
    let mut doomed = at.connect().await.unwrap();
    let _ = doomed.write_all(b"lost").await;
    let mut buf = [0u8; 8];
    let read = within("doomed close", doomed.read(&mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "got {read:?}");

    // The open connection is unaffected and new ones work again.
    assert_eq!(
        within("still open", round_trip(&mut healthy, b"two"))
            .await
            .unwrap(),
        b"two"
    );
    resolver.set(vec![echo.addr]);
    let mut fresh = at.connect().await.unwrap();
    assert_eq!(
        within("fresh", round_trip(&mut fresh, b"three"))
            .await
            .unwrap(),
        b"three"
    );
}

#[tokio::test]
async fn every_resolved_address_is_tried_in_order() {
    let echo = echo_server().await;
    let resolver = TestResolver::default();
    resolver.set(vec![closed_port().await, closed_port().await, echo.addr]);
    let forwarder = Forwarder::new(
        Upstream {
            host: "kms.test.invalid".into(),
            port: 443,
        },
        limits(),
    )
    .with_resolver(Arc::new(resolver.clone()));
    let (stream, addr) = within("connect", forwarder.connect_upstream())
        .await
        .unwrap();
    assert_eq!(addr, echo.addr);
    drop(stream);

    let at = start(forwarder, Endpoint::tcp("127.0.0.1", 0)).await;
    let mut client = at.connect().await.unwrap();
    assert_eq!(
        within("echo", round_trip(&mut client, b"x")).await.unwrap(),
        b"x"
    );

    // With no address left that accepts, the error says what was tried.
    resolver.set(vec![closed_port().await, closed_port().await]);
    let forwarder =
        Forwarder::new(upstream(echo.addr), limits()).with_resolver(Arc::new(resolver.clone()));
    let err = forwarder.connect_upstream().await.unwrap_err().to_string();
    assert!(err.contains("2 address(es) tried"), "{err}");
    resolver.set(vec![]);
    let err = forwarder.connect_upstream().await.unwrap_err().to_string();
    assert!(err.contains("no addresses"), "{err}");
}

#[tokio::test]
async fn the_connection_limit_holds() {
    let echo = echo_server().await;
    let forwarder = Forwarder::new(
        upstream(echo.addr),
        ForwarderLimits {
            max_connections: 2,
            ..limits()
        },
    );
    let at = start(forwarder, Endpoint::tcp("127.0.0.1", 0)).await;
    let mut first = at.connect().await.unwrap();
    let mut second = at.connect().await.unwrap();
    assert_eq!(
        within("1", round_trip(&mut first, b"1")).await.unwrap(),
        b"1"
    );
    assert_eq!(
        within("2", round_trip(&mut second, b"2")).await.unwrap(),
        b"2"
    );

    // The third waits: no echo while two are open.
    let mut third = at.connect().await.unwrap();
    third.write_all(b"3").await.unwrap();
    let mut buf = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "third connection was served while two were open: {early:?}"
    );
    assert_eq!(echo.max_open.load(Ordering::SeqCst), 2);

    // Once one closes, the third is served.
    drop(first);
    within("third served", third.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"3");
    assert_eq!(echo.max_open.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let echo = echo_server().await;
    let forwarder = Forwarder::new(
        upstream(echo.addr),
        ForwarderLimits {
            idle_timeout: Duration::from_millis(300),
            ..limits()
        },
    );
    let at = start(forwarder, Endpoint::tcp("127.0.0.1", 0)).await;
    let mut client = at.connect().await.unwrap();
    assert_eq!(
        within("echo", round_trip(&mut client, b"hi"))
            .await
            .unwrap(),
        b"hi"
    );
    let mut buf = [0u8; 1];
    // Nothing moves; the forwarder closes both sides.
    let n = within("idle close", client.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0);
    within("upstream closed", async {
        while echo.open.load(Ordering::SeqCst) != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn pipe_counts_bytes_each_way() {
    let (client, mut client_far) = tokio::io::duplex(1024);
    let (upstream, mut upstream_far) = tokio::io::duplex(1024);
    let piping = tokio::spawn(pipe(client, upstream));
    client_far.write_all(&[1; 5000]).await.unwrap();
    client_far.shutdown().await.unwrap();
    let mut got = Vec::new();
    upstream_far.read_to_end(&mut got).await.unwrap();
    assert_eq!(got.len(), 5000);
    upstream_far.write_all(&[2; 777]).await.unwrap();
    upstream_far.shutdown().await.unwrap();
    let mut back = Vec::new();
    client_far.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, vec![2; 777]);
    let stats = within("pipe end", piping).await.unwrap().unwrap();
    assert_eq!((stats.to_upstream, stats.to_client), (5000, 777));
}

#[tokio::test]
async fn shutdown_stops_accepting() {
    let echo = echo_server().await;
    let listener = Endpoint::tcp("127.0.0.1", 0).bind().await.unwrap();
    let at = listener.local_endpoint().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(Forwarder::new(upstream(echo.addr), limits()).serve(
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    let mut client = at.connect().await.unwrap();
    assert_eq!(
        within("echo", round_trip(&mut client, b"a")).await.unwrap(),
        b"a"
    );
    drop(client);
    stop.send(()).unwrap();
    within("serve returns", serving).await.unwrap().unwrap();
    assert!(
        at.connect().await.is_err(),
        "still accepting after shutdown"
    );
}

/// Not a test of correctness: prints the forwarder's throughput next to
/// `socat -b 65536` on the same 256 MiB transfer, when socat is installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_compared_with_socat() {
    const LEN: usize = 256 * 1024 * 1024;
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = sink.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let n = tokio::io::copy(&mut s, &mut tokio::io::sink())
                    .await
                    .unwrap_or(0);
                let _ = s.write_all(&n.to_be_bytes()).await;
            });
        }
    });
    async fn measure(addr: SocketAddr) -> f64 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let chunk = vec![0xa5u8; 1024 * 1024];
        let started = std::time::Instant::now();
        for _ in 0..LEN / chunk.len() {
            s.write_all(&chunk).await.unwrap();
        }
        s.shutdown().await.unwrap();
        let mut n = [0u8; 8];
        s.read_exact(&mut n).await.unwrap();
        assert_eq!(u64::from_be_bytes(n), LEN as u64);
        LEN as f64 / 1e6 / started.elapsed().as_secs_f64()
    }
    let at = start(
        Forwarder::new(upstream(sink_addr), limits()),
        Endpoint::tcp("127.0.0.1", 0),
    )
    .await;
    let Endpoint::Tcp { port, .. } = at else {
        unreachable!()
    };
    let ours = within(
        "forwarder run",
        measure(SocketAddr::from(([127, 0, 0, 1], port))),
    )
    .await;
    eprintln!(
        "forwarder (BUFFER_SIZE = {} KiB): {ours:.0} MB/s",
        keystore_host::proxy::forwarder::BUFFER_SIZE / 1024
    );

    let port = closed_port().await.port();
    let socat = std::process::Command::new("socat")
        .args([
            "-b",
            "65536",
            &format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"),
            &format!("TCP:{sink_addr}"),
        ])
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut socat) = socat else {
        eprintln!("socat not installed; no comparison");
        return;
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut theirs = None;
    for _ in 0..200 {
        // A probe connection (socat forks a child for it) shows it listens.
        if TcpStream::connect(addr).await.is_ok() {
            theirs = Some(within("socat run", measure(addr)).await);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = socat.kill();
    let _ = socat.wait();
    match theirs {
        Some(theirs) => eprintln!("socat -b 65536: {theirs:.0} MB/s"),
        None => eprintln!("socat did not listen; no comparison"),
    }
}
