//! What every system shares: the work folder, the binaries, the certificates (made by the
//! project's own `eps_core::pki`) and the one internal TLS server, which is also the `direct`
//! system; and the same server in plain mode, the backend of eps's terminated domain.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use eps_core::pki::{self, ServerCert};
use eps_core::tls::TlsSettings;

use crate::procs::Proc;

/// The operators that get certificates: the demo's two and the RPC benchmark's pair.
pub const OPERATORS: [&str; 4] = ["public-proxy-1", "private-proxy-1", "rpc-a", "rpc-b"];
/// What the internal server prints once it listens.
const LISTENING: &str = "internal-server listening on ";
/// Connections the internal server serves at once (idle ones of every relay included).
const SERVER_MAX_CONNECTIONS: &str = "15000";
/// Log level of the Rust processes measured: their default, and no line per connection.
pub const RUST_LOG: &str = "info";

pub struct Env {
    /// Temporary folder for settings, data and logs.
    pub work: PathBuf,
    /// Where `eps`, `proxy` and `internal-server` were built.
    pub bins: PathBuf,
    /// Certificates: root CA, operators, `internal-server`.
    pub certs: PathBuf,
    /// (operator, certificate fingerprint) for the directories' pins.
    pub fingerprints: Vec<(String, String)>,
    pub server_addr: SocketAddr,
    pub server_pid: u32,
    /// The internal server in plain mode (`IS_PLAIN=1`): behind eps's domain whose TLS ends
    /// at the private proxy.
    pub plain_addr: SocketAddr,
    /// eps in its dialed form (`--eps-dialed`) rather than the firewalled one.
    pub eps_dialed: bool,
    /// `worker_threads` of each eps process, if set.
    pub eps_worker_threads: Option<std::num::NonZeroUsize>,
    _server: Proc,
    _plain: Proc,
}

impl Env {
    /// Issues the certificates in `work` and starts the internal server.
    pub async fn start(work: &Path) -> anyhow::Result<Self> {
        let bins = std::env::current_exe()?
            .parent()
            .context("the benchmark's folder")?
            .to_path_buf();
        let certs = work.join("certs");
        let operators: Vec<String> = OPERATORS.iter().map(|s| s.to_string()).collect();
        let server = ServerCert {
            stem: "internal-server".into(),
            dns_names: vec![
                "*.internal-server.local".into(),
                "internal-server.local".into(),
            ],
        };
        let report = pki::ensure(&certs, &operators, &[server], None, false)
            .context("issuing certificates")?;
        let program = bin(&bins, "internal-server")?;
        let tls = [
            (
                "IS_CERTIFICATE",
                path_str(&certs.join("internal-server.crt")),
            ),
            ("IS_KEY", path_str(&certs.join("internal-server.key"))),
        ];
        let (server, server_addr) = start_server(&program, work, "internal-server", tls).await?;
        let plain_env = [("IS_PLAIN", "1".to_string())];
        let (plain, plain_addr) =
            start_server(&program, work, "internal-server-plain", plain_env).await?;
        Ok(Self {
            work: work.to_path_buf(),
            bins,
            certs,
            fingerprints: report.fingerprints,
            server_addr,
            server_pid: server.pid(),
            plain_addr,
            eps_dialed: false,
            eps_worker_threads: None,
            _server: server,
            _plain: plain,
        })
    }

    /// The workspace binary `name`, built next to the benchmark.
    pub fn bin(&self, name: &str) -> anyhow::Result<PathBuf> {
        bin(&self.bins, name)
    }

    /// The log file of process `name`.
    pub fn log(&self, name: &str) -> PathBuf {
        self.work.join(format!("{name}.log"))
    }

    /// The root CA certificate.
    pub fn root(&self) -> PathBuf {
        self.certs.join(pki::ROOT_CERT)
    }

    /// `name`'s certificate and key, trusting the root; `verify_client` as given.
    pub fn tls(&self, name: &str, verify_client: bool) -> TlsSettings {
        TlsSettings {
            ca_certificate: self.root(),
            certificate: self.certs.join(format!("{name}.crt")),
            key: self.certs.join(format!("{name}.key")),
            verify_client,
        }
    }
}

/// Starts `internal-server` as `name` with `env` added, and waits for its address.
async fn start_server<const N: usize>(
    program: &Path,
    work: &Path,
    name: &str,
    env: [(&str, String); N],
) -> anyhow::Result<(Proc, SocketAddr)> {
    let log = work.join(format!("{name}.log"));
    let mut vars = vec![
        ("IS_BIND_ADDRESS", "127.0.0.1:0".to_string()),
        ("IS_MAX_CONNECTIONS", SERVER_MAX_CONNECTIONS.into()),
        ("RUST_LOG", RUST_LOG.into()),
    ];
    vars.extend(env);
    let mut server = Proc::start(name, program, [""; 0], vars, &log)?;
    let mut addr = None;
    eps_testkit::wait_until(Duration::from_secs(30), || {
        addr = std::fs::read_to_string(&log).ok().and_then(|text| {
            let line = text.lines().find_map(|l| l.strip_prefix(LISTENING))?;
            line.trim().parse().ok()
        });
        let found = addr.is_some() || server.check_running().is_err();
        async move { found }
    })
    .await;
    server.check_running()?;
    match addr {
        Some(a) => Ok((server, a)),
        None => bail!("{name} did not print {LISTENING:?} within 30 s"),
    }
}

fn bin(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: build it first (`cargo build --release -p eps -p proxy -p \
             internal-server`, which `make bench` does)",
            path.display()
        );
    }
    Ok(path)
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}
