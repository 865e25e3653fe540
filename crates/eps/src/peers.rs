//! Who a peer is: the checks a certificate must pass beyond chaining to the CA set.
//!
//! A peer is accepted only when its certificate names (common name) an operator present in the
//! directory and, where the directory pins fingerprints for that operator, matches one of them.
//! The server side runs these checks inside the TLS handshake, so a refused peer gets an alert
//! and never reaches a service.

use std::sync::{Arc, RwLock};

use eps_core::directory::Directory;
use eps_core::tls;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// The directory, swapped whole when it changes and read once per check.
#[derive(Clone, Default)]
pub struct SharedDirectory(Arc<RwLock<Arc<Directory>>>);

impl SharedDirectory {
    pub fn new(d: Directory) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(d))))
    }

    /// The current directory.
    pub fn load(&self) -> Arc<Directory> {
        self.0.read().expect("directory lock poisoned").clone()
    }

    /// Replaces the directory.
    pub fn store(&self, d: Directory) {
        *self.0.write().expect("directory lock poisoned") = Arc::new(d);
    }
}

/// The identity a verified peer certificate carries.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    pub name: String,
    pub fingerprint: String,
}

/// Why a certificate that chains to the CA set does not speak for a peer.
#[derive(Debug, thiserror::Error)]
pub enum PeerRefused {
    #[error("certificate has no common name")]
    NoName,
    #[error("certificate names {0:?}, which is not in the directory")]
    NotInDirectory(String),
    #[error("certificate of {name:?} (sha256 {fingerprint}) does not match the fingerprint pinned in the directory")]
    NotPinned { name: String, fingerprint: String },
}

/// Checks a peer's end-entity certificate against the directory.
pub fn check_peer(dir: &Directory, cert: &[u8]) -> Result<PeerIdentity, PeerRefused> {
    let name = tls::operator_name(cert).ok_or(PeerRefused::NoName)?;
    let fingerprint = tls::fingerprint(cert);
    let Some(entry) = dir.entry(&name) else {
        return Err(PeerRefused::NotInDirectory(name));
    };
    if !entry.accepts_fingerprint(&fingerprint) {
        return Err(PeerRefused::NotPinned { name, fingerprint });
    }
    Ok(PeerIdentity { name, fingerprint })
}

/// Server-side verifier: the CA chain (delegated to webpki), then [`check_peer`].
#[derive(Debug)]
pub struct DirectoryClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    directory: SharedDirectory,
}

impl std::fmt::Debug for SharedDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedDirectory")
    }
}

impl DirectoryClientVerifier {
    pub fn new(inner: Arc<dyn ClientCertVerifier>, directory: SharedDirectory) -> Self {
        Self { inner, directory }
    }
}

impl ClientCertVerifier for DirectoryClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Err(e) = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            let who = tls::operator_name(end_entity).unwrap_or_else(|| "?".into());
            tracing::warn!(peer = %who, error = %e, "refused peer: certificate does not verify against the CA set");
            return Err(e);
        }
        match check_peer(&self.directory.load(), end_entity) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(reason) => {
                tracing::warn!(%reason, "refused peer");
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
