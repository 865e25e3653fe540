//! The public proxy's ClientHello reader on arbitrary bytes.
//!
//! Input: two bytes choose `max_len` (0..=131070, so both sides of the 64 KiB default), the
//! rest is what a client sent. Checked beyond "no panic": a result is the same for every
//! prefix once it is not `Incomplete` (the reader decides as soon as the bytes allow, and more
//! bytes never change its mind), a complete hello lies within the buffer and the bound, and
//! the SNI is a lowercase DNS name.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::clienthello::{parse_client_hello, Parse};

/// Inputs up to this length have every prefix checked; longer ones every 61st (quadratic).
const ALL_PREFIXES_UP_TO: usize = 8192;

fuzz_target!(|data: &[u8]| {
    let [a, b, buf @ ..] = data else { return };
    let max_len = usize::from(u16::from_be_bytes([*a, *b])) * 2;
    let whole = parse_client_hello(buf, max_len);
    if let Ok(Parse::Complete { sni, consumed }) = &whole {
        assert!(
            *consumed <= buf.len() && *consumed <= max_len,
            "consumed {consumed}"
        );
        assert!(!sni.is_empty() && sni.len() <= 253, "{sni:?}");
        assert!(
            sni.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-'),
            "{sni:?}"
        );
    }
    let step = if buf.len() <= ALL_PREFIXES_UP_TO {
        1
    } else {
        61
    };
    let mut decided = None;
    for n in (0..buf.len()).step_by(step).chain([buf.len()]) {
        let r = parse_client_hello(&buf[..n], max_len);
        match (&decided, r) {
            (None, Ok(Parse::Incomplete)) => {}
            (None, r) => {
                decided = Some(r);
            }
            (Some(first), r) => assert_eq!(first, &r, "prefix {n} of {}", buf.len()),
        }
    }
    assert_eq!(decided.unwrap_or(Ok(Parse::Incomplete)), whole);
});
