//! `proxy run private`: announces its domains and dials back for matching clients
//! (docs/architecture.md §3.1, §3.2 step 4), to each domain's backend (§3.5), ending TLS
//! for the domains that ask (§3.5) with certificates from files or ACME (§3.6).
//!
//! - `mod.rs`: the announcer and the runtime announcements.
//! - `incoming.rs`: the dial-back.
//! - `backend.rs`: each domain's endpoint and options; `terminate.rs`: the TLS server of a
//!   terminated domain; `acme/`: the ACME client and its storage.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use eps_core::backoff::Backoff;
use eps_core::http::{CallError, Handler, Peer};
use eps_core::jsonrpc::{self, Outcome, Request, RpcError};
use eps_core::link::Link;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::announcements::{normalize_domain, rfc3339};
use crate::dialback::{AnnounceAnswer, AnnounceConnections, DomainAnswer, RequestedConnection};
use crate::metrics::Metrics;
use crate::policy::DomainPolicy;
use crate::pool::DataPool;
use crate::settings::{AnnouncementSetting, PrivateSettings, TlsHandling};
use crate::store::FileStore;

/// Longest pause between announcement attempts while the EPS network is not reachable.
const MAX_RETRY: Duration = Duration::from_secs(10);

mod acme;
mod backend;
mod incoming;
mod terminate;

use acme::{Accepted, Acme};
use backend::{Backends, Defaults};

/// A domain this proxy wants announced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Wanted {
    domain: String,
    proxy: String,
    #[serde(default, with = "time::serde::rfc3339::option")]
    expires_at: Option<OffsetDateTime>,
    /// Access rules for the public proxy to enforce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    policy: Option<DomainPolicy>,
    /// The backend's options; absent ones take the settings' defaults (store files written
    /// before backends existed have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    internal_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    proxy_protocol: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls: Option<TlsHandling>,
}

pub struct Private {
    settings: PrivateSettings,
    eps: Link,
    /// Announced from settings (re-read on SIGHUP); never stored.
    configured: Mutex<Vec<Wanted>>,
    /// Added at runtime; kept in the store.
    added: Mutex<Vec<Wanted>>,
    store: FileStore,
    store_lock: tokio::sync::Mutex<()>,
    /// domain → (public proxy that accepted it, expires_at it gave).
    accepted: Arc<Accepted>,
    /// Where each announced domain's clients go.
    backends: Backends,
    /// The backend options of announcements that name none (re-read on SIGHUP).
    defaults: RwLock<Defaults>,
    /// The ACME client, when `private.acme` was set at start.
    acme: Option<Arc<Acme>>,
    /// Domains the public proxy refused at the last answer (at most one per announcement).
    refused: RwLock<HashSet<String>>,
    /// Domains whose rules the public proxy did not confirm (warned about once).
    unconfirmed: Mutex<HashSet<String>>,
    changed: Notify,
    relays: Arc<Semaphore>,
    /// Connections to public proxies dialed ahead of need.
    pool: Arc<DataPool>,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
}

impl Private {
    pub fn new(
        s: &PrivateSettings,
        store: FileStore,
        eps: Link,
        metrics: Arc<Metrics>,
        tracker: TaskTracker,
    ) -> Result<Self, BadAnnouncement> {
        let added: Vec<Wanted> = store.load()?;
        let configured = s
            .announcements
            .iter()
            .map(|a| wanted(a, &s.public_proxy))
            .collect::<Result<Vec<_>, _>>()?;
        let accepted: Arc<Accepted> = Arc::default();
        let acme = s
            .acme
            .as_ref()
            .map(|a| Acme::new(a, accepted.clone()))
            .transpose()
            .map_err(|e| BadAnnouncement::Acme(e.to_string()))?;
        let defaults = Defaults {
            endpoint: s.internal_endpoint.clone(),
            proxy_protocol: s.proxy_protocol,
        };
        let backends = Backends::default();
        // Runtime entries win over settings: they come last.
        backends.install(backends.plan(
            configured.iter().chain(added.iter()),
            &defaults,
            acme.as_ref(),
        )?);
        Ok(Self {
            settings: s.clone(),
            eps,
            configured: Mutex::new(configured),
            added: Mutex::new(added),
            store,
            store_lock: tokio::sync::Mutex::new(()),
            accepted,
            backends,
            defaults: RwLock::new(defaults),
            acme,
            refused: RwLock::new(HashSet::new()),
            unconfirmed: Mutex::new(HashSet::new()),
            changed: Notify::new(),
            relays: Arc::new(Semaphore::new(s.max_relays)),
            pool: Arc::new(DataPool::new(
                s.data_pool,
                s.data_pool_max_age,
                s.connect_timeout,
                metrics.clone(),
            )),
            metrics,
            tracker,
        })
    }

