//! `submit_to_call_latency`: the time from submitting a record to a working call that needs
//! it, over a few hundred records. A measurement, not a test:
//!
//!     cargo build --release -p eps
//!     cargo test -p eps-tests --release --test sd -- --ignored --nocapture submit_to_call_latency
//!
//! Each round the administrator takes carol out of group `friends` (and waits until bob's
//! service refuses her), then puts her back in, measuring from just before signing that record
//! to carol's first successful `bob.echo` through her EPS server: sign, submit, verify and
//! fsync at the directory server, the long poll's answer to all three followers, each one's
//! verification, fsync and directory swap, and the call. `SD_LATENCY_ROUNDS` sets the rounds
//! (300).

use std::time::{Duration, Instant};

use eps_tests::*;

use crate::fixture::*;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement; run with --release --ignored --nocapture"]
async fn submit_to_call_latency() {
    let rounds: usize = std::env::var("SD_LATENCY_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut net = SdNet::new("latency").await;
    net.start_three().await;
    let carol_records = net.operator_records(&net.node("carol").config);
    net.submit(&net.admin, carol_records).await.expect("carol");
    let carol = net.client_of("carol");
    assert!(
        until_calls(&carol, "bob", PROCESS_WAIT).await,
        "carol calls bob"
    );

    let groups = |g: Value| vec![record_of("carol", "groups", g)];
    let (mut acked, mut working) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        net.submit(&net.admin, groups(json!([])))
            .await
            .expect("revoke");
        let refused = wait_until(PROCESS_WAIT, || async {
            call(&carol, "bob.echo", json!({})).await.is_err()
        })
        .await;
        assert!(refused, "round {round}: carol still calls bob");

        let t0 = Instant::now();
        net.submit(&net.admin, groups(json!(["friends"])))
            .await
            .expect("grant");
        acked.push(t0.elapsed());
        loop {
            if call(&carol, "bob.echo", json!({})).await.is_ok() {
                break;
            }
            assert!(
                t0.elapsed() < PROCESS_WAIT,
                "round {round}: no working call"
            );
        }
        working.push(t0.elapsed());
    }
    acked.sort();
    working.sort();
    let line = |what: &str, v: &[Duration]| {
        println!(
            "{what}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.99)),
            ms(v[v.len() - 1]),
        )
    };
    println!(
        "submit_to_call_latency over {rounds} records, 3 following EPS servers ({} build):",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    line("  submit -> acknowledged", &acked);
    line("  submit -> working call at the new member", &working);
}
