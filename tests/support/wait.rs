//! Free ports and waiting by retrying a check until a deadline (linkerd's `assert_eventually!`),
//! so that no test sleeps a fixed time hoping something is ready.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub use eps_testkit::wait_until;

/// Ports [`free_port`] hands out: below Linux's default ephemeral range (32768-60999) and
/// macOS's (49152-65535), so that the kernel never gives one of them to somebody else's
/// `bind(0)` or outgoing connection. That matters when a test stops a server and starts it
/// again on the same port: with an ephemeral port, another test's `bind(0)` or connection
/// could take it in between.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A port free on 127.0.0.1 and not handed out before by this process (for settings that must
/// name a port before the process that binds it starts, like a directory's `grpc_server`
/// address). Each process starts at a different place in `TEST_PORTS`, so that test binaries
/// run side by side rarely meet.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        seed() % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = TEST_PORTS.start + u16::try_from(offset).expect("offset below span");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {TEST_PORTS:?} on 127.0.0.1");
}

/// `127.0.0.1:PORT` with a port from [`free_port`].
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn seed() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    nanos ^ std::process::id().wrapping_mul(2_654_435_761)
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_port(addr: SocketAddr, timeout: Duration) -> bool {
    wait_until(timeout, || async move {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await
}
