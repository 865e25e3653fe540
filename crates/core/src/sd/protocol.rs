//! The directory server's JSON-RPC methods: their names, params and results, and the error
//! codes of refused records. Shared by the server, the EPS servers that follow it and the
//! `eps sd` commands.

use serde::{Deserialize, Serialize};

use super::{ChainError, Refusal, SignedRecord};
use crate::directory::Entry;
use crate::jsonrpc::{self, RpcError};

/// Appends records: `{records: [SignedRecord]}` → [`Appended`]. All or none.
pub const SUBMIT_RECORDS: &str = "submitRecords";
/// The records after a hash, waiting for new ones: [`GetRecords`] → [`Records`].
pub const GET_RECORDS: &str = "getRecords";
/// Every folded entry: `{}` → [`Entries`].
pub const GET_ENTRIES: &str = "getEntries";
/// One folded entry: `{name}` → [`Entry`]; 404 when the directory does not know it.
pub const GET_ENTRY: &str = "getEntry";
/// The chain's head: `{}` → [`Head`].
pub const GET_HEAD: &str = "getHead";

/// A record's signature, hash, certificate or data is wrong.
pub const INVALID_RECORD: i64 = 422;
/// `after` names no record of the chain (a follower ahead of, or forked from, the server).
pub const UNKNOWN_HASH: i64 = 404;
/// Every waiting slot is taken; try again after a pause.
pub const BUSY: i64 = 503;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Submit {
    pub records: Vec<SignedRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Appended {
    pub appended: usize,
    pub head: Option<String>,
    pub length: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetRecords {
    /// The last record the caller has; none: from the first record.
    #[serde(default)]
    pub after: Option<String>,
    /// At most this many records (the server caps it).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Seconds to wait for a record when there is none after `after` yet (the server caps
    /// it); 0 or none answers at once.
    #[serde(default)]
    pub wait: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Records {
    pub records: Vec<SignedRecord>,
    pub head: Option<String>,
    pub length: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entries {
    pub entries: Vec<Entry>,
    pub head: Option<String>,
    pub length: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetEntry {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Head {
    pub head: Option<String>,
    pub length: usize,
}

/// The JSON-RPC error for a refused record: 409 when it does not continue the chain (wrong
/// parent, replayed), 403 when its signer may not write it, 422 otherwise; `data` holds the
/// record's `index` and `hash` and the `reason` ([`Refusal::kind`]).
pub fn refused(e: &ChainError) -> RpcError {
    let code = match *e.refusal {
        Refusal::WrongParent { .. } | Refusal::Replayed => jsonrpc::CONFLICT,
        Refusal::Rights(_) => jsonrpc::FORBIDDEN,
        _ => INVALID_RECORD,
    };
    RpcError {
        data: Some(serde_json::json!({
            "index": e.index,
            "hash": e.hash,
            "reason": e.refusal.kind(),
        })),
        ..RpcError::new(code, format!("refused: {e}"))
    }
}

/// The `reason` of an error made by [`refused`].
pub fn refusal_kind(e: &RpcError) -> Option<&str> {
    e.data.as_ref()?.get("reason")?.as_str()
}
