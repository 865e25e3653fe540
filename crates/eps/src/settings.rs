//! Settings of an EPS server (`EPS_SETTINGS`). Every default lives here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use eps_core::http::{secs, JsonRpcServerSettings};
use eps_core::ops::MetricsSettings;
use eps_core::tls::TlsSettings;
use serde::{Deserialize, Serialize};

use crate::sd::settings::FollowSettings;

/// Default deadline of one call between EPS servers, delivery to the peer's service included.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Default deadline for opening a channel to a peer (TCP and TLS).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default cap on concurrent gRPC connections from peers.
pub const DEFAULT_MAX_PEER_CONNECTIONS: usize = 1024;
/// Default cap on one gRPC message (a call's params or result).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Longest wait between two attempts to reach a peer that is down.
pub const DEFAULT_MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(2);
/// Default pause without traffic after which a peer connection is probed with an HTTP/2 ping.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// Default wait for a ping's answer before the connection counts as dead. With the interval,
/// a silently dead path (no FIN, no RST) is noticed within interval + timeout: 5 s.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);
/// Default `worker_threads` of an EPS server: one. Its work per call is small (15–20 µs of CPU
/// for each server a call passes, `make bench` `rpc_*`), so one thread carries tens of
/// thousands of calls a second, more than the proxies in front of it open connections; and one
/// thread spends less per call than several, which pay for work stealing and wake-ups between
/// them (two EPS servers on 2 cores: 34,000 calls/s at one thread each, 29,000 at one per core).
pub const DEFAULT_WORKER_THREADS: std::num::NonZeroUsize = std::num::NonZeroUsize::MIN;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// This server's operator name; its certificate must carry it as common name.
    pub name: String,
    pub directory: DirectorySettings,
    pub jsonrpc_server: JsonRpcServerSettings,
    /// The local service incoming calls are delivered to. Required, except of a server embedded
    /// in a proxy, which delivers to it in-process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jsonrpc_client: Option<JsonRpcClientSettings>,
    /// The gRPC port peers dial. A server behind a firewall has none: its directory entry has a
    /// `reverse_stream` channel and it opens reverse streams to its peers instead.
    #[serde(default)]
    pub grpc_server: Option<GrpcServerSettings>,
    #[serde(default)]
    pub grpc_client: GrpcClientSettings,
    /// Threads that serve connections and calls; default [`DEFAULT_WORKER_THREADS`] (one:
    /// tokio's current-thread runtime, no work stealing). More suit a server that carries calls
    /// for many operators at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<std::num::NonZeroUsize>,
    /// Prometheus metrics and health endpoints; off unless `metrics.bind_address` is set.
    #[serde(default)]
    pub metrics: MetricsSettings,
    /// Seconds calls in flight get to finish after SIGTERM.
    #[serde(default = "default_grace", with = "secs")]
    pub shutdown_grace_period: Duration,
}

/// Default time calls in flight get to finish after SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE_PERIOD: Duration = Duration::from_secs(10);

fn default_grace() -> Duration {
    DEFAULT_SHUTDOWN_GRACE_PERIOD
}

/// Where the service directory comes from.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(
    deny_unknown_fields,
    tag = "type",
    content = "settings",
    rename_all = "snake_case"
)]
pub enum DirectorySettings {
    /// A folder of `{"records": [...]}` JSON files, read in lexical order.
    Files { path: PathBuf },
    /// Follow a directory server: signed records, each verified by this server.
    Sd(Box<FollowSettings>),
}

/// The local service incoming calls are delivered to.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JsonRpcClientSettings {
    /// e.g. `https://127.0.0.1:6655/jsonrpc`.
    pub url: String,
    #[serde(default)]
    pub tls: Option<TlsSettings>,
}

/// The gRPC server peers call. Mutual TLS is always on.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcServerSettings {
    pub bind_address: SocketAddr,
    pub tls: TlsSettings,
    /// Concurrent connections from peers.
    #[serde(default = "default_max_peer_connections")]
    pub max_connections: usize,
    /// Largest message in bytes; give every server of the network the same.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Serve `Calls`, the stream that carries many calls from one peer. `false` answers it with
    /// UNIMPLEMENTED, and peers then make one gRPC call per call (for middleboxes that cut
    /// long-lived streams).
    #[serde(default = "default_true")]
    pub call_streams: bool,
    /// Seconds without traffic on a peer connection before it is probed with an HTTP/2 ping
    /// (a 17-byte frame each way).
    #[serde(default = "default_keepalive_interval", with = "secs")]
    pub keepalive_interval: Duration,
    /// Seconds a ping's answer may take before the connection counts as dead and its streams
    /// end: a silently dead path is noticed within interval + timeout.
    #[serde(default = "default_keepalive_timeout", with = "secs")]
    pub keepalive_timeout: Duration,
}

fn default_keepalive_interval() -> Duration {
    DEFAULT_KEEPALIVE_INTERVAL
}

