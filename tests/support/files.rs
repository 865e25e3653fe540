//! A temporary folder per test, with helpers to write settings and directory files.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// A temporary folder, removed on drop unless the test failed or `EPS_TESTS_KEEP` is set (then
/// its path is printed so the logs and settings in it can be read).
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    /// A new folder whose name starts with `prefix`.
    pub fn new(prefix: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("eps-tests-{prefix}-"))
            .tempdir()
            .expect("creating a temporary folder");
        let path = dir.path().to_path_buf();
        Self {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `rel` inside the folder (not created).
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    /// Creates the folder `rel` (and its parents) and returns its path.
    pub fn mkdir(&self, rel: impl AsRef<Path>) -> PathBuf {
        let p = self.join(rel);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }

    /// Writes `contents` to `rel`, creating parent folders.
    pub fn write(&self, rel: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
        }
        std::fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }

    /// Writes `value` as YAML to `rel`.
    pub fn write_yaml(&self, rel: impl AsRef<Path>, value: &Value) -> PathBuf {
        self.write(rel, serde_yaml_ng::to_string(value).expect("YAML"))
    }

    /// Writes `value` as pretty JSON to `rel`.
    pub fn write_json(&self, rel: impl AsRef<Path>, value: &Value) -> PathBuf {
        self.write(rel, serde_json::to_string_pretty(value).expect("JSON"))
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let keep = std::thread::panicking() || std::env::var_os("EPS_TESTS_KEEP").is_some();
        if let (true, Some(dir)) = (keep, self.dir.take()) {
            eprintln!("kept test folder {}", dir.keep().display());
        }
    }
}
