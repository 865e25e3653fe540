//! The gRPC port: peers are verified inside the TLS handshake (see `peers`), each connection
//! holds a permit, and every call is handed to the broker with the caller's identity.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use eps_core::jsonrpc::{self, RpcError};
use eps_core::net::{self, Slots, WhenFull};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;

use tokio_stream::StreamExt;

use super::call_stream::CallStream;
use super::pb::eps_server::{Eps, EpsServer};
use super::Node;
use super::{pb, to_pb};
use crate::peers::{check_peer, PeerIdentity, SharedDirectory};
use crate::settings::GrpcServerSettings;

/// Deadline for a peer's TLS handshake on the gRPC port.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one peer connection may carry at once.
const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Calls one peer connection may have in flight on its `Calls` streams, all streams together.
/// The next call is read from the stream only once one of these has been answered.
pub const MAX_STREAM_CALLS: usize = 1024;

/// What the gRPC handler knows of the connection a call came on.
#[derive(Debug, Clone)]
pub struct PeerConn {
    pub addr: SocketAddr,
    /// Shared, so that handing it to each call costs a reference count, not two strings.
    pub identity: Arc<PeerIdentity>,
    /// Bounds the calls in flight on this connection's `Calls` streams.
    in_flight: Arc<Semaphore>,
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

struct Service<B> {
    broker: Arc<B>,
    /// Whether `Calls` is served (`grpc_server.call_streams`).
    call_streams: bool,
    /// Largest answer a `Calls` stream carries; a larger one is answered with an error for
    /// that call alone (encoding it would end the stream for every call on it).
    max_message_bytes: usize,
    /// Ends the `Calls` streams (after their calls in flight are answered) on shutdown, so
    /// that the graceful shutdown does not wait on streams a peer keeps open.
    shutdown: CancellationToken,
}

impl<B: Node> Service<B> {
    /// The verified peer of a request, if the directory still accepts its certificate: a
    /// connection outlives directory changes, so every new stream or call checks again.
    fn peer<T>(&self, request: &tonic::Request<T>) -> Result<PeerConn, tonic::Status> {
        let conn = request
            .extensions()
            .get::<PeerConn>()
            .cloned()
            .ok_or_else(|| tonic::Status::unauthenticated("no verified peer certificate"))?;
        let id = &conn.identity;
        if !self.broker.accepts(&id.name, &id.fingerprint) {
            tracing::warn!(peer = %id.name, fingerprint = %id.fingerprint, "refused peer: the directory no longer accepts its certificate");
            return Err(tonic::Status::permission_denied(format!(
                "the directory no longer accepts this certificate of {}",
                id.name
            )));
        }
        Ok(conn)
    }
}

type CallResponses =
    Pin<Box<dyn Stream<Item = Result<pb::CallResponse, tonic::Status>> + Send + 'static>>;
type CallRequests =
    Pin<Box<dyn Stream<Item = Result<pb::CallRequest, tonic::Status>> + Send + 'static>>;

/// Reads calls from `incoming` (of peer `caller`), runs each in its own task through the
/// broker, and sends each answer with the call's id to `answers`, in the order they finish. At
/// most `in_flight` calls run at once: the next is read only when one has been answered, so a
/// busy peer is slowed by HTTP/2 flow control. Returns when `incoming` ends or fails, or, after
/// `shutdown`, once every call read before it has been answered; a call read after `shutdown`
/// is answered at once as not delivered, so that the caller may send it to another instance.
/// `answers` closes after the last answer. With `fingerprint` (the certificate the caller
/// showed), each call first checks that the directory still accepts that certificate; the
/// first call that finds it no longer does is refused and ends the stream.
#[allow(clippy::too_many_arguments)]
pub(super) async fn answer_calls<S, B: Node>(
    incoming: &mut S,
    answers: mpsc::Sender<Result<pb::CallResponse, tonic::Status>>,
    broker: Arc<B>,
    caller: Arc<str>,
    fingerprint: Option<Arc<str>>,
    in_flight: Arc<Semaphore>,
    max_message_bytes: usize,
    shutdown: CancellationToken,
) where
    S: Stream<Item = Result<pb::CallRequest, tonic::Status>> + Unpin,
{
    let calls = TaskTracker::new();
    loop {
        let stopping = shutdown.is_cancelled();
        if stopping {
            calls.close();
        }
        let req = tokio::select! {
            r = incoming.next() => r,
            _ = shutdown.cancelled(), if !stopping => continue,
            _ = calls.wait(), if stopping => break,
        };
        let req = match req {
            Some(Ok(r)) => r,
            None => break,
            Some(Err(status)) => {
                tracing::debug!(peer = %caller, error = %status, "call stream broken");
                break;
            }
        };
        // A stream outlives directory changes: the certificate it was opened with must still
        // be accepted.
        if let Some(fp) = fingerprint.as_deref() {
            if !broker.accepts(&caller, fp) {
                tracing::warn!(peer = %caller, fingerprint = %fp, "refused peer: the directory no longer accepts its certificate; ending its call stream");
                let mut resp = to_pb(Err(RpcError::not_delivered(
                    jsonrpc::FORBIDDEN,
                    format!(
                        "the directory of {} no longer accepts this certificate of {caller}",
                        broker.name()
                    ),
                )));
                resp.id = req.id;
                let _ = answers.send(Ok(resp)).await;
                break;
            }
        }
        // Read first, then wait for room: an idle stream holds no permit, and a full
        // connection stops reading (back-pressure through HTTP/2 flow control).
        let permit = tokio::select! {
            p = in_flight.clone().acquire_owned(), if !stopping => Some(p.expect("semaphore never closes")),
            _ = shutdown.cancelled() => None,
        };
        let Some(permit) = permit else {
            let mut resp = to_pb(Err(RpcError::not_delivered(
                jsonrpc::SERVICE_UNAVAILABLE,
                format!("{} is shutting down", broker.name()),
            )));
            resp.id = req.id;
            let _ = answers.send(Ok(resp)).await;
            continue;
        };
        let (broker, tx, caller) = (broker.clone(), answers.clone(), caller.clone());
        calls.spawn(async move {
            let _permit = permit;
            let call = broker.incoming(&caller, &req.method, &req.params);
            let outcome = match req.timeout_ms {
                0 => call.await,
                ms => {
                    let limit = Duration::from_millis(ms.into());
                    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
                        Err(RpcError::new(
                            jsonrpc::PEER_TIMEOUT,
                            format!(
                                "{}.{} not answered within the caller's {ms} ms",
                                broker.name(),
                                req.method
                            ),
                        ))
                    })
                }
            };
            let mut resp = to_pb(outcome);
            if prost::Message::encoded_len(&resp) > max_message_bytes {
                resp = to_pb(Err(RpcError::new(
                    jsonrpc::TOO_LARGE,
                    format!(
                        "{}.{}: result over the EPS network's max_message_bytes \
                         ({max_message_bytes} bytes)",
                        broker.name(),
                        req.method
                    ),
                )));
            }
            resp.id = req.id;
            let _ = tx.send(Ok(resp)).await;
        });
    }
    // The answers end once every call read has been answered and dropped its sender.
    calls.close();
    calls.wait().await;
}

