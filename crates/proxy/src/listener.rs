//! The accept loop both proxy listeners share: [`eps_core::net::serve`] with refusal when full.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use eps_core::net::{self, Slots, WhenFull};
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
    let slots = Slots::from_semaphore(permits, WhenFull::Refuse);
    net::serve(
        listener,
        what,
        slots,
        &tracker,
        &shutdown,
        on_refused,
        |stream, addr, permit| {
            let fut = handle(stream, addr);
            async move {
                fut.await;
                drop(permit);
            }
        },
    )
    .await;
}
