//! Operating it (README "Operating it"): Prometheus metrics and health endpoints, graceful
//! shutdown on SIGTERM, reload on SIGHUP, the PROXY protocol header, the operator commands
//! (`eps call`, `eps settings check`, `proxy settings check`) and JSON logs.
//!
//! The fixture is the demo's five processes (`support/tunnel.rs`); a test changes a process's
//! settings by writing a later `zz-*.yml` into its settings folder before starting it, and
//! starts a process itself where it needs other arguments or environment. Build the binaries
//! first: `cargo build --workspace && cargo test -p eps-tests --test ops`. Measurements are
//! printed (`-- --nocapture` shows them).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eps_tests::keepalive::KeepAlive;
use eps_tests::tunnel::{
    Role, Tunnel, ATTEMPT_TIMEOUT, DOMAIN, PRIVATE, PROCESS_WAIT, PUBLIC, SUCCESS, TUNNEL_WAIT,
};
use eps_tests::*;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "ops/rotation.rs"]
mod rotation;

/// Requests sent through the tunnel for the metrics test.
const REQUESTS: u64 = 20;
/// Time counters get to settle after the last request (relays end once both sides closed).
const SETTLE: Duration = Duration::from_secs(10);
/// Time a process gets to react to a signal or a peer's death.
const REACT: Duration = Duration::from_secs(15);
/// The four processes with settings (the internal server has none, and no metrics).
const WITH_SETTINGS: [Role; 4] = [
    Role::PublicProxy,
    Role::PrivateProxy,
    Role::PublicEps,
    Role::PrivateEps,
];

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_happens() {
    let mut t = Tunnel::new("ops-metrics");
    let m = enable_metrics(&t);
    t.start_all().await;
    let public = m[&Role::PublicProxy];

    // Nothing of the start-up requests still in flight: no client waiting or relayed, and every
    // client whose name was announced has had its incomingConnection answered.
    let settled = wait_until(SETTLE, || async {
        let (Ok(p), Ok(e)) = (scrape(public).await, scrape(m[&Role::PublicEps]).await) else {
            return false;
        };
        let routed = p.get("eps_proxy_client_hello_seconds_count", &[])
            - p.get(
                "eps_proxy_connections_refused_total",
                &[("reason", "unknown_sni")],
            );
        let calls = [("direction", "out"), ("method", "incomingConnection")];
        p.get("eps_proxy_pending_tokens", &[]) == 0.0
            && p.get("eps_proxy_active_relays", &[]) == 0.0
            && e.get("eps_calls_total", &calls) == routed
    })
    .await;
    assert!(settled, "requests of the start still in flight");
    // The private EPS server holds one reverse stream to the public one, which accepted it.
    for (role, side, peer) in [
        (Role::PrivateEps, "held", PUBLIC),
        (Role::PublicEps, "accepted", PRIVATE),
    ] {
        let s = scrape(m[&role]).await.expect("scraping an EPS server");
        let labels = [("side", side), ("peer", peer)];
        assert_eq!(s.get("eps_reverse_streams", &labels), 1.0, "{}", s.text);
    }
    let before = scrape(public).await.expect("scraping the public proxy");
    let before_eps = scrape(m[&Role::PublicEps]).await.expect("scraping its EPS");
    let before_private = scrape(m[&Role::PrivateProxy])
        .await
        .expect("scraping the private proxy");

    for i in 0..REQUESTS {
        let r = t
            .fetch(DOMAIN, "POST", "/jsonrpc", b"{}")
            .await
            .unwrap_or_else(|e| panic!("request #{i}: {e}"));
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, SUCCESS),
            "request #{i}"
        );
    }
    // Relays are counted as they end, incomingConnection once answered: wait until all are in.
    let out_ok = [
        ("direction", "out"),
        ("method", "incomingConnection"),
        ("outcome", "ok"),
    ];
    let done = wait_until(SETTLE, || async {
        let (Ok(p), Ok(e)) = (scrape(public).await, scrape(m[&Role::PublicEps]).await) else {
            return false;
        };
        p.delta(&before, "eps_proxy_relays_ended_total", &[]) == REQUESTS as f64
            && p.get("eps_proxy_active_relays", &[]) == 0.0
            && e.delta(&before_eps, "eps_calls_total", &out_ok) == REQUESTS as f64
    })
    .await;
    let after = scrape(public).await.expect("scraping the public proxy");
    let after_eps = scrape(m[&Role::PublicEps]).await.expect("scraping its EPS");
    assert!(
        done,
        "counters did not settle:\npublic proxy:\n{}\nits EPS server:\n{}",
        after.text, after_eps.text
    );
    let n = REQUESTS as f64;
    let public_listener = [("listener", "public")];
    for (name, labels, want) in [
        (
            "eps_proxy_connections_accepted_total",
            &public_listener[..],
            n,
        ),
        ("eps_proxy_connections_relayed_total", &[], n),
        // Outcome `done`, or `error` when a client hangs up with TLS records unread (a reset).
        ("eps_proxy_relays_ended_total", &[], n),
        ("eps_proxy_client_hello_seconds_count", &[], n),
        ("eps_proxy_dial_back_seconds_count", &[], n),
        ("eps_proxy_connections_refused_total", &[], 0.0),
    ] {
        assert_eq!(
            after.delta(&before, name, labels),
            want,
            "{name}{labels:?} on the public proxy:\n{}",
            after.text
        );
    }
    for direction in ["client_to_server", "server_to_client"] {
        let d = after.delta(
            &before,
            "eps_proxy_relayed_bytes_total",
            &[("direction", direction)],
        );
        assert!(d > 0.0, "relayed bytes {direction}: {d}\n{}", after.text);
    }
    assert_eq!(after.get("eps_proxy_pending_tokens", &[]), 0.0);
    // The live-announcements gauge is refreshed every second.
    let gauge = wait_until(SETTLE, || async {
        scrape(public)
            .await
            .is_ok_and(|s| s.get("eps_proxy_announcements", &[]) == 1.0)
    })
    .await;
    assert!(gauge, "eps_proxy_announcements is not 1:\n{}", after.text);
    assert_eq!(
        after_eps.delta(&before_eps, "eps_calls_total", &out_ok),
        n,
        "{}",
        after_eps.text
    );
    assert_eq!(
        after_eps.delta(
            &before_eps,
            "eps_call_seconds_count",
            &[("direction", "out"), ("method", "incomingConnection")]
        ),
        n,
        "{}",
        after_eps.text
    );
    // The private proxy dialed back as often.
    let private = scrape(m[&Role::PrivateProxy])
        .await
        .expect("scraping the private proxy");
    assert_eq!(
        private.delta(
            &before_private,
            "eps_proxy_connections_accepted_total",
            &[("listener", "incoming")]
        ),
        n,
        "{}",
        private.text
    );
    assert_eq!(
        private.delta(&before_private, "eps_proxy_connections_relayed_total", &[]),
        n
    );

    // Plain HTTP on the TLS port: refused as not_tls.
    let mut s = TcpStream::connect(t.public_addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    let closed = read_until_closed(&mut s, Duration::from_secs(2))
        .await
        .map(|(n, _)| n);
    assert_eq!(closed, Some(0), "plaintext was answered or left open");
    let refused = wait_until(SETTLE, || async {
        scrape(public).await.is_ok_and(|s| {
            s.delta(
                &after,
                "eps_proxy_connections_refused_total",
                &[("reason", "not_tls")],
            ) == 1.0
        })
    })
    .await;
    let last = scrape(public).await.expect("scraping the public proxy");
    assert!(refused, "not_tls not counted:\n{}", last.text);
    assert_eq!(
        last.delta(
            &after,
            "eps_proxy_connections_accepted_total",
            &public_listener
        ),
        1.0
    );
    // Every process serves metrics in the Prometheus text format.
    for role in WITH_SETTINGS {
        let (status, body) = http_get(m[&role], "/metrics").await.expect("GET /metrics");
        assert_eq!(status, 200, "{}", role.name());
        assert!(
            body.trim_end().ends_with("# EOF"),
            "{}: {body}",
            role.name()
        );
    }
    println!(
        "metrics: {REQUESTS} requests through the tunnel counted exactly at the public proxy, \
         its EPS server and the private proxy; relayed bytes up {} / down {}",
        after.delta(
            &before,
            "eps_proxy_relayed_bytes_total",
            &[("direction", "client_to_server")]
        ),
        after.delta(
            &before,
            "eps_proxy_relayed_bytes_total",
            &[("direction", "server_to_client")]
        ),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_readiness() {
    let mut t = Tunnel::new("ops-health");
    let m = enable_metrics(&t);
    t.start_all().await;
    for role in WITH_SETTINGS {
        assert_eq!(
            status_of(m[&role], "/healthz").await,
            Some(200),
            "{}",
            role.name()
        );
        let ready = wait_until(REACT, || async {
            status_of(m[&role], "/readyz").await == Some(200)
        })
        .await;
        assert!(ready, "{} is not ready", role.name());
    }
    assert_eq!(status_of(m[&Role::PublicProxy], "/nope").await, Some(404));

    // The public proxy's EPS server goes: the proxy is alive but not ready.
    let public = m[&Role::PublicProxy];
    t.proc_mut(Role::PublicEps).kill();
    let killed = Instant::now();
    let unready = wait_until(REACT, || async {
        matches!(http_get(public, "/readyz").await,
                 Ok((503, body)) if body.contains("EPS server"))
    })
    .await;
    assert!(
        unready,
        "/readyz of the public proxy: {:?}",
        http_get(public, "/readyz").await
    );
    let unready_after = killed.elapsed();
    assert_eq!(status_of(public, "/healthz").await, Some(200));
    assert_eq!(
        status_of(m[&Role::PrivateProxy], "/readyz").await,
        Some(200),
        "the private proxy's EPS server is up"
    );

    t.restart(Role::PublicEps);
    let restarted = Instant::now();
    let ready = wait_until(REACT, || async {
        status_of(public, "/readyz").await == Some(200)
    })
    .await;
    assert!(ready, "/readyz: {:?}", http_get(public, "/readyz").await);
    let ready_after = restarted.elapsed();
    assert!(
        t.wait_tunnel(TUNNEL_WAIT).await.is_some(),
        "the tunnel after the restart"
    );
    println!(
        "readiness: public proxy /readyz 503 {:.3} s after its EPS server was killed, 200 again \
         {:.3} s after it was restarted",
        unready_after.as_secs_f64(),
        ready_after.as_secs_f64()
    );
}

/// A proxy whose stderr is a pipe nobody reads any more (a log shipper or terminal gone) goes on
/// relaying, and still drains and exits 0 on SIGTERM: a log line that cannot be written is
/// dropped instead of failing the task that logged it.
#[tokio::test(flavor = "multi_thread")]
async fn a_log_pipe_without_reader_stops_nothing() {
    /// Kills the proxy if the test fails before it exits.
    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut t = Tunnel::new("ops-logpipe");
    t.start_all().await;
    // The public proxy again, by itself: its stderr a pipe whose read end is closed once it
    // serves.
    t.proc_mut(Role::PublicProxy).stop(REACT).await;
    let mut proxy = Child(
        std::process::Command::new(bin_path("proxy"))
            .args(["run", "public"])
            .env("PROXY_SETTINGS", t.settings_dir(Role::PublicProxy))
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting the public proxy"),
    );
    assert!(
        t.wait_tunnel(TUNNEL_WAIT).await.is_some(),
        "the tunnel through the restarted public proxy"
    );
    drop(proxy.0.stderr.take());
    // Every relayed connection now logs into the closed pipe.
    for i in 0..3 {
        assert!(t.works().await, "request {i} after its log pipe closed");
    }
    signal(proxy.0.id(), libc::SIGTERM);
    let exited = wait_until(REACT, || {
        let status = proxy.0.try_wait().expect("try_wait");
        async move { status.is_some() }
    })
    .await;
    assert!(exited, "no exit within {REACT:?} of SIGTERM");
    let status = proxy.0.wait().expect("exit status");
    assert!(status.success(), "exit after SIGTERM: {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_a_download_finish() {
    /// The download: 16 MiB read at 4 MiB/s, about 4 s.
    const BYTES: u64 = 16 * 1024 * 1024;
    const RATE: f64 = 4.0 * 1024.0 * 1024.0;
    const GRACE: Duration = Duration::from_secs(10);
    let mut t = Tunnel::new("ops-sigterm");
    t.dir.write_yaml(
        t.settings_dir(Role::PublicProxy).join("zz-grace.yml"),
        &json!({"shutdown_grace_period": GRACE.as_secs_f64()}),
    );
    t.start_all().await;

    let progress = Arc::new(AtomicU64::new(0));
    let download = {
        let (addr, config, progress) = (t.public_addr, t.client_config(), progress.clone());
        tokio::spawn(async move { slow_download(addr, config, BYTES, RATE, &progress).await })
    };
    let in_flight = wait_until(REACT, || async {
        progress.load(Ordering::Relaxed) >= 1024 * 1024
    })
    .await;
    assert!(in_flight, "the download did not start");
    let pid = t.proc(Role::PublicProxy).pid();
    signal(pid, libc::SIGTERM);
    let signalled = Instant::now();
    t.proc_mut(Role::PublicProxy)
        .wait_for_log(
            "shutting down: no new connections; waiting for relays",
            REACT,
        )
        .await;

    // New clients are turned away: the connection is refused, or closed without a byte of TLS.
    let turned_away = wait_until(Duration::from_secs(3), || async {
        match TcpStream::connect(t.public_addr).await {
            Err(_) => true,
            Ok(mut s) => {
                let _ = s.write_all(&rustls_hello(t.client_config(), DOMAIN)).await;
                read_until_closed(&mut s, Duration::from_millis(500))
                    .await
                    .is_some_and(|(n, _)| n == 0)
            }
        }
    })
    .await;
    let during = progress.load(Ordering::Relaxed);
    assert!(
        turned_away,
        "a new connection to the public port after SIGTERM was neither refused nor closed"
    );
    assert!(
        during < BYTES,
        "the download ended before the new client was tried"
    );

    let got = download
        .await
        .expect("the download task")
        .expect("the download through the tunnel");
    let downloaded = signalled.elapsed();
    assert_eq!(got, BYTES, "bytes downloaded");
    let status = t.proc_mut(Role::PublicProxy).wait_exit(GRACE).await;
    let exited = signalled.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "the public proxy after SIGTERM: {status:?}\n{}",
        t.proc(Role::PublicProxy).run_log()
    );
    assert!(exited < GRACE, "exited {exited:?} after SIGTERM");
    let log = t.proc(Role::PublicProxy).run_log();
    assert!(log.contains("all relays finished"), "{log}");
    println!(
        "SIGTERM with a {} MiB download in flight ({} MiB done): new clients turned away, the \
         download completed {:.2} s after the signal, exit 0 after {:.2} s (grace {GRACE:?})",
        BYTES >> 20,
        during >> 20,
        downloaded.as_secs_f64(),
        exited.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_directory_and_announcements() {
    let mut t = Tunnel::started("ops-sighup").await;
    let mut kept = KeepAlive::open(t.public_addr, t.client_config(), DOMAIN)
        .await
        .expect("a kept-alive connection through the tunnel");
    kept.expect_success("before the reloads").await;

    // The public side may call private-proxy-1.getAnnouncements...
    let public_eps = t.settings_dir(Role::PublicEps).to_path_buf();
    let get = "private-proxy-1.getAnnouncements";
    let out = eps(&public_eps, &["call", get, "{}"]).await;
    assert_success(&out, "eps call as public-proxy-1");
    // ...until the directory takes that right away (incomingConnection stays allowed).
    let directory = t.dir.join("directory");
    write_records(
        &directory,
        "50-no-get.json",
        &[record(
            PRIVATE,
            "services",
            json!([{"name": "proxy",
                    "permissions": [{"group": "public-proxies", "rights": ["call"]}],
                    "methods": [{"name": "incomingConnection"},
                                {"name": "getAnnouncements", "permissions": []}]}]),
        )],
    );
    // Read only on SIGHUP.
    let out = eps(&public_eps, &["call", get, "{}"]).await;
    assert_success(&out, "eps call before SIGHUP");
    let private_eps = t.proc(Role::PrivateEps).pid();
    signal(private_eps, libc::SIGHUP);
    let forbidden = wait_until(REACT, || async {
        let out = eps(&public_eps, &["call", get, "{}"]).await;
        out.status.code() == Some(1) && stderr(&out).contains("403")
    })
    .await;
    assert!(
        forbidden,
        "still allowed after SIGHUP: {:?}",
        eps(&public_eps, &["call", get, "{}"]).await
    );
    assert!(
        t.proc(Role::PrivateEps)
            .run_log()
            .contains("directory reloaded"),
        "{}",
        t.proc(Role::PrivateEps).run_log()
    );
    assert!(t.works().await, "the tunnel after the directory reload");
    // And back.
    std::fs::remove_file(directory.join("50-no-get.json")).expect("removing the record");
    signal(private_eps, libc::SIGHUP);
    let allowed = wait_until(REACT, || async {
        eps(&public_eps, &["call", get, "{}"])
            .await
            .status
            .success()
    })
    .await;
    assert!(allowed, "still forbidden after the second SIGHUP");
    kept.expect_success("after the EPS server's reloads").await;

    // The private proxy takes a new announcement from its settings on SIGHUP.
    let hup = "hup.internal-server.local";
    assert!(
        !t.works_for(hup).await,
        "{hup} routed before it was announced"
    );
    t.dir.write_yaml(
        t.settings_dir(Role::PrivateProxy).join("zz-more.yml"),
        &json!({"private": {"announcements": [{"domain": DOMAIN}, {"domain": hup}]}}),
    );
    let private = t.proc(Role::PrivateProxy).pid();
    let sent = Instant::now();
    signal(private, libc::SIGHUP);
    let routed = wait_until(REACT, || t.works_for(hup)).await;
    assert!(routed, "{hup} not routed after SIGHUP");
    let routed_after = sent.elapsed();
    t.proc_mut(Role::PrivateProxy)
        .wait_for_log("settings reloaded", REACT)
        .await;
    assert!(t.works().await, "{DOMAIN} after the private proxy's reload");
    kept.expect_success("after the private proxy's reload")
        .await;
    for role in [Role::PrivateEps, Role::PrivateProxy] {
        assert!(t.proc_mut(role).is_running(), "{} stopped", role.name());
    }
    println!(
        "SIGHUP: the EPS server applied a directory change (403, then allowed again); the private \
         proxy's new domain was routed {:.3} s after its SIGHUP; a kept-alive relay survived all",
        routed_after.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_header_carries_the_client_address() {
    let mut t = Tunnel::new("ops-proxy-header");
    t.dir.write_yaml(
        t.settings_dir(Role::PrivateProxy)
            .join("zz-proxy-protocol.yml"),
        &json!({"private": {"proxy_protocol": true}}),
    );
    // The internal server, expecting the header (Tunnel starts it without).
    let mut internal = Proc::start(
        "internal-server",
        &bin_path("internal-server"),
        std::iter::empty::<&str>(),
        [
            ("IS_BIND_ADDRESS", t.internal_addr.to_string()),
            (
                "IS_CERTIFICATE",
                t.pki.cert("internal-server").display().to_string(),
            ),
            ("IS_KEY", t.pki.key("internal-server").display().to_string()),
            ("IS_PROXY_PROTOCOL", "1".to_string()),
        ],
        t.dir.join("internal-server.log"),
    );
    internal
        .wait_for_log(Role::InternalServer.ready_line(), PROCESS_WAIT)
        .await;
    for role in WITH_SETTINGS {
        t.start(role);
        t.wait_ready(role).await;
    }
    assert!(
        t.wait_tunnel(TUNNEL_WAIT).await.is_some(),
        "no request went through"
    );

    let mut conn = KeepAlive::open(t.public_addr, t.client_config(), DOMAIN)
        .await
        .expect("a connection through the tunnel");
    conn.expect_success("with the PROXY header").await;
    let expected = format!("client=127.0.0.1:{}", conn.local.port());
    let logged = wait_until(REACT, || async {
        internal
            .log()
            .lines()
            .any(|l| l.contains("client address from the PROXY header") && l.contains(&expected))
    })
    .await;
    assert!(
        logged,
        "the internal server did not log {expected:?} from the PROXY header:\n{}",
        internal.log()
    );
    assert!(
        !internal.log().contains("no valid PROXY protocol v2 header"),
        "{}",
        internal.log()
    );
    drop(conn);
    drop(internal);
}

#[tokio::test(flavor = "multi_thread")]
async fn eps_call_round_trip() {
    let t = Tunnel::started("ops-eps-call").await;
    let private_eps = t.settings_dir(Role::PrivateEps).to_path_buf();

    let out = eps(
        &private_eps,
        &["call", "public-proxy-1.getAnnouncements", "{}"],
    )
    .await;
    assert_success(&out, "eps call public-proxy-1.getAnnouncements");
    let listed: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("eps call printed no JSON ({e}): {}", stdout(&out)));
    assert!(
        listed.as_array().is_some_and(|l| l
            .iter()
            .any(|a| a["domain"] == DOMAIN && a["operator"] == PRIVATE)),
        "{listed}"
    );
    assert!(
        stdout(&out).contains("\n  "),
        "not pretty-printed: {}",
        stdout(&out)
    );

    let out = eps(&private_eps, &["call", "nobody.x", "{}"]).await;
    assert_eq!(out.status.code(), Some(1), "eps call nobody.x: {out:?}");
    assert!(stderr(&out).contains("404"), "{}", stderr(&out));

    let out = eps(&private_eps, &["call", "_ping"]).await;
    assert_success(&out, "eps call _ping");

    let out = eps(
        &private_eps,
        &["call", "public-proxy-1.getAnnouncements", "{not json"],
    )
    .await;
    assert_eq!(out.status.code(), Some(64), "bad params: {out:?}");

    let out = eps(&private_eps, &["directory", "show", PRIVATE]).await;
    assert_success(&out, "eps directory show");
    let entry: Value = serde_json::from_slice(&out.stdout).expect("the entry as JSON");
    assert!(entry.to_string().contains("private-proxies"), "{entry}");
    let out = eps(&private_eps, &["directory", "show", "nobody"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_check_names_file_and_key() {
    let t = Tunnel::new("ops-settings");
    let public = t.settings_dir(Role::PublicProxy).to_path_buf();

    // Good settings: exit 0 and the merged settings as YAML.
    let out = proxy(&[&public], &["settings", "check", "public"], &[]).await;
    let merged = merged_settings(&out, "proxy settings check public");
    assert_eq!(merged["name"], PUBLIC, "{merged}");

    // An unknown key in an extra file: exit 64 naming that file and the key.
    let extra = t.dir.mkdir("extra");
    let bad = t.dir.write_yaml(
        "extra/bad.yml",
        &json!({"public": {"limits": {"max_pendin": 3}}}),
    );
    let out = proxy(&[&public, &extra], &["settings", "check", "public"], &[]).await;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = stderr(&out);
    assert!(
        err.contains(&bad.display().to_string()),
        "file not named: {err}"
    );
    assert!(err.contains("public.limits"), "key not named: {err}");
    assert!(err.contains("max_pendin"), "key not named: {err}");

    // A bad access-policy range, and a rate setting that means nothing: exit 64, naming them.
    let policy = t.dir.mkdir("policy");
    t.dir.write_yaml(
        "policy/bad.yml",
        &json!({"public": {"policy": {"deny": ["192.0.2.0/24", "10.0.0.0/33"]}}}),
    );
    let out = proxy(&[&public, &policy], &["settings", "check", "public"], &[]).await;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = stderr(&out);
    assert!(
        err.contains("public.policy.deny") && err.contains("10.0.0.0/33"),
        "{err}"
    );
    t.dir.write_yaml(
        "policy/bad.yml",
        &json!({"public": {"policy": {"per_address": {"burst": 5}}}}),
    );
    let out = proxy(&[&public, &policy], &["settings", "check", "public"], &[]).await;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        stderr(&out).contains("public.policy.per_address.new_connections_per_second"),
        "{}",
        stderr(&out)
    );

    // A Redis datastore whose password comes from the environment: printed masked.
    let redis = t.dir.mkdir("redis");
    t.dir.write_yaml(
        "redis/redis.yml",
        &json!({
            "vars": {"REDIS_PASSWORD": {"source": "env", "variable": "EPS_TEST_REDIS_PASSWORD", "type": "string"}},
            "datastore": {"type": "redis", "settings": {
                "addresses": ["127.0.0.1:6379"], "password": "$REDIS_PASSWORD", "key": "eps:announcements"}},
        }),
    );
    let secret = "hunter2-do-not-print";
    let env = [("EPS_TEST_REDIS_PASSWORD", secret)];
    let out = proxy(&[&public, &redis], &["settings", "check", "public"], &env).await;
    assert_success(&out, "proxy settings check public with Redis");
    let text = stdout(&out);
    assert!(!text.contains(secret), "the password was printed: {text}");
    assert!(text.contains("password: '***'"), "{text}");
    let merged: Value = serde_yaml_ng::from_str(&text).expect("YAML");
    assert_eq!(merged["datastore"]["type"], "redis", "{merged}");
    assert_eq!(
        merged["datastore"]["settings"]["password"], "***",
        "{merged}"
    );
    // The variable unset: exit 64 naming it.
    let out = proxy(&[&public, &redis], &["settings", "check", "public"], &[]).await;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        stderr(&out).contains("EPS_TEST_REDIS_PASSWORD"),
        "{}",
        stderr(&out)
    );
    // Redis is for public proxies only.
    let private = t.settings_dir(Role::PrivateProxy).to_path_buf();
    let out = proxy(&[&private, &redis], &["settings", "check", "private"], &env).await;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(stderr(&out).contains("datastore"), "{}", stderr(&out));

    // The EPS server's settings: good ones print, an unknown key names file and key.
    let public_eps = t.settings_dir(Role::PublicEps).to_path_buf();
    let out = eps(&public_eps, &["settings", "check"]).await;
    let merged = merged_settings(&out, "eps settings check");
    assert_eq!(merged["name"], PUBLIC, "{merged}");
    let eps_extra = t.dir.mkdir("eps-extra");
    let bad = t.dir.write_yaml(
        "eps-extra/bad.yml",
        &json!({"grpc_client": {"cal_timeout": 3}}),
    );
    let dirs = std::env::join_paths([&public_eps, &eps_extra]).expect("no ':'");
    let out = run(
        &bin_path("eps"),
        &["settings", "check"],
        &[("EPS_SETTINGS", dirs.as_os_str())],
    )
    .await;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = stderr(&out);
    assert!(
        err.contains(&bad.display().to_string()) && err.contains("cal_timeout"),
        "{err}"
    );

    // A proxy with its EPS server embedded: its check reads the EPS server's settings too, and
    // names the bad key there; `eps server run` on settings without `jsonrpc_client` (which
    // only an embedded server may leave out) stops with exit 64 naming it.
    let embedded = t.dir.mkdir("embedded");
    let embed = |eps_dirs: &str| eps_tests::tunnel::embed_eps(&embedded, eps_dirs);
    embed(&public_eps.display().to_string());
    let out = proxy(&[&public, &embedded], &["settings", "check", "public"], &[]).await;
    let merged = merged_settings(&out, "proxy settings check public, EPS server embedded");
    assert!(merged["eps"]["embedded"].is_string(), "{merged}");
    embed(&dirs.to_string_lossy());
    let out = proxy(&[&public, &embedded], &["settings", "check", "public"], &[]).await;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = stderr(&out);
    assert!(
        err.contains("eps.embedded") && err.contains("cal_timeout"),
        "{err}"
    );
    let no_delivery = t.dir.mkdir("no-delivery");
    t.dir
        .write_yaml("no-delivery/zz.yml", &json!({"jsonrpc_client": null}));
    let dirs = std::env::join_paths([&public_eps, &no_delivery]).expect("no ':'");
    for command in [&["server", "run"][..], &["settings", "check"]] {
        let out = run(
            &bin_path("eps"),
            command,
            &[("EPS_SETTINGS", dirs.as_os_str())],
        )
        .await;
        assert_eq!(out.status.code(), Some(64), "{command:?}: {out:?}");
        assert!(
            stderr(&out).contains("jsonrpc_client: required"),
            "{command:?}: {}",
            stderr(&out)
        );
    }
}

/// The README's three-process demo: `settings/dev/roles/embedded/` laid over the demo's proxy
/// settings gives proxies that embed their EPS servers, and both pass `proxy settings check`
/// (which reads the embedded server's settings too) once `eps certs` has made the PKI.
#[tokio::test(flavor = "multi_thread")]
async fn dev_embedded_overlay_settings_check() {
    let dir = TestDir::new("ops-dev-embedded");
    let copy = dir.mkdir("dev");
    settings_copy_with_pki(
        "settings/dev",
        &copy,
        &[
            "directory",
            "roles/public-proxy-1",
            "roles/private-proxy-1",
            "roles/public-proxy-eps-1",
            "roles/private-proxy-eps-1",
            "roles/embedded/public-proxy-1",
            "roles/embedded/public-proxy-1/eps",
            "roles/embedded/private-proxy-1",
            "roles/embedded/private-proxy-1/eps",
        ],
    )
    .await;
    for (role, name) in [("public", PUBLIC), ("private", PRIVATE)] {
        let demo = copy.join(format!("roles/{name}"));
        let overlay = copy.join(format!("roles/embedded/{name}"));
        let out = proxy(&[&demo, &overlay], &["settings", "check", role], &[]).await;
        let merged = merged_settings(&out, &format!("proxy settings check {role}, embedded"));
        assert_eq!(merged["name"], name, "{merged}");
        assert!(merged["eps"]["embedded"].is_string(), "{merged}");
        assert!(merged["eps"]["url"].is_null(), "{merged}");
        assert!(merged["jsonrpc_server"].is_null(), "{merged}");
        assert!(
            !stderr(&out).contains("WARN"),
            "the overlay leaves no unused EPS setting: {}",
            stderr(&out)
        );
    }
}

/// The README's two-host settings (`settings/examples/two-hosts`) are valid as shipped, once
/// `eps certs` has made their PKI as the README says: each role's `settings check` passes (also
/// with the access-policy example of `settings/examples/policy` merged over it), the private
/// EPS server has no gRPC port, and the directory reaches it by reverse stream.
#[tokio::test(flavor = "multi_thread")]
async fn two_host_example_settings_check() {
    let dir = TestDir::new("ops-two-hosts");
    let copy = dir.mkdir("two-hosts");
    settings_copy_with_pki(
        "settings/examples/two-hosts",
        &copy,
        &[
            "directory",
            "public-eps",
            "public-proxy",
            "private-eps",
            "private-proxy",
        ],
    )
    .await;
    for (role, name) in [("public", PUBLIC), ("private", PRIVATE)] {
        let out = eps(&copy.join(format!("{role}-eps")), &["settings", "check"]).await;
        let merged = merged_settings(&out, &format!("eps settings check ({role})"));
        assert_eq!(merged["name"], name, "{merged}");
        assert_eq!(
            merged["grpc_server"].is_null(),
            role == "private",
            "{merged}"
        );
        let dirs = [copy.join(format!("{role}-proxy"))];
        let out = proxy(&[&dirs[0]], &["settings", "check", role], &[]).await;
        let merged = merged_settings(&out, &format!("proxy settings check {role}"));
        assert_eq!(merged["name"], name, "{merged}");
        // The README's access-policy example, merged over the role's settings.
        let policy = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("../settings/examples/policy/{role}-proxy"));
        let out = proxy(&[&dirs[0], &policy], &["settings", "check", role], &[]).await;
        let merged = merged_settings(&out, &format!("proxy settings check {role} with policy"));
        let rules = if role == "public" {
            &merged["public"]["policy"]["per_domain"]
        } else {
            &merged["private"]["announcements"][1]["policy"]
        };
        assert!(rules.is_object(), "{merged}");
    }
    let out = eps(&copy.join("private-eps"), &["directory", "show", PRIVATE]).await;
    assert_success(&out, "eps directory show");
    let entry: Value = serde_json::from_slice(&out.stdout).expect("the entry as JSON");
    assert_eq!(entry["channels"], json!([{"type": "reverse_stream"}]));
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs() {
    let mut t = Tunnel::new("ops-json-logs");
    for role in [
        Role::InternalServer,
        Role::PrivateProxy,
        Role::PublicEps,
        Role::PrivateEps,
    ] {
        t.start(role);
        t.wait_ready(role).await;
    }
    // The public proxy with JSON logs (Tunnel starts it with text logs).
    let mut public = Proc::start(
        "public-proxy-json",
        &bin_path("proxy"),
        ["--log-format", "json", "run", "public"],
        [("PROXY_SETTINGS", t.settings_dir(Role::PublicProxy))],
        t.dir.join("public-proxy-json.log"),
    );
    public
        .wait_for_log("public proxy ready", PROCESS_WAIT)
        .await;
    assert!(
        t.wait_tunnel(TUNNEL_WAIT).await.is_some(),
        "no request went through"
    );
    let relayed = wait_until(REACT, || async {
        public.run_log().contains("connection relayed")
    })
    .await;
    assert!(relayed, "{}", public.run_log());

    let log = public.run_log();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect();
    for l in &lines {
        assert!(l.is_object(), "{l}");
        assert!(
            l.get("message").is_some() || l.get("fields").is_some(),
            "no message: {l}"
        );
        assert!(
            l.get("level").is_some() && l.get("timestamp").is_some(),
            "{l}"
        );
    }
    let ready = lines
        .iter()
        .find(|l| l["message"] == "public proxy ready")
        .expect("the ready line");
    assert_eq!(ready["name"], PUBLIC, "{ready}");
    let line = lines
        .iter()
        .find(|l| l["message"] == "connection relayed")
        .expect("a relayed connection's line");
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["domain"], DOMAIN, "{line}");
    // `error` when the client hung up with TLS records unread (a reset), as rustls clients may.
    assert!(
        matches!(line["outcome"].as_str(), Some("done" | "error")),
        "{line}"
    );
    assert_eq!(
        line["client"], "127.0.0.x",
        "the client address is shortened: {line}"
    );
    for key in ["bytes_up", "bytes_down", "duration_ms"] {
        assert!(line[key].as_u64().is_some(), "{key}: {line}");
    }
    assert!(
        line["bytes_up"].as_u64() > Some(0) && line["bytes_down"].as_u64() > Some(0),
        "{line}"
    );
    drop(public);
}

/// Sets `metrics.bind_address` of the four processes with settings; their addresses.
fn enable_metrics(t: &Tunnel) -> BTreeMap<Role, SocketAddr> {
    WITH_SETTINGS
        .into_iter()
        .map(|role| {
            let addr = free_addr();
            t.dir.write_yaml(
                t.settings_dir(role).join("zz-metrics.yml"),
                &json!({"metrics": {"bind_address": addr}}),
            );
            (role, addr)
        })
        .collect()
}

/// Sends `sig` to process `pid`.
fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) on a child of this test that has not been reaped.
    let r = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        r,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// One parsed scrape of `/metrics`.
struct Scrape {
    text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    fn parse(text: String) -> Self {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let labels = rest
                        .trim_end_matches('}')
                        .split(',')
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                        .collect();
                    (name.to_string(), labels)
                }
                None => (series.to_string(), BTreeMap::new()),
            };
            samples.push((name, labels, value));
        }
        Self { text, samples }
    }

    /// The sum of the samples named `name` that carry all of `labels` (0 when none).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// How much `name{labels}` grew since `before`.
    fn delta(&self, before: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels) - before.get(name, labels)
    }
}

