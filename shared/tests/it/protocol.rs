//! Protocol messages: round trips, wire shape, version checks, secrecy.
// Test helpers outside #[test] fns are not covered by allow-unwrap-in-tests.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use keystore_shared::frame::{
    Connection, DEFAULT_MAX_FRAME, FrameError, FrameLimits, decode_frame, encode_frame,
};
use keystore_shared::protocol::{
    AuditBatch, AuditCursor, AuditEntry, AuditStatus, BreakerStatus, Credentials,
    DEFAULT_MAX_LOAD_FRAME, DEFAULT_MAX_REQUEST_FRAME, DEFAULT_MAX_RESPONSE_FRAME,
    DEFAULT_MAX_SECRET_VALUE, ErrorCode, KmsCallCount, KmsCallStats, KmsPins, LoadEntry, LogBatch,
    LogCursor, LogEvent, LogField, LogLevel, LogRingStatus, MAX_AUDIT_BATCH, MAX_KMS_CALL_COUNTS,
    MAX_KMS_PINS, MAX_LOG_BATCH, MAX_LOG_FIELDS, PROTOCOL_VERSION, ProtocolError, Request,
    RequestOp, Response, ResponseBody, SecretBytes, SecretString, StatusReport, max_response_frame,
};
use serde::{Deserialize, Serialize};
use serde_cbor::Value;

const SECRET: &str = "hunter2-SUPER-secret-value";
const AKID: &str = "ASIAEXAMPLEKEYID1234";
const SAK: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
const TOKEN: &str = "IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKEN";
/// 2031-01-01T00:00:00Z.
const EXPIRY: u64 = 1_924_992_000;

fn all_requests() -> Vec<Request> {
    vec![
        Request::new(
            12,
            RequestOp::AuditRead {
                after: Some(AuditCursor {
                    seq: 5,
                    hash: vec![7; 32],
                }),
                max: 100,
            },
        ),
        Request::new(
            13,
            RequestOp::AuditRead {
                after: None,
                max: 1,
            },
        ),
        Request::new(14, RequestOp::AuditCheckpoint),
        Request::new(
            15,
            RequestOp::LogRead {
                after: Some(LogCursor { run: 77, seq: 9 }),
                max: 100,
            },
        ),
        Request::new(
            16,
            RequestOp::LogRead {
                after: None,
                max: 1,
            },
        ),
        Request::new(
            1,
            RequestOp::Get {
                name: "db/password".into(),
            },
        ),
        Request::new(2, RequestOp::List),
        Request::new(3, RequestOp::Status),
        Request::new(
            4,
            RequestOp::Attest {
                nonce: vec![1, 2, 3, 255],
                user_data: None,
            },
        ),
        Request::new(
            5,
            RequestOp::Attest {
                nonce: vec![],
                user_data: Some(vec![9; 64]),
            },
        ),
        Request::new(
            6,
            RequestOp::Load {
                entries: vec![
                    LoadEntry {
                        name: "a".into(),
                        envelope: "ENC[v1:kms:AAAA]".into(),
                    },
                    LoadEntry {
                        name: "nested/b".into(),
                        envelope: "ENC[v1:dek:BBBB]".into(),
                    },
                ],
            },
        ),
        Request::new(7, RequestOp::Load { entries: vec![] }),
        Request::new(u64::MAX, RequestOp::GetCredentials),
    ]
}

fn credentials() -> Credentials {
    Credentials {
        access_key_id: SecretString::new(AKID.into()),
        secret_access_key: SecretString::new(SAK.into()),
        session_token: Some(SecretString::new(TOKEN.into())),
        expires_at: Some(EXPIRY),
    }
}

