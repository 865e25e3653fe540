//! The fixture of `firewall.rs`: the demo's processes on separate hosts, each host a network
//! namespace ([`Netns`]) with fixed ports (nothing else listens there).
//!
//! - Host A (`public`): the public proxy (`public-proxy-1`) and its EPS server.
//! - Private hosts B1, B2, ... each linked to A by a veth pair (B`i` has 198.18.`i`.2, A has
//!   198.18.`i`.1 on that link, B`i`'s default route goes via A): the internal server, the
//!   private proxy and the private EPS server, all of operator `private-proxy-1` with the same
//!   certificate, key and announcements.
//!
//! A's "public address" is 198.18.1.1 (its address on the first link), which every private host
//! reaches through its own link. Clients run inside A ([`Hosts::client`]).
//!
//! [`Hosts::new`] creates the hosts and writes every settings file; [`Hosts::start_all`] starts
//! the processes and waits until a request goes through the tunnel.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use eps_tests::netns::{drop_new_inbound, link, Link, Netns, NsClient};
use eps_tests::tunnel::{
    embed_eps, internal_server_env, private_role, proxy_settings, Role, DOMAIN, PRIVATE,
    PROCESS_WAIT, PUBLIC, SUCCESS, TUNNEL_WAIT,
};
use eps_tests::{
    bin_path, client_tls_without_cert, json, operator_records, record, write_records, EpsConfig,
    Pki, Proc, TestDir, Value,
};

/// Public proxy: clients.
const PUBLIC_PORT: u16 = 4433;
/// Public proxy: dial-backs with a token.
const PUBLIC_INTERNAL_PORT: u16 = 9999;
/// Public proxy: JSON-RPC (its EPS server delivers there).
const PUBLIC_RPC_PORT: u16 = 6655;
/// Public EPS server: JSON-RPC for its proxy.
const PUBLIC_EPS_RPC_PORT: u16 = 5544;
/// Public EPS server: gRPC for peers (and their reverse streams).
const PUBLIC_EPS_GRPC_PORT: u16 = 5556;
/// Internal server (TLS, `*.internal-server.local`), on each private host's loopback.
const INTERNAL_PORT: u16 = 8888;
/// Private proxy: JSON-RPC.
const PRIVATE_RPC_PORT: u16 = 8877;
/// Private EPS server: JSON-RPC for its proxy.
const PRIVATE_EPS_RPC_PORT: u16 = 7766;
/// Private EPS server: gRPC, only in [`Mode::GrpcServer`].
const PRIVATE_EPS_GRPC_PORT: u16 = 7776;

/// What the private EPS server logs once its reverse stream to a peer is up.
pub const REVERSE_STREAM_OPEN: &str = "reverse stream open";
/// What a private proxy logs once the public proxy has accepted its announcements: the fixture
/// starts its tests from a settled state.
pub const ANNOUNCED: &str = "announcements accepted";
/// What the public EPS server logs when it accepts a reverse stream.
pub const REVERSE_STREAM_ACCEPTED: &str = "reverse stream accepted";

/// How the public side reaches the private EPS servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The private EPS server opens no port; it dials the public one and holds a reverse
    /// stream (directory channel `reverse_stream`, no `grpc_server` section).
    Reverse,
    /// Today's way: the private EPS server listens for gRPC on its host's link address, named
    /// in the directory (only host B1's, so only one private host makes sense).
    GrpcServer,
}

/// The shape of one test's network.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Private hosts B1..Bn.
    pub private_hosts: u8,
    /// [`drop_new_inbound`] on every private host, before any process starts.
    pub firewall: bool,
    pub mode: Mode,
    /// `keepalive_interval` and `keepalive_timeout` of every EPS server (client and server side).
    pub keepalive: Option<(Duration, Duration)>,
    /// Each EPS server inside its proxy's process (`eps: {embedded: ...}`, the same EPS
    /// settings): two processes on A, two on each private host.
    pub embedded: bool,
}

/// A private host: its namespace, link to A and three processes.
pub struct PrivateHost {
    /// Dropped before the namespace: killed, logs printed if the test failed.
    procs: BTreeMap<Role, Proc>,
    pub ns: Netns,
    pub link: Link,
    /// `b1`, `b2`, ...
    pub label: String,
    settings: BTreeMap<Role, PathBuf>,
}

