//! A kept-alive HTTP/1.1 client over TLS ([`KeepAlive`]: many `GET /jsonrpc` on one relayed
//! connection), the TLS connect it shares with one-shot clients ([`connect_tls`]) and the
//! `Content-Length` response parser the hand-written HTTP clients share ([`parse_response`]).

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::tunnel::{ATTEMPT_TIMEOUT, SUCCESS};

/// Opens TCP to `addr` (no Nagle) and TLS with server name `host` (SNI and certificate check);
/// the TLS stream and the client socket's own address. No deadline: the caller sets one.
pub async fn connect_tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    host: &str,
) -> std::io::Result<(TlsStream<TcpStream>, SocketAddr)> {
    tls_over(TcpStream::connect(addr).await?, config, host).await
}

/// [`connect_tls`] over a TCP connection the caller opened (e.g. from inside a network
/// namespace): no Nagle, TLS with server name `host`; the TLS stream and the socket's own
/// address. No deadline: the caller sets one.
pub async fn tls_over(
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    host: &str,
) -> std::io::Result<(TlsStream<TcpStream>, SocketAddr)> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    tcp.set_nodelay(true)?;
    let local = tcp.local_addr()?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    Ok((tls, local))
}

/// An HTTP/1.1 keep-alive connection over TLS: many requests, one relayed connection.
pub struct KeepAlive {
    tls: TlsStream<TcpStream>,
    /// The client socket's own address (what a PROXY header must carry).
    pub local: SocketAddr,
    host: String,
    buf: Vec<u8>,
}

impl KeepAlive {
    /// Connects to `addr` with server name `host`, within [`ATTEMPT_TIMEOUT`].
    pub async fn open(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        host: &str,
    ) -> std::io::Result<Self> {
        let (tls, local) = tokio::time::timeout(ATTEMPT_TIMEOUT, connect_tls(addr, config, host))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake"))??;
        Ok(Self {
            tls,
            local,
            host: host.to_string(),
            buf: Vec::new(),
        })
    }

    /// `GET /jsonrpc` on this connection; the status and the body.
    pub async fn get(&mut self) -> std::io::Result<(u16, String)> {
        let request = format!("GET /jsonrpc HTTP/1.1\r\nHost: {}\r\n\r\n", self.host);
        let work = async {
            self.tls.write_all(request.as_bytes()).await?;
            self.tls.flush().await?;
            loop {
                if let Some((status, body, used)) = parse_response(&self.buf) {
                    self.buf.drain(..used);
                    return Ok((status, body));
                }
                let mut chunk = [0u8; 16 * 1024];
                let n = self.tls.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the kept-alive connection was closed",
                    ));
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(ATTEMPT_TIMEOUT, work)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no response"))?
    }

    /// A [`get`](Self::get) that must answer 200 with the demo's body (`when` names it).
    pub async fn expect_success(&mut self, when: &str) {
        let r = self
            .get()
            .await
            .unwrap_or_else(|e| panic!("kept-alive request ({when}): {e}"));
        assert_eq!(
            (r.0, r.1.as_str()),
            (200, SUCCESS),
            "kept-alive request ({when})"
        );
    }
}

/// A complete response with a `Content-Length` at the start of `buf`: status, body, length.
pub(crate) fn parse_response(buf: &[u8]) -> Option<(u16, String, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let len: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())?;
    let body = buf.get(end + 4..end + 4 + len)?;
    Some((
        status,
        String::from_utf8_lossy(body).into_owned(),
        end + 4 + len,
    ))
}
