//! A backend per announced domain (docs/architecture.md §3.5), end to end: one private proxy
//! sends one domain's clients to the TLS internal server (passthrough) and another's to a plain
//! HTTP server behind TLS that the private proxy ends itself; runtime backends are stored and
//! survive a restart; SIGHUP moves a domain to another backend while a relay of the old one
//! goes on.
//!
//! Build the binaries first: `cargo build --workspace && cargo test -p eps-tests --test backends`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use eps_core::http::CallError;
use eps_core::jsonrpc;
use eps_tests::keepalive::KeepAlive;
use eps_tests::pebble::served_leaf;
use eps_tests::tunnel::{https_request, Role, Tunnel, DOMAIN, PROCESS_WAIT, SUCCESS};
use eps_tests::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The domain whose TLS ends at the private proxy.
const APP: &str = "app.internal-server.local";
/// Its certificate, issued for it alone (`pki/app.crt`).
const APP_CERT: &str = "app";
/// The private proxy's `tls_handshake_timeout` in these tests.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
/// Time for a metric or log line to show what just happened.
const SETTLE: Duration = Duration::from_secs(5);
/// Deadline of one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The `tls` of a domain that ends TLS at the private proxy with `cert`'s files.
fn terminate(t: &Tunnel, cert: &str) -> Value {
    json!({"mode": "terminate", "certificate": t.pki.cert(cert), "key": t.pki.key(cert),
           "alpn": ["h2", "http/1.1"]})
}

/// A tunnel whose private proxy serves its metrics and announces [`DOMAIN`] (passthrough to
/// the TLS internal server) and [`APP`] (TLS ended at the private proxy, then plain HTTP with a
/// PROXY header to a plain `internal-server`). The plain server and the metrics address too.
async fn two_backends(test: &str) -> (Tunnel, Proc, SocketAddr) {
    let mut t = Tunnel::new(test);
    t.pki.issue_server(APP_CERT, &[APP]);
    let (plain, plain_addr) = t.start_plain_server("plain-server", true).await;
    let metrics = free_addr();
    let tls = terminate(&t, APP_CERT);
    t.dir.write_yaml(
        "private-proxy/zz-test.yml",
        &json!({
            "metrics": {"bind_address": metrics},
            "private": {
                "tls_handshake_timeout": HANDSHAKE_TIMEOUT.as_secs_f64(),
                "announcements": [
                    {"domain": DOMAIN},
                    {"domain": APP, "internal_endpoint": plain_addr.to_string(),
                     "proxy_protocol": true, "tls": tls},
                ],
            },
        }),
    );
    t.start_all().await;
    (t, plain, metrics)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_domains_two_backends_through_one_private_proxy() {
    let (t, plain, _) = two_backends("two-backends").await;

    // curl: the passthrough domain gets the TLS internal server, the terminated one the plain
    // server (which speaks no TLS: only the private proxy can have ended it).
    let r = curl_get(&t.root(), t.public_addr, DOMAIN, "/jsonrpc", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (200, SUCCESS), "{DOMAIN}");
    let r = curl_get(&t.root(), t.public_addr, APP, "/jsonrpc", &["--http1.1"]).await;
    assert_eq!((r.status, r.body.as_str()), (200, SUCCESS), "{APP}");
    assert_eq!(r.http_version, "1.1");

    // HTTP/2 by ALPN: negotiated with the private proxy, spoken to the plain server as is.
    let r = curl_get(&t.root(), t.public_addr, APP, "/jsonrpc", &["--http2"]).await;
    assert_eq!((r.status, r.body.as_str()), (200, SUCCESS), "{APP} over h2");
    assert_eq!(r.http_version, "2", "curl --http2 did not get HTTP/2");
    assert!(
        plain.log().contains("version=HTTP/2.0"),
        "the plain server saw no HTTP/2 request:\n{}",
        plain.log()
    );
    // The PROXY header came first, naming the client (loopback).
    let log = plain.log();
    let named = log
        .lines()
        .filter(|l| l.contains("client address from the PROXY header"))
        .all(|l| l.contains(" client=127.0.0.1:"));
    assert!(named && log.contains("PROXY header"), "{log}");
    assert!(
        !t.proc(Role::InternalServer).log().contains("PROXY header"),
        "the passthrough domain's server got a PROXY header it was not configured for"
    );

    // A rustls client: 1 MiB to /echo and back through the terminated domain.
    let mut body = vec![0u8; 1024 * 1024];
    getrandom::fill(&mut body).expect("OS random bytes");
    let reply = https_request(
        t.public_addr,
        t.client_config(),
        APP,
        "POST",
        "/echo",
        &body,
        REQUEST_TIMEOUT,
    )
    .await
    .expect("POST /echo to the terminated domain");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.body == body, "the echoed body differs");
    assert!(t.works_for(DOMAIN).await && t.works_for(APP).await);
}

