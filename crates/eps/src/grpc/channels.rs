//! Outgoing channels: one lazily connected, long-lived HTTP/2 channel per peer, reconnected
//! with backoff, with the peer's pinned certificate checked on every connect.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use eps_core::jsonrpc::{self, Outcome, RpcError};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use super::pb::eps_client::EpsClient;
use super::{from_pb, pb, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};
use crate::peers::{check_peer, SharedDirectory};

/// Reconnect pacing for one peer: attempts after failures wait 50 ms, 100 ms, ... up to a cap.
#[derive(Default)]
struct Backoff {
    failures: u32,
    next_attempt: Option<Instant>,
}

/// Outgoing channels, one per peer, created on first use and reused.
pub struct Peers {
    tls: Arc<rustls::ClientConfig>,
    directory: SharedDirectory,
    connect_timeout: Duration,
    call_timeout: Duration,
    max_backoff: Duration,
    max_message_bytes: usize,
    channels: Mutex<HashMap<String, (String, EpsClient<Channel>)>>,
}

impl Peers {
    pub fn new(
        tls: Arc<rustls::ClientConfig>,
        directory: SharedDirectory,
        connect_timeout: Duration,
        call_timeout: Duration,
        max_backoff: Duration,
        max_message_bytes: usize,
    ) -> Self {
        Self {
            tls,
            directory,
            connect_timeout,
            call_timeout,
            max_backoff,
            max_message_bytes,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// Calls `method` on peer `name` at `address` with JSON `params`.
    pub async fn call(
        &self,
        name: &str,
        address: &str,
        method: &str,
        params: &RawValue,
    ) -> Outcome {
        let mut client = match self.client(name, address) {
            Ok(c) => c,
            Err(e) => return Err(e),
        };
        let mut request = tonic::Request::new(pb::CallRequest {
            method: method.to_string(),
            params: Bytes::copy_from_slice(params.get().as_bytes()),
        });
        request.set_timeout(self.call_timeout);
        let secs = self.call_timeout.as_secs_f64();
        match tokio::time::timeout(self.call_timeout, client.call(request)).await {
            Err(_) => Err(RpcError::new(
                jsonrpc::PEER_TIMEOUT,
                format!("peer {name} ({address}) did not answer within {secs:.1} s"),
            )),
            Ok(Ok(resp)) => from_pb(resp.into_inner()),
            Ok(Err(status)) => Err(status_error(name, address, &status, secs)),
        }
    }

    fn client(&self, name: &str, address: &str) -> Result<EpsClient<Channel>, RpcError> {
        let mut channels = self.channels.lock().expect("channel map poisoned");
        if let Some((addr, client)) = channels.get(name) {
            if addr == address {
                return Ok(client.clone());
            }
        }
        // The map holds at most one channel per operator in the directory.
        let channel = self.channel(name, address)?;
        let client = EpsClient::new(channel)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes);
        channels.insert(name.to_string(), (address.to_string(), client.clone()));
        Ok(client)
    }

    fn channel(&self, name: &str, address: &str) -> Result<Channel, RpcError> {
        let server_name = ServerName::try_from(name.to_string()).map_err(|e| {
            RpcError::new(
                jsonrpc::PEER_UNREACHABLE,
                format!("peer name {name:?} is not a valid TLS server name: {e}"),
            )
        })?;
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| {
                RpcError::new(
                    jsonrpc::PEER_UNREACHABLE,
                    format!("peer {name} has an invalid grpc_server address {address:?}: {e}"),
                )
            })?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let connector = Connector {
            name: name.to_string(),
            address: address.to_string(),
            server_name,
            tls: TlsConnector::from(self.tls.clone()),
            directory: self.directory.clone(),
            timeout: self.connect_timeout,
            max_backoff: self.max_backoff,
            backoff: Arc::new(Mutex::new(Backoff::default())),
        };
        Ok(
            endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
                let c = connector.clone();
                async move { c.connect().await }
            })),
        )
    }
}

#[derive(Clone)]
struct Connector {
    name: String,
    address: String,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    directory: SharedDirectory,
    timeout: Duration,
    max_backoff: Duration,
    backoff: Arc<Mutex<Backoff>>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Connector {
    async fn connect(
        &self,
    ) -> Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, BoxError> {
        let wait = {
            let b = self.backoff.lock().expect("backoff poisoned");
            b.next_attempt
                .map(|t| t.saturating_duration_since(Instant::now()))
        };
        if let Some(w) = wait.filter(|w| !w.is_zero()) {
            tokio::time::sleep(w).await;
        }
        match self.try_connect().await {
            Ok(io) => {
                let mut b = self.backoff.lock().expect("backoff poisoned");
                if b.failures > 0 {
                    tracing::info!(peer = %self.name, address = %self.address, "peer reachable again");
                }
                *b = Backoff::default();
                Ok(TokioIo::new(io))
            }
            Err(e) => {
                let mut b = self.backoff.lock().expect("backoff poisoned");
                b.failures = b.failures.saturating_add(1);
                let pause = Duration::from_millis(50)
                    .saturating_mul(1 << b.failures.min(10))
                    .min(self.max_backoff);
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
            Ok(io)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
    }
}

fn status_error(name: &str, address: &str, status: &tonic::Status, secs: f64) -> RpcError {
    use std::error::Error as _;
    let mut detail = status.message().to_string();
    let mut source = status.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !detail.contains(&text) {
            detail.push_str(": ");
            detail.push_str(&text);
        }
        source = s.source();
    }
    // hyper reports a connection that died before the request went out (a peer refusing our
    // certificate after the TLS 1.3 handshake) as "canceled"; only an expired deadline, ours or
    // the grpc-timeout the peer enforces ("Timeout expired"), is a timeout.
    let expired = status.code() == tonic::Code::DeadlineExceeded
        || (status.code() == tonic::Code::Cancelled
            && status.message() == tonic::TimeoutExpired(()).to_string());
    if expired {
        RpcError::new(
            jsonrpc::PEER_TIMEOUT,
            format!("peer {name} ({address}) did not answer within {secs:.1} s"),
        )
    } else {
        RpcError::new(
            jsonrpc::PEER_UNREACHABLE,
            format!("peer {name} ({address}) unreachable: {detail}"),
        )
    }
}
