//! `--scenarios refusals` (eps only): what a client the access policy refuses costs the public
//! proxy, by reason. For each case eps runs with settings that refuse it; after a warm-up,
//! `n` connections from one loopback address (127.0.0.0/8 is all loopback) each send their first
//! bytes and wait to be closed, `FLOODERS` at a time, and the public proxy's CPU time (user +
//! system, /proc/PID/stat) before and after gives the µs per refused connection. Its refusal
//! counter (`eps_proxy_connections_refused_total{reason}`) confirms what was measured.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::{Client, SNI};
use crate::procs;
use crate::systems::eps::Overrides;
use crate::systems::{Env, System};

/// Connections flooding at once.
const FLOODERS: usize = 32;
/// Unmeasured refusals first (and, for the rate case, the burst that passes).
const WARMUP: usize = 200;
/// Time a refused connection gets to be closed.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// One refusal reason and how to provoke it.
struct Case {
    /// The reason label, and the report's scenario `refused_<reason>`.
    reason: &'static str,
    /// Where the flood comes from.
    from: &'static str,
    /// What each connection sends before waiting to be closed.
    first: Vec<u8>,
}

/// One eps run and the cases measured on it.
struct Setup {
    overrides: Overrides,
    /// Hold one relayed connection open first (the domain's cap is 1).
    hold: bool,
    cases: Vec<Case>,
}

/// A result: reason, µs of public-proxy CPU per refused connection, connections refused, and
/// the refusals the public proxy counted under that reason meanwhile.
pub struct Measured {
    pub reason: &'static str,
    pub cpu_us: f64,
    pub refused: usize,
    pub counted: u64,
}

/// Runs every case with `n` connections each.
pub async fn run(env: &Env, client: &Client, n: usize) -> anyhow::Result<Vec<Measured>> {
    let hello = client_hello(SNI)?;
    let unknown = client_hello("unknown.internal-server.local")?;
    let v1 = [
        b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 443\r\n".as_slice(),
        &hello,
    ]
    .concat();
    let setups = vec![
        Setup {
            overrides: overrides("-denied", json!({"deny": ["127.0.0.2/32"]}), None),
            hold: false,
            cases: vec![
                // For comparison: a refusal that existed before the policy, after the
                // ClientHello was read and looked up.
                Case {
                    reason: "unknown_sni",
                    from: "127.0.0.1",
                    first: unknown,
                },
                Case {
                    reason: "denied",
                    from: "127.0.0.2",
                    first: hello.clone(),
                },
            ],
        },
        Setup {
            overrides: overrides(
                "-rate",
                json!({"per_address": {"new_connections_per_second": 1, "burst": 1}}),
                None,
            ),
            hold: false,
            cases: vec![Case {
                reason: "rate_limited",
                from: "127.0.0.3",
                first: hello.clone(),
            }],
        },
        Setup {
            overrides: overrides(
                "-domain",
                json!({}),
                Some(json!({"private": {"announcements": [
                    {"domain": SNI, "policy": {"max_concurrent": 1}}]}})),
            ),
            hold: true,
            cases: vec![Case {
                reason: "domain_busy",
                from: "127.0.0.1",
                first: hello.clone(),
            }],
        },
        Setup {
            overrides: Overrides {
                name: "-proxy-header",
                public: Some(json!({"public": {"proxy_protocol": {"trusted": ["127.0.0.4/32"]}}})),
                private: None,
            },
            hold: false,
            cases: vec![
                Case {
                    reason: "bad_proxy_header",
                    from: "127.0.0.4",
                    first: hello.clone(),
                },
                Case {
                    reason: "untrusted_proxy_header",
                    from: "127.0.0.1",
                    first: v1,
                },
            ],
        },
    ];
    let mut out = Vec::new();
    for setup in setups {
        let system = System::start_eps_with(env, client, &setup.overrides).await?;
        let metrics = system
            .metrics
            .context("the public proxy has no metrics listener")?;
        let pid = system
            .pids
            .iter()
            .find(|(name, _)| name == "public-proxy")
            .map(|(_, pid)| *pid)
            .context("no public proxy")?;
        let _held = if setup.hold {
            Some(hold_one(client, system.addr).await?)
        } else {
            None
        };
        for case in setup.cases {
            flood(system.addr, &case, WARMUP).await;
            let counted_before = refused_count(metrics, case.reason).await?;
            let before = procs::cpu_secs(pid)?;
            let refused = flood(system.addr, &case, n).await;
            let cpu = procs::cpu_secs(pid)? - before;
            let counted = refused_count(metrics, case.reason).await? - counted_before;
            out.push(Measured {
                reason: case.reason,
                cpu_us: cpu * 1e6 / refused.max(1) as f64,
                refused,
                counted,
            });
        }
    }
    Ok(out)
}

fn overrides(name: &'static str, policy: Value, private: Option<Value>) -> Overrides {
    Overrides {
        name,
        public: Some(json!({"public": {"policy": policy}})),
        private,
    }
}

/// A relayed connection held open (TLS done), retried while the previous one's place is
/// still being given back.
async fn hold_one(client: &Client, addr: SocketAddr) -> anyhow::Result<crate::client::Conn> {
    let mut last = None;
    for _ in 0..50 {
        match client.connect(addr).await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.map_or_else(|| anyhow::anyhow!("no connection"), Into::into))
}

/// Opens `n` connections from `case.from`, `FLOODERS` at a time; each sends `case.first` and
/// waits to be closed. Returns how many were closed without a byte back.
async fn flood(addr: SocketAddr, case: &Case, n: usize) -> usize {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let from: std::net::IpAddr = case.from.parse().expect("an address");
    let first = Arc::new(case.first.clone());
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..FLOODERS {
        let (next, first) = (next.clone(), first.clone());
        set.spawn(async move {
            let mut refused = 0;
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                if matches!(refused_once(from, addr, &first).await, Ok(true)) {
                    refused += 1;
                }
            }
            refused
        });
    }
    let mut refused = 0;
    while let Some(r) = set.join_next().await {
        refused += r.unwrap_or(0);
    }
    refused
}

/// One connection: true when it was closed without a byte back.
async fn refused_once(
    from: std::net::IpAddr,
    to: SocketAddr,
    first: &[u8],
) -> std::io::Result<bool> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let mut s = socket.connect(to).await?;
    // The proxy may close before reading all of it.
    let _ = s.write_all(first).await;
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let mut got = 0;
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return got,
                Ok(k) => got += k,
            }
        }
    })
    .await;
    Ok(matches!(closed, Ok(0)))
}

/// A rustls client's first flight for `sni`.
fn client_hello(sni: &str) -> anyhow::Result<Vec<u8>> {
    let config = rustls::ClientConfig::builder_with_provider(eps_core::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = ServerName::try_from(sni.to_string())?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    Ok(out)
}

/// `eps_proxy_connections_refused_total{reason}` of the proxy serving metrics on `addr`.
async fn refused_count(addr: SocketAddr, reason: &str) -> anyhow::Result<u64> {
    let text = crate::client::plain_get(addr, "/metrics").await?;
    let series = format!("eps_proxy_connections_refused_total{{reason=\"{reason}\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64)
}
