//! Certificates from an ACME server (RFC 8555) for terminated domains without certificate
//! files, with the TLS-ALPN-01 challenge (RFC 8737) (docs/architecture.md §3.6).
//!
//! Per domain, a [`ManagedCert`] holds the certificate in use and, while an order waits for
//! validation, the challenge certificate; its task loads the stored certificate at start,
//! orders one when there is none (once the public proxy accepted the domain: the validation
//! connection comes through it), and renews at `renew_at` of the lifetime. A failed order is
//! retried from [`FIRST_RETRY`] doubling to [`MAX_RETRY`]; a failed renewal keeps the current
//! certificate and says so at error level. The task stops when its `ManagedCert` is dropped (the
//! domain left the settings or changed its options).
//!
//! The ACME protocol is `instant-acme`'s; the challenge certificate, the key of each
//! certificate (ECDSA P-256, made here, never sent anywhere), storage and the schedule are ours.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use eps_core::backoff::Backoff;
use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use time::OffsetDateTime;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::settings::{AcmeSettings, ACME_TLS_ALPN};

mod http;
mod storage;

pub use storage::{Storage, StorageError};

/// First pause after a failed order.
pub const FIRST_RETRY: Duration = Duration::from_secs(10);
/// Longest pause between failed orders (an ACME server limits failed validations per hour).
pub const MAX_RETRY: Duration = Duration::from_secs(3600);
/// How often a domain waiting for its announcement to be accepted looks again.
const ANNOUNCED_POLL: Duration = Duration::from_millis(250);

/// The domains the public proxy accepted: domain → (public proxy, expiry).
pub type Accepted = RwLock<HashMap<String, (String, Option<OffsetDateTime>)>>;

