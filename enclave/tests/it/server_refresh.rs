//! The recipient key rotates underneath a busy client: with a 500 ms
//! refresh interval, a client looping on `Get` and `Attest` must see no
//! failure, and the public key in the attested documents must change.

// Helpers outside `#[test]` functions aren't covered by clippy.toml's
// allow-unwrap-in-tests; a panic is the right failure in test code.
#![allow(clippy::unwrap_used)]

use crate::support::server as server_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use server_support::{Harness, Options, Transport};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_keep_succeeding_across_recipient_refreshes() {
    let harness = Harness::start(Options {
        transport: Transport::Unix,
        refresh_after: Duration::from_millis(500),
        ..Options::default()
    })
    .await;
    let verifier = harness.verifier();
    let mut client = harness.client().await;

    let started = Instant::now();
    let mut keys = BTreeSet::new();
    let mut requests = 0u64;
    // At least a few seconds of traffic; longer only if this slow shared
    // machine has not finished a second key by then.
    while started.elapsed() < Duration::from_secs(3)
        || (keys.len() < 2 && started.elapsed() < Duration::from_secs(90))
    {
        let value = client.get("db/password").await.unwrap();
        assert_eq!(value.expose(), b"hunter2");
        let nonce = requests.to_be_bytes();
        let document = client.attest(&nonce, None).await.unwrap();
        let verified = verifier
            .clone()
            .expect_nonce(nonce)
            .verify(&document)
            .unwrap();
        keys.insert(verified.public_key.expect("document without public_key"));
        requests += 2;
    }
    assert!(
        keys.len() >= 2,
        "the attested public key never changed over {requests} requests"
    );
    let status = client.status().await.unwrap();
    assert!(status.refresh_count >= 1, "{status:?}");
    assert_eq!(status.last_error, None);
    harness.stop().await.unwrap();
}
