//! TLS settings and turning them into a rustls `ServerConfig`.
//!
//! Certificates and keys are PEM files (a chain in the certificate file; RSA, ECDSA or Ed25519
//! keys in PKCS#8, PKCS#1 or SEC1 form). The crypto provider is rustls's `ring` (no C toolchain
//! beyond the machine's). Every error names the setting and the file at fault.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::ring;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::x509::{self, Validity};

/// Whether clients must present a certificate signed by `--tls-client-ca`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientAuth {
    /// Ask for a certificate; verify it if given, accept clients without one.
    Optional,
    /// Refuse clients without a valid certificate.
    Required,
}

/// Everything a TLS listener needs to build its rustls configuration.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// The certificate chain, leaf first (`--tls-cert`).
    pub cert: PathBuf,
    /// The private key of the leaf (`--tls-key`).
    pub key: PathBuf,
    /// CA certificates client certificates are verified against (`--tls-client-ca`); none: no
    /// client authentication.
    pub client_ca: Option<PathBuf>,
    /// What to do about clients without a certificate (`--tls-client-auth`).
    pub client_auth: ClientAuth,
    /// ALPN protocols offered, in preference order (`--tls-alpn`); empty: negotiate nothing.
    pub alpn: Vec<String>,
    /// A client that has not finished its handshake after this long is closed
    /// (`--tls-handshake-timeout`).
    pub handshake_timeout: Duration,
    /// How often the files are checked for changes (`--tls-reload-interval`).
    pub reload_interval: Duration,
}

/// A loaded configuration and what the service reports about it.
pub struct LoadedConfig {
    /// Ready for new connections.
    pub server: Arc<ServerConfig>,
    /// The leaf certificate's validity period, when it could be read.
    pub validity: Option<Validity>,
}

/// The bytes of every file the configuration is built from, in order: a change in any of
/// them means a reload.
pub fn read_files(settings: &TlsSettings) -> Result<Vec<Vec<u8>>, String> {
    let mut files = vec![
        read(&settings.cert, "--tls-cert")?,
        read(&settings.key, "--tls-key")?,
    ];
    if let Some(ca) = &settings.client_ca {
        files.push(read(ca, "--tls-client-ca")?);
    }
    Ok(files)
}

fn read(path: &PathBuf, flag: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|err| format!("'{flag} {}': {err}", path.display()))
}

/// Build the rustls configuration from the bytes [`read_files`] returned.
pub fn build(settings: &TlsSettings, files: &[Vec<u8>]) -> Result<LoadedConfig, String> {
    let cert_flag = format!("'--tls-cert {}'", settings.cert.display());
    let key_flag = format!("'--tls-key {}'", settings.key.display());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&files[0])
        .collect::<Result<_, _>>()
        .map_err(|err| format!("{cert_flag}: not a PEM certificate chain: {err}"))?;
    let leaf = chain
        .first()
        .ok_or_else(|| format!("{cert_flag}: no certificate in the file"))?;
    let validity = x509::validity(leaf);
    let key = PrivateKeyDer::from_pem_slice(&files[1])
        .map_err(|err| format!("{key_flag}: no PKCS#8, PKCS#1 or SEC1 private key: {err}"))?;

    let provider = Arc::new(ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|err| format!("TLS versions: {err}"))?;
    let builder = match (&settings.client_ca, files.get(2)) {
        (Some(ca_path), Some(ca_bytes)) => {
            let ca_flag = format!("'--tls-client-ca {}'", ca_path.display());
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca_bytes) {
                let cert = cert.map_err(|err| format!("{ca_flag}: not PEM: {err}"))?;
                roots
                    .add(cert)
                    .map_err(|err| format!("{ca_flag}: not a usable CA certificate: {err}"))?;
            }
            if roots.is_empty() {
                return Err(format!("{ca_flag}: no certificate in the file"));
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let verifier = match settings.client_auth {
                ClientAuth::Optional => verifier.allow_unauthenticated(),
                ClientAuth::Required => verifier,
            }
            .build()
            .map_err(|err| format!("{ca_flag}: {err}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut server = builder
        .with_single_cert(chain, key)
        .map_err(|err| format!("{cert_flag} and {key_flag} do not make a usable pair: {err}"))?;
    server.alpn_protocols = settings
        .alpn
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    Ok(LoadedConfig {
        server: Arc::new(server),
        validity,
    })
}
