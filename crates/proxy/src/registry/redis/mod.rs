//! The Redis backend of the announcements: one hash shared by every public proxy, changed by
//! atomic scripts that also publish each change on a channel every instance follows.
//!
//! Layout: this file holds the scripts and what the registry asks of Redis (claim, prune,
//! follow); `connect.rs` how each form (one server, Sentinel, Cluster; TCP or TLS) is reached.
//!
//! In a cluster both scripts touch one key, the hash, and publish on a sharded channel named
//! with the hash's slot (see [`channel_name`]), so each runs on the one node serving that slot.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use self::connect::{Changes, Conn, Target};
use super::{OpenError, StoreUnavailable};
use crate::announcements::{conflict, covered, Announcement, Refusal, Table};
use crate::hostname;
use crate::policy::DomainPolicy;
use crate::settings::{hash_tag, RedisSettings};

mod connect;

/// Deadline of one Redis command; past it the announcement is refused, not delayed.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest pause between attempts to reach Redis: short, since an instance that has not
/// re-subscribed does not route announcements made meanwhile.
pub(super) const MAX_REDIS_BACKOFF: Duration = Duration::from_millis(500);

/// Stores `value` under `domain` unless a live announcement of another operator holds it (0)
/// or, for an exact name its operator does not hold yet, a live wildcard of another operator
/// covers it (2), and publishes the change (`PUBLISH` is `'PUBLISH'`, or `'SPUBLISH'` in a
/// cluster, set on a first line). KEYS[1] hash; ARGV: domain, operator, value, now (unix),
/// channel, the covering wildcard's name (`*.parent`, or empty for a wildcard).
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
redis.call(PUBLISH, ARGV[5], ARGV[1] .. '\n' .. ARGV[3])
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
    redis.call(PUBLISH, ARGV[2], all[i] .. '\n')
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

pub(super) struct RedisBackend {
    /// How Redis is reached, and the stamps of the TLS files last tried (empty without TLS):
    /// built anew at a (re)connect when those files changed.
    target: std::sync::Mutex<(Arc<Target>, Vec<eps_core::files::Stamp>)>,
    settings: RedisSettings,
    pub(super) address: String,
    key: String,
    channel: String,
    conn: tokio::sync::RwLock<Option<Conn>>,
    claim: redis::Script,
    /// The claim script's text, for `EVAL` (see [`RedisBackend::claim_replicated`]).
    claim_text: String,
    prune: redis::Script,
    /// Replicas that must confirm a change before it is acknowledged (`WAIT`).
    min_replicas: u32,
    replica_timeout: Duration,
}

impl RedisBackend {
    pub(super) fn new(s: &RedisSettings) -> Result<Self, OpenError> {
        let tls_files = tls_stamps(s);
        let target = Target::new(s)?;
        let tls = if s.tls.is_some() { " over TLS" } else { "" };
        let address = match (&s.sentinel, s.cluster) {
            (Some(sentinel), _) => format!(
                "primary {} via Sentinel {}{tls}",
                sentinel.master_name,
                s.addresses.join(",")
            ),
            (None, true) => format!("cluster via {}{tls}", s.addresses.join(",")),
            (None, false) => format!("{}{tls}", s.addresses[0]),
        };
        // Sharded pub/sub in a cluster: the channel lives with the hash's slot, so a script may
        // publish on it (a script touches one slot only), and no message crosses the whole
        // cluster bus.
        let publish = if s.cluster { "'SPUBLISH'" } else { "'PUBLISH'" };
        let script = |text: &str| format!("local PUBLISH = {publish}\n{text}");
        Ok(Self {
            target: std::sync::Mutex::new((Arc::new(target), tls_files)),
            settings: s.clone(),
            address,
            key: s.key.clone(),
            channel: channel_name(&s.key, s.cluster),
            conn: tokio::sync::RwLock::new(None),
            claim: redis::Script::new(&script(CLAIM)),
            claim_text: script(CLAIM),
            prune: redis::Script::new(&script(PRUNE)),
            min_replicas: s.min_replicas,
            replica_timeout: s.replica_timeout,
        })
    }

