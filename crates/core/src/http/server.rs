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
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::jsonrpc::{self, Outcome, Request, Response, RpcError};
use crate::net::{self, Slots, WhenFull};
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

/// Serves JSON-RPC on `listener` until `shutdown` is cancelled, then lets the requests in
/// flight finish and returns.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: ServerLimits,
    handler: Arc<H>,
    shutdown: CancellationToken,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    let slots = Slots::new(limits.max_connections, WhenFull::Wait);
    let limits = Arc::new(limits);
    let conns = TaskTracker::new();
    net::serve(
        listener,
        "jsonrpc",
        slots,
        &conns,
        &shutdown,
        || {},
        |stream, addr, permit| {
            let (acceptor, limits, handler, shutdown) = (
                acceptor.clone(),
                limits.clone(),
                handler.clone(),
                shutdown.clone(),
            );
            async move {
                let _permit = permit;
                match acceptor {
                    None => {
                        let peer = Peer { addr, name: None };
                        serve_conn(stream, peer, limits, handler, shutdown).await
                    }
                    Some(acceptor) => {
                        let tls = match tokio::time::timeout(
                            limits.header_timeout,
                            acceptor.accept(stream),
                        )
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
            }
        },
    )
    .await;
    // Requests in flight finish (each under its deadline); idle connections close at once.
    conns.close();
    conns.wait().await;
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
) -> hyper::Response<ReplyBody> {
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
    let http1 = req.version() < http::Version::HTTP_2;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = req.into_body();
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return too_large(body, limits, http1).await;
    }
    let work = async {
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = match frame {
                Ok(f) => f.into_data().unwrap_or_default(),
                Err(e) => {
                    tracing::debug!(addr = %peer.addr, error = %e, "reading request body failed");
                    return Err(reply(
                        StatusCode::BAD_REQUEST,
                        Response::new(None, Err(RpcError::invalid_request("body not readable"))),
                    ));
                }
            };
            if buf.len() + data.len() > limits.max_body_bytes {
                return Err(too_large(body, limits, http1).await);
            }
            buf.extend_from_slice(&data);
        }
        let body = buf;
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

/// Most of a refused body read and dropped before the 413, and how long that may take.
const DISCARD_BYTES: usize = 64 * 1024 * 1024;
const DISCARD_TIME: Duration = Duration::from_secs(10);

/// The 413 for a body over `max_body_bytes`, once the rest of the body has been read and
/// dropped (bounded in bytes and time): every client then reads it, whether it sends its whole
/// body before reading (Python's http.client, which a close with unread data would reset) or
/// ends an upload answered early with an error (curl's HTTP/2). A body past those bounds is
/// cut off after the answer: over HTTP/1.1 the connection closes, over HTTP/2 the response holds
/// the body and drops it once complete, so the stream is reset with NO_ERROR after it
/// (RFC 9113 §8.1), not CANCEL before it.
async fn too_large(
    mut body: Incoming,
    limits: &ServerLimits,
    http1: bool,
) -> hyper::Response<ReplyBody> {
    let time = limits.request_timeout.min(DISCARD_TIME);
    let drained = tokio::time::timeout(time, async {
        let mut read = 0usize;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => read += f.data_ref().map_or(0, |d| d.len()),
                Err(_) => return true,
            }
            if read > DISCARD_BYTES {
                return false;
            }
        }
        true
    })
    .await
    .unwrap_or(false);
    let mut resp = reply(
        StatusCode::PAYLOAD_TOO_LARGE,
        Response::new(
            None,
            Err(RpcError::new(
                jsonrpc::TOO_LARGE,
                format!("request body over {} bytes", limits.max_body_bytes),
            )),
        ),
    );
    if !drained {
        if http1 {
            resp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        } else {
            resp.body_mut().request = Some(body);
        }
    }
    resp
}

/// A response body that may hold the request's unread body until the response has gone out.
pub struct ReplyBody {
    data: Full<Bytes>,
    request: Option<Incoming>,
}

impl hyper::body::Body for ReplyBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        std::pin::Pin::new(&mut self.data).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.data.size_hint()
    }
}

fn reply(status: StatusCode, resp: Response) -> hyper::Response<ReplyBody> {
    hyper::Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(ReplyBody {
            data: Full::new(Bytes::from(resp.to_bytes())),
            request: None,
        })
        .expect("static response parts are valid")
}