fn all_responses() -> Vec<Response> {
    vec![
        Response::new(
            1,
            ResponseBody::Secret {
                name: "db/password".into(),
                value: SecretBytes::new(SECRET.as_bytes().to_vec()),
            },
        ),
        Response::new(
            1,
            ResponseBody::Secret {
                name: "binary".into(),
                value: SecretBytes::new(vec![0, 159, 146, 150, 255]),
            },
        ),
        Response::new(
            2,
            ResponseBody::Names {
                names: vec!["a".into(), "b/c".into()],
            },
        ),
        Response::new(
            3,
            ResponseBody::Status(StatusReport {
                ready: true,
                secret_count: 12,
                document_age_ms: Some(61_000),
                uptime_ms: 3_600_000,
                version: "0.1.0".into(),
                recipient_key_bits: Some(4096),
                refresh_count: 17,
                last_error: Some("kms: throttled".into()),
                secret_peers: Some("any".into()),
                last_decrypt_age_ms: Some(5_000),
                audit: Some(AuditStatus {
                    last_seq: Some(41),
                    buffered: 3,
                    dropped: 7,
                    gaps: 1,
                    dropping: false,
                }),
                last_good_load_unix_ms: Some(1_700_000_000_000),
                max_stale_ms: Some(86_400_000),
                breaker: Some(BreakerStatus {
                    state: "open".into(),
                    consecutive_failures: 5,
                    next_probe_in_ms: Some(900),
                    opened: 2,
                    last_failure: Some("KMS refused: ThrottlingException".into()),
                }),
                kms_pins: Some(Box::new(KmsPins {
                    region: "eu-west-1".into(),
                    key_arns: vec![
                        "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
                            .into(),
                    ],
                })),
                kms: Some(KmsCallStats {
                    calls: vec![KmsCallCount {
                        operation: "Decrypt".into(),
                        outcome: "ThrottlingException".into(),
                        count: 3,
                    }],
                }),
                logs: Some(LogRingStatus {
                    buffered: 4,
                    dropped: 1,
                    last_seq: 20,
                }),
            }),
        ),
        Response::new(3, ResponseBody::Status(StatusReport::default())),
        Response::new(
            4,
            ResponseBody::Attestation {
                document: vec![0xD2, 0x84, 0x44],
            },
        ),
        Response::new(6, ResponseBody::Loaded { count: 2 }),
        Response::new(7, ResponseBody::Credentials(credentials())),
        Response::new(
            7,
            ResponseBody::Credentials(Credentials {
                session_token: None,
                expires_at: None,
                ..credentials()
            }),
        ),
        Response::new(
            10,
            ResponseBody::AuditRecords(AuditBatch {
                entries: vec![AuditEntry {
                    record: vec![1, 0, 0, 7],
                    hash: vec![9; 32],
                }],
                more: true,
            }),
        ),
        Response::new(11, ResponseBody::AuditCheckpointed { seq: 12 }),
        Response::new(
            12,
            ResponseBody::LogRecords(LogBatch {
                run: 77,
                entries: vec![log_event(10)],
                more: true,
                dropped: 2,
            }),
        ),
        Response::error(8, ErrorCode::NotFound, "no secret named x"),
        Response::error(9, ErrorCode::Denied, "denied"),
        Response::error(9, ErrorCode::NotReady, "not loaded"),
        Response::error(9, ErrorCode::BadRequest, "bad"),
        Response::error(9, ErrorCode::TooLarge, "too large"),
        Response::error(9, ErrorCode::Unavailable, "kms down"),
        Response::error(0, ErrorCode::Internal, "bug"),
    ]
}

#[test]
fn every_request_round_trips() {
    for req in all_requests() {
        let frame = encode_frame(&req, DEFAULT_MAX_LOAD_FRAME).unwrap();
        let (back, used): (Request, usize) = decode_frame(&frame, DEFAULT_MAX_LOAD_FRAME)
            .unwrap()
            .unwrap();
        assert_eq!(back, req);
        assert_eq!(used, frame.len());
        assert_eq!(back.v, PROTOCOL_VERSION);
    }
}

#[test]
fn every_response_round_trips() {
    for resp in all_responses() {
        let frame = encode_frame(&resp, DEFAULT_MAX_RESPONSE_FRAME).unwrap();
        let (back, _): (Response, usize) = decode_frame(&frame, DEFAULT_MAX_RESPONSE_FRAME)
            .unwrap()
            .unwrap();
        assert_eq!(back, resp);
    }
}

#[tokio::test]
async fn every_message_round_trips_through_a_connection() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let limits = FrameLimits::symmetric(DEFAULT_MAX_LOAD_FRAME);
    let mut left = Connection::with_limits(a, limits);
    let mut right = Connection::with_limits(b, limits);
    for req in all_requests() {
        left.write_message(&req).await.unwrap();
        let got: Request = right.read_message().await.unwrap().unwrap();
        assert_eq!(got, req);
    }
    for resp in all_responses() {
        right.write_message(&resp).await.unwrap();
        let got: Response = left.read_message().await.unwrap().unwrap();
        assert_eq!(got, resp);
    }
}

