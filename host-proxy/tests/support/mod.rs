//! Shared by this crate's integration tests that run the enclave binary.

use std::path::PathBuf;
use std::process::Command;

/// The `keystore-enclave` binary, built into the same target directory as
/// this crate's binary (cargo builds only the binaries of the package under
/// test, so it is built here; when it is fresh that is a no-op).
pub fn enclave_binary() -> PathBuf {
    let host = PathBuf::from(env!("CARGO_BIN_EXE_keystore-host"));
    let profile_dir = host.parent().unwrap();
    let profile = match profile_dir.file_name().unwrap().to_str().unwrap() {
        "debug" => "dev".to_owned(),
        other => other.to_owned(),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "keystore-enclave",
            "--bin",
            "keystore-enclave",
        ])
        .args(["--profile", &profile])
        .arg("--target-dir")
        .arg(profile_dir.parent().unwrap())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(status.success(), "building keystore-enclave failed");
    let binary = profile_dir.join("keystore-enclave");
    assert!(binary.exists(), "{} is missing", binary.display());
    binary
}
