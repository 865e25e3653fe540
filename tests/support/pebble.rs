//! Pebble, the ACME test server (Debian package `pebble`), on free loopback ports: [`Pebble`].
//!
//! Pebble validates TLS-ALPN-01 by connecting to the name's address at its `tlsPort`; the test
//! gives it the public proxy's public port, so validations travel through the real tunnel.
//! Names resolve through `pebble-challtestsrv`'s mock DNS (same package), which answers every A
//! query with 127.0.0.1 and no AAAA. Pebble's HTTPS (the ACME directory and the management port)
//! uses a certificate from the test's own [`Pki`]; its issuing root, made anew at each start,
//! comes from the management port's `/roots/0`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::files::TestDir;
use crate::pki::Pki;
use crate::process::Proc;
use crate::wait::{free_addr, free_port};

/// Time Pebble and its DNS get to listen.
const START_WAIT: Duration = Duration::from_secs(15);

/// A running Pebble and its mock DNS.
pub struct Pebble {
    pub proc: Proc,
    pub dns: Proc,
    /// The ACME directory, e.g. `https://127.0.0.1:PORT/dir`.
    pub directory_url: String,
    /// The CA file that Pebble's own HTTPS chains to (give it to the ACME client).
    pub https_ca: PathBuf,
    management: SocketAddr,
}

impl Pebble {
    /// Starts Pebble (validating TLS-ALPN-01 at `tls_port`, issuing certificates valid for
    /// `validity`) and its DNS, with files in `dir`, and waits until both listen. Panics with
    /// a hint when the package is missing.
    pub async fn start(dir: &TestDir, pki: &Pki, tls_port: u16, validity: Duration) -> Self {
        let bin = |name: &str| -> PathBuf {
            let path = Path::new("/usr/bin").join(name);
            assert!(
                path.is_file(),
                "{name} not found: the ACME tests need Debian's `pebble` package \
                 (apt-get install pebble; .ci/run installs it)"
            );
            path
        };
        let https = pki.issue_server("pebble", &["localhost"]);
        let (listen, management, dns) = (free_addr(), free_addr(), free_addr());
        let config = json!({"pebble": {
            "listenAddress": listen.to_string(),
            "managementListenAddress": management.to_string(),
            "certificate": https.certificate,
            "privateKey": https.key,
            "httpPort": free_port(),
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": validity.as_secs(),
        }});
        let config_path = dir.join("pebble/config.json");
        std::fs::create_dir_all(config_path.parent().expect("a folder")).expect("mkdir");
        std::fs::write(&config_path, config.to_string()).expect("writing pebble's config");

        let mut dns_proc = Proc::start(
            "pebble-challtestsrv",
            &bin("pebble-challtestsrv"),
            [
                "-dns01",
                &dns.to_string(),
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                &free_addr().to_string(),
            ],
            std::iter::empty::<(&str, &str)>(),
            dir.join("pebble-challtestsrv.log"),
        );
        dns_proc
            .wait_for_log("Starting challenge servers", START_WAIT)
            .await;
        let mut proc = Proc::start(
            "pebble",
            &bin("pebble"),
            [
                "-config",
                &config_path.display().to_string(),
                "-dnsserver",
                &dns.to_string(),
                "-strict=false",
            ],
            [("PEBBLE_VA_NOSLEEP", "1"), ("PEBBLE_WFE_NONCEREJECT", "0")],
            dir.join("pebble.log"),
        );
        proc.wait_for_log("ACME directory available", START_WAIT)
            .await;
        Self {
            proc,
            dns: dns_proc,
            directory_url: format!("https://{listen}/dir"),
            https_ca: pki.root(),
            management,
        }
    }

    /// Pebble's issuing root (PEM), from its management port, written to `path`.
    pub async fn root(&self, path: &Path) -> PathBuf {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "10", "--cacert"])
            .arg(&self.https_ca)
            .arg("-o")
            .arg(path)
            .arg(format!("https://{}/roots/0", self.management))
            .output()
            .await
            .expect("running curl");
        assert!(
            out.status.success(),
            "GET /roots/0 from pebble: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        path.to_path_buf()
    }
}

/// The leaf certificate (DER) `host` shows at `addr` to a client trusting `root` (PEM).
pub async fn served_leaf(addr: SocketAddr, root: &Path, host: &str) -> std::io::Result<Vec<u8>> {
    let config = crate::rpc::client_tls_without_cert(root);
    let work = crate::keepalive::connect_tls(addr, Arc::clone(&config), host);
    let (tls, _) = tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake"))??;
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .ok_or_else(|| std::io::Error::other("no server certificate"))
}
