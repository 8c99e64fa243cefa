//! Shared set-up for the enclave's KMS tests against the KMS emulator of
//! `keystore-tests`: emulator + mock NSM it trusts + recipient + the
//! enclave's `Kms` client, a scripted credentials service (the protocol
//! peer) and a TCP relay standing in for the vsock proxy that records SNI.
#![allow(dead_code, clippy::unwrap_used, missing_docs)]

use keystore_tests::fixture;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_kms::primitives::Blob;
pub use fixture::{Fixture, PCR0};
use keystore_enclave::audit::{AuditConfig, AuditTrail};
use keystore_enclave::kms::breaker::BreakerConfig;
use keystore_enclave::kms::credentials::CredentialsConfig;
use keystore_enclave::kms::transport::TransportConfig;
use keystore_enclave::kms::{Kms, KmsConfig, PinnedKeys};
use keystore_enclave::load::{LoadConfig, Loader};
use keystore_enclave::recipient::{Recipient, RecipientBits, RecipientConfig, RecipientHandle};
use keystore_enclave::service::KeystoreService;
use keystore_enclave::store::{SealKey, Store, StoreConfig};
use keystore_nsm::{AttestationRequest, MockConfig, MockNsm, Nsm, NsmError, PcrDescription};
use keystore_shared::endpoint::Endpoint;
use keystore_shared::envelope::NAME_CONTEXT_KEY;
use keystore_shared::frame::Connection;
use keystore_shared::protocol::{
    Credentials, ErrorCode, Request, RequestOp, Response, ResponseBody, SecretString,
};
use keystore_tests::kms::Credential;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The TLS name the emulator's certificate covers (tests/src/tls.rs).
pub const KMS_HOST: &str = "localhost";
/// The temporary credential the credentials service hands out; the
/// emulator checks key, secret and session token.
pub const ACCESS_KEY: &str = "ASIATESTKEYSTORE0001";
pub const SECRET_KEY: &str = "test-secret-access-key-never-logged";
pub const SESSION_TOKEN: &str = "session-token";

/// The mock NSM with a movable clock, so fresh documents can look as young
/// as the emulator's advanced clock expects.
pub struct ShiftedNsm {
    inner: MockNsm,
    pub ahead_secs: AtomicU64,
}

impl Nsm for ShiftedNsm {
    fn attest(&self, req: &AttestationRequest) -> Result<Vec<u8>, NsmError> {
        let ahead = Duration::from_secs(self.ahead_secs.load(Ordering::SeqCst));
        self.inner.attest_at(req, SystemTime::now() + ahead)
    }
    fn fill_random(&self, buf: &mut [u8]) -> Result<(), NsmError> {
        self.inner.fill_random(buf)
    }
    fn describe_pcr(&self, index: u16) -> Result<PcrDescription, NsmError> {
        self.inner.describe_pcr(index)
    }
}

/// Emulator, relay in front of it, credentials service, NSM and recipient.
pub struct Emulator {
    pub fx: Fixture,
    pub relay: Relay,
    pub creds: CredentialsService,
    pub nsm: Arc<ShiftedNsm>,
    pub recipient: Recipient,
    /// The ARN of the key [`Emulator::kms`] pins; its policy lets only an
    /// enclave with [`PCR0`] decrypt.
    pub key_arn: String,
    _handle: RecipientHandle,
}

impl Emulator {
    /// The recipient's NSM shares the emulator's trusted root.
    pub async fn start() -> Emulator {
        let fx = Fixture::start().await;
        let nsm_dir = fx.dir.path().join("nsm");
        Emulator::start_with_nsm_dir(fx, &nsm_dir).await
    }

    /// The recipient's NSM has a root of its own the emulator does not trust.
    pub async fn start_untrusted_nsm() -> Emulator {
        let fx = Fixture::start().await;
        let nsm_dir = fx.dir.path().join("other-nsm");
        Emulator::start_with_nsm_dir(fx, &nsm_dir).await
    }