/// Clients that fail the private proxy's handshake are closed and counted by reason; a
/// ClientHello offering ALPN `acme-tls/1` is routed by the public proxy like any other (it
/// reaches the private proxy, which refuses it: no order of its own waits for validation).
#[tokio::test(flavor = "multi_thread")]
async fn terminated_handshake_failures_are_counted() {
    let (t, _plain, metrics) = two_backends("terminate-failures").await;
    let counted = |reason: &'static str| async move {
        let text = get_to_end(metrics, "/metrics").await.expect("GET /metrics");
        refused(&text, reason)
    };

    // A client that does not trust the certificate.
    let stranger = Pki::new(t.dir.join("stranger-pki"), &[], None);
    let r = https_request(
        t.public_addr,
        client_tls_without_cert(&stranger.root()),
        APP,
        "GET",
        "/",
        b"",
        REQUEST_TIMEOUT,
    )
    .await;
    assert!(
        r.is_err(),
        "a client that does not trust the certificate: {r:?}"
    );
    assert!(
        wait_until(SETTLE, || async {
            counted("tls_handshake_failed").await == 1
        })
        .await,
        "tls_handshake_failed not counted"
    );

    // A ClientHello, then silence: closed at the handshake deadline.
    let mut s = TcpStream::connect(t.public_addr).await.expect("connect");
    s.write_all(&rustls_hello(t.client_config(), APP))
        .await
        .expect("send");
    let (_, after) = read_until_closed(&mut s, HANDSHAKE_TIMEOUT + SETTLE)
        .await
        .expect("a client silent after its ClientHello was not closed");
    assert!(
        after + Duration::from_millis(100) >= HANDSHAKE_TIMEOUT,
        "{after:?}"
    );
    assert!(
        wait_until(SETTLE, || async {
            counted("tls_handshake_timeout").await == 1
        })
        .await,
        "tls_handshake_timeout not counted"
    );

    // ALPN acme-tls/1: through the public proxy to the private one.
    let mut acme = (*t.client_config()).clone();
    acme.alpn_protocols = vec![b"acme-tls/1".to_vec()];
    let r = https_request(
        t.public_addr,
        Arc::new(acme),
        APP,
        "GET",
        "/",
        b"",
        REQUEST_TIMEOUT,
    )
    .await;
    assert!(r.is_err(), "{r:?}");
    assert!(
        wait_until(SETTLE, || async {
            counted("acme_challenge_unexpected").await == 1
        })
        .await,
        "an acme-tls/1 ClientHello did not reach the private proxy"
    );
    assert!(t.works_for(APP).await, "{APP} after the failed clients");
}

/// A terminated domain's certificate files are followed: replaced on disk, the new
/// certificate is served to new clients without a restart, and a kept-alive client goes on.
#[tokio::test(flavor = "multi_thread")]
async fn terminated_certificate_files_rotate_without_restart() {
    let (t, _plain, _) = two_backends("terminate-rotation").await;
    let mut kept = KeepAlive::open(t.public_addr, t.client_config(), APP)
        .await
        .expect("a kept-alive connection to the terminated domain");
    kept.expect_success("before the rotation").await;
    let root = t.root();
    let leaf = || served_leaf(t.public_addr, &root, APP);
    let first = leaf().await.expect("the first certificate");

    for path in [t.pki.cert(APP_CERT), t.pki.key(APP_CERT)] {
        std::fs::remove_file(&path).expect("removing the old certificate and key");
    }
    t.pki.issue_server(APP_CERT, &[APP]);
    assert!(
        wait_until(SETTLE, || async { leaf().await.is_ok_and(|l| l != first) }).await,
        "the new certificate is not served"
    );
    kept.expect_success("after the rotation").await;
    assert!(t.works_for(APP).await);
}

