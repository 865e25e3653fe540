//! The directory server's JSON-RPC methods (`eps_core::sd::protocol`): submissions checked
//! and made durable before they are acknowledged, and reads, with `getRecords` waiting for the
//! next record when asked to.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use eps_core::http::{Handler, Peer};
use eps_core::jsonrpc::{self, Outcome, Request, RpcError};
use eps_core::sd::protocol::{
    self as p, Appended, Entries, GetEntry, GetRecords, Head, Records, Submit,
};
use eps_core::sd::{chain, Chain, ChainError, ChainFile, Refusal, SignedRecord, Trust};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use tokio::sync::{watch, RwLock, Semaphore};
use tokio_util::sync::CancellationToken;

use super::settings::SdLimits;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    /// `ok`, a refusal's reason (`Refusal::kind`), `invalid` or `store_error`.
    outcome: String,
}

/// The directory server's Prometheus metrics.
pub struct SdMetrics {
    records: Gauge,
    submissions: Family<OutcomeLabels, Counter>,
    waiting: Gauge,
}

impl SdMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            records: Gauge::default(),
            submissions: Family::default(),
            waiting: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("eps_sd");
        r.register("records", "Records in the chain", m.records.clone());
        r.register(
            "submissions",
            "submitRecords calls by outcome",
            m.submissions.clone(),
        );
        r.register(
            "waiting_followers",
            "getRecords calls waiting for a new record",
            m.waiting.clone(),
        );
        m
    }

    fn submitted(&self, outcome: &str) {
        self.submissions
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }
}

/// The chain, its file, and who waits for it to grow.
pub struct DirectoryService {
    chain: RwLock<Chain>,
    file: Arc<Mutex<ChainFile>>,
    trust: Trust,
    limits: SdLimits,
    /// The chain's length, for `getRecords` calls waiting for a new record.
    length: watch::Sender<usize>,
    waiters: Semaphore,
    shutdown: CancellationToken,
    metrics: SdMetrics,
}

impl DirectoryService {
    pub fn new(
        chain: Chain,
        file: ChainFile,
        trust: Trust,
        limits: SdLimits,
        shutdown: CancellationToken,
        metrics: SdMetrics,
    ) -> Self {
        metrics.records.set(chain.len() as i64);
        Self {
            length: watch::Sender::new(chain.len()),
            chain: RwLock::new(chain),
            file: Arc::new(Mutex::new(file)),
            waiters: Semaphore::new(limits.max_waiters),
            trust,
            limits,
            shutdown,
            metrics,
        }
    }

