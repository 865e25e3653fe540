//! Who may connect: peers refused at the gRPC handshake, local clients without a certificate.

use std::time::Instant;

use eps_core::jsonrpc;
use eps_core::tls::TlsSettings;
use eps_tests::*;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::net::{rpc_error, Net, CALL_TIMEOUT, PROCESS_WAIT};

/// Starts bob and `intruder`, has the intruder call `bob.echo` and checks that bob refused the
/// handshake for `reason` and his service saw nothing.
async fn assert_refused_at_handshake(intruder: &str, reason: &str) {
    let mut net = Net::new(intruder);
    net.start(&["bob", intruder]).await;
    let client = net.node(intruder).client();

    let t0 = Instant::now();
    let e = rpc_error(
        call(&client, "bob.echo", json!({"from": intruder})).await,
        "intruder's call",
    );
    let took = t0.elapsed();
    // The refusal is immediate, not a wait for the deadline.
    assert!(took < CALL_TIMEOUT, "after {took:?}: {e}");
    assert_eq!(e.code, jsonrpc::PEER_UNREACHABLE, "after {took:?}: {e}");
    assert!(e.message.contains("bob"), "{e}");

    let bob = &mut net.node_mut("bob").proc;
    bob.wait_for_log("refused peer", PROCESS_WAIT).await;
    assert!(bob.log().contains(reason), "bob's log: {}", bob.log());
    assert!(net.node("bob").service.received().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn peer_with_certificate_from_another_ca_is_refused() {
    assert_refused_at_handshake("carol", "does not verify against the CA set").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn peer_not_in_directory_is_refused() {
    assert_refused_at_handshake("mallory", "not in the directory").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn peer_not_matching_pinned_fingerprint_is_refused() {
    assert_refused_at_handshake("dave", "does not match the fingerprint pinned").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_handshake_is_reported_as_peer_unreachable() {
    let mut net = Net::new("refused-code");
    net.start(&["bob", "mallory"]).await;
    let client = net.node("mallory").client();
    for attempt in 0..20 {
        let e = rpc_error(call(&client, "bob.echo", json!({})).await, "mallory's call");
        assert_eq!(e.code, jsonrpc::PEER_UNREACHABLE, "attempt {attempt}: {e}");
        assert!(e.message.contains("bob"), "{e}");
    }
}

/// Opens TLS to a gRPC port as `server_name` with ALPN h2, sends the HTTP/2 preface and an empty
/// SETTINGS frame, and returns how many bytes the server answered with.
async fn h2_hello(
    addr: std::net::SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
    server_name: &str,
) -> std::io::Result<usize> {
    let mut config = (*config).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_string()).expect("a DNS name");
    let mut io = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await?;
    io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await?;
    io.flush().await?;
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(PROCESS_WAIT, io.read(&mut buf)).await {
        Ok(Ok(0)) => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without a word",
        )),
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no answer",
        )),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_tls_client_with_foreign_certificate_fails_handshake_on_grpc_port() {
    let mut net = Net::new("raw-grpc");
    net.start(&["bob"]).await;
    let addr = net.node("bob").config.grpc_addr;

    // Control: alice's certificate gets through and bob speaks HTTP/2.
    let alice = client_tls(&net.pki.tls("alice"));
    let n = h2_hello(addr, alice, "bob")
        .await
        .expect("alice's handshake");
    assert!(n > 0);

    let foreign = TlsSettings {
        ca_certificate: net.pki.root(),
        ..net.foreign.tls("carol")
    };
    let e = h2_hello(addr, client_tls(&foreign), "bob")
        .await
        .expect_err("a foreign certificate must not get through");
    assert!(e.to_string().contains("alert"), "{e}");
    let e = h2_hello(addr, client_tls_without_cert(&net.pki.root()), "bob")
        .await
        .expect_err("no certificate must not get through");
    assert!(e.to_string().contains("alert"), "{e}");
    net.node_mut("bob")
        .proc
        .wait_for_log("refused peer", PROCESS_WAIT)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn local_client_needs_a_certificate_when_verify_client_is_on() {
    let mut net = Net::new("verify-client");
    net.start(&["alice", "bob"]).await;
    let alice = net.node("alice");
    let addr = alice.config.jsonrpc_addr;
    let body = br#"{"jsonrpc":"2.0","method":"bob.echo","params":{"n":1},"id":1}"#;

    let reply = post_raw(addr, Some(client_tls(&alice.client_tls)), body.to_vec())
        .await
        .expect("with alice's certificate");
    assert_eq!(reply.json()["result"]["echo"]["n"], 1, "{reply:?}");

    let foreign = TlsSettings {
        ca_certificate: net.pki.root(),
        ..net.foreign.tls("carol")
    };
    for (what, tls) in [
        (
            "no certificate",
            Some(client_tls_without_cert(&net.pki.root())),
        ),
        ("a foreign certificate", Some(client_tls(&foreign))),
        ("plain HTTP", None),
    ] {
        let r = post_raw(addr, tls, body.to_vec()).await;
        assert!(r.is_err(), "{what}: expected a TLS failure, got {r:?}");
    }
    assert_eq!(net.node("bob").service.received().len(), 1);
}

/// A connection outlives directory changes: once bob's directory (re-read by itself when its
/// files change, no signal) stops accepting alice's certificate, her next call on the call
/// stream she already holds is refused and the stream ends; nothing reaches bob's service.
#[tokio::test(flavor = "multi_thread")]
async fn calls_on_an_open_stream_stop_once_the_directory_stops_accepting_the_caller() {
    let mut net = Net::new("revoked-caller");
    net.start(&["alice", "bob"]).await;
    let alice = net.node("alice").client();
    call(&alice, "bob.echo", json!({}))
        .await
        .expect("bob.echo while alice's certificate is pinned");
    assert_eq!(net.node("bob").service.received().len(), 1);

    net.unpin("alice");
    net.node_mut("bob")
        .proc
        .wait_for_log("directory reloaded", PROCESS_WAIT)
        .await;
    let e = rpc_error(
        call(&alice, "bob.echo", json!({})).await,
        "bob.echo after the pin changed",
    );
    assert!(
        e.message.contains("no longer accepts"),
        "alice's error should say why: {e}"
    );
    let bob = &mut net.node_mut("bob").proc;
    bob.wait_for_log("no longer accepts its certificate", PROCESS_WAIT)
        .await;
    assert_eq!(
        net.node("bob").service.received().len(),
        1,
        "a call from a certificate bob no longer accepts reached his service"
    );
}

/// The caller re-checks the peer it dialed, too: once alice's directory stops accepting bob's
/// certificate, her next call does not go out on the connection made before; she connects
/// anew, the pin check refuses bob, and his service sees nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_caller_stops_using_a_connection_to_a_peer_the_directory_stops_accepting() {
    let mut net = Net::new("revoked-callee");
    net.start(&["alice", "bob"]).await;
    let alice = net.node("alice").client();
    call(&alice, "bob.echo", json!({}))
        .await
        .expect("bob.echo while bob's certificate is pinned");
    let delivered = net.node("bob").service.received().len();

    net.unpin("bob");
    net.node_mut("alice")
        .proc
        .wait_for_log("directory reloaded", PROCESS_WAIT)
        .await;
    let e = rpc_error(
        call(&alice, "bob.echo", json!({})).await,
        "bob.echo after bob's pin changed",
    );
    assert_eq!(e.code, jsonrpc::PEER_UNREACHABLE, "{e}");
    net.node_mut("alice")
        .proc
        .wait_for_log("does not match the fingerprint pinned", PROCESS_WAIT)
        .await;
    assert_eq!(
        net.node("bob").service.received().len(),
        delivered,
        "a call went to a peer alice no longer accepts"
    );
}
