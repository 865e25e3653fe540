//! The demo's five processes (docs/architecture.md §2) on free loopback ports, for `tunnel.rs`: the internal
//! server, the public and the private proxy of operators `public-proxy-1` / `private-proxy-1`,
//! and their two EPS servers, with certificates from one [`Pki`] and one directory.
//!
//! [`Tunnel::new`] only plans and writes settings; processes start with [`Tunnel::start`] (in
//! any order) or [`Tunnel::start_all`]. Every process keeps its ports across
//! [`Tunnel::restart`], so the others find it again. The directory also knows a second private
//! operator, `private-proxy-2`, whose EPS server ([`Tunnel::start_other_eps`]) lets a test
//! announce as someone else (409).
//!
//! Clients: [`https_request`] speaks HTTP/1.1 over a fresh TCP+TLS connection (rustls), and
//! [`Tunnel::fetch`] sends one through the tunnel with a chosen SNI.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eps_core::http::RpcClient;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::eps::{record, start_eps, write_records, EpsConfig, EPS_READY};
use crate::files::TestDir;
use crate::keepalive::tls_over;
use crate::pki::Pki;
use crate::process::{bin_path, Proc};
use crate::rpc::{client_tls_without_cert, rpc_client};
use crate::wait::{free_addr, wait_until};

/// The public proxy's operator.
pub const PUBLIC: &str = "public-proxy-1";
/// The private proxy's operator.
pub const PRIVATE: &str = "private-proxy-1";
/// A second private operator in the directory (same group and allowed domains), with no proxy.
pub const OTHER_PRIVATE: &str = "private-proxy-2";
/// The domain the private proxy announces from its settings.
pub const DOMAIN: &str = "test.internal-server.local";
/// What the internal server answers to GET and POST.
pub const SUCCESS: &str = r#"{"message": "success"}"#;
/// The public proxy's `public.limits.token_timeout` in these tests.
pub const TOKEN_TIMEOUT: Duration = Duration::from_secs(1);
/// Time a process gets to log that it is ready.
pub const PROCESS_WAIT: Duration = Duration::from_secs(15);
/// Time the five processes get, once started, to carry a first request.
pub const TUNNEL_WAIT: Duration = Duration::from_secs(20);
/// Deadline of one request in a readiness loop.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline of the tests' JSON-RPC calls to the proxies.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(15);

/// One of the five processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    InternalServer,
    PublicProxy,
    PrivateProxy,
    PublicEps,
    PrivateEps,
}

impl Role {
    /// All five, in the README's start order.
    pub const ALL: [Role; 5] = [
        Role::InternalServer,
        Role::PublicProxy,
        Role::PrivateProxy,
        Role::PublicEps,
        Role::PrivateEps,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::InternalServer => "internal-server",
            Role::PublicProxy => "public-proxy",
            Role::PrivateProxy => "private-proxy",
            Role::PublicEps => "public-eps",
            Role::PrivateEps => "private-eps",
        }
    }

    /// The line the process logs once it listens.
    pub fn ready_line(self) -> &'static str {
        match self {
            Role::InternalServer => "internal-server listening on",
            Role::PublicProxy => "public proxy ready",
            Role::PrivateProxy => "private proxy ready",
            Role::PublicEps | Role::PrivateEps => EPS_READY,
        }
    }
}

/// The five processes of one test, their addresses and settings. Fields drop in order: the
/// processes first (printing their logs if the test failed), the folder last.
pub struct Tunnel {
    procs: BTreeMap<Role, Proc>,
    /// The internal server (TLS, `*.internal-server.local`).
    pub internal_addr: SocketAddr,
    /// The public proxy's public port (clients).
    pub public_addr: SocketAddr,
    /// The public proxy's internal port (dial-backs with a token).
    pub public_internal_addr: SocketAddr,
    /// The public proxy's JSON-RPC server (its EPS server delivers there).
    pub public_rpc_addr: SocketAddr,
    /// The private proxy's JSON-RPC server.
    pub private_rpc_addr: SocketAddr,
    pub public_eps: EpsConfig,
    pub private_eps: EpsConfig,
    pub other_eps: EpsConfig,
    /// `PROXY_SETTINGS` / `EPS_SETTINGS` folder of each role.
    settings: BTreeMap<Role, PathBuf>,
    pub pki: Pki,
    pub dir: TestDir,
}

