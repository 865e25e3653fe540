//! Routing of calls: local client → peer (outgoing) and peer → local service (incoming).
//!
//! Per call: one directory lookup (in memory), one permission check, one forward. Params are
//! passed on as raw JSON; only the receiving side opens them once, to add `_client`.

use std::time::{Duration, Instant};

use eps_core::directory::AccessError;
use eps_core::http::{CallError, Handler, Peer, RpcClient};
use eps_core::jsonrpc::{self, Outcome, Request, RpcError};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::grpc::Peers;
use crate::metrics::Metrics;
use crate::peers::SharedDirectory;

/// The method every EPS server answers itself.
pub const PING: &str = "_ping";

pub struct Broker {
    metrics: Metrics,
    name: String,
    directory: SharedDirectory,
    peers: Peers,
    local: RpcClient,
    call_timeout: Duration,
}

impl Broker {
    pub fn new(
        name: String,
        directory: SharedDirectory,
        peers: Peers,
        local: RpcClient,
        call_timeout: Duration,
        metrics: Metrics,
    ) -> Self {
        Self {
            metrics,
            name,
            directory,
            peers,
            local,
            call_timeout,
        }
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
        let started = Instant::now();
        let name = req.method.clone();
        let outcome = self.route_out(req).await;
        let (peer, method) = jsonrpc::split_method(&name).unwrap_or(("unknown", "unknown"));
        let known = self.directory.load().entry(peer).is_some();
        self.metrics.record(
            "out",
            peer,
            known,
            method,
            &outcome,
            started.elapsed().as_secs_f64(),
        );
        outcome
    }

    async fn route_out(&self, req: Request) -> Outcome {
        let Some((operator, method)) = jsonrpc::split_method(&req.method) else {
            return Err(RpcError::method_not_found(format!(
                "method {:?} must be OPERATOR.METHOD",
                req.method
            )));
        };
        let params = req.params.unwrap_or_else(empty_object);
        if operator == self.name {
            return self
                .incoming(&self.name, method, params.get().as_bytes())
                .await;
        }
        let address = {
            let dir = self.directory.load();
            let Some(entry) = dir.entry(operator) else {
                return Err(RpcError::new(
                    jsonrpc::UNKNOWN_OPERATOR,
                    format!("unknown operator {operator:?}: not in the directory"),
                ));
            };
            match entry.grpc_address() {
                Some(a) => a.to_string(),
                None => {
                    return Err(RpcError::new(
                        jsonrpc::PEER_UNREACHABLE,
                        format!("operator {operator} has no grpc_server channel in the directory"),
                    ))
                }
            }
        };
        self.peers.call(operator, &address, method, &params).await
    }

    /// A call from peer `caller` (already authenticated) for this server's service.
    pub async fn incoming(&self, caller: &str, method: &str, params: &[u8]) -> Outcome {
        if method == PING {
            return self.ping();
        }
        let started = Instant::now();
        let outcome = self.deliver(caller, method, params).await;
        let known = self.directory.load().entry(caller).is_some();
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

    async fn deliver(&self, caller: &str, method: &str, params: &[u8]) -> Outcome {
        let client = {
            let dir = self.directory.load();
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
            json!({"name": caller, "entry": caller_entry})
        };
        let params = with_client(params, client)?;
        match self
            .local
            .call_with_deadline(method, &params, self.call_timeout)
            .await
        {
            Ok(r) => Ok(r),
            Err(CallError::Rpc(e)) => Err(e),
            Err(e @ CallError::Timeout { .. }) => Err(RpcError::new(
                jsonrpc::PEER_TIMEOUT,
                format!("{}: local service: {e}", self.name),
            )),
            Err(e) => Err(RpcError::new(
                jsonrpc::SERVICE_UNAVAILABLE,
                format!("{}: local service: {e}", self.name),
            )),
        }
    }
}

fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".into()).expect("{} is JSON")
}

/// Adds `_client` to an object of params (replacing any the caller sent).
fn with_client(params: &[u8], client: Value) -> Result<Box<RawValue>, RpcError> {
    let text = std::str::from_utf8(params)
        .map_err(|_| RpcError::invalid_params("params are not UTF-8"))?
        .trim();
    let mut map: Map<String, Value> = if text.is_empty() || text == "null" {
        Map::new()
    } else {
        serde_json::from_str(text)
            .map_err(|e| RpcError::invalid_params(format!("params must be a JSON object: {e}")))?
    };
    map.insert("_client".into(), client);
    Ok(jsonrpc::to_raw(&map))
}

/// The local JSON-RPC server's handler: every request goes out through the broker.
pub struct LocalHandler(pub std::sync::Arc<Broker>);

impl Handler for LocalHandler {
    async fn call(&self, req: Request, _peer: Peer) -> Outcome {
        self.0.outgoing(req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_is_added_and_cannot_be_forged() {
        let p = with_client(br#"{"a":1,"_client":"forged"}"#, json!({"name": "x"})).unwrap();
        let v: Value = serde_json::from_str(p.get()).unwrap();
        assert_eq!(v["a"], 1);
        assert_eq!(v["_client"]["name"], "x");
        assert!(with_client(b"", json!(1)).is_ok());
        assert_eq!(
            with_client(b"[1]", json!(1)).unwrap_err().code,
            jsonrpc::INVALID_PARAMS
        );
    }
}
