//! Outgoing channels: one lazily connected, long-lived HTTP/2 channel per peer, reconnected
//! with backoff, with the peer's pinned certificate checked on every connect (`connector.rs`).
//!
//! Calls to a peer share one `Calls` stream on that channel (`call_stream.rs`); when it ends,
//! the next call opens a new one. Where calls go: a reverse stream the peer holds, else its
//! `grpc_server` address, else 502.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use eps_core::directory::Entry;
use eps_core::jsonrpc::{self, Outcome, RpcError};
use eps_core::tls;
use rustls::pki_types::ServerName;
use serde_json::value::RawValue;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use super::call_stream::{CallStream, NotSent};
use super::connector::{Connector, Verified};
use super::pb::eps_client::EpsClient;
use super::reverse::ReverseStreams;
use super::{from_pb, pb, status_error};
use crate::metrics::ReverseGauge;
use crate::peers::SharedDirectory;
use crate::settings::GrpcClientSettings;

/// Outgoing channels, one per peer, created on first use and reused, and the reverse streams
/// peers that cannot be dialed hold to this server.
pub struct Peers {
    tls: Arc<rustls::ClientConfig>,
    directory: SharedDirectory,
    settings: GrpcClientSettings,
    max_message_bytes: usize,
    channels: Mutex<HashMap<String, PeerChannel>>,
    reverse: Arc<ReverseStreams>,
    /// The certificate each dialed peer showed at its last connect (bounded by the peers and
    /// addresses in the directory).
    verified: Verified,
}

/// A peer's channel and the call stream open on it, if any.
struct PeerChannel {
    address: String,
    /// [`tls::identity_generation`] when the channel was made: a channel made with a
    /// certificate since replaced is replaced too (the peer may no longer accept the old one).
    generation: u64,
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
            verified: Verified::default(),
            reverse: Arc::new(ReverseStreams::new(reverse_gauge)),
        }
    }

    /// The fingerprint of the certificate peer `name` at `address` showed at its last connect.
    pub fn verified_fingerprint(&self, name: &str, address: &str) -> Option<String> {
        self.verified
            .lock()
            .expect("verified poisoned")
            .get(name)
            .and_then(|a| a.get(address))
            .cloned()
    }

    /// Drops the channel to `name` at `address` and what its peer showed, so that the next use
    /// connects anew (and checks the peer's certificate against the directory again).
    pub fn forget(&self, name: &str, address: &str) {
        let mut channels = self.channels.lock().expect("channel map poisoned");
        if channels.get(name).is_some_and(|p| p.address == address) {
            channels.remove(name);
        }
        if let Some(a) = self
            .verified
            .lock()
            .expect("verified poisoned")
            .get_mut(name)
        {
            a.remove(address);
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
                    Err(NotSent(_)) if stream.is_unimplemented() => {
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
            Some(address) => {
                // A connection outlives directory changes: one made to a certificate the
                // directory no longer accepts is dropped, and the next connect checks again.
                let refused = self
                    .verified
                    .lock()
                    .expect("verified poisoned")
                    .get(name)
                    .and_then(|a| a.get(address))
                    .is_some_and(|fp| !entry.accepts_fingerprint(fp));
                if refused {
                    tracing::warn!(peer = %name, %address, "the directory no longer accepts the certificate this peer showed; connecting anew");
                    self.forget(name, address);
                }
                self.dialed(name, address)
            }
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
        if let Some(p) = channels.get(name).filter(|p| p.usable_for(address)) {
            return Ok(p.client.clone());
        }
        let client = self.new_client(name, address)?;
        if channels.get(name).is_none_or(|p| !p.is_current()) {
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
            Some(p) if p.usable_for(address) => p,
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
        let connector = Connector::new(
            name,
            address,
            server_name,
            TlsConnector::from(self.tls.clone()),
            self.directory.clone(),
            &self.settings,
            self.verified.clone(),
        );
        Ok(
            endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
                let c = connector.clone();
                async move { c.connect().await }
            })),
        )
    }
}

impl PeerChannel {
    /// Made with the certificate this process shows now.
    fn is_current(&self) -> bool {
        self.generation == tls::identity_generation()
    }

    /// A channel calls to `address` may use: that address, and the current certificate.
    fn usable_for(&self, address: &str) -> bool {
        self.address == address && self.is_current()
    }

    fn new(address: &str, client: EpsClient<Channel>) -> Self {
        Self {
            address: address.to_string(),
            generation: tls::identity_generation(),
            client,
            stream: None,
            unary_until: None,
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
