//! eps as in the demo (`settings/dev/roles/*`, `settings/dev/directory/10-operators.json`), on
//! free ports in the work folder: public proxy, private proxy and their two EPS servers, in front
//! of the shared internal server. Limits are raised so that 5,000 idle relays fit. The private
//! EPS server opens no gRPC port and holds a reverse stream to the public one (the firewalled
//! form), unless `--eps-dialed`. `eps-embedded` is the same with each EPS server inside its
//! proxy's process (`eps: {embedded: DIR}`, the same EPS settings without `jsonrpc_client`).
//!
//! Also the settings and start of any EPS server, which the RPC benchmark reuses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use eps_core::tls::TlsSettings;
use serde_json::{json, Value};

use super::direct::RUST_LOG;
use super::{free_addr, Env, Kind, System};
use crate::client::{SNI, TERMINATED_SNI};
use crate::procs::Proc;

const PUBLIC: &str = "public-proxy-1";
const PRIVATE: &str = "private-proxy-1";
/// Relays each proxy may hold: above the 5,000 idle connections, below the descriptor limit.
const MAX_RELAYS: usize = 15_000;
/// Clients waiting for a dial-back at once (the benchmark has at most a few dozen in flight).
const MAX_PENDING: usize = 4_096;

/// Settings merged over the demo's, for a run that needs others (`--scenarios refusals`).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// A name for the run's folder (settings, data) next to the plain run's.
    pub name: &'static str,
    /// Merged over the public proxy's settings.
    pub public: Option<Value>,
    /// Merged over the private proxy's settings.
    pub private: Option<Value>,
}

pub fn start(env: &Env) -> anyhow::Result<System> {
    start_with(env, &Overrides::default())
}

/// eps with each EPS server inside its proxy's process.
pub fn start_embedded(env: &Env) -> anyhow::Result<System> {
    start_form(env, &Overrides::default(), true)
}

/// [`start`] with `o` merged over the public and private proxies' settings.
pub fn start_with(env: &Env, o: &Overrides) -> anyhow::Result<System> {
    start_form(env, o, false)
}

