//! The access policy at the SNI step, with real clients from chosen loopback addresses
//! (127.0.0.0/8 is all loopback): denied ranges, a per-address rate exceeded and recovered, a
//! domain at its cap while another works, PROXY headers from trusted and untrusted sources. A
//! refused client must be closed at once, without a byte, and cost no EPS call (the private
//! proxy's `incoming` count does not move).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use eps_core::http::CallError;
use eps_core::jsonrpc;
use eps_tests::keepalive::KeepAlive;
use eps_tests::tunnel::{
    https_request_over, internal_server_env, Reply, Role, ATTEMPT_TIMEOUT, DOMAIN, PROCESS_WAIT,
    SUCCESS, TUNNEL_WAIT,
};
use eps_tests::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::fixture::{connect_from, serial, Fx};

/// A second domain under the directory's allowed suffix (the internal server's certificate is
/// for `*.internal-server.local`).
const CAPPED: &str = "capped.internal-server.local";
/// How long a connection the policy keeps must stay open for the test to call it kept.
const KEPT: Duration = Duration::from_millis(300);
/// Time a refused connection gets to be closed.
const REFUSED_WITHIN: Duration = Duration::from_secs(1);

/// `GET /jsonrpc` for `sni` through the tunnel, from loopback address `from`, after writing
/// `header` (a PROXY header, or nothing).
async fn fetch_from(fx: &Fx, from: &str, header: &[u8], sni: &str) -> std::io::Result<Reply> {
    let work = async {
        let mut tcp = connect_from(from, fx.t.public_addr).await?;
        tcp.write_all(header).await?;
        https_request_over(tcp, fx.t.client_config(), sni, "GET", "/jsonrpc", b"").await
    };
    tokio::time::timeout(ATTEMPT_TIMEOUT, work)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}

/// True when the request got the internal server's answer.
fn succeeded(r: &std::io::Result<Reply>) -> bool {
    matches!(r, Ok(r) if r.status == 200 && r.body == SUCCESS.as_bytes())
}

/// Sends `header` and a rustls ClientHello for `sni` from `from`; true when the public proxy
/// closes the connection within [`REFUSED_WITHIN`] without sending a byte.
async fn refused_at_once(fx: &Fx, from: &str, header: &[u8], sni: &str) -> bool {
    let mut s = connect_from(from, fx.t.public_addr).await.expect("connect");
    let mut first = header.to_vec();
    first.extend_from_slice(&rustls_hello(fx.t.client_config(), sni));
    // The proxy may close before reading it all: a failed write is a close too.
    let _ = s.write_all(&first).await;
    matches!(
        read_until_closed(&mut s, REFUSED_WITHIN).await,
        Some((0, _))
    )
}

/// A connection from `from` that sends nothing: is it still open after [`KEPT`]?
async fn silent_kept(fx: &Fx, from: &str) -> (TcpStream, bool) {
    let mut s = connect_from(from, fx.t.public_addr).await.expect("connect");
    let kept = read_until_closed(&mut s, KEPT).await.is_none();
    (s, kept)
}

/// `n` kept-alive connections to `sni`, each with one request answered.
async fn hold(fx: &Fx, sni: &str, n: usize) -> Vec<KeepAlive> {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut c = KeepAlive::open(fx.t.public_addr, fx.t.client_config(), sni)
            .await
            .expect("a connection within the cap");
        c.expect_success("within the cap").await;
        held.push(c);
    }
    held
}

/// `incomingConnection` calls the private proxy received: EPS calls made for clients.
async fn eps_calls(fx: &Fx) -> u64 {
    fx.metrics(Role::PrivateProxy).await.value(
        "eps_proxy_connections_accepted_total",
        "listener=\"incoming\"",
    ) as u64
}

