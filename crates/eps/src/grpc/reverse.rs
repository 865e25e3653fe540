//! Reverse streams: how a server behind a firewall that drops every inbound connection is
//! reached.
//!
//! Such a server (its directory entry has a `reverse_stream` channel) opens one `Serve` stream
//! to each peer that may call it ([`hold_streams`]), on the same mutual-TLS channel its own
//! calls to that peer use, and answers the calls that come down it. The peer keeps the streams
//! it was given in [`ReverseStreams`], bound to the operator the client certificate names, and
//! sends that operator's calls on them, spread over the live ones (several instances of one
//! operator each hold their own). A stream that ends, by a closed connection or by HTTP/2
//! keepalive noticing a dead path, is dropped at once and re-opened by its holder with backoff.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use prometheus_client::metrics::gauge::Gauge;

use eps_core::backoff::Backoff;
use eps_core::jsonrpc::{self, RpcError};

use super::call_stream::CallStream;
use super::server::{answer_calls, MAX_STREAM_CALLS};
use super::Node;
use crate::metrics::{ReverseGauge, ReverseLabels};
use crate::peers::SharedDirectory;

/// Reverse streams one operator may hold to this server at once (one per instance it runs):
/// bounds the map against a peer that opens streams in a loop.
pub const MAX_STREAMS_PER_OPERATOR: usize = 64;
/// First pause before a reverse stream that could not be opened is tried again; it doubles up
/// to `grpc_client.max_reconnect_backoff`.
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// A stream that stayed open this long ended for a new reason: the next attempt waits only the
/// first pause.
const STABLE: Duration = Duration::from_secs(10);
/// `side` label values of `eps_reverse_streams`.
const HELD: &str = "held";
const ACCEPTED: &str = "accepted";
/// How long a stopping holder waits for the peer to end the stream after the last answer.
const DRAIN: Duration = Duration::from_secs(2);
/// How often the holder compares the peers it should hold streams to with the directory.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);

/// A stream a peer holds to us, and the fingerprint of the certificate it was opened with.
type Held = (Arc<CallStream>, String);

/// The reverse streams peers hold to this server, by operator.
pub struct ReverseStreams {
    streams: Mutex<HashMap<String, Vec<Held>>>,
    /// Breaks ties between equally busy streams in turn.
    turn: AtomicUsize,
    /// `eps_reverse_streams`, both sides.
    gauge: ReverseGauge,
}

/// A stream in [`ReverseStreams`]; dropping it takes the stream out.
pub struct Registration {
    streams: Arc<ReverseStreams>,
    name: String,
    stream: Arc<CallStream>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.streams.gauge(ACCEPTED, &self.name).dec();
        let mut map = self.streams.streams.lock().expect("reverse map poisoned");
        if let Some(list) = map.get_mut(&self.name) {
            list.retain(|(s, _)| !Arc::ptr_eq(s, &self.stream));
            if list.is_empty() {
                map.remove(&self.name);
            }
        }
    }
}

impl ReverseStreams {
    pub fn new(gauge: ReverseGauge) -> Self {
        Self {
            streams: Mutex::new(HashMap::new()),
            turn: AtomicUsize::new(0),
            gauge,
        }
    }

    /// `eps_reverse_streams{side, peer}`.
    fn gauge(&self, side: &'static str, peer: &str) -> Gauge {
        self.gauge
            .get_or_create(&ReverseLabels {
                side,
                peer: peer.to_string(),
            })
            .clone()
    }
    /// The open stream of `name` with the fewest calls in flight (in turn among equals), other
    /// than those in `tried`. A stream whose certificate fingerprint `accepts` refuses (the
    /// directory no longer pins it) is closed: its holder is then refused at its next handshake.
    pub fn pick(
        &self,
        name: &str,
        tried: &[Arc<CallStream>],
        accepts: impl Fn(&str) -> bool,
    ) -> Option<Arc<CallStream>> {
        let map = self.streams.lock().expect("reverse map poisoned");
        let list = map.get(name)?;
        let n = list.len();
        let start = if n > 1 {
            self.turn.fetch_add(1, Ordering::Relaxed) % n
        } else {
            0
        };
        (0..n)
            .map(|i| &list[(start + i) % n])
            .filter(|(s, fingerprint)| {
                if s.is_open() && !accepts(fingerprint) {
                    tracing::warn!(peer = %name, %fingerprint, "closing a reverse stream: the directory no longer accepts its certificate");
                    s.close(RpcError::new(
                        jsonrpc::PEER_UNREACHABLE,
                        format!("{name}: the directory no longer accepts the certificate of this reverse stream"),
                    ));
                }
                s.is_open() && !tried.iter().any(|t| Arc::ptr_eq(t, s))
            })
            .min_by_key(|(s, _)| s.in_flight())
            .map(|(s, _)| s.clone())
    }

