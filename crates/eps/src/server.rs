//! `eps server run`: loads settings and directory (record files, or the verified copy of a
//! directory server's chain, brought up to date), binds the JSON-RPC and gRPC listeners and
//! runs until SIGINT or SIGTERM.

use std::sync::Arc;

use anyhow::Context as _;
use eps_core::directory::Directory;
use eps_core::http::RpcClient;
use eps_core::link::Link;
use eps_core::ops;
use eps_core::tls::{self, TlsError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, LocalHandler};
use crate::grpc::{self, Peers};
use crate::metrics::Metrics;
use crate::peers::{DirectoryClientVerifier, SharedDirectory};
use crate::sd::follow::Follower;
use crate::settings::{DirectorySettings, Settings};

use crate::Failure;

/// `eps server run`: loads the settings and serves until SIGINT or SIGTERM.
pub fn main() -> Result<(), Failure> {
    let settings = crate::cli::load()?;
    let bad = |e: anyhow::Error| Failure::Usage(format!("eps: bad settings: {e:#}"));
    let prepared = prepare(&settings).map_err(bad)?;
    let local = delivery_client(&settings).map_err(bad)?;
    let threads = settings
        .worker_threads
        .unwrap_or(crate::settings::DEFAULT_WORKER_THREADS);
    let rt = eps_core::net::runtime(Some(threads));
    rt.block_on(run(settings, prepared, local)).map_err(|e| {
        tracing::error!("eps server failed: {e:#}");
        Failure::Logged
    })
}

/// The JSON-RPC client incoming calls are delivered with (`jsonrpc_client`), required of a
/// server in its own process.
fn delivery_client(s: &Settings) -> anyhow::Result<Link> {
    let c = s.delivery().map_err(anyhow::Error::msg)?;
    let client = RpcClient::new(&c.url, c.tls.as_ref(), s.grpc_client.call_timeout)
        .context("jsonrpc_client")?;
    Ok(Link::Rpc(client))
}

/// Everything built from settings before any port is bound.
pub(crate) struct Prepared {
    directory: SharedDirectory,
    /// Set when the directory follows a directory server.
    follower: Option<Follower>,
    jsonrpc_tls: Option<Arc<rustls::ServerConfig>>,
    /// None for a server without a gRPC port (reached over reverse streams).
    grpc_tls: Option<Arc<rustls::ServerConfig>>,
    peer_tls: Arc<rustls::ClientConfig>,
}

pub(crate) fn prepare(s: &Settings) -> anyhow::Result<Prepared> {
    let (dir, follower) = match &s.directory {
        DirectorySettings::Files { path } => {
            (Directory::load_dir(path).context("directory")?, None)
        }
        DirectorySettings::Sd(follow) => {
            let f = Follower::open(follow)?;
            (f.directory().clone(), Some(f))
        }
    };
    if follower.is_none() {
        check_own_entry(s, &dir);
    }
    let directory = SharedDirectory::new(dir);
    let jsonrpc_tls = s
        .jsonrpc_server
        .tls_config()
        .context("jsonrpc_server.tls")?;
    let grpc_tls = match &s.grpc_server {
        Some(grpc) => {
            let g = &grpc.tls;
            let inner = tls::client_verifier(g).context("grpc_server.tls")?;
            let verifier = Arc::new(DirectoryClientVerifier::new(inner, directory.clone()));
            let config = tls::server_config_with(g, Some(verifier), &[b"h2"]).map_err(|e| {
                let key = match &e {
                    TlsError::File { path, .. } if *path == g.key => "grpc_server.tls.key",
                    TlsError::File { .. } => "grpc_server.tls.certificate",
                    TlsError::Config(_) => "grpc_server.tls",
                };
                anyhow::Error::new(e).context(key)
            })?;
            check_own_name(&s.name, &g.certificate)?;
            Some(config)
        }
        None => None,
    };
    let peer_tls_settings = s.peer_tls().context("grpc_client.tls")?;
    check_own_name(&s.name, &peer_tls_settings.certificate).context("grpc_client.tls")?;
    let peer_tls = tls::client_config(peer_tls_settings, &[b"h2"]).context("grpc_client.tls")?;
    Ok(Prepared {
        directory,
        follower,
        jsonrpc_tls,
        grpc_tls,
        peer_tls,
    })
}

