//! EPS peers with a bad certificate: an expired one is refused at the handshake. (A foreign CA,
//! an operator not in the directory, a pin mismatch and no certificate are in
//! `eps_network/identity.rs`.)

use std::path::PathBuf;
use std::time::Duration;

use eps_core::http::CallError;
use eps_core::jsonrpc::PEER_UNREACHABLE;
use eps_core::tls::TlsSettings;
use eps_tests::tunnel::{Role, OTHER_PRIVATE, PRIVATE, PUBLIC};
use eps_tests::*;
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

use crate::fixture::{serial, Fx};

/// Issues `{name}-expired.crt` / `.key` in `pki`'s folder: common name `name`, signed by the
/// test root, valid only in 2020.
fn issue_expired(pki: &Pki, name: &str) -> (PathBuf, PathBuf) {
    let read = |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
    let root_key = KeyPair::from_pem(&read(pki.dir().join("root.key"))).expect("root key");
    let issuer = Issuer::from_ca_cert_pem(&read(pki.root()), root_key).expect("root");
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("signing");
    let (crt, key_path) = (
        pki.dir().join(format!("{name}-expired.crt")),
        pki.dir().join(format!("{name}-expired.key")),
    );
    std::fs::write(&crt, cert.pem()).expect("write certificate");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    (crt, key_path)
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_peer_certificate_is_refused_at_the_handshake() {
    let _serial = serial().await;
    let mut fx = Fx::new("expired-peer");
    // The public EPS server delivers to a recording service instead of the public proxy.
    let service = TestService::start("public-service", Some(&fx.t.pki.tls_verifying(PUBLIC))).await;
    fx.configure(
        Role::PublicEps,
        json!({"jsonrpc_client": {"url": service.url()}}),
    );
    // private-proxy-2 calls with an expired certificate from the right CA, and the directory
    // pins exactly that certificate: only its dates are wrong.
    let (crt, key) = issue_expired(&fx.t.pki, OTHER_PRIVATE);
    let der = eps_core::tls::load_certs(&crt).expect("the expired certificate");
    let pki = &fx.t.pki;
    eps_core::pki::write_certificate_records(
        &fx.t.public_eps.directory,
        &[
            (PUBLIC.into(), pki.fingerprint(PUBLIC).into()),
            (PRIVATE.into(), pki.fingerprint(PRIVATE).into()),
            (OTHER_PRIVATE.into(), eps_core::tls::fingerprint(&der[0])),
        ],
    )
    .expect("pins");
    let mut other = fx.t.other_eps.clone();
    other.peer_tls = Some(TlsSettings {
        ca_certificate: pki.root(),
        certificate: crt,
        key,
        verify_client: false,
    });
    other.write(&fx.t.dir.join("other-eps"));
    fx.start(&[Role::PublicEps, Role::PrivateEps]).await;
    let _other_eps = fx.t.start_other_eps().await;

    // Control: private-proxy-1's valid certificate gets its call delivered.
    let private = rpc_client(
        &fx.t.private_eps.jsonrpc_url(),
        Some(&fx.t.pki.tls(PRIVATE)),
        Duration::from_secs(10),
    );
    let r = call(&private, "public-proxy-1.getAnnouncements", json!({}))
        .await
        .expect("a call with a valid certificate");
    assert_eq!(r["echo"]["_client"]["name"], PRIVATE, "{r}");

    let e = match call(
        &fx.t.other_eps_client(),
        "public-proxy-1.getAnnouncements",
        json!({}),
    )
    .await
    {
        Err(CallError::Rpc(e)) => e,
        other => panic!("a call with an expired certificate: {other:?}"),
    };
    assert_eq!(e.code, PEER_UNREACHABLE, "{e}");
    let public_eps = fx.proc_mut(Role::PublicEps);
    public_eps
        .wait_for_log("refused peer", Duration::from_secs(10))
        .await;
    let log = public_eps.log();
    let line = log
        .lines()
        .find(|l| l.contains("refused peer"))
        .expect("a refused peer line");
    assert!(
        line.to_lowercase().contains("expired"),
        "the refusal does not say the certificate expired: {line}"
    );
    assert_eq!(
        service.received().len(),
        1,
        "the call with an expired certificate was delivered"
    );
    println!(
        "expired peer certificate: the caller got {} ({}); the public EPS server logged: {line}",
        e.code, e.message
    );
}
