//! What a host name is, for every part of the proxies: the SNI a client sends, the domains
//! operators announce, and the wildcard form `*.parent` an announcement may take.
//!
//! A host name is 1 to 253 bytes of `[A-Za-z0-9.-]` in labels of 1 to 63 bytes, without a
//! trailing dot, compared in lowercase; it is not an IP address, and its last label is not all
//! digits (URL parsers read `127.1` or `a.1` as IPv4 addresses). A wildcard `*.P` stands for
//! every name with exactly one label more than `P` (`a.P`, not `P` nor `a.b.P`); `P` itself must
//! be a host name of at least two labels, so `*.com` is refused.

use std::net::IpAddr;

/// Longest host name (RFC 1035, without the trailing dot).
const MAX_HOST_NAME: usize = 253;
/// Longest label.
const MAX_LABEL: usize = 63;
/// What starts a wildcard announcement.
pub const WILDCARD: &str = "*.";

/// Why a name is not a host name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{why}: \"{name}\"")]
pub struct InvalidHostName {
    why: &'static str,
    name: String,
}

/// Checks `name` and returns it in lowercase.
pub fn host_name(name: &[u8]) -> Result<String, InvalidHostName> {
    let invalid = |why| InvalidHostName {
        why,
        name: name.escape_ascii().to_string(),
    };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() > MAX_HOST_NAME {
        return Err(invalid("longer than 253 bytes"));
    }
    if !name
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || *b == b'.' || *b == b'-')
    {
        return Err(invalid("characters outside [A-Za-z0-9.-]"));
    }
    if name.ends_with(b".") {
        return Err(invalid("trailing dot"));
    }
    if name
        .split(|b| *b == b'.')
        .any(|label| label.is_empty() || label.len() > MAX_LABEL)
    {
        return Err(invalid("empty label or label over 63 bytes"));
    }
    let name = String::from_utf8_lossy(name).to_ascii_lowercase();
    let last = name.rsplit('.').next().unwrap_or_default();
    if name.parse::<IpAddr>().is_ok() || last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(InvalidHostName {
            why: "an IP address, not a host name",
            name,
        });
    }
    Ok(name)
}

/// An announced domain: a host name or a wildcard `*.parent`, trimmed and in lowercase.
pub fn announced_name(domain: &str) -> Result<String, InvalidHostName> {
    let d = domain.trim();
    match d.strip_prefix(WILDCARD) {
        Some(parent) => {
            let parent = host_name(parent.as_bytes())?;
            if !parent.contains('.') {
                return Err(InvalidHostName {
                    why: "a wildcard needs a parent of at least two labels",
                    name: d.to_string(),
                });
            }
            Ok(format!("{WILDCARD}{parent}"))
        }
        None => host_name(d.as_bytes()),
    }
}

/// The parent a wildcard announcement names (`apps.example.com` for `*.apps.example.com`).
pub fn wildcard_parent(announced: &str) -> Option<&str> {
    announced.strip_prefix(WILDCARD)
}

/// The name with its first label removed: the parent a wildcard must name to cover it.
pub fn parent(name: &str) -> Option<&str> {
    name.split_once('.').map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        assert_eq!(host_name(b"A.Example.COM").unwrap(), "a.example.com");
        for bad in [
            &b""[..],
            b"a..b",
            b"a.b.",
            b"a b.c",
            b"127.0.0.1",
            b"a.1",
            b"127.1",
            b"::1",
            b"*.example.com",
        ] {
            assert!(host_name(bad).is_err(), "{}", bad.escape_ascii());
        }
        assert!(host_name("a".repeat(64).as_bytes()).is_err());
        assert!(host_name(format!("{}.b", "a".repeat(63)).as_bytes()).is_ok());
        assert_eq!(host_name(b"1a.b2").unwrap(), "1a.b2");
    }

    #[test]
    fn announced_names_and_wildcards() {
        assert_eq!(
            announced_name(" *.Apps.Example.com ").unwrap(),
            "*.apps.example.com"
        );
        assert_eq!(announced_name("x.example.com").unwrap(), "x.example.com");
        for bad in [
            "*.com",
            "*",
            "*.",
            "a.*.example.com",
            "**.example.com",
            "*.1.2",
        ] {
            assert!(announced_name(bad).is_err(), "{bad}");
        }
        assert_eq!(
            wildcard_parent("*.apps.example.com"),
            Some("apps.example.com")
        );
        assert_eq!(wildcard_parent("apps.example.com"), None);
    }
}
