//! The dial-back protocol both roles speak, in one place (docs/architecture.md §3.1, §3.2, §7):
//! the token, the `announceConnections` and `incomingConnection` messages (serialized by one
//! side and parsed by the other from the same types), the public side's table of clients
//! waiting for their dial-back, and reading a token off a data connection.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use eps_core::jsonrpc::RpcError;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::oneshot;

use crate::{ClientName, ClientParams};

/// Token length in bytes.
pub const TOKEN_LEN: usize = 32;

/// What a data connection presents to claim its client: 32 bytes from the OS CSPRNG, sent raw
/// on the data port and in base64 inside `incomingConnection`. Never printed.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token([u8; TOKEN_LEN]);

impl Token {
    /// A fresh token from the OS random generator.
    pub fn draw() -> Result<Self, getrandom::Error> {
        let mut t = [0; TOKEN_LEN];
        getrandom::fill(&mut t)?;
        Ok(Self(t))
    }

    pub fn as_bytes(&self) -> &[u8; TOKEN_LEN] {
        &self.0
    }

    /// The form `incomingConnection` carries.
    pub fn to_base64(self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// A token from its base64 form, if it is exactly [`TOKEN_LEN`] bytes.
    pub fn from_base64(text: &str) -> Option<Self> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

/// The answer to `incomingConnection`: the private proxy dialed both ends and sent the token.
pub const CONNECTED: &str = "connected";

/// `incomingConnection`, public → private: dial `endpoint` and present `token` for a client
/// of `domain`. The addresses let the private side write a PROXY header. Serialized from
/// borrowed fields on the per-connection path, parsed into owned ones on the other side.
#[derive(Debug, Serialize, Deserialize)]
pub struct IncomingConnection<'a> {
    pub domain: Cow<'a, str>,
    pub token: Cow<'a, str>,
    pub endpoint: Cow<'a, str>,
    /// The client as the public proxy saw it (or as a trusted PROXY header named it).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_addr"
    )]
    pub client_address: Option<SocketAddr>,
    /// The address the client connected to.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_addr"
    )]
    pub server_address: Option<SocketAddr>,
    /// Added by the receiving EPS server: the caller.
    #[serde(rename = "_client", default, skip_serializing)]
    pub client: Option<ClientName>,
}

/// An address, or none where the sender had none to give (earlier versions sent `""`).
fn lenient_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text: Option<Cow<'de, str>> = Option::deserialize(d)?;
    Ok(text.and_then(|t| t.parse().ok()))
}

/// `incomingConnection`'s result.
#[derive(Debug, Serialize, Deserialize)]
pub struct IncomingAnswer<'a> {
    pub status: &'a str,
}

/// `announceConnections`, private → public: the domains to route to the caller.
#[derive(Debug, Serialize, Deserialize)]
pub struct AnnounceConnections {
    pub connections: Vec<RequestedConnection>,
    /// Added by the receiving EPS server: the caller.
    #[serde(rename = "_client", default, skip_serializing)]
    pub client: Option<ClientParams>,
}

/// One domain in `announceConnections`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestedConnection {
    pub domain: String,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// Access rules for the public proxy to enforce; decoded per domain there, so that one
    /// domain's bad rules do not refuse the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Value>,
}

/// `announceConnections`' result: one answer per requested domain, in order.
#[derive(Debug, Serialize, Deserialize)]
pub struct AnnounceAnswer {
    pub connections: Vec<DomainAnswer>,
}

/// What the public proxy answered for one domain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DomainAnswer {
    pub domain: String,
    pub accepted: bool,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
    /// The rules the public proxy enforces, echoed back (absent from an older public proxy,
    /// which ignores them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Value>,
}

/// Clients waiting for their dial-back, by token, at most `max` at once.
pub struct Pending<S> {
    waiting: Mutex<HashMap<Token, oneshot::Sender<S>>>,
    max: usize,
    gauge: Gauge,
}

/// The table is full: the client is refused.
#[derive(Debug)]
pub struct PendingFull;

/// A client's place in the table; leaving it (however the client's task ends) frees it.
#[must_use = "the entry is removed when the guard drops"]
pub struct PendingGuard<'a, S> {
    table: &'a Pending<S>,
    token: Token,
}

impl<S> Drop for PendingGuard<'_, S> {
    fn drop(&mut self) {
        self.table.remove(&self.token);
    }
}

impl<S> Pending<S> {
    /// A table of at most `max` entries; `gauge` follows its size.
    pub fn new(max: usize, gauge: Gauge) -> Self {
        Self {
            waiting: Mutex::new(HashMap::new()),
            max,
            gauge,
        }
    }

    /// Enters `token`; the receiver gets the data connection that presents it.
    pub fn insert(
        &self,
        token: Token,
    ) -> Result<(PendingGuard<'_, S>, oneshot::Receiver<S>), PendingFull> {
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = self.waiting.lock().expect("pending lock");
            if waiting.len() >= self.max {
                return Err(PendingFull);
            }
            waiting.insert(token, tx);
        }
        self.gauge.inc();
        Ok((PendingGuard { table: self, token }, rx))
    }

    /// Hands `stream` to the client waiting for `token`; gives it back if nobody waits for it
    /// (unknown, used or expired token).
    pub fn complete(&self, token: &Token, stream: S) -> Result<(), S> {
        match self.remove(token) {
            Some(tx) => tx.send(stream),
            None => Err(stream),
        }
    }

    /// Gives up on `token` (its dial-back request failed): its client stops waiting at once.
    pub fn cancel(&self, token: &Token) {
        self.remove(token);
    }

    /// The one place an entry leaves the table.
    fn remove(&self, token: &Token) -> Option<oneshot::Sender<S>> {
        let tx = self.waiting.lock().expect("pending lock").remove(token);
        if tx.is_some() {
            self.gauge.dec();
        }
        tx
    }
}

