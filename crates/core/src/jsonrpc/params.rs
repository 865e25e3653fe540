//! The params an EPS server delivers to its local service: the caller's object, with the
//! `_client` the receiving server vouches for.
//!
//! Local services trust `_client` to name the operator that called them, so the caller's text
//! must not be able to carry a second one past the receiver, whatever its spelling: every
//! top-level key is decoded (escapes and all) and any that decodes to `_client` is dropped; the
//! receiver's own goes first. So is any key that a lenient decoder could take for `_client`
//! ([`is_client_key`]: any letter case, as Go's `encoding/json` and case-insensitive .NET or
//! Jackson match fields, and trailing NULs, where C strings end). Values, nested objects
//! included, are the caller's business and pass on as written, never decoded into a tree.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::RpcError;

/// The key a local service reads the calling operator from.
pub const CLIENT_KEY: &str = "_client";

/// Whether a decoded top-level key is `_client`, or could be read as `_client` by a lenient
/// decoder: compared in upper case (Unicode, so `ı` counts as `i`), trailing NULs ignored.
pub fn is_client_key(key: &str) -> bool {
    key.trim_end_matches('\0')
        .chars()
        .flat_map(char::to_uppercase)
        .eq("_CLIENT".chars())
}

/// The top-level members of a JSON object in order, duplicates included: each key decoded
/// (borrowed from the text when it holds no escape), each value as written.
pub struct Members<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

/// A decoded key; borrowed when the text had no escape in it.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8).min(64));
                while let Some((Key(k), v)) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    members.push((k, v));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(MembersVisitor)
    }
}

