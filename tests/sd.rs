//! The signed directory end to end: a real directory server (`eps sd run`) and real EPS
//! servers following it (`directory: {type: sd}`), with certificates and signing keys from the
//! project's PKI, each EPS server delivering to a recording service in the test process.
//!
//! Operators (`fixture::plan`): `alice` (group `friends`) offers `demo.echo` to `partners`;
//! `bob` (group `partners`) offers `demo.echo` to `friends`; `carol` (group `friends`) offers
//! `demo.echo` to `partners` and is in no record until a test adds her. `sd-admin` holds the
//! administrators' signing key the trust settings name.
//!
//! `submit_to_call_latency` is a measurement, not a test:
//! `cargo build --release -p eps && cargo test -p eps-tests --release --test sd -- --ignored --nocapture submit_to_call_latency`.
//!
//! # Layout
//! - `fixture`: the directory server, its administrator and the following EPS servers.
//! - this file: adding an operator by signed records, with the administrator's command.
//! - `refusals`: records the directory server refuses, and why.
//! - `rotation`: an operator rotates its certificate with its own key.
//! - `durability`: kill -9 after an acknowledgement; routing while the directory server is
//!   down, and catching up; a copy altered on disk.
//! - `tamper`: a follower refuses records a directory server altered.
//! - `latency`: the `submit_to_call_latency` measurement.

#[path = "sd/durability.rs"]
mod durability;
#[path = "sd/fixture.rs"]
mod fixture;
#[path = "sd/latency.rs"]
mod latency;
#[path = "sd/refusals.rs"]
mod refusals;
#[path = "sd/rotation.rs"]
mod rotation;
#[path = "sd/tamper.rs"]
mod tamper;

use std::time::{Duration, Instant};

use eps_tests::*;
use fixture::*;

/// What the issue asks: a new operator can call within a second of its records.
const WITHIN: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread")]
async fn a_new_operator_added_by_signed_records_calls_within_a_second() {
    let mut net = SdNet::new("new-operator").await;
    net.start_three().await;
    let (alice, bob, carol) = (
        net.client_of("alice"),
        net.client_of("bob"),
        net.client_of("carol"),
    );
    assert!(
        until_calls(&alice, "bob", PROCESS_WAIT).await,
        "alice calls bob"
    );
    assert!(
        call(&carol, "bob.echo", json!({})).await.is_err(),
        "carol is in no record yet"
    );

    // The administrator adds carol with one command; no process restarts.
    let records = net.operator_records(&net.node("carol").config);
    let file = net
        .dir
        .write_json("carol.json", &json!({ "records": records }));
    let file = file.to_str().expect("a UTF-8 path");
    let out = eps(&net.admin_settings, &["sd", "submit", file]).await;
    assert!(out.status.success(), "{}", said(&out));
    let acked = Instant::now();
    let appended: Value = serde_json::from_slice(&out.stdout).expect("submit prints JSON");
    assert_eq!(appended["appended"], 4, "{appended}");

    assert!(
        until_calls(&carol, "bob", WITHIN).await,
        "carol could not call bob within {WITHIN:?} of the acknowledgement"
    );
    println!(
        "carol called bob {:?} after the acknowledgement",
        acked.elapsed()
    );
    let answer = call(&carol, "bob.echo", json!({"hello": "bob"}))
        .await
        .expect("carol's call");
    assert_eq!(answer["service"], "bob");
    assert_eq!(answer["echo"]["hello"], "bob");
    let got = net.node("bob").service.received();
    let last = got.last().expect("bob's service received the call");
    assert_eq!(last.params["_client"]["name"], "carol");
    assert_eq!(
        last.params["_client"]["entry"]["groups"],
        json!(["friends"])
    );
    // bob (partners) reaches carol's service too: every follower has her.
    assert!(until_calls(&bob, "carol", WITHIN).await, "bob calls carol");
    for name in ["alice", "bob", "carol"] {
        assert!(
            net.node(name).proc.log().contains(APPLIED),
            "{name} applied records"
        );
    }

    // The administrator's view, with the command operators use.
    let out = eps(&net.admin_settings, &["sd", "entries", "carol"]).await;
    assert!(out.status.success(), "{}", said(&out));
    let entry: Value = serde_json::from_slice(&out.stdout).expect("an entry");
    assert_eq!(entry["groups"], json!(["friends"]));
    let out = eps(&net.admin_settings, &["sd", "entries", "nobody"]).await;
    assert!(!out.status.success(), "{}", said(&out));
    // Each EPS server's own verified copy folds to the same entry.
    let out = eps(&net.node("alice").settings, &["directory", "show", "carol"]).await;
    assert!(out.status.success(), "{}", said(&out));
    let copy: Value = serde_json::from_slice(&out.stdout).expect("an entry");
    assert_eq!(copy, entry);
}
