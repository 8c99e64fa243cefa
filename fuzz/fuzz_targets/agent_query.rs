//! What the agent's HTTP front reads from a request: the query string of
//! `GET /secretsmanager/get?secretId=..`, the path and query of
//! `GET /v1/NAME?..`, and the JSON body of `POST /` `GetSecretValue`. Any
//! local process can send them, so every byte is hostile: parsing must
//! return an error, never panic; a query that parses, written back fully
//! percent-encoded, parses to the same request.
//!
//! Input: the request target after the route (`NAME?query` or `query`)
//! and, for the JSON reader, the same bytes as a body.
//!
//! The parsers are compiled from keystore-host's own source file (not the
//! crate, which would link the AWS SDK into this build).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../host-proxy/src/agent/query.rs"]
mod query;

use query::{Query, parse_json, parse_path, parse_query};

/// Every byte as `%XX`: the most escaped form of `text`.
fn encode(text: &str) -> String {
    text.bytes().map(|b| format!("%{b:02X}")).collect()
}

/// The request written back as a query string (`secretId` included when
/// `with_id`).
fn encode_params(q: &Query, with_id: bool) -> String {
    let mut pairs = Vec::new();
    if with_id {
        pairs.push(format!("secretId={}", encode(&q.secret_id)));
    }
    if let Some(v) = &q.version_id {
        pairs.push(format!("versionId={}", encode(v)));
    }
    if let Some(v) = &q.version_stage {
        pairs.push(format!("versionStage={}", encode(v)));
    }
    pairs.join("&")
}

fuzz_target!(|data: &[u8]| {
    let _ = parse_json(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(q) = parse_query(text) {
        assert!(!q.secret_id.is_empty());
        assert_eq!(parse_query(&encode_params(&q, true)), Ok(q));
    }
    let (rest, query) = text.split_once('?').unwrap_or((text, ""));
    if let Ok(q) = parse_path(rest, query) {
        assert!(!q.secret_id.is_empty());
        let again = parse_path(&encode(&q.secret_id), &encode_params(&q, false));
        assert_eq!(again, Ok(q));
    }
});
