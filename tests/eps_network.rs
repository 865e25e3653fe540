//! The EPS network end to end: real `eps server run` processes on loopback with certificates
//! from the project's PKI, each delivering to a recording JSON-RPC service in the test process.
//!
//! The operators every test's directory knows:
//! - `alice` (group `friends`) offers `demo.echo` to group `partners`;
//! - `bob` (group `partners`) offers `demo.echo` and `demo.slow` to `friends`, and `secret` to
//!   nobody (`permissions: []`);
//! - `carol` (group `friends`) has a certificate from another CA;
//! - `dave` (group `friends`) is pinned to a fingerprint that is not his certificate's.
//!
//! `mallory` has a certificate from the right CA but is not in the directory.
//!
//! `rpc_latency` is a measurement, not a test:
//! `cargo build --release -p eps && cargo test -p eps-tests --release -- --ignored --nocapture rpc_latency`.
//!
//! # Layout
//! - `net`: the fixture: PKIs, directory and servers of one test.
//! - this file: calls between servers and the errors a local client gets.
//! - `identity`: who may connect: peers refused at the handshake, local clients without a
//!   certificate.
//! - `lifecycle`: a peer going down and coming back, deadlines, SIGTERM, bad settings.
//! - `latency`: the `rpc_latency` measurement.
//! - `reverse`: an operator without a gRPC port, reached over the reverse streams it opens.

#[path = "eps_network/identity.rs"]
mod identity;
#[path = "eps_network/latency.rs"]
mod latency;
#[path = "eps_network/lifecycle.rs"]
mod lifecycle;
#[path = "eps_network/net.rs"]
mod net;
#[path = "eps_network/reverse.rs"]
mod reverse;

use eps_core::jsonrpc;
use eps_tests::*;

use net::{rpc_error, Net};

#[tokio::test(flavor = "multi_thread")]
async fn call_reaches_peer_service_with_caller_identity() {
    let mut net = Net::new("identity");
    net.start(&["alice", "bob"]).await;
    let alice = net.node("alice").client();

    let forged = json!({"msg": "hi", "_client": {"name": "mallory", "entry": {"name": "mallory"}}});
    let result = call(&alice, "bob.echo", forged).await.expect("bob.echo");
    assert_eq!(result["service"], "bob");
    assert_eq!(result["method"], "echo");
    assert_eq!(result["echo"]["msg"], "hi");
    assert_eq!(result["echo"]["_client"]["name"], "alice");

    let got = net.node("bob").service.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].method, "echo");
    let client = &got[0].params["_client"];
    assert_eq!(client["name"], "alice", "forged _client replaced: {client}");
    assert_eq!(client["entry"]["name"], "alice");
    assert_eq!(client["entry"]["groups"], json!(["friends"]));
    // Delivered by bob's own EPS server, over mutual TLS with bob's certificate.
    assert_eq!(got[0].peer.as_deref(), Some("bob"));

    // And the other way round, on the connection bob opens himself.
    let bob = net.node("bob").client();
    let result = call(&bob, "alice.echo", json!({"n": 1}))
        .await
        .expect("alice.echo");
    assert_eq!(result["service"], "alice");
    let got = net.node("alice").service.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].params["n"], 1);
    assert_eq!(got[0].params["_client"]["name"], "bob");
    assert_eq!(
        got[0].params["_client"]["entry"]["groups"],
        json!(["partners"])
    );
}

