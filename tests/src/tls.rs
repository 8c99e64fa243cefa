//! The test PKI that lets clients trust the KMS emulator over HTTPS: a CA
//! and a server certificate for `localhost` and `127.0.0.1`, written as PEM
//! into a directory, and the rustls server configuration (ring provider)
//! that serves them.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// File name of the CA certificate that clients should trust.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key (written so tests can issue more certificates).
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// File name of the server certificate followed by the CA certificate.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// File name of the server private key.
pub const SERVER_KEY_FILE: &str = "server-key.pem";

/// Names the server certificate is valid for.
pub const SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// Why the test PKI could not be created or loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing a PEM file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Generating or parsing a certificate or key failed.
    #[error("certificate generation: {0}")]
    Certificate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A CA and a server certificate signed by it, on disk as PEM.
#[derive(Debug)]
pub struct TestPki {
    dir: PathBuf,
    server_chain: Vec<CertificateDer<'static>>,
    server_key_der: Vec<u8>,
}

impl TestPki {
    /// Creates `dir` if needed and writes a fresh CA (`ca.pem`,
    /// `ca-key.pem`) and a server certificate for [`SERVER_NAMES`] signed by
    /// it (`server.pem`, `server-key.pem`), replacing earlier ones.
    ///
    /// # Errors
    /// [`TlsError`] if a file cannot be read or written or a certificate
    /// cannot be generated.
    pub fn create(dir: impl AsRef<Path>) -> Result<Self, TlsError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|source| TlsError::Io {
            path: dir.clone(),
            source,
        })?;
        let ca_cert_path = dir.join(CA_CERT_FILE);
        let ca_key_path = dir.join(CA_KEY_FILE);

        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(DnType::CommonName, "nitro-keystore mock-kms test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate()?;
        let ca_cert = params.self_signed(&ca_key)?;
        let ca_pem = ca_cert.pem();
        write(&ca_key_path, ca_key.serialize_pem().as_bytes(), true)?;
        write(&ca_cert_path, ca_pem.as_bytes(), false)?;
        let issuer = Issuer::new(params, ca_key);

        let mut params = CertificateParams::new(
            SERVER_NAMES
                .iter()
                .map(|n| (*n).to_owned())
                .collect::<Vec<_>>(),
        )?;
        params
            .distinguished_name
            .push(DnType::CommonName, "nitro-keystore mock-kms");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let server_key = KeyPair::generate()?;
        let server_cert = params.signed_by(&server_key, &issuer)?;

        let chain_pem = format!("{}{}", server_cert.pem(), ca_pem);
        write(
            &dir.join(SERVER_KEY_FILE),
            server_key.serialize_pem().as_bytes(),
            true,
        )?;
        write(&dir.join(SERVER_CERT_FILE), chain_pem.as_bytes(), false)?;

        Ok(Self {
            dir,
            server_chain: vec![server_cert.der().clone(), ca_cert.der().clone()],
            server_key_der: server_key.serialize_der(),
        })
    }

    /// The directory holding the PEM files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the CA certificate (PEM) that clients should trust.
    pub fn ca_pem_path(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }

    /// A rustls server configuration (ring provider, TLS 1.2 and 1.3, ALPN
    /// `http/1.1`) presenting the server certificate.
    ///
    /// # Errors
    /// [`TlsError::Rustls`] if rustls rejects the certificate or key.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone()));
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.server_chain.clone(), key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Writes a file atomically enough for tests (temp file + rename), private
/// keys with mode 0600.
fn write(path: &Path, contents: &[u8], private: bool) -> Result<(), TlsError> {
    let io_err = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut file = options.open(&tmp).map_err(io_err)?;
    file.write_all(contents).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    fs::rename(&tmp, path).map_err(io_err)
}
