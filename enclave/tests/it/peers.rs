//! Who may talk to the enclave (DESIGN §1, §3), with the real
//! `keystore-enclave` binary on tcp ports and real unprivileged clients
//! (`setpriv` to `nobody`): both ports refuse unprivileged peers before
//! reading a byte, so `Load`, wipes and rollbacks are impossible for them;
//! root from a port below 1024 is served; `--secret-peers any` opens the
//! secret port only, and then a peer cannot name a caller. Also: a hostile
//! 16 MiB load frame leaves the process's peak RSS small.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keystore_enclave::server::PeerTrust;
use keystore_shared::endpoint::{Peer, UnixCredentials};
use keystore_shared::frame::{Connection, decode_frame, encode_frame};
use keystore_shared::protocol::{
    DEFAULT_MAX_LOAD_FRAME, DEFAULT_MAX_RESPONSE_FRAME, ErrorCode, LoadEntry, Request, RequestOp,
    Response, ResponseBody,
};
use keystore_shared::{Caller, Client, ClientConfig, Endpoint};
use tokio::io::AsyncWriteExt;

/// Kills the enclave if the test fails before it is stopped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A well-formed key ARN for the enclave to pin (KMS is never reached).
const PINNED_KEY: &str =
    "arn:aws:kms:us-east-1:111122223333:key/0f2c2a5e-9f59-4a7e-8f0b-3c1d5a6b7c8d";

/// A free loopback port (bound, then released for the enclave).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real enclave on tcp loopback ports, with a region so the load port
/// is open (KMS itself is unreachable: nothing here needs it). The load
/// port is picked here and bound by the enclave a moment later; another
/// test may take it in between, so a start that announces nothing is tried
/// again on fresh ports (a real failure fails every attempt).
fn start_enclave(dir: &std::path::Path, extra: &[&str]) -> (Running, Endpoint, Endpoint) {
    for _ in 0..4 {
        if let Some(started) = try_start_enclave(dir, extra) {
            return started;
        }
    }
    panic!("keystore-enclave did not start in four attempts (see its stderr above)");
}

