//! What the tests against third-party AWS implementations (moto,
//! LocalStack) need of a running server, and the pieces both start-ups
//! share: the cache directory their venvs live in, a free port, waiting
//! until the server accepts connections.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keystore_tests::tls::TestPki;

/// Region every peer test uses.
pub const REGION: &str = "us-east-1";

/// Both servers accept any credentials; these stand in for an operator's.
pub const ACCESS_KEY: &str = "AKIAMOTOTESTMOTOTEST";
/// Secret half of [`ACCESS_KEY`].
pub const SECRET_KEY: &str = "moto-secret-access-key";

/// A KMS and S3 server nobody on this project wrote, on 127.0.0.1 over
/// HTTPS with a test CA.
pub trait AwsPeer {
    /// The HTTPS endpoint (`https://localhost:PORT`, the name the test
    /// certificate holds).
    fn endpoint_url(&self) -> String {
        format!("https://localhost:{}", self.port())
    }

    /// The server's process.
    fn process(&self) -> &PeerProcess;

    /// The server's process, to stop it.
    fn process_mut(&mut self) -> &mut PeerProcess;

    /// The port on 127.0.0.1.
    fn port(&self) -> u16 {
        self.process().port
    }

    /// The test CA (PEM) that the server's certificate chains to.
    fn ca_pem_path(&self) -> PathBuf {
        self.process().pki.ca_pem_path()
    }

    /// The server's log so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.process().log).unwrap_or_default()
    }

    /// The venv's python, for boto3 checks.
    fn python(&self) -> PathBuf;

    /// How many KMS requests the server has answered, from its log.
    fn kms_requests(&self) -> usize;

    /// How many S3 `op` requests (`GetObject`, `PutObject`) on
    /// `bucket/key` the server has answered with `status`, from its log.
    fn s3_answers(&self, op: &str, bucket: &str, key: &str, status: u16) -> usize;

    /// Stops the server (by its PID) and waits for it.
    fn stop(&mut self) {
        self.process_mut().stop();
    }

    /// Runs a boto3 script against this server: `argv[1]` is the endpoint,
    /// `argv[2]` the CA bundle, then `args`. Returns stdout; panics with
    /// stderr if it fails.
    fn boto3(&self, script: &str, args: &[&str]) -> String {
        let out = self.boto3_output(script, args);
        assert!(
            out.status.success(),
            "boto3 script failed:\n{}\n--- server log\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Like [`AwsPeer::boto3`], returning the whole output whatever the
    /// exit.
    fn boto3_output(&self, script: &str, args: &[&str]) -> std::process::Output {
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
}

/// `~/.cache/nitro-keystore` (shared by every target dir and CI run on
/// this machine), created if missing.
pub fn cache_dir() -> PathBuf {
    let cache = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cache/nitro-keystore"))
        .unwrap_or_else(|| std::env::temp_dir().join("nitro-keystore-cache"));
    std::fs::create_dir_all(&cache).unwrap();
    cache
}

/// Runs `script` (`sh -c`, `$1` = `venv`) under an exclusive lock on
/// `lock`, so tests running in parallel install a venv once. Panics with
/// the script's output if it fails.
pub fn install_venv(lock: &str, venv: &std::path::Path, script: &str, what: &str) {
    let out = Command::new("flock")
        .arg(cache_dir().join(lock))
        .args(["sh", "-c", script, "sh"])
        .arg(venv)
        .stdin(Stdio::null())
        .output()
        .expect("running flock/sh to prepare a venv");
    assert!(
        out.status.success(),
        "cannot install {what} into {} (PyPI must be reachable):\n{}\n{}",
        venv.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A peer server's process, started on a free port of 127.0.0.1 with its
/// stderr in a log file; killed (by its PID) when dropped.
pub struct PeerProcess {
    child: Child,
    port: u16,
    pki: TestPki,
    log: PathBuf,
}

impl PeerProcess {
    /// Runs `command(port)` on a port just freed by the kernel, stderr to
    /// `log`, and waits up to `within` until it accepts connections. If it
    /// exits first (another process took the port), tries another port,
    /// `attempts` times in all; then panics with the log.
    pub fn start(
        name: &str,
        pki: TestPki,
        log: PathBuf,
        attempts: u32,
        within: Duration,
        command: impl Fn(u16) -> Command,
    ) -> PeerProcess {
        for _ in 0..attempts {
            let port = free_port();
            let mut child = command(port)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            if wait_ready(&mut child, port, within) {
                return PeerProcess {
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
            "{name} did not start on 127.0.0.1:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until the child accepts connections on `port`; false if it exits
/// (e.g. the port was taken) or takes longer than `within`.
fn wait_ready(child: &mut Child, port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
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

/// A port just freed by the kernel.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