    /// `submitRecords`: the records are checked as the continuation of the chain, written and
    /// flushed, and only then acknowledged. All or none.
    async fn submit(&self, s: Submit) -> Outcome {
        let n = s.records.len();
        if n == 0 || n > self.limits.max_records_per_submit {
            self.metrics.submitted("invalid");
            return Err(RpcError::invalid_params(format!(
                "submit 1 to {} records, not {n}",
                self.limits.max_records_per_submit
            )));
        }
        let mut chain = self.chain.write().await;
        // The chain's own reasons first (a replayed old record is a replay, not a clock
        // matter), then the clock.
        let checked = match chain
            .check(&s.records, &self.trust)
            .and_then(|c| self.clock_check(&s.records).map(|()| c))
        {
            Ok(c) => c,
            Err(e) => {
                self.metrics.submitted(e.refusal.kind());
                tracing::info!(error = %e, "submission refused");
                return Err(p::refused(&e));
            }
        };
        let (file, records) = (self.file.clone(), s.records.clone());
        let stored = tokio::task::spawn_blocking(move || {
            file.lock().expect("chain file lock").append(&records)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = stored {
            self.metrics.submitted("store_error");
            tracing::error!(error = %e, "records not stored: submission refused");
            return Err(RpcError::internal(format!("records not stored: {e}")));
        }
        let what: Vec<String> = s
            .records
            .iter()
            .take(8)
            .map(|r| format!("{}/{}", r.name, r.section))
            .collect();
        chain.commit(s.records, checked);
        let answer = Appended {
            appended: n,
            head: chain.head().map(str::to_string),
            length: chain.len(),
        };
        drop(chain);
        self.length.send_replace(answer.length);
        self.metrics.records.set(answer.length as i64);
        self.metrics.submitted("ok");
        tracing::info!(
            appended = n,
            length = answer.length,
            head = answer.head.as_deref().unwrap_or(""),
            records = %what.join(" "),
            "records appended"
        );
        Ok(jsonrpc::to_raw(&answer))
    }

    /// Refuses records whose `created_at` is too far from this server's clock: followers
    /// check certificates at that time, so it must be about now when the record is appended.
    fn clock_check(&self, records: &[SignedRecord]) -> Result<(), ChainError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let max = self.limits.max_clock_skew;
        for (index, r) in records.iter().enumerate() {
            let Ok(at) = chain::parse_time(&r.created_at) else {
                continue; // the chain check says what is wrong with it
            };
            if at.unix_timestamp().abs_diff(now) > max.as_secs() {
                return Err(ChainError {
                    index,
                    name: r.name.clone(),
                    section: r.section.clone(),
                    hash: r.hash.clone(),
                    refusal: Box::new(Refusal::ClockSkew {
                        at: r.created_at.clone(),
                        max_s: max.as_secs(),
                    }),
                });
            }
        }
        Ok(())
    }

    /// `getRecords`: the records after `after`, waiting up to `wait` for one when there are
    /// none yet.
    async fn get_records(&self, g: GetRecords) -> Outcome {
        let limit = g
            .limit
            .unwrap_or(self.limits.max_records_per_answer)
            .min(self.limits.max_records_per_answer);
        let wait = match g.wait {
            Some(w) if w.is_finite() && w > 0.0 => {
                Duration::from_secs_f64(w.min(self.limits.max_wait.as_secs_f64()))
            }
            _ => Duration::ZERO,
        };
        // Subscribed before looking, so that a record appended in between is not missed.
        let mut grown = self.length.subscribe();
        if let Some(answer) = self
            .records_after(g.after.as_deref(), limit, wait.is_zero())
            .await?
        {
            return Ok(answer);
        }
        let Ok(_slot) = self.waiters.try_acquire() else {
            return Err(RpcError::new(
                p::BUSY,
                format!(
                    "{} getRecords calls are waiting already; try again later",
                    self.limits.max_waiters
                ),
            ));
        };
        self.metrics.waiting.inc();
        tokio::select! {
            _ = grown.changed() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = self.shutdown.cancelled() => {}
        }
        self.metrics.waiting.dec();
        Ok(self
            .records_after(g.after.as_deref(), limit, true)
            .await?
            .expect("answered when asked to answer even without records"))
    }

    /// The answer with the records after `after` (at most `limit`); `None` when there are none
    /// and `even_if_none` is off.
    async fn records_after(
        &self,
        after: Option<&str>,
        limit: usize,
        even_if_none: bool,
    ) -> Result<Option<Box<serde_json::value::RawValue>>, RpcError> {
        let chain = self.chain.read().await;
        let Some(rest) = chain.after(after) else {
            return Err(RpcError::new(
                p::UNKNOWN_HASH,
                format!(
                    "no record {} in this chain (length {}, head {})",
                    after.unwrap_or(""),
                    chain.len(),
                    chain.head().unwrap_or("none")
                ),
            ));
        };
        if rest.is_empty() && !even_if_none {
            return Ok(None);
        }
        let answer = Records {
            records: rest[..rest.len().min(limit)].to_vec(),
            head: chain.head().map(str::to_string),
            length: chain.len(),
        };
        Ok(Some(jsonrpc::to_raw(&answer)))
    }

    async fn entries(&self) -> Outcome {
        let chain = self.chain.read().await;
        let mut entries: Vec<_> = chain.directory().entries().cloned().collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(jsonrpc::to_raw(&Entries {
            entries,
            head: chain.head().map(str::to_string),
            length: chain.len(),
        }))
    }

    async fn entry(&self, g: GetEntry) -> Outcome {
        let chain = self.chain.read().await;
        match chain.directory().entry(&g.name) {
            Some(e) => Ok(jsonrpc::to_raw(e)),
            None => Err(RpcError::new(
                jsonrpc::UNKNOWN_OPERATOR,
                format!("{:?} is not in the directory", g.name),
            )),
        }
    }

    async fn head(&self) -> Outcome {
        let chain = self.chain.read().await;
        Ok(jsonrpc::to_raw(&Head {
            head: chain.head().map(str::to_string),
            length: chain.len(),
        }))
    }
}

/// The params of `req` as `T`; absent params read as `{}`.
fn params<T: DeserializeOwned>(req: &Request) -> Result<T, RpcError> {
    let text = req.params.as_ref().map_or("{}", |p| p.get());
    serde_json::from_str(text).map_err(|e| RpcError::invalid_params(format!("{}: {e}", req.method)))
}

/// The directory server's JSON-RPC methods.
pub struct SdRpc(pub Arc<DirectoryService>);

impl Handler for SdRpc {
    async fn call(&self, req: Request, _peer: Peer) -> Outcome {
        match req.method.as_str() {
            // On its own task: a caller that stops waiting (its deadline, a hang-up) must not
            // stop a submission between its append to the file and its commit in memory (the
            // file would hold records the chain does not, and the next start would refuse it).
            p::SUBMIT_RECORDS => {
                let (me, s) = (self.0.clone(), params(&req)?);
                tokio::spawn(async move { me.submit(s).await })
                    .await
                    .unwrap_or_else(|e| Err(RpcError::internal(format!("submission failed: {e}"))))
            }
            p::GET_RECORDS => self.0.get_records(params(&req)?).await,
            p::GET_ENTRIES => self.0.entries().await,
            p::GET_ENTRY => self.0.entry(params(&req)?).await,
            p::GET_HEAD => self.0.head().await,
            other => Err(RpcError::method_not_found(format!(
                "the directory server has no method {other:?}; it has {}, {}, {}, {} and {}",
                p::SUBMIT_RECORDS,
                p::GET_RECORDS,
                p::GET_ENTRIES,
                p::GET_ENTRY,
                p::GET_HEAD
            ))),
        }
    }
}
