//! The README's "Deploy on EC2", steps 2 to 8, run as written, top to
//! bottom, in a fake root.
//!
//! **What is run.** The commands are taken from the README itself: every
//! fenced block with a bare opening fence (```` ``` ````) from the line
//! starting `**2.` up to the first bold paragraph after the one starting
//! `**8.`. Fences with a language (```` ```yaml ````, ```` ```json ````)
//! hold a file's contents, not commands, and are skipped; step 1 launches
//! the instance and has nothing to run on it. The blocks are joined in
//! order into one `bash -euo pipefail` script (one shell session, as an
//! operator pasting them would have), with a marker before each block so a
//! failure names its step.
//!
//! **The fake root.** The script runs in its own mount namespace
//! (`unshare --mount`) where `/etc` and `/usr/local/bin` are overlays on
//! the real ones whose writes land in a temporary directory: the README's
//! absolute paths are used unchanged and the machine's own files are never
//! touched. The working directory is a copy of the checkout's `scripts/`,
//! `deploy/` and `Dockerfile.enclave`.
//!
//! **Stand-ins.** What cannot run here is a logging stand-in on `PATH`,
//! like the packaging tests': `sudo` (runs the command; the test is root),
//! `dnf` (creates `/etc/nitro_enclaves` as the package does), `usermod`,
//! `docker`, `nitro-cli` (nitro-cli's JSON, writes the EIF), `aws` (prints
//! the emulator's key ARN for `create-key`, parses the policy file of
//! `put-key-policy`), `cargo build --release` (copies the test build of
//! `keystore-host`) and `systemctl` (refuses, as systemd would, to enable a
//! unit that is not installed, to start one that fails `systemd-analyze
//! verify` or whose `EnvironmentFile` is missing, or whose `User=` cannot
//! read the secrets file; refuses to reload a unit that is not running).
//! `sudo` runs the command with a `secure_path` without `/usr/local/bin`
//! (the stricter default some distributions ship), so the README must not
//! rely on it. `keystore-host` is what step 2 installs in `/usr/local/bin`:
//! the real binary, except `status`, `attest` and `get`, which need the
//! enclave over vsock: those are answered by a stand-in that checks the
//! enclave was started and, without `--enclave`, that the daemon (whose
//! agent they then go through) runs; for `attest`, that the PCR0 given is
//! the one `nitro-cli` reported. `keystore-host encrypt` and `policy` are
//! real: `encrypt` reaches the KMS emulator through the SDK's own
//! `AWS_ENDPOINT_URL_KMS` and the emulator's CA through `SSL_CERT_FILE`,
//! with no flag added to the README's command. `install`, `cp`, `printf`,
//! `openssl`, `jq` are the real ones.
//!
//! The application the token file of step 7 is for runs as user and group
//! `api`; the fake root creates them (on an instance they are the
//! application's own).

// Helpers outside `#[test]` functions panic on purpose: this is a test file.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use keystore_tests::kms::{Credential, MockKms, MockKmsConfig, MockKmsHandle, Operation};
use serde_json::Value;

use crate::support::ops::sdk_client;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

const ACCESS_KEY_ID: &str = "AKIADEPLOYWALKTHRU01";
const SECRET_ACCESS_KEY: &str = "deploy-walkthrough-secret";

/// The first and last step of the README that the walk-through runs.
const FIRST_STEP: u32 = 2;
const LAST_STEP: u32 = 8;

/// The PCRs the `nitro-cli` stand-in reports for the EIF it "builds".
fn pcr(c: char) -> String {
    std::iter::repeat_n(c, 96).collect()
}

/// One command block of the README and the step it belongs to.
#[derive(Debug)]
struct Block {
    step: u32,
    text: String,
}

/// `N` if `line` starts a numbered step (`**N. ...`).
fn step_number(line: &str) -> Option<u32> {
    let rest = line.strip_prefix("**")?;
    let (number, _) = rest.split_once(". ")?;
    number.parse().ok()
}

