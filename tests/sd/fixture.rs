//! The fixture: a directory server (`eps sd run`), its administrator, and EPS servers that
//! follow it, each delivering to a recording service in the test process.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use eps_core::directory::Record;
use eps_core::http::{CallError, RpcClient};
use eps_core::sd::protocol::{self as p, Appended, GetRecords, Head, Records, Submit};
use eps_core::sd::{SignedRecord, SigningKey};
use eps_core::tls::TlsSettings;
use eps_tests::*;

/// The directory administrator: its signing certificate is the one the trust settings name.
pub const ADMIN: &str = "sd-admin";
/// What `eps sd run` logs once it listens.
pub const SD_READY: &str = "directory server ready";
/// What a follower logs when it applied new records.
pub const APPLIED: &str = "directory records verified and applied";
/// Time allowed for a process to start, stop or log something.
pub const PROCESS_WAIT: Duration = Duration::from_secs(10);
/// The local clients' deadline.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Every EPS server's `grpc_client.call_timeout`.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// One EPS server following the directory server, and the service it delivers to.
pub struct Node {
    pub proc: Proc,
    pub service: TestService,
    pub config: EpsConfig,
    pub settings: PathBuf,
}

impl Node {
    /// A keep-alive client of this server's JSON-RPC port, as its proxy would be.
    pub fn client(&self, pki: &Pki) -> RpcClient {
        rpc_client(
            &self.config.jsonrpc_url(),
            Some(&pki.tls(&self.config.name)),
            CLIENT_TIMEOUT,
        )
    }
}

/// A directory server and the EPS servers of one test. Fields drop in order: processes first
/// (printing their logs if the test failed), the folder last.
pub struct SdNet {
    pub nodes: BTreeMap<String, Node>,
    pub sd: Proc,
    pub sd_addr: SocketAddr,
    /// The administrator's `EPS_SETTINGS` folder (for `eps sd` commands).
    pub admin_settings: PathBuf,
    /// A client of the directory server (with the administrator's TLS certificate).
    pub client: RpcClient,
    pub admin: SigningKey,
    pub pki: Pki,
    pub dir: TestDir,
}

/// The operators the directory can hold: (name, groups, services).
fn plan(name: &str) -> (&'static [&'static str], Value) {
    let demo = |group: &str, methods: Value| {
        json!([{"name": "demo", "permissions": [{"group": group, "rights": ["call"]}],
                "methods": methods}])
    };
    match name {
        // alice offers demo.echo to partners.
        "alice" => (&["friends"], demo("partners", json!([{"name": "echo"}]))),
        // bob offers demo.echo to friends.
        "bob" => (&["partners"], demo("friends", json!([{"name": "echo"}]))),
        // carol offers demo.echo to partners too.
        "carol" => (&["friends"], demo("partners", json!([{"name": "echo"}]))),
        other => panic!("no plan for operator {other}"),
    }
}

impl SdNet {
    /// Issues certificates (TLS and signing) for alice, bob and carol, the directory server
    /// and its administrator, and starts the directory server with an empty chain.
    pub async fn new(test: &str) -> Self {
        let dir = TestDir::new(test);
        let pki = Pki::new(dir.join("pki"), &["alice", "bob", "carol"], None);
        let sd_tls = pki.issue_server("sd", &["sd"]);
        pki.issue_server(ADMIN, &[ADMIN]);
        let admin = pki.signing_key(ADMIN);
        let sd_addr = free_addr();
        let sd_settings = dir.mkdir("sd-settings");
        dir.write_yaml(
            "sd-settings/sd.yml",
            &json!({
                "jsonrpc_server": {
                    "bind_address": sd_addr.to_string(),
                    "tls": TlsSettings { verify_client: true, ..sd_tls },
                },
                "path": dir.join("sd/chain.jsonl"),
                "trust": {
                    "ca_certificate": pki.root(),
                    "administrators": [admin.certificate().fingerprint],
                },
            }),
        );
        let mut sd = Proc::start(
            "sd",
            &bin_path("eps"),
            ["sd", "run"],
            [("SD_SETTINGS", &sd_settings)],
            dir.join("sd.log"),
        );
        sd.wait_for_log(SD_READY, PROCESS_WAIT).await;
        let url = format!("https://{sd_addr}/jsonrpc");
        let client = rpc_client(&url, Some(&pki.tls(ADMIN)), CLIENT_TIMEOUT);
        let mut net = Self {
            nodes: BTreeMap::new(),
            sd,
            sd_addr,
            admin_settings: PathBuf::new(),
            client,
            admin,
            pki,
            dir,
        };
        let follow = net.follow_settings(ADMIN);
        net.admin_settings = net.dir.mkdir("admin-settings");
        net.dir.write_yaml(
            "admin-settings/eps.yml",
            &json!({"directory": {"type": "sd", "settings": follow}}),
        );
        net
    }

