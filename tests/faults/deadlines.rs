//! Clients that take their time: silent and trickling ones are closed at the ClientHello
//! deadline; clients whose private side never dials back wait in a bounded pending set and are
//! closed at `accept_timeout`.

use std::time::{Duration, Instant};

use eps_tests::tunnel::{Role, Tunnel, DOMAIN};
use eps_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::fixture::{min_max, rss_kib, serial, Fx};

/// What a close may take beyond its deadline on a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(1);
/// Timer and clock granularity: a deadline may fire this much before the client's own count.
const EARLY: Duration = Duration::from_millis(50);

/// Sends `hello` one byte a second (nothing at all when `silent`) until the peer closes; how
/// long after the connection was established that was.
async fn trickle(addr: std::net::SocketAddr, hello: Vec<u8>, silent: bool) -> Duration {
    // Bounded, so that a client the proxy never closes fails the test instead of hanging it.
    tokio::time::timeout(
        Duration::from_secs(60),
        trickle_until_closed(addr, hello, silent),
    )
    .await
    .expect("the public proxy did not close a slow client within 60 s")
}

async fn trickle_until_closed(
    addr: std::net::SocketAddr,
    hello: Vec<u8>,
    silent: bool,
) -> Duration {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let start = Instant::now();
    let mut next = 0;
    let mut buf = [0u8; 64];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => panic!("the public proxy answered a partial ClientHello"),
            },
            _ = tick.tick(), if !silent && next < hello.len() => {
                if s.write_all(&hello[next..next + 1]).await.is_err() {
                    return start.elapsed();
                }
                next += 1;
            }
        }
    }
}

/// Latencies of `n` requests through the tunnel, one after the other.
async fn latencies(t: &Tunnel, n: usize) -> Vec<Duration> {
    let mut out = Vec::new();
    for i in 0..n {
        let start = Instant::now();
        assert!(t.works().await, "request {i} through the tunnel failed");
        out.push(start.elapsed());
    }
    out
}

