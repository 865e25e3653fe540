//! The measurements. Each runs against one system's client-facing address (or, for RPC, a
//! client) and returns numbers; `main` names them and prints the progress.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eps_core::http::RpcClient;
use tokio::task::JoinSet;

use crate::client::Client;
use crate::systems::System;
use crate::{procs, rpc};

pub const MIB: f64 = 1024.0 * 1024.0;
/// Connections opened at once while setting up the idle ones.
const IDLE_OPENERS: usize = 50;
/// Time the idle connections get to be closed by the system before the next measurement...
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// ...down to this many descriptors above the count before they were opened.
const TEARDOWN_SLACK_FDS: usize = 16;
/// Unmeasured exchanges before the connect measurement.
const CONNECT_WARMUP: usize = 50;
/// Unmeasured calls per caller before the RPC measurement.
const RPC_WARMUP_PER_CALLER: usize = 10;
/// Resident memory is read until it moves less than this between two reads...
const RSS_SETTLED_KIB: i64 = 64;
/// ...this far apart...
const RSS_POLL: Duration = Duration::from_millis(100);
/// ...at most this many times.
const RSS_MAX_POLLS: usize = 30;

/// How much each scenario does.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Bytes of the one download of `throughput_1`.
    pub download_1: u64,
    /// Bytes of each of the 8 downloads of `throughput_8`.
    pub download_8: u64,
    /// Connections of the connect scenario, and how many clients open them in parallel.
    pub connections: usize,
    pub connect_clients: usize,
    /// Connections opened one at a time (`connect1_*`): the latency a system adds when
    /// nothing queues for the CPU.
    pub connections_1: usize,
    /// Idle connections held open.
    pub idle: usize,
    /// Calls of the RPC scenario, and how many callers make them in parallel.
    pub rpc_calls: usize,
    pub rpc_callers: usize,
    /// Refused connections per refusal reason (`refused_*`).
    pub refusals: usize,
    /// The connect and throughput scenarios run in this many rounds, the systems taking turns in
    /// each, so that a burst of other work on the machine does not fall on one system only.
    pub rounds: usize,
}

impl Plan {
    pub fn full() -> Self {
        Self {
            download_1: 1 << 30,
            download_8: 256 << 20,
            connections: 5_000,
            connect_clients: 25,
            connections_1: 300,
            idle: 5_000,
            rpc_calls: 20_000,
            rpc_callers: 64,
            refusals: 20_000,
            rounds: 3,
        }
    }

    /// A reduced run (`--quick`): a minute or so.
    pub fn quick() -> Self {
        Self {
            download_1: 256 << 20,
            download_8: 64 << 20,
            connections: 1_000,
            connections_1: 100,
            idle: 1_000,
            rpc_calls: 4_000,
            refusals: 5_000,
            rounds: 1,
            ..Self::full()
        }
    }
}

/// Latencies (ms, unsorted), operations per second and failures of a timed run.
#[derive(Default)]
pub struct Timed {
    pub samples_ms: Vec<f64>,
    pub rate: f64,
    pub elapsed: Duration,
    pub errors: usize,
    pub first_error: Option<String>,
}

impl Timed {
    /// Adds another run of the same measurement: samples and failures together, the rate over
    /// both runs' time.
    pub fn merge(&mut self, other: Timed) {
        self.samples_ms.extend(other.samples_ms);
        self.elapsed += other.elapsed;
        self.errors += other.errors;
        self.first_error = self.first_error.take().or(other.first_error);
        self.rate = self.samples_ms.len() as f64 / self.elapsed.as_secs_f64().max(1e-9);
    }

    /// The `q` quantile (0..=1) of the samples, in ms.
    pub fn quantile(&self, q: f64) -> f64 {
        quantile(&self.samples_ms, q)
    }
}

