//! Access policy at the SNI step (docs/architecture.md §13): who may connect through the public port,
//! decided before a token is drawn or an EPS call is made.
//!
//! A client passes, in this order: the PROXY header when it comes from a trusted load balancer
//! ([`proxy_header`]); the public operator's allow and deny ranges; its address's concurrency cap
//! and new-connection rate; then, once its ClientHello names a domain, that domain's ranges, cap
//! and rate, which the announcement set within the public operator's bounds ([`check_rules`]).
//!
//! # Layout
//! - this file: [`Cidr`] ranges, the [`DomainPolicy`] an announcement carries, and the checks of
//!   such rules against the public operator's bounds, as plain data and functions.
//! - [`gate`]: the runtime state: per-address and per-domain counts and rates, and the guards
//!   that give a place back when a connection ends.
//! - `store`: the bounded, least-recently-used map that keeps governor's per-address rate
//!   states.
//! - [`proxy_header`]: parsing a PROXY protocol v1 or v2 header.

pub mod gate;
pub mod proxy_header;
mod store;

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use eps_core::jsonrpc;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::announcements::Refusal;
use crate::settings::DomainLimits;

/// Highest rate accepted anywhere (new connections per second): far above what one process
/// accepts, and a period governor can still represent.
pub const MAX_RATE: f64 = 1_000_000.0;
/// Lowest rate accepted anywhere: one new connection every 1000 s. Below it the period would
/// not fit a `Duration` (1e-300 per second once crashed the limiter on its first client).
pub const MIN_RATE: f64 = 0.001;

/// An address range, written `203.0.113.0/24` or `2001:db8::/32`; a bare address is its own
/// range. Host bits are dropped (`10.1.2.3/8` is `10.0.0.0/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(IpNet);

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(Self(net.trunc()));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Self(IpNet::from(ip)));
        }
        Err(format!(
            "{s:?} is not an address range (like 203.0.113.0/24 or 2001:db8::/32) or an address"
        ))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The address a client is judged by: an IPv4-mapped IPv6 address (a dual-stack listener's
/// IPv4 client) as the IPv4 address it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// True when `ip` is in one of `ranges`.
pub fn in_ranges(ranges: &[Cidr], ip: IpAddr) -> bool {
    ranges.iter().any(|r| r.contains(ip))
}

/// True when `ip` may pass an allow list (empty: everyone) and a deny list; deny wins.
pub fn admits(allow: &[Cidr], deny: &[Cidr], ip: IpAddr) -> bool {
    !in_ranges(deny, ip) && (allow.is_empty() || in_ranges(allow, ip))
}

/// The access rules an announcement may carry for its domain (docs/architecture.md §13), enforced by
/// the public proxy before a token is drawn. Every field is optional; an announcement without
/// rules is routed as before.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainPolicy {
    /// Only clients in these ranges (empty: every client).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<Cidr>,
    /// Never clients in these ranges (wins over `allow`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<Cidr>,
    /// Connections to this domain at once (waiting for the dial-back or relaying).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// New connections to this domain per second, all clients together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_connections_per_second: Option<f64>,
    /// New connections allowed at once above the rate; default: the rate rounded up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

impl DomainPolicy {
    /// True when the rules restrict nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Checks what a well-formed rule set needs, whoever enforces it; the error names the field.
    pub fn check_shape(&self) -> Result<(), String> {
        if self.max_concurrent == Some(0) {
            return Err("policy.max_concurrent must be at least 1".into());
        }
        if let Some(r) = self.new_connections_per_second {
            if !(r.is_finite() && (MIN_RATE..=MAX_RATE).contains(&r)) {
                return Err(format!(
                    "policy.new_connections_per_second must be from {MIN_RATE} to {MAX_RATE}, not {r}"
                ));
            }
        }
        match (self.burst, self.new_connections_per_second) {
            (Some(0), _) => Err("policy.burst must be at least 1".into()),
            (Some(_), None) => Err("policy.burst needs policy.new_connections_per_second".into()),
            _ => Ok(()),
        }
    }
}

/// A new-connection rate: `per_second` on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

impl Rate {
    /// The rate of a setting: none when `per_second` is 0; a `burst` of 0 is the rate rounded
    /// up (at least 1).
    pub fn from_setting(per_second: f64, burst: u32) -> Option<Self> {
        (per_second > 0.0).then(|| Self {
            per_second,
            burst: if burst == 0 {
                default_burst(per_second)
            } else {
                burst
            },
        })
    }

    /// The lower of two rates, each part on its own.
    pub fn min(self, other: Self) -> Self {
        Self {
            per_second: self.per_second.min(other.per_second),
            burst: self.burst.min(other.burst),
        }
    }

    /// governor's form: one connection every 1/`per_second` s, `burst` at once.
    pub fn quota(&self) -> governor::Quota {
        // Total for any input: rates are checked at the edges, but a stored rule from an older
        // version must not panic the router.
        let rate = if self.per_second.is_finite() {
            self.per_second.clamp(MIN_RATE, MAX_RATE)
        } else {
            MAX_RATE
        };
        let period = Duration::try_from_secs_f64(1.0 / rate).unwrap_or(Duration::from_secs(1000));
        governor::Quota::with_period(period.max(Duration::from_nanos(1)))
            .expect("a period above zero")
            .allow_burst(NonZeroU32::new(self.burst).unwrap_or(NonZeroU32::MIN))
    }
}

/// The burst of a rate given without one: the rate rounded up, at least 1.
pub fn default_burst(per_second: f64) -> u32 {
    per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32
}

/// What one domain is held to: the public operator's per-domain limits and the announcement's
/// rules together, the lower of each.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DomainLimitsInForce {
    pub max_concurrent: Option<u32>,
    pub rate: Option<Rate>,
}

