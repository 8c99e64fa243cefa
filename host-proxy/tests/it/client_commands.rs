//! `keystore-host get | list | status | attest` run as processes: first
//! against an in-process secret server whose store the test fills, then
//! against the real `keystore-enclave` binary with a mock NSM.
#![allow(clippy::unwrap_used)]

use crate::support::common as support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keystore_enclave::audit::{AuditConfig, AuditTrail};
use keystore_enclave::recipient::{Recipient, RecipientBits, RecipientConfig};
use keystore_enclave::server::{Server, ServerConfig};
use keystore_enclave::service::KeystoreService;
use keystore_enclave::store::{SealKey, Store, StoreConfig};
use keystore_nsm::mock::executable_pcr0;
use keystore_nsm::{MockConfig, MockNsm, Nsm};
use keystore_shared::Endpoint;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use support::enclave_binary;
use zeroize::Zeroizing;

const BINARY_VALUE: &[u8] = b"line one\nline two\n\x00\xff\xfe no trailing newline";

async fn host(endpoint: &Endpoint, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keystore-host"));
    command
        .arg("--enclave")
        .arg(endpoint.to_string())
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("KEYSTORE_ENCLAVE");
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Asserts a failure with exactly one line on stderr, and returns it.
fn failure(out: &Output, code: i32) -> String {
    assert_eq!(out.status.code(), Some(code), "{out:?}");
    assert!(out.stdout.is_empty(), "stdout on failure: {out:?}");
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(err.lines().count(), 1, "one stderr line, got {err:?}");
    err.trim_end().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_against_an_in_process_server() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let nsm: Arc<dyn Nsm> = Arc::new(MockNsm::open(&pki, MockConfig::default()).unwrap());
    let (recipient, refresher) = Recipient::start(
        nsm.clone(),
        RecipientConfig {
            bits: RecipientBits::B2048,
            ..RecipientConfig::default()
        },
    )
    .await
    .unwrap();
    let store = Arc::new(Store::new(
        SealKey::generate(nsm.as_ref()).unwrap(),
        StoreConfig::default(),
    ));
    let mut set = store.builder();
    set.insert("app/binary", Zeroizing::new(BINARY_VALUE.to_vec()))
        .unwrap();
    set.insert("db/password", Zeroizing::new(b"hunter2".to_vec()))
        .unwrap();
    store.replace(set.build());
    let service = Arc::new(KeystoreService::new(
        store,
        recipient,
        nsm.clone(),
        Arc::new(AuditTrail::new(nsm, AuditConfig::default()).unwrap()),
    ));
    let endpoint = Endpoint::unix(dir.path().join("enclave.sock"));
    let server = Server::bind(&endpoint, service, ServerConfig::default())
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));

    // get: the exact bytes, nothing else.
    let out = host(&endpoint, &["get", "app/binary"]).await;
    assert!(out.status.success());
    assert_eq!(out.stdout, BINARY_VALUE);
    assert!(out.stderr.is_empty());
    let line = failure(&host(&endpoint, &["get", "no/such"]).await, 2);
    assert!(
        line.contains("NotFound") && line.contains("no/such"),
        "{line}"
    );
    assert!(!line.contains("hunter2"));

    // The endpoint can also come from the environment.
    let mut command = Command::new(env!("CARGO_BIN_EXE_keystore-host"));
    command
        .args(["get", "db/password"])
        .env("KEYSTORE_ENCLAVE", endpoint.to_string());
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.stdout, b"hunter2");

    assert_eq!(
        stdout(&host(&endpoint, &["list"]).await),
        "app/binary\ndb/password\n"
    );

    let status: Value =
        serde_json::from_str(&stdout(&host(&endpoint, &["status", "--json"]).await)).unwrap();
    assert_eq!(status["ready"], true);
    assert_eq!(status["secret_count"], 2);
    assert_eq!(status["recipient_key_bits"], 2048);
    // The audit trail: the start and the reads above, none dropped.
    assert!(
        status["audit"]["last_seq"].as_u64().unwrap() >= 4,
        "{status}"
    );
    assert_eq!(status["audit"]["dropped"], 0);
    assert_eq!(status["audit"]["dropping"], false);
    let text = stdout(&host(&endpoint, &["status"]).await);
    assert!(text.contains("ready:") && text.contains("true"), "{text}");
    assert!(text.contains("RSA-2048"), "{text}");
    assert!(
        text.contains("audit:") && text.contains("0 dropped in 0 gap(s)"),
        "{text}"
    );

    // attest: verified against the mock root, PCR0 (this test executable,
    // which the in-process mock NSM measured) checked and printed.
    let root = pki.join("root.pem");
    let root = root.to_str().unwrap();
    let pcr0 = hex::encode(executable_pcr0().unwrap());
    let expect = format!("0={pcr0}");
    let out = host(
        &endpoint,
        &["attest", "--root", root, "--pcr", &expect, "--json"],
    )
    .await;
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["valid"], true);
    assert_eq!(report["pcrs"]["0"], pcr0.as_str());
    assert_eq!(report["nonce"].as_str().unwrap().len(), 64);
    let text = stdout(&host(&endpoint, &["attest", "--root", root]).await);
    assert!(text.contains("PCR0") && text.contains(&pcr0), "{text}");

    // A wrong PCR or the wrong root: exit 1, one line.
    let wrong = format!("0={}", "00".repeat(48));
    let line = failure(
        &host(&endpoint, &["attest", "--root", root, "--pcr", &wrong]).await,
        1,
    );
    assert!(
        line.starts_with("attestation invalid:") && line.contains("PCR"),
        "{line}"
    );
    let line = failure(&host(&endpoint, &["attest"]).await, 1);
    assert!(line.starts_with("attestation invalid:"), "{line}");

    // No server there: one line, non-zero.
    let gone = Endpoint::unix(dir.path().join("nobody.sock"));
    let line = failure(&host(&gone, &["status"]).await, 2);
    assert!(line.contains("nobody.sock"), "{line}");

    assert!(!task.is_finished());
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    refresher.shutdown().await.unwrap();
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_enclave(binary: &Path, dir: &Path) -> (Running, Endpoint) {
    let mut child = Command::new(binary)
        .args(["--nsm", "mock", "--mock-pki"])
        .arg(dir.join("pki"))
        .arg("--listen")
        .arg(format!("unix://{}", dir.join("enclave.sock").display()))
        .args(["--recipient-bits", "2048", "--log-level", "warn"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let running = Running(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(120)).unwrap();
    (running, line.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_against_the_enclave_binary() {
    let binary = tokio::task::spawn_blocking(enclave_binary).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut running, endpoint) = start_enclave(&binary, dir.path());
    let pid = running.0.id();

    let status: Value =
        serde_json::from_str(&stdout(&host(&endpoint, &["status", "--json"]).await)).unwrap();
    assert_eq!(status["ready"], false);
    assert_eq!(status["recipient_key_bits"], 2048);
    assert_eq!(stdout(&host(&endpoint, &["list"]).await), "");
    let line = failure(&host(&endpoint, &["get", "x"]).await, 2);
    assert!(line.contains("NotReady"), "{line}");

    // The mock's PCR0 is the SHA-384 of the enclave binary.
    use sha2::Digest;
    let pcr0 = hex::encode(sha2::Sha384::digest(std::fs::read(&binary).unwrap()));
    let root = dir.path().join("pki/root.pem");
    let expect = format!("0={pcr0}");
    let out = host(
        &endpoint,
        &["attest", "--root", root.to_str().unwrap(), "--pcr", &expect],
    )
    .await;
    let text = stdout(&out);
    assert!(text.contains(&pcr0), "{text}");

    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(
        core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(),
        ["0", "0"],
        "{core}"
    );

    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let exit = loop {
        if let Some(status) = running.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "keystore-enclave ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit}");
}
