//! EPS servers for tests: their settings file, the directory records that describe them, and
//! starting `eps server run`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use eps_core::tls::TlsSettings;
use serde_json::{json, Value};

use crate::pki::Pki;
use crate::process::{bin_path, Proc};
use crate::wait::free_addr;

/// What `eps server run` logs once both listeners are bound.
pub const EPS_READY: &str = "EPS server ready";

/// The settings of one EPS server (`EPS_SETTINGS`), written as `eps.yml`.
///
/// [`EpsConfig::new`] picks free ports and uses the operator's certificate everywhere, with
/// `verify_client: true` on the JSON-RPC server; tests change fields before writing.
#[derive(Debug, Clone)]
pub struct EpsConfig {
    pub name: String,
    /// Folder of directory JSON files.
    pub directory: PathBuf,
    pub jsonrpc_addr: SocketAddr,
    /// HTTPS for the local client when set; plain HTTP otherwise.
    pub jsonrpc_tls: Option<TlsSettings>,
    pub grpc_addr: SocketAddr,
    pub grpc_tls: TlsSettings,
    /// Whether the settings have a `grpc_server` section (true by default). Without one (an
    /// operator behind a firewall, reached over reverse streams) `grpc_client.tls` is written
    /// with [`peer_tls`](Self::peer_tls), or `grpc_tls` when that is `None`.
    pub serve_grpc: bool,
    /// Certificate presented to peers (`grpc_client.tls`); the gRPC server's when `None`.
    pub peer_tls: Option<TlsSettings>,
    /// Where incoming calls are delivered (`jsonrpc_client.url`).
    pub delivery_url: String,
    pub delivery_tls: Option<TlsSettings>,
    pub call_timeout: Option<Duration>,
    pub connect_timeout: Option<Duration>,
    pub max_reconnect_backoff: Option<Duration>,
    /// Deep-merged over the generated settings, e.g. `{"jsonrpc_server": {"limits": {...}}}`.
    pub extra: Value,
}

impl EpsConfig {
    /// Settings for operator `name` with certificates from `pki`, reading `directory`, delivering
    /// to `delivery_url` (HTTPS with the operator's certificate).
    pub fn new(name: &str, pki: &Pki, directory: &Path, delivery_url: &str) -> Self {
        Self {
            name: name.to_string(),
            directory: directory.to_path_buf(),
            jsonrpc_addr: free_addr(),
            jsonrpc_tls: Some(pki.tls_verifying(name)),
            grpc_addr: free_addr(),
            grpc_tls: pki.tls(name),
            serve_grpc: true,
            peer_tls: None,
            delivery_url: delivery_url.to_string(),
            delivery_tls: Some(pki.tls(name)),
            call_timeout: None,
            connect_timeout: None,
            max_reconnect_backoff: None,
            extra: Value::Null,
        }
    }

    /// The URL local clients post to.
    pub fn jsonrpc_url(&self) -> String {
        let scheme = if self.jsonrpc_tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}/", self.jsonrpc_addr)
    }

    /// The settings as the YAML tree `eps` reads.
    pub fn to_value(&self) -> Value {
        let tls = |t: &TlsSettings| serde_json::to_value(t).expect("TLS settings serialize");
        let mut jsonrpc_server = json!({"bind_address": self.jsonrpc_addr.to_string()});
        if let Some(t) = &self.jsonrpc_tls {
            jsonrpc_server["tls"] = tls(t);
        }
        let mut jsonrpc_client = json!({"url": self.delivery_url});
        if let Some(t) = &self.delivery_tls {
            jsonrpc_client["tls"] = tls(t);
        }
        let mut grpc_client = json!({});
        match (&self.peer_tls, self.serve_grpc) {
            (Some(t), _) => grpc_client["tls"] = tls(t),
            (None, false) => grpc_client["tls"] = tls(&self.grpc_tls),
            (None, true) => {}
        }
        for (key, d) in [
            ("call_timeout", self.call_timeout),
            ("connect_timeout", self.connect_timeout),
            ("max_reconnect_backoff", self.max_reconnect_backoff),
        ] {
            if let Some(d) = d {
                grpc_client[key] = json!(d.as_secs_f64());
            }
        }
        let mut v = json!({
            "name": self.name,
            "directory": {"type": "files", "settings": {"path": self.directory}},
            "jsonrpc_server": jsonrpc_server,
            "jsonrpc_client": jsonrpc_client,
            "grpc_client": grpc_client,
        });
        if self.serve_grpc {
            v["grpc_server"] =
                json!({"bind_address": self.grpc_addr.to_string(), "tls": tls(&self.grpc_tls)});
        }
        if !self.extra.is_null() {
            eps_core::settings::merge(&mut v, self.extra.clone());
        }
        v
    }

    /// Writes `eps.yml` into `dir` (created if needed) and returns `dir`, the value for
    /// `EPS_SETTINGS`.
    pub fn write(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let text = serde_yaml_ng::to_string(&self.to_value()).expect("YAML");
        let file = dir.join("eps.yml");
        std::fs::write(&file, text).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
        dir.to_path_buf()
    }

    /// This server's directory records: its channel (`grpc_server`, or `reverse_stream`
    /// without one), `groups` and `services`.
    pub fn records(&self, groups: &[&str], services: Value) -> Vec<Value> {
        let grpc = self.serve_grpc.then_some(self.grpc_addr);
        let mut records = operator_records(&self.name, grpc, groups, services);
        if !self.serve_grpc {
            records.push(record(
                &self.name,
                "channels",
                json!([{"type": "reverse_stream"}]),
            ));
        }
        records
    }
}

/// Starts `eps server run` with `EPS_SETTINGS` naming `settings_dirs`, logging to `log`. Does not
/// wait: call `wait_for_log(EPS_READY, ..)` (or expect an exit, for bad settings).
pub fn start_eps(name: &str, settings_dirs: &[&Path], log: impl Into<PathBuf>) -> Proc {
    let dirs = std::env::join_paths(settings_dirs).expect("settings folders contain no ':'");
    Proc::start(
        name,
        &bin_path("eps"),
        ["server", "run"],
        [("EPS_SETTINGS", dirs)],
        log,
    )
}

/// One directory record.
pub fn record(name: &str, section: &str, data: Value) -> Value {
    json!({"name": name, "section": section, "data": data, "created_at": "2026-01-01T00:00:00Z"})
}

/// The `channels` (when `grpc` is given), `groups` and `services` records of an operator.
pub fn operator_records(
    name: &str,
    grpc: Option<SocketAddr>,
    groups: &[&str],
    services: Value,
) -> Vec<Value> {
    let mut records = Vec::new();
    if let Some(addr) = grpc {
        records.push(record(
            name,
            "channels",
            json!([{"type": "grpc_server", "settings": {"address": addr.to_string()}}]),
        ));
    }
    records.push(record(name, "groups", json!(groups)));
    records.push(record(name, "services", services));
    records
}

/// Writes `{"records": [...]}` to `dir/file`.
pub fn write_records(dir: &Path, file: &str, records: &[Value]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    let path = dir.join(file);
    let text = serde_json::to_string_pretty(&json!({ "records": records })).expect("JSON");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}
