//! Settings directories.
//!
//! A settings variable (`EPS_SETTINGS`, `PROXY_SETTINGS`) names a colon-separated list of
//! directories. Every `*.yml` / `*.yaml` file in each, in lexical order, is read and the
//! documents are deep-merged: mappings merge key by key, anything else is replaced by the later
//! file. Before merging, string values are expanded:
//!
//! - `$DIR` is the absolute directory of the file the value is written in;
//! - `$NAME` is the variable `NAME` bound by a `vars:` section, e.g.
//!   `vars: {REDIS_PASSWORD: {source: env, variable: EPS_REDIS_PASSWORD, type: string}}`;
//! - `$$` is a literal `$`.
//!
//! The merged document is then deserialized into the caller's type, whose structs deny unknown
//! fields. Every error names the file (or directory) and the key, and what was expected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

/// Why settings could not be loaded. Always the operator's fault: the message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The settings variable is not set.
    #[error("{0} is not set: it must name one or more settings directories, separated by ':'")]
    NotSet(String),
    /// A named directory does not exist or cannot be listed.
    #[error("settings directory {}: {reason}", path.display())]
    Directory { path: PathBuf, reason: String },
    /// The directories hold no settings file at all.
    #[error("no *.yml or *.yaml file in {dirs}")]
    Empty { dirs: String },
    /// A file is not valid YAML, or not a mapping at its top.
    #[error("{}: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    /// A `vars:` entry or a `$NAME` reference is wrong.
    #[error("{}: at `{key}`: {reason}", path.display())]
    Variable {
        path: PathBuf,
        key: String,
        reason: String,
    },
    /// The merged settings do not fit the expected shape (unknown key, wrong type, missing key).
    #[error("{where_}: at `{key}`: {reason}")]
    Invalid {
        where_: String,
        key: String,
        reason: String,
    },
}

/// A secret setting (a password): printed as `***` by `Debug` and when settings are serialized.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// One entry of a `vars:` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VarSpec {
    source: VarSource,
    variable: String,
    #[serde(rename = "type", default)]
    kind: VarType,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum VarSource {
    Env,
}

#[derive(Debug, Default, Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum VarType {
    #[default]
    String,
    Integer,
    Boolean,
}

/// A file as read, expanded and ready to merge.
struct SettingsFile {
    path: PathBuf,
    doc: Value,
}