fn start_form(env: &Env, o: &Overrides, embedded: bool) -> anyhow::Result<System> {
    let kind = if embedded {
        Kind::EpsEmbedded
    } else {
        Kind::Eps
    };
    let root = env.work.join(format!("{kind}{}", o.name));
    let directory = root.join("directory");
    let (public, internal) = (free_addr()?, free_addr()?);
    let (public_rpc, private_rpc) = (free_addr()?, free_addr()?);
    let metrics = free_addr()?;
    let public_eps = EpsAddrs::new()?;
    let private_eps = EpsAddrs::new()?;

    let proxy_services = |group: &str, methods: &[&str]| {
        let methods: Vec<Value> = methods.iter().map(|m| json!({"name": m})).collect();
        json!([{"name": "proxy", "permissions": [{"group": group, "rights": ["call"]}],
                "methods": methods}])
    };
    let private_grpc = env.eps_dialed.then_some(private_eps.grpc);
    let mut records = operator_records(
        PUBLIC,
        Some(public_eps.grpc),
        "public-proxies",
        proxy_services(
            "private-proxies",
            &["announceConnections", "getAnnouncements"],
        ),
    );
    records.extend(operator_records(
        PRIVATE,
        private_grpc,
        "private-proxies",
        proxy_services(
            "public-proxies",
            &["incomingConnection", "getAnnouncements"],
        ),
    ));
    records.push(record(
        PRIVATE,
        "settings",
        json!([{"service": "proxy", "environment": "development",
                "settings": {"allowed_domains": [".internal-server.local"]}}]),
    ));
    write_directory(env, &directory, &records, &[PUBLIC, PRIVATE])?;

    let tls = |name: &str, verify: bool| tls_value(&env.tls(name, verify));
    let mut public_settings = json!({
        "name": PUBLIC,
        "eps": {"url": public_eps.url(), "tls": tls(PUBLIC, false)},
        "jsonrpc_server": {"bind_address": public_rpc.to_string(), "tls": tls(PUBLIC, true)},
        // Its histograms split connect1's handshake (the dial-back wait).
        "metrics": {"bind_address": metrics.to_string()},
        "datastore": {"type": "file",
                      "settings": {"path": root.join("data/public/announcements.json")}},
        "public": {
            "bind_address": public.to_string(),
            "internal_bind_address": internal.to_string(),
            "internal_endpoint": internal.to_string(),
            "limits": {"max_connections": MAX_RELAYS, "max_internal_connections": MAX_RELAYS,
                       "max_pending": MAX_PENDING},
        },
    });
    if let Some(extra) = &o.public {
        eps_core::settings::merge(&mut public_settings, extra.clone());
    }
    let mut private_settings = json!({
        "name": PRIVATE,
        "eps": {"url": private_eps.url(), "tls": tls(PRIVATE, false)},
        "jsonrpc_server": {"bind_address": private_rpc.to_string(), "tls": tls(PRIVATE, true)},
        "datastore": {"type": "file",
                      "settings": {"path": root.join("data/private/announcements.json")}},
        "private": {
            "public_proxy": PUBLIC,
            "internal_endpoint": env.server_addr.to_string(),
            "announcements": [
                {"domain": SNI},
                // TLS ends at the private proxy, then plain HTTP: the `*_terminated` rows.
                {"domain": TERMINATED_SNI, "internal_endpoint": env.plain_addr.to_string(),
                 "tls": {"mode": "terminate",
                         "certificate": env.certs.join("internal-server.crt"),
                         "key": env.certs.join("internal-server.key"),
                         "alpn": ["http/1.1"]}},
            ],
            "max_relays": MAX_RELAYS,
        },
    });
    if let Some(extra) = &o.private {
        eps_core::settings::merge(&mut private_settings, extra.clone());
    }
    let delivery = |addr: SocketAddr| format!("https://{addr}/jsonrpc");
    let public_eps_settings = public_eps.settings(
        env,
        PUBLIC,
        &directory,
        &delivery(public_rpc),
        Some(env.tls(PUBLIC, false)),
        true,
    );
    let private_eps_settings = private_eps.settings(
        env,
        PRIVATE,
        &directory,
        &delivery(private_rpc),
        Some(env.tls(PRIVATE, false)),
        env.eps_dialed,
    );

    if let Some(n) = env.eps_worker_threads {
        public_settings["worker_threads"] = json!(n);
        private_settings["worker_threads"] = json!(n);
    }
    let eps_forms = [
        (
            "public-proxy-eps",
            public_eps_settings,
            &mut public_settings,
        ),
        (
            "private-proxy-eps",
            private_eps_settings,
            &mut private_settings,
        ),
    ];
    let mut procs = Vec::new();
    for (name, mut settings, proxy_settings) in eps_forms {
        if !embedded {
            let dir = write_settings(&root.join(name), "eps.yml", &settings)?;
            procs.push(start_eps(env, name, &dir)?);
            continue;
        }
        // The same server inside the proxy: no delivery URL, and the proxy no JSON-RPC
        // listener; the `eps` section names the server's settings instead of its URL.
        if let Some(s) = settings.as_object_mut() {
            s.remove("jsonrpc_client");
            s.remove("worker_threads");
        }
        let dir = write_settings(&root.join(name), "eps.yml", &settings)?;
        proxy_settings["eps"] = json!({"embedded": dir});
        if let Some(s) = proxy_settings.as_object_mut() {
            s.remove("jsonrpc_server");
        }
    }
    let proxy = env.bin("proxy")?;
    for (name, role, settings) in [
        ("public-proxy", "public", &public_settings),
        ("private-proxy", "private", &private_settings),
    ] {
        let dir = write_settings(&root.join(name), "proxy.yml", settings)?;
        procs.push(Proc::start(
            name,
            &proxy,
            ["run", role],
            [
                ("PROXY_SETTINGS", dir.as_os_str()),
                ("RUST_LOG", RUST_LOG.as_ref()),
            ],
            &env.log(&format!("{kind}-{name}")),
        )?);
    }
    let mut system = System::new(kind, public, procs);
    system.metrics = Some(metrics);
    Ok(system)
}