    async fn start_with_nsm_dir(fx: Fixture, nsm_dir: &std::path::Path) -> Emulator {
        let nsm = Arc::new(ShiftedNsm {
            inner: MockNsm::open_with_pcr0(nsm_dir, MockConfig::default(), PCR0).unwrap(),
            ahead_secs: AtomicU64::new(0),
        });
        let (recipient, handle) = Recipient::start(
            nsm.clone(),
            RecipientConfig {
                bits: RecipientBits::B2048,
                ..RecipientConfig::default()
            },
        )
        .await
        .unwrap();
        fx.kms.add_credential(
            Credential::new(ACCESS_KEY, SECRET_KEY).with_session_token(SESSION_TOKEN, None),
        );
        let relay = Relay::start(fx.kms.local_addr()).await;
        let creds = CredentialsService::fixed().await;
        let key_arn = fx.kms.create_key(Some(&pcr0_policy(&PCR0))).unwrap().arn;
        Emulator {
            fx,
            relay,
            creds,
            nsm,
            recipient,
            key_arn,
            _handle: handle,
        }
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.fx.kms.ca_pem_path()).unwrap()
    }

    /// The enclave's client: through the relay, trusting the emulator's CA,
    /// pinning [`Emulator::key_arn`].
    pub fn kms(&self) -> Kms {
        self.kms_pinned(&[&self.key_arn])
    }

    /// The enclave's client pinning `keys` (ARNs), in that order.
    pub fn kms_pinned(&self, keys: &[&str]) -> Kms {
        let mut config = self.kms_config(self.relay.endpoint(), Some(self.ca_pem()));
        config.pinned_keys = pinned(keys);
        Kms::new(config).unwrap()
    }

    /// Settings pinning [`Emulator::key_arn`].
    pub fn kms_config(&self, proxy: Endpoint, ca_pem: Option<Vec<u8>>) -> KmsConfig {
        let mut config = kms_config(
            self.fx.kms.region(),
            proxy,
            ca_pem,
            self.creds.endpoint.clone(),
        );
        config.pinned_keys = pinned(&[&self.key_arn]);
        config
    }

    /// The ARN of a new key whose policy lets only an enclave with `pcr0`
    /// decrypt (not pinned by [`Emulator::kms`]).
    pub fn key(&self, pcr0: &[u8]) -> String {
        self.fx
            .kms
            .create_key(Some(&pcr0_policy(pcr0)))
            .unwrap()
            .arn
    }

    /// The operator side: `Encrypt` with the name-binding context.
    pub async fn encrypt(&self, key: &str, name: &str, value: &[u8]) -> Vec<u8> {
        self.fx
            .client()
            .encrypt()
            .key_id(key)
            .plaintext(Blob::new(value))
            .encryption_context(NAME_CONTEXT_KEY, name)
            .send()
            .await
            .unwrap()
            .ciphertext_blob
            .unwrap()
            .into_inner()
    }

    /// Makes the published document look `secs` old to the emulator, while
    /// documents made from now on carry the emulator's time.
    pub fn age_documents(&self, secs: u64) {
        self.fx.kms.advance_clock(Duration::from_secs(secs));
        self.nsm.ahead_secs.store(secs, Ordering::SeqCst);
    }
}

/// A store, a loader over a `Kms` that retries fast (two attempts, 5–20
/// ms apart) and the service that answers `status` for them: what the
/// fault tests drive.
pub struct Serving {
    pub store: Arc<Store>,
    pub loader: Arc<Loader>,
    pub service: KeystoreService,
}

impl Emulator {
    /// [`Serving`] over `kms`, `concurrency` KMS calls at a time.
    pub fn serving(&self, kms: Kms, concurrency: usize) -> Serving {
        let store = Arc::new(Store::new(
            SealKey::from_entropy(&[5; 32], &[6; 32]),
            StoreConfig::default(),
        ));
        let load = LoadConfig {
            concurrency,
            max_attempts: 2,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            ..LoadConfig::default()
        };
        let loader =
            Arc::new(Loader::new(kms, self.recipient.clone(), store.clone(), load).unwrap());
        let nsm: Arc<dyn Nsm> = self.nsm.clone();
        let audit = Arc::new(AuditTrail::new(nsm.clone(), AuditConfig::default()).unwrap());
        let service = KeystoreService::new(store.clone(), self.recipient.clone(), nsm, audit)
            .with_loader(loader.clone());
        Serving {
            store,
            loader,
            service,
        }
    }
}

/// `keys` as the enclave pins them.
pub fn pinned(keys: &[&str]) -> PinnedKeys {
    PinnedKeys::parse(keys).unwrap()
}

/// Settings with no pinned key (tests set [`KmsConfig::pinned_keys`]).
pub fn kms_config(
    region: &str,
    proxy: Endpoint,
    ca_pem: Option<Vec<u8>>,
    credentials: Endpoint,
) -> KmsConfig {
    let mut transport = TransportConfig::new(proxy, KMS_HOST);
    transport.extra_ca_pem = ca_pem;
    transport.connect_timeout = Duration::from_secs(5);
    transport.call_timeout = Duration::from_secs(20);
    KmsConfig {
        region: region.to_owned(),
        transport,
        credentials: CredentialsConfig::new(credentials),
        operation_timeout: Duration::from_secs(30),
        pinned_keys: PinnedKeys::default(),
        breaker: BreakerConfig::default(),
    }
}

pub fn pcr0_policy(pcr0: &[u8]) -> String {
    format!(
        r#"{{"Version":"2012-10-17","Statement":[
        {{"Sid":"Admin","Effect":"Allow","Principal":{{"AWS":"arn:aws:iam::111122223333:root"}},
          "Action":["kms:Encrypt","kms:GenerateDataKey","kms:DescribeKey","kms:PutKeyPolicy"],"Resource":"*"}},
        {{"Sid":"EnclaveOnly","Effect":"Allow","Principal":{{"AWS":"arn:aws:iam::111122223333:root"}},
          "Action":["kms:Decrypt"],"Resource":"*",
          "Condition":{{"StringEqualsIgnoreCase":{{"kms:RecipientAttestation:ImageSha384":"{}"}}}}}}]}}"#,
        hex::encode(pcr0)
    )
}

