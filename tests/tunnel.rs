//! The tunnel end to end: the demo's five processes (internal server, public and private proxy,
//! their two EPS servers) on free loopback ports, with real clients: `curl` and in-process
//! rustls clients that open a new TCP+TLS connection per request.
//!
//! The fixture is `support/tunnel.rs` ([`Tunnel`]). Build the binaries first:
//! `cargo build --workspace && cargo test -p eps-tests --test tunnel`. Measurements are printed
//! (`-- --nocapture` shows them), not asserted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eps_core::http::{CallError, RpcClient};
use eps_core::jsonrpc;
use eps_tests::keepalive::connect_tls;
use eps_tests::tunnel::{
    https_request, parse_response, Role, Tunnel, ATTEMPT_TIMEOUT, DOMAIN, PRIVATE, PUBLIC, SUCCESS,
    TOKEN_TIMEOUT,
};
use eps_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Deadline of one request under load.
const LOADED_REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Time the tunnel gets to work again after a process was killed and started again.
const RECOVERY: Duration = Duration::from_secs(15);
/// Time a connection the proxy should close gets to be closed.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Size of the response a client asks for before its close_notify and FIN: more than the
/// socket buffers between the internal server and the client hold, so that the server is still
/// sending when the alert arrives and has the response's tail in its send queue when it closes.
const LINGER_BYTES: usize = 16 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn get_and_post_through_the_tunnel() {
    let t = Tunnel::started("get-post").await;

    // The README's commands, with curl.
    for data in [None, Some("{}")] {
        let (status, body) = curl(&t.root(), t.public_addr, DOMAIN, data).await;
        assert_eq!(status, 200, "curl with data {data:?}: body {body:?}");
        assert_eq!(body, SUCCESS, "curl with data {data:?}");
    }

    // 1 MiB of random bytes to /echo and back, byte for byte.
    let mut body = vec![0u8; 1024 * 1024];
    getrandom::fill(&mut body).expect("OS random bytes");
    let reply = https_request(
        t.public_addr,
        t.client_config(),
        DOMAIN,
        "POST",
        "/echo",
        &body,
        LOADED_REQUEST_TIMEOUT,
    )
    .await
    .expect("POST /echo through the tunnel");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.body.len(), body.len(), "echoed length");
    assert!(
        reply.body == body,
        "the echoed body differs from the one sent"
    );
}

