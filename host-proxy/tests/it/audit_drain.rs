//! The daemon's audit drain against the real in-process enclave: reads made
//! through the agent by two different users (`setpriv`) are in the log with
//! the caller the kernel reported, a denied read as denied; the log chains
//! across a size rotation, across a daemon restart (nothing written twice)
//! and across an enclave restart (a new run at genesis); checkpoints in the
//! log verify against the mock root and claim the line before them.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use keystore_enclave::enclave::{Enclave, EnclaveConfig};
use keystore_enclave::recipient::{RecipientBits, RecipientConfig};
use keystore_host::agent::{Agent, AgentConfig};
use keystore_host::proxy::audit_log::{AuditDrain, AuditLogConfig, MIN_MAX_BYTES, rotated};
use keystore_nsm::{MockConfig, MockNsm, Nsm};
use keystore_shared::attestation::{Root, Verifier};
use keystore_shared::audit::chain::next_hash;
use keystore_shared::audit::{
    AuditEvent, AuditOp, AuditRecord, ChainHash, CheckpointClaim, GENESIS_HASH, LogLine, Outcome,
    RunId,
};
use keystore_shared::frame::{decode_frame, encode_frame};
use keystore_shared::protocol::{DEFAULT_MAX_RESPONSE_FRAME, RequestOp, ResponseBody};
use keystore_shared::{Client, ClientConfig, Endpoint, ErrorCode, Request, Response};
use tokio::sync::oneshot;
use zeroize::Zeroizing;

/// The operator's rules: nobody reads `db/*`, uid 4242 reads `app/*`.
const RULES: &str = r#"{"rules":[
    {"who":{"uid":65534},"read":["db/*"]},
    {"who":{"uid":4242},"read":["app/*"]}]}"#;

/// An enclave (mock NSM, no KMS) on unix sockets in `dir`: the secret port
/// for the agent, the load port for the drain.
struct RunningEnclave {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    run: RunId,
}

