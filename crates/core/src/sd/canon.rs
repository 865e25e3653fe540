//! The canonical encoding of a signed record: the bytes its hash and its signature cover.
//!
//! It is the JSON text of the object
//! `{"created_at": C, "data": D, "name": N, "parent_hash": P, "section": S}` written with:
//!
//! - no whitespace between tokens;
//! - the members of every object sorted by key, keys compared as UTF-8 byte strings (which is
//!   Unicode code point order);
//! - strings in double quotes with `"` and `\` escaped as `\"` and `\\`, the control characters
//!   U+0008, U+0009, U+000A, U+000C, U+000D as `\b`, `\t`, `\n`, `\f`, `\r`, every other
//!   character below U+0020 as `\u00XX` (lowercase hex), and everything else, `/` and non-ASCII
//!   included, as its UTF-8 bytes;
//! - numbers only as integers (in the range of a 64-bit signed or unsigned integer), in
//!   plain decimal with a leading `-` when negative; a fraction or exponent is refused, so that
//!   every implementation encodes a number the same way;
//! - `true`, `false`, `null`; arrays in their order.
//!
//! `P` is the parent's hash or `null` for the first record of a chain. The record's hash is the
//! SHA-256 of these bytes in lowercase hex; its signature is ECDSA P-256 with SHA-256 over them.
//! The encoder is written out here rather than left to a JSON library, so that it does not
//! change with a library's features (serde_json's `preserve_order` keeps insertion order).

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Why a record has no canonical encoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("number {0} is not an integer: signed records carry integers only")]
pub struct NotCanonical(pub String);

/// The fields a record's hash and signature cover.
#[derive(Debug, Clone, Copy)]
pub struct Content<'a> {
    pub created_at: &'a str,
    pub data: &'a Value,
    pub name: &'a str,
    pub parent_hash: Option<&'a str>,
    pub section: &'a str,
}

impl Content<'_> {
    /// The canonical bytes.
    pub fn encode(&self) -> Result<Vec<u8>, NotCanonical> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"{\"created_at\":");
        write_str(&mut out, self.created_at);
        out.extend_from_slice(b",\"data\":");
        write_value(&mut out, self.data)?;
        out.extend_from_slice(b",\"name\":");
        write_str(&mut out, self.name);
        out.extend_from_slice(b",\"parent_hash\":");
        match self.parent_hash {
            Some(p) => write_str(&mut out, p),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"section\":");
        write_str(&mut out, self.section);
        out.push(b'}');
        Ok(out)
    }
}

/// SHA-256 of `bytes`, lowercase hex: a record's hash.
pub fn hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn write_value(out: &mut Vec<u8>, v: &Value) -> Result<(), NotCanonical> {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => out.extend_from_slice(i.to_string().as_bytes()),
            (None, Some(u)) => out.extend_from_slice(u.to_string().as_bytes()),
            (None, None) => return Err(NotCanonical(n.to_string())),
        },
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, k);
                out.push(b':');
                write_value(out, v)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x09 => out.extend_from_slice(b"\\t"),
            0x0a => out.extend_from_slice(b"\\n"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x0d => out.extend_from_slice(b"\\r"),
            0x00..=0x1f => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
            // Multi-byte UTF-8 sequences never contain bytes below 0x80, so copying byte by
            // byte copies every other character whole.
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn encode(data: Value, parent: Option<&str>) -> Result<String, NotCanonical> {
        let c = Content {
            created_at: "2026-01-01T00:00:00Z",
            data: &data,
            name: "alice",
            parent_hash: parent,
            section: "groups",
        };
        c.encode().map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn keys_sorted_no_whitespace_integers_only() {
        let got = encode(json!({"b": [1, -2, true, null], "a": {"z": "x", "é": 0, "Z": 18446744073709551615u64}}), None).unwrap();
        assert_eq!(
            got,
            r#"{"created_at":"2026-01-01T00:00:00Z","data":{"a":{"Z":18446744073709551615,"z":"x","é":0},"b":[1,-2,true,null]},"name":"alice","parent_hash":null,"section":"groups"}"#
        );
        assert_eq!(
            encode(json!({"n": 1.5}), None).unwrap_err(),
            NotCanonical("1.5".into())
        );
        assert!(encode(json!([1e3]), None).is_err());
    }

    #[test]
    fn strings_escape_exactly_the_listed_characters() {
        let got = encode(
            json!("q\" b\\ \u{8}\t\n\u{c}\r \u{1} \u{1f} / é ☃ \u{7f}"),
            Some("ab"),
        )
        .unwrap();
        assert!(
            got.contains(r#""data":"q\" b\\ \b\t\n\f\r \u0001 \u001f / é ☃ "#),
            "{got}"
        );
        assert!(got.contains(r#""parent_hash":"ab""#), "{got}");
        // What the encoder writes is JSON that reads back to the same value.
        let back: Value = serde_json::from_str(&got).unwrap();
        assert_eq!(
            back["data"],
            json!("q\" b\\ \u{8}\t\n\u{c}\r \u{1} \u{1f} / é ☃ \u{7f}")
        );
    }

    #[test]
    fn the_same_value_however_written_encodes_the_same() {
        let a: Value =
            serde_json::from_str(r#"{"x": [1, {"b": 2, "a": "\u00e9"}], "y": null}"#).unwrap();
        let b: Value =
            serde_json::from_str("{\"y\":null,\n \"x\":[1,{\"a\":\"é\",\"b\":2}]}").unwrap();
        assert_eq!(encode(a, None).unwrap(), encode(b, None).unwrap());
        let h = hash(b"abc");
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