/// The limits `rules` (if any) and the operator's `bounds` put on one domain.
pub fn in_force(bounds: &DomainLimits, rules: Option<&DomainPolicy>) -> DomainLimitsInForce {
    let own_cap = (bounds.max_concurrent > 0).then_some(bounds.max_concurrent);
    let own_rate = Rate::from_setting(bounds.new_connections_per_second, bounds.burst);
    let asked_rate = rules.and_then(|r| {
        let per_second = r.new_connections_per_second?;
        Some(Rate {
            per_second,
            burst: r.burst.unwrap_or_else(|| default_burst(per_second)),
        })
    });
    let lower = |a: Option<u32>, b: Option<u32>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    DomainLimitsInForce {
        max_concurrent: lower(own_cap, rules.and_then(|r| r.max_concurrent)),
        rate: match (own_rate, asked_rate) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
    }
}

/// Checks an announcement's rules against the public operator's `bounds`: a malformed rule is
/// invalid params, one beyond a bound is forbidden, and the message names the bound.
pub fn check_rules(rules: &DomainPolicy, bounds: &DomainLimits) -> Result<(), Refusal> {
    rules
        .check_shape()
        .map_err(|m| Refusal::new(jsonrpc::INVALID_PARAMS, m))?;
    let forbidden = |m: String| Err(Refusal::new(jsonrpc::FORBIDDEN, m));
    let ranges = rules.allow.len() + rules.deny.len();
    if ranges > bounds.max_ranges {
        return forbidden(format!(
            "policy.allow and policy.deny hold {ranges} ranges; this public proxy takes at most \
             {} per domain (public.policy.per_domain.max_ranges)",
            bounds.max_ranges
        ));
    }
    if let Some(n) = rules.max_concurrent {
        if bounds.max_concurrent > 0 && n > bounds.max_concurrent {
            return forbidden(format!(
                "policy.max_concurrent {n} is above this public proxy's cap of {} per domain \
                 (public.policy.per_domain.max_concurrent)",
                bounds.max_concurrent
            ));
        }
    }
    if let Some(r) = rules.new_connections_per_second {
        if r < bounds.min_new_connections_per_second {
            return forbidden(format!(
                "policy.new_connections_per_second {r} is below this public proxy's minimum of {} \
                 (public.policy.per_domain.min_new_connections_per_second)",
                bounds.min_new_connections_per_second
            ));
        }
        if let Some(own) = Rate::from_setting(bounds.new_connections_per_second, bounds.burst) {
            if r > own.per_second {
                return forbidden(format!(
                    "policy.new_connections_per_second {r} is above this public proxy's rate of \
                     {} per domain (public.policy.per_domain.new_connections_per_second)",
                    own.per_second
                ));
            }
            let burst = rules.burst.unwrap_or_else(|| default_burst(r));
            if burst > own.burst {
                return forbidden(format!(
                    "policy.burst {burst} is above this public proxy's burst of {} per domain \
                     (public.policy.per_domain.burst)",
                    own.burst
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    pub(crate) fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn ranges_parse_and_match() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains(ip("10.200.0.1")));
        let one: Cidr = "203.0.113.7".parse().unwrap();
        assert_eq!(one.to_string(), "203.0.113.7/32");
        assert!(!one.contains(ip("203.0.113.8")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:1::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        for bad in ["10.0.0.0/33", "example.com", "", "10.0.0/8"] {
            let e = bad.parse::<Cidr>().unwrap_err();
            assert!(e.contains("not an address range"), "{bad}: {e}");
        }
        let json: Vec<Cidr> = serde_json::from_str(r#"["192.0.2.0/24", "::1"]"#).unwrap();
        assert_eq!(
            serde_json::to_string(&json).unwrap(),
            r#"["192.0.2.0/24","::1/128"]"#
        );
        assert_eq!(canonical(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }

    #[test]
    fn deny_wins_and_empty_allow_is_everyone() {
        let allow = cidrs(&["203.0.113.0/24"]);
        let deny = cidrs(&["203.0.113.66"]);
        assert!(admits(&allow, &deny, ip("203.0.113.1")));
        assert!(!admits(&allow, &deny, ip("203.0.113.66")));
        assert!(!admits(&allow, &deny, ip("198.51.100.1")));
        assert!(admits(&[], &deny, ip("198.51.100.1")));
        assert!(admits(&[], &[], ip("::1")));
    }

    fn bounds() -> DomainLimits {
        DomainLimits {
            max_concurrent: 100,
            new_connections_per_second: 50.0,
            burst: 80,
            min_new_connections_per_second: 1.0,
            max_ranges: 2,
        }
    }

    #[test]
    fn rules_within_bounds_pass_and_beyond_name_the_bound() {
        let ok = DomainPolicy {
            allow: cidrs(&["10.0.0.0/8"]),
            deny: cidrs(&["10.9.0.0/16"]),
            max_concurrent: Some(100),
            new_connections_per_second: Some(10.0),
            burst: Some(20),
        };
        check_rules(&ok, &bounds()).unwrap();
        let cases = [
            (
                DomainPolicy {
                    max_concurrent: Some(101),
                    ..Default::default()
                },
                "per_domain.max_concurrent",
            ),
            (
                DomainPolicy {
                    new_connections_per_second: Some(0.5),
                    ..Default::default()
                },
                "min_new_connections_per_second",
            ),
            (
                DomainPolicy {
                    new_connections_per_second: Some(51.0),
                    ..Default::default()
                },
                "per_domain.new_connections_per_second",
            ),
            (
                DomainPolicy {
                    new_connections_per_second: Some(10.0),
                    burst: Some(81),
                    ..Default::default()
                },
                "per_domain.burst",
            ),
            (
                DomainPolicy {
                    allow: cidrs(&["10.0.0.0/8", "10.1.0.0/16", "10.2.0.0/16"]),
                    ..Default::default()
                },
                "max_ranges",
            ),
        ];
        for (rules, bound) in cases {
            let e = check_rules(&rules, &bounds()).unwrap_err();
            assert_eq!(e.code, jsonrpc::FORBIDDEN, "{rules:?}");
            assert!(e.message.contains(bound), "{rules:?}: {}", e.message);
        }
        for bad in [
            DomainPolicy {
                max_concurrent: Some(0),
                ..Default::default()
            },
            DomainPolicy {
                burst: Some(3),
                ..Default::default()
            },
            DomainPolicy {
                new_connections_per_second: Some(f64::NAN),
                ..Default::default()
            },
        ] {
            let e = check_rules(&bad, &bounds()).unwrap_err();
            assert_eq!(e.code, jsonrpc::INVALID_PARAMS, "{bad:?}");
        }
        // No operator rate: an announcement may ask any rate above the minimum.
        let open = DomainLimits {
            new_connections_per_second: 0.0,
            ..bounds()
        };
        let fast = DomainPolicy {
            new_connections_per_second: Some(10_000.0),
            ..Default::default()
        };
        check_rules(&fast, &open).unwrap();
    }

    #[test]
    fn the_lower_limit_is_in_force() {
        let rules = DomainPolicy {
            max_concurrent: Some(10),
            new_connections_per_second: Some(5.0),
            ..Default::default()
        };
        let f = in_force(&bounds(), Some(&rules));
        assert_eq!(f.max_concurrent, Some(10));
        assert_eq!(
            f.rate,
            Some(Rate {
                per_second: 5.0,
                burst: 5
            })
        );
        // The operator lowered its own limits after the announcement was accepted.
        let lowered = DomainLimits {
            max_concurrent: 3,
            new_connections_per_second: 2.0,
            burst: 2,
            ..bounds()
        };
        let f = in_force(&lowered, Some(&rules));
        assert_eq!(f.max_concurrent, Some(3));
        assert_eq!(
            f.rate,
            Some(Rate {
                per_second: 2.0,
                burst: 2
            })
        );
        let none = DomainLimits {
            max_concurrent: 0,
            new_connections_per_second: 0.0,
            ..bounds()
        };
        assert_eq!(in_force(&none, None), DomainLimitsInForce::default());
        assert!(DomainPolicy::default().is_empty());
    }
}