impl RunningEnclave {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

async fn start_enclave(dir: &Path) -> RunningEnclave {
    let nsm: Arc<dyn Nsm> =
        Arc::new(MockNsm::open(dir.join("pki"), MockConfig::default()).unwrap());
    let mut config = EnclaveConfig::new(
        Endpoint::unix(dir.join("enclave.sock")),
        Endpoint::unix(dir.join("load.sock")),
        nsm,
    );
    config.recipient = RecipientConfig {
        bits: RecipientBits::B2048,
        ..RecipientConfig::default()
    };
    let enclave = Enclave::start(config).await.unwrap();
    let store = enclave.service().store();
    let mut set = store.builder();
    set.insert("db/password", Zeroizing::new(b"hunter2".to_vec()))
        .unwrap();
    set.insert("app/key", Zeroizing::new(b"app-value".to_vec()))
        .unwrap();
    set.insert(
        keystore_shared::name::RULES_NAME,
        Zeroizing::new(RULES.as_bytes().to_vec()),
    )
    .unwrap();
    store.replace(set.build());
    let run = enclave.service().audit().run();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        enclave
            .run_until(async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    RunningEnclave { stop, task, run }
}

fn drain_config(dir: &Path) -> AuditLogConfig {
    AuditLogConfig {
        path: dir.join("log").join("audit.jsonl"),
        max_bytes: MIN_MAX_BYTES,
        keep: 5,
        ..AuditLogConfig::new(Endpoint::unix(dir.join("load.sock")))
    }
}

fn verifier(dir: &Path) -> Verifier {
    let pem = std::fs::read_to_string(dir.join("pki").join("root.pem")).unwrap();
    Verifier::new(Root::from_pem(&pem).unwrap())
}

/// Every line of the log, oldest file first.
fn log_lines(path: &Path) -> Vec<(PathBuf, LogLine)> {
    let mut files: Vec<PathBuf> = (1..=10)
        .rev()
        .map(|k| rotated(path, k))
        .filter(|p| p.exists())
        .collect();
    files.push(path.to_owned());
    let mut lines = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'));
        for line in text.lines() {
            lines.push((file.clone(), LogLine::parse(line).unwrap()));
        }
    }
    lines
}

/// Follows the chain through every line (continuations must name the
/// line before them; a start resets to genesis; checkpoints verify and
/// claim the record before them) and returns the records.
fn follow(lines: &[(PathBuf, LogLine)], verifier: &Verifier) -> Vec<AuditRecord> {
    let mut last: Option<(u64, ChainHash)> = None;
    let mut run = None;
    let mut records = Vec::new();
    for (file, line) in lines {
        match line {
            LogLine::Continues { seq, hash } => {
                assert_eq!(last, Some((*seq, *hash)), "{}", file.display());
            }
            LogLine::Record { record, hash } => {
                let previous = match &record.event {
                    AuditEvent::Start { run: id } => {
                        run = Some(*id);
                        GENESIS_HASH
                    }
                    _ => {
                        let (seq, hash) = last.unwrap();
                        assert_eq!(record.seq, seq + 1, "{record:?}");
                        hash
                    }
                };
                assert_eq!(next_hash(&previous, record).unwrap(), *hash, "{record:?}");
                if let AuditEvent::Checkpoint { document } = &record.event {
                    let document = verifier.verify(document).unwrap();
                    let claim =
                        CheckpointClaim::from_user_data(document.user_data.as_deref().unwrap())
                            .unwrap();
                    let (seq, hash) = last.unwrap();
                    assert_eq!(
                        claim,
                        CheckpointClaim {
                            run: run.unwrap(),
                            seq,
                            hash
                        }
                    );
                }
                last = Some((record.seq, *hash));
                records.push((**record).clone());
            }
        }
    }
    records
}

/// Sends one `Get` to the agent socket as `uid` (from a Python client
/// under `setpriv`) and decodes the answer.
async fn get_as_user(socket: &Path, uid: u32, name: &str) -> ResponseBody {
    let request = Request::new(
        1,
        RequestOp::Get {
            name: name.to_owned(),
        },
    );
    let frame = encode_frame(&request, 64 * 1024).unwrap();
    let client = "import socket,sys\n\
                  s=socket.socket(socket.AF_UNIX)\n\
                  s.connect(sys.argv[1])\n\
                  s.sendall(bytes.fromhex(sys.argv[2]))\n\
                  def rd(n):\n    b=b''\n    while len(b)<n:\n        c=s.recv(n-len(b))\n        if not c: break\n        b+=c\n    return b\n\
                  h=rd(4)\n\
                  sys.stdout.write((h+rd(int.from_bytes(h,'big'))).hex())\n";
    let mut command = Command::new("setpriv");
    let id = uid.to_string();
    command
        .args(["--reuid", &id, "--regid", &id, "--clear-groups"])
        .args(["/usr/bin/python3", "-c", client])
        .arg(socket)
        .arg(hex::encode(&*frame));
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || command.output().unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let bytes = hex::decode(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    let (response, _) = decode_frame::<Response>(&bytes, DEFAULT_MAX_RESPONSE_FRAME)
        .unwrap()
        .unwrap();
    response.result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_by_two_users_through_the_agent_are_logged_with_their_caller() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let enclave = start_enclave(dir.path()).await;
    let socket = dir.path().join("run").join("agent.sock");
    let mut agent_config = AgentConfig::new(Endpoint::unix(dir.path().join("enclave.sock")));
    agent_config.socket = Some(socket.clone());
    agent_config.http = None;
    agent_config.tokens = None;
    let agent = Agent::bind(agent_config).await.unwrap();
    let (stop_agent, agent_stopped) = oneshot::channel::<()>();
    tokio::spawn(agent.run(async move {
        let _ = agent_stopped.await;
    }));

    match get_as_user(&socket, 65534, "db/password").await {
        ResponseBody::Secret { value, .. } => assert_eq!(value.expose(), b"hunter2"),
        other => panic!("nobody may read db/password: {other:?}"),
    }
    match get_as_user(&socket, 4242, "app/key").await {
        ResponseBody::Secret { value, .. } => assert_eq!(value.expose(), b"app-value"),
        other => panic!("uid 4242 may read app/key: {other:?}"),
    }
    match get_as_user(&socket, 4242, "db/password").await {
        ResponseBody::Error { code, .. } => assert_eq!(code, ErrorCode::Denied),
        other => panic!("uid 4242 read db/password: {other:?}"),
    }

    let config = drain_config(dir.path());
    let mut drain = AuditDrain::new(config.clone()).unwrap();
    assert!(drain.drain_once().await.unwrap() >= 5);
    let mode = std::fs::metadata(&config.path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);
    let records = follow(&log_lines(&config.path), &verifier(dir.path()));
    let gets: Vec<(String, Option<u32>, Outcome, String)> = records
        .iter()
        .filter_map(|record| match &record.event {
            AuditEvent::Request {
                op: AuditOp::Get,
                names,
                caller,
                outcome,
                peer,
                ..
            } => Some((
                names[0].clone(),
                caller.as_ref().and_then(|c| c.uid),
                outcome.clone(),
                peer.clone(),
            )),
            _ => None,
        })
        .collect();
    let said: Vec<(&str, Option<u32>, &Outcome)> = gets
        .iter()
        .map(|(name, uid, outcome, _)| (name.as_str(), *uid, outcome))
        .collect();
    assert_eq!(
        said,
        vec![
            ("db/password", Some(65534), &Outcome::Ok),
            ("app/key", Some(4242), &Outcome::Ok),
            ("db/password", Some(4242), &Outcome::Denied),
        ]
    );
    // The kernel's view of the peer: the agent, root on the secret socket.
    for (_, _, _, peer) in &gets {
        assert!(peer.contains("(uid 0)"), "{peer}");
    }
    assert_eq!(drain.stats().hash_mismatches, 0);
    let text = std::fs::read_to_string(&config.path).unwrap();
    assert!(!text.contains("hunter2") && !text.contains("app-value"));
    let _ = stop_agent.send(());
    enclave.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_chains_across_rotation_daemon_restart_and_enclave_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = drain_config(dir.path());
    let first = start_enclave(dir.path()).await;
    let mut secrets = Client::connect_with(
        &Endpoint::unix(dir.path().join("enclave.sock")),
        ClientConfig {
            privileged: true,
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    let mut load_port = Client::connect_with(
        &config.enclave,
        ClientConfig {
            privileged: true,
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    let mut drain = AuditDrain::new(config.clone()).unwrap();
    // Checkpoints are the big lines: enough of them pass 64 KiB twice.
    for round in 0..3 {
        for _ in 0..12 {
            let nobody = keystore_shared::Caller {
                uid: Some(65534),
                ..keystore_shared::Caller::default()
            };
            secrets.get_as("db/password", Some(nobody)).await.unwrap();
            load_port.call(RequestOp::AuditCheckpoint).await.unwrap();
        }
        drain.drain_once().await.unwrap();
        if round == 1 {
            // The daemon restarts: it resumes after the log's last line.
            drop(drain);
            drain = AuditDrain::new(config.clone()).unwrap();
        }
    }
    assert!(rotated(&config.path, 2).exists(), "rotated twice");
    // The last batch is acknowledged by the next read, and nothing comes
    // twice: a restarted daemon reads nothing new.
    drop(drain);
    let mut drain = AuditDrain::new(config.clone()).unwrap();
    assert_eq!(drain.drain_once().await.unwrap(), 0);
    assert_eq!(drain.drain_once().await.unwrap(), 0);
    let before_restart = follow(&log_lines(&config.path), &verifier(dir.path()));

    // The enclave restarts: a new run, appended at genesis.
    let first_run = first.run;
    first.stop().await;
    let second = start_enclave(dir.path()).await;
    // The same daemon: its connection died with the old enclave, so the
    // first poll may fail; the next reconnects. Its cursor is the old
    // run's, which the new enclave does not know: nothing is acknowledged
    // and the new run comes from its start.
    let written = match drain.drain_once().await {
        Ok(written) => written,
        Err(_) => drain.drain_once().await.unwrap(),
    };
    assert!(written >= 2, "{written}");
    let records = follow(&log_lines(&config.path), &verifier(dir.path()));
    assert_eq!(&records[..before_restart.len()], &before_restart[..]);
    let runs: Vec<RunId> = records
        .iter()
        .filter_map(|r| match r.event {
            AuditEvent::Start { run } => Some(run),
            _ => None,
        })
        .collect();
    assert_eq!(runs, vec![first_run, second.run]);
    // Every record of the first run once: seq 0..=last, no repeats.
    let first_seqs: Vec<u64> = before_restart.iter().map(|r| r.seq).collect();
    assert_eq!(first_seqs, (0..first_seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(drain.stats().discontinuities, 0);
    second.stop().await;
}
