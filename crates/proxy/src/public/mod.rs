//! `proxy run public`: the SNI router (docs/architecture.md §3.2).
//!
//! Per client: read a load balancer's PROXY header (from trusted sources only), check the access
//! policy for the client's address, read the ClientHello under a byte and time bound, look the
//! SNI up in the in-memory announcements, check the domain's rules, draw a token, ask the
//! announcing operator through the EPS server to dial back, and relay once a data connection
//! presents the token. No disk, no directory read and no DNS on that path; a refused client
//! costs no token and no EPS call. The control side (announcements) is `rpc.rs`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eps_core::jsonrpc;
use eps_core::link::Link;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{self, Admission, ReadRefused};
use crate::dialback::{self, IncomingConnection, Token, TokenError};
use crate::limiter::{GuessLimiter, IdleSlots};
use crate::listener::accept_loop;
use crate::metrics::{short_addr, Metrics, Reason};
use crate::policy::gate::Refused as PolicyRefused;
use crate::registry::Registry;
use crate::relay;
use crate::settings::{DomainLimits, PublicLimits, PublicSettings};

mod rpc;

pub use rpc::PublicRpc;

/// Why the public proxy closed a client or a data connection (beyond the reading and policy
/// refusals, which have their own types): the `reason` label of each.
#[derive(Debug, Clone, Copy)]
enum Refused {
    /// `public.limits.max_connections` clients are being served.
    ConnectionLimit,
    /// `public.limits.max_internal_connections` data connections are open.
    InternalConnectionLimit,
    /// No live announcement for the SNI.
    UnknownSni,
    /// `public.limits.max_pending` clients wait for their dial-back.
    PendingFull,
    /// The `incomingConnection` call failed.
    DialBackFailed,
    /// No data connection presented the token within `accept_timeout`.
    NoDialBack,
    /// The data connection failed before the relay started.
    DataConnectionFailed,
    /// A pre-dialed data connection stayed silent for `data_idle_timeout`.
    DataIdleTimeout,
    /// No whole token within `token_timeout`.
    TokenTimeout,
    /// The data connection closed inside its token.
    TokenTruncated,
    /// A wrong token from an address marked for guessing (not logged).
    TokenRateLimited,
    /// An unknown, used or expired token.
    BadToken,
}

impl Reason for Refused {
    fn label(&self) -> &'static str {
        match self {
            Self::ConnectionLimit => "connection_limit",
            Self::InternalConnectionLimit => "internal_connection_limit",
            Self::UnknownSni => "unknown_sni",
            Self::PendingFull => "pending_full",
            Self::DialBackFailed => "dial_back_failed",
            Self::NoDialBack => "no_dial_back",
            Self::DataConnectionFailed => "data_connection_failed",
            Self::DataIdleTimeout => "data_idle_timeout",
            Self::TokenTimeout => "token_timeout",
            Self::TokenTruncated => "token_truncated",
            Self::TokenRateLimited => "token_rate_limited",
            Self::BadToken => "bad_token",
        }
    }
}

/// How often (seconds) expired announcements are removed from memory and store.
const PRUNE_INTERVAL_SECS: u32 = 60;

pub struct Public {
    metrics: Arc<Metrics>,
    limits: PublicLimits,
    endpoint: String,
    registry: Registry,
    pending: dialback::Pending<TcpStream>,
    pending_refused: AtomicU64,
    guesses: GuessLimiter,
    idle_data: IdleSlots,
    admission: Admission,
    /// Bounds on the rules announcements may set.
    domain_limits: DomainLimits,
    eps: Link,
}

impl Public {
    pub fn new(s: &PublicSettings, registry: Registry, eps: Link, metrics: Arc<Metrics>) -> Self {
        Self {
            pending: dialback::Pending::new(s.limits.max_pending, metrics.pending.clone()),
            metrics,
            limits: s.limits.clone(),
            endpoint: s.internal_endpoint.clone(),
            registry,
            pending_refused: AtomicU64::new(0),
            guesses: GuessLimiter::new(s.limits.max_token_failures, s.limits.token_failure_window),
            // Silent connections may take at most half of the internal port, so that dial-backs
            // always find room.
            idle_data: IdleSlots::new(
                s.limits.max_idle_data_per_address,
                s.limits.max_internal_connections / 2,
            ),
            admission: Admission::new(s),
            domain_limits: s.policy.per_domain.clone(),
            eps,
        }
    }

