//! Hosts as Linux network namespaces, for `firewall.rs`: [`Netns`] (a namespace with `lo` up,
//! whose processes are killed and which is deleted on drop), [`link`] (a veth pair between two of
//! them, addresses from 198.18.0.0/15), nftables rules ([`drop_new_inbound`], [`cut`]), the
//! binaries started inside one ([`Netns::start`]) and client sockets made inside one from the test
//! process ([`Netns::connect`], [`NsClient`]).
//!
//! Needs root and the commands `ip` (iproute2) and `nft` (nftables): [`netns_supported`] says
//! whether a test can run, and fails it under `CI` when it cannot. Every namespace, interface and
//! address is created here for one test and removed with it; nothing touches the host's own
//! network namespace.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpSocket, TcpStream};

use crate::process::Proc;
use crate::tunnel::{https_request_over, Reply};

/// Where `ip netns add` mounts a namespace (what `setns` opens).
const NETNS_RUN_DIR: &str = "/var/run/netns";
/// Name of the table [`drop_new_inbound`] installs.
const FIREWALL_TABLE: &str = "eps_test_firewall";
/// Name of the table [`cut`] installs.
const CUT_TABLE: &str = "eps_test_cut";

/// Time a new veth pair gets to come up.
const LINK_UP_WAIT: Duration = Duration::from_secs(10);
/// Numbers namespaces and veth interfaces of this test process apart.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Whether namespace tests can run here: root, `ip` and `nft`. When they cannot, prints why
/// (naming `test`) and returns false so the test returns early; under `CI` (any value but empty,
/// `0` or `false`) it panics instead, since CI must run them (`.ci/run` installs the tools).
pub fn netns_supported(test: &str) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (network namespaces and nftables need CAP_SYS_ADMIN, CAP_NET_ADMIN)");
    }
    for (cmd, arg, package) in [
        ("ip", "-V", "`ip` (Debian package iproute2)"),
        ("nft", "--version", "`nft` (Debian package nftables)"),
    ] {
        let ok = Command::new(cmd)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!("{test}: needs {}", missing.join(", "));
    let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
    assert!(!ci, "{why}; CI is set, so this is a failure, not a skip");
    eprintln!("SKIPPED {why}");
    false
}

