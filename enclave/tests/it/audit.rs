//! The audit trail (DESIGN §3 "Audit"), through the real ports: one record
//! per `Get`, `List`, `Load`, `Attest` and per refused request (a refused
//! peer, an undecodable frame, an audit operation on the wrong port), never
//! a successful `Status`; the chain recomputes from the bytes drained over
//! the load port; checkpoints verify against the mock root and claim the
//! record before them; a full buffer drops records, says so in `Status`
//! and writes a gap record once drained; acknowledgement and redelivery.
#![allow(clippy::unwrap_used)]

use crate::support::server as server_support;

use std::time::{Duration, Instant};

use keystore_enclave::audit::AuditConfig;
use keystore_shared::attestation::AttestationDocument;
use keystore_shared::audit::chain::next_hash;
use keystore_shared::audit::{
    AuditEvent, AuditOp, AuditRecord, ChainHash, CheckpointClaim, GENESIS_HASH, Outcome,
};
use keystore_shared::frame::Connection;
use keystore_shared::protocol::{
    AuditBatch, AuditCursor, ErrorCode, LoadEntry, RequestOp, ResponseBody, StatusReport,
};
use keystore_shared::{Caller, Client, ClientConfig};
use server_support::{Harness, Options, Transport, patient};
use tokio::io::AsyncWriteExt;

/// A privileged client of the load port.
async fn load_port(harness: &Harness) -> Client {
    Client::connect_with(&harness.load_endpoint, patient())
        .await
        .unwrap()
}

async fn read(client: &mut Client, after: Option<AuditCursor>, max: u32) -> AuditBatch {
    match client
        .call(RequestOp::AuditRead { after, max })
        .await
        .unwrap()
    {
        ResponseBody::AuditRecords(batch) => batch,
        other => panic!("AuditRead answered {other:?}"),
    }
}

fn cursor(batch: &AuditBatch) -> AuditCursor {
    let last = batch.entries.last().unwrap();
    AuditCursor {
        seq: AuditRecord::decode(&last.record).unwrap().seq,
        hash: last.hash.clone(),
    }
}

/// Decodes every entry and recomputes its hash from the one before it
/// (`previous` before the first; a `Start` restarts at genesis, a gap
/// resumes at its `resume_hash`); seq numbers must be consecutive.
fn chained(batch: &AuditBatch, mut previous: ChainHash) -> Vec<AuditRecord> {
    let mut records: Vec<AuditRecord> = Vec::new();
    for entry in &batch.entries {
        let record = AuditRecord::decode(&entry.record).unwrap();
        match &record.event {
            AuditEvent::Start { .. } => previous = GENESIS_HASH,
            AuditEvent::Gap { resume_hash, .. } => previous = *resume_hash,
            _ => {}
        }
        if let (Some(last), false) = (
            records.last(),
            matches!(record.event, AuditEvent::Gap { .. }),
        ) {
            assert_eq!(record.seq, last.seq + 1, "{record:?} after {last:?}");
        }
        let hash = next_hash(&previous, &record).unwrap();
        assert_eq!(hash.as_slice(), entry.hash.as_slice(), "{record:?}");
        previous = hash;
        records.push(record);
    }
    records
}

/// What a request record says: op, names, count, caller uid, outcome.
type Said = (AuditOp, Vec<String>, Option<u64>, Option<u32>, Outcome);

/// The request records among `records`.
fn requests(records: &[AuditRecord]) -> Vec<Said> {
    records
        .iter()
        .filter_map(|record| match &record.event {
            AuditEvent::Request {
                op,
                names,
                count,
                caller,
                outcome,
                ..
            } => Some((
                *op,
                names.clone(),
                *count,
                caller.as_ref().and_then(|c| c.uid),
                outcome.clone(),
            )),
            _ => None,
        })
        .collect()
}

