//! Routing of calls: local client → peer (outgoing) and peer → local service (incoming).
//!
//! Per call: one directory lookup (in memory), one permission check, one forward. Params are
//! passed on as raw JSON; only the receiving side reads their top-level keys once, to put its
//! own `_client` in (`eps_core::jsonrpc::params`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eps_core::directory::{AccessError, Directory, Entry};
use eps_core::http::{CallError, Handler, Peer};
use eps_core::jsonrpc::{self, params, Outcome, Request, RpcError, PING};
use eps_core::link::Link;
use serde_json::json;
use serde_json::value::RawValue;

use crate::grpc::{Node, Peers};
use crate::metrics::Metrics;
use crate::peers::SharedDirectory;

/// A caller's serialized `_client`, and the directory version it was made from.
type CachedClient = (Arc<Directory>, Arc<RawValue>);

pub struct Broker {
    metrics: Metrics,
    /// Serialized `_client` values by caller, valid for one directory version.
    clients: Mutex<HashMap<String, CachedClient>>,
    name: String,
    directory: SharedDirectory,
    peers: Peers,
    local: Link,
    call_timeout: Duration,
}

impl Broker {
    pub fn new(
        name: String,
        directory: SharedDirectory,
        peers: Peers,
        local: Link,
        call_timeout: Duration,
        metrics: Metrics,
    ) -> Self {
        Self {
            metrics,
            clients: Mutex::new(HashMap::new()),
            name,
            directory,
            peers,
            local,
            call_timeout,
        }
    }

    /// `{"name": caller, "entry": ...}` serialized once per caller and directory version.
    fn client_json(&self, dir: &Arc<Directory>, caller: &str, entry: &Entry) -> Arc<RawValue> {
        let mut cache = self.clients.lock().expect("client cache lock");
        if let Some((version, json)) = cache.get(caller) {
            if Arc::ptr_eq(version, dir) {
                return json.clone();
            }
        }
        let json: Arc<RawValue> = jsonrpc::to_raw(&json!({"name": caller, "entry": entry})).into();
        // At most one entry per operator of the directory.
        cache.insert(caller.to_string(), (dir.clone(), json.clone()));
        json
    }

    fn ping(&self) -> Outcome {
        Ok(jsonrpc::to_raw(
            &json!({"pong": true, "operator": self.name}),
        ))
    }

    /// A call from the local client: `OPERATOR.METHOD`.
    pub async fn outgoing(&self, req: Request) -> Outcome {
        if req.method == PING {
            return self.ping();
        }
        let Some((operator, method)) = jsonrpc::split_method(&req.method) else {
            let outcome = Err(RpcError::method_not_found(format!(
                "method {:?} must be OPERATOR.METHOD",
                req.method
            )));
            self.metrics
                .record("out", "unknown", false, "unknown", &outcome, 0.0);
            return outcome;
        };
        let started = Instant::now();
        // One directory version serves the whole call, routing and metrics alike.
        let dir = self.directory.load();
        let none;
        let params = match req.params.as_deref() {
            Some(p) => p,
            None => {
                none = RawValue::from_string("{}".into()).expect("{} is JSON");
                &*none
            }
        };
        let outcome = self.route_out(&dir, operator, method, params).await;
        let known = dir.entry(operator).is_some();
        self.metrics.record(
            "out",
            operator,
            known,
            method,
            &outcome,
            started.elapsed().as_secs_f64(),
        );
        // The mark is between EPS servers; the local client gets a plain error.
        outcome.map_err(RpcError::without_delivery_mark)
    }

    async fn route_out(
        &self,
        dir: &Arc<Directory>,
        operator: &str,
        method: &str,
        params: &RawValue,
    ) -> Outcome {
        if operator == self.name {
            return self
                .answer(&self.name, method, params.get().as_bytes())
                .await;
        }
        let Some(entry) = dir.entry(operator) else {
            return Err(RpcError::new(
                jsonrpc::UNKNOWN_OPERATOR,
                format!("unknown operator {operator:?}: not in the directory"),
            ));
        };
        self.peers.call(operator, entry, method, params).await
    }

    /// A call from peer `caller` (already authenticated) for this server's service.
    async fn answer(&self, caller: &str, method: &str, params: &[u8]) -> Outcome {
        if method == PING {
            return self.ping();
        }
        let started = Instant::now();
        let dir = self.directory.load();
        let outcome = self.deliver(&dir, caller, method, params).await;
        let known = dir.entry(caller).is_some();
        self.metrics.record(
            "in",
            caller,
            known,
            method,
            &outcome,
            started.elapsed().as_secs_f64(),
        );
        outcome
    }

    async fn deliver(
        &self,
        dir: &Arc<Directory>,
        caller: &str,
        method: &str,
        params: &[u8],
    ) -> Outcome {
        let client = {
            let Some(caller_entry) = dir.entry(caller) else {
                return Err(RpcError::new(
                    jsonrpc::FORBIDDEN,
                    format!("caller {caller:?} is not in the directory"),
                ));
            };
            let Some(me) = dir.entry(&self.name) else {
                return Err(RpcError::method_not_found(format!(
                    "{} offers no methods: it is not in its own directory",
                    self.name
                )));
            };
            me.authorize(caller_entry, method).map_err(|e| match e {
                AccessError::UnknownMethod { .. } => RpcError::method_not_found(e.to_string()),
                AccessError::Forbidden { .. } => RpcError::new(jsonrpc::FORBIDDEN, e.to_string()),
            })?;
            self.client_json(dir, caller, caller_entry)
        };
        let params = params::with_client(params, &client)?;
        match self
            .local
            .call_with_deadline(method, &params, self.call_timeout)
            .await
        {
            Ok(r) => Ok(r),
            // Only this server may say that a call was not delivered: a service cannot ask for
            // its call to be run again by another instance.
            Err(CallError::Rpc(e)) => Err(e.without_delivery_mark()),
            Err(e @ CallError::Timeout { .. }) => Err(RpcError::new(
                jsonrpc::PEER_TIMEOUT,
                format!("{}: local service: {e}", self.name),
            )),
            // Marked, so that a caller with another instance of this operator tries that one.
            Err(e @ CallError::NotDelivered { .. }) => Err(RpcError::not_delivered(
                jsonrpc::SERVICE_UNAVAILABLE,
                format!("{}: local service: {e}", self.name),
            )),
            Err(e) => Err(RpcError::new(
                jsonrpc::SERVICE_UNAVAILABLE,
                format!("{}: local service: {e}", self.name),
            )),
        }
    }
}

/// The local JSON-RPC server's handler: every request goes out through the broker.
impl Node for Broker {
    fn name(&self) -> &str {
        &self.name
    }

    fn accepts(&self, name: &str, fingerprint: &str) -> bool {
        self.directory
            .load()
            .entry(name)
            .is_some_and(|e| e.accepts_fingerprint(fingerprint))
    }

    fn peers(&self) -> &Peers {
        &self.peers
    }

    fn incoming(
        &self,
        caller: &str,
        method: &str,
        params: &[u8],
    ) -> impl std::future::Future<Output = Outcome> + Send {
        self.answer(caller, method, params)
    }
}

pub struct LocalHandler(pub std::sync::Arc<Broker>);

impl Handler for LocalHandler {
    async fn call(&self, req: Request, _peer: Peer) -> Outcome {
        self.0.outgoing(req).await
    }
}
