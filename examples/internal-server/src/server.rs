//! The accept loop: a permit per connection, one task per connection, the TLS handshake inside
//! that task under a deadline, HTTP/1.1 or HTTP/2 by ALPN (plain: by the HTTP/2 preface), and a
//! graceful stop.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use eps_core::net::Acceptor;

use crate::linger::Lingering;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::routes;

/// Deadline for the TLS handshake and, on HTTP/1.1, for each request's headers (which also
/// closes keep-alive connections idle that long).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time open connections get to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Largest HTTP/1.1 read buffer; bounds the request head.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Streams one HTTP/2 connection may have open at once.
const MAX_CONCURRENT_STREAMS: u32 = 256;

/// Serves `listener` until `shutdown` is cancelled, then lets open connections finish for at
/// most [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    max_connections: usize,
    proxy_protocol: bool,
    shutdown: CancellationToken,
) {
    let max_connections = max_connections.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let permits = Arc::new(Semaphore::new(max_connections));
    let acceptor = tls.map(TlsAcceptor::from);
    let mut accept = Acceptor::new(listener, "https");
    loop {
        // The permit comes first: at the limit, new clients wait in the kernel's backlog.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = shutdown.cancelled() => break,
        };
        let Some((stream, peer)) = accept.next(&shutdown).await else {
            break;
        };
        let (acceptor, shutdown) = (acceptor.clone(), shutdown.clone());
        tokio::spawn(async move {
            serve_conn(stream, acceptor, proxy_protocol, shutdown).await;
            tracing::debug!(%peer, "connection closed");
            drop(permit);
        });
    }
    drop(accept);
    tracing::info!("shutting down; letting open connections finish");
    let all = permits.acquire_many(max_connections as u32);
    if tokio::time::timeout(SHUTDOWN_GRACE, all).await.is_err() {
        tracing::info!(
            open = max_connections - permits.available_permits(),
            "grace period over; closing open connections"
        );
    }
}

async fn serve_conn(
    mut stream: TcpStream,
    acceptor: Option<TlsAcceptor>,
    proxy_protocol: bool,
    shutdown: CancellationToken,
) {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    if proxy_protocol {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_proxy_header(&mut stream)).await {
            Ok(Ok(client)) => {
                tracing::info!(?peer, %client, "client address from the PROXY header")
            }
            Ok(Err(e)) => {
                tracing::info!(?peer, error = %e, "no valid PROXY protocol v2 header; closed");
                return;
            }
            Err(_) => {
                tracing::info!(?peer, "PROXY header timed out");
                return;
            }
        }
    }
    let stream = Lingering::new(stream);
    let Some(acceptor) = acceptor else {
        return serve_http(stream, peer, shutdown).await;
    };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(?peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(?peer, "TLS handshake timed out");
            return;
        }
    };
    serve_http(tls, peer, shutdown).await;
}

/// HTTP/1.1 or HTTP/2 on `io` until the client is done or the grace period after `shutdown`.
async fn serve_http<IO>(io: IO, peer: Option<std::net::SocketAddr>, shutdown: CancellationToken)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        // A client that half-closes after its request still gets the response.
        .half_close(true)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    let service =
        hyper::service::service_fn(|req| async { Ok::<_, Infallible>(routes::handle(req).await) });
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
        // Clients hanging up mid-request is ordinary.
        tracing::debug!(?peer, error = %e, "connection ended with an error");
    }
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    eps_core::net::shutdown_signal().await;
    tracing::info!("signal received");
    shutdown.cancel();
}

/// Reads a PROXY protocol v2 header (exactly its bytes, nothing of the TLS stream after it) and
/// returns the client's address as it describes it.
async fn read_proxy_header(stream: &mut TcpStream) -> std::io::Result<String> {
    use tokio::io::AsyncReadExt;
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    // 12-byte signature, version/command, family/protocol, 16-bit length.
    let mut buf = vec![0u8; 16];
    stream.read_exact(&mut buf).await?;
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    buf.resize(16 + len, 0);
    stream.read_exact(&mut buf[16..]).await?;
    let header = ppp::v2::Header::try_from(&buf[..]).map_err(|e| invalid(e.to_string()))?;
    Ok(match header.addresses {
        ppp::v2::Addresses::IPv4(a) => format!("{}:{}", a.source_address, a.source_port),
        ppp::v2::Addresses::IPv6(a) => format!("[{}]:{}", a.source_address, a.source_port),
        other => format!("{other:?}"),
    })
}