impl Tunnel {
    /// Issues certificates, picks ports, writes the directory and every process's settings.
    /// Starts nothing.
    pub fn new(test: &str) -> Self {
        let dir = TestDir::new(test);
        let directory = dir.mkdir("directory");
        // Pins every operator's certificate in the directory (90-certificates.json).
        let pki = Pki::new(
            dir.join("pki"),
            &[PUBLIC, PRIVATE, OTHER_PRIVATE],
            Some(&directory),
        );
        pki.issue_server(
            "internal-server",
            &["*.internal-server.local", "internal-server.local"],
        );

        let internal_addr = free_addr();
        let public_addr = free_addr();
        let public_internal_addr = free_addr();
        let public_rpc_addr = free_addr();
        let private_rpc_addr = free_addr();
        let public_eps = EpsConfig::new(
            PUBLIC,
            &pki,
            &directory,
            &format!("https://{public_rpc_addr}/jsonrpc"),
        );
        let mut private_eps = EpsConfig::new(
            PRIVATE,
            &pki,
            &directory,
            &format!("https://{private_rpc_addr}/jsonrpc"),
        );
        // As in the demo: the private EPS server opens no gRPC port and holds a reverse stream
        // to the public one.
        private_eps.serve_grpc = false;
        // private-proxy-2 has no proxy: nothing is ever delivered to it.
        let other_eps = EpsConfig::new(OTHER_PRIVATE, &pki, &directory, "https://127.0.0.1:9/");

        let allowed = json!([{"service": "proxy", "environment": "test",
                              "settings": {"allowed_domains": [".internal-server.local"]}}]);
        let mut records = public_eps.records(
            &["public-proxies"],
            json!([{"name": "proxy",
                    "permissions": [{"group": "private-proxies", "rights": ["call"]}],
                    "methods": [{"name": "announceConnections"}, {"name": "getAnnouncements"}]}]),
        );
        records.extend(private_eps.records(
            &["private-proxies"],
            json!([{"name": "proxy",
                    "permissions": [{"group": "public-proxies", "rights": ["call"]}],
                    "methods": [{"name": "incomingConnection"}, {"name": "getAnnouncements"}]}]),
        ));
        records.push(record(PRIVATE, "settings", allowed.clone()));
        records.extend(other_eps.records(&["private-proxies"], json!([])));
        records.push(record(OTHER_PRIVATE, "settings", allowed));
        write_records(&directory, "10-operators.json", &records);

        let public_proxy = proxy_settings(
            &pki,
            PUBLIC,
            &public_eps,
            public_rpc_addr,
            &dir.join("data/public-proxy-1/announcements.json"),
            json!({"public": {
                "bind_address": public_addr,
                "internal_bind_address": public_internal_addr,
                "internal_endpoint": public_internal_addr.to_string(),
                "limits": {"token_timeout": TOKEN_TIMEOUT.as_secs_f64()},
            }}),
        );
        let private_proxy = proxy_settings(
            &pki,
            PRIVATE,
            &private_eps,
            private_rpc_addr,
            &dir.join("data/private-proxy-1/announcements.json"),
            private_role(internal_addr),
        );
        let mut settings = BTreeMap::new();
        dir.write_yaml("public-proxy/proxy.yml", &public_proxy);
        settings.insert(Role::PublicProxy, dir.join("public-proxy"));
        dir.write_yaml("private-proxy/proxy.yml", &private_proxy);
        settings.insert(Role::PrivateProxy, dir.join("private-proxy"));
        settings.insert(Role::PublicEps, public_eps.write(&dir.join("public-eps")));
        settings.insert(
            Role::PrivateEps,
            private_eps.write(&dir.join("private-eps")),
        );
        other_eps.write(&dir.join("other-eps"));

        Self {
            procs: BTreeMap::new(),
            internal_addr,
            public_addr,
            public_internal_addr,
            public_rpc_addr,
            private_rpc_addr,
            public_eps,
            private_eps,
            other_eps,
            settings,
            pki,
            dir,
        }
    }

