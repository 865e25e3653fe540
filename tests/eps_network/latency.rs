//! `rpc_latency`: a measurement, not a test (times are printed, never asserted).

use std::time::{Duration, Instant};

use eps_core::http::RpcClient;
use eps_tests::*;

use crate::net::{Net, CLIENT_TIMEOUT};

/// p50 and p99 of `samples`, sorted in place.
fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.50), at(0.99))
}

async fn measure(client: &RpcClient, method: &str, n: usize) -> Vec<Duration> {
    let params = json!({"payload": "ping"});
    for _ in 0..50 {
        call(client, method, params.clone())
            .await
            .expect("warm-up call");
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        call(client, method, params.clone()).await.expect("call");
        samples.push(t0.elapsed());
    }
    samples
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement: cargo test -p eps-tests --release -- --ignored --nocapture rpc_latency"]
async fn rpc_latency() {
    const CALLS: usize = 1000;
    let mut net = Net::new("latency");
    net.start(&["alice", "bob"]).await;
    let through = net.node("alice").client();
    // The same client type, with alice's certificate, straight to bob's service.
    let direct = rpc_client(
        &net.node("bob").service.url(),
        Some(&net.pki.tls("alice")),
        CLIENT_TIMEOUT,
    );

    let mut via_eps = measure(&through, "bob.echo", CALLS).await;
    let mut straight = measure(&direct, "echo", CALLS).await;
    let (p50, p99) = percentiles(&mut via_eps);
    let (d50, d99) = percentiles(&mut straight);
    println!("rpc_latency: {CALLS} sequential calls each, HTTPS keep-alive client");
    println!(
        "  alice -> EPS alice -> gRPC mTLS -> EPS bob -> bob's service: p50 {p50:?}  p99 {p99:?}"
    );
    println!(
        "  direct -> bob's service:                                     p50 {d50:?}  p99 {d99:?}"
    );
}
