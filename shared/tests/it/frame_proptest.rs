//! Property tests: random and mutated frames must yield a message or a typed
//! error — never a panic, hang or over-limit read — both through the pure
//! decoder and through `Connection`.
// Test helpers outside #[test] fns are not covered by allow-unwrap-in-tests.
#![allow(clippy::unwrap_used)]

use keystore_shared::frame::{Connection, FrameError, FrameLimits, decode_frame, encode_frame};
use keystore_shared::protocol::{
    Credentials, ErrorCode, LoadEntry, Request, RequestOp, Response, ResponseBody, SecretBytes,
    SecretString, StatusReport,
};
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;

const MAX: usize = 4096;

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn request() -> impl Strategy<Value = Request> {
    let op = prop_oneof![
        ".{0,40}".prop_map(|name| RequestOp::Get { name }),
        Just(RequestOp::List),
        Just(RequestOp::Status),
        Just(RequestOp::GetCredentials),
        (bytes(64), prop::option::of(bytes(64)))
            .prop_map(|(nonce, user_data)| RequestOp::Attest { nonce, user_data }),
        prop::collection::vec(
            (".{0,20}", ".{0,60}").prop_map(|(name, envelope)| LoadEntry { name, envelope }),
            0..5
        )
        .prop_map(|entries| RequestOp::Load { entries }),
    ];
    (any::<u64>(), any::<u16>(), op).prop_map(|(id, v, op)| Request {
        id,
        v,
        op,
        caller: None,
    })
}

fn response() -> impl Strategy<Value = Response> {
    let code = prop_oneof![
        Just(ErrorCode::NotFound),
        Just(ErrorCode::Denied),
        Just(ErrorCode::NotReady),
        Just(ErrorCode::BadRequest),
        Just(ErrorCode::TooLarge),
        Just(ErrorCode::Unavailable),
        Just(ErrorCode::Internal),
    ];
    let body = prop_oneof![
        (".{0,30}", bytes(200)).prop_map(|(name, v)| ResponseBody::Secret {
            name,
            value: SecretBytes::new(v)
        }),
        prop::collection::vec(".{0,20}", 0..6).prop_map(|names| ResponseBody::Names { names }),
        (
            any::<bool>(),
            any::<u64>(),
            prop::option::of(any::<u64>()),
            prop::option::of(any::<u32>()),
            prop::option::of(".{0,30}")
        )
            .prop_map(|(ready, n, age, bits, last_error)| {
                ResponseBody::Status(StatusReport {
                    ready,
                    secret_count: n,
                    document_age_ms: age,
                    uptime_ms: n / 2,
                    version: "1.0".into(),
                    recipient_key_bits: bits,
                    refresh_count: n / 3,
                    last_error,
                    secret_peers: Some("privileged".into()),
                    last_decrypt_age_ms: age,
                    audit: None,
                    last_good_load_unix_ms: age,
                    max_stale_ms: bits.map(u64::from),
                    breaker: None,
                    ..StatusReport::default()
                })
            }),
        bytes(300).prop_map(|document| ResponseBody::Attestation { document }),
        any::<u64>().prop_map(|count| ResponseBody::Loaded { count }),
        (
            ".{0,20}",
            ".{0,40}",
            prop::option::of(".{0,40}"),
            prop::option::of(any::<u64>())
        )
            .prop_map(|(a, s, t, e)| {
                ResponseBody::Credentials(Credentials {
                    access_key_id: SecretString::new(a),
                    secret_access_key: SecretString::new(s),
                    session_token: t.map(SecretString::new),
                    expires_at: e,
                })
            }),
        (code, ".{0,40}").prop_map(|(code, message)| ResponseBody::Error { code, message }),
    ];
    (any::<u64>(), body).prop_map(|(id, result)| Response { id, v: 1, result })
}

/// A valid frame, then damaged: bit flips, truncation, extension, or a
/// rewritten length prefix.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, mask: u8 },
    Truncate { keep: usize },
    Extend { extra: Vec<u8> },
    Prefix { len: u32 },
    Splice { at: usize, junk: Vec<u8> },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        any::<usize>().prop_map(|keep| Mutation::Truncate { keep }),
        bytes(32).prop_map(|extra| Mutation::Extend { extra }),
        any::<u32>().prop_map(|len| Mutation::Prefix { len }),
        (any::<usize>(), bytes(16)).prop_map(|(at, junk)| Mutation::Splice { at, junk }),
    ]
}

fn apply(mut frame: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        match m {
            Mutation::Flip { at, mask } => {
                if !frame.is_empty() {
                    let i = at % frame.len();
                    frame[i] ^= mask;
                }
            }
            Mutation::Truncate { keep } => {
                let keep = keep % (frame.len() + 1);
                frame.truncate(keep);
            }
            Mutation::Extend { extra } => frame.extend_from_slice(extra),
            Mutation::Prefix { len } => {
                if frame.len() >= 4 {
                    frame[..4].copy_from_slice(&len.to_be_bytes());
                }
            }
            Mutation::Splice { at, junk } => {
                let i = at % (frame.len() + 1);
                frame.splice(i..i, junk.iter().copied());
            }
        }
    }
    frame
}

