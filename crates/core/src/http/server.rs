//! The bounded JSON-RPC server every local link listens with: a connection permit before
//! `accept`, the TLS handshake inside the connection's task under a deadline, bounded header
//! size, header read time, body size and handler time, and a JSON-RPC error for every bad
//! request.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::jsonrpc::{self, Outcome, Request, Response, RpcError};
use crate::net::Acceptor;
use crate::tls;

/// Default cap on concurrent connections of one JSON-RPC listener.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default cap on a request body. Announcements and calls are small; 1 MiB leaves room.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Default cap on request headers.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Default deadline for the TLS handshake and for reading a request's headers.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default deadline for answering one request (reading its body included).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Limits of a JSON-RPC listener. Each one bounds what a misbehaving client can cost.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerLimits {
    /// Concurrent connections; more wait in the kernel's backlog. Each costs a task and buffers.
    pub max_connections: usize,
    /// Largest request body in bytes; larger gets HTTP 413 and a JSON-RPC error.
    pub max_body_bytes: usize,
    /// Largest request head in bytes (at least 8192).
    pub max_header_bytes: usize,
    /// Seconds allowed for the TLS handshake and for each request's headers.
    #[serde(with = "secs")]
    pub header_timeout: Duration,
    /// Seconds allowed for one request, body and handler included.
    #[serde(with = "secs")]
    pub request_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// A JSON-RPC listener as settings describe it; both binaries' local links use it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JsonRpcServerSettings {
    pub bind_address: SocketAddr,
    /// HTTPS when set (recommended, with `verify_client: true`); plain HTTP otherwise.
    #[serde(default)]
    pub tls: Option<tls::TlsSettings>,
    #[serde(default)]
    pub limits: ServerLimits,
}

impl JsonRpcServerSettings {
    /// The listener's TLS config (HTTP/2 and HTTP/1.1 offered), if it speaks HTTPS.
    pub fn tls_config(&self) -> Result<Option<Arc<rustls::ServerConfig>>, tls::TlsError> {
        self.tls
            .as_ref()
            .map(|t| tls::server_config(t, &[b"h2", b"http/1.1"]))
            .transpose()
    }
}

/// Durations in settings are written as (fractional) seconds.
pub mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        if !(v.is_finite() && v >= 0.0) {
            return Err(serde::de::Error::custom(
                "expected a non-negative number of seconds",
            ));
        }
        Ok(Duration::from_secs_f64(v))
    }
}

/// Who sent a request: the address and, over mutual TLS, the client certificate.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The client certificate's common name, when one was presented.
    pub name: Option<String>,
}

/// Answers JSON-RPC requests.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. The server bounds how long this may take.
    fn call(&self, req: Request, peer: Peer) -> impl Future<Output = Outcome> + Send;
}

/// Serves JSON-RPC on `listener` until `shutdown` is cancelled.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: ServerLimits,
    handler: Arc<H>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let acceptor = tls.map(TlsAcceptor::from);
    let limits = Arc::new(limits);
    let mut listener = Acceptor::new(listener, "jsonrpc");
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore never closes"),
            _ = shutdown.cancelled() => return,
        };
        let Some((stream, addr)) = listener.next(&shutdown).await else {
            return;
        };
        let (acceptor, limits, handler, shutdown) = (
            acceptor.clone(),
            limits.clone(),
            handler.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                None => {
                    let peer = Peer { addr, name: None };
                    serve_conn(stream, peer, limits, handler, shutdown).await
                }
                Some(acceptor) => {
                    let tls =
                        match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%addr, error = %e, "TLS handshake refused");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%addr, "TLS handshake timed out");
                                return;
                            }
                        };
                    let name = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| tls::operator_name(c));
                    serve_conn(tls, Peer { addr, name }, limits, handler, shutdown).await
                }
            }
        });
    }
}

async fn serve_conn<IO, H>(
    io: IO,
    peer: Peer,
    limits: Arc<ServerLimits>,
    handler: Arc<H>,
    shutdown: CancellationToken,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_concurrent_streams(256);
    let addr = peer.addr;
    let service = hyper::service::service_fn(move |req| {
        let (handler, limits, peer) = (handler.clone(), limits.clone(), peer.clone());
        async move { Ok::<_, Infallible>(handle(req, &limits, &*handler, peer).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // Peers hanging up mid-request is ordinary.
        tracing::debug!(%addr, error = %e, "JSON-RPC connection ended with an error");
    }
}

async fn handle<H: Handler>(
    req: hyper::Request<Incoming>,
    limits: &ServerLimits,
    handler: &H,
    peer: Peer,
) -> hyper::Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            Response::new(
                None,
                Err(RpcError::invalid_request(
                    "JSON-RPC requests are sent with POST",
                )),
            ),
        );
    }
    let too_large = || {
        reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            Response::new(
                None,
                Err(RpcError::new(
                    jsonrpc::TOO_LARGE,
                    format!("request body over {} bytes", limits.max_body_bytes),
                )),
            ),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return too_large();
    }
    let work = async {
        let body = match Limited::new(req.into_body(), limits.max_body_bytes)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
            Err(e) => {
                tracing::debug!(addr = %peer.addr, error = %e, "reading request body failed");
                return Err(reply(
                    StatusCode::BAD_REQUEST,
                    Response::new(None, Err(RpcError::invalid_request("body not readable"))),
                ));
            }
        };
        let request = match jsonrpc::parse_request(&body) {
            Ok(r) => r,
            Err((id, e)) => return Ok(Response::new(id, Err(e))),
        };
        let id = request.id.clone();
        let outcome = handler.call(request, peer).await;
        Ok(Response::new(id, outcome))
    };
    match tokio::time::timeout(limits.request_timeout, work).await {
        Ok(Ok(resp)) => reply(StatusCode::OK, resp),
        Ok(Err(early)) => early,
        Err(_) => reply(
            StatusCode::OK,
            Response::new(
                None,
                Err(RpcError::new(
                    jsonrpc::PEER_TIMEOUT,
                    "request not answered within the server's request_timeout",
                )),
            ),
        ),
    }
}

fn reply(status: StatusCode, resp: Response) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(resp.to_bytes())))
        .expect("static response parts are valid")
}