    /// The directory server's URL.
    pub fn url(&self) -> String {
        format!("https://{}/jsonrpc", self.sd_addr)
    }

    /// `directory.settings` (type sd) of `name`: this directory server, its own copy of the
    /// chain, and its own signing key.
    pub fn follow_settings(&self, name: &str) -> Value {
        let (cert, key) = self.pki.issue_signing(name);
        json!({
            "url": self.url(),
            "tls": self.pki.tls(name),
            "path": self.dir.join(format!("{name}-copy/directory.jsonl")),
            "trust": {
                "ca_certificate": self.pki.root(),
                "administrators": [self.admin.certificate().fingerprint],
            },
            "signing": {"certificate": cert, "key": key},
            "max_reconnect_backoff": 0.5,
        })
    }

    /// An `EPS_SETTINGS` folder holding only `name`'s `directory` section (with its signing
    /// key), for `eps sd` commands run as that operator.
    pub fn operator_settings(&self, name: &str) -> PathBuf {
        let dir = self.dir.mkdir(format!("{name}-sd-command"));
        self.dir.write_yaml(
            format!("{name}-sd-command/eps.yml"),
            &json!({"directory": {"type": "sd", "settings": self.follow_settings(name)}}),
        );
        dir
    }

    /// The records that add operator `name` with the EPS server planned for it: channels,
    /// groups, services, and its TLS and signing pins.
    pub fn operator_records(&self, config: &EpsConfig) -> Vec<Record> {
        let name = config.name.as_str();
        let (groups, services) = plan(name);
        let mut records = unsigned(config.records(groups, services));
        records.push(self.pins(name, &[self.pki.fingerprint(name)]));
        records
    }

    /// `name`'s `certificates` record: these TLS fingerprints and its signing certificate.
    pub fn pins(&self, name: &str, tls: &[&str]) -> Record {
        let signing = self.pki.signing_key(name).certificate().fingerprint.clone();
        let mut data: Vec<Value> = tls
            .iter()
            .map(|fp| json!({"fingerprint": fp, "key_usage": "encryption"}))
            .collect();
        data.push(json!({"fingerprint": signing, "key_usage": "signing"}));
        record_of(name, "certificates", json!(data))
    }

    /// The settings of an EPS server for `name` following the directory server (not started).
    pub fn plan_eps(&self, name: &str) -> EpsConfig {
        let mut config = EpsConfig::new(name, &self.pki, &self.dir.join("unused"), "");
        config.call_timeout = Some(CALL_TIMEOUT);
        config.extra = json!({"directory": {"type": "sd", "settings": self.follow_settings(name)}});
        config
    }

    /// Starts `config`'s EPS server with its service and waits until it is ready.
    pub async fn start_eps(&mut self, config: EpsConfig) {
        let name = config.name.clone();
        let service = TestService::start(&name, Some(&self.pki.tls_verifying(&name))).await;
        let mut config = config;
        config.delivery_url = service.url();
        let settings = config.write(&self.dir.join(format!("{name}-settings")));
        let mut proc = start_eps(&name, &[&settings], self.dir.join(format!("{name}.log")));
        proc.wait_for_log(EPS_READY, PROCESS_WAIT).await;
        let node = Node {
            proc,
            service,
            config,
            settings,
        };
        self.nodes.insert(name, node);
    }

