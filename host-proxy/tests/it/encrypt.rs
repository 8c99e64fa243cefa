//! `keystore-host encrypt` against the KMS emulator: the real CLI and the
//! real `aws-sdk-kms`, over HTTPS with the emulator's test CA.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use aws_sdk_kms::primitives::Blob;
use keystore_host::secrets_file::dotenv::DotEnv;
use keystore_host::secrets_file::encrypt::{EncryptError, Selection, encrypt_file};
use keystore_shared::envelope::{Envelope, NAME_CONTEXT_KEY};
use keystore_tests::kms::{Credential, MockKms, MockKmsConfig, MockKmsHandle, Operation};

use crate::support::ops::sdk_client;

const ACCESS_KEY_ID: &str = "AKIAHOSTENCRYPTTEST1";
const SECRET_ACCESS_KEY: &str = "host-encrypt-test-secret";

async fn emulator(dir: &Path) -> MockKmsHandle {
    let config = MockKmsConfig::new(
        dir.join("tls"),
        vec![Credential::new(ACCESS_KEY_ID, SECRET_ACCESS_KEY)],
    );
    MockKms::start(config).await.unwrap()
}

/// An SDK client for checking results; built the way the CLI builds its own.
async fn client(kms: &MockKmsHandle) -> aws_sdk_kms::Client {
    sdk_client(kms, (ACCESS_KEY_ID, SECRET_ACCESS_KEY))
}

async fn decrypt(
    client: &aws_sdk_kms::Client,
    envelope: &str,
    context_name: &str,
) -> Result<Vec<u8>, String> {
    let env = Envelope::parse(envelope).map_err(|e| e.to_string())?;
    client
        .decrypt()
        .ciphertext_blob(Blob::new(env.ciphertext().to_vec()))
        .encryption_context(NAME_CONTEXT_KEY, context_name)
        .send()
        .await
        .map(|out| out.plaintext.unwrap().into_inner())
        .map_err(|e| {
            format!(
                "{}",
                aws_smithy_types::error::display::DisplayErrorContext(&e)
            )
        })
}

