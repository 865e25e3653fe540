//! The local link between a proxy and its own EPS server, both ways: the proxy's calls into the
//! EPS network, and the EPS server's deliveries to the proxy.
//!
//! Two forms with one interface ([`Link`]):
//! - [`Link::Rpc`]: JSON-RPC over HTTP(S) between two processes ([`RpcClient`]), the form of the
//!   five-process demo and of an EPS server serving several local services;
//! - [`Link::InProcess`]: a function call, when the EPS server runs inside the proxy's process
//!   (`eps: {embedded: ...}` in the proxy's settings). No socket, TLS record, HTTP head or JSON
//!   envelope per call; the process boundary it removes was the largest per-connection cost
//!   left (`docs/architecture.md` §11).
//!
//! Both forms give the same errors for the same situations ([`CallError`]), so that callers
//! (retries, "not delivered" marks, timeouts) behave alike, and the in-process form keeps the
//! bounds the JSON-RPC listener sets by default: params of at most
//! [`DEFAULT_MAX_BODY_BYTES`] (413), at most [`DEFAULT_MAX_CONNECTIONS`] calls at once (more
//! wait, under their deadline), and a handler that panics fails its own call only (-32603).

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;

use futures_util::FutureExt as _;
use tokio::sync::Semaphore;

use crate::http::{
    decode, CallError, Handler, Peer, RpcClient, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONNECTIONS,
};
use crate::jsonrpc::{self, Outcome, Request, RpcError};

/// A future that answers one call.
pub type Answer<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// The receiving end of an in-process link: answers `method` with `params`.
pub trait LocalService: Send + Sync + 'static {
    fn call<'a>(&'a self, method: &'a str, params: &'a RawValue) -> Answer<'a>;
}

/// Any JSON-RPC [`Handler`] answers in-process calls as it answers those of its listener. Its
/// [`Peer`] is `0.0.0.0:0` without a name: the caller is this process.
pub struct Served<H>(pub Arc<H>);

impl<H: Handler> LocalService for Served<H> {
    fn call<'a>(&'a self, method: &'a str, params: &'a RawValue) -> Answer<'a> {
        let req = Request {
            jsonrpc: "2.0".into(),
            method: method.into(),
            params: Some(params.to_owned()),
            id: None,
        };
        let peer = Peer {
            addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            name: None,
        };
        Box::pin(self.0.call(req, peer))
    }
}

/// One end of a local link.
// A process holds one or two links, cloned at start: their size does not matter, and boxing
// the client would cost an allocation per clone.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Link {
    /// JSON-RPC over HTTP(S) to another process.
    Rpc(RpcClient),
    /// A function call into this process.
    InProcess(InProcess),
}

/// An in-process link. Made before its receiving end exists (a proxy and its embedded EPS
/// server each need the other's end), and connected once with [`InProcess::connect`]; calls
/// before that fail as not delivered.
#[derive(Clone)]
pub struct InProcess {
    /// What the link reaches, for messages: e.g. `in-process EPS server`.
    name: &'static str,
    target: Arc<OnceLock<Arc<dyn LocalService>>>,
    /// Calls at once, as the JSON-RPC listener's `max_connections`.
    in_flight: Arc<Semaphore>,
    timeout: Duration,
}

impl InProcess {
    /// An unconnected link to `name`; calls without their own deadline get `timeout`.
    pub fn new(name: &'static str, timeout: Duration) -> Self {
        Self {
            name,
            target: Arc::new(OnceLock::new()),
            in_flight: Arc::new(Semaphore::new(DEFAULT_MAX_CONNECTIONS)),
            timeout,
        }
    }

    /// Connects the link (every clone of it) to `service`. Only the first call has an effect.
    pub fn connect(&self, service: Arc<dyn LocalService>) {
        let _ = self.target.set(service);
    }

    async fn call(
        &self,
        method: &str,
        params: &RawValue,
        deadline: Duration,
    ) -> Result<Box<RawValue>, CallError> {
        let Some(service) = self.target.get() else {
            return Err(CallError::NotDelivered {
                url: self.name.into(),
                reason: "not started yet".into(),
            });
        };
        if params.get().len() > DEFAULT_MAX_BODY_BYTES {
            return Err(CallError::Rpc(RpcError::new(
                jsonrpc::TOO_LARGE,
                format!(
                    "{}: params of {} bytes, over the limit of {DEFAULT_MAX_BODY_BYTES}",
                    self.name,
                    params.get().len()
                ),
            )));
        }
        let call = async {
            let _permit = self.in_flight.acquire().await.expect("never closed");
            match std::panic::AssertUnwindSafe(service.call(method, params))
                .catch_unwind()
                .await
            {
                Ok(outcome) => outcome,
                Err(_) => Err(RpcError::new(
                    jsonrpc::INTERNAL_ERROR,
                    format!("{}: the handler of {method:?} failed", self.name),
                )),
            }
        };
        match tokio::time::timeout(deadline, call).await {
            Ok(outcome) => outcome.map_err(CallError::Rpc),
            Err(_) => Err(CallError::Timeout {
                url: self.name.into(),
                secs: deadline.as_secs_f64(),
            }),
        }
    }
}