/// A network namespace (a "host") with `lo` up. On drop (also when the test panics) every
/// process still in it is killed (SIGKILL) and it is deleted, which deletes its veth ends.
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new namespace `eps-t<pid>-<n>-<label>`, unique in this test process.
    pub fn new(label: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("eps-t{}-{n}-{label}", std::process::id());
        if Path::new(NETNS_RUN_DIR).join(&name).exists() {
            // Left by an earlier test process with the same pid that was killed.
            let _ = run(Command::new("ip").args(["netns", "del", &name]));
        }
        run(Command::new("ip").args(["netns", "add", &name]))
            .unwrap_or_else(|e| panic!("creating network namespace {name}: {e}"));
        let ns = Self { name };
        ns.ip(["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME args...`; panics with its stderr when it fails.
    pub fn ip<I, S>(&self, args: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.arg("-n").arg(&self.name).args(args);
        run(&mut cmd).unwrap_or_else(|e| panic!("in {}: {e}", self.name));
    }

    /// Loads `ruleset` with `nft -f -` inside the namespace; panics with nft's stderr when it
    /// refuses.
    pub fn nft(&self, ruleset: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting nft in {}: {e}", self.name));
        child
            .stdin
            .take()
            .expect("nft's stdin")
            .write_all(ruleset.as_bytes())
            .expect("writing the ruleset to nft");
        let out = child.wait_with_output().expect("waiting for nft");
        assert!(
            out.status.success(),
            "nft in {} ({}): {}\nruleset:\n{ruleset}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The default route goes via `gateway` (an address on a link to this namespace).
    pub fn default_route(&self, gateway: Ipv4Addr) {
        self.ip(["route", "replace", "default", "via", &gateway.to_string()]);
    }

    /// Starts `program` inside the namespace as `ip netns exec NAME program args...`, logging to
    /// `log` like [`Proc::start`]. `ip` execs the program in its own place, so the [`Proc`]'s pid
    /// is the program's: kill, stop and restart act on it.
    pub fn start<A, K, V>(
        &self,
        name: &str,
        program: &Path,
        args: impl IntoIterator<Item = A>,
        env: impl IntoIterator<Item = (K, V)>,
        log: impl Into<PathBuf>,
    ) -> Proc
    where
        A: AsRef<OsStr>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let mut full: Vec<OsString> = ["netns", "exec", &self.name]
            .iter()
            .map(OsString::from)
            .collect();
        full.push(program.as_os_str().to_owned());
        full.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        Proc::start(name, Path::new("ip"), full, env, log)
    }

    /// Runs `f` on a new thread that has entered this namespace (`setns`), and returns what it
    /// returns. Sockets `f` creates belong to the namespace for good, whichever thread uses them
    /// later. (Never a pooled thread: it would stay in the namespace.)
    pub fn run_inside<T, F>(&self, f: F) -> std::io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> std::io::Result<T> + Send + 'static,
    {
        run_in_netns(&self.name, f)
    }

    /// A TCP (IPv4) socket of this namespace, not yet connected.
    pub fn socket(&self) -> std::io::Result<TcpSocket> {
        self.run_inside(TcpSocket::new_v4)
    }

    /// A TCP connection to `addr` from inside this namespace (async connect, on the caller's
    /// runtime).
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let stream = self.socket()?.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// A listening socket on `addr` inside this namespace (non-blocking, for tokio).
    pub fn listen(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
        let listener = self.run_inside(move || {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        tokio::net::TcpListener::from_std(listener)
    }

    /// The pids of the processes in the namespace.
    pub fn pids(&self) -> Vec<libc::pid_t> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for pid in self.pids() {
            // SAFETY: kill(2); these are processes in a namespace this test created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("deleting network namespace {}: {e}", self.name);
        }
    }
}

/// A veth pair between namespaces `a` and `b` (see [`link`]).
#[derive(Debug, Clone)]
pub struct Link {
    /// `a`'s interface and address (198.18.N.1).
    pub a_if: String,
    pub a: Ipv4Addr,
    /// `b`'s interface and address (198.18.N.2).
    pub b_if: String,
    pub b: Ipv4Addr,
}

/// Joins `a` and `b` with a veth pair (created straight into the two namespaces, never in the
/// host's), `a` getting 198.18.`subnet`.1/24 and `b` 198.18.`subnet`.2/24 (RFC 2544 benchmark
/// space, routed nowhere), both up. `subnet` must differ between the links of one namespace.
pub fn link(a: &Netns, b: &Netns, subnet: u8) -> Link {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // At most 15 characters: "e" + pid in hex (<= 6) + "." + n + side.
    let base = format!("e{:x}.{n}", std::process::id());
    let (a_if, b_if) = (format!("{base}a"), format!("{base}b"));
    assert!(b_if.len() <= 15, "interface name {b_if} is too long");
    run(Command::new("ip").args([
        "link", "add", "name", &a_if, "netns", &a.name, "type", "veth", "peer", "name", &b_if,
        "netns", &b.name,
    ]))
    .unwrap_or_else(|e| panic!("creating veth {a_if}/{b_if}: {e}"));
    let (a_addr, b_addr) = (
        Ipv4Addr::new(198, 18, subnet, 1),
        Ipv4Addr::new(198, 18, subnet, 2),
    );
    for (ns, ifname, addr) in [(a, &a_if, a_addr), (b, &b_if, b_addr)] {
        ns.ip(["addr", "add", &format!("{addr}/24"), "dev", ifname]);
        ns.ip(["link", "set", ifname, "up"]);
    }
    // A veth end carries packets once both are up (carrier); a SYN sent before is lost and
    // retransmitted only a second later.
    for (ns, ifname) in [(a, &a_if), (b, &b_if)] {
        let deadline = Instant::now() + LINK_UP_WAIT;
        loop {
            let out = Command::new("ip")
                .args(["-n", &ns.name, "-br", "link", "show", "dev", ifname])
                .output()
                .expect("ip link show");
            let state = String::from_utf8_lossy(&out.stdout).into_owned();
            if state.split_whitespace().nth(1) == Some("UP") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{ifname} in {} not up within {LINK_UP_WAIT:?}: {state}",
                ns.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Link {
        a_if,
        a: a_addr,
        b_if,
        b: b_addr,
    }
}

/// The project's premise on host `ns`: every new inbound connection is dropped silently
/// (policy drop); loopback and packets of connections `ns` opened itself (established, related)
/// pass. Replaces an earlier such rule.
pub fn drop_new_inbound(ns: &Netns) {
    replace_table(
        ns,
        FIREWALL_TABLE,
        "chain input {\n\
           type filter hook input priority filter; policy drop;\n\
           iif \"lo\" accept\n\
           ct state established,related accept\n\
         }\n",
    );
}

/// Removes [`drop_new_inbound`]'s rule (if any).
pub fn remove_firewall(ns: &Netns) {
    delete_table(ns, FIREWALL_TABLE);
}

/// A silently dead path: every packet in or out of `ns` on an interface other than `lo` is
/// dropped, so its peers get no RST, no FIN, no ICMP, nothing. (Local sends fail with EPERM
/// inside `ns` itself, as under any output drop rule.) Undone by [`heal`].
pub fn cut(ns: &Netns) {
    replace_table(
        ns,
        CUT_TABLE,
        "chain input {\n\
           type filter hook input priority raw; policy accept;\n\
           iif != \"lo\" drop\n\
         }\n\
         chain output {\n\
           type filter hook output priority raw; policy accept;\n\
           oif != \"lo\" drop\n\
         }\n",
    );
}

/// Removes [`cut`]'s rules (if any).
pub fn heal(ns: &Netns) {
    delete_table(ns, CUT_TABLE);
}

/// Installs table `table` in `ns` with `chains`, replacing an earlier one of that name.
fn replace_table(ns: &Netns, table: &str, chains: &str) {
    ns.nft(&format!(
        "add table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n{chains}}}\n"
    ));
}

fn delete_table(ns: &Netns, table: &str) {
    ns.nft(&format!(
        "add table inet {table}\ndelete table inet {table}\n"
    ));
}

/// HTTPS requests from inside a namespace to one address and server name, each on a new
/// TCP+TLS connection (the tunnel's client, as a browser on that host would be).
#[derive(Clone)]
pub struct NsClient {
    ns: Arc<str>,
    pub addr: SocketAddr,
    pub host: String,
    pub config: Arc<rustls::ClientConfig>,
}

impl NsClient {
    /// Requests from namespace `ns` to `addr` with server name `host`.
    pub fn new(
        ns: &Netns,
        addr: SocketAddr,
        host: &str,
        config: Arc<rustls::ClientConfig>,
    ) -> Self {
        Self {
            ns: ns.name.as_str().into(),
            addr,
            host: host.to_string(),
            config,
        }
    }

    /// One request (`Connection: close`) within `timeout`, connect and handshake included.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        timeout: Duration,
    ) -> std::io::Result<Reply> {
        let work = async {
            let tcp = run_in_netns(&self.ns, TcpSocket::new_v4)?
                .connect(self.addr)
                .await?;
            https_request_over(tcp, self.config.clone(), &self.host, method, path, body).await
        };
        tokio::time::timeout(timeout, work).await.map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no complete response from {} ({}) in {} within {timeout:?}",
                    self.addr, self.host, self.ns
                ),
            )
        })?
    }
}

/// [`Netns::run_inside`] by namespace name.
fn run_in_netns<T, F>(name: &str, f: F) -> std::io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> std::io::Result<T> + Send + 'static,
{
    let path = Path::new(NETNS_RUN_DIR).join(name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path)?;
        // SAFETY: setns(2) on an open namespace file; it changes only this thread, which ends
        // after `f`.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .expect("the thread inside the namespace panicked")
}

/// Runs `cmd` to its end; its stderr as the error when it fails.
fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
