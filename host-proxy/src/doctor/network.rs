//! Check 2: the daemon and the enclave's road to KMS. The daemon is up
//! (its `/health` answers beside `/metrics`), its forwarder allowlist holds
//! the KMS endpoint, the KMS host resolves from the parent, and a TLS
//! handshake with it succeeds, verified as the enclave verifies it (TLS to
//! KMS ends in the enclave; this is the same handshake from outside).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use keystore_shared::Endpoint;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use zeroize::Zeroizing;

use super::{Config, Finding};
use crate::proxy::forwarder::Upstream;

/// The daemon check's name.
pub const DAEMON: &str = "daemon";
/// The allowlist check's name.
pub const ALLOWLIST: &str = "allowlist";
/// The DNS check's name.
pub const DNS: &str = "dns";
/// The TLS check's name.
pub const TLS: &str = "tls";
/// The daemon's health route, beside `/metrics`.
pub const HEALTH_PATH: &str = "/health";
/// Largest HTTP body the doctor reads (health, IMDS answers).
pub(crate) const MAX_BODY: usize = 64 * 1024;
/// Resolved addresses tried at most.
const MAX_ADDRS: usize = 8;

/// What the daemon says about its configuration at `/health` (JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonInfo {
    /// The daemon's version.
    #[serde(default)]
    pub version: String,
    /// Its `--region`, if given.
    #[serde(default)]
    pub region: Option<String>,
    /// Its forwarder allowlist: `LISTEN=HOST:PORT` routes.
    #[serde(default)]
    pub forwards: Vec<ForwardInfo>,
    /// The audit log the drain writes; `None` with `--no-audit-log`.
    #[serde(default)]
    pub audit_log: Option<String>,
    /// Where it loads secrets (the enclave's load port).
    #[serde(default)]
    pub load_to: String,
    /// Whether it has a secrets file to load.
    #[serde(default)]
    pub loads_secrets: bool,
}

/// One forwarder route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardInfo {
    /// Where the enclave connects.
    pub listen: String,
    /// Where the bytes go, `HOST:PORT`.
    pub upstream: String,
}

/// An HTTP/1.1 exchange on `stream`: the status and at most [`MAX_BODY`]
/// bytes of body (zeroed when dropped: IMDS answers hold keys).
pub(crate) async fn http_call<S>(
    stream: S,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, Zeroizing<Vec<u8>>), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok((status, Zeroizing::new(body.to_vec())))
    }
    .await;
    driver.abort();
    result
}

/// `GET path` on a host, with `Host` set and no body.
pub(crate) fn get(host: &str, path: &str) -> Result<Request<Full<Bytes>>, String> {
    Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(http::header::HOST, host)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())
}

/// Asks the daemon's `/health`.
pub async fn check_daemon(endpoint: &Endpoint, timeout: Duration) -> (Finding, Option<DaemonInfo>) {
    let down_hint = "start the daemon (systemctl status keystore-host-proxy; journalctl -u \
                     keystore-host-proxy) and check that it serves metrics here \
                     (--metrics-listen, default tcp://127.0.0.1:9273; not --no-metrics); \
                     --daemon names another endpoint";
    let asked = async {
        let stream = endpoint.connect().await.map_err(|e| e.to_string())?;
        http_call(stream, get("localhost", HEALTH_PATH)?).await
    };
    let (status, body) = match tokio::time::timeout(timeout, asked).await {
        Err(_) => {
            return (
                Finding::fail(
                    DAEMON,
                    format!(
                        "the daemon at {endpoint} did not answer within {} ms",
                        timeout.as_millis()
                    ),
                    down_hint,
                ),
                None,
            );
        }
        Ok(Err(err)) => {
            return (
                Finding::fail(
                    DAEMON,
                    format!("the daemon is down: nothing answers at {endpoint}: {err}"),
                    down_hint,
                ),
                None,
            );
        }
        Ok(Ok(answer)) => answer,
    };
    if status != StatusCode::OK {
        return (
            Finding::fail(
                DAEMON,
                format!(
                    "{endpoint}{HEALTH_PATH} answered HTTP {status}: not this daemon, or one too old to have {HEALTH_PATH}"
                ),
                "upgrade keystore-host on the parent, or point --daemon at its --metrics-listen",
            ),
            None,
        );
    }
    match serde_json::from_slice::<DaemonInfo>(&body) {
        Ok(info) => {
            let routes: Vec<String> = info
                .forwards
                .iter()
                .map(|f| format!("{}={}", f.listen, f.upstream))
                .collect();
            let saw = format!(
                "the daemon {} answers at {endpoint}: region {}, {} route(s) [{}], audit drain {}",
                info.version,
                info.region.as_deref().unwrap_or("unset"),
                routes.len(),
                routes.join(", "),
                if info.audit_log.is_some() {
                    "on"
                } else {
                    "off"
                }
            );
            (Finding::ok(DAEMON, saw), Some(info))
        }
        Err(err) => (
            Finding::fail(
                DAEMON,
                format!("{endpoint}{HEALTH_PATH} is not the daemon's health JSON: {err}"),
                "point --daemon at keystore-host proxy's --metrics-listen",
            ),
            None,
        ),
    }
}

