//! The one accept loop: slots, admission wait and refusal, the peer hook
//! (before any byte is read), idle and lifetime bounds, and drain.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keystore_shared::endpoint::{Peer, Stream};
use keystore_shared::serve::{
    Accepted, AnyPeer, Handler, PeerDenied, PeerPolicy, Refusal, ServeConfig, ServeError, serve,
};
use keystore_shared::{Endpoint, Listener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

/// Echoes each byte back; counts connections handled; on shutdown, stops
/// at once unless `finish_on_shutdown` asks it to keep echoing.
#[derive(Default)]
struct Echo {
    handled: AtomicUsize,
    refusals: std::sync::Mutex<Vec<Refusal>>,
    /// Set when a handler is running, so tests know a slot is taken.
    running: Notify,
}

impl Handler for Echo {
    async fn handle(&self, mut conn: Accepted) {
        self.handled.fetch_add(1, Ordering::SeqCst);
        self.running.notify_one();
        let mut buf = [0u8; 64];
        loop {
            let read = tokio::select! {
                read = conn.stream.read(&mut buf) => read,
                () = conn.shutdown.wait() => return,
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if conn.stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    async fn refuse(&self, stream: &mut Stream, refusal: &Refusal) {
        self.refusals.lock().unwrap().push(refusal.clone());
        let _ = stream.write_all(b"NO\n").await;
    }
}

struct Server {
    endpoint: Endpoint,
    handler: Arc<Echo>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl Server {
    async fn start(config: ServeConfig, policy: Arc<dyn PeerPolicy>) -> Server {
        Self::start_with(Arc::new(Echo::default()), config, policy).await
    }

    async fn start_with(
        handler: Arc<Echo>,
        config: ServeConfig,
        policy: Arc<dyn PeerPolicy>,
    ) -> Server {
        let listener: Listener = Endpoint::tcp("127.0.0.1", 0).bind().await.unwrap();
        let endpoint = listener.local_endpoint().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, handler.clone(), policy, config, stopped));
        Server {
            endpoint,
            handler,
            stop: Some(stop),
            task,
        }
    }

    async fn connect(&self) -> Stream {
        self.endpoint.connect().await.unwrap()
    }

    async fn shutdown(mut self) -> Result<(), ServeError> {
        let _ = self.stop.take().unwrap().send(());
        within("serve to return", self.task).await.unwrap()
    }
}

fn config() -> ServeConfig {
    ServeConfig {
        max_connections: 2,
        admission_wait: Duration::from_millis(200),
        idle_timeout: Duration::from_secs(30),
        max_lifetime: None,
        shutdown_grace: Duration::from_secs(2),
        ..ServeConfig::named("test")
    }
}

async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within 10 s"))
}

/// Sends `msg` and expects it echoed.
async fn echo(stream: &mut Stream, msg: &[u8]) {
    stream.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    within("echo", stream.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, msg);
}

/// Reads until the server closes; returns what arrived.
async fn read_to_close(stream: &mut Stream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = within("close", stream.read_to_end(&mut got)).await;
    got
}

#[tokio::test]
async fn slots_bound_concurrency_and_a_freed_slot_admits_a_waiter() {
    let server = Server::start(
        ServeConfig {
            admission_wait: Duration::from_secs(5),
            ..config()
        },
        Arc::new(AnyPeer),
    )
    .await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    echo(&mut a, b"a").await;
    echo(&mut b, b"b").await;
    // The third waits: it is accepted but not served.
    let mut c = server.connect().await;
    c.write_all(b"c").await.unwrap();
    let mut buf = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c.read_exact(&mut buf))
            .await
            .is_err(),
        "a third connection was served while both slots were taken"
    );
    assert_eq!(server.handler.handled.load(Ordering::SeqCst), 2);
    // Closing one frees its slot for the waiter, which then gets its echo.
    drop(a);
    within("waiter served", c.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"c");
    assert_eq!(server.handler.handled.load(Ordering::SeqCst), 3);
    server.shutdown().await.unwrap();
}

/// Echoes each byte; `W` marks a request in progress until `D`.
struct Marking;

impl Handler for Marking {
    async fn handle(&self, mut conn: Accepted) {
        let mut working = None;
        let mut buf = [0u8; 1];
        while let Ok(1) = conn.stream.read(&mut buf).await {
            match buf[0] {
                b'W' => working = Some(conn.stream.working()),
                b'D' => working = None,
                _ => {}
            }
            if conn.stream.write_all(&buf).await.is_err() {
                break;
            }
        }
        drop(working);
    }
}

