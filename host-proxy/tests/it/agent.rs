//! The agent with real processes and sockets: its unix socket (callers
//! identified by the kernel, some of them run as `nobody` through
//! `setpriv`), its Secrets-Manager-Agent-compatible HTTP front (driven with
//! `curl`), `keystore-host get` through it, and `keystore-host agent` as a
//! program. The enclave is either a real in-process secret server (the read
//! path end to end) or a small fake that records the caller each request
//! names (what the agent asserts).
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keystore_enclave::audit::{AuditConfig, AuditTrail};
use keystore_enclave::recipient::{Recipient, RecipientBits, RecipientConfig};
use keystore_enclave::server::{Server, ServerConfig};
use keystore_enclave::service::KeystoreService;
use keystore_enclave::store::{SealKey, Store, StoreConfig};
use keystore_host::agent::identity::systemd_unit;
use keystore_host::agent::{Agent, AgentConfig};
use keystore_nsm::{MockConfig, MockNsm, Nsm};
use keystore_shared::frame::{decode_frame, encode_frame};
use keystore_shared::protocol::{DEFAULT_MAX_RESPONSE_FRAME, RequestOp, ResponseBody};
use keystore_shared::serve::{AnyPeer, ServeConfig, handler_fn, serve};
use keystore_shared::{
    Caller, Client, Connection, Endpoint, ErrorCode, Request, Response, SecretBytes,
};
use serde_json::Value;
use tokio::sync::oneshot;
use zeroize::Zeroizing;

const BINARY_VALUE: &[u8] = b"\x00\xff\xfe binary";
const TOKEN: &str = "ci-token-0123456789abcdef";
const NOBODY: u32 = 65534;