fn ms(d: &[Duration]) -> String {
    let (min, max) = min_max(d);
    let mean = d.iter().map(Duration::as_secs_f64).sum::<f64>() / d.len() as f64;
    format!(
        "mean {:.1} ms (min {:.1}, max {:.1})",
        mean * 1e3,
        min * 1e3,
        max * 1e3
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_and_trickling_clients_are_closed_at_the_deadline() {
    const TRICKLERS: usize = 300;
    const DEADLINE: Duration = Duration::from_secs(2);
    let _serial = serial().await;
    let mut fx = Fx::new("trickle");
    fx.configure(
        Role::PublicProxy,
        json!({"public": {"limits": {"client_hello_timeout": DEADLINE.as_secs_f64()}}}),
    );
    fx.start_all().await;
    let alone = latencies(&fx.t, 10).await;
    let before = fx.refused("client_hello_timeout").await;

    let hello = rustls_hello(fx.t.client_config(), DOMAIN);
    let addr = fx.t.public_addr;
    let silent = tokio::spawn(trickle(addr, hello.clone(), true));
    let tricklers: Vec<_> = (0..TRICKLERS)
        .map(|_| tokio::spawn(trickle(addr, hello.clone(), false)))
        .collect();
    // Meanwhile a normal client is served.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let loaded = latencies(&fx.t, 10).await;

    let silent = silent.await.expect("the silent client");
    let mut closes = Vec::new();
    for t in tricklers {
        closes.push(t.await.expect("a trickling client"));
    }
    let (min, max) = min_max(&closes);
    println!(
        "client_hello_timeout {DEADLINE:?}: the silent client was closed after {:.3} s, {TRICKLERS} \
         clients sending one byte a second after {min:.3} .. {max:.3} s",
        silent.as_secs_f64()
    );
    println!(
        "a normal request: {} alone, {} next to the {} slow clients",
        ms(&alone),
        ms(&loaded),
        TRICKLERS + 1
    );
    for (what, d) in closes
        .iter()
        .map(|d| ("a trickling client", *d))
        .chain([("the silent client", silent)])
    {
        assert!(
            d + EARLY >= DEADLINE && d <= DEADLINE + SLACK,
            "{what} was closed after {d:?}, not at the {DEADLINE:?} deadline"
        );
    }
    let counted = fx.refused("client_hello_timeout").await - before;
    assert_eq!(counted, TRICKLERS as u64 + 1, "refusals counted");
}

#[tokio::test(flavor = "multi_thread")]
async fn pending_set_is_bounded_and_waiting_clients_time_out() {
    const MAX_PENDING: usize = 50;
    const CLIENTS: usize = 60;
    const BURST: usize = 1_000;
    const ACCEPT_TIMEOUT: Duration = Duration::from_secs(2);
    let _serial = serial().await;
    let mut fx = Fx::new("pending");
    // A private side that never dials back: the private EPS server delivers incomingConnection
    // to a service that answers and does nothing.
    let service = TestService::start(
        "never-dials",
        Some(&fx.t.pki.tls_verifying(eps_tests::tunnel::PRIVATE)),
    )
    .await;
    fx.configure(
        Role::PrivateEps,
        json!({"jsonrpc_client": {"url": service.url()}}),
    );
    fx.configure(
        Role::PublicProxy,
        json!({"public": {"limits": {"max_pending": MAX_PENDING,
                                     "accept_timeout": ACCEPT_TIMEOUT.as_secs_f64()}}}),
    );
    fx.start_announced().await;
    let pid = fx.pid(Role::PublicProxy);
    let rss_before = rss_kib(pid);

    let hello = rustls_hello(fx.t.client_config(), DOMAIN);
    let wave = |n: usize| {
        let (addr, hello) = (fx.t.public_addr, hello.clone());
        (0..n)
            .map(|_| {
                let hello = hello.clone();
                tokio::spawn(async move {
                    let mut s = TcpStream::connect(addr).await.expect("connect");
                    s.write_all(&hello).await.expect("send");
                    let closed = read_until_closed(&mut s, ACCEPT_TIMEOUT * 3).await;
                    let (bytes, after) = closed.expect("a waiting client was never closed");
                    assert_eq!(bytes, 0);
                    after
                })
            })
            .collect::<Vec<_>>()
    };
    let mut closes = Vec::new();
    for task in wave(CLIENTS) {
        closes.push(task.await.expect("a client"));
    }
    let (refused, waited): (Vec<Duration>, Vec<Duration>) =
        closes.iter().partition(|d| **d < SLACK);
    let (wmin, wmax) = min_max(&waited);
    let (rmin, rmax) = min_max(&refused);
    println!(
        "{CLIENTS} clients, max_pending {MAX_PENDING}: {} refused after {:.1} .. {:.1} ms, {} \
         waited and were closed after {wmin:.3} .. {wmax:.3} s (accept_timeout {ACCEPT_TIMEOUT:?})",
        refused.len(),
        rmin * 1e3,
        rmax * 1e3,
        waited.len()
    );
    assert_eq!(refused.len(), CLIENTS - MAX_PENDING, "{closes:?}");
    assert_eq!(waited.len(), MAX_PENDING);
    assert!(
        wmin + EARLY.as_secs_f64() >= ACCEPT_TIMEOUT.as_secs_f64()
            && wmax <= (ACCEPT_TIMEOUT + SLACK).as_secs_f64(),
        "waiting clients closed after {wmin:.3} .. {wmax:.3} s"
    );
    let m = fx.metrics(Role::PublicProxy).await;
    assert_eq!(m.refused("pending_full"), (CLIENTS - MAX_PENDING) as u64);
    assert_eq!(m.refused("no_dial_back"), MAX_PENDING as u64);
    assert_eq!(m.value("eps_proxy_pending_tokens", ""), 0.0);
    let asked = service
        .received()
        .iter()
        .filter(|r| r.method == "incomingConnection")
        .count();
    assert_eq!(asked, MAX_PENDING, "incomingConnection calls");

    // A burst of 1,000: still at most 50 wait, memory stays flat.
    let tasks = wave(BURST);
    tokio::time::sleep(ACCEPT_TIMEOUT / 2).await;
    let pending = fx
        .metrics(Role::PublicProxy)
        .await
        .value("eps_proxy_pending_tokens", "");
    let rss_during = rss_kib(pid);
    let mut fast = 0;
    for task in tasks {
        if task.await.expect("a client") < SLACK {
            fast += 1;
        }
    }
    println!(
        "a burst of {BURST} clients: {pending} pending at once, {fast} refused at once; public \
         proxy RSS {rss_before} KiB before the clients, {rss_during} KiB during the burst (+{} KiB)",
        rss_during.saturating_sub(rss_before)
    );
    assert!(pending <= MAX_PENDING as f64);
    assert_eq!(fast, BURST - MAX_PENDING);
    assert!(
        rss_during < rss_before + 16 * 1024,
        "public proxy RSS grew from {rss_before} to {rss_during} KiB"
    );
}
