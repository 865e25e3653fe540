//! The operations listener every process can open (`metrics.bind_address`): Prometheus text
//! at `/metrics`, liveness at `/healthz`, readiness at `/readyz`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::net::{self, Slots, WhenFull};

/// Connections the operations listener serves at once; scrapers and probes need few.
const MAX_CONNECTIONS: usize = 64;
/// Deadline for a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for a readiness check.
pub const READY_TIMEOUT: Duration = Duration::from_secs(3);

/// Settings of the operations listener; off unless `bind_address` is set.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Where `/metrics`, `/healthz` and `/readyz` are served, e.g. `127.0.0.1:9100`. Keep it
    /// off public interfaces.
    #[serde(default)]
    pub bind_address: Option<SocketAddr>,
}

impl MetricsSettings {
    /// Binds the operations listener, if one is set; the error names the setting.
    pub async fn bind(&self) -> Result<Option<TcpListener>, String> {
        match self.bind_address {
            Some(addr) => TcpListener::bind(addr)
                .await
                .map(Some)
                .map_err(|e| format!("binding metrics.bind_address {addr}: {e}")),
            None => Ok(None),
        }
    }
}

/// A readiness check: `Ok` when the process can do its job, else why not.
pub type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// The readiness of a process that is ready once it listens (its listeners are bound and its
/// state loaded before the operations listener starts).
pub fn ready_when_listening() -> ReadyCheck {
    Arc::new(|| Box::pin(async { Ok(()) }))
}

/// Serves the operations endpoints on `listener` (when the process has one) on their own task
/// until `shutdown`, and logs where.
pub fn spawn(
    listener: Option<TcpListener>,
    registry: Registry,
    ready: ReadyCheck,
    shutdown: &CancellationToken,
) {
    let Some(listener) = listener else { return };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    }
    tokio::spawn(serve(listener, Arc::new(registry), ready, shutdown.clone()));
}

/// Serves the operations endpoints until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    ready: ReadyCheck,
    shutdown: CancellationToken,
) {
    let conns = TaskTracker::new();
    let slots = Slots::new(MAX_CONNECTIONS, WhenFull::Wait);
    net::serve(
        listener,
        "metrics",
        slots,
        &conns,
        &shutdown,
        || {},
        |stream, _, permit| {
            let (registry, ready) = (registry.clone(), ready.clone());
            async move {
                let _permit = permit;
                let service = hyper::service::service_fn(move |req| {
                    let (registry, ready) = (registry.clone(), ready.clone());
                    async move { Ok::<_, Infallible>(answer(req, &registry, &ready).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        },
    )
    .await;
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    registry: &Registry,
    ready: &ReadyCheck,
) -> hyper::Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, registry) {
                Ok(()) => hyper::Response::builder()
                    .header(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )
                    .body(Full::new(Bytes::from(out)))
                    .expect("static response parts"),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match tokio::time::timeout(READY_TIMEOUT, ready()).await {
            Ok(Ok(())) => text(StatusCode::OK, "ready\n".into()),
            Ok(Err(why)) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
            Err(_) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: readiness check timed out\n".into(),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}
