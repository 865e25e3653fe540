//! Reverse streams on loopback: `bob` has no gRPC port (its directory entry has a
//! `reverse_stream` channel) and opens a stream to `alice`, who may call him; alice's calls to
//! bob travel on it. The firewall itself is in `tests/firewall.rs` (network namespaces); here
//! are the routing rules: calls both ways, the 502 for an operator with no stream, several
//! instances of one operator, and restarts on either side.

use std::time::{Duration, Instant};

use eps_core::jsonrpc;
use eps_tests::*;

use crate::net::{rpc_error, Net, PROCESS_WAIT};

/// What alice logs when bob's stream reaches her, and when it ends.
const ACCEPTED: &str = "reverse stream accepted";
const ENDED: &str = "reverse stream ended";
/// What bob logs once his stream is open.
const OPEN: &str = "reverse stream open";

/// One instance of bob: his EPS server and the service it delivers to.
struct Bob {
    proc: Proc,
    service: TestService,
}

/// The network of `test` with bob reached by reverse stream only (his `channels` record says
/// so, his settings have no `grpc_server`); alice started, bob not.
async fn net_with_reverse_bob(test: &str) -> Net {
    let mut net = Net::new(test);
    // Later records replace earlier ones: bob's channel is now the reverse stream.
    write_records(
        &net.dir.join("directory"),
        "20-bob-reverse.json",
        &[record(
            "bob",
            "channels",
            json!([{"type": "reverse_stream"}]),
        )],
    );
    net.start(&["alice"]).await;
    net
}

/// Starts instance `n` of bob (his own settings folder, log and service) and waits until its
/// reverse stream is open.
async fn start_bob(net: &Net, n: usize) -> Bob {
    let plan = &net.plans["bob"];
    let service = TestService::start("bob", Some(&plan.service_tls)).await;
    let mut config = plan.config.clone();
    config.serve_grpc = false;
    config.delivery_url = service.url();
    if n > 1 {
        // Each instance has its own local JSON-RPC port.
        config.jsonrpc_addr = free_addr();
    }
    let settings = config.write(&net.dir.join(format!("bob-{n}-settings")));
    let mut proc = start_eps(
        &format!("bob-{n}"),
        &[&settings],
        net.dir.join(format!("bob-{n}.log")),
    );
    proc.wait_for_log(EPS_READY, PROCESS_WAIT).await;
    proc.wait_for_log(OPEN, PROCESS_WAIT).await;
    Bob { proc, service }
}