/// A backend added with `announceConnection` is used at once, kept in the store and used again
/// after a restart; one whose certificate files do not load is refused and not stored.
#[tokio::test(flavor = "multi_thread")]
async fn runtime_backends_are_stored() {
    let mut t = Tunnel::new("runtime-backends");
    t.pki.issue_server(APP_CERT, &[APP]);
    let (_plain, plain_addr) = t.start_plain_server("plain-server", false).await;
    t.start_all().await;
    let private = t.private_rpc();

    let r = call(
        &private,
        "announceConnection",
        json!({"domain": APP, "internal_endpoint": plain_addr.to_string(),
               "tls": terminate(&t, APP_CERT)}),
    )
    .await
    .expect("announcing a terminated domain at runtime");
    assert_eq!(r["domain"], APP, "{r}");
    assert!(t.works_for(APP).await, "{APP} is not served");

    let missing = json!({"mode": "terminate", "certificate": t.dir.join("nope.crt"),
                         "key": t.dir.join("nope.key")});
    match call(
        &private,
        "announceConnection",
        json!({"domain": "broken.internal-server.local", "tls": missing}),
    )
    .await
    {
        Err(CallError::Rpc(e)) => assert_eq!(e.code, jsonrpc::INVALID_PARAMS, "{e}"),
        other => panic!("a backend with missing certificate files: {other:?}"),
    }
    let stored = std::fs::read_to_string(t.dir.join("data/private-proxy-1/announcements.json"))
        .expect("the private store");
    assert!(stored.contains(&plain_addr.to_string()), "{stored}");
    assert!(!stored.contains("broken"), "{stored}");

    t.restart(Role::PrivateProxy);
    assert!(
        wait_until(Duration::from_secs(15), || t.works_for(APP)).await,
        "{APP} is not served after a restart"
    );
    assert!(t.works().await);
}

/// SIGHUP moves a domain to another backend: new clients go there, a relay to the old one in
/// progress goes on.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_moves_a_domain_and_keeps_its_relays() {
    let mut t = Tunnel::new("sighup-backends");
    let (plain, plain_addr) = t.start_plain_server("plain-server", false).await;
    t.start_all().await;
    let mut kept = KeepAlive::open(t.public_addr, t.client_config(), DOMAIN)
        .await
        .expect("a kept-alive connection through the tunnel");
    kept.expect_success("before SIGHUP").await;

    // The same domain, now with TLS ended at the private proxy (the internal server's wildcard
    // certificate) and plain HTTP to the plain server.
    let tls = terminate(&t, "internal-server");
    t.dir.write_yaml(
        "private-proxy/zz-test.yml",
        &json!({"private": {"announcements": [
            {"domain": DOMAIN, "internal_endpoint": plain_addr.to_string(), "tls": tls}]}}),
    );
    t.proc_mut(Role::PrivateProxy).hangup();
    t.proc_mut(Role::PrivateProxy)
        .wait_for_log("settings reloaded", PROCESS_WAIT)
        .await;
    let requests = || plain.log().matches(" request").count();
    let before = requests();
    assert!(t.works().await, "{DOMAIN} after SIGHUP");
    assert!(
        requests() > before,
        "after SIGHUP a new client did not reach the new backend"
    );
    // The relay made before the change still reaches the TLS internal server.
    for i in 0..3 {
        kept.expect_success(&format!("after SIGHUP, #{i}")).await;
    }
}

/// `eps_proxy_connections_refused_total{reason}` in a scrape (0 when absent).
fn refused(metrics: &str, reason: &str) -> u64 {
    let series = format!("eps_proxy_connections_refused_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}