impl PrivateHost {
    pub fn proc(&self, role: Role) -> &Proc {
        self.procs
            .get(&role)
            .unwrap_or_else(|| panic!("{} {} was not started", self.label, role.name()))
    }

    pub fn proc_mut(&mut self, role: Role) -> &mut Proc {
        let label = self.label.clone();
        self.procs
            .get_mut(&role)
            .unwrap_or_else(|| panic!("{label} {} was not started", role.name()))
    }

    /// Connections this host's internal server has finished so far (all its runs).
    pub fn internal_connections(&self) -> usize {
        self.proc(Role::InternalServer)
            .log()
            .matches("connection closed")
            .count()
    }
}

/// Host A, the private hosts, and what they share (certificates, directory, logs).
pub struct Hosts {
    /// Dropped first: killed, logs printed if the test failed.
    public_procs: BTreeMap<Role, Proc>,
    pub privates: Vec<PrivateHost>,
    pub public_ns: Netns,
    public_settings: BTreeMap<Role, PathBuf>,
    pub options: Options,
    /// The public proxy's client port, at A's public address.
    pub public_addr: SocketAddr,
    pub pki: Pki,
    pub dir: TestDir,
}

impl Hosts {
    /// Creates the namespaces and links (and firewalls), issues certificates, writes the
    /// directory and every process's settings. Starts no process.
    pub fn new(test: &str, options: Options) -> Self {
        assert!(options.private_hosts >= 1, "at least one private host");
        let dir = TestDir::new(test);
        let directory = dir.mkdir("directory");
        let pki = Pki::new(dir.join("pki"), &[PUBLIC, PRIVATE], Some(&directory));
        pki.issue_server(
            "internal-server",
            &["*.internal-server.local", "internal-server.local"],
        );

        let public_ns = Netns::new("a");
        let mut privates = Vec::new();
        for i in 1..=options.private_hosts {
            let label = format!("b{i}");
            let ns = Netns::new(&label);
            let l = link(&public_ns, &ns, i);
            ns.default_route(l.a);
            if options.firewall {
                drop_new_inbound(&ns);
            }
            privates.push(PrivateHost {
                procs: BTreeMap::new(),
                ns,
                link: l,
                label,
                settings: BTreeMap::new(),
            });
        }
        let public_ip = privates[0].link.a;
        let at = |ip: Ipv4Addr, port: u16| SocketAddr::from((ip, port));
        let local = |port: u16| at(Ipv4Addr::LOCALHOST, port);
        let any = |port: u16| at(Ipv4Addr::UNSPECIFIED, port);

        // The EPS servers' settings.
        let keepalive = |server: bool| -> Value {
            let Some((interval, timeout)) = options.keepalive else {
                return Value::Null;
            };
            let k = json!({"keepalive_interval": interval.as_secs_f64(),
                           "keepalive_timeout": timeout.as_secs_f64()});
            if server {
                json!({"grpc_client": k, "grpc_server": k})
            } else {
                json!({"grpc_client": k})
            }
        };
        let mut public_eps = EpsConfig::new(
            PUBLIC,
            &pki,
            &directory,
            &format!("https://{}/jsonrpc", local(PUBLIC_RPC_PORT)),
        );
        public_eps.jsonrpc_addr = local(PUBLIC_EPS_RPC_PORT);
        public_eps.grpc_addr = any(PUBLIC_EPS_GRPC_PORT);
        public_eps.extra = keepalive(true);
        let mut private_eps = EpsConfig::new(
            PRIVATE,
            &pki,
            &directory,
            &format!("https://{}/jsonrpc", local(PRIVATE_RPC_PORT)),
        );
        private_eps.jsonrpc_addr = local(PRIVATE_EPS_RPC_PORT);
        private_eps.grpc_addr = any(PRIVATE_EPS_GRPC_PORT);
        private_eps.serve_grpc = options.mode == Mode::GrpcServer;
        private_eps.extra = keepalive(private_eps.serve_grpc);

        // The directory: as the demo's (tests/support/tunnel.rs), with A's gRPC address and the
        // private operator's channel by mode.
        let mut records = operator_records(
            PUBLIC,
            Some(at(public_ip, PUBLIC_EPS_GRPC_PORT)),
            &["public-proxies"],
            json!([{"name": "proxy",
                    "permissions": [{"group": "private-proxies", "rights": ["call"]}],
                    "methods": [{"name": "announceConnections"}, {"name": "getAnnouncements"}]}]),
        );
        let private_services = json!([{"name": "proxy",
                "permissions": [{"group": "public-proxies", "rights": ["call"]}],
                "methods": [{"name": "incomingConnection"}, {"name": "getAnnouncements"}]}]);
        match options.mode {
            Mode::Reverse => {
                records.push(record(
                    PRIVATE,
                    "channels",
                    json!([{"type": "reverse_stream"}]),
                ));
                records.extend(operator_records(
                    PRIVATE,
                    None,
                    &["private-proxies"],
                    private_services,
                ));
            }
            Mode::GrpcServer => records.extend(operator_records(
                PRIVATE,
                Some(at(privates[0].link.b, PRIVATE_EPS_GRPC_PORT)),
                &["private-proxies"],
                private_services,
            )),
        }
        records.push(record(
            PRIVATE,
            "settings",
            json!([{"service": "proxy", "environment": "test",
                    "settings": {"allowed_domains": [".internal-server.local"]}}]),
        ));
        write_records(&directory, "10-operators.json", &records);

        // The proxies' settings.
        let public_proxy = proxy_settings(
            &pki,
            PUBLIC,
            &public_eps,
            local(PUBLIC_RPC_PORT),
            &dir.join("data/public/announcements.json"),
            json!({"public": {
                "bind_address": any(PUBLIC_PORT),
                "internal_bind_address": any(PUBLIC_INTERNAL_PORT),
                "internal_endpoint": at(public_ip, PUBLIC_INTERNAL_PORT).to_string(),
            }}),
        );
        let mut public_settings = BTreeMap::new();
        dir.write_yaml("public/proxy/proxy.yml", &public_proxy);
        public_settings.insert(Role::PublicProxy, dir.join("public/proxy"));
        public_settings.insert(Role::PublicEps, public_eps.write(&dir.join("public/eps")));
        if options.embedded {
            embed_eps(
                &public_settings[&Role::PublicProxy],
                &public_settings[&Role::PublicEps].display().to_string(),
            );
        }
        for host in &mut privates {
            let private_proxy = proxy_settings(
                &pki,
                PRIVATE,
                &private_eps,
                local(PRIVATE_RPC_PORT),
                &dir.join(format!("data/{}/announcements.json", host.label)),
                private_role(local(INTERNAL_PORT)),
            );
            let proxy_dir = format!("{}/proxy", host.label);
            dir.write_yaml(format!("{proxy_dir}/proxy.yml"), &private_proxy);
            host.settings
                .insert(Role::PrivateProxy, dir.join(&proxy_dir));
            host.settings.insert(
                Role::PrivateEps,
                private_eps.write(&dir.join(format!("{}/eps", host.label))),
            );
            if options.embedded {
                embed_eps(
                    &host.settings[&Role::PrivateProxy],
                    &host.settings[&Role::PrivateEps].display().to_string(),
                );
            }
        }

        Self {
            public_procs: BTreeMap::new(),
            privates,
            public_ns,
            public_settings,
            options,
            public_addr: at(public_ip, PUBLIC_PORT),
            pki,
            dir,
        }
    }