fn uid(uid: u32) -> Caller {
    Caller {
        uid: Some(uid),
        ..Caller::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_recorded_and_the_chain_recomputes() {
    let harness = Harness::start(Options {
        transport: Transport::Tcp,
        ..Options::default()
    })
    .await;
    let mut client = harness.client().await;
    assert_eq!(
        client.get("db/password").await.unwrap().expose(),
        b"hunter2"
    );
    let denied = client
        .get_as("db/password", Some(uid(1000)))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Some(ErrorCode::Denied));
    let missing = client.get("no/such").await.unwrap_err();
    assert_eq!(missing.code(), Some(ErrorCode::NotFound));
    assert_eq!(client.list().await.unwrap().len(), 4);
    client.attest(&[1, 2, 3], None).await.unwrap();
    // Polled by the daemon: never recorded when it succeeds.
    client.status().await.unwrap();
    // An audit read on the secret port is refused, and that is recorded.
    let wrong_port = client
        .call(RequestOp::AuditRead {
            after: None,
            max: 10,
        })
        .await
        .unwrap_err();
    assert_eq!(wrong_port.code(), Some(ErrorCode::BadRequest));

    // A peer from an unprivileged port is refused at accept.
    let mut unprivileged = Client::connect_with(
        &harness.endpoint,
        ClientConfig {
            privileged: false,
            ..patient()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        unprivileged.status().await.unwrap_err().code(),
        Some(ErrorCode::Denied)
    );
    // A frame that is not a request.
    let mut raw = Connection::new(harness.endpoint.connect_privileged().await.unwrap());
    // A 3-byte frame: the CBOR text "hi", not a map.
    raw.get_mut()
        .write_all(&[0, 0, 0, 3, 0x62, b'h', b'i'])
        .await
        .unwrap();
    let answer: keystore_shared::Response = raw.read_message().await.unwrap().unwrap();
    assert!(matches!(
        answer.result,
        ResponseBody::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));

    // A load (this enclave has no KMS: refused, with its entry count).
    let mut loader = load_port(&harness).await;
    let entries = vec![
        LoadEntry {
            name: "a".into(),
            envelope: "ENC[v1:kms:AAAA]".into(),
        };
        3
    ];
    let load = loader.call(RequestOp::Load { entries }).await.unwrap_err();
    assert_eq!(load.code(), Some(ErrorCode::Unavailable));

    let batch = read(&mut loader, None, 1024).await;
    assert!(!batch.more);
    let records = chained(&batch, GENESIS_HASH);
    let AuditEvent::Start { run } = records[0].event else {
        panic!("the first record is not the start: {:?}", records[0]);
    };
    assert_eq!(records[0].seq, 0);
    assert!(matches!(records[1].event, AuditEvent::Checkpoint { .. }));
    let error = |code: &str| Outcome::Error(code.to_owned());
    assert_eq!(
        requests(&records),
        vec![
            (
                AuditOp::Get,
                vec!["db/password".into()],
                None,
                Some(0),
                Outcome::Ok
            ),
            (
                AuditOp::Get,
                vec!["db/password".into()],
                None,
                Some(1000),
                Outcome::Denied
            ),
            (
                AuditOp::Get,
                vec!["no/such".into()],
                None,
                Some(0),
                Outcome::NotFound
            ),
            (AuditOp::List, vec![], Some(4), Some(0), Outcome::Ok),
            (AuditOp::Attest, vec![], None, Some(0), Outcome::Ok),
            (AuditOp::Audit, vec![], None, Some(0), error("BadRequest")),
            (AuditOp::Connect, vec![], None, None, Outcome::Denied),
            (AuditOp::Malformed, vec![], None, None, error("BadRequest")),
            (
                AuditOp::Load,
                vec![],
                Some(3),
                Some(0),
                error("Unavailable")
            ),
        ]
    );
    // The peer is the kernel's view: tcp from a port below 1024 for the
    // privileged client, above it for the refused one.
    for record in &records {
        if let AuditEvent::Request { op, peer, .. } = &record.event {
            assert!(
                peer.starts_with("tcp:127.0.0.1:") || peer.starts_with("unix:"),
                "{peer}"
            );
            let port: Option<u16> = peer.rsplit(':').next().and_then(|p| p.parse().ok());
            match op {
                AuditOp::Connect => assert!(port.unwrap() >= 1024, "{peer}"),
                AuditOp::Load => assert!(peer.starts_with("unix:"), "{peer}"),
                _ => assert!(port.unwrap() < 1024, "{peer}"),
            }
        }
    }
    // No value ever reaches the trail.
    for entry in &batch.entries {
        assert!(
            !entry.record.windows(7).any(|w| w == b"hunter2"),
            "a secret value is in an audit record"
        );
    }
    let status = loader.status().await.unwrap();
    let audit = status.audit.unwrap();
    assert_eq!(audit.last_seq, Some(records.last().unwrap().seq));
    assert_eq!(audit.dropped, 0);
    assert_eq!(harness.service.audit().run(), run);
    harness.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_verify_and_claim_the_record_before_them() {
    let harness = Harness::start(Options::default()).await;
    let mut client = harness.client().await;
    client.get("db/password").await.unwrap();
    let mut loader = load_port(&harness).await;
    let seq = match loader.call(RequestOp::AuditCheckpoint).await.unwrap() {
        ResponseBody::AuditCheckpointed { seq } => seq,
        other => panic!("{other:?}"),
    };
    let batch = read(&mut loader, None, 1024).await;
    let records = chained(&batch, GENESIS_HASH);
    let run = harness.service.audit().run();
    let checkpoints: Vec<usize> = records
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r.event, AuditEvent::Checkpoint { .. }))
        .map(|(i, _)| i)
        .collect();
    // The one after the start, and the one asked for.
    assert_eq!(checkpoints.len(), 2, "{records:?}");
    assert_eq!(records[checkpoints[0]].seq, 1);
    assert_eq!(records[checkpoints[1]].seq, seq);
    let verifier = harness.verifier();
    for &i in &checkpoints {
        let AuditEvent::Checkpoint { document } = &records[i].event else {
            unreachable!()
        };
        let verified = verifier.verify(document).unwrap();
        let claim =
            CheckpointClaim::from_user_data(verified.user_data.as_deref().unwrap()).unwrap();
        let before = &batch.entries[i - 1];
        assert_eq!(
            claim,
            CheckpointClaim {
                run,
                seq: records[i - 1].seq,
                hash: before.hash.as_slice().try_into().unwrap(),
            }
        );
        // Not an `Attest` document: no caller nonce, no recipient key.
        let parsed = AttestationDocument::parse_unverified(document).unwrap();
        assert!(parsed.nonce.is_none() && parsed.public_key.is_none());
    }
    harness.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_periodic_checkpoint_follows_the_interval() {
    let harness = Harness::start(Options {
        audit: AuditConfig {
            checkpoint_interval: Duration::from_secs(1),
            ..AuditConfig::default()
        },
        ..Options::default()
    })
    .await;
    let mut loader = load_port(&harness).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let records = chained(&read(&mut loader, None, 1024).await, GENESIS_HASH);
        let count = records
            .iter()
            .filter(|r| matches!(r.event, AuditEvent::Checkpoint { .. }))
            .count();
        if count >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no periodic checkpoint: {records:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    harness.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_leave_the_buffer_and_the_rest_is_redelivered() {
    let harness = Harness::start(Options::default()).await;
    let mut client = harness.client().await;
    for _ in 0..5 {
        client.get("db/password").await.unwrap();
    }
    let mut loader = load_port(&harness).await;
    // Start, checkpoint, 5 reads.
    let first = read(&mut loader, None, 3).await;
    assert_eq!(first.entries.len(), 3);
    assert!(first.more);
    // Not acknowledged yet: read again, the same records come back.
    assert_eq!(read(&mut loader, None, 3).await, first);
    // Acknowledging the third: the next read starts at the fourth.
    let second = read(&mut loader, Some(cursor(&first)), 100).await;
    assert_eq!(second.entries.len(), 4);
    assert!(!second.more);
    let seqs: Vec<u64> = chained(
        &second,
        first.entries[2].hash.as_slice().try_into().unwrap(),
    )
    .iter()
    .map(|r| r.seq)
    .collect();
    assert_eq!(seqs, vec![3, 4, 5, 6]);
    // Re-sending an acknowledged cursor acknowledges nothing new.
    assert_eq!(read(&mut loader, Some(cursor(&first)), 100).await, second);
    // A cursor of another run (unknown hash) acknowledges nothing.
    let foreign = AuditCursor {
        seq: 5,
        hash: vec![0xAA; 32],
    };
    assert_eq!(read(&mut loader, Some(foreign), 100).await, second);
    // A malformed cursor is refused.
    let bad = loader
        .call(RequestOp::AuditRead {
            after: Some(AuditCursor {
                seq: 1,
                hash: vec![1; 31],
            }),
            max: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Some(ErrorCode::BadRequest));
    // Everything acknowledged: only the refused read is left, recorded.
    let last = read(&mut loader, Some(cursor(&second)), 100).await;
    let refused = chained(&last, second.entries[3].hash.as_slice().try_into().unwrap());
    assert_eq!(
        requests(&refused),
        vec![(
            AuditOp::Audit,
            vec![],
            None,
            Some(0),
            Outcome::Error("BadRequest".into())
        )]
    );
    let empty = read(&mut loader, Some(cursor(&last)), 100).await;
    assert!(empty.entries.is_empty() && !empty.more);
    assert_eq!(audit_status(&mut loader).await.buffered, 0);
    harness.stop().await.unwrap();
}

async fn audit_status(client: &mut Client) -> keystore_shared::protocol::AuditStatus {
    let status: StatusReport = client.status().await.unwrap();
    status.audit.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_drops_records_shows_it_in_status_and_writes_a_gap() {
    let harness = Harness::start(Options {
        audit: AuditConfig {
            buffer_records: 6,
            ..AuditConfig::default()
        },
        ..Options::default()
    })
    .await;
    let mut client = harness.client().await;
    // Start + checkpoint + 4 reads fill it; 7 more are dropped.
    for _ in 0..11 {
        client.get("db/password").await.unwrap();
    }
    let mut loader = load_port(&harness).await;
    let status = audit_status(&mut loader).await;
    assert!(status.dropping);
    assert_eq!(status.dropped, 7);
    assert_eq!(status.buffered, 6);
    assert_eq!(status.last_seq, Some(12));
    let kept = read(&mut loader, None, 100).await;
    let records = chained(&kept, GENESIS_HASH);
    assert_eq!(records.len(), 6);
    assert_eq!(records.last().unwrap().seq, 5);
    // Draining frees the buffer: the gap record comes next, then new reads.
    let after = read(&mut loader, Some(cursor(&kept)), 100).await;
    client.get("db/password").await.unwrap();
    let after_read = read(&mut loader, Some(cursor(&after)), 100).await;
    let gap = AuditRecord::decode(&after.entries[0].record).unwrap();
    let AuditEvent::Gap {
        first_seq,
        count,
        resume_hash,
    } = gap.event
    else {
        panic!("not a gap: {gap:?}");
    };
    assert_eq!((first_seq, count, gap.seq), (6, 7, 13));
    // The gap chains onto the hash after the last dropped record.
    chained(&after, resume_hash);
    let next = chained(
        &after_read,
        after.entries[0].hash.as_slice().try_into().unwrap(),
    );
    assert_eq!(next[0].seq, 14);
    let status = audit_status(&mut loader).await;
    assert!(!status.dropping);
    assert_eq!((status.dropped, status.gaps), (7, 1));
    harness.stop().await.unwrap();
}
