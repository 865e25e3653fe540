//! Automatic certificates (docs/architecture.md §3.6) against Pebble, the ACME test server:
//! the private proxy orders a certificate for a terminated domain, Pebble validates it with
//! TLS-ALPN-01 through the real public proxy, curl trusting Pebble's root gets the plain
//! backend's answer, a short validity makes the proxy renew, and with Pebble gone a failed
//! renewal keeps the certificate in use.
//!
//! Needs Debian's `pebble` package (`.ci/run` installs it). Build the binaries first:
//! `cargo build --workspace && cargo test -p eps-tests --test acme`.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use eps_tests::pebble::{served_leaf, Pebble};
use eps_tests::tunnel::{Role, Tunnel, SUCCESS};
use eps_tests::*;

/// The domain whose certificate comes from ACME.
const ACME_DOMAIN: &str = "acme.internal-server.local";
/// Lifetime of Pebble's certificates here: renewal comes at 2/3 of it.
const VALIDITY: Duration = Duration::from_secs(30);
/// Time for the first order (account, challenge through the tunnel, download).
const ISSUE_WAIT: Duration = Duration::from_secs(60);
const OBTAINED: &str = "certificate obtained from the ACME server";

#[tokio::test(flavor = "multi_thread")]
async fn pebble_issues_and_renews_through_the_tunnel() {
    let mut t = Tunnel::new("acme");
    let pebble = Pebble::start(&t.dir, &t.pki, t.public_addr.port(), VALIDITY).await;
    let (plain, plain_addr) = t.start_plain_server("plain-server", false).await;
    let storage = t.dir.join("data/private-proxy-1/acme");
    t.dir.write_yaml(
        "private-proxy/zz-test.yml",
        &json!({"private": {
            "acme": {"directory_url": pebble.directory_url, "ca_certificate": pebble.https_ca,
                     "contact": ["mailto:ops@internal-server.local"], "storage": storage},
            "announcements": [
                {"domain": tunnel::DOMAIN},
                {"domain": ACME_DOMAIN, "internal_endpoint": plain_addr.to_string(),
                 "tls": {"mode": "terminate", "alpn": ["h2", "http/1.1"]}},
            ],
        }}),
    );
    t.start_all().await;
    let private = Role::PrivateProxy;
    t.proc_mut(private).wait_for_log(OBTAINED, ISSUE_WAIT).await;
    let log = t.proc(private).log();
    assert!(
        log.contains("ACME validation answered (acme-tls/1)"),
        "the validation did not come through the tunnel:\n{log}"
    );

    // curl, trusting Pebble's root, gets the plain backend's answer, over HTTP/2 too.
    let root = pebble.root(&t.dir.join("pebble-root.pem")).await;
    for extra in [&["--http1.1"][..], &["--http2"]] {
        let r = curl_get(&root, t.public_addr, ACME_DOMAIN, "/jsonrpc", extra).await;
        assert_eq!((r.status, r.body.as_str()), (200, SUCCESS), "{extra:?}");
    }
    assert!(plain.log().contains("version=HTTP/2.0"));

    // Account and certificate on the private host, for its owner only.
    let mode = |p: &std::path::Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&storage), 0o700);
    assert_eq!(mode(&storage.join("account.json")), 0o600);
    assert_eq!(mode(&storage.join(format!("{ACME_DOMAIN}.pem"))), 0o600);
    let first = served_leaf(t.public_addr, &root, ACME_DOMAIN)
        .await
        .expect("the first certificate");

    // A restart serves the stored certificate without a new order.
    t.restart(private);
    assert!(
        wait_until(Duration::from_secs(15), || async {
            served_leaf(t.public_addr, &root, ACME_DOMAIN).await.ok() == Some(first.clone())
        })
        .await,
        "the stored certificate is not served after a restart"
    );
    assert!(!t.proc(private).run_log().contains(OBTAINED));

    // Renewal at 2/3 of the lifetime: a new certificate, served.
    t.proc_mut(private)
        .wait_for_log(OBTAINED, VALIDITY + ISSUE_WAIT)
        .await;
    let second = served_leaf(t.public_addr, &root, ACME_DOMAIN)
        .await
        .expect("the renewed certificate");
    assert_ne!(first, second, "the renewed certificate is not served");

    // Pebble gone: the next renewal fails, the certificate in use stays and is said to.
    drop(pebble);
    t.proc_mut(private)
        .wait_for_log(
            "certificate renewal failed; keeping the current certificate",
            VALIDITY + ISSUE_WAIT,
        )
        .await;
    assert_eq!(
        served_leaf(t.public_addr, &root, ACME_DOMAIN).await.ok(),
        Some(second),
        "a failed renewal changed the certificate"
    );
    let r = curl_get(&root, t.public_addr, ACME_DOMAIN, "/jsonrpc", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (200, SUCCESS));
}