/// GET `/metrics` at `addr`, parsed.
async fn scrape(addr: SocketAddr) -> std::io::Result<Scrape> {
    let (status, body) = http_get(addr, "/metrics").await?;
    if status != 200 {
        return Err(std::io::Error::other(format!(
            "/metrics: HTTP {status}: {body}"
        )));
    }
    Ok(Scrape::parse(body))
}

/// The status of GET `path` at `addr`, `None` when it fails.
async fn status_of(addr: SocketAddr, path: &str) -> Option<u16> {
    http_get(addr, path).await.ok().map(|(s, _)| s)
}

/// A plain HTTP/1.1 GET (`Connection: close`, read to the end); the status and the body.
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let work = async {
        let text = get_to_end(addr, path).await?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| std::io::Error::other(format!("no HTTP head in {text:?}")))?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
        Ok((status, body.to_string()))
    };
    tokio::time::timeout(ATTEMPT_TIMEOUT, work)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "GET timed out"))?
}

/// Runs `program` with `args` and `env` added; its output.
async fn run(program: &Path, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Output {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} did not finish in 30 s", program.display()))
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()))
}

/// `eps ARGS` with `EPS_SETTINGS=settings`.
async fn eps(settings: &Path, args: &[&str]) -> Output {
    run(
        &bin_path("eps"),
        args,
        &[("EPS_SETTINGS", settings.as_os_str())],
    )
    .await
}

