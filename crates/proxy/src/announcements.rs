//! Announcements and the rules for accepting them (docs/architecture.md §3.1), as plain data and functions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use eps_core::jsonrpc;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::hostname;
use crate::policy::DomainPolicy;
use crate::settings::{DEFAULT_ANNOUNCEMENT_TTL, MAX_ANNOUNCEMENT_TTL};

/// A live announcement on the public side: `domain` is served by `operator` until `expires_at`,
/// to the clients its access rules (`policy`) let in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    pub domain: String,
    pub operator: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// Shared with every connection routed by it: a lookup copies a pointer, not the rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Arc<DomainPolicy>>,
}

/// A time as RFC 3339 text, the form announcements are exchanged in.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Why a domain was refused, as a JSON-RPC error code and message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: i64,
    pub message: String,
}

impl From<Refusal> for eps_core::jsonrpc::RpcError {
    fn from(r: Refusal) -> Self {
        Self::new(r.code, r.message)
    }
}

impl Refusal {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// An announced domain (a host name, or a wildcard `*.parent`), trimmed and lowercased;
/// `None` when it is neither (the one rule: [`crate::hostname`]).
pub fn normalize_domain(domain: &str) -> Option<String> {
    hostname::announced_name(domain).ok()
}

/// True when `domain` falls under one of the `allowed` suffixes. A suffix with a leading dot
/// (`.example.com`) allows names below it; one without also allows the name itself. A wildcard
/// `*.P` is allowed where every name it covers is (the test on its text says exactly that).
pub fn allowed(domain: &str, allowed: &[String]) -> bool {
    allowed.iter().any(|s| {
        let s = s.trim().to_ascii_lowercase();
        if s.is_empty() {
            return false;
        }
        if s.starts_with('.') {
            domain.ends_with(&s) && domain.len() > s.len()
        } else {
            domain == s || domain.ends_with(&format!(".{s}"))
        }
    })
}

/// The announcements a public proxy holds: exact names, and wildcards by the parent they
/// cover, so that routing a name takes at most two hash lookups and no allocation.
#[derive(Debug, Default, Clone)]
pub struct Table {
    exact: HashMap<String, Arc<Announcement>>,
    /// `*.P` under key `P`.
    wildcards: HashMap<String, Arc<Announcement>>,
}

impl Table {
    pub fn from_list(list: Vec<Announcement>) -> Self {
        let mut t = Self::default();
        for a in list {
            t.set(&a.domain.clone(), Some(a));
        }
        t
    }

    /// The map and key an announced name is kept under.
    fn slot<'d>(&mut self, domain: &'d str) -> (&mut HashMap<String, Arc<Announcement>>, &'d str) {
        match hostname::wildcard_parent(domain) {
            Some(parent) => (&mut self.wildcards, parent),
            None => (&mut self.exact, domain),
        }
    }

    fn entries(&self) -> impl Iterator<Item = &Announcement> {
        self.exact
            .values()
            .chain(self.wildcards.values())
            .map(|a| &**a)
    }

    /// The live announcement that routes host name `name`: its own, else the live wildcard
    /// over its parent (an exact name beats a wildcard; a wildcard covers one label). Shared:
    /// a connection routed by it copies a pointer, not the announcement.
    pub fn lookup(&self, name: &str, now: OffsetDateTime) -> Option<&Arc<Announcement>> {
        let live = |a: &&Arc<Announcement>| a.expires_at > now;
        self.exact
            .get(name)
            .filter(live)
            .or_else(|| self.wildcards.get(hostname::parent(name)?).filter(live))
    }

    /// The live announcement of exactly this announced name (a host name or `*.P`).
    pub fn held(&self, domain: &str, now: OffsetDateTime) -> Option<&Announcement> {
        let entry = match hostname::wildcard_parent(domain) {
            Some(parent) => self.wildcards.get(parent),
            None => self.exact.get(domain),
        };
        entry.map(|a| &**a).filter(|a| a.expires_at > now)
    }

