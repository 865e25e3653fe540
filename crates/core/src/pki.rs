//! The development PKI: a root CA, one certificate per operator (CN and DNS name = operator
//! name, ECDSA P-256), TLS server certificates such as the internal server's, and signing
//! certificates for the signed directory (`{name}-signing.crt`: CN = name, key usage
//! digitalSignature only, no extended key usage and no alternative names).
//!
//! Files already present are kept (so fingerprints pinned in the directory stay valid) unless
//! `force` is set. Certificates also name `localhost`, 127.0.0.1 and ::1 so that local links
//! can be called by address; identity is taken from the common name only.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::{json, Value};

use crate::tls;

/// File name of the root CA certificate in a certs folder.
pub const ROOT_CERT: &str = "root.crt";
/// The root CA's private key, beside [`ROOT_CERT`].
pub const ROOT_KEY: &str = "root.key";
/// File name of the certificates record the PKI writes into the directory folder.
pub const CERTIFICATES_RECORD_FILE: &str = "90-certificates.json";
/// Suffix of a signing certificate's file stem: `alice-signing.crt`, `alice-signing.key`.
pub const SIGNING_SUFFIX: &str = "-signing";

/// The file stem of `name`'s signing certificate and key.
pub fn signing_stem(name: &str) -> String {
    format!("{name}{SIGNING_SUFFIX}")
}

/// Why the PKI could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{}: {reason}", path.display())]
    Io { path: PathBuf, reason: String },
    /// rcgen refused (bad name, unparsable existing certificate or key).
    #[error("generating {what}: {reason}")]
    Generate { what: String, reason: String },
}

/// A TLS server certificate to issue: file stem and the DNS names it carries.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub stem: String,
    pub dns_names: Vec<String>,
}

/// What [`ensure`] did.
#[derive(Debug, Default)]
pub struct Report {
    pub written: Vec<PathBuf>,
    pub kept: Vec<PathBuf>,
    /// (operator, fingerprint) of every operator certificate, written or kept.
    pub fingerprints: Vec<(String, String)>,
    /// (name, fingerprint) of every signing certificate, written or kept.
    pub signing: Vec<(String, String)>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> PkiError {
    PkiError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn gen(what: &str, e: impl std::fmt::Display) -> PkiError {
    PkiError::Generate {
        what: what.to_string(),
        reason: e.to_string(),
    }
}

/// Makes sure `certs_dir` holds a root CA, a certificate for each operator and each server
/// certificate. With `directory_dir`, also writes the operators' `certificates` records there.
pub fn ensure(
    certs_dir: &Path,
    operators: &[String],
    servers: &[ServerCert],
    directory_dir: Option<&Path>,
    force: bool,
) -> Result<Report, PkiError> {
    std::fs::create_dir_all(certs_dir).map_err(|e| io(certs_dir, e))?;
    let mut report = Report::default();
    let root_crt = certs_dir.join(ROOT_CERT);
    let root_key = certs_dir.join(ROOT_KEY);
    let force_leaves = force || !(root_crt.exists() && root_key.exists());
    let (issuer_key, issuer_pem) = if force_leaves {
        let key = KeyPair::generate().map_err(|e| gen("root key", e))?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "eps development root CA");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "eps development");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(|e| gen("root", e))?;
        write(&root_crt, cert.pem().as_bytes(), false)?;
        write(&root_key, key.serialize_pem().as_bytes(), true)?;
        report.written.extend([root_crt.clone(), root_key.clone()]);
        (key, cert.pem())
    } else {
        let key_pem = std::fs::read_to_string(&root_key).map_err(|e| io(&root_key, e))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| gen("root key", e))?;
        let pem = std::fs::read_to_string(&root_crt).map_err(|e| io(&root_crt, e))?;
        report.kept.extend([root_crt.clone(), root_key.clone()]);
        (key, pem)
    };
    let issuer = Issuer::from_ca_cert_pem(&issuer_pem, issuer_key).map_err(|e| gen("root", e))?;

    for op in operators {
        let crt = certs_dir.join(format!("{op}.crt"));
        let path = leaf(
            &issuer,
            certs_dir,
            op,
            op,
            std::slice::from_ref(op),
            false,
            force_leaves,
            &mut report,
        )?;
        debug_assert_eq!(path, crt);
        let der = tls::load_certs(&crt).map_err(|e| io(&crt, e))?;
        report
            .fingerprints
            .push((op.clone(), tls::fingerprint(&der[0])));
    }
    for s in servers {
        let cn = s
            .dns_names
            .first()
            .cloned()
            .unwrap_or_else(|| s.stem.clone());
        leaf(
            &issuer,
            certs_dir,
            &s.stem,
            &cn,
            &s.dns_names,
            false,
            force_leaves,
            &mut report,
        )?;
    }
    if let Some(dir) = directory_dir {
        write_certificate_records(dir, &report.fingerprints)?;
    }
    Ok(report)
}

