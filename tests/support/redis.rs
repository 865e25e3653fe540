//! A Redis server of the test's own for the shared-store tests: `redis-server` on a free
//! loopback port, append-only with an fsync before every reply (`appendfsync always`, the
//! README's advice), its files in a folder of the test; killed (SIGKILL) on drop.
//!
//! Also: a server listening on TLS only ([`Redis::start_tls`]), Sentinels ([`Sentinel`]) and a
//! Redis Cluster of primaries ([`RedisCluster`], made with `redis-cli --cluster create`).
//!
//! `redis-server` must be installed (Debian: `apt-get install redis-server`; `.ci/run` does it),
//! and `redis-cli` for a cluster (Debian: `redis-tools`, which `redis-server` depends on).
//! [`Redis::command`] is a minimal RESP client (plain TCP) for checks from the test itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use eps_core::tls::TlsSettings;

use crate::process::Proc;
use crate::wait::{free_addr, free_port, wait_until};

/// What `redis-server` logs once it has loaded its data and accepts clients.
pub const REDIS_READY: &str = "Ready to accept connections";
/// Time `redis-server` gets to load its append-only file and listen.
const START_WAIT: Duration = Duration::from_secs(15);
/// Deadline of one [`Redis::command`].
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// The `redis-server` on `PATH` (or in /usr/bin, /usr/local/bin); panics with how to install it.
pub fn redis_server_path() -> PathBuf {
    program_path("redis-server", "redis-server")
}

/// The program `name` on `PATH` (or in /usr/bin, /usr/local/bin); panics naming the Debian
/// `package` that has it.
fn program_path(name: &str, package: &str) -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")]);
    for dir in candidates {
        let path = dir.join(name);
        if path.is_file() {
            return path;
        }
    }
    panic!(
        "{name} not found: the shared-store tests run a real Redis; install it \
         (Debian: apt-get install {package})"
    );
}

/// A running `redis-server`.
pub struct Redis {
    proc: Proc,
    /// Where it listens (127.0.0.1, a port from [`free_addr`]).
    pub addr: SocketAddr,
    /// Its working folder: the append-only files.
    pub dir: PathBuf,
    password: Option<String>,
}

impl Redis {
    /// Starts `redis-server` with its files in `dir` (created), logging to `log`, requiring
    /// `password` when given, and waits until it accepts clients.
    pub async fn start(dir: &Path, log: impl Into<PathBuf>, password: Option<&str>) -> Self {
        Self::start_with(dir, log, password, &[]).await
    }

    /// [`start`](Self::start) as a replica of `primary` (which requires `password` too).
    pub async fn start_replica(
        dir: &Path,
        log: impl Into<PathBuf>,
        password: Option<&str>,
        primary: SocketAddr,
    ) -> Self {
        let mut extra = vec![
            "--replicaof".to_string(),
            primary.ip().to_string(),
            primary.port().to_string(),
        ];
        if let Some(p) = password {
            extra.extend(["--masterauth".to_string(), p.to_string()]);
        }
        Self::start_with(dir, log, password, &extra).await
    }

    /// [`start`](Self::start) listening on TLS only (`addr` is the TLS port), with `tls`'s
    /// certificate and key, requiring client certificates from its CA when `verify_client`.
    pub async fn start_tls(dir: &Path, log: impl Into<PathBuf>, tls: &TlsSettings) -> Self {
        let path = |p: &Path| p.display().to_string();
        let verify = if tls.verify_client { "yes" } else { "no" };
        let addr = free_addr();
        let listen = [
            "--port".to_string(),
            "0".to_string(),
            "--tls-port".to_string(),
            addr.port().to_string(),
            "--tls-cert-file".to_string(),
            path(&tls.certificate),
            "--tls-key-file".to_string(),
            path(&tls.key),
            "--tls-ca-cert-file".to_string(),
            path(&tls.ca_certificate),
            "--tls-auth-clients".to_string(),
            verify.to_string(),
        ];
        Self::launch(dir, log, None, addr, &listen).await
    }

    async fn start_with(
        dir: &Path,
        log: impl Into<PathBuf>,
        password: Option<&str>,
        extra: &[String],
    ) -> Self {
        let addr = free_addr();
        let mut args = vec!["--port".to_string(), addr.port().to_string()];
        args.extend(extra.iter().cloned());
        Self::launch(dir, log, password, addr, &args).await
    }

