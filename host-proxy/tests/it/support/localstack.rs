//! LocalStack (PyPI `localstack-core[runtime]`), a second KMS and S3
//! implementation nobody on this project wrote, run without Docker on
//! 127.0.0.1 over HTTPS with a test CA (see `../shared/PEERS.md`).
//!
//! It needs Python ≥ 3.12 with its `venv` module: the newest pyenv
//! version that qualifies, else `python3.14`, `python3.13`, `python3.12`
//! or `python3` on `PATH` (each checked); if none does, the failure says
//! which Debian packages to install. The venv is created once under
//! `~/.cache/nitro-keystore` under a `flock`, with the pins LocalStack
//! 2026.3.0 needs. If it cannot be installed the test fails with pip's
//! output: these tests never skip silently.
//!
//! Settings, each for a reason: `GATEWAY_SERVER=hypercorn` with
//! `GATEWAY_LISTEN=127.0.0.1:PORT` (the default server binds 0.0.0.0);
//! `CUSTOM_SSL_CERT_PATH` = the test PKI's key and certificate (otherwise
//! it serves a self-signed one it writes to a global cache);
//! `FILESYSTEM_ROOT` = the test's dir (nothing written outside it);
//! `SKIP_SSL_CERT_DOWNLOAD`, `DISABLE_EVENTS`, `DNS_ADDRESS=0` (no network
//! calls, no DNS server).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use keystore_tests::tls::{SERVER_CERT_FILE, SERVER_KEY_FILE, TestPki};

use super::peer::{AwsPeer, PeerProcess, REGION, cache_dir, install_venv};

/// The LocalStack release these tests were written against.
pub const LOCALSTACK_VERSION: &str = "2026.3.0";

/// The venv holding LocalStack, created if missing.
pub fn venv() -> PathBuf {
    let venv = cache_dir().join(format!("localstack-venv-{LOCALSTACK_VERSION}"));
    let script = format!(
        r#"set -e
check() {{ "$1/bin/python" -c 'import localstack.runtime.main, boto3' 2>/dev/null; }}
if [ -x "$1/bin/python" ] && check "$1"; then exit 0; fi
# Any Python >= 3.12 with venv: pyenv's versions (newest first), then PATH.
ok() {{ "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }}
py=
root=$(pyenv root 2>/dev/null || true)
versions=
if [ -n "$root" ] && [ -d "$root/versions" ]; then
  versions=$(ls -1 "$root/versions" | sort -t. -k1,1nr -k2,2nr -k3,3nr)
fi
for c in $(for v in $versions; do echo "$root/versions/$v/bin/python3"; done) \
    python3.14 python3.13 python3.12 python3; do
  if command -v "$c" >/dev/null 2>&1 && ok "$c"; then py=$c; break; fi
done
[ -n "$py" ] || {{
  echo "LocalStack needs Python >= 3.12 with its venv module; none found (tried pyenv's" \
    "versions under ${{root:-<no pyenv>}}, python3.14, python3.13, python3.12, python3 on PATH)." \
    "Install one from Debian, e.g. apt-get install python3.13 python3.13-venv" \
    "(or python3.12 python3.12-venv), or any pyenv version 3.12 or newer." >&2
  exit 1
}}
echo "using $py for the LocalStack venv" >&2
rm -rf "$1"
"$py" -m venv "$1"
"$1/bin/pip" install --disable-pip-version-check -q 'localstack-core[runtime]=={LOCALSTACK_VERSION}' \
  'cbor2<6' 'cryptography==44.0.3' 'pyopenssl==24.3.0' service-identity boto3
check "$1"
"#
    );
    install_venv(
        "localstack-venv.lock",
        &venv,
        &script,
        &format!("localstack-core[runtime]=={LOCALSTACK_VERSION}"),
    );
    venv
}

/// A running LocalStack, killed (by its PID) when dropped.
pub struct LocalStack {
    process: PeerProcess,
}

impl LocalStack {
    /// Starts LocalStack with KMS and S3 on 127.0.0.1 over HTTPS with a
    /// fresh test CA under `dir`, and waits until it answers (it takes
    /// about half a minute to start).
    pub fn start(dir: &Path) -> LocalStack {
        let venv = venv();
        let pki = TestPki::create(dir.join("localstack-tls")).unwrap();
        // LocalStack reads one PEM with the key and the certificate.
        let combined = dir.join("localstack-server.pem");
        let mut pem = std::fs::read(pki.dir().join(SERVER_KEY_FILE)).unwrap();
        pem.extend(std::fs::read(pki.dir().join(SERVER_CERT_FILE)).unwrap());
        std::fs::write(&combined, pem).unwrap();
        let root = dir.join("localstack-fs");
        std::fs::create_dir_all(&root).unwrap();
        let log = dir.join("localstack.log");
        let process = PeerProcess::start(
            "LocalStack",
            pki,
            log,
            3,
            Duration::from_secs(180),
            |port| {
                let listen = format!("127.0.0.1:{port}");
                let mut command = Command::new(venv.join("bin/python"));
                command
                    .args(["-m", "localstack.runtime.main"])
                    .env_clear()
                    .env("PATH", std::env::var("PATH").unwrap_or_default())
                    .env("HOME", std::env::var("HOME").unwrap_or_default())
                    .env("GATEWAY_SERVER", "hypercorn")
                    .env("GATEWAY_LISTEN", &listen)
                    .env("LOCALSTACK_HOST", &listen)
                    .env("SERVICES", "kms,s3")
                    .env("EAGER_SERVICE_LOADING", "1")
                    .env("DNS_ADDRESS", "0")
                    .env("SKIP_SSL_CERT_DOWNLOAD", "1")
                    .env("DISABLE_EVENTS", "1")
                    .env("FILESYSTEM_ROOT", &root)
                    .env("CUSTOM_SSL_CERT_PATH", &combined)
                    .env("AWS_DEFAULT_REGION", REGION);
                command
            },
        );
        LocalStack { process }
    }
}

impl AwsPeer for LocalStack {
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
        self.log().matches("AWS kms.").count()
    }

    fn s3_answers(&self, op: &str, _bucket: &str, _key: &str, status: u16) -> usize {
        // Its request log names the operation, not the object.
        self.log()
            .matches(&format!("AWS s3.{op} => {status}"))
            .count()
    }
}