#[tokio::test]
async fn with_eviction_a_newcomer_takes_the_slot_of_the_connection_waiting_longest() {
    let listener: Listener = Endpoint::tcp("127.0.0.1", 0).bind().await.unwrap();
    let endpoint = listener.local_endpoint().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let config = ServeConfig {
        // Without eviction a newcomer would wait this long: far past `within`.
        admission_wait: Duration::from_secs(60),
        evict_idle: true,
        ..config()
    };
    let task = tokio::spawn(serve(
        listener,
        Arc::new(Marking),
        Arc::new(AnyPeer),
        config,
        stopped,
    ));
    let mut a = endpoint.connect().await.unwrap();
    echo(&mut a, b"W").await; // a request in progress: never evicted
    let mut b = endpoint.connect().await.unwrap();
    echo(&mut b, b"x").await; // waiting for its next request
    // Both slots taken: the newcomer evicts b, not a.
    let mut c = endpoint.connect().await.unwrap();
    echo(&mut c, b"c").await;
    assert!(read_to_close(&mut b).await.is_empty());
    echo(&mut a, b"a").await;
    // Once a's request is done it waits too, but it had a request answered
    // and c never did (and c has waited longer): c goes first.
    echo(&mut a, b"D").await;
    let mut d = endpoint.connect().await.unwrap();
    echo(&mut d, b"d").await;
    assert!(read_to_close(&mut c).await.is_empty());
    echo(&mut a, b"a").await;
    let _ = stop.send(());
    within("serve to return", task).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_connection_that_waits_too_long_is_refused_as_busy() {
    let server = Server::start(config(), Arc::new(AnyPeer)).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    echo(&mut a, b"a").await;
    echo(&mut b, b"b").await;
    let mut c = server.connect().await;
    assert_eq!(read_to_close(&mut c).await, b"NO\n");
    assert_eq!(
        server.handler.refusals.lock().unwrap().as_slice(),
        &[Refusal::Busy { max_connections: 2 }]
    );
    assert_eq!(server.handler.handled.load(Ordering::SeqCst), 2);
    // The served ones are unaffected.
    echo(&mut a, b"still here").await;
    server.shutdown().await.unwrap();
}

/// Refuses every peer and records that it was asked.
struct DenyAll(AtomicUsize);

impl PeerPolicy for DenyAll {
    fn check(&self, peer: &Peer) -> Result<(), PeerDenied> {
        self.0.fetch_add(1, Ordering::SeqCst);
        assert!(matches!(peer, Peer::Tcp(addr) if addr.ip().is_loopback()));
        Err(PeerDenied {
            reason: "not a privileged peer".to_owned(),
        })
    }
}

#[tokio::test]
async fn the_peer_hook_refuses_before_any_byte_is_read() {
    let policy = Arc::new(DenyAll(AtomicUsize::new(0)));
    let server = Server::start(config(), policy.clone()).await;
    let mut peer = server.connect().await;
    // Bytes the peer sends are never handed to the handler.
    peer.write_all(b"let me in").await.unwrap();
    assert_eq!(read_to_close(&mut peer).await, b"NO\n");
    assert_eq!(policy.0.load(Ordering::SeqCst), 1);
    assert_eq!(server.handler.handled.load(Ordering::SeqCst), 0);
    let refusals = server.handler.refusals.lock().unwrap().clone();
    assert_eq!(refusals.len(), 1);
    assert_eq!(
        refusals[0].to_string(),
        "connection refused: not a privileged peer"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_idle_connection_is_closed_and_traffic_keeps_one_open() {
    let server = Server::start(
        ServeConfig {
            idle_timeout: Duration::from_millis(400),
            ..config()
        },
        Arc::new(AnyPeer),
    )
    .await;
    let mut busy = server.connect().await;
    let mut idle = server.connect().await;
    echo(&mut idle, b"x").await;
    // Traffic every 150 ms keeps `busy` alive well past the idle timeout.
    for _ in 0..8 {
        echo(&mut busy, b"tick").await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(read_to_close(&mut idle).await.is_empty());
    echo(&mut busy, b"alive").await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_lifetime_bound_closes_even_a_busy_connection() {
    let server = Server::start(
        ServeConfig {
            max_lifetime: Some(Duration::from_millis(500)),
            ..config()
        },
        Arc::new(AnyPeer),
    )
    .await;
    let mut trickler = server.connect().await;
    let started = std::time::Instant::now();
    let closed = loop {
        if trickler.write_all(b".").await.is_err() {
            break true;
        }
        let mut buf = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(1), trickler.read(&mut buf)).await {
            Ok(Ok(1)) => {}
            _ => break true,
        }
        if started.elapsed() > Duration::from_secs(10) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(closed, "a trickling connection outlived max_lifetime");
    server.shutdown().await.unwrap();
}

/// Echoes, but on shutdown finishes the message it is in the middle of:
/// it reads a 1-byte length, waits for the body, echoes it, then stops.
struct Framed {
    started: Notify,
}

impl Handler for Framed {
    async fn handle(&self, mut conn: Accepted) {
        loop {
            let mut len = [0u8; 1];
            tokio::select! {
                read = conn.stream.read_exact(&mut len) => if read.is_err() { return },
                () = conn.shutdown.wait() => return,
            }
            self.started.notify_one();
            // A request in progress is finished even during shutdown.
            let mut body = vec![0u8; usize::from(len[0])];
            if conn.stream.read_exact(&mut body).await.is_err()
                || conn.stream.write_all(&body).await.is_err()
            {
                return;
            }
        }
    }
}

#[tokio::test]
async fn shutdown_closes_idle_connections_lets_requests_finish_and_aborts_after_the_grace() {
    let handler = Arc::new(Framed {
        started: Notify::new(),
    });
    let listener = Endpoint::tcp("127.0.0.1", 0).bind().await.unwrap();
    let endpoint = listener.local_endpoint().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        listener,
        handler.clone(),
        Arc::new(AnyPeer),
        ServeConfig {
            shutdown_grace: Duration::from_millis(800),
            max_connections: 4,
            ..config()
        },
        stopped,
    ));
    let mut idle = endpoint.connect().await.unwrap();
    let mut in_flight = endpoint.connect().await.unwrap();
    let mut stuck = endpoint.connect().await.unwrap();
    in_flight.write_all(&[3, b'a']).await.unwrap();
    within("first request", handler.started.notified()).await;
    stuck.write_all(&[5]).await.unwrap();
    within("second request", handler.started.notified()).await;

    stop.send(()).unwrap();
    // The idle one closes at once.
    assert!(read_to_close(&mut idle).await.is_empty());
    // New connections are refused by the OS: the listener is gone.
    assert!(endpoint.connect().await.is_err());
    // The request in flight completes within the grace.
    in_flight.write_all(b"bc").await.unwrap();
    let mut back = [0u8; 3];
    within("in-flight answer", in_flight.read_exact(&mut back))
        .await
        .unwrap();
    assert_eq!(&back, b"abc");
    // The stuck one is aborted when the grace ends, and serve returns.
    assert!(read_to_close(&mut stuck).await.is_empty());
    within("serve to return", task).await.unwrap().unwrap();
}

#[tokio::test]
async fn bad_configurations_are_refused() {
    for bad in [
        ServeConfig {
            max_connections: 0,
            ..config()
        },
        ServeConfig {
            idle_timeout: Duration::ZERO,
            ..config()
        },
        ServeConfig {
            max_lifetime: Some(Duration::ZERO),
            ..config()
        },
    ] {
        let listener = Endpoint::tcp("127.0.0.1", 0).bind().await.unwrap();
        let result = serve(
            listener,
            Arc::new(Echo::default()),
            Arc::new(AnyPeer),
            bad,
            std::future::pending::<()>(),
        )
        .await;
        assert!(matches!(result, Err(ServeError::InvalidConfig(_))));
    }
}

#[tokio::test]
async fn serves_unix_sockets_and_removes_the_file_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("serve.sock");
    let listener = Endpoint::unix(&path).bind().await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        listener,
        Arc::new(Echo::default()),
        Arc::new(AnyPeer),
        config(),
        stopped,
    ));
    let mut stream = Endpoint::unix(&path).connect().await.unwrap();
    echo(&mut stream, b"hello").await;
    stop.send(()).unwrap();
    within("serve to return", task).await.unwrap().unwrap();
    assert!(!path.exists(), "the socket file outlived the server");
}

