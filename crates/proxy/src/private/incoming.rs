//! The private proxy's dial-back: checks an `incomingConnection`, dials the public endpoint
//! (or takes a pre-dialed connection) and the domain's backend, presents the token and relays:
//! bytes as they are (passthrough), or through the TLS server of a terminated domain
//! (`terminate.rs`).

use std::net::SocketAddr;

use eps_core::jsonrpc::{self, Outcome, RpcError};
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;

use super::terminate::{self, Terminated};
use super::Private;
use crate::dialback::{IncomingAnswer, IncomingConnection, Token, CONNECTED};
use crate::hostname;
use crate::pool::dial;
use crate::relay;

impl Private {
    /// Whether this proxy has announced `name` to `caller`: accepted, or announced and not yet
    /// answered (right after a start, another instance of this operator may have announced it,
    /// and the public side already sends its clients here) but not refused.
    fn serves(&self, name: &str, caller: &str, now: OffsetDateTime) -> bool {
        let accepted = self
            .accepted
            .read()
            .expect("lock")
            .get(name)
            .is_some_and(|(proxy, exp)| proxy == caller && exp.is_none_or(|t| t > now));
        accepted
            || (!self.refused.read().expect("lock").contains(name)
                && self.announces_to(name, caller, now))
    }

    pub(super) async fn incoming(&self, p: IncomingConnection<'static>) -> Outcome {
        self.metrics.accept("incoming");
        match self.dial_back(p).await {
            Ok(()) => Ok(jsonrpc::to_raw(&IncomingAnswer { status: CONNECTED })),
            Err(refused) => {
                self.metrics.refuse(&refused);
                Err(refused.into())
            }
        }
    }

    /// Checks an `incomingConnection`, dials both ends, sends the token and starts the relay.
    async fn dial_back(&self, p: IncomingConnection<'static>) -> Result<(), DialBackRefused> {
        let caller = p.client.ok_or(DialBackRefused::NoCaller)?;
        let domain =
            hostname::host_name(p.domain.as_bytes()).map_err(|_| DialBackRefused::InvalidDomain)?;
        let now = OffsetDateTime::now_utc();
        // The name is served under its own announcement or the wildcard over its parent.
        let wildcard = hostname::parent(&domain).map(|p| format!("{}{p}", hostname::WILDCARD));
        let served = std::iter::once(domain.as_str())
            .chain(wildcard.as_deref())
            .find(|name| self.serves(name, &caller.name, now));
        let Some(announced) = served else {
            return Err(DialBackRefused::NotAnnounced {
                domain,
                caller: caller.name,
            });
        };
        let token = Token::from_base64(&p.token).ok_or(DialBackRefused::BadToken)?;
        // Announced, so it has a backend (the wildcard's, for a name under one); checked again
        // because the table may just have changed.
        let backend =
            self.backends
                .get(announced)
                .ok_or_else(|| DialBackRefused::NotAnnounced {
                    domain: domain.clone(),
                    caller: caller.name.clone(),
                })?;
        let permit = self
            .relays
            .clone()
            .try_acquire_owned()
            .map_err(|_| DialBackRefused::RelayLimit)?;
        // Checked before dialing: a call that cannot be served costs no connection.
        let header = if backend.proxy_protocol() {
            Some(
                proxy_header(p.client_address, p.server_address)
                    .ok_or(DialBackRefused::NoAddresses)?,
            )
        } else {
            None
        };
        let s = &self.settings;
        let internal = backend.endpoint();
        let public_error = |source| DialBackRefused::Unreachable {
            what: "public endpoint",
            address: p.endpoint.to_string(),
            source,
        };
        let internal_error = |source| DialBackRefused::Unreachable {
            what: "internal endpoint",
            address: internal.to_string(),
            source,
        };
        // Passthrough dials the endpoint now, so that a client of an unreachable one is closed
        // at once; a terminated domain dials it during the handshake (terminate.rs), and not at
        // all for an ACME validation.
        let (mut public, server) = if backend.terminator.is_none() {
            let (public, server) = tokio::join!(
                self.pool.get(&p.endpoint),
                dial(internal, s.connect_timeout)
            );
            let public = public.map_err(public_error)?;
            let mut server = server.map_err(internal_error)?;
            if let Some(header) = &header {
                server.write_all(header).await.map_err(internal_error)?;
            }
            (public, Some(server))
        } else {
            let public = self.pool.get(&p.endpoint).await.map_err(public_error)?;
            (public, None)
        };
        public
            .send_token(token.as_bytes())
            .await
            .map_err(public_error)?;
        let (idle, handshake, connect) =
            (s.idle_timeout, s.tls_handshake_timeout, s.connect_timeout);
        let metrics = self.metrics.clone();
        let endpoint = p.endpoint.into_owned();
        metrics.relayed.inc();
        metrics.active_relays.inc();
        self.tracker.spawn(async move {
            let started = std::time::Instant::now();
            // Checked here, not before answering: the relay starts the moment the public side
            // answers the token.
            let public = match public.answered(token.as_bytes()).await {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::info!(%endpoint, %domain, error = %e, "dial-back failed");
                    None
                }
            };
            let failed = relay::Totals {
                a_to_b: 0,
                b_to_a: 0,
                ended: relay::Ended::Error,
            };
            let terminated = backend.terminator.is_some();
            let t = match (public, server, &backend.terminator) {
                (Some(public), Some(server), None) => relay::relay(public, server, idle).await,
                (Some(public), None, Some(terminator)) => {
                    // Boxed: the TLS session it holds would otherwise make every relay task
                    // this big, passthrough ones too (+5 KiB per idle relay, measured).
                    let served = Box::pin(terminate::serve(
                        public,
                        terminator,
                        backend.endpoint(),
                        header,
                        handshake,
                        connect,
                        idle,
                    ))
                    .await;
                    match served {
                        Ok(Terminated::Challenge) => {
                            tracing::info!(%domain, "ACME validation answered (acme-tls/1)");
                            Terminated::Challenge.totals()
                        }
                        Ok(t) => t.totals(),
                        Err(e) => {
                            metrics.refuse(&e);
                            tracing::debug!(%domain, error = %e, "terminated client closed");
                            failed
                        }
                    }
                }
                _ => failed,
            };
            metrics.active_relays.dec();
            // a is the public side, b the internal server: a → b is client to server.
            metrics.relay_ended(t.a_to_b, t.b_to_a, t.ended.as_str());
            tracing::info!(
                %domain,
                terminated,
                duration_ms = started.elapsed().as_millis() as u64,
                bytes_up = t.a_to_b,
                bytes_down = t.b_to_a,
                outcome = t.ended.as_str(),
                "connection relayed"
            );
            drop(permit);
        });
        Ok(())
    }
}

