//! The fixture: one test's PKIs, directory and EPS servers.

use std::collections::BTreeMap;
use std::time::Duration;

use eps_core::http::{CallError, RpcClient};
use eps_core::jsonrpc::RpcError;
use eps_core::tls::TlsSettings;
use eps_tests::*;

/// Every EPS server's `grpc_client.call_timeout` in these tests.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// What a failing call may take beyond its deadline (scheduling on a loaded 2-core machine).
pub const MARGIN: Duration = Duration::from_millis(1500);
/// Time allowed for a process to start, stop or log something.
pub const PROCESS_WAIT: Duration = Duration::from_secs(10);
/// The local client's own deadline, above every server-side one.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// One EPS server and the service it delivers to.
pub struct Node {
    pub proc: Proc,
    pub service: TestService,
    pub config: EpsConfig,
    /// What this server's local client presents on the JSON-RPC port.
    pub client_tls: TlsSettings,
}

impl Node {
    /// A keep-alive client of this server's JSON-RPC port, as its proxy would be.
    pub fn client(&self) -> RpcClient {
        rpc_client(
            &self.config.jsonrpc_url(),
            Some(&self.client_tls),
            CLIENT_TIMEOUT,
        )
    }
}

/// A planned EPS server: its settings and the TLS of its service and local client.
pub struct Plan {
    pub config: EpsConfig,
    /// The service's own TLS (it requires the EPS server's client certificate).
    pub service_tls: TlsSettings,
    pub client_tls: TlsSettings,
}

/// The network of one test: PKIs, directory and the servers started so far. Fields drop in
/// order: processes first (printing their logs if the test failed), the folder last.
pub struct Net {
    pub nodes: BTreeMap<String, Node>,
    pub plans: BTreeMap<String, Plan>,
    pub pki: Pki,
    pub foreign: Pki,
    pub dir: TestDir,
}

impl Net {
    /// Issues certificates, plans all five servers on free ports and writes the directory.
    pub fn new(test: &str) -> Self {
        let dir = TestDir::new(test);
        let directory = dir.mkdir("directory");
        let pki = Pki::new(dir.join("pki"), &["alice", "bob", "dave", "mallory"], None);
        let foreign = Pki::new(dir.join("foreign-pki"), &["carol"], None);
        let mut plans = BTreeMap::new();
        for name in ["alice", "bob", "dave", "mallory"] {
            let mut config = EpsConfig::new(name, &pki, &directory, "");
            config.call_timeout = Some(CALL_TIMEOUT);
            plans.insert(
                name.to_string(),
                Plan {
                    config,
                    service_tls: pki.tls_verifying(name),
                    client_tls: pki.tls(name),
                },
            );
        }
        // carol's own side is all foreign; towards peers she trusts the network's root (so she
        // can verify bob) but can only show her foreign certificate.
        let mut carol = EpsConfig::new("carol", &foreign, &directory, "");
        carol.call_timeout = Some(CALL_TIMEOUT);
        carol.grpc_tls.ca_certificate = pki.root();
        plans.insert(
            "carol".into(),
            Plan {
                config: carol,
                service_tls: foreign.tls_verifying("carol"),
                client_tls: foreign.tls("carol"),
            },
        );

        let demo = |group: &str, methods: Value| {
            json!([{"name": "demo", "permissions": [{"group": group, "rights": ["call"]}],
                    "methods": methods}])
        };
        let mut records = Vec::new();
        records.extend(
            plans["alice"]
                .config
                .records(&["friends"], demo("partners", json!([{"name": "echo"}]))),
        );
        records.extend(plans["bob"].config.records(
            &["partners"],
            demo(
                "friends",
                json!([{"name": "echo"}, {"name": "slow"}, {"name": "secret", "permissions": []}]),
            ),
        ));
        records.extend(plans["carol"].config.records(&["friends"], json!([])));
        records.extend(plans["dave"].config.records(&["friends"], json!([])));
        write_records(&directory, "10-operators.json", &records);
        // Pins: alice and bob their own certificates, dave someone else's.
        eps_core::pki::write_certificate_records(
            &directory,
            &[
                ("alice".into(), pki.fingerprint("alice").into()),
                ("bob".into(), pki.fingerprint("bob").into()),
                ("dave".into(), foreign.fingerprint("carol").into()),
            ],
        )
        .expect("writing pins");
        Self {
            nodes: BTreeMap::new(),
            plans,
            pki,
            foreign,
            dir,
        }
    }

    /// Starts each named server with its service and waits until it is ready.
    pub async fn start(&mut self, names: &[&str]) {
        for name in names {
            let plan = self.plans.remove(*name).expect("a planned server");
            let service = TestService::start(name, Some(&plan.service_tls)).await;
            let mut config = plan.config;
            config.delivery_url = service.url();
            let settings = config.write(&self.dir.join(format!("{name}-settings")));
            let log = self.dir.join(format!("{name}.log"));
            let mut proc = start_eps(name, &[&settings], log);
            proc.wait_for_log(EPS_READY, PROCESS_WAIT).await;
            let node = Node {
                proc,
                service,
                config,
                client_tls: plan.client_tls,
            };
            self.nodes.insert(name.to_string(), node);
        }
    }

    pub fn node(&self, name: &str) -> &Node {
        &self.nodes[name]
    }

    pub fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes.get_mut(name).expect("a started server")
    }

    /// Pins another certificate for `name` in a later file (`95-NAME-new-pin.json`): the
    /// directory stops accepting the one it has.
    pub fn unpin(&self, name: &str) {
        write_records(
            &self.dir.join("directory"),
            &format!("95-{name}-new-pin.json"),
            &[record(
                name,
                "certificates",
                serde_json::json!([{"fingerprint": "00".repeat(32), "key_usage": "encryption"}]),
            )],
        );
    }
}

/// The JSON-RPC error of a failed call (panics on success or a transport failure).
pub fn rpc_error(r: Result<Value, CallError>, what: &str) -> RpcError {
    match r {
        Err(CallError::Rpc(e)) => e,
        other => panic!("{what}: expected a JSON-RPC error, got {other:?}"),
    }
}
