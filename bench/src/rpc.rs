//! The RPC benchmark's setup: a small JSON-RPC service in this process (`eps_core::http::serve`,
//! HTTPS requiring a client certificate), and two EPS servers `rpc-a` and `rpc-b` in front of it.
//! A call `rpc-b.echo` posted to `rpc-a` travels client → EPS A (JSON-RPC) → gRPC (mutual TLS)
//! → EPS B → the service; the `direct` call `echo` goes straight to the service with the same
//! client type and certificate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use eps_core::http::{Handler, Peer, RpcClient, ServerLimits};
use eps_core::jsonrpc::{self, Outcome, Request};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::procs::Proc;
use crate::systems::eps::{operator_records, start_eps, write_directory, write_settings, EpsAddrs};
use crate::systems::Env;

/// Deadline of one call (client side).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the EPS pair gets to relay its first call.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The method as the service names it, and as a caller of EPS A names it.
pub const METHOD: &str = "echo";
pub const REMOTE_METHOD: &str = "rpc-b.echo";

/// Answers every call with `{"ok": true}`.
struct Echo;

impl Handler for Echo {
    async fn call(&self, _req: Request, _peer: Peer) -> Outcome {
        Ok(jsonrpc::to_raw(&json!({"ok": true})))
    }
}

/// The service, and with `eps` the two EPS servers in front of it. Stops everything on drop.
pub struct RpcBench {
    /// A keep-alive client of EPS A, as a proxy holds one towards its EPS server.
    pub through: Option<RpcClient>,
    /// The same client type, straight to the service.
    pub direct: RpcClient,
    procs: Vec<Proc>,
    shutdown: CancellationToken,
}

impl RpcBench {
    pub async fn start(env: &Env, eps: bool) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("https://{}/jsonrpc", listener.local_addr()?);
        let tls = eps_core::tls::server_config(&env.tls("rpc-b", true), &[b"h2", b"http/1.1"])?;
        let shutdown = CancellationToken::new();
        tokio::spawn(eps_core::http::serve(
            listener,
            Some(tls),
            ServerLimits::default(),
            Arc::new(Echo),
            shutdown.clone(),
        ));
        let direct = RpcClient::new(&url, Some(&env.tls("rpc-a", false)), CALL_TIMEOUT)?;
        let mut bench = Self {
            through: None,
            direct,
            procs: Vec::new(),
            shutdown,
        };
        if eps {
            bench.start_eps(env, &url).await?;
        }
        Ok(bench)
    }

    async fn start_eps(&mut self, env: &Env, service_url: &str) -> anyhow::Result<()> {
        let root = env.work.join("rpc");
        let directory = root.join("directory");
        let (a, b) = (EpsAddrs::new()?, EpsAddrs::new()?);
        let services = json!([{"name": "bench",
                               "permissions": [{"group": "callers", "rights": ["call"]}],
                               "methods": [{"name": METHOD}]}]);
        // rpc-b, the callee, is reached over the reverse stream it holds to rpc-a (the
        // firewalled form), or dialed at its gRPC port with --eps-dialed.
        let mut records = operator_records("rpc-a", Some(a.grpc), "callers", json!([]));
        let b_grpc = env.eps_dialed.then_some(b.grpc);
        records.extend(operator_records("rpc-b", b_grpc, "services", services));
        write_directory(env, &directory, &records, &["rpc-a", "rpc-b"])?;
        for (name, addrs, serve_grpc) in [("rpc-a", &a, true), ("rpc-b", &b, env.eps_dialed)] {
            let settings = addrs.settings(
                env,
                name,
                &directory,
                service_url,
                Some(env.tls(name, false)),
                serve_grpc,
            );
            let dir = write_settings(&root.join(name), "eps.yml", &settings)?;
            self.procs
                .push(start_eps(env, &format!("eps-{name}"), &dir)?);
        }
        let through = RpcClient::new(&a.url(), Some(&env.tls("rpc-a", false)), CALL_TIMEOUT)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut pause = Duration::from_millis(5);
        loop {
            for p in &mut self.procs {
                p.check_running()?;
            }
            let last = match call(&through, REMOTE_METHOD).await {
                Ok(()) => break,
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                bail!("no call through rpc-a and rpc-b within {READY_TIMEOUT:?}: {last:#}");
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
        self.through = Some(through);
        Ok(())
    }
}

impl Drop for RpcBench {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// One call with small params; checks the answer.
pub async fn call(client: &RpcClient, method: &str) -> anyhow::Result<()> {
    let params = jsonrpc::to_raw(&json!({"payload": "ping"}));
    let raw = client.call_raw(method, &params).await?;
    let v: Value = serde_json::from_str(raw.get()).context("result is not JSON")?;
    anyhow::ensure!(v["ok"] == json!(true), "unexpected result {v}");
    Ok(())
}