    /// Live announcements, sorted by domain.
    pub fn live(&self, now: OffsetDateTime) -> Vec<Announcement> {
        let mut v: Vec<_> = self
            .entries()
            .filter(|a| a.expires_at > now)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.domain.cmp(&b.domain));
        v
    }

    /// Number of live announcements.
    pub fn live_count(&self, now: OffsetDateTime) -> usize {
        self.entries().filter(|a| a.expires_at > now).count()
    }

    /// Every stored announcement, expired ones included (for persisting).
    pub fn all(&self) -> Vec<Announcement> {
        let mut v: Vec<_> = self.entries().cloned().collect();
        v.sort_by(|a, b| a.domain.cmp(&b.domain));
        v
    }

    /// Removes expired announcements; returns how many.
    pub fn prune(&mut self, now: OffsetDateTime) -> usize {
        let before = self.len();
        self.exact.retain(|_, a| a.expires_at > now);
        self.wildcards.retain(|_, a| a.expires_at > now);
        before - self.len()
    }

    /// Number of stored announcements.
    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcards.len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies the rules to one requested domain from `operator`, whose directory settings
    /// allow `allowed_suffixes`, and stores it when accepted. (The registry does the same in two
    /// steps, so that Redis can make the second one atomic.)
    #[cfg(test)]
    pub fn announce(
        &mut self,
        operator: &str,
        allowed_suffixes: &[String],
        domain: &str,
        expires_at: Option<OffsetDateTime>,
        now: OffsetDateTime,
    ) -> Result<Announcement, Refusal> {
        let a = validate(operator, allowed_suffixes, domain, expires_at, None, now)?;
        self.claim(a, now)
    }

    /// Stores `a` unless another operator holds the same name, or (for an exact name not held
    /// by `a`'s operator yet) a live wildcard of another operator over it (409).
    pub fn claim(&mut self, a: Announcement, now: OffsetDateTime) -> Result<Announcement, Refusal> {
        let holder = self.held(&a.domain, now).map(|held| held.operator.as_str());
        if holder.is_some_and(|op| op != a.operator) {
            return Err(conflict(&a.domain));
        }
        // A name its operator holds already stays its own (renewals included), even under a
        // wildcard announced after it.
        let renewal = holder.is_some();
        if !renewal && hostname::wildcard_parent(&a.domain).is_none() {
            let covering = hostname::parent(&a.domain).and_then(|p| {
                self.wildcards
                    .get(p)
                    .filter(|w| w.expires_at > now && w.operator != a.operator)
            });
            if let Some(w) = covering {
                return Err(covered(&a.domain, &w.domain));
            }
        }
        self.set(&a.domain.clone(), Some(a.clone()));
        Ok(a)
    }

    /// Replaces (or with `None` removes) the announcement of `domain`, as another instance
    /// decided it.
    pub fn set(&mut self, domain: &str, a: Option<Announcement>) {
        let (map, key) = self.slot(domain);
        match a {
            Some(a) => map.insert(key.to_string(), Arc::new(a)),
            None => map.remove(key),
        };
    }
}

/// The 409 refusal for an exact name under another operator's live wildcard: the wildcard's
/// holder keeps every name it covers. (A wildcard over names other operators hold already is
/// accepted; those keep their names, since an exact name beats a wildcard.)
pub fn covered(domain: &str, wildcard: &str) -> Refusal {
    Refusal::new(
        jsonrpc::CONFLICT,
        format!("{domain} is covered by {wildcard}, held by another operator"),
    )
}

/// The 409 refusal for a domain held by another operator.
pub fn conflict(domain: &str) -> Refusal {
    Refusal::new(
        jsonrpc::CONFLICT,
        format!("{domain} is held by another operator"),
    )
}