#[test]
fn privileged_peers_are_decided_by_what_the_kernel_reports() {
    use keystore_shared::endpoint::UnixCredentials;
    use keystore_shared::serve::PrivilegedPeers;
    let root = |uid| Peer::Unix {
        path: None,
        cred: Some(UnixCredentials {
            uid,
            gid: 0,
            pid: Some(1),
        }),
    };
    let allowed = [
        Peer::Vsock { cid: 3, port: 1023 },
        Peer::Vsock { cid: 3, port: 1 },
        Peer::Tcp("127.0.0.1:999".parse().unwrap()),
        Peer::Tcp("[::1]:1023".parse().unwrap()),
        root(0),
    ];
    for peer in &allowed {
        assert!(PrivilegedPeers.check(peer).is_ok(), "{peer} was refused");
    }
    let refused = [
        (
            Peer::Vsock { cid: 3, port: 1024 },
            "source port is above 1023",
        ),
        (Peer::Vsock { cid: 16, port: 5 }, "not the parent instance"),
        (Peer::Tcp("127.0.0.1:40000".parse().unwrap()), "source port"),
        (Peer::Tcp("10.0.0.7:80".parse().unwrap()), "not a loopback"),
        (root(65534), "uid 65534 is not root"),
        (
            Peer::Unix {
                path: None,
                cred: None,
            },
            "did not say",
        ),
        (Peer::Unknown, "did not say"),
    ];
    for (peer, why) in &refused {
        let err = PrivilegedPeers.check(peer).unwrap_err();
        assert!(err.reason.contains(why), "{peer}: {}", err.reason);
    }
}

