//! Signing certificates and keys: what a certificate must carry to sign records, and signing
//! with an operator's key.

use std::path::Path;

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};

use super::canon::{self, Content};
use super::SignedRecord;
use crate::directory::Record;
use crate::tls;

/// The base64 engine of signatures and DER certificates: standard alphabet, with padding.
pub(super) const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// What a signing certificate says, once parsed: who it names and its P-256 public key.
#[derive(Debug, Clone)]
pub struct SignerCert {
    /// The subject's common name: the operator the certificate speaks for.
    pub name: String,
    /// SHA-256 of the DER certificate, lowercase hex, as the directory pins it.
    pub fingerprint: String,
    /// The uncompressed P-256 point.
    public_key: Vec<u8>,
    /// Validity, in seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// The certificates a record carried: the signer's first, then intermediates.
    pub(super) chain: Vec<CertificateDer<'static>>,
}

impl SignerCert {
    /// Reads a record's `certificate` field (PEM, or base64 of the DER) and checks that the
    /// certificate may sign: it has a common name, key usage `digitalSignature`, and an ECDSA
    /// P-256 key. Whether it chains to a trusted CA is checked by the caller.
    pub fn parse(field: &str) -> Result<Self, String> {
        let chain = decode_certificates(field)?;
        Self::from_chain(chain)
    }

    fn from_chain(chain: Vec<CertificateDer<'static>>) -> Result<Self, String> {
        let der = chain.first().ok_or("no certificate")?;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let name = tls::common_name(der).ok_or("the certificate has no common name")?;
        let usage = cert
            .key_usage()
            .map_err(|e| format!("bad key usage extension: {e}"))?;
        if !usage.is_some_and(|u| u.value.digital_signature()) {
            return Err(format!(
                "the certificate of {name} lacks key usage digitalSignature"
            ));
        }
        let spki = cert.public_key();
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
            return Err(format!(
                "the certificate of {name} does not hold an ECDSA P-256 key"
            ));
        }
        Ok(Self {
            fingerprint: tls::fingerprint(der),
            public_key: spki.subject_public_key.data.to_vec(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            name,
            chain,
        })
    }

    /// True when `signature` (ASN.1 DER) is this key's over `message`.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &self.public_key)
            .verify(message, signature)
            .is_ok()
    }
}

/// The certificates in a record's `certificate` field: PEM (one or more), or base64 of one DER
/// certificate.
pub fn decode_certificates(field: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let field = field.trim();
    if field.starts_with("-----BEGIN") {
        let certs: Vec<_> = CertificateDer::pem_slice_iter(field.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("certificate: not valid PEM: {e}"))?;
        if certs.is_empty() {
            return Err("certificate: no CERTIFICATE in the PEM".into());
        }
        return Ok(certs);
    }
    let der = B64
        .decode(field)
        .map_err(|e| format!("certificate: neither PEM nor base64: {e}"))?;
    Ok(vec![CertificateDer::from(der)])
}

/// Why a signing key could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The certificate or key file does not load.
    #[error(transparent)]
    File(#[from] tls::TlsError),
    /// The certificate may not sign, or the key is not its P-256 PKCS#8 key.
    #[error("{}: {reason}", path.display())]
    Key {
        path: std::path::PathBuf,
        reason: String,
    },
    /// The record has no canonical encoding.
    #[error("record {index} ({name}, {section}): {reason}")]
    Record {
        index: usize,
        name: String,
        section: String,
        reason: String,
    },
}

/// A signing certificate with its private key.
pub struct SigningKey {
    key: EcdsaKeyPair,
    cert: SignerCert,
    /// The `certificate` field written into each record: base64 of the DER.
    field: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("name", &self.cert.name)
            .field("fingerprint", &self.cert.fingerprint)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Loads a PEM certificate and its PKCS#8 PEM key.
    pub fn load(certificate: &Path, key: &Path) -> Result<Self, SignError> {
        let certs = tls::load_certs(certificate)?;
        let key_der = tls::load_key(key)?;
        let pkcs8 = match &key_der {
            PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der(),
            _ => {
                return Err(SignError::Key {
                    path: key.to_path_buf(),
                    reason: "expected a PKCS#8 key (\"BEGIN PRIVATE KEY\")".into(),
                })
            }
        };
        let cert = SignerCert::from_chain(certs).map_err(|reason| SignError::Key {
            path: certificate.to_path_buf(),
            reason,
        })?;
        Self::with_certificate(cert, pkcs8).map_err(|reason| SignError::Key {
            path: key.to_path_buf(),
            reason,
        })
    }

    /// A signing key from DER: the certificate chain (signer first) and its PKCS#8 key.
    pub fn from_der(chain: Vec<CertificateDer<'static>>, pkcs8: &[u8]) -> Result<Self, String> {
        Self::with_certificate(SignerCert::from_chain(chain)?, pkcs8)
    }

    fn with_certificate(cert: SignerCert, pkcs8: &[u8]) -> Result<Self, String> {
        let field = B64.encode(&cert.chain[0]);
        let key = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8,
            &SystemRandom::new(),
        )
        .map_err(|e| format!("not a P-256 PKCS#8 key: {e}"))?;
        if key.public_key().as_ref() != cert.public_key.as_slice() {
            return Err(format!(
                "the key does not belong to the certificate of {}",
                cert.name
            ));
        }
        Ok(Self { key, cert, field })
    }

    /// The certificate this key signs with.
    pub fn certificate(&self) -> &SignerCert {
        &self.cert
    }

    /// Signs `records` as a run of the chain whose head is `parent` (None: they start a chain),
    /// each the parent of the next. A record without `created_at` gets the current time.
    pub fn sign(
        &self,
        records: &[Record],
        parent: Option<&str>,
    ) -> Result<Vec<SignedRecord>, SignError> {
        let rng = SystemRandom::new();
        let mut parent = parent.map(str::to_string);
        let mut out = Vec::with_capacity(records.len());
        for (index, r) in records.iter().enumerate() {
            let created_at = r.created_at.clone().unwrap_or_else(now_rfc3339);
            let content = Content {
                created_at: &created_at,
                data: &r.data,
                name: &r.name,
                parent_hash: parent.as_deref(),
                section: &r.section,
            };
            let bytes = content.encode().map_err(|e| SignError::Record {
                index,
                name: r.name.clone(),
                section: r.section.clone(),
                reason: e.to_string(),
            })?;
            let signature = self
                .key
                .sign(&rng, &bytes)
                .expect("ECDSA signing with the system RNG does not fail");
            let hash = canon::hash(&bytes);
            out.push(SignedRecord {
                name: r.name.clone(),
                section: r.section.clone(),
                data: r.data.clone(),
                created_at,
                parent_hash: parent.replace(hash.clone()),
                hash,
                signature: B64.encode(signature.as_ref()),
                certificate: self.field.clone(),
            });
        }
        Ok(out)
    }
}

/// The current UTC time in RFC 3339, to the second.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.replace_nanosecond(0)
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
        .expect("a UTC time formats as RFC 3339")
}
