//! The real processes of a deployment, for tests against third-party
//! servers: `keystore-enclave --nsm mock` and `keystore-host proxy`, wired
//! over unix sockets in a temp dir, with the enclave's KMS reached through
//! the proxy's forwarder at whatever HTTPS server the test names (our KMS
//! emulator, or moto).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keystore_shared::{Client, Endpoint, StatusReport};

use super::common::enclave_binary;

/// A child process killed (by its PID) when dropped, its stderr in a file.
pub struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    /// Sends a signal (e.g. `-HUP`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Kills the process with SIGKILL (no clean-up of any kind) and reaps
    /// it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process's stderr so far.
    pub fn log(&self) -> String {
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

/// `path` opened for appending (created if missing): a restarted process
/// logs after its predecessor.
fn append(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

/// Where the enclave's KMS is: an HTTPS server on 127.0.0.1.
pub struct KmsUpstream {
    /// Its port on 127.0.0.1 (the proxy forwards there).
    pub port: u16,
    /// The test CA its certificate (for `localhost`) chains to.
    pub ca_pem: PathBuf,
    /// The key ARN the enclave pins.
    pub key_arn: String,
    /// Directory for the mock NSM's PKI (the emulator reads its root).
    pub mock_pki: PathBuf,
}

/// The enclave and the proxy of one test.
pub struct Stack {
    dir: PathBuf,
    /// The enclave process.
    pub enclave: Option<Running>,
    /// The proxy process.
    pub proxy: Option<Running>,
}

impl Stack {
    /// A stack whose sockets and logs live in `dir`.
    pub fn new(dir: &Path) -> Stack {
        Stack {
            dir: dir.to_owned(),
            enclave: None,
            proxy: None,
        }
    }

    /// A path in the stack's dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn unix(&self, name: &str) -> String {
        format!("unix://{}", self.path(name).display())
    }

    /// Starts the enclave with its KMS at `kms` (through the proxy).
    pub fn start_enclave(&mut self, kms: &KmsUpstream) {
        self.start_enclave_with(kms, &[]);
    }

    /// Starts the enclave with its KMS at `kms` and `extra` flags. Its log
    /// is appended to, so a restarted enclave's log follows the first's.
    pub fn start_enclave_with(&mut self, kms: &KmsUpstream, extra: &[&str]) {
        let log = self.path("enclave.log");
        let child = Command::new(enclave_binary())
            .arg("--kms-ca")
            .arg(&kms.ca_pem)
            .args(["--nsm", "mock", "--recipient-bits", "2048"])
            .args(["--region", super::moto::REGION])
            .args(["--kms-host", "localhost"])
            .args(["--kms-key-arn", &kms.key_arn])
            .arg("--mock-pki")
            .arg(&kms.mock_pki)
            .args(["--listen", &self.unix("enclave.sock")])
            .args(["--load-listen", &self.unix("load.sock")])
            .args(["--kms-proxy", &self.unix("kms.sock")])
            .args(["--credentials", &self.unix("credentials.sock")])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(append(&log))
            .spawn()
            .unwrap();
        self.enclave = Some(Running { child, log });
    }

    /// Starts the proxy forwarding the enclave's KMS to `kms_port`, loading
    /// `secrets` (a path or `s3://...`), with `extra` flags and these AWS
    /// credentials in its environment.
    pub fn start_proxy(
        &mut self,
        kms_port: u16,
        secrets: &str,
        extra: &[&str],
        credentials: (&str, &str),
    ) {
        let log = self.path("proxy.log");
        let forward = format!("{}=127.0.0.1:{kms_port}", self.unix("kms.sock"));
        let child = Command::new(env!("CARGO_BIN_EXE_keystore-host"))
            .args(["proxy", "--region", super::moto::REGION])
            .args(["--forward", &forward])
            .arg("--no-agent")
            // Not the machine's 9273: tests run in parallel.
            .args(["--metrics-listen", "tcp://127.0.0.1:0"])
            .args(["--credentials-listen", &self.unix("credentials.sock")])
            .args(["--load-to", &self.unix("load.sock")])
            .args(["--secrets", secrets])
            // Not the machine's /var/log/nitro-keystore.
            .arg("--audit-log")
            .arg(self.path("audit.jsonl"))
            .args(extra)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("AWS_ACCESS_KEY_ID", credentials.0)
            .env("AWS_SECRET_ACCESS_KEY", credentials.1)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.proxy = Some(Running { child, log });
    }

    /// The enclave's status, if it answers.
    pub async fn status(&self) -> Option<StatusReport> {
        let endpoint: Endpoint = self.unix("enclave.sock").parse().unwrap();
        let mut client = Client::connect(&endpoint).await.ok()?;
        client.status().await.ok()
    }

    /// A secret's value as the enclave serves it.
    pub async fn get(&self, name: &str) -> Option<String> {
        let endpoint: Endpoint = self.unix("enclave.sock").parse().unwrap();
        let mut client = Client::connect(&endpoint).await.ok()?;
        let value = client.get(name).await.ok()?;
        Some(String::from_utf8(value.expose().to_vec()).unwrap())
    }

    /// Both processes' logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- enclave log\n{}\n--- proxy log\n{}",
            self.enclave.as_ref().map(Running::log).unwrap_or_default(),
            self.proxy.as_ref().map(Running::log).unwrap_or_default()
        )
    }

    /// Waits (bounded) until `check` holds, or fails with both logs.
    pub async fn until<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(240);
        while !check().await {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the enclave serves `want` for `name`.
    pub async fn wait_for_value(&self, name: &str, want: &str) {
        self.until(&format!("{name} = {want}"), || async {
            self.get(name).await.as_deref() == Some(want)
        })
        .await;
    }

    /// The proxy's `/metrics` URL, from its start-up log line.
    pub async fn metrics_url(&self) -> String {
        let mut url = None;
        self.until("the proxy's metrics endpoint in its log", || {
            let log = self.proxy.as_ref().map(Running::log).unwrap_or_default();
            url = crate::support::common::metrics_url_in(&log);
            std::future::ready(url.is_some())
        })
        .await;
        url.unwrap_or_default()
    }

    /// How often `needle` occurs in the proxy's log.
    pub fn proxy_log_count(&self, needle: &str) -> usize {
        self.proxy
            .as_ref()
            .map(Running::log)
            .unwrap_or_default()
            .matches(needle)
            .count()
    }

    /// Waits until the proxy's log holds `needle` more than `before` times.
    pub async fn wait_for_proxy_log(&self, needle: &str, before: usize) {
        self.until(&format!("{needle:?} in the proxy log"), || async {
            self.proxy_log_count(needle) > before
        })
        .await;
    }
}

impl Stack {
    /// The proxy's `/metrics` (and `/health`) endpoint, from its log
    /// (tests bind it to port 0); waits until the proxy has logged it.
    /// Added for the doctor tests.
    pub async fn metrics_endpoint(&self) -> String {
        let find = || {
            let log = self.proxy.as_ref().map(Running::log).unwrap_or_default();
            log.lines()
                .filter(|line| line.contains("metrics"))
                .find_map(|line| {
                    let start = line.find("endpoint=tcp://")? + "endpoint=".len();
                    let rest = line.get(start..)?;
                    Some(rest.split_whitespace().next()?.to_owned())
                })
        };
        self.until("the proxy's metrics endpoint in its log", || async {
            find().is_some()
        })
        .await;
        find().unwrap()
    }
}
