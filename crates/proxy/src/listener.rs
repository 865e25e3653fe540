//! The accept loop both proxy listeners share: one task per connection, a bounded number of
//! them, accept errors backed off.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Accepts until `shutdown`. A connection over the `permits` limit is closed at once (the
/// client sees the refusal instead of waiting in the backlog); each accepted one runs `handle`
/// on its own task (tracked by `tracker`) holding a permit.
pub async fn accept_loop<F, Fut, R>(
    listener: TcpListener,
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
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => { backoff = Duration::from_millis(5); s }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
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
        let _ = stream.set_nodelay(true);
        let fut = handle(stream, addr);
        tracker.spawn(async move {
            fut.await;
            drop(permit);
        });
    }
}
