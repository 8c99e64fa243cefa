//! The attested KMS path with real processes: `keystore-enclave --nsm mock`
//! and `keystore-host proxy` run as programs, wired over unix sockets; the
//! KMS emulator runs in the test so it can count calls, inject faults and
//! move its clock.

// Helpers outside `#[test]` functions panic on purpose: this is a test file.
#![allow(clippy::unwrap_used)]

use crate::support::common as support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_kms::config::Credentials;
use aws_sdk_kms::primitives::Blob;
use keystore_host::policy::{Measurements, PolicySpec, key_policy};
use keystore_shared::envelope::{Envelope, NAME_CONTEXT_KEY};
use keystore_shared::{Client, Endpoint, StatusReport};
use keystore_tests::kms::{Credential, Fault, MockKms, MockKmsConfig, MockKmsHandle, Operation};
use sha2::{Digest, Sha384};
use support::enclave_binary;

const ACCESS_KEY: &str = "AKIAE2ETESTE2ETEST01";
const SECRET_KEY: &str = "e2e-secret-access-key";
const REGION: &str = "us-east-1";
/// The rotation principal (`keystore-host policy --rotator`) of the pinned
/// keys: may Decrypt without attestation, for `rotate`/`decrypt`.
const ROTATOR_KEY: &str = "AKIAE2EROTATOR000001";
const ROTATOR_SECRET: &str = "e2e-rotator-secret";

/// A child process killed when dropped, its stderr kept in a file.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Everything one test runs: emulator, enclave, proxy and their sockets.
struct Stack {
    dir: tempfile::TempDir,
    kms: MockKmsHandle,
    enclave_bin: PathBuf,
    enclave: Option<Running>,
    proxy: Option<Running>,
    pcr0: Vec<u8>,
    /// The ARN of the key the enclave pins, whose policy allows our PCR0.
    key_id: String,
    /// Pinned too, but its policy allows another PCR0 only.
    elsewhere: String,
    client: aws_sdk_kms::Client,
}

