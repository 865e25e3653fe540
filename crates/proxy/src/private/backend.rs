//! Where each announced domain's clients go (docs/architecture.md §3.5): an endpoint, whether
//! it gets a PROXY header, and whether TLS passes through to it or ends here. An announcement
//! that names none of these takes `private.internal_endpoint` and `private.proxy_protocol`,
//! with TLS passed through.
//!
//! The table is rebuilt whenever the announcements change (SIGHUP, `announceConnection`); a
//! domain whose options did not change keeps its [`Backend`] (its TLS config and ACME task);
//! a relay in progress holds what it dialed and is never touched by a change.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::acme::Acme;
use super::terminate::{CertSource, Terminator};
use super::{BadAnnouncement, Wanted};
use crate::settings::TlsHandling;

/// A domain's backend.
pub struct Backend {
    /// The options it was made from, defaults applied.
    spec: Spec,
    /// Present when TLS ends at the private proxy.
    pub terminator: Option<Terminator>,
}

impl Backend {
    /// `host:port` relayed clients go to.
    pub fn endpoint(&self) -> &str {
        &self.spec.endpoint
    }

    /// Whether the endpoint gets a PROXY header first.
    pub fn proxy_protocol(&self) -> bool {
        self.spec.proxy_protocol
    }
}

/// A backend's options with the defaults applied: equal specs make the same backend.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Spec {
    endpoint: String,
    proxy_protocol: bool,
    tls: TlsHandling,
}

/// The defaults of announcements that name no backend (`private.internal_endpoint`,
/// `private.proxy_protocol`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    pub endpoint: String,
    pub proxy_protocol: bool,
}

/// Domain → backend.
#[derive(Default)]
pub struct Backends {
    map: RwLock<HashMap<String, Arc<Backend>>>,
}

impl Backends {
    /// The backend of `domain`, if it is announced.
    pub fn get(&self, domain: &str) -> Option<Arc<Backend>> {
        self.map.read().expect("lock").get(domain).cloned()
    }

    /// The table for `wanted` (later entries win for their domain), reusing the current
    /// backends whose options are unchanged. Nothing is replaced until [`install`](Self::install).
    pub fn plan<'a>(
        &self,
        wanted: impl IntoIterator<Item = &'a Wanted>,
        defaults: &Defaults,
        acme: Option<&Arc<Acme>>,
    ) -> Result<HashMap<String, Arc<Backend>>, BadAnnouncement> {
        let current = self.map.read().expect("lock").clone();
        let mut specs: HashMap<&str, Spec> = HashMap::new();
        for w in wanted {
            let spec = Spec {
                endpoint: w
                    .internal_endpoint
                    .clone()
                    .unwrap_or_else(|| defaults.endpoint.clone()),
                proxy_protocol: w.proxy_protocol.unwrap_or(defaults.proxy_protocol),
                tls: w.tls.clone().unwrap_or_default(),
            };
            specs.insert(&w.domain, spec);
        }
        let mut planned = HashMap::with_capacity(specs.len());
        for (domain, spec) in specs {
            let backend = match current.get(domain) {
                Some(b) if b.spec == spec => b.clone(),
                _ => Arc::new(build(domain, spec, acme)?),
            };
            planned.insert(domain.to_string(), backend);
        }
        Ok(planned)
    }

    /// Replaces the table. Backends no longer in it are dropped once no dial-back holds them
    /// (an ACME task stops then).
    pub fn install(&self, planned: HashMap<String, Arc<Backend>>) {
        *self.map.write().expect("lock") = planned;
    }
}

fn build(domain: &str, spec: Spec, acme: Option<&Arc<Acme>>) -> Result<Backend, BadAnnouncement> {
    let bad = |reason: String| BadAnnouncement::Backend {
        domain: domain.to_string(),
        reason,
    };
    spec.tls.check().map_err(bad)?;
    let terminator = if spec.tls.terminates() {
        let source =
            match (&spec.tls.certificate, &spec.tls.key) {
                (Some(cert), Some(key)) => CertSource::Files(
                    eps_core::tls::certificate_resolver(cert, key)
                        .map_err(|e| bad(format!("tls: {e}")))?,
                ),
                _ => {
                    let acme = acme.ok_or_else(|| {
                    bad("tls: no certificate and key, and no ACME client (private.acme, read at \
                         start)"
                        .into())
                })?;
                    if domain.starts_with("*.") {
                        return Err(bad(
                        "tls: ACME's TLS-ALPN-01 challenge cannot obtain a wildcard certificate"
                            .into(),
                    ));
                    }
                    CertSource::Acme(acme.manage(domain))
                }
            };
        Some(Terminator::new(source, &spec.tls.alpn).map_err(|e| bad(format!("tls: {e}")))?)
    } else {
        None
    };
    Ok(Backend { spec, terminator })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(json: &str) -> Wanted {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_apply_and_unchanged_backends_are_kept() {
        let defaults = Defaults {
            endpoint: "127.0.0.1:8888".into(),
            proxy_protocol: false,
        };
        // A store file written before backends existed: no backend fields.
        let old = wanted(r#"{"domain": "a.example.com", "proxy": "p", "expires_at": null}"#);
        let b = wanted(
            r#"{"domain": "b.example.com", "proxy": "p", "internal_endpoint": "10.0.0.2:80",
                "proxy_protocol": true}"#,
        );
        let backends = Backends::default();
        backends.install(backends.plan([&old, &b], &defaults, None).unwrap());
        let a1 = backends.get("a.example.com").unwrap();
        assert_eq!(
            (a1.endpoint(), a1.proxy_protocol()),
            ("127.0.0.1:8888", false)
        );
        let b1 = backends.get("b.example.com").unwrap();
        assert_eq!((b1.endpoint(), b1.proxy_protocol()), ("10.0.0.2:80", true));
        assert!(a1.terminator.is_none() && b1.terminator.is_none());

        // New defaults: the domain that takes them changes, the other is kept as it was.
        let moved = Defaults {
            endpoint: "127.0.0.1:9999".into(),
            ..defaults
        };
        backends.install(backends.plan([&old, &b], &moved, None).unwrap());
        assert_eq!(
            backends.get("a.example.com").unwrap().endpoint(),
            "127.0.0.1:9999"
        );
        assert!(Arc::ptr_eq(&backends.get("b.example.com").unwrap(), &b1));

        // A later entry wins for its domain; a terminated one without files needs ACME.
        let acme =
            wanted(r#"{"domain": "a.example.com", "proxy": "p", "tls": {"mode": "terminate"}}"#);
        let e = backends.plan([&old, &acme], &moved, None).err().unwrap();
        assert!(e.to_string().contains("no certificate and key"), "{e}");
        assert!(
            backends.get("a.example.com").is_some(),
            "nothing replaced on failure"
        );
    }
}