fn lookup<'a>(v: &'a Value, key: &str) -> &'a Value {
    let Value::Map(map) = v else {
        panic!("not a map: {v:?}")
    };
    map.get(&Value::Text(key.into()))
        .unwrap_or_else(|| panic!("no key {key} in {v:?}"))
}

#[test]
fn byte_fields_are_cbor_byte_strings() {
    let resp = &all_responses()[0];
    let v: Value = serde_cbor::from_slice(&serde_cbor::to_vec(resp).unwrap()).unwrap();
    let secret = lookup(lookup(&v, "result"), "Secret");
    assert_eq!(
        lookup(secret, "value"),
        &Value::Bytes(SECRET.as_bytes().to_vec())
    );

    let doc = Response::new(
        1,
        ResponseBody::Attestation {
            document: vec![1, 2],
        },
    );
    let v: Value = serde_cbor::from_slice(&serde_cbor::to_vec(&doc).unwrap()).unwrap();
    let att = lookup(lookup(&v, "result"), "Attestation");
    assert_eq!(lookup(att, "document"), &Value::Bytes(vec![1, 2]));

    let req = Request::new(
        1,
        RequestOp::Attest {
            nonce: vec![3],
            user_data: Some(vec![4]),
        },
    );
    let v: Value = serde_cbor::from_slice(&serde_cbor::to_vec(&req).unwrap()).unwrap();
    let attest = lookup(lookup(&v, "op"), "Attest");
    assert_eq!(lookup(attest, "nonce"), &Value::Bytes(vec![3]));
    assert_eq!(lookup(attest, "user_data"), &Value::Bytes(vec![4]));
    assert_eq!(lookup(&v, "v"), &Value::Integer(1));
}

#[test]
fn credentials_expiry_is_a_cbor_integer() {
    let resp = Response::new(7, ResponseBody::Credentials(credentials()));
    let v: Value = serde_cbor::from_slice(&serde_cbor::to_vec(&resp).unwrap()).unwrap();
    let creds = lookup(lookup(&v, "result"), "Credentials");
    assert_eq!(
        lookup(creds, "expires_at"),
        &Value::Integer(i128::from(EXPIRY))
    );
}

#[test]
fn attest_without_user_data_key_decodes() {
    // An encoder that omits the optional key entirely.
    let mut attest = BTreeMap::new();
    attest.insert(Value::Text("nonce".into()), Value::Bytes(vec![5, 6]));
    let mut op = BTreeMap::new();
    op.insert(Value::Text("Attest".into()), Value::Map(attest));
    let mut req = BTreeMap::new();
    req.insert(Value::Text("id".into()), Value::Integer(3));
    req.insert(Value::Text("v".into()), Value::Integer(1));
    req.insert(Value::Text("op".into()), Value::Map(op));
    let bytes = serde_cbor::to_vec(&Value::Map(req)).unwrap();
    let got: Request = serde_cbor::from_slice(&bytes).unwrap();
    assert_eq!(
        got.op,
        RequestOp::Attest {
            nonce: vec![5, 6],
            user_data: None
        }
    );
}

/// A future StatusReport with an extra field, as a newer enclave would send.
#[derive(Serialize)]
struct FutureStatus {
    ready: bool,
    secret_count: u64,
    uptime_ms: u64,
    version: String,
    refresh_count: u64,
    pcr0: String,
    last_kms_latency_ms: u64,
}

#[derive(Serialize)]
enum FutureBody {
    Status(FutureStatus),
}

#[derive(Serialize)]
struct FutureResponse {
    id: u64,
    v: u16,
    result: FutureBody,
    trace_id: String,
}

