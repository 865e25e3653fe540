//! TLS material that follows its files: certificates, keys and CA sets are re-read when the
//! files change (checked every [`WATCH_INTERVAL`]) and on SIGHUP, without a restart.
//!
//! Every rustls config this crate builds holds its material through a resolver or verifier
//! that reads the current version at each handshake, so new handshakes use new material while
//! established connections keep the keys they were made with. Files are grouped as they are
//! used together (a certificate with its key; a CA file) and re-read as a group: a group that
//! fails to load (bad PEM, a key that does not match the certificate, an empty CA file) is
//! refused with a log line naming its files, and the material loaded before stays in use. A
//! change is loaded once the files have stayed the same for one check, so that a deploy that
//! writes the key and then the certificate is never caught half done (SIGHUP loads at once).
//! The same files used by several configs are loaded once.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, RwLock, Weak};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::files::Stamp as FileStamp;

use super::{file_err, fingerprint, load_certs, load_key, provider, root_store, TlsError};

/// Counts the times a certificate this process shows changed, so that long-lived connections
/// made with the old one can be replaced (peers may stop accepting it).
static IDENTITY_GENERATION: LazyLock<watch::Sender<u64>> = LazyLock::new(|| watch::channel(0).0);

/// Changes whenever a certificate this process presents was replaced by a new one.
pub fn identity_changes() -> watch::Receiver<u64> {
    IDENTITY_GENERATION.subscribe()
}

/// How many times a certificate this process presents was replaced so far.
pub fn identity_generation() -> u64 {
    *IDENTITY_GENERATION.borrow()
}

/// How often the files behind live TLS material are checked for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

fn stamps(paths: &[&Path]) -> Vec<FileStamp> {
    paths.iter().map(|p| crate::files::stamp(p)).collect()
}

/// When to re-read a group of files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// When they changed and have stayed the same since the previous check (the watch).
    Settled,
    /// When they changed (a config built from them now).
    Changed,
    /// Always (SIGHUP).
    Always,
}

/// The versions of a group of files: the one loaded, and a newer one waiting to settle.
struct Seen {
    loaded: Vec<FileStamp>,
    settling: Option<Vec<FileStamp>>,
}

impl Seen {
    fn new(loaded: Vec<FileStamp>) -> Mutex<Self> {
        Mutex::new(Self {
            loaded,
            settling: None,
        })
    }

    /// Whether the files, now at `now`, are to be read under `check`; if so, `now` counts as
    /// loaded (a version that fails to load is not retried until it changes again).
    fn take(&mut self, now: Vec<FileStamp>, check: Check) -> bool {
        let read = match check {
            Check::Always => true,
            Check::Changed => now != self.loaded,
            Check::Settled if now == self.loaded => {
                self.settling = None;
                false
            }
            Check::Settled => {
                let settled = self.settling.as_ref() == Some(&now);
                if !settled {
                    self.settling = Some(now.clone());
                }
                settled
            }
        };
        if read {
            self.loaded = now;
            self.settling = None;
        }
        read
    }
}

/// A certificate chain with its private key.
pub(super) struct Identity {
    certificate: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    seen: Mutex<Seen>,
}

impl Identity {
    /// The identity for these files: the one already loaded (brought up to date with its
    /// files), or a new one.
    pub(super) fn shared(certificate: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        let mut live = LIVE.lock().expect("tls registry poisoned");
        live.identities.retain(|w| w.strong_count() > 0);
        if let Some(found) = live
            .identities
            .iter()
            .filter_map(Weak::upgrade)
            .find(|i| i.certificate == certificate && i.key == key)
        {
            found.refresh(Check::Changed);
            return Ok(found);
        }
        let seen = stamps(&[certificate, key]);
        let loaded = Self::load(certificate, key)?;
        let identity = Arc::new(Self {
            certificate: certificate.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(Arc::new(loaded)),
            seen: Seen::new(seen),
        });
        live.identities.push(Arc::downgrade(&identity));
        Ok(identity)
    }

