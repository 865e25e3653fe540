//! The EPS network's transport: a mutual-TLS gRPC server for peers ([`serve`]) and one
//! long-lived HTTP/2 channel per peer for outgoing calls ([`Peers`]), on which every call
//! travels as two messages of one long-lived `Calls` stream. A server peers cannot dial holds
//! reverse streams to them instead ([`hold_streams`], `reverse.rs`), and its calls travel on
//! those.

use std::future::Future;

use bytes::Bytes;
use eps_core::jsonrpc::{self, Outcome, RpcError};
use serde_json::value::RawValue;

mod call_stream;
mod channels;
mod connector;
mod reverse;
mod server;

pub use channels::Peers;
pub use reverse::hold_streams;
pub use server::serve;

/// What the transport asks of the server it carries calls for (the broker), so that this
/// module does not depend on the broker.
pub trait Node: Send + Sync + 'static {
    /// This server's operator name.
    fn name(&self) -> &str;
    /// Whether the current directory accepts the certificate with `fingerprint` for operator
    /// `name` (a connection or stream outlives directory changes, so calls check again).
    fn accepts(&self, name: &str, fingerprint: &str) -> bool;
    /// The channels to peers and the reverse streams held to this server.
    fn peers(&self) -> &Peers;
    /// Checks and delivers a call that peer `caller` sent.
    fn incoming(
        &self,
        caller: &str,
        method: &str,
        params: &[u8],
    ) -> impl Future<Output = Outcome> + Send;
}

pub mod pb {
    tonic::include_proto!("eps.v1");
}

pub(crate) fn to_pb(outcome: Outcome) -> pb::CallResponse {
    use pb::call_response::Outcome as O;
    let outcome = match outcome {
        Ok(r) => O::Result(Bytes::copy_from_slice(r.get().as_bytes())),
        Err(e) => O::Error(pb::RpcError {
            code: e.code,
            message: e.message,
            data: e
                .data
                .map(|d| Bytes::from(serde_json::to_vec(&d).expect("json")))
                .unwrap_or_default(),
        }),
    };
    pb::CallResponse {
        outcome: Some(outcome),
        id: 0,
    }
}

pub(crate) fn from_pb(resp: pb::CallResponse) -> Outcome {
    use pb::call_response::Outcome as O;
    match resp.outcome {
        Some(O::Result(bytes)) => {
            let text = String::from_utf8(bytes.to_vec())
                .map_err(|_| RpcError::internal("peer sent a result that is not UTF-8"))?;
            RawValue::from_string(text).map_err(|e| {
                RpcError::internal(format!("peer sent a result that is not JSON: {e}"))
            })
        }
        Some(O::Error(e)) => Err(RpcError {
            code: e.code,
            message: e.message,
            data: if e.data.is_empty() {
                None
            } else {
                serde_json::from_slice(&e.data).ok()
            },
        }),
        None => Err(RpcError::internal("peer sent an empty response")),
    }
}

/// A failed gRPC call to peer `name` as a JSON-RPC error: 504 when a deadline expired
/// (`secs` says which), 502 otherwise, with the whole chain of causes.
pub(crate) fn status_error(
    name: &str,
    address: &str,
    status: &tonic::Status,
    secs: f64,
) -> RpcError {
    use std::error::Error as _;
    let mut detail = status.message().to_string();
    let mut source = status.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !detail.contains(&text) {
            detail.push_str(": ");
            detail.push_str(&text);
        }
        source = s.source();
    }
    // hyper reports a connection that died before the request went out (a peer refusing our
    // certificate after the TLS 1.3 handshake) as "canceled"; only an expired deadline, ours or
    // the grpc-timeout the peer enforces ("Timeout expired"), is a timeout.
    let expired = status.code() == tonic::Code::DeadlineExceeded
        || (status.code() == tonic::Code::Cancelled
            && status.message() == tonic::TimeoutExpired(()).to_string());
    if expired {
        RpcError::new(
            jsonrpc::PEER_TIMEOUT,
            format!("peer {name} ({address}) did not answer within {secs:.1} s"),
        )
    } else {
        RpcError::new(
            jsonrpc::PEER_UNREACHABLE,
            format!("peer {name} ({address}) unreachable: {detail}"),
        )
    }
}
