//! What the tests and the benchmark share and the binaries do not.
//!
//! [`wait_until`]: retry a check until a deadline (linkerd's `assert_eventually!`), so that
//! nothing sleeps a fixed time hoping something is ready.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// First and longest pause between two checks of [`wait_until`].
const FIRST_POLL_PAUSE: Duration = Duration::from_millis(5);
const MAX_POLL_PAUSE: Duration = Duration::from_millis(100);

/// Runs `check` until it returns true or `timeout` has passed; returns whether it did. Pauses
/// between attempts grow from 5 ms to 100 ms. For waiting on readiness (a port, a log line, a
/// count) instead of sleeping a fixed time.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = FIRST_POLL_PAUSE;
    loop {
        if check().await {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_POLL_PAUSE);
    }
}
