//! Records the directory server refuses, each with a code and a reason a program can read and
//! a message a person can: an operator writing another operator's section or one of its own
//! that only administrators write, a signer nobody pinned, a broken signature, data changed
//! after signing, a certificate from another CA, a record signed long ago, a wrong parent and a
//! replay. Nothing refused reaches the chain.

use eps_core::directory::Record;
use eps_core::http::CallError;
use eps_core::jsonrpc;
use eps_core::sd::protocol::{self as p, GetRecords};
use eps_core::sd::SignedRecord;
use eps_tests::*;

use crate::fixture::*;

/// The JSON-RPC error a submission got.
fn refused(
    r: Result<eps_core::sd::protocol::Appended, CallError>,
    what: &str,
) -> jsonrpc::RpcError {
    match r {
        Err(CallError::Rpc(e)) => e,
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn records_without_the_right_signer_signature_or_parent_are_refused() {
    let net = SdNet::new("refusals").await;
    let (alice, bob) = (net.plan_eps("alice"), net.plan_eps("bob"));
    let mut first = net.operator_records(&alice);
    first.extend(net.operator_records(&bob));
    net.submit(&net.admin, first)
        .await
        .expect("the administrator's records");
    let start = net.head().await;
    let head = start.head.clone();
    let at_head = |key: &eps_core::sd::SigningKey, r| key.sign(&[r], head.as_deref()).unwrap();
    let bob_key = net.pki.signing_key("bob");
    let carol_key = net.pki.signing_key("carol");
    let foreign = Pki::new(net.dir.join("foreign-pki"), &[], None);
    let foreign_admin = foreign.signing_key(ADMIN);
    let moved = json!([{"type": "grpc_server", "settings": {"address": "127.0.0.1:9"}}]);

    let good = at_head(
        &net.admin,
        record_of("alice", "groups", json!(["partners"])),
    );
    let mut broken = good.clone();
    let sig = &mut broken[0].signature;
    let flip = if sig.starts_with('M') { "N" } else { "M" };
    sig.replace_range(0..1, flip);
    let mut altered = good.clone();
    altered[0].data = json!(["administrators"]);
    let chain = net.records().await;
    let wrong_parent = net
        .admin
        .sign(
            &[record_of("alice", "groups", json!([]))],
            Some(&chain[1].hash),
        )
        .unwrap();

    let an_hour_ago = (time::OffsetDateTime::now_utc() - time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let stale = Record {
        created_at: Some(an_hour_ago),
        ..record_of("alice", "groups", json!([]))
    };

    let cases: Vec<(&str, Vec<SignedRecord>, i64, &str, &str)> = vec![
        (
            "signed an hour ago",
            at_head(&net.admin, stale),
            p::INVALID_RECORD,
            "clock_skew",
            "from the directory server's clock",
        ),
        (
            "bob writes alice's channels",
            at_head(&bob_key, record_of("alice", "channels", moved.clone())),
            jsonrpc::FORBIDDEN,
            "forbidden",
            "bob may not write alice's channels",
        ),
        (
            "bob writes his own groups",
            at_head(&bob_key, record_of("bob", "groups", json!(["friends"]))),
            jsonrpc::FORBIDDEN,
            "forbidden",
            "bob may write only its own channels and certificates",
        ),
        (
            "carol, pinned nowhere, writes her channels",
            at_head(&carol_key, record_of("carol", "channels", moved.clone())),
            jsonrpc::FORBIDDEN,
            "forbidden",
            "not pinned with key_usage \"signing\"",
        ),
        (
            "a broken signature",
            broken,
            p::INVALID_RECORD,
            "bad_signature",
            "the signature does not verify",
        ),
        (
            "data changed after signing",
            altered,
            p::INVALID_RECORD,
            "hash_mismatch",
            "hash does not match",
        ),
        (
            "an administrator's key from another CA",
            at_head(&foreign_admin, record_of("alice", "groups", json!([]))),
            p::INVALID_RECORD,
            "certificate",
            "does not chain to the trusted CA",
        ),
        (
            "a wrong parent",
            wrong_parent,
            jsonrpc::CONFLICT,
            "wrong_parent",
            "is not the chain's head",
        ),
        (
            "a record of the chain sent again",
            vec![chain[2].clone()],
            jsonrpc::CONFLICT,
            "replayed",
            "already in the chain",
        ),
        (
            "the head sent again",
            vec![chain.last().unwrap().clone()],
            jsonrpc::CONFLICT,
            "replayed",
            "already in the chain",
        ),
    ];
    for (what, records, code, reason, message) in cases {
        let e = refused(net.submit_signed(records).await, what);
        assert_eq!(e.code, code, "{what}: {e}");
        assert_eq!(p::refusal_kind(&e), Some(reason), "{what}: {e}");
        assert!(e.message.contains(message), "{what}: {e}");
    }
    assert_eq!(net.head().await, start, "nothing refused reached the chain");

    // bob's own channels, with his own key, are his to write; the good record is accepted.
    let own = at_head(&bob_key, record_of("bob", "channels", moved));
    let appended = net.submit_signed(own).await.expect("bob's own channels");
    assert_eq!(appended.length, start.length + 1);
    let e = refused(net.submit_signed(good).await, "signed before bob's record");
    assert_eq!(p::refusal_kind(&e), Some("wrong_parent"), "{e}");

    // The same refusal through the command an operator runs, and its exit status.
    let file = net.dir.write_json(
        "bob-writes-alice.json",
        &json!({"records": [record_of("alice", "services", json!([]))]}),
    );
    let out = eps(
        &net.operator_settings("bob"),
        &["sd", "submit", file.to_str().unwrap()],
    )
    .await;
    assert!(!out.status.success(), "{}", said(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bob may not write alice's services"),
        "{}",
        said(&out)
    );

    // Bounds and unknown hashes.
    let many = vec![chain[0].clone(); 257];
    let e = refused(net.submit_signed(many).await, "257 records");
    assert_eq!(e.code, jsonrpc::INVALID_PARAMS, "{e}");
    let e = net
        .client
        .call::<_, Value>(
            p::GET_RECORDS,
            &GetRecords {
                after: Some("00".repeat(32)),
                ..GetRecords::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, CallError::Rpc(e) if e.code == p::UNKNOWN_HASH),
        "{e}"
    );
}