/// Warns when this operator is missing from the directory, or when settings and directory
/// disagree on how peers reach it.
fn check_own_entry(s: &Settings, dir: &Directory) {
    match dir.entry(&s.name) {
        None => {
            tracing::warn!(name = %s.name, "this operator is not in the directory: peers cannot call it")
        }
        Some(e) if s.grpc_server.is_none() && !e.reached_by_reverse_stream() => {
            tracing::warn!(name = %s.name, "no grpc_server in the settings, but the directory has no reverse_stream channel for this operator: peers will try to dial it")
        }
        Some(e) if s.grpc_server.is_some() && e.grpc_address().is_none() => {
            tracing::warn!(name = %s.name, "grpc_server is set, but the directory lists no grpc_server address for this operator: peers do not dial it")
        }
        Some(_) => {}
    }
}

fn check_own_name(name: &str, cert: &std::path::Path) -> anyhow::Result<()> {
    let certs = tls::load_certs(cert)?;
    let cn = tls::operator_name(&certs[0]);
    if cn.as_deref() != Some(name) {
        anyhow::bail!(
            "{}: certificate names {:?}, but this server's name is {name:?}",
            cert.display(),
            cn
        );
    }
    Ok(())
}

/// `eps server run` after its settings were checked: a server, its operations listener, and
/// the signals that reload the directory and stop the process.
async fn run(s: Settings, p: Prepared, local: Link) -> anyhow::Result<()> {
    let mut prometheus = prometheus_client::registry::Registry::default();
    let shutdown = CancellationToken::new();
    let running = start(&s, p, local, &mut prometheus, shutdown.clone()).await?;
    // Bound after the server's own listeners, as ever: /readyz answers once they listen.
    let ops_listener = s.metrics.bind().await.map_err(anyhow::Error::msg)?;
    ops::spawn(
        ops_listener,
        prometheus,
        ops::ready_when_listening(),
        &shutdown,
    );
    // Certificates, keys and CA files are re-read when they change and on SIGHUP.
    tokio::spawn(tls::watch(shutdown.clone()));
    eps_core::net::shutdown_signal().await;
    tracing::info!(
        grace_s = s.shutdown_grace_period.as_secs_f64(),
        "shutting down: finishing calls in flight"
    );
    shutdown.cancel();
    running.finish().await;
    Ok(())
}

/// A started EPS server: its broker and the tasks that serve it until the shutdown token.
pub(crate) struct Running {
    pub broker: Arc<Broker>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    grace: std::time::Duration,
}

impl Running {
    /// Waits for the calls in flight to finish once the shutdown token is cancelled, up to the
    /// grace period.
    pub async fn finish(self) {
        let _ = tokio::time::timeout(self.grace, async {
            for t in self.tasks {
                let _ = t.await;
            }
        })
        .await;
    }
}

