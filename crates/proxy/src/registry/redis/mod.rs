//! The Redis backend of the announcements: one hash shared by every public proxy, changed by
//! atomic scripts that also publish each change on a channel every instance follows.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{OpenError, StoreUnavailable};
use crate::announcements::{conflict, covered, Announcement, Refusal, Table};
use crate::hostname;
use crate::policy::DomainPolicy;
use crate::settings::RedisSettings;

/// Deadline of one Redis command; past it the announcement is refused, not delayed.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest pause between attempts to reach Redis: short, since an instance that has not
/// re-subscribed does not route announcements made meanwhile.
pub(super) const MAX_REDIS_BACKOFF: Duration = Duration::from_millis(500);

/// Stores `value` under `domain` unless a live announcement of another operator holds it (0)
/// or, for an exact name its operator does not hold yet, a live wildcard of another operator
/// covers it (2), and publishes the
/// change. KEYS[1] hash; ARGV: domain, operator, value, now (unix), channel, the covering
/// wildcard's name (`*.parent`, or empty for a wildcard).
const CLAIM: &str = r#"
local function held_by_other(name)
  local cur = redis.call('HGET', KEYS[1], name)
  if not cur then return false end
  local ok, a = pcall(cjson.decode, cur)
  return ok and a.operator ~= ARGV[2] and tonumber(a.expires_unix) > tonumber(ARGV[4])
end
local function held_by_same(name)
  local cur = redis.call('HGET', KEYS[1], name)
  if not cur then return false end
  local ok, a = pcall(cjson.decode, cur)
  return ok and a.operator == ARGV[2] and tonumber(a.expires_unix) > tonumber(ARGV[4])
end
if held_by_other(ARGV[1]) then return 0 end
if ARGV[6] ~= '' and not held_by_same(ARGV[1]) and held_by_other(ARGV[6]) then return 2 end
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

/// How the primary is found.
enum Primary {
    /// One configured server.
    Direct(redis::Client),
    /// Whichever server the Sentinels name, asked again at each (re)connect.
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

pub(super) struct RedisBackend {
    primary: Primary,
    pub(super) address: String,
    key: String,
    channel: String,
    conn: tokio::sync::RwLock<Option<ConnectionManager>>,
    claim: redis::Script,
    prune: redis::Script,
    /// Replicas that must confirm a change before it is acknowledged (`WAIT`).
    min_replicas: u32,
    replica_timeout: Duration,
}

impl RedisBackend {
    pub(super) fn new(s: &RedisSettings) -> Result<Self, OpenError> {
        use redis::IntoConnectionInfo;
        let mut redis_info = redis::RedisConnectionInfo::default().set_db(s.database);
        if let Some(p) = &s.password {
            redis_info = redis_info.set_password(p.expose());
        }
        let node = |address: &str| -> Result<redis::ConnectionInfo, OpenError> {
            let (host, port) = address
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
                .ok_or_else(|| OpenError::Address(address.to_string()))?;
            Ok(redis::ConnectionAddr::Tcp(host.to_string(), port).into_connection_info()?)
        };
        let (primary, address) = match &s.sentinel {
            None => {
                let address = s.addresses.first().cloned().unwrap_or_default();
                let info = node(&address)?.set_redis_settings(redis_info);
                (Primary::Direct(redis::Client::open(info)?), address)
            }
            Some(sentinel) => {
                let mut sentinel_info = redis::RedisConnectionInfo::default();
                if let Some(p) = &sentinel.password {
                    sentinel_info = sentinel_info.set_password(p.expose());
                }
                let sentinels = s
                    .addresses
                    .iter()
                    .map(|a| Ok(node(a)?.set_redis_settings(sentinel_info.clone())))
                    .collect::<Result<Vec<_>, OpenError>>()?;
                let client = SentinelClient::build(
                    sentinels,
                    sentinel.master_name.clone(),
                    Some(
                        SentinelNodeConnectionInfo::default().set_redis_connection_info(redis_info),
                    ),
                    SentinelServerType::Master,
                )?;
                let address = format!(
                    "primary {} via Sentinel {}",
                    sentinel.master_name,
                    s.addresses.join(",")
                );
                (Primary::Sentinel(tokio::sync::Mutex::new(client)), address)
            }
        };
        Ok(Self {
            primary,
            address,
            key: s.key.clone(),
            channel: format!("{}:changes", s.key),
            conn: tokio::sync::RwLock::new(None),
            claim: redis::Script::new(CLAIM),
            prune: redis::Script::new(PRUNE),
            min_replicas: s.min_replicas,
            replica_timeout: s.replica_timeout,
        })
    }