/// Where the parent reaches KMS: `--kms-endpoint`, else the daemon's route
/// to its region's KMS (or its only route), else `kms.REGION.amazonaws.com:443`.
pub fn kms_endpoint(config: &Config, daemon: Option<&DaemonInfo>) -> Option<Upstream> {
    if let Some(spec) = &config.kms_endpoint {
        return spec.parse().ok();
    }
    let region = daemon
        .and_then(|d| d.region.clone())
        .or_else(|| config.region.clone());
    let regional = region.as_deref().and_then(|r| Upstream::kms(r).ok());
    if let Some(daemon) = daemon {
        let routes: Vec<Upstream> = daemon
            .forwards
            .iter()
            .filter_map(|f| f.upstream.parse().ok())
            .collect();
        if let Some(regional) = &regional
            && routes.iter().any(|u| same_upstream(u, regional))
        {
            return Some(regional.clone());
        }
        if let [only] = routes.as_slice() {
            return Some(only.clone());
        }
    }
    regional
}

fn same_upstream(a: &Upstream, b: &Upstream) -> bool {
    a.port == b.port && a.host.eq_ignore_ascii_case(&b.host)
}

/// The KMS endpoint is among the daemon's forwarder routes.
pub fn check_allowlist(daemon: Option<&DaemonInfo>, kms: Option<&Upstream>) -> Finding {
    let Some(daemon) = daemon else {
        return Finding::skip(
            ALLOWLIST,
            "skipped: the daemon did not answer (see `daemon`)",
        );
    };
    let Some(kms) = kms else {
        return Finding::fail(
            ALLOWLIST,
            "no KMS endpoint known: the daemon has no --region and no single route",
            "give the daemon --region, or doctor --kms-endpoint HOST:PORT",
        );
    };
    let upstreams: Vec<&str> = daemon
        .forwards
        .iter()
        .map(|f| f.upstream.as_str())
        .collect();
    let listed = daemon
        .forwards
        .iter()
        .filter_map(|f| f.upstream.parse::<Upstream>().ok())
        .any(|u| same_upstream(&u, kms));
    if listed {
        Finding::ok(
            ALLOWLIST,
            format!("the forwarder allowlist includes the KMS host {kms}"),
        )
    } else {
        Finding::fail(
            ALLOWLIST,
            format!(
                "the KMS host {kms} is not in the forwarder allowlist [{}]",
                upstreams.join(", ")
            ),
            format!(
                "add --forward vsock://ANY:800={kms} to the daemon's flags (or give it --region \
                 so its default route is the regional KMS); the enclave reaches KMS only \
                 through the allowlist"
            ),
        )
    }
}

/// The KMS host resolves; the addresses for the TLS check.
pub async fn check_dns(kms: Option<&Upstream>, timeout: Duration) -> (Finding, Vec<SocketAddr>) {
    let Some(kms) = kms else {
        return (
            Finding::skip(
                DNS,
                "skipped: no KMS endpoint known (the daemon did not say; give --region or \
                 --kms-endpoint)",
            ),
            Vec::new(),
        );
    };
    let hint = format!(
        "check the parent's resolver (/etc/resolv.conf, the VPC's enableDnsSupport and \
         enableDnsHostnames); with a KMS VPC endpoint whose private DNS is off, forward to the \
         endpoint's own DNS name (vpce-....kms.REGION.vpce.amazonaws.com) instead of {}",
        kms.host
    );
    let lookup = tokio::net::lookup_host((kms.host.as_str(), kms.port));
    match tokio::time::timeout(timeout, lookup).await {
        Err(_) => (
            Finding::fail(
                DNS,
                format!(
                    "resolving {} did not finish within {} ms",
                    kms.host,
                    timeout.as_millis()
                ),
                hint,
            ),
            Vec::new(),
        ),
        Ok(Err(err)) => (
            Finding::fail(DNS, format!("{} does not resolve: {err}", kms.host), hint),
            Vec::new(),
        ),
        Ok(Ok(addrs)) => {
            let addrs: Vec<SocketAddr> = addrs.take(MAX_ADDRS).collect();
            if addrs.is_empty() {
                return (
                    Finding::fail(DNS, format!("{} resolves to no address", kms.host), hint),
                    addrs,
                );
            }
            let shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
            (
                Finding::ok(
                    DNS,
                    format!("{} resolves to {}", kms.host, shown.join(", ")),
                ),
                addrs,
            )
        }
    }
}

