//! The verified chain: records checked one by one (parent, hash, signer, signature, rights,
//! data) and folded into the directory they describe.

use std::collections::HashMap;

use base64::Engine as _;

use super::canon::{self, Content};
use super::rights::{self, RightsError};
use super::signer::B64;
use super::trust::Trust;
use super::SignedRecord;
use crate::directory::Directory;

/// Why one record is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Its hash is already in the chain: the same record sent again.
    #[error("already in the chain (a replayed record)")]
    Replayed,
    /// Its `parent_hash` is not the hash of the record before it.
    #[error("parent_hash {got} is not the chain's head {expected}")]
    WrongParent { expected: String, got: String },
    /// A number that is not an integer (no canonical encoding).
    #[error("{0}")]
    NotCanonical(String),
    /// `hash` is not the SHA-256 of the canonical encoding.
    #[error("hash does not match the record's content (which hashes to {actual})")]
    HashMismatch { actual: String },
    /// `created_at` is not an RFC 3339 time.
    #[error("created_at {0:?} is not an RFC 3339 time")]
    BadTime(String),
    /// `created_at` is too far from the directory server's clock (checked on submission only).
    #[error("created_at {at} is more than {max_s} s from the directory server's clock")]
    ClockSkew { at: String, max_s: u64 },
    /// The certificate is unreadable, cannot sign, or does not chain to the trusted CA.
    #[error("{0}")]
    Certificate(String),
    /// The signing certificate was not valid at `created_at`.
    #[error("the certificate of {name} is not valid at created_at {at}")]
    NotValidAt { name: String, at: String },
    /// The signature does not verify with the certificate's key.
    #[error("the signature does not verify with the certificate of {name}")]
    BadSignature { name: String },
    /// The signer may not write this record.
    #[error(transparent)]
    Rights(#[from] RightsError),
    /// The data does not fit the section (or the section is unknown).
    #[error("{0}")]
    Invalid(String),
}

impl Refusal {
    /// A short word for the reason, for programs (`data.reason` of a JSON-RPC error) and
    /// metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Replayed => "replayed",
            Self::WrongParent { .. } => "wrong_parent",
            Self::NotCanonical(_) => "not_canonical",
            Self::HashMismatch { .. } => "hash_mismatch",
            Self::BadTime(_) => "bad_time",
            Self::ClockSkew { .. } => "clock_skew",
            Self::Certificate(_) => "certificate",
            Self::NotValidAt { .. } => "certificate_expired",
            Self::BadSignature { .. } => "bad_signature",
            Self::Rights(_) => "forbidden",
            Self::Invalid(_) => "invalid_data",
        }
    }
}

/// A record refused, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record {index} ({name}, section {section}, hash {hash}): {refusal}")]
pub struct ChainError {
    /// Position of the record in the batch checked.
    pub index: usize,
    pub name: String,
    pub section: String,
    pub hash: String,
    pub refusal: Box<Refusal>,
}

/// Records that passed [`Chain::check`], ready for [`Chain::commit`].
#[derive(Debug)]
pub struct Checked {
    directory: Directory,
    count: usize,
    head: Option<String>,
}

/// A verified chain of records and the directory they fold into.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    records: Vec<SignedRecord>,
    /// Position of each record by hash.
    index: HashMap<String, usize>,
    directory: Directory,
}

/// `parent_hash` as it reads in messages.
fn shown(hash: Option<&str>) -> String {
    hash.map_or_else(|| "null (the first record)".into(), str::to_string)
}

impl Chain {
    /// The empty chain.
    pub fn new() -> Self {
        Self::default()
    }

    /// Verifies `records` as a whole chain from its first record.
    pub fn verify(records: Vec<SignedRecord>, trust: &Trust) -> Result<Self, ChainError> {
        let mut chain = Self::new();
        chain.append(records, trust)?;
        Ok(chain)
    }

