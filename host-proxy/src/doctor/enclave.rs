//! Check 1: the enclave's secret port answers `Status` to a privileged
//! peer. Each way this fails has its own cause: nothing listening, no
//! enclave with that CID, a port that speaks another protocol, or a caller
//! the enclave refuses because it is not privileged.

use std::io;
use std::time::Duration;

use keystore_shared::endpoint::EndpointError;
use keystore_shared::{Client, ClientConfig, ClientError, Endpoint, ErrorCode, StatusReport};

use super::Finding;

/// This check's name.
pub const CHECK: &str = "enclave";

/// The hint for a refused, unprivileged caller.
pub const RUN_AS_ROOT: &str = "run as root: the enclave serves only privileged peers \
     (sudo keystore-host doctor; the agent is how other users read)";

/// A privileged connection to `endpoint`, bounded by `timeout`.
pub(crate) async fn connect(endpoint: &Endpoint, timeout: Duration) -> Result<Client, ClientError> {
    let config = ClientConfig {
        connect_timeout: timeout,
        request_timeout: timeout,
        privileged: true,
        ..ClientConfig::default()
    };
    Client::connect_with(endpoint, config).await
}

/// Asks the enclave's `Status`; the report when it answered.
pub async fn check(endpoint: &Endpoint, timeout: Duration) -> (Finding, Option<StatusReport>) {
    let asked = async {
        let mut client = connect(endpoint, timeout).await?;
        client.status().await
    };
    let answer = match tokio::time::timeout(timeout * 2, asked).await {
        Ok(answer) => answer,
        Err(_) => Err(ClientError::ConnectTimeout {
            endpoint: endpoint.clone(),
            after: timeout * 2,
        }),
    };
    match answer {
        Ok(status) => {
            let saw = format!(
                "{endpoint} answered Status: version {}, {}, {} secret(s), secret port serves {} peers",
                if status.version.is_empty() {
                    "unknown"
                } else {
                    &status.version
                },
                if status.ready { "ready" } else { "not ready" },
                status.secret_count,
                status.secret_peers.as_deref().unwrap_or("unknown"),
            );
            (Finding::ok(CHECK, saw), Some(status))
        }
        Err(err) => (diagnose(endpoint, &err), None),
    }
}

/// The cause and hint for a failed `Status`.
pub fn diagnose(endpoint: &Endpoint, err: &ClientError) -> Finding {
    let describe = "nitro-cli describe-enclaves shows the running enclave's EnclaveCID and State; \
                    --enclave vsock://CID:5000 names its secret port";
    match err {
        ClientError::Server {
            code: ErrorCode::Denied,
            message,
            ..
        } => Finding::fail(
            CHECK,
            format!("{endpoint} refused this caller as unprivileged: {message}"),
            RUN_AS_ROOT,
        ),
        ClientError::Connect(EndpointError::Connect { source, .. }) => {
            connect_failure(endpoint, source, describe)
        }
        ClientError::Connect(other) => Finding::fail(
            CHECK,
            format!("cannot connect to {endpoint}: {other}"),
            describe,
        ),
        ClientError::ConnectTimeout { after, .. } => {
            let saw = match endpoint {
                Endpoint::Vsock { cid, .. } => format!(
                    "no answer from {endpoint} within {} ms: no enclave with CID {cid} is running",
                    after.as_millis()
                ),
                _ => format!("no answer from {endpoint} within {} ms", after.as_millis()),
            };
            Finding::fail(CHECK, saw, describe)
        }
        ClientError::Timeout { after, .. } => Finding::fail(
            CHECK,
            format!(
                "{endpoint} accepted the connection but did not answer Status within {} ms",
                after.as_millis()
            ),
            "the enclave may be overloaded or stuck: check its console (nitro-cli console, debug \
             mode only) or restart it; --timeout allows longer",
        ),
        ClientError::Server { code, message, .. } => Finding::fail(
            CHECK,
            format!("{endpoint} answered Status with {code}: {message}"),
            "see the enclave's last error in `keystore-host status --enclave ...`",
        ),
        other => Finding::fail(
            CHECK,
            format!("{endpoint} does not speak the keystore protocol: {other}"),
            "wrong port? --enclave must name the enclave's secret port (vsock://CID:5000 by \
             default; 5001 is its load port) and nothing else may listen there",
        ),
    }
}