    /// A client of the primary the Sentinels name now.
    async fn sentinel_primary(
        &self,
        sentinel: &tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    ) -> Result<redis::Client, StoreUnavailable> {
        let mut s = sentinel.lock().await;
        tokio::time::timeout(REDIS_TIMEOUT * 2, s.async_get_client())
            .await
            .map_err(|_| self.unavailable("no Sentinel named the primary in time"))?
            .map_err(|e| self.unavailable(e))
    }

    fn unavailable(&self, reason: impl std::fmt::Display) -> StoreUnavailable {
        StoreUnavailable::Redis {
            address: self.address.clone(),
            reason: reason.to_string(),
        }
    }

    async fn conn(&self) -> Result<Conn, StoreUnavailable> {
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
        let args = [
            a.domain.clone(),
            a.operator.clone(),
            value,
            now.unix_timestamp().to_string(),
            self.channel.clone(),
            covering.clone(),
        ];
        let mut conn = self.conn().await?;
        let done: i64 = if self.min_replicas == 0 {
            let mut call = self.claim.key(&self.key);
            call.arg(&args[..]);
            tokio::time::timeout(REDIS_TIMEOUT, call.invoke_async(&mut conn))
                .await
                .map_err(|_| self.unavailable("timed out"))?
                .map_err(|e| self.unavailable(e))?
        } else {
            let mut eval = redis::cmd("EVAL");
            eval.arg(&self.claim_text)
                .arg(1)
                .arg(&self.key)
                .arg(&args[..]);
            self.claim_replicated(&mut conn, eval).await?
        };
        Ok(match done {
            1 => Ok(()),
            2 => Err(covered(&a.domain, &covering)),
            _ => Err(conflict(&a.domain)),
        })
    }

    /// The claim script and a `WAIT` for `min_replicas` in one pipeline: both go out on the
    /// same connection to the same node, so `WAIT` counts the replicas that have this very
    /// write (a `WAIT` sent after a reconnect would count those of a fresh connection, which
    /// has written nothing). The script goes as `EVAL`, since a primary that was a replica
    /// until a failover has not cached it.
    async fn claim_replicated(
        &self,
        conn: &mut Conn,
        eval: redis::Cmd,
    ) -> Result<i64, StoreUnavailable> {
        let ms = u64::try_from(self.replica_timeout.as_millis()).unwrap_or(u64::MAX);
        let mut pipe = redis::pipe();
        pipe.add_command(eval)
            .cmd("WAIT")
            .arg(self.min_replicas)
            .arg(ms);
        let (done, acked): (i64, i64) =
            tokio::time::timeout(REDIS_TIMEOUT + self.replica_timeout, pipe.query_async(conn))
                .await
                .map_err(|_| self.unavailable("timed out waiting for the change and its replicas"))?
                .map_err(|e| self.unavailable(e))?;
        if done == 1 && acked < i64::from(self.min_replicas) {
            return Err(self.unavailable(format!(
                "the change reached the primary but {acked} of min_replicas {} replicas within \
                 {:.1} s (refused, so that a failover cannot lose it; the private proxy tries again)",
                self.min_replicas,
                self.replica_timeout.as_secs_f64()
            )));
        }
        Ok(done)
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

    /// The target to connect with, and whether it is new: rebuilt from the TLS files when they
    /// changed since it was built (a rotated CA or client certificate counts from the next
    /// connection on). Files that do not load are logged and the target in use stays.
    fn current_target(&self) -> (Arc<Target>, bool) {
        let mut guard = self.target.lock().expect("target lock");
        let (target, seen) = &mut *guard;
        let now = tls_stamps(&self.settings);
        if *seen == now {
            return (target.clone(), false);
        }
        // Each version of the files is tried once.
        *seen = now;
        match Target::new(&self.settings) {
            Ok(t) => {
                tracing::info!(redis = %self.address, "Redis TLS files reloaded");
                *target = Arc::new(t);
                (target.clone(), true)
            }
            Err(e) => {
                tracing::error!(redis = %self.address, error = %e, "Redis TLS files not loaded; the ones in use stay");
                (target.clone(), false)
            }
        }
    }

    /// Connects (where a form needs it anew) and subscribes; the connection for commands goes
    /// to `self.conn`.
    async fn subscribe(&self) -> Result<Changes, StoreUnavailable> {
        let response_timeout = REDIS_TIMEOUT + self.replica_timeout;
        let (target, renewed) = self.current_target();
        // Through Sentinel, every (re)connect asks which server is the primary now: after a
        // failover the old one is gone or a replica.
        let (client, reconnect) = match &*target {
            Target::Direct(client) => (client.clone(), renewed),
            Target::Sentinel(sentinel) => (self.sentinel_primary(sentinel).await?, true),
            Target::Cluster(cluster) => {
                let (conn, changes) = tokio::time::timeout(
                    REDIS_TIMEOUT * 2,
                    cluster.connect(&self.channel, REDIS_TIMEOUT, response_timeout),
                )
                .await
                .map_err(|_| self.unavailable("connect timed out"))?
                .map_err(|e| self.unavailable(e))?;
                *self.conn.write().await = Some(Conn::Cluster(conn));
                return Ok(changes);
            }
        };
        if reconnect || self.conn.read().await.is_none() {
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(REDIS_TIMEOUT))
                .set_response_timeout(Some(response_timeout))
                .set_number_of_retries(1)
                .set_max_delay(MAX_REDIS_BACKOFF);
            let conn: ConnectionManager = tokio::time::timeout(
                REDIS_TIMEOUT * 2,
                client.get_connection_manager_with_config(config),
            )
            .await
            .map_err(|_| self.unavailable("connect timed out"))?
            .map_err(|e| self.unavailable(e))?;
            *self.conn.write().await = Some(Conn::Single(conn));
        }
        let mut pubsub = tokio::time::timeout(REDIS_TIMEOUT, client.get_async_pubsub())
            .await
            .map_err(|_| self.unavailable("connect timed out"))?
            .map_err(|e| self.unavailable(e))?;
        pubsub
            .subscribe(&self.channel)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(Changes::PubSub(Box::pin(pubsub.into_on_message())))
    }

