//! The keep-alive JSON-RPC client both sides of a local link call with.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::jsonrpc::{self, Response, RpcError};
use crate::tls::{self, TlsSettings};

/// Why a call made with [`RpcClient`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No connection to the server could be made (TCP or TLS): the request was not sent.
    #[error("{url} unreachable: {reason}")]
    NotDelivered { url: String, reason: String },
    /// The connection broke after the request may have been sent.
    #[error("{url} unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    /// No answer within the deadline.
    #[error("{url} did not answer within {secs:.1} s")]
    Timeout { url: String, secs: f64 },
    /// The server answered with something that is not a JSON-RPC response.
    #[error("{url} answered HTTP {status} without a JSON-RPC response")]
    Http { url: String, status: u16 },
    /// The server answered with a JSON-RPC error.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The result does not have the expected shape.
    #[error("unexpected result: {0}")]
    Decode(String),
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL does not parse or has an unsupported scheme.
    #[error("invalid URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    /// The TLS settings could not be loaded.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A JSON-RPC client over one kept-alive HTTP(S) connection pool.
#[derive(Clone)]
pub struct RpcClient {
    client: HttpsClient,
    url: http::Uri,
    next_id: Arc<AtomicU64>,
    timeout: Duration,
    max_response_bytes: usize,
}

/// Largest response body a client reads by default: a server cannot make it hold more.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

impl RpcClient {
    /// A client for `url`. An `https` URL needs `tls` (the CA to trust and, for servers that
    /// verify clients, this side's certificate).
    pub fn new(
        url: &str,
        tls: Option<&TlsSettings>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| ClientError::Url {
                url: url.into(),
                reason: e.to_string(),
            })?;
        let config = match (uri.scheme_str(), tls) {
            (Some("https"), Some(t)) => tls::client_config(t, &[])?,
            (Some("https"), None) => {
                return Err(ClientError::Url {
                    url: url.into(),
                    reason: "https needs `tls` settings (ca_certificate, certificate, key)".into(),
                })
            }
            (Some("http"), _) => {
                // Plain HTTP on a local link: the TLS config is never used.
                Arc::new(
                    rustls::ClientConfig::builder_with_provider(tls::provider())
                        .with_safe_default_protocol_versions()
                        .expect("default versions are supported")
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth(),
                )
            }
            _ => {
                return Err(ClientError::Url {
                    url: url.into(),
                    reason: "expected an http:// or https:// URL".into(),
                })
            }
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*config).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .build(connector);
        Ok(Self {
            client,
            url: uri,
            next_id: Arc::new(AtomicU64::new(1)),
            timeout,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        })
    }

    /// The same client, reading responses of at most `n` bytes (a larger one fails the call).
    pub fn with_max_response_bytes(mut self, n: usize) -> Self {
        self.max_response_bytes = n;
        self
    }

    /// The deadline of calls made without one.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The URL this client calls.
    pub fn url(&self) -> String {
        self.url.to_string()
    }

    /// Calls `method` with typed params and result.
    pub async fn call<P: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        params: &P,
    ) -> Result<R, CallError> {
        decode(&self.call_raw(method, &jsonrpc::to_raw(params)).await?)
    }

    /// Calls `method` with raw params and returns the raw result.
    pub async fn call_raw(
        &self,
        method: &str,
        params: &RawValue,
    ) -> Result<Box<RawValue>, CallError> {
        self.call_with_deadline(method, params, self.timeout).await
    }

    /// Like [`call_raw`](Self::call_raw) with an explicit deadline.
    pub async fn call_with_deadline(
        &self,
        method: &str,
        params: &RawValue,
        deadline: Duration,
    ) -> Result<Box<RawValue>, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = serde_json::to_vec(&jsonrpc::OutgoingRequest {
            jsonrpc: "2.0",
            method,
            params,
            id,
        })
        .expect("requests serialize");
        let req = hyper::Request::post(self.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("request parts are valid");
        // Formatted only when an error needs it, not on every call.
        let url = || self.url.to_string();
        let work = async {
            let resp = self.client.request(req).await.map_err(|e| {
                let (url, reason) = (url(), error_chain(&e));
                if e.is_connect() {
                    CallError::NotDelivered { url, reason }
                } else {
                    CallError::Unreachable { url, reason }
                }
            })?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), self.max_response_bytes)
                .collect()
                .await
                .map_err(|e| CallError::Unreachable {
                    url: url(),
                    reason: format!(
                        "{e} (responses are read up to {} bytes)",
                        self.max_response_bytes
                    ),
                })?
                .to_bytes();
            match serde_json::from_slice::<Response>(&body) {
                Ok(r) => r.into_outcome().map_err(CallError::Rpc),
                Err(_) => Err(CallError::Http {
                    url: url(),
                    status: status.as_u16(),
                }),
            }
        };
        match tokio::time::timeout(deadline, work).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout {
                url: url(),
                secs: deadline.as_secs_f64(),
            }),
        }
    }
}

/// A raw result as the type the caller expects.
pub(crate) fn decode<R: DeserializeOwned>(raw: &RawValue) -> Result<R, CallError> {
    serde_json::from_str(raw.get()).map_err(|e| CallError::Decode(e.to_string()))
}

/// An error and its sources, joined by ": ".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}
