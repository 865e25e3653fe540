//! `proxy run public`: the SNI router (DESIGN §3.2).
//!
//! Per client: read the ClientHello under a byte and time bound, look the SNI up in the
//! in-memory announcements, draw a token, ask the announcing operator through the EPS server to
//! dial back, and relay once a data connection presents the token. No disk, no directory read
//! and no DNS on that path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::Engine as _;
use eps_core::http::{Handler, Peer, RpcClient};
use eps_core::jsonrpc::{self, Outcome, Request, RpcError};
use serde::Deserialize;
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::announcements::{Announcement, Table};
use crate::clienthello::{self, Parse};
use crate::listener::accept_loop;
use crate::relay;
use crate::settings::{PublicLimits, PublicSettings};
use crate::store::FileStore;
use crate::ClientParams;

/// Token length in bytes, drawn from the OS CSPRNG.
pub const TOKEN_LEN: usize = 32;
type Token = [u8; TOKEN_LEN];
/// How often expired announcements are removed from memory and store.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// A client waiting for its dial-back.
struct Pending {
    tx: oneshot::Sender<TcpStream>,
}

pub struct Public {
    limits: PublicLimits,
    endpoint: String,
    table: RwLock<Table>,
    store: FileStore,
    /// Serializes changes so that the store always holds the latest table.
    store_lock: tokio::sync::Mutex<()>,
    pending: Mutex<HashMap<Token, Pending>>,
    eps: RpcClient,
}

/// Removes a client's pending entry when its task ends, however it ends.
struct PendingGuard<'a> {
    public: &'a Public,
    token: Token,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.public
            .pending
            .lock()
            .expect("pending lock")
            .remove(&self.token);
    }
}

impl Public {
    pub fn new(s: &PublicSettings, store: FileStore, eps: RpcClient) -> Result<Self, String> {
        let mut list: Vec<Announcement> = store.load().map_err(|e| e.to_string())?;
        let now = OffsetDateTime::now_utc();
        list.retain(|a| a.expires_at > now);
        tracing::info!(
            announcements = list.len(),
            "loaded announcements from the store"
        );
        Ok(Self {
            limits: s.limits.clone(),
            endpoint: s.internal_endpoint.clone(),
            table: RwLock::new(Table::from_list(list)),
            store,
            store_lock: tokio::sync::Mutex::new(()),
            pending: Mutex::new(HashMap::new()),
            eps,
        })
    }