    /// Starts `redis-server` with the common arguments and `extra` (which says where it
    /// listens: `addr`) and waits until it accepts clients.
    async fn launch(
        dir: &Path,
        log: impl Into<PathBuf>,
        password: Option<&str>,
        addr: SocketAddr,
        extra: &[String],
    ) -> Self {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let mut args: Vec<String> = [
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            &dir.display().to_string(),
            "--daemonize",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(p) = password {
            args.extend(["--requirepass".to_string(), p.to_string()]);
        }
        args.extend(extra.iter().cloned());
        let proc = Proc::start(
            "redis",
            &redis_server_path(),
            &args,
            std::iter::empty::<(&str, &str)>(),
            log,
        );
        let mut redis = Self {
            proc,
            addr,
            dir: dir.to_path_buf(),
            password: password.map(str::to_string),
        };
        redis.wait_ready().await;
        redis
    }

    /// `host:port`, as `datastore.settings.addresses` takes it.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// Waits until the current run accepts clients (after loading its append-only file).
    pub async fn wait_ready(&mut self) {
        self.proc.wait_for_log(REDIS_READY, START_WAIT).await;
    }

    /// SIGKILL: no chance to flush anything that was not already on disk.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts it again on the same port with the same folder (its data comes back from the
    /// append-only file) and waits until it accepts clients.
    pub async fn restart(&mut self) {
        self.proc.restart();
        self.wait_ready().await;
    }

    /// Sends one command (authenticating first when a password is set) and returns its reply.
    pub async fn command(&self, args: &[&str]) -> std::io::Result<Resp> {
        let work = async {
            let mut s = TcpStream::connect(self.addr).await?;
            let mut buf = Vec::new();
            if let Some(p) = &self.password {
                if let Resp::Error(e) = exchange(&mut s, &mut buf, &["AUTH", p]).await? {
                    return Err(std::io::Error::other(format!("AUTH: {e}")));
                }
            }
            exchange(&mut s, &mut buf, args).await
        };
        tokio::time::timeout(COMMAND_TIMEOUT, work)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "Redis command"))?
    }
}

impl Redis {
    /// Whether the text `command` answers has the line `line` (`CLUSTER INFO`, `INFO`).
    pub async fn says(&self, command: &[&str], line: &str) -> bool {
        match self.command(command).await {
            Ok(Resp::Bulk(Some(text))) => String::from_utf8_lossy(&text)
                .lines()
                .any(|l| l.trim() == line),
            _ => false,
        }
    }
}

/// What a Sentinel logs once it monitors its primary.
const SENTINEL_READY: &str = "+monitor master";

/// A running Redis Sentinel (`redis-server CONF --sentinel`) watching one primary.
pub struct Sentinel {
    proc: Proc,
    pub addr: SocketAddr,
}

impl Sentinel {
    /// Starts a Sentinel that monitors `primary` as `name` (quorum 2, a primary silent for 1 s
    /// counts as down), with its configuration in `dir`, and waits until it monitors.
    pub async fn start(
        dir: &Path,
        log: impl Into<PathBuf>,
        name: &str,
        primary: SocketAddr,
        password: Option<&str>,
    ) -> Self {
        Self::start_with(dir, log, name, primary, password, None).await
    }

    /// [`start`](Self::start) listening on TLS only and reaching the primary over TLS, with
    /// `tls`'s certificate, key and CA (client certificates required when `verify_client`).
    pub async fn start_tls(
        dir: &Path,
        log: impl Into<PathBuf>,
        name: &str,
        primary: SocketAddr,
        tls: &TlsSettings,
    ) -> Self {
        Self::start_with(dir, log, name, primary, None, Some(tls)).await
    }

    async fn start_with(
        dir: &Path,
        log: impl Into<PathBuf>,
        name: &str,
        primary: SocketAddr,
        password: Option<&str>,
        tls: Option<&TlsSettings>,
    ) -> Self {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let addr = free_addr();
        let listen = match tls {
            None => format!("port {}\n", addr.port()),
            Some(t) => format!(
                "port 0\ntls-port {}\ntls-cert-file {}\ntls-key-file {}\n\
                 tls-ca-cert-file {}\ntls-auth-clients {}\ntls-replication yes\n",
                addr.port(),
                t.certificate.display(),
                t.key.display(),
                t.ca_certificate.display(),
                if t.verify_client { "yes" } else { "no" },
            ),
        };
        let mut conf = format!(
            "{listen}bind 127.0.0.1\ndir {}\nsentinel monitor {name} {} {} 2\n\
             sentinel down-after-milliseconds {name} 1000\n\
             sentinel failover-timeout {name} 5000\nsentinel parallel-syncs {name} 1\n",
            dir.display(),
            primary.ip(),
            primary.port(),
        );
        if let Some(p) = password {
            conf.push_str(&format!("sentinel auth-pass {name} {p}\n"));
        }
        let file = dir.join("sentinel.conf");
        std::fs::write(&file, conf).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
        let mut proc = Proc::start(
            "sentinel",
            &redis_server_path(),
            [file.display().to_string(), "--sentinel".to_string()],
            std::iter::empty::<(&str, &str)>(),
            log,
        );
        proc.wait_for_log(SENTINEL_READY, START_WAIT).await;
        Self { proc, addr }
    }

