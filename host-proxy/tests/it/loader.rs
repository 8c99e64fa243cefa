//! The secrets loader against a fake enclave that records `Load` frames.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keystore_host::proxy::loader::{Loader, LoaderConfig, send_load};
use keystore_host::secrets_file::{self, Format};
use keystore_shared::endpoint::{Endpoint, Listener};
use keystore_shared::envelope::Envelope;
use keystore_shared::frame::{Connection, FrameLimits};
use keystore_shared::protocol::{
    DEFAULT_MAX_LOAD_FRAME, ErrorCode, LoadEntry, Request, RequestOp, Response, ResponseBody,
};

const WAIT: Duration = Duration::from_secs(20);

/// Records every `Load`; refuses the first `fail_first` with `Unavailable`.
#[derive(Clone, Default)]
struct FakeEnclave {
    loads: Arc<Mutex<Vec<Vec<LoadEntry>>>>,
    fail_first: Arc<AtomicUsize>,
}

impl FakeEnclave {
    fn serve(&self, listener: Listener) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let this = this.clone();
                tokio::spawn(async move {
                    let mut conn = Connection::with_limits(
                        stream,
                        FrameLimits::new(DEFAULT_MAX_LOAD_FRAME, 64 * 1024),
                    );
                    while let Ok(Some(request)) = conn.read_message::<Request>().await {
                        let RequestOp::Load { entries } = request.op else {
                            panic!("the loader sent {:?}", request.op.kind());
                        };
                        let count = entries.len() as u64;
                        this.loads.lock().unwrap().push(entries);
                        let refuse = this
                            .fail_first
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                        let response = if refuse {
                            Response::error(request.id, ErrorCode::Unavailable, "KMS unreachable")
                        } else {
                            Response::new(request.id, ResponseBody::Loaded { count })
                        };
                        if conn.write_message(&response).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }

    fn loads(&self) -> Vec<Vec<LoadEntry>> {
        self.loads.lock().unwrap().clone()
    }

    async fn wait_for_loads(&self, n: usize) -> Vec<Vec<LoadEntry>> {
        tokio::time::timeout(WAIT, async {
            loop {
                let loads = self.loads();
                if loads.len() >= n {
                    return loads;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("expected {n} loads, got {}", self.loads().len()))
    }
}

fn envelope(byte: u8) -> String {
    Envelope::kms(vec![byte; 40]).unwrap().to_string()
}

fn fast(path: &Path, enclave: Endpoint) -> LoaderConfig {
    LoaderConfig {
        poll_interval: Duration::from_millis(50),
        attempt_timeout: Duration::from_secs(5),
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..LoaderConfig::new(path.to_owned(), enclave)
    }
}

fn entry(name: &str, envelope: &str) -> LoadEntry {
    LoadEntry {
        name: name.into(),
        envelope: envelope.into(),
    }
}

async fn enclave() -> (FakeEnclave, Endpoint) {
    let listener = Endpoint::tcp("127.0.0.1", 0).bind().await.unwrap();
    let at = listener.local_endpoint().clone();
    let fake = FakeEnclave::default();
    fake.serve(listener);
    (fake, at)
}

#[tokio::test]
async fn sends_only_encrypted_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".env");
    let (a, b) = (envelope(1), envelope(2));
    std::fs::write(
        &path,
        format!("# app\nLOG_LEVEL=debug\nDB_PASSWORD={a}\nexport PORT=8080\nAPI_KEY=\"{b}\"\n"),
    )
    .unwrap();
    let (fake, at) = enclave().await;
    tokio::spawn(Loader::new(fast(&path, at)).run(std::future::pending()));
    let loads = fake.wait_for_loads(1).await;
    assert_eq!(loads[0], [entry("DB_PASSWORD", &a), entry("API_KEY", &b)]);
}

#[tokio::test]
async fn retries_until_the_enclave_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".env");
    std::fs::write(&path, format!("S={}\n", envelope(3))).unwrap();

    // No enclave listening yet: connection refused, then it refuses twice.
    let listener = Endpoint::tcp("127.0.0.1", 0).bind().await.unwrap();
    let at = listener.local_endpoint().clone();
    drop(listener);
    tokio::spawn(Loader::new(fast(&path, at.clone())).run(std::future::pending()));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let fake = FakeEnclave::default();
    fake.fail_first.store(2, Ordering::SeqCst);
    fake.serve(at.bind().await.unwrap());
    let loads = fake.wait_for_loads(3).await;
    assert!(loads.iter().all(|l| l == &[entry("S", &envelope(3))]));
    // Accepted: no more loads while the file is unchanged.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.loads().len(), 3);
}

#[tokio::test]
async fn reloads_when_the_file_changes_or_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".env");
    std::fs::write(&path, format!("S={}\n", envelope(4))).unwrap();
    let (fake, at) = enclave().await;
    let loader = Loader::new(fast(&path, at));
    let trigger = loader.trigger();
    tokio::spawn(loader.run(std::future::pending()));
    fake.wait_for_loads(1).await;

    // Same content rewritten (new mtime): hashed, found equal, not resent.
    std::fs::write(&path, format!("S={}\n", envelope(4))).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.loads().len(), 1);

    // New content: reloaded.
    std::fs::write(&path, format!("S={}\nT={}\n", envelope(5), envelope(6))).unwrap();
    let loads = fake.wait_for_loads(2).await;
    assert_eq!(
        loads[1],
        [entry("S", &envelope(5)), entry("T", &envelope(6))]
    );

    // An explicit reload resends the unchanged file.
    trigger.reload();
    let loads = fake.wait_for_loads(3).await;
    assert_eq!(loads[2], loads[1]);
}

#[tokio::test]
async fn a_broken_file_is_not_sent_and_a_fixed_one_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".env");
    std::fs::write(&path, format!("S={}\n", envelope(7))).unwrap();
    let (fake, at) = enclave().await;
    tokio::spawn(Loader::new(fast(&path, at)).run(std::future::pending()));
    fake.wait_for_loads(1).await;

    // An unreadable envelope: nothing is sent, the enclave keeps its set.
    std::fs::write(&path, "S=ENC[v1:kms:not base64!]\n").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.loads().len(), 1);

    std::fs::write(&path, format!("S={}\n", envelope(8))).unwrap();
    let loads = fake.wait_for_loads(2).await;
    assert_eq!(loads[1], [entry("S", &envelope(8))]);
}

#[tokio::test]
async fn entry_errors_name_the_line_and_refusals_are_reported() {
    let err = secrets_file::entries(b"A=plain\nB=ENC[v1:kms:hunter2!]\n", Format::Env)
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 2 (B)"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");

    let (fake, at) = enclave().await;
    fake.fail_first.store(1, Ordering::SeqCst);
    let err = send_load(&at, vec![entry("S", &envelope(9))], WAIT)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("Unavailable: KMS unreachable"), "{err}");
    assert_eq!(send_load(&at, vec![], WAIT).await.unwrap(), 0);
}
