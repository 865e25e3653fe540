//! Settings of both proxies (`PROXY_SETTINGS`). Every default lives here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use eps_core::http::{secs, JsonRpcServerSettings};
use eps_core::ops::MetricsSettings;
use eps_core::tls::TlsSettings;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::policy::DomainPolicy;

mod backend;
mod policy;
mod redis;

pub use backend::{
    AcmeSettings, TlsHandling, TlsMode, ACME_TLS_ALPN, DEFAULT_ORDER_TIMEOUT, DEFAULT_RENEW_AT,
    DEFAULT_TLS_HANDSHAKE_TIMEOUT,
};

pub use redis::{
    hash_tag, RedisSettings, RedisTlsSettings, SentinelSettings, DEFAULT_REPLICA_TIMEOUT,
};

pub use policy::{
    AddressLimits, DomainLimits, PolicySettings, ProxyProtocolSettings, DEFAULT_DOMAIN_MAX_RANGES,
    DEFAULT_DOMAIN_MIN_RATE, DEFAULT_MAX_TRACKED_ADDRESSES, MAX_TRACKED_ADDRESSES,
};

/// Default cap on concurrent client connections on the public port (relays included).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default cap on clients waiting for their private proxy to dial back.
pub const DEFAULT_MAX_PENDING: usize = 1_024;
/// Largest ClientHello accepted; post-quantum hellos are ~1.7 KB, rare ones reach 20 KB.
pub const DEFAULT_MAX_CLIENT_HELLO_BYTES: usize = 64 * 1024;
/// Time a client gets to send its whole ClientHello.
pub const DEFAULT_CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a data connection on the internal port gets to send its whole token once it has sent
/// its first byte.
pub const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a data connection may wait silently on the internal port (a private proxy's pooled,
/// pre-dialed connection) before it is closed.
pub const DEFAULT_DATA_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Silent data connections one address may hold on the internal port.
pub const DEFAULT_MAX_IDLE_DATA_PER_ADDRESS: u32 = 64;
/// Pre-dialed data connections a private proxy keeps per public proxy endpoint.
pub const DEFAULT_DATA_POOL: usize = 8;
/// Age at which the private proxy retires a pooled connection unused; below the public side's
/// `data_idle_timeout`, so that a connection is never taken just as the public side closes it.
pub const DEFAULT_DATA_POOL_MAX_AGE: Duration = Duration::from_secs(30);
/// Time a matched client waits for the private proxy to dial back.
pub const DEFAULT_ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);
/// A relay with no byte in either direction for this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Default deadline of a call through the EPS server.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the private proxy re-announces its domains.
pub const DEFAULT_REANNOUNCE_INTERVAL: Duration = Duration::from_secs(60);
/// Deadline for dialing the public proxy's internal port or the internal server.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Lifetime of an announcement sent without `expires_at`; re-announcing renews it.
pub const DEFAULT_ANNOUNCEMENT_TTL: Duration = Duration::from_secs(24 * 3600);
/// An announcement may not expire later than this from now.
pub const MAX_ANNOUNCEMENT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default cap on relays the private proxy runs at once.
pub const DEFAULT_MAX_RELAYS: usize = 10_000;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The operator name of this proxy (the same as its EPS server's).
    pub name: String,
    /// How to reach this proxy's own EPS server: at `url`, or `embedded` in this process.
    pub eps: EpsClientSettings,
    /// The JSON-RPC server the EPS server delivers calls to. Required with `eps.url`; an
    /// embedded EPS server delivers in-process and needs none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jsonrpc_server: Option<JsonRpcServerSettings>,
    /// Where announcements are kept.
    pub datastore: DatastoreSettings,
    /// Prometheus metrics and health endpoints; off unless `metrics.bind_address` is set.
    #[serde(default)]
    pub metrics: MetricsSettings,
    /// Seconds relays get to finish after SIGTERM before they are closed.
    #[serde(default = "default_grace", with = "secs")]
    pub shutdown_grace_period: Duration,
    /// Threads that serve connections; default one per CPU core. `1` (one thread, no work
    /// stealing) spends the least CPU per connection where several eps processes share a few
    /// cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<std::num::NonZeroUsize>,
    /// Settings of `proxy run public`.
    #[serde(default)]
    pub public: Option<PublicSettings>,
    /// Settings of `proxy run private`.
    #[serde(default)]
    pub private: Option<PrivateSettings>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EpsClientSettings {
    /// The EPS server's JSON-RPC listener, e.g. `https://127.0.0.1:5544/jsonrpc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Client TLS for an `https` url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSettings>,
    /// Run the EPS server inside this process instead, with the settings in these directories
    /// (colon-separated, as in `EPS_SETTINGS`; `$DIR` is this file's directory). The local link
    /// is then a function call both ways: no `url`, `tls` or `jsonrpc_server` here, and no
    /// `jsonrpc_client` in the EPS server's settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedded: Option<String>,
    /// Seconds a call through the EPS network may take.
    #[serde(default = "default_call_timeout", with = "secs")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(
    deny_unknown_fields,
    tag = "type",
    content = "settings",
    rename_all = "snake_case"
)]
pub enum DatastoreSettings {
    /// A JSON file replaced atomically on every change. For one instance.
    File { path: PathBuf },
    /// Redis, shared by several public proxy instances serving one operator name. Each instance
    /// keeps the announcements in memory and follows changes by pub/sub.
    Redis(RedisSettings),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PublicSettings {
    /// Where clients connect with TLS (the public port).
    pub bind_address: SocketAddr,
    /// Where private proxies dial back with their token (the internal port).
    pub internal_bind_address: SocketAddr,
    /// The internal address as private proxies must dial it (sent in `incomingConnection`).
    pub internal_endpoint: String,
    #[serde(default)]
    pub limits: PublicLimits,
    /// Who may connect, decided before a token is drawn or an EPS call made. Off by default.
    #[serde(default)]
    pub policy: PolicySettings,
    /// PROXY protocol headers from load balancers in front of the public port. Off by default.
    #[serde(default)]
    pub proxy_protocol: ProxyProtocolSettings,
}

/// Bounds of the public proxy. Each one caps what a client or a stalled peer can cost.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublicLimits {
    /// Concurrent client connections (waiting and relaying). Each relaying one costs two
    /// sockets and up to two relay buffers.
    pub max_connections: usize,
    /// Concurrent data connections on the internal port.
    pub max_internal_connections: usize,
    /// Clients waiting for a dial-back; more are refused at once.
    pub max_pending: usize,
    /// Bytes of ClientHello read at most.
    pub max_client_hello_bytes: usize,
    /// Seconds to receive the whole ClientHello.
    #[serde(with = "secs")]
    pub client_hello_timeout: Duration,
    /// Seconds for a data connection to present its whole token, from its first byte.
    #[serde(with = "secs")]
    pub token_timeout: Duration,
    /// Seconds a data connection may wait before its first byte: private proxies dial a few
    /// ahead of need (`private.data_pool`), so that a client's token travels on a connection
    /// that already exists. Keep it at least 1.5 × the private side's `data_pool_max_age`.
    #[serde(with = "secs")]
    pub data_idle_timeout: Duration,
    /// Data connections one address (IPv6: one /64) may hold waiting for their first byte,
    /// beyond which its connections get only `token_timeout` for it; all addresses together
    /// may hold half of `max_internal_connections`. 0 lets no connection wait.
    pub max_idle_data_per_address: u32,
    /// Seconds a matched client waits for the dial-back.
    #[serde(with = "secs")]
    pub accept_timeout: Duration,
    /// Seconds without traffic after which a relay is closed.
    #[serde(with = "secs")]
    pub idle_timeout: Duration,
    /// Wrong tokens one address may present within `token_failure_window` before its further
    /// wrong tokens are refused without a log line for that window (valid tokens are always
    /// served); 0 turns this off.
    pub max_token_failures: u32,
    /// Seconds of the wrong-token window.
    #[serde(with = "secs")]
    pub token_failure_window: Duration,
}

