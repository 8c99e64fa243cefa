//! The EC2 packaging, checked without Docker or nitro-cli: linters on the
//! scripts and Dockerfile, and the scripts run against stand-in `docker`,
//! `nitro-cli` and `keystore-host` executables that record their arguments
//! and answer in nitro-cli's real output format.

// Helpers outside `#[test]` functions panic on purpose: this is a test file.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The KMS key build-eif.sh pins (it refuses to build without one).
const KEY_ARN: &str = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

fn pcr(c: char) -> String {
    std::iter::repeat_n(c, 96).collect()
}

/// A directory of stand-in tools that log each call as one line.
struct Fakes {
    dir: tempfile::TempDir,
}

impl Fakes {
    fn new() -> Self {
        let fakes = Fakes {
            dir: tempfile::tempdir().unwrap(),
        };
        fakes.tool("docker", "exit 0");
        // `nitro-cli build-enclave` prints its progress on stderr and this
        // JSON on stdout; PCR8 appears only for a signed EIF.
        fakes.tool(
            "nitro-cli",
            &format!(
                r#"case "$1" in
  build-enclave)
    echo "Start building the Enclave Image..." >&2
    pcr8=""
    case " $* " in *" --signing-certificate "*) pcr8=',"PCR8":"{p8}"' ;; esac
    printf '{{"Measurements":{{"HashAlgorithm":"Sha384 {{ ... }}","PCR0":"{p0}","PCR1":"{p1}","PCR2":"{p2}"%s}}}}\n' "$pcr8" ;;
  run-enclave)
    echo '{{"EnclaveName":"keystore-enclave","EnclaveID":"i-0123456789abcdef0-enc0123456789abcdef","ProcessID":4242,"EnclaveCID":16,"NumberOfCPUs":2,"CPUIDs":[1,3],"MemoryMiB":1024}}' ;;
esac"#,
                p0 = pcr('a'),
                p1 = pcr('b'),
                p2 = pcr('c'),
                p8 = pcr('8'),
            ),
        );
        // Answers `status` only on its third call, like an enclave still booting.
        fakes.tool(
            "keystore-host",
            r#"n=$(grep -c . "$(dirname "$0")/keystore-host.count" 2>/dev/null || echo 0)
echo x >> "$(dirname "$0")/keystore-host.count"
[ "$n" -ge 2 ]"#,
        );
        fakes
    }

    fn tool(&self, name: &str, body: &str) {
        let path = self.dir.path().join(name);
        let script = format!(
            "#!/usr/bin/env bash\necho \"{name} $*\" >> \"$(dirname \"$0\")/calls.log\"\n{body}\n"
        );
        fs::write(&path, script).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn calls(&self) -> Vec<String> {
        fs::read_to_string(self.dir.path().join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn run(&self, script: &str, args: &[&str]) -> Output {
        self.run_with_env(script, args, &[])
    }

    fn run_with_env(&self, script: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        let path = format!(
            "{}:{}",
            self.dir.path().display(),
            std::env::var("PATH").unwrap()
        );
        Command::new(repo().join("scripts").join(script))
            .args(args)
            .env("PATH", path)
            .env_remove("KEYSTORE_HOST")
            .env_remove("AWS_REGION")
            .env_remove("AWS_DEFAULT_REGION")
            .envs(env.iter().copied())
            .output()
            .unwrap()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn build_eif_passes_the_right_flags_and_saves_measurements() {
    let fakes = Fakes::new();
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().join("build");
    let run = fakes.run_with_env(
        "build-eif.sh",
        &["--out", out_dir.to_str().unwrap(), "--kms-key-arn", KEY_ARN],
        &[("AWS_REGION", "us-east-1")],
    );
    assert!(run.status.success(), "{}", text(&run.stderr));

    let calls = fakes.calls();
    let docker = calls.iter().find(|c| c.starts_with("docker ")).unwrap();
    assert!(docker.contains("build --file Dockerfile.enclave --tag nitro-keystore-enclave:latest"));
    assert!(docker.contains("--build-arg SOURCE_DATE_EPOCH="));
    assert!(
        docker.contains("--build-arg KMS_REGION=us-east-1"),
        "{docker}"
    );
    let eif = out_dir.join("keystore-enclave.eif");
    let nitro = calls.iter().find(|c| c.starts_with("nitro-cli ")).unwrap();
    assert_eq!(
        nitro,
        &format!(
            "nitro-cli build-enclave --docker-uri nitro-keystore-enclave:latest --output-file {}",
            eif.display()
        )
    );

    let saved: Value =
        serde_json::from_str(&fs::read_to_string(out_dir.join("measurements.json")).unwrap())
            .unwrap();
    assert_eq!(saved["Measurements"]["PCR0"], Value::from(pcr('a')));
    let stdout = text(&run.stdout);
    assert!(stdout.contains(&format!("PCR0 {}", pcr('a'))), "{stdout}");
    assert!(stdout.contains(&format!("PCR2 {}", pcr('c'))), "{stdout}");
    assert!(!stdout.contains("PCR8"), "{stdout}");
}

#[test]
fn a_signed_build_reports_pcr8_and_half_a_key_pair_is_refused() {
    let fakes = Fakes::new();
    let out = tempfile::tempdir().unwrap();
    let o = out.path().to_str().unwrap();
    let run = fakes.run(
        "build-eif.sh",
        &[
            "--out",
            o,
            "--region",
            "eu-central-1",
            "--kms-key-arn",
            &KEY_ARN.replace("us-east-1", "eu-central-1"),
            "--signing-certificate",
            "cert.pem",
            "--private-key",
            "key.pem",
        ],
    );
    assert!(run.status.success(), "{}", text(&run.stderr));
    let nitro = fakes
        .calls()
        .into_iter()
        .find(|c| c.starts_with("nitro-cli "))
        .unwrap();
    assert!(nitro.ends_with("--signing-certificate cert.pem --private-key key.pem"));
    let docker = fakes
        .calls()
        .into_iter()
        .find(|c| c.starts_with("docker "))
        .unwrap();
    assert!(
        docker.contains("--build-arg KMS_REGION=eu-central-1"),
        "{docker}"
    );
    assert!(text(&run.stdout).contains(&format!("PCR8 {}", pcr('8'))));

    let half = Fakes::new();
    let run = half.run(
        "build-eif.sh",
        &[
            "--out",
            o,
            "--kms-key-arn",
            KEY_ARN,
            "--signing-certificate",
            "c",
        ],
    );
    assert_eq!(run.status.code(), Some(2));
    assert!(
        half.calls().is_empty(),
        "nothing may run: {:?}",
        half.calls()
    );
}

#[test]
fn run_enclave_starts_it_and_waits_for_status() {
    let fakes = Fakes::new();
    let dir = tempfile::tempdir().unwrap();
    let eif = dir.path().join("keystore-enclave.eif");
    fs::write(&eif, b"eif").unwrap();
    let e = eif.to_str().unwrap();

    let run = fakes.run("run-enclave.sh", &["--eif", e, "--timeout", "20"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let calls = fakes.calls();
    assert_eq!(
        calls[0],
        format!(
            "nitro-cli run-enclave --eif-path {e} --enclave-cid 16 --memory 1024 --cpu-count 2"
        )
    );
    let status: Vec<_> = calls
        .iter()
        .filter(|c| c.starts_with("keystore-host"))
        .collect();
    assert_eq!(status.len(), 3, "{calls:?}");
    assert!(
        status
            .iter()
            .all(|c| *c == "keystore-host --enclave vsock://16:5000 status")
    );

    let debug = Fakes::new();
    let run = debug.run(
        "run-enclave.sh",
        &[
            "--eif",
            e,
            "--cid",
            "20",
            "--memory",
            "2048",
            "--cpus",
            "4",
            "--debug-mode",
        ],
    );
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(
        debug.calls()[0].ends_with("--enclave-cid 20 --memory 2048 --cpu-count 4 --debug-mode")
    );
    assert!(text(&run.stderr).contains("DEBUG MODE"));

    for bad in [
        &["--eif", e, "--cid", "3"][..],
        &["--eif", e, "--memory", "lots"],
    ] {
        let fakes = Fakes::new();
        let run = fakes.run("run-enclave.sh", bad);
        assert_eq!(run.status.code(), Some(2), "{bad:?}");
        assert!(fakes.calls().is_empty());
    }
}

/// `scripts/key-policy.sh` with the real `keystore-host` binary.
fn key_policy(measurements: &Path, extra: &[&str]) -> Output {
    Command::new(repo().join("scripts/key-policy.sh"))
        .env("KEYSTORE_HOST", env!("CARGO_BIN_EXE_keystore-host"))
        .args(["--measurements", measurements.to_str().unwrap()])
        .args([
            "--enclave-role",
            "arn:aws:iam::111122223333:role/parent",
            "--admin",
            "arn:aws:iam::111122223333:role/admin",
        ])
        .args(extra)
        .output()
        .unwrap()
}

fn measurements_file(dir: &Path, name: &str, p0: &str, p1: &str, p2: &str) -> PathBuf {
    let path = dir.join(name);
    let json = serde_json::json!({"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": p0, "PCR1": p1, "PCR2": p2}});
    fs::write(&path, json.to_string()).unwrap();
    path
}

#[test]
fn key_policy_pins_the_measurements() {
    let dir = tempfile::tempdir().unwrap();
    let current = measurements_file(dir.path(), "m.json", &pcr('A'), &pcr('b'), &pcr('c'));
    let previous = measurements_file(dir.path(), "old.json", &pcr('d'), &pcr('e'), &pcr('f'));

    let run = key_policy(
        &current,
        &["--pcr", "1", "--also", previous.to_str().unwrap()],
    );
    assert!(run.status.success(), "{}", text(&run.stderr));
    let policy: Value = serde_json::from_slice(&run.stdout).expect("the policy is JSON");
    assert_eq!(policy["Version"], "2012-10-17");
    let decrypts: Vec<&Value> = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["Effect"] == "Allow"
                && s["Action"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|a| a == "kms:Decrypt")
        })
        .collect();
    let pinned: Vec<(String, String)> = decrypts
        .iter()
        .map(|s| {
            let c = &s["Condition"]["StringEqualsIgnoreCase"];
            (
                c["kms:RecipientAttestation:ImageSha384"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                c["kms:RecipientAttestation:PCR1"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(pinned, [(pcr('a'), pcr('b')), (pcr('d'), pcr('e'))]);
    for s in &decrypts {
        assert_eq!(
            s["Principal"]["AWS"][0],
            "arn:aws:iam::111122223333:role/parent"
        );
    }
}

#[test]
fn key_policy_refuses_debug_measurements() {
    let dir = tempfile::tempdir().unwrap();
    let zeros = measurements_file(dir.path(), "dbg.json", &pcr('0'), &pcr('0'), &pcr('0'));
    let run = key_policy(&zeros, &[]);
    assert!(!run.status.success());
    assert!(run.stdout.is_empty());
    let err = text(&run.stderr);
    assert!(err.contains("debug-mode"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let run = key_policy(&zeros, &["--allow-debug"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
}

fn linter(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("{cmd} must be installed (scripts/test.sh installs it): {e}"))
}

#[test]
fn shellcheck_is_clean() {
    let mut scripts: Vec<String> = fs::read_dir(repo().join("scripts"))
        .unwrap()
        .map(|e| format!("scripts/{}", e.unwrap().file_name().to_string_lossy()))
        .filter(|p| p.ends_with(".sh"))
        .collect();
    scripts.push(".ci/run".into());
    let args: Vec<&str> = scripts.iter().map(String::as_str).collect();
    let run = linter("shellcheck", &args);
    assert!(run.status.success(), "{}", text(&run.stdout));
}

#[test]
fn hadolint_is_clean() {
    let run = linter("hadolint", &["Dockerfile.enclave"]);
    assert!(run.status.success(), "{}", text(&run.stdout));
}

#[test]
fn dockerfile_pins_its_base_and_ships_only_the_binary() {
    let dockerfile = fs::read_to_string(repo().join("Dockerfile.enclave")).unwrap();
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(
        froms[0].contains("@sha256:"),
        "build stage must be pinned: {}",
        froms[0]
    );
    assert_eq!(froms[1], "FROM scratch");
    // The region reaches the enclave through the measured image's environment.
    assert!(dockerfile.contains("ENV KEYSTORE_REGION=${KMS_REGION}"));
    assert!(dockerfile.contains("scripts/build-enclave-static.sh"));
    assert!(
        dockerfile.contains(r#"ENTRYPOINT ["/keystore-enclave", "--listen", "vsock://ANY:5000""#)
    );
}

#[test]
fn systemd_unit_verifies() {
    let dir = tempfile::tempdir().unwrap();
    // Point the unit at binaries and files that exist here; keep the rest.
    let unit = fs::read_to_string(repo().join("deploy/keystore-host-proxy.service"))
        .unwrap()
        .replace(
            "/usr/local/bin/keystore-host",
            env!("CARGO_BIN_EXE_keystore-host"),
        )
        .replace("EnvironmentFile=/etc", "EnvironmentFile=-/etc");
    let path = dir.path().join("keystore-host-proxy.service");
    fs::write(&path, unit).unwrap();
    let run = linter("systemd-analyze", &["verify", path.to_str().unwrap()]);
    let complaints = text(&run.stderr);
    assert!(
        run.status.success() && complaints.trim().is_empty(),
        "{complaints}"
    );
}

/// `systemd-analyze security` rates the unit as the README says it does
/// (the README quotes the figure; this keeps the quote true).
#[test]
fn systemd_unit_exposure_is_what_the_readme_says() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keystore-host-proxy.service");
    fs::copy(repo().join("deploy/keystore-host-proxy.service"), &path).unwrap();
    let run = linter(
        "systemd-analyze",
        &["security", "--offline=true", path.to_str().unwrap()],
    );
    let out = text(&run.stdout);
    let measured = out
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for keystore-host-proxy.service: "))
        .map(|(_, rest)| rest.split_whitespace().next().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no exposure line in {out}"));
    let readme = fs::read_to_string(repo().join("README.md")).unwrap();
    let quoted = format!("`systemd-analyze security` exposure {measured} ");
    assert!(
        readme.contains(&quoted),
        "README must quote the measured exposure: {quoted:?}"
    );
}

/// The unit's `Key=value` settings (continuation lines joined).
fn unit_settings(unit: &str) -> Vec<(String, String)> {
    unit.replace("\\\n", " ")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[test]
fn systemd_unit_reads_root_files_with_one_capability_and_has_the_agent_socket() {
    let unit = fs::read_to_string(repo().join("deploy/keystore-host-proxy.service")).unwrap();
    let settings = unit_settings(&unit);
    let get = |key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    // The secrets file is root:root 0600 (README): a dynamic user cannot
    // read it; uid 0 reads it as its owner without CAP_DAC_OVERRIDE.
    assert!(get("DynamicUser").iter().all(|v| *v == "no"), "{unit}");
    assert_eq!(get("User"), ["root"]);
    // Privileged source ports and listening below 1024, and nothing more.
    assert_eq!(get("CapabilityBoundingSet"), ["CAP_NET_BIND_SERVICE"]);
    assert_eq!(get("AmbientCapabilities"), ["CAP_NET_BIND_SERVICE"]);
    assert_eq!(get("NoNewPrivileges"), ["yes"]);
    // The agent socket's directory, world-traversable.
    assert_eq!(get("RuntimeDirectory"), ["nitro-keystore"]);
    assert_eq!(get("RuntimeDirectoryMode"), ["0755"]);
    // The audit log's directory: ProtectSystem=strict leaves /var/log
    // read-only unless systemd makes it, and the default --audit-log is in it.
    assert_eq!(get("LogsDirectory"), ["nitro-keystore"]);
    assert_eq!(get("LogsDirectoryMode"), ["0750"]);
    assert!(
        keystore_host::proxy::audit_log::DEFAULT_AUDIT_LOG.starts_with("/var/log/nitro-keystore/")
    );
    let exec = get("ExecStart").concat();
    assert!(
        exec.contains("--secrets /etc/nitro-keystore/secrets.env"),
        "{exec}"
    );
    assert!(
        exec.contains("--tokens /etc/nitro-keystore/tokens"),
        "{exec}"
    );
    assert!(
        exec.contains("--enclave vsock://${KEYSTORE_ENCLAVE_CID}:5000"),
        "{exec}"
    );
    assert!(!exec.contains("--no-agent"), "{exec}");
    assert!(get("RestrictAddressFamilies").concat().contains("AF_UNIX"));
}

#[test]
fn systemd_unit_flags_are_the_binarys() {
    // Every `--flag` the unit passes must be one `keystore-host proxy`
    // accepts (a renamed flag would only fail on the instance).
    let unit = fs::read_to_string(repo().join("deploy/keystore-host-proxy.service")).unwrap();
    let exec = unit_settings(&unit)
        .into_iter()
        .find(|(k, _)| k == "ExecStart")
        .unwrap()
        .1;
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_keystore-host"))
        .args(["proxy", "--help"])
        .output()
        .unwrap();
    let help = text(&help.stdout);
    let flags: Vec<&str> = exec
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .collect();
    assert!(flags.len() >= 5, "{exec}");
    for flag in flags {
        assert!(help.contains(flag), "`keystore-host proxy` has no {flag}");
    }
}

#[test]
fn key_policy_refuses_an_oversized_measurements_file() {
    let dir = tempfile::tempdir().unwrap();
    let huge = dir.path().join("huge.json");
    fs::write(&huge, vec![b' '; 65 * 1024]).unwrap();
    let run = key_policy(&huge, &[]);
    assert!(!run.status.success());
    let err = text(&run.stderr);
    assert!(err.contains("not a measurements file"), "{err}");
}
