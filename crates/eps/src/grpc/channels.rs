//! Outgoing channels: one lazily connected, long-lived HTTP/2 channel per peer, reconnected
//! with backoff, with the peer's pinned certificate checked on every connect.
//!
//! Calls to a peer share one `Calls` stream on that channel ([`CallStream`]): a call is one
//! request message with an id and one response message with the same id, so a call costs no
//! HTTP/2 stream, no headers and no task of its own. When the stream ends (the peer shut down,
//! the connection broke), every call still waiting on it fails at once and the next call opens
//! a new stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use eps_core::backoff::Backoff;
use eps_core::jsonrpc::{self, Outcome, RpcError};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use eps_core::directory::Entry;
use tokio_stream::{Stream, StreamExt};

use super::pb::eps_client::EpsClient;
use super::reverse::ReverseStreams;
use super::server::MAX_STREAM_CALLS;
use super::{from_pb, pb};
use crate::metrics::ReverseGauge;
use crate::peers::{check_peer, SharedDirectory};
use crate::settings::GrpcClientSettings;

/// First pause before connecting again to a peer that could not be reached.
const FIRST_RECONNECT: Duration = Duration::from_millis(50);

/// Reconnect pacing for one peer: attempts after failures wait 50 ms, 100 ms, ... up to a cap.
struct Reconnect {
    backoff: Backoff,
    next_attempt: Option<Instant>,
}

/// Outgoing channels, one per peer, created on first use and reused, and the reverse streams
/// peers that cannot be dialed hold to this server.
pub struct Peers {
    tls: Arc<rustls::ClientConfig>,
    directory: SharedDirectory,
    settings: GrpcClientSettings,
    max_message_bytes: usize,
    channels: Mutex<HashMap<String, PeerChannel>>,
    reverse: Arc<ReverseStreams>,
}

/// A peer's channel and the call stream open on it, if any.
struct PeerChannel {
    address: String,
    client: EpsClient<Channel>,
    stream: Option<Arc<CallStream>>,
    /// The peer answered `Calls` with UNIMPLEMENTED (an older version, or `call_streams:
    /// false`): until then, one gRPC call per call.
    unary_until: Option<Instant>,
}

/// How long a peer that does not serve `Calls` is called the unary way before trying again.
const UNARY_FOR: Duration = Duration::from_secs(600);

/// How one call goes out.
enum Route<'a> {
    /// A reverse stream the peer holds to us.
    Reverse(Arc<CallStream>),
    /// The `Calls` stream on our channel to the peer.
    Stream(Arc<CallStream>),
    Unary(EpsClient<Channel>, &'a str),
}

/// Times a call that found its stream ended before it went out is sent on another (a new one,
/// or another instance's reverse stream). It was not sent, so it cannot run twice.
const MAX_RESENDS: u32 = 3;

impl Peers {
    pub fn new(
        tls: Arc<rustls::ClientConfig>,
        directory: SharedDirectory,
        settings: GrpcClientSettings,
        max_message_bytes: usize,
        reverse_gauge: ReverseGauge,
    ) -> Self {
        Self {
            tls,
            directory,
            settings,
            max_message_bytes,
            channels: Mutex::new(HashMap::new()),
            reverse: Arc::new(ReverseStreams::new(reverse_gauge)),
        }
    }

    /// The reverse streams peers hold to this server.
    pub fn reverse(&self) -> &Arc<ReverseStreams> {
        &self.reverse
    }