    /// Starts `role` without waiting for it.
    pub fn start(&mut self, role: Role) {
        assert!(
            !self.procs.contains_key(&role),
            "{} started twice",
            role.name()
        );
        let log = self.dir.join(format!("{}.log", role.name()));
        let proc = match role {
            Role::InternalServer => Proc::start(
                role.name(),
                &bin_path("internal-server"),
                std::iter::empty::<&str>(),
                internal_server_env(&self.pki, self.internal_addr),
                log,
            ),
            Role::PublicProxy | Role::PrivateProxy => {
                let kind = if role == Role::PublicProxy {
                    "public"
                } else {
                    "private"
                };
                Proc::start(
                    role.name(),
                    &bin_path("proxy"),
                    ["run", kind],
                    [("PROXY_SETTINGS", &self.settings[&role])],
                    log,
                )
            }
            Role::PublicEps | Role::PrivateEps => {
                start_eps(role.name(), &[self.settings[&role].as_path()], log)
            }
        };
        self.procs.insert(role, proc);
    }

    /// Waits until `role`'s current run logged that it listens.
    pub async fn wait_ready(&mut self, role: Role) {
        self.proc_mut(role)
            .wait_for_log(role.ready_line(), PROCESS_WAIT)
            .await;
    }

    /// [`new`](Self::new) and [`start_all`](Self::start_all): the tunnel of test `test`, working.
    pub async fn started(test: &str) -> Self {
        let mut t = Self::new(test);
        t.start_all().await;
        t
    }

    /// Starts the five in the README's order, each once the previous one is listening, then
    /// waits until a request goes through the tunnel.
    pub async fn start_all(&mut self) {
        for role in Role::ALL {
            self.start(role);
            self.wait_ready(role).await;
        }
        let took = self.wait_tunnel(TUNNEL_WAIT).await;
        assert!(
            took.is_some(),
            "no request went through the tunnel within {TUNNEL_WAIT:?}"
        );
    }

    pub fn proc(&self, role: Role) -> &Proc {
        self.procs
            .get(&role)
            .unwrap_or_else(|| panic!("{} was not started", role.name()))
    }

    pub fn proc_mut(&mut self, role: Role) -> &mut Proc {
        self.procs
            .get_mut(&role)
            .unwrap_or_else(|| panic!("{} was not started", role.name()))
    }

    /// Kills `role` with SIGKILL and starts it again with the same settings and ports.
    pub fn restart(&mut self, role: Role) {
        self.proc_mut(role).restart();
    }

    /// The `PROXY_SETTINGS` / `EPS_SETTINGS` folder of `role` (not of the internal server, which
    /// reads its environment). Settings files are merged in lexical order, later ones winning:
    /// a test changes settings by writing, e.g., `zz-test.yml` there before starting `role`.
    pub fn settings_dir(&self, role: Role) -> &std::path::Path {
        self.settings
            .get(&role)
            .unwrap_or_else(|| panic!("{} has no settings folder", role.name()))
    }

    /// Starts the EPS server of `private-proxy-2` and waits until it listens.
    pub async fn start_other_eps(&self) -> Proc {
        let mut proc = start_eps(
            OTHER_PRIVATE,
            &[self.dir.join("other-eps").as_path()],
            self.dir.join("other-eps.log"),
        );
        proc.wait_for_log(EPS_READY, PROCESS_WAIT).await;
        proc
    }

    /// A JSON-RPC client of `private-proxy-2`'s EPS server, as its proxy would be.
    pub fn other_eps_client(&self) -> RpcClient {
        rpc_client(
            &self.other_eps.jsonrpc_url(),
            Some(&self.pki.tls(OTHER_PRIVATE)),
            RPC_TIMEOUT,
        )
    }

