//! `curl` as the README runs it against the tunnel ([`curl`]): the real client a user would
//! try first.

use std::net::SocketAddr;
use std::path::Path;

/// Runs `curl` against `https://HOST:PORT/jsonrpc` with `host` resolved to `addr` and `ca`
/// trusted (a POST of `data` when given); the status and the body.
pub async fn curl(ca: &Path, addr: SocketAddr, host: &str, data: Option<&str>) -> (u16, String) {
    let post: Vec<&str> = data.map(|d| vec!["--data", d]).unwrap_or_default();
    let r = curl_get(ca, addr, host, "/jsonrpc", &post).await;
    (r.status, r.body)
}

/// What [`curl_get`] got.
#[derive(Debug, Clone)]
pub struct CurlReply {
    pub status: u16,
    pub body: String,
    /// `%{http_version}`: `1.1`, `2`.
    pub http_version: String,
}

/// `curl` of `https://HOST:PORT{path}` with `host` resolved to `addr`, `ca` trusted and
/// `extra` arguments (e.g. `--http2`, or `--data` for a POST); the status, body and HTTP
/// version.
pub async fn curl_get(
    ca: &Path,
    addr: SocketAddr,
    host: &str,
    path: &str,
    extra: &[&str],
) -> CurlReply {
    let port = addr.port();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{host}:{port}:{}", addr.ip()))
        .args(["-w", "\n%{http_code} %{http_version}"])
        .args(extra)
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .await
        .expect("running curl (the tunnel tests need it: apt-get install curl)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl {host}{path} {extra:?} failed ({}): {}{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let (body, last) = stdout
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("no status line in curl's output {stdout:?}"));
    let (code, version) = last.split_once(' ').unwrap_or((last, ""));
    CurlReply {
        status: code.trim().parse().expect("curl's %{http_code}"),
        body: body.to_string(),
        http_version: version.trim().to_string(),
    }
}
