//! Wiring for `proxy run public|private`: settings, TLS, listeners, tasks, signals.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use eps_core::backoff::Backoff;
use eps_core::jsonrpc;
use eps_core::link::{InProcess, Link, Served};
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

/// `proxy settings check ROLE`: the merged settings as YAML (secrets masked), if they are good,
/// the settings of an embedded EPS server (`eps.embedded`) included. Writes no file.
pub fn check(role: Role) -> Result<String, RunError> {
    let s = load(role)?;
    if s.eps.embedded.is_some() {
        let name = eps::embedded::check(&embedded_dirs(&s))
            .map_err(|e| RunError::BadSettings(format!("eps.embedded: {e}")))?;
        same_operator(&s, &name).map_err(|e| RunError::BadSettings(e.to_string()))?;
    }
    Ok(serde_yaml_ng::to_string(&s).expect("settings serialize"))
}

/// The settings directories of the embedded EPS server (`eps.embedded`, colon-separated).
fn embedded_dirs(s: &Settings) -> Vec<std::path::PathBuf> {
    eps_core::settings::dir_list(s.eps.embedded.as_deref().unwrap_or_default())
}

/// A proxy embeds its own operator's EPS server.
fn same_operator(s: &Settings, eps_name: &str) -> anyhow::Result<()> {
    if eps_name != s.name {
        return Err(bad(format!(
            "eps.embedded: the EPS server's name is {eps_name:?}, this proxy's {:?}: a proxy embeds its own operator's server",
            s.name
        )));
    }
    Ok(())
}

/// Reads and checks the settings of the EPS server named by `eps.embedded` and loads what it
/// needs to start (directory, TLS files); binds nothing.
fn load_embedded(s: &Settings) -> anyhow::Result<eps::embedded::Loaded> {
    let loaded =
        eps::embedded::load(&embedded_dirs(s)).map_err(|e| bad(format!("eps.embedded: {e}")))?;
    same_operator(s, loaded.name())?;
    Ok(loaded)
}

