//! Builds audit logs with the real types: records chained with
//! `next_hash`, written with `LogLine::to_json`, and checkpoints signed by
//! a mock NSM over a `CheckpointClaim`, as the enclave and the daemon make
//! them. Tests then damage the text the way an attacker would.

use std::path::{Path, PathBuf};

use keystore_nsm::{AttestationRequest, MockConfig, MockNsm, Nsm};
use keystore_shared::Caller;
use keystore_shared::audit::{
    AuditEvent, AuditOp, AuditRecord, ChainHash, ChainState, CheckpointClaim, LogLine, Outcome,
    RunId,
};

/// The PCR0 of "our" enclave.
pub const PCR0: [u8; 48] = [0x11; 48];
/// The PCR0 of another enclave signing under the same root.
pub const OTHER_PCR0: [u8; 48] = [0x22; 48];
/// Run ids.
pub const RUN_A: RunId = RunId([0xa1; 16]);
/// A second run (after a restart).
pub const RUN_B: RunId = RunId([0xb2; 16]);

/// A mock NSM and the directory of its PKI.
pub struct MockEnclave {
    /// Keeps the PKI on disk.
    pub dir: tempfile::TempDir,
    /// The NSM.
    pub nsm: MockNsm,
}

impl MockEnclave {
    /// An NSM with its own root and this PCR0.
    pub fn new(pcr0: [u8; 48]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let nsm = MockNsm::open_with_pcr0(dir.path(), MockConfig::default(), pcr0).unwrap();
        MockEnclave { dir, nsm }
    }

    /// Another NSM under the same root, with another PCR0.
    pub fn sibling(&self, pcr0: [u8; 48]) -> MockNsm {
        MockNsm::open_with_pcr0(self.dir.path(), MockConfig::default(), pcr0).unwrap()
    }

    /// The root certificate (PEM) its documents chain to.
    pub fn root_pem(&self) -> PathBuf {
        self.nsm.pki().root_pem_path()
    }
}

/// A caller as the agent would assert it.
pub fn caller(user: &str, uid: u32) -> Caller {
    Caller {
        uid: Some(uid),
        user: Some(user.to_owned()),
        gid: Some(uid),
        groups: vec![uid],
        group_names: vec![user.to_owned()],
        unit: Some(format!("{user}.service")),
        token: None,
    }
}

/// An audit log being written.
pub struct LogBuilder {
    /// The lines so far, without newlines.
    pub lines: Vec<String>,
    chain: ChainState,
    run: RunId,
    time_ms: u64,
}

impl Default for LogBuilder {
    fn default() -> Self {
        LogBuilder {
            lines: Vec::new(),
            chain: ChainState::default(),
            run: RUN_A,
            time_ms: 1_764_480_000_000,
        }
    }
}

impl LogBuilder {
    /// Appends `event` as the next record; returns its sequence number.
    pub fn event(&mut self, event: AuditEvent) -> u64 {
        let seq = self.chain.next_seq();
        self.record(seq, event)
    }

    /// Appends a record with this sequence number, chained on the current
    /// hash (a forger's tool as much as the enclave's).
    pub fn record(&mut self, seq: u64, event: AuditEvent) -> u64 {
        self.time_ms += 1_000;
        let record = AuditRecord {
            seq,
            time_ms: self.time_ms,
            event,
        };
        let hash = self.chain.append(&record).unwrap();
        self.lines.push(
            LogLine::Record {
                record: Box::new(record),
                hash,
            }
            .to_json(),
        );
        seq
    }

    /// A new enclave run.
    pub fn start(&mut self, run: RunId) -> u64 {
        self.chain = ChainState::default();
        self.run = run;
        self.event(AuditEvent::Start { run })
    }

    /// A `Get` of `name` for `who`.
    pub fn get(&mut self, name: &str, who: Caller, outcome: Outcome) -> u64 {
        self.event(AuditEvent::Request {
            op: AuditOp::Get,
            names: vec![name.to_owned()],
            count: None,
            caller: Some(who),
            peer: "unix:uid=0".to_owned(),
            outcome,
        })
    }

