//! The public port's admission of a client before any work is done on its behalf: the PROXY
//! header when the connection comes from a trusted load balancer, the access policy
//! ([`crate::policy`]), and the ClientHello read under a byte and time bound. Refusals are logged at debug at most once a second per reason, each line
//! saying how many it stands for: a flood costs no log volume.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::clienthello::{self, ClientHelloError, Parse};
use crate::policy::gate::Gate;
use crate::policy::proxy_header;
use crate::policy::{canonical, in_ranges, Cidr};
use crate::settings::PublicSettings;

/// At most one debug line per refusal reason in this time.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Who the client is, as the connection or its PROXY header says.
pub struct Client {
    /// The client's address: from the PROXY header behind a load balancer, else the peer's.
    pub addr: SocketAddr,
    /// The address the client connected to, when a PROXY header named it.
    pub destination: Option<SocketAddr>,
    /// Bytes read after the PROXY header: the start of the ClientHello.
    pub rest: Vec<u8>,
}

/// The policy gate, the trusted load balancers and the refusal log of one public proxy.
pub struct Admission {
    pub gate: Gate,
    trusted: Vec<Cidr>,
    /// reason → (when its last line was logged, refusals not logged since).
    log: Mutex<HashMap<&'static str, (std::time::Instant, u64)>>,
}

impl Admission {
    pub fn new(s: &PublicSettings) -> Self {
        Self {
            gate: Gate::new(&s.policy),
            trusted: s.proxy_protocol.trusted.clone(),
            log: Mutex::new(HashMap::new()),
        }
    }

    /// True when `peer` is a load balancer that must send a PROXY header.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        !self.trusted.is_empty() && in_ranges(&self.trusted, canonical(peer))
    }

    /// `Some(n)` when a refusal for `reason` should be logged now, `n` being the refusals for
    /// that reason not logged since the last line; `None` to stay quiet.
    pub fn log_refusal(&self, reason: &'static str) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut log = self.log.lock().expect("refusal log lock");
        match log.get_mut(reason) {
            Some((at, skipped)) if now.duration_since(*at) < LOG_EVERY => {
                *skipped += 1;
                None
            }
            Some((at, skipped)) => {
                *at = now;
                Some(std::mem::take(skipped))
            }
            None => {
                log.insert(reason, (now, 0));
                Some(0)
            }
        }
    }
}

/// Reads the PROXY header a trusted load balancer (`peer`) sends first, by `deadline`; a refusal
/// why not otherwise.
pub async fn read_proxy_header(
    stream: &mut TcpStream,
    peer: SocketAddr,
    deadline: Instant,
) -> Result<Client, ReadRefused> {
    let mut buf = Vec::with_capacity(256);
    loop {
        // `parse` refuses a header longer than MAX_BYTES, so the buffer never holds more than
        // one read past it.
        let room = proxy_header::MAX_BYTES + 1 - buf.len().min(proxy_header::MAX_BYTES);
        buf.reserve(room);
        let mut limited = (&mut *stream).take(room as u64);
        match tokio::time::timeout_at(deadline, limited.read_buf(&mut buf)).await {
            Err(_) => return Err(ReadRefused::Timeout(PROXY_HEADER)),
            Ok(Err(e)) => return Err(ReadRefused::Read(e)),
            Ok(Ok(0)) => return Err(ReadRefused::Truncated(PROXY_HEADER)),
            Ok(Ok(_)) => {}
        }
        match proxy_header::parse(&buf) {
            Ok(proxy_header::Parse::Complete(h)) => {
                let rest = buf.split_off(h.len);
                return Ok(Client {
                    addr: h.source.unwrap_or(peer),
                    destination: h.destination,
                    rest,
                });
            }
            Ok(proxy_header::Parse::Incomplete) if buf.len() > proxy_header::MAX_BYTES => {
                return Err(ReadRefused::BadProxyHeader("too long".into()))
            }
            Ok(proxy_header::Parse::Incomplete) => continue,
            Err(e) => return Err(ReadRefused::BadProxyHeader(e.to_string())),
        }
    }
}