/// Loads settings for the role and runs it until SIGINT or SIGTERM.
pub fn main(role: Role) -> Result<(), RunError> {
    let settings = load(role)?;
    let rt = eps_core::net::runtime(settings.worker_threads);
    let grace = settings.shutdown_grace_period;
    let result = rt.block_on(async {
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        // The role runs as a task of its own, on the runtime's worker threads: with one thread
        // per core, a future left in `block_on` would run on this thread instead, and every
        // accepted client would cross to a worker (a futex wake-up for this thread, and another
        // for the worker that runs the client).
        let (t, stop) = (tracker.clone(), shutdown.clone());
        let run = tokio::spawn(async move {
            match settings.validate(role).map_err(bad)? {
                RoleSettings::Public(p) => run_public(&settings, p, t, stop).await,
                RoleSettings::Private(p) => run_private(&settings, p, t, stop).await,
            }
        });
        let ended = |r: Result<anyhow::Result<()>, tokio::task::JoinError>| {
            r.unwrap_or_else(|e| Err(anyhow::anyhow!("the proxy's main task failed: {e}")))
        };
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => return ended(r),
            _ = shutdown_signal() => {}
        }
        // `run` goes on while draining: its accept loops must see the cancellation and drop
        // their listeners, so that new clients are refused instead of waiting in the backlog.
        let drained = drain(grace, &tracker, &shutdown);
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
async fn drain(grace: Duration, tracker: &TaskTracker, shutdown: &CancellationToken) {
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

/// What both roles build first: the link to their EPS server, and their JSON-RPC listener's
/// TLS. An embedded EPS server is loaded here and started by [`Common::serve_rpc`], once the
/// role that receives its deliveries exists.
struct Common {
    eps: Link,
    embedded: Option<Embedding>,
    rpc_tls: Option<Arc<rustls::ServerConfig>>,
}

/// An embedded EPS server and the two in-process links to it, before and after it starts.
struct Embedding {
    /// Settings read and checked, until the server starts.
    loaded: Option<eps::embedded::Loaded>,
    /// Its deliveries to this proxy.
    deliveries: InProcess,
    /// This proxy's calls into it (the `eps` link).
    to_server: InProcess,
    running: Option<eps::embedded::Embedded>,
}

fn common(s: &Settings) -> anyhow::Result<Common> {
    let rpc_tls = match &s.jsonrpc_server {
        Some(rpc) => rpc
            .tls_config()
            .map_err(|e| bad(format!("jsonrpc_server.tls: {e}")))?,
        None => None,
    };
    if s.eps.embedded.is_some() {
        let loaded = load_embedded(s)?;
        // The proxy's calls keep `eps.timeout`, as over JSON-RPC; the server's deliveries its
        // `grpc_client.call_timeout` (the broker also passes it with each one).
        let to_server = InProcess::new("the embedded EPS server", s.eps.timeout);
        let deliveries = InProcess::new("this proxy (in-process)", loaded.call_timeout());
        return Ok(Common {
            eps: Link::InProcess(to_server.clone()),
            embedded: Some(Embedding {
                loaded: Some(loaded),
                deliveries,
                to_server,
                running: None,
            }),
            rpc_tls,
        });
    }
    let url = s
        .eps
        .url
        .as_deref()
        .expect("settings checked: url or embedded");
    let eps = eps_core::http::RpcClient::new(url, s.eps.tls.as_ref(), s.eps.timeout)
        .map_err(|e| bad(format!("eps: {e}")))?;
    Ok(Common {
        eps: Link::Rpc(eps),
        embedded: None,
        rpc_tls,
    })
}

impl Common {
    /// Serves the role's JSON-RPC methods to its EPS server: on the `jsonrpc_server` listener,
    /// or in-process to the embedded one, which starts now (its listeners bound, its metrics
    /// registered in `prometheus`). Gives the listener's task and where it listens.
    async fn serve_rpc<H: eps_core::http::Handler>(
        &mut self,
        s: &Settings,
        handler: Arc<H>,
        prometheus: &mut prometheus_client::registry::Registry,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<(Option<tokio::task::JoinHandle<()>>, String)> {
        if let Some(e) = &mut self.embedded {
            e.deliveries.connect(Arc::new(Served(handler)));
            let loaded = e.loaded.take().expect("started once");
            let running = loaded
                .start(
                    e.deliveries.clone(),
                    &e.to_server,
                    prometheus,
                    shutdown.clone(),
                )
                .await?;
            e.running = Some(running);
            return Ok((None, "none (in-process)".into()));
        }
        let rpc = s.jsonrpc_server.as_ref().expect("settings checked");
        let listener = bind(rpc.bind_address, "jsonrpc_server").await?;
        let addr = listener.local_addr()?.to_string();
        let task = tokio::spawn(eps_core::http::serve(
            listener,
            self.rpc_tls.take(),
            rpc.limits.clone(),
            handler,
            shutdown.clone(),
        ));
        Ok((Some(task), addr))
    }

    /// After the role stopped: waits for its JSON-RPC listener, and lets the embedded EPS
    /// server finish its calls in flight.
    async fn finish(self, rpc: Option<tokio::task::JoinHandle<()>>) {
        if let Some(rpc) = rpc {
            let _ = rpc.await;
        }
        if let Some(running) = self.embedded.and_then(|e| e.running) {
            running.finish().await;
        }
    }
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
    let mut c = common(s)?;
    let registry = Registry::open(&s.datastore).map_err(|e| bad(format!("datastore: {e}")))?;
    let mut prometheus = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::new(&mut prometheus));
    let public = Arc::new(Public::new(p, registry, c.eps.clone(), metrics));
    let clients = bind(p.bind_address, "public.bind_address").await?;
    let internal = bind(p.internal_bind_address, "public.internal_bind_address").await?;
    let ops = bind_ops(s).await?;
    let (rpc_task, jsonrpc) = c
        .serve_rpc(
            s,
            Arc::new(PublicRpc(public.clone())),
            &mut prometheus,
            &shutdown,
        )
        .await?;
    tracing::info!(
        name = %s.name,
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        public = %clients.local_addr()?,
        internal = %internal.local_addr()?,
        %jsonrpc,
        eps = %c.eps.url(),
        "public proxy ready"
    );
    serve_ops(ops, prometheus, &c.eps, &shutdown);
    tokio::spawn(reload_on_hangup(None, shutdown.clone()));
    tokio::spawn(eps_core::tls::watch(shutdown.clone()));
    tokio::spawn(wait_for_eps(c.eps.clone(), shutdown.clone()));
    public.run(clients, internal, tracker, shutdown).await;
    c.finish(rpc_task).await;
    Ok(())
}

async fn run_private(
    s: &Settings,
    p: &PrivateSettings,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut c = common(s)?;
    let DatastoreSettings::File { path } = &s.datastore else {
        return Err(bad(
            "datastore: the private proxy keeps its announcements in a file",
        ));
    };
    let store = FileStore::open(path).map_err(|e| bad(format!("datastore: {e}")))?;
    let mut prometheus = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::new(&mut prometheus));
    let private = Arc::new(Private::new(p, store, c.eps.clone(), metrics, tracker).map_err(bad)?);
    let ops = bind_ops(s).await?;
    let (rpc_task, jsonrpc) = c
        .serve_rpc(
            s,
            Arc::new(PrivateRpc(private.clone())),
            &mut prometheus,
            &shutdown,
        )
        .await?;
    tracing::info!(
        name = %s.name,
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        internal_endpoint = %p.internal_endpoint,
        %jsonrpc,
        eps = %c.eps.url(),
        "private proxy ready"
    );
    serve_ops(ops, prometheus, &c.eps, &shutdown);
    tokio::spawn(reload_on_hangup(Some(private.clone()), shutdown.clone()));
    tokio::spawn(eps_core::tls::watch(shutdown.clone()));
    private.announcer(shutdown).await;
    c.finish(rpc_task).await;
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
    eps: &Link,
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
async fn wait_for_eps(eps: Link, shutdown: CancellationToken) {
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
