//! The JSON-RPC request parser every server of eps runs on a request body
//! (`eps_core::jsonrpc::parse_request`), and the `_client` splice on the params it accepts.
//!
//! Checked beyond "no panic": an accepted request has version "2.0" and params that are an
//! object, an array or null; a refused one tells a parse error (-32700) from an invalid
//! request (-32600), and a parse error carries no id. The splice takes accepted params unless
//! they are an array or an object with a key that does not decode (a lone UTF-16 surrogate
//! escape, which JSON's grammar lets through): those are invalid params (-32602).

#![no_main]

use eps_core::jsonrpc::params::{with_client, Members};
use eps_core::jsonrpc::{parse_request, INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Ok(req) => {
            assert_eq!(req.jsonrpc, "2.0");
            if let Some(p) = &req.params {
                let p = p.get().trim_start();
                assert!(p.starts_with('{') || p.starts_with('[') || p == "null", "{p}");
                let client = RawValue::from_string(r#"{"name":"x"}"#.into()).expect("JSON");
                let spliced = with_client(p.as_bytes(), &client);
                let object = p == "null" || Members::parse(p).is_ok();
                assert_eq!(spliced.is_ok(), object, "{p}");
                if let Err(e) = spliced {
                    assert_eq!(e.code, INVALID_PARAMS, "{p}: {e}");
                }
            }
        }
        Err((id, e)) => {
            assert!(e.code == PARSE_ERROR || e.code == INVALID_REQUEST, "{e}");
            if e.code == PARSE_ERROR {
                assert!(id.is_none());
            }
        }
    }
});