    pub fn settings(&self) -> &GrpcClientSettings {
        &self.settings
    }

    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// Calls `method` on peer `name` (directory `entry`) with JSON `params`: on a reverse
    /// stream the peer holds to us when there is one, else on the channel to its `grpc_server`.
    pub async fn call(
        &self,
        name: &str,
        entry: &Entry,
        method: &str,
        params: &RawValue,
    ) -> Outcome {
        let timeout = self.settings.call_timeout;
        let deadline = Instant::now() + timeout;
        let work = async {
            let mut resends = 0;
            // Reverse streams (instances of the operator) that could not take this call.
            let mut tried: Vec<Arc<CallStream>> = Vec::new();
            loop {
                let (stream, reverse) = match self.route(name, entry, &tried)? {
                    Route::Reverse(s) => (s, true),
                    Route::Stream(s) => (s, false),
                    Route::Unary(client, address) => {
                        return unary(client, name, address, method, params, deadline).await
                    }
                };
                let outcome = match stream.call(method, params, deadline).await {
                    Ok(outcome) => outcome,
                    // The peer never read the call: it goes out the unary way.
                    Err(NotSent(_)) if stream.waiting.is_unimplemented() => {
                        self.use_unary(name);
                        continue;
                    }
                    // The stream ended before the call went out: another (a new one, or
                    // another instance's) takes it, and it cannot run twice.
                    Err(NotSent(e)) if resends == MAX_RESENDS => return Err(e),
                    Err(NotSent(_)) => {
                        resends += 1;
                        if reverse {
                            tried.push(stream);
                        }
                        continue;
                    }
                };
                // Refused unread by this instance's service (down, restarting): another
                // instance of the operator may take it.
                if reverse && resends < MAX_RESENDS {
                    if let Err(e) = &outcome {
                        if e.is_not_delivered() {
                            tried.push(stream);
                            if self.reverse.pick(name, &tried, |_| true).is_some() {
                                resends += 1;
                                continue;
                            }
                        }
                    }
                }
                return outcome;
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Err(_) => Err(RpcError::new(
                jsonrpc::PEER_TIMEOUT,
                format!(
                    "peer {name} did not answer within {:.1} s",
                    timeout.as_secs_f64()
                ),
            )),
            Ok(outcome) => outcome,
        }
    }

    /// Where a call to `name` goes: a reverse stream it holds to us (the least busy not yet
    /// `tried`), the call stream on the channel to its address, or an error saying why neither
    /// exists.
    fn route<'a>(
        &self,
        name: &str,
        entry: &'a Entry,
        tried: &[Arc<CallStream>],
    ) -> Result<Route<'a>, RpcError> {
        // A stream whose certificate the directory no longer accepts (a pin changed) is
        // closed here, at the first call after the change.
        if let Some(stream) = self
            .reverse
            .pick(name, tried, |fp| entry.accepts_fingerprint(fp))
        {
            return Ok(Route::Reverse(stream));
        }
        match entry.grpc_address() {
            Some(address) => self.dialed(name, address),
            None if entry.reached_by_reverse_stream() => Err(RpcError::new(
                jsonrpc::PEER_UNREACHABLE,
                format!(
                    "peer {name} is not connected: it is reached over the reverse streams it \
                     opens to us, and holds none now"
                ),
            )),
            None => Err(RpcError::new(
                jsonrpc::PEER_UNREACHABLE,
                format!(
                    "operator {name} has neither a grpc_server nor a reverse_stream channel in \
                     the directory"
                ),
            )),
        }
    }

    /// Calls `name` the unary way for a while: it does not serve `Calls`.
    fn use_unary(&self, name: &str) {
        let mut channels = self.channels.lock().expect("channel map poisoned");
        if let Some(peer) = channels.get_mut(name) {
            if peer.unary_until.is_none() {
                tracing::info!(peer = %name, retry_in_s = UNARY_FOR.as_secs(), "peer does not serve call streams; one gRPC call per call");
            }
            peer.unary_until = Some(Instant::now() + UNARY_FOR);
            peer.stream = None;
        }
    }

    /// The channel to `name` at `address`: the one calls use when `address` is the directory's
    /// first, else one of its own (a reverse stream to another instance of the operator).
    pub fn client(&self, name: &str, address: &str) -> Result<EpsClient<Channel>, RpcError> {
        let mut channels = self.channels.lock().expect("channel map poisoned");
        if let Some(p) = channels.get(name).filter(|p| p.address == address) {
            return Ok(p.client.clone());
        }
        let client = self.new_client(name, address)?;
        if !channels.contains_key(name) {
            channels.insert(name.to_string(), PeerChannel::new(address, client.clone()));
        }
        Ok(client)
    }

    fn new_client(&self, name: &str, address: &str) -> Result<EpsClient<Channel>, RpcError> {
        Ok(EpsClient::new(self.channel(name, address)?)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes))
    }

    /// The open call stream to `name`, a new one, or the unary way for a peer without streams.
    fn dialed<'a>(&self, name: &str, address: &'a str) -> Result<Route<'a>, RpcError> {
        let mut channels = self.channels.lock().expect("channel map poisoned");
        let peer = match channels.get_mut(name) {
            Some(p) if p.address == address => p,
            _ => {
                // The map holds at most one channel per operator in the directory.
                let peer = PeerChannel::new(address, self.new_client(name, address)?);
                channels.insert(name.to_string(), peer);
                channels.get_mut(name).expect("just inserted")
            }
        };
        match peer.unary_until {
            Some(t) if t > Instant::now() => return Ok(Route::Unary(peer.client.clone(), address)),
            Some(_) => peer.unary_until = None,
            None => {}
        }
        if let Some(s) = peer.stream.as_ref().filter(|s| s.is_open()) {
            return Ok(Route::Stream(s.clone()));
        }
        let stream = CallStream::open(
            peer.client.clone(),
            name.to_string(),
            address.to_string(),
            self.settings.call_timeout.as_secs_f64(),
            self.max_message_bytes,
        );
        peer.stream = Some(stream.clone());
        Ok(Route::Stream(stream))
    }

    fn channel(&self, name: &str, address: &str) -> Result<Channel, RpcError> {
        let server_name = ServerName::try_from(name.to_string()).map_err(|e| {
            RpcError::new(
                jsonrpc::PEER_UNREACHABLE,
                format!("peer name {name:?} is not a valid TLS server name: {e}"),
            )
        })?;
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| {
                RpcError::new(
                    jsonrpc::PEER_UNREACHABLE,
                    format!("peer {name} has an invalid grpc_server address {address:?}: {e}"),
                )
            })?
            .connect_timeout(self.settings.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.settings.keepalive_interval)
            .keep_alive_timeout(self.settings.keepalive_timeout)
            .keep_alive_while_idle(true)
            // All calls to a peer share one stream: its flow-control window grows with the
            // measured bandwidth-delay product instead of capping a long link at 2 MiB per RTT.
            .http2_adaptive_window(true);
        let connector = Connector {
            name: name.to_string(),
            address: address.to_string(),
            server_name,
            tls: TlsConnector::from(self.tls.clone()),
            directory: self.directory.clone(),
            timeout: self.settings.connect_timeout,
            reconnect: Arc::new(Mutex::new(Reconnect {
                backoff: Backoff::new(FIRST_RECONNECT, self.settings.max_reconnect_backoff),
                next_attempt: None,
            })),
        };
        Ok(
            endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
                let c = connector.clone();
                async move { c.connect().await }
            })),
        )
    }
}