/// Checks the contract of `decode_frame` on arbitrary input.
fn check_decode<T: serde::de::DeserializeOwned + std::fmt::Debug>(buf: &[u8]) {
    match decode_frame::<T>(buf, MAX) {
        Ok(Some((_, used))) => {
            assert!(used >= 4 && used <= buf.len());
            let body_len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
            assert_eq!(used, body_len + 4);
            assert!(body_len <= MAX);
        }
        Ok(None) => {
            if buf.len() >= 4 {
                let body_len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
                assert!(body_len <= MAX && buf.len() < body_len + 4);
            }
        }
        Err(FrameError::TooLarge { len, max }) => {
            assert_eq!(max, MAX);
            assert!(len as usize > MAX);
        }
        Err(FrameError::Decode(_)) => {}
        Err(other) => panic!("unexpected error kind from pure decode: {other:?}"),
    }
}

/// Feeds `bytes` to a `Connection` in `chunk`-sized writes, then closes, and
/// drains messages until EOF or error. Returns how many decoded.
fn run_connection<T: serde::de::DeserializeOwned>(input: Vec<u8>, chunk: usize) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (a, mut b) = tokio::io::duplex(256);
        let writer = tokio::spawn(async move {
            for piece in input.chunks(chunk.max(1)) {
                if b.write_all(piece).await.is_err() {
                    return;
                }
            }
        });
        let mut conn = Connection::with_limits(a, FrameLimits::symmetric(MAX));
        let mut decoded = 0;
        loop {
            let next =
                tokio::time::timeout(std::time::Duration::from_secs(5), conn.read_message::<T>())
                    .await
                    .expect("read_message hung after writer closed");
            match next {
                Ok(Some(_)) => decoded += 1,
                Ok(None) => break,
                // Decode errors leave the stream in sync: keep reading.
                Err(FrameError::Decode(_)) => continue,
                Err(FrameError::TooLarge { .. }) | Err(FrameError::Truncated { .. }) => break,
                Err(other) => panic!("unexpected error: {other:?}"),
            }
            assert!(conn.read_buffer_capacity() <= 2 * MAX + 16 * 1024);
        }
        drop(conn);
        writer.await.unwrap();
        decoded
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn requests_round_trip(req in request()) {
        let frame = encode_frame(&req, MAX).unwrap();
        let (back, used): (Request, usize) = decode_frame(&frame, MAX).unwrap().unwrap();
        prop_assert_eq!(back, req);
        prop_assert_eq!(used, frame.len());
    }

    #[test]
    fn responses_round_trip(resp in response()) {
        let frame = encode_frame(&resp, MAX).unwrap();
        let (back, _): (Response, usize) = decode_frame(&frame, MAX).unwrap().unwrap();
        prop_assert_eq!(back, resp);
    }

    #[test]
    fn random_bytes_never_panic(buf in bytes(600)) {
        check_decode::<Request>(&buf);
        check_decode::<Response>(&buf);
    }

    #[test]
    fn random_body_with_valid_prefix_never_panics(body in bytes(600)) {
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        check_decode::<Request>(&frame);
        check_decode::<Response>(&frame);
        check_decode::<serde_cbor::Value>(&frame);
    }

    #[test]
    fn mutated_request_frames_never_panic(
        req in request(),
        muts in prop::collection::vec(mutation(), 1..4),
    ) {
        let frame = apply(encode_frame(&req, MAX).unwrap().to_vec(), &muts);
        check_decode::<Request>(&frame);
    }

    #[test]
    fn mutated_response_frames_never_panic(
        resp in response(),
        muts in prop::collection::vec(mutation(), 1..4),
    ) {
        let frame = apply(encode_frame(&resp, MAX).unwrap().to_vec(), &muts);
        check_decode::<Response>(&frame);
    }
}

proptest! {
    // Each case builds a runtime; fewer cases keep the suite fast.
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn connection_survives_mutated_streams(
        reqs in prop::collection::vec(request(), 1..5),
        muts in prop::collection::vec(mutation(), 0..4),
        chunk in 1usize..64,
    ) {
        let mut stream = Vec::new();
        for r in &reqs {
            stream.extend_from_slice(&encode_frame(r, MAX).unwrap());
        }
        let unmodified = muts.is_empty();
        let stream = apply(stream, &muts);
        let decoded = run_connection::<Request>(stream, chunk);
        if unmodified {
            prop_assert_eq!(decoded, reqs.len());
        }
    }

    #[test]
    fn connection_survives_random_streams(buf in bytes(2000), chunk in 1usize..300) {
        run_connection::<Response>(buf, chunk);
    }

    #[test]
    fn connection_delivers_every_frame_in_order(
        reqs in prop::collection::vec(request(), 1..20),
        chunk in 1usize..100,
    ) {
        let mut stream = Vec::new();
        for r in &reqs {
            stream.extend_from_slice(&encode_frame(r, MAX).unwrap());
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let got = rt.block_on(async move {
            let (a, mut b) = tokio::io::duplex(128);
            let writer = tokio::spawn(async move {
                for piece in stream.chunks(chunk) {
                    b.write_all(piece).await.unwrap();
                }
            });
            let mut conn = Connection::with_limits(a, FrameLimits::symmetric(MAX));
            let mut got = Vec::new();
            while let Some(r) = conn.read_message::<Request>().await.unwrap() {
                got.push(r);
            }
            writer.await.unwrap();
            got
        });
        prop_assert_eq!(got, reqs);
    }
}