/// Why the ACME client could not be set up, or an order failed.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("storage {0}")]
    Storage(#[from] StorageError),
    #[error("ACME CA file: {0}")]
    Trust(#[from] eps_core::tls::TlsError),
    #[error("ACME server: {0}")]
    Protocol(#[from] instant_acme::Error),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("{0}")]
    Order(String),
}

/// The ACME client of one private proxy, shared by its managed domains.
pub struct Acme {
    settings: AcmeSettings,
    storage: Storage,
    http: http::Client,
    /// Made or loaded on first use.
    account: tokio::sync::Mutex<Option<Account>>,
    accepted: Arc<Accepted>,
}

impl Acme {
    /// Opens the storage and the HTTPS client of the directory; contacts nobody yet.
    pub fn new(settings: &AcmeSettings, accepted: Arc<Accepted>) -> Result<Arc<Self>, AcmeError> {
        Ok(Arc::new(Self {
            storage: Storage::open(&settings.storage)?,
            http: http::client(settings.ca_certificate.as_deref())?,
            settings: settings.clone(),
            account: tokio::sync::Mutex::new(None),
            accepted,
        }))
    }

    /// Starts managing `domain`'s certificate: the stored one, if any, serves at once.
    pub fn manage(self: &Arc<Self>, domain: &str) -> ManagedCert {
        let slot = Arc::new(Slot {
            domain: domain.to_string(),
            current: RwLock::new(None),
            challenge: RwLock::new(None),
        });
        match self.storage.certificate(domain) {
            Ok(Some(ck)) => *slot.current.write().expect("lock") = Some(ck),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(%domain, error = %e, "stored certificate not usable; ordering a new one")
            }
        }
        let stop = CancellationToken::new();
        tokio::spawn(self.clone().keep(slot.clone(), stop.clone()));
        ManagedCert {
            slot,
            _stop: stop.drop_guard(),
        }
    }

    /// Keeps `slot` holding a current certificate until `stop`.
    async fn keep(self: Arc<Self>, slot: Arc<Slot>, stop: CancellationToken) {
        let domain = slot.domain.clone();
        let mut retry = Backoff::new(FIRST_RETRY, MAX_RETRY);
        loop {
            let current = slot.current();
            if let Some(ck) = &current {
                let renew = renew_time(ck, self.settings.renew_at);
                let wait = (renew - OffsetDateTime::now_utc())
                    .try_into()
                    .unwrap_or_default();
                tracing::info!(%domain, renew_at = %crate::announcements::rfc3339(renew), "certificate in use");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return,
                }
            }
            if !self.wait_announced(&domain, &stop).await {
                return;
            }
            let order = tokio::time::timeout(self.settings.order_timeout, self.obtain(&slot));
            let outcome = tokio::select! {
                r = order => r.unwrap_or_else(|_| Err(AcmeError::Order(format!(
                    "not done within {:?}", self.settings.order_timeout)))),
                _ = stop.cancelled() => return,
            };
            *slot.challenge.write().expect("lock") = None;
            match outcome {
                Ok(ck) => {
                    retry.reset();
                    let (_, not_after) = validity(&ck);
                    tracing::info!(%domain, expires_at = %crate::announcements::rfc3339(not_after),
                        "certificate obtained from the ACME server; new handshakes use it");
                    *slot.current.write().expect("lock") = Some(ck);
                    continue;
                }
                Err(e) => {
                    let pause = retry.fail();
                    match &current {
                        Some(ck) => tracing::error!(%domain,
                            expires_at = %crate::announcements::rfc3339(validity(ck).1),
                            retry_in_s = pause.as_secs(), error = %e,
                            "certificate renewal failed; keeping the current certificate"),
                        None => tracing::warn!(%domain, retry_in_s = pause.as_secs(), error = %e,
                            "could not obtain a certificate; the domain's clients are refused until one is obtained"),
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Waits until the public proxy accepted `domain`: before, no validation can reach us.
    async fn wait_announced(&self, domain: &str, stop: &CancellationToken) -> bool {
        let mut logged = false;
        loop {
            let now = OffsetDateTime::now_utc();
            let live = self
                .accepted
                .read()
                .expect("lock")
                .get(domain)
                .is_some_and(|(_, exp)| exp.is_none_or(|t| t > now));
            if live {
                return true;
            }
            if !logged {
                tracing::info!(%domain, "waiting for the announcement to be accepted before ordering a certificate");
                logged = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(ANNOUNCED_POLL) => {}
                _ = stop.cancelled() => return false,
            }
        }
    }

    /// The account: loaded from storage, or created (and stored) on first use.
    async fn account(&self) -> Result<Account, AcmeError> {
        let mut held = self.account.lock().await;
        if let Some(a) = held.as_ref() {
            return Ok(a.clone());
        }
        let url = &self.settings.directory_url;
        let builder = || Account::builder_with_http(Box::new(self.http.clone()));
        let account = match self.storage.account(url)? {
            Some(credentials) => builder().from_credentials(credentials).await?,
            None => {
                let contact: Vec<&str> = self.settings.contact.iter().map(String::as_str).collect();
                let (account, credentials) = builder()
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        url.clone(),
                        None,
                    )
                    .await?;
                self.storage.save_account(url, credentials)?;
                tracing::info!(directory = %url, account = %account.id(), "ACME account created");
                account
            }
        };
        *held = Some(account.clone());
        Ok(account)
    }

    /// One order for `slot`'s domain, the TLS-ALPN-01 challenge answered from `slot` while it
    /// runs; the new certificate, stored.
    async fn obtain(&self, slot: &Slot) -> Result<Arc<CertifiedKey>, AcmeError> {
        let domain = &slot.domain;
        let account = self.account().await?;
        let identifiers = [Identifier::Dns(domain.clone())];
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(AcmeError::Order(format!("authorization is {other:?}")));
                }
            }
            let mut challenge = authz.challenge(ChallengeType::TlsAlpn01).ok_or_else(|| {
                AcmeError::Order("the ACME server offers no tls-alpn-01 challenge".into())
            })?;
            let config = challenge_config(domain, challenge.key_authorization().digest().as_ref())?;
            *slot.challenge.write().expect("lock") = Some(config);
            challenge.set_ready().await?;
        }
        let status = order.poll_ready(&RetryPolicy::default()).await?;
        if status != OrderStatus::Ready {
            let detail = order
                .state()
                .error
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "no detail; see the ACME server's authorization".into());
            return Err(AcmeError::Order(format!("order is {status:?}: {detail}")));
        }
        *slot.challenge.write().expect("lock") = None;
        let key = rcgen::KeyPair::generate().map_err(cert_err)?;
        let mut params = rcgen::CertificateParams::new(vec![domain.clone()]).map_err(cert_err)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key).map_err(cert_err)?;
        order.finalize_csr(csr.der()).await?;
        let chain = order.poll_certificate(&RetryPolicy::default()).await?;
        let key_pem = key.serialize_pem();
        let ck = storage::certified_key(format!("{key_pem}{chain}").as_bytes())
            .map_err(AcmeError::Certificate)?;
        self.storage.save_certificate(domain, &key_pem, &chain)?;
        Ok(ck)
    }
}

