//! The public proxy's announcements: an in-memory [`Table`] that the per-connection path reads,
//! backed by a durable store.
//!
//! - `file`: one instance; the table is written whole, atomically, before a change is answered.
//! - `redis`: several instances share one hash. A change is made by an atomic script (the 409
//!   check and the write in one step) that also publishes it; every instance follows the
//!   channel and reloads the whole hash after each (re)connect. Routing never waits on Redis:
//!   when it is down, clients are routed from memory and announcements are refused. Through
//!   Sentinel, the primary is looked up at every (re)connect; in a Redis Cluster, the hash and
//!   its sharded channel share one slot and the crate routes to the node serving it. With
//!   `min_replicas` a change is acknowledged only once replicas have it (`WAIT`).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use eps_core::backoff::Backoff;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use self::redis::{RedisBackend, MAX_REDIS_BACKOFF};
use crate::announcements::{self, Announcement, Refusal, Table};
use crate::policy::DomainPolicy;
use crate::settings::DatastoreSettings;
use crate::store::FileStore;

mod redis;

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    File(#[from] crate::store::StoreError),
    #[error("datastore.settings.addresses: {0:?} is not host:port")]
    Address(String),
    #[error("Redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// `datastore.settings.tls` names a file that is missing or holds no usable PEM.
    #[error("datastore.settings.tls: {0}")]
    Tls(#[from] eps_core::tls::TlsError),
}

/// Why a change could not be made durable.
#[derive(Debug, thiserror::Error)]
pub enum StoreUnavailable {
    #[error("{0}")]
    File(#[from] crate::store::StoreError),
    #[error("Redis at {address} unavailable: {reason}")]
    Redis { address: String, reason: String },
}

/// One domain an operator asks to announce.
#[derive(Debug, Clone)]
pub struct AnnounceRequest {
    pub domain: String,
    pub expires_at: Option<OffsetDateTime>,
    /// Access rules, already checked against the public operator's bounds.
    pub policy: Option<Arc<DomainPolicy>>,
}

enum Backend {
    File(FileStore),
    Redis(Box<RedisBackend>),
}

pub struct Registry {
    table: RwLock<Table>,
    backend: Backend,
    /// Serializes file writes so the file always holds the latest table.
    write_lock: tokio::sync::Mutex<()>,
}

impl Registry {
    /// Opens the store; a file store is read at once, Redis is reached by [`Registry::follow`].
    pub fn open(settings: &DatastoreSettings) -> Result<Self, OpenError> {
        let (table, backend) = match settings {
            DatastoreSettings::File { path } => {
                let store = FileStore::open(path)?;
                let mut list: Vec<Announcement> = store.load()?;
                let now = OffsetDateTime::now_utc();
                list.retain(|a| a.expires_at > now);
                tracing::info!(announcements = list.len(), path = %path.display(), "loaded announcements");
                (Table::from_list(list), Backend::File(store))
            }
            DatastoreSettings::Redis(r) => (
                Table::default(),
                Backend::Redis(Box::new(RedisBackend::new(r)?)),
            ),
        };
        Ok(Self {
            table: RwLock::new(table),
            backend,
            write_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The live announcement that routes host name `domain` (its own, or the wildcard over it):
    /// its operator, its rules and, as `domain`, the announced name per-domain limits count by.
    pub fn lookup(&self, domain: &str) -> Option<Arc<Announcement>> {
        let now = OffsetDateTime::now_utc();
        let table = self.table.read().expect("table lock");
        table.lookup(domain, now).cloned()
    }

    /// Whether the announced name (a host name or `*.P`) is live.
    pub fn holds(&self, announced: &str) -> bool {
        let now = OffsetDateTime::now_utc();
        let table = self.table.read().expect("table lock");
        table.held(announced, now).is_some()
    }

    /// Number of live announcements.
    pub fn live_count(&self) -> usize {
        let now = OffsetDateTime::now_utc();
        let table = self.table.read().expect("table lock");
        table.live_count(now)
    }

    /// Live announcements, sorted by domain.
    pub fn live(&self) -> Vec<Announcement> {
        let table = self.table.read().expect("table lock");
        table.live(OffsetDateTime::now_utc())
    }

    /// Applies the rules to each requested domain and makes the accepted ones durable before
    /// returning. Nothing is accepted when the store is unavailable.
    pub async fn announce(
        &self,
        operator: &str,
        allowed: &[String],
        requests: &[AnnounceRequest],
    ) -> Result<Vec<Result<Announcement, Refusal>>, StoreUnavailable> {
        let now = OffsetDateTime::now_utc();
        let checked: Vec<_> = requests
            .iter()
            .map(|r| {
                let policy = r.policy.clone();
                announcements::validate(operator, allowed, &r.domain, r.expires_at, policy, now)
            })
            .collect();
        match &self.backend {
            Backend::File(store) => {
                let _w = self.write_lock.lock().await;
                let (before, results, all) = {
                    let mut t = self.table.write().expect("table lock");
                    let before = t.clone();
                    let results: Vec<_> = checked
                        .into_iter()
                        .map(|c| c.and_then(|a| t.claim(a, now)))
                        .collect();
                    (before, results, t.all())
                };
                if let Err(e) = store.save(&all).await {
                    // Not durable, so not accepted.
                    *self.table.write().expect("table lock") = before;
                    return Err(e.into());
                }
                Ok(results)
            }
            Backend::Redis(r) => {
                let mut results = Vec::with_capacity(checked.len());
                for c in checked {
                    results.push(match c {
                        Ok(a) => r.claim(&a, now).await?.map(|()| {
                            self.table
                                .write()
                                .expect("table lock")
                                .set(&a.domain, Some(a.clone()));
                            a
                        }),
                        Err(refusal) => Err(refusal),
                    });
                }
                Ok(results)
            }
        }
    }

    /// Removes expired announcements from memory and from the store.
    pub async fn prune(&self) {
        let now = OffsetDateTime::now_utc();
        match &self.backend {
            Backend::File(store) => {
                let _w = self.write_lock.lock().await;
                let (removed, all) = {
                    let mut t = self.table.write().expect("table lock");
                    (t.prune(now), t.all())
                };
                if removed > 0 {
                    tracing::info!(removed, "expired announcements removed");
                    if let Err(e) = store.save(&all).await {
                        tracing::error!("{e}");
                    }
                }
            }
            Backend::Redis(r) => {
                self.table.write().expect("table lock").prune(now);
                match r.prune(now).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(removed = n, "expired announcements removed from Redis")
                    }
                    Err(e) => tracing::info!("expired announcements not pruned: {e}"),
                }
            }
        }
    }

    /// Follows the shared store until `shutdown` (Redis only; a file store has nothing to
    /// follow).
    pub async fn follow(&self, shutdown: CancellationToken) {
        let Backend::Redis(r) = &self.backend else {
            return;
        };
        let mut backoff = Backoff::new(Duration::from_millis(100), MAX_REDIS_BACKOFF);
        loop {
            let pause = match r.follow(&self.table, &shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    let pause = backoff.fail();
                    tracing::info!(redis = %r.address, error = %e, retry_in_ms = pause.as_millis() as u64, "waiting for Redis; routing from memory");
                    pause
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}
