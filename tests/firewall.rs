//! The project's premise, end to end: the private side sits behind a firewall that drops every
//! new inbound connection, and clients still reach its internal server through the public proxy.
//!
//! Each host is a Linux network namespace joined to host A by a veth pair (`support/netns.rs`);
//! the fixture is `firewall/hosts.rs`. Host A runs the public proxy and its EPS server; each
//! private host B1, B2, ... runs the internal server, the private proxy and the private EPS
//! server (one operator, `private-proxy-1`, on every private host). The private EPS server opens
//! no gRPC port: it dials the public one and holds a reverse stream over which it is called
//! (directory channel `reverse_stream`).
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables); without them each test prints why and
//! returns, except under `CI`, where that is a failure. Build the binaries first:
//! `cargo build --workspace && cargo test -p eps-tests --test firewall -- --nocapture`.
//! Measurements are printed (`--nocapture` shows them).
//!
//! - `harness_*`: the namespaces and nftables rules do what the other tests rely on (no binary).
//! - `baseline_grpc_server_mode_without_firewall`: today's way (the private EPS server listens
//!   for gRPC), no firewall: the namespaced hosts carry the tunnel.
//! - the rest: reverse streams, with and without the firewall, two private instances with one
//!   killed, and a silently cut path noticed by keepalive.

#[path = "firewall/hosts.rs"]
mod hosts;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eps_tests::netns::{
    cut, drop_new_inbound, heal, link, netns_supported, remove_firewall, Netns, NsClient,
};
use eps_tests::tunnel::{Role, PROCESS_WAIT, SUCCESS};
use eps_tests::wait_until;
use hosts::{Hosts, Mode, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Requests of a load run.
const TOTAL: usize = 2_000;
/// Requests sent while a killed private host restarts.
const RESTART_LOAD: usize = 1_000;
/// Requests in flight at once during a load run.
const PARALLEL: usize = 25;
/// Deadline of one request under load.
const LOADED_REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Time a load run gets to reach a given number of answered requests.
const PROGRESS_WAIT: Duration = Duration::from_secs(60);
/// How soon after a SIGKILL the public side knows the stream is dead (the killed process's
/// kernel closes its connections at once), with slack.
const KILL_NOTICED: Duration = Duration::from_secs(1);
/// The default keepalive (`keepalive_interval`, `keepalive_timeout`; README: a silently dead
/// path is noticed within their sum, 5 s), which `silently_cut_path_is_noticed` holds eps to.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------
// The harness itself.

/// The namespaces, links and rules the tunnel tests rely on, with plain sockets: a new
/// connection into a firewalled host is dropped silently (a timeout, not a refusal) while the
/// connections it opens itself work; a cut host neither sends nor receives
/// anything on an open connection; and dropping a namespace kills what runs in it.
#[tokio::test(flavor = "multi_thread")]
async fn harness_firewall_rules_do_what_they_say() {
    if !netns_supported("harness_firewall_rules_do_what_they_say") {
        return;
    }
    let a = Netns::new("a");
    let b = Netns::new("b");
    let l = link(&a, &b, 1);
    let short = Duration::from_secs(1);

    // An echo server on B, one on A.
    let b_addr = std::net::SocketAddr::from((l.b, 7000));
    let a_addr = std::net::SocketAddr::from((l.a, 7001));
    for listener in [
        b.listen(b_addr).expect("listen on B"),
        a.listen(a_addr).expect("listen on A"),
    ] {
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }
    // Deadlines: `short` where nothing must happen (dropped packets), `long` where something
    // must (a loaded machine may be slow).
    let long = Duration::from_secs(10);
    let connect = |ns: &Netns, to, within| {
        let socket = ns.socket().expect("a socket inside the namespace");
        async move { tokio::time::timeout(within, socket.connect(to)).await }
    };
    async fn echoes(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 4];
        tokio::time::timeout(within, async {
            s.write_all(b"ping").await?;
            s.read_exact(&mut buf).await
        })
        .await
        .is_ok_and(|r| r.is_ok())
            && &buf == b"ping"
    }

    connect(&a, b_addr, long)
        .await
        .expect("A connects to B without a firewall")
        .expect("connect");

    // The firewall goes up before B opens its connection, as on a real host (connection
    // tracking in a namespace starts with the first rule that needs it: a connection older
    // than that is "new" to it and dropped).
    drop_new_inbound(&b);
    match connect(&a, b_addr, short).await {
        Err(_) => {} // timed out: the SYN was dropped silently
        Ok(r) => panic!("a new connection into the firewalled host got {r:?}, not silence"),
    }
    let mut open = connect(&b, a_addr, long)
        .await
        .expect("the firewalled host connects out")
        .expect("connect out");
    assert!(
        echoes(&mut open, long).await,
        "no answer on the firewalled host's own connection"
    );

    remove_firewall(&b);
    connect(&a, b_addr, long)
        .await
        .expect("A connects to B again once the firewall is gone")
        .expect("connect");

    cut(&b);
    assert!(
        !echoes(&mut open, short).await,
        "a cut host still got answers on an open connection"
    );
    heal(&b);
    // Retransmission carries the ping and its echo once the path is back.
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), open.read_exact(&mut buf))
        .await
        .expect("the echo after healing the cut")
        .expect("read the echo");
    assert_eq!(&buf, b"ping");

    // A process started inside a namespace is the program itself (ip execs it), and dropping
    // the namespace kills what still runs there.
    let dir = eps_tests::TestDir::new("netns-harness");
    let mut sleeper = b.start(
        "sleep",
        std::path::Path::new("/bin/sleep"),
        ["60"],
        std::iter::empty::<(&str, &str)>(),
        dir.join("sleep.log"),
    );
    let comm = format!("/proc/{}/comm", sleeper.pid());
    assert!(
        wait_until(PROCESS_WAIT, || async {
            std::fs::read_to_string(&comm).is_ok_and(|c| c.trim() == "sleep")
        })
        .await,
        "the process started with ip netns exec is not the program"
    );
    let mut stray = std::process::Command::new("ip")
        .args(["netns", "exec", b.name(), "sleep", "60"])
        .spawn()
        .expect("spawn a stray process");
    assert!(
        wait_until(PROCESS_WAIT, || async { b.pids().len() >= 2 }).await,
        "ip netns pids lists the processes"
    );
    let name = b.name().to_string();
    drop(b);
    let status = stray.wait().expect("reap the stray process");
    assert!(!status.success(), "the stray process was killed: {status}");
    assert!(
        sleeper.wait_exit(PROCESS_WAIT).await.is_some(),
        "the namespace's process was killed"
    );
    assert!(
        !std::path::Path::new("/var/run/netns").join(&name).exists(),
        "namespace {name} was deleted"
    );
}

