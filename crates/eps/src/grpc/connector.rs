//! Connecting to a peer: TCP, TLS with this server's certificate, the peer's pinned certificate
//! checked against the directory, and reconnects paced by a backoff shared by every connect
//! to that peer.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eps_core::backoff::Backoff;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::peers::{check_peer, SharedDirectory};
use crate::settings::GrpcClientSettings;

/// First pause before connecting again to a peer that could not be reached.
const FIRST_RECONNECT: Duration = Duration::from_millis(50);

/// Reconnect pacing for one peer: attempts after failures wait 50 ms, 100 ms, ... up to a cap.
struct Reconnect {
    backoff: Backoff,
    next_attempt: Option<Instant>,
}

/// Connects to one peer; cloned into every connect the channel makes.
#[derive(Clone)]
pub(super) struct Connector {
    name: String,
    address: String,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    directory: SharedDirectory,
    timeout: Duration,
    reconnect: Arc<Mutex<Reconnect>>,
    /// Fingerprints of the certificates peers showed at their last connect, by (name, address).
    verified: Verified,
}

/// The certificate each peer showed when its current connection was made (peer name → address →
/// fingerprint), so that what runs on that connection can re-check it against a changed
/// directory.
pub(super) type Verified =
    Arc<Mutex<std::collections::HashMap<String, std::collections::HashMap<String, String>>>>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Connector {
    /// Connects to peer `name` at `address` (TLS server name `server_name`) within
    /// `connect_timeout`, pausing between failed attempts from 50 ms up to
    /// `max_reconnect_backoff`, and notes the certificate each connect verified in `verified`.
    pub(super) fn new(
        name: &str,
        address: &str,
        server_name: ServerName<'static>,
        tls: TlsConnector,
        directory: SharedDirectory,
        settings: &GrpcClientSettings,
        verified: Verified,
    ) -> Self {
        let (timeout, max_backoff) = (settings.connect_timeout, settings.max_reconnect_backoff);
        Self {
            name: name.to_string(),
            address: address.to_string(),
            server_name,
            tls,
            directory,
            timeout,
            reconnect: Arc::new(Mutex::new(Reconnect {
                backoff: Backoff::new(FIRST_RECONNECT, max_backoff),
                next_attempt: None,
            })),
            verified,
        }
    }

    pub(super) async fn connect(
        &self,
    ) -> Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, BoxError> {
        let wait = {
            let b = self.reconnect.lock().expect("reconnect poisoned");
            b.next_attempt
                .map(|t| t.saturating_duration_since(Instant::now()))
        };
        if let Some(w) = wait.filter(|w| !w.is_zero()) {
            tokio::time::sleep(w).await;
        }
        match self.try_connect().await {
            Ok(io) => {
                let mut b = self.reconnect.lock().expect("reconnect poisoned");
                if b.backoff.failures() > 0 {
                    tracing::info!(peer = %self.name, address = %self.address, "peer reachable again");
                }
                b.backoff.reset();
                b.next_attempt = None;
                Ok(TokioIo::new(io))
            }
            Err(e) => {
                let mut b = self.reconnect.lock().expect("reconnect poisoned");
                let pause = b.backoff.fail();
                b.next_attempt = Some(Instant::now() + pause);
                tracing::info!(peer = %self.name, address = %self.address, error = %e, retry_in_ms = pause.as_millis() as u64, "waiting for peer");
                Err(e.into())
            }
        }
    }

    async fn try_connect(
        &self,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, std::io::Error> {
        let work = async {
            let tcp = TcpStream::connect(&self.address).await?;
            tcp.set_nodelay(true)?;
            let io = self.tls.connect(self.server_name.clone(), tcp).await?;
            // The CA chain and name are checked by the handshake; the pin is ours to check.
            let cert = io
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or_else(|| std::io::Error::other("peer sent no certificate"))?;
            let id = check_peer(&self.directory.load(), cert).map_err(std::io::Error::other)?;
            if id.name != self.name {
                return Err(std::io::Error::other(format!(
                    "peer at {} is {:?}, expected {:?}",
                    self.address, id.name, self.name
                )));
            }
            self.verified
                .lock()
                .expect("verified poisoned")
                .entry(self.name.clone())
                .or_default()
                .insert(self.address.clone(), id.fingerprint);
            Ok(io)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
    }
}