    /// Runs the public and internal listeners and the pruning task until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        public: TcpListener,
        internal: TcpListener,
        shutdown: CancellationToken,
    ) {
        let clients = Arc::new(Semaphore::new(self.limits.max_connections));
        let data = Arc::new(Semaphore::new(self.limits.max_internal_connections));
        let me = self.clone();
        let a = accept_loop(public, clients, shutdown.clone(), move |s, addr| {
            let me = me.clone();
            async move { me.handle_client(s, addr).await }
        });
        let me = self.clone();
        let b = accept_loop(internal, data, shutdown.clone(), move |s, addr| {
            let me = me.clone();
            async move { me.handle_data(s, addr).await }
        });
        let me = self.clone();
        let c = async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(PRUNE_INTERVAL) => me.prune().await,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        tokio::join!(a, b, c);
    }

    async fn handle_client(self: Arc<Self>, mut client: TcpStream, addr: SocketAddr) {
        let (buf, sni) = match self.read_client_hello(&mut client).await {
            Ok(r) => r,
            Err(reason) => {
                tracing::debug!(%addr, %reason, "client closed before routing");
                return;
            }
        };
        let now = OffsetDateTime::now_utc();
        let operator = match self.table.read().expect("table lock").lookup(&sni, now) {
            Some(a) => a.operator.clone(),
            None => {
                tracing::debug!(%addr, %sni, "no live announcement for this name");
                return;
            }
        };
        let mut token: Token = [0; TOKEN_LEN];
        if let Err(e) = getrandom::fill(&mut token) {
            tracing::error!(error = %e, "OS random generator failed");
            return;
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().expect("pending lock");
            if pending.len() >= self.limits.max_pending {
                tracing::warn!(%addr, %sni, max_pending = self.limits.max_pending, "pending set full; client refused");
                return;
            }
            pending.insert(token, Pending { tx });
        }
        let _guard = PendingGuard {
            public: &self,
            token,
        };
        let params = json!({
            "domain": sni,
            "token": base64::engine::general_purpose::STANDARD.encode(token),
            "endpoint": self.endpoint,
        });
        let method = format!("{operator}.incomingConnection");
        // The request runs on its own task: the dial-back usually arrives before the answer,
        // and dropping an in-flight request would cost the kept-alive connection to the EPS server.
        let me = self.clone();
        let domain = sni.clone();
        tokio::spawn(async move {
            if let Err(e) = me.eps.call::<_, Value>(&method, &params).await {
                tracing::info!(%addr, %domain, error = %e, "dial-back request failed; client closed");
                me.pending.lock().expect("pending lock").remove(&token);
            }
        });
        let data = match tokio::time::timeout(self.limits.accept_timeout, rx).await {
            Ok(Ok(data)) => data,
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::info!(%addr, %sni, %operator, "no dial-back within accept_timeout; client closed");
                return;
            }
        };
        let mut data = data;
        if let Err(e) = data.write_all(&buf).await {
            tracing::debug!(%addr, error = %e, "data connection failed before relaying");
            return;
        }
        drop(buf);
        let t = relay::relay(client, data, self.limits.idle_timeout).await;
        tracing::debug!(%addr, %sni, up = t.a_to_b, down = t.b_to_a, ended = ?t.ended, "relay ended");
    }

    /// Reads until the ClientHello is complete; returns every byte read and the SNI.
    async fn read_client_hello(&self, client: &mut TcpStream) -> Result<(Vec<u8>, String), String> {
        let max = self.limits.max_client_hello_bytes;
        let deadline = Instant::now() + self.limits.client_hello_timeout;
        let mut buf = Vec::with_capacity(2048);
        let mut chunk = [0u8; 4096];
        loop {
            let room = (max + 1 - buf.len()).min(chunk.len());
            let n = match tokio::time::timeout_at(deadline, client.read(&mut chunk[..room])).await {
                Err(_) => return Err("ClientHello not complete within client_hello_timeout".into()),
                Ok(Err(e)) => return Err(format!("read failed: {e}")),
                Ok(Ok(0)) => return Err("end of stream inside the ClientHello (truncated)".into()),
                Ok(Ok(n)) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            match clienthello::parse_client_hello(&buf, max) {
                Ok(Parse::Complete { sni, .. }) => return Ok((buf, sni)),
                Ok(Parse::Incomplete) if buf.len() > max => {
                    return Err(format!("ClientHello over {max} bytes"))
                }
                Ok(Parse::Incomplete) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    async fn handle_data(&self, mut data: TcpStream, addr: SocketAddr) {
        let mut token: Token = [0; TOKEN_LEN];
        match tokio::time::timeout(self.limits.token_timeout, data.read_exact(&mut token)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(%addr, error = %e, "data connection closed before its token");
                return;
            }
            Err(_) => {
                tracing::debug!(%addr, "no token within token_timeout");
                return;
            }
        }
        let entry = self.pending.lock().expect("pending lock").remove(&token);
        match entry {
            Some(p) => {
                let _ = p.tx.send(data);
            }
            None => tracing::info!(%addr, "unknown, used or expired token; data connection closed"),
        }
    }

    async fn prune(&self) {
        let _w = self.store_lock.lock().await;
        let (removed, all) = {
            let mut t = self.table.write().expect("table lock");
            (t.prune(OffsetDateTime::now_utc()), t.all())
        };
        if removed > 0 {
            tracing::info!(removed, "expired announcements removed");
            if let Err(e) = self.store.save(&all).await {
                tracing::error!("{e}");
            }
        }
    }

    async fn announce(&self, params: AnnounceParams) -> Outcome {
        let Some(client) = params.client else {
            return Err(RpcError::invalid_params(
                "no _client: announcements must come through the EPS server",
            ));
        };
        let allowed: Vec<String> = client
            .entry
            .service_settings("proxy")
            .and_then(|s| s.get("allowed_domains"))
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        let _w = self.store_lock.lock().await;
        let now = OffsetDateTime::now_utc();
        let (before, results, all) = {
            let mut t = self.table.write().expect("table lock");
            let before = t.clone();
            let results: Vec<Value> = params
                .connections
                .iter()
                .map(|c| {
                    match t.announce(&client.name, &allowed, &c.domain, c.expires_at, now) {
                        Ok(a) => json!({"domain": a.domain, "accepted": true, "expires_at": rfc3339(a.expires_at)}),
                        Err(r) => json!({"domain": c.domain, "accepted": false, "error": r}),
                    }
                })
                .collect();
            (before, results, t.all())
        };
        if let Err(e) = self.store.save(&all).await {
            // Not durable, so not accepted: undo.
            *self.table.write().expect("table lock") = before;
            tracing::error!("{e}");
            return Err(RpcError::internal(format!("announcements not stored: {e}")));
        }
        for r in &results {
            tracing::info!(operator = %client.name, domain = %r["domain"], accepted = %r["accepted"], "announcement");
        }
        Ok(jsonrpc::to_raw(&json!({ "connections": results })))
    }

    fn get_announcements(&self) -> Outcome {
        let live = self
            .table
            .read()
            .expect("table lock")
            .live(OffsetDateTime::now_utc());
        let list: Vec<Value> = live
            .iter()
            .map(|a| json!({"domain": a.domain, "operator": a.operator, "expires_at": rfc3339(a.expires_at)}))
            .collect();
        Ok(jsonrpc::to_raw(&list))
    }
}

pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[derive(Deserialize)]
struct AnnounceParams {
    connections: Vec<RequestedConnection>,
    #[serde(rename = "_client", default)]
    client: Option<ClientParams>,
}

#[derive(Deserialize)]
struct RequestedConnection {
    domain: String,
    #[serde(default, with = "time::serde::rfc3339::option")]
    expires_at: Option<OffsetDateTime>,
}

/// The public proxy's JSON-RPC methods, as delivered by its EPS server.
pub struct PublicRpc(pub Arc<Public>);

impl Handler for PublicRpc {
    async fn call(&self, req: Request, _peer: Peer) -> Outcome {
        match req.method.as_str() {
            "announceConnections" => self.0.announce(crate::params(&req)?).await,
            "getAnnouncements" => self.0.get_announcements(),
            other => Err(RpcError::method_not_found(format!(
                "the public proxy has no method {other:?}"
            ))),
        }
    }
}