/// `proxy ARGS` with `PROXY_SETTINGS` naming `dirs`, and `env`.
async fn proxy(dirs: &[&Path], args: &[&str], env: &[(&str, &str)]) -> Output {
    let joined = std::env::join_paths(dirs).expect("no ':' in the folders");
    let mut all: Vec<(&str, &std::ffi::OsStr)> = vec![("PROXY_SETTINGS", joined.as_os_str())];
    all.extend(env.iter().map(|(k, v)| (*k, std::ffi::OsStr::new(*v))));
    run(&bin_path("proxy"), args, &all).await
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}\nstdout: {}\nstderr: {}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

/// The merged settings a successful `settings check` printed as YAML (`what` names the run).
fn merged_settings(out: &Output, what: &str) -> Value {
    assert_success(out, what);
    serde_yaml_ng::from_slice(&out.stdout).expect("YAML")
}

/// `GET /bytes/N` through the public port `addr` (SNI `DOMAIN`, `Connection: close`), reading
/// the body no faster than `rate` bytes a second and counting it in `progress`; the body length.
async fn slow_download(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    n: u64,
    rate: f64,
    progress: &AtomicU64,
) -> std::io::Result<u64> {
    let name = ServerName::try_from(DOMAIN.to_string()).expect("a DNS name");
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    tls.write_all(
        format!("GET /bytes/{n} HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    tls.flush().await?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let r = tls.read(&mut chunk).await?;
        if r == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..r]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("response head {head:?}")));
    }
    let mut body = (buf.len() - head_end - 4) as u64;
    let start = Instant::now();
    loop {
        progress.store(body, Ordering::Relaxed);
        // Throttle: never ahead of `rate`.
        let due = Duration::from_secs_f64(body as f64 / rate);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let r = match tls.read(&mut chunk).await {
            Ok(r) => r,
            // The server closes after the body; rustls may see that as an unclean end.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e),
        };
        if r == 0 {
            return Ok(body);
        }
        body += r as u64;
    }
}

/// Copies the `*.yml` and `*.json` files of each folder `subs` of the repository's `from`
/// (e.g. `settings/dev`) to the same place under `to`, and makes their PKI there with
/// `eps certs` (`to/certs`, pins in `to/directory`), as the README has users do.
async fn settings_copy_with_pki(from: &str, to: &Path, subs: &[&str]) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(from);
    for sub in subs {
        let dest = to.join(sub);
        std::fs::create_dir_all(&dest).expect("mkdir");
        for f in std::fs::read_dir(from.join(sub)).expect("a settings folder") {
            let f = f.expect("a file").path();
            if f.extension().is_some_and(|e| e == "yml" || e == "json") {
                std::fs::copy(&f, dest.join(f.file_name().unwrap())).expect("copy");
            }
        }
    }
    let (certs, directory) = (to.join("certs"), to.join("directory"));
    let out = run(
        &bin_path("eps"),
        &[
            "certs",
            "--certs-dir",
            certs.to_str().unwrap(),
            "--directory-dir",
            directory.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_success(&out, "eps certs for the copied settings");
}
