//! Accepting connections the way every listener of eps does ([`serve`]), and the stop signals
//! every process obeys.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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

/// What a listener does with a new connection when all its slots are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Stop accepting until a slot frees: newcomers wait in the kernel's backlog (local links,
    /// whose clients retry on their own).
    Wait,
    /// Accept and close at once, so that the client learns of the refusal instead of waiting
    /// (public listeners).
    Refuse,
}

/// How many connections a listener serves at once, and what happens beyond.
#[derive(Debug, Clone)]
pub struct Slots {
    permits: Arc<Semaphore>,
    when_full: WhenFull,
}

impl Slots {
    /// `max` connections at once (at least one).
    pub fn new(max: usize, when_full: WhenFull) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max.max(1))),
            when_full,
        }
    }

    /// Slots taken from `permits`, which others may also look at or share.
    pub fn from_semaphore(permits: Arc<Semaphore>, when_full: WhenFull) -> Self {
        Self { permits, when_full }
    }
}

/// Serves `listener` until `shutdown`: each accepted connection runs `handle` on its own task of
/// `tracker`, with one of `slots` that it holds for as long as it keeps the permit (it may hand
/// the permit on to whatever serves the connection after the task ends). A connection refused
/// for lack of a slot calls `on_refused` and is logged (the first and every 1000th). Returns
/// once the listener has stopped accepting; `tracker.wait()` then drains the connections.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    slots: Slots,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    on_refused: impl Fn(),
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let refused = AtomicU64::new(0);
    let mut acceptor = Acceptor::new(listener, what);
    loop {
        let waited = match slots.when_full {
            WhenFull::Wait => tokio::select! {
                p = slots.permits.clone().acquire_owned() => Some(p.expect("semaphore never closes")),
                _ = shutdown.cancelled() => return,
            },
            WhenFull::Refuse => None,
        };
        let Some((stream, addr)) = acceptor.next(shutdown).await else {
            return;
        };
        let permit = match waited {
            Some(p) => p,
            None => match slots.permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    on_refused();
                    let n = refused.fetch_add(1, Ordering::Relaxed);
                    if n % 1000 == 0 {
                        tracing::warn!(listener = what, %addr, refused_so_far = n + 1, "connection limit reached; refusing");
                    }
                    drop(stream);
                    continue;
                }
            },
        };
        tracker.spawn(handle(stream, addr, permit));
    }
}

/// The runtime a process serves on: `worker_threads` threads, or one per CPU core (tokio's
/// default). One thread is tokio's current-thread scheduler, which has no work stealing to pay
/// for: on a host where several eps processes share a few cores, it spends an eighth to a sixth
/// less CPU per new connection than two threads each (bench/README.md, "Levers measured").
pub fn runtime(worker_threads: Option<std::num::NonZeroUsize>) -> tokio::runtime::Runtime {
    let mut b = match worker_threads {
        Some(n) if n.get() == 1 => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.get());
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    b.enable_all().build().expect("tokio runtime")
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
