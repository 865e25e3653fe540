//! The PROXY protocol header (HAProxy's `proxy-protocol.txt`, versions 1 and 2) that a load
//! balancer writes before its client's bytes, naming the client. Parsed by `ppp`, bounded in
//! bytes; no I/O here.

use std::net::SocketAddr;

/// The 12 bytes a version 2 header starts with.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// What a version 1 header starts with.
const V1_PREFIX: &[u8] = b"PROXY ";
/// Longest version 1 header, `\r\n` included (the protocol's own bound).
pub const MAX_V1_BYTES: usize = 107;
/// Longest version 2 header taken: 16 fixed bytes, the addresses (36 for IPv6) and TLVs. Load
/// balancers send a few dozen to a few hundred bytes; the format allows 64 KiB.
pub const MAX_V2_BYTES: usize = 2048;
/// Bytes to read at most before a header is complete or refused.
pub const MAX_BYTES: usize = MAX_V2_BYTES;

/// A complete header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Its length: the client's own bytes follow.
    pub len: usize,
    /// The client as the load balancer saw it; `None` for a connection the load balancer made
    /// itself (v2 `LOCAL`, v1 `UNKNOWN`, a Unix socket), which is judged by its own address.
    pub source: Option<SocketAddr>,
    /// The address the client connected to.
    pub destination: Option<SocketAddr>,
}

/// What the first bytes of a connection are, as far as a PROXY header goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// A complete header.
    Complete(Header),
    /// The start of a header: more bytes are needed.
    Incomplete,
}

/// Why the bytes are not a usable header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Not a PROXY header at all.
    #[error("no PROXY protocol header")]
    Missing,
    /// A header longer than this proxy takes.
    #[error("PROXY header over {0} bytes")]
    TooLarge(usize),
    /// A header the parser refused.
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
}

/// True when `buf` starts as a PROXY header would (or is a prefix of one): from a source that
/// is not trusted, such bytes are refused as a header, not read as TLS.
pub fn looks_like_header(buf: &[u8]) -> bool {
    !buf.is_empty() && (starts_as(buf, V2_SIGNATURE) || starts_as(buf, V1_PREFIX))
}

fn starts_as(buf: &[u8], signature: &[u8]) -> bool {
    let n = buf.len().min(signature.len());
    buf[..n] == signature[..n]
}