impl PeerChannel {
    fn new(address: &str, client: EpsClient<Channel>) -> Self {
        Self {
            address: address.to_string(),
            client,
            stream: None,
            unary_until: None,
        }
    }
}

/// One stream of calls to a peer: a `Calls` stream we opened, or a `Serve` stream the peer
/// opened to us (a reverse stream). Dropping the last handle ends the stream's request side;
/// the peer then answers what it has read and ends its side.
pub struct CallStream {
    /// The peer, for error messages.
    name: String,
    address: String,
    requests: mpsc::Sender<pb::CallRequest>,
    waiting: Arc<Waiting>,
    /// Largest request the stream carries (the peer refuses larger ones, which would end the
    /// stream for every call on it).
    max_message_bytes: usize,
    next_id: AtomicU64,
    /// Bounds the calls waiting on this stream; a call beyond it waits for a slot (within its
    /// deadline).
    slots: Semaphore,
}

/// Callers waiting for their answer, by call id; the error that ended the stream once it has.
struct Waiting {
    callers: Mutex<Result<HashMap<u64, oneshot::Sender<Outcome>>, RpcError>>,
    ended: AtomicBool,
    /// Wakes [`CallStream::closed`] when the stream ends.
    closed: tokio::sync::Notify,
    /// The peer answered the stream with UNIMPLEMENTED: it read none of its calls.
    unimplemented: AtomicBool,
}