pub fn context(name: &str) -> BTreeMap<String, String> {
    keystore_shared::envelope::encryption_context(name)
}

/// A free port nothing listens on (bound, then dropped).
pub fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A TCP relay on 127.0.0.1 to `target`, standing in for the vsock proxy:
/// counts accepted connections and records each ClientHello's SNI.
pub struct Relay {
    pub port: u16,
    accepted: Arc<AtomicUsize>,
    snis: Arc<Mutex<Vec<Option<String>>>>,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let snis = Arc::new(Mutex::new(Vec::new()));
        let (accepted2, snis2) = (accepted.clone(), snis.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                accepted2.fetch_add(1, Ordering::SeqCst);
                let snis = snis2.clone();
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(60), relay(client, target, snis))
                            .await;
                });
            }
        });
        Relay {
            port,
            accepted,
            snis,
            task,
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::tcp("127.0.0.1", self.port)
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// SNI of each connection's first TLS record (`None`: no SNI).
    pub fn snis(&self) -> Vec<Option<String>> {
        self.snis.lock().unwrap().clone()
    }
}

async fn relay(
    mut client: TcpStream,
    target: SocketAddr,
    snis: Arc<Mutex<Vec<Option<String>>>>,
) -> std::io::Result<()> {
    // The first record is the ClientHello: read it whole, then pass it on.
    let mut header = [0u8; 5];
    client.read_exact(&mut header).await?;
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    let mut record = vec![0u8; len];
    client.read_exact(&mut record).await?;
    snis.lock().unwrap().push(client_hello_sni(&record));
    let mut upstream = TcpStream::connect(target).await?;
    upstream.write_all(&header).await?;
    upstream.write_all(&record).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// The host name of the server_name extension of a ClientHello handshake.
fn client_hello_sni(hs: &[u8]) -> Option<String> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = hs.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    let u16_at = |b: &[u8]| usize::from(u16::from_be_bytes([b[0], b[1]]));
    if take(1)? != [1] {
        return None;
    }
    take(3 + 2 + 32)?; // length, version, random
    let sid = usize::from(take(1)?[0]);
    take(sid)?;
    let suites = u16_at(take(2)?);
    take(suites)?;
    let compression = usize::from(take(1)?[0]);
    take(compression)?;
    let ext_len = u16_at(take(2)?);
    let mut exts = take(ext_len)?;
    while exts.len() >= 4 {
        let (kind, len) = (u16_at(&exts[..2]), u16_at(&exts[2..4]));
        let data = exts.get(4..4 + len)?;
        if kind == 0 {
            // server_name_list: list length, name type (0 = host), length.
            let name_len = u16_at(data.get(3..5)?);
            return String::from_utf8(data.get(5..5 + name_len)?.to_vec()).ok();
        }
        exts = &exts[4 + len..];
    }
    None
}

pub type CredentialsAnswer = Arc<dyn Fn(usize) -> Option<ResponseBody> + Send + Sync>;

/// A credentials service on 127.0.0.1 answering `GetCredentials` with
/// `answer(n)` for the n-th request (0-based); `None` means never answer.
pub struct CredentialsService {
    pub endpoint: Endpoint,
    pub requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for CredentialsService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CredentialsService {
    pub async fn start(answer: CredentialsAnswer) -> CredentialsService {
        let listener = Endpoint::tcp("127.0.0.1", 0).bind().await.unwrap();
        let endpoint = listener.local_endpoint().clone();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let answer = answer.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut conn = Connection::new(stream);
                    while let Ok(Some(req)) = conn.read_message::<Request>().await {
                        assert_eq!(req.op, RequestOp::GetCredentials);
                        let n = counter.fetch_add(1, Ordering::SeqCst);
                        let Some(body) = answer(n) else {
                            // Hold the connection open without answering.
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            return;
                        };
                        if conn
                            .write_message(&Response::new(req.id, body))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        CredentialsService {
            endpoint,
            requests,
            task,
        }
    }

    /// Always the temporary credential, expiring in an hour.
    pub async fn fixed() -> CredentialsService {
        CredentialsService::start(Arc::new(|_| Some(credentials(ACCESS_KEY, Some(3600))))).await
    }
}

/// A `Credentials` answer with the test secret and session token, expiring `expires_in`
/// seconds from now.
pub fn credentials(access_key: &str, expires_in: Option<i64>) -> ResponseBody {
    let expires_at = expires_in.map(|secs| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        now.checked_add_signed(secs).unwrap()
    });
    ResponseBody::Credentials(Credentials {
        access_key_id: SecretString::new(access_key.to_owned()),
        secret_access_key: SecretString::new(SECRET_KEY.to_owned()),
        session_token: Some(SecretString::new(SESSION_TOKEN.to_owned())),
        expires_at,
    })
}

pub fn refusal(code: ErrorCode, message: &str) -> ResponseBody {
    ResponseBody::Error {
        code,
        message: message.to_owned(),
    }
}
