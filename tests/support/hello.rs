//! What a TLS client sends first: [`rustls_hello`], the ClientHello records a rustls client
//! would write, for tests that send them by hand.

use std::sync::Arc;

use rustls::pki_types::ServerName;

/// The first flight of a rustls client with `config` (its ClientHello records) for `sni`.
pub fn rustls_hello(config: Arc<rustls::ClientConfig>, sni: &str) -> Vec<u8> {
    let name = ServerName::try_from(sni.to_string()).expect("a DNS name");
    let mut conn = rustls::ClientConnection::new(config, name).expect("TLS client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("writing to a Vec");
    }
    out
}
