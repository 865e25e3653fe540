//! What the ACME client keeps on the private host, in `private.acme.storage` (created 0700):
//!
//! - `account.json`: the ACME server's directory URL and the account's credentials (its private
//!   key included); an account belongs to one directory, so a new URL makes a new account;
//! - `DOMAIN.pem`: the domain's private key, then its certificate chain.
//!
//! Every file is written whole (a temporary file 0600 beside it, fsync, rename), so a crash
//! leaves the old or the new version, and no other user can read a key.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use instant_acme::AccountCredentials;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};

/// Why a file of the storage could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct StorageError {
    pub path: PathBuf,
    pub reason: String,
}

/// The storage folder.
#[derive(Debug, Clone)]
pub struct Storage {
    dir: PathBuf,
}

/// `account.json`.
#[derive(Serialize, Deserialize)]
struct StoredAccount {
    directory_url: String,
    credentials: AccountCredentials,
}

impl Storage {
    /// Opens the folder, creating it 0700 when missing.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| err(dir, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn account_path(&self) -> PathBuf {
        self.dir.join("account.json")
    }

    /// The file of `domain`'s key and certificate chain.
    pub fn certificate_path(&self, domain: &str) -> PathBuf {
        // Host names hold no '/'; a '*' of a wildcard name is kept out of file names anyway.
        self.dir
            .join(format!("{}.pem", domain.replace('*', "_wildcard_")))
    }

    /// The stored account credentials for `directory_url`, if any.
    pub fn account(&self, directory_url: &str) -> Result<Option<AccountCredentials>, StorageError> {
        let path = self.account_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err(&path, e)),
        };
        let stored: StoredAccount = serde_json::from_slice(&bytes)
            .map_err(|e| err(&path, format!("not an account file: {e}")))?;
        Ok((stored.directory_url == directory_url).then_some(stored.credentials))
    }

    /// Stores the account of `directory_url`, replacing any other.
    pub fn save_account(
        &self,
        directory_url: &str,
        credentials: AccountCredentials,
    ) -> Result<(), StorageError> {
        let stored = StoredAccount {
            directory_url: directory_url.to_string(),
            credentials,
        };
        let bytes = serde_json::to_vec_pretty(&stored).expect("credentials serialize");
        write_private(&self.account_path(), &bytes)
    }

    /// The stored key and chain of `domain`, if any; a file that does not load is an error.
    pub fn certificate(&self, domain: &str) -> Result<Option<Arc<CertifiedKey>>, StorageError> {
        let path = self.certificate_path(domain);
        let pem = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err(&path, e)),
        };
        certified_key(&pem)
            .map(Some)
            .map_err(|reason| err(&path, reason))
    }

    /// Stores `domain`'s key and chain (PEM, the key first).
    pub fn save_certificate(
        &self,
        domain: &str,
        key_pem: &str,
        chain_pem: &str,
    ) -> Result<(), StorageError> {
        let mut pem = String::with_capacity(key_pem.len() + chain_pem.len() + 1);
        pem.push_str(key_pem.trim_end());
        pem.push('\n');
        pem.push_str(chain_pem);
        write_private(&self.certificate_path(domain), pem.as_bytes())
    }
}

/// A key and chain in one PEM text, checked to belong together.
pub fn certified_key(pem: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad PEM: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate in the file".into());
    }
    let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("no private key: {e}"))?;
    CertifiedKey::from_der(chain, key, &eps_core::tls::provider())
        .map(Arc::new)
        .map_err(|e| format!("key and certificate do not go together: {e}"))
}

/// Writes `bytes` to `path` as a new file readable by its owner only, atomically.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // tempfile creates its files 0600.
    let mut tmp = tempfile::Builder::new()
        .prefix(".acme.tmp")
        .tempfile_in(dir)
        .map_err(|e| err(path, e))?;
    tmp.write_all(bytes).map_err(|e| err(path, e))?;
    tmp.as_file().sync_all().map_err(|e| err(path, e))?;
    tmp.persist(path).map_err(|e| err(path, e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| err(path, e))
}

fn err(path: &Path, e: impl std::fmt::Display) -> StorageError {
    StorageError {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn certificates_are_stored_private_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let s = Storage::open(&d.path().join("acme")).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d.path().join("acme")), 0o700);
        assert!(s.certificate("a.example.com").unwrap().is_none());

        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.example.com".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        s.save_certificate("a.example.com", &key.serialize_pem(), &cert.pem())
            .unwrap();
        let path = s.certificate_path("a.example.com");
        assert_eq!(mode(&path), 0o600);
        let loaded = s.certificate("a.example.com").unwrap().unwrap();
        assert_eq!(loaded.cert[0].as_ref(), cert.der().as_ref());

        // A key of another certificate: refused.
        let other = rcgen::KeyPair::generate().unwrap();
        s.save_certificate("a.example.com", &other.serialize_pem(), &cert.pem())
            .unwrap();
        assert!(s.certificate("a.example.com").is_err());
        assert!(s.account("https://acme.test/dir").unwrap().is_none());
    }
}
