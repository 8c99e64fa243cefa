//! `keystore-host doctor` (issue 16): one run where everything is fine
//! (the real enclave binary with the mock NSM, the real daemon, the KMS
//! emulator and a fake IMDS: exit 0), then one test per induced failure,
//! each asserting the check's named cause, its hint and exit 1.
//!
//! Tests that need no enclave point the other checks at nothing (a missing
//! socket, `--no-imds`) so each run stays short.

use std::path::Path;
use std::process::Command;

use keystore_tests::kms::{Fault, MockKms, MockKmsConfig, MockKmsHandle, Operation};
use serde_json::Value;
use sha2::{Digest, Sha384};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::agent::open_dir;
use crate::support::common::enclave_binary;
use crate::support::emulator::Emulator;
use crate::support::imds::{FakeImds, ImdsAnswers};
use crate::support::stack::Stack;

const ACCESS_KEY: &str = "AKIADOCTORDOCTOR0001";
const SECRET_KEY: &str = "doctor-secret-access-key";

/// One doctor run: exit code and its JSON findings.
struct Run {
    code: Option<i32>,
    findings: Vec<Value>,
    stderr: String,
}

impl Run {
    fn finding(&self, check: &str) -> &Value {
        self.findings
            .iter()
            .find(|f| f["check"] == check)
            .unwrap_or_else(|| panic!("no {check} finding: {:#?}", self.findings))
    }

    /// `check` failed with `cause` in what it saw and `hint` in its hint,
    /// and the run exited 1.
    fn assert_fails(&self, check: &str, cause: &str, hint: &str) {
        let finding = self.finding(check);
        assert_eq!(finding["status"], "fail", "{finding:#}");
        let saw = finding["saw"].as_str().unwrap();
        assert!(saw.contains(cause), "{check}: {saw:?} lacks {cause:?}");
        let given = finding["hint"].as_str().unwrap_or_default();
        assert!(
            given.contains(hint),
            "{check}: hint {given:?} lacks {hint:?}"
        );
        assert_eq!(self.code, Some(1), "{}", self.stderr);
    }

    fn status(&self, check: &str) -> &str {
        self.finding(check)["status"].as_str().unwrap()
    }
}

/// Flags as (flag, value) pairs; an empty value is a switch.
type Flags = Vec<(String, String)>;

/// `base` with `over` replacing flags of the same name (or added).
fn with(mut base: Flags, over: &[(&str, &str)]) -> Flags {
    for (flag, value) in over {
        match base.iter_mut().find(|(f, _)| f == flag) {
            Some(entry) => entry.1 = (*value).to_owned(),
            None => base.push(((*flag).to_owned(), (*value).to_owned())),
        }
    }
    base
}

fn without(mut base: Flags, flag: &str) -> Flags {
    base.retain(|(f, _)| f != flag);
    base
}

/// Every check pointed at nothing, quickly: no enclave, no daemon, no IMDS,
/// KMS on a closed port.
fn isolated(dir: &Path) -> Flags {
    with(
        Vec::new(),
        &[
            (
                "--enclave",
                &format!("unix://{}/absent.sock", dir.display()),
            ),
            (
                "--daemon",
                &format!("unix://{}/absent-daemon.sock", dir.display()),
            ),
            ("--kms-endpoint", "127.0.0.1:1"),
            ("--no-imds", ""),
            ("--timeout", "2"),
        ],
    )
}

/// Runs `keystore-host doctor --json` with `flags` (blocking).
fn doctor(flags: &Flags) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keystore-host"));
    command.args(["doctor", "--json"]);
    for (flag, value) in flags {
        command.arg(flag);
        if !value.is_empty() {
            command.arg(value);
        }
    }
    run_json(command)
}