/// The command blocks of the README's "Deploy on EC2", steps 2 to 8 (see
/// the module comment for the rule).
fn deploy_blocks(readme: &str) -> Vec<Block> {
    let section = readme
        .split_once("\n## Deploy on EC2\n")
        .expect("the README has a \"## Deploy on EC2\" section")
        .1;
    let section = section.split("\n## ").next().unwrap();
    let mut step = None;
    let mut blocks = Vec::new();
    // The block being read: its text, or None for a tagged (file) block.
    let mut open: Option<Option<String>> = None;
    for line in section.lines() {
        if let Some(body) = open.as_mut() {
            if line.trim() == "```" {
                if let (Some(text), Some(step)) = (open.take().unwrap(), step) {
                    blocks.push(Block { step, text });
                }
            } else if let Some(text) = body.as_mut() {
                text.push_str(line);
                text.push('\n');
            }
            continue;
        }
        if line.starts_with("**") {
            match step_number(line) {
                Some(n) => step = (FIRST_STEP..=LAST_STEP).contains(&n).then_some(n),
                // A bold paragraph after step 8 ends the walk-through;
                // within steps 2-7 it is a part of the step (Access rules).
                None if step == Some(LAST_STEP) => step = None,
                None => {}
            }
        }
        if let Some(info) = line.trim().strip_prefix("```") {
            open = Some(info.is_empty().then(String::new));
        }
    }
    assert!(open.is_none(), "an unclosed fence in the deploy section");
    blocks
}

/// The script run in the fake root: the blocks, each after a marker.
fn walkthrough_script(blocks: &[Block]) -> String {
    let mut script = String::new();
    for (i, block) in blocks.iter().enumerate() {
        script.push_str(&format!(
            "echo \"## step {} block {}\" >> \"$NK_CALLS\"\n{}\n",
            block.step, i, block.text
        ));
    }
    script
}

/// Writes an executable script.
fn write_exec(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// The stand-ins, each logging `NAME ARGS...` to `$NK_CALLS` first.
const STUBS: &[(&str, &str)] = &[
    // sudo's `secure_path` (the stricter one, without /usr/local/bin).
    (
        "sudo",
        r#"PATH="$NK_STUBS:/usr/sbin:/usr/bin:/sbin:/bin" exec "$@""#,
    ),
    (
        "dnf",
        r#"[ "$1" = install ] || { echo "dnf stand-in: only install" >&2; exit 2; }
for pkg in "$@"; do
  echo "$pkg" >> "$NK_STATE/packages"
  # The package's files that the README relies on.
  if [ "$pkg" = aws-nitro-enclaves-cli ]; then
    mkdir -p /etc/nitro_enclaves
    printf 'memory_mib: 512\ncpu_count: 2\n' > /etc/nitro_enclaves/allocator.yaml
  fi
done"#,
    ),
    (
        "usermod",
        r#"[ -n "${!#}" ] || { echo "usermod: no user named" >&2; exit 2; }"#,
    ),
    ("docker", "exit 0"),
    (
        "nitro-cli",
        r#"case "$1" in
  build-enclave)
    out=
    while [ $# -gt 0 ]; do [ "$1" = --output-file ] && out=$2; shift; done
    [ -n "$out" ] || { echo "nitro-cli stand-in: no --output-file" >&2; exit 2; }
    echo "Start building the Enclave Image..." >&2
    echo eif > "$out"
    printf '{"Measurements":{"HashAlgorithm":"Sha384 { ... }","PCR0":"%s","PCR1":"%s","PCR2":"%s"}}\n' \
      "$NK_PCR0" "$NK_PCR1" "$NK_PCR2" ;;
  run-enclave)
    eif=
    while [ $# -gt 0 ]; do [ "$1" = --eif-path ] && eif=$2; shift; done
    [ -f "$eif" ] || { echo "nitro-cli: no EIF at '$eif'" >&2; exit 1; }
    touch "$NK_STATE/enclave-running"
    echo '{"EnclaveName":"keystore-enclave","EnclaveID":"i-0123456789abcdef0-enc0123456789abcdef","ProcessID":4242,"EnclaveCID":16,"NumberOfCPUs":2,"CPUIDs":[1,3],"MemoryMiB":1024}' ;;
  terminate-enclave) rm -f "$NK_STATE/enclave-running" ;;
  *) echo "nitro-cli stand-in: $1 unknown" >&2; exit 2 ;;
esac"#,
    ),
    (
        "aws",
        r#"case "$1 $2" in
  "kms create-key") echo "$NK_KEY_ARN" ;;
  "kms create-alias")
    case " $* " in *" --target-key-id $NK_KEY_ARN "*) ;; *) echo "aws: no such key" >&2; exit 254 ;; esac ;;
  "kms put-key-policy")
    file=
    while [ $# -gt 0 ]; do [ "$1" = --policy ] && file=${2#file://}; shift; done
    jq -e '.Statement | length > 0' "$file" > /dev/null || { echo "aws: MalformedPolicyDocumentException" >&2; exit 254; } ;;
  *) echo "aws stand-in: $1 $2 unknown" >&2; exit 2 ;;