// ---------------------------------------------------------------------------------------------
// The tunnel across hosts.

/// Today's way, as a check of the fixture: the private EPS server listens for gRPC on its
/// host's address and the public one dials it; no firewall.
#[tokio::test(flavor = "multi_thread")]
async fn baseline_grpc_server_mode_without_firewall() {
    let what = "baseline (gRPC server mode, no firewall)";
    one_private_host("baseline", false, Mode::GrpcServer, false, what).await;
}

/// The premise: host B drops every new inbound connection, its EPS server holds a reverse
/// stream, and GET, POST and 2,000 requests (25 in parallel) through the public proxy all get
/// the internal server's answer.
#[tokio::test(flavor = "multi_thread")]
async fn firewalled_private_side_serves_clients() {
    one_private_host(
        "firewalled",
        true,
        Mode::Reverse,
        false,
        "firewalled private host",
    )
    .await;
}

/// The same with each EPS server inside its proxy's process: two processes per host, the private
/// host still accepting no inbound connection.
#[tokio::test(flavor = "multi_thread")]
async fn firewalled_private_side_with_embedded_eps_servers() {
    one_private_host(
        "embedded",
        true,
        Mode::Reverse,
        true,
        "firewalled private host, EPS servers embedded",
    )
    .await;
}

/// The same topology with reverse streams and no firewall rule.
#[tokio::test(flavor = "multi_thread")]
async fn control_without_firewall() {
    let what = "no firewall (reverse streams)";
    one_private_host("control", false, Mode::Reverse, false, what).await;
}

/// Host A and two firewalled private hosts of one operator (reverse streams, default
/// keepalive), started; `None` where namespaces cannot be made (outside CI).
async fn two_firewalled_private_hosts(label: &str) -> Option<Hosts> {
    if !netns_supported(label) {
        return None;
    }
    let mut h = Hosts::new(
        label,
        Options {
            private_hosts: 2,
            firewall: true,
            mode: Mode::Reverse,
            keepalive: None,
            embedded: false,
        },
    );
    h.start_all().await;
    Some(h)
}

