//! The public proxy's access policy settings (`public.policy`, `public.proxy_protocol`): what
//! they mean is in docs/architecture.md §13 and the README's "Access policy".

use serde::{Deserialize, Serialize};

use crate::policy::{Cidr, MAX_RATE, MIN_RATE};

/// Default cap on source addresses whose connection rate is tracked.
pub const DEFAULT_MAX_TRACKED_ADDRESSES: usize = 65_536;
/// Most addresses `policy.per_address.max_tracked` may ask for (about 100 bytes each).
pub const MAX_TRACKED_ADDRESSES: usize = 10_000_000;
/// Default lowest rate an announcement may set for its domain: one new connection every 10 s.
pub const DEFAULT_DOMAIN_MIN_RATE: f64 = 0.1;
/// Default number of ranges (allow and deny together) an announcement may carry.
pub const DEFAULT_DOMAIN_MAX_RANGES: usize = 256;

/// The access policy of the public port (docs/architecture.md §13). A client is checked against the
/// operator's ranges and its address's limits before its ClientHello is read, and against its
/// domain's rules before a token is drawn; a refused client is closed at once and counted by
/// reason. Everything here is off by default.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySettings {
    /// Only clients in these ranges (CIDR or address) may connect; empty: everyone.
    pub allow: Vec<Cidr>,
    /// Clients in these ranges may not connect (wins over `allow`). Each range costs a
    /// comparison per connection.
    pub deny: Vec<Cidr>,
    /// Limits per source address (IPv4 address, IPv6 /64).
    pub per_address: AddressLimits,
    /// Limits every domain is held to, and bounds on the rules announcements may set.
    pub per_domain: DomainLimits,
}

/// Limits per source address: an IPv4 address, or an IPv6 /64.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AddressLimits {
    /// New connections per second one address may open on average; 0: no limit.
    pub new_connections_per_second: f64,
    /// New connections one address may open at once above that rate; 0: the rate rounded up.
    pub burst: u32,
    /// Connections one address may hold open (from accept to the relay's end); 0: no cap.
    pub max_concurrent: u32,
    /// Addresses whose rate is tracked at most (about 100 bytes each); past it, the address
    /// seen least recently is forgotten and starts again with a full burst.
    pub max_tracked: usize,
}

impl Default for AddressLimits {
    fn default() -> Self {
        Self {
            new_connections_per_second: 0.0,
            burst: 0,
            max_concurrent: 0,
            max_tracked: DEFAULT_MAX_TRACKED_ADDRESSES,
        }
    }
}

/// Limits of every domain, and how far an announcement's own rules may go. An announcement may
/// ask for less than these limits, never more; the lower of the two is in force.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DomainLimits {
    /// Connections one domain may have open at once (waiting for the dial-back or relaying), so
    /// that no announcer takes all of `limits.max_connections`; 0: no cap. Announcements may
    /// set a lower one.
    pub max_concurrent: u32,
    /// New connections per second to one domain; 0: no limit. Announcements may set a lower
    /// one.
    pub new_connections_per_second: f64,
    /// New connections to one domain at once above that rate; 0: the rate rounded up.
    pub burst: u32,
    /// The lowest rate an announcement may set for its domain.
    pub min_new_connections_per_second: f64,
    /// Ranges (allow and deny together) an announcement may carry; each costs a comparison per
    /// connection to its domain.
    pub max_ranges: usize,
}

impl Default for DomainLimits {
    fn default() -> Self {
        Self {
            max_concurrent: 0,
            new_connections_per_second: 0.0,
            burst: 0,
            min_new_connections_per_second: DEFAULT_DOMAIN_MIN_RATE,
            max_ranges: DEFAULT_DOMAIN_MAX_RANGES,
        }
    }
}

/// PROXY protocol (v1 and v2) from load balancers. A connection from a `trusted` range must
/// start with a header, and the client it names is the client for the policy, logs, metrics and
/// the PROXY header the private side sends on; the header and the ClientHello share
/// `limits.client_hello_timeout`. A header from any other source is refused.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyProtocolSettings {
    /// The load balancers' source ranges; empty: no PROXY headers are taken.
    pub trusted: Vec<Cidr>,
}

/// A rate setting: a number of new connections per second from 0 (off) to [`MAX_RATE`].
fn check_rate(key: &str, rate: f64, burst: u32) -> Result<(), String> {
    let ok = rate == 0.0 || (rate.is_finite() && (MIN_RATE..=MAX_RATE).contains(&rate));
    if !ok {
        return Err(format!(
            "{key} must be 0 (no limit) or from {MIN_RATE} to {MAX_RATE}, not {rate}"
        ));
    }
    if rate == 0.0 && burst > 0 {
        return Err(format!(
            "{key} is 0 (no limit), so the burst next to it means nothing"
        ));
    }
    Ok(())
}

impl PolicySettings {
    /// Checks what serde cannot; errors name the key.
    pub(super) fn validate(&self) -> Result<(), String> {
        let a = &self.per_address;
        check_rate(
            "public.policy.per_address.new_connections_per_second",
            a.new_connections_per_second,
            a.burst,
        )?;
        if !(1..=MAX_TRACKED_ADDRESSES).contains(&a.max_tracked) {
            return Err(format!(
                "public.policy.per_address.max_tracked must be from 1 to {MAX_TRACKED_ADDRESSES}"
            ));
        }
        let d = &self.per_domain;
        check_rate(
            "public.policy.per_domain.new_connections_per_second",
            d.new_connections_per_second,
            d.burst,
        )?;
        let min = d.min_new_connections_per_second;
        if !(min.is_finite() && (0.0..=MAX_RATE).contains(&min)) {
            return Err(format!(
                "public.policy.per_domain.min_new_connections_per_second must be from 0 to \
                 {MAX_RATE}, not {min}"
            ));
        }
        if d.new_connections_per_second > 0.0 && min > d.new_connections_per_second {
            return Err(
                "public.policy.per_domain.min_new_connections_per_second is above \
                 per_domain.new_connections_per_second: no announcement could set a rate"
                    .into(),
            );
        }
        Ok(())
    }
}