esac"#,
    ),
    (
        "cargo",
        r#"case " $* " in
  *" build "*"--release"*"-p keystore-host"*)
    mkdir -p target/release && cp "$NK_STANDIN" target/release/keystore-host ;;
  *) echo "cargo stand-in: only the README's release build" >&2; exit 2 ;;
esac"#,
    ),
    (
        "systemctl",
        r#"fail() { echo "$*" >&2; exit 1; }
action=$1; shift
now=0; units=()
for a in "$@"; do case "$a" in --now) now=1 ;; -*) ;; *) units+=("${a%.service}") ;; esac; done
for unit in "${units[@]}"; do
  file=/etc/systemd/system/$unit.service
  case "$unit" in
    nitro-enclaves-allocator) pkg=aws-nitro-enclaves-cli ;;
    docker) pkg=docker ;;
    *) pkg= ;;
  esac
  case "$action" in
    enable)
      if [ -n "$pkg" ]; then
        grep -qx "$pkg" "$NK_STATE/packages" 2>/dev/null || fail "Failed to enable unit: Unit file $unit.service does not exist."
      else
        [ -f "$file" ] || fail "Failed to enable unit: Unit file $unit.service does not exist."
      fi
      if [ "$now" = 1 ] && [ -z "$pkg" ]; then
        verify=$(systemd-analyze verify "$file" 2>&1) && [ -z "$verify" ] || fail "Job for $unit.service failed: $verify"
        for env in $(sed -n 's/^EnvironmentFile=\([^-]\)/\1/p' "$file"); do
          [ -f "$env" ] || fail "$unit.service: Failed to load environment files: $env"
        done
        user=$(sed -n 's/^User=//p' "$file")
        secrets=$(grep -o -- '--secrets [^ ]*' "$file" | cut -d' ' -f2)
        if [ -n "$secrets" ]; then
          [ -f "$secrets" ] || fail "$unit.service: $secrets is missing"
          [ -n "$user" ] && [ "$(stat -c %U "$secrets")" = "$user" ] &&
            [ $((0$(stat -c %a "$secrets") & 0400)) -ne 0 ] ||
            fail "$unit.service: User=${user:-(none)} cannot read $secrets"
        fi
      fi
      [ "$now" = 1 ] && touch "$NK_STATE/$unit.active" ;;
    reload)
      [ -f "$NK_STATE/$unit.active" ] || fail "Failed to reload $unit.service: Unit $unit.service is not active." ;;
    *) fail "systemctl stand-in: $action unknown" ;;
  esac
done"#,
    ),
];

