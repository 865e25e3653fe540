//! Relays under faults: a client that stops reading, a half-closed client, an internal server
//! killed mid-stream, an idle relay; the proxies' memory and file descriptors afterwards.

use std::time::{Duration, Instant};

use eps_tests::tunnel::{read_reply, Role, DOMAIN};
use eps_tests::*;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::fixture::{fd_count, rss_kib, serial, Fx};

/// Deadline of the downloads here.
const DOWNLOAD_WAIT: Duration = Duration::from_secs(30);
/// File descriptors a proxy may hold beyond its count before the faults (keep-alive
/// connections to its EPS server come and go).
const FD_SLACK: usize = 3;
/// RSS growth allowed to a proxy relaying to a client that does not read.
const STALL_RSS_KIB: u64 = 16 * 1024;

/// A TLS connection through the tunnel, handshake done.
async fn tls_through(fx: &Fx) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(fx.t.public_addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let name = ServerName::try_from(DOMAIN.to_string()).expect("a DNS name");
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(fx.t.client_config()).connect(name, tcp),
    )
    .await
    .expect("TLS handshake in time")
    .expect("TLS through the tunnel")
}

fn get(path: &str, close: bool) -> Vec<u8> {
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!("GET {path} HTTP/1.1\r\nHost: {DOMAIN}\r\n{connection}\r\n").into_bytes()
}

/// Open file descriptors of both proxies.
fn proxy_fds(fx: &Fx) -> [usize; 2] {
    [Role::PublicProxy, Role::PrivateProxy].map(|r| fd_count(fx.pid(r)))
}

