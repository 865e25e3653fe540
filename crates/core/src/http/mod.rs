//! JSON-RPC over HTTP(S): the bounded server every local link listens with ([`serve`]), and
//! the keep-alive client that calls it ([`RpcClient`]).

mod client;
mod server;

pub(crate) use client::decode;
pub use client::{error_chain, CallError, ClientError, RpcClient};
pub use server::{
    secs, serve, Handler, JsonRpcServerSettings, Peer, ServerLimits, DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_REQUEST_TIMEOUT,
};
