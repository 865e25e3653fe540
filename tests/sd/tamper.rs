//! A follower trusts no directory server: records a (fake, in-process) directory server hands
//! out are verified by each EPS server itself, and a batch with one bad record is refused
//! whole while the last good directory stays in use.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use eps_core::http::{Handler, Peer, ServerLimits};
use eps_core::jsonrpc::{self, Outcome, Request, RpcError};
use eps_core::sd::protocol::{self as p, GetRecords, Records};
use eps_core::sd::SignedRecord;
use eps_tests::*;
use tokio_util::sync::CancellationToken;

use crate::fixture::*;

/// A directory server that serves whatever chain the test gives it, verifying nothing.
#[derive(Default)]
struct Fake {
    records: Mutex<Vec<SignedRecord>>,
}

impl Handler for Fake {
    async fn call(&self, req: Request, _peer: Peer) -> Outcome {
        if req.method != p::GET_RECORDS {
            return Err(RpcError::method_not_found(req.method));
        }
        let g: GetRecords = serde_json::from_str(req.params.as_ref().map_or("{}", |p| p.get()))
            .map_err(|e| RpcError::invalid_params(e.to_string()))?;
        let answer = || {
            let records = self.records.lock().unwrap().clone();
            let from = match &g.after {
                None => 0,
                Some(h) => match records.iter().position(|r| &r.hash == h) {
                    Some(i) => i + 1,
                    None => return Err(RpcError::new(p::UNKNOWN_HASH, "unknown")),
                },
            };
            Ok(Records {
                head: records.last().map(|r| r.hash.clone()),
                length: records.len(),
                records: records[from..].to_vec(),
            })
        };
        let mut r = answer()?;
        if r.records.is_empty() && g.wait.unwrap_or(0.0) > 0.0 {
            // A short wait, then the same answer: enough for a follower's loop.
            tokio::time::sleep(Duration::from_millis(100)).await;
            r = answer()?;
        }
        Ok(jsonrpc::to_raw(&r))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_refuses_a_batch_a_directory_server_altered_and_keeps_its_directory() {
    let mut net = SdNet::new("tamper").await;
    // The fake directory server, where the EPS servers look instead of the real one.
    let fake = Arc::new(Fake::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_url = format!("https://{}/jsonrpc", listener.local_addr().unwrap());
    let tls = eps_core::tls::server_config(&net.pki.tls("sd"), &[b"h2", b"http/1.1"]).unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(eps_core::http::serve(
        listener,
        Some(tls),
        ServerLimits::default(),
        fake.clone(),
        stop.clone(),
    ));
    let _stop = stop.drop_guard();

    // A good chain, signed by the administrator: alice and bob.
    let (alice_cfg, bob_cfg) = (net.plan_eps("alice"), net.plan_eps("bob"));
    let mut first = net.operator_records(&alice_cfg);
    first.extend(net.operator_records(&bob_cfg));
    let good = net.admin.sign(&first, None).unwrap();
    *fake.records.lock().unwrap() = good.clone();
    for mut config in [alice_cfg, bob_cfg] {
        config.extra["directory"]["settings"]["url"] = json!(fake_url);
        net.start_eps(config).await;
    }
    let alice = net.client_of("alice");
    assert!(
        until_calls(&alice, "bob", PROCESS_WAIT).await,
        "alice calls bob"
    );

    // The fake appends two records: the administrator's (valid on its own) that puts alice in
    // no group, and one alice signed that writes bob's services, which she may not do. The
    // whole batch is refused, the valid record too.
    let head = good.last().map(|r| r.hash.clone());
    let ungroup = net
        .admin
        .sign(&[record_of("alice", "groups", json!([]))], head.as_deref())
        .unwrap();
    let forged = net
        .pki
        .signing_key("alice")
        .sign(
            &[record_of("bob", "services", json!([]))],
            Some(&ungroup[0].hash),
        )
        .unwrap();
    let mut bad = good.clone();
    bad.extend(ungroup.iter().cloned());
    bad.extend(forged);
    *fake.records.lock().unwrap() = bad;
    for name in ["alice", "bob"] {
        net.node_mut(name)
            .proc
            .wait_for_log("refused, keeping the last good directory", PROCESS_WAIT)
            .await;
    }
    let log = net.node("alice").proc.log();
    assert!(log.contains("alice may not write bob's services"), "{log}");
    let r = call(&alice, "bob.echo", json!({"still": true})).await;
    assert!(r.is_ok(), "the last good directory stays in use: {r:?}");
    let out = eps(&net.node("alice").settings, &["directory", "show", "alice"]).await;
    let entry: Value = serde_json::from_slice(&out.stdout).expect("alice's entry");
    assert_eq!(
        entry["groups"],
        json!(["friends"]),
        "the valid record was not applied alone"
    );

    // Data changed after signing: refused as well.
    let mut altered = good.clone();
    let mut changed = ungroup[0].clone();
    changed.data = json!(["partners"]);
    altered.push(changed);
    *fake.records.lock().unwrap() = altered;
    net.node_mut("alice")
        .proc
        .wait_for_log("hash does not match", PROCESS_WAIT)
        .await;

    // An honest continuation is applied: alice loses her group and with it bob's service.
    let mut honest = good;
    honest.extend(ungroup);
    *fake.records.lock().unwrap() = honest;
    let forbidden = wait_until(PROCESS_WAIT, || async {
        matches!(
            call(&alice, "bob.echo", json!({})).await,
            Err(eps_core::http::CallError::Rpc(e)) if e.code == jsonrpc::FORBIDDEN
        )
    })
    .await;
    assert!(forbidden, "alice, in no group, may no longer call bob");
}
