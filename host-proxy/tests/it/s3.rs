//! `proxy --secrets s3://BUCKET/KEY` against moto's S3: the daemon fetches
//! the object (polled by ETag), loads it into the real enclave (whose KMS
//! is our emulator, which the values are encrypted under), follows changes,
//! and keeps the enclave's set when the object is missing, malformed or S3
//! is unreachable. SIGHUP fetches at once. `keystore-host encrypt
//! s3://BUCKET/KEY` rewrites an object in place, only over the version it
//! read (`If-Match`), and not at all when nothing changed.

use std::process::Command;
use std::time::Duration;

use aws_sdk_kms::config::Credentials;
use keystore_host::secrets_file::dotenv::{DotEnv, MAX_FILE_SIZE};
use keystore_host::secrets_file::location::{self, Location, LocationError, S3Access, Updated};
use zeroize::Zeroizing;

use crate::support::emulator::Emulator;
use crate::support::moto::Moto;
use crate::support::peer::{AwsPeer, REGION};
use crate::support::relay::Relay;
use crate::support::stack::Stack;

const ACCESS_KEY: &str = "AKIAS3TESTS3TESTS301";
const SECRET_KEY: &str = "s3-secret-access-key";
const BUCKET: &str = "keystore-fleet";
const KEY: &str = "prod/secrets.env";

/// Uploads (or deletes, with `None`) the object through boto3.
const PUT: &str = r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], verify=sys.argv[2])
bucket, key = sys.argv[3], sys.argv[4]
if len(sys.argv) > 5:
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    s3.put_object(Bucket=bucket, Key=key, Body=open(sys.argv[5], "rb").read())
else:
    s3.delete_object(Bucket=bucket, Key=key)
"#;

/// Prints the object's ETag, then its body.
const GET: &str = r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], verify=sys.argv[2])
out = s3.get_object(Bucket=sys.argv[3], Key=sys.argv[4])
sys.stdout.write(out["ETag"] + "\n" + out["Body"].read().decode())
"#;

pub struct S3Stack {
    dir: tempfile::TempDir,
    /// KMS: values are sealed under its key.
    emulator: Emulator,
    /// The S3 server (moto or LocalStack).
    peer: Box<dyn AwsPeer>,
    stack: Stack,
}

impl S3Stack {
    async fn start() -> S3Stack {
        S3Stack::start_with(|dir| Box::new(Moto::start(dir))).await
    }

    /// The stack with the S3 server `start` starts in the test's dir.
    pub async fn start_with(start: impl FnOnce(&std::path::Path) -> Box<dyn AwsPeer>) -> S3Stack {
        let dir = tempfile::tempdir().unwrap();
        let peer = start(dir.path());
        let emulator = Emulator::start(dir.path(), (ACCESS_KEY, SECRET_KEY)).await;
        let stack = Stack::new(dir.path());
        S3Stack {
            dir,
            emulator,
            peer,
            stack,
        }
    }

    async fn encrypt(&self, name: &str, value: &str) -> String {
        self.emulator.seal(name, value).await
    }

    fn upload(&self, text: &str) {
        let file = self.dir.path().join("upload.env");
        std::fs::write(&file, text).unwrap();
        self.peer.boto3(PUT, &[BUCKET, KEY, file.to_str().unwrap()]);
    }

    /// The object's ETag and text.
    fn download(&self) -> (String, String) {
        let out = self.peer.boto3(GET, &[BUCKET, KEY]);
        let (etag, text) = out.split_once('\n').unwrap();
        (etag.to_owned(), text.to_owned())
    }

    /// How many `PutObject`s the server has carried out (200) for the
    /// object.
    fn puts(&self) -> usize {
        self.peer.s3_answers("PutObject", BUCKET, KEY, 200)
    }

    /// Runs `keystore-host encrypt ... s3://BUCKET/KEY`: KMS is the
    /// emulator, S3 is the stack's server.
    fn encrypt_object(&self, extra: &[&str]) -> std::process::Output {
        self.encrypt_url(&url(), extra)
    }