#[tonic::async_trait]
impl<B: Node> Eps for Service<B> {
    type CallsStream = CallResponses;
    type ServeStream = CallRequests;

    async fn serve(
        &self,
        request: tonic::Request<tonic::Streaming<pb::CallResponse>>,
    ) -> Result<tonic::Response<CallRequests>, tonic::Status> {
        let conn = self.peer(&request)?;
        let name = conn.identity.name.clone();
        let peers = self.broker.peers();
        let (stream, rx) =
            CallStream::new(name.clone(), conn.addr.to_string(), self.max_message_bytes);
        let registration = peers
            .reverse()
            .register(&name, &conn.identity.fingerprint, stream.clone())
            .map_err(tonic::Status::resource_exhausted)?;
        tracing::info!(peer = %name, addr = %conn.addr, streams = peers.reverse().count(&name), "reverse stream accepted: calls to this peer go on it");
        let answers = request.into_inner();
        let (shutdown, secs) = (
            self.shutdown.clone(),
            peers.settings().call_timeout.as_secs_f64(),
        );
        tokio::spawn(async move {
            let mut registration = Some(registration);
            let answered = stream.take_answers(answers, secs);
            tokio::pin!(answered);
            tokio::select! {
                _ = &mut answered => {}
                // Closed on our side (its certificate no longer accepted): end it, so that its
                // holder hangs up and meets the new directory at its next handshake.
                _ = stream.closed() => {}
                _ = shutdown.cancelled() => {
                    // No new calls go on it; those sent already get their answers first.
                    registration = None;
                    tokio::select! {
                        _ = &mut answered => {}
                        _ = stream.idle() => stream.close(RpcError::new(
                            jsonrpc::PEER_UNREACHABLE,
                            format!("reverse stream of {name}: this server is shutting down"),
                        )),
                    }
                }
            }
            drop(registration);
            tracing::info!(peer = %name, addr = %conn.addr, "reverse stream ended");
        });
        Ok(tonic::Response::new(Box::pin(
            ReceiverStream::new(rx).map(Ok),
        )))
    }

