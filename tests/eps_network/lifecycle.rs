//! A peer going down and coming back, deadlines, SIGTERM and bad settings.

use std::path::Path;
use std::time::{Duration, Instant};

use eps_core::jsonrpc;
use eps_tests::*;

use crate::net::{rpc_error, Net, CALL_TIMEOUT, MARGIN, PROCESS_WAIT};

#[tokio::test(flavor = "multi_thread")]
async fn peer_down_fails_within_deadline_and_recovers_after_restart() {
    let mut net = Net::new("restart");
    net.start(&["alice", "bob"]).await;
    let client = net.node("alice").client();
    call(&client, "bob.echo", json!({"before": true}))
        .await
        .expect("bob.echo before the restart");
    let alice_pid = net.node("alice").proc.pid();

    net.node_mut("bob").proc.kill();
    for attempt in 0..3 {
        let t0 = Instant::now();
        let e = rpc_error(
            call(&client, "bob.echo", json!({"down": attempt})).await,
            "call while bob is down",
        );
        let took = t0.elapsed();
        assert!(
            took < CALL_TIMEOUT + MARGIN,
            "attempt {attempt} took {took:?}: {e}"
        );
        assert!(
            [jsonrpc::PEER_UNREACHABLE, jsonrpc::PEER_TIMEOUT].contains(&e.code),
            "attempt {attempt}: {e}"
        );
        assert!(e.message.contains("bob"), "attempt {attempt}: {e}");
    }

    let bob = net.node_mut("bob");
    bob.proc.restart();
    bob.proc.wait_for_log(EPS_READY, PROCESS_WAIT).await;
    let recovered = wait_until(Duration::from_secs(10), || {
        let client = &client;
        async move {
            call(client, "bob.echo", json!({"after": true}))
                .await
                .is_ok()
        }
    })
    .await;
    assert!(recovered, "alice never reached bob again");

    let alice = net.node_mut("alice");
    assert!(alice.proc.is_running());
    assert_eq!(alice.proc.pid(), alice_pid, "alice was not restarted");
    let got = net.node("bob").service.received();
    assert!(
        got.iter().all(|r| r.params.get("down").is_none()),
        "{got:?}"
    );
    let after = got
        .iter()
        .find(|r| r.params["after"] == true)
        .expect("a call after");
    assert_eq!(after.params["_client"]["name"], "alice");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_service_times_out_with_504_naming_the_peer() {
    let mut net = Net::new("slow");
    net.start(&["alice", "bob"]).await;
    let client = net.node("alice").client();

    let t0 = Instant::now();
    let e = rpc_error(
        call(&client, "bob.slow", json!({"sleep_ms": 10_000})).await,
        "bob.slow",
    );
    let took = t0.elapsed();
    assert_eq!(e.code, jsonrpc::PEER_TIMEOUT, "{e}");
    assert!(e.message.contains("bob"), "{e}");
    assert!(
        took >= CALL_TIMEOUT - Duration::from_millis(100),
        "{took:?}"
    );
    assert!(took < CALL_TIMEOUT + MARGIN, "{took:?}");
    call(&client, "bob.echo", json!({}))
        .await
        .expect("a call after the timeout");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_server_cleanly() {
    let mut net = Net::new("sigterm");
    net.start(&["bob"]).await;
    let bob = &mut net.node_mut("bob").proc;
    let status = bob.stop(PROCESS_WAIT).await.expect("bob exits on SIGTERM");
    assert!(status.success(), "{status}; log: {}", bob.log());
    assert!(bob.log().contains("shutting down"), "{}", bob.log());
}

/// Starts `eps` on `settings` and checks it exits at once with code 64, its output naming every
/// one of `needles`.
async fn assert_bad_settings(dir: &TestDir, settings: &[&Path], needles: &[&str]) {
    let t0 = Instant::now();
    let mut eps = start_eps("eps", settings, dir.join("eps.log"));
    let status = eps.wait_exit(PROCESS_WAIT).await.expect("eps exits");
    let log = eps.log();
    assert_eq!(status.code(), Some(64), "{log}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    for n in needles {
        assert!(log.contains(n), "output does not name {n:?}: {log}");
    }
    assert!(!log.contains(EPS_READY), "{log}");
}

/// A valid settings folder for bob in `dir`, to spoil.
fn bob_settings(dir: &TestDir) -> EpsConfig {
    let pki = Pki::new(dir.join("pki"), &["bob"], None);
    EpsConfig::new("bob", &pki, &dir.mkdir("directory"), "https://127.0.0.1:9/")
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_settings_key_exits_64_naming_file_and_key() {
    let dir = TestDir::new("unknown-key");
    let settings = bob_settings(&dir).write(&dir.join("settings"));
    let extra = dir.write("settings/20-extra.yml", "grpc_server:\n  bogus_key: 1\n");
    assert_bad_settings(
        &dir,
        &[&settings],
        &[&extra.display().to_string(), "bogus_key"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_settings_type_exits_64_naming_file_and_key() {
    let dir = TestDir::new("wrong-type");
    let mut config = bob_settings(&dir);
    config.extra = json!({"grpc_client": {"call_timeout": "soon"}});
    let settings = config.write(&dir.join("settings"));
    let file = settings.join("eps.yml").display().to_string();
    assert_bad_settings(&dir, &[&settings], &[&file, "grpc_client.call_timeout"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_settings_directory_exits_64_naming_it() {
    let dir = TestDir::new("missing-dir");
    let missing = dir.join("no-such-settings");
    assert_bad_settings(&dir, &[&missing], &[&missing.display().to_string()]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_certificate_file_exits_64_naming_it() {
    let dir = TestDir::new("missing-cert");
    let mut config = bob_settings(&dir);
    config.grpc_tls.certificate = dir.join("nowhere/bob.crt");
    let settings = config.write(&dir.join("settings"));
    assert_bad_settings(
        &dir,
        &[&settings],
        &["grpc_server.tls.certificate", "nowhere/bob.crt"],
    )
    .await;
}

/// `bob.slow` (sleeping `ms`) called through `client` on a task of its own.
fn spawn_slow(
    client: &eps_core::http::RpcClient,
    ms: u64,
) -> tokio::task::JoinHandle<Result<Value, eps_core::http::CallError>> {
    let client = client.clone();
    tokio::spawn(async move { call(&client, "bob.slow", json!({"sleep_ms": ms})).await })
}

/// Whether bob's service receives `n` calls of `slow` within [`PROCESS_WAIT`].
async fn slow_calls_arrive(net: &Net, n: usize) -> bool {
    let service = &net.node("bob").service;
    wait_until(PROCESS_WAIT, || async {
        service
            .received()
            .iter()
            .filter(|r| r.method == "slow")
            .count()
            >= n
    })
    .await
}

/// Calls to one peer share one stream; a slow call must not hold back the calls behind it.
#[tokio::test(flavor = "multi_thread")]
async fn calls_to_one_peer_are_answered_as_they_finish_not_in_order() {
    let mut net = Net::new("order");
    net.start(&["alice", "bob"]).await;
    let client = net.node("alice").client();
    let slow = spawn_slow(&client, 1800);
    assert!(
        slow_calls_arrive(&net, 1).await,
        "the slow call never reached bob's service"
    );
    for i in 0..10 {
        call(&client, "bob.echo", json!({"i": i}))
            .await
            .expect("a quick call while the slow one runs");
    }
    assert!(
        !slow.is_finished(),
        "the quick calls were answered only after the slow one"
    );
    let answer = slow
        .await
        .expect("task")
        .expect("the slow call is answered");
    assert_eq!(answer["echo"]["sleep_ms"], 1800, "{answer}");
}

/// SIGTERM answers the calls a peer's open stream has in flight, then ends the stream, so the
/// server exits without waiting out its grace period (10 s) on a stream the peer keeps open.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_answers_calls_in_flight_on_a_peer_stream_and_exits_promptly() {
    let mut net = Net::new("drain");
    net.start(&["alice", "bob"]).await;
    let client = net.node("alice").client();
    call(&client, "bob.echo", json!({}))
        .await
        .expect("a first call opens alice's stream to bob");
    let slow = spawn_slow(&client, 800);
    assert!(
        slow_calls_arrive(&net, 1).await,
        "the slow call never reached bob's service"
    );
    let t0 = Instant::now();
    let bob = &mut net.node_mut("bob").proc;
    let status = bob.stop(PROCESS_WAIT).await.expect("bob exits on SIGTERM");
    let took = t0.elapsed();
    assert!(status.success(), "{status}; log: {}", bob.log());
    assert!(
        took < Duration::from_secs(5),
        "bob took {took:?} to exit: the open stream held its shutdown"
    );
    let answer = slow
        .await
        .expect("task")
        .expect("the call in flight is answered before bob exits");
    assert_eq!(answer["echo"]["sleep_ms"], 800, "{answer}");
}

/// A peer that dies mid-call ends the stream: every call waiting on it fails at once with 502
/// (not at its deadline), and calls work again once the peer is back.
#[tokio::test(flavor = "multi_thread")]
async fn calls_in_flight_fail_at_once_when_the_peer_dies() {
    let mut net = Net::new("dies");
    net.start(&["alice", "bob"]).await;
    let client = net.node("alice").client();
    let slow: Vec<_> = (0..5)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let r = call(&client, "bob.slow", json!({"sleep_ms": 1900, "i": i})).await;
                (r, Instant::now())
            })
        })
        .collect();
    let service = &net.node("bob").service;
    let arrived = wait_until(PROCESS_WAIT, || async {
        service
            .received()
            .iter()
            .filter(|r| r.method == "slow")
            .count()
            == 5
    })
    .await;
    assert!(arrived, "the slow calls never all reached bob's service");
    let killed = Instant::now();
    net.node_mut("bob").proc.kill();
    for task in slow {
        let (r, done) = task.await.expect("task");
        let e = rpc_error(r, "a call in flight when bob died");
        assert_eq!(e.code, jsonrpc::PEER_UNREACHABLE, "{e}");
        assert!(e.message.contains("bob"), "{e}");
        let after = done.saturating_duration_since(killed);
        assert!(
            after < CALL_TIMEOUT / 2,
            "failed {after:?} after bob died (call_timeout {CALL_TIMEOUT:?})"
        );
    }
    let bob = net.node_mut("bob");
    bob.proc.restart();
    bob.proc.wait_for_log(EPS_READY, PROCESS_WAIT).await;
    let recovered = wait_until(Duration::from_secs(10), || {
        let client = &client;
        async move { call(client, "bob.echo", json!({})).await.is_ok() }
    })
    .await;
    assert!(recovered, "alice never reached bob again");
}

/// A call too large for the EPS network fails alone with 413; the stream, and the calls on it,
/// go on.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_call_or_answer_fails_alone() {
    const LIMIT: usize = 10_000;
    let mut net = Net::new("oversized");
    for name in ["alice", "bob"] {
        net.plans.get_mut(name).expect("planned").config.extra =
            json!({"grpc_server": {"max_message_bytes": LIMIT}});
    }
    net.start(&["alice", "bob"]).await;
    let client = net.node("alice").client();
    let slow = spawn_slow(&client, 500);
    // Params over the limit: refused before they go out.
    let e = rpc_error(
        call(&client, "bob.echo", json!({"pad": "x".repeat(2 * LIMIT)})).await,
        "params over max_message_bytes",
    );
    assert_eq!(e.code, jsonrpc::TOO_LARGE, "{e}");
    // Params just under it: bob's answer (the params echoed, with `_client` added) is over it.
    let e = rpc_error(
        call(&client, "bob.echo", json!({"pad": "x".repeat(LIMIT - 200)})).await,
        "an answer over max_message_bytes",
    );
    assert_eq!(e.code, jsonrpc::TOO_LARGE, "{e}");
    assert!(e.message.contains("bob"), "{e}");
    slow.await
        .expect("task")
        .expect("a call on the same stream is answered");
    call(&client, "bob.echo", json!({"small": true}))
        .await
        .expect("a call after the oversized ones");
}

/// A peer that does not serve `Calls` (an older version, or `grpc_server.call_streams: false`)
/// is called one gRPC call per call, with the same answers, deadlines and identity.
#[tokio::test(flavor = "multi_thread")]
async fn a_peer_without_call_streams_is_called_one_grpc_call_each() {
    let mut net = Net::new("unary");
    net.plans.get_mut("bob").expect("planned").config.extra =
        json!({"grpc_server": {"call_streams": false}});
    net.start(&["alice", "bob"]).await;
    let client = net.node("alice").client();
    let calls: Vec<_> = (0..10)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { call(&client, "bob.echo", json!({"i": i})).await })
        })
        .collect();
    for (i, c) in calls.into_iter().enumerate() {
        let answer = c.await.expect("task").expect("a call to bob");
        assert_eq!(answer["echo"]["i"], i, "{answer}");
        assert_eq!(answer["echo"]["_client"]["name"], "alice", "{answer}");
    }
    let alice_log = net.node("alice").proc.log();
    assert!(
        alice_log.contains("peer does not serve call streams"),
        "{alice_log}"
    );
    let t0 = Instant::now();
    let e = rpc_error(
        call(&client, "bob.slow", json!({"sleep_ms": 10_000})).await,
        "bob.slow, the unary way",
    );
    let took = t0.elapsed();
    assert_eq!(e.code, jsonrpc::PEER_TIMEOUT, "{e}");
    assert!(took < CALL_TIMEOUT + MARGIN, "{took:?}");
}
