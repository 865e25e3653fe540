//! The service directory.
//!
//! The directory is a list of records `{name, section, data, created_at}`; a record replaces
//! its operator's section. Folding the records in order gives one [`Entry`] per operator. The
//! embedded default reads `{"records": [...]}` JSON files from a folder in lexical order.
//!
//! Everything here is plain data and functions; the EPS server keeps one folded [`Directory`]
//! in memory and consults it once per call.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One change to the directory.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub name: String,
    pub section: String,
    pub data: Value,
    #[serde(default)]
    pub created_at: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordFile {
    records: Vec<Record>,
}

/// Channel type of an operator's gRPC server, `settings.address` (`host:port`).
pub const GRPC_SERVER: &str = "grpc_server";
/// Channel type of an operator that peers cannot dial: it opens a reverse stream to each peer
/// that may call it, and is reached only over those (no settings).
pub const REVERSE_STREAM: &str = "reverse_stream";

/// A way to reach an operator, e.g. `{type: grpc_server, settings: {address: "127.0.0.1:5556"}}`
/// or `{type: reverse_stream}`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Channel {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub settings: Value,
}

/// Who may use a service or method: `group` (or `*` for everyone) gets `rights`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Permission {
    pub group: String,
    #[serde(default)]
    pub rights: Vec<String>,
}

/// A method of a service; its permissions, when given, replace the service's.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Method {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Vec<Permission>>,
}

/// A service an operator offers to its peers.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Service {
    pub name: String,
    #[serde(default)]
    pub permissions: Vec<Permission>,
    #[serde(default)]
    pub methods: Vec<Method>,
}

/// Settings an operator publishes for a service, e.g. the proxy's `allowed_domains`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct ServiceSettings {
    pub service: String,
    #[serde(default)]
    pub environment: Option<String>,
    #[serde(default)]
    pub settings: Value,
}

/// A pinned certificate.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Certificate {
    pub fingerprint: String,
    #[serde(default)]
    pub key_usage: Option<String>,
}

/// Everything the directory says about one operator.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct Entry {
    pub name: String,
    #[serde(default)]
    pub channels: Vec<Channel>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub settings: Vec<ServiceSettings>,
    #[serde(default)]
    pub certificates: Vec<Certificate>,
}

/// Why the directory could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// The folder or one of its files cannot be read.
    #[error("{}: {reason}", path.display())]
    Io { path: PathBuf, reason: String },
    /// A file is not `{"records": [...]}`, or a record's data does not fit its section.
    #[error("{where_}: {reason}")]
    Invalid { where_: String, reason: String },
}

/// Why a caller may not call a method.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// No service of the target offers the method.
    #[error("{target} offers no method {method}")]
    UnknownMethod { target: String, method: String },
    /// The method exists but the caller has no `call` right for it.
    #[error("{caller} may not call {target}.{method}")]
    Forbidden {
        caller: String,
        target: String,
        method: String,
    },
}

/// The folded directory: one entry per operator.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    entries: HashMap<String, Entry>,
}

/// The sections a record may replace.
pub const SECTIONS: [&str; 5] = ["channels", "groups", "services", "settings", "certificates"];

/// `key_usage` of a pinned certificate that peers may present in TLS (the default when absent).
pub const KEY_USAGE_ENCRYPTION: &str = "encryption";
/// `key_usage` of a pinned certificate that signs the operator's directory records
/// (`eps_core::sd`); never accepted in TLS.
pub const KEY_USAGE_SIGNING: &str = "signing";

/// One section's data, parsed: what a record will put in place once it is known to fit.
enum SectionData {
    Channels(Vec<Channel>),
    Groups(Vec<String>),
    Services(Vec<Service>),
    Settings(Vec<ServiceSettings>),
    Certificates(Vec<Certificate>),
}