fn default_keepalive_timeout() -> Duration {
    DEFAULT_KEEPALIVE_TIMEOUT
}

fn default_true() -> bool {
    true
}

/// How this server calls its peers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcClientSettings {
    /// Client certificate for peers; defaults to the gRPC server's (required without one).
    pub tls: Option<TlsSettings>,
    /// Seconds a call may take end to end.
    #[serde(with = "secs")]
    pub call_timeout: Duration,
    /// Seconds to open a channel to a peer.
    #[serde(with = "secs")]
    pub connect_timeout: Duration,
    /// Longest pause in seconds between reconnect attempts to a peer that is down.
    #[serde(with = "secs")]
    pub max_reconnect_backoff: Duration,
    /// Seconds without traffic on a channel to a peer (reverse streams included) before it is
    /// probed with an HTTP/2 ping.
    #[serde(with = "secs")]
    pub keepalive_interval: Duration,
    /// Seconds a ping's answer may take before the channel counts as dead: a silently dead
    /// path is noticed within interval + timeout, and the reverse stream is opened anew.
    #[serde(with = "secs")]
    pub keepalive_timeout: Duration,
    /// Peers to hold reverse streams to. Empty (the default): when this operator's directory
    /// entry has a `reverse_stream` channel, every operator holding a `call` right on one of its
    /// services, at each of its `grpc_server` addresses.
    pub reverse_peers: Vec<String>,
    /// Largest message between EPS servers for a server without `grpc_server` (which sets it
    /// otherwise); give every server of the network the same.
    pub max_message_bytes: Option<usize>,
}

impl Default for GrpcClientSettings {
    fn default() -> Self {
        Self {
            tls: None,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_reconnect_backoff: DEFAULT_MAX_RECONNECT_BACKOFF,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            reverse_peers: Vec::new(),
            max_message_bytes: None,
        }
    }
}

fn default_max_peer_connections() -> usize {
    DEFAULT_MAX_PEER_CONNECTIONS
}

fn default_max_message_bytes() -> usize {
    DEFAULT_MAX_MESSAGE_BYTES
}

impl Settings {
    /// Checks what serde cannot: values that parse but make no sense.
    /// Where a server in its own process delivers calls: `jsonrpc_client`, which only a server
    /// embedded in a proxy goes without.
    pub fn delivery(&self) -> Result<&JsonRpcClientSettings, String> {
        self.jsonrpc_client.as_ref().ok_or_else(|| {
            "jsonrpc_client: required: the URL of the local service incoming calls are \
             delivered to (only an EPS server embedded in a proxy, `eps: {embedded: ...}` in \
             the proxy's settings, goes without)"
                .to_string()
        })
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.contains('.') {
            return Err(format!(
                "name: {:?} must be non-empty and contain no '.'",
                self.name
            ));
        }
        if let DirectorySettings::Sd(follow) = &self.directory {
            follow.validate()?;
        }
        if self.grpc_client.call_timeout.is_zero() {
            return Err("grpc_client.call_timeout must be above 0".into());
        }
        if let Some(c) = &self.jsonrpc_client {
            if c.url.starts_with("https") && c.tls.is_none() {
                return Err("jsonrpc_client.tls is required for an https url".into());
            }
        }
        if self.grpc_server.is_some() && self.grpc_client.max_message_bytes.is_some() {
            return Err(
                "grpc_client.max_message_bytes is for a server without grpc_server; set \
                 grpc_server.max_message_bytes"
                    .into(),
            );
        }
        if self.peer_tls().is_none() {
            return Err(
                "grpc_client.tls is required without grpc_server: it is the certificate this \
                 server shows its peers"
                    .into(),
            );
        }
        let c = &self.grpc_client;
        let keepalives = [("grpc_client", c.keepalive_interval, c.keepalive_timeout)]
            .into_iter()
            .chain(
                self.grpc_server
                    .as_ref()
                    .map(|g| ("grpc_server", g.keepalive_interval, g.keepalive_timeout)),
            );
        for (section, interval, timeout) in keepalives {
            if interval.is_zero() || timeout.is_zero() {
                return Err(format!(
                    "{section}.keepalive_interval and keepalive_timeout must be above 0"
                ));
            }
        }
        Ok(())
    }

    /// Largest message between EPS servers: the gRPC server's setting, else
    /// `grpc_client.max_message_bytes`, else the default.
    pub fn max_message_bytes(&self) -> usize {
        match (&self.grpc_server, self.grpc_client.max_message_bytes) {
            (Some(g), _) => g.max_message_bytes,
            (None, Some(n)) => n,
            (None, None) => DEFAULT_MAX_MESSAGE_BYTES,
        }
    }

    /// The client certificate used towards peers: `grpc_client.tls`, else the gRPC server's.
    pub fn peer_tls(&self) -> Option<&TlsSettings> {
        self.grpc_client
            .tls
            .as_ref()
            .or(self.grpc_server.as_ref().map(|g| &g.tls))
    }
}