impl Link {
    /// Where the link goes: the URL, or the in-process name.
    pub fn url(&self) -> String {
        match self {
            Link::Rpc(c) => c.url(),
            Link::InProcess(l) => l.name.to_string(),
        }
    }

    /// Calls `method` with typed params and result.
    pub async fn call<P: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        params: &P,
    ) -> Result<R, CallError> {
        decode(&self.call_raw(method, &jsonrpc::to_raw(params)).await?)
    }

    /// Calls `method` with raw params under the link's own deadline.
    pub async fn call_raw(
        &self,
        method: &str,
        params: &RawValue,
    ) -> Result<Box<RawValue>, CallError> {
        let deadline = match self {
            Link::Rpc(c) => c.timeout(),
            Link::InProcess(l) => l.timeout,
        };
        self.call_with_deadline(method, params, deadline).await
    }

    /// Like [`call_raw`](Self::call_raw) with an explicit deadline.
    pub async fn call_with_deadline(
        &self,
        method: &str,
        params: &RawValue,
        deadline: Duration,
    ) -> Result<Box<RawValue>, CallError> {
        match self {
            Link::Rpc(c) => c.call_with_deadline(method, params, deadline).await,
            Link::InProcess(l) => l.call(method, params, deadline).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::ServerLimits;
    use tokio_util::sync::CancellationToken;

    struct Echo;

    impl Handler for Echo {
        async fn call(&self, req: Request, _peer: Peer) -> Outcome {
            match req.method.as_str() {
                "echo" => Ok(req.params.expect("params")),
                "slow" => {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok(jsonrpc::to_raw(&"late"))
                }
                "panic" => panic!("the handler's bug"),
                m => Err(RpcError::method_not_found(format!("no method {m:?}"))),
            }
        }
    }

    /// The error kind and JSON-RPC code of an outcome, to compare the two links by.
    fn shape(r: &Result<Box<RawValue>, CallError>) -> String {
        match r {
            Ok(v) => format!("ok {}", v.get()),
            Err(CallError::Rpc(e)) => format!("rpc {}", e.code),
            Err(CallError::Timeout { .. }) => "timeout".into(),
            Err(CallError::NotDelivered { .. }) => "not delivered".into(),
            Err(e) => format!("other: {e}"),
        }
    }

    /// The same calls over JSON-RPC to a listener and in-process to the same handler give the
    /// same outcomes: results, the handler's errors, timeouts, oversized params, and "not
    /// delivered" for a listener that is gone and a link not connected yet.
    #[tokio::test]
    async fn in_process_calls_answer_like_rpc_ones() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(crate::http::serve(
            listener,
            None,
            ServerLimits::default(),
            Arc::new(Echo),
            shutdown.clone(),
        ));
        let timeout = Duration::from_secs(2);
        let rpc = Link::Rpc(RpcClient::new(&url, None, timeout).unwrap());
        let in_process = InProcess::new("in-process test service", timeout);
        let local = Link::InProcess(in_process.clone());

        let echo = jsonrpc::to_raw(&serde_json::json!({"a": 1}));
        assert_eq!(shape(&local.call_raw("echo", &echo).await), "not delivered");
        in_process.connect(Arc::new(Served(Arc::new(Echo))));

        let big = jsonrpc::to_raw(&"x".repeat(DEFAULT_MAX_BODY_BYTES + 1));
        let cases: [(&str, &RawValue, Duration); 4] = [
            ("echo", &echo, timeout),
            ("nope", &echo, timeout),
            ("slow", &echo, Duration::from_millis(50)),
            ("echo", &big, timeout),
        ];
        for (method, params, deadline) in cases {
            let over_rpc = rpc.call_with_deadline(method, params, deadline).await;
            let here = local.call_with_deadline(method, params, deadline).await;
            assert_eq!(shape(&here), shape(&over_rpc), "{method}");
        }
        assert_eq!(
            shape(&local.call_raw("nope", &echo).await),
            format!("rpc {}", jsonrpc::METHOD_NOT_FOUND)
        );
        assert_eq!(
            shape(&local.call_raw("echo", &big).await),
            format!("rpc {}", jsonrpc::TOO_LARGE)
        );

        // A handler that panics fails its own call; the link goes on.
        assert_eq!(
            shape(&local.call_raw("panic", &echo).await),
            format!("rpc {}", jsonrpc::INTERNAL_ERROR)
        );
        assert_eq!(shape(&local.call_raw("echo", &echo).await), r#"ok {"a":1}"#);
        let typed: serde_json::Value = local
            .call("echo", &serde_json::json!({"b": 2}))
            .await
            .unwrap();
        assert_eq!(typed, serde_json::json!({"b": 2}));
        assert_eq!(local.url(), "in-process test service");

        shutdown.cancel();
        server.await.unwrap();
        assert_eq!(
            shape(&rpc.call_raw("echo", &echo).await),
            "not delivered",
            "the listener is gone"
        );
    }
}
