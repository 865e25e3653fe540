//! The public port's first bytes: ClientHellos in every legal shape are routed, and every
//! broken, oversized or unroutable one is closed at once, unrouted and counted.

use std::io::Write;
use std::time::{Duration, Instant};

use eps_tests::tunnel::{Reply, Role, DOMAIN, SUCCESS};
use eps_tests::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::fixture::{serial, Fx, Recorder};
use crate::hellos::{
    frame, grease_hello, hello_with_names, large_hello, records_of_first_message, shaped_request,
    unframe,
};

/// Time a refused connection may stay open once its first bytes are recognisably wrong.
const REFUSAL: Duration = Duration::from_secs(1);
/// Time a test waits for something that should happen at once (beyond [`REFUSAL`]).
const WAIT: Duration = Duration::from_secs(5);
/// Pause between the bytes of a ClientHello sent one byte per TCP segment.
const DRIBBLE_PAUSE: Duration = Duration::from_millis(1);

/// Runs [`shaped_request`] through the tunnel on a blocking thread; the reply and its latency.
async fn shaped(
    fx: &Fx,
    send: impl FnOnce(&mut std::net::TcpStream, &[u8]) -> std::io::Result<()> + Send + 'static,
) -> (Reply, Duration) {
    let (addr, config) = (fx.t.public_addr, fx.t.client_config());
    let start = Instant::now();
    let reply =
        tokio::task::spawn_blocking(move || shaped_request(addr, config, DOMAIN, "/jsonrpc", send))
            .await
            .expect("the request thread")
            .expect("a request through the tunnel");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.body, SUCCESS.as_bytes());
    (reply, start.elapsed())
}

/// `eps_proxy_client_hello_seconds_sum` of the public proxy.
async fn hello_seconds(fx: &Fx) -> f64 {
    fx.metrics(Role::PublicProxy)
        .await
        .value("eps_proxy_client_hello_seconds_sum", "")
}

#[tokio::test(flavor = "multi_thread")]
async fn client_hello_shapes_are_routed_end_to_end() {
    let _serial = serial().await;
    let mut fx = Fx::new("hello-shapes");
    fx.start_all().await;

    // (a) One byte per TCP segment (TCP_NODELAY, a pause after each byte).
    let before = hello_seconds(&fx).await;
    let (_, took) = shaped(&fx, |tcp, hello| {
        for b in hello {
            tcp.write_all(std::slice::from_ref(b))?;
            std::thread::sleep(DRIBBLE_PAUSE);
        }
        Ok(())
    })
    .await;
    let waited = hello_seconds(&fx).await - before;
    let len = rustls_hello(fx.t.client_config(), DOMAIN).len();
    println!(
        "(a) ClientHello of {len} bytes sent one byte per segment: answered after {:.3} s, the \
         public proxy read it for {waited:.3} s",
        took.as_secs_f64()
    );
    // The proxy really read it piecewise: it waited about as long as the client dribbled.
    assert!(
        waited >= len as f64 * DRIBBLE_PAUSE.as_secs_f64() * 0.8,
        "the public proxy spent only {waited:.3} s reading a ClientHello dribbled over {len} ms"
    );

    // (b) Two writes one second apart.
    let (_, took) = shaped(&fx, |tcp, hello| {
        let (first, second) = hello.split_at(hello.len() / 2);
        tcp.write_all(first)?;
        std::thread::sleep(Duration::from_secs(1));
        tcp.write_all(second)
    })
    .await;
    println!(
        "(b) ClientHello in two writes 1 s apart: answered after {:.3} s",
        took.as_secs_f64()
    );
    assert!(took >= Duration::from_secs(1));

    // (c) The ClientHello re-framed into TLS records of 100 bytes, sent in one write; the
    // internal server (rustls) reassembles the handshake message from them.
    let hello = rustls_hello(fx.t.client_config(), DOMAIN);
    let records = records_of_first_message(&frame(&unframe(&hello), 100));
    assert!(records > 2, "{records} records");
    let (_, took) = shaped(&fx, |tcp, hello| {
        tcp.write_all(&frame(&unframe(hello), 100))
    })
    .await;
    println!(
        "(c) ClientHello in {records} records of <= 100 bytes: answered after {:.3} s",
        took.as_secs_f64()
    );

    // (c') openssl with -max_send_frag 512. It fragments handshake messages too, but its
    // ClientHello is about 330 bytes: long ALPN names make it larger than one fragment.
    let alpn = format!("http/1.1,{},{}", "x".repeat(200), "y".repeat(200));
    let first_flight = openssl_first_flight(&fx, &alpn).await;
    let records = records_of_first_message(&first_flight);
    let plain = records_of_first_message(&openssl_first_flight(&fx, "http/1.1").await);
    println!(
        "(c') openssl s_client -max_send_frag 512: {plain} record(s) for its default \
         ClientHello, {records} for one with long ALPN names ({} bytes)",
        first_flight.len()
    );
    assert!(records >= 2, "openssl did not split its ClientHello");
    let start = Instant::now();
    let body = openssl_get(&fx, &alpn).await;
    assert!(body.ends_with(SUCCESS), "openssl's output: {body}");
    println!(
        "(c') the same through the tunnel: answered after {:.3} s",
        start.elapsed().as_secs_f64()
    );
}