/// The roots the TLS check trusts: `--ca-bundle`, else the ones the
/// enclave trusts (the Mozilla roots it is built with). The parent's own
/// store is not used: a TLS-inspecting proxy the parent trusts would pass
/// here and still fail in the enclave.
pub(crate) fn tls_roots(ca_pem: Option<&[u8]>) -> Result<RootCertStore, String> {
    let Some(pem) = ca_pem else {
        return Ok(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        });
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem).take(256) {
        let cert = cert.map_err(|e| format!("--ca-bundle is not valid PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("--ca-bundle certificate refused: {e}"))?;
    }
    if roots.is_empty() {
        return Err("--ca-bundle holds no PEM certificate".to_owned());
    }
    Ok(roots)
}

/// A TLS handshake with KMS (nothing is sent after it).
pub async fn check_tls(config: &Config, kms: Option<&Upstream>, addrs: &[SocketAddr]) -> Finding {
    let Some(kms) = kms else {
        return Finding::skip(TLS, "skipped: no KMS endpoint known (see `dns`)");
    };
    if addrs.is_empty() {
        return Finding::skip(
            TLS,
            format!("skipped: {} did not resolve (see `dns`)", kms.host),
        );
    }
    let name = config.kms_host.clone().unwrap_or_else(|| kms.host.clone());
    let roots = match tls_roots(config.ca_pem.as_deref()) {
        Ok(roots) => roots,
        Err(err) => {
            return Finding::fail(TLS, err, "give --ca-bundle a PEM file of CA certificates");
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = match ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(builder) => builder.with_root_certificates(roots).with_no_client_auth(),
        Err(err) => return Finding::fail(TLS, format!("TLS set-up: {err}"), "a bug: report it"),
    };
    let server_name = match ServerName::try_from(name.clone()) {
        Ok(server_name) => server_name,
        Err(err) => {
            return Finding::fail(
                TLS,
                format!("{name:?} is not a TLS server name: {err}"),
                "--kms-host names the host KMS's certificate is for",
            );
        }
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let mut last_error = String::new();
    for addr in addrs {
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| (false, e))?;
            connector
                .connect(server_name.clone(), tcp)
                .await
                .map_err(|e| (true, e))
        };
        match tokio::time::timeout(config.timeout, attempt).await {
            Ok(Ok(_stream)) => {
                return Finding::ok(
                    TLS,
                    format!(
                        "TLS handshake with {name} at {addr} succeeded (certificate valid for {name})"
                    ),
                );
            }
            Ok(Err((true, err))) => return tls_failure(&name, *addr, &err),
            Ok(Err((false, err))) => last_error = format!("connecting to {addr}: {err}"),
            Err(_) => {
                last_error = format!(
                    "connecting to {addr} or its handshake took over {} ms",
                    config.timeout.as_millis()
                );
            }
        }
    }
    Finding::fail(
        TLS,
        format!("cannot reach KMS at {kms} from the parent: {last_error}"),
        "check the security groups / network ACLs / route to KMS (a VPC endpoint's security \
         group must allow 443 from this instance), or an HTTPS proxy requirement",
    )
}

fn tls_failure(name: &str, addr: SocketAddr, err: &std::io::Error) -> Finding {
    let rustls_error = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => Finding::fail(
            TLS,
            format!("the certificate at {addr} is not valid for {name}"),
            format!(
                "behind a KMS VPC endpoint, enable its private DNS so {name} resolves to the \
                 endpoint (its certificate names kms.REGION.amazonaws.com), or forward to and \
                 give --kms-host the endpoint's own DNS name; the enclave checks the same name"
            ),
        ),
        Some(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        )) => Finding::fail(
            TLS,
            format!("the certificate at {addr} is signed by an untrusted CA (unknown issuer)"),
            "something between the parent and KMS presents its own certificate (a TLS-inspecting \
             proxy or firewall?); the enclave trusts only public roots, so exempt KMS from \
             inspection (a test CA goes in --ca-bundle)",
        ),
        Some(rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => Finding::fail(
            TLS,
            format!("the certificate at {addr} has expired"),
            "check the instance clock (chronyc tracking) and what answers for KMS",
        ),
        _ => Finding::fail(
            TLS,
            format!("TLS handshake with {name} at {addr} failed: {err}"),
            "check that this is KMS (HTTPS on 443) and the instance clock",
        ),
    }
}
