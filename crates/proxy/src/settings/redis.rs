//! `datastore: {type: redis}`: one server, a primary found through Sentinel, or a Redis Cluster,
//! over TCP or TLS.

use std::path::PathBuf;
use std::time::Duration;

use eps_core::http::secs;
use eps_core::settings::Secret;
use serde::{Deserialize, Serialize};

/// Where the shared announcements live in Redis: one server, a primary found through Sentinel
/// (`sentinel`), or a Redis Cluster (`cluster: true`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// `host:port` of the Redis server (the first is used); with `sentinel`, of the Sentinels
    /// to ask for the primary (any that answers); with `cluster`, of cluster nodes to learn the
    /// cluster's layout from (any that answers; the others are found from it).
    pub addresses: Vec<String>,
    /// A Redis Cluster: the hash and its change channel live in one slot, changes go out by
    /// sharded pub/sub (`SPUBLISH`), and the crate follows failovers and resharding.
    #[serde(default)]
    pub cluster: bool,
    /// Not with `cluster`, which has database 0 only.
    #[serde(default)]
    pub database: i64,
    /// Bind it to an environment variable with `vars:`; never write it in a file.
    #[serde(default)]
    pub password: Option<Secret>,
    /// The hash holding the announcements; `KEY:changes` is the pub/sub channel.
    #[serde(default = "default_redis_key")]
    pub key: String,
    /// Find the primary through Redis Sentinel, and follow it through failovers.
    #[serde(default)]
    pub sentinel: Option<SentinelSettings>,
    /// Acknowledge an announcement only once this many replicas have it too (`WAIT`), so that
    /// a failover cannot lose it; 0: once the primary has it.
    #[serde(default)]
    pub min_replicas: u32,
    /// Seconds to wait for `min_replicas`; past it the announcement is refused (503) and the
    /// private proxy tries again.
    #[serde(default = "default_replica_timeout", with = "secs")]
    pub replica_timeout: Duration,
    /// TLS to every Redis connection (the server, the Sentinels and the primary they name, or
    /// every cluster node); plain TCP when absent. The CA file is read at start.
    #[serde(default)]
    pub tls: Option<RedisTlsSettings>,
}

/// TLS to Redis (`tls-port` on the server side).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisTlsSettings {
    /// PEM file of the CA(s) Redis's certificate must chain to; Redis's certificate must also
    /// name the host as `addresses` (or the Sentinels, or the cluster) give it.
    pub ca_certificate: PathBuf,
    /// PEM files of a client certificate and its key, for a Redis that asks for one
    /// (`tls-auth-clients yes`, Redis's default); both or neither.
    #[serde(default)]
    pub certificate: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

impl RedisSettings {
    /// Checks what serde cannot; messages name the setting.
    pub(super) fn check(&self) -> Result<(), String> {
        const AT: &str = "datastore.settings";
        if self.addresses.is_empty() {
            return Err(format!("{AT}.addresses must name at least one host:port"));
        }
        if let Some(url) = self.addresses.iter().find(|a| a.contains("://")) {
            return Err(format!(
                "{AT}.addresses: {url:?}: give host:port (TLS is the `tls:` section, not rediss://)"
            ));
        }
        if self.cluster && self.sentinel.is_some() {
            return Err(format!(
                "{AT}: cluster and sentinel are two ways to run Redis; set one of them"
            ));
        }
        if self.cluster && self.database != 0 {
            return Err(format!(
                "{AT}.database: a Redis Cluster has database 0 only"
            ));
        }
        if self.cluster && hash_tag(&self.key).is_none() && self.key.contains('}') {
            return Err(format!(
                "{AT}.key: in a cluster a key with '}}' needs a hash tag ({{tag}}), so that its \
                 change channel can share its slot"
            ));
        }
        if self
            .sentinel
            .as_ref()
            .is_some_and(|s| s.master_name.is_empty())
        {
            return Err(format!("{AT}.sentinel.master_name must not be empty"));
        }
        if self.min_replicas > 0 && self.replica_timeout.is_zero() {
            return Err(format!(
                "{AT}.replica_timeout must be above 0 with min_replicas"
            ));
        }
        if let Some(tls) = &self.tls {
            if tls.certificate.is_some() != tls.key.is_some() {
                return Err(format!(
                    "{AT}.tls: certificate and key go together (a client certificate for Redis)"
                ));
            }
        }
        Ok(())
    }
}

