//! Wiring for `proxy run public|private`: settings, TLS, listeners, tasks, signals.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use eps_core::backoff::Backoff;
use eps_core::http::RpcClient;
use eps_core::jsonrpc;
use eps_core::net::shutdown_signal;
use eps_core::ops;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::private::{Private, PrivateRpc};
use crate::public::{Public, PublicRpc};
use crate::registry::Registry;
use crate::settings::{
    DatastoreSettings, PrivateSettings, PublicSettings, Role, RoleSettings, Settings,
};
use crate::store::FileStore;

/// Why a proxy did not run, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The settings are unusable; nothing was bound.
    #[error("bad settings: {0}")]
    BadSettings(String),
    /// The system failed it (a port taken, Redis unreachable at start, ...).
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

/// Loads PROXY_SETTINGS and checks them for `role`.
fn load(role: Role) -> Result<Settings, RunError> {
    let settings: Settings = eps_core::settings::load_from_env("PROXY_SETTINGS")
        .map_err(|e| RunError::BadSettings(e.to_string()))?;
    settings.validate(role).map_err(RunError::BadSettings)?;
    Ok(settings)
}

/// `proxy settings check ROLE`: the merged settings as YAML (secrets masked), if they are good.
pub fn check(role: Role) -> Result<String, RunError> {
    let s = load(role)?;
    Ok(serde_yaml_ng::to_string(&s).expect("settings serialize"))
}

/// Loads settings for the role and runs it until SIGINT or SIGTERM.
pub fn main(role: Role) -> Result<(), RunError> {
    let settings = load(role)?;
    let rt = eps_core::net::runtime(settings.worker_threads);
    let result = rt.block_on(async {
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let run = async {
            match settings.validate(role).map_err(bad)? {
                RoleSettings::Public(p) => {
                    run_public(&settings, p, tracker.clone(), shutdown.clone()).await
                }
                RoleSettings::Private(p) => {
                    run_private(&settings, p, tracker.clone(), shutdown.clone()).await
                }
            }
        };
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => return r,
            _ = shutdown_signal() => {}
        }
        // `run` is polled while draining: its accept loops must see the cancellation and drop
        // their listeners, so that new clients are refused instead of waiting in the backlog.
        let drained = drain(&settings, &tracker, &shutdown);
        tokio::pin!(drained);
        tokio::select! {
            _ = &mut drained => {
                let _ = tokio::time::timeout(Duration::from_secs(1), run).await;
            }
            _ = &mut run => drained.await,
        }
        Ok(())
    });
    result.map_err(|e| match e.downcast::<BadSettings>() {
        Ok(BadSettings(text)) => RunError::BadSettings(text),
        Err(e) => RunError::Failed(e),
    })
}

