//! The chain outlives its processes: the directory server killed with -9 right after an
//! acknowledgement still has the record, a torn tail is cut off, EPS servers route from their
//! own verified copies while the directory server is down, then catch up, and a copy altered
//! on disk is set aside and fetched again.

use std::io::Write as _;

use eps_tests::*;

use crate::fixture::*;

#[tokio::test(flavor = "multi_thread")]
async fn an_acknowledged_record_survives_kill_9_of_the_directory_server() {
    let mut net = SdNet::new("kill-9").await;
    let alice = net.plan_eps("alice");
    net.submit(&net.admin, net.operator_records(&alice))
        .await
        .expect("alice's records");
    for i in 0..5 {
        let acked = net
            .submit(
                &net.admin,
                vec![record_of("alice", "groups", json!([format!("g{i}")]))],
            )
            .await
            .expect("a record");
        // SIGKILL at once: no chance to flush anything after the answer.
        net.sd.kill();
        net.sd.restart();
        net.sd.wait_for_log(SD_READY, PROCESS_WAIT).await;
        let head = net.head().await;
        assert_eq!(
            head.head, acked.head,
            "round {i}: the acknowledged record is the head"
        );
        assert_eq!(head.length, acked.length, "round {i}");
    }
    let kept = net.head().await;

    // A write cut short (half a record at the end of the file) is cut off at start.
    net.sd.kill();
    let path = net.dir.join("sd/chain.jsonl");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("the chain file");
    file.write_all(br#"{"name":"alice","section":"gro"#)
        .expect("a torn tail");
    drop(file);
    net.sd.restart();
    net.sd.wait_for_log(SD_READY, PROCESS_WAIT).await;
    assert!(net.sd.run_log().contains("torn"), "{}", net.sd.run_log());
    assert_eq!(net.head().await, kept);
    net.submit(&net.admin, vec![record_of("alice", "groups", json!([]))])
        .await
        .expect("appending after the cut");

    // The file verifies with the command, offline.
    net.sd.kill();
    let out = eps(
        &net.admin_settings,
        &["sd", "verify", path.to_str().unwrap()],
    )
    .await;
    assert!(out.status.success(), "{}", said(&out));
    let said_out = String::from_utf8_lossy(&out.stdout);
    assert!(
        said_out.contains(&format!("{} records verified", kept.length + 1)),
        "{said_out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn eps_servers_route_while_the_directory_server_is_down_and_catch_up() {
    let mut net = SdNet::new("sd-down").await;
    net.start_three().await;
    let alice = net.client_of("alice");
    assert!(
        until_calls(&alice, "bob", PROCESS_WAIT).await,
        "alice calls bob"
    );

    net.sd.kill();
    net.node_mut("alice")
        .proc
        .wait_for_log("directory server unreachable", PROCESS_WAIT)
        .await;
    assert!(
        until_calls(&alice, "bob", PROCESS_WAIT).await,
        "alice calls bob, sd down"
    );

    // bob restarts while the directory server is down: he starts from his verified copy.
    let bob = net.node_mut("bob");
    bob.proc.restart();
    bob.proc.wait_for_log(EPS_READY, PROCESS_WAIT).await;
    let log = bob.proc.run_log();
    assert!(
        log.contains("directory server not reached at start"),
        "{log}"
    );
    assert!(
        log.contains("local copy of the directory verified"),
        "{log}"
    );
    assert!(
        until_calls(&alice, "bob", PROCESS_WAIT).await,
        "alice calls bob after his restart"
    );
    let bob_client = net.client_of("bob");
    assert!(
        until_calls(&bob_client, "alice", PROCESS_WAIT).await,
        "bob calls alice"
    );

    // The directory server comes back; a new operator reaches every server.
    net.sd.restart();
    net.sd.wait_for_log(SD_READY, PROCESS_WAIT).await;
    let records = net.operator_records(&net.node("carol").config);
    net.submit(&net.admin, records)
        .await
        .expect("carol's records");
    let carol = net.client_of("carol");
    assert!(
        until_calls(&carol, "bob", PROCESS_WAIT).await,
        "carol calls bob"
    );
    assert!(
        until_calls(&bob_client, "carol", PROCESS_WAIT).await,
        "bob calls carol"
    );
    let length = net.head().await.length;
    for name in ["alice", "bob", "carol"] {
        let log = net.node(name).proc.run_log();
        assert!(
            log.contains(&format!("length={length}")),
            "{name} did not catch up to {length} records: {log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_eps_server_sets_aside_a_copy_altered_on_disk_and_fetches_the_chain_again() {
    let mut net = SdNet::new("copy-altered").await;
    net.start_three().await;
    let bob_client = net.client_of("bob");
    assert!(
        until_calls(&bob_client, "alice", PROCESS_WAIT).await,
        "bob calls alice"
    );

    // Someone edits bob's copy: alice's groups become "partners" (bob's own group), a change
    // no administrator signed.
    let bob = net.node_mut("bob");
    bob.proc.kill();
    let copy = net.dir.join("bob-copy/directory.jsonl");
    let text = std::fs::read_to_string(&copy).expect("bob's copy");
    let altered = text.replacen(r#""data":["friends"]"#, r#""data":["partners"]"#, 1);
    assert_ne!(altered, text, "the copy holds alice's groups");
    std::fs::write(&copy, altered).expect("alter the copy");

    let bob = net.node_mut("bob");
    bob.proc.restart();
    bob.proc.wait_for_log(EPS_READY, PROCESS_WAIT).await;
    let log = bob.proc.run_log();
    assert!(
        log.contains("does not verify, starting from an empty one"),
        "{log}"
    );
    assert!(log.contains("hash does not match"), "{log}");
    assert!(
        copy.with_extension("refused").exists(),
        "the altered copy is kept aside"
    );
    // The chain fetched again from the directory server is the signed one.
    assert!(
        until_calls(&bob_client, "alice", PROCESS_WAIT).await,
        "bob calls alice"
    );
    let out = eps(&net.node("bob").settings, &["directory", "show", "alice"]).await;
    let entry: Value = serde_json::from_slice(&out.stdout).expect("alice's entry");
    assert_eq!(entry["groups"], json!(["friends"]));
}
