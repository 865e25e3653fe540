//! The public proxy's control side: the JSON-RPC methods its EPS server delivers
//! (`announceConnections`, `getAnnouncements`), and the checks an announcement's rules pass.

use std::sync::Arc;

use eps_core::http::{Handler, Peer};
use eps_core::jsonrpc::{self, Outcome, Request, RpcError};
use serde_json::Value;

use super::Public;
use crate::announcements::Refusal;
use crate::dialback::{AnnounceAnswer, AnnounceConnections, DomainAnswer};
use crate::policy::{self, DomainPolicy};
use crate::registry::AnnounceRequest;

impl Public {
    async fn announce(&self, params: AnnounceConnections) -> Outcome {
        let Some(client) = params.client else {
            return Err(RpcError::invalid_params(
                "no _client: announcements must come through the EPS server",
            ));
        };
        let allowed: Vec<String> = client
            .entry
            .service_settings("proxy")
            .and_then(|s| s.get("allowed_domains"))
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        // Rules beyond this proxy's bounds refuse their domain only; the others go on.
        let mut early: Vec<Option<Refusal>> = Vec::with_capacity(params.connections.len());
        let mut domains = Vec::with_capacity(params.connections.len());
        let mut requests = Vec::with_capacity(params.connections.len());
        for c in params.connections {
            domains.push(c.domain.clone());
            match self.domain_rules(c.policy) {
                Ok(policy) => {
                    early.push(None);
                    requests.push(AnnounceRequest {
                        domain: c.domain,
                        expires_at: c.expires_at,
                        policy,
                    });
                }
                Err(r) => early.push(Some(r)),
            }
        }
        let mut outcomes = self
            .registry
            .announce(&client.name, &allowed, &requests)
            .await
            .map_err(|e| {
                tracing::error!("announcements not stored: {e}");
                RpcError::new(
                    jsonrpc::SERVICE_UNAVAILABLE,
                    format!("announcements not stored: {e}"),
                )
            })?
            .into_iter();
        let results: Vec<DomainAnswer> = early
            .into_iter()
            .zip(domains)
            .map(|(refused, domain)| {
                let o = match refused {
                    Some(r) => Err(r),
                    None => outcomes.next().unwrap_or_else(|| {
                        Err(Refusal::new(jsonrpc::INTERNAL_ERROR, "no outcome"))
                    }),
                };
                match o {
                    Ok(a) => DomainAnswer {
                        domain: a.domain,
                        accepted: true,
                        expires_at: Some(a.expires_at),
                        error: None,
                        // The rules are echoed: a private proxy that sent rules and gets none
                        // back knows they are not enforced (an older public proxy ignores them).
                        policy: a.policy.map(|p| serde_json::to_value(&*p).expect("rules")),
                    },
                    Err(r) => DomainAnswer {
                        domain,
                        accepted: false,
                        expires_at: None,
                        error: Some(r.into()),
                        policy: None,
                    },
                }
            })
            .collect();
        for r in &results {
            tracing::info!(operator = %client.name, domain = %r.domain, accepted = r.accepted, "announcement");
        }
        Ok(jsonrpc::to_raw(&AnnounceAnswer {
            connections: results,
        }))
    }

    /// An announcement's rules, decoded and checked against this proxy's bounds.
    fn domain_rules(&self, raw: Option<Value>) -> Result<Option<Arc<DomainPolicy>>, Refusal> {
        let Some(raw) = raw.filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let rules: DomainPolicy = serde_json::from_value(raw)
            .map_err(|e| Refusal::new(jsonrpc::INVALID_PARAMS, format!("policy: {e}")))?;
        policy::check_rules(&rules, &self.domain_limits)?;
        Ok((!rules.is_empty()).then(|| Arc::new(rules)))
    }

    fn get_announcements(&self) -> Outcome {
        // `Announcement` serializes as `{domain, operator, expires_at}`.
        Ok(jsonrpc::to_raw(&self.registry.live()))
    }
}

/// The public proxy's JSON-RPC methods, as delivered by its EPS server.
pub struct PublicRpc(pub Arc<Public>);

impl Handler for PublicRpc {
    async fn call(&self, req: Request, _peer: Peer) -> Outcome {
        match req.method.as_str() {
            "announceConnections" => self.0.announce(crate::params(&req)?).await,
            "getAnnouncements" => self.0.get_announcements(),
            other => Err(RpcError::method_not_found(format!(
                "the public proxy has no method {other:?}"
            ))),
        }
    }
}
