//! `keystore-host rotate` against the KMS emulator evaluating the
//! generated key policy: a new data key and file id, version + 1, `fk`
//! values sealed again, `kms` values moved with `ReEncrypt` only on
//! `--key-id`, and a failure anywhere leaves the file byte for byte.
#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;

use aws_sdk_kms::primitives::Blob;
use keystore_host::secrets_file::rotate::rotate_file;
use keystore_host::secrets_file::unseal::{OpsError, decrypt_file};
use keystore_host::secrets_file::{Format, SecretsFile};
use keystore_shared::envelope::Envelope;
use keystore_shared::file_record::FileRecord;
use keystore_shared::name::FILE_NAME;
use keystore_tests::kms::{Fault, Operation};

use crate::support::ops::{OPERATOR, Ops, ROTATOR, assert_ok, stderr};

fn record_of(text: &str, format: Format) -> FileRecord {
    let file = SecretsFile::parse(text.as_bytes(), format).unwrap();
    let envelope = Envelope::parse(file.get(FILE_NAME).unwrap()).unwrap();
    FileRecord::decode(envelope.ciphertext()).unwrap()
}

fn value_of(text: &str, format: Format, name: &str) -> String {
    SecretsFile::parse(text.as_bytes(), format)
        .unwrap()
        .get(name)
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_makes_new_key_material_and_moves_kms_values_only_with_key_id() {
    let dir = tempfile::tempdir().unwrap();
    let ops = Ops::start(dir.path()).await;
    let path = dir.path().join("secrets.yaml");
    let yaml = "# app\ndb:\n  password: \"p@ss\"\n  port: 5432\nbig: |\n  line one\n  line two\nlegacy: old-kms\n";
    std::fs::write(&path, yaml).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    ops.encrypt(&path, &["--per-value-kms", "--keys", "legacy"]);
    ops.encrypt(&path, &["--file-key"]);
    let v1 = std::fs::read_to_string(&path).unwrap();
    let record1 = record_of(&v1, Format::Yaml);
    let before = decrypt_file(&ops.client(ROTATOR), &path, Format::Yaml)
        .await
        .unwrap();

    // The operator cannot rotate: the policy denies it Decrypt.
    let file = [path.as_os_str()];
    let out = ops.cli(OPERATOR, "rotate", &file, &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--rotator"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), v1);

    // The rotator: one Decrypt (the data key), one GenerateDataKey, no
    // ReEncrypt; kms values untouched.
    ops.kms.reset_calls();
    let out = ops.cli(ROTATOR, "rotate", &file, &[]);
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("resealed db.password"), "{stdout}");
    assert!(stdout.contains("version 2"), "{stdout}");
    assert_eq!(ops.kms.calls(Operation::Decrypt).calls, 1);
    assert_eq!(ops.kms.calls(Operation::GenerateDataKey).calls, 1);
    assert_eq!(ops.kms.calls(Operation::ReEncrypt).calls, 0);
    let v2 = std::fs::read_to_string(&path).unwrap();
    let record2 = record_of(&v2, Format::Yaml);
    assert_eq!(record2.version, 2);
    assert_ne!(record2.file_id, record1.file_id);
    assert_ne!(record2.wrapped_key, record1.wrapped_key);
    for name in ["db.password", "big"] {
        assert_ne!(
            value_of(&v2, Format::Yaml, name),
            value_of(&v1, Format::Yaml, name)
        );
    }
    assert_eq!(
        value_of(&v2, Format::Yaml, "legacy"),
        value_of(&v1, Format::Yaml, "legacy")
    );
    // Layout and mode kept; same plaintext.
    assert!(
        v2.starts_with("# app\ndb:\n  password: \"ENC[v1:fk:"),
        "{v2}"
    );
    assert!(v2.contains("\n  port: 5432\nbig: ENC[v1:fk:"), "{v2}");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
    let after = decrypt_file(&ops.client(ROTATOR), &path, Format::Yaml)
        .await
        .unwrap();
    assert_eq!(
        SecretsFile::parse(after.text.as_bytes(), Format::Yaml)
            .unwrap()
            .values()
            .filter(|v| v.name != FILE_NAME)
            .map(|v| (v.name.to_owned(), v.value.to_owned()))
            .collect::<Vec<_>>(),
        SecretsFile::parse(before.text.as_bytes(), Format::Yaml)
            .unwrap()
            .values()
            .filter(|v| v.name != FILE_NAME)
            .map(|v| (v.name.to_owned(), v.value.to_owned()))
            .collect::<Vec<_>>(),
    );

    // --key-id: the data key under the new key, the kms value moved with
    // ReEncrypt (no Decrypt of it).
    ops.kms.reset_calls();
    let args = [
        path.as_os_str(),
        OsStr::new("--key-id"),
        OsStr::new(&ops.other_key_id),
    ];
    let out = ops.cli(ROTATOR, "rotate", &args, &[]);
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("moved legacy (ReEncrypt)"));
    assert_eq!(ops.kms.calls(Operation::ReEncrypt).calls, 1);
    assert_eq!(ops.kms.calls(Operation::Decrypt).calls, 1);
    let v3 = std::fs::read_to_string(&path).unwrap();
    let record3 = record_of(&v3, Format::Yaml);
    assert_eq!(record3.version, 3);
    assert_ne!(
        value_of(&v3, Format::Yaml, "legacy"),
        value_of(&v2, Format::Yaml, "legacy")
    );
    // Both the data key and the moved value are now under the other key:
    // KMS refuses them with the old KeyId.
    let rotator = ops.client(ROTATOR);
    let mut request = rotator
        .decrypt()
        .key_id(&ops.key_id)
        .ciphertext_blob(Blob::new(record3.wrapped_key.clone()));
    for (k, v) in record3.file_id.context() {
        request = request.encryption_context(k, v);
    }
    let err = request.send().await.unwrap_err();
    assert!(format!("{:?}", err).contains("IncorrectKey"), "{err:?}");
    let legacy = Envelope::parse(&value_of(&v3, Format::Yaml, "legacy")).unwrap();
    rotator
        .decrypt()
        .key_id(&ops.other_key_id)
        .ciphertext_blob(Blob::new(legacy.ciphertext().to_vec()))
        .encryption_context("keystore:name", "legacy")
        .send()
        .await
        .unwrap();
    let moved = decrypt_file(&rotator, &path, Format::Yaml).await.unwrap();
    assert!(moved.text.contains("legacy: old-kms"), "{}", &*moved.text);
    ops.kms.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kms_failure_midway_leaves_the_file_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let ops = Ops::start(dir.path()).await;
    let path = dir.path().join("secrets.json");
    std::fs::write(
        &path,
        "{\"a\": \"one\", \"b\": \"two\", \"k\": \"kms-value\"}\n",
    )
    .unwrap();
    ops.encrypt(&path, &["--per-value-kms", "--keys", "k"]);
    ops.encrypt(&path, &["--file-key"]);
    let before = std::fs::read(&path).unwrap();
    let client = ops.client(ROTATOR);

    // GenerateDataKey fails (every retry): after the data key was opened.
    assert!(
        ops.kms.inject(
            Fault::internal_error()
                .on(Operation::GenerateDataKey)
                .next(20)
        )
    );
    let err = rotate_file(&client, &path, Format::Json, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("GenerateDataKey"), "{err}");
    assert!(err.to_string().contains("nothing was changed"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    ops.kms.clear_faults();

    // ReEncrypt of the kms value fails with --key-id.
    assert!(
        ops.kms
            .inject(Fault::internal_error().on(Operation::ReEncrypt).next(20))
    );
    let err = rotate_file(&client, &path, Format::Json, Some(&ops.other_key_id))
        .await
        .unwrap_err();
    assert!(matches!(err, OpsError::Kms { .. }), "{err}");
    assert!(err.to_string().contains("ReEncrypt of k"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    ops.kms.clear_faults();

    // No temporary file is left, and the untouched file still rotates.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("keystore-tmp"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
    let report = rotate_file(&client, &path, Format::Json, None)
        .await
        .unwrap();
    assert_eq!(report.written.version, 2);
    assert_eq!(report.resealed, ["a", "b"]);

    // A file without a record is not rotated.
    let plain = dir.path().join("kms-only.env");
    std::fs::write(&plain, "X=1\n").unwrap();
    ops.encrypt(&plain, &["--per-value-kms"]);
    let err = rotate_file(&client, &plain, Format::Env, None)
        .await
        .unwrap_err();
    assert!(matches!(err, OpsError::NoRecord { .. }), "{err}");
    ops.kms.shutdown().await;
}
