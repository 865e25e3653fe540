//! Malformed and oversized JSON-RPC on every JSON-RPC server of the tunnel: both EPS servers
//! and both proxies answer with the right error and go on answering.

use eps_core::jsonrpc::{
    INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR, TOO_LARGE,
};
use eps_tests::tunnel::{Role, PRIVATE, PUBLIC};
use eps_tests::*;

use crate::fixture::{serial, Fx};

/// A bad request, the HTTP status and the JSON-RPC error code it must get (`None`: any error
/// or result, as long as the server answers).
struct Bad {
    what: &'static str,
    body: Vec<u8>,
    status: u16,
    code: Option<i64>,
}

fn bad(what: &'static str, body: impl Into<Vec<u8>>, status: u16, code: Option<i64>) -> Bad {
    Bad {
        what,
        body: body.into(),
        status,
        code,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_json_rpc_gets_errors_and_servers_stay_healthy() {
    const DEPTH: usize = 100_000;
    let _serial = serial().await;
    let mut fx = Fx::new("jsonrpc");
    fx.start(&[
        Role::PublicProxy,
        Role::PrivateProxy,
        Role::PublicEps,
        Role::PrivateEps,
    ])
    .await;
    let t = &fx.t;
    // (server, address, whose certificate its clients show, a method it answers itself)
    let servers = [
        (
            "public EPS server",
            t.public_eps.jsonrpc_addr,
            PUBLIC,
            "_ping",
        ),
        (
            "private EPS server",
            t.private_eps.jsonrpc_addr,
            PRIVATE,
            "_ping",
        ),
        (
            "public proxy",
            t.public_rpc_addr,
            PUBLIC,
            "getAnnouncements",
        ),
        (
            "private proxy",
            t.private_rpc_addr,
            PRIVATE,
            "getAnnouncements",
        ),
    ];
    let ten_mib = format!(
        r#"{{"jsonrpc":"2.0","method":"_ping","params":{{"pad":"{}"}},"id":1}}"#,
        "x".repeat(10 * 1024 * 1024)
    );
    let deep_params = format!(
        r#"{{"jsonrpc":"2.0","method":"announceConnections","params":{}{},"id":1}}"#,
        "[".repeat(DEPTH),
        "]".repeat(DEPTH)
    );
    let cases = [
        bad(
            "malformed JSON",
            r#"{"jsonrpc": "2.0", "method":"#,
            200,
            Some(PARSE_ERROR),
        ),
        bad("an empty body", "", 200, Some(PARSE_ERROR)),
        bad("a 10 MiB body", ten_mib, 413, Some(TOO_LARGE)),
        bad("100,000 '['", "[".repeat(DEPTH), 200, Some(PARSE_ERROR)),
        bad(
            "a batch",
            r#"[{"jsonrpc":"2.0","method":"_ping","id":1}]"#,
            200,
            Some(INVALID_REQUEST),
        ),
        bad(
            "no method",
            r#"{"jsonrpc":"2.0","params":{},"id":1}"#,
            200,
            Some(INVALID_REQUEST),
        ),
        bad(
            "jsonrpc 1.0",
            r#"{"jsonrpc":"1.0","method":"_ping","id":1}"#,
            200,
            Some(INVALID_REQUEST),
        ),
        bad(
            "params a string",
            r#"{"jsonrpc":"2.0","method":"_ping","params":"x","id":1}"#,
            200,
            Some(INVALID_REQUEST),
        ),
        bad(
            "an unknown method",
            r#"{"jsonrpc":"2.0","method":"noSuchMethod","params":{},"id":1}"#,
            200,
            Some(METHOD_NOT_FOUND),
        ),
        bad("params nested 100,000 deep", deep_params, 200, None),
    ];
    for (server, addr, cert, good_method) in servers {
        let tls = client_tls(&t.pki.tls(cert));
        let good = format!(r#"{{"jsonrpc":"2.0","method":"{good_method}","params":{{}},"id":7}}"#);
        let mut seen = Vec::new();
        for case in &cases {
            let reply = post_raw(addr, Some(tls.clone()), case.body.clone())
                .await
                .unwrap_or_else(|e| panic!("{server}, {}: {e}", case.what));
            assert_eq!(
                reply.status, case.status,
                "{server}, {}: {reply:?}",
                case.what
            );
            let code = reply.error_code();
            if let Some(want) = case.code {
                assert_eq!(code, Some(want), "{server}, {}: {reply:?}", case.what);
            }
            seen.push(format!(
                "{}: {} {}",
                case.what,
                reply.status,
                code.map_or("result".to_string(), |c| c.to_string())
            ));
            let next = post_raw(addr, Some(tls.clone()), good.clone().into_bytes())
                .await
                .unwrap_or_else(|e| panic!("{server}, good request after {}: {e}", case.what));
            let json = next.json();
            assert!(
                next.status == 200 && json.get("error").is_none() && json["id"] == 7,
                "{server} after {}: {next:?}",
                case.what
            );
        }
        println!(
            "{server}: {}; a good request answered after each",
            seen.join(", ")
        );
    }
    // Params nested too deep for a decoder are invalid params where a method decodes them.
    let reply = post_raw(
        t.public_rpc_addr,
        Some(client_tls(&t.pki.tls(PUBLIC))),
        cases.last().expect("cases").body.clone(),
    )
    .await
    .expect("deep params to the public proxy");
    assert_eq!(reply.error_code(), Some(INVALID_PARAMS), "{reply:?}");
    // The kept-alive clients the proxies' own EPS servers use still work.
    call(&t.public_rpc(), "getAnnouncements", json!({}))
        .await
        .expect("public proxy");
    call(&t.private_rpc(), "getAnnouncements", json!({}))
        .await
        .expect("private proxy");
}

/// A 10 MB POST, over the limit: every client reads the 413 and its JSON-RPC error instead of
/// a reset connection (HTTP/1.1: the server reads and drops the rest before closing) or a
/// framing error (HTTP/2: the stream is reset with NO_ERROR only after the response). Clients:
/// curl over HTTP/1.1 and HTTP/2, and Python's http.client, which sends the whole body before
/// it reads.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_body_gets_its_413_in_every_client() {
    let _serial = serial().await;
    let mut fx = Fx::new("jsonrpc-413");
    fx.start(&[Role::PublicProxy, Role::PublicEps]).await;
    let t = &fx.t;
    let body = t.dir.join("big.json");
    let pad = "x".repeat(10 * 1024 * 1024);
    std::fs::write(
        &body,
        format!(r#"{{"jsonrpc":"2.0","method":"_ping","params":{{"pad":"{pad}"}},"id":1}}"#),
    )
    .expect("write the body");
    let tls = t.pki.tls(PUBLIC);
    let script = r#"
import http.client, json, ssl, sys
host, port, ca, cert, key, path = sys.argv[1:]
ctx = ssl.create_default_context(cafile=ca)
ctx.load_cert_chain(cert, key)
conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
conn.request("POST", "/", body=open(path, "rb").read(), headers={"Content-Type": "application/json"})
resp = conn.getresponse()
print(resp.status, json.loads(resp.read())["error"]["code"])
"#;
    for (server, addr) in [
        ("public EPS server", t.public_eps.jsonrpc_addr),
        ("public proxy", t.public_rpc_addr),
    ] {
        let url = format!("https://{addr}/");
        for version in ["--http1.1", "--http2"] {
            let out = tokio::process::Command::new("curl")
                .args([
                    "-sS",
                    version,
                    "--max-time",
                    "30",
                    "-w",
                    "\n%{http_code} %{http_version}",
                ])
                .args(["--cacert", &tls.ca_certificate.display().to_string()])
                .args(["--cert", &tls.certificate.display().to_string()])
                .args(["--key", &tls.key.display().to_string()])
                .args(["-H", "Content-Type: application/json", "--data-binary"])
                .arg(format!("@{}", body.display()))
                .arg(&url)
                .output()
                .await
                .expect("curl runs");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{server}, curl {version}: {} {text} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            let (json, status) = text.rsplit_once('\n').expect("body and status");
            let expected = if version == "--http2" {
                "413 2"
            } else {
                "413 1.1"
            };
            assert_eq!(status, expected, "{server}, curl {version}: {text}");
            let error: Value = serde_json::from_str(json).expect("a JSON-RPC answer");
            assert_eq!(error["error"]["code"], TOO_LARGE, "{server}: {json}");
        }
        let out = tokio::process::Command::new("python3")
            .args(["-c", script, "127.0.0.1", &addr.port().to_string()])
            .arg(&tls.ca_certificate)
            .arg(&tls.certificate)
            .arg(&tls.key)
            .arg(&body)
            .output()
            .await
            .expect("python3 runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.trim() == format!("413 {TOO_LARGE}"),
            "{server}, Python http.client: {} {text} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{server}: a 10 MB POST got 413 in curl (HTTP/1.1 and HTTP/2) and in Python's http.client");
    }
}
