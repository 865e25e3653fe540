//! Accepting connections the way every listener of eps does, and the stop signals every
//! process obeys.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

/// First pause after a failed `accept`.
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
/// Longest pause after repeated failures.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts connections from one listener. A failed `accept` (usually out of file descriptors)
/// is logged and followed by a growing pause instead of a spin; every accepted socket gets
/// `TCP_NODELAY`, since everything eps carries is latency-sensitive.
pub struct Acceptor {
    listener: TcpListener,
    what: &'static str,
    backoff: Backoff,
}

impl Acceptor {
    /// `what` names the listener in logs.
    pub fn new(listener: TcpListener, what: &'static str) -> Self {
        Self {
            listener,
            what,
            backoff: Backoff::new(FIRST_BACKOFF, MAX_BACKOFF),
        }
    }

    /// The next connection, or `None` once `shutdown` is cancelled.
    pub async fn next(&mut self, shutdown: &CancellationToken) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let r = tokio::select! {
                r = self.listener.accept() => r,
                _ = shutdown.cancelled() => return None,
            };
            match r {
                Ok((stream, addr)) => {
                    self.backoff.reset();
                    let _ = stream.set_nodelay(true);
                    return Some((stream, addr));
                }
                Err(e) => {
                    tracing::warn!(listener = self.what, error = %e, "accept failed; backing off");
                    tokio::select! {
                        _ = tokio::time::sleep(self.backoff.fail()) => {}
                        _ = shutdown.cancelled() => return None,
                    }
                }
            }
        }
    }
}

/// Resolves on SIGINT or SIGTERM. Each call waits for a signal that comes after it started.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}
