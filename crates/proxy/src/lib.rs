//! The eps proxies.
//!
//! # Layout
//! - [`clienthello`]: the ClientHello reader: bytes in, SNI out, no I/O.
//! - [`hostname`]: the one rule for host names (SNI and announcements) and wildcards `*.parent`.
//! - [`announcements`]: announcement rules (suffixes, conflicts, expiry) over plain data.
//! - `dialback` (private): the dial-back protocol both roles speak: the token, the
//!   `announceConnections` / `incomingConnection` messages, the pending table, reading a token.
//! - [`public`]: `proxy run public`: the SNI router and the internal port (`public/mod.rs`),
//!   the announcement methods (`public/rpc.rs`).
//! - [`policy`]: who may connect at the SNI step: address ranges, per-address and per-domain
//!   caps and rates (`policy/gate.rs`, bounded state in `policy/store.rs`), announcements'
//!   rules and their bounds, PROXY protocol headers (`policy/proxy_header.rs`).
//! - `admission` (private): reading a client's PROXY header and ClientHello under one deadline,
//!   typed read refusals, refusal log lines sampled per reason.
//! - [`private`]: `proxy run private`: the announcer (`private/mod.rs`), the dial-back
//!   (`private/incoming.rs`), each domain's backend (`private/backend.rs`), TLS ending at the
//!   private proxy (`private/terminate.rs`) and the ACME client (`private/acme/`).
//! - [`registry`]: the public side's in-memory announcements and their file store
//!   (`registry/mod.rs`) or Redis backend (`registry/redis.rs`).
//! - [`metrics`]: Prometheus counters of both proxies; refusals by typed reason ([`metrics::Reason`]).
//! - [`relay`]: byte relaying with half-close and an idle timeout, between sockets
//!   (`relay/mod.rs`) or any two streams, such as a TLS one (`relay/stream.rs`).
//! - [`store`]: the embedded, atomically replaced announcement file.
//! - [`settings`]: the `PROXY_SETTINGS` schema and its defaults (access policy:
//!   `settings/policy.rs`; backends, TLS handling and ACME: `settings/backend.rs`), the role and
//!   its checked section.
//! - [`run`]: wires settings, listeners and tasks for either role.
//! - `limiter` (private): the wrong-token limiter and the per-address caps on silent data
//!   connections of the internal port.
//! - `listener` (private): the accept loop both public listeners share (refuse when full).
//! - `pool` (private): the private proxy's pre-dialed data connections.
//!
//! How the pieces work together: `docs/architecture.md`.

mod admission;
pub mod announcements;
pub mod clienthello;
mod dialback;
pub mod hostname;
mod limiter;
mod listener;
pub mod metrics;
pub mod policy;
mod pool;
pub mod private;
pub mod public;
pub mod registry;
pub mod relay;
pub mod run;
pub mod settings;
pub mod store;

use eps_core::directory::Entry;
use eps_core::jsonrpc::{Request, RpcError};
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// The caller an EPS server adds to every delivered call.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ClientParams {
    pub name: String,
    pub entry: Entry,
}

/// The caller's name only, for calls on the per-connection path: the directory entry is
/// skipped, not built.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ClientName {
    pub name: String,
}

/// Decodes a request's params, or says what is wrong with them.
pub(crate) fn params<T: DeserializeOwned>(req: &Request) -> Result<T, RpcError> {
    let raw = req.params.as_ref().map(|p| p.get()).unwrap_or("{}");
    serde_json::from_str(raw).map_err(|e| RpcError::invalid_params(format!("invalid params: {e}")))
}
