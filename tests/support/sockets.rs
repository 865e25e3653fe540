//! Raw TCP helpers: reading until the peer closes ([`read_until_closed`]) and a plain HTTP/1.1
//! GET read to the end ([`get_to_end`]).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes (end of stream or an error such as a reset): the bytes read and
/// when, or `None` if the connection is still open after `timeout`.
pub async fn read_until_closed(s: &mut TcpStream, timeout: Duration) -> Option<(usize, Duration)> {
    let start = Instant::now();
    let mut total = 0;
    let mut buf = [0u8; 4096];
    let work = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .ok()
        .map(|n| (n, start.elapsed()))
}

/// `GET path` over plain HTTP/1.1 (`Connection: close`), read to the end: the whole response
/// as text, head included. No deadline: the caller sets one.
pub async fn get_to_end(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
