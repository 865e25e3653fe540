//! The public proxy's announcements: an in-memory [`Table`] that the per-connection path reads,
//! backed by a durable store.
//!
//! - `file`: one instance; the table is written whole, atomically, before a change is answered.
//! - `redis`: several instances share one hash. A change is made by an atomic script (the 409
//!   check and the write in one step) that also publishes it; every instance follows the
//!   channel and reloads the whole hash after each (re)connect. Routing never waits on Redis:
//!   when it is down, clients are routed from memory and announcements are refused.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::announcements::{self, conflict, Announcement, Refusal, Table};
use crate::policy::DomainPolicy;
use crate::settings::{DatastoreSettings, RedisSettings};
use crate::store::FileStore;

/// Deadline of one Redis command; past it the announcement is refused, not delayed.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest pause between attempts to reach Redis: short, since an instance that has not
/// re-subscribed does not route announcements made meanwhile.
const MAX_REDIS_BACKOFF: Duration = Duration::from_millis(500);

/// Stores `value` under `domain` unless a live announcement of another operator holds it,
/// and publishes the change. KEYS[1] hash; ARGV: domain, operator, value, now (unix), channel.
const CLAIM: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local ok, a = pcall(cjson.decode, cur)
  if ok and a.operator ~= ARGV[2] and tonumber(a.expires_unix) > tonumber(ARGV[4]) then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('PUBLISH', ARGV[5], ARGV[1] .. '\n' .. ARGV[3])
return 1
"#;

/// Deletes expired (or unreadable) entries and publishes each deletion. KEYS[1] hash;
/// ARGV: now (unix), channel.
const PRUNE: &str = r#"
local all = redis.call('HGETALL', KEYS[1])
local n = 0
for i = 1, #all, 2 do
  local ok, a = pcall(cjson.decode, all[i + 1])
  if (not ok) or tonumber(a.expires_unix) <= tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], all[i])
    redis.call('PUBLISH', ARGV[2], all[i] .. '\n')
    n = n + 1
  end
end
return n
"#;

