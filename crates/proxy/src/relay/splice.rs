//! One direction of a relay with splice(2): bytes go socket → pipe → socket inside the kernel,
//! never through user space, which on a loopback-heavy path halves the copying per byte.
//!
//! A pipe exists only while data flows (made when the socket turns readable, closed once a read
//! would block), so idle relays hold no extra file descriptors. Written here rather than taken
//! from a crate: the small splice crates available are not maintained, and this pump must keep
//! our byte counts, activity clock and half-close rules.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Bytes moved per splice call; a pipe holds 64 KiB by default.
const CHUNK: usize = 64 * 1024;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two descriptors for pipe2 to fill.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        Ok(unsafe {
            Self {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on descriptors that stay open for the call; null offsets mean
    // "current position", as required for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Moves bytes from `r` to `w` until end of stream (passed on as a half-close) or an error.
pub async fn pump(
    r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    bytes: &AtomicU64,
    last: &AtomicU64,
    start: Instant,
) -> io::Result<()> {
    let (rfd, wfd) = (r.as_ref().as_raw_fd(), w.as_ref().as_raw_fd());
    loop {
        r.readable().await?;
        let pipe = Pipe::new()?;
        loop {
            let got = r.as_ref().try_io(Interest::READABLE, || {
                splice(rfd, pipe.write.as_raw_fd(), CHUNK)
            });
            let mut n = match got {
                Ok(0) => {
                    let _ = w.shutdown().await;
                    return Ok(());
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            bytes.fetch_add(n as u64, Ordering::Relaxed);
            while n > 0 {
                w.as_ref().writable().await?;
                match w
                    .as_ref()
                    .try_io(Interest::WRITABLE, || splice(pipe.read.as_raw_fd(), wfd, n))
                {
                    Ok(m) => n -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
            last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }
}