/// The internal server's lingering close (`examples/internal-server/src/linger.rs`). A client
/// sends `GET /bytes/N` with `Connection: close`, then its close_notify and FIN before reading
/// anything, then reads to the end. The server answers without reading that alert; were it to
/// close the socket with the alert unread, the kernel would send a reset and drop what of the
/// response is still in its send queue. Every such client must get all N bytes and a clean end
/// (close_notify, then end of stream; no reset), straight to the internal server and through the
/// tunnel.
#[tokio::test(flavor = "multi_thread")]
async fn close_notify_before_reading_gets_the_whole_response() {
    const ROUNDS: usize = 5;
    let t = Tunnel::started("linger").await;
    let mut failures = Vec::new();
    for (via, addr) in [
        ("straight to the internal server", t.internal_addr),
        ("through the tunnel", t.public_addr),
    ] {
        let start = Instant::now();
        for i in 0..ROUNDS {
            if let Err(e) = get_after_close_notify(&t, addr, LINGER_BYTES).await {
                failures.push(format!("{via}, #{i}: {e}"));
            }
        }
        println!(
            "{ROUNDS} x GET /bytes/{LINGER_BYTES} with close_notify and FIN sent before reading, \
             {via}: {:.2} s",
            start.elapsed().as_secs_f64()
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} clients that sent close_notify and FIN before reading lost (part of) the \
         response: {failures:#?}",
        failures.len(),
        2 * ROUNDS
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reverse_start_order() {
    let mut t = Tunnel::new("reverse");
    // Each one listening before the next starts: the private proxy's first announcements find no
    // public proxy behind the EPS servers and go into its retry backoff.
    let start = Instant::now();
    for role in Role::ALL.into_iter().rev() {
        if role == Role::InternalServer {
            assert!(
                !t.works().await,
                "a request succeeded without the internal server"
            );
        }
        t.start(role);
        t.wait_ready(role).await;
    }
    let took = t.wait_tunnel(Duration::from_secs(20)).await;
    assert!(
        took.is_some(),
        "started in reverse order, no request went through within 20 s"
    );
    println!(
        "reverse start order: first request through the tunnel {:.2} s after starting the first \
         process, {:.3} s after the last one listened",
        start.elapsed().as_secs_f64(),
        took.unwrap_or_default().as_secs_f64()
    );
    for data in [None, Some("{}")] {
        let (status, body) = curl(&t.root(), t.public_addr, DOMAIN, data).await;
        assert_eq!((status, body.as_str()), (200, SUCCESS), "data {data:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_requests_25_parallel() {
    const TOTAL: usize = 2_000;
    const PARALLEL: usize = 25;
    let t = Tunnel::started("2000").await;
    // Like 2,000 curl processes: a full handshake each, no session resumption.
    let mut config = (*t.client_config()).clone();
    config.resumption = rustls::client::Resumption::disabled();
    let config = Arc::new(config);

    let tunnel = hammer(t.public_addr, config.clone(), TOTAL, PARALLEL).await;
    let direct = hammer(t.internal_addr, config, TOTAL, PARALLEL).await;
    println!(
        "{TOTAL} requests, {PARALLEL} in parallel, a new TCP+TLS connection each: \
         through the tunnel {:.2} s ({:.0}/s), straight to the internal server {:.2} s ({:.0}/s)",
        tunnel.as_secs_f64(),
        TOTAL as f64 / tunnel.as_secs_f64(),
        direct.as_secs_f64(),
        TOTAL as f64 / direct.as_secs_f64(),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_sni_and_non_tls_are_closed() {
    let t = Tunnel::started("refused").await;
    let nope = "nope.internal-server.local";

    // A real ClientHello for a name nobody announced: closed, not one byte of TLS back.
    let mut s = TcpStream::connect(t.public_addr).await.expect("connect");
    s.write_all(&rustls_hello(t.client_config(), nope))
        .await
        .expect("send");
    let (bytes, after) = read_until_closed(&mut s, CLOSE_WAIT)
        .await
        .expect("the connection of an unknown SNI was not closed");
    assert_eq!(bytes, 0, "the public proxy answered an unknown SNI");
    println!("unknown SNI closed after {:.3} s", after.as_secs_f64());

    // The same with a rustls client: the handshake fails.
    let r = https_request(
        t.public_addr,
        t.client_config(),
        nope,
        "GET",
        "/from-the-nope-client",
        b"",
        CLOSE_WAIT,
    )
    .await;
    let e = r.expect_err("a request for an unknown SNI succeeded");
    assert_ne!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");

    // Plain HTTP on the TLS port: closed.
    let mut s = TcpStream::connect(t.public_addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("send");
    let (bytes, after) = read_until_closed(&mut s, CLOSE_WAIT)
        .await
        .expect("a plaintext HTTP request was not closed within 2 s");
    assert_eq!(bytes, 0, "the public proxy answered plaintext");
    println!("plaintext closed after {:.3} s", after.as_secs_f64());

    // Nothing of that reached the internal server: once a good request's connection is logged,
    // every connection it saw carried one request (a forwarded raw ClientHello would not), and
    // none was the rustls client's.
    assert!(t.works().await, "a good request after the refused ones");
    let settled = wait_until(Duration::from_secs(5), || async {
        let log = t.proc(Role::InternalServer).log();
        log.matches("connection closed").count() == log.matches(" request").count()
    })
    .await;
    let log = t.proc(Role::InternalServer).log();
    assert!(
        settled,
        "the internal server saw connections without a request: {} closed, {} requests",
        log.matches("connection closed").count(),
        log.matches(" request").count()
    );
    assert!(
        !log.contains("/from-the-nope-client"),
        "a request for the unknown SNI reached the internal server"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn announcement_rules() {
    let t = Tunnel::started("announce").await;
    let private = t.private_rpc();
    let public = t.public_rpc();

    // Both proxies list the domain from the settings.
    let listed = announcements(&public, "public").await;
    assert!(
        has(&listed, DOMAIN, "operator", PRIVATE),
        "public side: {listed}"
    );
    let listed = announcements(&private, "private").await;
    assert!(
        has(&listed, DOMAIN, "proxy", PUBLIC),
        "private side: {listed}"
    );

    // A new name under the allowed suffix: accepted, then routed (the certificate is a wildcard).
    let other = "other.internal-server.local";
    let r = call(&private, "announceConnection", json!({"domain": other}))
        .await
        .expect("announcing other.internal-server.local");
    assert_eq!(r["domain"], other, "{r}");
    assert_eq!(r["proxy"], PUBLIC, "{r}");
    assert!(t.works_for(other).await, "{other} is not routed");

    // Refusals carry the public proxy's code.
    let refused = |params: Value| {
        let private = &private;
        async move {
            match call(private, "announceConnection", params.clone()).await {
                Err(CallError::Rpc(e)) => e.code,
                other => panic!("announceConnection {params}: expected an error, got {other:?}"),
            }
        }
    };
    assert_eq!(
        refused(json!({"domain": "x.example.com"})).await,
        jsonrpc::FORBIDDEN
    );
    let far = rfc3339_from_now(Duration::from_secs(8 * 24 * 3600), false);
    assert_eq!(
        refused(json!({"domain": "far.internal-server.local", "expires_at": far})).await,
        jsonrpc::INVALID_PARAMS
    );
    let past = rfc3339_from_now(Duration::from_secs(60), true);
    assert_eq!(
        refused(json!({"domain": "past.internal-server.local", "expires_at": past})).await,
        jsonrpc::INVALID_PARAMS
    );
    assert!(!t.works_for("x.example.com").await);
    assert!(!t.works_for("far.internal-server.local").await);

    // 409: the domain is held by private-proxy-1; private-proxy-2 asks for it through its own
    // EPS server.
    let _other_eps = t.start_other_eps().await;
    takeover_refused(&t, json!({"connections": [{"domain": DOMAIN}]})).await;
    let listed = announcements(&public, "public").await;
    assert!(has(&listed, DOMAIN, "operator", PRIVATE), "{listed}");
    assert!(t.works().await, "{DOMAIN} after the refused takeover");

    // A short-lived announcement: routed, then gone once expired.
    let short = "short.internal-server.local";
    let expires = Instant::now() + Duration::from_secs(3);
    let at = rfc3339_from_now(Duration::from_secs(3), false);
    call(
        &private,
        "announceConnection",
        json!({"domain": short, "expires_at": at}),
    )
    .await
    .expect("announcing a short-lived name");
    assert!(t.works_for(short).await, "{short} is not routed");
    tokio::time::sleep_until(expires.into()).await;
    let gone = wait_until(Duration::from_secs(10), || async {
        !t.works_for(short).await
    })
    .await;
    assert!(gone, "{short} is still routed after it expired");
    let listed = listed_without(&public, "public", short).await;
    assert!(has(&listed, other, "operator", PRIVATE), "{listed}");
    listed_without(&private, "private", short).await;
    assert!(t.works().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_recover() {
    let mut t = Tunnel::started("restarts").await;
    let mut report = Vec::new();
    for role in [
        Role::PublicProxy,
        Role::PrivateProxy,
        Role::InternalServer,
        Role::PublicEps,
        Role::PrivateEps,
    ] {
        let others: Vec<(Role, u32)> = Role::ALL
            .into_iter()
            .filter(|r| *r != role)
            .map(|r| (r, t.proc(r).pid()))
            .collect();
        // Every one of the five is on a new client's path: while one is down, clients fail.
        t.proc_mut(role).kill(); // SIGKILL
        assert!(
            !t.works().await,
            "a client succeeded while {} was down",
            role.name()
        );
        let start = Instant::now();
        t.restart(role); // the same command, settings and ports again
        let took = t.wait_tunnel(RECOVERY).await;
        assert!(
            took.is_some(),
            "no request through the tunnel within {RECOVERY:?} after {} was killed and restarted",
            role.name()
        );
        report.push((role, start.elapsed()));
        for (r, pid) in others {
            assert!(t.proc_mut(r).is_running(), "{} stopped", r.name());
            assert_eq!(t.proc(r).pid(), pid, "{} was restarted", r.name());
        }
        if role == Role::PublicProxy {
            // The private proxy re-announces only every minute: the domain comes from the store.
            let listed = announcements(&t.public_rpc(), "public").await;
            assert!(has(&listed, DOMAIN, "operator", PRIVATE), "{listed}");
            let log = t.proc(role).run_log();
            assert!(
                log.contains("loaded announcements") && log.contains("announcements=1"),
                "{log}"
            );
        }
    }
    for (role, took) in &report {
        println!(
            "{} killed (SIGKILL) and started again: clients succeed {:.3} s after the start",
            role.name(),
            took.as_secs_f64()
        );
    }
}

/// A domain from the private proxy's settings that the public proxy refused (403, outside the
/// allowed suffixes) gets no dial-back, even when an `incomingConnection` for it comes.
#[tokio::test(flavor = "multi_thread")]
async fn refused_domain_gets_no_dial_back() {
    let mut t = Tunnel::new("refused-dial-back");
    t.dir.write_yaml(
        "private-proxy/zz-test.yml",
        &json!({"private": {"announcements": [{"domain": DOMAIN}, {"domain": "x.example.com"}]}}),
    );
    t.start_all().await;
    t.proc_mut(Role::PrivateProxy)
        .wait_for_log("announcement refused", eps_tests::tunnel::PROCESS_WAIT)
        .await;
    let incoming = |domain: &str| {
        json!({"domain": domain, "endpoint": t.public_internal_addr.to_string(),
               "token": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
               "_client": {"name": PUBLIC, "entry": {"name": PUBLIC}}})
    };
    match call(
        &t.private_rpc(),
        "incomingConnection",
        incoming("x.example.com"),
    )
    .await
    {
        Err(CallError::Rpc(e)) => assert_eq!(e.code, jsonrpc::FORBIDDEN, "{e}"),
        other => panic!("incomingConnection for a refused domain: {other:?}"),
    }
    assert!(t.works().await, "the accepted domain stopped working");
}

/// A private proxy takes `incomingConnection` for a domain it announces to the caller even
/// before the public proxy has answered that announcement: right after a start, another instance
/// of the same operator may hold the announcement and the public side already sends clients
/// here. A domain it does not announce, or a caller it does not announce to, stays refused.
#[tokio::test(flavor = "multi_thread")]
async fn dial_back_before_the_announcement_is_answered() {
    let mut t = Tunnel::new("early-dial-back");
    // One dial per call (no pool), so the token arrives on the first connection.
    t.dir.write_yaml(
        "private-proxy/zz-test.yml",
        &json!({"private": {"data_pool": 0}}),
    );
    // No EPS server: the private proxy's announcements are never answered.
    for role in [Role::InternalServer, Role::PrivateProxy] {
        t.start(role);
        t.wait_ready(role).await;
    }
    let endpoint = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let params = |domain: &str, caller: &str| {
        json!({"domain": domain, "token": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
               "endpoint": endpoint.local_addr().unwrap().to_string(),
               "_client": {"name": caller, "entry": {"name": caller}}})
    };
    let private = t.private_rpc();
    for (domain, caller) in [
        ("other.internal-server.local", PUBLIC),
        (DOMAIN, "public-proxy-2"),
    ] {
        match call(&private, "incomingConnection", params(domain, caller)).await {
            Err(CallError::Rpc(e)) => {
                assert_eq!(e.code, jsonrpc::FORBIDDEN, "{domain}, {caller}: {e}")
            }
            other => panic!("{domain} from {caller}: expected 403, got {other:?}"),
        }
    }
    call(&private, "incomingConnection", params(DOMAIN, PUBLIC))
        .await
        .expect("incomingConnection for the announced domain, not yet answered");
    let (mut conn, _) = tokio::time::timeout(CLOSE_WAIT, endpoint.accept())
        .await
        .expect("the private proxy dialed the endpoint")
        .expect("accept");
    let mut token = [0u8; 32];
    tokio::time::timeout(CLOSE_WAIT, conn.read_exact(&mut token))
        .await
        .expect("the token within the deadline")
        .expect("read the token");
    assert_eq!(token, [1u8; 32]);
}

#[tokio::test(flavor = "multi_thread")]
async fn token_rules() {
    let t = Tunnel::started("tokens").await;

    // A wrong token: closed at once.
    let mut s = TcpStream::connect(t.public_internal_addr)
        .await
        .expect("connect");
    let mut token = [0u8; 32];
    getrandom::fill(&mut token).expect("OS random bytes");
    s.write_all(&token).await.expect("send");
    let (bytes, _) = read_until_closed(&mut s, CLOSE_WAIT)
        .await
        .expect("a data connection with a wrong token was not closed");
    assert_eq!(bytes, 0);

    // Part of a token, then nothing: closed at token_timeout, while clients go on working next to
    // it, and while wrong guesses hit the internal port.
    let mut stalled = TcpStream::connect(t.public_internal_addr)
        .await
        .expect("connect");
    stalled.write_all(&token[..5]).await.expect("send");
    let timeout = TOKEN_TIMEOUT + Duration::from_secs(3);
    let stalled_task = tokio::spawn(async move { read_until_closed(&mut stalled, timeout).await });
    // Guesses come from 127.0.0.2; past max_token_failures (20 per window by default) they are
    // refused without a log line.
    let internal = t.public_internal_addr;
    let guesses = tokio::spawn(async move {
        for _ in 0..30 {
            let mut s = connect_from("127.0.0.2", internal).await;
            let mut token = [0u8; 32];
            getrandom::fill(&mut token).expect("OS random bytes");
            s.write_all(&token).await.expect("send");
            let closed = read_until_closed(&mut s, CLOSE_WAIT).await;
            assert!(matches!(closed, Some((0, _))), "{closed:?}");
        }
    });
    for _ in 0..5 {
        assert!(t.works().await, "a client next to the token tests");
    }
    guesses.await.expect("wrong guesses closed");
    let (bytes, after) = stalled_task
        .await
        .expect("the stalled task")
        .expect("a data connection with part of a token was not closed");
    assert_eq!(bytes, 0);
    assert!(
        after + Duration::from_millis(100) >= TOKEN_TIMEOUT,
        "closed after {after:?}, before token_timeout {TOKEN_TIMEOUT:?}"
    );
    println!(
        "data connection with 5 bytes of a token closed after {:.2} s (token_timeout {:?})",
        after.as_secs_f64(),
        TOKEN_TIMEOUT
    );
    assert!(t.works().await);
    // The guessing address is marked: one warning for its 30 guesses, no line per guess after.
    let log = t.proc(Role::PublicProxy).log();
    assert_eq!(log.matches("too many wrong tokens").count(), 1, "{log}");
    assert!(
        t.works().await,
        "a client after the guessing address was marked"
    );
}

/// Sends `GET /bytes/{n}` (`Connection: close`) to `addr` with SNI [`DOMAIN`]; once the internal
/// server has read it, close_notify and FIN, before reading anything; then reads to the end of
/// the stream. An error unless that end was clean (no reset, no end without close_notify) after
/// a 200 response of exactly `n` zero bytes.
///
/// The alert waits for the server to have read the request (it logs each one): sent at once, it
/// often reaches the server with the request, is read with it, and nothing is left unread for
/// the lingering close to matter. (The client's socket turning readable does not tell: the
/// server's TLS 1.3 session tickets arrive before its response.)
async fn get_after_close_notify(
    t: &Tunnel,
    addr: std::net::SocketAddr,
    n: usize,
) -> Result<(), String> {
    let logged = format!("path=/bytes/{n}");
    let requests_read = || t.proc(Role::InternalServer).log().matches(&logged).count();
    let before = requests_read();
    let work = async {
        let (mut tls, _) = connect_tls(addr, t.client_config(), DOMAIN)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request =
            format!("GET /bytes/{n} HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n");
        tls.write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        tls.flush().await.map_err(|e| format!("send: {e}"))?;
        if !wait_until(ATTEMPT_TIMEOUT, || async { requests_read() > before }).await {
            return Err(format!(
                "the internal server did not log the request within {ATTEMPT_TIMEOUT:?}"
            ));
        }
        // close_notify, then shutdown(Write): FIN.
        tls.shutdown()
            .await
            .map_err(|e| format!("close_notify and FIN: {e}"))?;
        let mut buf = Vec::with_capacity(n + 4096);
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match tls.read(&mut chunk).await {
                Ok(0) => break,
                Ok(got) => buf.extend_from_slice(&chunk[..got]),
                Err(e) => {
                    return Err(format!(
                        "read error after {} bytes of response ({}): {e} ({:?})",
                        buf.len(),
                        body_progress(&buf, n),
                        e.kind()
                    ))
                }
            }
        }
        let reply = parse_response(&buf)
            .map_err(|e| format!("bad response: {e}"))?
            .ok_or_else(|| {
                format!(
                    "end of stream after {} bytes of response ({})",
                    buf.len(),
                    body_progress(&buf, n)
                )
            })?;
        // All bytes after the head: the body and nothing more.
        let got = body_bytes(&buf).unwrap_or(0);
        if reply.status != 200 || got != n {
            return Err(format!(
                "HTTP {} with {got} body bytes, expected 200 with {n}",
                reply.status
            ));
        }
        if reply.body.iter().any(|b| *b != 0) {
            return Err("the body is not all zero bytes".to_string());
        }
        Ok(())
    };
    tokio::time::timeout(LOADED_REQUEST_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(format!("not done within {LOADED_REQUEST_TIMEOUT:?}")))
}

/// The bytes after the head in `buf` (a response read so far); `None` before the head is
/// complete.
fn body_bytes(buf: &[u8]) -> Option<usize> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some(buf.len() - end - 4)
}

/// How much of an `n`-byte body `buf` (a response read so far) holds, for messages.
fn body_progress(buf: &[u8], n: usize) -> String {
    match body_bytes(buf) {
        Some(got) => format!("{got} of {n} body bytes"),
        None => "no complete head".to_string(),
    }
}

/// Connects to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::new(from.parse().expect("an IP"), 0))
        .expect("bind a loopback source address");
    socket.connect(to).await.expect("connect")
}

/// Runs `total` POSTs of `{}` to `/jsonrpc` at `addr` (SNI `DOMAIN`), `parallel` at a time, each
/// on a new connection; every one must get the demo's answer. Returns the wall time.
async fn hammer(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
    total: usize,
    parallel: usize,
) -> Duration {
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let workers: Vec<_> = (0..parallel)
        .map(|_| {
            let (next, failures, config) = (next.clone(), failures.clone(), config.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return;
                    }
                    let r = https_request(
                        addr,
                        config.clone(),
                        DOMAIN,
                        "POST",
                        "/jsonrpc",
                        b"{}",
                        LOADED_REQUEST_TIMEOUT,
                    )
                    .await;
                    match r {
                        Ok(r) if r.status == 200 && r.body == SUCCESS.as_bytes() => {}
                        Ok(r) => failures.lock().unwrap().push(format!(
                            "#{i}: HTTP {} {}",
                            r.status,
                            r.text()
                        )),
                        Err(e) => failures.lock().unwrap().push(format!("#{i}: {e}")),
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("a request worker");
    }
    let took = start.elapsed();
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {total} requests to {addr} failed; the first: {:#?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    took
}

/// `*.internal-server.local` routes every name one label below it (the internal server's
/// certificate is the same wildcard), an exact announcement keeps its own name, a name two
/// labels below is not routed, and another operator cannot take a name out of the wildcard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_announcements() {
    let t = Tunnel::started("wildcard").await;
    let private = t.private_rpc();
    let wildcard = "*.internal-server.local";
    let r = call(&private, "announceConnection", json!({"domain": wildcard}))
        .await
        .expect("announcing the wildcard");
    assert_eq!(r["domain"], wildcard, "{r}");
    for name in [
        "a.internal-server.local",
        "b-2.internal-server.local",
        DOMAIN,
    ] {
        assert!(
            t.works_for(name).await,
            "{name} is not routed by {wildcard}"
        );
    }
    let listed = announcements(&t.public_rpc(), "public").await;
    assert!(has(&listed, wildcard, "operator", PRIVATE), "{listed}");

    // One label only: a.b.internal-server.local has no announcement.
    let mut tcp = TcpStream::connect(t.public_addr).await.unwrap();
    let hello = rustls_hello(t.client_config(), "a.b.internal-server.local");
    tcp.write_all(&hello).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(ATTEMPT_TIMEOUT, tcp.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "a name two labels below the wildcard got an answer");

    // private-proxy-2 may announce under the same suffix, but not a name the wildcard covers,
    // nor the wildcard itself.
    let _other_eps = t.start_other_eps().await;
    let r = call(
        &t.other_eps_client(),
        "public-proxy-1.announceConnections",
        json!({"connections": [{"domain": "y.internal-server.local"}, {"domain": wildcard}]}),
    )
    .await
    .expect("announceConnections from private-proxy-2");
    for c in r["connections"].as_array().unwrap() {
        assert_eq!(c["accepted"], false, "{r}");
        assert_eq!(c["error"]["code"], jsonrpc::CONFLICT, "{r}");
    }
    assert!(
        r["connections"][0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("covered by *.internal-server.local"),
        "{r}"
    );
    assert!(t.works_for("y.internal-server.local").await);
}

/// What `client` (the `side` proxy) lists in getAnnouncements.
async fn announcements(client: &RpcClient, side: &str) -> Value {
    call(client, "getAnnouncements", json!({}))
        .await
        .unwrap_or_else(|e| panic!("{side} getAnnouncements: {e:?}"))
}

/// What `client` (the `side` proxy) lists in getAnnouncements, which must not name `domain`.
async fn listed_without(client: &RpcClient, side: &str, domain: &str) -> Value {
    let listed = announcements(client, side).await;
    assert!(
        !listed
            .as_array()
            .expect("a list")
            .iter()
            .any(|a| a["domain"] == domain),
        "the {side} proxy still lists {domain}: {listed}"
    );
    listed
}

/// True when `list` has an entry for `domain` whose `key` is `value`.
fn has(list: &Value, domain: &str, key: &str, value: &str) -> bool {
    list.as_array()
        .is_some_and(|l| l.iter().any(|a| a["domain"] == domain && a[key] == value))
}

/// Now plus (or, with `past`, minus) `d`, in RFC 3339.
fn rfc3339_from_now(d: Duration, past: bool) -> String {
    let now = time::OffsetDateTime::now_utc();
    let t = if past { now - d } else { now + d };
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339")
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_threads_setting() {
    const SERVING: [Role; 4] = [
        Role::PublicProxy,
        Role::PrivateProxy,
        Role::PublicEps,
        Role::PrivateEps,
    ];
    // The proxies set to one thread, the public EPS server to two, the private one left at
    // its default (one).
    let mut t = Tunnel::new("threads");
    for (role, setting) in [
        (Role::PublicProxy, "worker_threads: 1\n"),
        (Role::PrivateProxy, "worker_threads: 1\n"),
        (Role::PublicEps, "worker_threads: 2\n"),
    ] {
        std::fs::write(t.settings_dir(role).join("zz-threads.yml"), setting).unwrap();
    }
    t.start_all().await;
    assert!(t.works().await, "the tunnel works with these thread counts");
    for (role, threads) in SERVING.into_iter().zip([1, 1, 2, 1]) {
        let log = t.proc(role).log();
        let want = format!("worker_threads={threads}");
        assert!(log.contains(&want), "{}: {want} in {log}", role.name());
    }
    // Zero is refused before anything is bound, with the setting named.
    std::fs::write(
        t.settings_dir(Role::PublicProxy).join("zz-threads.yml"),
        "worker_threads: 0\n",
    )
    .unwrap();
    let p = t.proc_mut(Role::PublicProxy);
    p.restart();
    let status = p.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(64), "{}", p.run_log());
    assert!(p.run_log().contains("worker_threads"), "{}", p.run_log());
}

/// Each proxy runs its operator's EPS server inside its own process (`eps: {embedded: DIRS}`,
/// the EPS server's settings unchanged): three processes instead of five. The tunnel works; the
/// embedded servers still serve other local clients and peers in their own processes, and add
/// the authenticated caller as `_client` to what they deliver in-process, a forged one
/// replaced. Settings that name both forms, or another operator's server, are refused before
/// anything is bound; SIGTERM stops the proxy and its EPS server together.
#[tokio::test(flavor = "multi_thread")]
async fn embedded_eps_servers() {
    let mut t = Tunnel::new("embedded");
    for (proxy, eps) in [
        (Role::PublicProxy, Role::PublicEps),
        (Role::PrivateProxy, Role::PrivateEps),
    ] {
        let eps_dir = t.settings_dir(eps).display().to_string();
        eps_tests::tunnel::embed_eps(t.settings_dir(proxy), &eps_dir);
    }
    for role in [Role::InternalServer, Role::PublicProxy, Role::PrivateProxy] {
        t.start(role);
        t.wait_ready(role).await;
    }
    assert!(
        t.wait_tunnel(eps_tests::tunnel::TUNNEL_WAIT)
            .await
            .is_some(),
        "no request went through the tunnel of two proxies with embedded EPS servers"
    );
    let (status, body) = curl(&t.root(), t.public_addr, DOMAIN, None).await;
    assert_eq!((status, body.as_str()), (200, SUCCESS));
    for role in [Role::PublicProxy, Role::PrivateProxy] {
        let log = t.proc(role).log();
        assert!(
            log.contains("EPS server ready") && log.contains("eps=the embedded EPS server"),
            "{}: {log}",
            role.name()
        );
    }

    // Another local client of the public operator calls through the embedded server's JSON-RPC
    // listener; the private side's embedded server delivers the call to its proxy in-process.
    let listed = call(
        &rpc_client(
            &t.public_eps.jsonrpc_url(),
            Some(&t.pki.tls(PUBLIC)),
            eps_tests::tunnel::RPC_TIMEOUT,
        ),
        "private-proxy-1.getAnnouncements",
        json!({}),
    )
    .await
    .expect("getAnnouncements of the private proxy through the embedded servers");
    assert!(listed.to_string().contains(DOMAIN), "{listed}");

    // A peer in its own process (private-proxy-2's EPS server) announces the domain held by
    // private-proxy-1, once plainly and once with a forged `_client` naming the holder: both
    // are refused with 409, since the embedded server delivers who really called.
    let _other_eps = t.start_other_eps().await;
    for params in [
        json!({"connections": [{"domain": DOMAIN}]}),
        json!({"connections": [{"domain": DOMAIN}],
               "_client": {"name": PRIVATE, "entry": {"name": PRIVATE}}}),
    ] {
        takeover_refused(&t, params).await;
    }
    assert!(t.works().await, "{DOMAIN} after the refused takeovers");

    // SIGTERM stops the private proxy and its EPS server with it (exit 0): the public side's
    // server sees the reverse stream the private one held end.
    assert!(!t
        .proc(Role::PublicProxy)
        .log()
        .contains("reverse stream ended"));
    let status = t
        .proc_mut(Role::PrivateProxy)
        .stop(Duration::from_secs(15))
        .await;
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    let public = t.proc(Role::PublicProxy);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            public.log().contains("reverse stream ended")
        })
        .await,
        "{}",
        public.log()
    );

    // Both forms at once, and another operator's EPS server, are refused (exit 64) with the
    // setting named.
    let bad_forms = [
        (
            format!(
                "eps: {{url: \"https://127.0.0.1:9/jsonrpc\", embedded: {}}}\n",
                t.settings_dir(Role::PublicEps).display()
            ),
            "not both",
        ),
        (
            format!(
                "eps: {{embedded: {}}}\n",
                t.settings_dir(Role::PrivateEps).display()
            ),
            "a proxy embeds its own operator's server",
        ),
    ];
    for (yaml, why) in bad_forms {
        std::fs::write(t.settings_dir(Role::PublicProxy).join("zzz-bad.yml"), yaml).unwrap();
        let p = t.proc_mut(Role::PublicProxy);
        p.restart();
        let status = p.wait_exit(Duration::from_secs(10)).await;
        assert_eq!(status.and_then(|s| s.code()), Some(64), "{}", p.run_log());
        assert!(p.run_log().contains(why), "{why}: {}", p.run_log());
    }
}

/// `private-proxy-2` announces with `params` through its own EPS server, for the domain
/// `private-proxy-1` holds: refused with 409.
async fn takeover_refused(t: &Tunnel, params: serde_json::Value) {
    let r = call(
        &t.other_eps_client(),
        "public-proxy-1.announceConnections",
        params,
    )
    .await
    .expect("announceConnections from private-proxy-2");
    assert_eq!(r["connections"][0]["accepted"], false, "{r}");
    assert_eq!(
        r["connections"][0]["error"]["code"],
        jsonrpc::CONFLICT,
        "{r}"
    );
}