/// Default number of wrong tokens per address and window.
pub const DEFAULT_MAX_TOKEN_FAILURES: u32 = 20;
/// Default wrong-token window.
pub const DEFAULT_TOKEN_FAILURE_WINDOW: Duration = Duration::from_secs(10);

impl Default for PublicLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_internal_connections: DEFAULT_MAX_CONNECTIONS,
            max_pending: DEFAULT_MAX_PENDING,
            max_client_hello_bytes: DEFAULT_MAX_CLIENT_HELLO_BYTES,
            client_hello_timeout: DEFAULT_CLIENT_HELLO_TIMEOUT,
            token_timeout: DEFAULT_TOKEN_TIMEOUT,
            data_idle_timeout: DEFAULT_DATA_IDLE_TIMEOUT,
            max_idle_data_per_address: DEFAULT_MAX_IDLE_DATA_PER_ADDRESS,
            accept_timeout: DEFAULT_ACCEPT_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_token_failures: DEFAULT_MAX_TOKEN_FAILURES,
            token_failure_window: DEFAULT_TOKEN_FAILURE_WINDOW,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrivateSettings {
    /// The public proxy (operator name) announcements go to unless they name another.
    pub public_proxy: String,
    /// The internal TLS server relayed connections go to, e.g. `127.0.0.1:8888`: the endpoint
    /// of every announcement that names none.
    pub internal_endpoint: String,
    /// Domains announced from settings (more can be added at runtime).
    #[serde(default)]
    pub announcements: Vec<AnnouncementSetting>,
    /// Seconds between re-announcements.
    #[serde(default = "default_reannounce", with = "secs")]
    pub reannounce_interval: Duration,
    /// Seconds to dial the public proxy or the internal server.
    #[serde(default = "default_connect_timeout", with = "secs")]
    pub connect_timeout: Duration,
    /// Seconds without traffic after which a relay is closed.
    #[serde(default = "default_idle_timeout", with = "secs")]
    pub idle_timeout: Duration,
    /// Relays at once; more incoming connections are refused.
    #[serde(default = "default_max_relays")]
    pub max_relays: usize,
    /// Send a PROXY protocol v2 header with the original client's address to the internal
    /// server before the relayed bytes. Only for servers that expect one. The default of
    /// announcements that do not say.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Seconds a client of a terminated domain (`tls: {mode: terminate}`) gets for its whole
    /// TLS handshake with the private proxy.
    #[serde(default = "default_tls_handshake_timeout", with = "secs")]
    pub tls_handshake_timeout: Duration,
    /// The ACME client for terminated domains without certificate files. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeSettings>,
    /// Connections to each public proxy's internal port dialed ahead of need, so that a
    /// client's token goes out on one that already exists; each one used is replaced. 0 dials
    /// one per client instead.
    #[serde(default = "default_data_pool")]
    pub data_pool: usize,
    /// Seconds after which an unused pooled connection is closed (and replaced while clients
    /// keep coming); connections are checked every quarter of it, so one lives at most 1.25 ×
    /// this. Keep it below 2/3 of the public proxy's `limits.data_idle_timeout`.
    #[serde(default = "default_data_pool_max_age", with = "secs")]
    pub data_pool_max_age: Duration,
}

