//! Settings of the private proxy's backends: where each announced domain's clients go, and
//! whether TLS passes through to that endpoint or ends at the private proxy
//! (docs/architecture.md §3.5), and the ACME client that obtains certificates for the latter.

use std::path::PathBuf;
use std::time::Duration;

use eps_core::http::secs;
use serde::{Deserialize, Serialize};

/// Default deadline of the TLS handshake the private proxy completes for a terminated domain
/// (ClientHello included).
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default point of a certificate's lifetime at which ACME renews it: after two thirds, as
/// Let's Encrypt advises (30 days before the end of a 90-day certificate).
pub const DEFAULT_RENEW_AT: f64 = 2.0 / 3.0;
/// Default deadline of one whole ACME order (account, challenge, finalization, download).
pub const DEFAULT_ORDER_TIMEOUT: Duration = Duration::from_secs(120);

/// What the private proxy does with a domain's TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// The client's TLS goes through untouched to the endpoint, which holds the certificate.
    #[default]
    Passthrough,
    /// The private proxy completes the handshake with the domain's certificate and forwards
    /// the decrypted bytes to a plain TCP endpoint.
    Terminate,
}

/// `tls:` of an announcement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsHandling {
    /// `passthrough` (the default) or `terminate`.
    #[serde(default)]
    pub mode: TlsMode,
    /// With `terminate`: PEM certificate chain of the domain, on the private host; re-read when
    /// the file changes. Without `certificate` and `key`, `private.acme` obtains one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<PathBuf>,
    /// With `terminate`: PEM private key of `certificate`. It never leaves the private host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// With `terminate`: the ALPN protocols offered, in order of preference (`h2`,
    /// `http/1.1`). Empty (the default): none is negotiated, which suits any protocol; list
    /// `h2` only for an endpoint that speaks HTTP/2 without TLS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
}

impl TlsHandling {
    /// Whether the private proxy ends TLS for this domain.
    pub fn terminates(&self) -> bool {
        self.mode == TlsMode::Terminate
    }

    /// A terminated domain without certificate files: its certificate comes from ACME.
    pub fn wants_acme(&self) -> bool {
        self.terminates() && self.certificate.is_none() && self.key.is_none()
    }

    /// Checks what serde cannot: fields that only `terminate` takes, certificate and key
    /// together, ALPN names.
    pub fn check(&self) -> Result<(), String> {
        if !self.terminates() {
            if self.certificate.is_some() || self.key.is_some() || !self.alpn.is_empty() {
                return Err(
                    "tls: certificate, key and alpn need mode: terminate (passthrough leaves TLS \
                     to the endpoint)"
                        .into(),
                );
            }
            return Ok(());
        }
        if self.certificate.is_some() != self.key.is_some() {
            return Err(
                "tls: certificate and key go together (or neither, for a certificate from \
                 private.acme)"
                    .into(),
            );
        }
        for p in &self.alpn {
            if p.is_empty() || p.len() > 255 {
                return Err(format!(
                    "tls.alpn: {p:?} is not a protocol name (1-255 bytes)"
                ));
            }
            if p == ACME_TLS_ALPN {
                return Err(format!(
                    "tls.alpn: {ACME_TLS_ALPN} is answered by the ACME client, not offered"
                ));
            }
        }
        Ok(())
    }
}

/// The ALPN protocol of TLS-ALPN-01 validation connections (RFC 8737).
pub const ACME_TLS_ALPN: &str = "acme-tls/1";

/// `private.acme`: the ACME client (RFC 8555) that obtains and renews the certificates of
/// terminated domains without certificate files, with the TLS-ALPN-01 challenge (RFC 8737),
/// which reaches the private proxy through the public proxy like any client.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeSettings {
    /// The ACME server's directory, e.g.
    /// `https://acme-v02.api.letsencrypt.org/directory`.
    pub directory_url: String,
    /// PEM file of the CAs trusted for the directory's HTTPS; the system's roots when absent.
    /// For test servers such as Pebble.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificate: Option<PathBuf>,
    /// Contact URLs of the account, e.g. `mailto:ops@example.com`.
    #[serde(default)]
    pub contact: Vec<String>,
    /// Folder (created 0700) for the account key and each domain's certificate and key (files
    /// 0600). Keep it on the private host and back it up: the account key identifies you to
    /// the CA.
    pub storage: PathBuf,
    /// Fraction of a certificate's lifetime after which it is renewed (0.5 to 0.95); a failed
    /// renewal keeps the current certificate and retries with backoff.
    #[serde(default = "default_renew_at")]
    pub renew_at: f64,
    /// Seconds one order may take, challenge and download included.
    #[serde(default = "default_order_timeout", with = "secs")]
    pub order_timeout: Duration,
}

fn default_renew_at() -> f64 {
    DEFAULT_RENEW_AT
}
fn default_order_timeout() -> Duration {
    DEFAULT_ORDER_TIMEOUT
}

impl AcmeSettings {
    pub fn check(&self) -> Result<(), String> {
        if !self.directory_url.starts_with("https://") {
            return Err("private.acme.directory_url must be an https URL".into());
        }
        if !(0.5..=0.95).contains(&self.renew_at) {
            return Err("private.acme.renew_at must be between 0.5 and 0.95".into());
        }
        if self.order_timeout < Duration::from_secs(5) {
            return Err("private.acme.order_timeout must be at least 5 seconds".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(yaml: &str) -> Result<TlsHandling, String> {
        let t: TlsHandling = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
        t.check().map(|()| t)
    }

    #[test]
    fn tls_handling_is_checked() {
        assert_eq!(tls("{}").unwrap(), TlsHandling::default());
        let t = tls("{mode: terminate, alpn: [h2, http/1.1]}").unwrap();
        assert!(t.terminates() && t.wants_acme());
        let t = tls("{mode: terminate, certificate: a.crt, key: a.key}").unwrap();
        assert!(t.terminates() && !t.wants_acme());
        for bad in [
            "{mode: passthrough, certificate: a.crt, key: a.key}",
            "{alpn: [h2]}",
            "{mode: terminate, certificate: a.crt}",
            "{mode: terminate, alpn: ['']}",
            "{mode: terminate, alpn: [acme-tls/1]}",
            "{mode: end}",
            "{mode: terminate, cert: a.crt}",
        ] {
            assert!(tls(bad).is_err(), "{bad} was taken");
        }
    }
}
