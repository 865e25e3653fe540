//! Reads the SNI host name out of the first bytes a TLS client sends, without I/O.
//!
//! The public proxy calls [`parse_client_hello`] with everything it has read so far, after each
//! read, until it gets [`Parse::Complete`] or an error. The ClientHello may be split over several
//! TLS records and each record over several TCP segments; [`Parse::Incomplete`] means "read
//! more". Wrong bytes are refused as soon as they arrive: a client that does not speak TLS is
//! refused at its first byte, an oversized hello from its declared length.
//!
//! Records are reassembled here (tls-parser does not defragment); the ClientHello body and its
//! extensions are parsed with tls-parser. An `Incomplete` answer costs a walk over the record
//! headers and no allocation, so calling after every read stays cheap.

use std::borrow::Cow;

use tls_parser::{SNIType, TlsExtension};

/// Default bound on the bytes buffered while waiting for a ClientHello. Real ones are under
/// 2 KiB, or about 20 KiB with large post-quantum key shares and padding.
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// Content type of a handshake record.
const CONTENT_HANDSHAKE: u8 = 22;
/// Handshake message type of a ClientHello.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Record header: type (1), version (2), length (2).
const RECORD_HEADER: usize = 5;
/// Handshake message header: type (1), length (3).
const HANDSHAKE_HEADER: usize = 4;
/// Longest record payload accepted: 2^14 plus the 2048 bytes of expansion TLS allows.
const MAX_RECORD_PAYLOAD: usize = 16384 + 2048;

/// What the bytes read so far amount to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// A valid beginning of a ClientHello; more bytes are needed.
    Incomplete,
    /// The whole ClientHello is present.
    Complete {
        /// The SNI host name, lowercase ASCII, checked as a DNS name.
        sni: String,
        /// Bytes of the buffer covering the records that hold the ClientHello. Callers replay
        /// the whole buffer to the server anyway, including anything after this.
        consumed: usize,
    },
}

/// Why the first bytes of a connection are refused. Every variant is the client's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientHelloError {
    /// The first record header is not a TLS handshake record (type 22, version 3.x): the client
    /// speaks something other than TLS.
    #[error("not TLS: the first bytes are not a TLS handshake record")]
    NotTls,
    /// The first handshake message is not a ClientHello.
    #[error("the first handshake message is not a ClientHello")]
    NotClientHello,
    /// The ClientHello, by its declared length or by the records carrying it, needs more than
    /// the allowed number of bytes.
    #[error("the ClientHello is larger than {0} bytes")]
    TooLarge(usize),
    /// The bytes are TLS records, but broken: a bad record length, another record type before
    /// the ClientHello is complete, or a ClientHello that does not parse.
    #[error("malformed ClientHello: {0}")]
    Malformed(String),
    /// The ClientHello names no server (no server_name extension or no host_name in it).
    #[error("the ClientHello carries no SNI host name")]
    NoSni,
    /// The SNI host name is not a usable DNS name: empty, repeated, an IP address literal, too
    /// long, with a trailing dot or characters outside `[A-Za-z0-9.-]`.
    #[error("invalid SNI host name: {0}")]
    InvalidSni(String),
}

/// Reads a ClientHello from `buf`, the bytes received so far, buffering at most `max_len` bytes
/// (use [`MAX_CLIENT_HELLO`] unless there is a reason not to).
///
/// Truncated input is [`Parse::Incomplete`]: on EOF the caller decides that it is truncated.
pub fn parse_client_hello(buf: &[u8], max_len: usize) -> Result<Parse, ClientHelloError> {
    let Some(end) = find_end(buf, max_len)? else {
        return Ok(Parse::Incomplete);
    };
    let message = reassemble(&buf[..end.consumed], end.message_len);
    let sni = sni_of(&message[HANDSHAKE_HEADER..])?;
    Ok(Parse::Complete {
        sni,
        consumed: end.consumed,
    })
}

