//! What the tests against third-party AWS implementations (moto,
//! LocalStack) need of a running server, and the pieces both start-ups
//! share: the cache directory their venvs live in, a free port, waiting
//! until the server accepts connections.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

    /// The port on 127.0.0.1.
    fn port(&self) -> u16;

    /// The test CA (PEM) that the server's certificate chains to.
    fn ca_pem_path(&self) -> PathBuf;

    /// The server's log so far.
    fn log(&self) -> String;

    /// The venv's python, for boto3 checks.
    fn python(&self) -> PathBuf;

    /// How many KMS requests the server has answered, from its log.
    fn kms_requests(&self) -> usize;

    /// How many S3 `op` requests (`GetObject`, `PutObject`) on
    /// `bucket/key` the server has answered with `status`, from its log.
    fn s3_answers(&self, op: &str, bucket: &str, key: &str, status: u16) -> usize;

    /// Stops the server (by its PID) and waits for it.
    fn stop(&mut self);

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

/// Waits until the child accepts connections on `port`; false if it exits
/// (e.g. the port was taken) or takes longer than `within`.
pub fn wait_ready(child: &mut Child, port: u16, within: Duration) -> bool {
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