    fn load(certificate: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
        let chain = load_certs(certificate)?;
        let key_der = load_key(key)?;
        CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::Config(format!(
                "{} does not match the certificate in {}",
                key.display(),
                certificate.display()
            )),
            e => file_err(key, e),
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().expect("identity lock poisoned").clone()
    }

    /// Re-reads the files if `check` says so.
    fn refresh(&self, check: Check) {
        let now = stamps(&[&self.certificate, &self.key]);
        if !self
            .seen
            .lock()
            .expect("identity stamps poisoned")
            .take(now, check)
        {
            return;
        }
        match Self::load(&self.certificate, &self.key) {
            Ok(fresh) => {
                let before = fingerprint(self.current().cert[0].as_ref());
                let after = fingerprint(fresh.cert[0].as_ref());
                *self.current.write().expect("identity lock poisoned") = Arc::new(fresh);
                if before != after {
                    IDENTITY_GENERATION.send_modify(|g| *g += 1);
                    tracing::info!(
                        certificate = %self.certificate.display(),
                        sha256 = %after,
                        previous = %before,
                        "TLS certificate reloaded: new handshakes use it"
                    );
                }
            }
            Err(e) => tracing::error!(
                certificate = %self.certificate.display(),
                key = %self.key.display(),
                error = %e,
                "TLS certificate not reloaded, keeping the one in use"
            ),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("certificate", &self.certificate)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Identity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for Identity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The verifiers built from one CA file.
struct Verifiers {
    clients: Arc<dyn ClientCertVerifier>,
    servers: Arc<WebPkiServerVerifier>,
}

/// A CA set: the certificates peers must chain to, as client and as server verifier.
pub(super) struct Trust {
    ca: PathBuf,
    current: RwLock<Arc<Verifiers>>,
    seen: Mutex<Seen>,
}

impl Trust {
    /// The CA set for this file: the one already loaded (brought up to date with its file), or
    /// a new one.
    pub(super) fn shared(ca: &Path) -> Result<Arc<Self>, TlsError> {
        let mut live = LIVE.lock().expect("tls registry poisoned");
        live.trusts.retain(|w| w.strong_count() > 0);
        if let Some(found) = live
            .trusts
            .iter()
            .filter_map(Weak::upgrade)
            .find(|t| t.ca == ca)
        {
            found.refresh(Check::Changed);
            return Ok(found);
        }
        let seen = stamps(&[ca]);
        let loaded = Self::load(ca)?;
        let trust = Arc::new(Self {
            ca: ca.to_path_buf(),
            current: RwLock::new(Arc::new(loaded)),
            seen: Seen::new(seen),
        });
        live.trusts.push(Arc::downgrade(&trust));
        Ok(trust)
    }

    fn load(ca: &Path) -> Result<Verifiers, TlsError> {
        let roots = root_store(ca)?;
        let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| file_err(ca, e))?;
        let servers = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| file_err(ca, e))?;
        Ok(Verifiers { clients, servers })
    }

    fn current(&self) -> Arc<Verifiers> {
        self.current.read().expect("trust lock poisoned").clone()
    }

    fn refresh(&self, check: Check) {
        let now = stamps(&[&self.ca]);
        if !self
            .seen
            .lock()
            .expect("trust stamps poisoned")
            .take(now, check)
        {
            return;
        }
        match Self::load(&self.ca) {
            Ok(fresh) => {
                *self.current.write().expect("trust lock poisoned") = Arc::new(fresh);
                tracing::info!(ca_certificate = %self.ca.display(), "CA certificates reloaded: new handshakes use them");
            }
            Err(e) => tracing::error!(
                ca_certificate = %self.ca.display(),
                error = %e,
                "CA certificates not reloaded, keeping the ones in use"
            ),
        }
    }
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trust")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

/// Verifies client certificates against the current CA set.
#[derive(Debug)]
pub(super) struct ClientVerifier(pub(super) Arc<Trust>);

impl ClientCertVerifier for ClientVerifier {
    /// No hints: the set can change under a running server, and each of our clients holds one
    /// certificate, which it sends when the list is empty.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .current()
            .clients
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signatures::tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signatures::tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signatures::schemes()
    }
}

/// Verifies server certificates against the current CA set.
#[derive(Debug)]
pub(super) struct ServerVerifier(pub(super) Arc<Trust>);

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.current().servers.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signatures::tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signatures::tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signatures::schemes()
    }
}