/// Host A and one private host (`firewall` on it or not, its EPS server in `mode`): GET, POST
/// and 2,000 requests, 25 in parallel, through the public proxy, all answered; `what` labels
/// the printed time.
async fn one_private_host(label: &str, firewall: bool, mode: Mode, embedded: bool, what: &str) {
    if !netns_supported(label) {
        return;
    }
    let mut h = Hosts::new(
        label,
        Options {
            private_hosts: 1,
            firewall,
            mode,
            keepalive: None,
            embedded,
        },
    );
    h.start_all().await;
    get_and_post(&h.client()).await;
    two_thousand(&h.client(), what).await;
}

/// Two firewalled private hosts, one operator: B1's EPS server and private proxy are killed
/// (SIGKILL) a quarter of the way into 2,000 requests. Only requests already under way may
/// fail; every request started once the public side knows B1's stream is dead goes to B2. B1,
/// started again, opens its stream again and takes calls again.
#[tokio::test(flavor = "multi_thread")]
async fn two_private_instances_fail_over_on_kill() {
    let Some(mut h) = two_firewalled_private_hosts("failover").await else {
        return;
    };
    let client = h.client();

    let done = Arc::new(AtomicUsize::new(0));
    let run = tokio::spawn(load(
        client.clone(),
        TOTAL,
        PARALLEL,
        LOADED_REQUEST_TIMEOUT,
        done.clone(),
    ));
    assert!(
        wait_until(PROGRESS_WAIT, || async {
            done.load(Ordering::Relaxed) >= TOTAL / 4
        })
        .await,
        "{} of {TOTAL} requests answered within {PROGRESS_WAIT:?}",
        done.load(Ordering::Relaxed)
    );
    let killed = Instant::now();
    h.privates[0].proc_mut(Role::PrivateEps).kill();
    h.privates[0].proc_mut(Role::PrivateProxy).kill();
    let outcomes = run.await.expect("the load run");

    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_some()).collect();
    let last = failed
        .iter()
        .map(|o| ms_after(killed, o.ended))
        .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t))));
    println!(
        "failed {} of {TOTAL}; last failure at {} after the kill",
        failed.len(),
        last.map_or("-".to_string(), |t| format!("{t:.0} ms"))
    );
    for o in &failed {
        println!(
            "  #{}: started {:.0} ms, failed {:.0} ms after the kill: {}",
            o.index,
            ms_after(killed, o.started),
            ms_after(killed, o.ended),
            o.error.as_deref().unwrap_or_default()
        );
    }
    let late: Vec<&&Outcome> = failed
        .iter()
        .filter(|o| o.started > killed + KILL_NOTICED)
        .collect();
    assert!(
        late.is_empty(),
        "{} requests started more than {KILL_NOTICED:?} after the kill failed; the first: #{} \
         {:?}",
        late.len(),
        late[0].index,
        late[0].error
    );

    // After the run, B2 alone serves everything.
    let after = load_all_ok(&client, 50, 5, "after the kill").await;
    println!("50 requests after the run: {:.2} s", after.as_secs_f64());

    // B1 back, under load and with no pause: its EPS server first, whose stream opens while
    // its proxy is still down (the calls it cannot deliver there go on to B2), then its proxy,
    // which takes calls for its domain before its own announcement has been answered. Not one
    // request may fail, and B1 takes calls again.
    let (b1_before, b2_before) = (
        h.privates[0].internal_connections(),
        h.privates[1].internal_connections(),
    );
    let done = Arc::new(AtomicUsize::new(0));
    let run = tokio::spawn(load(
        client.clone(),
        RESTART_LOAD,
        5,
        LOADED_REQUEST_TIMEOUT,
        done.clone(),
    ));
    assert!(
        wait_until(PROGRESS_WAIT, || async {
            done.load(Ordering::Relaxed) >= 50
        })
        .await,
        "the load before B1's restart did not start"
    );
    let restarted = Instant::now();
    let b1 = &mut h.privates[0];
    b1.proc_mut(Role::PrivateEps).restart();
    b1.proc_mut(Role::PrivateEps)
        .wait_for_log(hosts::REVERSE_STREAM_OPEN, PROCESS_WAIT)
        .await;
    let stream_open = restarted.elapsed();
    b1.proc_mut(Role::PrivateProxy).restart();
    let outcomes = run.await.expect("the load run");
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.error.as_ref().map(|e| format!("#{}: {e}", o.index)))
        .collect();
    let (b1_new, b2_new) = (
        h.privates[0].internal_connections() - b1_before,
        h.privates[1].internal_connections() - b2_before,
    );
    println!(
        "B1 restarted under load (stream open again {:.0} ms after the restart): {} of \
         {RESTART_LOAD} failed; {b1_new} reached B1, {b2_new} reached B2",
        stream_open.as_secs_f64() * 1000.0,
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "requests failed while B1 restarted: {:#?}",
        &failed[..failed.len().min(5)]
    );
    assert!(
        b1_new > 0,
        "B1 took none of {RESTART_LOAD} requests after its restart ({b2_new} reached B2)"
    );
}

