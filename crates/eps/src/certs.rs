//! `eps certs`: the development PKI, written with the project's own code (no openssl): TLS
//! certificates, and signing certificates for the signed directory (`eps sd`).

use std::path::PathBuf;

use eps_core::pki::{self, ServerCert};

#[derive(clap::Args)]
pub struct Args {
    /// Folder for certificates and keys.
    #[arg(long, default_value = "settings/dev/certs")]
    certs_dir: PathBuf,
    /// Directory folder that receives the operators' certificate fingerprints
    /// (90-certificates.json).
    #[arg(long, default_value = "settings/dev/directory")]
    directory_dir: PathBuf,
    /// Operators to issue certificates for (repeatable).
    #[arg(long = "operator", default_values_t = ["public-proxy-1".to_string(), "private-proxy-1".to_string()])]
    operators: Vec<String>,
    /// TLS server certificates to issue, as STEM=DNS[,DNS...] (repeatable). The development
    /// directory server (`sd`) and its administrator (`sd-admin`) show theirs in TLS.
    #[arg(long = "server", default_values_t = [
        "internal-server=*.internal-server.local,internal-server.local".to_string(),
        "sd=sd".to_string(),
        "sd-admin=sd-admin".to_string(),
    ])]
    servers: Vec<String>,
    /// Signing certificates to issue beside the operators' own (`NAME-signing.crt`), e.g. the
    /// directory administrators' (repeatable).
    #[arg(long = "signer", default_values_t = ["sd-admin".to_string()])]
    signers: Vec<String>,
    /// Make everything anew, replacing existing keys and certificates.
    #[arg(long)]
    force: bool,
}

pub fn run(a: Args) -> Result<(), crate::Failure> {
    let mut servers = Vec::new();
    for s in &a.servers {
        let Some((stem, names)) = s.split_once('=') else {
            return Err(crate::Failure::Usage(format!(
                "eps certs: --server {s:?}: expected STEM=DNS[,DNS...]"
            )));
        };
        servers.push(ServerCert {
            stem: stem.to_string(),
            dns_names: names.split(',').map(str::to_string).collect(),
        });
    }
    let report =
        pki::ensure(&a.certs_dir, &a.operators, &servers, None, a.force).and_then(|mut r| {
            // A new root makes every signing certificate anew too.
            let new_root = r.written.contains(&a.certs_dir.join(pki::ROOT_CERT));
            let names: Vec<String> = a.operators.iter().chain(&a.signers).cloned().collect();
            let signing = pki::ensure_signers(&a.certs_dir, &names, a.force || new_root)?;
            r.written.extend(signing.written);
            r.kept.extend(signing.kept);
            r.signing = signing.signing;
            // Operators' signing certificates are pinned in the directory; administrators are
            // named in the readers' settings instead.
            let operators_signing: Vec<_> = r
                .signing
                .iter()
                .filter(|(name, _)| a.operators.contains(name))
                .cloned()
                .collect();
            pki::write_pins(&a.directory_dir, &r.fingerprints, &operators_signing)?;
            Ok(r)
        });
    match report {
        Ok(r) => {
            for p in &r.written {
                println!("wrote {}", p.display());
            }
            if !r.kept.is_empty() {
                println!(
                    "kept {} existing files in {} (use --force to make them anew)",
                    r.kept.len(),
                    a.certs_dir.display()
                );
            }
            println!(
                "wrote certificate records (TLS and signing pins) to {}",
                a.directory_dir
                    .join(pki::CERTIFICATES_RECORD_FILE)
                    .display()
            );
            Ok(())
        }
        Err(e) => Err(crate::Failure::Failed(format!("eps certs: {e}"))),
    }
}
