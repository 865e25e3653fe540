//! TLS material and configs.
//!
//! Certificates and keys are PEM files. An operator's identity is the common name of its
//! certificate (the development PKI also writes it as a DNS name). Fingerprints are the SHA-256
//! of the DER certificate in lowercase hex, as the directory pins them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub mod reload;

pub use reload::{identity_changes, identity_generation, refresh, watch, Check, WATCH_INTERVAL};

/// TLS settings of one listener or client.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM file with the CA certificates that peers must chain to.
    pub ca_certificate: PathBuf,
    /// PEM file with this side's certificate (chain).
    pub certificate: PathBuf,
    /// PEM file with this side's private key. Never printed.
    pub key: PathBuf,
    /// On a server: require a client certificate from `ca_certificate`. On a client: ignored.
    #[serde(default)]
    pub verify_client: bool,
}

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is missing, unreadable or holds nothing usable.
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    /// rustls refused the combination (for example a key that does not match).
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The ring provider, used everywhere so that one crypto library is linked.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::File {
            path: path.to_path_buf(),
            reason: "no certificate in file".into(),
        });
    }
    Ok(certs)
}

/// Reads the first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_err(path, e))
}

/// A PEM error in words (rustls prints some of them as lists of byte values).
fn pem_err(path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    use rustls::pki_types::pem::Error;
    let reason = match e {
        Error::MissingSectionEnd { end_marker } => format!(
            "not valid PEM: no {:?} line",
            String::from_utf8_lossy(&end_marker)
        ),
        Error::IllegalSectionStart { line } => format!(
            "not valid PEM: bad section start {:?}",
            String::from_utf8_lossy(&line)
        ),
        Error::Base64Decode(e) => format!("not valid PEM: bad base64 ({e})"),
        Error::NoItemsFound => "no PEM section of the expected kind in the file".into(),
        e => e.to_string(),
    };
    TlsError::File {
        path: path.to_path_buf(),
        reason,
    }
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// A root store holding every certificate of `ca_file`.
pub fn root_store(ca_file: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca_file)? {
        roots.add(cert).map_err(|e| file_err(ca_file, e))?;
    }
    Ok(Arc::new(roots))
}

/// A server config with this side's certificate; a client certificate from the CA is required
/// when `verify_client` is set. `alpn` lists the protocols offered, in order of preference.
/// The certificate, key and CA follow their files (see [`reload`]).
pub fn server_config(s: &TlsSettings, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = s.verify_client.then(|| client_verifier(s)).transpose()?;
    server_config_with(s, verifier, alpn)
}

/// The verifier that accepts client certificates chaining to `ca_certificate` (as the file
/// reads at the time of each handshake).
pub fn client_verifier(s: &TlsSettings) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    Ok(Arc::new(reload::ClientVerifier(reload::Trust::shared(
        &s.ca_certificate,
    )?)))
}

/// A server config with this side's certificate and the given client verifier (none: clients
/// present no certificate).
pub fn server_config_with(
    s: &TlsSettings,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let verifies_clients = verifier.is_some();
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(reload::Identity::shared(&s.certificate, &s.key)?);
    if verifies_clients {
        // A resumed session skips the client certificate check: every connection is checked
        // against the CA set and directory of its time instead.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    }
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The certificate and key in these files as a server certificate resolver that follows the
/// files (see [`reload`]): for servers that pick their config per connection, e.g. a TLS
/// terminator with one certificate per domain. The same files share one loaded copy.
pub fn certificate_resolver(
    certificate: &Path,
    key: &Path,
) -> Result<Arc<dyn rustls::server::ResolvesServerCert>, TlsError> {
    Ok(reload::Identity::shared(certificate, key)?)
}

/// A client config that trusts `ca_certificate` and presents this side's certificate, both
/// as their files read at the time of each handshake.
pub fn client_config(s: &TlsSettings, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, TlsError> {
    let trust = reload::Trust::shared(&s.ca_certificate)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(reload::ServerVerifier(trust)))
        .with_client_cert_resolver(reload::Identity::shared(&s.certificate, &s.key)?);
    // A resumed session carries the certificate of its first handshake: every connection
    // shows the current one instead (these links are long-lived; a full handshake is rare).
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// SHA-256 of a DER certificate, lowercase hex: the form the directory pins.
pub fn fingerprint(cert: &[u8]) -> String {
    hex::encode(Sha256::digest(cert))
}

/// The common name of a certificate's subject, if it has one.
pub fn common_name(cert: &[u8]) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(cn)
}

/// The operator a certificate names: its common name.
pub fn operator_name(cert: &[u8]) -> Option<String> {
    common_name(cert)
}