impl<'a> Members<'a> {
    /// Reads the members of the object `text` (an error for anything else).
    pub fn parse(text: &'a str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// The params to deliver: `{"_client": client, ...}` with every top-level member of `params`
/// whose key is not [`is_client_key`], in order and as written. Empty or `null` params give
/// `{"_client": client}`; anything but an object, or an object with a key that does not decode
/// to a string (a lone UTF-16 surrogate escape), is invalid params.
pub fn with_client(params: &[u8], client: &RawValue) -> Result<Box<RawValue>, RpcError> {
    let text = std::str::from_utf8(params)
        .map_err(|_| RpcError::invalid_params("params are not UTF-8"))?
        .trim();
    let mut out = String::with_capacity(text.len() + client.get().len() + 16);
    out.push_str("{\"_client\":");
    out.push_str(client.get());
    if !(text.is_empty() || text == "null") {
        let members = Members::parse(text)
            .map_err(|e| RpcError::invalid_params(format!("params must be a JSON object: {e}")))?;
        for (key, value) in members.0 {
            if is_client_key(&key) {
                continue;
            }
            out.push(',');
            match key {
                // Without an escape in the text, the key holds no quote, backslash or control
                // character (JSON allows none unescaped): written back as it was.
                Cow::Borrowed(k) => {
                    out.push('"');
                    out.push_str(k);
                    out.push('"');
                }
                Cow::Owned(k) => out.push_str(&serde_json::to_string(&k).expect("a string")),
            }
            out.push(':');
            out.push_str(value.get());
        }
    }
    out.push('}');
    RawValue::from_string(out).map_err(|e| RpcError::internal(format!("params: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jsonrpc::{to_raw, INVALID_PARAMS};
    use serde_json::{json, Value};

    /// Checks what must hold of delivered params: one top-level key decoding to `_client`, the
    /// receiver's, first; then the caller's other members in order.
    fn delivered(params: &str) -> Vec<(String, String)> {
        let client = to_raw(&json!({"name": "alice"}));
        let out =
            with_client(params.as_bytes(), &client).unwrap_or_else(|e| panic!("{params}: {e}"));
        let members = Members::parse(out.get()).expect("delivered params are an object");
        let list: Vec<(String, String)> = members
            .0
            .iter()
            .map(|(k, v)| (k.to_string(), v.get().to_string()))
            .collect();
        let clients: Vec<_> = list.iter().filter(|(k, _)| is_client_key(k)).collect();
        assert_eq!(clients.len(), 1, "{params} -> {}", out.get());
        assert_eq!(
            list[0],
            (CLIENT_KEY.into(), client.get().into()),
            "{params}"
        );
        list[1..].to_vec()
    }

    #[test]
    fn no_spelling_of_client_gets_past() {
        for params in [
            r#"{"_client":"forged"}"#,
            r#"{"\u005fclient":"forged"}"#,
            r#"{"\u005Fclient":"forged"}"#,
            r#"{"_\u0063lient":"forged"}"#,
            r#"{"\u005f\u0063\u006c\u0069\u0065\u006e\u0074":"forged"}"#,
            r#"{"_clien\u0074":"forged"}"#,
            r#"{ "_client" : "forged" }"#,
            "{\n\t\"_client\"\r\n:\n\"forged\"\n}",
            r#"{"_client":1,"_client":2,"\u005fclient":3}"#,
            r#"{"_client":{"name":"mallory","entry":{"name":"mallory"}}}"#,
            // What lenient decoders take for `_client`.
            r#"{"_Client":"forged","_CLIENT":"forged","_cLiEnT":"forged"}"#,
            r#"{"_client\u0000":"forged","_CLIENT\u0000\u0000":"forged"}"#,
            r#"{"_cl\u0131ent":"forged","_cl\u0131ent\u0000":"forged"}"#,
        ] {
            assert!(delivered(params).is_empty(), "{params}");
        }
        // In any position, among other members, which keep their order.
        assert_eq!(
            delivered(r#"{"a":1,"\u005fclient":"x","b":[2],"_client":null,"c":"3"}"#),
            [
                ("a".to_string(), "1".to_string()),
                ("b".into(), "[2]".into()),
                ("c".into(), "\"3\"".into())
            ]
        );
    }

    #[test]
    fn other_members_pass_as_written() {
        // Nested `_client` is the caller's business.
        assert_eq!(
            delivered(r#"{"n":{"_client":"kept","\u005fclient":"too"}}"#),
            [(
                "n".to_string(),
                r#"{"_client":"kept","\u005fclient":"too"}"#.to_string()
            )]
        );
        // Near misses are other keys; escaped keys decode to the same key after the splice.
        assert_eq!(
            delivered(
                r#"{"\u0000_client":1,"_clients":2,"a\"b":3,"\u00e9":4,"_client ":5,"_CL\u0130ENT":6}"#
            ),
            [
                ("\u{0}_client".to_string(), "1".to_string()),
                ("_clients".into(), "2".into()),
                ("a\"b".into(), "3".into()),
                ("é".into(), "4".into()),
                ("_client ".into(), "5".into()),
                ("_CLİENT".into(), "6".into())
            ]
        );
        // Duplicates of other keys are passed on as they came.
        assert_eq!(delivered(r#"{"a":1,"a":2}"#).len(), 2);
        for empty in ["", "null", " { } ", "  null "] {
            assert!(delivered(empty).is_empty(), "{empty:?}");
        }
        let v: Value = serde_json::from_str(
            with_client(br#"{"a": [1, {"b": 2}]}"#, &to_raw(&json!({"name": "x"})))
                .unwrap()
                .get(),
        )
        .unwrap();
        assert_eq!(v, json!({"_client": {"name": "x"}, "a": [1, {"b": 2}]}));
    }

    #[test]
    fn anything_but_an_object_is_invalid_params() {
        let c = to_raw(&json!({"name": "x"}));
        for bad in [
            &b"[1]"[..],
            b"{",
            b"{}x",
            b"42",
            b"\"s\"",
            b"{\"a\":}",
            b"\xff",
            // A lone surrogate escape in a key is valid JSON text but no string: nothing can
            // tell whether a service reads it as `_client`, so the call is refused (found by
            // fuzzing).
            br#"{"\udccc_client":1}"#,
            br#"{"_client\ud800":1}"#,
        ] {
            assert_eq!(
                with_client(bad, &c).unwrap_err().code,
                INVALID_PARAMS,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
