//! `keystore-host decrypt` (break-glass) and the `--rotator` key policy,
//! against the KMS emulator evaluating the generated policy: the operator
//! cannot get plaintext, the rotation principal can, only with
//! `--yes-print-secrets`, and a tampered file is refused by name.
#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;

use keystore_host::secrets_file::unseal::{OpsError, decrypt_file};
use keystore_host::secrets_file::{Format, SecretsFile};
use keystore_tests::kms::Operation;

use crate::support::ops::{OPERATOR, Ops, ROTATOR, assert_ok, stderr};

const JSON: &str = "{\n  \"service\": \"billing\",\n  \"port\": 8443,\n  \"db\": {\"password\": \"p@ss \\\"word\\\"\", \"user\": \"app\"},\n  \"tokens\": [\"tök-0\", \"tok-1\"]\n}\n";

/// The (name, value) pairs of a file's values.
fn values(text: &str, format: Format) -> Vec<(String, String)> {
    SecretsFile::parse(text.as_bytes(), format)
        .unwrap()
        .values()
        .filter(|v| !v.name.starts_with("keystore:"))
        .map(|v| (v.name.to_owned(), v.value.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decrypt_needs_the_flag_and_a_rotator_and_prints_the_file_in_its_format() {
    let dir = tempfile::tempdir().unwrap();
    let ops = Ops::start(dir.path()).await;
    let path = dir.path().join("secrets.json");
    std::fs::write(&path, JSON).unwrap();
    // JSON gets a file key by default now.
    let stdout = ops.encrypt(&path, &[]);
    assert!(stdout.contains("version 1"), "{stdout}");
    let sealed = std::fs::read_to_string(&path).unwrap();
    assert!(sealed.contains("\"password\": \"ENC[v1:fk:"), "{sealed}");
    assert!(!sealed.contains("p@ss"), "{sealed}");

    // Without the flag: exit 2, no KMS call at all.
    ops.kms.reset_calls();
    let file = [path.as_os_str()];
    let out = ops.cli(ROTATOR, "decrypt", &file, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--yes-print-secrets"));
    assert!(out.stdout.is_empty());
    assert!(ops.kms.all_calls().values().all(|c| c.calls == 0));

    // The operator (encrypt principal) is denied by the policy's deny on
    // Decrypt without attestation; the error names --rotator.
    let args = [path.as_os_str(), OsStr::new("--yes-print-secrets")];
    let out = ops.cli(OPERATOR, "decrypt", &args, &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("releases plaintext only to the attested enclave"),
        "{err}"
    );
    assert!(err.contains("--rotator"), "{err}");
    assert!(err.contains("DenyDecryptWithoutAttestation"), "{err}");
    assert!(out.stdout.is_empty());

    // The rotator: the file in JSON with plaintext values, one Decrypt for
    // the whole file.
    ops.kms.reset_calls();
    let out = ops.cli(ROTATOR, "decrypt", &args, &[]);
    assert_ok(&out);
    assert_eq!(ops.kms.calls(Operation::Decrypt).calls, 1);
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(values(&text, Format::Json), values(JSON, Format::Json));
    assert!(text.starts_with("{\n  \"service\": \"billing\",\n  \"port\": 8443,\n  \"db\": {\"password\": \"p@ss \\\"word\\\"\""), "{text}");
    assert!(
        stderr(&out).contains("WARNING: 5 secret value(s)"),
        "{}",
        stderr(&out)
    );
    // The file itself is untouched.
    assert_eq!(std::fs::read_to_string(&path).unwrap(), sealed);

    // -o: written 0600, replacing a wider file atomically.
    let out_path = dir.path().join("plain.json");
    std::fs::write(&out_path, "old").unwrap();
    std::fs::set_permissions(&out_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let args = [
        path.as_os_str(),
        OsStr::new("--yes-print-secrets"),
        OsStr::new("-o"),
        out_path.as_os_str(),
    ];
    let out = ops.cli(ROTATOR, "decrypt", &args, &[]);
    assert_ok(&out);
    assert!(out.stdout.is_empty());
    assert_eq!(std::fs::read_to_string(&out_path).unwrap(), text);
    let mode = std::fs::metadata(&out_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // -o naming the sealed file itself is refused before any KMS call.
    ops.kms.reset_calls();
    let args = [
        path.as_os_str(),
        OsStr::new("--yes-print-secrets"),
        OsStr::new("-o"),
        path.as_os_str(),
    ];
    let out = ops.cli(ROTATOR, "decrypt", &args, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the sealed file itself"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), sealed);
    assert_eq!(ops.kms.calls(Operation::Decrypt).calls, 0);
    // A new file is 0600 too, and no temporary file is left behind.
    let fresh = dir.path().join("fresh.json");
    let args = [
        path.as_os_str(),
        OsStr::new("--yes-print-secrets"),
        OsStr::new("-o"),
        fresh.as_os_str(),
    ];
    assert_ok(&ops.cli(ROTATOR, "decrypt", &args, &[]));
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("keystore-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    ops.kms.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yaml_with_kms_and_fk_values_decrypts_and_tampering_is_refused_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let ops = Ops::start(dir.path()).await;
    let path = dir.path().join("secrets.yaml");
    let yaml =
        "# app\ndb:\n  password: 'p@ss word'   # kept\n  port: 5432\napi: key-1\nlegacy: old-kms\n";
    std::fs::write(&path, yaml).unwrap();
    // One value per KMS Encrypt, then the rest under a file key whose
    // record names the kms value too.
    ops.encrypt(&path, &["--per-value-kms", "--keys", "legacy"]);
    ops.encrypt(&path, &["--file-key"]);
    let sealed = std::fs::read_to_string(&path).unwrap();
    assert!(sealed.contains("legacy: ENC[v1:kms:"), "{sealed}");
    assert!(sealed.contains("api: ENC[v1:fk:"), "{sealed}");

    let client = ops.client(ROTATOR);
    let plain = decrypt_file(&client, &path, Format::Yaml).await.unwrap();
    assert_eq!(plain.revealed, ["db.password", "api", "legacy"]);
    assert!(
        plain
            .text
            .starts_with("# app\ndb:\n  password: 'p@ss word'   # kept\n  port: 5432\napi: key-1\nlegacy: old-kms\n"),
        "{}",
        &*plain.text
    );
    // The reserved record stays (sealed): `encrypt` of the output goes on
    // from its version.
    assert!(plain.text.contains("keystore:file: ENC[v1:file:"));

    // Swap two fk values: refused naming the path.
    let line = |key: &str| {
        sealed
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap()
            .to_owned()
    };
    let api = line("api:");
    let password = line("password:");
    let api_env = api.trim_start_matches("api: ");
    let pw_env = password
        .trim_start_matches("  password: '")
        .split('\'')
        .next()
        .unwrap();
    let swapped = sealed
        .replace(api_env, "@@API@@")
        .replace(pw_env, api_env)
        .replace("@@API@@", pw_env);
    std::fs::write(&path, &swapped).unwrap();
    let err = decrypt_file(&client, &path, Format::Yaml)
        .await
        .unwrap_err();
    assert!(matches!(err, OpsError::Manifest { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(
        message.contains("`api`") || message.contains("`db.password`"),
        "{message}"
    );
    assert!(
        message.contains("swapped, moved or rolled back"),
        "{message}"
    );
    assert!(!message.contains("p@ss"), "{message}");

    // Drop a value: refused, named as dropped.
    let dropped: String = sealed
        .lines()
        .filter(|l| !l.starts_with("legacy:"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&path, &dropped).unwrap();
    let err = decrypt_file(&client, &path, Format::Yaml)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("`legacy`"), "{err}");
    assert!(err.to_string().contains("dropped"), "{err}");

    // An edited record: its MAC no longer holds.
    let record = line("keystore:file:");
    let envelope = record.trim_start_matches("keystore:file: ");
    let body = envelope
        .trim_start_matches("ENC[v1:file:")
        .trim_end_matches(']');
    use base64::Engine as _;
    let mut raw = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    // The version field (after format and file id): 1 -> 9.
    raw[1 + 16 + 7] = 9;
    let forged = format!(
        "ENC[v1:file:{}]",
        base64::engine::general_purpose::STANDARD.encode(&raw)
    );
    std::fs::write(&path, sealed.replace(envelope, &forged)).unwrap();
    let err = decrypt_file(&client, &path, Format::Yaml)
        .await
        .unwrap_err();
    assert!(matches!(err, OpsError::Tampered { .. }), "{err}");
    assert!(err.to_string().contains("MAC mismatch"), "{err}");
    assert!(err.to_string().contains("keystore:file"), "{err}");

    // The intact file still decrypts.
    std::fs::write(&path, &sealed).unwrap();
    decrypt_file(&client, &path, Format::Yaml).await.unwrap();
    ops.kms.shutdown().await;
}