/// Where the ClientHello ends.
struct End {
    /// Bytes of the buffer up to the end of the record holding its last byte.
    consumed: usize,
    /// Length of the handshake message, header included.
    message_len: usize,
}

/// Walks the record headers, checking each byte as soon as it is there. `None` means more
/// bytes are needed.
fn find_end(buf: &[u8], max_len: usize) -> Result<Option<End>, ClientHelloError> {
    let mut pos = 0;
    // The handshake header, gathered across records, and the handshake bytes seen so far.
    let mut header = [0u8; HANDSHAKE_HEADER];
    let mut have = 0usize;
    let mut message_len = None;
    loop {
        let rest = &buf[pos..];
        check_record_prefix(rest, pos == 0)?;
        if rest.len() < RECORD_HEADER {
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 {
            return Err(malformed("empty handshake record"));
        }
        if len > MAX_RECORD_PAYLOAD {
            return Err(malformed(format!("record of {len} bytes")));
        }
        let record_end = pos + RECORD_HEADER + len;
        if record_end > max_len {
            return Err(ClientHelloError::TooLarge(max_len));
        }
        let fragment = &rest[RECORD_HEADER..rest.len().min(RECORD_HEADER + len)];
        for (at, &b) in (have..HANDSHAKE_HEADER).zip(fragment) {
            header[at] = b;
            if at == 0 && b != HANDSHAKE_CLIENT_HELLO {
                return Err(ClientHelloError::NotClientHello);
            }
            if at == HANDSHAKE_HEADER - 1 {
                let declared = u32::from_be_bytes([0, header[1], header[2], header[3]]) as usize;
                message_len = Some(HANDSHAKE_HEADER + declared);
            }
        }
        if let Some(total) = message_len {
            // The fewest bytes that can hold the message: this record, then one more record
            // for whatever it lacks.
            let lacking = total.saturating_sub(have + len);
            let least = record_end
                + if lacking > 0 {
                    RECORD_HEADER + lacking
                } else {
                    0
                };
            if least > max_len {
                return Err(ClientHelloError::TooLarge(max_len));
            }
        }
        have += fragment.len();
        if fragment.len() < len {
            return Ok(None);
        }
        pos = record_end;
        if let Some(total) = message_len.filter(|&total| have >= total) {
            return Ok(Some(End {
                consumed: pos,
                message_len: total,
            }));
        }
    }
}

/// Checks the part of a record header present in `rest`. The first record decides whether
/// the client speaks TLS at all; a later one that is not a handshake record is malformed.
fn check_record_prefix(rest: &[u8], first: bool) -> Result<(), ClientHelloError> {
    let bad = |what: String| {
        if first {
            ClientHelloError::NotTls
        } else {
            malformed(what)
        }
    };
    match rest {
        [t, ..] if *t != CONTENT_HANDSHAKE => Err(bad(format!(
            "record of type {t} before the ClientHello was complete"
        ))),
        [_, major, ..] if *major != 3 => Err(bad(format!("record version major {major}"))),
        _ => Ok(()),
    }
}

/// The handshake message (header included) carried by `records`, which `find_end` checked.
/// Borrowed when one record holds it all, the usual case.
fn reassemble(records: &[u8], message_len: usize) -> Cow<'_, [u8]> {
    let first_len = usize::from(u16::from_be_bytes([records[3], records[4]]));
    if first_len >= message_len {
        return Cow::Borrowed(&records[RECORD_HEADER..RECORD_HEADER + message_len]);
    }
    let mut message = Vec::with_capacity(message_len);
    let mut rest = records;
    while message.len() < message_len {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        let take = len.min(message_len - message.len());
        message.extend_from_slice(&rest[RECORD_HEADER..RECORD_HEADER + take]);
        rest = &rest[RECORD_HEADER + len..];
    }
    Cow::Owned(message)
}

