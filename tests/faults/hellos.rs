//! ClientHellos a test sends: rustls's first flight, re-framed or hand-made (GREASE, padding,
//! broken server names), and a request whose first flight a test sends its own way.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use eps_tests::tunnel::{parse_response, Reply};
use rustls::pki_types::ServerName;

/// Deadline of each read and write of [`shaped_request`].
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The handshake messages carried by well-formed records.
pub fn unframe(mut records: &[u8]) -> Vec<u8> {
    let mut message = Vec::new();
    while records.len() >= 5 {
        let len = usize::from(u16::from_be_bytes([records[3], records[4]]));
        message.extend_from_slice(&records[5..5 + len]);
        records = &records[5 + len..];
    }
    message
}

/// `message` in handshake records of at most `size` bytes each.
pub fn frame(message: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in message.chunks(size) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(
            &u16::try_from(chunk.len())
                .expect("record size")
                .to_be_bytes(),
        );
        out.extend_from_slice(chunk);
    }
    out
}

/// Handshake records (type 22) in `stream` up to the end of the first handshake message.
pub fn records_of_first_message(stream: &[u8]) -> usize {
    let mut pos = 0;
    let mut have = 0;
    let mut records = 0;
    while pos + 5 <= stream.len() && stream[pos] == 22 {
        let len = usize::from(u16::from_be_bytes([stream[pos + 3], stream[pos + 4]]));
        records += 1;
        have += len;
        pos += 5 + len;
        let message = unframe(&stream[..pos.min(stream.len())]);
        if message.len() >= 4 {
            let declared = u32::from_be_bytes([0, message[1], message[2], message[3]]) as usize;
            if have >= 4 + declared {
                break;
            }
        }
    }
    records
}

/// One extension: type, length, data.
pub fn ext(ty: u16, data: &[u8]) -> Vec<u8> {
    let mut out = ty.to_be_bytes().to_vec();
    out.extend_from_slice(
        &u16::try_from(data.len())
            .expect("extension size")
            .to_be_bytes(),
    );
    out.extend_from_slice(data);
    out
}

/// A server_name extension listing `names` as host_name entries.
pub fn sni_ext(names: &[&[u8]]) -> Vec<u8> {
    let mut list = Vec::new();
    for name in names {
        list.push(0);
        list.extend_from_slice(&(name.len() as u16).to_be_bytes());
        list.extend_from_slice(name);
    }
    ext(0, &u16_list_prefixed(&list))
}

fn u16_list_prefixed(list: &[u8]) -> Vec<u8> {
    let mut out = (list.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(list);
    out
}

fn u16s(values: &[u16]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_be_bytes()).collect()
}

/// A ClientHello handshake message (header included) offering `ciphers`, with `exts`.
pub fn hello_message(ciphers: &[u16], exts: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(32);
    body.extend_from_slice(&[0x17; 32]); // legacy session id
    body.extend_from_slice(&u16_list_prefixed(&u16s(ciphers)));
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&u16_list_prefixed(&exts.concat()));
    let mut message = vec![1];
    message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    message.extend_from_slice(&body);
    message
}

/// The extensions of a plausible TLS 1.3 ClientHello for `names` (no server_name when empty),
/// plus `more`.
pub fn tls13_exts(names: &[&[u8]], more: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut exts = Vec::new();
    if !names.is_empty() {
        exts.push(sni_ext(names));
    }
    exts.push(ext(10, &u16_list_prefixed(&u16s(&[0x001d, 0x0017])))); // supported_groups
    exts.push(ext(
        13,
        &u16_list_prefixed(&u16s(&[0x0403, 0x0804, 0x0807])),
    )); // signature_algorithms
    let mut versions = vec![4];
    versions.extend_from_slice(&u16s(&[0x0304, 0x0303]));
    exts.push(ext(43, &versions)); // supported_versions
    exts.push(ext(45, &[1, 1])); // psk_key_exchange_modes
    let mut share = u16s(&[0x001d, 32]);
    share.extend_from_slice(&[0x33; 32]);
    exts.push(ext(51, &u16_list_prefixed(&share))); // key_share
    exts.extend(more);
    exts
}

/// A ClientHello for `sni` with GREASE values (RFC 8701) as Chrome sends them: a GREASE cipher
/// suite, GREASE extensions (empty and one byte), group, version and key share.
pub fn grease_hello(sni: &str) -> Vec<u8> {
    let mut versions = vec![6];
    versions.extend_from_slice(&u16s(&[0x3a3a, 0x0304, 0x0303]));
    let mut share = u16s(&[0x2a2a, 1]);
    share.push(0);
    share.extend_from_slice(&u16s(&[0x001d, 32]));
    share.extend_from_slice(&[0x33; 32]);
    let exts = vec![
        ext(0x1a1a, &[]),
        sni_ext(&[sni.as_bytes()]),
        ext(10, &u16_list_prefixed(&u16s(&[0x2a2a, 0x001d]))),
        ext(13, &u16_list_prefixed(&u16s(&[0x0403, 0x0804]))),
        ext(43, &versions),
        ext(45, &[1, 1]),
        ext(51, &u16_list_prefixed(&share)),
        ext(0xfafa, &[0]),
    ];
    let message = hello_message(&[0x0a0a, 0x1301, 0x1302, 0x1303, 0xc02f], &exts);
    frame(&message, 16384)
}

/// A ClientHello of about `size` bytes for `sni` (a padding extension fills it), framed in
/// records of 16384 bytes.
pub fn large_hello(sni: &str, size: usize) -> Vec<u8> {
    let small = hello_message(&[0x1301], &tls13_exts(&[sni.as_bytes()], vec![]));
    let pad = size.saturating_sub(small.len() + 4);
    let message = hello_message(
        &[0x1301],
        &tls13_exts(&[sni.as_bytes()], vec![ext(21, &vec![0; pad])]),
    );
    frame(&message, 16384)
}

/// A ClientHello whose server_name extension lists `names` as they are.
pub fn hello_with_names(names: &[&[u8]]) -> Vec<u8> {
    frame(&hello_message(&[0x1301], &tls13_exts(names, vec![])), 16384)
}

/// Opens TCP to `addr` and TLS for `sni` with `config`, driven by hand: `send_hello` writes the
/// client's first flight (the ClientHello records) to the socket its own way, then the handshake
/// and a `GET path` request (`Connection: close`) go on normally. Blocking: call it on a
/// blocking thread.
pub fn shaped_request(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    sni: &str,
    path: &str,
    send_hello: impl FnOnce(&mut std::net::TcpStream, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<Reply> {
    let mut tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))?;
    let name = ServerName::try_from(sni.to_string())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut conn = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello)?;
    }
    send_hello(&mut tcp, &hello)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let request = format!("GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes())?;
    tls.flush()?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if let Some(reply) = parse_response(&buf)? {
            return Ok(reply);
        }
        let n = tls.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed after {} bytes of response", buf.len()),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
