//! Thousands of idle connections against the public port's connection limit.

use std::time::{Duration, Instant};

use eps_tests::tunnel::Role;
use eps_tests::*;
use tokio::net::TcpStream;

use crate::fixture::{fd_count, min_max, rss_kib, serial, Fx};

/// Raises this process's soft limit of open files to the hard limit; the new soft limit.
fn raise_open_files_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        assert_eq!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim),
            0,
            "getrlimit"
        );
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0, "setrlimit");
    }
    lim.rlim_cur
}

/// True when the peer has closed `s` (end of stream or reset); false while it is open and
/// silent.
fn closed_by_peer(s: &TcpStream) -> bool {
    let mut buf = [0u8; 1];
    match s.try_read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_idle_connections_against_the_limit() {
    const OPEN: usize = 10_000;
    const LIMIT: usize = 8_000;
    const FREED: usize = 100;
    // Idle clients must outlive the test: no ClientHello deadline within it.
    const HELLO_TIMEOUT_S: u64 = 300;
    let _serial = serial().await;
    let nofile = raise_open_files_limit();
    assert!(
        nofile >= OPEN as u64 + 2_000,
        "the open files limit {nofile} cannot hold {OPEN} connections"
    );
    let mut fx = Fx::new("idle-10k");
    fx.configure(
        Role::PublicProxy,
        json!({"public": {"limits": {"max_connections": LIMIT,
                                     "client_hello_timeout": HELLO_TIMEOUT_S}}}),
    );
    fx.start_all().await;
    let pid = fx.pid(Role::PublicProxy);
    let (rss_before, fds_before) = (rss_kib(pid), fd_count(pid));
    let accepted_before = fx.metrics(Role::PublicProxy).await.value(
        "eps_proxy_connections_accepted_total",
        "listener=\"public\"",
    ) as usize;

    // Up to the limit: accepted, and held open by the public proxy.
    let start = Instant::now();
    let mut conns = Vec::with_capacity(LIMIT);
    for i in 0..LIMIT {
        let s = TcpStream::connect(fx.t.public_addr)
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        conns.push(s);
    }
    let opened = start.elapsed();
    // Every one of them has its task in the public proxy (it counts a connection there).
    let accepted = |m: crate::fixture::Metrics| {
        m.value(
            "eps_proxy_connections_accepted_total",
            "listener=\"public\"",
        ) as usize
    };
    let all_held = wait_until(Duration::from_secs(20), || async {
        accepted(fx.metrics(Role::PublicProxy).await) >= accepted_before + LIMIT
    })
    .await;
    assert!(
        all_held,
        "the public proxy did not take all {LIMIT} connections"
    );
    let fds_full = fd_count(pid);
    let rss_full = rss_kib(pid);
    let per_conn = (rss_full.saturating_sub(rss_before)) as f64 / LIMIT as f64;

    // The excess: each accepted and closed at once, without a byte.
    let mut refusals = Vec::with_capacity(OPEN - LIMIT);
    for i in LIMIT..OPEN {
        let mut s = TcpStream::connect(fx.t.public_addr)
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        let (bytes, after) = read_until_closed(&mut s, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("connection {i}, over the limit, was not closed"));
        assert_eq!(bytes, 0);
        refusals.push(after);
    }
    let (min, max) = min_max(&refusals);
    assert!(
        conns.iter().all(|s| !closed_by_peer(s)),
        "the public proxy closed a connection within the limit"
    );
    let m = fx.metrics(Role::PublicProxy).await;
    assert_eq!(m.refused("connection_limit"), (OPEN - LIMIT) as u64);
    println!(
        "{LIMIT} idle connections opened in {:.2} s and held: public proxy {fds_before} -> \
         {fds_full} open fds, RSS {rss_before} -> {rss_full} KiB = {per_conn:.1} KiB per idle \
         connection; the {} over max_connections were closed {:.2} .. {:.2} ms after connecting",
        opened.as_secs_f64(),
        OPEN - LIMIT,
        min * 1e3,
        max * 1e3
    );
    assert!(
        max < 1.0,
        "a connection over the limit stayed open {max:.3} s"
    );
    assert!(
        per_conn < 64.0,
        "{per_conn:.1} KiB per idle connection (limit 64)"
    );

    // Full: a normal client is refused at once.
    let t0 = Instant::now();
    let r =
        fx.t.fetch(eps_tests::tunnel::DOMAIN, "GET", "/jsonrpc", b"")
            .await;
    assert!(
        r.is_err(),
        "a client got through while the limit was reached"
    );
    let refused_in = t0.elapsed();
    assert!(
        refused_in < Duration::from_secs(1),
        "refused after {refused_in:?}"
    );
    assert_eq!(
        fx.refused("connection_limit").await,
        (OPEN - LIMIT) as u64 + 1
    );

    // Closing 100 idle ones frees their permits: a normal client succeeds again.
    let mut freed = 0;
    conns.retain(|s| {
        if freed < FREED && !closed_by_peer(s) {
            freed += 1;
            false
        } else {
            true
        }
    });
    let t0 = Instant::now();
    let ok = wait_until(Duration::from_secs(10), || fx.t.works()).await;
    assert!(
        ok,
        "no client succeeded after {FREED} idle connections were closed"
    );
    println!(
        "a normal client: refused at once ({:.1} ms) while {LIMIT} connections were open; \
         served {:.3} s after {FREED} idle ones were closed",
        refused_in.as_secs_f64() * 1e3,
        t0.elapsed().as_secs_f64()
    );
    // The proxy closes first, so the test's ports are not left in TIME_WAIT.
    fx.proc_mut(Role::PublicProxy).kill();
    drop(conns);
}
