//! `eps`: the EPS server and its development tools, as a library: the `eps` binary's commands,
//! and [`embedded`], an EPS server run inside a proxy's process.
//!
//! # Layout
//! - `settings`: the `EPS_SETTINGS` schema and its defaults.
//! - `server`: wires listeners, directory and broker together (`eps server run`).
//! - [`embedded`]: the same server inside another process (a proxy), its local link a function
//!   call instead of JSON-RPC over loopback TLS.
//! - `broker`: routes calls between the local client, peers and the local service.
//! - `grpc`: the EPS network's transport: `server` (the mutual-TLS gRPC server and the
//!   `Calls`/`Serve` streams it answers), `channels` (one channel per peer and where a call
//!   goes), `connector` (connects and checks a peer), `call_stream` (many calls as messages of
//!   one stream), `reverse` (reverse streams: held to peers by a server nobody can dial, and
//!   accepted from such servers). It asks the broker for what it needs through `grpc::Node`.
//! - `metrics`: Prometheus counters of calls.
//! - `peers`: peer identity checks against the directory.
//! - `sd`: the signed directory in processes: the directory server (`eps sd run`), following
//!   it from an EPS server, and `eps sd sign|submit|entries|verify`.
//! - `certs`: `eps certs`, the development PKI.
//! - `cli`: `eps call`, `eps settings check`, `eps directory show`.
//!
//! How the pieces work together: `docs/architecture.md`.

mod broker;
pub mod certs;
pub mod cli;
pub mod embedded;
mod grpc;
mod metrics;
mod peers;
pub mod sd;
pub mod server;
pub mod settings;

/// Why a command did not succeed; the binary's `main` turns it into the exit status.
#[derive(Debug)]
pub enum Failure {
    /// Bad settings, arguments or input, found before anything was done: exit 64 (EX_USAGE).
    Usage(String),
    /// The command ran and failed: exit 1.
    Failed(String),
    /// A server failed and logged why: exit 1.
    Logged,
}

/// Exit status for [`Failure::Usage`].
pub const EXIT_USAGE: u8 = 64;