/// Parses the header at the start of `buf` (which may hold more bytes after it).
pub fn parse(buf: &[u8]) -> Result<Parse, HeaderError> {
    if buf.is_empty() {
        return Ok(Parse::Incomplete);
    }
    if starts_as(buf, V2_SIGNATURE) {
        if buf.len() < 16 {
            return Ok(Parse::Incomplete);
        }
        let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if len > MAX_V2_BYTES {
            return Err(HeaderError::TooLarge(MAX_V2_BYTES));
        }
        if buf.len() < len {
            return Ok(Parse::Incomplete);
        }
        let h = ppp::v2::Header::try_from(&buf[..len])
            .map_err(|e| HeaderError::Malformed(e.to_string()))?;
        let (source, destination) = match (h.command, h.addresses) {
            (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => (
                Some(SocketAddr::from((a.source_address, a.source_port))),
                Some(SocketAddr::from((
                    a.destination_address,
                    a.destination_port,
                ))),
            ),
            (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => (
                Some(SocketAddr::from((a.source_address, a.source_port))),
                Some(SocketAddr::from((
                    a.destination_address,
                    a.destination_port,
                ))),
            ),
            _ => (None, None),
        };
        return Ok(Parse::Complete(Header {
            len,
            source,
            destination,
        }));
    }
    if starts_as(buf, V1_PREFIX) {
        let Some(end) = buf.iter().position(|&b| b == b'\n') else {
            return if buf.len() >= MAX_V1_BYTES {
                Err(HeaderError::TooLarge(MAX_V1_BYTES))
            } else {
                Ok(Parse::Incomplete)
            };
        };
        let len = end + 1;
        if len > MAX_V1_BYTES {
            return Err(HeaderError::TooLarge(MAX_V1_BYTES));
        }
        let h = ppp::v1::Header::try_from(&buf[..len])
            .map_err(|e| HeaderError::Malformed(e.to_string()))?;
        let (source, destination) = match h.addresses {
            ppp::v1::Addresses::Tcp4(a) => (
                Some(SocketAddr::from((a.source_address, a.source_port))),
                Some(SocketAddr::from((
                    a.destination_address,
                    a.destination_port,
                ))),
            ),
            ppp::v1::Addresses::Tcp6(a) => (
                Some(SocketAddr::from((a.source_address, a.source_port))),
                Some(SocketAddr::from((
                    a.destination_address,
                    a.destination_port,
                ))),
            ),
            ppp::v1::Addresses::Unknown => (None, None),
        };
        return Ok(Parse::Complete(Header {
            len,
            source,
            destination,
        }));
    }
    Err(HeaderError::Missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (src, dst),
        )
        .build()
        .unwrap()
    }

    #[test]
    fn v1_and_v2_name_the_client_and_keep_what_follows() {
        let hello = [0x16, 0x03, 0x01];
        let mut v1 = b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 443\r\n".to_vec();
        let len1 = v1.len();
        v1.extend_from_slice(&hello);
        let Parse::Complete(h) = parse(&v1).unwrap() else {
            panic!("complete")
        };
        assert_eq!(h.len, len1);
        assert_eq!(h.source, Some("198.51.100.7:40000".parse().unwrap()));
        assert_eq!(h.destination, Some("192.0.2.1:443".parse().unwrap()));
        assert_eq!(&v1[h.len..], &hello);

        let src: SocketAddr = "[2001:db8::7]:40001".parse().unwrap();
        let dst: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let mut two = v2(src, dst);
        let len2 = two.len();
        two.extend_from_slice(&hello);
        let Parse::Complete(h) = parse(&two).unwrap() else {
            panic!("complete")
        };
        assert_eq!(
            (h.len, h.source, h.destination),
            (len2, Some(src), Some(dst))
        );

        // Every prefix is incomplete, not an error.
        for n in 1..len2 {
            assert_eq!(parse(&two[..n]), Ok(Parse::Incomplete), "v2 prefix {n}");
        }
        for n in 1..len1 {
            assert_eq!(parse(&v1[..n]), Ok(Parse::Incomplete), "v1 prefix {n}");
        }
    }

    #[test]
    fn local_and_unknown_name_no_client() {
        let Parse::Complete(h) = parse(b"PROXY UNKNOWN\r\n").unwrap() else {
            panic!("complete")
        };
        assert_eq!((h.len, h.source), (15, None));
        let local = ppp::v2::Builder::new(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::AddressFamily::Unspecified | ppp::v2::Protocol::Unspecified,
        )
        .build()
        .unwrap();
        let Parse::Complete(h) = parse(&local).unwrap() else {
            panic!("complete")
        };
        assert_eq!((h.len, h.source), (16, None));
    }

    #[test]
    fn bad_headers_are_refused() {
        assert_eq!(parse(&[0x16, 0x03, 0x01]), Err(HeaderError::Missing));
        assert!(!looks_like_header(&[0x16, 0x03, 0x01]));
        assert!(looks_like_header(b"PROX"));
        assert!(looks_like_header(b"\r\n\r\n\0"));
        assert!(matches!(
            parse(b"PROXY TCP4 not-an-address 192.0.2.1 1 2\r\n"),
            Err(HeaderError::Malformed(_))
        ));
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert_eq!(parse(&long), Err(HeaderError::TooLarge(MAX_V1_BYTES)));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&huge), Err(HeaderError::TooLarge(MAX_V2_BYTES)));
        let mut wrong_version = V2_SIGNATURE.to_vec();
        wrong_version.extend_from_slice(&[0x31, 0x11, 0x00, 0x0c]);
        wrong_version.extend_from_slice(&[0; 12]);
        assert!(matches!(
            parse(&wrong_version),
            Err(HeaderError::Malformed(_))
        ));
    }
}
