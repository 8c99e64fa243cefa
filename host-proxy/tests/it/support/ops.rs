//! The KMS emulator set up for `decrypt`, `rotate` and `edit`: a key whose
//! policy is the generated one (`keystore-host policy`) with an operator
//! (`--encrypt-principal`) and a rotation principal (`--rotator`), each with
//! its own access key, and the CLI run as either.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use keystore_host::policy::{Measurements, PolicySpec, key_policy};
use keystore_tests::kms::{Credential, DEFAULT_ACCOUNT, MockKms, MockKmsConfig, MockKmsHandle};

/// The operator: may `Encrypt` and `GenerateDataKey`, never `Decrypt`.
pub const OPERATOR: (&str, &str) = ("AKIAOPSOPERATOR00001", "ops-operator-secret");
/// The rotation principal.
pub const ROTATOR: (&str, &str) = ("AKIAOPSROTATOR000001", "ops-rotator-secret");

/// The emulator's ARN for a caller (`arn:aws:iam::ACCOUNT:user/KEY_ID`).
pub fn arn_of(access_key: &str) -> String {
    format!("arn:aws:iam::{DEFAULT_ACCOUNT}:user/{access_key}")
}

/// A running emulator and its keys.
pub struct Ops {
    pub kms: MockKmsHandle,
    /// A key with the generated policy and `ROTATOR` as `--rotator`.
    pub key_id: String,
    /// A second such key (for `rotate --key-id`).
    pub other_key_id: String,
    pub dir: PathBuf,
}

/// The generated key policy for an enclave we never run, with the
/// operator and the rotator.
pub fn generated_policy(rotators: &[&str]) -> String {
    let hex = "ab".repeat(48);
    let json = format!(r#"{{"PCR0":"{hex}","PCR1":"{hex}","PCR2":"{hex}"}}"#);
    let spec = PolicySpec {
        current: Some(Measurements::from_json(&json).unwrap()),
        enclave_principals: vec![format!("arn:aws:iam::{DEFAULT_ACCOUNT}:role/parent")],
        admin_principals: vec![format!("arn:aws:iam::{DEFAULT_ACCOUNT}:role/admin")],
        encrypt_principals: vec![arn_of(OPERATOR.0)],
        rotator_principals: rotators.iter().map(|r| arn_of(r)).collect(),
        ..PolicySpec::default()
    };
    key_policy(&spec).unwrap().to_string()
}

impl Ops {
    pub async fn start(dir: &Path) -> Ops {
        let config = MockKmsConfig::new(
            dir.join("kms-tls"),
            vec![
                Credential::new(OPERATOR.0, OPERATOR.1),
                Credential::new(ROTATOR.0, ROTATOR.1),
            ],
        );
        let kms = MockKms::start(config).await.unwrap();
        let policy = generated_policy(&[ROTATOR.0]);
        let key_id = kms.create_key(Some(&policy)).unwrap().arn;
        let other_key_id = kms.create_key(Some(&policy)).unwrap().arn;
        Ops {
            kms,
            key_id,
            other_key_id,
            dir: dir.to_owned(),
        }
    }

    /// An SDK client signing as `who`.
    pub fn client(&self, who: (&str, &str)) -> aws_sdk_kms::Client {
        sdk_client(&self.kms, who)
    }

    /// `keystore-host COMMAND ARGS... --region ... --endpoint-url ...
    /// --ca-bundle ...` as `who`, with `env` added to a clean environment.
    pub fn cli<S: AsRef<OsStr>>(
        &self,
        who: (&str, &str),
        command: &str,
        args: &[S],
        env: &[(&str, &OsStr)],
    ) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keystore-host"));
        cmd.arg(command)
            .args(args)
            .args([
                "--region",
                self.kms.region(),
                "--endpoint-url",
                self.kms.endpoint_url(),
            ])
            .arg("--ca-bundle")
            .arg(self.kms.ca_pem_path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.dir)
            .env("AWS_ACCESS_KEY_ID", who.0)
            .env("AWS_SECRET_ACCESS_KEY", who.1)
            .env("AWS_CONFIG_FILE", self.dir.join("no-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                self.dir.join("no-credentials"),
            )
            .env("AWS_EC2_METADATA_DISABLED", "true");
        for (k, v) in env {
            cmd.env(k, v);
        }
        tokio::task::block_in_place(|| cmd.output().unwrap())
    }

    /// `encrypt --key-id KEY FILE EXTRA...` as the operator; must succeed.
    pub fn encrypt(&self, file: &Path, extra: &[&str]) -> String {
        let mut args: Vec<&OsStr> = vec![OsStr::new("--key-id"), OsStr::new(&self.key_id)];
        args.push(file.as_os_str());
        args.extend(extra.iter().map(OsStr::new));
        let out = self.cli(OPERATOR, "encrypt", &args, &[]);
        assert_ok(&out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// An SDK client of the emulator `kms` signing as `who` (access key id,
/// secret), over HTTPS trusting the emulator's CA: built the way the CLI
/// builds its own.
pub fn sdk_client(kms: &MockKmsHandle, who: (&str, &str)) -> aws_sdk_kms::Client {
    let ca = std::fs::read(kms.ca_pem_path()).unwrap();
    let http = keystore_host::aws::https_client(Some(ca)).unwrap();
    let config = aws_sdk_kms::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(kms.region().to_owned()))
        .endpoint_url(kms.endpoint_url())
        .credentials_provider(Credentials::new(who.0, who.1, None, None, "test"))
        .http_client(http)
        .build();
    aws_sdk_kms::Client::from_conf(config)
}

/// Asserts the command succeeded, showing its output if not.
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The command's stderr.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