/// Binds the JSON-RPC and gRPC listeners and starts serving: calls of the local client go out
/// through the broker, calls of peers are delivered over `local`. Metrics are registered in
/// `prometheus`; the directory follows its files or its directory server. Everything stops
/// when `shutdown` is cancelled.
pub(crate) async fn start(
    s: &Settings,
    mut p: Prepared,
    local: Link,
    prometheus: &mut prometheus_client::registry::Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    // A follower first brings its copy up to date (bounded by its timeout), so that a server
    // started beside a running directory server routes by the current directory at once.
    if let Some(f) = &mut p.follower {
        f.catch_up(&p.directory).await;
        check_own_entry(s, &p.directory.load());
    }
    let rpc_listener = TcpListener::bind(s.jsonrpc_server.bind_address)
        .await
        .with_context(|| format!("binding jsonrpc_server {}", s.jsonrpc_server.bind_address))?;
    let grpc_listener = match &s.grpc_server {
        Some(g) => Some(
            TcpListener::bind(g.bind_address)
                .await
                .with_context(|| format!("binding grpc_server {}", g.bind_address))?,
        ),
        None => None,
    };
    let metrics = Metrics::new(prometheus);
    let peers = Peers::new(
        p.peer_tls,
        p.directory.clone(),
        s.grpc_client.clone(),
        s.max_message_bytes(),
        metrics.reverse_streams.clone(),
    );
    let delivers_to = local.url();
    let broker = Arc::new(Broker::new(
        s.name.clone(),
        p.directory.clone(),
        peers,
        local,
        s.grpc_client.call_timeout,
        metrics,
    ));
    let grpc_addr = match &grpc_listener {
        Some(l) => l.local_addr()?.to_string(),
        None => "none (reached over reverse streams)".to_string(),
    };
    tracing::info!(
        name = %s.name,
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        jsonrpc = %rpc_listener.local_addr()?,
        grpc = %grpc_addr,
        %delivers_to,
        operators = p.directory.load().len(),
        "EPS server ready"
    );
    let mut tasks = vec![tokio::spawn(eps_core::http::serve(
        rpc_listener,
        p.jsonrpc_tls,
        s.jsonrpc_server.limits.clone(),
        Arc::new(LocalHandler(broker.clone())),
        shutdown.clone(),
    ))];
    if let (Some(listener), Some(tls), Some(settings)) = (grpc_listener, p.grpc_tls, &s.grpc_server)
    {
        let serve = grpc::serve(
            listener,
            tls,
            settings.clone(),
            broker.clone(),
            p.directory.clone(),
            shutdown.clone(),
        );
        tasks.push(tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!("gRPC server failed: {e}");
            }
        }));
    }
    tasks.push(tokio::spawn(grpc::hold_streams(
        broker.clone(),
        p.directory.clone(),
        s.grpc_client.reverse_peers.clone(),
        shutdown.clone(),
    )));
    match (p.follower, &s.directory) {
        (Some(f), _) => {
            tokio::spawn(f.run(p.directory.clone(), shutdown.clone()));
        }
        (None, DirectorySettings::Files { path }) => {
            tokio::spawn(watch_directory(p.directory.clone(), path.clone(), shutdown));
        }
        // A follower is made for every `sd` directory.
        (None, DirectorySettings::Sd(_)) => {}
    }
    Ok(Running {
        broker,
        tasks,
        grace: s.shutdown_grace_period,
    })
}

/// Until `shutdown`: re-reads the directory on SIGHUP and when its files changed and then stayed
/// the same for one check (every [`tls::WATCH_INTERVAL`]); a bad one is logged and the current
/// one kept.
async fn watch_directory(
    directory: SharedDirectory,
    path: std::path::PathBuf,
    shutdown: CancellationToken,
) {
    use eps_core::files::dir_stamp;
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let mut tick = tokio::time::interval(tls::WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut loaded = dir_stamp(&path);
    let mut settling = None;
    loop {
        let why = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hup.recv() => "SIGHUP",
            _ = tick.tick() => {
                let now = dir_stamp(&path);
                if now == loaded || settling.as_ref() != Some(&now) {
                    settling = (now != loaded).then_some(now);
                    continue;
                }
                "files changed"
            }
        };
        loaded = dir_stamp(&path);
        settling = None;
        match Directory::load_dir(&path) {
            Ok(d) => {
                tracing::info!(operators = d.len(), %why, "directory reloaded");
                directory.store(d);
            }
            Err(e) => {
                tracing::error!(%why, "directory not reloaded, keeping the current one: {e}")
            }
        }
    }
}