impl Stack {
    async fn start() -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let enclave_bin = enclave_binary();
        let pcr0 = Sha384::digest(std::fs::read(&enclave_bin).unwrap()).to_vec();
        // The emulator starts first; the mock NSM's root appears later and
        // is read on the first Recipient.
        let kms = MockKms::start(
            MockKmsConfig::new(
                dir.path().join("kms-tls"),
                vec![
                    Credential::new(ACCESS_KEY, SECRET_KEY),
                    Credential::new(ROTATOR_KEY, ROTATOR_SECRET),
                ],
            )
            .with_attestation_root(dir.path().join("pki/root.pem")),
        )
        .await
        .unwrap();
        let ca = std::fs::read(kms.ca_pem_path()).unwrap();
        let sdk = keystore_host::aws::sdk_config(
            Some(REGION.into()),
            Some(kms.endpoint_url().into()),
            Some(ca),
        )
        .await
        .unwrap();
        let config = aws_sdk_kms::config::Builder::from(&sdk)
            .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "e2e"))
            .build();
        let client = aws_sdk_kms::Client::from_conf(config);
        let mut stack = Stack {
            dir,
            kms,
            enclave_bin,
            enclave: None,
            proxy: None,
            key_id: String::new(),
            elsewhere: String::new(),
            pcr0,
            client,
        };
        stack.key_id = stack.key_pinned_to(&stack.pcr0.clone());
        stack.elsewhere = stack.key_pinned_to(&[0x11; 48]);
        stack
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn unix(&self, name: &str) -> String {
        format!("unix://{}", self.path(name).display())
    }

    /// The ARN of a key whose policy (written by `keystore-host policy`'s
    /// library) lets only an enclave with this PCR0 decrypt.
    fn key_pinned_to(&self, pcr0: &[u8]) -> String {
        let hex = hex::encode(pcr0);
        let json = format!(r#"{{"PCR0":"{hex}","PCR1":"{hex}","PCR2":"{hex}"}}"#);
        let spec = PolicySpec {
            current: Some(Measurements::from_json(&json).unwrap()),
            enclave_principals: vec!["arn:aws:iam::111122223333:role/parent".into()],
            admin_principals: vec!["arn:aws:iam::111122223333:role/admin".into()],
            encrypt_principals: vec!["arn:aws:iam::111122223333:role/operator".into()],
            rotator_principals: vec![format!("arn:aws:iam::111122223333:user/{ROTATOR_KEY}")],
            ..PolicySpec::default()
        };
        let policy = key_policy(&spec).unwrap().to_string();
        self.kms.create_key(Some(&policy)).unwrap().arn
    }

    async fn encrypt(&self, key_id: &str, name: &str, value: &str) -> String {
        let out = self
            .client
            .encrypt()
            .key_id(key_id)
            .plaintext(Blob::new(value.as_bytes().to_vec()))
            .encryption_context(NAME_CONTEXT_KEY, name)
            .send()
            .await
            .unwrap();
        let blob = out.ciphertext_blob().unwrap().as_ref().to_vec();
        Envelope::kms(blob).unwrap().to_string()
    }

    /// Writes the secrets file: `# comment`, plain values and ENC values.
    fn write_secrets(&self, lines: &[String]) {
        let text = format!("# e2e secrets\nPLAIN=visible\n{}\n", lines.join("\n"));
        let tmp = self.path("secrets.env.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, self.path("secrets.env")).unwrap();
    }

    fn start_enclave(&mut self) {
        self.start_enclave_trusting(true);
    }

    /// Starts the enclave; without the emulator's CA it trusts only the
    /// webpki roots, as a real enclave does.
    fn start_enclave_trusting(&mut self, emulator_ca: bool) {
        let log = self.path("enclave.log");
        let mut command = Command::new(&self.enclave_bin);
        if emulator_ca {
            command.arg("--kms-ca").arg(self.kms.ca_pem_path());
        }
        let child = command
            .args([
                "--nsm",
                "mock",
                "--recipient-bits",
                "2048",
                "--region",
                REGION,
            ])
            .args(["--kms-host", "localhost"])
            .args(["--kms-key-arn", &self.key_id])
            .args(["--kms-key-arn", &self.elsewhere])
            .arg("--mock-pki")
            .arg(self.path("pki"))
            .args(["--listen", &self.unix("enclave.sock")])
            .args(["--load-listen", &self.unix("load.sock")])
            .args(["--kms-proxy", &self.unix("kms.sock")])
            .args(["--credentials", &self.unix("credentials.sock")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.enclave = Some(Running { child, log });
    }

    fn start_proxy(&mut self) {
        self.start_proxy_with(ACCESS_KEY, SECRET_KEY);
    }

    /// Starts the proxy with these AWS credentials in its environment (the
    /// start of its credential chain).
    fn start_proxy_with(&mut self, access_key: &str, secret_key: &str) {
        let log = self.path("proxy.log");
        let forward = format!(
            "{}=127.0.0.1:{}",
            self.unix("kms.sock"),
            self.kms.local_addr().port()
        );
        let child = Command::new(env!("CARGO_BIN_EXE_keystore-host"))
            .args(["proxy", "--region", REGION, "--forward", &forward])
            // These tests read the enclave directly; the agent has its own.
            .arg("--no-agent")
            // Not the machine's 9273: tests run in parallel.
            .args(["--metrics-listen", "tcp://127.0.0.1:0"])
            .args(["--credentials-listen", &self.unix("credentials.sock")])
            .args(["--load-to", &self.unix("load.sock")])
            .arg("--audit-log")
            .arg(self.path("audit.jsonl"))
            .arg("--secrets")
            .arg(self.path("secrets.env"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("AWS_ACCESS_KEY_ID", access_key)
            .env("AWS_SECRET_ACCESS_KEY", secret_key)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.proxy = Some(Running { child, log });
    }

    /// The proxy's `/metrics` URL, from its start-up log line.
    async fn metrics_url(&self) -> String {
        let mut url = None;
        self.until("the proxy's metrics endpoint in its log", || {
            let log = self.proxy.as_ref().map(Running::log).unwrap_or_default();
            url = crate::support::common::metrics_url_in(&log);
            std::future::ready(url.is_some())
        })
        .await;
        url.unwrap()
    }

    async fn status(&self) -> Option<StatusReport> {
        let endpoint: Endpoint = self.unix("enclave.sock").parse().unwrap();
        let mut client = Client::connect(&endpoint).await.ok()?;
        client.status().await.ok()
    }

    async fn get(&self, name: &str) -> Option<String> {
        let endpoint: Endpoint = self.unix("enclave.sock").parse().unwrap();
        let mut client = Client::connect(&endpoint).await.ok()?;
        let value = client.get(name).await.ok()?;
        Some(String::from_utf8(value.expose().to_vec()).unwrap())
    }

    /// Waits until `check` holds, or fails with both processes' logs.
    async fn until<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(240);
        while !check().await {
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}\n--- enclave log\n{}\n--- proxy log\n{}",
                    self.enclave.as_ref().map(Running::log).unwrap_or_default(),
                    self.proxy.as_ref().map(Running::log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_for_value(&self, name: &str, want: &str) {
        self.until(&format!("{name} = {want}"), || async {
            self.get(name).await.as_deref() == Some(want)
        })
        .await;
    }

    async fn wait_for_error(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let seen = self
                .status()
                .await
                .and_then(|s| s.last_error)
                .unwrap_or_default();
            if seen.contains(needle) {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "no load error containing {needle:?} (last: {seen:?})\n--- enclave log\n{}\n--- proxy log\n{}",
                self.enclave.as_ref().map(Running::log).unwrap_or_default(),
                self.proxy.as_ref().map(Running::log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn calls(kms: &MockKmsHandle) -> HashMap<&'static str, (u64, u64, u64)> {
    let d = kms.calls(Operation::Decrypt);
    HashMap::from([(
        "Decrypt",
        (d.calls, d.with_recipient, d.plaintext_responses),
    )])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_the_enclave_only_through_attested_decrypts() {
    let mut stack = Stack::start().await;
    let key = stack.key_id.clone();
    let db = stack.encrypt(&key, "DB_PASSWORD", "hunter2").await;
    stack.write_secrets(&[format!("DB_PASSWORD={db}")]);
    stack.start_enclave();
    stack.start_proxy();

    // Happy path: loaded through Decrypt + Recipient, never Plaintext.
    stack.wait_for_value("DB_PASSWORD", "hunter2").await;
    let (decrypts, with_recipient, plaintext) = calls(&stack.kms)["Decrypt"];
    assert!(decrypts >= 1);
    assert_eq!(
        with_recipient, decrypts,
        "every Decrypt carried a Recipient"
    );
    assert_eq!(plaintext, 0, "KMS never returned Plaintext");
    // Plain values are not sent to the enclave.
    assert_eq!(stack.status().await.unwrap().secret_count, 1);

    // The parent itself cannot decrypt: the policy needs an attested enclave.
    let blob = Envelope::parse(&db).unwrap();
    let err = stack
        .client
        .decrypt()
        .ciphertext_blob(Blob::new(blob.ciphertext().to_vec()))
        .encryption_context(NAME_CONTEXT_KEY, "DB_PASSWORD")
        .send()
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("AccessDeniedException"),
        "{err:?}"
    );

    // A value under a key the enclave does not pin, with the same policy
    // (the host's credentials may use it): KMS refuses it for the pinned
    // KeyId; the previous set keeps being served.
    let unpinned = stack.key_pinned_to(&stack.pcr0.clone());
    let forged = stack.encrypt(&unpinned, "DB_PASSWORD", "forged").await;
    stack.write_secrets(&[format!("DB_PASSWORD={forged}")]);
    let error = stack.wait_for_error("IncorrectKeyException").await;
    assert!(error.contains(&stack.key_id), "{error}");
    assert_eq!(stack.get("DB_PASSWORD").await.as_deref(), Some("hunter2"));

    // A value under a pinned key whose policy pins another PCR0: the load
    // fails, naming the policy and our PCR0; the previous set keeps being
    // served.
    let other = stack.elsewhere.clone();
    let pinned = stack.encrypt(&other, "ELSEWHERE", "nope").await;
    stack.write_secrets(&[format!("DB_PASSWORD={db}"), format!("ELSEWHERE={pinned}")]);
    let error = stack.wait_for_error("AccessDeniedException").await;
    assert!(
        error.contains(&format!("PCR0 = {}", hex::encode(&stack.pcr0))),
        "{error}"
    );
    assert_eq!(stack.get("DB_PASSWORD").await.as_deref(), Some("hunter2"));
    assert_eq!(stack.get("ELSEWHERE").await, None);

    // A stale document: move the emulator's clock so the current document
    // is just past KMS's 300 s limit while a fresh one is not. The enclave
    // regenerates its pair once and the load succeeds.
    let api = stack.encrypt(&key, "API_TOKEN", "tok-1").await;
    let age_ms = loop {
        let status = stack.status().await.unwrap();
        let age = status.document_age_ms.unwrap();
        if age >= 15_000 {
            break age;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let refreshes = stack.status().await.unwrap().refresh_count;
    stack
        .kms
        .advance_clock(Duration::from_millis(300_000 - age_ms + 5_000));
    stack.write_secrets(&[format!("DB_PASSWORD={db}"), format!("API_TOKEN={api}")]);
    stack.wait_for_value("API_TOKEN", "tok-1").await;
    assert!(stack.status().await.unwrap().refresh_count > refreshes);
    stack.kms.reset_clock();

    // Throttling and 5xx for the next calls: the load gets through after
    // bounded retries.
    stack.kms.reset_calls();
    assert!(
        stack
            .kms
            .inject(Fault::throttle().next(2).on(Operation::Decrypt))
    );
    assert!(
        stack
            .kms
            .inject(Fault::internal_error().next(1).on(Operation::Decrypt))
    );
    let api2 = stack.encrypt(&key, "API_TOKEN", "tok-2").await;
    stack.write_secrets(&[format!("DB_PASSWORD={db}"), format!("API_TOKEN={api2}")]);
    stack.wait_for_value("API_TOKEN", "tok-2").await;
    let d = stack.kms.calls(Operation::Decrypt);
    assert_eq!(d.faulted, 3, "{d:?}");
    assert!(d.calls <= 2 + 3 + 2, "retries are bounded: {d:?}");
    assert_eq!(d.plaintext_responses, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_counts_loads_forwarder_connections_and_relays_status() {
    let mut stack = Stack::start().await;
    let key = stack.key_id.clone();
    let db = stack.encrypt(&key, "DB_PASSWORD", "hunter2").await;
    stack.write_secrets(&[format!("DB_PASSWORD={db}")]);
    stack.start_enclave();
    stack.start_proxy();
    stack.wait_for_value("DB_PASSWORD", "hunter2").await;
    let url = stack.metrics_url().await;
    let mut samples = HashMap::new();
    let relayed = |samples: &HashMap<String, f64>| {
        samples.get("keystore_enclave_secrets_loaded{}") == Some(&1.0)
            && samples.get("keystore_loads_total{outcome=ok}") >= Some(&1.0)
    };
    stack
        .until("the load and the relayed Status in /metrics", || {
            let (status, text) = crate::metrics::scrape(&url);
            assert_eq!(status, 200, "{text}");
            samples = crate::metrics::parse(&text);
            std::future::ready(relayed(&samples))
        })
        .await;
    let get = |name: &str| samples.get(name).copied().unwrap_or(0.0);
    assert_eq!(get("keystore_enclave_ready{}"), 1.0);
    assert_eq!(get("keystore_enclave_up{}"), 1.0);
    // Every attempt is timed, failed ones too (the enclave may not have
    // been up for the first).
    let attempts: f64 = samples
        .iter()
        .filter(|(name, _)| name.starts_with("keystore_loads_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(get("keystore_load_duration_seconds_count{}"), attempts);
    // The enclave's Decrypt went through the forwarder.
    assert!(get("keystore_forwarder_connections_total{outcome=forwarded}") >= 1.0);
    // The enclave keeps its KMS connection open: it is counted open now.
    assert!(get("keystore_forwarder_open_connections{}") >= 1.0);
    assert!(get("keystore_enclave_document_age_seconds{}") >= 0.0);
    assert!(get("keystore_enclave_last_decrypt_age_seconds{}") >= 0.0);

    // Forwarded bytes are counted while the connection is still open: a
    // scrape in which no forwarded connection has ended yet (all counted
    // open) already shows the bytes of the Decrypt.
    stack
        .until("forwarder bytes while the connection is open", || {
            let (_, text) = crate::metrics::scrape(&url);
            samples = crate::metrics::parse(&text);
            let get = |name: &str| samples.get(name).copied().unwrap_or(0.0);
            let forwarded = get("keystore_forwarder_connections_total{outcome=forwarded}");
            std::future::ready(
                forwarded >= 1.0
                    && get("keystore_forwarder_open_connections{}") == forwarded
                    && get("keystore_forwarder_bytes_total{direction=to_upstream}") > 0.0
                    && get("keystore_forwarder_bytes_total{direction=to_enclave}") > 0.0,
            )
        })
        .await;
    // The relayed KMS, breaker, audit and log-relay counters move.
    stack
        .until(
            "KMS calls, audit drains and relayed logs in /metrics",
            || {
                let (_, text) = crate::metrics::scrape(&url);
                samples = crate::metrics::parse(&text);
                let get = |name: &str| samples.get(name).copied().unwrap_or(0.0);
                std::future::ready(
                    get("keystore_enclave_kms_calls_total{operation=Decrypt,outcome=ok}") >= 1.0
                        && get("keystore_audit_drains_total{outcome=ok}") >= 1.0
                        && get("keystore_enclave_log_reads_total{outcome=ok}") >= 1.0
                        && get("keystore_enclave_log_events_relayed_total{level=info}") >= 1.0,
                )
            },
        )
        .await;
    // Every metric issue 16 added is exposed and parses (S3 fetches are
    // checked by the S3 tests: this daemon reads a file).
    let (_, text) = crate::metrics::scrape(&url);
    for family in [
        "keystore_enclave_kms_calls",
        "keystore_enclave_kms_breaker_state",
        "keystore_enclave_kms_breaker_consecutive_failures",
        "keystore_enclave_kms_breaker_opened",
        "keystore_enclave_log_buffered",
        "keystore_enclave_log_dropped",
        "keystore_enclave_log_reads",
        "keystore_enclave_log_events_relayed",
        "keystore_audit_drained_records",
        "keystore_audit_drains",
        "keystore_audit_seconds_since_last_drain",
        "keystore_forwarder_bytes",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing:\n{text}"
        );
    }
    let get = |name: &str| samples.get(name).copied().unwrap_or(-2.0);
    assert_eq!(get("keystore_enclave_kms_breaker_state{}"), 0.0, "closed");
    assert_eq!(get("keystore_enclave_kms_breaker_opened_total{}"), 0.0);
    assert!(get("keystore_audit_seconds_since_last_drain{}") >= 0.0);

    // A throttled Decrypt is counted by its __type.
    assert!(
        stack
            .kms
            .inject(Fault::throttle().next(1).on(Operation::Decrypt))
    );
    let db2 = stack.encrypt(&key, "DB_PASSWORD", "hunter3").await;
    stack.write_secrets(&[format!("DB_PASSWORD={db2}")]);
    stack.wait_for_value("DB_PASSWORD", "hunter3").await;
    let throttled =
        "keystore_enclave_kms_calls_total{operation=Decrypt,outcome=ThrottlingException}";
    stack
        .until("the throttled Decrypt in /metrics", || {
            let (_, text) = crate::metrics::scrape(&url);
            samples = crate::metrics::parse(&text);
            std::future::ready(samples.get(throttled) >= Some(&1.0))
        })
        .await;
    assert!(
        samples.get("keystore_enclave_kms_calls_total{operation=Decrypt,outcome=ok}") >= Some(&2.0)
    );
    // A broken file is counted as a failed parse and the set stays.
    std::fs::write(stack.path("secrets.env"), "NOT A LINE\n").unwrap();
    stack
        .until("a failed load in /metrics", || {
            let (_, text) = crate::metrics::scrape(&url);
            samples = crate::metrics::parse(&text);
            std::future::ready(samples.get("keystore_loads_total{outcome=parse}") >= Some(&1.0))
        })
        .await;
    assert_eq!(stack.get("DB_PASSWORD").await.as_deref(), Some("hunter3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_of_either_side_are_recovered() {
    let mut stack = Stack::start().await;
    let key = stack.key_id.clone();
    let v1 = stack.encrypt(&key, "TOKEN", "one").await;
    stack.write_secrets(&[format!("TOKEN={v1}")]);
    stack.start_enclave();
    stack.start_proxy();
    stack.wait_for_value("TOKEN", "one").await;

    // The host proxy restarts while the enclave runs, and the credentials
    // rotate with it: KMS now knows only the new ones, while the enclave
    // still caches the old. The next load works all the same.
    let v2 = stack.encrypt(&key, "TOKEN", "two").await;
    stack.proxy.as_mut().unwrap().stop();
    stack.kms.set_credentials([Credential::new(
        "AKIAE2EROTATEDROTAT2",
        "rotated-secret-access-key",
    )]);
    stack.start_proxy_with("AKIAE2EROTATEDROTAT2", "rotated-secret-access-key");
    stack.write_secrets(&[format!("TOKEN={v2}")]);
    stack.wait_for_value("TOKEN", "two").await;

    // The enclave restarts (empty, with a new key): the loader notices and
    // loads it again without being told.
    stack.enclave.as_mut().unwrap().stop();
    stack.start_enclave();
    stack.wait_for_value("TOKEN", "two").await;
    let status = stack.status().await.unwrap();
    assert!(status.ready);
    assert_eq!(status.secret_count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_kms_certificate_and_wrong_credentials_are_named() {
    // The forwarder reaches a TLS server whose certificate no webpki root
    // vouches for: the enclave refuses the connection at the TLS stage.
    let mut stack = Stack::start().await;
    let key = stack.key_id.clone();
    let v = stack.encrypt(&key, "TOKEN", "value").await;
    stack.write_secrets(&[format!("TOKEN={v}")]);
    stack.start_enclave_trusting(false);
    stack.start_proxy();
    let error = stack.wait_for_error("UnknownIssuer").await;
    assert!(error.contains("TLS"), "{error}");
    assert!(!stack.status().await.unwrap().ready, "{error}");
    assert_eq!(stack.kms.calls(Operation::Decrypt).calls, 0, "{error}");

    // The host hands the enclave credentials KMS does not accept: the load
    // fails naming KMS's verdict, and nothing is served.
    let mut stack = Stack::start().await;
    let key = stack.key_id.clone();
    let v = stack.encrypt(&key, "TOKEN", "value").await;
    stack.write_secrets(&[format!("TOKEN={v}")]);
    stack.start_enclave();
    stack.start_proxy_with(ACCESS_KEY, "not-the-secret");
    let error = stack.wait_for_error("InvalidSignatureException").await;
    assert!(!stack.status().await.unwrap().ready, "{error}");
    assert_eq!(stack.get("TOKEN").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_written_by_encrypt_are_enforced_by_the_enclave() {
    let mut stack = Stack::start().await;
    let key = stack.key_id.clone();
    let db = stack.encrypt(&key, "DB_PASSWORD", "hunter2").await;
    let api = stack.encrypt(&key, "API_TOKEN", "tok").await;
    stack.write_secrets(&[format!("DB_PASSWORD={db}"), format!("API_TOKEN={api}")]);
    let rules = stack.path("access.yaml");
    std::fs::write(
        &rules,
        "rules:\n  - who: { user: app }\n    read: [\"DB_*\"]\n  - who: { uid: 0 }\n    read: [\"*\"]\n",
    )
    .unwrap();
    // The operator's command, as documented in the README.
    let out = Command::new(env!("CARGO_BIN_EXE_keystore-host"))
        // `--keys` selects only the values already encrypted: PLAIN stays
        // plain and on the parent.
        .args(["encrypt", "--key-id", &key, "--keys", "DB_*", "--rules"])
        .arg(&rules)
        .arg(stack.path("secrets.env"))
        .args([
            "--region",
            REGION,
            "--endpoint-url",
            stack.kms.endpoint_url(),
        ])
        .arg("--ca-bundle")
        .arg(stack.kms.ca_pem_path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("HOME", stack.dir.path())
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_CONFIG_FILE", stack.path("no-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", stack.path("no-credentials"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stack.start_enclave();
    stack.start_proxy();
    // Root (a privileged peer naming no caller) reads what uid 0 is granted.
    stack.wait_for_value("DB_PASSWORD", "hunter2").await;
    assert_eq!(stack.get("API_TOKEN").await.as_deref(), Some("tok"));
    assert_eq!(stack.status().await.unwrap().secret_count, 2);

    let endpoint: Endpoint = stack.unix("enclave.sock").parse().unwrap();
    let mut client = Client::connect(&endpoint).await.unwrap();
    let app = keystore_shared::Caller {
        uid: Some(1000),
        user: Some("app".into()),
        ..keystore_shared::Caller::default()
    };
    let value = client
        .get_as("DB_PASSWORD", Some(app.clone()))
        .await
        .unwrap();
    assert_eq!(value.expose(), b"hunter2");
    let err = client
        .get_as("API_TOKEN", Some(app.clone()))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(keystore_shared::ErrorCode::Denied),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("uid 1000 (app) may not read `API_TOKEN`"),
        "{err}"
    );
    assert_eq!(client.list_as(Some(app)).await.unwrap(), ["DB_PASSWORD"]);
    assert_eq!(
        client.list().await.unwrap(),
        ["API_TOKEN", "DB_PASSWORD"],
        "the rules entry is never listed"
    );
    let err = client.get("keystore:rules").await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(keystore_shared::ErrorCode::Denied),
        "{err}"
    );
}

/// Sends `request` to a unix socket from `nobody` (a real unprivileged
/// process) and returns the answer the enclave sent, if any.
fn as_nobody(
    socket: &std::path::Path,
    request: &keystore_shared::Request,
) -> Option<keystore_shared::Response> {
    use keystore_shared::frame::{decode_frame, encode_frame};
    use keystore_shared::protocol::{DEFAULT_MAX_LOAD_FRAME, DEFAULT_MAX_RESPONSE_FRAME};
    use std::io::Write;
    let frame = encode_frame(request, DEFAULT_MAX_LOAD_FRAME).unwrap();
    // Sends the frame (the enclave may close before reading it), then
    // reads one answer frame or until the enclave closes.
    let client = "import socket,struct,sys\n\
                  s=socket.socket(socket.AF_UNIX)\n\
                  s.settimeout(30)\n\
                  s.connect(sys.argv[1])\n\
                  try:\n    s.sendall(sys.stdin.buffer.read())\nexcept OSError:\n    pass\n\
                  out=b''\n\
                  while len(out) < 4 or len(out) < 4 + struct.unpack('>I', out[:4])[0]:\n    \
                  try:\n        b=s.recv(65536)\n    except OSError:\n        break\n    \
                  if not b: break\n    out+=b\n\
                  sys.stdout.buffer.write(out)\n";
    let mut child = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .args(["/usr/bin/python3", "-c", client])
        .arg(socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&frame).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{output:?}");
    decode_frame(&output.stdout, DEFAULT_MAX_RESPONSE_FRAME)
        .unwrap()
        .map(|(response, _)| response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprivileged_user_cannot_read_load_wipe_or_roll_back() {
    use keystore_shared::protocol::{ErrorCode, LoadEntry, Request, RequestOp, ResponseBody};
    use std::os::unix::fs::PermissionsExt;
    if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) != 0 {
        eprintln!("skipped: needs root to run a client as nobody (CI runs as root)");
        return;
    }
    let mut stack = Stack::start().await;
    let key = stack.key_id.clone();
    let old = stack.encrypt(&key, "DB_PASSWORD", "old-password").await;
    let new = stack.encrypt(&key, "DB_PASSWORD", "new-password").await;
    stack.write_secrets(&[format!("DB_PASSWORD={new}")]);
    stack.start_enclave();
    stack.start_proxy();
    stack.wait_for_value("DB_PASSWORD", "new-password").await;

    // Open the files wide, so only the enclave's peer policy stands in the
    // way (on a parent instance the ports are vsock, with no file at all).
    let open = |path: PathBuf, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    open(stack.dir.path().to_path_buf(), 0o755);
    open(stack.path("enclave.sock"), 0o777);
    open(stack.path("load.sock"), 0o777);

    let rollback = || RequestOp::Load {
        entries: vec![LoadEntry {
            name: "DB_PASSWORD".into(),
            envelope: old.clone(),
        }],
    };
    let get = RequestOp::Get {
        name: "DB_PASSWORD".into(),
    };
    for (socket, op) in [
        ("enclave.sock", get.clone()),
        ("enclave.sock", RequestOp::List),
        ("enclave.sock", rollback()),
        ("load.sock", rollback()),
        ("load.sock", RequestOp::Load { entries: vec![] }),
        ("load.sock", RequestOp::Status),
    ] {
        let request = Request::new(1, op);
        match as_nobody(&stack.path(socket), &request).map(|r| r.result) {
            Some(ResponseBody::Error {
                code: ErrorCode::Denied,
                message,
            }) => assert!(message.contains("uid 65534 is not root"), "{message}"),
            other => panic!("{socket}: expected Denied, got {other:?}"),
        }
    }
    // Nothing changed: neither wiped nor rolled back.
    assert_eq!(
        stack.get("DB_PASSWORD").await.as_deref(),
        Some("new-password")
    );
    assert_eq!(stack.status().await.unwrap().secret_count, 1);

    // Root (uid 0 on the socket) may load, and so may roll back: the
    // refusal above was about who asked.
    let load: Endpoint = stack.unix("load.sock").parse().unwrap();
    let mut loader = Client::connect(&load).await.unwrap();
    match loader.call(rollback()).await.unwrap() {
        ResponseBody::Loaded { count } => assert_eq!(count, 1),
        other => panic!("expected Loaded, got {other:?}"),
    }
    assert_eq!(
        stack.get("DB_PASSWORD").await.as_deref(),
        Some("old-password")
    );
}

// Secrets-file formats (issue 13): JSON and YAML files, sealed by the
// `encrypt` CLI and loaded by the proxy into the real enclave.
impl Stack {
    /// Runs `keystore-host encrypt` against the emulator with `args`.
    fn encrypt_cli(&self, args: &[&str], file: &std::path::Path) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_keystore-host"))
            .arg("encrypt")
            .args(args)
            .arg(file)
            .args([
                "--region",
                REGION,
                "--endpoint-url",
                self.kms.endpoint_url(),
            ])
            .arg("--ca-bundle")
            .arg(self.kms.ca_pem_path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("HOME", self.dir.path())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_CONFIG_FILE", self.path("no-config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", self.path("no-credentials"))
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap()
    }

    /// Starts the proxy loading `secrets` (its format from its name).
    fn start_proxy_for(&mut self, secrets: &std::path::Path) {
        let log = self.path("proxy.log");
        let forward = format!(
            "{}=127.0.0.1:{}",
            self.unix("kms.sock"),
            self.kms.local_addr().port()
        );
        let child = Command::new(env!("CARGO_BIN_EXE_keystore-host"))
            .args(["proxy", "--region", REGION, "--forward", &forward])
            .arg("--no-agent")
            // Not the machine's 9273: tests run in parallel.
            .args(["--metrics-listen", "tcp://127.0.0.1:0"])
            .args(["--credentials-listen", &self.unix("credentials.sock")])
            .args(["--load-to", &self.unix("load.sock")])
            .arg("--audit-log")
            .arg(self.path("audit.jsonl"))
            .arg("--secrets")
            .arg(secrets)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.proxy = Some(Running { child, log });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_yaml_files_are_sealed_by_path_and_loaded() {
    let mut stack = Stack::start().await;
    let key = stack.key_id.clone();
    let yaml = stack.path("secrets.yaml");
    let yaml_text = "# billing\nservice: billing   # stays plain (not selected)\nport: 8443\n\
db:\n  password: 'p@ss word'\n  user: app\nservers:\n  - name: eu\n    token: tok-eu\n  \
- name: us\n    token: \"tök-us\"\n";
    std::fs::write(&yaml, yaml_text).unwrap();
    // One KMS Encrypt per value (a new file would get a file key, tested
    // in `json_and_yaml_file_key_files_load_with_one_decrypt_and_rotate`).
    let out = tokio::task::block_in_place(|| {
        stack.encrypt_cli(
            &[
                "--key-id",
                &key,
                "--per-value-kms",
                "--keys",
                "db.*",
                "--keys",
                "servers.*.token",
            ],
            &yaml,
        )
    });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("encrypted servers.1.token"), "{stdout}");
    let sealed = std::fs::read_to_string(&yaml).unwrap();
    assert!(
        sealed.starts_with(
            "# billing\nservice: billing   # stays plain (not selected)\nport: 8443\n"
        )
    );
    assert!(sealed.contains("  password: 'ENC[v1:kms:"), "{sealed}");
    assert!(sealed.contains("    token: \"ENC[v1:kms:"), "{sealed}");
    assert!(
        !sealed.contains("p@ss") && !sealed.contains("tök"),
        "{sealed}"
    );
    // A second run without `--keys` seals the remaining strings and leaves
    // the envelopes already there untouched (idempotent).
    let again = tokio::task::block_in_place(|| stack.encrypt_cli(&["--key-id", &key], &yaml));
    assert!(again.status.success());
    let again_out = String::from_utf8_lossy(&again.stdout).into_owned();
    assert!(
        again_out.contains("unchanged db.password (already ENC[...])"),
        "{again_out}"
    );
    let after = std::fs::read_to_string(&yaml).unwrap();
    let line_of = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap()
            .to_owned()
    };
    assert_eq!(line_of(&after, "password:"), line_of(&sealed, "password:"));
    assert!(line_of(&after, "service:").ends_with("   # stays plain (not selected)"));
    assert!(line_of(&after, "service:").starts_with("service: ENC[v1:kms:"));
    assert_eq!(line_of(&after, "port:"), "port: 8443");

    // A JSON file under a name that does not say so: `--format json`.
    let conf = stack.path("secrets.conf");
    std::fs::write(
        &conf,
        "{\n  \"db\": {\"password\": \"json-pw\", \"port\": 5432},\n  \"list\": [\"zero\", \"one\"]\n}\n",
    )
    .unwrap();
    let out = tokio::task::block_in_place(|| {
        stack.encrypt_cli(&["--key-id", &key, "--format", "json"], &conf)
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json_text = std::fs::read_to_string(&conf).unwrap();
    assert!(json_text.contains("\"port\": 5432}"), "{json_text}");
    assert!(!json_text.contains("json-pw"), "{json_text}");
    let json = stack.path("secrets.json");
    std::fs::write(&json, &json_text).unwrap();

    stack.start_enclave();
    stack.start_proxy_for(&yaml);
    stack.wait_for_value("db.password", "p@ss word").await;
    assert_eq!(
        stack.get("servers.0.token").await.as_deref(),
        Some("tok-eu")
    );
    assert_eq!(
        stack.get("servers.1.token").await.as_deref(),
        Some("tök-us")
    );
    // The second run sealed the rest too (all string values by default).
    assert_eq!(stack.get("service").await.as_deref(), Some("billing"));
    assert_eq!(stack.get("port").await, None, "numbers stay plain");

    if let Some(mut proxy) = stack.proxy.take() {
        proxy.stop();
    }
    stack.start_proxy_for(&json);
    stack.wait_for_value("db.password", "json-pw").await;
    assert_eq!(stack.get("list.1").await.as_deref(), Some("one"));
    assert_eq!(
        stack.get("servers.0.token").await,
        None,
        "the YAML set is replaced"
    );
}

impl Stack {
    /// `keystore-host encrypt FILE` with its defaults (a file key for a
    /// file without `kms` values), as an operator runs it.
    fn encrypt_default_cli(&self, key: &str, file: &std::path::Path) {
        let out = Command::new(env!("CARGO_BIN_EXE_keystore-host"))
            .args(["encrypt", "--key-id", key])
            .arg(file)
            .args([
                "--region",
                REGION,
                "--endpoint-url",
                self.kms.endpoint_url(),
            ])
            .arg("--ca-bundle")
            .arg(self.kms.ca_pem_path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("HOME", self.dir.path())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_CONFIG_FILE", self.path("no-config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", self.path("no-credentials"))
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_key_file_loads_with_one_decrypt_and_an_older_copy_is_refused() {
    let mut stack = Stack::start().await;
    let key = stack.key_id.clone();
    let secrets = stack.path("secrets.env");
    let big = "x".repeat(100_000);
    stack.write_secrets(&["DB_PASSWORD=v1".into(), format!("BIG={big}")]);
    stack.encrypt_default_cli(&key, &secrets);
    let v1 = std::fs::read_to_string(&secrets).unwrap();
    assert!(v1.contains("DB_PASSWORD=ENC[v1:fk:"), "{v1}");
    assert!(v1.contains("\nkeystore:file=ENC[v1:file:"), "{v1}");

    stack.kms.reset_calls();
    stack.start_enclave();
    stack.start_proxy();
    stack.wait_for_value("DB_PASSWORD", "v1").await;
    assert_eq!(stack.get("BIG").await.as_deref(), Some(big.as_str()));
    assert_eq!(stack.status().await.unwrap().secret_count, 3);
    // PLAIN, DB_PASSWORD and BIG: one attested Decrypt for the whole file.
    let decrypts = stack.kms.calls(Operation::Decrypt);
    assert_eq!((decrypts.calls, decrypts.with_recipient), (1, 1));

    // Version 2: new values, the old record kept so the version goes on.
    let record = v1
        .lines()
        .find(|l| l.starts_with("keystore:file="))
        .unwrap()
        .to_owned();
    stack.write_secrets(&["DB_PASSWORD=v2".into(), record]);
    stack.encrypt_default_cli(&key, &secrets);
    stack.wait_for_value("DB_PASSWORD", "v2").await;

    // The host puts the whole, valid version-1 file back: refused, and
    // version 2 keeps being served.
    let tmp = stack.path("secrets.env.tmp");
    std::fs::write(&tmp, &v1).unwrap();
    std::fs::rename(tmp, &secrets).unwrap();
    let error = stack.wait_for_error("no rollback").await;
    assert!(error.contains("version 1"), "{error}");
    assert_eq!(stack.get("DB_PASSWORD").await.as_deref(), Some("v2"));
}

impl Stack {
    /// `keystore-host COMMAND ARGS...` against the emulator as the
    /// rotation principal.
    fn rotator_cli(&self, command: &str, args: &[&std::ffi::OsStr]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_keystore-host"))
            .arg(command)
            .args(args)
            .args([
                "--region",
                REGION,
                "--endpoint-url",
                self.kms.endpoint_url(),
            ])
            .arg("--ca-bundle")
            .arg(self.kms.ca_pem_path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("HOME", self.dir.path())
            .env("AWS_ACCESS_KEY_ID", ROTATOR_KEY)
            .env("AWS_SECRET_ACCESS_KEY", ROTATOR_SECRET)
            .env("AWS_CONFIG_FILE", self.path("no-config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", self.path("no-credentials"))
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_yaml_file_key_files_load_with_one_decrypt_and_rotate() {
    let mut stack = Stack::start().await;
    let key = stack.key_id.clone();
    let json = stack.path("secrets.json");
    std::fs::write(
        &json,
        "{\"db\": {\"password\": \"j-pw\"}, \"list\": [\"a\", \"b\"], \"port\": 1}\n",
    )
    .unwrap();
    let out =
        tokio::task::block_in_place(|| stack.encrypt_cli(&["--key-id", &key, "--file-key"], &json));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json_text = std::fs::read_to_string(&json).unwrap();
    assert!(
        json_text.contains("\"password\": \"ENC[v1:fk:"),
        "{json_text}"
    );
    assert!(
        json_text.contains("\"keystore:file\": \"ENC[v1:file:"),
        "{json_text}"
    );
    assert!(json_text.contains("\"port\": 1,"), "{json_text}");
    let yaml = stack.path("secrets.yaml");
    std::fs::write(&yaml, "# yaml\ndb:\n  password: y-pw\ntoken: 'tök'\n").unwrap();
    // The default for a new file, whatever its format.
    tokio::task::block_in_place(|| stack.encrypt_default_cli(&key, &yaml));
    let v1 = std::fs::read_to_string(&yaml).unwrap();
    assert!(
        v1.starts_with("# yaml\ndb:\n  password: ENC[v1:fk:"),
        "{v1}"
    );
    assert!(v1.contains("\nkeystore:file: ENC[v1:file:"), "{v1}");

    stack.kms.reset_calls();
    stack.start_enclave();
    stack.start_proxy_for(&json);
    stack.wait_for_value("db.password", "j-pw").await;
    assert_eq!(stack.get("list.1").await.as_deref(), Some("b"));
    let decrypts = stack.kms.calls(Operation::Decrypt);
    assert_eq!((decrypts.calls, decrypts.with_recipient), (1, 1));

    if let Some(mut proxy) = stack.proxy.take() {
        proxy.stop();
    }
    stack.kms.reset_calls();
    stack.start_proxy_for(&yaml);
    stack.wait_for_value("db.password", "y-pw").await;
    assert_eq!(stack.get("token").await.as_deref(), Some("tök"));
    let decrypts = stack.kms.calls(Operation::Decrypt);
    assert_eq!((decrypts.calls, decrypts.with_recipient), (1, 1));

    // Rotated by the rotation principal: the daemon loads version 2 (one
    // more attested Decrypt), the same values are served.
    let out = tokio::task::block_in_place(|| stack.rotator_cli("rotate", &[yaml.as_os_str()]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("version 2"));
    stack
        .until("the rotated file to load", || async {
            stack.kms.calls(Operation::Decrypt).with_recipient >= 2
        })
        .await;
    stack
        .until("the rotated file to be served", || async {
            stack.status().await.is_some_and(|s| s.last_error.is_none())
                && stack.get("db.password").await.as_deref() == Some("y-pw")
        })
        .await;
    assert_eq!(stack.get("token").await.as_deref(), Some("tök"));
    // The rotation principal decrypts the rotated file (break-glass).
    let out = tokio::task::block_in_place(|| {
        stack.rotator_cli(
            "decrypt",
            &[
                yaml.as_os_str(),
                std::ffi::OsStr::new("--yes-print-secrets"),
            ],
        )
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with("# yaml\ndb:\n  password: y-pw\ntoken: 'tök'\n")
    );

    // Version 1 put back: refused as a rollback, version 2 still served.
    let tmp = stack.path("secrets.yaml.tmp");
    std::fs::write(&tmp, &v1).unwrap();
    std::fs::rename(tmp, &yaml).unwrap();
    let error = stack.wait_for_error("no rollback").await;
    assert!(error.contains("version 1"), "{error}");
    assert_eq!(stack.get("db.password").await.as_deref(), Some("y-pw"));
}
