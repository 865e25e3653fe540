//! End-to-end test harness: start the real binaries on loopback, with real certificates, on
//! free ports, and talk to them with real clients.
//!
//! The binaries are not built by `cargo test -p eps-tests`; build them first with
//! `cargo build --workspace` (add `--release` for a release test run). [`bin_path`] finds them next
//! to the test executable, or in `EPS_TESTS_BIN_DIR`.
//!
//! # Layout
//! - `support/files.rs`: [`TestDir`], a temporary folder with helpers to write YAML and JSON
//!   (kept on failure or with `EPS_TESTS_KEEP=1`).
//! - `support/wait.rs`: [`free_port`] / [`free_addr`] (outside the kernel's ephemeral range, so a
//!   server restarted on its port finds it still free), [`wait_until`] (retry until a deadline,
//!   never a bare sleep for readiness) and [`wait_port`].
//! - `support/process.rs`: [`bin_path`] and [`Proc`]: a child process logging to a file, killed on
//!   drop, with stop (SIGTERM), kill (SIGKILL), restart and log assertions.
//! - `support/pki.rs`: [`Pki`], certificates made by the project's own `eps_core::pki`, and
//!   signing keys for the signed directory.
//! - `support/curl.rs`: [`curl`], the README's `curl` command against the tunnel.
//! - `support/eps.rs`: [`EpsConfig`] (an EPS server's settings file), directory records and
//!   [`start_eps`].
//! - `support/hello.rs`: [`rustls_hello`], a rustls client's ClientHello records, to send by hand.
//! - `support/keepalive.rs`: [`keepalive::KeepAlive`], many HTTP/1.1 requests over one kept-alive
//!   TLS connection, and the TLS connect and response parsing the hand-written clients share.
//! - `support/rpc.rs`: [`TestService`], a recording JSON-RPC service run in-process, and the
//!   clients tests call with: [`rpc_client`] / [`call`] (the project's own client) and
//!   [`post_raw`] (hand-written HTTP/1.1 for malformed and oversized requests).
//! - `support/netns.rs`: [`netns::Netns`], hosts as Linux network namespaces joined by veth pairs
//!   (198.18.0.0/15), nftables rules inside them (a firewall that drops new inbound connections,
//!   a silently cut path), processes and client sockets inside them; removed on drop.
//! - `support/pebble.rs`: [`pebble::Pebble`], the ACME test server and its mock DNS on free
//!   ports (Debian's `pebble` package), validating through the tunnel's public port.
//! - `support/sockets.rs`: raw TCP: [`read_until_closed`] and a plain HTTP/1.1 GET
//!   ([`get_to_end`]).
//!
//! Test targets (declared in `Cargo.toml`): `eps_network.rs`, EPS servers calling each other, with
//! its fixture and test groups in `eps_network/`; `sd.rs`, a directory server and EPS servers
//! following it, with its fixture and test groups in `sd/`; `firewall.rs`, the private side behind a real
//! firewall on its own host (needs root, `ip` and `nft`), with its fixture in `firewall/`.
//!
//! Environment: `EPS_TESTS_RUST_LOG` sets the children's `RUST_LOG` (default `info`, which the
//! log assertions rely on); `EPS_TESTS_KEEP=1` keeps temporary folders.

#[path = "support/curl.rs"]
mod curl;
#[path = "support/eps.rs"]
mod eps;
#[path = "support/files.rs"]
mod files;
#[path = "support/hello.rs"]
mod hello;
#[path = "support/keepalive.rs"]
pub mod keepalive;
#[path = "support/netns.rs"]
pub mod netns;
#[path = "support/pebble.rs"]
pub mod pebble;
#[path = "support/pki.rs"]
mod pki;
#[path = "support/process.rs"]
mod process;
#[path = "support/redis.rs"]
pub mod redis;
#[path = "support/rpc.rs"]
mod rpc;
#[path = "support/sockets.rs"]
mod sockets;
#[path = "support/tunnel.rs"]
pub mod tunnel;
#[path = "support/wait.rs"]
mod wait;

pub use curl::{curl, curl_get, CurlReply};
pub use eps::{operator_records, record, start_eps, write_records, EpsConfig, EPS_READY};
pub use files::TestDir;
pub use hello::rustls_hello;
pub use pki::Pki;
pub use process::{bin_path, Proc};
pub use rpc::{
    call, client_tls, client_tls_without_cert, post_raw, rpc_client, HttpReply, Received,
    TestService,
};
pub use sockets::{get_to_end, read_until_closed};
pub use wait::{free_addr, free_port, wait_port, wait_until};

/// A JSON-RPC call's params or result as a tree.
pub use serde_json::{json, Value};
