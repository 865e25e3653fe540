//! JSON-RPC on both ends of a test: [`TestService`], a local service that records what it
//! receives, and the clients a test calls with.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eps_core::http::{CallError, Handler, Peer, RpcClient, ServerLimits};
use eps_core::jsonrpc::{self, Outcome, Request};
use eps_core::tls::{self, TlsSettings};
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Deadline of one [`post_raw`] exchange.
const RAW_POST_TIMEOUT: Duration = Duration::from_secs(10);

/// A call as the service received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub params: Value,
    /// The params exactly as they arrived (`params` keeps only the last of duplicate keys).
    pub raw_params: String,
    /// Common name of the caller's TLS client certificate.
    pub peer: Option<String>,
}

/// A JSON-RPC service run in the test process with `eps_core::http::serve`. Every method answers
/// `{"service": NAME, "method": METHOD, "echo": PARAMS}`; params with `"sleep_ms": N` make it
/// wait N ms first. Stops when dropped.
pub struct TestService {
    name: String,
    addr: SocketAddr,
    tls: bool,
    received: Arc<Mutex<Vec<Received>>>,
    shutdown: CancellationToken,
}

struct Recorder {
    name: String,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Handler for Recorder {
    async fn call(&self, req: Request, peer: Peer) -> Outcome {
        let params: Value = req
            .params
            .as_ref()
            .map(|p| serde_json::from_str(p.get()).expect("the server passed valid JSON"))
            .unwrap_or(Value::Null);
        self.received.lock().unwrap().push(Received {
            method: req.method.clone(),
            params: params.clone(),
            raw_params: req
                .params
                .as_ref()
                .map(|p| p.get().to_string())
                .unwrap_or_default(),
            peer: peer.name,
        });
        if let Some(ms) = params.get("sleep_ms").and_then(Value::as_u64) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Ok(jsonrpc::to_raw(
            &json!({"service": self.name, "method": req.method, "echo": params}),
        ))
    }
}

impl TestService {
    /// Starts the service on a free loopback port; HTTPS with `tls` (whose `verify_client`
    /// decides whether callers need a certificate), plain HTTP without.
    pub async fn start(name: &str, tls: Option<&TlsSettings>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let config = tls.map(|t| {
            tls::server_config(t, &[b"h2", b"http/1.1"])
                .unwrap_or_else(|e| panic!("TLS for test service {name}: {e}"))
        });
        let received = Arc::new(Mutex::new(Vec::new()));
        let shutdown = CancellationToken::new();
        let handler = Arc::new(Recorder {
            name: name.to_string(),
            received: received.clone(),
        });
        tokio::spawn(eps_core::http::serve(
            listener,
            config,
            ServerLimits::default(),
            handler,
            shutdown.clone(),
        ));
        Self {
            name: name.to_string(),
            addr,
            tls: tls.is_some(),
            received,
            shutdown,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL to deliver to (`jsonrpc_client.url`).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/jsonrpc", self.addr)
    }

    /// Every call received so far, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Forgets the calls received so far.
    pub fn clear(&self) {
        self.received.lock().unwrap().clear();
    }
}

impl Drop for TestService {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The project's own keep-alive JSON-RPC client (what a proxy uses towards its EPS server).
pub fn rpc_client(url: &str, tls: Option<&TlsSettings>, timeout: Duration) -> RpcClient {
    RpcClient::new(url, tls, timeout).unwrap_or_else(|e| panic!("client for {url}: {e}"))
}

/// Calls `method` with `params` and returns the result as a tree.
pub async fn call(client: &RpcClient, method: &str, params: Value) -> Result<Value, CallError> {
    let raw = jsonrpc::to_raw(&params);
    let result = client.call_raw(method, &raw).await?;
    Ok(serde_json::from_str(result.get()).expect("results are JSON"))
}

/// A TLS client config presenting `tls.certificate`, trusting `tls.ca_certificate`, speaking
/// HTTP/1.1 (for [`post_raw`]).
pub fn client_tls(tls: &TlsSettings) -> Arc<rustls::ClientConfig> {
    tls::client_config(tls, &[b"http/1.1"]).unwrap_or_else(|e| panic!("client TLS: {e}"))
}

/// A TLS client config trusting `ca` and presenting no certificate.
pub fn client_tls_without_cert(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .expect("default TLS versions")
        .with_root_certificates(tls::root_store(ca).unwrap_or_else(|e| panic!("CA: {e}")))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// An HTTP response as [`post_raw`] read it.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub body: String,
}

impl HttpReply {
    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!("HTTP {} body is not JSON ({e}): {}", self.status, self.body)
        })
    }

    /// The JSON-RPC error code of the body, if it carries an error.
    pub fn error_code(&self) -> Option<i64> {
        self.json()["error"]["code"].as_i64()
    }
}

/// Posts `body` as-is to `addr` over HTTP/1.1 (HTTPS with `tls`, server name 127.0.0.1) and
/// reads the response. The body is written while the response is read, so a server that answers
/// early (413) without reading everything is seen answering.
pub async fn post_raw(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    body: Vec<u8>,
) -> std::io::Result<HttpReply> {
    let work = async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        match tls {
            None => exchange(tcp, addr, body).await,
            Some(config) => {
                let name = ServerName::IpAddress(addr.ip().into());
                let io = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await?;
                exchange(io, addr, body).await
            }
        }
    };
    tokio::time::timeout(RAW_POST_TIMEOUT, work)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no response in time"))?
}

async fn exchange<IO>(io: IO, addr: SocketAddr, body: Vec<u8>) -> std::io::Result<HttpReply>
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let head = format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        wr.write_all(&body).await?;
        wr.flush().await?;
        // Keep the write half open until the reader is done: closing it could end the exchange.
        std::future::pending::<()>().await;
        Ok::<_, std::io::Error>(wr)
    });
    let mut buf = Vec::new();
    let result = loop {
        if let Some(reply) = parse_response(&buf) {
            break Ok(reply);
        }
        let mut chunk = [0u8; 16 * 1024];
        match rd.read(&mut chunk).await {
            Ok(0) => {
                break Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed after {} bytes of response: {:?}",
                        buf.len(),
                        String::from_utf8_lossy(&buf)
                    ),
                ))
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => break Err(e),
        }
    };
    writer.abort();
    result
}

/// A complete response with a `Content-Length` body, once `buf` holds one.
fn parse_response(buf: &[u8]) -> Option<HttpReply> {
    crate::keepalive::parse_response(buf).map(|(status, body, _)| HttpReply { status, body })
}