/// A temporary directory every user may traverse (the unprivileged clients
/// must reach the agent socket inside it).
pub(crate) fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Stops a server started by a helper here and waits until it has.
pub(crate) struct Stopper {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Stopper {
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

/// A real secret server with two secrets, on a unix socket in `dir`.
async fn real_enclave(dir: &Path) -> (Endpoint, Stopper) {
    real_enclave_with_rules(dir, None).await
}

/// [`real_enclave`], with the operator's access rules (canonical JSON, as
/// the `keystore:rules` entry decrypts to) in its set.
pub(crate) async fn real_enclave_with_rules(
    dir: &Path,
    rules: Option<&str>,
) -> (Endpoint, Stopper) {
    let nsm: Arc<dyn Nsm> =
        Arc::new(MockNsm::open(dir.join("pki"), MockConfig::default()).unwrap());
    let (recipient, _refresher) = Recipient::start(
        nsm.clone(),
        RecipientConfig {
            bits: RecipientBits::B2048,
            ..RecipientConfig::default()
        },
    )
    .await
    .unwrap();
    let store = Arc::new(Store::new(
        SealKey::generate(nsm.as_ref()).unwrap(),
        StoreConfig::default(),
    ));
    let mut set = store.builder();
    set.insert("db/password", Zeroizing::new(b"hunter2".to_vec()))
        .unwrap();
    set.insert("app/binary", Zeroizing::new(BINARY_VALUE.to_vec()))
        .unwrap();
    if let Some(rules) = rules {
        set.insert(
            keystore_shared::name::RULES_NAME,
            Zeroizing::new(rules.as_bytes().to_vec()),
        )
        .unwrap();
    }
    store.replace(set.build());
    let service = Arc::new(KeystoreService::new(
        store,
        recipient,
        nsm.clone(),
        Arc::new(AuditTrail::new(nsm, AuditConfig::default()).unwrap()),
    ));
    let endpoint = Endpoint::unix(dir.join("enclave.sock"));
    let server = Server::bind(&endpoint, service, ServerConfig::default())
        .await
        .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .run(async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (endpoint, Stopper { stop, task })
}

/// What the fake enclave was asked: operation kind and the caller named.
type Seen = Arc<Mutex<Vec<(&'static str, Option<Caller>)>>>;

/// A fake secret port that records each request's caller and answers
/// `Get` with `fake-value` (or `Denied` for names starting with `denied`;
/// names starting with `slow` are answered once `release` is notified).
async fn fake_enclave(dir: &Path) -> (Endpoint, Seen, oneshot::Sender<()>) {
    let (endpoint, seen, _release, stop) = fake_enclave_with_release(dir).await;
    (endpoint, seen, stop)
}

async fn fake_enclave_with_release(
    dir: &Path,
) -> (
    Endpoint,
    Seen,
    Arc<tokio::sync::Notify>,
    oneshot::Sender<()>,
) {
    let endpoint = Endpoint::unix(dir.join("fake-enclave.sock"));
    let listener = endpoint.bind().await.unwrap();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let release = Arc::new(tokio::sync::Notify::new());
    let released = release.clone();
    let handler = handler_fn(move |conn: keystore_shared::serve::Accepted| {
        let record = record.clone();
        let released = released.clone();
        async move {
            let mut connection = Connection::new(conn.stream);
            while let Ok(Some(request)) = connection.read_message::<Request>().await {
                record
                    .lock()
                    .unwrap()
                    .push((request.op.kind(), request.caller.clone()));
                if matches!(&request.op, RequestOp::Get { name } if name.starts_with("slow")) {
                    released.notified().await;
                }
                let body = match request.op {
                    RequestOp::Get { name } if name.starts_with("denied") => ResponseBody::Error {
                        code: ErrorCode::Denied,
                        message: format!("{name} is not granted"),
                    },
                    RequestOp::Get { name } => ResponseBody::Secret {
                        name,
                        value: SecretBytes::new(b"fake-value".to_vec()),
                    },
                    RequestOp::List => ResponseBody::Names {
                        names: vec!["visible".to_owned()],
                    },
                    _ => ResponseBody::Error {
                        code: ErrorCode::BadRequest,
                        message: "not in the fake".to_owned(),
                    },
                };
                if connection
                    .write_message(&Response::new(request.id, body))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        Arc::new(handler),
        Arc::new(AnyPeer),
        ServeConfig::named("fake enclave"),
        async move {
            let _ = stopped.await;
        },
    ));
    (endpoint, seen, release, stop)
}

pub(crate) struct RunningAgent {
    pub(crate) socket: PathBuf,
    pub(crate) http: Endpoint,
    _stop: oneshot::Sender<()>,
}

impl RunningAgent {
    fn socket_endpoint(&self) -> Endpoint {
        Endpoint::unix(&self.socket)
    }

    fn url(&self, path: &str) -> String {
        let Endpoint::Tcp { host, port } = &self.http else {
            panic!("HTTP is on tcp");
        };
        format!("http://{host}:{port}{path}")
    }
}

/// Writes a token file `name` in `dir/tokens`.
fn token_file(dir: &Path, name: &str, text: &str, mode: u32) {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = tokens.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Starts an agent in `dir` forwarding to `enclave`, with token `ci`
/// standing for `user` (root can read from the real enclave without rules;
/// the fake one records whoever it is).
async fn start_agent(dir: &Path, enclave: Endpoint, user: &str) -> RunningAgent {
    start_agent_with(dir, enclave, user, |_| {}).await
}

pub(crate) async fn start_agent_with(
    dir: &Path,
    enclave: Endpoint,
    user: &str,
    adjust: impl FnOnce(&mut AgentConfig),
) -> RunningAgent {
    token_file(
        dir,
        "ci",
        &format!("# CI\ntoken = {TOKEN}\nuser = {user}\n"),
        0o640,
    );
    let socket = dir.join("run").join("agent.sock");
    let mut config = AgentConfig::new(enclave);
    config.socket = Some(socket.clone());
    config.http = Some(Endpoint::tcp("127.0.0.1", 0));
    config.tokens = Some(dir.join("tokens"));
    adjust(&mut config);
    let agent = Agent::bind(config).await.unwrap();
    let http = agent.http_endpoint().unwrap().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(agent.run(async move {
        let _ = stopped.await;
    }));
    RunningAgent {
        socket,
        http,
        _stop: stop,
    }
}

async fn blocking(mut command: Command) -> Output {
    tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || command.output().unwrap()),
    )
    .await
    .unwrap()
    .unwrap()
}

/// Sends one framed request to the agent socket as `nobody` (with extra
/// supplementary groups) from a Python client, and decodes the answer.
async fn as_nobody(socket: &Path, groups: &str, request: &Request) -> Response {
    let frame = encode_frame(request, 64 * 1024).unwrap();
    let client = "import socket,sys\n\
                  s=socket.socket(socket.AF_UNIX)\n\
                  s.connect(sys.argv[1])\n\
                  s.sendall(bytes.fromhex(sys.argv[2]))\n\
                  def rd(n):\n    b=b''\n    while len(b)<n:\n        c=s.recv(n-len(b))\n        if not c: break\n        b+=c\n    return b\n\
                  h=rd(4)\n\
                  sys.stdout.write((h+rd(int.from_bytes(h,'big'))).hex())\n";
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid", "65534", "--regid", "65534", "--groups", groups])
        .args(["/usr/bin/python3", "-c", client])
        .arg(socket)
        .arg(hex::encode(&*frame));
    let out = blocking(command).await;
    assert!(out.status.success(), "{out:?}");
    let bytes = hex::decode(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    let (response, _) = decode_frame::<Response>(&bytes, DEFAULT_MAX_RESPONSE_FRAME)
        .unwrap()
        .unwrap();
    response
}

/// `curl -sS URL` with extra arguments: (status, body).
pub(crate) async fn curl(url: &str, args: &[&str]) -> (u16, String) {
    let mut command = Command::new("curl");
    command
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url);
    let out = blocking(command).await;
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.parse().unwrap(), body.to_owned())
}

fn token_header(token: &str) -> String {
    format!("X-Aws-Parameters-Secrets-Token: {token}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_reads_through_the_agent_socket_and_the_socket_is_open_to_all() {
    let dir = open_dir();
    let (enclave, _stop_enclave) = real_enclave(dir.path()).await;
    let agent = start_agent(dir.path(), enclave, "root").await;

    // The directory was created 0755 and the socket is 0666.
    let run_dir = std::fs::metadata(agent.socket.parent().unwrap()).unwrap();
    assert_eq!(run_dir.permissions().mode() & 0o777, 0o755);
    let socket = std::fs::metadata(&agent.socket).unwrap();
    assert_eq!(socket.permissions().mode() & 0o777, 0o666);

    // The same client a Rust app uses, unchanged; the test runs as root.
    let mut client = Client::connect(&agent.socket_endpoint()).await.unwrap();
    assert_eq!(
        client.get("db/password").await.unwrap().expose(),
        b"hunter2"
    );
    assert_eq!(
        client.get("app/binary").await.unwrap().expose(),
        BINARY_VALUE
    );
    let mut names = client.list().await.unwrap();
    names.sort();
    assert_eq!(names, ["app/binary", "db/password"]);
    assert!(client.status().await.unwrap().ready);
    let missing = client.get("no/such").await.unwrap_err();
    assert_eq!(missing.code(), Some(ErrorCode::NotFound), "{missing}");

    // Load is not forwarded.
    let load = client
        .call(RequestOp::Load {
            entries: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(load.code(), Some(ErrorCode::Denied), "{load}");
    // The connection is still good afterwards.
    assert_eq!(
        client.get("db/password").await.unwrap().expose(),
        b"hunter2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_naming_its_own_caller_is_refused_and_never_forwarded() {
    let dir = open_dir();
    let (enclave, seen, _stop) = fake_enclave(dir.path()).await;
    let agent = start_agent(dir.path(), enclave, "nobody").await;
    let mut client = Client::connect(&agent.socket_endpoint()).await.unwrap();
    let posing = client
        .get_as("db/password", Some(Caller::root()))
        .await
        .unwrap_err();
    assert_eq!(posing.code(), Some(ErrorCode::Denied), "{posing}");
    assert!(posing.to_string().contains("may not name its own caller"));
    assert!(seen.lock().unwrap().is_empty(), "forwarded: {seen:?}");

    // The same request as nobody, claiming root, is refused too.
    let claim = Request::new(
        7,
        RequestOp::Get {
            name: "db/password".to_owned(),
        },
    )
    .on_behalf_of(Caller::root());
    let response = as_nobody(&agent.socket, "65534", &claim).await;
    assert_eq!(response.id, 7);
    assert!(
        matches!(
            &response.result,
            ResponseBody::Error {
                code: ErrorCode::Denied,
                ..
            }
        ),
        "{response:?}"
    );
    assert!(seen.lock().unwrap().is_empty(), "forwarded: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_asserts_the_caller_the_kernel_reports() {
    let dir = open_dir();
    let (enclave, seen, _stop) = fake_enclave(dir.path()).await;
    let agent = start_agent(dir.path(), enclave, "nobody").await;

    let get = Request::new(
        3,
        RequestOp::Get {
            name: "db/password".to_owned(),
        },
    );
    let response = as_nobody(&agent.socket, "4242,4343", &get).await;
    assert_eq!(response.id, 3);
    let ResponseBody::Secret { name, value } = &response.result else {
        panic!("{response:?}");
    };
    assert_eq!(
        (name.as_str(), value.expose()),
        ("db/password", &b"fake-value"[..])
    );

    // A denied read is passed on as Denied.
    let denied = Request::new(
        4,
        RequestOp::Get {
            name: "denied/one".to_owned(),
        },
    );
    let response = as_nobody(&agent.socket, "4242", &denied).await;
    assert!(
        matches!(&response.result, ResponseBody::Error { code: ErrorCode::Denied, message } if message.contains("denied/one")),
        "{response:?}"
    );

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let (kind, caller) = &seen[0];
    assert_eq!(*kind, "get");
    let caller = caller.clone().expect("the agent names the caller");
    assert_eq!(caller.uid, Some(NOBODY));
    assert_eq!(caller.user.as_deref(), Some("nobody"));
    assert_eq!(caller.gid, Some(NOBODY));
    assert_eq!(caller.groups, vec![NOBODY, 4242, 4343]);
    assert!(
        caller.group_names.contains(&"nogroup".to_owned()),
        "{caller:?}"
    );
    assert_eq!(caller.token, None);
    // The child ran in this test's cgroup.
    let own = systemd_unit(&std::fs::read_to_string("/proc/self/cgroup").unwrap());
    assert_eq!(caller.unit, own);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_is_asserted_as_uid_0() {
    let dir = open_dir();
    let (enclave, seen, _stop) = fake_enclave(dir.path()).await;
    let agent = start_agent(dir.path(), enclave, "nobody").await;
    let mut client = Client::connect(&agent.socket_endpoint()).await.unwrap();
    assert_eq!(client.list().await.unwrap(), ["visible"]);
    let seen = seen.lock().unwrap().clone();
    let caller = seen[0].1.clone().unwrap();
    assert_eq!(seen[0].0, "list");
    assert_eq!(caller.uid, Some(0));
    assert_eq!(caller.user.as_deref(), Some("root"));
    assert!(caller.is_root());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_needs_a_known_token_and_answers_like_the_secrets_manager_agent() {
    let dir = open_dir();
    let (enclave, _stop_enclave) = real_enclave(dir.path()).await;
    let agent = start_agent(dir.path(), enclave, "root").await;
    let get = agent.url("/secretsmanager/get?secretId=db%2Fpassword");

    // /ping needs no token.
    assert_eq!(
        curl(&agent.url("/ping"), &[]).await,
        (200, "healthy".to_owned())
    );
    // No token, a wrong one, one that is a prefix of the right one: 403.
    for args in [
        vec![],
        vec!["-H".to_owned(), token_header("wrong-token-0123456789")],
        vec!["-H".to_owned(), token_header(&TOKEN[..TOKEN.len() - 1])],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, body) = curl(&get, &args).await;
        assert_eq!((status, body.as_str()), (403, "Bad Token"), "{args:?}");
        assert!(!body.contains("hunter2"));
    }
    let header = token_header(TOKEN);
    let with_token = ["-H", header.as_str()];

    // The right token: GetSecretValue's shape, value as SecretString.
    let (status, body) = curl(&get, &with_token).await;
    assert_eq!(status, 200, "{body}");
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["Name"], "db/password");
    assert_eq!(json["SecretString"], "hunter2");
    assert_eq!(json["VersionStages"], serde_json::json!(["AWSCURRENT"]));
    assert!(json["ARN"].as_str().unwrap().ends_with(":db/password"));
    assert_eq!(json["VersionId"].as_str().unwrap().len(), 36);
    assert!(json["CreatedDate"].is_string());
    let version = json["VersionId"].as_str().unwrap().to_owned();

    // Path style, the X-Vault-Token header, versionStage/versionId.
    let (status, body) = curl(
        &agent.url(&format!(
            "/v1/db/password?versionStage=AWSCURRENT&versionId={version}"
        )),
        &["-H", &format!("X-Vault-Token: {TOKEN}")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["SecretString"],
        "hunter2"
    );
    let (status, body) = curl(
        &agent.url("/v1/db/password?versionStage=AWSPREVIOUS"),
        &with_token,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["__type"],
        "ResourceNotFoundException"
    );

    // Binary values come as base64 SecretBinary.
    let (status, body) = curl(&agent.url("/v1/app/binary"), &with_token).await;
    assert_eq!(status, 200, "{body}");
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["SecretBinary"], "AP/+IGJpbmFyeQ==");
    assert!(json.get("SecretString").is_none());

    // Errors: Secrets Manager's __type names; the agent's own refusals.
    let (status, body) = curl(&agent.url("/v1/no/such"), &with_token).await;
    assert_eq!(status, 400);
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["__type"], "ResourceNotFoundException");
    assert!(json["message"].as_str().unwrap().contains("no/such"));
    assert_eq!(
        curl(&get, &["-X", "POST", "-H", &header]).await,
        (405, "Not allowed".to_owned())
    );
    assert_eq!(
        curl(&get, &["-H", &header, "-H", "X-Forwarded-For: 10.0.0.1"]).await,
        (400, "Forwarded".to_owned())
    );
    assert_eq!(
        curl(&agent.url("/elsewhere"), &with_token).await,
        (404, "Not found".to_owned())
    );
    let (status, body) = curl(
        &agent.url("/secretsmanager/get?secretId=db%2Fpassword&colour=red"),
        &with_token,
    )
    .await;
    assert_eq!((status, body.as_str()), (400, "unknown parameter: colour"));

    // The Secrets Manager API's own JSON protocol, as an AWS SDK sends it.
    let api = [
        "-X",
        "POST",
        "-H",
        header.as_str(),
        "-H",
        "X-Amz-Target: secretsmanager.GetSecretValue",
        "-H",
        "Content-Type: application/x-amz-json-1.1",
    ];
    let (status, body) = curl(
        &agent.url("/"),
        &[&api[..], &["--data", r#"{"SecretId":"db/password"}"#]].concat(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["SecretString"], "hunter2");
    assert!(json["CreatedDate"].is_f64(), "{body}");
    let (status, body) = curl(
        &agent.url("/"),
        &[&api[..], &["--data", r#"{"SecretId":"no/such"}"#]].concat(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["__type"],
        "ResourceNotFoundException"
    );
    let (status, _) = curl(
        &agent.url("/"),
        &[&api[..], &["--data", &"x".repeat(20_000)]].concat(),
    )
    .await;
    assert_eq!(status, 400);
    // Without the token, the API form is refused like the rest.
    let (status, body) = curl(
        &agent.url("/"),
        &[
            "-X",
            "POST",
            "-H",
            "X-Amz-Target: secretsmanager.GetSecretValue",
            "--data",
            r#"{"SecretId":"db/password"}"#,
        ],
    )
    .await;
    assert_eq!((status, body.as_str()), (403, "Bad Token"));

    // A head larger than the bound is refused, not buffered.
    let huge = format!("X-Padding: {}", "a".repeat(64 * 1024));
    let (status, _) = curl(&get, &["-H", &header, "-H", &huge]).await;
    assert_eq!(status, 431);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_token_reads_as_the_identity_it_names() {
    let dir = open_dir();
    let (enclave, seen, _stop) = fake_enclave(dir.path()).await;
    let agent = start_agent(dir.path(), enclave, "nobody").await;
    let header = token_header(TOKEN);
    let (status, body) = curl(&agent.url("/v1/db/password"), &["-H", &header]).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = curl(&agent.url("/v1/denied/one"), &["-H", &header]).await;
    assert_eq!(status, 400);
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["__type"], "AccessDeniedException");
    assert!(json["message"].as_str().unwrap().contains("denied/one"));

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let caller = seen[0].1.clone().unwrap();
    assert_eq!(caller.token.as_deref(), Some("ci"));
    assert_eq!(caller.uid, Some(NOBODY));
    assert_eq!(caller.user.as_deref(), Some("nobody"));

    // A token file made group-writable is no longer honoured after a
    // reload (here: the next periodic re-read or SIGHUP; forced by
    // re-reading through a new agent on the same directory).
    token_file(
        dir.path(),
        "ci",
        &format!("token = {TOKEN}\nuser = nobody\n"),
        0o660,
    );
    let tokens = keystore_host::agent::token::Tokens::new(Some(dir.path().join("tokens")));
    assert!(tokens.check(TOKEN.as_bytes()).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keystore_host_get_goes_through_the_agent_and_the_agent_runs_as_a_program() {
    let dir = open_dir();
    let (enclave, _stop_enclave) = real_enclave(dir.path()).await;
    token_file(dir.path(), "ci", &format!("token = {TOKEN}\n"), 0o640);
    let socket = dir.path().join("cli-agent.sock");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_keystore-host"))
        .arg("agent")
        .arg("--enclave")
        .arg(enclave.to_string())
        .arg("--agent-socket")
        .arg(&socket)
        .args(["--no-agent-http", "--tokens"])
        .arg(dir.path().join("tokens"))
        .env_remove("KEYSTORE_ENCLAVE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the agent did not start");
        assert!(agent.try_wait().unwrap().is_none(), "the agent exited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // `get` and `list` default to the agent named by --agent/KEYSTORE_AGENT.
    let mut get = Command::new(env!("CARGO_BIN_EXE_keystore-host"));
    get.args(["get", "db/password"])
        .env("KEYSTORE_AGENT", format!("unix://{}", socket.display()))
        .env_remove("KEYSTORE_ENCLAVE");
    let out = blocking(get).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"hunter2");
    let mut list = Command::new(env!("CARGO_BIN_EXE_keystore-host"));
    list.arg("--agent")
        .arg(format!("unix://{}", socket.display()))
        .arg("list")
        .env_remove("KEYSTORE_ENCLAVE");
    let out = blocking(list).await;
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "app/binary\ndb/password\n"
    );

    // Without a reachable agent, `get` says where it tried.
    let mut nowhere = Command::new(env!("CARGO_BIN_EXE_keystore-host"));
    nowhere
        .args([
            "--agent",
            "unix:///nonexistent/agent.sock",
            "get",
            "db/password",
        ])
        .env_remove("KEYSTORE_ENCLAVE");
    let out = blocking(nowhere).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent.sock"),
        "{out:?}"
    );

    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = agent.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the agent did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!socket.exists(), "the socket file outlived the agent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_enclave_is_unavailable_and_reads_resume_when_it_is_back() {
    let dir = open_dir();
    let (enclave, stopper) = real_enclave(dir.path()).await;
    let agent = start_agent(dir.path(), enclave, "root").await;
    let mut client = Client::connect(&agent.socket_endpoint()).await.unwrap();
    assert_eq!(
        client.get("db/password").await.unwrap().expose(),
        b"hunter2"
    );
    // The enclave goes away (its pooled connection is closed) and comes
    // back on the same socket.
    stopper.stop().await;
    let down = client.get("db/password").await.unwrap_err();
    assert_eq!(down.code(), Some(ErrorCode::Unavailable), "{down}");
    let (_enclave, _stopper) = real_enclave(dir.path()).await;
    assert_eq!(
        client.get("db/password").await.unwrap().expose(),
        b"hunter2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_closed_by_the_enclave_is_replaced() {
    let dir = open_dir();
    let (enclave, stopper) = real_enclave(dir.path()).await;
    let agent = start_agent(dir.path(), enclave, "root").await;
    let mut client = Client::connect(&agent.socket_endpoint()).await.unwrap();
    client.get("db/password").await.unwrap();
    // Restarted between two reads: the idle pooled connection is dead, and
    // the next read must not fail because of it.
    stopper.stop().await;
    let (_enclave, _stopper) = real_enclave(dir.path()).await;
    assert_eq!(
        client.get("db/password").await.unwrap().expose(),
        b"hunter2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_bounds_requests_in_flight_and_the_wait_for_one() {
    let dir = open_dir();
    let (enclave, seen, release, _stop) = fake_enclave_with_release(dir.path()).await;
    let agent = start_agent_with(dir.path(), enclave, "nobody", |config| {
        config.pool.size = 1;
        config.pool.wait = Duration::from_millis(200);
    })
    .await;
    let endpoint = agent.socket_endpoint();
    let slow = tokio::spawn(async move {
        let mut client = Client::connect(&endpoint).await.unwrap();
        client.get("slow/one").await
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the slow read never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The one connection is busy: another read waits its bounded turn and
    // is told the agent is busy; it never reaches the enclave.
    let mut client = Client::connect(&agent.socket_endpoint()).await.unwrap();
    let busy = client.get("db/password").await.unwrap_err();
    assert_eq!(busy.code(), Some(ErrorCode::Unavailable), "{busy}");
    assert!(busy.to_string().contains("busy"), "{busy}");
    assert_eq!(seen.lock().unwrap().len(), 1);
    release.notify_one();
    assert_eq!(slow.await.unwrap().unwrap().expose(), b"fake-value");
    assert_eq!(
        client.get("db/password").await.unwrap().expose(),
        b"fake-value"
    );
}

/// boto3's `get_secret_value`, pointed at the agent with the token header
/// added, reads the value. Runs when `BOTO3_PYTHON` names a Python with
/// boto3 (e.g. `python3 -m venv v && v/bin/pip install boto3`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_get_secret_value_reads_through_the_agent() {
    let Ok(python) = std::env::var("BOTO3_PYTHON") else {
        eprintln!("skipped: set BOTO3_PYTHON to a Python with boto3 installed");
        return;
    };
    let dir = open_dir();
    let (enclave, _stop_enclave) = real_enclave(dir.path()).await;
    let agent = start_agent(dir.path(), enclave, "root").await;
    let script = format!(
        "import boto3\n\
         c=boto3.client('secretsmanager',region_name='us-east-1',endpoint_url='{}',\
         aws_access_key_id='unused',aws_secret_access_key='unused')\n\
         c.meta.events.register('before-sign.secrets-manager.GetSecretValue',\
         lambda request, **kw: request.headers.add_header('X-Aws-Parameters-Secrets-Token','{TOKEN}'))\n\
         r=c.get_secret_value(SecretId='db/password')\n\
         print(r['Name'], r['SecretString'], r['VersionStages'][0], r['CreatedDate'].year > 2000)\n\
         try:\n    c.get_secret_value(SecretId='no/such')\n\
         except c.exceptions.ResourceNotFoundException:\n    print('not found')\n",
        agent.url("")
    );
    let mut command = Command::new(python);
    command.args(["-c", &script]);
    let out = blocking(command).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "db/password hunter2 AWSCURRENT True\nnot found\n"
    );
}

/// Sends `Get NAME` as `nobody` through the agent socket.
pub(crate) async fn get_as_nobody(socket: &Path, name: &str) -> ResponseBody {
    let request = Request::new(
        1,
        RequestOp::Get {
            name: name.to_owned(),
        },
    );
    as_nobody(socket, "65534", &request).await.result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_rules_only_root_reads_through_the_agent() {
    let dir = open_dir();
    let (enclave, _stop_enclave) = real_enclave(dir.path()).await;
    let agent = start_agent(dir.path(), enclave, "daemon").await;

    match get_as_nobody(&agent.socket, "db/password").await {
        ResponseBody::Error { code, message } => {
            assert_eq!(code, ErrorCode::Denied);
            assert!(message.contains("db/password"), "{message}");
            assert!(message.contains("uid 65534 (nobody)"), "{message}");
        }
        other => panic!("nobody read a secret without rules: {other:?}"),
    }
    let list = as_nobody(&agent.socket, "65534", &Request::new(2, RequestOp::List)).await;
    assert!(
        matches!(&list.result, ResponseBody::Names { names } if names.is_empty()),
        "{list:?}"
    );
    // The HTTP token stands for `daemon` (uid 1), not root: refused too.
    let header = token_header(TOKEN);
    let (status, body) = curl(&agent.url("/v1/db/password"), &["-H", &header]).await;
    assert_eq!(status, 400, "{body}");
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["__type"], "AccessDeniedException");
    assert!(!body.contains("hunter2"));

    // Root (the test process) reads.
    let mut client = Client::connect(&agent.socket_endpoint()).await.unwrap();
    assert_eq!(
        client.get("db/password").await.unwrap().expose(),
        b"hunter2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_rules_each_caller_reads_its_names_and_nothing_else() {
    let dir = open_dir();
    let rules = r#"{"rules":[
        {"who":{"uid":65534},"read":["db/*"]},
        {"who":{"token":"ci"},"read":["app/*"]},
        {"who":{"uid":0},"read":["*"]}]}"#;
    let (enclave, _stop_enclave) = real_enclave_with_rules(dir.path(), Some(rules)).await;
    let agent = start_agent(dir.path(), enclave, "daemon").await;

    // nobody, identified by the kernel through the socket: db/* only.
    match get_as_nobody(&agent.socket, "db/password").await {
        ResponseBody::Secret { value, .. } => assert_eq!(value.expose(), b"hunter2"),
        other => panic!("nobody may read db/password: {other:?}"),
    }
    match get_as_nobody(&agent.socket, "app/binary").await {
        ResponseBody::Error { code, message } => {
            assert_eq!(code, ErrorCode::Denied);
            assert!(message.contains("app/binary"), "{message}");
            assert!(message.contains("uid 65534 (nobody)"), "{message}");
        }
        other => panic!("nobody read a secret no rule grants it: {other:?}"),
    }
    // The rules entry itself is never served, to anyone.
    assert!(matches!(
        get_as_nobody(&agent.socket, keystore_shared::name::RULES_NAME).await,
        ResponseBody::Error {
            code: ErrorCode::Denied,
            ..
        }
    ));
    let list = as_nobody(&agent.socket, "65534", &Request::new(2, RequestOp::List)).await;
    assert!(
        matches!(&list.result, ResponseBody::Names { names } if names == &["db/password"]),
        "{list:?}"
    );

    // The HTTP token `ci`: app/* only, in the Secrets Manager Agent's shape.
    let header = token_header(TOKEN);
    let (status, body) = curl(
        &agent.url("/secretsmanager/get?secretId=app/binary"),
        &["-H", &header],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["Name"], "app/binary");
    assert!(json["SecretBinary"].is_string(), "{json}");
    let (status, body) = curl(&agent.url("/v1/db/password"), &["-H", &header]).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["__type"],
        "AccessDeniedException"
    );

    // Root reads everything because a rule grants uid 0 everything.
    let mut client = Client::connect(&agent.socket_endpoint()).await.unwrap();
    let mut names = client.list().await.unwrap();
    names.sort();
    assert_eq!(names, ["app/binary", "db/password"]);
}
