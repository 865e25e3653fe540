//! `eps sd run`: the directory server. Loads its settings (`SD_SETTINGS`), verifies the chain
//! file from its first record, binds the JSON-RPC listener and serves until SIGINT or SIGTERM.

use std::sync::Arc;

use anyhow::Context as _;
use eps_core::ops;
use eps_core::sd::{Chain, ChainFile, Trust};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::service::{DirectoryService, SdMetrics, SdRpc};
use super::settings::SdSettings;
use crate::Failure;

/// `eps sd run`: loads `SD_SETTINGS`, verifies the chain and serves until SIGINT or SIGTERM.
pub fn main() -> Result<(), Failure> {
    let settings: SdSettings = eps_core::settings::load_from_env("SD_SETTINGS")
        .map_err(|e| e.to_string())
        .and_then(|s: SdSettings| s.validate().map(|()| s))
        .map_err(|e| Failure::Usage(format!("eps sd run: bad settings: {e}")))?;
    let (tls, trust) = prepare(&settings)
        .map_err(|e| Failure::Usage(format!("eps sd run: bad settings: {e:#}")))?;
    let (chain, file) =
        open_chain(&settings, &trust).map_err(|e| Failure::Failed(format!("eps sd run: {e:#}")))?;
    let rt = eps_core::net::runtime(None);
    rt.block_on(run(settings, tls, trust, chain, file))
        .map_err(|e| {
            tracing::error!("directory server failed: {e:#}");
            Failure::Logged
        })
}

type ServerTls = Option<Arc<rustls::ServerConfig>>;

fn prepare(s: &SdSettings) -> anyhow::Result<(ServerTls, Trust)> {
    let tls = s
        .jsonrpc_server
        .tls_config()
        .context("jsonrpc_server.tls")?;
    let trust = Trust::from_settings(&s.trust).context("trust")?;
    Ok((tls, trust))
}

/// Reads the chain file and verifies it whole: a directory server hands out only a chain it
/// verified itself.
fn open_chain(s: &SdSettings, trust: &Trust) -> anyhow::Result<(Chain, ChainFile)> {
    let t0 = std::time::Instant::now();
    let (file, loaded) = ChainFile::open(&s.path)?;
    let chain = Chain::verify(loaded.records, trust).with_context(|| {
        format!(
            "the chain in {} does not verify with these trust settings; fix the settings, or \
             move the file away to start an empty chain",
            s.path.display()
        )
    })?;
    tracing::info!(
        path = %s.path.display(),
        records = chain.len(),
        operators = chain.directory().len(),
        ms = t0.elapsed().as_millis() as u64,
        "chain verified"
    );
    Ok((chain, file))
}

async fn run(
    s: SdSettings,
    tls: ServerTls,
    trust: Trust,
    chain: Chain,
    file: ChainFile,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(s.jsonrpc_server.bind_address)
        .await
        .with_context(|| format!("binding jsonrpc_server {}", s.jsonrpc_server.bind_address))?;
    let ops_listener = s.metrics.bind().await.map_err(anyhow::Error::msg)?;
    let shutdown = CancellationToken::new();
    let mut prometheus = prometheus_client::registry::Registry::default();
    let metrics = SdMetrics::new(&mut prometheus);
    let (length, head) = (chain.len(), chain.head().map(str::to_string));
    let service = Arc::new(DirectoryService::new(
        chain,
        file,
        trust,
        s.limits.clone(),
        shutdown.clone(),
        metrics,
    ));
    tracing::info!(
        jsonrpc = %listener.local_addr()?,
        records = length,
        head = head.as_deref().unwrap_or(""),
        "directory server ready"
    );
    let rpc = tokio::spawn(eps_core::http::serve(
        listener,
        tls,
        s.jsonrpc_server.limits.clone(),
        Arc::new(SdRpc(service)),
        shutdown.clone(),
    ));
    ops::spawn(
        ops_listener,
        prometheus,
        ops::ready_when_listening(),
        &shutdown,
    );
    tokio::spawn(eps_core::tls::watch(shutdown.clone()));
    eps_core::net::shutdown_signal().await;
    tracing::info!("shutting down: answering waiting followers");
    shutdown.cancel();
    let _ = tokio::time::timeout(s.shutdown_grace_period, rpc).await;
    Ok(())
}