    /// A JSON-RPC client of the public proxy, with its operator's certificate.
    pub fn public_rpc(&self) -> RpcClient {
        rpc_client(
            &format!("https://{}/jsonrpc", self.public_rpc_addr),
            Some(&self.pki.tls(PUBLIC)),
            RPC_TIMEOUT,
        )
    }

    /// A JSON-RPC client of the private proxy, with its operator's certificate.
    pub fn private_rpc(&self) -> RpcClient {
        rpc_client(
            &format!("https://{}/jsonrpc", self.private_rpc_addr),
            Some(&self.pki.tls(PRIVATE)),
            RPC_TIMEOUT,
        )
    }

    /// The root CA clients trust.
    pub fn root(&self) -> PathBuf {
        self.pki.root()
    }

    /// A TLS client config as a browser's: trusts the root, no certificate, ALPN http/1.1.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        client_tls_without_cert(&self.pki.root())
    }

    /// Sends one request through the tunnel on a new connection, with `sni` as server name.
    pub async fn fetch(
        &self,
        sni: &str,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> std::io::Result<Reply> {
        https_request(
            self.public_addr,
            self.client_config(),
            sni,
            method,
            path,
            body,
            ATTEMPT_TIMEOUT,
        )
        .await
    }

    /// True when `GET /jsonrpc` for `sni` through the tunnel gets 200 and the demo's answer.
    pub async fn works_for(&self, sni: &str) -> bool {
        matches!(self.fetch(sni, "GET", "/jsonrpc", b"").await,
                 Ok(r) if r.status == 200 && r.body == SUCCESS.as_bytes())
    }

    /// [`works_for`](Self::works_for) the settings' domain.
    pub async fn works(&self) -> bool {
        self.works_for(DOMAIN).await
    }

    /// Retries a request through the tunnel until one succeeds; how long that took, or `None`
    /// after `timeout`.
    pub async fn wait_tunnel(&self, timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        wait_until(timeout, || self.works())
            .await
            .then(|| start.elapsed())
    }

    /// Starts `internal-server` in plain mode (`IS_PLAIN=1`: HTTP/1.1 and HTTP/2 without TLS)
    /// on a free port, reading a PROXY header first with `proxy_protocol`, and waits until it
    /// listens: a backend for a domain whose TLS ends at the private proxy.
    pub async fn start_plain_server(&self, name: &str, proxy_protocol: bool) -> (Proc, SocketAddr) {
        let addr = free_addr();
        let mut env: Vec<(&str, String)> = internal_server_env(&self.pki, addr).into();
        env.push(("IS_PLAIN", "1".into()));
        if proxy_protocol {
            env.push(("IS_PROXY_PROTOCOL", "1".into()));
        }
        let mut proc = Proc::start(
            name,
            &bin_path("internal-server"),
            std::iter::empty::<&str>(),
            env,
            self.dir.join(format!("{name}.log")),
        );
        proc.wait_for_log(Role::InternalServer.ready_line(), PROCESS_WAIT)
            .await;
        (proc, addr)
    }

    /// Connections the internal server has finished so far (all its runs).
    pub fn internal_connections(&self) -> usize {
        self.proc(Role::InternalServer)
            .log()
            .matches("connection closed")
            .count()
    }
}

/// A proxy's settings: operator `name` with its certificate from `pki`, calling out through
/// `eps`, serving its JSON-RPC on `rpc_addr` (clients need a certificate), announcements kept in
/// `store`, and its role's section (`{"public": ...}` or `{"private": ...}`) merged in.
pub fn proxy_settings(
    pki: &Pki,
    name: &str,
    eps: &EpsConfig,
    rpc_addr: SocketAddr,
    store: &std::path::Path,
    role: serde_json::Value,
) -> serde_json::Value {
    let tls = serde_json::to_value(pki.tls(name)).expect("TLS settings");
    let verifying = serde_json::to_value(pki.tls_verifying(name)).expect("TLS settings");
    let mut v = json!({
        "name": name,
        "eps": {"url": eps.jsonrpc_url(), "tls": tls},
        "jsonrpc_server": {"bind_address": rpc_addr, "tls": verifying},
        "datastore": {"type": "file", "settings": {"path": store}},
    });
    eps_core::settings::merge(&mut v, role);
    v
}