impl SectionData {
    fn parse(section: &str, data: &Value) -> Result<Self, String> {
        let e = |e: serde_json::Error| e.to_string();
        Ok(match section {
            "channels" => Self::Channels(Vec::deserialize(data).map_err(e)?),
            "groups" => Self::Groups(Vec::deserialize(data).map_err(e)?),
            "services" => Self::Services(Vec::deserialize(data).map_err(e)?),
            "settings" => Self::Settings(Vec::deserialize(data).map_err(e)?),
            "certificates" => {
                let pins: Vec<Certificate> = Vec::deserialize(data).map_err(e)?;
                if let Some(bad) = pins.iter().find_map(|c| {
                    c.key_usage
                        .as_deref()
                        .filter(|u| ![KEY_USAGE_ENCRYPTION, KEY_USAGE_SIGNING].contains(u))
                }) {
                    return Err(format!(
                        "key_usage {bad:?}: expected \"{KEY_USAGE_ENCRYPTION}\" or \"{KEY_USAGE_SIGNING}\""
                    ));
                }
                Self::Certificates(pins)
            }
            other => {
                return Err(format!(
                    "unknown section {other:?}; expected channels, groups, services, settings or certificates"
                ))
            }
        })
    }
}

impl Directory {
    /// Folds records in order; a later record replaces the earlier one of the same section.
    pub fn from_records(records: &[Record]) -> Result<Self, DirectoryError> {
        let mut d = Self::default();
        for (i, r) in records.iter().enumerate() {
            d.apply(&r.name, &r.section, &r.data)
                .map_err(|reason| DirectoryError::Invalid {
                    where_: format!("record {i} ({}, section {})", r.name, r.section),
                    reason,
                })?;
        }
        Ok(d)
    }

    /// Folds one record into the directory: `data` replaces `name`'s `section`. Nothing changes
    /// when the section is unknown or the data does not fit it (the error says why).
    pub fn apply(&mut self, name: &str, section: &str, data: &Value) -> Result<(), String> {
        let parsed = SectionData::parse(section, data)?;
        let entry = self
            .entries
            .entry(name.to_string())
            .or_insert_with(|| Entry {
                name: name.to_string(),
                ..Entry::default()
            });
        match parsed {
            SectionData::Channels(v) => entry.channels = v,
            SectionData::Groups(v) => entry.groups = v,
            SectionData::Services(v) => entry.services = v,
            SectionData::Settings(v) => entry.settings = v,
            SectionData::Certificates(v) => entry.certificates = v,
        }
        Ok(())
    }

