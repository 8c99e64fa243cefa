//! moto's server (PyPI `moto[server]`), a KMS and S3 implementation nobody
//! on this project wrote, started on 127.0.0.1 over HTTPS with a test CA.
//!
//! The venv is created once (under `~/.cache/nitro-keystore`, shared by
//! every target dir and CI run on this machine) under a `flock`, so tests
//! running in parallel install it once. If it cannot be installed the test
//! fails with pip's output: these tests never skip silently.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keystore_tests::tls::{SERVER_CERT_FILE, SERVER_KEY_FILE, TestPki};

/// The moto release these tests were written against.
pub const MOTO_VERSION: &str = "5.2.5";

/// Region every moto test uses.
pub const REGION: &str = "us-east-1";

/// moto accepts any credentials; these stand in for an operator's.
pub const ACCESS_KEY: &str = "AKIAMOTOTESTMOTOTEST";
/// Secret half of [`ACCESS_KEY`].
pub const SECRET_KEY: &str = "moto-secret-access-key";

/// The venv holding moto, created if missing. Panics with pip's output if
/// it cannot be installed.
pub fn venv() -> PathBuf {
    let cache = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cache/nitro-keystore"))
        .unwrap_or_else(|| std::env::temp_dir().join("nitro-keystore-cache"));
    std::fs::create_dir_all(&cache).unwrap();
    let venv = cache.join(format!("moto-venv-{MOTO_VERSION}"));
    let python = venv.join("bin/python");
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
    let out = Command::new("flock")
        .arg(cache.join("moto-venv.lock"))
        .args(["sh", "-c", &script, "sh"])
        .arg(&venv)
        .stdin(Stdio::null())
        .output()
        .expect("running flock/sh to prepare the moto venv");
    assert!(
        out.status.success(),
        "cannot install moto[server]=={MOTO_VERSION} into {} (PyPI must be reachable):\n{}\n{}",
        venv.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(python.exists());
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
            if wait_ready(&mut child, port) {
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

    /// The HTTPS endpoint (`https://localhost:PORT`, the name the test
    /// certificate holds).
    pub fn endpoint_url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    /// moto's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The test CA (PEM) that moto's certificate chains to.
    pub fn ca_pem_path(&self) -> PathBuf {
        self.pki.ca_pem_path()
    }

    /// moto's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The venv's python, for boto3 checks.
    pub fn python(&self) -> PathBuf {
        venv().join("bin/python")
    }

    /// Runs a boto3 script against this server: `argv[1]` is the endpoint,
    /// `argv[2]` the CA bundle, then `args`. Returns stdout; panics with
    /// stderr if it fails.
    pub fn boto3(&self, script: &str, args: &[&str]) -> String {
        let out = self.boto3_output(script, args);
        assert!(
            out.status.success(),
            "boto3 script failed:\n{}\n--- moto log\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Like [`Moto::boto3`], returning the whole output whatever the exit.
    pub fn boto3_output(&self, script: &str, args: &[&str]) -> std::process::Output {
        Command::new(self.python())
            .arg("-c")
            .arg(script)
            .arg(self.endpoint_url())
            .arg(self.ca_pem_path())
            .args(args)
            .env_clear()
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_DEFAULT_REGION", REGION)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Stops moto (by its PID) and waits for it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until the child accepts connections on `port`; false if it exits
/// (e.g. the port was taken) or takes over a minute.
fn wait_ready(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