/// The `q` quantile of `samples` (nearest rank), NaN when empty.
pub fn quantile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = (q * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// The median of `values` (the mean of the middle two for an even count), `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// `throughput_N`: `conns` connections in parallel each download `bytes`; total MiB/s from the
/// first request to the last byte.
pub async fn throughput(
    client: &Client,
    addr: SocketAddr,
    conns: usize,
    bytes: u64,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..conns {
        let client = client.clone();
        set.spawn(async move { client.download(addr, bytes).await });
    }
    let mut total = 0u64;
    while let Some(r) = set.join_next().await {
        total += r??;
    }
    Ok(total as f64 / MIB / start.elapsed().as_secs_f64())
}

/// The unmeasured connections before a connect run, made the same way (`clients` in parallel):
/// they fill whatever a system keeps warm (eps's kept-alive local links, its data pool), so that
/// the run and the CPU read around it see the steady state.
pub async fn warm_up(client: &Client, addr: SocketAddr, clients: usize) {
    let warm = client.clone();
    parallel(CONNECT_WARMUP, clients, move || {
        let c = warm.clone();
        async move { c.small_exchange(addr).await.map(|()| 0.0) }
    })
    .await;
}

/// `connect_*` and `conn_rate`: `n` new connections, each with one small request, by
/// `clients` in parallel (after [`warm_up`]).
pub async fn connect(client: &Client, addr: SocketAddr, n: usize, clients: usize) -> Timed {
    let client = client.clone();
    parallel(n, clients, move || {
        let c = client.clone();
        async move {
            let t0 = Instant::now();
            c.small_exchange(addr).await?;
            Ok(ms(t0.elapsed()))
        }
    })
    .await
}

/// `connect1_*`: `n` new connections opened one after the other (after [`warm_up`]), each timed
/// in its phases too.
pub async fn connect_one_by_one(
    client: &Client,
    addr: SocketAddr,
    n: usize,
) -> (Timed, PhaseMedians) {
    let mut timed = Timed::default();
    let mut phases: [Vec<f64>; 3] = Default::default();
    let start = Instant::now();
    for _ in 0..n {
        match client.timed_exchange(addr).await {
            Ok(p) => {
                timed.samples_ms.push(ms(p.tcp + p.handshake + p.request));
                for (v, d) in phases.iter_mut().zip([p.tcp, p.handshake, p.request]) {
                    v.push(ms(d));
                }
            }
            Err(e) => {
                timed.errors += 1;
                timed.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    timed.elapsed = start.elapsed();
    timed.rate = timed.samples_ms.len() as f64 / timed.elapsed.as_secs_f64();
    let [tcp, handshake, request] = phases.map(|v| median(&v).unwrap_or(f64::NAN));
    (
        timed,
        PhaseMedians {
            tcp,
            handshake,
            request,
        },
    )
}

/// The median of each phase of [`connect_one_by_one`]'s exchanges, in ms.
pub struct PhaseMedians {
    pub tcp: f64,
    pub handshake: f64,
    pub request: f64,
}

/// What `idle_rss_per_conn` found.
pub struct Idle {
    /// KiB per connection, all the system's processes together.
    pub kib: f64,
    /// KiB per connection of each process: (name, KiB).
    pub by_process: Vec<(String, f64)>,
    /// The opening of the connections (rate, failures).
    pub opened: Timed,
}

/// `idle_rss_per_conn`: resident memory the system's own processes add per idle relayed
/// connection (TLS handshake done), in KiB.
///
/// Afterwards it waits until the system and the internal server (`server_pid`) have closed the
/// connections again, so that their teardown does not run into the next measurement.
pub async fn idle_rss(
    client: &Client,
    system: &System,
    n: usize,
    server_pid: u32,
) -> anyhow::Result<Idle> {
    let mut watched: Vec<u32> = system.pids.iter().map(|(_, p)| *p).collect();
    watched.push(server_pid);
    watched.dedup();
    let open_fds = move || watched.iter().map(|p| procs::open_fds(*p)).sum::<usize>();
    let fds_before = open_fds();
    let before = settled_rss(system).await?;
    let addr = system.addr;
    let held = Arc::new(std::sync::Mutex::new(Vec::with_capacity(n)));
    let keep = held.clone();
    let client = client.clone();
    let opened = parallel(n, IDLE_OPENERS, move || {
        let (c, keep) = (client.clone(), keep.clone());
        async move {
            let t0 = Instant::now();
            let conn = c.connect(addr).await?;
            keep.lock().expect("not poisoned").push(conn);
            Ok(ms(t0.elapsed()))
        }
    })
    .await;
    let count = held.lock().expect("not poisoned").len();
    anyhow::ensure!(
        count > 0,
        "no idle connection could be opened: {}",
        opened.first_error.unwrap_or_default()
    );
    let after = settled_rss(system).await?;
    drop(held);
    let closed = eps_testkit::wait_until(TEARDOWN_TIMEOUT, || {
        let open = open_fds();
        async move { open <= fds_before + TEARDOWN_SLACK_FDS }
    })
    .await;
    if !closed {
        eprintln!(
            "warning: {} still holds {} more descriptors than before the idle connections",
            system.kind,
            open_fds().saturating_sub(fds_before)
        );
    }
    let per_conn = |a: u64, b: u64| (a as f64 - b as f64) / count as f64;
    let by_process = system
        .pids
        .iter()
        .zip(after.iter().zip(&before))
        .map(|((name, _), (a, b))| (name.clone(), per_conn(*a, *b)))
        .collect();
    Ok(Idle {
        kib: per_conn(after.iter().sum(), before.iter().sum()),
        by_process,
        opened,
    })
}

/// `rpc_*`: `calls` calls of `method` by `callers` in parallel on one keep-alive client.
pub async fn rpc(client: &RpcClient, method: &'static str, calls: usize, callers: usize) -> Timed {
    let warm = client.clone();
    parallel(callers * RPC_WARMUP_PER_CALLER, callers, move || {
        let c = warm.clone();
        async move { rpc::call(&c, method).await.map(|()| 0.0) }
    })
    .await;
    let client = client.clone();
    parallel(calls, callers, move || {
        let c = client.clone();
        async move {
            let t0 = Instant::now();
            rpc::call(&c, method).await?;
            Ok(ms(t0.elapsed()))
        }
    })
    .await
}

/// Runs `job` `total` times on `workers` tasks; latencies are what the jobs return (ms).
async fn parallel<F, Fut>(total: usize, workers: usize, job: F) -> Timed
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<f64>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..workers.max(1) {
        let (job, next) = (job.clone(), next.clone());
        set.spawn(async move {
            let (mut ok, mut errors, mut first) = (Vec::new(), 0, None);
            while next.fetch_add(1, Ordering::Relaxed) < total {
                match job().await {
                    Ok(v) => ok.push(v),
                    Err(e) => {
                        errors += 1;
                        first.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            (ok, errors, first)
        });
    }
    let mut timed = Timed {
        samples_ms: Vec::with_capacity(total),
        ..Timed::default()
    };
    while let Some(r) = set.join_next().await {
        let (ok, errors, first) = r.expect("benchmark tasks do not panic");
        timed.samples_ms.extend(ok);
        timed.errors += errors;
        timed.first_error = timed.first_error.or(first);
    }
    timed.elapsed = start.elapsed();
    timed.rate = timed.samples_ms.len() as f64 / timed.elapsed.as_secs_f64();
    timed
}

/// The resident memory of the system's processes once two reads [`RSS_POLL`] apart agree
/// within [`RSS_SETTLED_KIB`] in total (the last read after [`RSS_MAX_POLLS`]).
async fn settled_rss(system: &System) -> anyhow::Result<Vec<u64>> {
    let total = |v: &[u64]| v.iter().sum::<u64>() as i64;
    let mut last = system.rss_kib()?;
    for _ in 0..RSS_MAX_POLLS {
        tokio::time::sleep(RSS_POLL).await;
        let now = system.rss_kib()?;
        if (total(&now) - total(&last)).abs() <= RSS_SETTLED_KIB {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn nearest_rank_quantiles() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&s, 0.5), 50.0);
        assert_eq!(quantile(&s, 0.99), 99.0);
        assert_eq!(quantile(&s, 1.0), 100.0);
        assert_eq!(quantile(&[3.0], 0.5), 3.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn medians() {
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(super::median(&[4.0, 1.0]), Some(2.5));
        assert_eq!(super::median(&[]), None);
    }
}
