//! The daemon's `/metrics` (issue 16): an agent forwarding to a real
//! in-process secret server with access rules, the metrics endpoint and the
//! `Status` relay running as the daemon runs them; traffic is driven (root
//! reads, a missing name, a read `nobody` is denied) and the exposition is
//! scraped with curl and parsed, every line, by the Python
//! `prometheus_client` parser (installed from PyPI into a cached venv).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keystore_host::metrics::Metrics;
use keystore_shared::{Client, Endpoint, ErrorCode};
use tokio::sync::oneshot;

use crate::agent::{curl, get_as_nobody, open_dir, real_enclave_with_rules, start_agent_with};
use crate::support::peer::{cache_dir, install_venv};

/// The `prometheus_client` release the parser comes from.
const PROMETHEUS_CLIENT_VERSION: &str = "0.21.1";

/// The venv with `prometheus_client`, created once under a lock.
fn parser_venv() -> PathBuf {
    let venv = cache_dir().join(format!(
        "prometheus-client-venv-{PROMETHEUS_CLIENT_VERSION}"
    ));
    let script = format!(
        r#"set -e
if [ -x "$1/bin/python" ] && "$1/bin/python" -c 'import prometheus_client.parser' 2>/dev/null; then exit 0; fi
rm -rf "$1"
python3 -m venv "$1"
"$1/bin/pip" install --disable-pip-version-check -q 'prometheus_client=={PROMETHEUS_CLIENT_VERSION}'
"$1/bin/python" -c 'import prometheus_client.parser'
"#
    );
    install_venv(
        "prometheus-client-venv.lock",
        &venv,
        &script,
        &format!("prometheus_client=={PROMETHEUS_CLIENT_VERSION}"),
    );
    venv
}

/// Parses an exposition with `prometheus_client.parser` (every line; a
/// line it cannot parse fails the test) into `sample name{labels}` → value.
pub(crate) fn parse(text: &str) -> HashMap<String, f64> {
    let script = "import sys, json\n\
                  from prometheus_client.parser import text_string_to_metric_families\n\
                  out = {}\n\
                  for family in text_string_to_metric_families(sys.stdin.read()):\n    \
                  for s in family.samples:\n        \
                  labels = ','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))\n        \
                  out[f'{s.name}{{{labels}}}'] = s.value\n\
                  print(json.dumps(out))\n";
    let mut child = Command::new(parser_venv().join("bin/python"))
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `GET url` with curl, blocking: (status, body).
pub(crate) fn scrape(url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            url,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.parse().unwrap(), body.to_owned())
}

/// The value of `sample` (as `name{k=v,...}`), 0 when absent.
fn value(samples: &HashMap<String, f64>, sample: &str) -> f64 {
    samples.get(sample).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_metrics_parse_and_move_with_agent_traffic() {
    let dir = open_dir();
    let rules = r#"{"rules":[
        {"who":{"uid":65534},"read":["db/*"]},
        {"who":{"uid":0},"read":["*"]}]}"#;
    let (enclave, _stop_enclave) = real_enclave_with_rules(dir.path(), Some(rules)).await;
    let metrics = Arc::new(Metrics::new());
    let counting = metrics.clone();
    let agent = start_agent_with(dir.path(), enclave.clone(), "daemon", move |config| {
        config.pool.metrics = Some(counting);
    })
    .await;
    let listener = Endpoint::tcp("127.0.0.1", 0).bind().await.unwrap();
    let url = format!(
        "{}/metrics",
        listener
            .local_endpoint()
            .to_string()
            .replace("tcp://", "http://")
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let stopped = async move {
        let _ = stopped.await;
    };
    let (stop_poll, poll_stopped) = oneshot::channel::<()>();
    tokio::spawn(metrics.clone().serve(listener, stopped));
    tokio::spawn(
        metrics
            .clone()
            .poll_status(enclave, Duration::from_secs(1), async move {
                let _ = poll_stopped.await;
            }),
    );

    // Before any traffic: everything parses, no agent request is counted.
    let (status, text) = curl(&url, &[]).await;
    assert_eq!(status, 200, "{text}");
    let before = parse(&text);
    assert_eq!(
        value(&before, "keystore_agent_requests_total{op=get,outcome=ok}"),
        0.0
    );

    // Root reads twice and asks for a missing name; nobody is denied once.
    let mut client = Client::connect(&Endpoint::unix(&agent.socket))
        .await
        .unwrap();
    for _ in 0..2 {
        assert_eq!(
            client.get("db/password").await.unwrap().expose(),
            b"hunter2"
        );
    }
    let missing = client.get("db/missing").await.unwrap_err();
    assert_eq!(missing.code(), Some(ErrorCode::NotFound), "{missing}");
    match get_as_nobody(&agent.socket, "app/binary").await {
        keystore_shared::protocol::ResponseBody::Error { code, .. } => {
            assert_eq!(code, ErrorCode::Denied);
        }
        other => panic!("nobody read app/binary: {other:?}"),
    }

    // The relayed Status arrives within a few polls.
    let deadline = Instant::now() + Duration::from_secs(60);
    let samples = loop {
        let (status, text) = curl(&url, &[]).await;
        assert_eq!(status, 200, "{text}");
        let samples = parse(&text);
        if value(&samples, "keystore_enclave_up{}") == 1.0 {
            break samples;
        }
        assert!(Instant::now() < deadline, "no Status relayed:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        value(&samples, "keystore_agent_requests_total{op=get,outcome=ok}"),
        2.0
    );
    assert_eq!(
        value(
            &samples,
            "keystore_agent_requests_total{op=get,outcome=not_found}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "keystore_agent_requests_total{op=get,outcome=denied}"
        ),
        1.0
    );
    assert_eq!(
        value(&samples, "keystore_agent_denials_total{uid=65534}"),
        1.0
    );
    assert_eq!(
        value(&samples, "keystore_agent_denials_total{uid=0}"),
        0.0,
        "root was never denied"
    );
    assert_eq!(
        value(
            &samples,
            "keystore_agent_request_duration_seconds_count{op=get}"
        ),
        4.0
    );
    assert_eq!(value(&samples, "keystore_enclave_ready{}"), 1.0);
    // The two secrets (the rules entry is not counted).
    assert_eq!(value(&samples, "keystore_enclave_secrets_loaded{}"), 2.0);
    assert!(value(&samples, "keystore_enclave_status_polls_total{outcome=ok}") >= 1.0);
    // No label carries a secret's name.
    let (_, text) = curl(&url, &[]).await;
    for name in ["db/password", "db/missing", "app/binary"] {
        assert!(!text.contains(name), "{name} in the exposition:\n{text}");
    }

    // Other paths are 404.
    let other = url.replace("/metrics", "/secrets");
    assert_eq!(curl(&other, &[]).await.0, 404);

    let _ = stop.send(());
    let _ = stop_poll.send(());
}