    /// Starts the public proxy and the public EPS server and waits until both listen.
    pub async fn start_public(&mut self) {
        for role in [Role::PublicProxy, Role::PublicEps] {
            if role == Role::PublicEps && self.options.embedded {
                continue;
            }
            let log = self.dir.join(format!("a-{}.log", role.name()));
            let proc = match role {
                Role::PublicProxy => self.public_ns.start(
                    role.name(),
                    &bin_path("proxy"),
                    ["run", "public"],
                    [("PROXY_SETTINGS", &self.public_settings[&role])],
                    log,
                ),
                _ => self.public_ns.start(
                    role.name(),
                    &bin_path("eps"),
                    ["server", "run"],
                    [("EPS_SETTINGS", &self.public_settings[&role])],
                    log,
                ),
            };
            self.public_procs.insert(role, proc);
            self.public_proc_mut(role)
                .wait_for_log(role.ready_line(), PROCESS_WAIT)
                .await;
        }
    }

    /// Starts private host `i`'s internal server, EPS server and private proxy, waiting until
    /// each listens, in [`Mode::Reverse`] until the EPS server's reverse stream is open, and
    /// until the proxy's announcements are accepted.
    pub async fn start_private(&mut self, i: usize) {
        let embedded = self.options.embedded;
        for role in [Role::InternalServer, Role::PrivateEps, Role::PrivateProxy] {
            if role == Role::PrivateEps && embedded {
                continue;
            }
            let host = &self.privates[i];
            let log = self.dir.join(format!("{}-{}.log", host.label, role.name()));
            let name = format!("{}-{}", host.label, role.name());
            let proc = match role {
                Role::InternalServer => host.ns.start(
                    &name,
                    &bin_path("internal-server"),
                    std::iter::empty::<&str>(),
                    internal_server_env(
                        &self.pki,
                        SocketAddr::from((Ipv4Addr::LOCALHOST, INTERNAL_PORT)),
                    ),
                    log,
                ),
                Role::PrivateProxy => host.ns.start(
                    &name,
                    &bin_path("proxy"),
                    ["run", "private"],
                    [("PROXY_SETTINGS", &host.settings[&role])],
                    log,
                ),
                _ => host.ns.start(
                    &name,
                    &bin_path("eps"),
                    ["server", "run"],
                    [("EPS_SETTINGS", &host.settings[&role])],
                    log,
                ),
            };
            let host = &mut self.privates[i];
            host.procs.insert(role, proc);
            host.proc_mut(role)
                .wait_for_log(role.ready_line(), PROCESS_WAIT)
                .await;
            // An embedded EPS server logs into its proxy's log.
            let eps_role = if embedded {
                Role::PrivateProxy
            } else {
                Role::PrivateEps
            };
            if role == eps_role && self.options.mode == Mode::Reverse {
                host.proc_mut(role)
                    .wait_for_log(REVERSE_STREAM_OPEN, PROCESS_WAIT)
                    .await;
            }
            if role == Role::PrivateProxy {
                host.proc_mut(role)
                    .wait_for_log(ANNOUNCED, PROCESS_WAIT)
                    .await;
            }
        }
    }