/// The SNI host name in a ClientHello body (the handshake message without its header).
fn sni_of(body: &[u8]) -> Result<String, ClientHelloError> {
    let (rest, hello) = tls_parser::parse_tls_handshake_client_hello(body)
        .map_err(|e| malformed(format!("ClientHello does not parse: {e:?}")))?;
    if !rest.is_empty() {
        return Err(malformed(format!(
            "{} bytes after the ClientHello extensions",
            rest.len()
        )));
    }
    let mut exts = hello.ext.ok_or(ClientHelloError::NoSni)?;
    let mut names = None;
    while !exts.is_empty() {
        let (frame, rest) = extension_frame(exts)?;
        exts = rest;
        if u16::from_be_bytes([frame[0], frame[1]]) != 0 {
            // Only the server_name extension matters here; the server judges the others, so a
            // content tls-parser is stricter about than the server must not refuse the client.
            continue;
        }
        if names.is_some() {
            return Err(malformed("server_name extension repeated"));
        }
        names = Some(parse_server_name(frame)?);
    }
    let names = names.ok_or(ClientHelloError::NoSni)?;
    let mut host_names = names.into_iter();
    let name = host_names.next().ok_or(ClientHelloError::NoSni)?;
    if host_names.next().is_some() {
        return Err(ClientHelloError::InvalidSni(
            "more than one host_name in server_name".into(),
        ));
    }
    check_host_name(name)
}

/// Splits one extension (type, length, data) off the front of the extensions block.
fn extension_frame(exts: &[u8]) -> Result<(&[u8], &[u8]), ClientHelloError> {
    let truncated = || malformed("truncated extension");
    let header = exts.get(..4).ok_or_else(truncated)?;
    let end = 4 + usize::from(u16::from_be_bytes([header[2], header[3]]));
    if end > exts.len() {
        return Err(truncated());
    }
    Ok(exts.split_at(end))
}

/// The host_name entries of one server_name extension frame.
fn parse_server_name(frame: &[u8]) -> Result<Vec<&[u8]>, ClientHelloError> {
    let ext = match tls_parser::parse_tls_client_hello_extension(frame) {
        Ok((_, TlsExtension::SNI(entries))) => entries,
        Ok(_) | Err(_) => return Err(malformed("server_name extension does not parse")),
    };
    // tls-parser stops quietly at a broken entry; insist that the entries fill the list.
    let listed: usize = ext.iter().map(|(_, name)| 3 + name.len()).sum();
    if frame.len() < 6 || listed + 6 != frame.len() {
        return Err(malformed("server_name list has trailing or missing bytes"));
    }
    Ok(ext
        .into_iter()
        .filter(|(ty, _)| *ty == SNIType::HostName)
        .map(|(_, name)| name)
        .collect())
}

/// Checks a host name ([`crate::hostname`]: the same rule announcements follow) and returns it
/// in lowercase.
fn check_host_name(name: &[u8]) -> Result<String, ClientHelloError> {
    crate::hostname::host_name(name).map_err(|e| ClientHelloError::InvalidSni(e.to_string()))
}