/// The hash tag of a Redis key: what Redis Cluster hashes instead of the whole key (the text
/// between the first `{` and the next `}`, when not empty).
pub fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let len = key[open + 1..].find('}')?;
    (len > 0).then(|| &key[open + 1..open + 1 + len])
}

/// Redis Sentinel: which primary to ask the Sentinels for.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelSettings {
    /// The name the Sentinels monitor the primary under (`sentinel monitor NAME ...`).
    pub master_name: String,
    /// The Sentinels' own password (`requirepass` in their configuration), if any; the primary
    /// and replicas take `password` above.
    #[serde(default)]
    pub password: Option<Secret>,
}

/// Default wait for replicas to confirm an announcement.
pub const DEFAULT_REPLICA_TIMEOUT: Duration = Duration::from_secs(1);

fn default_replica_timeout() -> Duration {
    DEFAULT_REPLICA_TIMEOUT
}

fn default_redis_key() -> String {
    "eps:announcements".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<RedisSettings, String> {
        let s: RedisSettings = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
        s.check().map(|()| s)
    }

    #[test]
    fn the_three_forms_read() {
        let one = parse("addresses: [redis.internal:6379]").unwrap();
        assert!(!one.cluster && one.sentinel.is_none() && one.tls.is_none());
        let sentinel =
            parse("addresses: [s1:26379, s2:26379]\nsentinel: {master_name: eps}").unwrap();
        assert_eq!(sentinel.sentinel.unwrap().master_name, "eps");
        let cluster = parse(
            "addresses: [n1:6379, n2:6379]\ncluster: true\n\
             tls: {ca_certificate: /etc/eps/redis-ca.pem}",
        )
        .unwrap();
        assert!(cluster.cluster);
        assert_eq!(
            cluster.tls.unwrap().ca_certificate,
            PathBuf::from("/etc/eps/redis-ca.pem")
        );
    }

    /// Every `datastore` example of the README's "Running several public proxies" (one server,
    /// Sentinel, Cluster, TLS) reads and passes the check.
    #[test]
    fn the_readme_examples_read() {
        let readme = include_str!("../../../../README.md");
        let section = readme
            .split("### Running several public proxies")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("the README's section");
        let mut forms = Vec::new();
        for block in section.split("```yaml\n").skip(1) {
            let yaml = block.split("```").next().unwrap();
            let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(yaml).expect(yaml);
            let datastore = doc["datastore"].clone();
            let parsed: super::super::DatastoreSettings =
                serde_yaml_ng::from_value(datastore).unwrap_or_else(|e| panic!("{e}:\n{yaml}"));
            let super::super::DatastoreSettings::Redis(r) = parsed else {
                panic!("not redis:\n{yaml}");
            };
            r.check().unwrap_or_else(|e| panic!("{e}:\n{yaml}"));
            forms.push((r.sentinel.is_some(), r.cluster, r.tls.is_some()));
        }
        for form in [
            (false, false, false),
            (true, false, false),
            (false, true, false),
        ] {
            assert!(forms.contains(&form), "no example of {form:?}: {forms:?}");
        }
        assert!(forms.iter().any(|f| f.2), "no TLS example: {forms:?}");
    }

    #[test]
    fn contradictions_are_refused_by_name() {
        let refused = |yaml: &str, says: &str| {
            let e = parse(yaml).expect_err(yaml);
            assert!(e.contains(says), "{yaml}: {e}");
        };
        refused(
            "addresses: [n1:6379]\ncluster: true\nsentinel: {master_name: eps}",
            "cluster and sentinel",
        );
        refused(
            "addresses: [n1:6379]\ncluster: true\ndatabase: 2",
            "database 0 only",
        );
        refused("addresses: [rediss://n1:6380]", "the `tls:` section");
        refused("addresses: []", "at least one host:port");
        refused(
            "addresses: [n1:6379]\ntls: {ca_certificate: ca.pem, certificate: c.pem}",
            "certificate and key go together",
        );
        refused("addresses: [n1:6379]\ncluster: yes-please", "cluster");
    }
}
