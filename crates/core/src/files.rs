//! Noticing that files changed: the stamps that TLS material and the directory are re-read on.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// What identifies one version of a file: modification time, length and inode (a file
/// replaced by rename keeps neither). `None`: the file could not be read.
pub type Stamp = Option<(SystemTime, u64, u64)>;

/// The stamp of one file.
pub fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// The stamps of every entry of a directory, in name order: changes when a file in it is
/// added, removed, replaced or written.
pub fn dir_stamp(dir: &Path) -> Vec<(PathBuf, Stamp)> {
    let mut entries: Vec<(PathBuf, Stamp)> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .map(|p| {
                let s = stamp(&p);
                (p, s)
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    entries.sort();
    entries
}
