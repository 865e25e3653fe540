//! The fixture of the fault tests: the demo's five processes ([`Tunnel`]) with the proxies
//! started here, logging at debug and serving Prometheus metrics, plus what a test measures
//! them with: metrics, RSS and open file descriptors of a process, and raw TCP helpers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eps_tests::tunnel::{Role, Tunnel, DOMAIN, PROCESS_WAIT, TUNNEL_WAIT};
use eps_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};

/// The proxies' log filter: their own crate at debug (refusals are logged there).
const PROXY_LOG: &str = "proxy=debug";
/// Settings file each proxy reads last (the folder's files are merged in lexical order).
const OVERRIDES: &str = "zz-faults.yml";

/// Runs the fault tests one at a time: they measure close times, memory and file descriptors,
/// which a second test starting five processes next to them on a 2-core machine would blur.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// The five processes of one test, with metrics on both proxies. Fields drop in order: the
/// proxies started here first (printing their logs if the test failed), then the tunnel.
pub struct Fx {
    proxies: BTreeMap<Role, Proc>,
    overrides: BTreeMap<Role, Value>,
    metrics: BTreeMap<Role, SocketAddr>,
    pub t: Tunnel,
}

impl Fx {
    /// Plans the tunnel of test `name` and turns on both proxies' metrics. Starts nothing.
    pub fn new(name: &str) -> Self {
        let mut fx = Self {
            proxies: BTreeMap::new(),
            overrides: BTreeMap::new(),
            metrics: BTreeMap::new(),
            t: Tunnel::new(name),
        };
        for role in [Role::PublicProxy, Role::PrivateProxy] {
            let addr = free_addr();
            fx.metrics.insert(role, addr);
            fx.configure(role, json!({"metrics": {"bind_address": addr}}));
        }
        fx
    }

    /// Deep-merges `settings` over a proxy's (or an EPS server's) settings; call before
    /// starting it.
    pub fn configure(&mut self, role: Role, settings: Value) {
        let all = self.overrides.entry(role).or_insert_with(|| json!({}));
        eps_core::settings::merge(all, settings);
        let file = self.t.settings_dir(role).join(OVERRIDES);
        let yaml = serde_yaml_ng::to_string(&*all).expect("YAML");
        std::fs::write(&file, yaml).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    }

    /// Starts `roles` in order, each once the previous one listens.
    pub async fn start(&mut self, roles: &[Role]) {
        for &role in roles {
            match role {
                Role::PublicProxy | Role::PrivateProxy => {
                    let kind = if role == Role::PublicProxy {
                        "public"
                    } else {
                        "private"
                    };
                    let base =
                        std::env::var("EPS_TESTS_RUST_LOG").unwrap_or_else(|_| "info".into());
                    let env = [
                        (
                            "PROXY_SETTINGS",
                            self.t.settings_dir(role).as_os_str().to_owned(),
                        ),
                        ("RUST_LOG", format!("{base},{PROXY_LOG}").into()),
                    ];
                    let mut proc = Proc::start(
                        role.name(),
                        &bin_path("proxy"),
                        ["run", kind],
                        env,
                        self.t.dir.join(format!("{}.log", role.name())),
                    );
                    proc.wait_for_log(role.ready_line(), PROCESS_WAIT).await;
                    self.proxies.insert(role, proc);
                }
                _ => {
                    self.t.start(role);
                    self.t.wait_ready(role).await;
                }
            }
        }
    }

    /// Starts all five and waits until a request goes through the tunnel to the internal server.
    pub async fn start_all(&mut self) {
        self.start(&Role::ALL).await;
        assert!(
            self.t.wait_tunnel(TUNNEL_WAIT).await.is_some(),
            "no request went through the tunnel within {TUNNEL_WAIT:?}"
        );
    }

    /// Starts all five and waits until both proxies list the domain as announced (for a private
    /// proxy whose internal endpoint is not a TLS server).
    pub async fn start_announced(&mut self) {
        self.start(&Role::ALL).await;
        let (public, private) = (self.t.public_rpc(), self.t.private_rpc());
        let listed = |c: eps_core::http::RpcClient| async move {
            call(&c, "getAnnouncements", json!({}))
                .await
                .ok()
                .and_then(|l| l.as_array().cloned())
                .is_some_and(|l| l.iter().any(|a| a["domain"] == DOMAIN))
        };
        let ok = wait_until(TUNNEL_WAIT, || async {
            listed(public.clone()).await && listed(private.clone()).await
        })
        .await;
        assert!(ok, "{DOMAIN} not announced within {TUNNEL_WAIT:?}");
    }

