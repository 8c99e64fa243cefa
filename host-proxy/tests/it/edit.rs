//! `keystore-host edit` with `EDITOR` set to small scripts: the plaintext
//! copy lives in a private directory on tmpfs that is gone afterwards, the
//! edited file is sealed again under a new data key (version + 1), an
//! unchanged file is left alone, and a failing editor changes nothing.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use keystore_host::secrets_file::edit::{EditOptions, edit_file, is_memory_fs};
use keystore_host::secrets_file::encrypt::Selection;
use keystore_host::secrets_file::unseal::{OpsError, decrypt_file};
use keystore_host::secrets_file::{Format, SecretsFile};
use keystore_shared::envelope::Envelope;
use keystore_shared::file_record::FileRecord;
use keystore_shared::name::FILE_NAME;
use keystore_tests::kms::Operation;

use crate::support::ops::{Ops, ROTATOR, assert_ok, stderr};

/// An editor script: records where it ran and the modes it saw in
/// `log`, then runs `body` on the file (`$1`).
fn editor(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    let log = dir.join(format!("{name}.log"));
    let script = dir.join(name);
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nset -e\nprintf '%s %s %s\\n' \"$1\" \"$(stat -c %a \"$1\")\" \"$(stat -c %a \"$(dirname \"$1\")\")\" > '{}'\n{body}\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// (path, file mode, dir mode) the editor saw.
fn seen(dir: &Path, name: &str) -> (String, String, String) {
    let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap();
    let mut parts = log.split_whitespace().map(str::to_owned);
    (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    )
}

fn version(path: &Path) -> u64 {
    let text = std::fs::read_to_string(path).unwrap();
    let file = SecretsFile::parse(text.as_bytes(), Format::from_path(path)).unwrap();
    let envelope = Envelope::parse(file.get(FILE_NAME).unwrap()).unwrap();
    FileRecord::decode(envelope.ciphertext()).unwrap().version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_reseals_the_changed_file_and_leaves_no_plaintext_behind() {
    let dir = tempfile::tempdir().unwrap();
    let ops = Ops::start(dir.path()).await;
    let path = dir.path().join("secrets.env");
    std::fs::write(&path, "# db\nDB_PASSWORD=old-pw\nAPI_KEY=k1\n").unwrap();
    ops.encrypt(&path, &[]);
    let v1 = std::fs::read_to_string(&path).unwrap();
    assert_eq!(version(&path), 1);

    // The editor changes a value and adds a plain one.
    let script = editor(
        dir.path(),
        "change.sh",
        "sed -i 's/^DB_PASSWORD=old-pw$/DB_PASSWORD=new-pw/' \"$1\"\nprintf 'NEW_TOKEN=t0k\\n' >> \"$1\"",
    );
    ops.kms.reset_calls();
    let out = ops.cli(
        ROTATOR,
        "edit",
        &[path.as_os_str()],
        &[("EDITOR", script.as_os_str())],
    );
    assert_ok(&out);
    let (copy, file_mode, dir_mode) = seen(dir.path(), "change.sh");
    assert!(copy.starts_with("/dev/shm/keystore-edit-"), "{copy}");
    assert_eq!((file_mode.as_str(), dir_mode.as_str()), ("600", "700"));
    let copy_dir = Path::new(&copy).parent().unwrap();
    assert!(!copy_dir.exists(), "{} was not removed", copy_dir.display());
    assert!(is_memory_fs(Path::new("/dev/shm")));
    assert_eq!(ops.kms.calls(Operation::GenerateDataKey).calls, 1);

    let v2 = std::fs::read_to_string(&path).unwrap();
    assert_eq!(version(&path), 2);
    assert!(!v2.contains("new-pw") && !v2.contains("t0k"), "{v2}");
    assert!(v2.starts_with("# db\nDB_PASSWORD=ENC[v1:fk:"), "{v2}");
    assert!(v2.contains("\nNEW_TOKEN=ENC[v1:fk:"), "{v2}");
    let plain = decrypt_file(&ops.client(ROTATOR), &path, Format::Env)
        .await
        .unwrap();
    assert!(
        plain.text.contains("DB_PASSWORD=new-pw\nAPI_KEY=k1\n"),
        "{}",
        &*plain.text
    );
    assert!(plain.text.contains("NEW_TOKEN=t0k"));
    assert_ne!(v1, v2);

    // An editor that changes nothing: no KMS key, file untouched.
    let same = editor(dir.path(), "same.sh", "true");
    ops.kms.reset_calls();
    let out = ops.cli(
        ROTATOR,
        "edit",
        &[path.as_os_str()],
        &[("EDITOR", same.as_os_str())],
    );
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("unchanged"));
    assert_eq!(ops.kms.calls(Operation::GenerateDataKey).calls, 0);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), v2);
    let (copy, ..) = seen(dir.path(), "same.sh");
    assert!(!Path::new(&copy).parent().unwrap().exists());

    // An editor that edits, then fails: nothing changes, the copy is gone.
    let fails = editor(
        dir.path(),
        "fails.sh",
        "sed -i 's/new-pw/other/' \"$1\"\nexit 3",
    );
    let out = ops.cli(
        ROTATOR,
        "edit",
        &[path.as_os_str()],
        &[("EDITOR", fails.as_os_str())],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the editor exited"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("new-pw"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), v2);
    let (copy, ..) = seen(dir.path(), "fails.sh");
    assert!(!Path::new(&copy).parent().unwrap().exists());

    // Text the format refuses: nothing changes either.
    let breaks = editor(dir.path(), "breaks.sh", "printf 'not a line\\n' >> \"$1\"");
    let out = ops.cli(
        ROTATOR,
        "edit",
        &[path.as_os_str()],
        &[("EDITOR", breaks.as_os_str())],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("the edited copy"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), v2);

    // $VISUAL is used when $EDITOR is not set.
    let visual = editor(
        dir.path(),
        "visual.sh",
        "sed -i 's/^API_KEY=k1$/API_KEY=k2/' \"$1\"",
    );
    let out = ops.cli(
        ROTATOR,
        "edit",
        &[path.as_os_str()],
        &[("VISUAL", visual.as_os_str())],
    );
    assert_ok(&out);
    assert_eq!(version(&path), 3);
    ops.kms.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_keeps_the_rules_and_refuses_a_disk_directory() {
    let dir = tempfile::tempdir().unwrap();
    let ops = Ops::start(dir.path()).await;
    let path = dir.path().join("secrets.json");
    std::fs::write(
        &path,
        "{\n  \"db\": {\"password\": \"pw\"},\n  \"port\": 1\n}\n",
    )
    .unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "rules:\n  - who: { uid: 1000 }\n    read: ['db.*']\n",
    )
    .unwrap();
    ops.encrypt(&path, &["--rules", rules.to_str().unwrap()]);
    let client = ops.client(ROTATOR);

    // Not tmpfs: refused before anything is written there.
    let disk = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    if !is_memory_fs(disk.path()) {
        let options = EditOptions {
            selection: Selection::all(),
            editor: "true".into(),
            base: Some(disk.path().to_owned()),
            key_id: None,
        };
        let err = edit_file(&client, &path, Format::Json, &options)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not tmpfs or ramfs"), "{err}");
        assert_eq!(std::fs::read_dir(disk.path()).unwrap().count(), 0);
    }

    // The rules entry is shown sealed and sealed again under the new key;
    // a number that was never sealed stays a number.
    let script = editor(dir.path(), "pw.sh", "sed -i 's/\"pw\"/\"pw2\"/' \"$1\"");
    let options = EditOptions {
        selection: Selection::all(),
        editor: script.clone().into_os_string(),
        base: None,
        key_id: None,
    };
    edit_file(&client, &path, Format::Json, &options)
        .await
        .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"port\": 1,\n"), "{text}");
    assert!(text.contains("\"keystore:rules\": \"ENC[v1:fk:"), "{text}");
    let plain = decrypt_file(&client, &path, Format::Json).await.unwrap();
    assert!(
        plain.text.contains("\"password\": \"pw2\""),
        "{}",
        &*plain.text
    );

    // Changing the sealed rules entry in the editor is refused.
    let forge = editor(
        dir.path(),
        "forge.sh",
        "sed -i 's/\"keystore:rules\": \"ENC\\[v1:fk:/&AAAA/' \"$1\"",
    );
    let options = EditOptions {
        editor: forge.into_os_string(),
        ..options
    };
    let before = std::fs::read(&path).unwrap();
    let err = edit_file(&client, &path, Format::Json, &options)
        .await
        .unwrap_err();
    assert!(matches!(err, OpsError::Edit { .. }), "{err}");
    assert!(err.to_string().contains("keystore:rules"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    ops.kms.shutdown().await;
}

/// `edit s3://...` is refused before anything is read (no S3 or KMS call:
/// the endpoints given do not exist), saying what to do instead.
#[test]
fn edit_of_an_s3_object_is_refused_with_what_to_do() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keystore-host"))
        .args(["edit", "s3://keystore-fleet/prod/app.env"])
        .args(["--endpoint-url", "https://127.0.0.1:9"])
        .args([
            "--s3-endpoint-url",
            "https://127.0.0.1:9",
            "--region",
            "us-east-1",
        ])
        .env("EDITOR", "false")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("edit works on a local file only, not s3://keystore-fleet/prod/app.env")
            && err.contains("nothing was read")
            && err.contains("`rotate` and `decrypt` work on s3:// directly"),
        "{err}"
    );
}
