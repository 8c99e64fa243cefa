//! The pinned KMS key in the packaging (issue 12): `build-eif.sh
//! --kms-key-arn` bakes the key ARNs into the measured image, where the
//! enclave reads them from `KEYSTORE_KMS_KEY_ARNS`, like the region.
//! Checked without Docker or nitro-cli, with stand-ins that log their
//! arguments.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::support::common::enclave_binary;

const KEY: &str = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
const OTHER: &str = "arn:aws:kms:eu-west-1:111122223333:key/mrk-1234abcd12ab34cd56ef1234567890ab";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs build-eif.sh with stand-in `docker` and `nitro-cli`; returns the
/// output and the logged calls.
fn build_eif(args: &[&str]) -> (Output, Vec<String>) {
    let fakes = tempfile::tempdir().unwrap();
    let pcr: String = "a".repeat(96);
    for (name, body) in [
        ("docker", String::new()),
        (
            "nitro-cli",
            format!(
                r#"echo '{{"Measurements":{{"PCR0":"{pcr}","PCR1":"{pcr}","PCR2":"{pcr}"}}}}'"#
            ),
        ),
    ] {
        let path = fakes.path().join(name);
        fs::write(
            &path,
            format!("#!/usr/bin/env bash\necho \"{name} $*\" >> \"$(dirname \"$0\")/calls.log\"\n{body}\n"),
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(repo().join("scripts/build-eif.sh"))
        .args([
            "--out",
            out.path().to_str().unwrap(),
            "--region",
            "eu-west-1",
        ])
        .args(args)
        .env(
            "PATH",
            format!(
                "{}:{}",
                fakes.path().display(),
                std::env::var("PATH").unwrap()
            ),
        )
        .output()
        .unwrap();
    let calls = fs::read_to_string(fakes.path().join("calls.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    (output, calls)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn build_eif_bakes_every_pinned_key_into_the_image() {
    let (output, calls) = build_eif(&["--kms-key-arn", KEY, "--kms-key-arn", OTHER]);
    assert!(output.status.success(), "{}", stderr(&output));
    let docker = calls.iter().find(|c| c.starts_with("docker ")).unwrap();
    assert!(
        docker.contains(&format!("--build-arg KMS_KEY_ARNS={KEY},{OTHER}")),
        "{docker}"
    );
    assert!(
        docker.contains("--build-arg KMS_REGION=eu-west-1"),
        "{docker}"
    );
}

#[test]
fn build_eif_refuses_no_key_an_alias_a_bare_id_and_another_region() {
    let cases: [(&[&str], &str); 4] = [
        (&[], "--kms-key-arn"),
        (
            &["--kms-key-arn", "alias/keystore"],
            "aws kms describe-key --key-id alias/keystore",
        ),
        (
            &["--kms-key-arn", "1234abcd-12ab-34cd-56ef-1234567890ab"],
            "not a KMS key ARN",
        ),
        (
            &[
                "--kms-key-arn",
                "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            ],
            "is in us-east-1",
        ),
    ];
    for (args, why) in cases {
        let (output, calls) = build_eif(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(why),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(calls.is_empty(), "nothing may run: {calls:?}");
    }
}

#[test]
fn the_dockerfile_measures_the_keys_in_the_final_image() {
    let dockerfile = fs::read_to_string(repo().join("Dockerfile.enclave")).unwrap();
    let final_stage = dockerfile.split("FROM scratch").nth(1).unwrap();
    assert!(final_stage.contains("ARG KMS_KEY_ARNS"), "{final_stage}");
    assert!(
        final_stage.contains("ENV KEYSTORE_KMS_KEY_ARNS=${KMS_KEY_ARNS}"),
        "{final_stage}"
    );
}

#[test]
fn the_enclave_reads_its_pinned_keys_from_the_image_environment() {
    // An alias in KEYSTORE_KMS_KEY_ARNS is refused at start: the variable
    // the Dockerfile sets is the one the binary reads.
    let pki = tempfile::tempdir().unwrap();
    let output = Command::new(enclave_binary())
        .args(["--nsm", "mock", "--recipient-bits", "2048"])
        .arg("--mock-pki")
        .arg(pki.path())
        .args([
            "--listen",
            "tcp://127.0.0.1:0",
            "--load-listen",
            "tcp://127.0.0.1:0",
        ])
        .env("KEYSTORE_REGION", "eu-west-1")
        .env(
            "KEYSTORE_KMS_KEY_ARNS",
            format!("{KEY},arn:aws:kms:eu-west-1:111122223333:alias/keystore"),
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains("--kms-key-arn"), "{err}");
    assert!(err.contains("is an alias"), "{err}");
}