/// A call that never went out, and why.
struct NotSent(RpcError);

impl Waiting {
    fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    fn is_unimplemented(&self) -> bool {
        self.unimplemented.load(Ordering::Acquire)
    }

    /// Registers call `id`, unless the stream has already ended.
    fn insert(&self, id: u64, tx: oneshot::Sender<Outcome>) -> Result<(), NotSent> {
        match self.callers.lock().expect("waiting map poisoned").as_mut() {
            Ok(map) => {
                map.insert(id, tx);
                Ok(())
            }
            Err(e) => Err(NotSent(e.clone())),
        }
    }

    fn remove(&self, id: u64) {
        if let Ok(map) = self.callers.lock().expect("waiting map poisoned").as_mut() {
            map.remove(&id);
        }
    }

    /// Hands an answer to its caller (gone callers, e.g. after their deadline, are skipped).
    fn answer(&self, resp: pb::CallResponse) {
        let id = resp.id;
        let tx = self
            .callers
            .lock()
            .expect("waiting map poisoned")
            .as_mut()
            .ok()
            .and_then(|m| m.remove(&id));
        if let Some(tx) = tx {
            let _ = tx.send(from_pb(resp));
        }
    }

    /// Ends the stream: every caller still waiting gets `error`.
    fn end(&self, error: RpcError) {
        self.ended.store(true, Ordering::Release);
        self.closed.notify_waiters();
        let callers = std::mem::replace(
            &mut *self.callers.lock().expect("waiting map poisoned"),
            Err(error.clone()),
        );
        for (_, tx) in callers.into_iter().flatten() {
            let _ = tx.send(Err(error.clone()));
        }
    }
}

/// Forgets a call whose caller stopped waiting (deadline, cancellation).
struct Forget<'a> {
    waiting: &'a Waiting,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.waiting.remove(self.id);
    }
}

impl CallStream {
    /// A stream to peer `name` at `address` whose calls go out on the receiver returned; the
    /// answers must be fed to [`take_answers`](Self::take_answers).
    pub fn new(
        name: String,
        address: String,
        max_message_bytes: usize,
    ) -> (Arc<Self>, mpsc::Receiver<pb::CallRequest>) {
        let (requests, rx) = mpsc::channel(MAX_STREAM_CALLS);
        let waiting = Arc::new(Waiting {
            callers: Mutex::new(Ok(HashMap::new())),
            ended: AtomicBool::new(false),
            closed: tokio::sync::Notify::new(),
            unimplemented: AtomicBool::new(false),
        });
        let stream = Arc::new(Self {
            name,
            address,
            requests,
            waiting,
            max_message_bytes,
            next_id: AtomicU64::new(1),
            slots: Semaphore::new(MAX_STREAM_CALLS),
        });
        (stream, rx)
    }

    /// Opens a `Calls` stream on `client` and starts the task that hands answers to their
    /// callers.
    fn open(
        mut client: EpsClient<Channel>,
        name: String,
        address: String,
        secs: f64,
        max_message_bytes: usize,
    ) -> Arc<Self> {
        let (stream, rx) = Self::new(name, address, max_message_bytes);
        let this = stream.clone();
        tokio::spawn(async move {
            match client.calls(ReceiverStream::new(rx)).await {
                Err(status) => {
                    if status.code() == tonic::Code::Unimplemented {
                        this.waiting.unimplemented.store(true, Ordering::Release);
                    }
                    let error = status_error(&this.name, &this.address, &status, secs);
                    tracing::debug!(peer = %this.name, address = %this.address, error = %error.message, "call stream ended");
                    this.waiting.end(error);
                }
                Ok(resp) => {
                    this.take_answers(resp.into_inner(), secs).await;
                }
            }
        });
        stream
    }