/// Two firewalled private hosts, default keepalive (2 s ping interval, 3 s timeout on both
/// sides). B1's path is cut silently (all packets dropped both ways: no RST, no FIN). Requests
/// keep coming, one every 50 ms; within interval + timeout (+ 1 s slack) of the cut the public
/// side has noticed, and every request started from then on succeeds through B2.
#[tokio::test(flavor = "multi_thread")]
async fn silently_cut_path_is_noticed() {
    // The default keepalive: what the README promises.
    let Some(h) = two_firewalled_private_hosts("cut").await else {
        return;
    };
    let client = h.client();

    // Both instances take calls, so the cut removes a path in use.
    let before = [
        h.privates[0].internal_connections(),
        h.privates[1].internal_connections(),
    ];
    load_all_ok(&client, 40, 5, "before the cut").await;
    assert!(
        wait_until(Duration::from_secs(5), || async {
            h.privates[0].internal_connections() > before[0]
                && h.privates[1].internal_connections() > before[1]
        })
        .await,
        "not both private hosts served requests before the cut: B1 {}, B2 {}",
        h.privates[0].internal_connections() - before[0],
        h.privates[1].internal_connections() - before[1]
    );

    let bound = KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT + Duration::from_secs(1);
    let window = bound + Duration::from_secs(3);
    let log_from = h.public_proc(Role::PublicEps).log().len();
    cut(&h.privates[0].ns);
    let cut_at = Instant::now();

    // One request every 50 ms, 3 s deadline each, until `window` after the cut; meanwhile watch
    // the public EPS server's log for the end of B1's stream.
    let mut noticed = None;
    let mut requests = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while cut_at.elapsed() < window {
        tick.tick().await;
        if noticed.is_none() {
            let log = h.public_proc(Role::PublicEps).log();
            if log[log_from.min(log.len())..].lines().any(stream_ended) {
                noticed = Some(cut_at.elapsed());
            }
        }
        let client = client.clone();
        requests.push(tokio::spawn(async move {
            let started = Instant::now();
            let r = client
                .request("POST", "/jsonrpc", b"{}", Duration::from_secs(3))
                .await;
            (started, verdict(r))
        }));
    }
    let mut results = Vec::new();
    for r in requests {
        results.push(r.await.expect("a request task"));
    }
    let failed: Vec<_> = results.iter().filter(|(_, e)| e.is_some()).collect();
    let last_failed = failed
        .iter()
        .map(|(s, _)| ms_after(cut_at, *s))
        .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t))));
    let after_bound: Vec<_> = results
        .iter()
        .filter(|(s, _)| *s >= cut_at + bound)
        .collect();
    println!(
        "cut B1: public EPS logged the stream's end {}; {} of {} requests failed, the last one \
         started {} after the cut; bound {:.0} ms",
        noticed.map_or("never".into(), |d| format!(
            "{:.0} ms after the cut",
            d.as_secs_f64() * 1e3
        )),
        failed.len(),
        results.len(),
        last_failed.map_or("-".into(), |t| format!("{t:.0} ms")),
        bound.as_secs_f64() * 1e3
    );
    for (s, e) in &failed {
        println!(
            "  started {:.0} ms after the cut: {}",
            ms_after(cut_at, *s),
            e.as_deref().unwrap_or_default()
        );
    }
    let noticed = noticed.unwrap_or_else(|| {
        panic!(
            "the public EPS server logged no end of a reverse stream (a line with \"reverse \
             stream\" and \"ended\" or \"closed\") within {window:?} of the cut"
        )
    });
    assert!(
        noticed <= bound,
        "the public EPS server noticed the cut after {noticed:?}, more than {bound:?}"
    );
    assert!(
        !after_bound.is_empty(),
        "no request started after {bound:?}"
    );
    let late: Vec<_> = after_bound.iter().filter(|(_, e)| e.is_some()).collect();
    assert!(
        late.is_empty(),
        "{} of {} requests started more than {bound:?} after the cut failed; the first: {:?}",
        late.len(),
        after_bound.len(),
        late[0].1
    );
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// A request's fate.
struct Outcome {
    index: usize,
    started: Instant,
    ended: Instant,
    /// Why it failed; `None` when it got 200 and the demo's answer.
    error: Option<String>,
}