/// Stops accepting and lets relays finish, up to the grace period or a second signal.
async fn drain(s: &Settings, tracker: &TaskTracker, shutdown: &CancellationToken) {
    let grace = s.shutdown_grace_period;
    tracing::info!(
        relays = tracker.len(),
        grace_s = grace.as_secs_f64(),
        "shutting down: no new connections; waiting for relays"
    );
    shutdown.cancel();
    tracker.close();
    tokio::select! {
        _ = tracker.wait() => tracing::info!("all relays finished"),
        _ = tokio::time::sleep(grace) => {
            tracing::info!(relays = tracker.len(), "grace period over; closing the remaining relays")
        }
        _ = shutdown_signal() => {
            tracing::info!(relays = tracker.len(), "second signal; closing the remaining relays now")
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
}

fn common(s: &Settings) -> anyhow::Result<Common> {
    let eps = RpcClient::new(&s.eps.url, s.eps.tls.as_ref(), s.eps.timeout)
        .map_err(|e| bad(format!("eps: {e}")))?;
    let rpc_tls = s
        .jsonrpc_server
        .tls_config()
        .map_err(|e| bad(format!("jsonrpc_server.tls: {e}")))?;
    Ok(Common { eps, rpc_tls })
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {what} {addr}"))
}

async fn run_public(
    s: &Settings,
    p: &PublicSettings,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let c = common(s)?;
    let registry = Registry::open(&s.datastore).map_err(|e| bad(format!("datastore: {e}")))?;
    let mut prometheus = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::new(&mut prometheus));
    let public = Arc::new(Public::new(p, registry, c.eps.clone(), metrics));
    let rpc = bind(s.jsonrpc_server.bind_address, "jsonrpc_server").await?;
    let clients = bind(p.bind_address, "public.bind_address").await?;
    let internal = bind(p.internal_bind_address, "public.internal_bind_address").await?;
    let ops = bind_ops(s).await?;
    tracing::info!(
        name = %s.name,
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
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
    serve_ops(ops, prometheus, &c.eps, &shutdown);
    tokio::spawn(reload_on_hangup(None, shutdown.clone()));
    tokio::spawn(eps_core::tls::watch(shutdown.clone()));
    tokio::spawn(wait_for_eps(c.eps, shutdown.clone()));
    public.run(clients, internal, tracker, shutdown).await;
    let _ = rpc_task.await;
    Ok(())
}

async fn run_private(
    s: &Settings,
    p: &PrivateSettings,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let c = common(s)?;
    let DatastoreSettings::File { path } = &s.datastore else {
        return Err(bad(
            "datastore: the private proxy keeps its announcements in a file",
        ));
    };
    let store = FileStore::open(path).map_err(|e| bad(format!("datastore: {e}")))?;
    let mut prometheus = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::new(&mut prometheus));
    let private = Arc::new(Private::new(p, store, c.eps.clone(), metrics, tracker).map_err(bad)?);
    let rpc = bind(s.jsonrpc_server.bind_address, "jsonrpc_server").await?;
    let ops = bind_ops(s).await?;
    tracing::info!(
        name = %s.name,
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
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
    serve_ops(ops, prometheus, &c.eps, &shutdown);
    tokio::spawn(reload_on_hangup(Some(private.clone()), shutdown.clone()));
    tokio::spawn(eps_core::tls::watch(shutdown.clone()));
    private.announcer(shutdown).await;
    let _ = rpc_task.await;
    Ok(())
}

/// On SIGHUP, re-reads PROXY_SETTINGS; a private proxy takes its announcements from them
/// (`private` is `Some`), a public one only checks them (its listeners and limits take effect
/// at restart; what it routes comes from announcements, not settings). Relays are untouched.
/// Bad settings are logged and the current ones kept. (Certificates, keys and CA files are
/// re-read by [`eps_core::tls::watch`], on SIGHUP too.)
async fn reload_on_hangup(private: Option<Arc<Private>>, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    loop {
        tokio::select! {
            _ = hup.recv() => {}
            _ = shutdown.cancelled() => return,
        }
        let role = if private.is_some() {
            Role::Private
        } else {
            Role::Public
        };
        let outcome = match (&private, load(role)) {
            (_, Err(e)) => Err(e.to_string()),
            (Some(p), Ok(s)) => match s.validate(role) {
                Ok(RoleSettings::Private(fresh)) => p.reload(fresh).map_err(|e| e.to_string()),
                _ => unreachable!("checked for the private role"),
            },
            (None, Ok(_)) => Ok(0),
        };
        match outcome {
            Ok(n) if private.is_some() => tracing::info!(announcements = n, "settings reloaded"),
            Ok(_) => tracing::info!(
                "settings checked; a public proxy's listeners and limits change at restart"
            ),
            Err(e) => tracing::error!("settings not reloaded, keeping the current ones: {e}"),
        }
    }
}

async fn bind_ops(s: &Settings) -> anyhow::Result<Option<TcpListener>> {
    s.metrics.bind().await.map_err(anyhow::Error::msg)
}

/// Serves `/metrics`, `/healthz` and `/readyz` (ready when the EPS server answers `_ping`).
fn serve_ops(
    listener: Option<TcpListener>,
    prometheus: prometheus_client::registry::Registry,
    eps: &RpcClient,
    shutdown: &CancellationToken,
) {
    let eps = eps.clone();
    let ready: ops::ReadyCheck = Arc::new(move || {
        let eps = eps.clone();
        Box::pin(async move {
            eps.call_with_deadline(
                jsonrpc::PING,
                &jsonrpc::to_raw(&serde_json::json!({})),
                ops::READY_TIMEOUT,
            )
            .await
            .map(|_| ())
            .map_err(|e| format!("EPS server: {e}"))
        })
    });
    ops::spawn(listener, prometheus, ready, shutdown);
}

/// Logs, at info, that the EPS server is awaited until it answers `_ping`.
async fn wait_for_eps(eps: RpcClient, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        match eps
            .call::<_, serde_json::Value>(jsonrpc::PING, &serde_json::json!({}))
            .await
        {
            Ok(_) => {
                tracing::info!(eps = %eps.url(), "EPS server reachable");
                return;
            }
            Err(e) => tracing::info!(eps = %eps.url(), error = %e, "waiting for the EPS server"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.fail()) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