fn run_json(mut command: Command) -> Run {
    let out = command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let findings: Vec<Value> = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}\n{stderr}"));
    // Stable field names, every check every time, in order.
    let names: Vec<&str> = findings
        .iter()
        .map(|f| {
            for field in ["check", "status", "saw", "hint"] {
                assert!(f.get(field).is_some(), "{f:#} lacks {field}");
            }
            f["check"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        names,
        [
            "enclave",
            "daemon",
            "allowlist",
            "dns",
            "tls",
            "credentials",
            "pcrs",
            "pinned_key",
            "document",
            "loads",
            "audit"
        ]
    );
    Run {
        code: out.status.code(),
        findings,
        stderr,
    }
}

async fn doctor_async(flags: Flags) -> Run {
    tokio::task::spawn_blocking(move || doctor(&flags))
        .await
        .unwrap()
}

/// An RFC 3339 time `offset` from now.
fn rfc3339_from_now(offset: time::Duration) -> String {
    (OffsetDateTime::now_utc() + offset)
        .format(&Rfc3339)
        .unwrap()
}

/// A free loopback port (bound, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The emulator, the enclave (with `enclave_extra` flags) and, with
/// `proxy_extra`, the daemon loading a plain secrets file.
struct Deployment {
    dir: tempfile::TempDir,
    kms: MockKmsHandle,
    stack: Stack,
    key_arn: String,
}

impl Deployment {
    async fn start(enclave_extra: &[&str], proxy_extra: Option<&[&str]>) -> Deployment {
        let dir = open_dir();
        let emulator = Emulator::start(dir.path(), (ACCESS_KEY, SECRET_KEY)).await;
        let upstream = emulator.upstream();
        let mut stack = Stack::new(dir.path());
        stack.start_enclave_with(&upstream, enclave_extra);
        stack
            .until("the enclave answers Status", || async {
                stack.status().await.is_some()
            })
            .await;
        if let Some(extra) = proxy_extra {
            let secrets = dir.path().join("secrets.env");
            let sealed = emulator.seal("DB_PASSWORD", "hunter2").await;
            std::fs::write(&secrets, format!("PLAIN=visible\nDB_PASSWORD={sealed}\n")).unwrap();
            stack.start_proxy(
                upstream.port,
                secrets.to_str().unwrap(),
                extra,
                (ACCESS_KEY, SECRET_KEY),
            );
            stack
                .until("the secrets are loaded", || async {
                    stack.status().await.is_some_and(|s| s.ready)
                })
                .await;
        }
        Deployment {
            dir,
            kms: emulator.kms,
            stack,
            key_arn: emulator.key_arn,
        }
    }

    /// Doctor flags for this deployment: every check pointed at it, IMDS
    /// off, no policy.
    async fn flags(&self) -> Flags {
        let daemon = if self.stack.proxy.is_some() {
            self.stack.metrics_endpoint().await
        } else {
            format!("unix://{}/absent-daemon.sock", self.dir.path().display())
        };
        with(
            Vec::new(),
            &[
                (
                    "--enclave",
                    &format!("unix://{}", self.stack.path("enclave.sock").display()),
                ),
                ("--daemon", &daemon),
                (
                    "--kms-endpoint",
                    &format!("127.0.0.1:{}", self.kms.local_addr().port()),
                ),
                ("--kms-host", "localhost"),
                ("--ca-bundle", self.kms.ca_pem_path().to_str().unwrap()),
                ("--root", self.stack.path("pki/root.pem").to_str().unwrap()),
                ("--key-id", &self.key_arn),
                ("--no-imds", ""),
                ("--timeout", "5"),
            ],
        )
    }

    /// A key policy file pinning `pcr0` (hex) as `keystore-host policy`
    /// pins it.
    fn policy_file(&self, pcr0: &str) -> String {
        let path = self.dir.path().join("policy.json");
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Sid": "EnclaveDecrypt",
                "Effect": "Allow",
                "Principal": {"AWS": "arn:aws:iam::111122223333:role/parent"},
                "Action": "kms:Decrypt",
                "Resource": "*",
                "Condition": {"StringEqualsIgnoreCase": {
                    "kms:RecipientAttestation:ImageSha384": pcr0
                }}
            }]
        });
        std::fs::write(&path, policy.to_string()).unwrap();
        path.to_str().unwrap().to_owned()
    }
}