    /// Reads every `*.json` file of `dir` in lexical order and folds their records.
    pub fn load_dir(dir: &Path) -> Result<Self, DirectoryError> {
        let io = |path: &Path, e: std::io::Error| DirectoryError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("json"))
            .collect();
        files.sort();
        let mut records = Vec::new();
        for path in files {
            let text = std::fs::read(&path).map_err(|e| io(&path, e))?;
            let file: RecordFile =
                serde_json::from_slice(&text).map_err(|e| DirectoryError::Invalid {
                    where_: path.display().to_string(),
                    reason: e.to_string(),
                })?;
            records.extend(file.records);
        }
        Self::from_records(&records)
    }

    /// The entry of `name`, if the directory knows that operator.
    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    /// The operators (other than `name`) that hold a `call` right on one of `name`'s services
    /// or methods, by name: the peers a server that cannot be dialed holds reverse streams to.
    pub fn callers_of(&self, name: &str) -> Vec<&Entry> {
        let Some(me) = self.entry(name) else {
            return Vec::new();
        };
        let groups: Vec<&str> = me
            .services
            .iter()
            .flat_map(|s| {
                s.methods
                    .iter()
                    .filter_map(|m| m.permissions.as_ref())
                    .flatten()
                    .chain(&s.permissions)
            })
            .filter(|p| p.rights.iter().any(|r| r == "call"))
            .map(|p| p.group.as_str())
            .collect();
        let mut callers: Vec<&Entry> = self
            .entries
            .values()
            .filter(|e| e.name != name)
            .filter(|e| {
                groups
                    .iter()
                    .any(|g| *g == "*" || e.groups.iter().any(|eg| eg == g))
            })
            .collect();
        callers.sort_by(|a, b| a.name.cmp(&b.name));
        callers
    }

    /// Every entry, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// Number of operators.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no operator is known.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Entry {
    /// The address of this operator's first `grpc_server` channel: where calls to it go.
    pub fn grpc_address(&self) -> Option<&str> {
        self.grpc_addresses().next()
    }

    /// The addresses of all of this operator's `grpc_server` channels: one per instance of an
    /// operator that runs several EPS servers. A server that cannot be dialed holds a reverse
    /// stream to each.
    pub fn grpc_addresses(&self) -> impl Iterator<Item = &str> {
        self.channels
            .iter()
            .filter(|c| c.kind == GRPC_SERVER)
            .filter_map(|c| c.settings.get("address"))
            .filter_map(Value::as_str)
    }

    /// True when the directory says peers reach this operator over the reverse streams it opens
    /// (a `reverse_stream` channel), not by dialing it.
    pub fn reached_by_reverse_stream(&self) -> bool {
        self.channels.iter().any(|c| c.kind == REVERSE_STREAM)
    }

    /// True when the certificate with this fingerprint may speak for the operator in TLS:
    /// either no TLS certificate is pinned, or this one is. Signing pins do not count: a
    /// signing certificate never opens a connection, and pinning one does not pin TLS.
    pub fn accepts_fingerprint(&self, fingerprint: &str) -> bool {
        let mut tls = self
            .certificates
            .iter()
            .filter(|c| c.key_usage.as_deref() != Some(KEY_USAGE_SIGNING))
            .peekable();
        tls.peek().is_none() || tls.any(|c| c.fingerprint.eq_ignore_ascii_case(fingerprint))
    }

    /// True when this fingerprint is pinned as one of the operator's signing certificates.
    pub fn pins_signing(&self, fingerprint: &str) -> bool {
        self.certificates.iter().any(|c| {
            c.key_usage.as_deref() == Some(KEY_USAGE_SIGNING)
                && c.fingerprint.eq_ignore_ascii_case(fingerprint)
        })
    }

    /// The settings this operator publishes for `service` (first match).
    pub fn service_settings(&self, service: &str) -> Option<&Value> {
        self.settings
            .iter()
            .find(|s| s.service == service)
            .map(|s| &s.settings)
    }

    /// Checks that `caller` may call `method` on this operator.
    pub fn authorize(&self, caller: &Entry, method: &str) -> Result<(), AccessError> {
        let found = self.services.iter().find_map(|s| {
            s.methods
                .iter()
                .find(|m| m.name == method)
                .map(|m| m.permissions.as_ref().unwrap_or(&s.permissions))
        });
        let Some(permissions) = found else {
            return Err(AccessError::UnknownMethod {
                target: self.name.clone(),
                method: method.to_string(),
            });
        };
        let allowed = permissions.iter().any(|p| {
            (p.group == "*" || caller.groups.contains(&p.group))
                && p.rights.iter().any(|r| r == "call")
        });
        if allowed {
            Ok(())
        } else {
            Err(AccessError::Forbidden {
                caller: caller.name.clone(),
                target: self.name.clone(),
                method: method.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(name: &str, section: &str, data: Value) -> Record {
        Record {
            name: name.into(),
            section: section.into(),
            data,
            created_at: None,
        }
    }

    fn sample() -> Directory {
        Directory::from_records(&[
            rec("a", "groups", json!(["proxies"])),
            rec("b", "groups", json!(["others"])),
            rec("c", "groups", json!([])),
            rec(
                "t",
                "services",
                json!([{
                    "name": "proxy",
                    "permissions": [{"group": "proxies", "rights": ["call"]}],
                    "methods": [
                        {"name": "announce"},
                        {"name": "open", "permissions": [{"group": "*", "rights": ["call"]}]},
                        {"name": "closed", "permissions": []}
                    ]
                }]),
            ),
            rec(
                "t",
                "channels",
                json!([{"type": "grpc_server", "settings": {"address": "127.0.0.1:1"}}]),
            ),
            rec(
                "t",
                "channels",
                json!([{"type": "grpc_server", "settings": {"address": "127.0.0.1:2"}}]),
            ),
        ])
        .unwrap()
    }

    #[test]
    fn later_records_replace_sections() {
        let d = sample();
        assert_eq!(d.entry("t").unwrap().grpc_address(), Some("127.0.0.1:2"));
        assert_eq!(d.entry("a").unwrap().groups, vec!["proxies".to_string()]);
        assert!(d.entry("zz").is_none());
    }

    #[test]
    fn permissions_follow_groups_methods_and_star() {
        let d = sample();
        let t = d.entry("t").unwrap();
        let (a, b, c) = (
            d.entry("a").unwrap(),
            d.entry("b").unwrap(),
            d.entry("c").unwrap(),
        );
        assert_eq!(t.authorize(a, "announce"), Ok(()));
        assert!(matches!(
            t.authorize(b, "announce"),
            Err(AccessError::Forbidden { .. })
        ));
        assert_eq!(t.authorize(c, "open"), Ok(()));
        assert!(matches!(
            t.authorize(a, "closed"),
            Err(AccessError::Forbidden { .. })
        ));
        assert!(matches!(
            t.authorize(a, "nope"),
            Err(AccessError::UnknownMethod { .. })
        ));
    }

    #[test]
    fn callers_are_the_operators_with_a_call_right() {
        let mut d = sample();
        let names = |d: &Directory, of: &str| -> Vec<String> {
            d.callers_of(of).iter().map(|e| e.name.clone()).collect()
        };
        // "open" grants everyone, so a, b and c all may call t.
        assert_eq!(names(&d, "t"), ["a", "b", "c"]);
        assert!(names(&d, "a").is_empty());
        assert!(names(&d, "nobody").is_empty());
        d = Directory::from_records(&[
            rec("a", "groups", json!(["proxies"])),
            rec("b", "groups", json!(["others"])),
            rec(
                "t",
                "services",
                json!([{"name": "s", "permissions": [{"group": "proxies", "rights": ["call"]},
                                                     {"group": "others", "rights": []}],
                        "methods": [{"name": "m"}]}]),
            ),
            rec("t", "channels", json!([{"type": "reverse_stream"}])),
            rec(
                "a",
                "channels",
                json!([{"type": "grpc_server", "settings": {"address": "10.0.0.1:1"}},
                       {"type": "grpc_server", "settings": {"address": "10.0.0.2:1"}}]),
            ),
        ])
        .unwrap();
        assert_eq!(names(&d, "t"), ["a"]);
        let t = d.entry("t").unwrap();
        assert!(t.reached_by_reverse_stream() && t.grpc_address().is_none());
        let a = d.entry("a").unwrap();
        assert!(!a.reached_by_reverse_stream());
        assert_eq!(
            a.grpc_addresses().collect::<Vec<_>>(),
            ["10.0.0.1:1", "10.0.0.2:1"]
        );
    }

    #[test]
    fn fingerprints_pin_only_when_present() {
        let mut e = Entry::default();
        assert!(e.accepts_fingerprint("ab"));
        e.certificates.push(Certificate {
            fingerprint: "AB".into(),
            key_usage: None,
        });
        assert!(e.accepts_fingerprint("ab"));
        assert!(!e.accepts_fingerprint("cd"));
        assert!(!e.pins_signing("ab"));
    }

    #[test]
    fn signing_pins_are_not_tls_pins() {
        let pin = |fp: &str, usage: &str| json!({"fingerprint": fp, "key_usage": usage});
        let d = Directory::from_records(&[
            rec("a", "certificates", json!([pin("51", "signing")])),
            rec(
                "b",
                "certificates",
                json!([pin("51", "signing"), pin("e1", "encryption")]),
            ),
        ])
        .unwrap();
        let (a, b) = (d.entry("a").unwrap(), d.entry("b").unwrap());
        // Only a signing pin: TLS is as unpinned, and the signing certificate is no TLS pin.
        assert!(a.accepts_fingerprint("anything") && a.pins_signing("51"));
        assert!(!b.accepts_fingerprint("51") && b.accepts_fingerprint("E1"));
        assert!(b.pins_signing("51") && !b.pins_signing("e1"));
        let e = Directory::from_records(&[rec("a", "certificates", json!([pin("1", "signin")]))])
            .unwrap_err();
        assert!(e.to_string().contains("signin"), "{e}");
    }

    #[test]
    fn a_record_that_does_not_fit_changes_nothing() {
        let mut d = sample();
        let before = d.entry("t").unwrap().clone();
        assert!(d.apply("t", "channels", &json!({"not": "a list"})).is_err());
        assert!(d.apply("t", "bogus", &json!([])).is_err());
        assert!(d.apply("new", "bogus", &json!([])).is_err());
        assert_eq!(d.entry("t"), Some(&before));
        assert!(d.entry("new").is_none(), "no empty entry left behind");
    }

    #[test]
    fn bad_section_is_an_error() {
        let e = Directory::from_records(&[rec("a", "bogus", json!([]))]).unwrap_err();
        assert!(e.to_string().contains("bogus"));
        let e = Directory::from_records(&[rec("a", "groups", json!({"x": 1}))]).unwrap_err();
        assert!(e.to_string().contains("groups"));
    }
}