/// Reads until the ClientHello (of at most `max` bytes) is complete, starting with the bytes in `buf` (what followed
/// a PROXY header), by `deadline`; returns every byte of it and the SNI, or why not.
pub async fn read_client_hello(
    client: &mut TcpStream,
    mut buf: Vec<u8>,
    deadline: Instant,
    max: usize,
) -> Result<(Vec<u8>, String), ReadRefused> {
    if !buf.is_empty() {
        if let Some(done) = parse_client_hello(&buf, max) {
            return done.map(|sni| (buf, sni));
        }
    }
    // Read straight into the buffer: a stack chunk would live in every connection's task
    // for as long as its relay runs.
    buf.reserve(2048);
    loop {
        let room = (max + 1).saturating_sub(buf.len()).min(4096);
        if room == 0 {
            return Err(ReadRefused::TooLarge(max));
        }
        buf.reserve(room);
        let mut limited = (&mut *client).take(room as u64);
        match tokio::time::timeout_at(deadline, limited.read_buf(&mut buf)).await {
            Err(_) => return Err(ReadRefused::Timeout(CLIENT_HELLO)),
            Ok(Err(e)) => return Err(ReadRefused::Read(e)),
            Ok(Ok(0)) => return Err(ReadRefused::Truncated(CLIENT_HELLO)),
            Ok(Ok(_)) => {}
        };
        if let Some(done) = parse_client_hello(&buf, max) {
            return done.map(|sni| (buf, sni));
        }
    }
}

/// The SNI of the ClientHello in `buf`, a refusal, or `None` while it is incomplete.
fn parse_client_hello(buf: &[u8], max: usize) -> Option<Result<String, ReadRefused>> {
    match clienthello::parse_client_hello(buf, max) {
        Ok(Parse::Complete { sni, .. }) => Some(Ok(sni)),
        Ok(Parse::Incomplete) if buf.len() > max => Some(Err(ReadRefused::TooLarge(max))),
        Ok(Parse::Incomplete) => None,
        // A PROXY header from a source not trusted to send one.
        Err(ClientHelloError::NotTls) if proxy_header::looks_like_header(buf) => {
            Some(Err(ReadRefused::UntrustedProxyHeader))
        }
        Err(e) => Some(Err(ReadRefused::Hello(e))),
    }
}

const PROXY_HEADER: &str = "PROXY header";
const CLIENT_HELLO: &str = "ClientHello";

/// Why a client was closed while its PROXY header or ClientHello was read.
#[derive(Debug, thiserror::Error)]
pub enum ReadRefused {
    #[error("{0} not complete within client_hello_timeout")]
    Timeout(&'static str),
    #[error("read failed: {0}")]
    Read(std::io::Error),
    #[error("end of stream inside the {0}")]
    Truncated(&'static str),
    #[error("PROXY header from a trusted source: {0}")]
    BadProxyHeader(String),
    #[error("a PROXY header from a source outside proxy_protocol.trusted")]
    UntrustedProxyHeader,
    #[error("ClientHello over {0} bytes")]
    TooLarge(usize),
    #[error(transparent)]
    Hello(ClientHelloError),
}

impl crate::metrics::Reason for ReadRefused {
    fn label(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "client_hello_timeout",
            Self::Read(_) => "read_error",
            Self::Truncated(_) => "truncated",
            Self::BadProxyHeader(_) => "bad_proxy_header",
            Self::UntrustedProxyHeader => "untrusted_proxy_header",
            Self::TooLarge(_) | Self::Hello(ClientHelloError::TooLarge(_)) => "too_large",
            Self::Hello(ClientHelloError::NotTls) => "not_tls",
            Self::Hello(ClientHelloError::NotClientHello) => "not_client_hello",
            Self::Hello(ClientHelloError::Malformed(_)) => "malformed",
            Self::Hello(ClientHelloError::NoSni) => "no_sni",
            Self::Hello(ClientHelloError::InvalidSni(_)) => "invalid_sni",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_once_a_second_per_reason() {
        let s: PublicSettings = serde_json::from_value(serde_json::json!({
            "bind_address": "127.0.0.1:0",
            "internal_bind_address": "127.0.0.1:0",
            "internal_endpoint": "127.0.0.1:1",
            "proxy_protocol": {"trusted": ["10.0.0.0/8"]},
        }))
        .unwrap();
        let a = Admission::new(&s);
        assert!(a.trusts("10.1.2.3".parse().unwrap()));
        assert!(a.trusts("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!a.trusts("192.0.2.1".parse().unwrap()));
        assert_eq!(a.log_refusal("denied"), Some(0));
        for _ in 0..100 {
            assert_eq!(a.log_refusal("denied"), None);
        }
        assert_eq!(a.log_refusal("rate_limited"), Some(0), "its own budget");
    }
}