/// The mock NSM's PCR0: the enclave binary's SHA-384.
fn enclave_pcr0() -> String {
    hex::encode(Sha384::digest(std::fs::read(enclave_binary()).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_deployment_passes_every_check() {
    let d = Deployment::start(&[], Some(&[])).await;
    let imds = FakeImds::start(ImdsAnswers {
        role: Some("keystore-parent".into()),
        expiration: rfc3339_from_now(time::Duration::hours(6)),
    })
    .await;
    let flags = with(
        without(d.flags().await, "--no-imds"),
        &[
            ("--imds", &imds.url()),
            ("--policy-file", &d.policy_file(&enclave_pcr0())),
        ],
    );
    let run = doctor_async(flags).await;
    for finding in &run.findings {
        assert_eq!(finding["status"], "ok", "{finding:#}\n{}", d.stack.logs());
        assert!(finding["hint"].is_null(), "{finding:#}");
    }
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.finding("credentials")["saw"]
            .as_str()
            .unwrap()
            .contains("role keystore-parent")
    );
    assert!(
        run.finding("pcrs")["saw"]
            .as_str()
            .unwrap()
            .contains("PCR0 match")
    );
}

#[test]
fn plain_text_names_each_check_and_its_hint() {
    let dir = open_dir();
    let mut command = Command::new(env!("CARGO_BIN_EXE_keystore-host"));
    command.arg("doctor");
    for (flag, value) in isolated(dir.path()) {
        command.arg(flag);
        if !value.is_empty() {
            command.arg(value);
        }
    }
    let out = command.output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1));
    // Not a terminal: no colour codes.
    assert!(!text.contains('\x1b'), "{text}");
    assert!(text.contains("[fail] enclave      no socket at"), "{text}");
    assert!(text.contains("hint: start the enclave"), "{text}");
    assert!(text.contains("[skip] pcrs "), "{text}");
    assert!(text.contains("[skip] credentials  --no-imds"), "{text}");
}

#[test]
fn enclave_down() {
    let dir = open_dir();
    // A socket file nothing listens on any more: what a stopped enclave
    // leaves behind.
    let socket = dir.path().join("enclave.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let run = doctor(&with(
        isolated(dir.path()),
        &[("--enclave", &format!("unix://{}", socket.display()))],
    ));
    run.assert_fails(
        "enclave",
        "connection refused: nothing listens on",
        "start the enclave",
    );
    assert!(
        run.finding("enclave")["hint"]
            .as_str()
            .unwrap()
            .contains("nitro-cli describe-enclaves")
    );
    // What needs the enclave is skipped, not failed again.
    for check in ["pcrs", "pinned_key", "document", "loads", "audit"] {
        assert_eq!(run.status(check), "skip", "{check}");
    }
}

#[test]
fn wrong_port() {
    let dir = open_dir();
    // Something else listens there (here: an HTTP server's answer).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::Write;
        if let Ok((mut stream, _)) = listener.accept() {
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let run = doctor(&with(
        isolated(dir.path()),
        &[("--enclave", &format!("tcp://127.0.0.1:{port}"))],
    ));
    run.assert_fails(
        "enclave",
        "does not speak the keystore protocol",
        "wrong port? --enclave must name the enclave's secret port",
    );
    server.join().unwrap();
}

#[test]
fn unprivileged_caller() {
    let dir = open_dir();
    // The binary where nobody may run it (the target dir is under /root).
    let binary = dir.path().join("keystore-host");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_keystore-host"), &binary).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_keystore-host"), &binary).unwrap();
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(&binary)
        .args(["doctor", "--json"]);
    for (flag, value) in with(
        isolated(dir.path()),
        &[("--enclave", &format!("tcp://127.0.0.1:{port}"))],
    ) {
        command.arg(flag);
        if !value.is_empty() {
            command.arg(value);
        }
    }
    let run = run_json(command);
    run.assert_fails(
        "enclave",
        "as a privileged peer",
        "run as root: the enclave serves only privileged peers",
    );
}

