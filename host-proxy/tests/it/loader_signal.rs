//! SIGHUP reaches the loader through the proxy's signal wiring. Its own
//! test binary, since it signals the whole test process.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keystore_host::proxy::credentials::{CredentialCache, ServiceLimits};
use keystore_host::proxy::forwarder::ForwarderLimits;
use keystore_host::proxy::{Proxy, ProxyConfig};
use keystore_shared::endpoint::Endpoint;
use keystore_shared::envelope::Envelope;
use keystore_shared::frame::{Connection, FrameLimits};
use keystore_shared::protocol::{DEFAULT_MAX_LOAD_FRAME, Request, Response, ResponseBody};

#[tokio::test]
async fn sighup_reloads_and_sigterm_stops() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".env");
    let env = Envelope::kms(vec![1; 32]).unwrap().to_string();
    std::fs::write(&path, format!("S={env}\n")).unwrap();

    let listener = Endpoint::tcp("127.0.0.1", 0).bind().await.unwrap();
    let enclave = listener.local_endpoint().clone();
    let loads = Arc::new(Mutex::new(0usize));
    let counter = loads.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut conn = Connection::with_limits(
                    stream,
                    FrameLimits::new(DEFAULT_MAX_LOAD_FRAME, 64 * 1024),
                );
                while let Ok(Some(request)) = conn.read_message::<Request>().await {
                    *counter.lock().unwrap() += 1;
                    let reply = Response::new(request.id, ResponseBody::Loaded { count: 1 });
                    let _ = conn.write_message(&reply).await;
                }
            });
        }
    });

    let config = ProxyConfig {
        forwards: vec![],
        forwarder_limits: ForwarderLimits::default(),
        credentials_listen: Endpoint::tcp("127.0.0.1", 0),
        credentials_limits: ServiceLimits::default(),
        load_to: enclave,
        secrets: Some(path.into()),
        secrets_poll: Duration::from_secs(2),
        load_retry_max: keystore_host::proxy::loader::LOAD_RETRY_MAX,
        enclave_check: keystore_host::proxy::loader::ENCLAVE_CHECK_INTERVAL,
        enclave_cid: keystore_host::proxy::DEFAULT_ENCLAVE_CID,
    };
    let creds = aws_credential_types::Credentials::new("AKID", "SECRET", None, None, "test");
    let proxy = Proxy::bind(config, CredentialCache::new(creds))
        .await
        .unwrap();
    proxy.install_signal_handlers().unwrap();
    let running = tokio::spawn(proxy.run());

    let wait_for = |n: usize| {
        let loads = loads.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(20), async {
                while *loads.lock().unwrap() < n {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("expected {n} loads"));
        }
    };
    wait_for(1).await;
    let kill = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    kill("-HUP");
    wait_for(2).await;

    kill("-TERM");
    tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("proxy stops on SIGTERM")
        .unwrap()
        .unwrap();
}