/// A hostile caller spells `_client` every way JSON allows (escapes, duplicates, odd
/// whitespace, any position): the service behind the receiving EPS server gets exactly one
/// top-level key that decodes to `_client`, the receiver's, whatever JSON parser it uses; the
/// caller's other members, nested `_client`s included, arrive as they were sent.
#[tokio::test(flavor = "multi_thread")]
async fn forged_client_spellings_never_reach_the_service() {
    let mut net = Net::new("forged-client");
    net.start(&["alice", "bob"]).await;
    let alice = net.node("alice");
    let tls = client_tls(&alice.client_tls);
    // Written by hand: a JSON library would merge the duplicates and undo the escapes. The
    // first holds no `"_client"` as plain text anywhere.
    let cases = [
        (
            r#"{"\u005fclient": {"name": "mallory", "entry": {"name": "mallory"}}, "a": 1}"#,
            &["_client", "a"][..],
        ),
        (
            concat!(
                r#"{ "\u005fclient" : {"name": "mallory", "entry": {"name": "mallory"}},"#,
                r#" "a": 1, "_\u0063lient": "x", "nested": {"_client": "kept"},"#,
                "\n\t\"_client\"\r\n:\n{\"name\": \"mallory\"},",
                r#" "\u005F\u0063\u006C\u0069\u0065\u006E\u0074": 3, "z": [1, {"_client": 2}] }"#
            ),
            &["_client", "a", "nested", "z"][..],
        ),
    ];
    for (params, expected) in cases {
        let service = &net.node("bob").service;
        service.clear();
        let body = format!(r#"{{"jsonrpc":"2.0","method":"bob.echo","params":{params},"id":1}}"#);
        let reply = post_raw(
            alice.config.jsonrpc_addr,
            Some(tls.clone()),
            body.into_bytes(),
        )
        .await
        .expect("POST to alice");
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.json()["result"]["service"], "bob", "{reply:?}");

        let got = service.received();
        assert_eq!(got.len(), 1, "{got:?}");
        let raw = &got[0].raw_params;
        let members = eps_core::jsonrpc::params::Members::parse(raw).expect("an object");
        let keys: Vec<&str> = members.0.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(keys, expected, "{params} arrived as {raw}");
        let client: Value = serde_json::from_str(members.0[0].1.get()).unwrap();
        assert_eq!(client["name"], "alice", "{raw}");
        assert_eq!(client["entry"]["groups"], json!(["friends"]), "{raw}");
        if expected.len() == 4 {
            assert_eq!(members.0[2].1.get(), r#"{"_client": "kept"}"#);
            assert_eq!(members.0[3].1.get(), r#"[1, {"_client": 2}]"#);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ping_is_answered_by_the_servers_themselves() {
    let mut net = Net::new("ping");
    net.start(&["alice", "bob"]).await;
    let alice = net.node("alice").client();

    let own = call(&alice, "_ping", json!({})).await.expect("_ping");
    assert_eq!(own, json!({"pong": true, "operator": "alice"}));
    let peer = call(&alice, "bob._ping", json!({}))
        .await
        .expect("bob._ping");
    assert_eq!(peer, json!({"pong": true, "operator": "bob"}));

    assert!(net.node("alice").service.received().is_empty());
    assert!(net.node("bob").service.received().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_jsonrpc_errors_and_good_calls_still_work() {
    let mut net = Net::new("bad-requests");
    net.start(&["alice", "bob"]).await;
    let alice = net.node("alice");
    let client = alice.client();
    let good = || async {
        let r = call(&client, "bob.echo", json!({"good": true})).await;
        assert_eq!(r.expect("a good call")["echo"]["good"], true);
    };
    good().await;

    for (method, code) in [
        ("zed.echo", jsonrpc::UNKNOWN_OPERATOR),
        ("bob.nope", jsonrpc::METHOD_NOT_FOUND),
        ("bob.secret", jsonrpc::FORBIDDEN),
        ("echo", jsonrpc::METHOD_NOT_FOUND),
    ] {
        let e = rpc_error(call(&client, method, json!({})).await, method);
        assert_eq!(e.code, code, "{method}: {e}");
        good().await;
    }

    let tls = client_tls(&alice.client_tls);
    let pad = "x".repeat(2 * 1024 * 1024);
    let oversized =
        json!({"jsonrpc": "2.0", "method": "bob.echo", "params": {"pad": pad}, "id": 1});
    let cases: [(&str, Vec<u8>, u16, i64); 6] = [
        ("not JSON", b"{not json".to_vec(), 200, jsonrpc::PARSE_ERROR),
        ("empty body", Vec::new(), 200, jsonrpc::PARSE_ERROR),
        (
            "no method",
            br#"{"jsonrpc":"2.0","id":1}"#.to_vec(),
            200,
            jsonrpc::INVALID_REQUEST,
        ),
        (
            "a batch",
            br#"[{"jsonrpc":"2.0","method":"bob.echo","params":{},"id":1}]"#.to_vec(),
            200,
            jsonrpc::INVALID_REQUEST,
        ),
        (
            "string params",
            br#"{"jsonrpc":"2.0","method":"bob.echo","params":"x","id":7}"#.to_vec(),
            200,
            jsonrpc::INVALID_REQUEST,
        ),
        (
            "2 MiB body",
            serde_json::to_vec(&oversized).unwrap(),
            413,
            jsonrpc::TOO_LARGE,
        ),
    ];
    for (what, body, status, code) in cases {
        let reply = post_raw(alice.config.jsonrpc_addr, Some(tls.clone()), body)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(reply.status, status, "{what}: {reply:?}");
        assert_eq!(reply.json()["jsonrpc"], "2.0", "{what}: {reply:?}");
        assert_eq!(reply.error_code(), Some(code), "{what}: {reply:?}");
        good().await;
    }

    // Only the good calls reached bob's service.
    let got = net.node("bob").service.received();
    assert_eq!(got.len(), 1 + 4 + 6, "{got:?}");
    assert!(got
        .iter()
        .all(|r| r.method == "echo" && r.params["good"] == true));
}

#[tokio::test(flavor = "multi_thread")]
async fn id_is_echoed_and_invalid_request_keeps_it() {
    let mut net = Net::new("ids");
    net.start(&["alice", "bob"]).await;
    let alice = net.node("alice");
    let tls = client_tls(&alice.client_tls);
    let post =
        |body: &'static [u8]| post_raw(alice.config.jsonrpc_addr, Some(tls.clone()), body.to_vec());

    let ok = post(br#"{"jsonrpc":"2.0","method":"bob.echo","params":{"a":1},"id":"abc"}"#)
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["id"], "abc");
    assert_eq!(ok.json()["result"]["echo"]["a"], 1);
    let bad = post(br#"{"jsonrpc":"1.0","method":"bob.echo","id":42}"#)
        .await
        .unwrap();
    assert_eq!(bad.json()["id"], 42);
    assert_eq!(bad.error_code(), Some(jsonrpc::INVALID_REQUEST));
}