/// The rules that need no other announcement: a valid name under an allowed suffix and an
/// expiry in the next 7 days (none given: the default lifetime). Returns what to store, with
/// `policy` (checked against the public operator's bounds before).
pub fn validate(
    operator: &str,
    allowed_suffixes: &[String],
    domain: &str,
    expires_at: Option<OffsetDateTime>,
    policy: Option<Arc<DomainPolicy>>,
    now: OffsetDateTime,
) -> Result<Announcement, Refusal> {
    let Some(domain) = normalize_domain(domain) else {
        return Err(Refusal::new(
            jsonrpc::INVALID_PARAMS,
            format!("{domain:?} is not a valid domain name"),
        ));
    };
    if !allowed(&domain, allowed_suffixes) {
        return Err(Refusal::new(
            jsonrpc::FORBIDDEN,
            format!(
                "{operator} may not announce {domain}: allowed suffixes are {allowed_suffixes:?}"
            ),
        ));
    }
    let limit = now + MAX_ANNOUNCEMENT_TTL;
    let expires_at = match expires_at {
        None => now + DEFAULT_ANNOUNCEMENT_TTL.min(MAX_ANNOUNCEMENT_TTL),
        Some(t) if t <= now => {
            return Err(Refusal::new(
                jsonrpc::INVALID_PARAMS,
                format!("expires_at {t} is in the past"),
            ))
        }
        // A minute of slack for clocks that disagree a little.
        Some(t) if t > limit + Duration::from_secs(60) => {
            return Err(Refusal::new(
                jsonrpc::INVALID_PARAMS,
                format!("expires_at {t} is more than 7 days ahead"),
            ))
        }
        Some(t) => t.min(limit),
    };
    Ok(Announcement {
        domain,
        operator: operator.to_string(),
        expires_at,
        policy: policy.filter(|p| !p.is_empty()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    fn suffixes() -> Vec<String> {
        vec![".internal-server.local".into()]
    }

    #[test]
    fn suffix_rules() {
        assert!(allowed("a.internal-server.local", &suffixes()));
        assert!(!allowed("internal-server.local", &suffixes()));
        assert!(!allowed("evil-internal-server.local", &suffixes()));
        assert!(!allowed("a.example.com", &suffixes()));
        assert!(allowed("example.com", &["example.com".into()]));
        assert!(allowed("a.example.com", &["example.com".into()]));
        assert!(!allowed("aexample.com", &["example.com".into()]));
    }

    #[test]
    fn foreign_domain_is_403_and_held_domain_is_409() {
        let mut t = Table::default();
        let now = t0();
        let e = t
            .announce("p", &suffixes(), "x.example.com", None, now)
            .unwrap_err();
        assert_eq!(e.code, jsonrpc::FORBIDDEN);
        t.announce("p", &suffixes(), "Test.Internal-Server.local", None, now)
            .unwrap();
        assert!(t.lookup("test.internal-server.local", now).is_some());
        let e = t
            .announce("q", &suffixes(), "test.internal-server.local", None, now)
            .unwrap_err();
        assert_eq!(e.code, jsonrpc::CONFLICT);
        // The holder may renew.
        t.announce("p", &suffixes(), "test.internal-server.local", None, now)
            .unwrap();
    }

    #[test]
    fn expiry_rules() {
        let mut t = Table::default();
        let now = t0();
        let far = now + Duration::from_secs(8 * 24 * 3600);
        let e = t
            .announce("p", &suffixes(), "a.internal-server.local", Some(far), now)
            .unwrap_err();
        assert_eq!(e.code, jsonrpc::INVALID_PARAMS);
        let past = now - Duration::from_secs(1);
        assert!(t
            .announce("p", &suffixes(), "a.internal-server.local", Some(past), now)
            .is_err());
        let soon = now + Duration::from_secs(10);
        t.announce("p", &suffixes(), "a.internal-server.local", Some(soon), now)
            .unwrap();
        assert!(t.lookup("a.internal-server.local", now).is_some());
        let later = now + Duration::from_secs(11);
        assert!(t.lookup("a.internal-server.local", later).is_none());
        assert!(t.live(later).is_empty());
        // An expired announcement no longer blocks another operator, and is pruned.
        t.announce("q", &suffixes(), "a.internal-server.local", None, later)
            .unwrap();
        let mut t2 = Table::default();
        t2.announce("p", &suffixes(), "b.internal-server.local", Some(soon), now)
            .unwrap();
        assert_eq!(t2.prune(later), 1);
        assert_eq!(t2.len(), 0);
    }

    #[test]
    fn a_wildcard_covers_one_label_and_exact_names_win() {
        let mut t = Table::default();
        let now = t0();
        let s = suffixes();
        t.announce("p", &s, "*.apps.internal-server.local", None, now)
            .unwrap();
        let route = |t: &Table, name| t.lookup(name, now).map(|a| a.operator.clone());
        assert_eq!(
            route(&t, "a.apps.internal-server.local").as_deref(),
            Some("p")
        );
        assert_eq!(route(&t, "apps.internal-server.local"), None);
        assert_eq!(route(&t, "a.b.apps.internal-server.local"), None);
        // The wildcard's holder may add exact names under it; an exact name wins.
        t.announce("p", &s, "x.apps.internal-server.local", None, now)
            .unwrap();
        assert_eq!(
            t.lookup("x.apps.internal-server.local", now)
                .unwrap()
                .domain,
            "x.apps.internal-server.local"
        );
        // Another operator may not take a name out of it (409), nor the wildcard itself.
        for name in [
            "y.apps.internal-server.local",
            "*.apps.internal-server.local",
        ] {
            let e = t.announce("q", &s, name, None, now).unwrap_err();
            assert_eq!(e.code, jsonrpc::CONFLICT, "{name}");
        }
        // A name outside what the wildcard covers is free.
        t.announce("q", &s, "apps.internal-server.local", None, now)
            .unwrap();
        t.announce("q", &s, "*.b.apps.internal-server.local", None, now)
            .unwrap();
        // A wildcard over another operator's exact names is accepted; they keep their names.
        t.announce("q", &s, "z.other.internal-server.local", None, now)
            .unwrap();
        t.announce("p", &s, "*.other.internal-server.local", None, now)
            .unwrap();
        assert_eq!(
            route(&t, "z.other.internal-server.local").as_deref(),
            Some("q")
        );
        assert_eq!(
            route(&t, "w.other.internal-server.local").as_deref(),
            Some("p")
        );
        // Once the wildcard expires, its names are free.
        let later = now + DEFAULT_ANNOUNCEMENT_TTL + Duration::from_secs(1);
        t.announce("q", &s, "y.apps.internal-server.local", None, later)
            .unwrap();
        assert_eq!(t.live(now).len(), 7);
        assert_eq!(Table::from_list(t.all()).live(now), t.live(now));
    }

    #[test]
    fn allowed_suffixes_apply_to_wildcards_by_what_they_cover() {
        assert!(allowed("*.apps.internal-server.local", &suffixes()));
        assert!(allowed("*.internal-server.local", &suffixes()));
        assert!(!allowed("*.example.com", &suffixes()));
        assert!(allowed("*.example.com", &["example.com".into()]));
    }

    #[test]
    fn bad_names_are_refused() {
        for d in [
            "",
            "1.2.3.4",
            "a..internal-server.local",
            "a b.internal-server.local",
            "a.internal-server.1",
            "*.local",
            "a.*.internal-server.local",
        ] {
            assert!(normalize_domain(d).is_none(), "{d}");
        }
    }
}
