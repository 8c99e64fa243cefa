//! The `keystore-enclave` binary: started with a mock NSM on a unix socket,
//! it announces its endpoint, serves the real client, runs with core dumps
//! disabled, and exits 0 on SIGTERM after removing its socket.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keystore_shared::attestation::{Root, Verifier};
use keystore_shared::protocol::ErrorCode;
use keystore_shared::{Client, Endpoint};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Kills the child if the test fails before it exits on its own.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &std::path::Path, extra: &[&str]) -> (Running, Endpoint) {
    let socket = dir.join("enclave.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_keystore-enclave"))
        .args(["--nsm", "mock", "--mock-pki"])
        .arg(dir.join("pki"))
        .arg("--listen")
        .arg(format!("unix://{}", socket.display()))
        // Bound even without KMS: the audit trail is drained there.
        .arg("--load-listen")
        .arg(format!("unix://{}", dir.join("load.sock").display()))
        .args(["--recipient-bits", "2048", "--log-level", "warn"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    // The first stdout line is the endpoint, printed once it serves.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("keystore-enclave did not announce its endpoint");
    let endpoint: Endpoint = line.trim().parse().unwrap();
    assert_eq!(endpoint, Endpoint::unix(&socket));
    (running, endpoint)
}

/// `Max core file size` soft and hard limits of a running process.
fn core_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<&str> = line
        .trim_start_matches("Max core file size")
        .split_whitespace()
        .collect();
    (fields[0].to_owned(), fields[1].to_owned())
}

fn wait_exit(running: &mut Running, bound: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(status) = running.0.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "keystore-enclave did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_with_core_dumps_off_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut running, endpoint) = start(dir.path(), &["--refresh-after", "240s"]);
    let pid = running.0.id();

    // Soft and hard limit both 0 (the binary inherits this test's limits,
    // whose hard limit is normally unlimited, so this is its own doing).
    assert_eq!(core_limits(pid), ("0".to_owned(), "0".to_owned()));

    let mut client = Client::connect(&endpoint).await.unwrap();
    let status = client.status().await.unwrap();
    assert!(!status.ready, "a fresh enclave has nothing loaded");
    assert_eq!(status.recipient_key_bits, Some(2048));
    assert_eq!(client.list().await.unwrap(), Vec::<String>::new());
    let err = client.get("anything").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotReady));
    let nonce = b"binary test nonce";
    let document = client.attest(nonce, None).await.unwrap();
    let pem = std::fs::read_to_string(dir.path().join("pki/root.pem")).unwrap();
    let verified = Verifier::new(Root::from_pem(&pem).unwrap())
        .expect_nonce(nonce.to_vec())
        .verify(&document)
        .unwrap();
    // PCR0 of the mock is the SHA-384 of the enclave binary itself.
    let binary = std::fs::read(env!("CARGO_BIN_EXE_keystore-enclave")).unwrap();
    use sha2::Digest;
    assert_eq!(
        verified.pcrs.get(&0).map(Vec::as_slice),
        Some(sha2::Sha384::digest(&binary).as_slice())
    );

    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut running, Duration::from_secs(60));
    assert!(status.success(), "exit status {status}");
    assert!(
        !dir.path().join("enclave.sock").exists(),
        "the socket file was left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_also_stops_it_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let (mut running, endpoint) = start(dir.path(), &[]);
    let mut client = Client::connect(&endpoint).await.unwrap();
    client.status().await.unwrap();
    kill(Pid::from_raw(running.0.id() as i32), Signal::SIGINT).unwrap();
    let status = wait_exit(&mut running, Duration::from_secs(60));
    assert!(status.success(), "exit status {status}");
}

#[test]
fn bad_flags_fail_with_one_clear_line() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_keystore-enclave"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--nsm", "mock"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--mock-pki"));

    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let out = run(&[
        "--nsm",
        "mock",
        "--mock-pki",
        pki.to_str().unwrap(),
        "--refresh-after",
        "5m",
        "--listen",
        "unix:///nonexistent-dir/x.sock",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refresh"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "announced an endpoint it does not serve"
    );
}