/// Waits until alice's log holds `n` lines containing `needle`.
async fn alice_logged(net: &Net, needle: &str, n: usize) {
    let alice = &net.node("alice").proc;
    let done = wait_until(PROCESS_WAIT, || async {
        alice.log().matches(needle).count() >= n
    })
    .await;
    assert!(
        done,
        "alice did not log {needle:?} {n} times: {}",
        alice.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_reach_an_operator_without_a_grpc_port() {
    let net = net_with_reverse_bob("reverse-calls").await;
    let bob = start_bob(&net, 1).await;
    alice_logged(&net, ACCEPTED, 1).await;
    // bob listens on no gRPC port: the address in his settings is not his.
    assert!(
        tokio::net::TcpStream::connect(net.plans["bob"].config.grpc_addr)
            .await
            .is_err(),
        "something listens on bob's unused gRPC address"
    );

    let alice = net.node("alice").client();
    for i in 0..20 {
        let r = call(&alice, "bob.echo", json!({"i": i}))
            .await
            .expect("alice -> bob on the reverse stream");
        assert_eq!(r["service"], "bob");
        assert_eq!(r["echo"]["i"], i);
    }
    let got = bob.service.received();
    assert_eq!(got.len(), 20, "{got:?}");
    assert!(got.iter().all(|r| r.params["_client"]["name"] == "alice"));
    // Permissions still hold on the reverse stream.
    let e = rpc_error(call(&alice, "bob.secret", json!({})).await, "bob.secret");
    assert_eq!(e.code, jsonrpc::FORBIDDEN, "{e}");

    // bob's own calls go out as before, on the channel he dialed.
    let bob_client = rpc_client(
        &net.plans["bob"].config.jsonrpc_url(),
        Some(&net.plans["bob"].client_tls),
        Duration::from_secs(10),
    );
    let r = call(&bob_client, "alice.echo", json!({"from": "bob"}))
        .await
        .expect("bob -> alice");
    assert_eq!(r["echo"]["_client"]["name"], "bob");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_stream_held_fails_at_once_with_502() {
    let net = net_with_reverse_bob("reverse-none").await;
    let alice = net.node("alice").client();
    for _ in 0..3 {
        let t0 = Instant::now();
        let e = rpc_error(call(&alice, "bob.echo", json!({})).await, "bob.echo");
        let took = t0.elapsed();
        assert_eq!(e.code, jsonrpc::PEER_UNREACHABLE, "{e}");
        assert!(
            e.message.contains("bob") && e.message.contains("not connected"),
            "{e}"
        );
        println!(
            "call to bob without a stream failed in {took:?}: {}",
            e.message
        );
        assert!(took < Duration::from_millis(500), "took {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_share_calls_and_a_dead_one_drops_out() {
    let net = net_with_reverse_bob("reverse-two").await;
    let mut b1 = start_bob(&net, 1).await;
    let b2 = start_bob(&net, 2).await;
    alice_logged(&net, ACCEPTED, 2).await;
    let alice = net.node("alice").client();

    // Sequential calls: each goes to the least busy stream, in turn among equals.
    for i in 0..40 {
        call(&alice, "bob.echo", json!({"i": i}))
            .await
            .expect("bob.echo");
    }
    let (n1, n2) = (b1.service.received().len(), b2.service.received().len());
    println!("40 calls spread over two instances: {n1} and {n2}");
    assert_eq!(n1 + n2, 40);
    assert!(n1 >= 10 && n2 >= 10, "{n1} / {n2}");

    // kill -9: the connection closes, alice drops the stream, every later call reaches bob-2.
    b1.proc.kill();
    let killed = Instant::now();
    alice_logged(&net, ENDED, 1).await;
    println!(
        "alice dropped the dead stream {:?} after the kill",
        killed.elapsed()
    );
    b2.service.clear();
    for i in 0..40 {
        call(&alice, "bob.echo", json!({"after": i}))
            .await
            .expect("bob.echo after one instance died");
    }
    assert_eq!(b2.service.received().len(), 40);

    // Restarted, bob-1 opens his stream again and takes calls again.
    b1.proc.restart();
    b1.proc.wait_for_log(OPEN, PROCESS_WAIT).await;
    alice_logged(&net, ACCEPTED, 3).await;
    b1.service.clear();
    for i in 0..40 {
        call(&alice, "bob.echo", json!({"back": i}))
            .await
            .expect("bob.echo after the restart");
    }
    let back = b1.service.received().len();
    println!("after its restart bob-1 took {back} of 40 calls");
    assert!(back >= 10, "{back}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_is_opened_again_after_the_peer_restarts() {
    let mut net = net_with_reverse_bob("reverse-restart").await;
    let bob = start_bob(&net, 1).await;
    alice_logged(&net, ACCEPTED, 1).await;

    let alice = net.node_mut("alice");
    alice.proc.restart();
    alice.proc.wait_for_log(EPS_READY, PROCESS_WAIT).await;
    let client = net.node("alice").client();
    let t0 = Instant::now();
    let back = wait_until(Duration::from_secs(10), || {
        let client = &client;
        async move { call(client, "bob.echo", json!({})).await.is_ok() }
    })
    .await;
    assert!(back, "alice never reached bob again: {}", bob.proc.log());
    println!(
        "bob reachable again {:?} after alice restarted",
        t0.elapsed()
    );
    assert_eq!(
        bob.proc.log().matches(EPS_READY).count(),
        1,
        "bob restarted"
    );
}

/// One of two instances stopped with SIGTERM under load (a rolling restart): it answers the
/// calls it has read, refuses the ones that reach it afterwards as not delivered, and the caller
/// sends those to the other instance. No call fails.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_of_one_instance_loses_no_call() {
    let net = net_with_reverse_bob("reverse-sigterm").await;
    let mut b1 = start_bob(&net, 1).await;
    let b2 = start_bob(&net, 2).await;
    alice_logged(&net, ACCEPTED, 2).await;
    let alice = net.node("alice").client();

    const CALLS: usize = 400;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (alice, done) = (alice.clone(), done.clone());
            tokio::spawn(async move {
                let mut failed = Vec::new();
                for i in (w..CALLS).step_by(8) {
                    // Slow enough that calls are in flight when the signal comes.
                    let r = call(&alice, "bob.echo", json!({"i": i, "sleep_ms": 10})).await;
                    if let Err(e) = r {
                        failed.push(format!("#{i}: {e}"));
                    }
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                failed
            })
        })
        .collect();
    assert!(
        wait_until(PROCESS_WAIT, || async {
            done.load(std::sync::atomic::Ordering::Relaxed) >= CALLS / 4
        })
        .await
    );
    let t0 = Instant::now();
    let status = b1
        .proc
        .stop(PROCESS_WAIT)
        .await
        .expect("bob-1 exits on SIGTERM");
    let stopped = t0.elapsed();
    let mut failed = Vec::new();
    for w in workers {
        failed.extend(w.await.expect("a worker"));
    }
    let (n1, n2) = (b1.service.received().len(), b2.service.received().len());
    println!(
        "SIGTERM to bob-1 under load: exited ({status}) in {stopped:?}; {} of {CALLS} calls \
         failed; bob-1 took {n1}, bob-2 {n2}",
        failed.len()
    );
    assert!(status.success(), "{status}");
    assert!(failed.is_empty(), "{failed:#?}");
    assert!(stopped < Duration::from_secs(5), "{stopped:?}");
}

/// The receiving server stopped with SIGTERM while a call is on the reverse stream: the call
/// still gets its answer (as on a dialed channel) before the server exits.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_of_the_receiver_answers_calls_in_flight() {
    let mut net = net_with_reverse_bob("reverse-receiver-sigterm").await;
    let bob = start_bob(&net, 1).await;
    alice_logged(&net, ACCEPTED, 1).await;
    let alice = net.node("alice").client();
    let slow =
        tokio::spawn(async move { call(&alice, "bob.echo", json!({"sleep_ms": 700})).await });
    // The call is on its way once bob's service holds it.
    assert!(
        wait_until(PROCESS_WAIT, || async {
            !bob.service.received().is_empty()
        })
        .await
    );
    let status = net
        .node_mut("alice")
        .proc
        .stop(PROCESS_WAIT)
        .await
        .expect("alice exits on SIGTERM");
    assert!(status.success(), "{status}");
    let r = slow
        .await
        .expect("the caller")
        .expect("the call in flight was answered");
    assert_eq!(r["echo"]["sleep_ms"], 700);
}

/// A reverse stream is bound to the certificate it was opened with: once the directory pins
/// another fingerprint for its operator (and the receiver has re-read it), the stream is closed
/// at the next call, calls fail with 502, and the holder's next handshake is refused.
#[tokio::test(flavor = "multi_thread")]
async fn stream_ends_when_the_directory_stops_accepting_its_certificate() {
    let net = net_with_reverse_bob("reverse-revoked").await;
    let bob = start_bob(&net, 1).await;
    alice_logged(&net, ACCEPTED, 1).await;
    let alice = net.node("alice").client();
    call(&alice, "bob.echo", json!({}))
        .await
        .expect("bob.echo before");

    net.unpin("bob");
    let pid = libc::pid_t::try_from(net.node("alice").proc.pid()).expect("a pid");
    // SAFETY: kill(2) with SIGHUP on our own child process, which is running.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    alice_logged(&net, "directory reloaded", 1).await;

    let e = rpc_error(call(&alice, "bob.echo", json!({})).await, "bob.echo after");
    assert_eq!(e.code, jsonrpc::PEER_UNREACHABLE, "{e}");
    alice_logged(&net, "no longer accepts its certificate", 1).await;
    alice_logged(&net, ENDED, 1).await;
    // bob tries again and is refused at the handshake: no stream is accepted again.
    alice_logged(&net, "refused peer", 1).await;
    assert_eq!(
        net.node("alice").proc.log().matches(ACCEPTED).count(),
        1,
        "{}",
        bob.proc.log()
    );
    let e = rpc_error(call(&alice, "bob.echo", json!({})).await, "bob.echo later");
    assert!(e.message.contains("not connected"), "{e}");
}

/// The holder of a reverse stream re-checks the peer it dialed, too: once bob's directory (read
/// by itself when its files change) stops accepting alice's certificate, bob refuses her next
/// call on the stream he holds, ends it, and cannot open another (his connect checks the pin).
#[tokio::test(flavor = "multi_thread")]
async fn holder_stops_answering_a_peer_the_directory_stops_accepting() {
    let net = net_with_reverse_bob("reverse-holder-revokes").await;
    let mut bob = start_bob(&net, 1).await;
    alice_logged(&net, ACCEPTED, 1).await;
    let alice = net.node("alice").client();
    call(&alice, "bob.echo", json!({}))
        .await
        .expect("bob.echo before");
    let delivered = bob.service.received().len();

    net.unpin("alice");
    bob.proc
        .wait_for_log("directory reloaded", PROCESS_WAIT)
        .await;
    let e = rpc_error(call(&alice, "bob.echo", json!({})).await, "bob.echo after");
    assert_eq!(e.code, jsonrpc::PEER_UNREACHABLE, "{e}");
    bob.proc
        .wait_for_log("no longer accepts its certificate", PROCESS_WAIT)
        .await;
    bob.proc
        .wait_for_log("does not match the fingerprint pinned", PROCESS_WAIT)
        .await;
    assert_eq!(
        bob.service.received().len(),
        delivered,
        "a call from a peer bob no longer accepts reached his service"
    );
}

/// An operator that runs two EPS servers lists both addresses; a server that cannot be dialed
/// holds a reverse stream to each, so whichever instance a call starts at reaches it.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_to_every_instance_of_the_peer() {
    let net = net_with_reverse_bob("reverse-two-alices").await;
    // A second alice: her own ports and service, the same certificate.
    let service = TestService::start("alice", Some(&net.pki.tls_verifying("alice"))).await;
    let mut config = net.node("alice").config.clone();
    config.jsonrpc_addr = free_addr();
    config.grpc_addr = free_addr();
    config.delivery_url = service.url();
    let settings = config.write(&net.dir.join("alice-2-settings"));
    let mut alice2 = start_eps("alice-2", &[&settings], net.dir.join("alice-2.log"));
    alice2.wait_for_log(EPS_READY, PROCESS_WAIT).await;
    let addresses = [net.node("alice").config.grpc_addr, config.grpc_addr];
    write_records(
        &net.dir.join("directory"),
        "25-alice-two-instances.json",
        &[record(
            "alice",
            "channels",
            json!(addresses
                .map(|a| json!({"type": "grpc_server", "settings": {"address": a.to_string()}}))),
        )],
    );
    let bob = start_bob(&net, 1).await;
    alice2.wait_for_log(ACCEPTED, PROCESS_WAIT).await;
    alice_logged(&net, ACCEPTED, 1).await;
    let clients = [
        net.node("alice").client(),
        rpc_client(
            &config.jsonrpc_url(),
            Some(&net.node("alice").client_tls),
            Duration::from_secs(10),
        ),
    ];
    for (i, client) in clients.iter().enumerate() {
        let r = call(client, "bob.echo", json!({"from": i}))
            .await
            .unwrap_or_else(|e| panic!("bob.echo from alice instance {i}: {e}"));
        assert_eq!(r["echo"]["_client"]["name"], "alice");
    }
    assert_eq!(bob.service.received().len(), 2);
}
