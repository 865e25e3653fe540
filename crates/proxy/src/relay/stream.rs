//! Relaying between any two byte streams, for relays where one side is not a plain socket: the
//! decrypted side of a TLS connection the private proxy ends (docs/architecture.md §3.5).
//!
//! A TLS stream cannot say "readable" without decrypting a record, so the buffer-only-while-
//! data-flows trick of [`super::relay`] does not apply: each direction holds one
//! [`STREAM_BUFFER_BYTES`] buffer for the relay's life. The rest is the same: half-close passed
//! on (on TLS as close_notify, then FIN), the idle timeout, the totals.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{drive, Meter, Totals};

/// Bytes per direction buffer: one TLS record's plaintext.
pub const STREAM_BUFFER_BYTES: usize = 16 * 1024;

/// Relays between `a` and `b` until both directions end, one fails, or nothing moves for
/// `idle_timeout`.
pub async fn relay_streams<A, B>(a: A, b: B, idle_timeout: Duration) -> Totals
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let meter = Meter::new();
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let up = pump(ar, bw, &meter.a_to_b, &meter);
    let down = pump(br, aw, &meter.b_to_a, &meter);
    drive(up, down, idle_timeout, &meter).await
}

async fn pump<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut r: R,
    mut w: W,
    bytes: &AtomicU64,
    meter: &Meter,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; STREAM_BUFFER_BYTES];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Pass the end of stream on; the other direction continues.
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        // A TLS writer holds records until flushed.
        w.flush().await?;
        meter.moved(bytes, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::Ended;

    #[tokio::test]
    async fn streams_relay_both_ways_and_pass_the_end() {
        let (mut client, relay_a) = tokio::io::duplex(1024);
        let (relay_b, mut server) = tokio::io::duplex(1024);
        let task = tokio::spawn(relay_streams(relay_a, relay_b, Duration::from_secs(5)));
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        let big = vec![7u8; 300_000];
        let writer = async {
            server.write_all(&big).await.unwrap();
            server.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let (_, r) = tokio::join!(writer, client.read_to_end(&mut back));
        r.unwrap();
        assert_eq!(back.len(), big.len());
        let t = task.await.unwrap();
        assert_eq!(t.ended, Ended::Done);
        assert_eq!((t.a_to_b, t.b_to_a), (7, 300_000));
    }

    #[tokio::test]
    async fn idle_stream_relay_is_closed() {
        let (_client, relay_a) = tokio::io::duplex(64);
        let (relay_b, _server) = tokio::io::duplex(64);
        let t = relay_streams(relay_a, relay_b, Duration::from_millis(100)).await;
        assert_eq!(t.ended, Ended::Idle);
    }
}
