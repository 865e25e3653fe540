//! TLS ending at the private proxy (docs/architecture.md §3.5): for a domain announced with
//! `tls: {mode: terminate}`, the dial-back's relayed stream (the client's TLS, which the public
//! proxy never opened) is handshaken here with the domain's certificate, and the decrypted bytes
//! go to a plain TCP endpoint, after a PROXY header when the domain asks for one.
//!
//! The ClientHello is read first (`LazyConfigAcceptor`): one offering ALPN `acme-tls/1` is an
//! ACME server validating an order of ours and gets the challenge certificate, and nothing is
//! dialed; any other gets the domain's config, and the endpoint is dialed while the handshake
//! runs. ClientHello and handshake share one deadline (`private.tls_handshake_timeout`).

use std::sync::Arc;
use std::time::Duration;

use rustls::server::{Acceptor, ResolvesServerCert};
use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;

use super::acme::ManagedCert;
use crate::pool::dial;
use crate::relay::{self, Ended, Totals};
use crate::settings::ACME_TLS_ALPN;

/// Where a terminated domain's certificate comes from.
pub enum CertSource {
    /// Files on the private host, re-read when they change.
    Files(Arc<dyn ResolvesServerCert>),
    /// The ACME client.
    Acme(ManagedCert),
}

/// A terminated domain's TLS server.
pub struct Terminator {
    config: Arc<ServerConfig>,
    source: CertSource,
}

impl Terminator {
    /// The server for `source`, offering `alpn` in that order.
    pub fn new(source: CertSource, alpn: &[String]) -> Result<Self, rustls::Error> {
        let resolver = match &source {
            CertSource::Files(r) => r.clone(),
            CertSource::Acme(m) => m.resolver(),
        };
        let mut config = ServerConfig::builder_with_provider(eps_core::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Ok(Self {
            config: Arc::new(config),
            source,
        })
    }
}

/// Why a terminated client was closed after its dial-back: a metrics label each.
#[derive(Debug, thiserror::Error)]
pub enum TerminateFailed {
    #[error("no TLS handshake within {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("no certificate yet (ACME has not obtained one)")]
    NoCertificate,
    #[error("an acme-tls/1 connection while no order of ours waits for validation")]
    UnexpectedChallenge,
    #[error("internal endpoint {address}: {source}")]
    Unreachable {
        address: String,
        source: std::io::Error,
    },
}

impl crate::metrics::Reason for TerminateFailed {
    fn label(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "tls_handshake_timeout",
            Self::Handshake(_) => "tls_handshake_failed",
            Self::NoCertificate => "tls_no_certificate",
            Self::UnexpectedChallenge => "acme_challenge_unexpected",
            Self::Unreachable { .. } => "dial_failed",
        }
    }
}

/// What the handshake led to.
pub enum Terminated {
    /// A client: relayed to the endpoint.
    Relayed(Totals),
    /// An ACME validation, answered.
    Challenge,
}

/// Ends the client's TLS on `public` and relays it to `endpoint` (a PROXY `header` first).
pub async fn serve(
    public: TcpStream,
    terminator: &Terminator,
    endpoint: &str,
    header: Option<Vec<u8>>,
    handshake_timeout: Duration,
    connect_timeout: Duration,
    idle_timeout: Duration,
) -> Result<Terminated, TerminateFailed> {
    let work = async {
        let start = LazyConfigAcceptor::new(Acceptor::default(), public)
            .await
            .map_err(TerminateFailed::Handshake)?;
        let challenge = start
            .client_hello()
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == ACME_TLS_ALPN.as_bytes()));
        if challenge {
            let CertSource::Acme(managed) = &terminator.source else {
                return Err(TerminateFailed::UnexpectedChallenge);
            };
            let config = managed
                .challenge()
                .ok_or(TerminateFailed::UnexpectedChallenge)?;
            let mut tls = start
                .into_stream(config)
                .await
                .map_err(TerminateFailed::Handshake)?;
            // The validator only looks at the certificate; a clean close for it.
            let _ = tls.shutdown().await;
            return Ok(None);
        }
        if let CertSource::Acme(managed) = &terminator.source {
            if !managed.ready() {
                return Err(TerminateFailed::NoCertificate);
            }
        }
        let handshake = async {
            start
                .into_stream(terminator.config.clone())
                .await
                .map_err(TerminateFailed::Handshake)
        };
        let backend = async {
            let unreachable = |source| TerminateFailed::Unreachable {
                address: endpoint.to_string(),
                source,
            };
            let mut server = dial(endpoint, connect_timeout).await.map_err(unreachable)?;
            if let Some(h) = &header {
                server.write_all(h).await.map_err(unreachable)?;
            }
            Ok(server)
        };
        let (tls, server) = tokio::try_join!(handshake, backend)?;
        Ok(Some((tls, server)))
    };
    let (tls, server) = match tokio::time::timeout(handshake_timeout, work).await {
        Err(_) => return Err(TerminateFailed::Timeout(handshake_timeout)),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(None)) => return Ok(Terminated::Challenge),
        Ok(Ok(Some(pair))) => pair,
    };
    Ok(Terminated::Relayed(
        relay::relay_streams(tls, server, idle_timeout).await,
    ))
}

impl Terminated {
    /// The totals to count for it.
    pub fn totals(&self) -> Totals {
        match self {
            Terminated::Relayed(t) => *t,
            Terminated::Challenge => Totals {
                a_to_b: 0,
                b_to_a: 0,
                ended: Ended::Done,
            },
        }
    }
}