    /// `keystore-host encrypt ... URL`.
    fn encrypt_url(&self, url: &str, extra: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_keystore-host"))
            .args([
                "encrypt",
                "--key-id",
                &self.emulator.key_arn,
                "--region",
                REGION,
            ])
            .args(["--endpoint-url", self.emulator.kms.endpoint_url()])
            .arg("--ca-bundle")
            .arg(self.emulator.kms.ca_pem_path())
            .args(["--s3-endpoint-url", &self.peer.endpoint_url()])
            .arg("--s3-ca-bundle")
            .arg(self.peer.ca_pem_path())
            .args(extra)
            .arg(url)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap()
    }

    /// The library's S3 access to the stack's server, as `encrypt` builds
    /// it.
    async fn s3_access(&self) -> S3Access {
        let sdk = keystore_host::aws::sdk_config(
            Some(REGION.into()),
            Some(self.peer.endpoint_url()),
            Some(std::fs::read(self.peer.ca_pem_path()).unwrap()),
        )
        .await
        .unwrap();
        let client = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&sdk)
                .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "s3"))
                .force_path_style(true)
                .build(),
        );
        S3Access::new(client, Duration::from_secs(10))
    }

    fn delete(&self) {
        self.peer.boto3(PUT, &[BUCKET, KEY]);
    }

    fn run(&mut self, poll_seconds: &str) {
        let endpoint = self.peer.endpoint_url();
        self.run_via(poll_seconds, &endpoint);
    }

    /// Like [`S3Stack::run`], with the daemon reaching S3 at `endpoint`.
    fn run_via(&mut self, poll_seconds: &str, endpoint: &str) {
        let upstream = self.emulator.upstream();
        self.stack.start_enclave(&upstream);
        let ca = self.peer.ca_pem_path();
        self.stack.start_proxy(
            upstream.port,
            &url(),
            &[
                "--s3-endpoint-url",
                endpoint,
                "--s3-ca-bundle",
                ca.to_str().unwrap(),
                "--s3-timeout",
                "5",
                "--secrets-poll",
                poll_seconds,
            ],
            (ACCESS_KEY, SECRET_KEY),
        );
    }
}

fn url() -> String {
    format!("s3://{BUCKET}/{KEY}")
}

/// Asserts the enclave still serves `value` for `name` a little after a
/// failure was logged (the loader has had its chance to break it).
async fn still_serves(stack: &Stack, name: &str, value: &str) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        stack.get(name).await.as_deref(),
        Some(value),
        "{}",
        stack.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_from_s3_are_loaded_followed_by_etag_and_kept_on_failure() {
    loaded_followed_by_etag_and_kept_on_failure(S3Stack::start().await).await;
}

