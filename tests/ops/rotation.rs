//! Certificates, keys and CA files rotate under the running processes (README "Rotating
//! certificates"): every process re-reads its TLS files when they change (checked every second)
//! and on SIGHUP; new handshakes use the new material, relays and open connections stay, and
//! a broken file is refused while the material in use stays. The EPS servers re-read the
//! directory the same way, so a peer's new pinned fingerprint counts as soon as it is written.

use std::path::PathBuf;

use eps_core::http::CallError;
use eps_tests::keepalive::connect_tls;
use eps_tests::tunnel::OTHER_PRIVATE;

use super::*;

/// Time a running process gets to notice changed files (it looks every second and loads them
/// once they stayed the same for one look).
const NOTICE: Duration = Duration::from_secs(10);

/// The TLS listeners of the running demo, the operator whose certificate each presents.
fn listeners(t: &Tunnel) -> [(&'static str, SocketAddr, &'static str); 5] {
    [
        ("public EPS JSON-RPC", t.public_eps.jsonrpc_addr, PUBLIC),
        ("public EPS gRPC", t.public_eps.grpc_addr, PUBLIC),
        ("private EPS JSON-RPC", t.private_eps.jsonrpc_addr, PRIVATE),
        ("public proxy JSON-RPC", t.public_rpc_addr, PUBLIC),
        ("private proxy JSON-RPC", t.private_rpc_addr, PRIVATE),
    ]
}

/// SHA-256 of the certificate the TLS server at `addr` presents to a new handshake (the client
/// shows `private-proxy-2`'s certificate, which no test rotates).
async fn presented(t: &Tunnel, addr: SocketAddr) -> std::io::Result<String> {
    let config = eps_core::tls::client_config(&t.pki.tls(OTHER_PRIVATE), &[b"h2", b"http/1.1"])
        .expect("client TLS");
    let (tls, _) = tokio::time::timeout(ATTEMPT_TIMEOUT, connect_tls(addr, config, "localhost"))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake"))??;
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| std::io::Error::other("no server certificate"))?;
    Ok(eps_core::tls::fingerprint(cert))
}

/// New certificates and keys for `operators` from the tunnel's root, in `staging` (not yet in
/// place); their fingerprints.
fn issue_new(t: &Tunnel, staging: &str, operators: &[&str]) -> Pki {
    let dir = t.dir.mkdir(staging);
    for f in [eps_core::pki::ROOT_CERT, eps_core::pki::ROOT_KEY] {
        std::fs::copy(t.pki.dir().join(f), dir.join(f)).expect("copy the root");
    }
    let fresh = Pki::new(dir, operators, None);
    for op in operators {
        assert_ne!(fresh.fingerprint(op), t.pki.fingerprint(op));
    }
    fresh
}

/// Moves `fresh`'s certificate and key of `operator` over the ones the processes read, each by
/// rename (as a deploy tool would): key first, so for a moment they do not match.
fn put_in_place(t: &Tunnel, fresh: &Pki, operator: &str) {
    std::fs::rename(fresh.key(operator), t.pki.key(operator)).expect("rename key");
    std::fs::rename(fresh.cert(operator), t.pki.cert(operator)).expect("rename certificate");
}

/// Rewrites the directory's pinned fingerprints (`90-certificates.json`): every operator of the
/// tunnel with `pins` where given, its original fingerprint otherwise.
fn pin(t: &Tunnel, pins: &[(&str, Vec<String>)]) -> PathBuf {
    let records: Vec<_> = [PUBLIC, PRIVATE, OTHER_PRIVATE]
        .iter()
        .map(|op| {
            let fps = pins
                .iter()
                .find(|(name, _)| name == op)
                .map(|(_, fps)| fps.clone())
                .unwrap_or_else(|| vec![t.pki.fingerprint(op).to_string()]);
            let data: Vec<_> = fps.iter().map(|fp| json!({"fingerprint": fp})).collect();
            record(op, "certificates", json!(data))
        })
        .collect();
    // Written aside and renamed, so that a reader never sees half a file.
    let staging = t.dir.mkdir("directory-staging");
    let written = write_records(&staging, "90-certificates.json", &records);
    let target = t.public_eps.directory.join("90-certificates.json");
    std::fs::rename(written, &target).expect("rename directory file");
    target
}

