//! The EPS server's Prometheus metrics: calls by peer, method, direction and outcome, and
//! their latency.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use eps_core::jsonrpc::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `out` (from the local client to a peer) or `in` (from a peer to the local service).
    pub direction: &'static str,
    /// The peer operator; `unknown` when it is not in the directory.
    pub peer: String,
    /// The method; `unknown` when the callee has no such method.
    pub method: String,
    /// `ok` or the JSON-RPC error code.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub direction: &'static str,
    pub peer: String,
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReverseLabels {
    /// `held`: streams this server holds open to the peer (it cannot be dialed); `accepted`:
    /// streams the peer holds to this server.
    pub side: &'static str,
    pub peer: String,
}

/// Open reverse streams by side and peer.
pub type ReverseGauge = Family<ReverseLabels, Gauge>;

/// Label values come from the directory (peers, methods) or fixed sets, so series stay bounded.
pub struct Metrics {
    calls: Family<CallLabels, Counter>,
    seconds: Family<LatencyLabels, Histogram>,
    /// Shared with the reverse streams, which count themselves as they open and end.
    pub reverse_streams: ReverseGauge,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            calls: Family::default(),
            seconds: Family::new_with_constructor(|| {
                // 50 µs .. ~13 s
                Histogram::new(exponential_buckets(0.00005, 2.0, 19))
            }),
            reverse_streams: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("eps");
        r.register(
            "calls",
            "JSON-RPC calls by direction, peer, method and outcome",
            m.calls.clone(),
        );
        r.register(
            "call_seconds",
            "Latency of JSON-RPC calls by direction, peer and method",
            m.seconds.clone(),
        );
        r.register(
            "reverse_streams",
            "Open reverse streams: held by this server to a peer, or accepted from a peer",
            m.reverse_streams.clone(),
        );
        m
    }

    /// Counts one call. `known_peer` says whether `peer` is in the directory.
    pub fn record(
        &self,
        direction: &'static str,
        peer: &str,
        known_peer: bool,
        method: &str,
        outcome: &Outcome,
        seconds: f64,
    ) {
        let (method, outcome) = match outcome {
            Ok(_) => (method, "ok".to_string()),
            Err(e) if e.code == eps_core::jsonrpc::METHOD_NOT_FOUND => {
                ("unknown", e.code.to_string())
            }
            Err(e) => (method, e.code.to_string()),
        };
        let latency = LatencyLabels {
            direction,
            peer: if known_peer { peer } else { "unknown" }.to_string(),
            method: method.to_string(),
        };
        self.seconds.get_or_create(&latency).observe(seconds);
        // The latency labels move into the call labels: one allocation per label value.
        self.calls
            .get_or_create(&CallLabels {
                direction,
                peer: latency.peer,
                method: latency.method,
                outcome,
            })
            .inc();
    }
}