/// The directories of a colon-separated list, as `EPS_SETTINGS` and `eps.embedded` name them
/// (empty entries skipped).
pub fn dir_list(raw: &str) -> Vec<PathBuf> {
    raw.split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// Loads settings from the directories named by the environment variable `var`.
pub fn load_from_env<T: DeserializeOwned>(var: &str) -> Result<T, SettingsError> {
    let raw = std::env::var(var).map_err(|_| SettingsError::NotSet(var.to_string()))?;
    let dirs = dir_list(&raw);
    if dirs.is_empty() {
        return Err(SettingsError::NotSet(var.to_string()));
    }
    load_dirs(&dirs)
}

/// Loads, merges and deserializes every settings file in `dirs`.
pub fn load_dirs<T: DeserializeOwned>(dirs: &[PathBuf]) -> Result<T, SettingsError> {
    let merged = load_merged(dirs)?;
    deserialize(&merged.0, &merged.1, dirs)
}

/// Reads every file and returns the merged document plus the per-file documents (used to say
/// which file a bad key came from).
fn load_merged(dirs: &[PathBuf]) -> Result<(Value, Vec<SettingsFile>), SettingsError> {
    let mut files = Vec::new();
    for dir in dirs {
        files.extend(list_yaml_files(dir)?);
    }
    if files.is_empty() {
        let dirs = dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(SettingsError::Empty { dirs });
    }
    let mut docs = Vec::with_capacity(files.len());
    for path in files {
        docs.push(read_file(&path)?);
    }
    // Variables may be bound in any file and used in any other.
    let mut vars: BTreeMap<String, (VarSpec, PathBuf)> = BTreeMap::new();
    for (path, doc) in &mut docs {
        if let Some(section) = doc.as_object_mut().and_then(|m| m.remove("vars")) {
            let specs: BTreeMap<String, VarSpec> = serde_path_to_error::deserialize(section)
                .map_err(|e| SettingsError::Variable {
                    path: path.clone(),
                    key: format!("vars.{}", e.path()),
                    reason: e.inner().to_string(),
                })?;
            for (name, spec) in specs {
                vars.insert(name, (spec, path.clone()));
            }
        }
    }
    let mut merged = Value::Object(Map::new());
    let mut expanded = Vec::with_capacity(docs.len());
    for (path, mut doc) in docs {
        let dir = path
            .parent()
            .map(absolute)
            .unwrap_or_else(|| PathBuf::from("."));
        expand(&mut doc, &dir, &vars, &path, &mut String::new())?;
        merge(&mut merged, doc.clone());
        expanded.push(SettingsFile { path, doc });
    }
    Ok((merged, expanded))
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

fn list_yaml_files(dir: &Path) -> Result<Vec<PathBuf>, SettingsError> {
    let entries = std::fs::read_dir(dir).map_err(|e| SettingsError::Directory {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| SettingsError::Directory {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let path = entry.path();
        let is_yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yml") | Some("yaml")
        );
        if is_yaml && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn read_file(path: &Path) -> Result<(PathBuf, Value), SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|e| SettingsError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let yaml: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).map_err(|e| SettingsError::Parse {
            path: path.to_path_buf(),
            reason: format!("not valid YAML: {e}"),
        })?;
    let doc = match yaml {
        serde_yaml_ng::Value::Null => Value::Object(Map::new()),
        other => serde_json::to_value(other).map_err(|e| SettingsError::Parse {
            path: path.to_path_buf(),
            reason: format!("unsupported YAML: {e}"),
        })?,
    };
    if !doc.is_object() {
        return Err(SettingsError::Parse {
            path: path.to_path_buf(),
            reason: "expected a mapping at the top of the file".into(),
        });
    }
    Ok((path.to_path_buf(), doc))
}

/// Expands `$DIR`, `$NAME` and `$$` in every string of `v`. `key` is the dotted path so far.
fn expand(
    v: &mut Value,
    dir: &Path,
    vars: &BTreeMap<String, (VarSpec, PathBuf)>,
    file: &Path,
    key: &mut String,
) -> Result<(), SettingsError> {
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                let len = key.len();
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(k);
                expand(child, dir, vars, file, key)?;
                key.truncate(len);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter_mut().enumerate() {
                let len = key.len();
                key.push_str(&format!("[{i}]"));
                expand(child, dir, vars, file, key)?;
                key.truncate(len);
            }
        }
        Value::String(s) if s.contains('$') => {
            *v = expand_string(s, dir, vars).map_err(|reason| SettingsError::Variable {
                path: file.to_path_buf(),
                key: key.clone(),
                reason,
            })?;
        }
        _ => {}
    }
    Ok(())
}

fn expand_string(
    s: &str,
    dir: &Path,
    vars: &BTreeMap<String, (VarSpec, PathBuf)>,
) -> Result<Value, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.char_indices().peekable();
    let mut whole: Option<Value> = None;
    while let Some((i, c)) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        if let Some((_, '$')) = chars.peek() {
            chars.next();
            out.push('$');
            continue;
        }
        let start = i + 1;
        let mut end = start;
        while let Some(&(j, n)) = chars.peek() {
            if n.is_ascii_alphanumeric() || n == '_' {
                end = j + n.len_utf8();
                chars.next();
            } else {
                break;
            }
        }
        let name = &s[start..end];
        if name.is_empty() {
            return Err("a lone `$`: write `$$` for a literal dollar sign".into());
        }
        let value = if name == "DIR" {
            dir.display().to_string()
        } else {
            let (spec, _) = vars.get(name).ok_or_else(|| {
                format!("`${name}` is not bound: add it to a `vars:` section or write `$$`")
            })?;
            let VarSource::Env = spec.source;
            let raw = std::env::var(&spec.variable).map_err(|_| {
                format!(
                    "`${name}` reads the environment variable {}, which is not set",
                    spec.variable
                )
            })?;
            // A value that is exactly one typed variable takes that variable's type.
            if start == 1 && end == s.len() {
                whole = Some(typed(&raw, spec.kind, &spec.variable)?);
            }
            raw
        };
        out.push_str(&value);
    }
    Ok(whole.unwrap_or(Value::String(out)))
}

fn typed(raw: &str, kind: VarType, variable: &str) -> Result<Value, String> {
    match kind {
        VarType::String => Ok(Value::String(raw.to_string())),
        VarType::Integer => raw
            .trim()
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| format!("{variable}={raw:?} is not an integer")),
        VarType::Boolean => match raw.trim() {
            "true" | "1" | "yes" => Ok(Value::Bool(true)),
            "false" | "0" | "no" => Ok(Value::Bool(false)),
            _ => Err(format!("{variable}={raw:?} is not a boolean")),
        },
    }
}

/// Deep merge: mappings merge key by key, anything else in `b` replaces `a`. A mapping whose
/// `type` differs from the earlier one's (`datastore: {type: redis, ...}` over
/// `{type: file, ...}`) replaces it whole, since its other keys belong to the old type.
pub fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) if !matches!((a.get("type"), b.get("type")), (Some(x), Some(y)) if x != y) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (a, b) => *a = b,
    }
}