fn try_start_enclave(
    dir: &std::path::Path,
    extra: &[&str],
) -> Option<(Running, Endpoint, Endpoint)> {
    let load = Endpoint::tcp("127.0.0.1", free_port());
    let dead = format!("tcp://127.0.0.1:{}", free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_keystore-enclave"))
        .args(["--nsm", "mock", "--mock-pki"])
        .arg(dir.join("pki"))
        .args(["--listen", "tcp://127.0.0.1:0"])
        .args(["--load-listen", &load.to_string()])
        .args(["--region", "us-east-1", "--kms-proxy", &dead])
        .args(["--kms-key-arn", PINNED_KEY])
        .args(["--credentials", &dead])
        .args(["--recipient-bits", "2048", "--log-level", "warn"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("keystore-enclave did not announce its endpoint");
    let endpoint = line.trim().parse().ok()?;
    Some((running, endpoint, load))
}

/// Sends `request` from an unprivileged process (`nobody`, an ordinary
/// source port) and returns the one answer the enclave sent before
/// closing, or `None` if it sent none.
fn as_nobody(endpoint: &Endpoint, request: &Request) -> Option<Response> {
    let Endpoint::Tcp { host, port } = endpoint else {
        panic!("tcp only: {endpoint}");
    };
    let frame = encode_frame(request, DEFAULT_MAX_LOAD_FRAME).unwrap();
    // Sends the frame (the server may close before reading it), then reads
    // one answer frame, or until the server closes.
    let client = "import socket,struct,sys\n\
                  s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)\n\
                  try:\n    s.sendall(sys.stdin.buffer.read())\nexcept OSError:\n    pass\n\
                  out=b''\n\
                  while len(out) < 4 or len(out) < 4 + struct.unpack('>I', out[:4])[0]:\n    \
                  try:\n        b=s.recv(65536)\n    except OSError:\n        break\n    \
                  if not b: break\n    out+=b\n\
                  sys.stdout.buffer.write(out)\n";
    let mut child = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .args(["/usr/bin/python3", "-c", client, host, &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&frame).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{output:?}");
    decode_frame::<Response>(&output.stdout, DEFAULT_MAX_RESPONSE_FRAME)
        .unwrap()
        .map(|(response, _)| response)
}

fn privileged() -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_secs(30),
        request_timeout: Duration::from_secs(60),
        max_request_frame: DEFAULT_MAX_LOAD_FRAME,
        privileged: true,
        ..ClientConfig::default()
    }
}

fn unprivileged() -> ClientConfig {
    ClientConfig {
        privileged: false,
        ..privileged()
    }
}

fn denied(response: Option<Response>) -> String {
    match response.map(|r| r.result) {
        Some(ResponseBody::Error {
            code: ErrorCode::Denied,
            message,
        }) => message,
        other => panic!("expected Denied, got {other:?}"),
    }
}

fn is_root() -> bool {
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0
}

fn load(entries: Vec<LoadEntry>) -> Request {
    Request::new(1, RequestOp::Load { entries })
}

fn rollback() -> Vec<LoadEntry> {
    vec![LoadEntry {
        name: "DB_PASSWORD".to_owned(),
        envelope: "ENC[v1:kms:AAAA]".to_owned(),
    }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_privileged_peers_reach_the_real_enclaves_ports() {
    if !is_root() {
        eprintln!("skipped: needs root for setpriv and ports below 1024 (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_enclave, secret, load_port) = start_enclave(dir.path(), &[]);

    // `nobody`: refused on both ports, whatever it sends.
    for (endpoint, request) in [
        (&secret, Request::new(1, RequestOp::Status)),
        (&secret, Request::new(2, RequestOp::List)),
        (
            &secret,
            Request::new(
                3,
                RequestOp::Get {
                    name: "DB_PASSWORD".into(),
                },
            ),
        ),
        (&secret, load(rollback())),
        (&load_port, load(Vec::new())),
        (&load_port, load(rollback())),
        (&load_port, Request::new(4, RequestOp::Status)),
        (
            &load_port,
            Request::new(
                5,
                RequestOp::LogRead {
                    after: None,
                    max: 10,
                },
            ),
        ),
    ] {
        let message = denied(as_nobody(endpoint, &request));
        assert!(message.contains("source port is above 1023"), "{message}");
    }
    // Root from an ordinary port is refused as well: the port is the proof.
    for endpoint in [&secret, &load_port] {
        let mut client = Client::connect_with(endpoint, unprivileged())
            .await
            .unwrap();
        let err = client.status().await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Denied), "{err}");
    }

    // Root from a port below 1024: served on both.
    let mut client = Client::connect_with(&secret, privileged()).await.unwrap();
    let status = client.status().await.unwrap();
    assert_eq!(status.secret_peers.as_deref(), Some("privileged"));
    assert!(!status.ready);
    let mut loader = Client::connect_with(&load_port, privileged())
        .await
        .unwrap();
    loader.status().await.unwrap();
    // An empty Load reaches the loader, which refuses it: no wipe by
    // accident either.
    let err = loader.call(RequestOp::Load { entries: vec![] }).await;
    let err = err.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{err}");
    assert!(err.to_string().contains("--allow-empty"), "{err}");
    // A non-empty one gets as far as the envelope check.
    let err = loader
        .call(RequestOp::Load {
            entries: rollback(),
        })
        .await
        .unwrap_err();
    assert_ne!(err.code(), Some(ErrorCode::Denied), "{err}");
    // The log ring is read on the load port only (its `ready` event is
    // there although `--log-level warn` kept it off stderr).
    let batch = loader.log_read(None, 100).await.unwrap();
    assert!(
        batch.entries.iter().any(|e| e.message == "ready"),
        "{batch:?}"
    );
    let err = client.log_read(None, 100).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_peers_any_opens_the_secret_port_but_never_the_load_port() {
    if !is_root() {
        eprintln!("skipped: needs root for setpriv and ports below 1024 (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_enclave, secret, load_port) = start_enclave(dir.path(), &["--secret-peers", "any"]);

    // `nobody` is served on the secret port, and Status says so.
    let status = match as_nobody(&secret, &Request::new(1, RequestOp::Status)).map(|r| r.result) {
        Some(ResponseBody::Status(status)) => status,
        other => panic!("expected Status, got {other:?}"),
    };
    assert_eq!(status.secret_peers.as_deref(), Some("any"));
    // ... but may not claim to be anyone.
    let claim = Request {
        caller: Some(Caller::root()),
        ..Request::new(
            2,
            RequestOp::Get {
                name: "DB_PASSWORD".into(),
            },
        )
    };
    let message = denied(as_nobody(&secret, &claim));
    assert!(message.contains("may not name the caller"), "{message}");
    // ... nor load through the secret port, nor reach the load port.
    let message = denied(as_nobody(&secret, &load(rollback())));
    assert!(message.contains("privileged"), "{message}");
    let message = denied(as_nobody(&load_port, &load(rollback())));
    assert!(message.contains("source port is above 1023"), "{message}");

    // A privileged peer may still name a caller.
    let mut client = Client::connect_with(&secret, privileged()).await.unwrap();
    let err = client
        .get_as("DB_PASSWORD", Some(Caller::root()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotReady), "{err}");
}

#[test]
fn a_caller_is_believed_only_from_a_privileged_peer() {
    let unix = |uid| Peer::Unix {
        path: None,
        cred: Some(UnixCredentials {
            uid,
            gid: uid + 1,
            pid: Some(42),
        }),
    };
    let asserted = Caller {
        uid: Some(1000),
        user: Some("api".into()),
        ..Caller::default()
    };

    // Privileged: root on a unix socket, or a source port below 1024.
    for peer in [
        unix(0),
        Peer::Tcp("127.0.0.1:700".parse().unwrap()),
        Peer::Vsock { cid: 3, port: 900 },
    ] {
        let trust = PeerTrust::of(&peer);
        assert_eq!(trust, PeerTrust::Privileged, "{peer}");
        assert_eq!(trust.caller(Some(asserted.clone())).unwrap(), asserted);
        assert_eq!(trust.caller(None).unwrap(), Caller::root());
    }

    // Unprivileged unix peer: the kernel's uid and gid, and nothing else.
    let trust = PeerTrust::of(&unix(65534));
    let kernel = Caller {
        uid: Some(65534),
        gid: Some(65535),
        ..Caller::default()
    };
    assert_eq!(trust, PeerTrust::Unprivileged(kernel.clone()));
    assert_eq!(trust.caller(None).unwrap(), kernel);
    let err = trust.caller(Some(Caller::root())).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Denied);
    assert!(err.to_string().contains("uid 65534"), "{err}");

    // Unprivileged tcp or vsock peer: anonymous.
    for peer in [
        Peer::Tcp("127.0.0.1:40000".parse().unwrap()),
        Peer::Tcp("10.0.0.9:80".parse().unwrap()),
        Peer::Vsock { cid: 3, port: 5000 },
        Peer::Vsock { cid: 17, port: 80 },
        Peer::Unknown,
    ] {
        let trust = PeerTrust::of(&peer);
        assert_eq!(trust.caller(None).unwrap(), Caller::default(), "{peer}");
        assert_eq!(
            trust.caller(Some(asserted.clone())).unwrap_err().code(),
            ErrorCode::Denied
        );
    }
}

/// Peak resident memory of a process (`VmHWM`, KiB).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_16_mib_load_frame_keeps_the_enclave_process_under_64_mib() {
    if !is_root() {
        eprintln!("skipped: needs root for ports below 1024 (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (enclave, secret, load_port) = start_enclave(dir.path(), &[]);
    let pid = enclave.0.id();
    let before = peak_rss_kib(pid);

    // {"id": 7, "v": 1, "op": {"Load": {"entries": [0, 0, ... 16 M zeros]}}}:
    // through a generic CBOR value tree this was ~0.5 GiB.
    let zeros = DEFAULT_MAX_LOAD_FRAME - 64;
    let mut body = vec![0xa3, 0x62, b'i', b'd', 0x07, 0x61, b'v', 0x01];
    body.extend_from_slice(&[0x62, b'o', b'p', 0xa1, 0x64, b'L', b'o', b'a', b'd', 0xa1]);
    body.extend_from_slice(&[0x67, b'e', b'n', b't', b'r', b'i', b'e', b's', 0x9a]);
    body.extend_from_slice(&u32::try_from(zeros).unwrap().to_be_bytes());
    body.resize(body.len() + zeros, 0x00);
    assert!(body.len() <= DEFAULT_MAX_LOAD_FRAME);
    let mut frame = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    drop(body);

    let stream = load_port.connect_privileged().await.unwrap();
    let mut conn = Connection::new(stream);
    conn.set_max_frame(DEFAULT_MAX_LOAD_FRAME, DEFAULT_MAX_RESPONSE_FRAME);
    conn.get_mut().write_all(&frame).await.unwrap();
    let response = tokio::time::timeout(Duration::from_secs(60), conn.read_message::<Response>())
        .await
        .expect("no answer within 60 s")
        .unwrap()
        .expect("the enclave closed instead of answering");
    assert_eq!(response.id, 7);
    assert!(
        matches!(
            response.result,
            ResponseBody::Error {
                code: ErrorCode::BadRequest,
                ..
            }
        ),
        "{response:?}"
    );
    let after = peak_rss_kib(pid);
    eprintln!("enclave peak RSS: {before} KiB before the frame, {after} KiB after");
    assert!(
        after < 64 * 1024,
        "one hostile load frame took the enclave's peak RSS to {after} KiB"
    );

    // Still serving, on both ports.
    let mut client = Client::connect_with(&secret, privileged()).await.unwrap();
    client.status().await.unwrap();
    let mut client = Client::connect_with(&load_port, privileged())
        .await
        .unwrap();
    client.status().await.unwrap();
}