    /// Everything to announce, grouped by public proxy; runtime entries win over settings.
    fn wanted_by_proxy(&self) -> BTreeMap<String, Vec<Wanted>> {
        let now = OffsetDateTime::now_utc();
        let mut by_domain: BTreeMap<String, Wanted> = BTreeMap::new();
        let (configured, added) = (
            self.configured.lock().expect("lock"),
            self.added.lock().expect("lock"),
        );
        for w in configured.iter().chain(added.iter()) {
            by_domain.insert(w.domain.clone(), w.clone());
        }
        let mut out: BTreeMap<String, Vec<Wanted>> = BTreeMap::new();
        for w in by_domain.into_values() {
            if w.expires_at.is_none_or(|t| t > now) {
                out.entry(w.proxy.clone()).or_default().push(w);
            }
        }
        out
    }

    /// Whether `domain` is among the live announcements this proxy makes to `proxy`.
    fn announces_to(&self, domain: &str, proxy: &str, now: OffsetDateTime) -> bool {
        let (configured, added) = (
            self.configured.lock().expect("lock"),
            self.added.lock().expect("lock"),
        );
        // Runtime entries win over settings, as in `wanted_by_proxy`.
        added
            .iter()
            .rev()
            .chain(configured.iter().rev())
            .find(|w| w.domain == domain)
            .is_some_and(|w| w.proxy == proxy && w.expires_at.is_none_or(|t| t > now))
    }

    /// Announces `list` to `proxy` and records what it accepted.
    async fn announce_to(
        &self,
        proxy: &str,
        list: &[Wanted],
    ) -> Result<Vec<DomainAnswer>, CallError> {
        let connections = list
            .iter()
            .map(|w| RequestedConnection {
                domain: w.domain.clone(),
                expires_at: w.expires_at,
                policy: w
                    .policy
                    .as_ref()
                    .map(|p| serde_json::to_value(p).expect("rules")),
            })
            .collect();
        let request = AnnounceConnections {
            connections,
            client: None,
        };
        let answer: AnnounceAnswer = self
            .eps
            .call(&format!("{proxy}.announceConnections"), &request)
            .await?;
        let mut accepted = self.accepted.write().expect("lock");
        let mut refused = self.refused.write().expect("lock");
        let now = OffsetDateTime::now_utc();
        accepted.retain(|_, (_, exp)| exp.is_none_or(|t| t > now));
        let mut unconfirmed = self.unconfirmed.lock().expect("lock");
        for a in &answer.connections {
            if a.accepted {
                refused.remove(&a.domain);
                let sent_rules = list
                    .iter()
                    .any(|w| w.domain == a.domain && w.policy.is_some());
                if sent_rules && a.policy.is_none() {
                    if unconfirmed.insert(a.domain.clone()) {
                        tracing::warn!(domain = %a.domain, %proxy, "the public proxy accepted the domain but did not confirm its access rules: they are not enforced there (a public proxy older than access rules ignores them)");
                    }
                } else {
                    unconfirmed.remove(&a.domain);
                }
                accepted.insert(a.domain.clone(), (proxy.to_string(), a.expires_at));
            } else {
                accepted.remove(&a.domain);
                refused.insert(a.domain.clone());
                let e = a
                    .error
                    .clone()
                    .unwrap_or_else(|| RpcError::internal("refused"));
                tracing::warn!(domain = %a.domain, %proxy, code = e.code, reason = %e.message, "announcement refused");
            }
        }
        Ok(answer.connections)
    }

