//! `eps certs`: the development PKI, written with the project's own code (no openssl).

use std::path::PathBuf;
use std::process::ExitCode;

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
    /// TLS server certificates to issue, as STEM=DNS[,DNS...] (repeatable).
    #[arg(long = "server", default_values_t = ["internal-server=*.internal-server.local,internal-server.local".to_string()])]
    servers: Vec<String>,
    /// Make everything anew, replacing existing keys and certificates.
    #[arg(long)]
    force: bool,
}

pub fn run(a: Args) -> ExitCode {
    let mut servers = Vec::new();
    for s in &a.servers {
        let Some((stem, names)) = s.split_once('=') else {
            eprintln!("eps certs: --server {s:?}: expected STEM=DNS[,DNS...]");
            return ExitCode::from(64);
        };
        servers.push(ServerCert {
            stem: stem.to_string(),
            dns_names: names.split(',').map(str::to_string).collect(),
        });
    }
    match pki::ensure(
        &a.certs_dir,
        &a.operators,
        &servers,
        Some(&a.directory_dir),
        a.force,
    ) {
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
                "wrote certificate records to {}",
                a.directory_dir
                    .join(pki::CERTIFICATES_RECORD_FILE)
                    .display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("eps certs: {e}");
            ExitCode::FAILURE
        }
    }
}
