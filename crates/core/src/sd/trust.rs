//! What a reader of a chain trusts: the CA that signing certificates chain to, and who the
//! administrators are. Both come from the reader's own settings.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use serde::{Deserialize, Serialize};

use super::chain::Refusal;
use super::rights::Administrators;
use super::signer::SignerCert;
use crate::tls;

/// Signing certificates whose checks are remembered (a chain has few signers; the cap bounds
/// what a stream of made-up certificates can cost).
const MAX_REMEMBERED_SIGNERS: usize = 4096;

/// Settings of a chain's reader (the directory server, each EPS server following it, and the
/// `eps sd` commands).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSettings {
    /// PEM file with the CA certificates every signing certificate must chain to. Keep a
    /// retired root here as long as records signed under it are in the chain: the whole chain
    /// is verified at every start.
    pub ca_certificate: PathBuf,
    /// The administrators' signing certificates: each a SHA-256 fingerprint (64 hex digits) or
    /// the path of a PEM certificate file. They may write any record.
    pub administrators: Vec<String>,
    /// Operators in this group whose own signing certificate is pinned are administrators too.
    #[serde(default)]
    pub administrator_group: Option<String>,
}

/// Why trust settings do not load.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The CA file or an administrator's certificate file does not load.
    #[error(transparent)]
    File(#[from] tls::TlsError),
    /// An `administrators` entry is neither a fingerprint nor a certificate file.
    #[error("administrators[{index}]: {value:?} is neither a SHA-256 fingerprint (64 hex digits) nor a certificate file: {reason}")]
    Administrator {
        index: usize,
        value: String,
        reason: String,
    },
    /// A CA certificate cannot anchor a chain.
    #[error("{}: {reason}", path.display())]
    Anchor { path: PathBuf, reason: String },
}

/// The CA anchors and administrators one reader checks records against.
pub struct Trust {
    anchors: Vec<TrustAnchor<'static>>,
    administrators: Administrators,
    /// Each `certificate` field seen, checked once: parsed, key usage, and chained to the CA.
    signers: Mutex<HashMap<String, Result<Arc<SignerCert>, String>>>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("anchors", &self.anchors.len())
            .field("administrators", &self.administrators)
            .finish_non_exhaustive()
    }
}

impl Trust {
    /// Trust in `ca` (DER certificates) with these administrators.
    pub fn new(ca: &[CertificateDer<'_>], administrators: Administrators) -> Result<Self, String> {
        let anchors = ca
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| format!("not a CA certificate: {e}"))
            })
            .collect::<Result<_, _>>()?;
        let administrators = Administrators {
            fingerprints: administrators
                .fingerprints
                .into_iter()
                .map(|f| f.to_ascii_lowercase())
                .collect(),
            group: administrators.group,
        };
        Ok(Self {
            anchors,
            administrators,
            signers: Mutex::new(HashMap::new()),
        })
    }

    /// Loads the CA file and the administrators' certificates named in `s`.
    pub fn from_settings(s: &TrustSettings) -> Result<Self, TrustError> {
        let ca = tls::load_certs(&s.ca_certificate)?;
        let mut fingerprints = Vec::new();
        for (index, value) in s.administrators.iter().enumerate() {
            let hex = value.replace(':', "");
            if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                fingerprints.push(hex.to_ascii_lowercase());
                continue;
            }
            let certs = tls::load_certs(std::path::Path::new(value)).map_err(|e| {
                TrustError::Administrator {
                    index,
                    value: value.clone(),
                    reason: e.to_string(),
                }
            })?;
            fingerprints.push(tls::fingerprint(&certs[0]));
        }
        let administrators = Administrators {
            fingerprints,
            group: s.administrator_group.clone(),
        };
        Self::new(&ca, administrators).map_err(|reason| TrustError::Anchor {
            path: s.ca_certificate.clone(),
            reason,
        })
    }

    pub fn administrators(&self) -> &Administrators {
        &self.administrators
    }

    /// The signer named by a record's `certificate` field, once it is known to be a signing
    /// certificate valid at `at` (seconds since the epoch; `created_at` in words) that chains
    /// to the CA. Whether it chains is checked the first time the field is seen.
    pub fn signer(
        &self,
        field: &str,
        at: i64,
        created_at: &str,
    ) -> Result<Arc<SignerCert>, Refusal> {
        let valid_at = |c: &SignerCert| {
            if at < c.not_before || at > c.not_after {
                return Err(Refusal::NotValidAt {
                    name: c.name.clone(),
                    at: created_at.to_string(),
                });
            }
            Ok(())
        };
        let known = self
            .signers
            .lock()
            .expect("signers poisoned")
            .get(field)
            .cloned();
        if let Some(known) = known {
            let cert = known.map_err(Refusal::Certificate)?;
            valid_at(&cert)?;
            return Ok(cert);
        }
        let cert = match SignerCert::parse(field) {
            Ok(c) => c,
            Err(e) => return self.remember(field, Err(e)),
        };
        valid_at(&cert)?;
        let when = UnixTime::since_unix_epoch(Duration::from_secs(at.max(0).unsigned_abs()));
        let checked = self.chains(&cert, when).map(|()| Arc::new(cert));
        self.remember(field, checked)
    }

    /// Keeps the outcome of checking a certificate field, and gives it back.
    fn remember(
        &self,
        field: &str,
        checked: Result<Arc<SignerCert>, String>,
    ) -> Result<Arc<SignerCert>, Refusal> {
        let mut signers = self.signers.lock().expect("signers poisoned");
        if signers.len() >= MAX_REMEMBERED_SIGNERS {
            signers.clear();
        }
        signers.insert(field.to_string(), checked.clone());
        checked.map_err(Refusal::Certificate)
    }

    fn chains(&self, cert: &SignerCert, at: UnixTime) -> Result<(), String> {
        let leaf = webpki::EndEntityCert::try_from(&cert.chain[0])
            .map_err(|e| format!("the certificate of {} does not parse: {e}", cert.name))?;
        let algorithms = rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all;
        leaf.verify_for_usage(
            algorithms,
            &self.anchors,
            &cert.chain[1..],
            at,
            AnyExtendedKeyUsage,
            None,
            None,
        )
        .map(|_| ())
        .map_err(|e| {
            format!(
                "the signing certificate of {} does not chain to the trusted CA: {e}",
                cert.name
            )
        })
    }
}

/// Signing certificates are told by their key usage (`digitalSignature`) and their pin, not
/// by an extended key usage: any is accepted.
struct AnyExtendedKeyUsage;

impl webpki::ExtendedKeyUsageValidator for AnyExtendedKeyUsage {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        for purpose in iter {
            purpose?;
        }
        Ok(())
    }
}
