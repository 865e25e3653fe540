//! Runs the real binary on `127.0.0.1:0` with certificates made by the project's PKI code, and
//! talks to it over HTTP/1.1 and HTTP/2.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

const NAME: &str = "test.internal-server.local";

/// The server process; killed if a test fails before stopping it.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn make_certs(dir: &Path) {
    let server = eps_core::pki::ServerCert {
        stem: "internal-server".into(),
        dns_names: vec!["*.internal-server.local".into()],
    };
    eps_core::pki::ensure(dir, &[], &[server], None, false).unwrap();
}

fn start(certs: &Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_internal-server"))
        .env("IS_BIND_ADDRESS", "127.0.0.1:0")
        .env("IS_CERTIFICATE", certs.join("internal-server.crt"))
        .env("IS_KEY", certs.join("internal-server.key"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = lines.by_ref().find_map(|line| {
        let line = line.ok()?;
        line.strip_prefix("internal-server listening on ")?
            .parse()
            .ok()
    });
    // Keep reading so that the server's log lines never meet a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Server {
        addr: addr.expect("the server prints its address"),
        child,
    }
}

async fn connect(addr: SocketAddr, certs: &Path, alpn: &[u8]) -> TlsStream<TcpStream> {
    let roots = eps_core::tls::root_store(&certs.join("root.crt")).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(eps_core::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(NAME.try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
    tls
}

/// One HTTP/1.1 request with `Connection: close`; the whole response as text.
async fn http1(addr: SocketAddr, certs: &Path, head: &str) -> String {
    let mut tls = connect(addr, certs, b"http/1.1").await;
    let request = format!("{head}\r\nHost: {NAME}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tls.read_to_end(&mut response).await.unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn answers_over_http1_and_http2_and_stops_on_sigterm() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let mut server = start(certs.path());

    let get = http1(server.addr, certs.path(), "GET /jsonrpc HTTP/1.1").await;
    assert!(get.starts_with("HTTP/1.1 200"), "{get}");
    assert!(get.contains("content-type: application/json"), "{get}");
    assert!(get.ends_with(r#"{"message": "success"}"#), "{get}");
    let bytes = http1(server.addr, certs.path(), "GET /bytes/100000 HTTP/1.1").await;
    assert!(bytes.contains("content-length: 100000\r\n"), "{bytes}");

    let tls = connect(server.addr, certs.path(), b"h2").await;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    for (path, body, expected) in [
        ("/jsonrpc", "{}", r#"{"message": "success"}"#),
        ("/echo", "ping", "ping"),
    ] {
        let req = hyper::Request::post(format!("https://{NAME}{path}"))
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got, expected.as_bytes());
    }

    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(exit) = server.child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit}");
}

#[test]
fn missing_certificates_name_the_fix() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_internal-server"))
        .current_dir(empty.path())
        .env_remove("IS_CERTIFICATE")
        .env_remove("IS_KEY")
        .env("IS_BIND_ADDRESS", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("make certs"), "{stderr}");
    assert!(
        stderr.contains("settings/dev/certs/internal-server.crt"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).is_empty());
}