    /// Subscribes, reloads the whole hash, then applies published changes until the
    /// subscription breaks (an error) or `shutdown` (Ok).
    pub(super) async fn follow(
        &self,
        table: &RwLock<Table>,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreUnavailable> {
        let mut changes = self.subscribe().await?;
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
        // not means Redis lost data (a restart without persistence, a failover that lost
        // unreplicated writes): write it back.
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
        loop {
            tokio::select! {
                payload = changes.next() => {
                    let Some(payload) = payload else {
                        return Err(self.unavailable("subscription lost"));
                    };
                    let (domain, value) = payload.split_once('\n').unwrap_or((&payload, ""));
                    let a = if value.is_empty() { None } else { decode(domain, value) };
                    table.write().expect("table lock").set(domain, a);
                }
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }
}

/// The stamps of the TLS files of `s` (none without TLS).
fn tls_stamps(s: &RedisSettings) -> Vec<eps_core::files::Stamp> {
    let Some(t) = &s.tls else {
        return Vec::new();
    };
    std::iter::once(&t.ca_certificate)
        .chain(t.certificate.as_ref())
        .chain(t.key.as_ref())
        .map(|p| eps_core::files::stamp(p))
        .collect()
}

/// The pub/sub channel of the hash `key`: `KEY:changes`. In a cluster the sharded channel must
/// hash to the hash's slot: a key with a hash tag passes it on, a key without one becomes the
/// channel's tag (`{KEY}:changes` hashes as `KEY` does; settings refuse a `}` in such a key).
fn channel_name(key: &str, cluster: bool) -> String {
    if cluster && hash_tag(key).is_none() {
        format!("{{{key}}}:changes")
    } else {
        format!("{key}:changes")
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
    fn a_cluster_channel_shares_its_hash_slot() {
        use redis::cluster_routing::Slot;
        for key in [
            "eps:announcements",
            "{eps}:announcements",
            "a{b",
            "x{y}z{w}",
        ] {
            let channel = channel_name(key, true);
            assert_eq!(
                Slot::for_key(key),
                Slot::for_key(&channel),
                "{key} / {channel}"
            );
        }
        // One server and Sentinel keep the channel they always had.
        assert_eq!(
            channel_name("eps:announcements", false),
            "eps:announcements:changes"
        );
    }

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