fn cert_err(e: rcgen::Error) -> AcmeError {
    AcmeError::Certificate(e.to_string())
}

/// The TLS config that answers a TLS-ALPN-01 validation for `domain`: a self-signed
/// certificate naming it, with the acmeIdentifier extension holding the SHA-256 of the key
/// authorization, and ALPN `acme-tls/1` only (RFC 8737 §3).
fn challenge_config(domain: &str, digest: &[u8]) -> Result<Arc<ServerConfig>, AcmeError> {
    let mut config = ServerConfig::builder_with_provider(eps_core::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| AcmeError::Certificate(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(challenge_certificate(domain, digest)?)));
    config.alpn_protocols = vec![ACME_TLS_ALPN.as_bytes().to_vec()];
    Ok(Arc::new(config))
}

/// The self-signed certificate of [`challenge_config`].
fn challenge_certificate(domain: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, AcmeError> {
    let key = rcgen::KeyPair::generate().map_err(cert_err)?;
    let mut params = rcgen::CertificateParams::new(vec![domain.to_string()]).map_err(cert_err)?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(cert_err)?;
    // Not `with_single_cert`: its consistency check parses the certificate with webpki, which
    // refuses the critical acmeIdentifier extension that RFC 8737 requires.
    let signer = eps_core::tls::provider()
        .key_provider
        .load_private_key(rustls::pki_types::PrivateKeyDer::Pkcs8(
            key.serialize_der().into(),
        ))
        .map_err(|e| AcmeError::Certificate(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signer,
    )))
}

/// Always the same certificate: the challenge's.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// When a certificate is due for renewal: `fraction` of its lifetime after its start.
fn renew_time(ck: &CertifiedKey, fraction: f64) -> OffsetDateTime {
    let (from, to) = validity(ck);
    from + (to - from) * fraction
}

/// The leaf's notBefore and notAfter (now and now, for a certificate that does not parse:
/// renew it at once).
fn validity(ck: &CertifiedKey) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    ck.cert
        .first()
        .and_then(|c| x509_parser::parse_x509_certificate(c.as_ref()).ok())
        .map(|(_, c)| {
            let v = c.validity();
            (v.not_before.to_datetime(), v.not_after.to_datetime())
        })
        .unwrap_or((now, now))
}

/// One domain's certificates: the one in use and the challenge's, while an order runs.
pub struct Slot {
    domain: String,
    current: RwLock<Option<Arc<CertifiedKey>>>,
    challenge: RwLock<Option<Arc<ServerConfig>>>,
}

impl Slot {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current.read().expect("lock").clone()
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Slot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

/// A domain whose certificate comes from ACME; dropping it stops its task.
pub struct ManagedCert {
    slot: Arc<Slot>,
    _stop: DropGuard,
}

impl ManagedCert {
    /// The resolver for the domain's TLS config: the current certificate.
    pub fn resolver(&self) -> Arc<dyn ResolvesServerCert> {
        self.slot.clone()
    }

    /// Whether a certificate is there to serve.
    pub fn ready(&self) -> bool {
        self.slot.current.read().expect("lock").is_some()
    }

    /// The config answering a TLS-ALPN-01 validation, while an order waits for one.
    pub fn challenge(&self) -> Option<Arc<ServerConfig>> {
        self.slot.challenge.read().expect("lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_challenge_certificate_carries_the_key_authorization_digest() {
        let digest = [7u8; 32];
        let config = challenge_config("a.example.com", &digest).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"acme-tls/1".to_vec()]);
        let ck = challenge_certificate("a.example.com", &digest).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(ck.cert[0].as_ref()).unwrap();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("the acmeIdentifier extension");
        assert!(ext.critical, "RFC 8737: the extension is critical");
        // An OCTET STRING of the 32-byte SHA-256 digest.
        assert_eq!(&ext.value[2..], &digest);
        let names: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, ["DNSName(a.example.com)"]);
    }

    #[test]
    fn renewal_comes_at_the_fraction_of_the_lifetime() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["a.example.com".into()]).unwrap();
        let start = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        params.not_before = start;
        params.not_after = start + time::Duration::days(90);
        let cert = params.self_signed(&key).unwrap();
        let pem = format!("{}{}", key.serialize_pem(), cert.pem());
        let ck = storage::certified_key(pem.as_bytes()).unwrap();
        assert_eq!(renew_time(&ck, 2.0 / 3.0), start + time::Duration::days(60));
    }
}