    /// Announces everything; true when every public proxy answered.
    async fn announce_all(&self) -> bool {
        let mut ok = true;
        for (proxy, list) in self.wanted_by_proxy() {
            match self.announce_to(&proxy, &list).await {
                Ok(answers) => {
                    let n = answers.iter().filter(|a| a.accepted).count();
                    tracing::debug!(%proxy, accepted = n, of = answers.len(), "announced");
                }
                Err(e) => {
                    ok = false;
                    tracing::info!(%proxy, eps = %self.eps.url(), error = %e, "waiting for the EPS network to announce");
                }
            }
        }
        ok
    }

    /// Announces at start, on every change, every `reannounce_interval`, and sooner after a
    /// failure.
    pub async fn announcer(self: Arc<Self>, shutdown: CancellationToken) {
        tokio::spawn(self.pool.clone().sweep(shutdown.clone()));
        let mut retry = Backoff::new(Duration::from_millis(250), MAX_RETRY);
        let mut was_ok = false;
        loop {
            let ok = self.announce_all().await;
            if ok && !was_ok {
                tracing::info!(
                    domains = self.accepted.read().expect("lock").len(),
                    "announcements accepted"
                );
            }
            was_ok = ok;
            let wait = if ok {
                retry.reset();
                self.settings.reannounce_interval
            } else {
                retry.fail()
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.changed.notified() => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Takes the announcements and backend defaults of re-read settings, and announces at
    /// once. Nothing changes when one of them is not taken. Relays in progress go on.
    pub fn reload(&self, s: &PrivateSettings) -> Result<usize, BadAnnouncement> {
        let configured = s
            .announcements
            .iter()
            .map(|a| wanted(a, &self.settings.public_proxy))
            .collect::<Result<Vec<_>, _>>()?;
        let defaults = Defaults {
            endpoint: s.internal_endpoint.clone(),
            proxy_protocol: s.proxy_protocol,
        };
        let n = configured.len();
        {
            // One change at a time: `add` takes the same locks in the same order.
            let mut current = self.configured.lock().expect("lock");
            let added = self.added.lock().expect("lock");
            let planned = self.backends.plan(
                configured.iter().chain(added.iter()),
                &defaults,
                self.acme.as_ref(),
            )?;
            self.backends.install(planned);
            *current = configured;
            *self.defaults.write().expect("lock") = defaults;
        }
        self.changed.notify_one();
        Ok(n)
    }

    /// Rebuilds the backends for these announcements (runtime ones win). Callers hold the
    /// `configured` lock, then the `added` one, as every user of both does.
    fn replan(&self, configured: &[Wanted], added: &[Wanted]) -> Result<(), BadAnnouncement> {
        let defaults = self.defaults.read().expect("lock").clone();
        let planned = self.backends.plan(
            configured.iter().chain(added),
            &defaults,
            self.acme.as_ref(),
        )?;
        self.backends.install(planned);
        Ok(())
    }

    async fn add(&self, p: AddParams) -> Outcome {
        let w = wanted(
            &AnnouncementSetting {
                domain: p.domain,
                proxy: p.proxy,
                expires_at: p.expires_at,
                policy: p.policy,
                internal_endpoint: p.internal_endpoint,
                proxy_protocol: p.proxy_protocol,
                tls: p.tls,
            },
            &self.settings.public_proxy,
        )
        .map_err(|e| RpcError::invalid_params(e.to_string()))?;
        let _s = self.store_lock.lock().await;
        let snapshot = {
            let configured = self.configured.lock().expect("lock");
            let mut added = self.added.lock().expect("lock");
            let mut next = added.clone();
            next.retain(|x| x.domain != w.domain);
            next.push(w.clone());
            // The backend is checked (certificate files read) before anything is stored.
            self.replan(&configured, &next)
                .map_err(|e| RpcError::invalid_params(e.to_string()))?;
            *added = next;
            added.clone()
        };
        self.store
            .save(&snapshot)
            .await
            .map_err(|e| RpcError::internal(e.to_string()))?;
        let answers = self
            .announce_to(&w.proxy, std::slice::from_ref(&w))
            .await
            .map_err(|e| match e {
                CallError::Rpc(e) => e,
                e => RpcError::new(
                    jsonrpc::PEER_UNREACHABLE,
                    format!("stored, to be announced when {} is reachable: {e}", w.proxy),
                ),
            })?;
        let a = answers
            .into_iter()
            .find(|a| a.domain == w.domain)
            .ok_or_else(|| RpcError::internal("public proxy did not answer for the domain"))?;
        if !a.accepted {
            // A refused domain is not kept: it would be refused at every re-announce.
            let snapshot = {
                let configured = self.configured.lock().expect("lock");
                let mut added = self.added.lock().expect("lock");
                added.retain(|x| x.domain != w.domain);
                if let Err(e) = self.replan(&configured, &added) {
                    tracing::error!(error = %e, "backends not rebuilt after a refused announcement");
                }
                added.clone()
            };
            let _ = self.store.save(&snapshot).await;
            return Err(a.error.unwrap_or_else(|| RpcError::internal("refused")));
        }
        // Already announced: the periodic re-announcement takes it from here.
        let mut answer = json!({"domain": a.domain, "proxy": w.proxy, "expires_at": a.expires_at});
        if let Some(p) = a.policy {
            answer["policy"] = p;
        }
        Ok(jsonrpc::to_raw(&answer))
    }

    fn list(&self) -> Outcome {
        let now = OffsetDateTime::now_utc();
        let accepted = self.accepted.read().expect("lock");
        let mut list: Vec<Value> = accepted
            .iter()
            .filter(|(_, (_, exp))| exp.is_none_or(|t| t > now))
            .map(|(d, (p, exp))| json!({"domain": d, "proxy": p, "expires_at": exp.map(rfc3339)}))
            .collect();
        list.sort_by(|a, b| a["domain"].as_str().cmp(&b["domain"].as_str()));
        Ok(jsonrpc::to_raw(&list))
    }
}

/// Why an announcement (from settings, the store or `announceConnection`) is not taken.
#[derive(Debug, thiserror::Error)]
pub enum BadAnnouncement {
    #[error("{0:?} is not a valid domain")]
    Domain(String),
    #[error("{domain}: {reason}")]
    Rules { domain: String, reason: String },
    #[error("{domain}: {reason}")]
    Backend { domain: String, reason: String },
    #[error("private.acme: {0}")]
    Acme(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

fn wanted(a: &AnnouncementSetting, default_proxy: &str) -> Result<Wanted, BadAnnouncement> {
    let domain =
        normalize_domain(&a.domain).ok_or_else(|| BadAnnouncement::Domain(a.domain.clone()))?;
    if let Some(p) = &a.policy {
        p.check_shape().map_err(|reason| BadAnnouncement::Rules {
            domain: domain.clone(),
            reason,
        })?;
    }
    // Whether ACME is there is checked when the backend is built.
    a.check_backend(true)
        .map_err(|reason| BadAnnouncement::Backend {
            domain: domain.clone(),
            reason,
        })?;
    Ok(Wanted {
        domain,
        proxy: a.proxy.clone().unwrap_or_else(|| default_proxy.to_string()),
        expires_at: a.expires_at,
        policy: a.policy.clone().filter(|p| !p.is_empty()),
        internal_endpoint: a.internal_endpoint.clone(),
        proxy_protocol: a.proxy_protocol,
        tls: a.tls.clone(),
    })
}

#[derive(Deserialize)]
struct AddParams {
    domain: String,
    #[serde(default)]
    proxy: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    expires_at: Option<OffsetDateTime>,
    #[serde(default)]
    policy: Option<DomainPolicy>,
    #[serde(default)]
    internal_endpoint: Option<String>,
    #[serde(default)]
    proxy_protocol: Option<bool>,
    #[serde(default)]
    tls: Option<TlsHandling>,
}

/// The private proxy's JSON-RPC methods.
pub struct PrivateRpc(pub Arc<Private>);

impl Handler for PrivateRpc {
    async fn call(&self, req: Request, _peer: Peer) -> Outcome {
        match req.method.as_str() {
            "incomingConnection" => self.0.incoming(crate::params(&req)?).await,
            "announceConnection" => self.0.add(crate::params(&req)?).await,
            "getAnnouncements" => self.0.list(),
            other => Err(RpcError::method_not_found(format!(
                "the private proxy has no method {other:?}"
            ))),
        }
    }
}
