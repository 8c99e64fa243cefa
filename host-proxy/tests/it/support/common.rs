//! Shared by this crate's integration tests that run the enclave binary.

use std::path::PathBuf;
use std::process::Command;

/// The `keystore-enclave` binary from the same target directory as this
/// crate's binary. A workspace test run (`scripts/test.sh`) has already
/// built it; building it here with `-p keystore-enclave` would resolve other
/// features and rebuild half the dependency tree, so that only happens when
/// it is missing (e.g. `cargo test -p keystore-host` on a clean tree).
pub fn enclave_binary() -> PathBuf {
    let host = PathBuf::from(env!("CARGO_BIN_EXE_keystore-host"));
    let profile_dir = host.parent().unwrap();
    let binary = profile_dir.join("keystore-enclave");
    if binary.exists() {
        return binary;
    }
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
            // The tests run it with `--nsm mock`.
            "--features",
            "mock",
        ])
        .args(["--profile", &profile])
        .arg("--target-dir")
        .arg(profile_dir.parent().unwrap())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(status.success(), "building keystore-enclave failed");
    assert!(binary.exists(), "{} is missing", binary.display());
    binary
}

/// The daemon's `/metrics` URL from its start-up log line (tests bind it to
/// `tcp://127.0.0.1:0`), once it has logged it.
pub fn metrics_url_in(log: &str) -> Option<String> {
    log.lines()
        .filter(|line| line.contains("metrics"))
        .find_map(|line| line.split("tcp://127.0.0.1:").nth(1))
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .filter(|port| !port.is_empty())
        .map(|port| format!("http://127.0.0.1:{port}/metrics"))
}
