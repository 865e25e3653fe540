//! `internal-server`: the demo's internal TLS server. It answers `{"message": "success"}` to GET
//! and POST on any path, over HTTP/1.1 or HTTP/2 (ALPN), with the development certificate; or,
//! with `IS_PLAIN=1`, the same over plain TCP (HTTP/1.1, and HTTP/2 with prior knowledge), as a
//! backend behind TLS ending at the private proxy.
//!
//! Environment:
//! - `IS_BIND_ADDRESS`: address to listen on, default `127.0.0.1:8888` (`127.0.0.1:0` picks a
//!   free port; the line `internal-server listening on ADDR` on stdout tells which).
//! - `IS_CERTIFICATE` / `IS_KEY`: PEM files, default `settings/dev/certs/internal-server.crt` /
//!   `.key`, relative to the working directory (the repository root in the demo).
//! - `IS_MAX_CONNECTIONS`: concurrent connections served, default 10000.
//! - `IS_PROXY_PROTOCOL`: `1` to expect a PROXY protocol v2 header before TLS on every
//!   connection (the private proxy sends one with `private.proxy_protocol: true`) and log the
//!   client address it carries.
//! - `IS_PLAIN`: `1` to serve plain HTTP instead of TLS (no certificate needed).
//!
//! # Layout
//! - [`server`]: the accept loop, one task per connection, TLS and HTTP, shutdown.
//! - [`routes`]: the answers: success, `/echo`, `/bytes/N`.
//! - [`linger`]: the lingering close that keeps a reset from cutting a response's tail.

mod linger;
mod routes;
mod server;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const DEFAULT_BIND_ADDRESS: &str = "127.0.0.1:8888";
const DEFAULT_CERTIFICATE: &str = "settings/dev/certs/internal-server.crt";
const DEFAULT_KEY: &str = "settings/dev/certs/internal-server.key";
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Exit code for bad settings or missing files (EX_CONFIG).
const EXIT_CONFIG: u8 = 64;

/// What the environment asks for.
struct Config {
    bind: SocketAddr,
    certificate: PathBuf,
    key: PathBuf,
    max_connections: usize,
    proxy_protocol: bool,
    plain: bool,
}

impl Config {
    fn from_env() -> anyhow::Result<Self> {
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
        let bind = var("IS_BIND_ADDRESS", DEFAULT_BIND_ADDRESS);
        let max = var("IS_MAX_CONNECTIONS", &DEFAULT_MAX_CONNECTIONS.to_string());
        Ok(Self {
            bind: bind
                .parse()
                .with_context(|| format!("IS_BIND_ADDRESS={bind:?} is not an IP:port address"))?,
            certificate: var("IS_CERTIFICATE", DEFAULT_CERTIFICATE).into(),
            key: var("IS_KEY", DEFAULT_KEY).into(),
            max_connections: max
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .with_context(|| format!("IS_MAX_CONNECTIONS={max:?} is not a positive number"))?,
            proxy_protocol: matches!(var("IS_PROXY_PROTOCOL", "0").as_str(), "1" | "true" | "yes"),
            plain: matches!(var("IS_PLAIN", "0").as_str(), "1" | "true" | "yes"),
        })
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    eps_core::logging::init("info");
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => return fail(EXIT_CONFIG, &format!("{e:#}")),
    };
    let tls = if config.plain {
        None
    } else {
        match tls_config(&config) {
            Ok(t) => Some(t),
            Err(e) => return fail(EXIT_CONFIG, &format!("{e:#}")),
        }
    };
    let listener = match TcpListener::bind(config.bind).await {
        Ok(l) => l,
        Err(e) => return fail(1, &format!("cannot listen on {}: {e}", config.bind)),
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => return fail(1, &format!("cannot read the bound address: {e}")),
    };
    // Tests and scripts read this line to learn the port; keep its wording.
    println!("internal-server listening on {addr}");
    let _ = std::io::stdout().flush();
    let what = if config.plain { "plain HTTP" } else { "HTTPS" };
    tracing::info!(%addr, max_connections = config.max_connections, "serving {what}");

    let shutdown = CancellationToken::new();
    tokio::spawn(server::cancel_on_signal(shutdown.clone()));
    server::serve(
        listener,
        tls,
        config.max_connections,
        config.proxy_protocol,
        shutdown,
    )
    .await;
    ExitCode::SUCCESS
}

/// Loads the certificate and key; a missing file means the development PKI was not made.
fn tls_config(config: &Config) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    for (path, what) in [(&config.certificate, "certificate"), (&config.key, "key")] {
        if !path.exists() {
            anyhow::bail!(
                "{what} {} not found: run `make certs` (or `eps certs`) from the repository \
                 root to create the development certificates, or set IS_CERTIFICATE and IS_KEY",
                display(path)
            );
        }
    }
    let certs = eps_core::tls::load_certs(&config.certificate)?;
    let key = eps_core::tls::load_key(&config.key)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(eps_core::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "{} and {}",
                display(&config.certificate),
                display(&config.key)
            )
        })?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("internal-server: {message}");
    ExitCode::from(code)
}