    /// Hands the answers read from `answers` to their callers until it ends; then every call
    /// still waiting fails and the stream takes no more calls.
    pub async fn take_answers<S>(&self, mut answers: S, secs: f64)
    where
        S: Stream<Item = Result<pb::CallResponse, tonic::Status>> + Unpin,
    {
        let (name, address) = (&self.name, &self.address);
        let error = loop {
            match answers.next().await {
                Some(Ok(resp)) => self.waiting.answer(resp),
                // A peer ends its side only after answering every call it read: the calls
                // still waiting never reached it, and another instance may take them.
                None => {
                    break RpcError::not_delivered(
                        jsonrpc::PEER_UNREACHABLE,
                        format!("peer {name} ({address}) closed its call stream"),
                    )
                }
                Some(Err(status)) => break status_error(name, address, &status, secs),
            }
        };
        tracing::debug!(peer = %name, %address, error = %error.message, "call stream ended");
        self.waiting.end(error);
    }

    /// Ends the stream now: calls waiting on it fail with `error`, new calls go elsewhere.
    pub fn close(&self, error: RpcError) {
        self.waiting.end(error);
    }

    /// Resolves once the stream has ended (its peer closed it, or [`close`](Self::close)).
    pub async fn closed(&self) {
        let notified = self.waiting.closed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !self.waiting.is_ended() {
            notified.await;
        }
    }

    /// Whether calls can still go out on this stream.
    pub fn is_open(&self) -> bool {
        !self.waiting.is_ended() && !self.requests.is_closed()
    }

    /// Calls sent on this stream (or waiting for room on it) and not answered yet.
    pub fn in_flight(&self) -> usize {
        MAX_STREAM_CALLS - self.slots.available_permits()
    }