fn malformed(what: impl Into<String>) -> ClientHelloError {
    ClientHelloError::Malformed(what.into())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    use super::*;

    const NAME: &str = "test.internal-server.local";

    /// The first flight of a rustls client: its ClientHello records.
    fn rustls_hello(name: &str, tweak: impl FnOnce(&mut ClientConfig)) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        tweak(&mut config);
        let name = ServerName::try_from(name.to_string()).unwrap();
        let mut conn = ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// The handshake message carried by well-formed records.
    fn unframe(mut records: &[u8]) -> Vec<u8> {
        let mut message = Vec::new();
        while !records.is_empty() {
            let len = usize::from(u16::from_be_bytes([records[3], records[4]]));
            message.extend_from_slice(&records[5..5 + len]);
            records = &records[5 + len..];
        }
        message
    }

    /// `message` framed into handshake records whose payload sizes `size` picks.
    fn frame(message: &[u8], mut size: impl FnMut() -> usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in std::iter::from_fn(|| Some(size())).scan(message, |rest, n| {
            (!rest.is_empty()).then(|| {
                let (chunk, tail) = rest.split_at(n.clamp(1, rest.len()));
                *rest = tail;
                chunk
            })
        }) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// One extension: type, length, data.
    fn ext(ty: u16, data: &[u8]) -> Vec<u8> {
        let mut out = ty.to_be_bytes().to_vec();
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    /// A server_name extension listing `names` as host_name entries.
    fn sni_ext(names: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for name in names {
            list.push(0);
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        ext(0, &data)
    }

    /// A hand-made ClientHello handshake message with the given extensions block (`None`: no
    /// extensions at all).
    fn hand_message(exts: Option<&[u8]>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // TLS_AES_128_GCM_SHA256
        body.extend_from_slice(&[1, 0]); // null compression
        if let Some(exts) = exts {
            body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
            body.extend_from_slice(exts);
        }
        let mut message = vec![1];
        message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend_from_slice(&body);
        message
    }

    fn hand_hello(exts: &[u8]) -> Vec<u8> {
        frame(&hand_message(Some(exts)), || 16384)
    }

    fn parse(buf: &[u8]) -> Result<Parse, ClientHelloError> {
        parse_client_hello(buf, MAX_CLIENT_HELLO)
    }

    fn complete(sni: &str, consumed: usize) -> Result<Parse, ClientHelloError> {
        Ok(Parse::Complete {
            sni: sni.into(),
            consumed,
        })
    }

    /// Feeds every prefix of `stream`: all but the whole are incomplete.
    fn assert_every_prefix(stream: &[u8], sni: &str) {
        for n in 0..stream.len() {
            assert_eq!(parse(&stream[..n]), Ok(Parse::Incomplete), "prefix {n}");
        }
        assert_eq!(parse(stream), complete(sni, stream.len()));
    }

    /// A deterministic pseudo-random sequence (Knuth's MMIX LCG).
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) as usize) % n
        }
    }

    #[test]
    fn whole_hello_gives_the_sni() {
        let hello = rustls_hello(NAME, |_| {});
        assert_eq!(parse(&hello), complete(NAME, hello.len()));
    }

    #[test]
    fn every_split_point_is_incomplete_until_the_end() {
        assert_every_prefix(&rustls_hello(NAME, |_| {}), NAME);
    }

    #[test]
    fn bytes_after_the_hello_are_not_consumed() {
        let hello = rustls_hello(NAME, |_| {});
        let mut buf = hello.clone();
        buf.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
        assert_eq!(parse(&buf), complete(NAME, hello.len()));
    }

    #[test]
    fn the_hello_may_span_many_records() {
        let message = unframe(&rustls_hello(NAME, |_| {}));
        for size in [1, 7, 100] {
            let stream = frame(&message, || size);
            assert_eq!(
                parse(&stream),
                complete(NAME, stream.len()),
                "records of {size}"
            );
        }
        assert_every_prefix(&frame(&message, || 7), NAME);
    }

    #[test]
    fn a_large_hello_split_by_rustls_into_two_records() {
        // 80 ALPN names of 255 bytes make a ClientHello of about 20 KiB, over one record.
        let stream = rustls_hello(NAME, |c| c.alpn_protocols = vec![vec![b'x'; 255]; 80]);
        assert!(unframe(&stream).len() > 20_000);
        assert!(stream.len() > 16384 + 5, "one record cannot hold it");
        assert_eq!(parse(&stream), complete(NAME, stream.len()));
        assert_eq!(parse(&stream[..stream.len() - 1]), Ok(Parse::Incomplete));
    }

    #[test]
    fn a_large_padded_hello_in_two_records() {
        let exts = [sni_ext(&[NAME.as_bytes()]), ext(21, &[0; 20_000])].concat();
        let message = hand_message(Some(&exts));
        let stream = frame(&message, || 16384);
        assert_eq!(stream.len(), message.len() + 10);
        assert_eq!(parse(&stream), complete(NAME, stream.len()));
        assert_eq!(parse(&stream[..16389]), Ok(Parse::Incomplete));
    }

    #[test]
    fn a_truncated_hello_is_incomplete() {
        let hello = rustls_hello(NAME, |_| {});
        assert_eq!(parse(&hello[..hello.len() - 1]), Ok(Parse::Incomplete));
        assert_eq!(parse(&hello[..3]), Ok(Parse::Incomplete));
        assert_eq!(parse(&[]), Ok(Parse::Incomplete));
    }

    #[test]
    fn random_records_and_segments_give_the_same_sni() {
        let message = unframe(&rustls_hello(NAME, |_| {}));
        let mut rng = Lcg(0x5eed);
        for round in 0..300 {
            let max_record = 1 + rng.below(message.len() + 10);
            let stream = frame(&message, || 1 + rng.below(max_record));
            let mut at = 0;
            while at < stream.len() {
                assert_eq!(parse(&stream[..at]), Ok(Parse::Incomplete), "round {round}");
                at += 1 + rng.below(64);
            }
            assert_eq!(
                parse(&stream),
                complete(NAME, stream.len()),
                "round {round}"
            );
        }
    }

    #[test]
    fn non_tls_is_refused_at_the_first_byte() {
        let http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for n in 1..=http.len() {
            assert_eq!(parse(&http[..n]), Err(ClientHelloError::NotTls));
        }
        assert_eq!(parse(&[22, 4]), Err(ClientHelloError::NotTls));
        assert_eq!(parse(&[22, 3]), Ok(Parse::Incomplete));
    }

    #[test]
    fn a_huge_declared_length_is_too_large_at_once() {
        // A 64 KiB + 1 handshake message announced in the first nine bytes.
        let start = [22, 3, 1, 0x40, 0x00, 1, 0x01, 0x00, 0x01];
        assert_eq!(
            parse(&start),
            Err(ClientHelloError::TooLarge(MAX_CLIENT_HELLO))
        );
        assert_eq!(parse(&start[..8]), Ok(Parse::Incomplete));
        // Under a smaller bound, a record header alone can be enough.
        assert_eq!(
            parse_client_hello(&[22, 3, 1, 0x40, 0x00], 1000),
            Err(ClientHelloError::TooLarge(1000))
        );
        let hello = rustls_hello(NAME, |_| {});
        assert_eq!(
            parse_client_hello(&hello, hello.len() - 1),
            Err(ClientHelloError::TooLarge(hello.len() - 1))
        );
        assert_eq!(
            parse_client_hello(&hello, hello.len()),
            complete(NAME, hello.len())
        );
    }

    #[test]
    fn a_message_that_outgrows_the_bound_over_records_is_too_large() {
        let message = unframe(&rustls_hello(NAME, |_| {}));
        let stream = frame(&message, || 10);
        // One byte short: refused as soon as a record header shows the rest cannot fit, here
        // before the last record even starts.
        let max = stream.len() - 1;
        let last_record = stream.len() - 5 - ((message.len() - 1) % 10 + 1);
        let refused_at = (0..=stream.len())
            .find(|&n| parse_client_hello(&stream[..n], max).is_err())
            .unwrap();
        assert!(refused_at <= last_record, "{refused_at} > {last_record}");
        assert!(refused_at > 20);
        assert_eq!(
            parse_client_hello(&stream[..refused_at], max),
            Err(ClientHelloError::TooLarge(max))
        );
    }

    #[test]
    fn another_handshake_message_is_not_a_client_hello() {
        assert_eq!(
            parse(&[22, 3, 3, 0, 4, 2]),
            Err(ClientHelloError::NotClientHello)
        );
    }

    #[test]
    fn broken_records_are_malformed() {
        let malformed = |buf: &[u8]| matches!(parse(buf), Err(ClientHelloError::Malformed(_)));
        assert!(malformed(&[22, 3, 1, 0, 0]), "empty record");
        assert!(
            malformed(&[22, 3, 1, 0x48, 0x01]),
            "record over 2^14 + 2048"
        );
        let message = unframe(&rustls_hello(NAME, |_| {}));
        let mut interleaved = frame(&message[..10], || 10);
        interleaved.push(21);
        assert!(
            malformed(&interleaved),
            "alert before the hello is complete"
        );
        interleaved.pop();
        interleaved.extend_from_slice(&[22, 2]);
        assert!(malformed(&interleaved), "bad version in a later record");
        assert!(
            malformed(&frame(&[1, 0, 0, 3, 3, 3, 0], || 100)),
            "short body"
        );
        let mut trailing = hand_message(Some(&sni_ext(&[b"a.b"])));
        trailing[3] += 1;
        trailing.push(0);
        assert!(
            malformed(&frame(&trailing, || 100)),
            "bytes after extensions"
        );
        let twice = [sni_ext(&[b"a.b"]), sni_ext(&[b"a.b"])].concat();
        assert!(malformed(&hand_hello(&twice)), "server_name twice");
        assert!(
            malformed(&hand_hello(&[0, 0, 0, 9, 1])),
            "truncated extension"
        );
        assert!(
            malformed(&hand_hello(&ext(0, &[0, 4, 0, 0, 9, b'a']))),
            "truncated host_name"
        );
    }

    #[test]
    fn other_extensions_do_not_matter() {
        // An ALPN extension whose list length lies; the server may refuse it, not us.
        let exts = [ext(16, &[0, 9, 1]), sni_ext(&[b"a.example"])].concat();
        let stream = hand_hello(&exts);
        assert_eq!(parse(&stream), complete("a.example", stream.len()));
    }

    #[test]
    fn a_hello_without_sni_is_refused() {
        let no_sni = rustls_hello(NAME, |c| c.enable_sni = false);
        assert_eq!(parse(&no_sni), Err(ClientHelloError::NoSni));
        let by_ip = rustls_hello("127.0.0.1", |_| {});
        assert_eq!(parse(&by_ip), Err(ClientHelloError::NoSni));
        let no_exts = frame(&hand_message(None), || 100);
        assert_eq!(parse(&no_exts), Err(ClientHelloError::NoSni));
        assert_eq!(
            parse(&hand_hello(&ext(0, &[0, 0]))),
            Err(ClientHelloError::NoSni)
        );
    }

    #[test]
    fn bad_host_names_are_invalid() {
        let long = format!("{}locals", "a.".repeat(124));
        assert_eq!(long.len(), 254);
        for names in [
            &[b"10.0.0.1".as_slice()][..],
            &[b"127.1"],
            &[b"::1"],
            &[b""],
            &[b"bad_name.local"],
            &[b"trailing.dot."],
            &[b"double..dot"],
            &[b"caf\xc3\xa9.local"],
            &[long.as_bytes()],
            &[b"a.example", b"b.example"],
        ] {
            let result = parse(&hand_hello(&sni_ext(names)));
            assert!(
                matches!(result, Err(ClientHelloError::InvalidSni(_))),
                "{names:?}: {result:?}"
            );
        }
    }

    #[test]
    fn host_names_are_lowercased() {
        let stream = hand_hello(&sni_ext(&[b"Test.Internal-Server.LOCAL"]));
        assert_eq!(parse(&stream), complete(NAME, stream.len()));
        let longest = format!("{}local", "a.".repeat(124));
        let stream = hand_hello(&sni_ext(&[longest.as_bytes()]));
        assert_eq!(parse(&stream), complete(&longest, stream.len()));
    }
}
