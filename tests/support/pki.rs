//! Certificates for tests, made by the project's own development PKI (`eps_core::pki`): a root CA
//! per [`Pki`], one certificate per operator (CN = name, SANs localhost, 127.0.0.1, ::1), and
//! signing certificates for the signed directory on demand.
//! Two `Pki`s in two folders are two unrelated CAs ("foreign" certificates).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use eps_core::pki::{self, ServerCert};
use eps_core::tls::TlsSettings;

/// A root CA and the certificates it issued, in one folder.
pub struct Pki {
    dir: PathBuf,
    fingerprints: BTreeMap<String, String>,
}

impl Pki {
    /// Issues a root CA and a certificate for each of `operators` in `dir`. With `directory`,
    /// also writes their `certificates` records (pinned fingerprints) there
    /// (`90-certificates.json`).
    pub fn new(dir: impl Into<PathBuf>, operators: &[&str], directory: Option<&Path>) -> Self {
        let dir = dir.into();
        let ops: Vec<String> = operators.iter().map(|s| s.to_string()).collect();
        let report = pki::ensure(&dir, &ops, &[], directory, false)
            .unwrap_or_else(|e| panic!("issuing test certificates in {}: {e}", dir.display()));
        Self {
            dir,
            fingerprints: report.fingerprints.into_iter().collect(),
        }
    }

    /// Issues a TLS server certificate `{stem}.crt` naming `dns_names` (plus localhost and the
    /// loopback addresses) from the same root.
    pub fn issue_server(&self, stem: &str, dns_names: &[&str]) -> TlsSettings {
        let server = ServerCert {
            stem: stem.to_string(),
            dns_names: dns_names.iter().map(|s| s.to_string()).collect(),
        };
        pki::ensure(&self.dir, &[], &[server], None, false)
            .unwrap_or_else(|e| panic!("issuing {stem} in {}: {e}", self.dir.display()));
        self.tls(stem)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The root CA certificate (PEM).
    pub fn root(&self) -> PathBuf {
        self.dir.join(pki::ROOT_CERT)
    }

    /// The certificate (PEM) of `name`.
    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.crt"))
    }

    /// The private key (PEM) of `name`.
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    /// SHA-256 of `name`'s certificate, lowercase hex, as the directory pins it.
    pub fn fingerprint(&self, name: &str) -> &str {
        self.fingerprints
            .get(name)
            .unwrap_or_else(|| panic!("no operator certificate for {name} in this PKI"))
    }

    /// Issues (once) `name`'s signing certificate (`{name}-signing.crt`, `.key`) from this root
    /// and returns its certificate and key files.
    pub fn issue_signing(&self, name: &str) -> (PathBuf, PathBuf) {
        pki::ensure_signers(&self.dir, &[name.to_string()], false)
            .unwrap_or_else(|e| panic!("issuing {name}'s signing certificate: {e}"));
        let stem = pki::signing_stem(name);
        (
            self.dir.join(format!("{stem}.crt")),
            self.dir.join(format!("{stem}.key")),
        )
    }

    /// `name`'s signing key (issued first if needed).
    pub fn signing_key(&self, name: &str) -> eps_core::sd::SigningKey {
        let (cert, key) = self.issue_signing(name);
        eps_core::sd::SigningKey::load(&cert, &key)
            .unwrap_or_else(|e| panic!("loading {name}'s signing key: {e}"))
    }

    /// `name`'s certificate and key, trusting this root; `verify_client` off.
    pub fn tls(&self, name: &str) -> TlsSettings {
        TlsSettings {
            ca_certificate: self.root(),
            certificate: self.cert(name),
            key: self.key(name),
            verify_client: false,
        }
    }

    /// Like [`tls`](Self::tls), for a server that requires client certificates from this root.
    pub fn tls_verifying(&self, name: &str) -> TlsSettings {
        TlsSettings {
            verify_client: true,
            ..self.tls(name)
        }
    }
}