    /// Host A's processes, then every private host's, then waits until a request goes through
    /// the tunnel.
    pub async fn start_all(&mut self) {
        self.start_public().await;
        for i in 0..self.privates.len() {
            self.start_private(i).await;
        }
        if self.options.mode == Mode::Reverse {
            let want = self.privates.len();
            let eps = self.public_proc(if self.options.embedded {
                Role::PublicProxy
            } else {
                Role::PublicEps
            });
            assert!(
                eps_tests::wait_until(PROCESS_WAIT, || async {
                    eps.run_log().matches(REVERSE_STREAM_ACCEPTED).count() >= want
                })
                .await,
                "the public EPS server did not log {REVERSE_STREAM_ACCEPTED:?} {want} times"
            );
        }
        let client = self.client();
        assert!(
            eps_tests::wait_until(TUNNEL_WAIT, || works(&client)).await,
            "no request went through the tunnel within {TUNNEL_WAIT:?}"
        );
    }

    pub fn public_proc(&self, role: Role) -> &Proc {
        self.public_procs
            .get(&role)
            .unwrap_or_else(|| panic!("{} was not started", role.name()))
    }

    pub fn public_proc_mut(&mut self, role: Role) -> &mut Proc {
        self.public_procs
            .get_mut(&role)
            .unwrap_or_else(|| panic!("{} was not started", role.name()))
    }

    /// A browser on host A: requests to the public proxy with server name [`DOMAIN`], a new
    /// TCP+TLS connection each with a full handshake (no session resumption), like curl.
    pub fn client(&self) -> NsClient {
        let mut config = (*client_tls_without_cert(&self.pki.root())).clone();
        config.resumption = rustls::client::Resumption::disabled();
        NsClient::new(&self.public_ns, self.public_addr, DOMAIN, Arc::new(config))
    }
}

/// True when `GET /jsonrpc` through the tunnel gets 200 and the demo's answer within 3 s.
pub async fn works(client: &NsClient) -> bool {
    matches!(client.request("GET", "/jsonrpc", b"", Duration::from_secs(3)).await,
             Ok(r) if r.status == 200 && r.body == SUCCESS.as_bytes())
}
