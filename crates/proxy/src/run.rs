//! Wiring for `proxy run public|private`: settings, TLS, listeners, tasks, signals.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use eps_core::http::RpcClient;
use eps_core::tls;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::private::{Private, PrivateRpc};
use crate::public::{Public, PublicRpc};
use crate::settings::{DatastoreSettings, Settings};
use crate::store::FileStore;

/// Exit code for bad settings, before any port is bound.
const EXIT_BAD_SETTINGS: u8 = 64;
/// How long relays get to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Loads settings for the role and runs it until SIGINT or SIGTERM.
pub fn main(public: bool) -> ExitCode {
    eps_core::logging::init("info");
    let settings: Settings = match eps_core::settings::load_from_env("PROXY_SETTINGS") {
        Ok(s) => s,
        Err(e) => {
            eprintln!("proxy: bad settings: {e}");
            return ExitCode::from(EXIT_BAD_SETTINGS);
        }
    };
    if let Err(e) = settings.validate(public) {
        eprintln!("proxy: bad settings: {e}");
        return ExitCode::from(EXIT_BAD_SETTINGS);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        let shutdown = CancellationToken::new();
        let run = async {
            if public {
                run_public(&settings, shutdown.clone()).await
            } else {
                run_private(&settings, shutdown.clone()).await
            }
        };
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => r,
            _ = shutdown_signal() => {
                tracing::info!("shutting down");
                shutdown.cancel();
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, run).await;
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<BadSettings>() => {
            eprintln!("proxy: bad settings: {e:#}");
            ExitCode::from(EXIT_BAD_SETTINGS)
        }
        Err(e) => {
            tracing::error!("proxy failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Marks errors that come from settings (exit 64) rather than from the system.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadSettings(String);

fn bad(e: impl std::fmt::Display) -> anyhow::Error {
    BadSettings(e.to_string()).into()
}

struct Common {
    eps: RpcClient,
    rpc_tls: Option<Arc<rustls::ServerConfig>>,
    store: FileStore,
}

fn common(s: &Settings) -> anyhow::Result<Common> {
    let eps = RpcClient::new(&s.eps.url, s.eps.tls.as_ref(), s.eps.timeout)
        .map_err(|e| bad(format!("eps: {e}")))?;
    let rpc_tls = s
        .jsonrpc_server
        .tls
        .as_ref()
        .map(|t| tls::server_config(t, &[b"h2", b"http/1.1"]))
        .transpose()
        .map_err(|e| bad(format!("jsonrpc_server.tls: {e}")))?;
    let DatastoreSettings::File { path } = &s.datastore;
    let store = FileStore::open(path).map_err(|e| bad(format!("datastore: {e}")))?;
    Ok(Common {
        eps,
        rpc_tls,
        store,
    })
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {what} {addr}"))
}

async fn run_public(s: &Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let p = s.public.as_ref().expect("validated");
    let c = common(s)?;
    let public = Arc::new(Public::new(p, c.store, c.eps.clone()).map_err(bad)?);
    let rpc = bind(s.jsonrpc_server.bind_address, "jsonrpc_server").await?;
    let clients = bind(p.bind_address, "public.bind_address").await?;
    let internal = bind(p.internal_bind_address, "public.internal_bind_address").await?;
    tracing::info!(
        name = %s.name,
        public = %clients.local_addr()?,
        internal = %internal.local_addr()?,
        jsonrpc = %rpc.local_addr()?,
        "public proxy ready"
    );
    let rpc_task = tokio::spawn(eps_core::http::serve(
        rpc,
        c.rpc_tls,
        s.jsonrpc_server.limits.clone(),
        Arc::new(PublicRpc(public.clone())),
        shutdown.clone(),
    ));
    tokio::spawn(wait_for_eps(c.eps, shutdown.clone()));
    public.run(clients, internal, shutdown).await;
    let _ = rpc_task.await;
    Ok(())
}

async fn run_private(s: &Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let p = s.private.as_ref().expect("validated");
    let c = common(s)?;
    let private = Arc::new(Private::new(p, c.store, c.eps).map_err(bad)?);
    let rpc = bind(s.jsonrpc_server.bind_address, "jsonrpc_server").await?;
    tracing::info!(
        name = %s.name,
        jsonrpc = %rpc.local_addr()?,
        internal_endpoint = %p.internal_endpoint,
        "private proxy ready"
    );
    let rpc_task = tokio::spawn(eps_core::http::serve(
        rpc,
        c.rpc_tls,
        s.jsonrpc_server.limits.clone(),
        Arc::new(PrivateRpc(private.clone())),
        shutdown.clone(),
    ));
    private.announcer(shutdown).await;
    let _ = rpc_task.await;
    Ok(())
}

/// Logs, at info, that the EPS server is awaited until it answers `_ping`.
async fn wait_for_eps(eps: RpcClient, shutdown: CancellationToken) {
    let mut wait = Duration::from_millis(250);
    loop {
        match eps
            .call::<_, serde_json::Value>("_ping", &serde_json::json!({}))
            .await
        {
            Ok(_) => {
                tracing::info!(eps = %eps.url(), "EPS server reachable");
                return;
            }
            Err(e) => tracing::info!(eps = %eps.url(), error = %e, "waiting for the EPS server"),
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
