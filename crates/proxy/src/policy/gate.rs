//! The policy's runtime state: who is connected now and how fast each source and domain
//! connects. Every map is bounded:
//!
//! - per-address rates: at most `per_address.max_tracked` addresses, least recently used
//!   forgotten first (`BoundedStore`);
//! - per-address and per-domain counts: only keys with a connection open, so at most
//!   `limits.max_connections` entries;
//! - per-domain rates: one per live announced domain that has a rate, dropped by [`Gate::tidy`]
//!   once the domain is gone.
//!
//! Addresses are counted by network: an IPv4 address alone, IPv6 by /64 (one host often holds a
//! whole /64), as the internal port's limits do.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::RateLimiter;

use super::store::BoundedStore;
use super::{admits, canonical, in_force, DomainPolicy, Rate};
use crate::limiter::network;
use crate::settings::PolicySettings;

/// Why the policy refused a client. Each is a `reason` of `eps_proxy_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The public operator's `deny` holds the client, or its `allow` does not.
    Denied,
    /// The client's address has `per_address.max_concurrent` connections open.
    AddressBusy,
    /// The client's address connects faster than `per_address.new_connections_per_second`.
    RateLimited,
    /// The domain's announcement denies the client (or allows only others).
    DomainDenied,
    /// The domain has as many connections open as its cap.
    DomainBusy,
    /// The domain gets new connections faster than its rate.
    DomainRateLimited,
}

impl crate::metrics::Reason for Refused {
    fn label(&self) -> &'static str {
        match self {
            Self::Denied => "denied",
            Self::AddressBusy => "address_busy",
            Self::RateLimited => "rate_limited",
            Self::DomainDenied => "domain_denied",
            Self::DomainBusy => "domain_busy",
            Self::DomainRateLimited => "domain_rate_limited",
        }
    }
}

/// Connections open per key, each under a cap given at entry.
struct Counts<K> {
    open: Mutex<HashMap<K, u32>>,
}

/// One connection's place in a `Counts`; given back when dropped.
pub struct Slot<'a, K: Hash + Eq> {
    counts: &'a Counts<K>,
    key: K,
}

impl<K: Hash + Eq> Counts<K> {
    fn new() -> Self {
        Self {
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A place under `key` unless it holds `max` already.
    fn enter<Q>(&self, key: &Q, max: u32) -> Option<Slot<'_, K>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let mut open = self.open.lock().expect("counts lock");
        match open.get_mut(key) {
            Some(n) if *n >= max => return None,
            Some(n) => *n += 1,
            None if max == 0 => return None,
            None => {
                open.insert(key.to_owned(), 1);
            }
        }
        Some(Slot {
            counts: self,
            key: key.to_owned(),
        })
    }

    fn len(&self) -> usize {
        self.open.lock().expect("counts lock").len()
    }
}

impl<K: Hash + Eq> Drop for Slot<'_, K> {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().expect("counts lock");
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// A client's pass through the per-address checks; holds its address's place until dropped.
pub struct AddressPass<'a> {
    _slot: Option<Slot<'a, IpAddr>>,
}

/// A client's pass through its domain's checks; holds the domain's place until dropped.
pub struct DomainPass<'a> {
    _slot: Option<Slot<'a, String>>,
}

type AddressRates<C> =
    RateLimiter<IpAddr, BoundedStore<IpAddr>, C, NoOpMiddleware<<C as Clock>::Instant>>;
type DomainRate<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Admission of clients by address and by domain; see the module docs.
pub struct Gate<C: Clock = DefaultClock> {
    settings: PolicySettings,
    address_rates: Option<AddressRates<C>>,
    addresses: Counts<IpAddr>,
    domains: Counts<String>,
    domain_rates: Mutex<HashMap<String, (Rate, DomainRate<C>)>>,
    clock: C,
}

