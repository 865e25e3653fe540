//! Data connections to public proxies, dialed ahead of need (`private.data_pool`).
//!
//! Without a pool, every client costs the private proxy a TCP connect to the public proxy's
//! internal port, and the client waits for it. With one, the token goes out on a connection
//! that already exists, and a new one is dialed in the background to take its place (one for
//! one, as rathole keeps its pool). The public proxy lets such a connection wait silently,
//! bounded per address and by its `data_idle_timeout`.
//!
//! - One pool per public endpoint (the `endpoint` of `incomingConnection`), created on its first
//!   use; at most [`MAX_ENDPOINTS`] of them, the least recently used dropped beyond that.
//! - A connection is taken newest first and checked before use: the public proxy never sends
//!   first, so a connection that has turned readable (closed, or broken) is dropped.
//! - A sweep every `max_age / 4` closes connections older than `max_age` and refills pools used
//!   within `max_age`; a pool nobody uses empties itself and holds no connection.
//! - A connection that was closed without the pool noticing (the public host restarted) takes
//!   the token to nowhere: [`DataConn`] sees it close instead of answering and sends the token
//!   again on a new connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Public endpoints with a pool at most.
pub const MAX_ENDPOINTS: usize = 64;

/// The pools of one private proxy.
pub struct DataPool {
    size: usize,
    max_age: Duration,
    connect_timeout: Duration,
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
    metrics: Arc<Metrics>,
}

/// The idle connections to one public endpoint.
struct Endpoint {
    addr: String,
    /// Oldest first.
    idle: Mutex<Vec<(TcpStream, Instant)>>,
    /// A refill task is running.
    filling: AtomicBool,
    last_used: Mutex<Instant>,
}

impl DataPool {
    /// `size` connections per endpoint (0: no pool, a dial per client).
    pub fn new(
        size: usize,
        max_age: Duration,
        connect_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            size,
            max_age,
            connect_timeout,
            endpoints: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// A connection to `endpoint`: a pooled one when one is alive, otherwise a new dial. The
    /// pool is topped up in the background either way.
    pub async fn get(self: &Arc<Self>, endpoint: &str) -> std::io::Result<DataConn> {
        let conn = |stream, pooled| DataConn {
            stream,
            pooled,
            endpoint: endpoint.to_string(),
            timeout: self.connect_timeout,
        };
        if self.size == 0 {
            return Ok(conn(dial(endpoint, self.connect_timeout).await?, false));
        }
        let ep = self.endpoint(endpoint);
        *ep.last_used.lock().expect("pool lock") = Instant::now();
        let taken = ep.take(self.max_age);
        self.refill(&ep);
        match taken {
            Some(s) => {
                self.metrics.data_pool("hit");
                Ok(conn(s, true))
            }
            None => {
                self.metrics.data_pool("miss");
                Ok(conn(dial(endpoint, self.connect_timeout).await?, false))
            }
        }
    }

    /// Idle connections to `endpoint` now.
    #[cfg(test)]
    fn idle(&self, endpoint: &str) -> usize {
        self.endpoints
            .lock()
            .expect("pool lock")
            .get(endpoint)
            .map_or(0, |ep| ep.idle.lock().expect("pool lock").len())
    }

    fn endpoint(&self, addr: &str) -> Arc<Endpoint> {
        let mut endpoints = self.endpoints.lock().expect("pool lock");
        if let Some(ep) = endpoints.get(addr) {
            return ep.clone();
        }
        if endpoints.len() >= MAX_ENDPOINTS {
            let oldest = endpoints
                .iter()
                .min_by_key(|(_, ep)| *ep.last_used.lock().expect("pool lock"))
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                endpoints.remove(&k);
            }
        }
        let ep = Arc::new(Endpoint {
            addr: addr.to_string(),
            idle: Mutex::new(Vec::new()),
            filling: AtomicBool::new(false),
            last_used: Mutex::new(Instant::now()),
        });
        endpoints.insert(addr.to_string(), ep.clone());
        ep
    }