/// A PROXY protocol v2 header naming the original client and the address it connected to.
/// Mixed families are both written as IPv6 (IPv4-mapped).
fn proxy_header(client: Option<SocketAddr>, server: Option<SocketAddr>) -> Option<Vec<u8>> {
    let (src, dst) = (client?, server?);
    let (src, dst) = match (src, dst) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => {
            (src, dst)
        }
        _ => (v6(src), v6(dst)),
    };
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (src, dst),
    )
    .build()
    .ok()
}

fn v6(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    }
}

/// Why an `incomingConnection` was not served: a metrics label and a JSON-RPC error each.
#[derive(Debug, thiserror::Error)]
enum DialBackRefused {
    #[error("no _client: incomingConnection must come through the EPS server")]
    NoCaller,
    #[error("invalid domain")]
    InvalidDomain,
    #[error("{domain} is not announced to {caller}")]
    NotAnnounced { domain: String, caller: String },
    #[error("token must be 32 bytes in base64")]
    BadToken,
    #[error("too many relays; raise private.max_relays")]
    RelayLimit,
    #[error("client_address and server_address are needed for the PROXY header")]
    NoAddresses,
    #[error("{what} {address}: {source}")]
    Unreachable {
        what: &'static str,
        address: String,
        source: std::io::Error,
    },
}

impl crate::metrics::Reason for DialBackRefused {
    fn label(&self) -> &'static str {
        match self {
            Self::NotAnnounced { .. } => "not_announced",
            Self::Unreachable { .. } => "dial_failed",
            Self::RelayLimit => "relay_limit",
            Self::NoCaller | Self::InvalidDomain | Self::BadToken | Self::NoAddresses => {
                "invalid_params"
            }
        }
    }
}

impl From<DialBackRefused> for RpcError {
    fn from(r: DialBackRefused) -> Self {
        let code = match &r {
            DialBackRefused::NotAnnounced { .. } => jsonrpc::FORBIDDEN,
            DialBackRefused::Unreachable { .. } => jsonrpc::PEER_UNREACHABLE,
            DialBackRefused::RelayLimit => jsonrpc::SERVICE_UNAVAILABLE,
            _ => jsonrpc::INVALID_PARAMS,
        };
        RpcError::new(code, r.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_header_names_the_client() {
        let addr = |s: &str| Some(s.parse().unwrap());
        let h = proxy_header(addr("203.0.113.7:5000"), addr("127.0.0.1:4433")).unwrap();
        let parsed = ppp::v2::Header::try_from(&h[..]).unwrap();
        match parsed.addresses {
            ppp::v2::Addresses::IPv4(a) => {
                assert_eq!(a.source_address.to_string(), "203.0.113.7");
                assert_eq!(a.source_port, 5000);
                assert_eq!(a.destination_port, 4433);
            }
            other => panic!("{other:?}"),
        }
        let mixed = proxy_header(addr("[2001:db8::1]:1"), addr("127.0.0.1:2")).unwrap();
        assert!(matches!(
            ppp::v2::Header::try_from(&mixed[..]).unwrap().addresses,
            ppp::v2::Addresses::IPv6(_)
        ));
        assert!(proxy_header(None, addr("127.0.0.1:2")).is_none());
    }
}