#[test]
fn unknown_fields_are_ignored_and_missing_optionals_default() {
    let future = FutureResponse {
        id: 42,
        v: 1,
        result: FutureBody::Status(FutureStatus {
            ready: true,
            secret_count: 3,
            uptime_ms: 10,
            version: "9.9".into(),
            refresh_count: 1,
            pcr0: "abcd".into(),
            last_kms_latency_ms: 12,
        }),
        trace_id: "t-1".into(),
    };
    let frame = encode_frame(&future, DEFAULT_MAX_FRAME).unwrap();
    let (got, _): (Response, usize) = decode_frame(&frame, DEFAULT_MAX_FRAME).unwrap().unwrap();
    assert_eq!(got.id, 42);
    let ResponseBody::Status(status) = got.result else {
        panic!("not status")
    };
    assert!(status.ready);
    assert_eq!(status.secret_count, 3);
    assert_eq!(status.document_age_ms, None);
    assert_eq!(status.recipient_key_bits, None);
    assert_eq!(status.last_error, None);
    assert_eq!(status.version, "9.9");
}

#[test]
fn minimal_status_from_an_older_writer_decodes() {
    #[derive(Serialize)]
    struct Old {
        ready: bool,
    }
    let bytes = serde_cbor::to_vec(&Old { ready: false }).unwrap();
    let status: StatusReport = serde_cbor::from_slice(&bytes).unwrap();
    assert_eq!(status, StatusReport::default());
}

#[test]
fn version_check_names_both_versions() {
    let mut req = Request::new(1, RequestOp::List);
    assert_eq!(req.check_version(), Ok(()));
    req.v = 2;
    let err = req.check_version().unwrap_err();
    assert_eq!(
        err,
        ProtocolError::UnsupportedVersion {
            got: 2,
            expected: 1
        }
    );
    let msg = err.to_string();
    assert!(msg.contains('2') && msg.contains('1'), "{msg}");
    assert_eq!(err.code(), ErrorCode::BadRequest);

    let mut resp = Response::error(1, ErrorCode::Internal, "x");
    assert_eq!(resp.check_version(), Ok(()));
    resp.v = 0;
    assert!(matches!(
        resp.check_version(),
        Err(ProtocolError::UnsupportedVersion {
            got: 0,
            expected: 1
        })
    ));
}

#[test]
fn helpers_fill_version_and_fields() {
    let resp = Response::error(5, ErrorCode::NotFound, "no such secret");
    assert_eq!(resp.v, PROTOCOL_VERSION);
    assert_eq!(resp.id, 5);
    assert_eq!(
        resp.result,
        ResponseBody::Error {
            code: ErrorCode::NotFound,
            message: "no such secret".into()
        }
    );
    assert_eq!(ErrorCode::Unavailable.to_string(), "Unavailable");
    assert_eq!(RequestOp::GetCredentials.kind(), "get_credentials");
    assert_eq!(RequestOp::Get { name: "x".into() }.kind(), "get");
}

#[test]
fn error_codes_serialize_as_their_names() {
    for code in [
        ErrorCode::NotFound,
        ErrorCode::Denied,
        ErrorCode::NotReady,
        ErrorCode::BadRequest,
        ErrorCode::TooLarge,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ] {
        let v: Value = serde_cbor::from_slice(&serde_cbor::to_vec(&code).unwrap()).unwrap();
        assert_eq!(v, Value::Text(code.as_str().into()));
    }
}

#[test]
fn frame_errors_map_to_codes() {
    let too_large = FrameError::TooLarge { len: 1, max: 0 };
    assert_eq!(ErrorCode::from(&too_large), ErrorCode::TooLarge);
    let decode = FrameError::Decode("x".into());
    assert_eq!(ErrorCode::from(&decode), ErrorCode::BadRequest);
    let io = FrameError::Io(std::io::Error::other("x"));
    assert_eq!(ErrorCode::from(&io), ErrorCode::Internal);
}

#[test]
fn limits_match_the_design() {
    assert_eq!(DEFAULT_MAX_REQUEST_FRAME, 64 * 1024);
    assert_eq!(DEFAULT_MAX_LOAD_FRAME, 16 * 1024 * 1024);
    assert_eq!(DEFAULT_MAX_SECRET_VALUE, 1024 * 1024);
    // A maximum-size secret with a long name fits in a default response frame.
    let resp = Response::new(
        u64::MAX,
        ResponseBody::Secret {
            name: "n".repeat(4096),
            value: SecretBytes::new(vec![0xEE; DEFAULT_MAX_SECRET_VALUE]),
        },
    );
    encode_frame(&resp, DEFAULT_MAX_RESPONSE_FRAME).unwrap();
    assert!(max_response_frame(usize::MAX) == usize::MAX);
}

