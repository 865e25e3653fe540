//! The accept loop both proxy listeners share: one task per connection, a bounded number of
//! them, accept errors backed off.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use eps_core::net::Acceptor;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Accepts until `shutdown`. A connection over the `permits` limit is closed at once (the
/// client sees the refusal instead of waiting in the backlog); each accepted one runs `handle`
/// on its own task (tracked by `tracker`) holding a permit.
pub async fn accept_loop<F, Fut, R>(
    listener: TcpListener,
    what: &'static str,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    on_refused: R,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    R: Fn(),
    Fut: Future<Output = ()> + Send + 'static,
{
    let refused = AtomicU64::new(0);
    let mut listener = Acceptor::new(listener, what);
    loop {
        let Some((stream, addr)) = listener.next(&shutdown).await else {
            return;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            on_refused();
            // Log the first refusal and then every 1000th, not each one.
            let n = refused.fetch_add(1, Ordering::Relaxed);
            if n % 1000 == 0 {
                tracing::warn!(%addr, refused_so_far = n + 1, "connection limit reached; refusing");
            }
            drop(stream);
            continue;
        };
        let fut = handle(stream, addr);
        tracker.spawn(async move {
            fut.await;
            drop(permit);
        });
    }
}
