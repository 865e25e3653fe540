//! The EPS server's `_client` splice (`eps_core::jsonrpc::params::with_client`) on arbitrary
//! params.
//!
//! Checked beyond "no panic": whatever the caller sent, params that are accepted come out as an
//! object with exactly one top-level key that is or could be read as `_client`, first, holding
//! the receiver's value; every other top-level member of the input follows in order, its key
//! decoding to the same string and its value written as it came. Params that are refused are
//! not an object (or hold a key that decodes to no string).

#![no_main]

use eps_core::jsonrpc::params::{is_client_key, with_client, Members, CLIENT_KEY};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

fuzz_target!(|data: &[u8]| {
    let client = RawValue::from_string(r#"{"name":"alice","entry":{"name":"alice"}}"#.into())
        .expect("JSON");
    let text = std::str::from_utf8(data).map(str::trim);
    let input = text.ok().and_then(|t| {
        if t.is_empty() || t == "null" {
            Some(Members(Vec::new()))
        } else {
            Members::parse(t).ok()
        }
    });
    let out = match (with_client(data, &client), input) {
        (Ok(out), Some(input)) => (out, input),
        (Err(_), None) => return,
        (Ok(out), None) => panic!("accepted params that are not an object: {}", out.get()),
        (Err(e), Some(_)) => panic!("refused an object: {e}"),
    };
    let (out, input) = out;
    let delivered = Members::parse(out.get()).expect("delivered params are an object");
    let clients = delivered.0.iter().filter(|(k, _)| is_client_key(k)).count();
    assert_eq!(clients, 1, "{}", out.get());
    assert_eq!(delivered.0[0].0, CLIENT_KEY);
    assert_eq!(delivered.0[0].1.get(), client.get());
    let kept: Vec<(&str, &str)> = input
        .0
        .iter()
        .filter(|(k, _)| !is_client_key(k))
        .map(|(k, v)| (k.as_ref(), v.get()))
        .collect();
    let rest: Vec<(&str, &str)> = delivered.0[1..]
        .iter()
        .map(|(k, v)| (k.as_ref(), v.get()))
        .collect();
    assert_eq!(kept, rest);
});
