//! The fault matrix (issue 15): each fault of `RELIABILITY.md` against the
//! real processes (the KMS emulator in the test, `keystore-enclave --nsm
//! mock` and `keystore-host proxy`), during a load and during steady
//! serving. For each case: the enclave keeps serving the last good set
//! whole (every name of it read back, none with a value of the new set),
//! `status` says what happened, and once the fault clears the new set is
//! served without anyone touching anything. Every wait is bounded
//! (`Stack::until`); no timing is asserted.
//!
//! Credentials expiring mid-load are tested in process in the enclave
//! crate (`enclave/tests/it/fault_matrix.rs`), where the credentials
//! service can hand out new ones on cue.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use keystore_shared::StatusReport;
use keystore_shared::protocol::DEFAULT_MAX_LOAD_FRAME;
use keystore_tests::kms::{Fault, MockKmsHandle, Operation};

use crate::support::emulator::Emulator;
use crate::support::stack::{KmsUpstream, Stack};

const ACCESS_KEY: &str = "AKIAFAULTMATRIX00001";
const SECRET_KEY: &str = "fault-matrix-secret-access-key";
/// The names of both sets: the old set's values start with `old-`, the
/// new set's with `new-`.
const NAMES: [&str; 3] = ["DB_PASSWORD", "API_TOKEN", "SIGNING_KEY"];

/// Bound on every wait for a status (as `Stack::until`'s).
const WAIT: Duration = Duration::from_secs(240);

/// Short breaker periods so an opened breaker probes again within a
/// second; a low threshold so a faulty load opens it.
const BREAKER: [&str; 6] = [
    "--breaker-threshold",
    "2",
    "--breaker-initial-open",
    "200ms",
    "--breaker-max-open",
    "1s",
];

/// Emulator, enclave and daemon, with the old and the new set sealed.
struct Matrix {
    _dir: tempfile::TempDir,
    kms: MockKmsHandle,
    upstream: KmsUpstream,
    stack: Stack,
    old: Vec<(String, String)>,
    new: Vec<(String, String)>,
}

impl Matrix {
    /// Starts everything with `enclave` flags (after [`BREAKER`]) and waits
    /// until the old set is served.
    async fn start(enclave: &[&str]) -> Matrix {
        let dir = tempfile::tempdir().unwrap();
        let emulator = Emulator::start(dir.path(), (ACCESS_KEY, SECRET_KEY)).await;
        let old = sealed_set(&emulator, "old").await;
        let new = sealed_set(&emulator, "new").await;
        let upstream = emulator.upstream();
        let mut m = Matrix {
            stack: Stack::new(dir.path()),
            _dir: dir,
            kms: emulator.kms,
            upstream,
            old,
            new,
        };
        m.write(&m.old.clone());
        m.start_enclave(enclave);
        m.start_proxy();
        m.wait_for_set("old").await;
        m
    }

    fn start_enclave(&mut self, extra: &[&str]) {
        let flags: Vec<&str> = BREAKER.iter().chain(extra).copied().collect();
        self.stack.start_enclave_with(&self.upstream, &flags);
    }

    fn start_proxy(&mut self) {
        let secrets = self.stack.path("secrets.env");
        self.stack.start_proxy(
            self.upstream.port,
            secrets.to_str().unwrap(),
            &["--secrets-poll", "1", "--enclave-check", "1"],
            (ACCESS_KEY, SECRET_KEY),
        );
    }

    /// Replaces the secrets file (atomically, as an editor or deploy does).
    fn write(&self, entries: &[(String, String)]) {
        let text: String = entries
            .iter()
            .map(|(name, envelope)| format!("{name}={envelope}\n"))
            .collect();
        self.write_raw(text.as_bytes());
    }

    fn write_raw(&self, bytes: &[u8]) {
        let tmp = self.stack.path("secrets.env.tmp");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(tmp, self.stack.path("secrets.env")).unwrap();
    }

    async fn status(&self) -> StatusReport {
        match self.stack.status().await {
            Some(status) => status,
            None => panic!("the enclave did not answer Status\n{}", self.stack.logs()),
        }
    }

    /// Waits until every name is served with its `prefix` (`old`/`new`)
    /// value.
    async fn wait_for_set(&self, prefix: &str) {
        for name in NAMES {
            let want = format!("{prefix}-{}", name.to_lowercase());
            self.stack.wait_for_value(name, &want).await;
        }
        // Read once more: the whole set, not a set that changed under us.
        self.assert_set(prefix).await;
    }