#[test]
fn daemon_down() {
    let dir = open_dir();
    let run = doctor(&with(
        isolated(dir.path()),
        &[("--daemon", &format!("tcp://127.0.0.1:{}", closed_port()))],
    ));
    run.assert_fails(
        "daemon",
        "the daemon is down: nothing answers at",
        "systemctl status keystore-host-proxy",
    );
    assert_eq!(run.status("allowlist"), "skip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_host_not_in_the_allowlist() {
    let dir = open_dir();
    let mut stack = Stack::new(dir.path());
    let secrets = dir.path().join("secrets.env");
    std::fs::write(&secrets, "PLAIN=visible\n").unwrap();
    // The daemon alone, forwarding only to 127.0.0.1:PORT.
    let port = closed_port();
    stack.start_proxy(
        port,
        secrets.to_str().unwrap(),
        &[],
        (ACCESS_KEY, SECRET_KEY),
    );
    let daemon = stack.metrics_endpoint().await;
    let run = doctor_async(with(
        isolated(dir.path()),
        &[("--daemon", &daemon), ("--kms-endpoint", "127.0.0.2:443")],
    ))
    .await;
    assert_eq!(run.status("daemon"), "ok", "{:#?}", run.findings);
    run.assert_fails(
        "allowlist",
        "the KMS host 127.0.0.2:443 is not in the forwarder allowlist",
        "add --forward vsock://ANY:800=127.0.0.2:443",
    );
    // The daemon's own route is in its allowlist.
    let ok = doctor_async(with(
        isolated(dir.path()),
        &[
            ("--daemon", &daemon),
            ("--kms-endpoint", &format!("127.0.0.1:{port}")),
        ],
    ))
    .await;
    assert_eq!(ok.status("allowlist"), "ok", "{:#?}", ok.findings);
}

#[test]
fn dns_failure() {
    let dir = open_dir();
    let run = doctor(&with(
        isolated(dir.path()),
        &[("--kms-endpoint", "kms.doctor-test.invalid:443")],
    ));
    run.assert_fails(
        "dns",
        "kms.doctor-test.invalid does not resolve",
        "check the parent's resolver",
    );
    assert_eq!(run.status("tls"), "skip");
}

async fn tls_run(over: &[(&str, &str)]) -> Run {
    let dir = open_dir();
    let kms = MockKms::start(MockKmsConfig::new(dir.path().join("kms-tls"), Vec::new()))
        .await
        .unwrap();
    let endpoint = format!("127.0.0.1:{}", kms.local_addr().port());
    let ca = kms.ca_pem_path().to_str().unwrap().to_owned();
    let flags = with(
        isolated(dir.path()),
        &[("--kms-endpoint", &endpoint), ("--ca-bundle", &ca)],
    );
    let mut flags = with(flags, over);
    flags.retain(|(_, v)| v != "-");
    doctor_async(flags).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_certificate_for_another_name() {
    // What a KMS VPC endpoint without private DNS looks like: its
    // certificate is not for the name asked.
    let run = tls_run(&[("--kms-host", "kms.us-east-1.amazonaws.com")]).await;
    run.assert_fails(
        "tls",
        "is not valid for kms.us-east-1.amazonaws.com",
        "enable its private DNS",
    );
    // The right name passes.
    let ok = tls_run(&[("--kms-host", "localhost")]).await;
    assert_eq!(ok.status("tls"), "ok", "{:#?}", ok.findings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_untrusted_ca() {
    // Without the test CA, the emulator's certificate chains to nothing the
    // enclave trusts: a TLS-inspecting proxy looks like this.
    let run = tls_run(&[("--kms-host", "localhost"), ("--ca-bundle", "-")]).await;
    run.assert_fails("tls", "signed by an untrusted CA", "TLS-inspecting proxy");
}

#[test]
fn imds_unreachable() {
    let dir = open_dir();
    let imds = format!("http://127.0.0.1:{}", closed_port());
    let run = doctor(&with(
        without(isolated(dir.path()), "--no-imds"),
        &[("--imds", &imds)],
    ));
    run.assert_fails(
        "credentials",
        &format!("IMDS at {imds} is unreachable"),
        "--http-put-response-hop-limit 2",
    );
}

async fn imds_run(answers: ImdsAnswers) -> Run {
    let dir = open_dir();
    let imds = FakeImds::start(answers).await;
    doctor_async(with(
        without(isolated(dir.path()), "--no-imds"),
        &[("--imds", &imds.url())],
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_credentials() {
    let run = imds_run(ImdsAnswers {
        role: Some("keystore-parent".into()),
        expiration: rfc3339_from_now(-time::Duration::minutes(10)),
    })
    .await;
    run.assert_fails(
        "credentials",
        "the credentials of role keystore-parent expired at",
        "instance clock",
    );
    let soon = imds_run(ImdsAnswers {
        role: Some("keystore-parent".into()),
        expiration: rfc3339_from_now(time::Duration::minutes(2)),
    })
    .await;
    soon.assert_fails("credentials", "expire soon", "instance clock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_instance_role() {
    let run = imds_run(ImdsAnswers {
        role: None,
        expiration: String::new(),
    })
    .await;
    run.assert_fails(
        "credentials",
        "no IAM role",
        "associate-iam-instance-profile",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pcrs_differ_from_the_key_policy() {
    let d = Deployment::start(&[], None).await;
    let other_build = "ab".repeat(48);
    let flags = with(
        d.flags().await,
        &[("--policy-file", &d.policy_file(&other_build))],
    );
    let run = doctor_async(flags).await;
    assert_eq!(run.status("enclave"), "ok", "{:#?}", run.findings);
    run.assert_fails(
        "pcrs",
        "pins another build: PCR0 differs: the policy pins abababababababab but the enclave has",
        "nitro-cli describe-eif",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_mode_zero_pcrs() {
    let d = Deployment::start(&["--mock-debug-pcrs"], None).await;
    let flags = with(
        d.flags().await,
        &[("--policy-file", &d.policy_file(&enclave_pcr0()))],
    );
    let run = doctor_async(flags).await;
    run.assert_fails(
        "pcrs",
        "the enclave runs in debug mode: PCRs are zero and the key policy will refuse it",
        "without --debug-mode",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_key_mismatch() {
    let d = Deployment::start(&[], None).await;
    let other = "arn:aws:kms:us-east-1:111122223333:key/00000000-0000-4000-8000-000000000000";
    let run = doctor_async(with(
        d.flags().await,
        &[("--key-id", other), ("--region", "eu-west-1")],
    ))
    .await;
    run.assert_fails(
        "pinned_key",
        &format!(
            "the key {other} is not the enclave's pinned key [{}]",
            d.key_arn
        ),
        "--build-arg KMS_KEY_ARNS",
    );
    // The region the daemon would use (here --region: no daemon) differs
    // from the image's.
    assert!(
        run.finding("pinned_key")["saw"]
            .as_str()
            .unwrap()
            .contains("the image pins region us-east-1 but --region is eu-west-1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_trail_not_drained() {
    let d = Deployment::start(&[], Some(&["--no-audit-log"])).await;
    // A read makes an audit record that nobody drains.
    assert_eq!(d.stack.get("DB_PASSWORD").await.as_deref(), Some("hunter2"));
    let run = doctor_async(d.flags().await).await;
    run.assert_fails(
        "audit",
        "audit lag: the daemon does not drain the audit trail (--no-audit-log)",
        "without --no-audit-log",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_breaker_open() {
    // Re-decrypts every second; two failures open the breaker for a minute,
    // longer than the doctor run, so it is seen open, not half-open.
    let d = Deployment::start(
        &[
            "--reload-every",
            "1s",
            "--breaker-threshold",
            "2",
            "--breaker-initial-open",
            "60s",
            "--breaker-max-open",
            "60s",
        ],
        Some(&[]),
    )
    .await;
    assert!(
        d.kms
            .inject(Fault::internal_error().fraction(1.0).on(Operation::Decrypt))
    );
    d.stack
        .until("the breaker opens", || async {
            d.stack
                .status()
                .await
                .and_then(|s| s.breaker)
                .is_some_and(|b| b.state == "open")
        })
        .await;
    let run = doctor_async(d.flags().await).await;
    run.assert_fails(
        "loads",
        "the KMS breaker is open after 2 failure(s) in a row",
        "the breaker probes KMS again by itself",
    );
    assert!(
        run.finding("loads")["saw"]
            .as_str()
            .unwrap()
            .contains("KMSInternalException"),
        "the cause names KMS's error: {:#?}",
        run.finding("loads")
    );
    // The set is still served (serve-last-good): the enclave check passes.
    assert_eq!(run.status("enclave"), "ok", "{:#?}", run.findings);
    assert_eq!(d.stack.get("DB_PASSWORD").await.as_deref(), Some("hunter2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_older_than_5_minutes() {
    // The NSM's clock 10 minutes behind: every document the enclave makes,
    // however fresh, is 10 minutes old to KMS (the emulator refuses it as
    // the fault matrix shows).
    let d = Deployment::start(&["--mock-clock-behind", "10m"], None).await;
    let flags = with(
        d.flags().await,
        &[("--policy-file", &d.policy_file(&enclave_pcr0()))],
    );
    let run = doctor_async(flags).await;
    run.assert_fails(
        "document",
        "the enclave's documents are stale when made: one made just now is already",
        "chronyc tracking",
    );
    let saw = run.finding("document")["saw"].as_str().unwrap().to_owned();
    assert!(
        saw.contains("KMS refuses documents older than 300 s"),
        "{saw}"
    );
    // The document itself verifies (its chain is genuine, only old) and
    // matches the policy.
    assert_eq!(run.status("pcrs"), "ok", "{:#?}", run.findings);
}