#[test]
fn debug_never_shows_secrets() {
    let expiry = EXPIRY.to_string();
    let needles = [SECRET, AKID, SAK, TOKEN, &expiry];
    for resp in all_responses() {
        let dbg = format!("{resp:?}");
        let pretty = format!("{resp:#?}");
        for needle in needles {
            assert!(!dbg.contains(needle), "{dbg}");
            assert!(!pretty.contains(needle), "{pretty}");
        }
    }
    let dbg = format!("{:?}", all_responses()[0]);
    assert!(
        dbg.contains(&format!("[REDACTED {} bytes]", SECRET.len())),
        "{dbg}"
    );
    let dbg = format!("{:?}", credentials());
    assert!(
        dbg.contains(&format!("[REDACTED {} bytes]", SAK.len())),
        "{dbg}"
    );
    // The name is not secret and stays visible for debugging.
    assert!(format!("{:?}", all_responses()[0]).contains("db/password"));
}

#[test]
fn decode_errors_never_echo_secret_input() {
    // A response whose `id` is, wrongly, the secret text.
    #[derive(Serialize)]
    struct Wrong<'a> {
        id: &'a str,
    }
    let frame = encode_frame(&Wrong { id: SECRET }, DEFAULT_MAX_FRAME).unwrap();
    let err = decode_frame::<Response>(&frame, DEFAULT_MAX_FRAME).unwrap_err();
    assert!(matches!(err, FrameError::Decode(_)));
    assert!(!err.to_string().contains(SECRET), "{err}");
    assert!(!format!("{err:?}").contains(SECRET), "{err:?}");

    // A secret where an enum variant name is expected.
    let mut map = BTreeMap::new();
    map.insert(Value::Text("id".into()), Value::Integer(1));
    map.insert(Value::Text("v".into()), Value::Integer(1));
    map.insert(Value::Text("result".into()), Value::Text(SECRET.into()));
    let frame = encode_frame(&Value::Map(map), DEFAULT_MAX_FRAME).unwrap();
    let err = decode_frame::<Response>(&frame, DEFAULT_MAX_FRAME).unwrap_err();
    assert!(!err.to_string().contains(SECRET), "{err}");

    // Credentials where a secret arrives as bytes that are not UTF-8.
    let mut not_utf8 = SAK.as_bytes().to_vec();
    not_utf8.push(0xFF);
    let mut creds = BTreeMap::new();
    creds.insert(
        Value::Text("access_key_id".into()),
        Value::Text(AKID.into()),
    );
    creds.insert(
        Value::Text("secret_access_key".into()),
        Value::Bytes(not_utf8),
    );
    let frame = encode_frame(&Value::Map(creds), DEFAULT_MAX_FRAME).unwrap();
    let err = decode_frame::<Credentials>(&frame, DEFAULT_MAX_FRAME).unwrap_err();
    let msg = err.to_string();
    assert!(!msg.contains(SAK) && !msg.contains(AKID), "{msg}");
}

#[test]
fn secret_types_compare_by_content() {
    assert_eq!(SecretBytes::new(vec![1, 2]), SecretBytes::new(vec![1, 2]));
    assert_ne!(SecretBytes::new(vec![1, 2]), SecretBytes::new(vec![1, 3]));
    assert_ne!(
        SecretBytes::new(vec![1, 2]),
        SecretBytes::new(vec![1, 2, 0])
    );
    assert_eq!(
        SecretString::new("a".into()),
        SecretString::from("a".to_owned())
    );
    assert_ne!(SecretString::new("a".into()), SecretString::new("b".into()));
    let s = SecretBytes::from(vec![9; 3]);
    assert_eq!(s.len(), 3);
    assert!(!s.is_empty());
    assert!(SecretString::default().is_empty());
}

#[test]
fn secret_bytes_accept_only_byte_like_input() {
    #[derive(Deserialize, Debug)]
    struct Holder {
        #[allow(dead_code)]
        v: SecretBytes,
    }
    let mut map = BTreeMap::new();
    map.insert(Value::Text("v".into()), Value::Integer(5));
    let bytes = serde_cbor::to_vec(&Value::Map(map)).unwrap();
    assert!(serde_cbor::from_slice::<Holder>(&bytes).is_err());
}

