//! What a profile from `--profile` says a process spent its CPU on: each sample's call stack
//! (read with `perf script`) is put under the work it belongs to (the relay, the EPS call, the
//! runtime's sleeping and waking, ...) and under what it was doing at the leaf (a system call by
//! name, TLS, JSON, the allocator, ...). The shares, turned into µs with the process's CPU per
//! connection, are what the closing notes of issue 15 quote.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

/// The work a sample belongs to: the first of these whose patterns appear anywhere in its
/// stack. Order matters: a relay's `sendto` is the relay's, not the runtime's.
const WORK: &[(&str, &[&str])] = &[
    ("relay", &["proxy::relay::"]),
    (
        "incomingConnection (checks, data connection, internal dial)",
        &["proxy::private::incoming"],
    ),
    (
        "EPS link (broker, gRPC, JSON-RPC, their TLS)",
        &[
            "eps_core::link",
            "eps_core::http",
            "eps::broker",
            "eps::grpc",
            "h2::",
            "tonic::",
            "hyper::",
            "hyper_util::",
        ],
    ),
    ("data pool (pre-dialing)", &["proxy::pool::"]),
    (
        "client (accept, ClientHello, routing, token)",
        &["proxy::public::", "proxy::listener::", "proxy::admission::"],
    ),
    (
        "runtime (sleeping, waking; other tasks)",
        &["tokio::runtime::", "epoll_wait", "futex"],
    ),
];

/// What the leaf was doing, if it is in no system call: the first match among the innermost
/// frames.
const DOING: &[(&str, &[&str])] = &[
    ("TLS", &["rustls::", "ring_core"]),
    ("JSON", &["serde_json::"]),
    ("HTTP/2, gRPC", &["h2::", "tonic::", "prost::"]),
    ("HTTP/1", &["hyper::", "hyper_util::"]),
    ("logging", &["tracing"]),
    ("allocator", &["mi_", "malloc", "cfree", "realloc"]),
    ("tokio", &["tokio::"]),
    ("own code", &["proxy::", "eps::", "eps_core::"]),
];

/// How many of the leaf's frames [`DOING`] looks at.
const LEAF_FRAMES: usize = 12;

/// A profile's samples, by work and by what the leaf did.
#[derive(Debug, Default)]
pub struct Breakdown {
    pub samples: usize,
    pub work: Vec<(String, usize)>,
    pub doing: Vec<(String, usize)>,
}

impl Breakdown {
    /// Reads `file` (a `perf record` file) with `perf script`.
    pub fn of(file: &Path) -> anyhow::Result<Self> {
        let out = Command::new("perf")
            .args(["script", "-F", "ip,sym", "-i"])
            .arg(file)
            .output()
            .context("running perf script")?;
        if !out.status.success() {
            bail!(
                "perf script -i {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Self::from_script(&String::from_utf8_lossy(&out.stdout)))
    }

    /// `perf script -F ip,sym` output: one stack per sample, innermost frame first, samples
    /// separated by blank lines.
    pub fn from_script(text: &str) -> Self {
        let (mut work, mut doing) = (HashMap::new(), HashMap::new());
        let mut samples = 0;
        for stack in text.split("\n\n") {
            let frames: Vec<&str> = stack
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            if frames.is_empty() {
                continue;
            }
            samples += 1;
            *work.entry(work_of(&frames)).or_insert(0) += 1;
            *doing.entry(doing_of(&frames)).or_insert(0) += 1;
        }
        let sorted = |m: HashMap<String, usize>| {
            let mut v: Vec<(String, usize)> = m.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            v
        };
        Self {
            samples,
            work: sorted(work),
            doing: sorted(doing),
        }
    }

    /// One line: each part in µs of `total_us` (the process's CPU per connection), the largest
    /// first, parts under 2% folded into "other".
    pub fn line(parts: &[(String, usize)], samples: usize, total_us: f64) -> String {
        let mut shown = Vec::new();
        let mut other = 0.0;
        for (name, n) in parts {
            let share = *n as f64 / samples.max(1) as f64;
            if share < 0.02 || name == "other" {
                other += share;
            } else {
                shown.push(format!("{name} {:.0}", share * total_us));
            }
        }
        if other > 0.0 {
            shown.push(format!("other {:.0}", other * total_us));
        }
        shown.join(", ")
    }
}

fn work_of(frames: &[&str]) -> String {
    WORK.iter()
        .find(|(_, pats)| frames.iter().any(|f| pats.iter().any(|p| f.contains(p))))
        .map_or("other", |(name, _)| name)
        .to_string()
}

fn doing_of(frames: &[&str]) -> String {
    // The innermost system call, by the kernel's name for it.
    for f in frames {
        if let Some(i) = f.find("__x64_sys_") {
            let name = &f[i + "__x64_sys_".len()..];
            return format!("{}(2)", name.split_whitespace().next().unwrap_or(name));
        }
    }
    let leaf = &frames[..frames.len().min(LEAF_FRAMES)];
    DOING
        .iter()
        .find(|(_, pats)| leaf.iter().any(|f| pats.iter().any(|p| f.contains(p))))
        .map_or("other", |(name, _)| name)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "\
\t  1 _copy_from_iter\n\t  2 tcp_sendmsg\n\t  3 __x64_sys_sendto\n\t  4 proxy::relay::pump::{{closure}}\n\t  5 tokio::runtime::task::raw::RawTask::poll\n\
\n\
\t  1 do_epoll_wait\n\t  2 __x64_sys_epoll_wait\n\t  3 epoll_wait\n\t  4 tokio::runtime::io::driver::Driver::turn\n\
\n\
\t  1 serde_json::ser::format_escaped_str\n\t  2 eps_core::jsonrpc::to_raw\n\t  3 proxy::public::Public::handle_client::{{closure}}\n\
\n\
\t  1 mystery\n";

    #[test]
    fn samples_go_under_their_work_and_leaf() {
        let b = Breakdown::from_script(SCRIPT);
        assert_eq!(b.samples, 4);
        let get = |v: &[(String, usize)], k: &str| v.iter().find(|(n, _)| n == k).map(|p| p.1);
        assert_eq!(get(&b.work, "relay"), Some(1));
        assert_eq!(
            get(&b.work, "runtime (sleeping, waking; other tasks)"),
            Some(1)
        );
        assert_eq!(
            get(&b.work, "client (accept, ClientHello, routing, token)"),
            Some(1)
        );
        assert_eq!(get(&b.work, "other"), Some(1));
        assert_eq!(get(&b.doing, "sendto(2)"), Some(1));
        assert_eq!(get(&b.doing, "epoll_wait(2)"), Some(1));
        assert_eq!(get(&b.doing, "JSON"), Some(1));
        assert_eq!(
            Breakdown::line(&b.work, b.samples, 100.0),
            "client (accept, ClientHello, routing, token) 25, relay 25, \
             runtime (sleeping, waking; other tasks) 25, other 25"
        );
    }
}
