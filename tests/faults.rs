//! Bad input and faults (docs/architecture.md §10), end to end: the demo's five processes on loopback, with
//! clients that misbehave on purpose, and measurements of what that costs the proxies.
//!
//! Build the binaries first: `cargo build --workspace && cargo test -p eps-tests --test faults`
//! (`-- --nocapture` shows the figures each test prints). The tests run one at a time
//! ([`fixture::serial`]): they measure close times, memory and file descriptors. Restarts are
//! in `tunnel.rs` (`restarts_recover`); peers with a foreign, unknown or unpinned certificate
//! in `eps_network/identity.rs`.
//!
//! # Layout
//! - `fixture`: [`fixture::Fx`], the tunnel with the proxies logging at debug and serving
//!   metrics; RSS and open descriptors of a process; a recording stand-in for the internal
//!   server.
//! - `hellos`: ClientHellos re-framed or made by hand, and requests whose first flight a test
//!   sends its own way.
//! - `client_hello`: ClientHello shapes that must be routed; first bytes that must be refused.
//! - `deadlines`: silent and trickling clients; the bounded pending set and `accept_timeout`.
//! - `limits`: 10,000 idle connections against `max_connections`.
//! - `tokens`: wrong, short, reused and late tokens on the internal port; rate limiting.
//! - `relays`: a client that stops reading, half-close, a server killed mid-stream, idle
//!   relays, descriptor leaks.
//! - `jsonrpc`: malformed and oversized JSON-RPC on all four JSON-RPC servers.
//! - `peers`: an EPS peer with an expired certificate.
//! - `policy`: the access policy: denied ranges, a rate exceeded and recovered, a domain at its
//!   cap, PROXY headers from trusted and untrusted sources.

#[path = "faults/client_hello.rs"]
mod client_hello;
#[path = "faults/deadlines.rs"]
mod deadlines;
#[path = "faults/fixture.rs"]
mod fixture;
#[path = "faults/hellos.rs"]
mod hellos;
#[path = "faults/jsonrpc.rs"]
mod jsonrpc;
#[path = "faults/limits.rs"]
mod limits;
#[path = "faults/peers.rs"]
mod peers;
#[path = "faults/policy.rs"]
mod policy;
#[path = "faults/relays.rs"]
mod relays;
#[path = "faults/tokens.rs"]
mod tokens;