    /// Dials `endpoint` until its pool is full, unless a refill is already running. A failed
    /// dial ends the refill; the next use or sweep tries again.
    fn refill(self: &Arc<Self>, ep: &Arc<Endpoint>) {
        if ep.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let (me, ep) = (self.clone(), ep.clone());
        tokio::spawn(async move {
            loop {
                while ep.idle.lock().expect("pool lock").len() < me.size {
                    match dial(&ep.addr, me.connect_timeout).await {
                        Ok(s) => ep.idle.lock().expect("pool lock").push((s, Instant::now())),
                        Err(e) => {
                            tracing::debug!(endpoint = %ep.addr, error = %e, "pooled dial failed");
                            ep.filling.store(false, Ordering::Release);
                            return;
                        }
                    }
                }
                ep.filling.store(false, Ordering::Release);
                // A connection taken between the last check and the store above is replaced
                // here, not left missing until the next use.
                let short = ep.idle.lock().expect("pool lock").len() < me.size;
                if !short || ep.filling.swap(true, Ordering::AcqRel) {
                    return;
                }
            }
        });
    }

    /// Closes connections past `max_age`, refills pools in use and forgets unused endpoints,
    /// every `max_age / 4`, until `shutdown`.
    pub async fn sweep(self: Arc<Self>, shutdown: CancellationToken) {
        if self.size == 0 {
            return;
        }
        let mut tick = tokio::time::interval((self.max_age / 4).max(Duration::from_millis(25)));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let endpoints: Vec<Arc<Endpoint>> = {
                let mut map = self.endpoints.lock().expect("pool lock");
                // An endpoint unused for ten ages, with its connections gone, is forgotten.
                map.retain(|_, ep| {
                    ep.last_used.lock().expect("pool lock").elapsed() < self.max_age * 10
                        || !ep.idle.lock().expect("pool lock").is_empty()
                });
                map.values().cloned().collect()
            };
            for ep in endpoints {
                ep.idle
                    .lock()
                    .expect("pool lock")
                    .retain(|(_, born)| born.elapsed() < self.max_age);
                if ep.last_used.lock().expect("pool lock").elapsed() < self.max_age {
                    self.refill(&ep);
                }
            }
        }
    }
}

/// A connection to a public proxy's internal port from [`DataPool::get`]. One that came from
/// the pool may turn out dead; then the token goes out again on a new connection.
pub struct DataConn {
    stream: TcpStream,
    pooled: bool,
    endpoint: String,
    timeout: Duration,
}

impl DataConn {
    /// Writes `token`; a pooled connection found closed is replaced by a new one.
    pub async fn send_token(&mut self, token: &[u8]) -> std::io::Result<()> {
        match self.stream.write_all(token).await {
            Err(_) if self.pooled => self.redial(token).await,
            r => r,
        }
    }

    /// The connection once the public side answers the token (with the client's first bytes).
    /// A pooled one that closes instead was dead before the token arrived: the token goes out
    /// again on a new connection. No answer within the connect timeout counts as an answer: the
    /// relay goes on and its own timeouts apply.
    pub async fn answered(mut self, token: &[u8]) -> std::io::Result<TcpStream> {
        if self.pooled {
            let mut byte = [0u8; 1];
            let peeked = tokio::time::timeout(self.timeout, self.stream.peek(&mut byte)).await;
            if matches!(peeked, Ok(Ok(0) | Err(_))) {
                tracing::debug!(endpoint = %self.endpoint, "pooled connection was dead; dialing anew");
                self.redial(token).await?;
            }
        }
        Ok(self.stream)
    }

    /// Replaces the connection with a new one carrying `token`.
    async fn redial(&mut self, token: &[u8]) -> std::io::Result<()> {
        let mut s = dial(&self.endpoint, self.timeout).await?;
        s.write_all(token).await?;
        self.stream = s;
        self.pooled = false;
        Ok(())
    }
}

impl Endpoint {
    /// The newest live connection younger than `max_age`; older and dead ones are dropped.
    fn take(&self, max_age: Duration) -> Option<TcpStream> {
        let mut idle = self.idle.lock().expect("pool lock");
        while let Some((s, born)) = idle.pop() {
            if born.elapsed() < max_age && is_quiet(&s) {
                return Some(s);
            }
        }
        None
    }
}