    /// A `List` by root.
    pub fn list(&mut self, count: u64) -> u64 {
        self.event(AuditEvent::Request {
            op: AuditOp::List,
            names: vec![],
            count: Some(count),
            caller: Some(caller("root", 0)),
            peer: "tcp:127.0.0.1:700".to_owned(),
            outcome: Outcome::Ok,
        })
    }

    /// What an honest checkpoint here would claim.
    pub fn claim(&self) -> CheckpointClaim {
        CheckpointClaim {
            run: self.run,
            seq: self.chain.seq.unwrap(),
            hash: self.chain.hash,
        }
    }

    /// A checkpoint signed by `nsm` over `claim`.
    pub fn checkpoint_with(&mut self, nsm: &MockNsm, claim: CheckpointClaim) -> u64 {
        let document = nsm
            .attest(&AttestationRequest {
                user_data: Some(claim.user_data()),
                ..AttestationRequest::default()
            })
            .unwrap();
        self.event(AuditEvent::Checkpoint { document })
    }

    /// An honest checkpoint.
    pub fn checkpoint(&mut self, nsm: &MockNsm) -> u64 {
        let claim = self.claim();
        self.checkpoint_with(nsm, claim)
    }

    /// `count` records lost in the enclave's full buffer, then the gap
    /// record that says so.
    pub fn gap(&mut self, count: u64) -> u64 {
        let first_seq = self.chain.next_seq();
        for i in 0..count {
            // The dropped records still moved the enclave's chain on.
            self.chain
                .append(&AuditRecord {
                    seq: first_seq + i,
                    time_ms: self.time_ms,
                    event: AuditEvent::Request {
                        op: AuditOp::Get,
                        names: vec![format!("LOST_{i}")],
                        count: None,
                        caller: None,
                        peer: "unix:uid=0".to_owned(),
                        outcome: Outcome::Ok,
                    },
                })
                .unwrap();
        }
        let resume_hash = self.chain.hash;
        self.record(
            first_seq + count,
            AuditEvent::Gap {
                first_seq,
                count,
                resume_hash,
            },
        )
    }

    /// The file text.
    pub fn text(&self) -> String {
        join(&self.lines)
    }
}

/// Lines as a file's text (each ends with a newline).
pub fn join(lines: &[String]) -> String {
    let mut text = lines.join("\n");
    if !lines.is_empty() {
        text.push('\n');
    }
    text
}

/// The sequence number and hash a record line carries.
pub fn point(line: &str) -> (u64, ChainHash) {
    match LogLine::parse(line).unwrap() {
        LogLine::Record { record, hash } => (record.seq, hash),
        LogLine::Continues { seq, hash } => (seq, hash),
    }
}

/// Index of the line holding record `seq` (first run).
pub fn index_of(lines: &[String], seq: u64) -> usize {
    lines
        .iter()
        .position(|l| point(l).0 == seq)
        .unwrap_or_else(|| panic!("no record #{seq}"))
}

/// The head of a file rotated after `line`.
pub fn continues_after(line: &str) -> String {
    let (seq, hash) = point(line);
    LogLine::Continues { seq, hash }.to_json()
}

/// The standard log of the tests:
///
/// ```text
/// #0 start A  #1 get api ok  #2 get web denied  #3 list  #4 checkpoint(#3)
/// #5 get api ok  #6 get web not_found  [#7 #8 lost]  #9 gap
/// #10 get api ok  #11 checkpoint(#10)  #12 get web ok (not covered)
/// ```
pub fn standard(enclave: &MockEnclave) -> LogBuilder {
    let mut log = LogBuilder::default();
    log.start(RUN_A);
    log.get("DB_PASSWORD", caller("api", 1000), Outcome::Ok);
    log.get("DB_PASSWORD", caller("web", 1001), Outcome::Denied);
    log.list(3);
    log.checkpoint(&enclave.nsm);
    log.get("API_TOKEN", caller("api", 1000), Outcome::Ok);
    log.get("MISSING", caller("web", 1001), Outcome::NotFound);
    log.gap(2);
    log.get("DB_PASSWORD", caller("api", 1000), Outcome::Ok);
    log.checkpoint(&enclave.nsm);
    log.get("API_TOKEN", caller("web", 1001), Outcome::Ok);
    log
}

/// Writes `text` to `dir/name`.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}