    /// The administrator submits alice's and bob's records, then alice, bob and carol start
    /// (carol is in no record yet).
    pub async fn start_three(&mut self) {
        let (alice, bob, carol) = (
            self.plan_eps("alice"),
            self.plan_eps("bob"),
            self.plan_eps("carol"),
        );
        let mut records = self.operator_records(&alice);
        records.extend(self.operator_records(&bob));
        self.submit(&self.admin, records)
            .await
            .expect("the administrator's first records");
        for config in [alice, bob, carol] {
            self.start_eps(config).await;
        }
    }

    pub fn node(&self, name: &str) -> &Node {
        &self.nodes[name]
    }

    pub fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes.get_mut(name).expect("a started server")
    }

    /// A client of `name`'s EPS server.
    pub fn client_of(&self, name: &str) -> RpcClient {
        self.node(name).client(&self.pki)
    }

    /// The chain's head and length at the directory server.
    pub async fn head(&self) -> Head {
        self.client
            .call(p::GET_HEAD, &json!({}))
            .await
            .expect("getHead")
    }

    /// Every record of the directory server's chain.
    pub async fn records(&self) -> Vec<SignedRecord> {
        let r: Records = self
            .client
            .call(p::GET_RECORDS, &GetRecords::default())
            .await
            .expect("getRecords");
        r.records
    }

    /// Signs `records` with `key` after the current head and submits them.
    pub async fn submit(
        &self,
        key: &SigningKey,
        records: Vec<Record>,
    ) -> Result<Appended, CallError> {
        let head = self.head().await.head;
        let signed = key.sign(&records, head.as_deref()).expect("signing");
        self.submit_signed(signed).await
    }

    /// Submits signed records as they are.
    pub async fn submit_signed(&self, records: Vec<SignedRecord>) -> Result<Appended, CallError> {
        self.client
            .call(p::SUBMIT_RECORDS, &Submit { records })
            .await
    }
}

/// A record to be signed now.
pub fn record_of(name: &str, section: &str, data: Value) -> Record {
    Record {
        name: name.into(),
        section: section.into(),
        data,
        created_at: None,
    }
}

/// Records written for files (`record`, `EpsConfig::records`) as records to sign now.
pub fn unsigned(values: Vec<Value>) -> Vec<Record> {
    values
        .into_iter()
        .map(|v| Record {
            created_at: None,
            ..serde_json::from_value(v).expect("a record")
        })
        .collect()
}

/// `eps ARGS` with `EPS_SETTINGS=settings`; its output.
pub async fn eps(settings: &Path, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(bin_path("eps"));
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .env("EPS_SETTINGS", settings);
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("eps {args:?} did not finish in 30 s"))
        .unwrap_or_else(|e| panic!("running eps {args:?}: {e}"))
}

/// The output's stdout and stderr, for messages.
pub fn said(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits until `caller` can call `target.echo` (the call succeeds) within `timeout`.
pub async fn until_calls(client: &RpcClient, target: &str, timeout: Duration) -> bool {
    let method = format!("{target}.echo");
    wait_until(timeout, || async {
        call(client, &method, json!({"probe": true})).await.is_ok()
    })
    .await
}

/// Whether the gRPC server at `addr` accepts a client showing `tls`'s certificate: a TLS
/// handshake as `server_name`, the HTTP/2 preface, and an answer (a refused certificate gets an
/// alert instead).
pub async fn accepted(addr: SocketAddr, tls: &TlsSettings, server_name: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = eps_core::tls::client_config(tls, &[b"h2"]).expect("client TLS");
    let work = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .map_err(std::io::Error::other)?;
        let mut io = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await?;
        io.flush().await?;
        let mut buf = [0u8; 256];
        let n = io.read(&mut buf).await?;
        Ok::<_, std::io::Error>(n > 0)
    };
    matches!(tokio::time::timeout(PROCESS_WAIT, work).await, Ok(Ok(true)))
}
