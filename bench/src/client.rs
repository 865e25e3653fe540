//! The benchmark's TLS client: tokio + rustls (ring), trusting the generated root CA, SNI
//! `test.internal-server.local`, HTTP/1.1 written and parsed by hand so that the client costs as
//! little as possible and the same for every system.
//!
//! TLS session resumption is off: every connection is a full handshake, as from a new client.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The name every system routes by (and the internal server's certificate carries).
pub const SNI: &str = "test.internal-server.local";
/// eps's second domain, whose TLS ends at the private proxy (same wildcard certificate there),
/// in front of a plain-HTTP internal server.
pub const TERMINATED_SNI: &str = "terminated.internal-server.local";
/// Largest response head accepted.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Read buffer of a download.
const READ_BUFFER: usize = 256 * 1024;
/// Deadline of one small exchange (connect, handshake, request, response).
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

pub type Conn = TlsStream<TcpStream>;

/// How long each phase of a small exchange took.
#[derive(Debug, Clone, Copy)]
pub struct Phases {
    /// `connect()` until the TCP connection is established (the proxy's accept queue).
    pub tcp: Duration,
    /// ClientHello sent until the server's Finished is in (TLS 1.3: one round trip to the
    /// internal server, and whatever the system does before the ClientHello reaches it).
    pub handshake: Duration,
    /// `GET /` sent until the whole answer is in: one more round trip.
    pub request: Duration,
}

#[derive(Clone)]
pub struct Client {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl Client {
    /// A client trusting the PEM root CA at `root`.
    pub fn new(root: &Path) -> anyhow::Result<Self> {
        Self::with_sni(root, SNI)
    }

    /// [`new`](Self::new), asking for `sni`.
    pub fn with_sni(root: &Path, sni: &str) -> anyhow::Result<Self> {
        let roots = eps_core::tls::root_store(root).context("loading the root CA")?;
        let mut config = rustls::ClientConfig::builder_with_provider(eps_core::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = Resumption::disabled();
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            name: ServerName::try_from(sni.to_string())?,
        })
    }

    /// A new TCP connection and a completed TLS handshake.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<Conn> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        self.connector.connect(self.name.clone(), tcp).await
    }

    /// A new connection, `GET /` and its whole answer (`{"message": "success"}`), under
    /// [`EXCHANGE_TIMEOUT`].
    pub async fn small_exchange(&self, addr: SocketAddr) -> anyhow::Result<()> {
        self.timed_exchange(addr).await.map(|_| ())
    }

    /// [`small_exchange`](Self::small_exchange), timed in its three phases.
    pub async fn timed_exchange(&self, addr: SocketAddr) -> anyhow::Result<Phases> {
        let work = async {
            let t0 = Instant::now();
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let t1 = Instant::now();
            let mut conn = self.connector.connect(self.name.clone(), tcp).await?;
            let t2 = Instant::now();
            let body = get(&mut conn, "/").await?;
            anyhow::ensure!(
                body.starts_with(b"{\"message\""),
                "unexpected answer {:?}",
                String::from_utf8_lossy(&body)
            );
            Ok(Phases {
                tcp: t1 - t0,
                handshake: t2 - t1,
                request: t2.elapsed(),
            })
        };
        tokio::time::timeout(EXCHANGE_TIMEOUT, work)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {EXCHANGE_TIMEOUT:?}"))?
    }

    /// Downloads `GET /bytes/{n}` on a new connection; returns the body bytes received.
    pub async fn download(&self, addr: SocketAddr, n: u64) -> anyhow::Result<u64> {
        let mut conn = self.connect(addr).await?;
        let (len, already) = request(&mut conn, &format!("/bytes/{n}")).await?;
        let mut got = already.len() as u64;
        let mut buf = vec![0u8; READ_BUFFER];
        while got < len {
            let r = conn.read(&mut buf).await?;
            anyhow::ensure!(r > 0, "connection closed after {got} of {len} body bytes");
            got += r as u64;
        }
        Ok(got)
    }
}

/// `GET path` over plain HTTP/1.0 (a metrics listener); the whole answer's body.
pub async fn plain_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let work = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        let answer = String::from_utf8(answer).context("answer is not UTF-8")?;
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .context("answer without a head")?;
        anyhow::ensure!(
            head.starts_with("HTTP/1.") && head.contains(" 200 "),
            "answer {head:?}"
        );
        Ok(body.to_string())
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, work)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within {EXCHANGE_TIMEOUT:?}"))?
}

/// Sends `GET path` and reads the whole (small) body.
async fn get(conn: &mut Conn, path: &str) -> anyhow::Result<Vec<u8>> {
    let (len, mut body) = request(conn, path).await?;
    let len = usize::try_from(len)?;
    anyhow::ensure!(len <= MAX_HEAD_BYTES, "body of {len} bytes is not small");
    let mut buf = [0u8; 4096];
    while body.len() < len {
        let r = conn.read(&mut buf).await?;
        anyhow::ensure!(r > 0, "connection closed inside the body");
        body.extend_from_slice(&buf[..r]);
    }
    body.truncate(len);
    Ok(body)
}

/// Sends `GET path` and reads the response head; returns the Content-Length and the body bytes
/// read with the head.
async fn request(conn: &mut Conn, path: &str) -> anyhow::Result<(u64, Vec<u8>)> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {SNI}\r\n\r\n");
    conn.write_all(req.as_bytes()).await?;
    conn.flush().await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let len = parse_head(&buf[..end])?;
            return Ok((len, buf[end + 4..].to_vec()));
        }
        anyhow::ensure!(buf.len() <= MAX_HEAD_BYTES, "response head too large");
        let r = conn.read(&mut chunk).await?;
        anyhow::ensure!(r > 0, "connection closed before the response head");
        buf.extend_from_slice(&chunk[..r]);
    }
}

/// Checks for status 200 and returns the Content-Length.
fn parse_head(head: &[u8]) -> anyhow::Result<u64> {
    let head = std::str::from_utf8(head).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    anyhow::ensure!(status.split(' ').nth(1) == Some("200"), "answer {status:?}");
    lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .context("response without Content-Length")
}

#[cfg(test)]
mod tests {
    use super::parse_head;

    #[test]
    fn head_gives_content_length() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-type: x\r\nContent-Length: 42";
        assert_eq!(parse_head(head).unwrap(), 42);
        assert!(parse_head(b"HTTP/1.1 404 Not Found\r\ncontent-length: 1").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked").is_err());
    }
}