/// Issues `{stem}.crt` / `{stem}.key` unless both exist and `force` is off: a TLS certificate
/// (server and client) for `dns_names`, or with `signing` a signing certificate.
#[allow(clippy::too_many_arguments)]
fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    dir: &Path,
    stem: &str,
    common_name: &str,
    dns_names: &[String],
    signing: bool,
    force: bool,
    report: &mut Report,
) -> Result<PathBuf, PkiError> {
    let crt = dir.join(format!("{stem}.crt"));
    let key_path = dir.join(format!("{stem}.key"));
    if !force && crt.exists() && key_path.exists() {
        report.kept.extend([crt.clone(), key_path]);
        return Ok(crt);
    }
    let key = KeyPair::generate().map_err(|e| gen(stem, e))?;
    let mut params = if signing {
        CertificateParams::new(Vec::<String>::new()).map_err(|e| gen(stem, e))?
    } else {
        let mut names = dns_names.to_vec();
        names.push("localhost".into());
        let mut params = CertificateParams::new(names).map_err(|e| gen(stem, e))?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params
    };
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params.signed_by(&key, issuer).map_err(|e| gen(stem, e))?;
    write(&crt, cert.pem().as_bytes(), false)?;
    write(&key_path, key.serialize_pem().as_bytes(), true)?;
    report.written.extend([crt.clone(), key_path]);
    Ok(crt)
}

/// Makes sure `certs_dir` holds a signing certificate and key (`{name}-signing.crt`, `.key`)
/// for each of `names`, issued by the root CA already there ([`ensure`] first). With `force`,
/// existing ones are made anew.
pub fn ensure_signers(certs_dir: &Path, names: &[String], force: bool) -> Result<Report, PkiError> {
    let root_crt = certs_dir.join(ROOT_CERT);
    let root_key = certs_dir.join(ROOT_KEY);
    let key_pem = std::fs::read_to_string(&root_key).map_err(|e| io(&root_key, e))?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| gen("root key", e))?;
    let pem = std::fs::read_to_string(&root_crt).map_err(|e| io(&root_crt, e))?;
    let issuer = Issuer::from_ca_cert_pem(&pem, key).map_err(|e| gen("root", e))?;
    let mut report = Report::default();
    for name in names {
        let stem = signing_stem(name);
        let crt = leaf(
            &issuer,
            certs_dir,
            &stem,
            name,
            &[],
            true,
            force,
            &mut report,
        )?;
        let der = tls::load_certs(&crt).map_err(|e| io(&crt, e))?;
        report
            .signing
            .push((name.clone(), tls::fingerprint(&der[0])));
    }
    Ok(report)
}

/// The `certificates` records of operators: for each name in `tls` or `signing`, its TLS
/// pins (`key_usage: encryption`) and its signing pins (`key_usage: signing`), in one record.
pub fn certificate_records(
    tls: &[(String, String)],
    signing: &[(String, String)],
    created_at: &str,
) -> Vec<Value> {
    let mut pins: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for (list, usage) in [(tls, "encryption"), (signing, "signing")] {
        for (name, fp) in list {
            pins.entry(name)
                .or_default()
                .push(json!({"fingerprint": fp, "key_usage": usage}));
        }
    }
    pins.into_iter()
        .map(|(name, data)| {
            json!({
                "name": name,
                "section": "certificates",
                "data": data,
                "created_at": created_at,
            })
        })
        .collect()
}

