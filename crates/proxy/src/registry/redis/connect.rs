//! How the backend reaches Redis in each form (one server, Sentinel, Cluster; TCP or TLS), and
//! what a (re)connect gives it: a connection for commands and a feed of published changes.
//! Finding the primary and following failovers is the `redis` crate's work in every form.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, PushInfo, PushKind};
use redis::{ProtocolVersion, RedisFuture, TlsCertificates, TlsMode, Value};
use tokio_stream::{Stream, StreamExt};

use super::super::OpenError;
use crate::settings::{RedisSettings, RedisTlsSettings};

/// Published changes a cluster connection may hold before they are read; past it the feed
/// counts as broken and the instance reloads the whole hash.
const CLUSTER_FEED_CAPACITY: usize = 4096;

/// Where Redis is, as the settings say.
pub(super) enum Target {
    /// One configured server.
    Direct(redis::Client),
    /// Whichever server the Sentinels name, asked again at each (re)connect.
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    /// A Redis Cluster, learnt from any seed; a fresh client per (re)connect, since its change
    /// feed is fixed when it is built.
    Cluster(ClusterSeeds),
}

pub(super) struct ClusterSeeds {
    seeds: Vec<ConnectionInfo>,
    password: Option<String>,
    certificates: Option<TlsCertificates>,
}

impl Target {
    pub(super) fn new(s: &RedisSettings) -> Result<Self, OpenError> {
        let certificates = s.tls.as_ref().map(load_certificates).transpose()?;
        let tls = certificates.is_some();
        let nodes = s
            .addresses
            .iter()
            .map(|a| node(a, tls))
            .collect::<Result<Vec<_>, _>>()?;
        let mut redis_info = redis::RedisConnectionInfo::default().set_db(s.database);
        if let Some(p) = &s.password {
            redis_info = redis_info.set_password(p.expose());
        }
        if s.cluster {
            let seeds = nodes
                .into_iter()
                .map(|n| {
                    Ok(n.into_connection_info()?
                        .set_redis_settings(redis_info.clone()))
                })
                .collect::<Result<Vec<_>, OpenError>>()?;
            return Ok(Self::Cluster(ClusterSeeds {
                seeds,
                password: s.password.as_ref().map(|p| p.expose().to_string()),
                certificates,
            }));
        }
        let Some(sentinel) = &s.sentinel else {
            let info = nodes[0]
                .clone()
                .into_connection_info()?
                .set_redis_settings(redis_info);
            let client = match certificates {
                Some(certs) => redis::Client::build_with_tls(info, certs)?,
                None => redis::Client::open(info)?,
            };
            return Ok(Self::Direct(client));
        };
        let mut b =
            SentinelClientBuilder::new(nodes, &sentinel.master_name, SentinelServerType::Master)?
                .set_client_to_redis_db(s.database);
        if let Some(p) = &s.password {
            b = b.set_client_to_redis_password(p.expose());
        }
        if let Some(p) = &sentinel.password {
            b = b.set_client_to_sentinel_password(p.expose());
        }
        if let Some(certs) = certificates {
            b = b
                .set_client_to_sentinel_tls_mode(TlsMode::Secure)
                .set_client_to_sentinel_certificates(certs.clone())
                .set_client_to_redis_tls_mode(TlsMode::Secure)
                .set_client_to_redis_certificates(certs);
        }
        Ok(Self::Sentinel(tokio::sync::Mutex::new(b.build()?)))
    }
}

impl ClusterSeeds {
    /// Connects to the cluster and subscribes to the sharded `channel` (routed to the node that
    /// serves its slot, moved by the crate when that changes).
    pub(super) async fn connect(
        &self,
        channel: &str,
        connection_timeout: Duration,
        response_timeout: Duration,
    ) -> redis::RedisResult<(ClusterConnection, Changes)> {
        let (tx, rx) = tokio::sync::mpsc::channel(CLUSTER_FEED_CAPACITY);
        let overflow = Arc::new(AtomicBool::new(false));
        let full = overflow.clone();
        // The crate must not block on us: a full feed is noted, and the follower reloads.
        let sender = move |push: PushInfo| -> Result<(), ()> {
            if let Err(tokio::sync::mpsc::error::TrySendError::Full(_)) = tx.try_send(push) {
                full.store(true, Ordering::Relaxed);
            }
            Ok(())
        };
        let mut b = ClusterClientBuilder::new(self.seeds.clone())
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(sender)
            .connection_timeout(connection_timeout)
            .response_timeout(response_timeout);
        if let Some(p) = &self.password {
            b = b.password(p);
        }
        if let Some(certs) = &self.certificates {
            b = b.tls(TlsMode::Secure).certs(certs.clone());
        }
        let mut conn = b.build()?.get_async_connection().await?;
        conn.ssubscribe(channel).await?;
        Ok((conn, Changes::Cluster { rx, overflow }))
    }
}

/// A connection for commands, to the primary or to the cluster.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Published changes: `domain\nvalue` payloads, or `domain\n` for a removal.
pub(super) enum Changes {
    /// A RESP2 subscriber connection (`SUBSCRIBE`), one server or the Sentinels' primary.
    PubSub(Pin<Box<dyn Stream<Item = redis::Msg> + Send>>),
    /// Push messages of a cluster connection (`SSUBSCRIBE`).
    Cluster {
        rx: tokio::sync::mpsc::Receiver<PushInfo>,
        overflow: Arc<AtomicBool>,
    },
}

impl Changes {
    /// The next payload; `None` once the feed may have missed one (a lost connection, a
    /// subscription the server dropped, a full feed), after which the follower starts over.
    pub(super) async fn next(&mut self) -> Option<String> {
        match self {
            Changes::PubSub(s) => {
                let m = s.next().await?;
                Some(m.get_payload().unwrap_or_default())
            }
            Changes::Cluster { rx, overflow } => loop {
                let push = rx.recv().await?;
                if overflow.load(Ordering::Relaxed) {
                    return None;
                }
                match push.kind {
                    PushKind::SMessage => {
                        let payload = push.data.into_iter().nth(1)?;
                        return Some(redis::from_redis_value(payload).unwrap_or_default());
                    }
                    // A node connection broke (the crate reconnects and resubscribes, but what
                    // was published meanwhile is gone), or the server dropped the subscription
                    // because the slot moved.
                    PushKind::Disconnection | PushKind::SUnsubscribe => return None,
                    _ => {}
                }
            },
        }
    }
}

/// `host:port` as the crate's address, TLS-wrapped when `tls`.
fn node(address: &str, tls: bool) -> Result<ConnectionAddr, OpenError> {
    let (host, port) = address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .ok_or_else(|| OpenError::Address(address.to_string()))?;
    let host = host.to_string();
    Ok(if tls {
        ConnectionAddr::TcpTls {
            host,
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(host, port)
    })
}

/// The CA (and client certificate) files as the crate takes them, checked first so that a
/// wrong file is refused at start with its name.
fn load_certificates(tls: &RedisTlsSettings) -> Result<TlsCertificates, OpenError> {
    use eps_core::tls::{load_certs, load_key, TlsError};
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| TlsError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    };
    load_certs(&tls.ca_certificate)?;
    let client_tls = match (&tls.certificate, &tls.key) {
        (Some(cert), Some(key)) => {
            load_certs(cert)?;
            load_key(key)?;
            Some(redis::ClientTlsConfig {
                client_cert: read(cert)?,
                client_key: read(key)?,
            })
        }
        _ => None,
    };
    Ok(TlsCertificates {
        client_tls,
        root_cert: Some(read(&tls.ca_certificate)?),
    })
}