impl Gate {
    pub fn new(settings: &PolicySettings) -> Self {
        Self::with_clock(settings, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Gate<C> {
    pub fn with_clock(settings: &PolicySettings, clock: C) -> Self {
        let a = &settings.per_address;
        let address_rates = Rate::from_setting(a.new_connections_per_second, a.burst)
            .map(|r| RateLimiter::new(r.quota(), BoundedStore::new(a.max_tracked), clock.clone()));
        Self {
            settings: settings.clone(),
            address_rates,
            addresses: Counts::new(),
            domains: Counts::new(),
            domain_rates: Mutex::new(HashMap::new()),
            clock,
        }
    }

    /// The public operator's ranges, then the address's cap and rate. Checked before anything
    /// is read from the client.
    pub fn admit_address(&self, ip: IpAddr) -> Result<AddressPass<'_>, Refused> {
        let ip = canonical(ip);
        if !admits(&self.settings.allow, &self.settings.deny, ip) {
            return Err(Refused::Denied);
        }
        let net = network(ip);
        let cap = self.settings.per_address.max_concurrent;
        // The cap first: a refused connection then uses none of the address's rate.
        let slot = match cap {
            0 => None,
            cap => Some(
                self.addresses
                    .enter(&net, cap)
                    .ok_or(Refused::AddressBusy)?,
            ),
        };
        if let Some(rates) = &self.address_rates {
            rates.check_key(&net).map_err(|_| Refused::RateLimited)?;
        }
        Ok(AddressPass { _slot: slot })
    }

    /// The domain's ranges (from its announcement), then its cap and rate (the lower of the
    /// announcement's and the public operator's).
    pub fn admit_domain(
        &self,
        domain: &str,
        rules: Option<&DomainPolicy>,
        ip: IpAddr,
    ) -> Result<DomainPass<'_>, Refused> {
        let ip = canonical(ip);
        if let Some(r) = rules {
            if !admits(&r.allow, &r.deny, ip) {
                return Err(Refused::DomainDenied);
            }
        }
        let limits = in_force(&self.settings.per_domain, rules);
        let slot = match limits.max_concurrent {
            None => None,
            Some(cap) => Some(self.domains.enter(domain, cap).ok_or(Refused::DomainBusy)?),
        };
        if let Some(rate) = limits.rate {
            if !self.domain_rate_allows(domain, rate) {
                return Err(Refused::DomainRateLimited);
            }
        }
        Ok(DomainPass { _slot: slot })
    }

    /// Takes one connection from `domain`'s rate. The limiter lives as long as the rate stays
    /// the same: re-announcing the same rules does not refill it.
    fn domain_rate_allows(&self, domain: &str, rate: Rate) -> bool {
        let mut rates = self.domain_rates.lock().expect("domain rates lock");
        if let Some((r, limiter)) = rates.get(domain) {
            if *r == rate {
                return limiter.check().is_ok();
            }
        }
        let limiter = RateLimiter::direct_with_clock(rate.quota(), self.clock.clone());
        let ok = limiter.check().is_ok();
        rates.insert(domain.to_string(), (rate, limiter));
        ok
    }

    /// Forgets per-address rate states that are as good as new, and the rates of domains no
    /// longer `live`.
    pub fn tidy(&self, live: impl Fn(&str) -> bool) {
        if let Some(rates) = &self.address_rates {
            rates.retain_recent();
        }
        let mut rates = self.domain_rates.lock().expect("domain rates lock");
        rates.retain(|d, _| live(d));
    }

    /// Addresses and domains whose state is held now (the memory the policy uses).
    pub fn tracked(&self) -> usize {
        let rates = self.address_rates.as_ref().map_or(0, |r| r.len());
        let domain_rates = self.domain_rates.lock().expect("domain rates lock").len();
        rates + self.addresses.len() + self.domains.len() + domain_rates
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;

    use super::*;
    use crate::policy::tests::{cidrs, ip};
    use crate::settings::AddressLimits;

    fn gate(settings: PolicySettings) -> (Gate<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (Gate::with_clock(&settings, clock.clone()), clock)
    }

    #[test]
    fn defaults_admit_everyone() {
        let (g, _) = gate(PolicySettings::default());
        let passes: Vec<_> = (0..1000)
            .map(|_| g.admit_address(ip("192.0.2.1")).expect("no limit"))
            .collect();
        assert!(g.admit_domain("a.example", None, ip("192.0.2.1")).is_ok());
        assert_eq!(g.tracked(), 0, "nothing is tracked without limits");
        drop(passes);
    }

    #[test]
    fn operator_ranges_deny_first() {
        let (g, _) = gate(PolicySettings {
            allow: cidrs(&["192.0.2.0/24", "2001:db8::/32"]),
            deny: cidrs(&["192.0.2.66"]),
            ..Default::default()
        });
        assert!(g.admit_address(ip("192.0.2.1")).is_ok());
        assert!(
            g.admit_address(ip("::ffff:192.0.2.1")).is_ok(),
            "mapped IPv4"
        );
        assert_eq!(
            g.admit_address(ip("192.0.2.66")).err(),
            Some(Refused::Denied)
        );
        assert_eq!(
            g.admit_address(ip("198.51.100.1")).err(),
            Some(Refused::Denied)
        );
        assert!(g.admit_address(ip("2001:db8::5")).is_ok());
    }

    #[test]
    fn address_rate_is_per_network_and_refills() {
        let (g, clock) = gate(PolicySettings {
            per_address: AddressLimits {
                new_connections_per_second: 2.0,
                burst: 3,
                ..Default::default()
            },
            ..Default::default()
        });
        for _ in 0..3 {
            assert!(g.admit_address(ip("2001:db8:1:2::1")).is_ok());
        }
        assert_eq!(
            g.admit_address(ip("2001:db8:1:2::ffff")).err(),
            Some(Refused::RateLimited),
            "the same /64"
        );
        assert!(
            g.admit_address(ip("2001:db8:1:3::1")).is_ok(),
            "another /64"
        );
        clock.advance(Duration::from_millis(500));
        assert!(
            g.admit_address(ip("2001:db8:1:2::1")).is_ok(),
            "one refilled"
        );
        assert_eq!(
            g.admit_address(ip("2001:db8:1:2::1")).err(),
            Some(Refused::RateLimited)
        );
    }

    #[test]
    fn address_cap_gives_places_back_and_spares_the_rate() {
        let (g, _) = gate(PolicySettings {
            per_address: AddressLimits {
                max_concurrent: 2,
                new_connections_per_second: 1.0,
                burst: 3,
                ..Default::default()
            },
            ..Default::default()
        });
        let a = g.admit_address(ip("192.0.2.1")).unwrap();
        let b = g.admit_address(ip("192.0.2.1")).unwrap();
        assert_eq!(
            g.admit_address(ip("192.0.2.1")).err(),
            Some(Refused::AddressBusy)
        );
        drop(a);
        // The busy refusal took nothing from the rate: the burst's third is still there.
        let c = g
            .admit_address(ip("192.0.2.1"))
            .expect("a place and a token");
        drop((b, c));
        assert_eq!(g.addresses.len(), 0, "no entry left behind");
    }

    #[test]
    fn tracked_addresses_are_capped() {
        let (g, clock) = gate(PolicySettings {
            per_address: AddressLimits {
                new_connections_per_second: 1.0,
                max_tracked: 50,
                ..Default::default()
            },
            ..Default::default()
        });
        for i in 0..1000u32 {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let _ = g.admit_address(a);
        }
        assert_eq!(g.tracked(), 50);
        clock.advance(Duration::from_secs(2));
        g.tidy(|_| true);
        assert_eq!(g.tracked(), 0);
    }

    #[test]
    fn domain_rules_ranges_cap_and_rate() {
        let (g, clock) = gate(PolicySettings::default());
        let rules = DomainPolicy {
            deny: cidrs(&["192.0.2.66"]),
            max_concurrent: Some(2),
            ..Default::default()
        };
        assert_eq!(
            g.admit_domain("a.example", Some(&rules), ip("192.0.2.66"))
                .err(),
            Some(Refused::DomainDenied)
        );
        let a = g.admit_domain("a.example", Some(&rules), ip("192.0.2.1"));
        let b = g.admit_domain("a.example", Some(&rules), ip("192.0.2.2"));
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(
            g.admit_domain("a.example", Some(&rules), ip("192.0.2.3"))
                .err(),
            Some(Refused::DomainBusy)
        );
        assert!(
            g.admit_domain("b.example", None, ip("192.0.2.3")).is_ok(),
            "another domain is unaffected"
        );
        drop(a);
        assert!(g
            .admit_domain("a.example", Some(&rules), ip("192.0.2.3"))
            .is_ok());

        let rated = DomainPolicy {
            new_connections_per_second: Some(1.0),
            ..Default::default()
        };
        assert!(g
            .admit_domain("r.example", Some(&rated), ip("192.0.2.1"))
            .is_ok());
        assert_eq!(
            g.admit_domain("r.example", Some(&rated), ip("192.0.2.9"))
                .err(),
            Some(Refused::DomainRateLimited),
            "the rate is the domain's, all clients together"
        );
        clock.advance(Duration::from_secs(1));
        assert!(g
            .admit_domain("r.example", Some(&rated), ip("192.0.2.9"))
            .is_ok());
        g.tidy(|d| d != "r.example");
        assert!(g.domain_rates.lock().unwrap().is_empty());
    }
}