    /// `host:port`, as `datastore.settings.addresses` takes it with `sentinel`.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }
}

/// Time a new cluster gets until every node says `cluster_state:ok`.
const CLUSTER_WAIT: Duration = Duration::from_secs(30);

/// A Redis Cluster, each node a [`Redis`] with `--cluster-enabled yes` (its bus on a port of
/// [`free_port`] too), the slots spread and replicas assigned by `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
    /// Replicas per primary.
    replicas: usize,
}

impl RedisCluster {
    /// Starts `primaries` × (1 + `replicas`) nodes (folders `dir/node-i`, logs
    /// `dir/node-i.log`), all requiring `password`, joins them into one cluster and waits until
    /// each says `cluster_state:ok` and every primary has its replicas online.
    pub async fn start(dir: &Path, primaries: usize, replicas: usize, password: &str) -> Self {
        let n = primaries * (1 + replicas);
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let node_dir = dir.join(format!("node-{i}"));
            let extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &node_dir.join("nodes.conf").display().to_string(),
                "--cluster-port",
                &free_port().to_string(),
                "--cluster-node-timeout",
                "2000",
                "--masterauth",
                password,
            ]
            .map(str::to_string);
            nodes.push(
                Redis::start_with(
                    &node_dir,
                    dir.join(format!("node-{i}.log")),
                    Some(password),
                    &extra,
                )
                .await,
            );
        }
        let mut create = std::process::Command::new(program_path("redis-cli", "redis-tools"));
        create.args(["--no-auth-warning", "-a", password, "--cluster", "create"]);
        create.args(nodes.iter().map(Redis::address));
        create.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        let out = tokio::task::spawn_blocking(move || create.output())
            .await
            .expect("redis-cli task")
            .expect("running redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Self { nodes, replicas };
        cluster.wait_ok().await;
        cluster
    }

    /// Waits until every node says `cluster_state:ok` (all slots served, as far as it knows)
    /// and every primary has its replicas online.
    pub async fn wait_ok(&self) {
        let replicas = format!("connected_slaves:{}", self.replicas);
        let ok = wait_until(CLUSTER_WAIT, || async {
            for node in &self.nodes {
                if !node.says(&["CLUSTER", "INFO"], "cluster_state:ok").await {
                    return false;
                }
                let info = ["INFO", "replication"];
                let synced = if node.says(&info, "role:master").await {
                    node.says(&info, &replicas).await
                } else {
                    node.says(&info, "master_link_status:up").await
                };
                if !synced {
                    return false;
                }
            }
            true
        })
        .await;
        assert!(
            ok,
            "the cluster is not ok {CLUSTER_WAIT:?} after it was made"
        );
    }

    /// `host:port` of every node, as `datastore.settings.addresses` takes them with `cluster`.
    pub fn addresses(&self) -> Vec<String> {
        self.nodes.iter().map(Redis::address).collect()
    }
}

/// A RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

impl Resp {
    pub fn as_integer(&self) -> Option<i64> {
        match self {
            Resp::Integer(n) => Some(*n),
            _ => None,
        }
    }
}

async fn exchange(s: &mut TcpStream, buf: &mut Vec<u8>, args: &[&str]) -> std::io::Result<Resp> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    s.write_all(&out).await?;
    loop {
        if let Some((reply, used)) = parse(buf) {
            buf.drain(..used);
            return Ok(reply);
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One complete reply at the start of `buf` and its length, or `None` while incomplete.
fn parse(buf: &[u8]) -> Option<(Resp, usize)> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[1..line_end]).ok()?;
    let next = line_end + 2;
    match buf.first()? {
        b'+' => Some((Resp::Simple(line.to_string()), next)),
        b'-' => Some((Resp::Error(line.to_string()), next)),
        b':' => Some((Resp::Integer(line.parse().ok()?), next)),
        b'$' => {
            let len: i64 = line.parse().ok()?;
            if len < 0 {
                return Some((Resp::Bulk(None), next));
            }
            let end = next + usize::try_from(len).ok()?;
            let data = buf.get(next..end)?.to_vec();
            buf.get(end..end + 2)?;
            Some((Resp::Bulk(Some(data)), end + 2))
        }
        b'*' => {
            let len: i64 = line.parse().ok()?;
            if len < 0 {
                return Some((Resp::Array(None), next));
            }
            let mut items = Vec::new();
            let mut at = next;
            for _ in 0..len {
                let (item, used) = parse(&buf[at..])?;
                items.push(item);
                at += used;
            }
            Some((Resp::Array(Some(items)), at))
        }
        _ => Some((Resp::Error(format!("unexpected reply {line:?}")), next)),
    }
}
