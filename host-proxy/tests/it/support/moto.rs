//! moto's server (PyPI `moto[server]`), a KMS and S3 implementation nobody
//! on this project wrote, started on 127.0.0.1 over HTTPS with a test CA.
//!
//! The venv is created once (under `~/.cache/nitro-keystore`, shared by
//! every target dir and CI run on this machine) under a `flock`, so tests
//! running in parallel install it once. If it cannot be installed the test
//! fails with pip's output: these tests never skip silently.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keystore_tests::tls::{SERVER_CERT_FILE, SERVER_KEY_FILE, TestPki};

pub use super::peer::{AwsPeer, REGION};
use super::peer::{cache_dir, free_port, install_venv, wait_ready};

/// The moto release these tests were written against.
pub const MOTO_VERSION: &str = "5.2.5";

/// The venv holding moto, created if missing. Panics with pip's output if
/// it cannot be installed.
pub fn venv() -> PathBuf {
    let venv = cache_dir().join(format!("moto-venv-{MOTO_VERSION}"));
    // Under an exclusive lock: check, else (re)create and install.
    let script = format!(
        r#"set -e
if [ -x "$1/bin/python" ] && "$1/bin/python" -c 'import moto.server, boto3' 2>/dev/null; then exit 0; fi
rm -rf "$1"
python3 -m venv "$1"
"$1/bin/pip" install --disable-pip-version-check -q 'moto[server]=={MOTO_VERSION}'
"$1/bin/python" -c 'import moto.server, boto3'
"#
    );
    install_venv(
        "moto-venv.lock",
        &venv,
        &script,
        &format!("moto[server]=={MOTO_VERSION}"),
    );
    assert!(venv.join("bin/python").exists());
    venv
}

/// A running moto server, killed (by its PID) when dropped.
pub struct Moto {
    child: Child,
    port: u16,
    pki: TestPki,
    log: PathBuf,
}

impl Moto {
    /// Starts moto over HTTPS on 127.0.0.1 with a fresh test CA under
    /// `dir`, and waits until it answers.
    pub fn start(dir: &Path) -> Moto {
        let venv = venv();
        let pki = TestPki::create(dir.join("moto-tls")).unwrap();
        let log = dir.join("moto.log");
        // A port just freed by the kernel; if another process takes it
        // first, moto fails to bind and we try another.
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(venv.join("bin/python"))
                .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
                .arg(port.to_string())
                .arg("-c")
                .arg(pki.dir().join(SERVER_CERT_FILE))
                .arg("-k")
                .arg(pki.dir().join(SERVER_KEY_FILE))
                .env("AWS_DEFAULT_REGION", REGION)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            if wait_ready(&mut child, port, Duration::from_secs(60)) {
                return Moto {
                    child,
                    port,
                    pki,
                    log,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "moto did not start on 127.0.0.1:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}

impl AwsPeer for Moto {
    fn port(&self) -> u16 {
        self.port
    }

    fn ca_pem_path(&self) -> PathBuf {
        self.pki.ca_pem_path()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn python(&self) -> PathBuf {
        venv().join("bin/python")
    }

    fn kms_requests(&self) -> usize {
        // KMS is `POST /`; S3 requests name their bucket.
        self.log().matches("POST / HTTP/1.1").count()
    }

    fn s3_answers(&self, op: &str, bucket: &str, key: &str, status: u16) -> usize {
        let method = match op {
            "GetObject" => "GET",
            "PutObject" => "PUT",
            other => panic!("no request line for {other}"),
        };
        // (werkzeug may colour the request line: match its parts.)
        let request = format!("{method} /{bucket}/{key}");
        let status = format!("\" {status} ");
        self.log()
            .lines()
            .filter(|line| line.contains(&request) && line.contains(&status))
            .count()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        AwsPeer::stop(self);
    }
}
