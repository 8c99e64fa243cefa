//! Frames and messages from peers: every byte is hostile. The enclave, the
//! agent and the credentials service decode `Request`s (header first, as
//! their servers do); the daemon, the agent and the enclave's clients decode
//! `Response`s, and the daemon decodes the canonical audit records inside
//! an `AuditRecords` answer. Each decode must return a typed error, never
//! panic, and never claim to consume more than it was given; whatever
//! decodes must encode back to a message that decodes to itself; a request
//! that decodes has a header with the same `id` and `v` (what an error
//! answer echoes); an audit record that decodes is canonical (encodes back
//! to the very bytes read).
//!
//! Input: the frame body (CBOR) itself, so mutations are not spent on the
//! length prefix; the framed decoder then reads it behind a correct prefix
//! and behind the raw input taken as a prefix of its own.
#![no_main]

use keystore_shared::audit::AuditRecord;
use keystore_shared::frame::{DEFAULT_MAX_FRAME, decode_body, decode_frame, encode_frame};
use keystore_shared::protocol::{
    DEFAULT_MAX_LOAD_FRAME, DEFAULT_MAX_RESPONSE_FRAME, Request, RequestHeader, Response,
    ResponseBody,
};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Encodes `msg` and decodes it again: the same message comes back.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(msg: &T) {
    let frame = encode_frame(msg, DEFAULT_MAX_LOAD_FRAME).expect("a decoded message encodes");
    let (back, used) = decode_frame::<T>(&frame, DEFAULT_MAX_LOAD_FRAME)
        .expect("an encoded message decodes")
        .expect("an encoded frame is whole");
    assert_eq!(used, frame.len());
    assert_eq!(&back, msg);
}

/// The framed decoder over `buf`, at the limits the servers use.
fn framed<T: DeserializeOwned>(buf: &[u8], max: usize) -> Option<T> {
    match decode_frame::<T>(buf, max) {
        Ok(Some((msg, used))) => {
            assert!(used <= buf.len());
            Some(msg)
        }
        Ok(None) | Err(_) => None,
    }
}

fuzz_target!(|body: &[u8]| {
    // The server's two-step decode: header first, then the typed request.
    let header = decode_body::<RequestHeader>(body);
    if let Ok(request) = decode_body::<Request>(body) {
        let header = header.expect("a request's header decodes");
        assert_eq!(header.id, Some(request.id));
        assert_eq!(header.v, Some(request.v));
        assert!(header.has_op());
        let _ = request.check_version();
        let _ = (request.op.kind(), request.op.answer_kind());
        round_trip(&request);
    }
    if let Ok(response) = decode_body::<Response>(body) {
        let _ = response.check_version();
        let _ = response.result.kind();
        if let ResponseBody::AuditRecords(batch) = &response.result {
            for entry in &batch.entries {
                if let Ok(record) = AuditRecord::decode(&entry.record) {
                    assert_eq!(
                        record.canonical_bytes().as_deref(),
                        Ok(entry.record.as_slice()),
                        "an audit record has one encoding"
                    );
                }
            }
        }
        round_trip(&response);
    }

    // The same body behind a correct length prefix, then the raw input
    // read as a frame (prefix and all).
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    frame.extend_from_slice(body);
    for buf in [frame.as_slice(), body] {
        let _ = framed::<RequestHeader>(buf, DEFAULT_MAX_FRAME);
        let _ = framed::<Request>(buf, DEFAULT_MAX_LOAD_FRAME);
        let _ = framed::<Response>(buf, DEFAULT_MAX_RESPONSE_FRAME);
    }
});