    async fn calls(
        &self,
        request: tonic::Request<tonic::Streaming<pb::CallRequest>>,
    ) -> Result<tonic::Response<CallResponses>, tonic::Status> {
        if !self.call_streams {
            return Err(tonic::Status::unimplemented(
                "call streams are off here (grpc_server.call_streams: false); use Call",
            ));
        }
        let conn = self.peer(&request)?;
        tracing::debug!(peer = %conn.identity.name, addr = %conn.addr, "call stream opened");
        let (tx, rx) = mpsc::channel(MAX_STREAM_CALLS);
        let mut incoming = request.into_inner();
        let (broker, shutdown) = (self.broker.clone(), self.shutdown.clone());
        let max_message_bytes = self.max_message_bytes;
        tokio::spawn(async move {
            let caller = Arc::from(conn.identity.name.as_str());
            let fingerprint = Some(Arc::from(conn.identity.fingerprint.as_str()));
            answer_calls(
                &mut incoming,
                tx,
                broker,
                caller,
                fingerprint,
                conn.in_flight.clone(),
                max_message_bytes,
                shutdown,
            )
            .await
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn call(
        &self,
        request: tonic::Request<pb::CallRequest>,
    ) -> Result<tonic::Response<pb::CallResponse>, tonic::Status> {
        let conn = self.peer(&request)?;
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
pub async fn serve<B: Node>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    settings: GrpcServerSettings,
    broker: Arc<B>,
    directory: SharedDirectory,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let GrpcServerSettings {
        max_connections,
        max_message_bytes,
        call_streams,
        keepalive_interval,
        keepalive_timeout,
        ..
    } = settings;
    let (tx, rx) = mpsc::channel::<std::io::Result<PeerStream>>(64);
    let acceptor = TlsAcceptor::from(tls);
    let accept_shutdown = shutdown.clone();
    // The handshake tasks; each connection then lives in tonic, holding its slot.
    let handshakes = TaskTracker::new();
    tokio::spawn(async move {
        let slots = Slots::new(max_connections, WhenFull::Wait);
        net::serve(
            listener,
            "grpc",
            slots,
            &handshakes,
            &accept_shutdown,
            || {},
            |tcp, addr, permit| {
                let (acceptor, tx, directory) = (acceptor.clone(), tx.clone(), directory.clone());
                async move {
                    let io =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
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
                        info: PeerConn {
                            addr,
                            identity: Arc::new(identity),
                            in_flight: Arc::new(Semaphore::new(MAX_STREAM_CALLS)),
                        },
                        _permit: permit,
                    };
                    let _ = tx.send(Ok(stream)).await;
                }
            },
        )
        .await;
    });
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(keepalive_interval))
        .http2_keepalive_timeout(Some(keepalive_timeout))
        // Each peer's calls share one stream: its window follows the link's bandwidth-delay
        // product rather than capping a long link at 1 MiB per round trip.
        .http2_adaptive_window(Some(true))
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .tcp_nodelay(true)
        .add_service(
            EpsServer::new(Service {
                broker,
                max_message_bytes,
                call_streams,
                shutdown: shutdown.clone(),
            })
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes),
        )
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown.cancelled_owned())
        .await
}
