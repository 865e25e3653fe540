//! An EPS server inside another process, the proxy of its operator (`eps: {embedded: DIRS}` in
//! the proxy's settings).
//!
//! It is the server of `eps server run`, with the same settings files, the same listeners (gRPC
//! for peers, JSON-RPC for other local clients such as `eps call`) and the same directory
//! handling. Only the local link to the proxy changes: both ways it is a function call
//! ([`eps_core::link::Link::InProcess`]) instead of JSON-RPC over loopback TLS, which removes a
//! TLS connection's records, an HTTP exchange and a process wake-up from every call between
//! the two. The proxy's runtime, metrics listener, signals and shutdown serve both.

use std::path::PathBuf;
use std::sync::Arc;

use eps_core::link::{InProcess, Link, Served};
use tokio_util::sync::CancellationToken;

use crate::broker::LocalHandler;
use crate::server::{self, Prepared, Running};
use crate::settings::Settings;

/// Settings of an embedded EPS server, read and checked before anything is bound.
pub struct Loaded {
    settings: Settings,
    prepared: Prepared,
}

/// Reads the EPS server settings in `dirs` (like `EPS_SETTINGS`), checks them, and loads what
/// the server needs before it binds (directory, TLS material). The error names the file or key
/// at fault.
pub fn load(dirs: &[PathBuf]) -> Result<Loaded, String> {
    let settings = read(dirs)?;
    let prepared = server::prepare(&settings).map_err(|e| format!("{e:#}"))?;
    Ok(Loaded { settings, prepared })
}

/// What `proxy settings check` runs: the settings in `dirs` and their directory, checked as
/// `eps settings check` checks them (a followed directory's copy is only read: no file is
/// written); gives the server's operator name.
pub fn check(dirs: &[PathBuf]) -> Result<String, String> {
    let settings = read(dirs)?;
    crate::cli::load_directory(&settings).map_err(|e| format!("bad directory: {e:#}"))?;
    Ok(settings.name)
}

/// The settings in `dirs`, checked; warns of those an embedded server does not use.
fn read(dirs: &[PathBuf]) -> Result<Settings, String> {
    let settings: Settings = eps_core::settings::load_dirs(dirs).map_err(|e| e.to_string())?;
    settings.validate()?;
    if settings.jsonrpc_client.is_some() {
        tracing::warn!("jsonrpc_client is not used by an embedded EPS server: it delivers to its proxy in-process");
    }
    if settings.metrics.bind_address.is_some() {
        tracing::warn!("metrics.bind_address is not used by an embedded EPS server: its metrics are on the proxy's metrics listener");
    }
    if settings.worker_threads.is_some() {
        tracing::warn!(
            "worker_threads is not used by an embedded EPS server: it runs on the proxy's threads"
        );
    }
    Ok(settings)
}

/// A running embedded EPS server.
pub struct Embedded {
    running: Running,
}

impl Loaded {
    /// This server's operator name (the proxy's must be the same).
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// Binds the server's listeners and starts it. Calls from peers are delivered over
    /// `deliveries`; `to_server`, the proxy's way into the EPS network, is connected to the
    /// server here. Both links may have been handed out before (the proxy is built with them);
    /// connecting the proxy's end of `deliveries` before this call means that no call finds
    /// either end missing. Everything stops when `shutdown` is cancelled.
    pub async fn start(
        self,
        deliveries: InProcess,
        to_server: &InProcess,
        prometheus: &mut prometheus_client::registry::Registry,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Embedded> {
        let running = server::start(
            &self.settings,
            self.prepared,
            Link::InProcess(deliveries),
            prometheus,
            shutdown,
        )
        .await?;
        // The broker's JSON-RPC handler, as the listener calls it.
        to_server.connect(Arc::new(Served(Arc::new(LocalHandler(
            running.broker.clone(),
        )))));
        Ok(Embedded { running })
    }

    /// The deadline of the server's deliveries to the proxy (`grpc_client.call_timeout`).
    pub fn call_timeout(&self) -> std::time::Duration {
        self.settings.grpc_client.call_timeout
    }
}

impl Embedded {
    /// Lets the calls in flight finish after the shutdown token, up to the server's grace period.
    pub async fn finish(self) {
        self.running.finish().await
    }
}
