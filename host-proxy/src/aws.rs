//! How the host reaches AWS: one HTTPS client (hyper on rustls with ring)
//! and the SDK configuration built on it.
//!
//! The SDK's default client would pull in a second crypto library
//! (aws-lc); ring is already in the build. The trust store is the system's
//! roots, plus, for the KMS emulator only, one extra CA given by the
//! operator.

use aws_config::{BehaviorVersion, SdkConfig};
use aws_smithy_http_client::tls::rustls_provider::CryptoMode;
use aws_smithy_http_client::tls::{Provider, TlsContext, TrustStore};
use aws_smithy_runtime_api::client::http::SharedHttpClient;

/// Errors building the AWS client.
#[derive(Debug, thiserror::Error)]
pub enum AwsSetupError {
    /// The extra CA bundle is unusable.
    #[error("invalid CA bundle: {0}")]
    CaBundle(String),
}

/// An HTTPS client trusting the system roots and, if given, the PEM
/// certificates in `extra_ca_pem`.
pub fn https_client(extra_ca_pem: Option<Vec<u8>>) -> Result<SharedHttpClient, AwsSetupError> {
    let mut trust = TrustStore::default();
    if let Some(pem) = extra_ca_pem {
        if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
            return Err(AwsSetupError::CaBundle(
                "no PEM certificate found".to_owned(),
            ));
        }
        trust = trust.with_pem_certificate(pem);
    }
    let tls = TlsContext::builder()
        .with_trust_store(trust)
        .build()
        .map_err(|e| AwsSetupError::CaBundle(e.to_string()))?;
    Ok(aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .tls_context(tls)
        .build_https())
}

/// The SDK configuration: the standard credential chain (environment,
/// profile, web identity, ECS, IMDSv2) and region chain, over
/// [`https_client`], with optional region and endpoint overrides.
pub async fn sdk_config(
    region: Option<String>,
    endpoint_url: Option<String>,
    extra_ca_pem: Option<Vec<u8>>,
) -> Result<SdkConfig, AwsSetupError> {
    let mut loader =
        aws_config::defaults(BehaviorVersion::latest()).http_client(https_client(extra_ca_pem)?);
    if let Some(region) = region {
        loader = loader.region(aws_config::Region::new(region));
    }
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    Ok(loader.load().await)
}

/// The S3 client of `proxy --secrets s3://...`: the standard chain (the
/// instance role on EC2) like [`sdk_config`]. With an endpoint override
/// (an S3-compatible or test server) addressing is path-style, since such
/// servers rarely resolve `BUCKET.host` names.
pub async fn s3_client(
    region: Option<String>,
    endpoint_url: Option<String>,
    extra_ca_pem: Option<Vec<u8>>,
) -> Result<aws_sdk_s3::Client, AwsSetupError> {
    let path_style = endpoint_url.is_some();
    let sdk = sdk_config(region, endpoint_url, extra_ca_pem).await?;
    let config = aws_sdk_s3::config::Builder::from(&sdk)
        .force_path_style(path_style)
        .build();
    Ok(aws_sdk_s3::Client::from_conf(config))
}
