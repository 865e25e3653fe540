//! The signed service directory: records in one append-only hash chain, each signed by its
//! writer, folded into the [`Directory`](crate::directory::Directory) exactly as record files
//! fold.
//!
//! A [`SignedRecord`] is a directory record (`name`, `section`, `data`, `created_at`) with
//! `parent_hash` (the previous record's hash; null for the first), `hash` (SHA-256 of the
//! canonical encoding, [`canon`]), `signature` (ECDSA P-256 SHA-256 over the same bytes, ASN.1
//! DER in base64) and `certificate` (the signer's, base64 DER or PEM). Whoever reads a chain
//! (the directory server, every EPS server following it, `eps sd verify`) checks every record
//! itself against its own [`Trust`]: the parent is the head, the hash is right, the
//! certificate has key usage digitalSignature and chains to the CA, the signature verifies,
//! and the signer may write it ([`rights`]). Everything here is plain data and functions, bar
//! the chain file ([`store`]).
//!
//! # Layout
//! - [`canon`]: the canonical encoding and the hash.
//! - [`signer`]: signing certificates (what they must carry) and signing keys.
//! - [`rights`]: administrators, and what an operator may write for itself.
//! - [`trust`]: the CA and administrators a reader trusts, from its settings.
//! - [`chain`]: checking records in order and folding them ([`Chain`]).
//! - [`store`]: the chain file: append + fsync, torn tail cut off on open.
//! - [`protocol`]: the directory server's JSON-RPC methods.

pub mod canon;
pub mod chain;
pub mod protocol;
pub mod rights;
pub mod signer;
pub mod store;
pub mod trust;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use chain::{Chain, ChainError, Checked, Refusal};
pub use signer::{SignerCert, SigningKey};
pub use store::ChainFile;
pub use trust::{Trust, TrustSettings};

/// A directory record in the chain, with what makes it verifiable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRecord {
    pub name: String,
    pub section: String,
    pub data: Value,
    /// RFC 3339; the signing certificate must be valid at this time.
    pub created_at: String,
    /// The previous record's hash; null for the first record.
    pub parent_hash: Option<String>,
    /// SHA-256 of the canonical encoding, lowercase hex.
    pub hash: String,
    /// ECDSA P-256 SHA-256 over the canonical encoding, ASN.1 DER, base64.
    pub signature: String,
    /// The signer's certificate: base64 of the DER, or PEM (then intermediates may follow).
    pub certificate: String,
}

#[cfg(test)]
mod tests;
