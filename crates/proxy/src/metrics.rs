//! The proxies' Prometheus metrics. Label values come from fixed sets (reasons, directions,
//! listeners), so series stay bounded whatever clients send.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

/// A typed refusal: its `reason` label in `eps_proxy_connections_refused_total`.
pub trait Reason {
    fn label(&self) -> &'static str;
}

/// Everything the proxies count. Cheap to update: atomics, no locks on the hot path beyond the
/// label family's read lock.
pub struct Metrics {
    /// Connections accepted, by listener (`public`, `internal`, `incoming`).
    pub accepted: Family<ListenerLabel, Counter>,
    /// Connections closed without relaying, by reason.
    pub refused: Family<ReasonLabel, Counter>,
    /// Connections that reached the relay.
    pub relayed: Counter,
    /// Relays running now.
    pub active_relays: Gauge,
    /// Bytes relayed, by direction (`client_to_server`, `server_to_client`).
    pub bytes: Family<DirectionLabel, Counter>,
    /// Relays ended, by outcome (`done`, `idle`, `error`, `shutdown`).
    pub relays_ended: Family<OutcomeLabel, Counter>,
    /// Clients waiting for a dial-back now.
    pub pending: Gauge,
    /// Seconds from the first byte to the complete ClientHello.
    pub client_hello_seconds: Histogram,
    /// Seconds from the complete ClientHello to the private proxy's data connection.
    pub dial_back_seconds: Histogram,
    /// Live announcements.
    pub announcements: Gauge,
    /// Dial-backs by how they got their connection to the public proxy: `hit` (pre-dialed,
    /// from the pool) or `miss` (dialed for the client).
    pub data_pool: Family<ResultLabel, Counter>,
    /// Addresses and domains whose access-policy state is held (bounded by the policy's
    /// settings and the connection limit).
    pub policy_tracked: Gauge,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            accepted: Family::default(),
            refused: Family::default(),
            relayed: Counter::default(),
            active_relays: Gauge::default(),
            bytes: Family::default(),
            relays_ended: Family::default(),
            pending: Gauge::default(),
            // 100 µs .. ~13 s
            client_hello_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            dial_back_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            announcements: Gauge::default(),
            data_pool: Family::default(),
            policy_tracked: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("eps_proxy");
        r.register(
            "connections_accepted",
            "Connections accepted, by listener",
            m.accepted.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed without relaying, by reason",
            m.refused.clone(),
        );
        r.register(
            "connections_relayed",
            "Connections that reached the relay",
            m.relayed.clone(),
        );
        r.register(
            "active_relays",
            "Relays running now",
            m.active_relays.clone(),
        );
        r.register(
            "relayed_bytes",
            "Bytes relayed, by direction",
            m.bytes.clone(),
        );
        r.register(
            "relays_ended",
            "Relays ended, by outcome",
            m.relays_ended.clone(),
        );
        r.register(
            "pending_tokens",
            "Clients waiting for a dial-back",
            m.pending.clone(),
        );
        r.register(
            "client_hello_seconds",
            "Time to receive the whole ClientHello",
            m.client_hello_seconds.clone(),
        );
        r.register(
            "dial_back_seconds",
            "Time from the ClientHello to the private proxy's data connection",
            m.dial_back_seconds.clone(),
        );
        r.register(
            "announcements",
            "Live announcements",
            m.announcements.clone(),
        );
        r.register(
            "data_pool",
            "Dial-backs by where their connection came from (hit: pooled, miss: dialed)",
            m.data_pool.clone(),
        );
        r.register(
            "policy_tracked",
            "Addresses and domains whose access-policy state is held",
            m.policy_tracked.clone(),
        );
        m
    }

    pub fn data_pool(&self, result: &'static str) {
        self.data_pool.get_or_create(&ResultLabel { result }).inc();
    }

    /// Counts a refusal under its reason's label.
    pub fn refuse(&self, reason: &impl Reason) {
        self.refused
            .get_or_create(&ReasonLabel {
                reason: reason.label(),
            })
            .inc();
    }

    pub fn accept(&self, listener: &'static str) {
        self.accepted
            .get_or_create(&ListenerLabel { listener })
            .inc();
    }

    /// Counts a finished relay; `up` is client → server.
    pub fn relay_ended(&self, up: u64, down: u64, outcome: &'static str) {
        self.bytes
            .get_or_create(&DirectionLabel {
                direction: "client_to_server",
            })
            .inc_by(up);
        self.bytes
            .get_or_create(&DirectionLabel {
                direction: "server_to_client",
            })
            .inc_by(down);
        self.relays_ended
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }
}

/// Shortens a client address for logs: IPv4 to its /24, IPv6 to its /48, so that logs help
/// operations without keeping whole addresses.
pub fn short_addr(addr: std::net::SocketAddr) -> String {
    match addr.ip() {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.x", o[0], o[1], o[2])
        }
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}::x", s[0], s[1], s[2])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_shortened() {
        assert_eq!(
            short_addr("203.0.113.7:5000".parse().unwrap()),
            "203.0.113.x"
        );
        assert_eq!(
            short_addr("[2001:db8:1:2::9]:443".parse().unwrap()),
            "2001:db8:1::x"
        );
    }
}
