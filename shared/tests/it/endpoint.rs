//! Endpoint parsing/printing and real bind/connect over TCP and Unix sockets.
// Test helpers outside #[test] fns are not covered by allow-unwrap-in-tests.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::time::Duration;

use keystore_shared::endpoint::{
    Endpoint, EndpointError, MAX_UNIX_PATH_LEN, Peer, Stream, VSOCK_CID_ANY, VSOCK_CID_PARENT,
};
use keystore_shared::frame::Connection;
use keystore_shared::protocol::{Request, RequestOp, Response, ResponseBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn parse_and_print_round_trip() {
    let table: &[(&str, Endpoint)] = &[
        ("vsock://3:8000", Endpoint::vsock(VSOCK_CID_PARENT, 8000)),
        ("vsock://ANY:5000", Endpoint::vsock(VSOCK_CID_ANY, 5000)),
        ("vsock://16:4294967295", Endpoint::vsock(16, u32::MAX)),
        ("vsock://0:0", Endpoint::vsock(0, 0)),
        ("tcp://127.0.0.1:5000", Endpoint::tcp("127.0.0.1", 5000)),
        ("tcp://localhost:0", Endpoint::tcp("localhost", 0)),
        (
            "tcp://kms.us-east-1.amazonaws.com:443",
            Endpoint::tcp("kms.us-east-1.amazonaws.com", 443),
        ),
        ("tcp://[::1]:65535", Endpoint::tcp("::1", 65535)),
        ("tcp://[fe80::1:2]:80", Endpoint::tcp("fe80::1:2", 80)),
        ("tcp://my_host:1", Endpoint::tcp("my_host", 1)),
        (
            "unix:///tmp/keystore.sock",
            Endpoint::unix("/tmp/keystore.sock"),
        ),
        ("unix:///", Endpoint::unix("/")),
    ];
    for (text, expected) in table {
        let parsed: Endpoint = text
            .parse()
            .unwrap_or_else(|e| panic!("{text} should parse: {e}"));
        assert_eq!(&parsed, expected, "{text}");
        assert_eq!(parsed.to_string(), *text, "display of {text}");
        let again: Endpoint = parsed.to_string().parse().unwrap();
        assert_eq!(again, parsed);
    }
}

#[test]
fn numeric_any_cid_prints_as_any() {
    let e: Endpoint = "vsock://4294967295:5000".parse().unwrap();
    assert_eq!(e, Endpoint::vsock(VSOCK_CID_ANY, 5000));
    assert_eq!(e.to_string(), "vsock://ANY:5000");
}

#[test]
fn bad_addresses_are_typed_errors_naming_the_forms() {
    let long_path = format!("unix:///{}", "a".repeat(MAX_UNIX_PATH_LEN));
    let bad = [
        "",
        "5000",
        "http://localhost:80",
        "VSOCK://3:5000",
        "vsock://3",
        "vsock://:5000",
        "vsock://3:",
        "vsock://any:5000",
        "vsock://-1:5000",
        "vsock://+3:5000",
        "vsock://3:+5000",
        "vsock://4294967296:5000",
        "vsock://3:4294967296",
        "vsock://3:5000:1",
        "tcp://localhost",
        "tcp://:5000",
        "tcp://localhost:65536",
        "tcp://localhost:-1",
        "tcp://localhost:+80",
        "tcp://localhost:8o",
        "tcp://::1:5000",
        "tcp://[::1]5000",
        "tcp://[::1:5000",
        "tcp://[nothex]:5000",
        "tcp://[127.0.0.1]:5000",
        "tcp://bad host:5000",
        "tcp://user@host:5000",
        "tcp://host/path:5000",
        "unix://relative/path",
        "unix://",
        "unix:///tmp/a\0b",
        long_path.as_str(),
    ];
    for text in bad {
        let err = text
            .parse::<Endpoint>()
            .expect_err(&format!("{text:?} must not parse"));
        assert!(
            matches!(err, EndpointError::Parse { .. }),
            "{text:?}: {err:?}"
        );
        let msg = err.to_string();
        for form in ["vsock://CID:PORT", "tcp://HOST:PORT", "unix:///"] {
            assert!(msg.contains(form), "{text:?}: message {msg:?} lacks {form}");
        }
    }
}

#[test]
fn huge_bad_input_is_not_echoed_whole() {
    let input = format!("nope://{}", "x".repeat(10_000));
    let msg = input.parse::<Endpoint>().unwrap_err().to_string();
    assert!(msg.len() < 1_000, "error is {} bytes", msg.len());
}

#[test]
fn serde_uses_the_text_form() {
    let e = Endpoint::tcp("::1", 7);
    let bytes = serde_cbor::to_vec(&e).unwrap();
    let text: String = serde_cbor::from_slice(&bytes).unwrap();
    assert_eq!(text, "tcp://[::1]:7");
    let back: Endpoint = serde_cbor::from_slice(&bytes).unwrap();
    assert_eq!(back, e);
    let bad = serde_cbor::to_vec(&"tcp://nope").unwrap();
    assert!(serde_cbor::from_slice::<Endpoint>(&bad).is_err());
}

/// Serves one connection: answers each `Get` with the name as value.
async fn serve_one(listener: keystore_shared::endpoint::Listener) -> Peer {
    let (stream, peer) = listener.accept().await.unwrap();
    let mut conn = Connection::new(stream);
    while let Some(req) = conn.read_message::<Request>().await.unwrap() {
        req.check_version().unwrap();
        let RequestOp::Get { name } = req.op else {
            panic!("unexpected op");
        };
        let value = name.clone().into_bytes().into();
        conn.write_message(&Response::new(req.id, ResponseBody::Secret { name, value }))
            .await
            .unwrap();
    }
    peer
}

async fn echo_through(endpoint: &Endpoint) -> Peer {
    let listener = endpoint.bind().await.unwrap();
    let local = listener.local_endpoint().clone();
    let server = tokio::spawn(serve_one(listener));
    let stream = local.connect().await.unwrap();
    let mut conn = Connection::new(stream);
    for id in 1..=20u64 {
        let name = format!("app/secret-{id}");
        conn.write_message(&Request::new(id, RequestOp::Get { name: name.clone() }))
            .await
            .unwrap();
        let resp: Response = conn.read_message().await.unwrap().unwrap();
        assert_eq!(resp.id, id);
        match resp.result {
            ResponseBody::Secret { name: got, value } => {
                assert_eq!(got, name);
                assert_eq!(value.expose(), name.as_bytes());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    conn.shutdown().await.unwrap();
    tokio::time::timeout(TIMEOUT, server)
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn tcp_bind_reports_real_port_and_echoes() {
    let endpoint: Endpoint = "tcp://127.0.0.1:0".parse().unwrap();
    let listener = endpoint.bind().await.unwrap();
    let Endpoint::Tcp { host, port } = listener.local_endpoint() else {
        panic!("not tcp");
    };
    assert_eq!(host, "127.0.0.1");
    assert_ne!(*port, 0);
    drop(listener);

    let peer = echo_through(&endpoint).await;
    assert!(matches!(peer, Peer::Tcp(addr) if addr.ip().is_loopback()));
    assert!(peer.to_string().starts_with("tcp:127.0.0.1:"), "{peer}");
}

#[tokio::test]
async fn tcp_ipv6_loopback_when_available() {
    let endpoint: Endpoint = "tcp://[::1]:0".parse().unwrap();
    match endpoint.bind().await {
        Ok(listener) => {
            let local = listener.local_endpoint().clone();
            assert!(local.to_string().starts_with("tcp://[::1]:"), "{local}");
            drop(listener);
            echo_through(&endpoint).await;
        }
        // Some CI containers have no IPv6 at all; the error must still be typed.
        Err(err) => assert!(matches!(err, EndpointError::Bind { .. }), "{err:?}"),
    }
}

#[tokio::test]
async fn tcp_streams_have_nodelay() {
    let listener = Endpoint::tcp("127.0.0.1", 0).bind().await.unwrap();
    let local = listener.local_endpoint().clone();
    let (client, accepted) = tokio::join!(local.connect(), listener.accept());
    let Stream::Tcp(client) = client.unwrap() else {
        panic!("not tcp")
    };
    let (Stream::Tcp(server), _) = accepted.unwrap() else {
        panic!("not tcp")
    };
    assert!(client.nodelay().unwrap());
    assert!(server.nodelay().unwrap());
}

#[tokio::test]
async fn unix_echo_and_socket_removed_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks.sock");
    let endpoint = Endpoint::unix(&path);
    let peer = echo_through(&endpoint).await;
    // The kernel's word on who connected: this test process.
    let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
    let pid = i32::try_from(std::process::id()).unwrap();
    assert!(
        matches!(peer, Peer::Unix { path: None, cred: Some(cred) }
            if cred.uid == uid && cred.pid == Some(pid)),
        "{peer:?}"
    );
    assert_eq!(peer.to_string(), format!("unix:unnamed (uid {uid})"));
    // serve_one consumed the listener and returned: the file must be gone.
    assert!(!path.exists(), "socket file left behind");
}

#[tokio::test]
async fn unix_stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.sock");
    // A socket file nobody listens on, as a crashed run leaves behind.
    let std_listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(std_listener);
    assert!(
        std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_socket()
    );

    let listener = Endpoint::unix(&path).bind().await.unwrap();
    assert_eq!(listener.local_endpoint(), &Endpoint::unix(&path));
    let target = Endpoint::unix(&path);
    let (client, accepted) = tokio::join!(target.connect(), listener.accept());
    let mut client = client.unwrap();
    let (mut server, _) = accepted.unwrap();
    client.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn unix_live_socket_is_not_stolen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("live.sock");
    let first = Endpoint::unix(&path).bind().await.unwrap();
    let err = Endpoint::unix(&path).bind().await.unwrap_err();
    assert!(
        matches!(err, EndpointError::UnixSocketInUse { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("another process"), "{err}");
    // The first listener still works.
    let target = Endpoint::unix(&path);
    let (client, accepted) = tokio::join!(target.connect(), first.accept());
    client.unwrap();
    accepted.unwrap();
}

#[tokio::test]
async fn unix_regular_file_is_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.txt");
    std::fs::write(&path, b"precious").unwrap();
    let err = Endpoint::unix(&path).bind().await.unwrap_err();
    assert!(matches!(err, EndpointError::NotASocket { .. }), "{err:?}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[tokio::test]
async fn unix_drop_leaves_a_replacement_socket_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("swap.sock");
    let first = Endpoint::unix(&path).bind().await.unwrap();
    // Someone removes our socket and binds their own at the same path.
    std::fs::remove_file(&path).unwrap();
    let _theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(first);
    assert!(
        path.exists(),
        "dropping the old listener removed the new socket"
    );
}

#[tokio::test]
async fn connect_failures_are_typed() {
    // Bind then drop to get a port with (almost certainly) nobody on it.
    let listener = Endpoint::tcp("127.0.0.1", 0).bind().await.unwrap();
    let local = listener.local_endpoint().clone();
    drop(listener);
    let err = local.connect().await.unwrap_err();
    assert!(matches!(err, EndpointError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains(&local.to_string()), "{err}");

    let missing = Endpoint::unix(PathBuf::from("/nonexistent-dir/ks.sock"));
    let err = missing.connect().await.unwrap_err();
    assert!(matches!(err, EndpointError::Connect { .. }), "{err:?}");

    let err = Endpoint::unix("/nonexistent-dir/ks.sock")
        .bind()
        .await
        .unwrap_err();
    assert!(matches!(err, EndpointError::Bind { .. }), "{err:?}");
}

#[tokio::test]
async fn vsock_bind_works_or_fails_clearly() {
    let endpoint: Endpoint = "vsock://ANY:0".parse().unwrap();
    match endpoint.bind().await {
        Ok(listener) => {
            assert!(matches!(listener.local_endpoint(), Endpoint::Vsock { .. }));
        }
        Err(err) => {
            assert!(matches!(err, EndpointError::Bind { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains("vsock://ANY:0"), "{msg}");
            assert!(msg.contains("vsock driver"), "{msg}");
        }
    }
}

#[tokio::test]
async fn vsock_connect_to_any_is_refused() {
    let err = Endpoint::vsock(VSOCK_CID_ANY, 5000)
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, EndpointError::ConnectToAny(_)), "{err:?}");
    assert!(err.to_string().contains("only valid for listening"));
}

#[tokio::test]
async fn vsock_connect_fails_with_typed_error_here() {
    // No vsock loopback on build machines: whatever happens must be an error
    // value within the timeout, not a panic or a hang. (On a real parent this
    // CID usually does not exist either.)
    let result = tokio::time::timeout(TIMEOUT, Endpoint::vsock(9_999, 5000).connect()).await;
    if let Ok(result) = result {
        let err = result.unwrap_err();
        assert!(matches!(err, EndpointError::Connect { .. }), "{err:?}");
    }
}

#[tokio::test]
async fn a_privileged_vsock_connect_binds_a_low_port_then_fails_typed_here() {
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0;
    // CID ANY names no peer.
    assert!(matches!(
        Endpoint::vsock(VSOCK_CID_ANY, 5000)
            .connect_privileged()
            .await,
        Err(EndpointError::ConnectToAny(_))
    ));
    // No vsock peer exists here (no loopback): the connect fails, as a
    // typed error within the kernel's connect timeout. As root the bind of
    // a port below 1024 succeeded first, so the failure is not the
    // permission one.
    let result = tokio::time::timeout(TIMEOUT, Endpoint::vsock(1, 5000).connect_privileged()).await;
    if let Ok(result) = result {
        let err = result.unwrap_err();
        assert!(matches!(err, EndpointError::Connect { .. }), "{err:?}");
        let text = err.to_string();
        assert!(!text.contains("not supported by this build"), "{text}");
        if root {
            assert!(!text.contains("needs root"), "{text}");
        } else {
            eprintln!("not root: {text}");
        }
    }
}

#[test]
fn transient_accept_errors() {
    let accept = |kind| EndpointError::Accept {
        endpoint: Endpoint::tcp("127.0.0.1", 1),
        source: std::io::Error::from(kind),
    };
    assert!(accept(std::io::ErrorKind::ConnectionAborted).is_transient());
    assert!(
        EndpointError::Accept {
            endpoint: Endpoint::tcp("127.0.0.1", 1),
            source: std::io::Error::from_raw_os_error(24),
        }
        .is_transient()
    );
    assert!(!accept(std::io::ErrorKind::InvalidInput).is_transient());
    assert!(!"x".parse::<Endpoint>().unwrap_err().is_transient());
}

/// A burst of connections larger than tokio's default TCP accept queue
/// (1024) all complete their handshakes while nobody accepts: `bind` raises
/// the backlog to `somaxconn`. With a full queue the kernel drops further
/// SYNs, and since nothing drains the queue here their connects would hang
/// until the bound below.
#[tokio::test]
async fn tcp_listener_queues_a_burst_beyond_tokios_default_backlog() {
    let listener = Endpoint::tcp("127.0.0.1", 0).bind().await.unwrap();
    let Endpoint::Tcp { port, .. } = listener.local_endpoint().clone() else {
        panic!("not a tcp endpoint");
    };
    let backlog = keystore_shared::endpoint::listen_backlog();
    let burst = usize::try_from(backlog).unwrap().min(1500);
    let mut held = Vec::with_capacity(burst);
    for i in 0..burst {
        match tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(("127.0.0.1", port)))
            .await
        {
            Ok(Ok(stream)) => held.push(stream),
            Ok(Err(err)) => panic!("connect {i} of {burst} (backlog {backlog}) failed: {err}"),
            Err(_) => panic!("connect {i} of {burst} (backlog {backlog}) got no handshake"),
        }
    }
    assert_eq!(held.len(), burst);
    drop(listener);
}