/// Handshake signatures are checked against the certificate the handshake already verified:
/// the same for client and server certificates, and independent of the CA set.
mod signatures {
    use std::sync::LazyLock;

    use rustls::client::danger::HandshakeSignatureValid;
    use rustls::crypto::WebPkiSupportedAlgorithms;
    use rustls::pki_types::CertificateDer;
    use rustls::{DigitallySignedStruct, SignatureScheme};

    static ALGORITHMS: LazyLock<WebPkiSupportedAlgorithms> =
        LazyLock::new(|| super::provider().signature_verification_algorithms);

    pub fn tls12(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &ALGORITHMS)
    }

    pub fn tls13(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &ALGORITHMS)
    }

    pub fn schemes() -> Vec<SignatureScheme> {
        ALGORITHMS.supported_schemes()
    }
}

/// Everything loaded and still used by some config.
#[derive(Default)]
struct Live {
    identities: Vec<Weak<Identity>>,
    trusts: Vec<Weak<Trust>>,
}

static LIVE: Mutex<Live> = Mutex::new(Live {
    identities: Vec::new(),
    trusts: Vec::new(),
});

/// Re-reads the TLS files of this process as `check` says. Material that fails to load is
/// logged and the previous version kept.
pub fn refresh(check: Check) {
    let (identities, trusts): (Vec<_>, Vec<_>) = {
        let live = LIVE.lock().expect("tls registry poisoned");
        (
            live.identities.iter().filter_map(Weak::upgrade).collect(),
            live.trusts.iter().filter_map(Weak::upgrade).collect(),
        )
    };
    for i in identities {
        i.refresh(check);
    }
    for t in trusts {
        t.refresh(check);
    }
}

/// Keeps the TLS material of this process in step with its files until `shutdown`: checks
/// them every [`WATCH_INTERVAL`], and re-reads them all on SIGHUP.
pub async fn watch(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let check = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => Check::Settled,
            _ = hup.recv() => Check::Always,
        };
        // File reads and PEM parsing stay off the runtime's worker threads.
        let _ = tokio::task::spawn_blocking(move || refresh(check)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;

    fn write_leaf(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        pki::ensure(dir, &[name.to_string()], &[], None, false).unwrap();
        (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        )
    }

    #[test]
    fn identity_follows_its_files_and_keeps_the_old_one_when_they_break() {
        let d = tempfile::tempdir().unwrap();
        let (crt, key) = write_leaf(d.path(), "alice");
        let id = Identity::shared(&crt, &key).unwrap();
        assert!(Arc::ptr_eq(&id, &Identity::shared(&crt, &key).unwrap()));
        let first = fingerprint(id.current().cert[0].as_ref());

        // A new certificate and key for the same name.
        std::fs::remove_file(&crt).unwrap();
        std::fs::remove_file(&key).unwrap();
        write_leaf(d.path(), "alice");
        // The watch waits for the files to settle: one look notes the change, the next loads.
        id.refresh(Check::Settled);
        assert_eq!(fingerprint(id.current().cert[0].as_ref()), first);
        id.refresh(Check::Settled);
        let second = fingerprint(id.current().cert[0].as_ref());
        assert_ne!(first, second);

        // A key that does not match: refused, the second stays.
        let (_, other_key) = write_leaf(d.path(), "bob");
        std::fs::copy(&other_key, &key).unwrap();
        id.refresh(Check::Changed);
        assert_eq!(fingerprint(id.current().cert[0].as_ref()), second);
        assert!(Identity::load(&crt, &key)
            .unwrap_err()
            .to_string()
            .contains("does not match"));

        // Bad PEM: refused, the second stays.
        std::fs::write(&crt, "not a certificate").unwrap();
        id.refresh(Check::Always);
        assert_eq!(fingerprint(id.current().cert[0].as_ref()), second);
    }
}