/// The `private` section of the demo's private proxy: it announces [`DOMAIN`] to [`PUBLIC`]
/// and relays to the internal server at `internal`.
pub fn private_role(internal: SocketAddr) -> serde_json::Value {
    json!({"private": {
        "public_proxy": PUBLIC,
        "internal_endpoint": internal.to_string(),
        "announcements": [{"domain": DOMAIN}],
    }})
}

/// The environment of `internal-server` on `addr` with the certificate `pki` issued for it,
/// logging one "connection closed" line per connection ([`Tunnel::internal_connections`]).
pub fn internal_server_env(pki: &Pki, addr: SocketAddr) -> [(&'static str, String); 4] {
    let level = std::env::var("EPS_TESTS_RUST_LOG").unwrap_or_else(|_| "info".into());
    [
        ("IS_BIND_ADDRESS", addr.to_string()),
        (
            "IS_CERTIFICATE",
            pki.cert("internal-server").display().to_string(),
        ),
        ("IS_KEY", pki.key("internal-server").display().to_string()),
        ("RUST_LOG", format!("{level},internal_server=debug")),
    ]
}

/// An HTTP/1.1 response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Opens TCP to `addr`, TLS with server name `host` (SNI and certificate check), sends one
/// HTTP/1.1 request (`Connection: close`; a body when `body` is not empty) and reads the
/// response (which must carry a `Content-Length`). All within `timeout`.
pub async fn https_request(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    host: &str,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<Reply> {
    let work = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        https_request_over(tcp, config, host, method, path, body).await
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no complete response from {addr} ({host}) within {timeout:?}"),
        )
    })?
}

/// [`https_request`] over a TCP connection the caller opened (e.g. from inside a network
/// namespace): TLS with server name `host`, one HTTP/1.1 request, its response. No deadline: the
/// caller sets one.
pub async fn https_request_over(
    tcp: tokio::net::TcpStream,
    config: Arc<rustls::ClientConfig>,
    host: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<Reply> {
    let (mut tls, _) = tls_over(tcp, config, host).await?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    if !body.is_empty() || method == "POST" {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("Connection: close\r\n\r\n");
    let mut out = request.into_bytes();
    out.extend_from_slice(body);
    tls.write_all(&out).await?;
    tls.flush().await?;
    read_reply(&mut tls).await
}

/// Reads one response with a `Content-Length` body from `io`.
pub async fn read_reply(io: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Reply> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if let Some(reply) = parse_response(&buf)? {
            return Ok(reply);
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed after {} bytes of response: {:?}",
                    buf.len(),
                    String::from_utf8_lossy(&buf[..buf.len().min(200)])
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The response in `buf` once it is complete; an error when its head is not HTTP/1.1 with a
/// `Content-Length`.
pub fn parse_response(buf: &[u8]) -> std::io::Result<Option<Reply>> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line in {head:?}")))?;
    let len: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .ok_or_else(|| bad(format!("no Content-Length in {head:?}")))?;
    Ok(buf.get(end + 4..end + 4 + len).map(|body| Reply {
        status,
        body: body.to_vec(),
    }))
}

/// Lays `eps: {embedded: EPS_DIRS}` over the proxy's settings in `proxy_dir`
/// (`zz-embedded.yml`), and drops the local JSON-RPC link the proxy then no longer needs:
/// the proxy runs the EPS server of `eps_dirs` (colon-separated) in its own process.
pub fn embed_eps(proxy_dir: &std::path::Path, eps_dirs: &str) {
    let overlay = serde_json::json!({
        "eps": {"url": null, "tls": null, "embedded": eps_dirs},
        "jsonrpc_server": null,
    });
    std::fs::write(
        proxy_dir.join("zz-embedded.yml"),
        serde_json::to_string(&overlay).expect("JSON"),
    )
    .expect("writing zz-embedded.yml");
}