/// The two listeners of an EPS server.
pub struct EpsAddrs {
    /// JSON-RPC for its local client.
    pub jsonrpc: SocketAddr,
    /// gRPC with mutual TLS for peers.
    pub grpc: SocketAddr,
}

impl EpsAddrs {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            jsonrpc: free_addr()?,
            grpc: free_addr()?,
        })
    }

    /// The URL local clients post to.
    pub fn url(&self) -> String {
        format!("https://{}/jsonrpc", self.jsonrpc)
    }

    /// Settings of operator `name` (its own certificate everywhere, clients verified on the
    /// JSON-RPC port), delivering incoming calls to `delivery_url`; with a gRPC port when
    /// `serve_grpc`, else reached over reverse streams; `--eps-worker-threads` applied.
    pub fn settings(
        &self,
        env: &Env,
        name: &str,
        directory: &Path,
        delivery_url: &str,
        delivery_tls: Option<TlsSettings>,
        serve_grpc: bool,
    ) -> Value {
        let mut client = json!({"url": delivery_url});
        if let Some(t) = &delivery_tls {
            client["tls"] = tls_value(t);
        }
        let own = tls_value(&env.tls(name, false));
        let mut v = json!({
            "name": name,
            "directory": {"type": "files", "settings": {"path": directory}},
            "jsonrpc_server": {"bind_address": self.jsonrpc.to_string(),
                               "tls": tls_value(&env.tls(name, true))},
            "jsonrpc_client": client,
            "grpc_client": {"tls": own.clone()},
        });
        if serve_grpc {
            v["grpc_server"] = json!({"bind_address": self.grpc.to_string(), "tls": own});
        }
        if let Some(n) = env.eps_worker_threads {
            v["worker_threads"] = json!(n);
        }
        v
    }
}

/// Starts `eps server run` with the settings in `dir`.
pub fn start_eps(env: &Env, name: &str, dir: &Path) -> anyhow::Result<Proc> {
    Proc::start(
        name,
        &env.bin("eps")?,
        ["server", "run"],
        [
            ("EPS_SETTINGS", dir.as_os_str()),
            ("RUST_LOG", RUST_LOG.as_ref()),
        ],
        &env.log(name),
    )
}

/// Writes `value` to `dir/file` (JSON, which YAML reads as is) and returns `dir`.
pub fn write_settings(dir: &Path, file: &str, value: &Value) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let path = dir.join(file);
    std::fs::write(&path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(dir.to_path_buf())
}

/// Writes `records` as `10-operators.json` and the pins of `pinned` in `dir`.
pub fn write_directory(
    env: &Env,
    dir: &Path,
    records: &[Value],
    pinned: &[&str],
) -> anyhow::Result<()> {
    write_settings(dir, "10-operators.json", &json!({ "records": records }))?;
    let pins: Vec<(String, String)> = env
        .fingerprints
        .iter()
        .filter(|(name, _)| pinned.contains(&name.as_str()))
        .cloned()
        .collect();
    eps_core::pki::write_certificate_records(dir, &pins)?;
    Ok(())
}

/// One directory record.
pub fn record(name: &str, section: &str, data: Value) -> Value {
    json!({"name": name, "section": section, "data": data, "created_at": "2026-01-01T00:00:00Z"})
}

/// The `channels`, `groups` and `services` records of an operator: reached at its `grpc`
/// address, or over reverse streams without one.
pub fn operator_records(
    name: &str,
    grpc: Option<SocketAddr>,
    group: &str,
    services: Value,
) -> Vec<Value> {
    let channel = match grpc {
        Some(a) => json!({"type": "grpc_server", "settings": {"address": a.to_string()}}),
        None => json!({"type": "reverse_stream"}),
    };
    vec![
        record(name, "channels", json!([channel])),
        record(name, "groups", json!([group])),
        record(name, "services", services),
    ]
}

fn tls_value(t: &TlsSettings) -> Value {
    serde_json::to_value(t).expect("TLS settings serialize")
}