    /// Runs the public and internal listeners and the pruning task until `shutdown`. Client
    /// tasks are spawned on `tracker`, so that a shutdown can wait for relays to finish.
    pub async fn run(
        self: Arc<Self>,
        public: TcpListener,
        internal: TcpListener,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) {
        let clients = Arc::new(Semaphore::new(self.limits.max_connections));
        let data = Arc::new(Semaphore::new(self.limits.max_internal_connections));
        let (me, m) = (self.clone(), self.metrics.clone());
        let a = accept_loop(
            public,
            "public",
            clients,
            shutdown.clone(),
            tracker.clone(),
            move || m.refuse(&Refused::ConnectionLimit),
            move |s, addr| {
                let me = me.clone();
                async move { me.handle_client(s, addr).await }
            },
        );
        let (me, m, stop) = (self.clone(), self.metrics.clone(), shutdown.clone());
        let b = accept_loop(
            internal,
            "internal",
            data,
            shutdown.clone(),
            tracker,
            move || m.refuse(&Refused::InternalConnectionLimit),
            move |s, addr| {
                let (me, stop) = (me.clone(), stop.clone());
                async move { me.handle_data(s, addr, stop).await }
            },
        );
        let me = self.clone();
        let stop = shutdown.clone();
        let c = async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut since_prune = 0u32;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                since_prune += 1;
                if since_prune >= PRUNE_INTERVAL_SECS {
                    since_prune = 0;
                    me.registry.prune().await;
                    me.admission.gate.tidy(|d| me.registry.holds(d));
                }
                me.metrics
                    .policy_tracked
                    .set(me.admission.gate.tracked() as i64);
                me.metrics
                    .announcements
                    .set(me.registry.live_count() as i64);
            }
        };
        let d = self.registry.follow(shutdown.clone());
        tokio::join!(a, b, c, d);
    }

    async fn handle_client(self: Arc<Self>, mut client: TcpStream, peer: SocketAddr) {
        self.metrics.accept("public");
        let started = Instant::now();
        // The PROXY header and the ClientHello share one deadline.
        let deadline = started + self.limits.client_hello_timeout;
        let who = if self.admission.trusts(peer.ip()) {
            // The reads are boxed: their state would otherwise stay in every relay's task.
            match Box::pin(admission::read_proxy_header(&mut client, peer, deadline)).await {
                Ok(c) => c,
                Err(refused) => {
                    self.refused(&refused, peer);
                    return;
                }
            }
        } else {
            admission::Client {
                addr: peer,
                destination: None,
                rest: Vec::new(),
            }
        };
        // From here on, `addr` is the client: the peer, or whom a trusted PROXY header names.
        let addr = who.addr;
        // Before any read of the client's own bytes: a flood costs the least.
        let _address_pass = match self.admission.gate.admit_address(addr.ip()) {
            Ok(pass) => pass,
            Err(r) => {
                self.refused_by_policy(r, addr, None);
                return;
            }
        };
        let max = self.limits.max_client_hello_bytes;
        let (buf, sni) = match Box::pin(admission::read_client_hello(
            &mut client,
            who.rest,
            deadline,
            max,
        ))
        .await
        {
            Ok(r) => r,
            Err(refused) => {
                self.metrics.refuse(&refused);
                tracing::debug!(client = %short_addr(addr), reason = refused.label(), detail = %refused, "client closed before routing");
                return;
            }
        };
        let hello_done = Instant::now();
        self.metrics
            .client_hello_seconds
            .observe((hello_done - started).as_secs_f64());
        let Some(route) = self.registry.lookup(&sni) else {
            self.metrics.refuse(&Refused::UnknownSni);
            tracing::debug!(client = %short_addr(addr), %sni, "no live announcement for this name");
            return;
        };
        let _domain_pass = match self.admission.gate.admit_domain(
            &route.domain,
            route.policy.as_deref(),
            addr.ip(),
        ) {
            Ok(pass) => pass,
            Err(r) => {
                self.refused_by_policy(r, addr, Some(&sni));
                return;
            }
        };
        let token = match Token::draw() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "OS random generator failed");
                return;
            }
        };
        let Ok((guard, rx)) = self.pending.insert(token) else {
            self.metrics.refuse(&Refused::PendingFull);
            // One line for the first refusal and then every 1000th, not one per client.
            let n = self.pending_refused.fetch_add(1, Ordering::Relaxed);
            if n % 1000 == 0 {
                tracing::warn!(client = %short_addr(addr), %sni, max_pending = self.limits.max_pending, refused_so_far = n + 1, "pending set full; refusing clients");
            }
            return;
        };
        // Behind a load balancer, the address the client connected to is the balancer's.
        let server_address = who.destination.or_else(|| client.local_addr().ok());
        let token_text = token.to_base64();
        // Serialized straight from borrowed fields: no JSON tree on the per-connection path.
        let params = jsonrpc::to_raw(&IncomingConnection {
            domain: sni.as_str().into(),
            token: token_text.as_str().into(),
            endpoint: self.endpoint.as_str().into(),
            client_address: Some(addr),
            server_address,
            client: None,
        });
        let operator = &route.operator;
        let method = format!("{operator}.incomingConnection");
        // The request runs on its own task: the dial-back usually arrives before the answer,
        // and dropping an in-flight request would cost the kept-alive connection to the EPS server.
        let me = self.clone();
        let domain = sni.clone();
        tokio::spawn(async move {
            // The answer carries nothing the public side needs: it is not decoded.
            if let Err(e) = me.eps.call_raw(&method, &params).await {
                me.metrics.refuse(&Refused::DialBackFailed);
                tracing::info!(client = %short_addr(addr), %domain, error = %e, "dial-back request failed; client closed");
                me.pending.cancel(&token);
            }
        });
        let data = tokio::time::timeout(self.limits.accept_timeout, rx).await;
        drop(guard);
        let mut data = match data {
            Ok(Ok(data)) => data,
            Ok(Err(_)) => return,
            Err(_) => {
                self.metrics.refuse(&Refused::NoDialBack);
                tracing::info!(client = %short_addr(addr), %sni, %operator, "no dial-back within accept_timeout; client closed");
                return;
            }
        };
        self.metrics
            .dial_back_seconds
            .observe(hello_done.elapsed().as_secs_f64());
        if let Err(e) = data.write_all(&buf).await {
            self.metrics.refuse(&Refused::DataConnectionFailed);
            tracing::debug!(client = %short_addr(addr), error = %e, "data connection failed before relaying");
            return;
        }
        drop(buf);
        self.metrics.relayed.inc();
        self.metrics.active_relays.inc();
        let t = relay::relay(client, data, self.limits.idle_timeout).await;
        self.metrics.active_relays.dec();
        self.metrics
            .relay_ended(t.a_to_b, t.b_to_a, t.ended.as_str());
        tracing::info!(
            client = %short_addr(addr),
            domain = %sni,
            %operator,
            duration_ms = started.elapsed().as_millis() as u64,
            bytes_up = t.a_to_b,
            bytes_down = t.b_to_a,
            outcome = t.ended.as_str(),
            "connection relayed"
        );
    }

    /// Counts and (sampled) logs a client refused before routing.
    fn refused(&self, refused: &ReadRefused, client: SocketAddr) {
        self.metrics.refuse(refused);
        let reason = refused.label();
        if let Some(not_logged) = self.admission.log_refusal(reason) {
            tracing::debug!(client = %short_addr(client), reason, detail = %refused, not_logged, "client refused");
        }
    }

    fn refused_by_policy(&self, r: PolicyRefused, client: SocketAddr, domain: Option<&str>) {
        self.metrics.refuse(&r);
        let reason = r.label();
        if let Some(not_logged) = self.admission.log_refusal(reason) {
            tracing::debug!(client = %short_addr(client), reason, domain = domain.unwrap_or(""), not_logged, "client refused by the access policy");
        }
    }

    async fn handle_data(&self, mut data: TcpStream, addr: SocketAddr, stop: CancellationToken) {
        self.metrics.accept("internal");
        // A private proxy dials a few data connections ahead of need: such a connection waits
        // silently (bounded per source network, in all, and in time) until a client's token goes
        // out on it. Past those bounds a connection gets token_timeout for its first byte, as
        // any dial-back does; it is never closed unread, since its token may be on the way.
        let read = {
            let slot = self.idle_data.enter(addr.ip());
            let first_byte_within = if slot.is_some() {
                self.limits.data_idle_timeout
            } else {
                self.limits.token_timeout
            };
            tokio::select! {
                r = dialback::read_token(&mut data, first_byte_within, self.limits.token_timeout) => r.map_err(|e| (e, slot.is_some())),
                // Nothing waits on a silent connection; a shutdown closes it at once.
                _ = stop.cancelled() => return,
            }
        };
        let token = match read {
            Ok(t) => t,
            Err((TokenError::Silent, true)) => {
                self.metrics.refuse(&Refused::DataIdleTimeout);
                tracing::debug!(%addr, "data connection silent for data_idle_timeout");
                return;
            }
            Err((TokenError::Silent, false)) => {
                self.metrics.refuse(&Refused::TokenTimeout);
                tracing::debug!(%addr, "no token within token_timeout (too many silent data connections to wait longer)");
                return;
            }
            // A pooled connection its private proxy retired unused: not a refusal.
            Err((TokenError::ClosedUnused, _)) => {
                tracing::debug!(%addr, "data connection closed unused");
                return;
            }
            Err((TokenError::Truncated(e), _)) => {
                self.metrics.refuse(&Refused::TokenTruncated);
                tracing::debug!(%addr, error = %e, "data connection closed before its token");
                return;
            }
            Err((TokenError::Slow, _)) => {
                self.metrics.refuse(&Refused::TokenTimeout);
                tracing::debug!(%addr, "no whole token within token_timeout");
                return;
            }
        };
        match self.pending.complete(&token, data) {
            Ok(()) => {}
            // A marked guesser's wrong tokens cost no log line; its valid ones are served above
            // like anybody's (it may share its address with a private proxy).
            Err(_unclaimed) => {
                let now = std::time::Instant::now();
                let marked = self.guesses.is_blocked(addr.ip(), now);
                let newly = self.guesses.failure(addr.ip(), now);
                if marked {
                    self.metrics.refuse(&Refused::TokenRateLimited);
                } else {
                    self.metrics.refuse(&Refused::BadToken);
                    if newly {
                        tracing::warn!(addr = %addr.ip(), window_s = self.limits.token_failure_window.as_secs_f64(), "too many wrong tokens from this address; its wrong tokens are refused without a log line for a while (valid ones are still served)");
                    } else {
                        tracing::debug!(%addr, "unknown, used or expired token; data connection closed");
                    }
                }
            }
        }
    }
}
