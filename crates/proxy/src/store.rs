//! The embedded store: one JSON file, replaced atomically on every change.
//!
//! Write a temporary file in the same folder, fsync it, rename it over the old one, fsync the
//! folder. A crash at any point leaves the old or the new file, never a torn one, and a write
//! that returned is on disk.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[error("store {}: {reason}", path.display())]
pub struct StoreError {
    pub path: PathBuf,
    pub reason: String,
}

/// A list of `T` kept in one JSON file.
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    /// Opens (and creates the folder of) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let err = |e: std::io::Error| StoreError {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let dir = parent(path);
        std::fs::create_dir_all(dir).map_err(err)?;
        // Temporary files of writes cut short by a crash: the store itself is intact.
        let prefix = temp_prefix(path);
        for entry in std::fs::read_dir(dir).map_err(err)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// Reads the list; a missing file is an empty list.
    pub fn load<T: DeserializeOwned>(&self) -> Result<Vec<T>, StoreError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError {
                path: self.path.clone(),
                reason: format!("not a valid store file: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(StoreError {
                path: self.path.clone(),
                reason: e.to_string(),
            }),
        }
    }

    /// Replaces the list on disk; returns once it is durable.
    pub async fn save<T: Serialize>(&self, items: &[T]) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(items).map_err(|e| StoreError {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
            .await
            .map_err(|e| StoreError {
                path: self.path.clone(),
                reason: e.to_string(),
            })?
    }
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Temporary files are named `.FILE.tmp*` beside the store, so `open` can tell them apart.
fn temp_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.tmp")
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    let err = |e: std::io::Error| StoreError {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let dir = parent(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(&temp_prefix(path))
        .tempfile_in(dir)
        .map_err(err)?;
    tmp.write_all(bytes).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_missing_file() {
        let d = tempfile::tempdir().unwrap();
        let s = FileStore::open(&d.path().join("sub/a.json")).unwrap();
        assert!(s.load::<u32>().unwrap().is_empty());
        s.save(&[1u32, 2, 3]).await.unwrap();
        assert_eq!(s.load::<u32>().unwrap(), vec![1, 2, 3]);
        std::fs::write(d.path().join("sub/a.json"), b"{torn").unwrap();
        assert!(s.load::<u32>().is_err());
        let stale = d.path().join("sub/.a.json.tmpXYZ");
        std::fs::write(&stale, b"[]").unwrap();
        FileStore::open(&d.path().join("sub/a.json")).unwrap();
        assert!(
            !stale.exists(),
            "a crashed write's temporary file is removed on open"
        );
    }
}