    /// Adds a stream `name` opened; refused past [`MAX_STREAMS_PER_OPERATOR`].
    pub fn register(
        self: &Arc<Self>,
        name: &str,
        fingerprint: &str,
        stream: Arc<CallStream>,
    ) -> Result<Registration, String> {
        let mut map = self.streams.lock().expect("reverse map poisoned");
        let list = map.entry(name.to_string()).or_default();
        list.retain(|(s, _)| s.is_open());
        if list.len() >= MAX_STREAMS_PER_OPERATOR {
            return Err(format!(
                "{name} already holds {MAX_STREAMS_PER_OPERATOR} reverse streams here"
            ));
        }
        list.push((stream.clone(), fingerprint.to_string()));
        self.gauge(ACCEPTED, name).inc();
        Ok(Registration {
            streams: self.clone(),
            name: name.to_string(),
            stream,
        })
    }

    /// Open streams held by `name`.
    pub fn count(&self, name: &str) -> usize {
        let map = self.streams.lock().expect("reverse map poisoned");
        map.get(name)
            .map_or(0, |l| l.iter().filter(|(s, _)| s.is_open()).count())
    }
}

/// The peers (name, address) this server should hold reverse streams to: those named in
/// `grpc_client.reverse_peers`, or else, when the directory says this operator is reached by
/// reverse stream, every operator with a `call` right on one of its services; each at every
/// `grpc_server` address it lists.
pub fn targets(
    directory: &eps_core::directory::Directory,
    me: &str,
    listed: &[String],
) -> Vec<(String, String)> {
    let entries: Vec<_> = if listed.is_empty() {
        match directory.entry(me) {
            Some(e) if e.reached_by_reverse_stream() => directory.callers_of(me),
            _ => Vec::new(),
        }
    } else {
        listed.iter().filter_map(|n| directory.entry(n)).collect()
    };
    entries
        .into_iter()
        .flat_map(|e| {
            e.grpc_addresses()
                .map(|a| (e.name.clone(), a.to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Holds a reverse stream to each of [`targets`], following directory changes, until
/// `shutdown`; then returns once every stream has answered the calls it read.
pub async fn hold_streams<B: Node>(
    broker: Arc<B>,
    directory: SharedDirectory,
    listed: Vec<String>,
    shutdown: CancellationToken,
) {
    let mut held: BTreeMap<(String, String), CancellationToken> = BTreeMap::new();
    // Waited for on shutdown: each answers the calls it has read before it ends.
    let tasks = TaskTracker::new();
    let mut seen: Option<Arc<eps_core::directory::Directory>> = None;
    let mut warned = false;
    loop {
        let dir = directory.load();
        if !seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &dir)) {
            let wanted = targets(&dir, broker.name(), &listed);
            if wanted.is_empty() && !warned && !listed.is_empty() {
                tracing::warn!(peers = ?listed, "none of grpc_client.reverse_peers has a grpc_server address in the directory");
                warned = true;
            }
            held.retain(|key, stop| {
                let keep = wanted.contains(key);
                if !keep {
                    tracing::info!(peer = %key.0, address = %key.1, "no reverse stream needed any more");
                    stop.cancel();
                }
                keep
            });
            for (name, address) in wanted {
                let key = (name.clone(), address.clone());
                if held.contains_key(&key) {
                    continue;
                }
                let stop = shutdown.child_token();
                held.insert(key, stop.clone());
                tasks.spawn(hold(broker.clone(), name, address, stop));
            }
            seen = Some(dir);
        }
        tokio::select! {
            _ = tokio::time::sleep(RECONCILE_EVERY) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    tasks.close();
    tasks.wait().await;
}

/// Keeps one reverse stream to `name` at `address` open: opens it, answers its calls, and when
/// it ends opens it again after a pause that doubles with each failure.
async fn hold<B: Node>(broker: Arc<B>, name: String, address: String, stop: CancellationToken) {
    let mut backoff = Backoff::new(FIRST_RETRY, broker.peers().settings().max_reconnect_backoff);
    let mut identity = eps_core::tls::identity_changes();
    identity.mark_unchanged();
    // The first failure in a row is logged at info; the channel logs each failed connect.
    let mut failing = false;
    while !stop.is_cancelled() {
        let started = Instant::now();
        let outcome = follow_identity(&broker, &name, &address, &stop, &mut identity).await;
        if outcome.is_ok() && started.elapsed() >= STABLE {
            backoff.reset();
        }
        let pause = backoff.fail();
        match outcome {
            Ok(()) => {
                failing = false;
                if stop.is_cancelled() {
                    return;
                }
                tracing::info!(peer = %name, %address, "reverse stream ended; opening it again");
            }
            Err(e) if failing => {
                tracing::debug!(peer = %name, %address, error = %e, retry_in_ms = pause.as_millis() as u64, "reverse stream not opened")
            }
            Err(e) => {
                failing = true;
                tracing::info!(peer = %name, %address, error = %e, retry_in_ms = pause.as_millis() as u64, "reverse stream not opened; trying again with backoff");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// One [`serve_one`] on its own task, with its own stop.
struct Running {
    task: tokio::task::JoinHandle<Result<(), String>>,
    stop: CancellationToken,
    opened: oneshot::Receiver<()>,
}

impl Running {
    fn start<B: Node>(
        broker: &Arc<B>,
        name: &str,
        address: &str,
        stop: &CancellationToken,
    ) -> Self {
        let stop = stop.child_token();
        let (opened_tx, opened) = oneshot::channel();
        let (broker, name, address) = (broker.clone(), name.to_string(), address.to_string());
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { serve_one(&broker, &name, &address, &stop, opened_tx).await }
        });
        Self { task, stop, opened }
    }
}

/// Runs one reverse stream until it ends, moving it to a new connection whenever this server's
/// certificate changes (the peer may soon stop accepting the old one): the new stream is open
/// before the old one stops taking calls, so the peer always has one to call on.
async fn follow_identity<B: Node>(
    broker: &Arc<B>,
    name: &str,
    address: &str,
    stop: &CancellationToken,
    identity: &mut tokio::sync::watch::Receiver<u64>,
) -> Result<(), String> {
    let open_within = broker.peers().settings().connect_timeout * 2;
    let mut current = Running::start(broker, name, address, stop);
    let retiring = TaskTracker::new();
    let outcome = loop {
        tokio::select! {
            r = &mut current.task => break r.unwrap_or_else(|e| Err(e.to_string())),
            Ok(()) = identity.changed() => {
                let mut next = Running::start(broker, name, address, stop);
                match tokio::time::timeout(open_within, &mut next.opened).await {
                    Ok(Ok(())) => {
                        tracing::info!(peer = %name, %address, "this server's certificate changed: reverse stream moved to a new connection");
                        // The old stream answers what it has read, then ends.
                        current.stop.cancel();
                        let old = std::mem::replace(&mut current, next);
                        retiring.spawn(old.task);
                    }
                    _ => {
                        tracing::warn!(peer = %name, %address, "this server's certificate changed, but no reverse stream opens with it; keeping the current one");
                        next.stop.cancel();
                    }
                }
            }
        }
    };
    retiring.close();
    retiring.wait().await;
    outcome
}

/// Opens one `Serve` stream and answers the calls on it until it ends (`Ok`), or says why it
/// could not be opened.
async fn serve_one<B: Node>(
    broker: &Arc<B>,
    name: &str,
    address: &str,
    stop: &CancellationToken,
    is_open: oneshot::Sender<()>,
) -> Result<(), String> {
    let peers = broker.peers();
    // The connection outlives directory changes: a peer whose certificate is no longer
    // accepted is connected to anew, which checks it again (and fails while it is refused).
    if let Some(fp) = peers.verified_fingerprint(name, address) {
        if !broker.accepts(name, &fp) {
            peers.forget(name, address);
            return Err(format!(
                "the directory no longer accepts the certificate {name} showed; connecting anew"
            ));
        }
    }
    let mut client = peers.client(name, address).map_err(|e| e.message)?;
    let (answers, rx) = mpsc::channel(MAX_STREAM_CALLS);
    // Answers go up the request side; an answer the channel could not carry was logged there.
    let outgoing = ReceiverStream::new(rx).filter_map(Result::ok);
    let opened = tokio::select! {
        r = client.serve(outgoing) => r,
        _ = stop.cancelled() => return Ok(()),
    };
    let mut calls = opened
        .map_err(|status| {
            let secs = peers.settings().connect_timeout.as_secs_f64();
            super::status_error(name, address, &status, secs).message
        })?
        .into_inner();
    tracing::info!(peer = %name, %address, "reverse stream open: this peer's calls come on it");
    let held = peers.reverse().gauge(HELD, name);
    held.inc();
    let _ = is_open.send(());
    answer_calls(
        &mut calls,
        answers,
        broker.clone(),
        Arc::from(name),
        // The certificate the peer showed when this connection was made: each call re-checks
        // it against the directory of its time, as on a stream the peer opened.
        peers
            .verified_fingerprint(name, address)
            .map(|fp| Arc::from(fp.as_str())),
        Arc::new(Semaphore::new(MAX_STREAM_CALLS)),
        peers.max_message_bytes(),
        stop.clone(),
    )
    .await;
    if stop.is_cancelled() {
        // Our side has ended with its last answer; the peer ends its side once it has read
        // them all. Waiting for that keeps the process alive until the answers are out.
        let _ = tokio::time::timeout(DRAIN, async { while calls.next().await.is_some() {} }).await;
    }
    held.dec();
    Ok(())
}
