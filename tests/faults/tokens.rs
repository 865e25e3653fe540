//! The public proxy's internal port: wrong, short, reused and late tokens are closed, a
//! guessing address is rate-limited, and legitimate dial-backs go on meanwhile.
//!
//! To get hold of real tokens, the public proxy's `internal_endpoint` (the address it tells the
//! private side to dial) is a forwarder in the test that records each dial-back's token and
//! passes the connection on to the real internal port; it can also hold a dial-back back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eps_tests::tunnel::{parse_response, Role, DOMAIN, SUCCESS, TOKEN_TIMEOUT};
use eps_tests::*;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::fixture::{connect_from, min_max, serial, Fx};

/// Token length on the internal port.
const TOKEN_LEN: usize = 32;
/// Time a refused data connection gets to be closed.
const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// The public proxy's `accept_timeout` here.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Records the token of every dial-back and forwards the connection to the public proxy's
/// internal port, or, while holding, keeps it without forwarding; with `drop_next` set, it
/// closes the next connection once its token has arrived (a connection that was dead).
struct Forwarder {
    addr: SocketAddr,
    tokens: Arc<Mutex<Vec<[u8; TOKEN_LEN]>>>,
    hold: Arc<AtomicBool>,
    drop_next: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let tokens: Arc<Mutex<Vec<[u8; TOKEN_LEN]>>> = Arc::default();
        let hold = Arc::new(AtomicBool::new(false));
        let drop_next = Arc::new(AtomicBool::new(false));
        let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (t, h, k, d) = (
            tokens.clone(),
            hold.clone(),
            held.clone(),
            drop_next.clone(),
        );
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (tokens, hold, held, drop_next) = (t.clone(), h.clone(), k.clone(), d.clone());
                tokio::spawn(async move {
                    let mut token = [0u8; TOKEN_LEN];
                    if s.read_exact(&mut token).await.is_err() {
                        return;
                    }
                    tokens.lock().unwrap().push(token);
                    if drop_next.swap(false, Ordering::SeqCst) {
                        return;
                    }
                    if hold.load(Ordering::SeqCst) {
                        held.lock().unwrap().push(s);
                        return;
                    }
                    let Ok(mut up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = up.set_nodelay(true);
                    if up.write_all(&token).await.is_ok() {
                        let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
                    }
                });
            }
        });
        Self {
            addr,
            tokens,
            hold,
            drop_next,
            held,
            task,
        }
    }

    fn tokens(&self) -> Vec<[u8; TOKEN_LEN]> {
        self.tokens.lock().unwrap().clone()
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Presents `token` on a new data connection from `from`; whether and when it was closed
/// without a byte back.
async fn present(from: &str, to: SocketAddr, token: &[u8], fin: bool) -> Duration {
    let mut s = connect_from(from, to).await.expect("connect");
    // The write may meet a socket closed for a short token's timeout.
    let _ = s.write_all(token).await;
    if fin {
        let _ = s.shutdown().await;
    }
    let (bytes, after) = read_until_closed(&mut s, CLOSE_WAIT)
        .await
        .unwrap_or_else(|| panic!("a data connection from {from} was not closed"));
    assert_eq!(bytes, 0, "the internal port answered a bad token");
    after
}

/// All five started, the public proxy telling private proxies to dial a [`Forwarder`] in front
/// of its internal port (`accept_timeout` [`ACCEPT_TIMEOUT`]).
async fn forwarded(test: &str) -> (Fx, Forwarder) {
    let mut fx = Fx::new(test);
    let fwd = Forwarder::start(fx.t.public_internal_addr).await;
    fx.configure(
        Role::PublicProxy,
        json!({"public": {"internal_endpoint": fwd.addr.to_string(),
                          "limits": {"accept_timeout": ACCEPT_TIMEOUT.as_secs_f64()}}}),
    );
    fx.start_all().await;
    (fx, fwd)
}

fn random_token() -> [u8; TOKEN_LEN] {
    let mut token = [0u8; TOKEN_LEN];
    getrandom::fill(&mut token).expect("OS random bytes");
    token
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tokens_are_closed_and_guessers_rate_limited() {
    const GUESSES: usize = 1_000;
    const GUESS_PARALLEL: usize = 50;
    const LEGIT: usize = 40;
    let _serial = serial().await;
    let (fx, fwd) = forwarded("tokens").await;
    let internal = fx.t.public_internal_addr;

    // 1,000 wrong tokens from 127.0.0.1, the address the private proxy dials back from (one NAT
    // for a whole office), a short token and a stalled one from 127.0.0.3, while legitimate
    // clients are served through the real private proxy: the guesser cannot cut its tunnel.
    let guesses = async {
        let permits = Arc::new(tokio::sync::Semaphore::new(GUESS_PARALLEL));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..GUESSES {
            let permit = permits.clone().acquire_owned().await.expect("semaphore");
            tasks.spawn(async move {
                let after = present("127.0.0.1", internal, &random_token(), false).await;
                drop(permit);
                after
            });
        }
        let mut closes = Vec::new();
        while let Some(r) = tasks.join_next().await {
            closes.push(r.expect("a guess"));
        }
        closes
    };
    let odd = async {
        let short = present("127.0.0.3", internal, &random_token()[..10], true).await;
        let stalled = present("127.0.0.3", internal, &random_token()[..5], false).await;
        (short, stalled)
    };
    let legit = async {
        let mut failures = Vec::new();
        for i in 0..LEGIT {
            if !fx.t.works().await {
                failures.push(i);
            }
        }
        failures
    };
    let start = Instant::now();
    let (closes, (short, stalled), failures) = tokio::join!(guesses, odd, legit);
    let took = start.elapsed();
    assert!(
        failures.is_empty(),
        "legitimate requests {failures:?} of {LEGIT} failed next to the guesses"
    );
    let m = fx.metrics(Role::PublicProxy).await;
    let (bad, limited) = (m.refused("bad_token"), m.refused("token_rate_limited"));
    let (min, max) = min_max(&closes);
    println!(
        "{GUESSES} wrong tokens from 127.0.0.1, the private proxy's address ({GUESS_PARALLEL} at \
         a time), in {:.2} s next to {LEGIT} good requests (all served): closed after \
         {:.1} .. {:.1} ms; {bad} refused as bad_token, {limited} refused without a log line as \
         token_rate_limited",
        took.as_secs_f64(),
        min * 1e3,
        max * 1e3
    );
    println!(
        "a 10-byte token then FIN: closed after {:.1} ms; 5 bytes of a token, then nothing: \
         closed after {:.3} s (token_timeout {TOKEN_TIMEOUT:?})",
        short.as_secs_f64() * 1e3,
        stalled.as_secs_f64()
    );
    assert!(limited > 0, "no guess was rate-limited");
    assert_eq!(bad + limited, GUESSES as u64, "every guess refused once");
    assert!(bad > 20, "the limiter blocked before max_token_failures");
    assert_eq!(m.refused("token_truncated"), 1);
    assert_eq!(m.refused("token_timeout"), 1);
    assert!(stalled + Duration::from_millis(50) >= TOKEN_TIMEOUT);

    // A token used twice: the second presentation is refused, the first client is unaffected.
    let config = fx.t.client_config();
    let tcp = TcpStream::connect(fx.t.public_addr).await.expect("connect");
    let name = ServerName::try_from(DOMAIN.to_string()).expect("a DNS name");
    let mut tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .expect("TLS through the tunnel");
    let tokens = fwd.tokens();
    let (first, live) = (tokens[0], *tokens.last().expect("a token"));
    let bad_before = fx.refused("bad_token").await;
    present("127.0.0.3", internal, &live, false).await;
    present("127.0.0.3", internal, &first, false).await;
    assert_eq!(fx.refused("bad_token").await, bad_before + 2);
    let request = format!("GET /jsonrpc HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.expect("request");
    let mut buf = Vec::new();
    let reply = loop {
        if let Some(r) = parse_response(&buf).expect("HTTP") {
            break r;
        }
        let mut chunk = [0u8; 4096];
        let n = tls.read(&mut chunk).await.expect("response");
        assert!(n > 0, "closed before the response");
        buf.extend_from_slice(&chunk[..n]);
    };
    assert_eq!(reply.body, SUCCESS.as_bytes());
    println!(
        "a used token presented again (while its relay was live, and after one ended): both \
         closed; the first client's request still succeeded"
    );

    // A late token: the dial-back is held back past accept_timeout; the client is closed at
    // accept_timeout and the token, sent 3 s after the client connected, is refused.
    fwd.hold.store(true, Ordering::SeqCst);
    let seen = fwd.tokens().len();
    let hello = rustls_hello(config, DOMAIN);
    let mut client = TcpStream::connect(fx.t.public_addr).await.expect("connect");
    let connected = Instant::now();
    client.write_all(&hello).await.expect("send");
    let waiting = tokio::spawn(async move { read_until_closed(&mut client, CLOSE_WAIT * 2).await });
    assert!(
        wait_until(CLOSE_WAIT, || async { fwd.tokens().len() > seen }).await,
        "no dial-back reached the forwarder"
    );
    let late = fwd.tokens()[seen];
    let (bytes, client_closed) = waiting
        .await
        .expect("the waiting client")
        .expect("the waiting client was never closed");
    assert_eq!(bytes, 0);
    tokio::time::sleep_until((connected + Duration::from_secs(3)).into()).await;
    let bad_before = fx.refused("bad_token").await;
    present("127.0.0.3", internal, &late, false).await;
    assert_eq!(fx.refused("bad_token").await, bad_before + 1);
    assert_eq!(fx.refused("no_dial_back").await, 1);
    println!(
        "a dial-back held back: the client was closed after {:.3} s (accept_timeout \
         {ACCEPT_TIMEOUT:?}); its token presented after 3 s was refused",
        client_closed.as_secs_f64()
    );
    assert!(
        client_closed + Duration::from_millis(50) >= ACCEPT_TIMEOUT
            && client_closed <= ACCEPT_TIMEOUT + Duration::from_secs(1),
        "the waiting client was closed after {client_closed:?}"
    );
    assert_eq!(fwd.held.lock().unwrap().len(), 1);
    fwd.hold.store(false, Ordering::SeqCst);
    assert!(fx.t.works().await, "a client after the token tests");
}

/// The private proxy dials a few data connections ahead of need and sends later clients'
/// tokens on them; the public proxy lets such silent connections wait, but only
/// `max_idle_data_per_address` per address and only for `data_idle_timeout`.
#[tokio::test(flavor = "multi_thread")]
async fn pooled_dial_backs_and_silent_connections_are_bounded() {
    const DATA_IDLE: Duration = Duration::from_secs(3);
    const PER_ADDRESS: usize = 4;
    const CLIENTS: usize = 10;
    let _serial = serial().await;
    let mut fx = Fx::new("pool");
    fx.configure(
        Role::PublicProxy,
        json!({"public": {"limits": {"data_idle_timeout": DATA_IDLE.as_secs_f64(),
                                     "max_idle_data_per_address": PER_ADDRESS}}}),
    );
    fx.configure(
        Role::PrivateProxy,
        json!({"private": {"data_pool": 3, "data_pool_max_age": 1.0}}),
    );
    fx.start_all().await;
    let internal = fx.t.public_internal_addr;

    // After the first client (start_all's), dial-backs go out on pooled connections.
    for i in 0..CLIENTS {
        assert!(fx.t.works().await, "client {i}");
    }
    let m = fx.metrics(Role::PrivateProxy).await;
    let hits = m.value("eps_proxy_data_pool_total", "result=\"hit\"") as usize;
    let misses = m.value("eps_proxy_data_pool_total", "result=\"miss\"") as usize;
    println!("{CLIENTS} clients after the first: {hits} pooled dial-backs, {misses} dialed");
    assert!(hits >= CLIENTS - 2, "{hits} hits, {misses} misses");

    // One address may hold PER_ADDRESS silent connections; the next gets only token_timeout
    // for its token, while another address may still open a waiting one.
    let mut held = Vec::new();
    for _ in 0..PER_ADDRESS {
        held.push(connect_from("127.0.0.4", internal).await.expect("connect"));
    }
    // The public proxy counts a connection once it has accepted it; wait for all four.
    let counted = wait_until(Duration::from_secs(5), || async {
        fx.metrics(Role::PublicProxy).await.value(
            "eps_proxy_connections_accepted_total",
            "listener=\"internal\"",
        ) as usize
            >= hits + misses + 1 + PER_ADDRESS
    })
    .await;
    assert!(
        counted,
        "the public proxy did not accept the silent connections"
    );
    let mut extra = connect_from("127.0.0.4", internal).await.expect("connect");
    let (bytes, refused_after) = read_until_closed(&mut extra, CLOSE_WAIT)
        .await
        .expect("a connection over max_idle_data_per_address was not closed");
    assert_eq!(bytes, 0);
    assert!(
        refused_after + Duration::from_millis(50) >= TOKEN_TIMEOUT
            && refused_after < DATA_IDLE - Duration::from_millis(500),
        "closed after {refused_after:?}, not at token_timeout {TOKEN_TIMEOUT:?}"
    );
    let mut other = connect_from("127.0.0.5", internal).await.expect("connect");

    // Silent connections are closed at data_idle_timeout, not at token_timeout.
    let (bytes, after) = read_until_closed(&mut other, DATA_IDLE + CLOSE_WAIT)
        .await
        .expect("a silent connection was not closed");
    assert_eq!(bytes, 0);
    println!(
        "{PER_ADDRESS} silent connections from one address held, the next closed after {:.1} ms \
         (at token_timeout); \
         a silent one closed after {:.2} s (data_idle_timeout {DATA_IDLE:?}, token_timeout \
         {TOKEN_TIMEOUT:?})",
        refused_after.as_secs_f64() * 1e3,
        after.as_secs_f64()
    );
    assert!(
        after + Duration::from_millis(100) >= DATA_IDLE,
        "closed after {after:?}"
    );
    for mut s in held {
        let closed = read_until_closed(&mut s, CLOSE_WAIT).await;
        assert!(matches!(closed, Some((0, _))), "{closed:?}");
    }
    let m = fx.metrics(Role::PublicProxy).await;
    assert_eq!(m.refused("token_timeout"), 1);
    assert_eq!(m.refused("data_idle_timeout"), PER_ADDRESS as u64 + 1);
    // The pool retires its connections (data_pool_max_age 1 s, at most 1.25 s) before the
    // public side would time them out, and a retired one is not a refusal.
    assert_eq!(m.refused("token_truncated"), 0);
    assert!(fx.t.works().await, "a client after all this");
}

/// A pooled connection that turns out dead (it closes instead of answering the token) costs
/// the client nothing: the private proxy sends the same token again on a new connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_met_by_a_dead_pooled_connection_goes_out_again() {
    let _serial = serial().await;
    let (fx, fwd) = forwarded("deadpool").await;
    let hits =
        |m: &crate::fixture::Metrics| m.value("eps_proxy_data_pool_total", "result=\"hit\"") as u64;
    // The pool fills after the first dial-back; wait until dial-backs use it.
    let pooled = wait_until(Duration::from_secs(10), || async {
        fx.t.works().await && hits(&fx.metrics(Role::PrivateProxy).await) > 0
    })
    .await;
    assert!(pooled, "no dial-back ever used a pooled connection");
    let before = hits(&fx.metrics(Role::PrivateProxy).await);
    fwd.drop_next.store(true, Ordering::SeqCst);
    let started = Instant::now();
    assert!(
        fx.t.works().await,
        "the client whose token met a dead connection"
    );
    let took = started.elapsed();
    assert_eq!(
        hits(&fx.metrics(Role::PrivateProxy).await),
        before + 1,
        "that dial-back did not take a pooled connection"
    );
    let tokens = fwd.tokens();
    let n = tokens.len();
    assert_eq!(
        tokens[n - 1],
        tokens[n - 2],
        "the token did not go out again on a new connection"
    );
    println!(
        "a token met by a dead pooled connection went out again; the client was answered in \
         {:.1} ms (accept_timeout {ACCEPT_TIMEOUT:?})",
        took.as_secs_f64() * 1e3
    );
    assert!(took < ACCEPT_TIMEOUT, "took {took:?}");
}
