//! The EPS network's transport: a mutual-TLS gRPC server for peers and one long-lived HTTP/2
//! channel per peer for outgoing calls.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use eps_core::jsonrpc::{self, Outcome, RpcError};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

use crate::broker::Broker;
use crate::peers::{check_peer, PeerIdentity, SharedDirectory};

pub mod pb {
    tonic::include_proto!("eps.v1");
}

use pb::eps_client::EpsClient;
use pb::eps_server::{Eps, EpsServer};

/// Deadline for a peer's TLS handshake on the gRPC port.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings keep idle channels alive through middleboxes and detect dead peers.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one peer connection may carry at once.
const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// What the gRPC handler knows of the connection a call came on.
#[derive(Debug, Clone)]
pub struct PeerConn {
    pub addr: SocketAddr,
    pub identity: PeerIdentity,
}

/// A verified peer connection, holding its connection permit for as long as it lives.
struct PeerStream {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerConn,
    _permit: OwnedSemaphorePermit,
}

impl Connected for PeerStream {
    type ConnectInfo = PeerConn;
    fn connect_info(&self) -> PeerConn {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

struct Service {
    broker: Arc<Broker>,
}

#[tonic::async_trait]
impl Eps for Service {
    async fn call(
        &self,
        request: tonic::Request<pb::CallRequest>,
    ) -> Result<tonic::Response<pb::CallResponse>, tonic::Status> {
        let conn = request
            .extensions()
            .get::<PeerConn>()
            .cloned()
            .ok_or_else(|| tonic::Status::unauthenticated("no verified peer certificate"))?;
        let req = request.into_inner();
        tracing::debug!(peer = %conn.identity.name, addr = %conn.addr, fingerprint = %conn.identity.fingerprint, method = %req.method, "call from peer");
        let outcome = self
            .broker
            .incoming(&conn.identity.name, &req.method, &req.params)
            .await;
        Ok(tonic::Response::new(to_pb(outcome)))
    }
}

/// Serves the gRPC port until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    max_connections: usize,
    max_message_bytes: usize,
    broker: Arc<Broker>,
    directory: SharedDirectory,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (tx, rx) = mpsc::channel::<std::io::Result<PeerStream>>(64);
    let acceptor = TlsAcceptor::from(tls);
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    let accept_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(5);
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("semaphore never closes"),
                _ = accept_shutdown.cancelled() => return,
            };
            let (tcp, addr) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => { backoff = Duration::from_millis(5); s }
                    Err(e) => {
                        tracing::warn!(error = %e, "gRPC accept failed; backing off");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
                _ = accept_shutdown.cancelled() => return,
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, directory) = (acceptor.clone(), tx.clone(), directory.clone());
            tokio::spawn(async move {
                let io = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(io)) => io,
                    Ok(Err(e)) => {
                        tracing::info!(%addr, error = %e, "peer handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%addr, "peer handshake timed out");
                        return;
                    }
                };
                let cert = io.get_ref().1.peer_certificates().and_then(|c| c.first());
                let identity = match cert.map(|c| check_peer(&directory.load(), c)) {
                    Some(Ok(id)) => id,
                    _ => return, // the verifier already refused such a peer
                };
                tracing::debug!(%addr, peer = %identity.name, "peer connected");
                let stream = PeerStream {
                    io,
                    info: PeerConn { addr, identity },
                    _permit: permit,
                };
                let _ = tx.send(Ok(stream)).await;
            });
        }
    });
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .tcp_nodelay(true)
        .add_service(
            EpsServer::new(Service { broker })
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            shutdown.cancelled_owned(),
        )
        .await
}

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

fn to_pb(outcome: Outcome) -> pb::CallResponse {
    use pb::call_response::Outcome as O;
    let outcome = match outcome {
        Ok(r) => O::Result(Bytes::copy_from_slice(r.get().as_bytes())),
        Err(e) => O::Error(pb::RpcError {
            code: e.code,
            message: e.message,
            data: e
                .data
                .map(|d| Bytes::from(serde_json::to_vec(&d).expect("json")))
                .unwrap_or_default(),
        }),
    };
    pb::CallResponse {
        outcome: Some(outcome),
    }
}

fn from_pb(resp: pb::CallResponse) -> Outcome {
    use pb::call_response::Outcome as O;
    match resp.outcome {
        Some(O::Result(bytes)) => {
            let text = String::from_utf8(bytes.to_vec())
                .map_err(|_| RpcError::internal("peer sent a result that is not UTF-8"))?;
            RawValue::from_string(text).map_err(|e| {
                RpcError::internal(format!("peer sent a result that is not JSON: {e}"))
            })
        }
        Some(O::Error(e)) => Err(RpcError {
            code: e.code,
            message: e.message,
            data: if e.data.is_empty() {
                None
            } else {
                serde_json::from_slice(&e.data).ok()
            },
        }),
        None => Err(RpcError::internal("peer sent an empty response")),
    }
}