/// The daemon loads the object from the stack's S3 server, follows it by
/// ETag (unchanged polls answered 304), and keeps the set when the object
/// is missing or malformed.
pub async fn loaded_followed_by_etag_and_kept_on_failure(mut s: S3Stack) {
    let v1 = s.encrypt("DB_PASSWORD", "from-s3-one").await;
    s.upload(&format!(
        "# fleet secrets\nPLAIN=visible\nDB_PASSWORD={v1}\n"
    ));
    s.run("1");
    s.stack.wait_for_value("DB_PASSWORD", "from-s3-one").await;
    assert_eq!(s.stack.status().await.unwrap().secret_count, 1);

    // Unchanged polls are conditional: S3 answers 304 Not Modified.
    s.stack
        .until("a 304 answer to the conditional GET", || async {
            s.peer.s3_answers("GetObject", BUCKET, KEY, 304) > 0
        })
        .await;

    // A new object is picked up without a signal.
    let v2 = s.encrypt("DB_PASSWORD", "from-s3-two").await;
    s.upload(&format!("DB_PASSWORD={v2}\n"));
    s.stack.wait_for_value("DB_PASSWORD", "from-s3-two").await;

    // Unchanged polls were not failures (a 304 is not an error).
    assert_eq!(
        s.stack.proxy_log_count("cannot fetch"),
        0,
        "{}",
        s.stack.logs()
    );

    // The object disappears (as a denied GetObject would): named, and the
    // enclave keeps its set.
    let fetch_error = format!("cannot fetch {}: NoSuchKey", url());
    let before = s.stack.proxy_log_count(&fetch_error);
    s.delete();
    s.stack.wait_for_proxy_log(&fetch_error, before).await;
    still_serves(&s.stack, "DB_PASSWORD", "from-s3-two").await;

    // A malformed object: refused naming the URL and the entry, old set
    // kept.
    s.upload("DB_PASSWORD=ENC[v1:kms:not base64!]\n");
    let malformed = format!("{}: line 1 (DB_PASSWORD)", url());
    s.stack.wait_for_proxy_log(&malformed, 0).await;
    still_serves(&s.stack, "DB_PASSWORD", "from-s3-two").await;

    // Back to a good object: loaded again.
    let v3 = s.encrypt("DB_PASSWORD", "from-s3-three").await;
    s.upload(&format!("DB_PASSWORD={v3}\n"));
    s.stack.wait_for_value("DB_PASSWORD", "from-s3-three").await;
    let log = s.stack.logs();
    for secret in ["from-s3-one", "from-s3-two", "from-s3-three"] {
        assert!(!log.contains(secret), "a value reached a log");
    }

    // Each fetch was counted by outcome: bodies, 304s and the missing key.
    let url = s.stack.metrics_url().await;
    let (status, text) = crate::metrics::scrape(&url);
    assert_eq!(status, 200, "{text}");
    let samples = crate::metrics::parse(&text);
    let get = |outcome: &str| {
        samples
            .get(&format!("keystore_s3_fetches_total{{outcome={outcome}}}"))
            .copied()
            .unwrap_or(0.0)
    };
    assert!(get("ok") >= 3.0, "{text}");
    assert!(get("not_modified") >= 1.0, "{text}");
    assert!(get("not_found") >= 1.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_fetches_the_object_now_and_unreachable_s3_keeps_the_set() {
    let mut s = S3Stack::start().await;
    let v1 = s.encrypt("API_TOKEN", "tok-one").await;
    s.upload(&format!("API_TOKEN={v1}\n"));
    // Polls once an hour: only the forced first load and SIGHUP fetch.
    s.run("3600");
    s.stack.wait_for_value("API_TOKEN", "tok-one").await;

    let v2 = s.encrypt("API_TOKEN", "tok-two").await;
    s.upload(&format!("API_TOKEN={v2}\n"));
    let requested = s.stack.proxy_log_count("reload requested");
    s.stack.proxy.as_ref().unwrap().signal("-HUP");
    s.stack
        .wait_for_proxy_log("reload requested", requested)
        .await;
    s.stack.wait_for_value("API_TOKEN", "tok-two").await;

    // An object over the local file's bound is refused unread; the set
    // stays.
    let mut huge = format!("API_TOKEN={v2}\n");
    huge.push_str(&"#".repeat(MAX_FILE_SIZE));
    s.upload(&huge);
    let too_large = format!(
        "cannot fetch {}: object larger than {MAX_FILE_SIZE} bytes",
        url()
    );
    s.stack.proxy.as_ref().unwrap().signal("-HUP");
    s.stack.wait_for_proxy_log(&too_large, 0).await;
    still_serves(&s.stack, "API_TOKEN", "tok-two").await;

    // S3 unreachable: SIGHUP's fetch fails naming the URL, within the
    // bound, and the enclave keeps its set.
    s.peer.stop();
    let fetch_error = format!("cannot fetch {}: connecting to S3", url());
    let before = s.stack.proxy_log_count(&fetch_error);
    s.stack.proxy.as_ref().unwrap().signal("-HUP");
    s.stack.wait_for_proxy_log(&fetch_error, before).await;
    still_serves(&s.stack, "API_TOKEN", "tok-two").await;
}

/// S3 unreachable (the fault matrix's last row), then reachable again: the
/// polls fail naming the URL while the enclave serves its set whole; once
/// S3 answers, the next poll loads the object changed meanwhile, unaided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_s3_keeps_the_set_and_recovers_by_itself() {
    let mut s = S3Stack::start().await;
    let mut relay = Relay::start(s.peer.port()).await;
    let v1 = s.encrypt("API_TOKEN", "tok-one").await;
    s.upload(&format!("API_TOKEN={v1}\n"));
    // The name the server's certificate holds, the relay's port.
    s.run_via("1", &format!("https://localhost:{}", relay.port()));
    s.stack.wait_for_value("API_TOKEN", "tok-one").await;

    relay.cut();
    // Changed while the daemon cannot see it.
    let v2 = s.encrypt("API_TOKEN", "tok-two").await;
    s.upload(&format!("API_TOKEN={v2}\n"));
    let fetch_error = format!("cannot fetch {}: connecting to S3", url());
    let before = s.stack.proxy_log_count(&fetch_error);
    // Two failed polls in a row: the daemon keeps trying, and the set stays.
    s.stack.wait_for_proxy_log(&fetch_error, before + 1).await;
    still_serves(&s.stack, "API_TOKEN", "tok-one").await;

    relay.restore().await;
    s.stack.wait_for_value("API_TOKEN", "tok-two").await;
    assert!(
        s.stack
            .status()
            .await
            .is_some_and(|st| st.ready && st.last_error.is_none()),
        "{}",
        s.stack.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypt_rewrites_an_s3_object_in_place_and_the_daemon_serves_it() {
    encrypt_rewrites_the_object_and_the_daemon_serves_it(&mut S3Stack::start().await).await;
}

/// `encrypt s3://...` on the stack's S3 server (KMS: the emulator), a
/// second run that writes nothing, and the daemon serving the result.
pub async fn encrypt_rewrites_the_object_and_the_daemon_serves_it(s: &mut S3Stack) {
    let plain =
        "# fleet secrets\nLOG_LEVEL=debug\nDB_PASSWORD=s3-db-secret\nAPI_TOKEN='s3 token'\n";
    s.upload(plain);
    // A missing object is named with S3's code; nothing is created.
    let missing = format!("s3://{BUCKET}/missing.env");
    let out = s.encrypt_url(&missing, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("cannot fetch {missing}: NoSuchKey")),
        "{stderr}"
    );
    // A malformed object is named by its URL, line and path; it stays as
    // it was.
    let bad = "{\"db\": {\"password\": \"s3-bad-secret\", }}";
    let file = s.dir.path().join("bad.json");
    std::fs::write(&file, bad).unwrap();
    s.peer
        .boto3(PUT, &[BUCKET, "bad.json", file.to_str().unwrap()]);
    let out = s.encrypt_url(&format!("s3://{BUCKET}/bad.json"), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("encrypting s3://{BUCKET}/bad.json")) && stderr.contains("line 1"),
        "{stderr}"
    );
    assert!(!stderr.contains("s3-bad-secret"), "{stderr}");
    let still = s.peer.boto3(GET, &[BUCKET, "bad.json"]);
    assert!(still.ends_with(bad), "{still}");

    let (etag_before, _) = s.download();
    let puts = s.puts();

    let out = s.encrypt_object(&["--keys", "DB_*", "--keys", "API_*"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "encrypt s3:// failed:\n{stderr}\n--- server log\n{}",
        s.peer.log()
    );
    assert!(stderr.contains(&format!("{}: written", url())), "{stderr}");
    assert_eq!(s.puts(), puts + 1, "one conditional write");
    let (etag, text) = s.download();
    assert_ne!(etag, etag_before);
    // Encrypted as a local file would be: layout and plain settings kept,
    // values sealed under a file key, and the record.
    assert!(
        text.starts_with("# fleet secrets\nLOG_LEVEL=debug\nDB_PASSWORD=ENC[v1:fk:"),
        "{text}"
    );
    assert!(!text.contains("s3-db-secret") && !text.contains("s3 token"));
    let file = DotEnv::parse(text.as_bytes()).unwrap();
    let names: Vec<&str> = file.entries().map(|e| e.name).collect();
    assert_eq!(
        names,
        ["LOG_LEVEL", "DB_PASSWORD", "API_TOKEN", "keystore:file"]
    );

    // Idempotent: nothing to seal, nothing written, the ETag unchanged.
    let out = s.encrypt_object(&["--keys", "DB_*", "--keys", "API_*"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("{}: unchanged, nothing written", url())),
        "{stderr}"
    );
    assert_eq!(s.puts(), puts + 1, "no write on the second run");
    assert_eq!(s.download(), (etag, text));

    // The daemon reads the object and the enclave serves the values.
    s.run("3600");
    s.stack.wait_for_value("DB_PASSWORD", "s3-db-secret").await;
    s.stack.wait_for_value("API_TOKEN", "s3 token").await;
    assert_eq!(
        s.stack.get("LOG_LEVEL").await,
        None,
        "plain values stay on the host"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_change_between_read_and_write_is_refused_and_kept() {
    concurrent_change_is_refused_and_kept(&S3Stack::start().await).await;
}

/// A write over an object changed since it was read is refused (If-Match)
/// and the other writer's object kept; an unchanged object is not
/// written; a changed one is, over exactly the version read.
pub async fn concurrent_change_is_refused_and_kept(s: &S3Stack) {
    let s3 = s.s3_access().await;
    let location = Location::parse(&url()).unwrap();
    s.upload("A=1\n");

    // Read, another writer replaces the object, then our write: refused
    // (If-Match), the other writer's object kept.
    let read = location.read(Some(&s3)).await.unwrap();
    assert_eq!(&read.bytes[..], b"A=1\n");
    s.upload("A=2\n");
    let err = location
        .write(Some(&s3), b"A=mine\n", &read.version)
        .await
        .unwrap_err();
    assert!(matches!(err, LocationError::Conflict { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "{} changed since it was read (another writer?); nothing was written: run the \
             command again on the new contents",
            url()
        )
    );
    assert_eq!(s.download().1, "A=2\n");

    // The same through `update`, the path `encrypt s3://` and `rotate
    // s3://` take: the object changes while the command works on its
    // contents in memory.
    let puts = s.puts();
    let other = s;
    let result: Result<((), Updated), LocationError> =
        location::update(&location, Some(&s3), |bytes| async move {
            assert_eq!(&bytes[..], b"A=2\n");
            other.upload("A=3\n");
            Ok(((), Some(Zeroizing::new(b"A=mine\n".to_vec()))))
        })
        .await;
    let err = result.unwrap_err();
    assert!(matches!(err, LocationError::Conflict { .. }), "{err}");
    assert_eq!(s.download().1, "A=3\n");
    assert_eq!(s.puts(), puts + 1, "only the other writer's upload landed");
    assert!(
        s.peer.s3_answers("PutObject", BUCKET, KEY, 412) > 0,
        "the write was refused by S3 (If-Match), not skipped:\n{}",
        s.peer.log()
    );

    // Unchanged by the command: nothing written.
    let (etag, _) = s.download();
    let (_, updated) = location::update(&location, Some(&s3), |_bytes| async {
        Ok::<_, LocationError>(((), None))
    })
    .await
    .unwrap();
    assert_eq!(updated, Updated::Unchanged);
    assert_eq!(s.puts(), puts + 1);

    // Changed, nobody else writing: written over exactly the version read.
    let (_, updated) = location::update(&location, Some(&s3), |bytes| async move {
        assert_eq!(&bytes[..], b"A=3\n");
        Ok::<_, LocationError>(((), Some(Zeroizing::new(b"A=4\n".to_vec()))))
    })
    .await
    .unwrap();
    let (new_etag, text) = s.download();
    assert_eq!(text, "A=4\n");
    assert_ne!(new_etag, etag);
    assert_eq!(updated, Updated::Written(location::Version::ETag(new_etag)));
}