    /// A client of the primary: the configured server, or the one the Sentinels name now.
    async fn primary(&self) -> Result<redis::Client, StoreUnavailable> {
        match &self.primary {
            Primary::Direct(c) => Ok(c.clone()),
            Primary::Sentinel(s) => {
                let mut s = s.lock().await;
                tokio::time::timeout(REDIS_TIMEOUT * 2, s.async_get_client())
                    .await
                    .map_err(|_| self.unavailable("no Sentinel named the primary in time"))?
                    .map_err(|e| self.unavailable(e))
            }
        }
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

    pub(super) async fn claim(
        &self,
        a: &Announcement,
        now: OffsetDateTime,
    ) -> Result<Result<(), Refusal>, StoreUnavailable> {
        let value = encode(a);
        let covering = match hostname::wildcard_parent(&a.domain) {
            Some(_) => String::new(),
            None => hostname::parent(&a.domain)
                .map(|p| format!("{}{p}", hostname::WILDCARD))
                .unwrap_or_default(),
        };
        let mut conn = self.conn().await?;
        let mut call = self.claim.key(&self.key);
        call.arg(&a.domain)
            .arg(&a.operator)
            .arg(value)
            .arg(now.unix_timestamp())
            .arg(&self.channel)
            .arg(&covering);
        let done: i64 = tokio::time::timeout(REDIS_TIMEOUT, call.invoke_async(&mut conn))
            .await
            .map_err(|_| self.unavailable("timed out"))?
            .map_err(|e| self.unavailable(e))?;
        if done == 1 && self.min_replicas > 0 {
            self.replicated(&mut conn).await?;
        }
        Ok(match done {
            1 => Ok(()),
            2 => Err(covered(&a.domain, &covering)),
            _ => Err(conflict(&a.domain)),
        })
    }

    /// Waits until `min_replicas` replicas have every write made so far on `conn` (`WAIT`).
    async fn replicated(&self, conn: &mut ConnectionManager) -> Result<(), StoreUnavailable> {
        let ms = u64::try_from(self.replica_timeout.as_millis()).unwrap_or(u64::MAX);
        let acked: i64 = tokio::time::timeout(
            REDIS_TIMEOUT + self.replica_timeout,
            redis::cmd("WAIT")
                .arg(self.min_replicas)
                .arg(ms)
                .query_async(conn),
        )
        .await
        .map_err(|_| self.unavailable("WAIT timed out"))?
        .map_err(|e| self.unavailable(e))?;
        if acked < i64::from(self.min_replicas) {
            return Err(self.unavailable(format!(
                "the change reached the primary but {acked} of min_replicas {} replicas within \
                 {:.1} s (refused, so that a failover cannot lose it; the private proxy tries again)",
                self.min_replicas,
                self.replica_timeout.as_secs_f64()
            )));
        }
        Ok(())
    }

    pub(super) async fn prune(&self, now: OffsetDateTime) -> Result<i64, StoreUnavailable> {
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
    pub(super) async fn follow(
        &self,
        table: &RwLock<Table>,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreUnavailable> {
        let client = self.primary().await?;
        // Through Sentinel, every (re)connect asks which server is the primary now: after a
        // failover the old one is gone or a replica.
        let reconnect = matches!(self.primary, Primary::Sentinel(_));
        if reconnect || self.conn.read().await.is_none() {
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(REDIS_TIMEOUT))
                .set_response_timeout(Some(REDIS_TIMEOUT + self.replica_timeout))
                .set_number_of_retries(1)
                .set_max_delay(MAX_REDIS_BACKOFF);
            let conn = tokio::time::timeout(
                REDIS_TIMEOUT * 2,
                client.get_connection_manager_with_config(config),
            )
            .await
            .map_err(|_| self.unavailable("connect timed out"))?
            .map_err(|e| self.unavailable(e))?;
            *self.conn.write().await = Some(conn);
        }
        let mut pubsub = tokio::time::timeout(REDIS_TIMEOUT, client.get_async_pubsub())
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