fn deserialize<T: DeserializeOwned>(
    merged: &Value,
    files: &[SettingsFile],
    dirs: &[PathBuf],
) -> Result<T, SettingsError> {
    serde_path_to_error::deserialize(merged).map_err(|e| {
        let key = e.path().to_string();
        let reason = e.inner().to_string();
        // Name the last file that writes this key (or its nearest parent).
        let where_ = blame(files, &key).unwrap_or_else(|| {
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        });
        SettingsError::Invalid {
            where_,
            key,
            reason,
        }
    })
}

fn blame(files: &[SettingsFile], key: &str) -> Option<String> {
    let segments: Vec<&str> = key.split('.').filter(|s| *s != "?").collect();
    for depth in (1..=segments.len()).rev() {
        for file in files.iter().rev() {
            if lookup(&file.doc, &segments[..depth]) {
                return Some(file.path.display().to_string());
            }
        }
    }
    None
}

fn lookup(doc: &Value, segments: &[&str]) -> bool {
    let mut cur = doc;
    for seg in segments {
        // serde_path_to_error writes sequence items as `name[3]`.
        let (name, index) = match seg.find('[') {
            Some(i) => (
                &seg[..i],
                seg[i + 1..].trim_end_matches(']').parse::<usize>().ok(),
            ),
            None => (*seg, None),
        };
        if !name.is_empty() {
            match cur.get(name) {
                Some(v) => cur = v,
                None => return false,
            }
        }
        if let Some(i) = index {
            match cur.get(i) {
                Some(v) => cur = v,
                None => return false,
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct S {
        name: String,
        #[serde(default)]
        port: u16,
        #[serde(default)]
        nested: Option<Nested>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Nested {
        path: String,
        flag: bool,
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn later_files_win_and_mappings_merge() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "10.yml",
            "name: a\nport: 1\nnested: {path: x, flag: false}\n",
        );
        write(d.path(), "20.yaml", "port: 2\nnested: {flag: true}\n");
        write(d.path(), "ignored.txt", "not: read\n");
        let s: S = load_dirs(&[d.path().to_path_buf()]).unwrap();
        assert_eq!(s.port, 2);
        assert_eq!(
            s.nested,
            Some(Nested {
                path: "x".into(),
                flag: true
            })
        );
    }

    #[test]
    fn a_new_type_replaces_the_whole_mapping() {
        let mut a = serde_json::json!({"d": {"type": "file", "settings": {"path": "x"}}, "k": 1});
        merge(
            &mut a,
            serde_json::json!({"d": {"type": "redis", "settings": {"addresses": []}}}),
        );
        assert_eq!(
            a,
            serde_json::json!({"d": {"type": "redis", "settings": {"addresses": []}}, "k": 1})
        );
        merge(&mut a, serde_json::json!({"d": {"settings": {"key": "k"}}}));
        assert_eq!(
            a["d"]["settings"],
            serde_json::json!({"addresses": [], "key": "k"})
        );
    }

    #[test]
    fn dir_and_vars_expand() {
        let d = tempfile::tempdir().unwrap();
        std::env::set_var("EPS_TEST_SETTINGS_PORT", "4242");
        write(
            d.path(),
            "a.yml",
            "vars:\n  P: {source: env, variable: EPS_TEST_SETTINGS_PORT, type: integer}\nname: $DIR/x$$y\nport: $P\n",
        );
        let s: S = load_dirs(&[d.path().to_path_buf()]).unwrap();
        let dir = std::fs::canonicalize(d.path()).unwrap();
        assert_eq!(s.name, format!("{}/x$y", dir.display()));
        assert_eq!(s.port, 4242);
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "10.yml", "name: a\n");
        write(
            d.path(),
            "20.yml",
            "nested: {path: x, flag: true, bogus: 1}\n",
        );
        let e = load_dirs::<S>(&[d.path().to_path_buf()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("20.yml"), "{e}");
        assert!(e.contains("nested"), "{e}");
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn wrong_type_names_file_and_key() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "10.yml", "name: a\nport: many\n");
        let e = load_dirs::<S>(&[d.path().to_path_buf()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("10.yml") && e.contains("port"), "{e}");
    }

    #[test]
    fn missing_directory_and_unbound_variable_are_errors() {
        let e = load_dirs::<S>(&[PathBuf::from("/nonexistent/eps")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/eps"), "{e}");
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "a.yml", "name: $NOPE\n");
        let e = load_dirs::<S>(&[d.path().to_path_buf()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a.yml") && e.contains("name") && e.contains("NOPE"),
            "{e}"
        );
    }
}
