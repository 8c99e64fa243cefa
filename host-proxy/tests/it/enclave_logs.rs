//! The enclave's log relayed through the daemon (issue 16): the real
//! `keystore-enclave` (stderr at `--log-level warn`, so its info events
//! exist only in its ring) and `keystore-host proxy` as programs. The
//! daemon's log, in text and then in JSON, carries the enclave's events
//! with their level, target and stable fields; a daemon restarted between
//! the two relays only what the first had not, and nothing is lost: the
//! sequence numbers relayed by both are 1..=N, each once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keystore_shared::{Client, Endpoint, ErrorCode};

use crate::support::common::enclave_binary;

/// A child process killed when dropped, its stderr in a file.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits for the exit (a graceful stop).
    fn terminate(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(self.child.try_wait(), Ok(None)) {
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn unix(dir: &Path, name: &str) -> String {
    format!("unix://{}", dir.join(name).display())
}

fn start_enclave(dir: &Path) -> Proc {
    let log = dir.join("enclave.log");
    let child = Command::new(enclave_binary())
        .args(["--nsm", "mock", "--recipient-bits", "2048"])
        .arg("--mock-pki")
        .arg(dir.join("pki"))
        .args(["--listen", &unix(dir, "enclave.sock")])
        .args(["--load-listen", &unix(dir, "load.sock")])
        .args(["--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Proc { child, log }
}

fn start_daemon(dir: &Path, format: &str, name: &str) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let forward = format!("{}=127.0.0.1:9", unix(dir, &format!("{name}-kms.sock")));
    let child = Command::new(env!("CARGO_BIN_EXE_keystore-host"))
        .args(["--log-format", format])
        .args([
            "proxy",
            "--forward",
            &forward,
            "--no-agent",
            "--no-audit-log",
        ])
        // Not the machine's 9273: tests run in parallel.
        .args(["--metrics-listen", "tcp://127.0.0.1:0"])
        .args([
            "--credentials-listen",
            &unix(dir, &format!("{name}-credentials.sock")),
        ])
        .args(["--load-to", &unix(dir, "load.sock")])
        .args(["--enclave-log-poll", "1"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("AWS_ACCESS_KEY_ID", "AKIALOGRELAYTEST0001")
        .env("AWS_SECRET_ACCESS_KEY", "log-relay-secret")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Proc { child, log }
}

/// Waits (bounded) until `check` holds, or fails with the logs.
async fn until(what: &str, procs: &[&Proc], mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !check() {
        if Instant::now() > deadline {
            let logs: Vec<String> = procs.iter().map(|p| p.log()).collect();
            panic!("timed out waiting for {what}\n{}", logs.join("\n-----\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A request the enclave logs at info (a `List`: empty; a `Get`: not
/// ready, nothing is loaded).
async fn logged_request(dir: &Path, list: bool) {
    let endpoint: Endpoint = unix(dir, "enclave.sock").parse().unwrap();
    let mut client = Client::connect(&endpoint).await.unwrap();
    if list {
        assert!(client.list().await.unwrap().is_empty());
    } else {
        let err = client.get("db/password").await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::NotReady), "{err}");
    }
}

/// `name=value` of a text log line (value up to the next space).
fn text_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {name}="))?;
    let rest = &line[at + name.len() + 2..];
    Some(rest.split(' ').next().unwrap_or(rest))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_relays_the_enclaves_log_in_text_and_json_without_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let enclave = start_enclave(dir);

    // Text: the enclave's `ready` (INFO, never on its stderr here) and its
    // mock-NSM warning (WARN) arrive with their level and target.
    let mut text = start_daemon(dir, "text", "text-daemon");
    until("`ready` relayed in text", &[&enclave, &text], || {
        text.log().lines().any(|l| l.contains(": ready "))
    })
    .await;
    assert!(!enclave.log().contains(": ready "), "{}", enclave.log());
    logged_request(dir, false).await;
    until("the Get relayed in text", &[&enclave, &text], || {
        text.log().contains("op=get")
    })
    .await;
    text.terminate();
    let text_log = text.log();
    let relayed: Vec<&str> = text_log
        .lines()
        .filter(|l| l.contains("source=\"enclave\""))
        .collect();
    let ready = relayed
        .iter()
        .find(|l| l.contains(": ready "))
        .unwrap_or_else(|| panic!("{text_log}"));
    assert!(ready.contains(" INFO keystore_enclave: "), "{ready}");
    assert!(
        ready.contains("enclave_target=\"keystore_enclave::enclave\""),
        "{ready}"
    );
    assert!(text_field(ready, "enclave_ts").is_some(), "{ready}");
    let warn = relayed
        .iter()
        .find(|l| l.contains("MOCK NSM"))
        .unwrap_or_else(|| panic!("{text_log}"));
    assert!(warn.contains(" WARN keystore_enclave: "), "{warn}");
    assert!(
        warn.contains("enclave_target=\"keystore_enclave\""),
        "{warn}"
    );
    for line in &relayed {
        assert!(!line.contains('\u{1b}'), "ANSI escape in {line:?}");
    }
    let mut seqs: BTreeMap<u64, usize> = BTreeMap::new();
    for line in &relayed {
        let seq = text_field(line, "enclave_seq").unwrap_or_else(|| panic!("{line}"));
        *seqs.entry(seq.parse().unwrap()).or_default() += 1;
    }

    // While no daemon runs, the enclave logs on; the next daemon (JSON)
    // relays that, and nothing the first one relayed.
    logged_request(dir, true).await;
    let json = start_daemon(dir, "json", "json-daemon");
    until("the List relayed in JSON", &[&enclave, &json], || {
        json.log().contains("op=list")
    })
    .await;
    let json_log = json.log();
    let mut json_relayed = 0;
    for line in json_log.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        let fields = &value["fields"];
        if fields["source"] != "enclave" {
            continue;
        }
        json_relayed += 1;
        assert_eq!(value["target"], "keystore_enclave", "{line}");
        for field in ["message", "enclave_target", "enclave_ts", "enclave_run"] {
            assert!(fields[field].is_string(), "{field} missing in {line}");
        }
        assert!(fields["enclave_fields"].is_string(), "{line}");
        let seq = fields["enclave_seq"].as_u64().unwrap();
        *seqs.entry(seq).or_default() += 1;
        if fields["enclave_fields"]
            .as_str()
            .unwrap()
            .contains("op=list")
        {
            assert_eq!(value["level"], "INFO", "{line}");
            assert_eq!(fields["enclave_target"], "keystore_enclave::server");
        }
        assert_ne!(fields["message"], "ready", "relayed twice: {line}");
    }
    assert!(json_relayed > 0, "{json_log}");
    // Nothing twice, nothing lost: every sequence number up to the newest
    // was relayed exactly once by one daemon or the other.
    let max = *seqs.keys().last().unwrap();
    let expected: Vec<u64> = (1..=max).collect();
    assert_eq!(
        seqs.keys().copied().collect::<Vec<_>>(),
        expected,
        "{seqs:?}"
    );
    assert!(seqs.values().all(|n| *n == 1), "relayed twice: {seqs:?}");
}