#[test]
fn host_services_serve_only_the_enclave_cid() {
    use keystore_shared::endpoint::UnixCredentials;
    use keystore_shared::serve::VsockCidPeers;
    let policy = VsockCidPeers { cid: 16 };
    let unix = Peer::Unix {
        path: None,
        cred: Some(UnixCredentials {
            uid: 1000,
            gid: 1000,
            pid: None,
        }),
    };
    for peer in [
        Peer::Vsock { cid: 16, port: 1 },
        Peer::Vsock {
            cid: 16,
            port: 60_000,
        },
        Peer::Tcp("127.0.0.1:40000".parse().unwrap()),
        Peer::Tcp("[::1]:40000".parse().unwrap()),
        unix,
    ] {
        assert!(policy.check(&peer).is_ok(), "{peer} was refused");
    }
    for (peer, why) in [
        (
            Peer::Vsock { cid: 17, port: 1 },
            "CID 17 is not the enclave",
        ),
        (Peer::Vsock { cid: 3, port: 1 }, "CID 3 is not the enclave"),
        (Peer::Tcp("10.0.0.7:443".parse().unwrap()), "not a loopback"),
        (Peer::Unknown, "did not say"),
    ] {
        let err = policy.check(&peer).unwrap_err();
        assert!(err.reason.contains(why), "{peer}: {}", err.reason);
    }
}

/// Answers "YES\n" to every admitted peer, then closes.
struct Yes;

impl Handler for Yes {
    async fn handle(&self, mut conn: Accepted) {
        let _ = conn.stream.write_all(b"YES\n").await;
    }

    async fn refuse(&self, stream: &mut Stream, refusal: &Refusal) {
        let _ = stream.write_all(format!("NO {refusal}\n").as_bytes()).await;
    }
}

fn is_root() -> bool {
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0
}

#[tokio::test]
async fn privileged_peers_over_tcp_need_a_source_port_below_1024() {
    if !is_root() {
        eprintln!("skipped: binding a port below 1024 needs root (CI runs as root)");
        return;
    }
    let listener = Endpoint::tcp("127.0.0.1", 0).bind().await.unwrap();
    let endpoint = listener.local_endpoint().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        listener,
        Arc::new(Yes),
        Arc::new(keystore_shared::serve::PrivilegedPeers),
        config(),
        stopped,
    ));
    let mut plain = endpoint.connect().await.unwrap();
    let said = String::from_utf8(read_to_close(&mut plain).await).unwrap();
    assert!(said.starts_with("NO connection refused: "), "{said}");
    assert!(said.contains("source port is above 1023"), "{said}");

    let mut privileged = endpoint.connect_privileged().await.unwrap();
    assert_eq!(read_to_close(&mut privileged).await, b"YES\n");
    stop.send(()).unwrap();
    within("serve to return", task).await.unwrap().unwrap();
}

#[tokio::test]
async fn privileged_peers_over_unix_need_uid_0() {
    use std::os::unix::fs::PermissionsExt;
    if !is_root() {
        eprintln!("skipped: needs root to run a client as another user (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("privileged.sock");
    let listener = Endpoint::unix(&path).bind().await.unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        listener,
        Arc::new(Yes),
        Arc::new(keystore_shared::serve::PrivilegedPeers),
        config(),
        stopped,
    ));
    // Root (this process) is served.
    let mut as_root = Endpoint::unix(&path).connect().await.unwrap();
    assert_eq!(read_to_close(&mut as_root).await, b"YES\n");
    // `nobody`, whatever it claims, is not: the kernel says uid 65534.
    let client = "import socket,sys\n\
                  s=socket.socket(socket.AF_UNIX)\n\
                  s.connect(sys.argv[1])\n\
                  out=b''\n\
                  while True:\n    b=s.recv(4096)\n    if not b: break\n    out+=b\n\
                  sys.stdout.write(out.decode())\n";
    let socket = path.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .args(["/usr/bin/python3", "-c", client])
            .arg(&socket)
            .output()
    });
    let output = within("the unprivileged client", output)
        .await
        .unwrap()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(
        said.contains("NO connection refused: unix peer uid 65534 is not root"),
        "{said}"
    );
    stop.send(()).unwrap();
    within("serve to return", task).await.unwrap().unwrap();
}
