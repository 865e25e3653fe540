//! A chain on disk: one JSON record per line, appended and flushed to disk (fsync) before an
//! append returns.
//!
//! Only the last append can be cut short by a crash, so on open everything from the first
//! line that is incomplete (no final newline) or does not parse to the end of the file is a
//! torn tail: it is logged, cut off, and the rest read. A record that was acknowledged had
//! been flushed before, so it is never in a torn tail. Whether the lines read form a valid
//! chain is for the reader to verify ([`super::Chain::verify`]).

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::SignedRecord;

/// Why the chain file failed.
#[derive(Debug, thiserror::Error)]
#[error("chain file {}: {reason}", path.display())]
pub struct StoreError {
    pub path: PathBuf,
    pub reason: String,
}

/// What [`ChainFile::open`] read.
#[derive(Debug, Default)]
pub struct Loaded {
    pub records: Vec<SignedRecord>,
    /// Bytes of a torn tail cut off (0: none).
    pub torn_bytes: u64,
}

/// A chain file open for appending.
#[derive(Debug)]
pub struct ChainFile {
    path: PathBuf,
    file: File,
    len: u64,
}

impl ChainFile {
    /// Opens (creating it and its folder if needed) the chain file at `path`, reads its
    /// records and cuts off a torn tail.
    pub fn open(path: &Path) -> Result<(Self, Loaded), StoreError> {
        let err = |e: std::io::Error| StoreError {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(err)?;
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(err)?;
        if !existed {
            // The new file's name must survive a crash too.
            File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
        }
        let bytes = std::fs::read(path).map_err(err)?;
        let (records, good) = parse(&bytes);
        let torn_bytes = (bytes.len() - good) as u64;
        if torn_bytes > 0 {
            tracing::warn!(
                path = %path.display(),
                bytes = torn_bytes,
                records = records.len(),
                "chain file ends in a torn or unreadable tail (a write cut short): cut off"
            );
            file.set_len(good as u64).map_err(err)?;
            file.sync_all().map_err(err)?;
        }
        let store = Self {
            path: path.to_path_buf(),
            file,
            len: good as u64,
        };
        Ok((
            store,
            Loaded {
                records,
                torn_bytes,
            },
        ))
    }

    /// Appends `records`, one line each, and returns once they are on disk. On failure the
    /// file is cut back to where it was.
    pub fn append(&mut self, records: &[SignedRecord]) -> Result<(), StoreError> {
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r).expect("records serialize");
            buf.push(b'\n');
        }
        let written = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            let _ = self.file.set_len(self.len);
            return Err(StoreError {
                path: self.path.clone(),
                reason: e.to_string(),
            });
        }
        self.len += buf.len() as u64;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the chain file at `path` without changing anything: no file is created and a
    /// torn tail is only counted. A missing file is an empty chain.
    pub fn read(path: &Path) -> Result<Loaded, StoreError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(StoreError {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
            }
        };
        let (records, good) = parse(&bytes);
        Ok(Loaded {
            records,
            torn_bytes: (bytes.len() - good) as u64,
        })
    }
}

/// The records of whole, readable lines up to the first that is not, and the bytes they take.
fn parse(bytes: &[u8]) -> (Vec<SignedRecord>, usize) {
    let mut records = Vec::new();
    let mut good = 0usize;
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        if line.last() != Some(&b'\n') {
            break;
        }
        match serde_json::from_slice::<SignedRecord>(line) {
            Ok(r) => records.push(r),
            Err(_) => break,
        }
        good += line.len();
    }
    (records, good)
}
