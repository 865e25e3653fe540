//! Shared parts of eps, used by more than one binary.
//!
//! # Layout
//! - [`settings`]: loads settings directories (`EPS_SETTINGS`, `PROXY_SETTINGS`): YAML files
//!   deep-merged in lexical order, `$DIR` and `vars:` substitution, errors that name file and key.
//! - [`tls`]: certificates and keys from PEM files, rustls configs, fingerprints and the names
//!   a certificate carries; [`tls::reload`] keeps them in step with their files.
//! - [`backoff`]: the doubling pause every retry loop takes.
//! - [`files`]: file stamps, to notice that TLS material or the directory changed.
//! - [`directory`]: the service directory: records folded into one entry per operator, and the
//!   permission check for a call.
//! - [`sd`]: the signed directory: records in a hash chain, each signed by its writer, checked
//!   (signature, signer's rights, parent) and folded into the directory; the chain file; the
//!   directory server's JSON-RPC methods.
//! - [`jsonrpc`]: JSON-RPC 2.0 types and error codes, plain functions over bytes.
//! - [`http`]: the bounded HTTPS JSON-RPC server and the keep-alive client both sides of a local
//!   link use.
//! - [`link`]: the local link between a proxy and its EPS server: JSON-RPC over HTTP(S) between
//!   two processes, or a function call when the EPS server is embedded in the proxy.
//! - [`net`]: [`net::serve`], the accept loop every listener uses (slots that wait or refuse,
//!   a task tracker, the shutdown token, backoff on errors, `TCP_NODELAY`), and the stop signals.
//! - [`pki`]: the development PKI (`eps certs`), also used by tests.
//! - [`ops`]: the operations listener: `/metrics`, `/healthz`, `/readyz`.
//! - [`logging`]: the tracing setup every binary shares.

pub mod backoff;
pub mod directory;
pub mod files;
pub mod http;
pub mod jsonrpc;
pub mod link;
pub mod logging;
pub mod net;
pub mod ops;
pub mod pki;
pub mod sd;
pub mod settings;
pub mod tls;