fn default_tls_handshake_timeout() -> Duration {
    DEFAULT_TLS_HANDSHAKE_TIMEOUT
}
fn default_data_pool() -> usize {
    DEFAULT_DATA_POOL
}
fn default_data_pool_max_age() -> Duration {
    DEFAULT_DATA_POOL_MAX_AGE
}

/// A domain to announce.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AnnouncementSetting {
    pub domain: String,
    /// The public proxy to announce to; defaults to `public_proxy`.
    #[serde(default)]
    pub proxy: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// Access rules for the public proxy to enforce for this domain (client ranges, a cap on
    /// connections at once, a new-connection rate), within its operator's bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<DomainPolicy>,
    /// Where this domain's clients go (`host:port`); `private.internal_endpoint` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_endpoint: Option<String>,
    /// Whether this domain's endpoint gets a PROXY header; `private.proxy_protocol` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<bool>,
    /// TLS passed through to the endpoint (the default) or ended at the private proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsHandling>,
}

impl AnnouncementSetting {
    /// Checks the backend options serde cannot; `acme` tells whether an ACME client is set up.
    pub fn check_backend(&self, acme: bool) -> Result<(), String> {
        if self.internal_endpoint.as_deref().is_some_and(str::is_empty) {
            return Err("internal_endpoint must not be empty".into());
        }
        let Some(tls) = &self.tls else { return Ok(()) };
        tls.check()?;
        if tls.wants_acme() {
            if !acme {
                return Err(
                    "tls: a terminated domain needs certificate and key, or a private.acme \
                     section to obtain them"
                        .into(),
                );
            }
            if self.domain.starts_with("*.") {
                return Err(
                    "tls: ACME's TLS-ALPN-01 challenge cannot obtain a wildcard certificate; \
                     give certificate and key"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

/// Default time relays get to finish after SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE_PERIOD: Duration = Duration::from_secs(30);

fn default_grace() -> Duration {
    DEFAULT_SHUTDOWN_GRACE_PERIOD
}

fn default_call_timeout() -> Duration {
    DEFAULT_CALL_TIMEOUT
}
fn default_reannounce() -> Duration {
    DEFAULT_REANNOUNCE_INTERVAL
}
fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}
fn default_idle_timeout() -> Duration {
    DEFAULT_IDLE_TIMEOUT
}
fn default_max_relays() -> usize {
    DEFAULT_MAX_RELAYS
}

/// Which proxy runs: `proxy run public|private`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Listens for TLS clients and routes them by SNI.
    Public,
    /// Announces domains and dials back to relay clients to the internal server.
    Private,
}

/// The section of the settings the role runs with, checked.
#[derive(Debug, Clone, Copy)]
pub enum RoleSettings<'a> {
    Public(&'a PublicSettings),
    Private(&'a PrivateSettings),
}

impl Settings {
    /// Checks what serde cannot, for `role`, and gives that role's section.
    pub fn validate(&self, role: Role) -> Result<RoleSettings<'_>, String> {
        self.check(role)?;
        Ok(match role {
            Role::Public => RoleSettings::Public(self.public.as_ref().expect("checked")),
            Role::Private => RoleSettings::Private(self.private.as_ref().expect("checked")),
        })
    }

    fn check(&self, role: Role) -> Result<(), String> {
        let public = role == Role::Public;
        if self.name.is_empty() {
            return Err("name must not be empty".into());
        }
        match (&self.eps.url, &self.eps.embedded) {
            (Some(_), Some(_)) => {
                return Err("eps: give either `url` (an EPS server in its own process) or `embedded` (one inside this proxy), not both".into())
            }
            (None, None) => {
                return Err("eps: give `url` (the EPS server's JSON-RPC listener) or `embedded` (the settings directories of an EPS server to run inside this proxy)".into())
            }
            (Some(url), None) => {
                if url.starts_with("https") && self.eps.tls.is_none() {
                    return Err("eps.tls is required for an https url".into());
                }
                if self.jsonrpc_server.is_none() {
                    return Err("jsonrpc_server: required with eps.url: the EPS server delivers calls to this proxy there".into());
                }
            }
            (None, Some(dirs)) => {
                if eps_core::settings::dir_list(dirs).is_empty() {
                    return Err("eps.embedded: names no settings directory".into());
                }
                if self.eps.tls.is_some() {
                    return Err("eps.tls: not used with eps.embedded (the link is in-process)".into());
                }
                if self.jsonrpc_server.is_some() {
                    return Err("jsonrpc_server: not used with eps.embedded: the embedded EPS server delivers calls in-process".into());
                }
            }
        }
        if let DatastoreSettings::Redis(r) = &self.datastore {
            if !public {
                return Err(
                    "datastore: the private proxy keeps its announcements in a file (type: file)"
                        .into(),
                );
            }
            r.check()?;
        }
        if public {
            let p = self
                .public
                .as_ref()
                .ok_or("`proxy run public` needs a `public:` section")?;
            let l = &p.limits;
            if l.max_pending == 0 || l.max_connections == 0 {
                return Err(
                    "public.limits: max_pending and max_connections must be above 0".into(),
                );
            }
            if l.max_client_hello_bytes < 512 {
                return Err("public.limits.max_client_hello_bytes must be at least 512".into());
            }
            if l.token_timeout.is_zero() || l.data_idle_timeout < l.token_timeout {
                return Err(
                    "public.limits: token_timeout must be above 0 and data_idle_timeout at least \
                     token_timeout"
                        .into(),
                );
            }
            p.policy.validate()?;
        } else {
            let p = self
                .private
                .as_ref()
                .ok_or("`proxy run private` needs a `private:` section")?;
            if p.reannounce_interval < Duration::from_secs(1) {
                return Err("private.reannounce_interval must be at least 1 second".into());
            }
            if let Some(acme) = &p.acme {
                acme.check()?;
            }
            if p.tls_handshake_timeout.is_zero() {
                return Err("private.tls_handshake_timeout must be above 0".into());
            }
            for (i, a) in p.announcements.iter().enumerate() {
                a.check_backend(p.acme.is_some())
                    .map_err(|e| format!("private.announcements[{i}].{e}"))?;
                if let Some(rules) = &a.policy {
                    rules
                        .check_shape()
                        .map_err(|e| format!("private.announcements[{i}].{e}"))?;
                }
            }
            if p.data_pool > 0 && p.data_pool_max_age < Duration::from_millis(100) {
                return Err(
                    "private.data_pool_max_age must be at least 0.1 s (or data_pool 0 for no pool)"
                        .into(),
                );
            }
        }
        Ok(())
    }
}
