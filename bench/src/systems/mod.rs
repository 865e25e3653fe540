//! The systems compared. Each one is started on loopback in front of the same internal TLS
//! server and hands back the address clients connect to and the processes that are its own
//! (whose memory `idle_rss_per_conn` adds up).
//!
//! - [`direct`]: the internal server itself (shared by all systems), and the common setup:
//!   certificates, binaries, free ports.
//! - [`haproxy`]: HAProxy in TCP mode routing by SNI.
//! - [`rathole`]: rathole server and client over its plain TCP transport.
//! - [`eps`]: the demo's public proxy, private proxy and their two EPS servers; and `eps-embedded`,
//!   the two proxies each running its EPS server in its own process (`eps: {embedded: ...}`).

pub mod direct;
pub mod eps;
pub mod haproxy;
pub mod rathole;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::client::Client;
use crate::procs::{self, Proc};

pub use direct::Env;

/// Time a system gets to answer its first request through itself.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Ports handed out: below the kernel's ephemeral range (32768-60999) and below the range the
/// end-to-end tests use (20000-32000), so neither a client socket nor a test takes one.
const BENCH_PORTS: std::ops::Range<u16> = 12_000..20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Direct,
    Haproxy,
    Rathole,
    Eps,
    /// eps with each EPS server inside its proxy's process.
    EpsEmbedded,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Direct,
        Kind::Haproxy,
        Kind::Rathole,
        Kind::Eps,
        Kind::EpsEmbedded,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Haproxy => "haproxy",
            Kind::Rathole => "rathole",
            Kind::Eps => "eps",
            Kind::EpsEmbedded => "eps-embedded",
        }
    }
}

impl Kind {
    /// One of eps's forms.
    pub fn is_eps(self) -> bool {
        matches!(self, Kind::Eps | Kind::EpsEmbedded)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown system {s:?} (expected direct, haproxy, rathole, eps, eps-embedded)"
                )
            })
    }
}

/// A running system.
pub struct System {
    pub kind: Kind,
    /// Where clients connect (SNI `test.internal-server.local`).
    pub addr: SocketAddr,
    /// The processes whose resident memory counts as this system's: (name, pid).
    pub pids: Vec<(String, u32)>,
    /// Processes started for this system; stopped when it is dropped.
    procs: Vec<Proc>,
    /// eps: the public proxy's metrics listener (`/metrics`).
    pub metrics: Option<SocketAddr>,
}

impl System {
    /// Starts `kind` and waits until a request through it succeeds.
    pub async fn start(kind: Kind, env: &Env, client: &Client) -> anyhow::Result<Self> {
        let mut system = match kind {
            Kind::Direct => Self {
                kind,
                addr: env.server_addr,
                pids: vec![("internal-server".into(), env.server_pid)],
                procs: Vec::new(),
                metrics: None,
            },
            Kind::Haproxy => haproxy::start(env)?,
            Kind::Rathole => rathole::start(env)?,
            Kind::Eps => eps::start(env)?,
            Kind::EpsEmbedded => eps::start_embedded(env)?,
        };
        system.wait_ready(client).await?;
        Ok(system)
    }

    /// eps with other settings (`--scenarios refusals`), once a request goes through it.
    pub async fn start_eps_with(
        env: &Env,
        client: &Client,
        o: &eps::Overrides,
    ) -> anyhow::Result<Self> {
        let mut system = eps::start_with(env, o)?;
        system.wait_ready(client).await?;
        Ok(system)
    }

    fn new(kind: Kind, addr: SocketAddr, procs: Vec<Proc>) -> Self {
        Self {
            kind,
            addr,
            pids: procs
                .iter()
                .map(|p| (p.name().to_string(), p.pid()))
                .collect(),
            procs,
            metrics: None,
        }
    }

    /// The sum (seconds) and count so far of eps's public-proxy histogram `eps_proxy_<name>`.
    pub async fn histogram(&self, name: &str) -> anyhow::Result<(f64, f64)> {
        let Some(addr) = self.metrics else {
            bail!("{} has no metrics listener", self.kind);
        };
        let text = crate::client::plain_get(addr, "/metrics").await?;
        let value = |suffix: &str| -> anyhow::Result<f64> {
            let key = format!("eps_proxy_{name}_{suffix} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&key))
                .and_then(|v| v.trim().parse().ok())
                .with_context(|| format!("no {key}in /metrics"))
        };
        Ok((value("sum")?, value("count")?))
    }

    /// Waits until `GET /` through the system answers; fails early when a process exits.
    async fn wait_ready(&mut self, client: &Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut pause = Duration::from_millis(5);
        loop {
            for p in &mut self.procs {
                p.check_running()?;
            }
            let last = match client.small_exchange(self.addr).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .procs
                    .iter()
                    .map(|p| format!("--- {} ---\n{}", p.name(), p.log_tail()))
                    .collect();
                bail!(
                    "{}: no answer through {} within {READY_TIMEOUT:?} (last error: {last:#})\n{}",
                    self.kind,
                    self.addr,
                    logs.join("\n")
                );
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// CPU time used so far by each of this system's processes, in seconds.
    pub fn cpu_secs(&self) -> anyhow::Result<Vec<f64>> {
        self.pids.iter().map(|(_, p)| procs::cpu_secs(*p)).collect()
    }

    /// Resident memory of each of this system's processes, in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<Vec<u64>> {
        self.pids.iter().map(|(_, p)| procs::rss_kib(*p)).collect()
    }
}

/// A port free on 127.0.0.1 now and not handed out before by this process.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(BENCH_PORTS.end - BENCH_PORTS.start);
    let seed = std::process::id().wrapping_mul(2_654_435_761) % span;
    let _ = NEXT.compare_exchange(u32::MAX, seed, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = BENCH_PORTS.start + u16::try_from(offset)?;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port in {BENCH_PORTS:?} on 127.0.0.1")
}

/// `127.0.0.1:PORT` with a port from [`free_port`].
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

/// `name` in `PATH`, or else in `fallbacks`.
pub fn find_program(name: &str, fallbacks: &[PathBuf]) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(name))
        .chain(fallbacks.iter().cloned())
        .find(|p| p.is_file())
}