/// Writes `{"records": [...]}` with one `certificates` record per operator (TLS pins).
pub fn write_certificate_records(
    dir: &Path,
    fingerprints: &[(String, String)],
) -> Result<PathBuf, PkiError> {
    write_pins(dir, fingerprints, &[])
}

/// Writes `{"records": [...]}` with one `certificates` record per operator, holding its TLS
/// and its signing pins.
pub fn write_pins(
    dir: &Path,
    tls: &[(String, String)],
    signing: &[(String, String)],
) -> Result<PathBuf, PkiError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let records = certificate_records(tls, signing, &now);
    let path = dir.join(CERTIFICATES_RECORD_FILE);
    let text = serde_json::to_string_pretty(&json!({ "records": records })).expect("json");
    write(&path, text.as_bytes(), false)?;
    Ok(path)
}

fn write(path: &Path, bytes: &[u8], secret: bool) -> Result<(), PkiError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path).map_err(|e| io(path, e))?;
    f.write_all(bytes).map_err(|e| io(path, e))?;
    f.sync_all().map_err(|e| io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_keeps_and_forces() {
        let d = tempfile::tempdir().unwrap();
        let ops = vec!["alice".to_string()];
        let servers = vec![ServerCert {
            stem: "web".into(),
            dns_names: vec!["*.web.local".into()],
        }];
        let r1 = ensure(d.path(), &ops, &servers, Some(d.path()), false).unwrap();
        assert_eq!(r1.written.len(), 6);
        let der = tls::load_certs(&d.path().join("alice.crt")).unwrap();
        assert_eq!(tls::operator_name(&der[0]).as_deref(), Some("alice"));
        let r2 = ensure(d.path(), &ops, &servers, None, false).unwrap();
        assert!(r2.written.is_empty());
        assert_eq!(r1.fingerprints, r2.fingerprints);
        let r3 = ensure(d.path(), &ops, &servers, None, true).unwrap();
        assert_ne!(r1.fingerprints, r3.fingerprints);
        let dir = crate::directory::Directory::load_dir(d.path()).unwrap();
        assert_eq!(dir.entry("alice").unwrap().certificates.len(), 1);
    }

    #[test]
    fn signing_certificates_sign_only_and_are_pinned_as_signing() {
        let d = tempfile::tempdir().unwrap();
        let ops = vec!["alice".to_string()];
        let tls_report = ensure(d.path(), &ops, &[], None, false).unwrap();
        let r = ensure_signers(d.path(), &["alice".into(), "admin".into()], false).unwrap();
        assert_eq!(r.written.len(), 4);
        let pem = std::fs::read_to_string(d.path().join("alice-signing.crt")).unwrap();
        let der = tls::load_certs(&d.path().join("alice-signing.crt")).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der[0]).unwrap();
        let usage = cert.key_usage().unwrap().unwrap().value;
        assert!(usage.digital_signature() && !usage.key_cert_sign());
        assert!(cert.extended_key_usage().unwrap().is_none(), "{pem}");
        assert_eq!(tls::operator_name(&der[0]).as_deref(), Some("alice"));
        let again = ensure_signers(d.path(), &["alice".into()], false).unwrap();
        assert!(again.written.is_empty());
        assert_eq!(again.signing[0], r.signing[0]);

        write_pins(d.path(), &tls_report.fingerprints, &r.signing).unwrap();
        let dir = crate::directory::Directory::load_dir(d.path()).unwrap();
        let alice = dir.entry("alice").unwrap();
        assert!(alice.pins_signing(&r.signing[0].1));
        assert!(alice.accepts_fingerprint(&tls_report.fingerprints[0].1));
        assert!(!alice.accepts_fingerprint(&r.signing[0].1));
        assert!(dir.entry("admin").unwrap().pins_signing(&r.signing[1].1));
    }
}
