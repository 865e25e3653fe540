//! Settings of an EPS server (`EPS_SETTINGS`). Every default lives here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use eps_core::http::{secs, JsonRpcServerSettings};
use eps_core::ops::MetricsSettings;
use eps_core::tls::TlsSettings;
use serde::{Deserialize, Serialize};

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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// This server's operator name; its certificate must carry it as common name.
    pub name: String,
    pub directory: DirectorySettings,
    pub jsonrpc_server: JsonRpcServerSettings,
    pub jsonrpc_client: JsonRpcClientSettings,
    pub grpc_server: GrpcServerSettings,
    #[serde(default)]
    pub grpc_client: GrpcClientSettings,
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
}

fn default_true() -> bool {
    true
}

/// How this server calls its peers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcClientSettings {
    /// Client certificate for peers; defaults to the gRPC server's.
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
}

impl Default for GrpcClientSettings {
    fn default() -> Self {
        Self {
            tls: None,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_reconnect_backoff: DEFAULT_MAX_RECONNECT_BACKOFF,
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
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.contains('.') {
            return Err(format!(
                "name: {:?} must be non-empty and contain no '.'",
                self.name
            ));
        }
        if self.grpc_client.call_timeout.is_zero() {
            return Err("grpc_client.call_timeout must be above 0".into());
        }
        if self.jsonrpc_client.url.starts_with("https") && self.jsonrpc_client.tls.is_none() {
            return Err("jsonrpc_client.tls is required for an https url".into());
        }
        Ok(())
    }

    /// The client certificate used towards peers.
    pub fn peer_tls(&self) -> &TlsSettings {
        self.grpc_client
            .tls
            .as_ref()
            .unwrap_or(&self.grpc_server.tls)
    }
}