#[test]
fn an_audit_batch_over_the_bound_is_refused_while_decoding() {
    let entry = AuditEntry {
        record: vec![1],
        hash: vec![0; 32],
    };
    let at_bound = Response::new(
        1,
        ResponseBody::AuditRecords(AuditBatch {
            entries: vec![entry.clone(); MAX_AUDIT_BATCH],
            more: false,
        }),
    );
    let bytes = serde_cbor::to_vec(&at_bound).unwrap();
    assert_eq!(
        serde_cbor::from_slice::<Response>(&bytes).unwrap(),
        at_bound
    );
    let over = Response::new(
        1,
        ResponseBody::AuditRecords(AuditBatch {
            entries: vec![entry; MAX_AUDIT_BATCH + 1],
            more: false,
        }),
    );
    let bytes = serde_cbor::to_vec(&over).unwrap();
    let err = serde_cbor::from_slice::<Response>(&bytes).unwrap_err();
    assert!(err.to_string().contains("audit entries"), "{err}");
}

fn log_event(seq: u64) -> LogEvent {
    LogEvent {
        seq,
        unix_ms: 1_700_000_000_000,
        level: LogLevel::Warn,
        target: "keystore_enclave::load".into(),
        message: "load failed".into(),
        fields: vec![LogField {
            name: "stage".into(),
            value: "tls".into(),
        }],
    }
}

#[test]
fn log_batches_and_kms_counts_over_their_bounds_are_refused_while_decoding() {
    let batch = |entries: Vec<LogEvent>| {
        Response::new(
            1,
            ResponseBody::LogRecords(LogBatch {
                run: 1,
                entries,
                more: false,
                dropped: 0,
            }),
        )
    };
    let at_bound = batch(vec![log_event(1); MAX_LOG_BATCH]);
    let bytes = serde_cbor::to_vec(&at_bound).unwrap();
    assert_eq!(
        serde_cbor::from_slice::<Response>(&bytes).unwrap(),
        at_bound
    );
    let bytes = serde_cbor::to_vec(&batch(vec![log_event(1); MAX_LOG_BATCH + 1])).unwrap();
    let err = serde_cbor::from_slice::<Response>(&bytes).unwrap_err();
    assert!(err.to_string().contains("log events"), "{err}");

    let mut wide = log_event(1);
    wide.fields = vec![wide.fields[0].clone(); MAX_LOG_FIELDS + 1];
    let bytes = serde_cbor::to_vec(&batch(vec![wide])).unwrap();
    let err = serde_cbor::from_slice::<Response>(&bytes).unwrap_err();
    assert!(err.to_string().contains("log fields"), "{err}");

    let count = KmsCallCount {
        operation: "Decrypt".into(),
        outcome: "ok".into(),
        count: 1,
    };
    let status = Response::new(
        1,
        ResponseBody::Status(StatusReport {
            kms: Some(KmsCallStats {
                calls: vec![count; MAX_KMS_CALL_COUNTS + 1],
            }),
            ..StatusReport::default()
        }),
    );
    let bytes = serde_cbor::to_vec(&status).unwrap();
    let err = serde_cbor::from_slice::<Response>(&bytes).unwrap_err();
    assert!(err.to_string().contains("KMS call counts"), "{err}");
}

#[test]
fn status_with_too_many_pinned_keys_is_refused_while_decoding() {
    let pins = |n: usize| {
        Response::new(
            1,
            ResponseBody::Status(StatusReport {
                kms_pins: Some(Box::new(KmsPins {
                    region: "eu-west-1".into(),
                    key_arns: vec!["arn:aws:kms:eu-west-1:111122223333:key/k".into(); n],
                })),
                ..StatusReport::default()
            }),
        )
    };
    let most = serde_cbor::to_vec(&pins(MAX_KMS_PINS)).unwrap();
    assert_eq!(
        serde_cbor::from_slice::<Response>(&most).unwrap(),
        pins(MAX_KMS_PINS)
    );
    let bytes = serde_cbor::to_vec(&pins(MAX_KMS_PINS + 1)).unwrap();
    let err = serde_cbor::from_slice::<Response>(&bytes).unwrap_err();
    assert!(err.to_string().contains("pinned KMS keys"), "{err}");
}