    pub fn proc(&self, role: Role) -> &Proc {
        self.proxies.get(&role).unwrap_or_else(|| self.t.proc(role))
    }

    pub fn proc_mut(&mut self, role: Role) -> &mut Proc {
        match self.proxies.get_mut(&role) {
            Some(p) => p,
            None => self.t.proc_mut(role),
        }
    }

    pub fn pid(&self, role: Role) -> u32 {
        self.proc(role).pid()
    }

    /// The Prometheus text of a proxy.
    pub async fn metrics(&self, role: Role) -> Metrics {
        let addr = self.metrics[&role];
        let text = http_get(addr, "/metrics")
            .await
            .unwrap_or_else(|e| panic!("GET http://{addr}/metrics: {e}"));
        Metrics(text)
    }

    /// `eps_proxy_connections_refused_total{reason}` of the public proxy.
    pub async fn refused(&self, reason: &str) -> u64 {
        self.metrics(Role::PublicProxy).await.refused(reason)
    }
}

/// One scrape of a proxy's metrics.
#[derive(Debug, Clone)]
pub struct Metrics(pub String);

impl Metrics {
    /// The value of the sample `name{labels}` (`labels` as written, e.g. `reason="not_tls"`;
    /// empty for none); 0 when the series does not exist yet.
    pub fn value(&self, name: &str, labels: &str) -> f64 {
        let series = if labels.is_empty() {
            name.to_string()
        } else {
            format!("{name}{{{labels}}}")
        };
        self.0
            .lines()
            .filter_map(|l| l.strip_prefix(&series))
            .filter_map(|rest| rest.strip_prefix(' '))
            .filter_map(|v| v.split_whitespace().next()?.parse().ok())
            .next()
            .unwrap_or(0.0)
    }

    pub fn refused(&self, reason: &str) -> u64 {
        self.value(
            "eps_proxy_connections_refused_total",
            &format!("reason=\"{reason}\""),
        ) as u64
    }
}

/// A plain HTTP/1.1 GET; the body.
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let work = async {
        let text = get_to_end(addr, path).await?;
        Ok(text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default())
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}

/// Resident memory of process `pid` in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// Open file descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .count()
}

/// Connects to `to` from the loopback address `from` (127.0.0.0/8 is all loopback on Linux).
pub async fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from.parse().expect("an IP"), 0))?;
    let s = socket.connect(to).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Minimum and maximum of some durations, in seconds.
pub fn min_max(d: &[Duration]) -> (f64, f64) {
    let secs = d.iter().map(Duration::as_secs_f64);
    (
        secs.clone().fold(f64::INFINITY, f64::min),
        secs.fold(0.0, f64::max),
    )
}

/// A TCP server standing in for the internal server: it records every byte each connection
/// sends, and a test can write back.
pub struct Recorder {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<RecordedConn>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct RecordedConn {
    data: Arc<Mutex<Vec<u8>>>,
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
}

impl Recorder {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let conns: Arc<Mutex<Vec<RecordedConn>>> = Arc::default();
        let list = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let (mut rd, wr) = s.into_split();
                let conn = RecordedConn {
                    data: Arc::default(),
                    writer: Arc::new(tokio::sync::Mutex::new(wr)),
                };
                list.lock().unwrap().push(conn.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = rd.read(&mut buf).await {
                        conn.data.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        Self { addr, conns, task }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// What connection `i` sent so far.
    pub fn data(&self, i: usize) -> Vec<u8> {
        self.conns.lock().unwrap()[i].data.lock().unwrap().clone()
    }

    /// Waits until connection `i` exists and sent at least `len` bytes; what it sent.
    pub async fn wait_data(&self, i: usize, len: usize, timeout: Duration) -> Vec<u8> {
        wait_until(timeout, || async {
            self.connections() > i && self.data(i).len() >= len
        })
        .await;
        if self.connections() <= i {
            panic!("the recorder got no connection #{i} within {timeout:?}");
        }
        self.data(i)
    }

    /// Writes `bytes` to connection `i`.
    pub async fn write(&self, i: usize, bytes: &[u8]) {
        let writer = self.conns.lock().unwrap()[i].writer.clone();
        let mut w = writer.lock().await;
        w.write_all(bytes).await.expect("recorder write");
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}
