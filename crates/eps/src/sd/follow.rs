//! An EPS server following a directory server: it asks for the records after its head
//! (`getRecords`, which waits at the server until there is one), verifies them itself against
//! its own trust settings, appends them to its own copy of the chain and only then swaps in the
//! new directory. A batch that does not verify is refused whole and logged, and the directory in
//! use stays. At start the server reads and verifies its copy, so it starts and routes when the
//! directory server is down.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use eps_core::backoff::Backoff;
use eps_core::http::{CallError, RpcClient};
use eps_core::jsonrpc;
use eps_core::sd::protocol::{self as p, GetRecords, Records};
use eps_core::sd::{Chain, ChainFile, SignedRecord, Trust};
use tokio_util::sync::CancellationToken;

use super::settings::FollowSettings;
use crate::peers::SharedDirectory;

/// First pause after a failed attempt to reach the directory server.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Reads and verifies the local copy of the chain without changing it (for commands that look
/// at the directory while the server may run).
pub fn read_copy(s: &FollowSettings) -> anyhow::Result<Chain> {
    let trust = Trust::from_settings(&s.trust).context("directory.settings.trust")?;
    let loaded = ChainFile::read(&s.path)?;
    Chain::verify(loaded.records, &trust).with_context(|| {
        format!(
            "the copy of the chain in {} does not verify",
            s.path.display()
        )
    })
}

/// The follower's state: its verified chain and the file it keeps it in.
pub struct Follower {
    settings: FollowSettings,
    trust: std::sync::Arc<Trust>,
    client: RpcClient,
    chain: Chain,
    file: Option<ChainFile>,
    /// The last refusal logged, so that the same refused batch is not logged every retry.
    last_refusal: Option<String>,
}

impl Follower {
    /// Reads and verifies the local copy of the chain. A copy that does not verify (the trust
    /// settings changed, or the file was altered) is set aside as `PATH.refused` and the server
    /// starts from an empty chain, to be fetched again.
    pub fn open(s: &FollowSettings) -> anyhow::Result<Self> {
        let trust = Trust::from_settings(&s.trust).context("directory.settings.trust")?;
        let client = RpcClient::new(&s.url, s.tls.as_ref(), s.wait + s.timeout)
            .context("directory.settings")?;
        let t0 = Instant::now();
        let (mut file, loaded) = ChainFile::open(&s.path)?;
        let chain = match Chain::verify(loaded.records, &trust) {
            Ok(c) => c,
            Err(e) => {
                let aside = s.path.with_extension("refused");
                tracing::error!(
                    path = %s.path.display(),
                    moved_to = %aside.display(),
                    "the local copy of the directory does not verify, starting from an empty one: {e}"
                );
                drop(file);
                std::fs::rename(&s.path, &aside)
                    .with_context(|| format!("moving {} aside", s.path.display()))?;
                file = ChainFile::open(&s.path)?.0;
                Chain::new()
            }
        };
        tracing::info!(
            path = %s.path.display(),
            records = chain.len(),
            operators = chain.directory().len(),
            ms = t0.elapsed().as_millis() as u64,
            "local copy of the directory verified"
        );
        Ok(Self {
            settings: s.clone(),
            trust: std::sync::Arc::new(trust),
            client,
            chain,
            file: Some(file),
            last_refusal: None,
        })
    }

    /// The directory the verified chain folds into.
    pub fn directory(&self) -> &eps_core::directory::Directory {
        self.chain.directory()
    }

    /// Fetches and applies what the directory server has beyond the local copy, for up to the
    /// `timeout` setting; false when it could not be reached or its records were refused (the
    /// server then starts from its copy).
    pub async fn catch_up(&mut self, directory: &SharedDirectory) -> bool {
        let deadline = Instant::now() + self.settings.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.fetch(Duration::ZERO, left).await {
                Ok(r) if r.records.is_empty() => return true,
                Ok(r) => {
                    if !self.apply(r.records, directory).await {
                        return false;
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        url = %self.settings.url,
                        records = self.chain.len(),
                        "directory server not reached at start, routing from the local copy: {e}"
                    );
                    return false;
                }
            }
        }
    }

    /// Follows the directory server until `shutdown`.
    pub async fn run(mut self, directory: SharedDirectory, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(FIRST_BACKOFF, self.settings.max_reconnect_backoff);
        let mut reachable = true;
        loop {
            let fetched = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.fetch(self.settings.wait, self.settings.wait + self.settings.timeout) => r,
            };
            let pause = match fetched {
                Ok(r) => {
                    if !reachable {
                        tracing::info!(url = %self.settings.url, "directory server reachable again");
                        reachable = true;
                    }
                    if r.records.is_empty() || self.apply(r.records, &directory).await {
                        backoff.reset();
                        continue;
                    }
                    backoff.fail()
                }
                Err(e) => {
                    if reachable {
                        tracing::warn!(
                            url = %self.settings.url,
                            records = self.chain.len(),
                            "directory server unreachable, routing from the verified copy: {e}"
                        );
                        reachable = false;
                    } else {
                        tracing::debug!(url = %self.settings.url, "directory server unreachable: {e}");
                    }
                    backoff.fail()
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// One `getRecords` after the local head.
    async fn fetch(&self, wait: Duration, deadline: Duration) -> Result<Records, String> {
        let params = GetRecords {
            after: self.chain.head().map(str::to_string),
            limit: None,
            wait: Some(wait.as_secs_f64()),
        };
        let raw = self
            .client
            .call_with_deadline(p::GET_RECORDS, &jsonrpc::to_raw(&params), deadline)
            .await
            .map_err(|e| match e {
                CallError::Rpc(e) if e.code == p::UNKNOWN_HASH => format!(
                    "the directory server does not have this server's head record (it lost \
                     records, or serves another chain); keeping the verified copy: {e}"
                ),
                e => e.to_string(),
            })?;
        serde_json::from_str(raw.get()).map_err(|e| format!("unexpected getRecords answer: {e}"))
    }

    /// Verifies `records` as the continuation of the local chain, stores them and swaps the
    /// directory; true when they were applied. Refused records are logged and change nothing.
    async fn apply(&mut self, records: Vec<SignedRecord>, directory: &SharedDirectory) -> bool {
        let (mut chain, mut file, trust) = (
            std::mem::take(&mut self.chain),
            self.file
                .take()
                .expect("the chain file is put back after each batch"),
            self.trust.clone(),
        );
        let n = records.len();
        // Verification is CPU work (an ECDSA check per record): off the runtime's threads.
        let (chain, file, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = match chain.check(&records, &trust) {
                Err(e) => Err(format!("refused, keeping the last good directory: {e}")),
                Ok(checked) => match file.append(&records) {
                    Err(e) => Err(format!("not stored, keeping the last good directory: {e}")),
                    Ok(()) => {
                        chain.commit(records, checked);
                        Ok(())
                    }
                },
            };
            (chain, file, outcome)
        })
        .await
        .expect("verifying records does not panic");
        self.chain = chain;
        self.file = Some(file);
        match outcome {
            Ok(()) => {
                directory.store(self.chain.directory().clone());
                self.last_refusal = None;
                tracing::info!(
                    records = n,
                    length = self.chain.len(),
                    head = self.chain.head().unwrap_or(""),
                    operators = self.chain.directory().len(),
                    "directory records verified and applied"
                );
                true
            }
            Err(e) => {
                if self.last_refusal.as_deref() != Some(e.as_str()) {
                    tracing::error!(url = %self.settings.url, "directory records from the directory server {e}");
                    self.last_refusal = Some(e);
                }
                false
            }
        }
    }
}