/// Why no token was read from a data connection.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// No byte within the first wait.
    #[error("no first byte in time")]
    Silent,
    /// Closed before sending anything: a pooled connection retired unused.
    #[error("closed unused")]
    ClosedUnused,
    /// Closed or failed partway through the token.
    #[error("closed before a whole token: {0}")]
    Truncated(std::io::Error),
    /// The first byte came, the rest not within its wait.
    #[error("no whole token in time")]
    Slow,
}

/// Reads a token: its first byte within `first_byte_within`, the whole of it within `rest_within`
/// of that first byte.
pub async fn read_token<R: AsyncRead + Unpin>(
    io: &mut R,
    first_byte_within: Duration,
    rest_within: Duration,
) -> Result<Token, TokenError> {
    let mut token = [0; TOKEN_LEN];
    let n = match tokio::time::timeout(first_byte_within, io.read(&mut token)).await {
        Err(_) => return Err(TokenError::Silent),
        Ok(Ok(0)) => return Err(TokenError::ClosedUnused),
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return Err(TokenError::Truncated(e)),
    };
    match tokio::time::timeout(rest_within, io.read_exact(&mut token[n..])).await {
        Ok(Ok(_)) => Ok(Token(token)),
        Ok(Err(e)) => Err(TokenError::Truncated(e)),
        Err(_) => Err(TokenError::Slow),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const LONG: Duration = Duration::from_secs(5);
    const SHORT: Duration = Duration::from_millis(50);

    #[test]
    fn tokens_round_trip_and_wrong_lengths_are_refused() {
        let t = Token::draw().unwrap();
        assert_eq!(Token::from_base64(&t.to_base64()), Some(t));
        assert_ne!(Token::draw().unwrap(), t);
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 31]);
        assert_eq!(Token::from_base64(&short), None);
        assert_eq!(Token::from_base64("not base64!"), None);
        assert_eq!(format!("{t:?}"), "Token(…)");
    }

    #[test]
    fn incoming_connection_is_read_as_written() {
        let token = Token::draw().unwrap().to_base64();
        let sent = IncomingConnection {
            domain: "a.example.com".into(),
            token: token.as_str().into(),
            endpoint: "198.18.0.1:9999".into(),
            client_address: Some("203.0.113.7:5000".parse().unwrap()),
            server_address: None,
            client: None,
        };
        let mut v = serde_json::to_value(&sent).unwrap();
        assert!(v.get("server_address").is_none() && v.get("_client").is_none());
        v["_client"] = serde_json::json!({"name": "public-proxy-1"});
        let got: IncomingConnection = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(got.domain, "a.example.com");
        assert_eq!(got.client_address, sent.client_address);
        assert_eq!(got.client.unwrap().name, "public-proxy-1");
        // An earlier public proxy sent "" for an address it did not know.
        v["server_address"] = serde_json::json!("");
        let got: IncomingConnection = serde_json::from_value(v).unwrap();
        assert_eq!(got.server_address, None);
    }

    #[tokio::test]
    async fn pending_hands_the_stream_to_its_token_once() {
        let table = Pending::<u32>::new(2, Gauge::default());
        let (t1, t2, t3) = (
            Token::draw().unwrap(),
            Token::draw().unwrap(),
            Token::draw().unwrap(),
        );
        let (g1, rx1) = table.insert(t1).unwrap();
        let (_g2, _rx2) = table.insert(t2).unwrap();
        assert!(table.insert(t3).is_err(), "full at 2");
        assert_eq!(table.gauge.get(), 2);
        assert_eq!(table.complete(&t1, 7), Ok(()));
        assert_eq!(rx1.await, Ok(7));
        assert_eq!(table.complete(&t1, 8), Err(8), "a token is used once");
        drop(g1);
        assert_eq!(
            table.gauge.get(),
            1,
            "the guard of a used token removes nothing more"
        );
        table.cancel(&t2);
        assert_eq!(table.gauge.get(), 0);
        assert_eq!(table.complete(&t2, 9), Err(9));
    }

    #[tokio::test]
    async fn tokens_are_read_whole_within_their_waits() {
        let t = Token::draw().unwrap();
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&t.as_bytes()[..5]).await.unwrap();
        let bytes = *t.as_bytes();
        let writer = tokio::spawn(async move {
            a.write_all(&bytes[5..]).await.unwrap();
            a
        });
        assert_eq!(read_token(&mut b, LONG, LONG).await.unwrap(), t);
        let mut a = writer.await.unwrap();

        let (_silent, mut b2) = tokio::io::duplex(64);
        assert!(matches!(
            read_token(&mut b2, SHORT, LONG).await,
            Err(TokenError::Silent)
        ));
        a.write_all(&[1, 2, 3]).await.unwrap();
        assert!(matches!(
            read_token(&mut b, LONG, SHORT).await,
            Err(TokenError::Slow)
        ));
        drop(a);
        let (closed, mut b3) = tokio::io::duplex(64);
        drop(closed);
        assert!(matches!(
            read_token(&mut b3, LONG, LONG).await,
            Err(TokenError::ClosedUnused)
        ));
        let (mut part, mut b4) = tokio::io::duplex(64);
        part.write_all(&[1; 10]).await.unwrap();
        drop(part);
        assert!(matches!(
            read_token(&mut b4, LONG, LONG).await,
            Err(TokenError::Truncated(_))
        ));
    }
}
