//! moto's server (PyPI `moto[server]`), a KMS and S3 implementation nobody
//! on this project wrote, started on 127.0.0.1 over HTTPS with a test CA.
//!
//! The venv is created once (under `~/.cache/nitro-keystore`, shared by
//! every target dir and CI run on this machine) under a `flock`, so tests
//! running in parallel install it once. If it cannot be installed the test
//! fails with pip's output: these tests never skip silently.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use keystore_tests::tls::{SERVER_CERT_FILE, SERVER_KEY_FILE, TestPki};

pub use super::peer::{AwsPeer, REGION};
use super::peer::{PeerProcess, cache_dir, install_venv};

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
    process: PeerProcess,
}

impl Moto {
    /// Starts moto over HTTPS on 127.0.0.1 with a fresh test CA under
    /// `dir`, and waits until it answers.
    pub fn start(dir: &Path) -> Moto {
        let venv = venv();
        let pki = TestPki::create(dir.join("moto-tls")).unwrap();
        let (cert, key) = (
            pki.dir().join(SERVER_CERT_FILE),
            pki.dir().join(SERVER_KEY_FILE),
        );
        let process = PeerProcess::start(
            "moto",
            pki,
            dir.join("moto.log"),
            5,
            Duration::from_secs(60),
            |port| {
                let mut command = Command::new(venv.join("bin/python"));
                command
                    .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
                    .arg(port.to_string())
                    .arg("-c")
                    .arg(&cert)
                    .arg("-k")
                    .arg(&key)
                    .env("AWS_DEFAULT_REGION", REGION);
                command
            },
        );
        Moto { process }
    }
}

impl AwsPeer for Moto {
    fn process(&self) -> &PeerProcess {
        &self.process
    }

    fn process_mut(&mut self) -> &mut PeerProcess {
        &mut self.process
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
}