/// Why a change could not be made durable.
#[derive(Debug, thiserror::Error)]
pub enum StoreUnavailable {
    #[error("{0}")]
    File(#[from] crate::store::StoreError),
    #[error("Redis at {address} unavailable: {reason}")]
    Redis { address: String, reason: String },
}

/// One hash value in Redis. `expires_unix` lets the scripts compare without parsing dates.
#[derive(Serialize, Deserialize)]
struct Stored {
    operator: String,
    #[serde(with = "time::serde::rfc3339")]
    expires_at: OffsetDateTime,
    expires_unix: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    policy: Option<Arc<DomainPolicy>>,
}

/// Where a client for a domain goes, and the rules its announcement set.
#[derive(Debug, Clone)]
pub struct Route {
    pub operator: String,
    pub policy: Option<Arc<DomainPolicy>>,
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

struct RedisBackend {
    client: redis::Client,
    address: String,
    key: String,
    channel: String,
    conn: tokio::sync::RwLock<Option<ConnectionManager>>,
    claim: redis::Script,
    prune: redis::Script,
}

pub struct Registry {
    table: RwLock<Table>,
    backend: Backend,
    /// Serializes file writes so the file always holds the latest table.
    write_lock: tokio::sync::Mutex<()>,
}

impl Registry {
    /// Opens the store; a file store is read at once, Redis is reached by [`Registry::follow`].
    pub fn open(settings: &DatastoreSettings) -> Result<Self, String> {
        let (table, backend) = match settings {
            DatastoreSettings::File { path } => {
                let store = FileStore::open(path).map_err(|e| e.to_string())?;
                let mut list: Vec<Announcement> = store.load().map_err(|e| e.to_string())?;
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

    /// The operator holding a live announcement of exactly `domain`, and its rules.
    pub fn lookup(&self, domain: &str) -> Option<Route> {
        let now = OffsetDateTime::now_utc();
        let table = self.table.read().expect("table lock");
        table.lookup(domain, now).map(|a| Route {
            operator: a.operator.clone(),
            policy: a.policy.clone(),
        })
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
        let mut backoff = Duration::from_millis(100);
        loop {
            match r.follow(&self.table, &shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::info!(redis = %r.address, error = %e, retry_in_ms = backoff.as_millis() as u64, "waiting for Redis; routing from memory");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_REDIS_BACKOFF);
        }
    }
}

impl RedisBackend {
    fn new(s: &RedisSettings) -> Result<Self, String> {
        use redis::IntoConnectionInfo;
        let address = s.addresses.first().cloned().unwrap_or_default();
        let (host, port) = address
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
            .ok_or_else(|| format!("datastore.settings.addresses: {address:?} is not host:port"))?;
        let mut redis_info = redis::RedisConnectionInfo::default().set_db(s.database);
        if let Some(p) = &s.password {
            redis_info = redis_info.set_password(p.expose());
        }
        let info = redis::ConnectionAddr::Tcp(host.to_string(), port)
            .into_connection_info()
            .map_err(|e| e.to_string())?
            .set_redis_settings(redis_info);
        let client = redis::Client::open(info).map_err(|e| format!("datastore: {e}"))?;
        Ok(Self {
            client,
            address,
            key: s.key.clone(),
            channel: format!("{}:changes", s.key),
            conn: tokio::sync::RwLock::new(None),
            claim: redis::Script::new(CLAIM),
            prune: redis::Script::new(PRUNE),
        })
    }

    fn unavailable(&self, reason: impl std::fmt::Display) -> StoreUnavailable {
        StoreUnavailable::Redis {
            address: self.address.clone(),
            reason: reason.to_string(),
        }
    }

    async fn conn(&self) -> Result<ConnectionManager, StoreUnavailable> {
        self.conn
            .read()
            .await
            .clone()
            .ok_or_else(|| self.unavailable("not connected yet"))
    }

    async fn claim(
        &self,
        a: &Announcement,
        now: OffsetDateTime,
    ) -> Result<Result<(), Refusal>, StoreUnavailable> {
        let value = encode(a);
        let mut conn = self.conn().await?;
        let mut call = self.claim.key(&self.key);
        call.arg(&a.domain)
            .arg(&a.operator)
            .arg(value)
            .arg(now.unix_timestamp())
            .arg(&self.channel);
        let done: i64 = tokio::time::timeout(REDIS_TIMEOUT, call.invoke_async(&mut conn))
            .await
            .map_err(|_| self.unavailable("timed out"))?
            .map_err(|e| self.unavailable(e))?;
        Ok(if done == 1 {
            Ok(())
        } else {
            Err(conflict(&a.domain))
        })
    }

    async fn prune(&self, now: OffsetDateTime) -> Result<i64, StoreUnavailable> {
        let mut conn = self.conn().await?;
        let mut call = self.prune.key(&self.key);
        call.arg(now.unix_timestamp()).arg(&self.channel);
        tokio::time::timeout(REDIS_TIMEOUT, call.invoke_async(&mut conn))
            .await
            .map_err(|_| self.unavailable("timed out"))?
            .map_err(|e| self.unavailable(e))
    }

    /// Subscribes, reloads the whole hash, then applies published changes until the
    /// subscription breaks (an error) or `shutdown` (Ok).
    async fn follow(
        &self,
        table: &RwLock<Table>,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreUnavailable> {
        if self.conn.read().await.is_none() {
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(REDIS_TIMEOUT))
                .set_response_timeout(Some(REDIS_TIMEOUT))
                .set_number_of_retries(1)
                .set_max_delay(MAX_REDIS_BACKOFF);
            let conn = tokio::time::timeout(
                REDIS_TIMEOUT * 2,
                self.client.get_connection_manager_with_config(config),
            )
            .await
            .map_err(|_| self.unavailable("connect timed out"))?
            .map_err(|e| self.unavailable(e))?;
            *self.conn.write().await = Some(conn);
        }
        let mut pubsub = tokio::time::timeout(REDIS_TIMEOUT, self.client.get_async_pubsub())
            .await
            .map_err(|_| self.unavailable("connect timed out"))?
            .map_err(|e| self.unavailable(e))?;
        pubsub
            .subscribe(&self.channel)
            .await
            .map_err(|e| self.unavailable(e))?;
        // Subscribed first, so that no change made during the reload is missed.
        let mut conn = self.conn().await?;
        let all: HashMap<String, String> = tokio::time::timeout(
            REDIS_TIMEOUT,
            redis::cmd("HGETALL").arg(&self.key).query_async(&mut conn),
        )
        .await
        .map_err(|_| self.unavailable("timed out"))?
        .map_err(|e| self.unavailable(e))?;
        let mut list: Vec<Announcement> = all.iter().filter_map(|(d, v)| decode(d, v)).collect();
        // Announcements leave Redis only by expiring. A live one that we hold and Redis does
        // not means Redis lost data (a restart without persistence): write it back.
        let now = OffsetDateTime::now_utc();
        let lost: Vec<Announcement> = table
            .read()
            .expect("table lock")
            .live(now)
            .into_iter()
            .filter(|a| !all.contains_key(&a.domain))
            .collect();
        let mut restored = 0;
        for a in lost {
            if let Ok(()) = self.claim(&a, now).await? {
                list.push(a);
                restored += 1;
            }
        }
        let n = list.len();
        *table.write().expect("table lock") = Table::from_list(list);
        tracing::info!(redis = %self.address, announcements = n, restored, "following Redis");
        let mut messages = pubsub.into_on_message();
        loop {
            tokio::select! {
                m = messages.next() => {
                    let Some(m) = m else {
                        return Err(self.unavailable("subscription lost"));
                    };
                    let payload: String = m.get_payload().unwrap_or_default();
                    let (domain, value) = payload.split_once('\n').unwrap_or((&payload, ""));
                    let a = if value.is_empty() { None } else { decode(domain, value) };
                    table.write().expect("table lock").set(domain, a);
                }
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }
}

fn encode(a: &Announcement) -> String {
    serde_json::to_string(&Stored {
        operator: a.operator.clone(),
        expires_at: a.expires_at,
        expires_unix: a.expires_at.unix_timestamp(),
        policy: a.policy.clone(),
    })
    .expect("json")
}

fn decode(domain: &str, value: &str) -> Option<Announcement> {
    let s: Stored = serde_json::from_str(value).ok()?;
    Some(Announcement {
        domain: domain.to_string(),
        operator: s.operator,
        expires_at: s.expires_at,
        policy: s.policy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_survive_the_redis_value() {
        let rules = DomainPolicy {
            allow: vec!["192.0.2.0/24".parse().unwrap()],
            max_concurrent: Some(5),
            new_connections_per_second: Some(2.5),
            ..Default::default()
        };
        let a = Announcement {
            domain: "a.example".into(),
            operator: "op".into(),
            expires_at: OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
            policy: Some(Arc::new(rules)),
        };
        let value = encode(&a);
        assert_eq!(decode("a.example", &value), Some(a.clone()));
        // A value written before rules existed still reads, without rules.
        let old =
            r#"{"operator":"op","expires_at":"2027-01-15T08:00:00Z","expires_unix":1800000000}"#;
        assert_eq!(decode("a.example", old).unwrap().policy, None);
        let plain = Announcement { policy: None, ..a };
        assert!(!encode(&plain).contains("policy"));
    }
}
