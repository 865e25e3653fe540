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
//! (retries, "not delivered" marks, timeouts) behave alike.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::http::{decode, CallError, Handler, Peer, RpcClient};
use crate::jsonrpc::{self, Outcome, Request};

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
    timeout: Duration,
}

impl InProcess {
    /// An unconnected link to `name`; calls without their own deadline get `timeout`.
    pub fn new(name: &'static str, timeout: Duration) -> Self {
        Self {
            name,
            target: Arc::new(OnceLock::new()),
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
        match tokio::time::timeout(deadline, service.call(method, params)).await {
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
    use crate::jsonrpc::RpcError;

    struct Echo;

    impl Handler for Echo {
        async fn call(&self, req: Request, _peer: Peer) -> Outcome {
            match req.method.as_str() {
                "echo" => Ok(req.params.expect("params")),
                "slow" => {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok(jsonrpc::to_raw(&"late"))
                }
                m => Err(RpcError::method_not_found(format!("no method {m:?}"))),
            }
        }
    }

    #[tokio::test]
    async fn in_process_calls_answer_like_rpc_ones() {
        let link = InProcess::new("in-process test service", Duration::from_secs(1));
        let l = Link::InProcess(link.clone());
        let before = l
            .call::<_, serde_json::Value>("echo", &serde_json::json!({"a": 1}))
            .await;
        assert!(
            matches!(&before, Err(CallError::NotDelivered { reason, .. }) if reason == "not started yet"),
            "{before:?}"
        );
        link.connect(Arc::new(Served(Arc::new(Echo))));
        let echoed: serde_json::Value = l.call("echo", &serde_json::json!({"a": 1})).await.unwrap();
        assert_eq!(echoed, serde_json::json!({"a": 1}));
        let missing = l.call::<_, serde_json::Value>("nope", &()).await;
        assert!(
            matches!(&missing, Err(CallError::Rpc(e)) if e.code == jsonrpc::METHOD_NOT_FOUND),
            "{missing:?}"
        );
        let late = l
            .call_with_deadline("slow", &jsonrpc::to_raw(&()), Duration::from_millis(50))
            .await;
        assert!(matches!(&late, Err(CallError::Timeout { .. })), "{late:?}");
        assert_eq!(l.url(), "in-process test service");
    }
}
