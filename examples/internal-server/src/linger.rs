//! A lingering close. When a connection ends, the client may still be sending (its TLS
//! close_notify, a request the server will not read). Closing a socket with unread bytes makes
//! the kernel send a reset, and a reset can destroy the tail of a response the client has not
//! read yet. So on drop the socket is handed to a task that stops sending, reads and discards
//! what still arrives until end of stream or a short deadline, and only then closes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// How long a closed connection may keep draining.
const LINGER: Duration = Duration::from_secs(2);
/// Bytes drained at most before closing anyway.
const MAX_DRAIN: u64 = 1024 * 1024;

/// A TCP stream that closes lingering; see the module docs.
pub struct Lingering(Option<TcpStream>);

impl Lingering {
    pub fn new(stream: TcpStream) -> Self {
        Self(Some(stream))
    }

    fn inner(&mut self) -> &mut TcpStream {
        self.0.as_mut().expect("present until drop")
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(mut stream) = self.0.take() else {
            return;
        };
        // Without a runtime (process exit) the socket just closes.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = stream.shutdown().await;
                let (mut rest, mut sink) = ((&mut stream).take(MAX_DRAIN), tokio::io::sink());
                let drain = tokio::io::copy(&mut rest, &mut sink);
                let _ = tokio::time::timeout(LINGER, drain).await;
            });
        }
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.inner()).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.inner()).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.inner()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.inner()).poll_shutdown(cx)
    }
}