/// Waits until both proxies hold at most `FD_SLACK` descriptors more than `before`; their
/// counts then.
async fn assert_fds_settle(fx: &Fx, before: [usize; 2]) -> [usize; 2] {
    let settled = wait_until(Duration::from_secs(10), || async {
        proxy_fds(fx)
            .iter()
            .zip(before)
            .all(|(now, was)| *now <= was + FD_SLACK)
    })
    .await;
    let after = proxy_fds(fx);
    assert!(
        settled,
        "file descriptors of the public and private proxy: {before:?} before, {after:?} after"
    );
    after
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_half_closed_and_broken_relays() {
    let _serial = serial().await;
    let mut fx = Fx::new("relays");
    fx.start_all().await;
    for _ in 0..3 {
        assert!(fx.t.works().await);
    }
    let fds_before = proxy_fds(&fx);
    let pids = [fx.pid(Role::PublicProxy), fx.pid(Role::PrivateProxy)];
    let rss_before = pids.map(rss_kib);

    // (a) The server sends 100 MiB; the client reads a few KB and stops reading.
    let mut stalled = tls_through(&fx).await;
    stalled
        .write_all(&get("/bytes/104857600", true))
        .await
        .expect("request");
    let mut got = 0;
    let mut chunk = [0u8; 4096];
    while got < 8 * 1024 {
        let n = stalled.read(&mut chunk).await.expect("the first bytes");
        assert!(n > 0, "closed early");
        got += n;
    }
    let mut peak = rss_before;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        for (p, pid) in peak.iter_mut().zip(pids) {
            *p = (*p).max(rss_kib(pid));
        }
    }
    let growth = [0, 1].map(|i| peak[i].saturating_sub(rss_before[i]));
    println!(
        "(a) 100 MiB to a client that stopped reading after {got} bytes: RSS over 3 s, public \
         proxy {} -> {} KiB (+{} KiB), private proxy {} -> {} KiB (+{} KiB)",
        rss_before[0], peak[0], growth[0], rss_before[1], peak[1], growth[1]
    );
    for (g, who) in growth.iter().zip(["public", "private"]) {
        assert!(
            *g < STALL_RSS_KIB,
            "the {who} proxy grew {g} KiB relaying to a stalled client"
        );
    }
    drop(stalled);

    // (c) The client half-closes right after its request and still gets all 10 MiB.
    const TEN_MIB: usize = 10 * 1024 * 1024;
    let start = Instant::now();
    let mut half = tls_through(&fx).await;
    half.write_all(&get(&format!("/bytes/{TEN_MIB}"), true))
        .await
        .expect("request");
    // shutdown(Write) on the socket: a FIN the relays must pass on as a half-close. (Not TLS's
    // close_notify first: the demo server closes right after a `Connection: close` response
    // with that alert unread, and the kernel then resets the connection instead of closing it,
    // which loses the response's tail whether or not a tunnel is in between.)
    half.flush().await.expect("flush");
    half.get_mut().0.shutdown().await.expect("shutdown(Write)");
    let reply = tokio::time::timeout(DOWNLOAD_WAIT, read_reply(&mut half))
        .await
        .expect("the response in time")
        .expect("the whole response after a half-close");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), TEN_MIB);
    println!(
        "(c) a client that half-closed after its request got all {} bytes in {:.2} s",
        reply.body.len(),
        start.elapsed().as_secs_f64()
    );

    // (d) The internal server is killed (SIGKILL) mid-download.
    let mut download = tls_through(&fx).await;
    download
        .write_all(&get("/bytes/10737418240", true))
        .await
        .expect("request");
    let mut got = 0usize;
    let mut chunk = vec![0u8; 64 * 1024];
    while got < 20 * 1024 * 1024 {
        let n = download.read(&mut chunk).await.expect("downloading");
        assert!(n > 0, "closed early");
        got += n;
    }
    fx.proc_mut(Role::InternalServer).kill();
    let killed = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match download.read(&mut chunk).await {
                Ok(0) => return "end of stream".to_string(),
                Err(e) => return format!("error: {e}"),
                Ok(n) => got += n,
            }
        }
    })
    .await
    .expect("the client did not notice the dead server within 2 s");
    println!(
        "(d) internal server killed after {} MiB: the client saw {ended} {:.1} ms later",
        got >> 20,
        killed.elapsed().as_secs_f64() * 1e3
    );
    drop(download);
    fx.t.restart(Role::InternalServer);
    assert!(
        fx.t.wait_tunnel(Duration::from_secs(15)).await.is_some(),
        "the tunnel after the internal server's restart"
    );

    // (e) No descriptor leaked.
    let fds_after = assert_fds_settle(&fx, fds_before).await;
    println!(
        "(e) open fds (public, private proxy): {fds_before:?} before (a)..(d), {fds_after:?} after"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_relay_is_closed_at_the_idle_timeout() {
    const IDLE: Duration = Duration::from_secs(2);
    let _serial = serial().await;
    let mut fx = Fx::new("idle-relay");
    let idle = IDLE.as_secs_f64();
    fx.configure(
        Role::PublicProxy,
        json!({"public": {"limits": {"idle_timeout": idle}}}),
    );
    fx.configure(
        Role::PrivateProxy,
        json!({"private": {"idle_timeout": idle}}),
    );
    fx.start_all().await;
    let fds_before = proxy_fds(&fx);

    // A keep-alive request, then silence (the internal server would keep it 10 s).
    let mut tls = tls_through(&fx).await;
    tls.write_all(&get("/jsonrpc", false))
        .await
        .expect("request");
    let reply = read_reply(&mut tls).await.expect("the response");
    assert_eq!(reply.status, 200);
    let last_byte = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(IDLE * 3, async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return last_byte.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the idle relay was not closed");
    let idle_ended =
        |m: crate::fixture::Metrics| m.value("eps_proxy_relays_ended_total", "outcome=\"idle\"");
    let counts = std::cell::Cell::new((0.0, 0.0));
    wait_until(Duration::from_secs(5), || async {
        counts.set((
            idle_ended(fx.metrics(Role::PublicProxy).await),
            idle_ended(fx.metrics(Role::PrivateProxy).await),
        ));
        counts.get().0 + counts.get().1 >= 1.0
    })
    .await;
    let (public, private) = counts.get();
    println!(
        "(b) a relay idle since its last byte was closed after {:.3} s (idle_timeout {IDLE:?}); \
         relays ended idle: public proxy {public}, private proxy {private}",
        closed.as_secs_f64()
    );
    assert!(
        closed + Duration::from_millis(50) >= IDLE && closed <= IDLE + Duration::from_secs(1),
        "closed after {closed:?}"
    );
    assert!(public + private >= 1.0, "no relay ended as idle");
    let fds_after = assert_fds_settle(&fx, fds_before).await;
    println!("(b) open fds (public, private proxy): {fds_before:?} before, {fds_after:?} after");
}