/// A PROXY protocol v2 header from `src` to `dst` (IPv6), written by hand.
fn proxy_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V6(src), SocketAddr::V6(dst)) = (src, dst) else {
        panic!("IPv6 addresses")
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x21, 0, 36]); // v2 PROXY, TCP over IPv6, 36 bytes
    h.extend_from_slice(&src.ip().octets());
    h.extend_from_slice(&dst.ip().octets());
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread")]
async fn denied_ranges_are_closed_at_once_without_an_eps_call() {
    let _serial = serial().await;
    let mut fx = Fx::new("policy-denied");
    // The public operator denies 127.0.0.2; the announcement denies 127.0.0.3 for its domain.
    fx.configure(
        Role::PublicProxy,
        json!({"public": {"policy": {"deny": ["127.0.0.2/32"]}}}),
    );
    fx.configure(
        Role::PrivateProxy,
        json!({"private": {"announcements": [
            {"domain": DOMAIN, "policy": {"deny": ["127.0.0.3"]}}]}}),
    );
    fx.start_all().await;
    let calls = eps_calls(&fx).await;

    assert!(
        refused_at_once(&fx, "127.0.0.2", b"", DOMAIN).await,
        "a client in the operator's denied range was not closed at once"
    );
    assert!(
        refused_at_once(&fx, "127.0.0.3", b"", DOMAIN).await,
        "a client in the domain's denied range was not closed at once"
    );
    let r = fetch_from(&fx, "127.0.0.4", b"", DOMAIN).await;
    assert!(succeeded(&r), "an allowed client failed: {r:?}");

    let m = fx.metrics(Role::PublicProxy).await;
    assert_eq!(m.refused("denied"), 1);
    assert_eq!(m.refused("domain_denied"), 1);
    assert_eq!(
        eps_calls(&fx).await,
        calls + 1,
        "only the allowed client cost an EPS call"
    );
    let listed = call(&fx.t.public_rpc(), "getAnnouncements", json!({}))
        .await
        .expect("getAnnouncements");
    assert_eq!(
        listed[0]["policy"],
        json!({"deny": ["127.0.0.3/32"]}),
        "{listed}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_exceeded_is_refused_then_recovers() {
    const PER_SECOND: f64 = 1.0;
    const BURST: usize = 2;
    let _serial = serial().await;
    let mut fx = Fx::new("policy-rate");
    fx.configure(
        Role::PublicProxy,
        json!({"public": {"policy": {"per_address": {
            "new_connections_per_second": PER_SECOND, "burst": BURST}}}}),
    );
    fx.start_all().await;
    let calls = eps_calls(&fx).await;

    // The burst: kept open (waiting for a ClientHello), then one more is closed at once.
    let mut kept = Vec::new();
    for i in 0..BURST {
        let (s, open) = silent_kept(&fx, "127.0.0.5").await;
        assert!(open, "connection {i} of the burst was closed");
        kept.push(s);
    }
    assert!(
        refused_at_once(&fx, "127.0.0.5", b"", DOMAIN).await,
        "a connection over the burst was not closed at once"
    );
    let limited_at = Instant::now();
    // Another address has its own rate.
    let r = fetch_from(&fx, "127.0.0.6", b"", DOMAIN).await;
    assert!(succeeded(&r), "another address was refused too: {r:?}");
    drop(kept);

    // The refill: one connection per second. Refused tries take nothing from it.
    let recovered = wait_until(Duration::from_secs(5), || async {
        succeeded(&fetch_from(&fx, "127.0.0.5", b"", DOMAIN).await)
    })
    .await;
    assert!(recovered, "the address was still refused 5 s later");
    let after = limited_at.elapsed();
    let m = fx.metrics(Role::PublicProxy).await;
    assert!(m.refused("rate_limited") >= 1, "rate_limited not counted");
    assert_eq!(
        eps_calls(&fx).await,
        calls + 2,
        "refused connections cost no EPS call"
    );
    println!(
        "rate {PER_SECOND}/s, burst {BURST}: refused at once over the burst, served again {:.2} s \
         later ({} refusals counted meanwhile)",
        after.as_secs_f64(),
        m.refused("rate_limited")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_domain_at_its_cap_leaves_another_domain_working() {
    const CAP: usize = 2;
    const OPERATOR_CAP: u32 = 5;
    let _serial = serial().await;
    let mut fx = Fx::new("policy-domain-cap");
    fx.configure(
        Role::PublicProxy,
        json!({"public": {"policy": {"per_domain": {"max_concurrent": OPERATOR_CAP}}}}),
    );
    fx.configure(
        Role::PrivateProxy,
        json!({"private": {"announcements": [
            {"domain": DOMAIN},
            {"domain": CAPPED, "policy": {"max_concurrent": CAP}}]}}),
    );
    fx.start_all().await;
    assert!(
        wait_until(TUNNEL_WAIT, || fx.t.works_for(CAPPED)).await,
        "{CAPPED} not routed"
    );

    // Held at the cap, refused at once over it; the other domain is unaffected.
    let held = hold(&fx, CAPPED, CAP).await;
    assert!(
        refused_at_once(&fx, "127.0.0.1", b"", CAPPED).await,
        "a connection over {CAPPED}'s cap was not closed at once"
    );
    assert!(
        fx.t.works().await,
        "{DOMAIN} failed while {CAPPED} was full"
    );
    assert_eq!(fx.refused("domain_busy").await, 1);

    // A connection closed gives its place back.
    drop(held);
    assert!(
        wait_until(Duration::from_secs(5), || fx.t.works_for(CAPPED)).await,
        "{CAPPED} still refused after its connections closed"
    );

    // An announcement may not ask for more than the public operator allows; the error names
    // the bound.
    let e = call(
        &fx.t.private_rpc(),
        "announceConnection",
        json!({"domain": "big.internal-server.local", "policy": {"max_concurrent": OPERATOR_CAP + 1}}),
    )
    .await
    .expect_err("a cap above the public operator's");
    match e {
        CallError::Rpc(e) => {
            assert_eq!(e.code, jsonrpc::FORBIDDEN, "{e:?}");
            assert!(
                e.message
                    .contains("public.policy.per_domain.max_concurrent"),
                "{e:?}"
            );
        }
        other => panic!("{other:?}"),
    }

    // The rules survive a restart of the public proxy (read from its store, not re-announced).
    fx.proc_mut(Role::PublicProxy).restart();
    fx.proc_mut(Role::PublicProxy)
        .wait_for_log(Role::PublicProxy.ready_line(), PROCESS_WAIT)
        .await;
    assert!(
        wait_until(TUNNEL_WAIT, || fx.t.works_for(CAPPED)).await,
        "{CAPPED} not routed after the restart"
    );
    let held = hold(&fx, CAPPED, CAP).await;
    assert!(
        refused_at_once(&fx, "127.0.0.1", b"", CAPPED).await,
        "after a restart, {CAPPED}'s cap was not enforced"
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_headers_only_from_trusted_sources() {
    const BALANCER: &str = "127.0.0.7";
    let _serial = serial().await;
    let mut fx = Fx::new("policy-proxy-protocol");
    fx.configure(
        Role::PublicProxy,
        json!({"public": {
            "proxy_protocol": {"trusted": [format!("{BALANCER}/32")]},
            "policy": {"deny": ["198.51.100.66"]}}}),
    );
    // The private side passes the client's address on to an internal server that logs it.
    fx.configure(
        Role::PrivateProxy,
        json!({"private": {"proxy_protocol": true}}),
    );
    let mut env = internal_server_env(&fx.t.pki, fx.t.internal_addr).to_vec();
    env.push(("IS_PROXY_PROTOCOL", "1".into()));
    let mut internal = Proc::start(
        "internal-server",
        &bin_path("internal-server"),
        std::iter::empty::<&str>(),
        env,
        fx.t.dir.join("internal-server.log"),
    );
    internal
        .wait_for_log(Role::InternalServer.ready_line(), PROCESS_WAIT)
        .await;
    fx.start(&[
        Role::PublicEps,
        Role::PrivateEps,
        Role::PublicProxy,
        Role::PrivateProxy,
    ])
    .await;
    // A direct client (not from the balancer) is served as before.
    assert!(
        fx.t.wait_tunnel(TUNNEL_WAIT).await.is_some(),
        "no request went through"
    );

    let logged = |client: String| {
        let internal = &internal;
        async move {
            wait_until(Duration::from_secs(5), || async {
                internal.log().lines().any(|l| {
                    l.contains("client address from the PROXY header") && l.contains(&client)
                })
            })
            .await
        }
    };
    // From the balancer, v1 and v2: the internal server sees the client the header names.
    let v1 = b"PROXY TCP4 198.51.100.7 203.0.113.1 40000 443\r\n";
    let r = fetch_from(&fx, BALANCER, v1, DOMAIN).await;
    assert!(succeeded(&r), "PROXY v1 from the balancer: {r:?}");
    assert!(
        logged("client=198.51.100.7:40000".into()).await,
        "{}",
        internal.log()
    );
    let src: SocketAddr = "[2001:db8::7]:40001".parse().unwrap();
    let dst: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
    let r = fetch_from(&fx, BALANCER, &proxy_v2(src, dst), DOMAIN).await;
    assert!(succeeded(&r), "PROXY v2 from the balancer: {r:?}");
    assert!(logged(format!("client={src}")).await, "{}", internal.log());

    let calls = eps_calls(&fx).await;
    // The header's address is the client's for the policy too.
    let denied = b"PROXY TCP4 198.51.100.66 203.0.113.1 40002 443\r\n";
    assert!(
        refused_at_once(&fx, BALANCER, denied, DOMAIN).await,
        "a denied client behind the balancer was served"
    );
    // From the balancer, the header is required.
    assert!(
        refused_at_once(&fx, BALANCER, b"", DOMAIN).await,
        "a connection from the balancer without a header was served"
    );
    // From anyone else, a header is refused.
    assert!(
        refused_at_once(&fx, "127.0.0.1", v1, DOMAIN).await,
        "a PROXY header from an untrusted source was taken"
    );
    assert_eq!(eps_calls(&fx).await, calls, "a refusal cost an EPS call");
    let m = fx.metrics(Role::PublicProxy).await;
    assert_eq!(m.refused("denied"), 1);
    assert_eq!(m.refused("bad_proxy_header"), 1);
    assert_eq!(m.refused("untrusted_proxy_header"), 1);
}