/// What `cargo build` "builds" and step 2 installs as
/// `/usr/local/bin/keystore-host`: the real binary, except for the
/// commands that need the enclave over vsock.
const KEYSTORE_HOST_STANDIN: &str = r#"#!/usr/bin/env bash
echo "keystore-host $*" >> "$NK_CALLS"
# Without --enclave these go through the agent, which the daemon runs.
reach() {
  [ -f "$NK_STATE/enclave-running" ] || { echo "keystore-host: the enclave does not answer" >&2; exit 1; }
  case " $* " in
    *" --enclave "*) ;;
    *) [ -f "$NK_STATE/keystore-host-proxy.active" ] ||
         { echo "keystore-host: no agent at /run/nitro-keystore/agent.sock" >&2; exit 1; } ;;
  esac
}
for a in "$@"; do
  case "$a" in
    status)
      reach "$@"; echo "ready"; exit 0 ;;
    attest)
      reach "$@"
      case " $* " in *" --pcr 0=$NK_PCR0 "*) echo "PCR0 matches"; exit 0 ;; esac
      echo "keystore-host attest: PCR0 does not match" >&2; exit 1 ;;
    get)
      reach "$@"
      name=${!#}
      grep -q "^$name=" /etc/nitro-keystore/secrets.env || { echo "keystore-host: $name not found" >&2; exit 1; }
      echo "(stand-in value of $name)"; exit 0 ;;
  esac
done
exec "$NK_KEYSTORE_HOST" "$@"
"#;

/// Runs in the new mount namespace: overlays, the application's account,
/// then the walk-through, then (if it passed) the checks that need the
/// fake root's view: the unit verified where it was installed, and owners
/// by name.
const RUNNER: &str = r#"set -euo pipefail
fake=$1 checkout=$2 script=$3
for dir in /etc /usr/local/bin; do
  key=${dir//\//_}
  mkdir -p "$fake/root$dir" "$fake/work/$key"
  mount -t overlay overlay -o "lowerdir=$dir,upperdir=$fake/root$dir,workdir=$fake/work/$key" "$dir"
done
getent group api > /dev/null || groupadd --system api
getent passwd api > /dev/null || useradd --system --no-create-home -g api api
cd "$checkout"
bash -euo pipefail "$script"
systemd-analyze verify /etc/systemd/system/keystore-host-proxy.service 2> "$fake/verify.err"
for path in /usr/local/bin/keystore-host /etc/nitro_enclaves/allocator.yaml \
    /etc/nitro-keystore /etc/nitro-keystore/secrets.env /etc/nitro-keystore/proxy.env \
    /etc/systemd/system/keystore-host-proxy.service /etc/nitro-keystore/tokens \
    /etc/nitro-keystore/tokens/api; do
  stat -c '%n %U %G %a' "$path"
done > "$fake/stat.txt"
"#;

/// A run of the walk-through: its output and what it left behind.
struct Walk {
    output: Output,
    fake: PathBuf,
    checkout: PathBuf,
    _dir: tempfile::TempDir,
}

impl Walk {
    fn calls(&self) -> Vec<String> {
        fs::read_to_string(self.fake.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The step whose block was running last.
    fn last_step(&self) -> Option<u32> {
        self.calls()
            .iter()
            .rev()
            .find_map(|c| c.strip_prefix("## step "))
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
    }

    /// A file as the fake root left it.
    fn file(&self, path: &str) -> String {
        fs::read_to_string(self.fake.join("root").join(path.trim_start_matches('/')))
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn report(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}\ncalls:\n{}",
            String::from_utf8_lossy(&self.output.stdout),
            String::from_utf8_lossy(&self.output.stderr),
            self.calls().join("\n")
        )
    }
}

/// The operator's plain secrets file, before step 5.
const SECRETS: &str = "# billing\nDB_PASSWORD='p@ss word'\nAPI_TOKEN=tok-1234\n";

async fn emulator(dir: &Path) -> (MockKmsHandle, String) {
    let config = MockKmsConfig::new(
        dir.join("kms-tls"),
        vec![Credential::new(ACCESS_KEY_ID, SECRET_ACCESS_KEY)],
    );
    let kms = MockKms::start(config).await.unwrap();
    // Step 3's key, with KMS's default policy (the `aws` stand-in prints
    // its ARN), and its alias, which the stand-in's create-alias cannot
    // make in the emulator.
    let arn = kms.create_key(None).unwrap().arn;
    sdk_client(&kms, (ACCESS_KEY_ID, SECRET_ACCESS_KEY))
        .create_alias()
        .alias_name("alias/nitro-keystore")
        .target_key_id(&arn)
        .send()
        .await
        .unwrap();
    (kms, arn)
}

/// Runs the deploy section of `readme` in a fake root against `kms`.
fn walk(readme: &str, kms: &MockKmsHandle, key_arn: &str) -> Walk {
    let blocks = deploy_blocks(readme);
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("fake");
    let stubs = dir.path().join("stubs");
    let state = fake.join("state");
    let checkout = dir.path().join("checkout");
    let home = dir.path().join("home");
    for d in [&fake, &stubs, &state, &checkout, &home] {
        fs::create_dir_all(d).unwrap();
    }
    for (name, body) in STUBS {
        write_exec(
            &stubs.join(name),
            &format!("#!/usr/bin/env bash\necho \"{name} $*\" >> \"$NK_CALLS\"\n{body}\n"),
        );
    }
    let standin = dir.path().join("keystore-host-standin");
    write_exec(&standin, KEYSTORE_HOST_STANDIN);
    let copy = Command::new("cp")
        .args(["-r", "scripts", "deploy", "Dockerfile.enclave"])
        .arg(&checkout)
        .current_dir(repo())
        .status()
        .unwrap();
    assert!(copy.success());
    fs::write(checkout.join("secrets.env"), SECRETS).unwrap();
    let script = dir.path().join("walkthrough.sh");
    fs::write(&script, walkthrough_script(&blocks)).unwrap();
    let runner = dir.path().join("runner.sh");
    fs::write(&runner, RUNNER).unwrap();

    let path = format!(
        "{}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        stubs.display()
    );
    let output = tokio::task::block_in_place(|| {
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "bash"])
            .arg(&runner)
            .args([&fake, &checkout, &script])
            .env_clear()
            .env("PATH", path)
            .env("HOME", &home)
            .env("USER", "ec2-user")
            .env("LANG", "C.UTF-8")
            .env("NK_CALLS", fake.join("calls.log"))
            .env("NK_STATE", &state)
            .env("NK_STUBS", &stubs)
            .env("NK_STANDIN", &standin)
            .env("NK_KEY_ARN", key_arn)
            .env("NK_PCR0", pcr('a'))
            .env("NK_PCR1", pcr('b'))
            .env("NK_PCR2", pcr('c'))
            .env("NK_KEYSTORE_HOST", env!("CARGO_BIN_EXE_keystore-host"))
            // How the README's `keystore-host encrypt` reaches the
            // emulator without a flag: the SDK's endpoint variable, and
            // the emulator's CA as the only trusted root.
            .env("AWS_ENDPOINT_URL_KMS", kms.endpoint_url())
            .env("SSL_CERT_FILE", kms.ca_pem_path())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
            .env("AWS_CONFIG_FILE", home.join("no-config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", home.join("no-credentials"))
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap_or_else(|e| panic!("unshare (util-linux) must be installed: {e}"))
    });
    Walk {
        output,
        fake,
        checkout,
        _dir: dir,
    }
}

fn readme() -> String {
    fs::read_to_string(repo().join("README.md")).unwrap()
}

#[test]
fn every_step_from_2_to_8_has_a_command_block() {
    let blocks = deploy_blocks(&readme());
    for step in FIRST_STEP..=LAST_STEP {
        assert!(
            blocks.iter().any(|b| b.step == step),
            "README step {step} has no command block: {blocks:#?}"
        );
    }
    // The extraction reads only bare fences in steps 2-8.
    let all: String = blocks.iter().map(|b| b.text.as_str()).collect();
    assert!(all.contains("sudo systemctl enable --now keystore-host-proxy"));
    assert!(!all.contains("rules:"), "a YAML example was taken: {all}");
    assert!(!all.contains("--rotator"), "break-glass was taken: {all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_deploy_runs_as_written_in_a_fake_root() {
    let dir = tempfile::tempdir().unwrap();
    let (kms, key_arn) = emulator(dir.path()).await;
    let walk = walk(&readme(), &kms, &key_arn);
    assert!(walk.output.status.success(), "{}", walk.report());
    let calls = walk.calls();
    let at = |call: &str| {
        calls
            .iter()
            .position(|c| c == call)
            .unwrap_or_else(|| panic!("{call:?} was not called:\n{}", walk.report()))
    };

    // Step 2: packages, then their services; the binary installed.
    assert!(
        at("dnf install -y aws-nitro-enclaves-cli aws-nitro-enclaves-cli-devel docker jq git")
            < at("systemctl enable --now nitro-enclaves-allocator.service docker")
    );
    assert_eq!(
        walk.file("/etc/nitro_enclaves/allocator.yaml"),
        fs::read_to_string(repo().join("deploy/allocator.yaml")).unwrap()
    );
    // Steps 3-4: the key's ARN goes into the image, and the policy pins the
    // PCR0 the build reported.
    at(&format!(
        "aws kms create-alias --alias-name alias/nitro-keystore --target-key-id {key_arn}"
    ));
    let docker = calls
        .iter()
        .find(|c| c.starts_with("docker build"))
        .unwrap();
    assert!(
        docker.contains(&format!("--build-arg KMS_KEY_ARNS={key_arn}")),
        "{docker}"
    );
    let policy: Value =
        serde_json::from_str(&fs::read_to_string(walk.checkout.join("policy.json")).unwrap())
            .expect("step 4's policy.json is JSON");
    assert!(policy.to_string().contains(&pcr('a')), "{policy}");
    at(&format!(
        "aws kms put-key-policy --key-id {key_arn} --policy-name default --policy file://policy.json"
    ));
    // Step 5: sealed with one GenerateDataKey, installed 0600 root.
    let gdk = kms.calls(Operation::GenerateDataKey);
    assert_eq!((gdk.calls, gdk.errors), (1, 0));
    let sealed = walk.file("/etc/nitro-keystore/secrets.env");
    let lines: Vec<&str> = sealed.lines().collect();
    assert_eq!(lines[0], "# billing");
    assert!(lines[1].starts_with("DB_PASSWORD='ENC[v1:fk:"), "{sealed}");
    assert!(lines[2].starts_with("API_TOKEN=ENC[v1:fk:"), "{sealed}");
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("keystore:file=ENC[v1:file:"),
        "{sealed}"
    );
    assert!(!sealed.contains("p@ss") && !sealed.contains("tok-1234"));
    // Step 6: the enclave started from the EIF step 4 built, and the
    // daemon enabled once its unit and environment file were in place
    // (the stand-in checks; it was called after step 5 installed the
    // secrets).
    at(
        "nitro-cli run-enclave --eif-path build/keystore-enclave.eif --enclave-cid 16 --memory 1024 --cpu-count 2",
    );
    let enable = at("systemctl enable --now keystore-host-proxy");
    let step6 = calls
        .iter()
        .position(|c| c.starts_with("## step 6"))
        .unwrap();
    assert!(step6 < enable);
    assert_eq!(
        walk.file("/etc/systemd/system/keystore-host-proxy.service"),
        fs::read_to_string(repo().join("deploy/keystore-host-proxy.service")).unwrap()
    );
    assert_eq!(
        walk.file("/etc/nitro-keystore/proxy.env"),
        fs::read_to_string(repo().join("deploy/proxy.env.example")).unwrap()
    );
    let verify = fs::read_to_string(walk.fake.join("verify.err")).unwrap();
    assert!(verify.trim().is_empty(), "systemd-analyze verify: {verify}");
    // Step 7: a token file the app's group reads; the daemon reloaded.
    let token = walk.file("/etc/nitro-keystore/tokens/api");
    let value = token
        .strip_prefix("token = ")
        .and_then(|t| t.strip_suffix("\nuser = api\n"))
        .unwrap_or_else(|| panic!("{token:?}"));
    assert!(value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(enable < at("systemctl reload keystore-host-proxy"));
    // Step 8: attest against the measurements of step 4.
    at(&format!("keystore-host attest --pcr 0={}", pcr('a')));
    at("keystore-host get DB_PASSWORD");

    // Owners and modes, as the README promises.
    let stat = fs::read_to_string(walk.fake.join("stat.txt")).unwrap();
    let mut want = vec![
        "/usr/local/bin/keystore-host root root 755",
        "/etc/nitro_enclaves/allocator.yaml root root 644",
        "/etc/nitro-keystore root root 755",
        "/etc/nitro-keystore/secrets.env root root 600",
        "/etc/nitro-keystore/proxy.env root root 644",
        "/etc/systemd/system/keystore-host-proxy.service root root 644",
        "/etc/nitro-keystore/tokens root root 755",
        "/etc/nitro-keystore/tokens/api root api 640",
    ];
    let mut got: Vec<&str> = stat.lines().collect();
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, want);
}

/// The same runner fails when the README's order is wrong: each mutation
/// of a copy of the README must stop the walk-through in the step named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readme_in_the_wrong_order_fails_the_walkthrough() {
    let dir = tempfile::tempdir().unwrap();
    let (kms, key_arn) = emulator(dir.path()).await;
    let readme = readme();
    let unit = "sudo cp deploy/keystore-host-proxy.service /etc/systemd/system/\n";
    let enable = "sudo systemctl enable --now keystore-host-proxy\n";
    let install = "sudo install -m 0755 target/release/keystore-host /usr/local/bin/\n";
    let mutations: [(&str, String, u32); 3] = [
        (
            // The issue's bug: step 5 installing into a directory that
            // only step 6 creates.
            "step 5 without install -D",
            readme.replacen(
                "sudo install -D -m 0600 secrets.env",
                "sudo install -m 0600 secrets.env",
                1,
            ),
            5,
        ),
        (
            "the daemon enabled before its unit is installed",
            readme.replacen(&format!("{unit}{enable}"), &format!("{enable}{unit}"), 1),
            6,
        ),
        (
            "the binary installed after the steps that use it",
            readme
                .replacen(install, "", 1)
                .replacen(enable, &format!("{enable}{install}"), 1),
            4,
        ),
    ];
    for (what, broken, step) in mutations {
        assert_ne!(
            broken, readme,
            "{what}: the mutation found nothing to change"
        );
        let walk = walk(&broken, &kms, &key_arn);
        assert!(
            !walk.output.status.success(),
            "{what}: the walk-through passed:\n{}",
            walk.report()
        );
        assert_eq!(walk.last_step(), Some(step), "{what}:\n{}", walk.report());
    }
}
