//! One stream of calls to a peer ([`CallStream`]): a call is one request message with an id
//! and one response message with the same id, so a call costs no HTTP/2 stream, no headers and
//! no task of its own. When the stream ends (the peer shut down, the connection broke), every
//! call still waiting on it fails at once, marked not delivered where it never went out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use eps_core::jsonrpc::{self, Outcome, RpcError};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Channel;

use super::pb::eps_client::EpsClient;
use super::server::MAX_STREAM_CALLS;
use super::{from_pb, pb, status_error};

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
pub(super) struct NotSent(pub(super) RpcError);

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
    pub(super) fn open(
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

    /// Whether the peer ended the stream because it does not serve `Calls`.
    pub(super) fn is_unimplemented(&self) -> bool {
        self.waiting.is_unimplemented()
    }

    /// Sends one call and waits for its answer (the caller bounds the wait by `deadline`).
    pub(super) async fn call(
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