/// Waits until both EPS servers logged `n` directory reloads in their current runs.
async fn wait_directory_reloads(t: &Tunnel, n: usize) {
    for role in [Role::PublicEps, Role::PrivateEps] {
        let reloaded = wait_until(NOTICE, || async {
            t.proc(role).run_log().matches("directory reloaded").count() >= n
        })
        .await;
        assert!(
            reloaded,
            "{} did not re-read the changed directory within {NOTICE:?}; its log:\n{}",
            role.name(),
            t.proc(role).run_log()
        );
    }
}

/// Waits until the listener at `addr` presents the certificate with fingerprint `fp`.
async fn wait_presented(t: &Tunnel, what: &str, addr: SocketAddr, fp: &str) -> Duration {
    let start = Instant::now();
    let switched = wait_until(NOTICE, || async {
        presented(t, addr).await.ok().as_deref() == Some(fp)
    })
    .await;
    assert!(
        switched,
        "{what} still presents {:?} {NOTICE:?} after its certificate file changed (want {fp})",
        presented(t, addr).await
    );
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_the_running_demo_without_dropping_a_relay() {
    let mut t = Tunnel::started("rotate-certs").await;
    for (what, addr, op) in listeners(&t) {
        assert_eq!(
            presented(&t, addr).await.expect(what),
            t.pki.fingerprint(op),
            "{what} before the rotation"
        );
    }
    let mut relay = KeepAlive::open(t.public_addr, t.client_config(), DOMAIN)
        .await
        .expect("relay");
    relay.expect_success("before the rotation").await;

    // As an operator rotates: pin old and new, then deploy the new files, then unpin the old.
    let fresh = issue_new(&t, "staging", &[PUBLIC, PRIVATE]);
    let both = |op: &str| {
        vec![
            t.pki.fingerprint(op).to_string(),
            fresh.fingerprint(op).to_string(),
        ]
    };
    pin(&t, &[(PUBLIC, both(PUBLIC)), (PRIVATE, both(PRIVATE))]);
    wait_directory_reloads(&t, 1).await;
    put_in_place(&t, &fresh, PUBLIC);
    put_in_place(&t, &fresh, PRIVATE);
    for (what, addr, op) in listeners(&t) {
        let took = wait_presented(&t, what, addr, fresh.fingerprint(op)).await;
        println!("{what}: new certificate served after {took:?}");
    }
    relay.expect_success("after the rotation").await;
    assert!(t.works().await, "a new client after the rotation");

    // The private EPS server moved its reverse stream to a connection made with its new
    // certificate, so unpinning the old one costs no call.
    t.proc_mut(Role::PrivateEps)
        .wait_for_log("reverse stream moved to a new connection", NOTICE)
        .await;
    pin(
        &t,
        &[
            (PUBLIC, vec![fresh.fingerprint(PUBLIC).to_string()]),
            (PRIVATE, vec![fresh.fingerprint(PRIVATE).to_string()]),
        ],
    );
    wait_directory_reloads(&t, 2).await;
    for i in 0..10 {
        assert!(
            t.works().await,
            "new client {i} after the old certificates were unpinned; public EPS log:\n{}",
            t.proc(Role::PublicEps).run_log()
        );
    }
    assert!(
        !t.proc(Role::PublicEps)
            .run_log()
            .contains("no longer accepts"),
        "the public EPS server still saw the old certificate in use:\n{}",
        t.proc(Role::PublicEps).run_log()
    );
    // A restarted public EPS server (every link a new handshake) accepts the new certificates.
    t.restart(Role::PublicEps);
    t.wait_ready(Role::PublicEps).await;
    assert!(
        t.wait_tunnel(TUNNEL_WAIT).await.is_some(),
        "the tunnel works again once the public EPS server restarted with only the new pins"
    );
    assert!(
        !t.proc(Role::PublicEps).run_log().contains("refused peer"),
        "the public EPS server refused a peer:\n{}",
        t.proc(Role::PublicEps).run_log()
    );
    relay
        .expect_success("after the public EPS server restarted")
        .await;
    for role in WITH_SETTINGS {
        assert!(
            !t.proc(role).log().contains("not reloaded"),
            "{} refused rotated files:\n{}",
            role.name(),
            t.proc(role).log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_is_accepted_with_its_new_certificate_once_the_directory_pins_it() {
    let mut t = Tunnel::started("rotate-pin").await;
    // The private operator rotates without telling the directory first.
    let fresh = issue_new(&t, "staging", &[PRIVATE]);
    put_in_place(&t, &fresh, PRIVATE);
    wait_presented(
        &t,
        "private EPS JSON-RPC",
        t.private_eps.jsonrpc_addr,
        fresh.fingerprint(PRIVATE),
    )
    .await;
    // A new handshake from the private EPS server now shows a certificate the public one does
    // not pin: refused, and the tunnel is down.
    t.restart(Role::PublicEps);
    t.wait_ready(Role::PublicEps).await;
    t.proc_mut(Role::PublicEps)
        .wait_for_log("does not match the fingerprint pinned", REACT)
        .await;
    assert!(
        !t.works().await,
        "a client got through although the private EPS server's certificate is not pinned"
    );
    // The directory pins the new certificate: accepted without a signal or a restart.
    let written = Instant::now();
    pin(
        &t,
        &[(PRIVATE, vec![fresh.fingerprint(PRIVATE).to_string()])],
    );
    let took = t.wait_tunnel(NOTICE + TUNNEL_WAIT).await;
    assert!(
        took.is_some(),
        "the tunnel did not work again after the directory pinned the new certificate; public EPS log:\n{}",
        t.proc(Role::PublicEps).run_log()
    );
    assert!(t
        .proc(Role::PublicEps)
        .run_log()
        .contains("directory reloaded"));
    println!("new pin written -> tunnel works: {:?}", written.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_files_are_refused_and_the_material_in_use_stays() {
    let mut t = Tunnel::started("rotate-broken").await;
    let public_rpc = t.public_eps.jsonrpc_addr;
    let before = t.pki.fingerprint(PUBLIC).to_string();

    // A key that does not match the certificate (another operator's key).
    let key = t.pki.key(PUBLIC);
    let good_key = std::fs::read(&key).unwrap();
    std::fs::copy(t.pki.key(OTHER_PRIVATE), &key).unwrap();
    for role in [Role::PublicEps, Role::PublicProxy] {
        t.proc_mut(role)
            .wait_for_log("TLS certificate not reloaded", NOTICE)
            .await;
        assert!(t
            .proc(role)
            .run_log()
            .contains("does not match the certificate"));
    }
    assert_eq!(presented(&t, public_rpc).await.unwrap(), before);
    assert!(t.works().await, "the tunnel after a mismatched key");

    // A certificate file that is not PEM.
    let cert = t.pki.cert(PUBLIC);
    let good_cert = std::fs::read(&cert).unwrap();
    std::fs::write(&key, &good_key).unwrap();
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    wait_until(NOTICE, || async {
        t.proc(Role::PublicEps)
            .run_log()
            .matches("TLS certificate not reloaded")
            .count()
            >= 2
    })
    .await;
    assert_eq!(presented(&t, public_rpc).await.unwrap(), before);

    // An empty CA file: refused, the CA set in use stays.
    let ca = t.pki.root();
    let good_ca = std::fs::read(&ca).unwrap();
    std::fs::write(&cert, &good_cert).unwrap();
    std::fs::write(&ca, "").unwrap();
    t.proc_mut(Role::PublicEps)
        .wait_for_log("CA certificates not reloaded", NOTICE)
        .await;
    std::fs::write(&ca, &good_ca).unwrap();
    assert!(t.works().await, "the tunnel after a broken CA file");

    // A CA added to the bundle is trusted by running servers: a client certificate from a
    // second root is refused, then accepted once that root is in the file.
    let other = Pki::new(t.dir.join("other-pki"), &[OTHER_PRIVATE], None);
    // The foreign client trusts its own root only: add the tunnel's root to its CA file, so
    // that it trusts the servers.
    let other_root = std::fs::read(other.root()).unwrap();
    let mut bundle = other_root.clone();
    bundle.extend_from_slice(&good_ca);
    std::fs::write(other.root(), &bundle).unwrap();
    let foreign = rpc_client(
        &t.public_eps.jsonrpc_url(),
        Some(&other.tls(OTHER_PRIVATE)),
        ATTEMPT_TIMEOUT,
    );
    let handshake_ok = || async {
        !matches!(
            call(&foreign, "getAnnouncements", json!({})).await,
            Err(CallError::NotDelivered { .. } | CallError::Unreachable { .. })
        )
    };
    assert!(
        !handshake_ok().await,
        "a client certificate from an unknown root was accepted"
    );
    let mut bundle = good_ca.clone();
    bundle.extend_from_slice(&other_root);
    std::fs::write(&ca, &bundle).unwrap();
    assert!(
        wait_until(NOTICE, handshake_ok).await,
        "a client certificate from a root added to the CA file is still refused; public EPS log:\n{}",
        t.proc(Role::PublicEps).run_log()
    );
    assert!(t.works().await, "the tunnel with two roots in the CA file");
}