const SAMPLE: &str = "# Production settings\n\
# owner: platform team\n\
\n\
export DB_HOST=db.internal   # not secret, but encrypted too (all by default)\n\
DB_PASSWORD='p@ss word #1'\n\
API_KEY=\"multi\\nline\"\n\
EMPTY=\n\
\n\
# end\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_encrypts_every_plain_value_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let kms = emulator(dir.path()).await;
    let client = client(&kms).await;
    let key_id = kms.create_key(None).unwrap().key_id;
    let path = dir.path().join(".env");
    std::fs::write(&path, SAMPLE).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();

    let run = || {
        Command::new(env!("CARGO_BIN_EXE_keystore-host"))
            .args(["encrypt", "--per-value-kms", "--key-id", &key_id])
            .arg(&path)
            .args([
                "--region",
                kms.region(),
                "--endpoint-url",
                kms.endpoint_url(),
            ])
            .arg("--ca-bundle")
            .arg(kms.ca_pem_path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", dir.path())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
            .env("AWS_CONFIG_FILE", dir.path().join("no-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                dir.path().join("no-credentials"),
            )
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap()
    };
    let out = tokio::task::block_in_place(run);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(!stderr.contains("p@ss word") && !stdout.contains("p@ss word"));

    let text = std::fs::read_to_string(&path).unwrap();
    let file = DotEnv::parse(text.as_bytes()).unwrap();
    // Comments, blank lines, prefixes and trailing comments are untouched.
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| l.is_empty() || l.starts_with('#'))
        .collect();
    assert_eq!(
        kept,
        [
            "# Production settings",
            "# owner: platform team",
            "",
            "",
            "# end"
        ]
    );
    assert!(text.contains("export DB_HOST=ENC[v1:kms:"), "{text}");
    assert!(text.contains("   # not secret, but encrypted too (all by default)\n"));
    assert!(text.contains("DB_PASSWORD='ENC[v1:kms:"), "{text}");
    assert!(text.contains("API_KEY=\"ENC[v1:kms:"), "{text}");
    assert!(text.contains("\nEMPTY=\n"), "{text}");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o640
    );

    for (name, original) in [
        ("DB_HOST", "db.internal"),
        ("DB_PASSWORD", "p@ss word #1"),
        ("API_KEY", "multi\nline"),
    ] {
        let envelope = file.get(name).unwrap();
        let plain = decrypt(&client, envelope, name).await.unwrap();
        assert_eq!(plain, original.as_bytes(), "{name}");
        // Bound to its name: under another name's context it fails.
        let err = decrypt(&client, envelope, "OTHER_NAME").await.unwrap_err();
        assert!(err.contains("InvalidCiphertextException"), "{err}");
    }

    // A second run changes nothing.
    let out = tokio::task::block_in_place(run);
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    assert!(String::from_utf8_lossy(&out.stdout).contains("unchanged DB_PASSWORD"));
    kms.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selection_sizes_and_failures_leave_the_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let kms = emulator(dir.path()).await;
    let client = client(&kms).await;
    let key_id = kms.create_key(None).unwrap().key_id;
    let path = dir.path().join("app.env");

    // Only names matching a glob are encrypted.
    std::fs::write(&path, "DB_USER=app\nDB_PASSWORD=hunter2\nLOG=debug\n").unwrap();
    let report = encrypt_file(
        &client,
        &key_id,
        &path,
        &Selection::patterns(vec!["*PASSWORD".into()]),
    )
    .await
    .unwrap();
    assert_eq!(report.encrypted, ["DB_PASSWORD"]);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.starts_with("DB_USER=app\nDB_PASSWORD=ENC[v1:kms:"),
        "{text}"
    );
    assert!(text.ends_with("]\nLOG=debug\n"), "{text}");

    // A value over 4 KiB is refused before any KMS call; nothing changes.
    let before = format!("SMALL=x\nBIG={}\n", "a".repeat(4097));
    std::fs::write(&path, &before).unwrap();
    let err = encrypt_file(&client, &key_id, &path, &Selection::all())
        .await
        .unwrap_err();
    assert!(
        matches!(err, EncryptError::TooLarge { len: 4097, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("BIG (line 2)"), "{err}");
    assert!(!err.to_string().contains("aaaa"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);

    // KMS refusing (unknown key) leaves the file as it was.
    std::fs::write(&path, "A=1\nB=2\n").unwrap();
    let err = encrypt_file(
        &client,
        "00000000-0000-0000-0000-000000000000",
        &path,
        &Selection::all(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, EncryptError::Kms { .. }), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "A=1\nB=2\n");
    // No temporary files are left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("keystore-tmp"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
    kms.shutdown().await;
}

/// Runs `keystore-host encrypt` against the emulator with `args` after the
/// key id, in a clean environment holding only the test credentials.
fn encrypt_cli(
    kms: &MockKmsHandle,
    dir: &Path,
    key_id: &str,
    args: &[&std::ffi::OsStr],
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keystore-host"))
        .args(["encrypt", "--key-id", key_id])
        // These tests are about per-value KMS envelopes; the file key has
        // its own (file_key.rs).
        .args(if args.iter().any(|a| *a == "--file-key") {
            &[][..]
        } else {
            &["--per-value-kms"][..]
        })
        .args(args)
        .args([
            "--region",
            kms.region(),
            "--endpoint-url",
            kms.endpoint_url(),
        ])
        .arg("--ca-bundle")
        .arg(kms.ca_pem_path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
        .env("AWS_CONFIG_FILE", dir.join("no-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.join("no-credentials"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap()
}

const ACCESS_YAML: &str = "\
# who may read what
rules:
  - who: { user: api }
    read: [\"DB_*\", API_TOKEN]
  - who: { unit: worker.service }
    read: [QUEUE_URL]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_checked_encrypted_bound_to_their_name_and_replaced_on_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let kms = emulator(dir.path()).await;
    let client = client(&kms).await;
    let key_id = kms.create_key(None).unwrap().key_id;
    let path = dir.path().join(".env");
    let rules_path = dir.path().join("access.yaml");
    std::fs::write(&path, "DB_PASSWORD=hunter2\nAPI_TOKEN=tok").unwrap();
    std::fs::write(&rules_path, ACCESS_YAML).unwrap();
    let args = [path.as_os_str(), "--rules".as_ref(), rules_path.as_os_str()];

    let out = tokio::task::block_in_place(|| encrypt_cli(&kms, dir.path(), &key_id, &args));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("encrypted keystore:rules (2 rule(s), added)"),
        "{stdout}"
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let file = DotEnv::parse(text.as_bytes()).unwrap();
    let names: Vec<_> = file.entries().map(|e| e.name).collect();
    assert_eq!(names, ["DB_PASSWORD", "API_TOKEN", "keystore:rules"]);
    assert!(
        text.contains("\n# access rules: written by `keystore-host encrypt --rules`\nkeystore:rules=ENC[v1:kms:"),
        "{text}"
    );
    // The entry is the canonical JSON, bound to the reserved name.
    let expected = keystore_host::secrets_file::rules::parse_rules(ACCESS_YAML.as_bytes())
        .unwrap()
        .to_json();
    let envelope = file.get("keystore:rules").unwrap();
    assert_eq!(
        decrypt(&client, envelope, "keystore:rules").await.unwrap(),
        expected
    );
    assert_eq!(
        std::str::from_utf8(&expected).unwrap(),
        r#"{"rules":[{"who":{"user":"api"},"read":["DB_*","API_TOKEN"]},{"who":{"unit":"worker.service"},"read":["QUEUE_URL"]}]}"#
    );
    let err = decrypt(&client, envelope, "DB_PASSWORD").await.unwrap_err();
    assert!(err.contains("InvalidCiphertextException"), "{err}");

    // A second run with changed rules replaces the entry in place; the
    // values, already encrypted, stay as they are.
    std::fs::write(
        &rules_path,
        "rules:\n  - who: { uid: 0 }\n    read: ['*']\n",
    )
    .unwrap();
    let out = tokio::task::block_in_place(|| encrypt_cli(&kms, dir.path(), &key_id, &args));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("encrypted keystore:rules (1 rule(s), replaced)"),
        "{stdout}"
    );
    assert!(stdout.contains("unchanged DB_PASSWORD"), "{stdout}");
    let again = std::fs::read_to_string(&path).unwrap();
    let file2 = DotEnv::parse(again.as_bytes()).unwrap();
    assert_eq!(file2.len(), 3);
    assert_eq!(again.matches("keystore:rules=").count(), 1);
    assert_eq!(file2.get("DB_PASSWORD"), file.get("DB_PASSWORD"));
    assert_eq!(
        decrypt(
            &client,
            file2.get("keystore:rules").unwrap(),
            "keystore:rules"
        )
        .await
        .unwrap(),
        br#"{"rules":[{"who":{"uid":0},"read":["*"]}]}"#
    );
    // Without --rules the entry is left alone (it is not a value).
    let out =
        tokio::task::block_in_place(|| encrypt_cli(&kms, dir.path(), &key_id, &[path.as_os_str()]));
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), again);
    kms.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rules_and_reserved_names_are_refused_before_any_kms_call() {
    let dir = tempfile::tempdir().unwrap();
    let kms = emulator(dir.path()).await;
    let key_id = kms.create_key(None).unwrap().key_id;
    let path = dir.path().join(".env");
    let rules_path = dir.path().join("access.yaml");
    let before = "DB_PASSWORD=hunter2\n";
    std::fs::write(&path, before).unwrap();
    kms.reset_calls();

    for (yaml, needle) in [
        (
            "rules:\n  - who: { user: api }\n    read: [A]\n  - who: { usr: x }\n    read: [B]\n",
            "unknown variant `usr`",
        ),
        (
            "rules:\n  - who: any\n    read: [A]\n  - who: { user: api }\n    read: []\n",
            "rule 2: `read` is empty",
        ),
        (
            "rules:\n  - who: { user: api }\n    read: ['keystore:*']\n",
            "rule 1: name pattern \"keystore:*\"",
        ),
        (
            "rules:\n  - who: { user: api }\n    grant: [A]\n",
            "unknown field `grant`",
        ),
    ] {
        std::fs::write(&rules_path, yaml).unwrap();
        let out = tokio::task::block_in_place(|| {
            encrypt_cli(
                &kms,
                dir.path(),
                &key_id,
                &[path.as_os_str(), "--rules".as_ref(), rules_path.as_os_str()],
            )
        });
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{yaml}");
        assert!(stderr.contains(needle), "{yaml}: {stderr}");
        assert!(stderr.contains("access.yaml"), "{stderr}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
    }
    assert_eq!(kms.calls(Operation::Encrypt).calls, 0);

    // Rules too large for KMS Encrypt once encoded: refused, file unchanged.
    let many: String = (0..200)
        .map(|i| format!("  - who: {{ user: user{i} }}\n    read: [NAME_{i}]\n"))
        .collect();
    std::fs::write(&rules_path, format!("rules:\n{many}")).unwrap();
    let out = tokio::task::block_in_place(|| {
        encrypt_cli(
            &kms,
            dir.path(),
            &key_id,
            &[path.as_os_str(), "--rules".as_ref(), rules_path.as_os_str()],
        )
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("KMS encrypts at most 4096 bytes"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);

    // A plain `keystore:rules` line is refused, not encrypted as a value;
    // any other `keystore:` name does not parse.
    let client = client(&kms).await;
    for (text, needle) in [
        (
            "A=1\nkeystore:rules={\"rules\":[]}\n",
            "keystore:rules (line 2) is not encrypted",
        ),
        (
            "A=1\nkeystore:mine=x\n",
            "line 2: names starting with `keystore:` are reserved",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let err = encrypt_file(&client, &key_id, &path, &Selection::all())
            .await
            .unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }
    assert_eq!(kms.calls(Operation::Encrypt).calls, 0);
    kms.shutdown().await;
}

/// JSON and YAML through the CLI: values bound to their dotted paths, the
/// rules entry as a top-level key (added, then replaced in place), plain
/// settings and comments kept, and a plain reserved key or a bad file
/// refused before any KMS call with the file, line and path named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_yaml_values_are_bound_to_their_paths_with_rules_at_the_top() {
    use keystore_host::secrets_file::{Format, SecretsFile};
    let dir = tempfile::tempdir().unwrap();
    let kms = emulator(dir.path()).await;
    let client = client(&kms).await;
    let key_id = kms.create_key(None).unwrap().key_id;
    let rules_path = dir.path().join("access.yaml");
    std::fs::write(&rules_path, ACCESS_YAML).unwrap();

    for (name, format, text) in [
        (
            "s.yaml",
            Format::Yaml,
            "# top\ndb:\n  password: hunter2 # inline\n  port: 5432\nlist: [\"x-1\"]\n",
        ),
        (
            "s.json",
            Format::Json,
            "{\n  \"db\": {\"password\": \"hunter2\", \"port\": 5432},\n  \"list\": [\"x-1\"]\n}\n",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let args = [path.as_os_str(), "--rules".as_ref(), rules_path.as_os_str()];
        let out = tokio::task::block_in_place(|| encrypt_cli(&kms, dir.path(), &key_id, &args));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("encrypted db.password"), "{stdout}");
        assert!(stdout.contains("encrypted list.0"), "{stdout}");
        assert!(stdout.contains("(2 rule(s), added)"), "{stdout}");
        let sealed = std::fs::read_to_string(&path).unwrap();
        assert!(!sealed.contains("hunter2"), "{sealed}");
        assert!(sealed.contains("5432"), "{sealed}");
        let file = SecretsFile::parse(sealed.as_bytes(), format).unwrap();
        let names: Vec<_> = file.values().map(|v| v.name.to_owned()).collect();
        assert_eq!(
            names,
            ["db.password", "db.port", "list.0", "keystore:rules"]
        );
        // Bound to the path: decrypts under `db.password`, not elsewhere.
        let envelope = file.get("db.password").unwrap();
        assert_eq!(
            decrypt(&client, envelope, "db.password").await.unwrap(),
            b"hunter2"
        );
        assert!(decrypt(&client, envelope, "list.0").await.is_err());
        assert!(
            decrypt(
                &client,
                file.get("keystore:rules").unwrap(),
                "keystore:rules"
            )
            .await
            .is_ok()
        );
        if format == Format::Yaml {
            assert!(
                sealed.starts_with("# top\ndb:\n  password: ENC[v1:kms:"),
                "{sealed}"
            );
            assert!(sealed.contains("] # inline\n  port: 5432\n"), "{sealed}");
        }

        // Re-run: the rules entry is replaced in place, the values stay.
        let out = tokio::task::block_in_place(|| encrypt_cli(&kms, dir.path(), &key_id, &args));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(stdout.contains("(2 rule(s), replaced)"), "{stdout}");
        let again = std::fs::read_to_string(&path).unwrap();
        assert_eq!(again.matches("keystore:rules").count(), 1, "{again}");
        let file2 = SecretsFile::parse(again.as_bytes(), format).unwrap();
        assert_eq!(file2.get("db.password"), file.get("db.password"));
        assert_ne!(file2.get("keystore:rules"), file.get("keystore:rules"));
    }

    // Refusals name the file, line and path, never a value; nothing is
    // written and KMS is not called.
    let before = kms.calls(Operation::Encrypt).calls;
    for (name, text, needle) in [
        (
            "dup.json",
            "{\"a\": {\"pw\": \"hunter2\"},\n \"a\": 1}",
            "dup.json: line 2: a is already defined on line 1",
        ),
        (
            "alias.yaml",
            "a: &pw hunter2\nb: *pw\n",
            "alias.yaml: line 1: anchors (at a) are not supported",
        ),
        (
            "plain-rules.json",
            "{\"keystore:rules\": \"hunter2\"}",
            "keystore:rules (line 1) is not encrypted",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = tokio::task::block_in_place(|| {
            encrypt_cli(&kms, dir.path(), &key_id, &[path.as_os_str()])
        });
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success());
        assert!(stderr.contains(needle), "{name}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }
    assert_eq!(kms.calls(Operation::Encrypt).calls, before);
    kms.shutdown().await;
}