    /// Every name is served with its `prefix` value: a whole set, never a
    /// mix.
    async fn assert_set(&self, prefix: &str) {
        let mut got = Vec::new();
        for name in NAMES {
            got.push(self.stack.get(name).await);
        }
        let want: Vec<Option<String>> = NAMES
            .iter()
            .map(|name| Some(format!("{prefix}-{}", name.to_lowercase())))
            .collect();
        assert_eq!(
            got,
            want,
            "not the whole {prefix} set\n{}",
            self.stack.logs()
        );
    }

    /// Waits until `status` satisfies `check`; returns that status.
    async fn wait_status(&self, what: &str, check: impl Fn(&StatusReport) -> bool) -> StatusReport {
        let deadline = Instant::now() + WAIT;
        loop {
            let seen = self.stack.status().await;
            if let Some(status) = seen.as_ref().filter(|s| check(s)) {
                return status.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status {seen:?}\n{}",
                self.stack.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the enclave's last error contains `needle` with the
    /// breaker in `breaker` state (any state if `None`).
    async fn wait_error(&self, needle: &str, breaker: Option<&str>) -> StatusReport {
        self.wait_status(&format!("last_error with {needle:?}"), |s| {
            s.last_error.as_deref().is_some_and(|e| e.contains(needle))
                && breaker.is_none_or(|want| breaker_state(s) == want)
        })
        .await
    }

    /// Waits until the enclave reports no error and a closed breaker.
    async fn wait_healthy(&self) -> StatusReport {
        self.wait_status("no last_error and a closed breaker", |s| {
            s.ready && s.last_error.is_none() && breaker_state(s) == "closed"
        })
        .await
    }
}

/// Every name sealed with its `prefix` (`old`/`new`) value.
async fn sealed_set(emulator: &Emulator, prefix: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for name in NAMES {
        let value = format!("{prefix}-{}", name.to_lowercase());
        out.push((name.to_owned(), emulator.seal(name, &value).await));
    }
    out
}

/// Successful `Decrypt` calls the enclave counted.
fn decrypts_ok(status: &StatusReport) -> u64 {
    status.kms.as_ref().map_or(0, |kms| {
        kms.calls
            .iter()
            .filter(|c| c.operation == "Decrypt" && c.outcome == "ok")
            .map(|c| c.count)
            .sum()
    })
}

fn breaker_state(status: &StatusReport) -> &str {
    status.breaker.as_ref().map_or("", |b| b.state.as_str())
}

/// A KMS fault applied to every `Decrypt` until cleared.
fn every_decrypt(fault: Fault) -> Fault {
    fault.fraction(1.0).on(Operation::Decrypt)
}

/// A KMS fault during a load: the new file's load fails (the breaker
/// opens), the old set is served whole and `status` names `cause`; once
/// KMS heals, the daemon's retry loads the new set by itself.
async fn kms_fault_during_load(fault: Fault, cause: &str) {
    let m = Matrix::start(&[]).await;
    let before = m.wait_healthy().await;
    assert!(m.kms.inject(every_decrypt(fault)));
    m.write(&m.new);
    let faulted = m.wait_error(cause, Some("open")).await;
    m.assert_set("old").await;
    assert!(faulted.ready, "{faulted:?}");
    assert_eq!(faulted.secret_count, 3);
    assert_eq!(
        faulted.last_good_load_unix_ms, before.last_good_load_unix_ms,
        "no load succeeded"
    );
    assert!(faulted.breaker.as_ref().unwrap().opened >= 1);
    // Still serving the old set whole after a few more failed retries.
    m.stack
        .until("more faulted Decrypt calls", || async {
            m.kms.calls(Operation::Decrypt).faulted >= 3
        })
        .await;
    m.assert_set("old").await;

    m.kms.clear_faults();
    m.wait_for_set("new").await;
    let healed = m.wait_healthy().await;
    assert!(healed.last_good_load_unix_ms > before.last_good_load_unix_ms);
}

/// A KMS fault while serving: the periodic re-decrypt of the loaded set
/// fails, the set is served whole, `status` names `cause`; once KMS heals
/// a re-decrypt succeeds and a new file loads, unaided.
async fn kms_fault_while_serving(fault: Fault, cause: &str) {
    let m = Matrix::start(&["--reload-every", "1s"]).await;
    let before = m.wait_healthy().await;
    assert!(m.kms.inject(every_decrypt(fault)));
    let faulted = m.wait_error(cause, Some("open")).await;
    m.assert_set("old").await;
    assert!(faulted.ready && faulted.secret_count == 3, "{faulted:?}");
    assert_eq!(
        faulted.last_good_load_unix_ms,
        before.last_good_load_unix_ms
    );
    assert!(faulted.last_decrypt_age_ms.is_some());

    let at_clear = m.kms.calls(Operation::Decrypt);
    m.kms.clear_faults();
    // Healthy again only after a re-decrypt succeeded (it clears
    // `last_error`), and that one reached KMS unfaulted.
    m.wait_healthy().await;
    let after = m.kms.calls(Operation::Decrypt);
    assert!(
        after.calls - after.errors > at_clear.calls - at_clear.errors,
        "a re-decrypt succeeded at KMS: {at_clear:?} then {after:?}"
    );
    m.assert_set("old").await;
    m.write(&m.new);
    m.wait_for_set("new").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_5xx_during_a_load() {
    kms_fault_during_load(Fault::internal_error(), "KMSInternalException").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_5xx_while_serving() {
    kms_fault_while_serving(Fault::internal_error(), "KMSInternalException").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_throttling_during_a_load() {
    kms_fault_during_load(Fault::throttle(), "ThrottlingException").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_throttling_while_serving() {
    kms_fault_while_serving(Fault::throttle(), "ThrottlingException").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_dropped_connections_during_a_load() {
    kms_fault_during_load(Fault::drop_connection(), DROPPED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_dropped_connections_while_serving() {
    kms_fault_while_serving(Fault::drop_connection(), DROPPED).await;
}

/// How the enclave names a connection KMS closed without answering.
const DROPPED: &str = "connection";

/// 3 s of added latency on every `Decrypt`: below every bound, so nothing
/// fails; the old set is served while the slow load is in flight, and the
/// new set when it lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_latency_3s_during_a_load() {
    let m = Matrix::start(&[]).await;
    let before = m.wait_healthy().await;
    let calls = m.kms.calls(Operation::Decrypt).calls;
    assert!(
        m.kms
            .inject(every_decrypt(Fault::latency(Duration::from_secs(3))))
    );
    m.write(&m.new);
    // A Decrypt of the new file has reached KMS (counted on arrival, then
    // held for 3 s): reads meanwhile get the old set, whole.
    m.stack
        .until("a slow Decrypt in flight", || async {
            m.kms.calls(Operation::Decrypt).calls > calls
        })
        .await;
    let during = m.status().await;
    assert_eq!(during.last_good_load_unix_ms, before.last_good_load_unix_ms);
    m.assert_set("old").await;
    m.wait_for_set("new").await;
    let after = m.wait_healthy().await;
    assert!(after.last_good_load_unix_ms > before.last_good_load_unix_ms);
    m.kms.clear_faults();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_latency_3s_while_serving() {
    let m = Matrix::start(&["--reload-every", "1s"]).await;
    m.wait_healthy().await;
    let calls = m.kms.calls(Operation::Decrypt).calls;
    assert!(
        m.kms
            .inject(every_decrypt(Fault::latency(Duration::from_secs(3))))
    );
    m.stack
        .until("a slow re-decrypt in flight", || async {
            m.kms.calls(Operation::Decrypt).calls > calls
        })
        .await;
    let in_flight = m.status().await;
    m.assert_set("old").await;
    // Slow re-decrypts complete: the enclave counts a successful Decrypt
    // (counted when the answer arrives), and no error.
    let after = m
        .wait_status("a slow re-decrypt completed", |s| {
            decrypts_ok(s) > decrypts_ok(&in_flight)
        })
        .await;
    assert!(after.last_error.is_none(), "{after:?}");
    m.assert_set("old").await;
    m.kms.clear_faults();
    m.write(&m.new);
    m.wait_for_set("new").await;
}

/// The daemon is SIGKILLed: the enclave keeps serving (and says it is
/// ready) without it; the file changes meanwhile; the restarted daemon
/// loads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_killed_and_restarted() {
    let mut m = Matrix::start(&[]).await;
    let before = m.wait_healthy().await;
    m.stack.proxy.as_mut().unwrap().kill();
    m.write(&m.new);
    m.assert_set("old").await;
    let alone = m.status().await;
    assert!(alone.ready && alone.secret_count == 3, "{alone:?}");
    assert_eq!(alone.last_good_load_unix_ms, before.last_good_load_unix_ms);
    m.start_proxy();
    m.wait_for_set("new").await;
    let after = m.wait_healthy().await;
    assert!(after.last_good_load_unix_ms > before.last_good_load_unix_ms);
}

/// The enclave is SIGKILLed and started again (empty, new keys): the
/// running daemon notices it holds nothing and loads it again unaided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enclave_killed_and_restarted() {
    let mut m = Matrix::start(&[]).await;
    m.wait_healthy().await;
    m.stack.enclave.as_mut().unwrap().kill();
    assert!(m.stack.status().await.is_none(), "the enclave is gone");
    m.start_enclave(&[]);
    m.wait_for_set("old").await;
    // Reloaded by the daemon's enclave check (--enclave-check 1), not by a
    // file change.
    m.stack
        .wait_for_proxy_log(
            "the enclave holds no secrets (restarted?); loading again",
            0,
        )
        .await;
    let after = m.wait_healthy().await;
    assert_eq!(after.secret_count, 3);
    assert!(after.last_good_load_unix_ms.is_some());
    m.write(&m.new);
    m.wait_for_set("new").await;
}

/// KMS's clock runs 10 minutes ahead: every attestation document,
/// however fresh, is older than KMS's 5-minute limit. The load fails
/// (the enclave regenerates its pair once, to no avail), the old set
/// stays; once the clocks agree the daemon's retry loads the new set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attestation_document_older_than_5_minutes() {
    let m = Matrix::start(&[]).await;
    let before = m.wait_healthy().await;
    m.kms.advance_clock(Duration::from_secs(600));
    m.write(&m.new);
    let faulted = m.wait_error("attestation", None).await;
    m.assert_set("old").await;
    assert!(faulted.ready, "{faulted:?}");
    assert_eq!(
        faulted.last_good_load_unix_ms,
        before.last_good_load_unix_ms
    );
    // A refusal is an answer: the breaker stays closed.
    assert_eq!(breaker_state(&faulted), "closed");
    m.kms.reset_clock();
    m.wait_for_set("new").await;
    m.wait_healthy().await;
}

/// One value of the new file does not decrypt: the whole load is refused
/// naming it, the old set is served whole (never the two good new values
/// beside an old one); the fixed file loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_with_one_corrupt_value() {
    let m = Matrix::start(&[]).await;
    let before = m.wait_healthy().await;
    let mut corrupt = m.new.clone();
    // The second value's envelope under the first's name: well-formed,
    // but KMS refuses it (the name is bound into the ciphertext).
    corrupt[1].1 = m.new[0].1.clone();
    m.write(&corrupt);
    let faulted = m.wait_error("API_TOKEN", None).await;
    assert!(
        faulted
            .last_error
            .as_deref()
            .unwrap()
            .contains("InvalidCiphertextException"),
        "{faulted:?}"
    );
    m.assert_set("old").await;
    assert_eq!(
        faulted.last_good_load_unix_ms,
        before.last_good_load_unix_ms
    );
    assert_eq!(breaker_state(&faulted), "closed");
    m.write(&m.new);
    m.wait_for_set("new").await;
    m.wait_healthy().await;
}

/// A `Load` frame announcing more than the 16 MiB limit, sent to the load
/// port by a privileged peer: refused before it is read, the connection
/// closed; the set is untouched and the next good load lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_over_the_frame_limit() {
    let m = Matrix::start(&[]).await;
    let before = m.wait_healthy().await;
    let path = m.stack.path("load.sock");
    let answer = tokio::task::spawn_blocking(move || {
        let mut socket = std::os::unix::net::UnixStream::connect(path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let len = u32::try_from(DEFAULT_MAX_LOAD_FRAME + 1).unwrap();
        socket.write_all(&len.to_be_bytes()).unwrap();
        // Some of the body; the enclave may stop reading at any point.
        let _ = socket.write_all(&vec![b'{'; 64 * 1024]);
        let mut answer = Vec::new();
        let _ = socket.read_to_end(&mut answer);
        answer
    })
    .await
    .unwrap();
    // Either an error frame naming the size or a bare close; never more.
    let text = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || text.contains("exceeds the limit"),
        "unexpected answer: {text}"
    );
    m.assert_set("old").await;
    let after = m.status().await;
    assert_eq!(after.last_good_load_unix_ms, before.last_good_load_unix_ms);
    assert!(
        m.stack
            .enclave
            .as_ref()
            .unwrap()
            .log()
            .contains("request frame too large"),
        "{}",
        m.stack.logs()
    );
    m.write(&m.new);
    m.wait_for_set("new").await;
}

/// The secrets file replaced by garbage: the daemon cannot parse it, sends
/// nothing, and says so in its log; the enclave's set and status are
/// untouched; the good file put back loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secrets_file_replaced_by_garbage() {
    let m = Matrix::start(&[]).await;
    let before = m.wait_healthy().await;
    let failures = m
        .stack
        .proxy_log_count("loading secrets failed; the enclave keeps its previous set");
    m.write_raw(b"\x00\xff garbage, not KEY=VALUE\n=\n\xc3\x28");
    m.stack
        .wait_for_proxy_log(
            "loading secrets failed; the enclave keeps its previous set",
            failures,
        )
        .await;
    m.assert_set("old").await;
    let after = m.status().await;
    assert!(after.last_error.is_none(), "nothing reached the enclave");
    assert_eq!(after.last_good_load_unix_ms, before.last_good_load_unix_ms);
    m.write(&m.new);
    m.wait_for_set("new").await;
}
