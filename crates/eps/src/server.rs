//! `eps server run`: loads settings and directory (record files, or the verified copy of a
//! directory server's chain, brought up to date), binds the JSON-RPC and gRPC listeners and
//! runs until SIGINT or SIGTERM.

use std::sync::Arc;

use anyhow::Context as _;
use eps_core::directory::Directory;
use eps_core::http::RpcClient;
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
    let prepared =
        prepare(&settings).map_err(|e| Failure::Usage(format!("eps: bad settings: {e:#}")))?;
    let rt = eps_core::net::runtime(settings.worker_threads);
    rt.block_on(run(settings, prepared)).map_err(|e| {
        tracing::error!("eps server failed: {e:#}");
        Failure::Logged
    })
}

/// Everything built from settings before any port is bound.
struct Prepared {
    directory: SharedDirectory,
    /// Set when the directory follows a directory server.
    follower: Option<Follower>,
    jsonrpc_tls: Option<Arc<rustls::ServerConfig>>,
    /// None for a server without a gRPC port (reached over reverse streams).
    grpc_tls: Option<Arc<rustls::ServerConfig>>,
    peer_tls: Arc<rustls::ClientConfig>,
    local: RpcClient,
}

fn prepare(s: &Settings) -> anyhow::Result<Prepared> {
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
    let local = RpcClient::new(
        &s.jsonrpc_client.url,
        s.jsonrpc_client.tls.as_ref(),
        s.grpc_client.call_timeout,
    )
    .context("jsonrpc_client")?;
    Ok(Prepared {
        directory,
        follower,
        jsonrpc_tls,
        grpc_tls,
        peer_tls,
        local,
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

async fn run(s: Settings, mut p: Prepared) -> anyhow::Result<()> {
    // A follower first brings its copy up to date (bounded by its timeout), so that a server
    // started beside a running directory server routes by the current directory at once.
    if let Some(f) = &mut p.follower {
        f.catch_up(&p.directory).await;
        check_own_entry(&s, &p.directory.load());
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
    let ops_listener = s.metrics.bind().await.map_err(anyhow::Error::msg)?;
    let mut prometheus = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut prometheus);
    let peers = Peers::new(
        p.peer_tls,
        p.directory.clone(),
        s.grpc_client.clone(),
        s.max_message_bytes(),
        metrics.reverse_streams.clone(),
    );
    let broker = Arc::new(Broker::new(
        s.name.clone(),
        p.directory.clone(),
        peers,
        p.local,
        s.grpc_client.call_timeout,
        metrics,
    ));
    let shutdown = CancellationToken::new();
    let grpc_addr = match &grpc_listener {
        Some(l) => l.local_addr()?.to_string(),
        None => "none (reached over reverse streams)".to_string(),
    };
    tracing::info!(
        name = %s.name,
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        jsonrpc = %rpc_listener.local_addr()?,
        grpc = %grpc_addr,
        delivers_to = %s.jsonrpc_client.url,
        operators = p.directory.load().len(),
        "EPS server ready"
    );
    let rpc = tokio::spawn(eps_core::http::serve(
        rpc_listener,
        p.jsonrpc_tls,
        s.jsonrpc_server.limits.clone(),
        Arc::new(LocalHandler(broker.clone())),
        shutdown.clone(),
    ));
    let grpc = match (grpc_listener, p.grpc_tls, &s.grpc_server) {
        (Some(listener), Some(tls), Some(settings)) => Some(tokio::spawn(grpc::serve(
            listener,
            tls,
            settings.clone(),
            broker.clone(),
            p.directory.clone(),
            shutdown.clone(),
        ))),
        _ => None,
    };
    let reverse = tokio::spawn(grpc::hold_streams(
        broker,
        p.directory.clone(),
        s.grpc_client.reverse_peers.clone(),
        shutdown.clone(),
    ));
    ops::spawn(
        ops_listener,
        prometheus,
        ops::ready_when_listening(),
        &shutdown,
    );
    // Certificates, keys and CA files are re-read when they change and on SIGHUP.
    tokio::spawn(tls::watch(shutdown.clone()));
    if let Some(f) = p.follower {
        tokio::spawn(f.run(p.directory.clone(), shutdown.clone()));
    }
    match &s.directory {
        DirectorySettings::Files { path } => wait_for_shutdown(&p.directory, path).await,
        // The follower applies new records as they are appended: nothing to re-read.
        DirectorySettings::Sd(_) => eps_core::net::shutdown_signal().await,
    }
    tracing::info!(
        grace_s = s.shutdown_grace_period.as_secs_f64(),
        "shutting down: finishing calls in flight"
    );
    shutdown.cancel();
    let _ = tokio::time::timeout(s.shutdown_grace_period, async {
        let _ = rpc.await;
        if let Some(grpc) = grpc {
            let _ = grpc.await;
        }
        let _ = reverse.await;
    })
    .await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM. Re-reads the directory on SIGHUP and when its files changed
/// and then stayed the same for one check (every [`tls::WATCH_INTERVAL`]); a bad one is logged
/// and the current one kept.
async fn wait_for_shutdown(directory: &SharedDirectory, path: &std::path::Path) {
    use eps_core::files::dir_stamp;
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let stop = eps_core::net::shutdown_signal();
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(tls::WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut loaded = dir_stamp(path);
    let mut settling = None;
    loop {
        let why = tokio::select! {
            _ = &mut stop => return,
            _ = hup.recv() => "SIGHUP",
            _ = tick.tick() => {
                let now = dir_stamp(path);
                if now == loaded || settling.as_ref() != Some(&now) {
                    settling = (now != loaded).then_some(now);
                    continue;
                }
                "files changed"
            }
        };
        loaded = dir_stamp(path);
        settling = None;
        match Directory::load_dir(path) {
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
