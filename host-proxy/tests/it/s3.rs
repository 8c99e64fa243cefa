//! `proxy --secrets s3://BUCKET/KEY` against moto's S3: the daemon fetches
//! the object (polled by ETag), loads it into the real enclave (whose KMS
//! is our emulator, which the values are encrypted under), follows changes,
//! and keeps the enclave's set when the object is missing, malformed or S3
//! is unreachable. SIGHUP fetches at once.

use std::time::Duration;

use aws_sdk_kms::config::Credentials;
use aws_sdk_kms::primitives::Blob;
use keystore_host::secrets_file::dotenv::MAX_FILE_SIZE;
use keystore_shared::envelope::{Envelope, NAME_CONTEXT_KEY};
use keystore_tests::kms::{Credential, MockKms, MockKmsConfig, MockKmsHandle};

use crate::support::moto::{Moto, REGION};
use crate::support::stack::{KmsUpstream, Stack};

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

struct S3Stack {
    dir: tempfile::TempDir,
    kms: MockKmsHandle,
    moto: Moto,
    stack: Stack,
    client: aws_sdk_kms::Client,
    key_arn: String,
}

impl S3Stack {
    async fn start() -> S3Stack {
        let dir = tempfile::tempdir().unwrap();
        let moto = Moto::start(dir.path());
        let kms = MockKms::start(
            MockKmsConfig::new(
                dir.path().join("kms-tls"),
                vec![Credential::new(ACCESS_KEY, SECRET_KEY)],
            )
            .with_attestation_root(dir.path().join("pki/root.pem")),
        )
        .await
        .unwrap();
        // The default policy lets these credentials decrypt for an
        // attested enclave: enough here, the pinning tests are in e2e.
        let key_arn = kms.create_key(None).unwrap().arn;
        let sdk = keystore_host::aws::sdk_config(
            Some(REGION.into()),
            Some(kms.endpoint_url().into()),
            Some(std::fs::read(kms.ca_pem_path()).unwrap()),
        )
        .await
        .unwrap();
        let client = aws_sdk_kms::Client::from_conf(
            aws_sdk_kms::config::Builder::from(&sdk)
                .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "s3"))
                .build(),
        );
        let stack = Stack::new(dir.path());
        S3Stack {
            dir,
            kms,
            moto,
            stack,
            client,
            key_arn,
        }
    }

    async fn encrypt(&self, name: &str, value: &str) -> String {
        let out = self
            .client
            .encrypt()
            .key_id(&self.key_arn)
            .plaintext(Blob::new(value.as_bytes().to_vec()))
            .encryption_context(NAME_CONTEXT_KEY, name)
            .send()
            .await
            .unwrap();
        Envelope::kms(out.ciphertext_blob().unwrap().as_ref().to_vec())
            .unwrap()
            .to_string()
    }

    fn upload(&self, text: &str) {
        let file = self.dir.path().join("upload.env");
        std::fs::write(&file, text).unwrap();
        self.moto.boto3(PUT, &[BUCKET, KEY, file.to_str().unwrap()]);
    }

    fn delete(&self) {
        self.moto.boto3(PUT, &[BUCKET, KEY]);
    }

    fn run(&mut self, poll_seconds: &str) {
        let upstream = KmsUpstream {
            port: self.kms.local_addr().port(),
            ca_pem: self.kms.ca_pem_path().to_owned(),
            key_arn: self.key_arn.clone(),
            mock_pki: self.dir.path().join("pki"),
        };
        self.stack.start_enclave(&upstream);
        let ca = self.moto.ca_pem_path();
        let endpoint = self.moto.endpoint_url();
        self.stack.start_proxy(
            upstream.port,
            &url(),
            &[
                "--s3-endpoint-url",
                &endpoint,
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
    let mut s = S3Stack::start().await;
    let v1 = s.encrypt("DB_PASSWORD", "from-s3-one").await;
    s.upload(&format!(
        "# fleet secrets\nPLAIN=visible\nDB_PASSWORD={v1}\n"
    ));
    s.run("1");
    s.stack.wait_for_value("DB_PASSWORD", "from-s3-one").await;
    assert_eq!(s.stack.status().await.unwrap().secret_count, 1);

    // Unchanged polls are conditional: moto answers 304 Not Modified.
    // (werkzeug may colour the request line: match its parts.)
    let get = format!("GET /{BUCKET}/{KEY}");
    s.stack
        .until("a 304 answer to the conditional GET", || async {
            s.moto
                .log()
                .lines()
                .any(|line| line.contains(&get) && line.contains("\" 304 "))
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
    s.moto.stop();
    let fetch_error = format!("cannot fetch {}: connecting to S3", url());
    let before = s.stack.proxy_log_count(&fetch_error);
    s.stack.proxy.as_ref().unwrap().signal("-HUP");
    s.stack.wait_for_proxy_log(&fetch_error, before).await;
    still_serves(&s.stack, "API_TOKEN", "tok-two").await;
}