    /// Resolves once no call waits on this stream (polled: only shutdown waits for it).
    pub async fn idle(&self) {
        while self.in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn ended(&self) -> RpcError {
        RpcError::new(
            jsonrpc::PEER_UNREACHABLE,
            format!(
                "peer {} ({}): the call stream ended",
                self.name, self.address
            ),
        )
    }

    /// Sends one call and waits for its answer (the caller bounds the wait by `deadline`).
    async fn call(
        &self,
        method: &str,
        params: &RawValue,
        deadline: Instant,
    ) -> Result<Outcome, NotSent> {
        let _slot = self.slots.acquire().await.expect("semaphore never closes");
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request = pb::CallRequest {
            method: method.to_string(),
            params: Bytes::copy_from_slice(params.get().as_bytes()),
            id,
            // What is left of the caller's deadline, so the peer gives up when the caller does.
            timeout_ms: deadline
                .saturating_duration_since(Instant::now())
                .as_millis()
                .clamp(1, u32::MAX.into()) as u32,
        };
        // The peer would refuse it by ending the stream, failing every call on it.
        if prost::Message::encoded_len(&request) > self.max_message_bytes {
            return Ok(Err(RpcError::new(
                jsonrpc::TOO_LARGE,
                format!(
                    "params over the EPS network's max_message_bytes ({} bytes)",
                    self.max_message_bytes
                ),
            )));
        }
        let (tx, rx) = oneshot::channel();
        self.waiting.insert(id, tx)?;
        let _forget = Forget {
            waiting: &self.waiting,
            id,
        };
        if self.requests.send(request).await.is_err() {
            // The stream's task dropped the receiver: it has ended or is ending.
            return Err(NotSent(self.ended()));
        }
        // The sender is dropped only after `end` has answered every caller.
        let outcome = rx.await.unwrap_or_else(|_| Err(self.ended()));
        match outcome {
            Err(e) if self.waiting.is_unimplemented() => Err(NotSent(e)),
            outcome => Ok(outcome),
        }
    }
}

/// One call as its own gRPC call, for peers that do not serve `Calls`.
async fn unary(
    mut client: EpsClient<Channel>,
    name: &str,
    address: &str,
    method: &str,
    params: &RawValue,
    deadline: Instant,
) -> Outcome {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut request = tonic::Request::new(pb::CallRequest {
        method: method.to_string(),
        params: Bytes::copy_from_slice(params.get().as_bytes()),
        id: 0,
        timeout_ms: 0,
    });
    request.set_timeout(left);
    match client.call(request).await {
        Ok(resp) => from_pb(resp.into_inner()),
        Err(status) => Err(status_error(name, address, &status, left.as_secs_f64())),
    }
}

#[derive(Clone)]
struct Connector {
    name: String,
    address: String,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    directory: SharedDirectory,
    timeout: Duration,
    reconnect: Arc<Mutex<Reconnect>>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Connector {
    async fn connect(
        &self,
    ) -> Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, BoxError> {
        let wait = {
            let b = self.reconnect.lock().expect("reconnect poisoned");
            b.next_attempt
                .map(|t| t.saturating_duration_since(Instant::now()))
        };
        if let Some(w) = wait.filter(|w| !w.is_zero()) {
            tokio::time::sleep(w).await;
        }
        match self.try_connect().await {
            Ok(io) => {
                let mut b = self.reconnect.lock().expect("reconnect poisoned");
                if b.backoff.failures() > 0 {
                    tracing::info!(peer = %self.name, address = %self.address, "peer reachable again");
                }
                b.backoff.reset();
                b.next_attempt = None;
                Ok(TokioIo::new(io))
            }
            Err(e) => {
                let mut b = self.reconnect.lock().expect("reconnect poisoned");
                let pause = b.backoff.fail();
                b.next_attempt = Some(Instant::now() + pause);
                tracing::info!(peer = %self.name, address = %self.address, error = %e, retry_in_ms = pause.as_millis() as u64, "waiting for peer");
                Err(e.into())
            }
        }
    }

    async fn try_connect(
        &self,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, std::io::Error> {
        let work = async {
            let tcp = TcpStream::connect(&self.address).await?;
            tcp.set_nodelay(true)?;
            let io = self.tls.connect(self.server_name.clone(), tcp).await?;
            // The CA chain and name are checked by the handshake; the pin is ours to check.
            let cert = io
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or_else(|| std::io::Error::other("peer sent no certificate"))?;
            let id = check_peer(&self.directory.load(), cert).map_err(std::io::Error::other)?;
            if id.name != self.name {
                return Err(std::io::Error::other(format!(
                    "peer at {} is {:?}, expected {:?}",
                    self.address, id.name, self.name
                )));
            }
            Ok(io)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
    }
}

pub(super) fn status_error(
    name: &str,
    address: &str,
    status: &tonic::Status,
    secs: f64,
) -> RpcError {
    use std::error::Error as _;
    let mut detail = status.message().to_string();
    let mut source = status.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !detail.contains(&text) {
            detail.push_str(": ");
            detail.push_str(&text);
        }
        source = s.source();
    }
    // hyper reports a connection that died before the request went out (a peer refusing our
    // certificate after the TLS 1.3 handshake) as "canceled"; only an expired deadline, ours or
    // the grpc-timeout the peer enforces ("Timeout expired"), is a timeout.
    let expired = status.code() == tonic::Code::DeadlineExceeded
        || (status.code() == tonic::Code::Cancelled
            && status.message() == tonic::TimeoutExpired(()).to_string());
    if expired {
        RpcError::new(
            jsonrpc::PEER_TIMEOUT,
            format!("peer {name} ({address}) did not answer within {secs:.1} s"),
        )
    } else {
        RpcError::new(
            jsonrpc::PEER_UNREACHABLE,
            format!("peer {name} ({address}) unreachable: {detail}"),
        )
    }
}
