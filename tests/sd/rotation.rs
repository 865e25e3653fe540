//! An operator rotates its TLS certificate by itself: a `certificates` record signed with its
//! own signing key, then the new files in place. No administrator, no restart.

use eps_core::tls::TlsSettings;
use eps_tests::*;

use crate::fixture::*;

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_rotates_its_certificate_with_a_record_signed_by_its_own_key() {
    let mut net = SdNet::new("rotation").await;
    net.start_three().await;
    let alice = net.client_of("alice");
    assert!(
        until_calls(&alice, "bob", PROCESS_WAIT).await,
        "alice calls bob"
    );
    let alice_grpc = net.node("alice").config.grpc_addr;
    let old = net.pki.tls("bob");
    assert!(
        accepted(alice_grpc, &old, "alice").await,
        "bob's certificate is accepted"
    );

    // A new certificate for bob from the same root, not yet in place.
    let staging = net.dir.mkdir("bob-new");
    for f in [eps_core::pki::ROOT_CERT, eps_core::pki::ROOT_KEY] {
        std::fs::copy(net.pki.dir().join(f), staging.join(f)).expect("copy the root");
    }
    let fresh = Pki::new(&staging, &["bob"], None);
    let new = TlsSettings {
        ca_certificate: net.pki.root(),
        ..fresh.tls("bob")
    };

    // bob pins only the new certificate, signing with his own key, with the operator's command.
    let file = net.dir.write_json(
        "bob-pins.json",
        &json!({"records": [net.pins("bob", &[fresh.fingerprint("bob")])]}),
    );
    let out = eps(
        &net.operator_settings("bob"),
        &["sd", "submit", file.to_str().unwrap()],
    )
    .await;
    assert!(out.status.success(), "{}", said(&out));

    // Only the new certificate is accepted now.
    let refused_old = wait_until(PROCESS_WAIT, || async {
        !accepted(alice_grpc, &old, "alice").await
    })
    .await;
    assert!(refused_old, "bob's old certificate is still accepted");
    assert!(
        accepted(alice_grpc, &new, "alice").await,
        "bob's new certificate"
    );
    let log = net.node("alice").proc.log();
    assert!(log.contains("refused peer"), "alice's log: {log}");

    // bob's deploy puts the new files in place; his server loads them, and calls go both ways.
    std::fs::rename(fresh.key("bob"), net.pki.key("bob")).expect("rename key");
    std::fs::rename(fresh.cert("bob"), net.pki.cert("bob")).expect("rename certificate");
    let bob = &mut net.node_mut("bob").proc;
    bob.wait_for_log("TLS certificate reloaded", PROCESS_WAIT)
        .await;
    assert!(
        until_calls(&alice, "bob", PROCESS_WAIT).await,
        "alice calls bob"
    );
    let bob = net.client_of("bob");
    assert!(
        until_calls(&bob, "alice", PROCESS_WAIT).await,
        "bob calls alice"
    );
    let got = net.node("bob").service.received();
    assert_eq!(got.last().unwrap().params["_client"]["name"], "alice");
}