/// The arguments of `openssl s_client` to `port` for the tunnel's domain.
fn openssl_args(fx: &Fx, port: u16, alpn: &str) -> Vec<String> {
    [
        "s_client",
        "-connect",
        &format!("127.0.0.1:{port}"),
        "-servername",
        DOMAIN,
        "-verify_hostname",
        DOMAIN,
        "-verify_return_error",
        "-CAfile",
        &fx.t.root().display().to_string(),
        "-max_send_frag",
        "512",
        "-alpn",
        alpn,
        "-quiet",
        "-ign_eof",
    ]
    .map(String::from)
    .to_vec()
}

/// Starts `openssl s_client` towards `port` (see [`openssl_args`]) with a piped stdin, and its
/// stdout and stderr piped with `capture` (dropped without).
fn spawn_openssl(fx: &Fx, port: u16, alpn: &str, capture: bool) -> tokio::process::Child {
    let out = || {
        if capture {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        }
    };
    tokio::process::Command::new("openssl")
        .args(openssl_args(fx, port, alpn))
        .stdin(std::process::Stdio::piped())
        .stdout(out())
        .stderr(out())
        .kill_on_drop(true)
        .spawn()
        .expect("running openssl (apt-get install openssl)")
}

/// What `openssl s_client` sends first (its ClientHello records), captured by a listener.
async fn openssl_first_flight(fx: &Fx, alpn: &str) -> Vec<u8> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let mut child = spawn_openssl(fx, port, alpn, false);
    let (mut s, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("openssl connects")
        .expect("accept");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(n @ 1..) = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await {
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let _ = child.kill().await;
    got
}

/// `GET /jsonrpc` through the tunnel with `openssl s_client`; what it printed.
async fn openssl_get(fx: &Fx, alpn: &str) -> String {
    let mut child = spawn_openssl(fx, fx.t.public_addr.port(), alpn, true);
    let request = format!("GET /jsonrpc HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(request.as_bytes()).await.expect("stdin");
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("openssl finished within 15 s")
        .expect("openssl's output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "openssl s_client failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn crafted_client_hellos_arrive_byte_exact() {
    let _serial = serial().await;
    let recorder = Recorder::start().await;
    let mut fx = Fx::new("hello-exact");
    fx.configure(
        Role::PrivateProxy,
        json!({"private": {"internal_endpoint": recorder.addr.to_string()}}),
    );
    fx.start_announced().await;
    let public = fx.t.public_addr;

    // (d) A ClientHello of about 21 KB, in two records (16384 + the rest).
    let large = large_hello(DOMAIN, 21_000);
    assert_eq!(records_of_first_message(&large), 2);
    let d = arrives_exact(public, &recorder, 0, &large, "21 KB").await;
    println!(
        "(d) a {} byte ClientHello in 2 records arrived byte-exact",
        large.len()
    );

    // (e) GREASE cipher suite, extensions, group, version and key share.
    let grease = grease_hello(DOMAIN);
    let e = arrives_exact(public, &recorder, 1, &grease, "GREASE").await;
    println!(
        "(e) a {} byte ClientHello with GREASE values arrived byte-exact",
        grease.len()
    );

    // (f) Bytes after the ClientHello, in the same write and later, and bytes back.
    let hello = rustls_hello(fx.t.client_config(), DOMAIN);
    let (same_write, later) = (b"bytes in the ClientHello's write", b"and bytes sent later");
    let mut f = TcpStream::connect(public).await.expect("connect");
    f.write_all(&[hello.as_slice(), same_write].concat())
        .await
        .expect("send");
    let got = recorder
        .wait_data(2, hello.len() + same_write.len(), WAIT)
        .await;
    assert!(got == [hello.as_slice(), same_write].concat());
    tokio::time::sleep(Duration::from_millis(300)).await;
    f.write_all(later).await.expect("send");
    let total = hello.len() + same_write.len() + later.len();
    let got = recorder.wait_data(2, total, WAIT).await;
    assert!(
        got == [hello.as_slice(), same_write, later].concat(),
        "{:?}",
        String::from_utf8_lossy(&got[hello.len()..])
    );
    recorder.write(2, b"the server's answer").await;
    let mut back = [0u8; 19];
    tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read_exact(&mut f, &mut back))
        .await
        .expect("the answer in time")
        .expect("the answer");
    assert_eq!(&back, b"the server's answer");
    println!("(f) bytes after the ClientHello (same write and later) and back arrived byte-exact");
    assert_eq!(recorder.connections(), 3);
    drop((d, e));
}

/// One refused first flight: what the client sends, whether it then closes its side, and the
/// refusal reason the public proxy counts.
struct Refusal {
    what: &'static str,
    bytes: Vec<u8>,
    fin: bool,
    reason: &'static str,
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_first_bytes_are_closed_at_once_and_not_routed() {
    const MAX_HELLO: usize = 16_384;
    let _serial = serial().await;
    let recorder = Recorder::start().await;
    let mut fx = Fx::new("hello-refused");
    fx.configure(
        Role::PublicProxy,
        json!({"public": {"limits": {"max_client_hello_bytes": MAX_HELLO}}}),
    );
    fx.configure(
        Role::PrivateProxy,
        json!({"private": {"internal_endpoint": recorder.addr.to_string()}}),
    );
    fx.start_announced().await;
    let config = fx.t.client_config();
    let hello = rustls_hello(config.clone(), DOMAIN);
    let mut no_sni = (*config).clone();
    no_sni.enable_sni = false;
    let record_header = |len: u16| [&[22u8, 3, 1][..], &len.to_be_bytes()].concat();

    let cases = [
        Refusal {
            what: "plain HTTP",
            bytes: b"GET / HTTP/1.1\r\nHost: test.internal-server.local\r\n\r\n".to_vec(),
            fin: false,
            reason: "not_tls",
        },
        Refusal {
            what: "half a ClientHello, then FIN",
            bytes: hello[..hello.len() / 2].to_vec(),
            fin: true,
            reason: "truncated",
        },
        Refusal {
            what: "a record header announcing 17000 bytes (bound 16384)",
            bytes: record_header(17_000),
            fin: false,
            reason: "too_large",
        },
        Refusal {
            what: "a record header announcing 20000 bytes (over TLS's 2^14 + 2048)",
            bytes: record_header(20_000),
            fin: false,
            reason: "malformed",
        },
        Refusal {
            what: "a 20 KB ClientHello (bound 16384)",
            bytes: large_hello(DOMAIN, 20_000),
            fin: false,
            reason: "too_large",
        },
        Refusal {
            what: "a 20 KB ClientHello in records of 1000 bytes (bound 16384)",
            bytes: frame(&unframe(&large_hello(DOMAIN, 20_000)), 1000),
            fin: false,
            reason: "too_large",
        },
        Refusal {
            what: "a handshake message that is not a ClientHello",
            bytes: vec![22, 3, 3, 0, 4, 2, 0, 0, 0],
            fin: false,
            reason: "not_client_hello",
        },
        Refusal {
            what: "no SNI",
            bytes: rustls_hello(std::sync::Arc::new(no_sni), DOMAIN),
            fin: false,
            reason: "no_sni",
        },
        Refusal {
            what: "an unknown SNI",
            bytes: rustls_hello(config.clone(), "nope.internal-server.local"),
            fin: false,
            reason: "unknown_sni",
        },
        Refusal {
            what: "an empty SNI host name",
            bytes: hello_with_names(&[b""]),
            fin: false,
            reason: "invalid_sni",
        },
        Refusal {
            what: "two SNI host names",
            bytes: hello_with_names(&[DOMAIN.as_bytes(), b"other.internal-server.local"]),
            fin: false,
            reason: "invalid_sni",
        },
        Refusal {
            what: "an IP address as SNI",
            bytes: hello_with_names(&[b"10.0.0.1"]),
            fin: false,
            reason: "invalid_sni",
        },
    ];
    for case in &cases {
        let before = fx.refused(case.reason).await;
        let mut s = TcpStream::connect(fx.t.public_addr).await.expect("connect");
        // The proxy may close (and reset) before the last byte is written.
        let _ = s.write_all(&case.bytes).await;
        if case.fin {
            let _ = s.shutdown().await;
        }
        let (bytes, after) = read_until_closed(&mut s, WAIT)
            .await
            .unwrap_or_else(|| panic!("{}: still open after {WAIT:?}", case.what));
        assert_eq!(bytes, 0, "{}: the public proxy answered", case.what);
        assert!(
            after <= REFUSAL,
            "{}: closed only after {after:?}",
            case.what
        );
        let counted = wait_until(WAIT, || async {
            fx.refused(case.reason).await == before + 1
        })
        .await;
        assert!(
            counted,
            "{}: refusal not counted as {}",
            case.what, case.reason
        );
        println!(
            "{:<66} closed after {:>6.1} ms, counted as {}",
            case.what,
            after.as_secs_f64() * 1000.0,
            case.reason
        );
    }

    // Nothing was dialed: the private proxy got no incomingConnection, the recorder no
    // connection. A good ClientHello then is (the route was alive all along).
    let private = fx.metrics(Role::PrivateProxy).await;
    let incoming = "eps_proxy_connections_accepted_total";
    assert_eq!(private.value(incoming, "listener=\"incoming\""), 0.0);
    assert_eq!(recorder.connections(), 0, "a refused client was routed");
    let mut good = TcpStream::connect(fx.t.public_addr).await.expect("connect");
    good.write_all(&hello).await.expect("send");
    assert!(recorder.wait_data(0, hello.len(), WAIT).await == hello);
    let private = fx.metrics(Role::PrivateProxy).await;
    assert_eq!(private.value(incoming, "listener=\"incoming\""), 1.0);

    // Each refusal was logged at debug, with its reason.
    let log = fx.proc(Role::PublicProxy).log();
    for case in &cases {
        let logged = if case.reason == "unknown_sni" {
            log.contains("no live announcement for this name")
        } else {
            log.lines().any(|l| {
                l.contains("DEBUG")
                    && l.contains("client closed before routing")
                    && l.contains(case.reason)
            })
        };
        assert!(logged, "{}: no debug line for {}", case.what, case.reason);
    }
}

/// Sends `hello` on a new connection to `public`; the internal server's connection `i` must
/// receive it byte-exact (`what` names the ClientHello). The connection, left open.
async fn arrives_exact(
    public: std::net::SocketAddr,
    recorder: &Recorder,
    i: usize,
    hello: &[u8],
    what: &str,
) -> TcpStream {
    let mut s = TcpStream::connect(public).await.expect("connect");
    s.write_all(hello).await.expect("send");
    let got = recorder.wait_data(i, hello.len(), WAIT).await;
    assert!(got == hello, "the {what} ClientHello arrived changed");
    s
}