    /// Checks `records` as the continuation of this chain, each against the directory as
    /// folded up to its parent. Nothing changes; the first refusal is the error.
    pub fn check(&self, records: &[SignedRecord], trust: &Trust) -> Result<Checked, ChainError> {
        let mut directory = self.directory.clone();
        let mut head = self.head().map(str::to_string);
        let mut seen = std::collections::HashSet::new();
        for (index, r) in records.iter().enumerate() {
            let fail = |refusal| ChainError {
                index,
                name: r.name.clone(),
                section: r.section.clone(),
                hash: r.hash.clone(),
                refusal: Box::new(refusal),
            };
            if self.index.contains_key(&r.hash) || !seen.insert(r.hash.as_str()) {
                return Err(fail(Refusal::Replayed));
            }
            if r.parent_hash != head {
                return Err(fail(Refusal::WrongParent {
                    expected: shown(head.as_deref()),
                    got: shown(r.parent_hash.as_deref()),
                }));
            }
            check_record(r, &directory, trust).map_err(fail)?;
            directory
                .apply(&r.name, &r.section, &r.data)
                .map_err(|e| fail(Refusal::Invalid(e)))?;
            head = Some(r.hash.clone());
        }
        Ok(Checked {
            directory,
            count: records.len(),
            head,
        })
    }

    /// Appends records [`check`](Self::check) passed; `records` must be the ones checked, and
    /// the chain unchanged since.
    pub fn commit(&mut self, records: Vec<SignedRecord>, checked: Checked) {
        assert_eq!(records.len(), checked.count, "commit the records checked");
        assert!(
            records.is_empty() || records.last().map(|r| &r.hash) == checked.head.as_ref(),
            "commit the records checked"
        );
        for r in records {
            self.index.insert(r.hash.clone(), self.records.len());
            self.records.push(r);
        }
        self.directory = checked.directory;
    }

    /// Checks and appends `records`, all or none.
    pub fn append(&mut self, records: Vec<SignedRecord>, trust: &Trust) -> Result<(), ChainError> {
        let checked = self.check(&records, trust)?;
        self.commit(records, checked);
        Ok(())
    }

    /// The hash of the last record.
    pub fn head(&self) -> Option<&str> {
        self.records.last().map(|r| r.hash.as_str())
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn records(&self) -> &[SignedRecord] {
        &self.records
    }

    /// The records after the one with hash `after` (all of them for `None`); `None` when no
    /// record of this chain has that hash.
    pub fn after(&self, after: Option<&str>) -> Option<&[SignedRecord]> {
        match after {
            None => Some(&self.records),
            Some(h) => self.index.get(h).map(|&i| &self.records[i + 1..]),
        }
    }

    /// The directory the chain folds into.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }
}

/// The checks of one record that do not depend on its place: encoding and hash, time,
/// certificate, signature, and the signer's right to write it into `directory`.
fn check_record(r: &SignedRecord, directory: &Directory, trust: &Trust) -> Result<(), Refusal> {
    let bytes = r
        .content()
        .encode()
        .map_err(|e| Refusal::NotCanonical(e.to_string()))?;
    let actual = canon::hash(&bytes);
    if actual != r.hash {
        return Err(Refusal::HashMismatch { actual });
    }
    let at = parse_time(&r.created_at)?.unix_timestamp();
    let signer = trust.signer(&r.certificate, at, &r.created_at)?;
    let signature = B64.decode(&r.signature).unwrap_or_default();
    if !signer.verifies(&bytes, &signature) {
        return Err(Refusal::BadSignature {
            name: signer.name.clone(),
        });
    }
    rights::authorize(
        directory,
        trust.administrators(),
        &signer.name,
        &signer.fingerprint,
        &r.name,
        &r.section,
    )?;
    Ok(())
}

/// `created_at` as a time.
pub fn parse_time(s: &str) -> Result<time::OffsetDateTime, Refusal> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|_| Refusal::BadTime(s.to_string()))
}

impl SignedRecord {
    /// The fields the hash and signature cover.
    pub fn content(&self) -> Content<'_> {
        Content {
            created_at: &self.created_at,
            data: &self.data,
            name: &self.name,
            parent_hash: self.parent_hash.as_deref(),
            section: &self.section,
        }
    }
}