/// `None` for 200 with the demo's answer, otherwise what went wrong.
fn verdict(r: std::io::Result<eps_tests::tunnel::Reply>) -> Option<String> {
    match r {
        Ok(r) if r.status == 200 && r.body == SUCCESS.as_bytes() => None,
        Ok(r) => Some(format!("HTTP {} {}", r.status, r.text())),
        Err(e) => Some(e.to_string()),
    }
}

/// Signed milliseconds from `from` to `t`.
fn ms_after(from: Instant, t: Instant) -> f64 {
    if t >= from {
        (t - from).as_secs_f64() * 1e3
    } else {
        -((from - t).as_secs_f64() * 1e3)
    }
}

/// GET and POST through the tunnel get the internal server's answer.
async fn get_and_post(client: &NsClient) {
    for (method, body) in [("GET", &b""[..]), ("POST", &b"{}"[..])] {
        let r = client
            .request(method, "/jsonrpc", body, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("{method} through the tunnel: {e}"));
        assert_eq!((r.status, r.text().as_str()), (200, SUCCESS), "{method}");
    }
}

/// 2,000 POSTs, 25 in parallel, all answered; prints the time taken.
async fn two_thousand(client: &NsClient, what: &str) {
    let took = load_all_ok(client, TOTAL, PARALLEL, what).await;
    println!(
        "{what}: {TOTAL} requests, {PARALLEL} in parallel, a new TCP+TLS connection each: \
         {:.2} s ({:.0}/s)",
        took.as_secs_f64(),
        TOTAL as f64 / took.as_secs_f64()
    );
}

/// [`load`] that must succeed throughout; the wall time.
async fn load_all_ok(client: &NsClient, total: usize, parallel: usize, what: &str) -> Duration {
    let start = Instant::now();
    let outcomes = load(
        client.clone(),
        total,
        parallel,
        LOADED_REQUEST_TIMEOUT,
        Arc::new(AtomicUsize::new(0)),
    )
    .await;
    let took = start.elapsed();
    let failed: Vec<_> = outcomes
        .iter()
        .filter_map(|o| o.error.as_ref().map(|e| format!("#{}: {e}", o.index)))
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {total} requests failed; the first: {:#?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    took
}

/// `total` POSTs of `{}` to `/jsonrpc`, `parallel` at a time, each on a new connection with
/// deadline `timeout`; `done` counts the answered ones as they finish. Every request's outcome.
async fn load(
    client: NsClient,
    total: usize,
    parallel: usize,
    timeout: Duration,
    done: Arc<AtomicUsize>,
) -> Vec<Outcome> {
    let next = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let workers: Vec<_> = (0..parallel)
        .map(|_| {
            let (client, next, done, outcomes) =
                (client.clone(), next.clone(), done.clone(), outcomes.clone());
            tokio::spawn(async move {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= total {
                        return;
                    }
                    let started = Instant::now();
                    let r = client.request("POST", "/jsonrpc", b"{}", timeout).await;
                    let outcome = Outcome {
                        index,
                        started,
                        ended: Instant::now(),
                        error: verdict(r),
                    };
                    outcomes.lock().unwrap().push(outcome);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("a request worker");
    }
    let mut outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    outcomes.sort_by_key(|o| o.index);
    outcomes
}

/// A public EPS log line saying a reverse stream ended.
fn stream_ended(line: &str) -> bool {
    line.contains("reverse stream") && (line.contains("ended") || line.contains("closed"))
}