fn connect_failure(endpoint: &Endpoint, source: &io::Error, describe: &str) -> Finding {
    // ENODEV, EHOSTUNREACH, ENETUNREACH, ETIMEDOUT: vsock's ways of saying
    // there is no such CID.
    let no_such_cid = matches!(source.raw_os_error(), Some(19 | 113 | 101 | 110));
    match (endpoint, source.kind()) {
        (_, io::ErrorKind::PermissionDenied) => Finding::fail(
            CHECK,
            format!(
                "cannot connect to {endpoint} as a privileged peer: {source} (a privileged \
                 source port or socket access needs root)"
            ),
            RUN_AS_ROOT,
        ),
        (Endpoint::Vsock { cid, .. }, _) if no_such_cid => Finding::fail(
            CHECK,
            format!("no enclave with CID {cid}: connecting to {endpoint} failed: {source}"),
            describe,
        ),
        (Endpoint::Vsock { .. }, _) if source.raw_os_error() == Some(97) => Finding::fail(
            CHECK,
            format!("this machine has no vsock: {source}"),
            "run doctor on the enclave's parent instance (the vsock driver loads with \
             nitro-enclaves-allocator), or give --enclave tcp://... / unix://...",
        ),
        (_, io::ErrorKind::ConnectionRefused) => Finding::fail(
            CHECK,
            format!("connection refused: nothing listens on {endpoint} (is the enclave down?)"),
            format!(
                "start the enclave (nitro-cli run-enclave, or scripts/run-enclave.sh) and check \
                 its port; {describe}"
            ),
        ),
        (Endpoint::Unix { path }, io::ErrorKind::NotFound) => Finding::fail(
            CHECK,
            format!(
                "no socket at {}: nothing listens there (is the enclave down?)",
                path.display()
            ),
            "start the enclave or give --enclave its secret port's socket",
        ),
        _ => Finding::fail(
            CHECK,
            format!("cannot connect to {endpoint}: {source}"),
            describe,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Outcome;

    fn connect_error(endpoint: &str, errno: i32) -> (Endpoint, ClientError) {
        let endpoint: Endpoint = endpoint.parse().unwrap();
        let err = ClientError::Connect(EndpointError::Connect {
            endpoint: endpoint.clone(),
            source: io::Error::from_raw_os_error(errno),
        });
        (endpoint, err)
    }

    #[test]
    fn a_wrong_cid_is_named() {
        // ENODEV: vsock's answer for a CID no enclave has.
        let (endpoint, err) = connect_error("vsock://99:5000", 19);
        let finding = diagnose(&endpoint, &err);
        assert_eq!(finding.status, Outcome::Fail);
        assert!(
            finding.saw.starts_with("no enclave with CID 99"),
            "{finding:?}"
        );
        assert!(
            finding
                .hint
                .unwrap()
                .contains("nitro-cli describe-enclaves shows")
        );
        let timeout = ClientError::ConnectTimeout {
            endpoint: endpoint.clone(),
            after: Duration::from_secs(2),
        };
        assert!(
            diagnose(&endpoint, &timeout)
                .saw
                .contains("no enclave with CID 99 is running")
        );
    }

    #[test]
    fn refusals_say_run_as_root() {
        let endpoint: Endpoint = "unix:///run/enclave.sock".parse().unwrap();
        let denied = ClientError::Server {
            op: "status",
            code: ErrorCode::Denied,
            message: "connection refused: unix peer uid 1000 is not root".into(),
        };
        let finding = diagnose(&endpoint, &denied);
        assert!(finding.saw.contains("refused this caller as unprivileged"));
        assert_eq!(finding.hint.as_deref(), Some(RUN_AS_ROOT));
        // EACCES on the socket: the same cause.
        let (endpoint, err) = connect_error("unix:///run/enclave.sock", 13);
        assert_eq!(diagnose(&endpoint, &err).hint.as_deref(), Some(RUN_AS_ROOT));
        // ECONNREFUSED: nothing listens.
        let (endpoint, err) = connect_error("tcp://127.0.0.1:5000", 111);
        assert!(
            diagnose(&endpoint, &err)
                .saw
                .starts_with("connection refused: nothing listens")
        );
    }
}