/// Whether a pooled connection is still open: the public proxy never sends first, so anything
/// to read (its end of stream, an error) means the connection is no use.
fn is_quiet(s: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(s.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// A new connection to `addr`, with TCP_NODELAY, within `timeout`.
pub async fn dial(addr: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let s = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    fn pool(size: usize, max_age: Duration) -> Arc<DataPool> {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        Arc::new(DataPool::new(
            size,
            max_age,
            Duration::from_secs(2),
            metrics,
        ))
    }

    async fn wait_idle(pool: &DataPool, endpoint: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.idle(endpoint) != n {
            assert!(Instant::now() < deadline, "pool never held {n}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn counted(pool: &DataPool, result: &'static str) -> u64 {
        pool.metrics
            .data_pool
            .get_or_create(&crate::metrics::ResultLabel { result })
            .get()
    }

    #[tokio::test]
    async fn a_used_connection_is_replaced_one_for_one() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let pool = pool(3, Duration::from_secs(30));
        // First use: nothing pooled yet, so a dial; the pool then fills to 3.
        let _first = pool.get(&addr).await.unwrap();
        wait_idle(&pool, &addr, 3).await;
        let _second = pool.get(&addr).await.unwrap();
        assert_eq!((counted(&pool, "miss"), counted(&pool, "hit")), (1, 1));
        // The one taken is replaced.
        wait_idle(&pool, &addr, 3).await;
    }

    #[tokio::test]
    async fn closed_connections_are_never_handed_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let ep = Endpoint {
            addr: addr.clone(),
            idle: Mutex::new(Vec::new()),
            filling: AtomicBool::new(false),
            last_used: Mutex::new(Instant::now()),
        };
        let mut servers = Vec::new();
        for _ in 0..3 {
            let c = dial(&addr, Duration::from_secs(2)).await.unwrap();
            servers.push(listener.accept().await.unwrap().0);
            ep.idle.lock().unwrap().push((c, Instant::now()));
        }
        // The public side closes the newest two; the oldest stays open.
        let mut oldest_server = servers.remove(0);
        drop(servers);
        let newest = ep
            .idle
            .lock()
            .unwrap()
            .last()
            .unwrap()
            .0
            .peer_addr()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let dead = {
                let idle = ep.idle.lock().unwrap();
                idle[1..].iter().all(|(c, _)| !is_quiet(c))
            };
            if dead {
                break;
            }
            assert!(Instant::now() < deadline, "the closes never arrived");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut taken = ep.take(Duration::from_secs(30)).expect("the open one");
        assert_eq!(taken.peer_addr().unwrap(), newest, "same public endpoint");
        tokio::io::AsyncWriteExt::write_all(&mut taken, b"x")
            .await
            .unwrap();
        let mut b = [0u8; 1];
        oldest_server.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"x", "the live connection was the one handed out");
        assert!(ep.take(Duration::from_secs(30)).is_none());
        // Too old counts as dead too.
        let c = dial(&addr, Duration::from_secs(2)).await.unwrap();
        ep.idle
            .lock()
            .unwrap()
            .push((c, Instant::now() - Duration::from_secs(60)));
        assert!(ep.take(Duration::from_secs(30)).is_none());
    }

    #[tokio::test]
    async fn old_connections_are_retired_and_an_unused_pool_empties() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let pool = pool(2, Duration::from_millis(300));
        let shutdown = CancellationToken::new();
        tokio::spawn(pool.clone().sweep(shutdown.clone()));
        let _c = pool.get(&addr).await.unwrap();
        wait_idle(&pool, &addr, 2).await;
        // Unused for longer than max_age: the sweep closes them and does not dial new ones.
        wait_idle(&pool, &addr, 0).await;
        shutdown.cancel();
    }

    #[tokio::test]
    async fn size_zero_dials_every_time_and_pools_nothing() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let pool = pool(0, Duration::from_secs(30));
        let _c = pool.get(&addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(pool.idle(&addr), 0);
    }
}
