//! JSON-RPC 2.0 messages and error codes, as plain functions over bytes.
//!
//! `params` and `result` stay raw JSON ([`RawValue`]) so that a server that only passes them on
//! never builds a tree of them.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub mod params;
use serde_json::Value;

/// The method every EPS server answers itself; proxies use it to check their EPS server.
pub const PING: &str = "_ping";

/// Invalid JSON was received.
pub const PARSE_ERROR: i64 = -32700;
/// The JSON is not a valid request object.
pub const INVALID_REQUEST: i64 = -32600;
/// The method (or the operator it names) does not exist.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// Invalid method parameters.
pub const INVALID_PARAMS: i64 = -32602;
/// Internal error.
pub const INTERNAL_ERROR: i64 = -32603;
/// The caller may not call this method.
pub const FORBIDDEN: i64 = 403;
/// The operator named in the method is not in the directory.
pub const UNKNOWN_OPERATOR: i64 = 404;
/// The thing asked for is held by someone else (an announced domain).
pub const CONFLICT: i64 = 409;
/// The request body is over the configured limit.
pub const TOO_LARGE: i64 = 413;
/// The peer (or local service) could not be reached or failed.
pub const PEER_UNREACHABLE: i64 = 502;
/// The local service this server delivers to is not there.
pub const SERVICE_UNAVAILABLE: i64 = 503;
/// The peer did not answer within the call deadline.
pub const PEER_TIMEOUT: i64 = 504;

/// A request as received. `id` is absent for notifications.
#[derive(Debug, Deserialize)]
pub struct Request {
    pub jsonrpc: String,
    pub method: String,
    #[serde(default)]
    pub params: Option<Box<RawValue>>,
    #[serde(default)]
    pub id: Option<Box<RawValue>>,
}

/// A request to send.
#[derive(Debug, Serialize)]
pub struct OutgoingRequest<'a, P: Serialize> {
    pub jsonrpc: &'static str,
    pub method: &'a str,
    pub params: P,
    pub id: u64,
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }
    pub fn parse(msg: impl Into<String>) -> Self {
        Self::new(PARSE_ERROR, msg)
    }
    pub fn invalid_request(msg: impl Into<String>) -> Self {
        Self::new(INVALID_REQUEST, msg)
    }
    pub fn method_not_found(msg: impl Into<String>) -> Self {
        Self::new(METHOD_NOT_FOUND, msg)
    }
    pub fn invalid_params(msg: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, msg)
    }
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(INTERNAL_ERROR, msg)
    }

    /// An error for a call that certainly never reached the service (no connection to it could
    /// be made), marked `data: {"delivered": false}`: a caller with another instance of the
    /// same operator may send it there without risk of running it twice.
    pub fn not_delivered(code: i64, msg: impl Into<String>) -> Self {
        Self {
            data: Some(serde_json::json!({"delivered": false})),
            ..Self::new(code, msg)
        }
    }

    /// This error without the [`Self::not_delivered`] mark (what a service or a local client
    /// sees: the mark is only for EPS servers).
    pub fn without_delivery_mark(mut self) -> Self {
        if self.is_not_delivered() {
            if let Some(Value::Object(data)) = &mut self.data {
                data.remove("delivered");
                if data.is_empty() {
                    self.data = None;
                }
            }
        }
        self
    }

    /// Whether this error says the call never reached the service ([`Self::not_delivered`]).
    pub fn is_not_delivered(&self) -> bool {
        self.data
            .as_ref()
            .and_then(|d| d.get("delivered"))
            .and_then(Value::as_bool)
            == Some(false)
    }
}

/// A response as sent or received: exactly one of `result` and `error`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub jsonrpc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
    pub id: Box<RawValue>,
}

/// What the response for `id` carries.
pub type Outcome = Result<Box<RawValue>, RpcError>;

fn null() -> Box<RawValue> {
    RawValue::from_string("null".into()).expect("null is JSON")
}

impl Response {
    /// Builds the response to `id` (null when unknown).
    pub fn new(id: Option<Box<RawValue>>, outcome: Outcome) -> Self {
        let (result, error) = match outcome {
            Ok(r) => (Some(r), None),
            Err(e) => (None, Some(e)),
        };
        Self {
            jsonrpc: "2.0".into(),
            result,
            error,
            id: id.unwrap_or_else(null),
        }
    }

    /// The serialized response.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("responses serialize")
    }

    /// The outcome this response carries.
    pub fn into_outcome(self) -> Outcome {
        match (self.result, self.error) {
            (_, Some(e)) => Err(e),
            (Some(r), None) => Ok(r),
            (None, None) => Ok(null()),
        }
    }
}

/// Parses one request, telling a parse error (not JSON) from an invalid request (JSON, but not a
/// request object). On error, the id is returned when it could be read.
pub fn parse_request(body: &[u8]) -> Result<Request, (Option<Box<RawValue>>, RpcError)> {
    // First check the syntax without building a tree (serde_json bounds nesting depth).
    let raw: &RawValue = serde_json::from_slice(body)
        .map_err(|e| (None, RpcError::parse(format!("parse error: {e}"))))?;
    let text = raw.get().trim_start();
    if text.starts_with('[') {
        return Err((
            None,
            RpcError::invalid_request("batch requests are not supported"),
        ));
    }
    if !text.starts_with('{') {
        return Err((
            None,
            RpcError::invalid_request("a request must be an object"),
        ));
    }
    match serde_json::from_str::<Request>(raw.get()) {
        Ok(req) if req.jsonrpc != "2.0" => Err((
            req.id,
            RpcError::invalid_request("`jsonrpc` must be \"2.0\""),
        )),
        Ok(req) => {
            if let Some(p) = &req.params {
                let p = p.get().trim_start();
                if !(p.starts_with('{') || p.starts_with('[') || p == "null") {
                    return Err((
                        req.id,
                        RpcError::invalid_request("`params` must be an object or an array"),
                    ));
                }
            }
            Ok(req)
        }
        Err(e) => {
            #[derive(Deserialize)]
            struct IdOnly {
                #[serde(default)]
                id: Option<Box<RawValue>>,
            }
            let id = serde_json::from_str::<IdOnly>(raw.get())
                .ok()
                .and_then(|i| i.id);
            Err((
                id,
                RpcError::invalid_request(format!("invalid request: {e}")),
            ))
        }
    }
}

/// Serializes a value as raw JSON.
pub fn to_raw<T: Serialize>(v: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(v).expect("value serializes")
}

/// Splits `OPERATOR.METHOD` at its first dot.
pub fn split_method(method: &str) -> Option<(&str, &str)> {
    let (op, m) = method.split_once('.')?;
    (!op.is_empty() && !m.is_empty()).then_some((op, m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mark_is_set_and_stripped() {
        let e = RpcError::not_delivered(SERVICE_UNAVAILABLE, "down");
        assert!(e.is_not_delivered());
        let plain = e.without_delivery_mark();
        assert!(!plain.is_not_delivered() && plain.data.is_none());
        let mut kept = RpcError::new(1, "x");
        kept.data = Some(serde_json::json!({"delivered": false, "other": 1}));
        let kept = kept.without_delivery_mark();
        assert_eq!(kept.data, Some(serde_json::json!({"other": 1})));
        assert!(!RpcError::new(1, "x").is_not_delivered());
    }

    #[test]
    fn parse_errors_are_told_apart() {
        assert_eq!(parse_request(b"{nope").unwrap_err().1.code, PARSE_ERROR);
        assert_eq!(parse_request(b"").unwrap_err().1.code, PARSE_ERROR);
        assert_eq!(parse_request(b"[1]").unwrap_err().1.code, INVALID_REQUEST);
        assert_eq!(parse_request(b"42").unwrap_err().1.code, INVALID_REQUEST);
        let (id, e) = parse_request(br#"{"jsonrpc":"2.0","id":7}"#).unwrap_err();
        assert_eq!(e.code, INVALID_REQUEST);
        assert_eq!(id.unwrap().get(), "7");
        let (_, e) = parse_request(br#"{"jsonrpc":"1.0","method":"a.b","id":1}"#).unwrap_err();
        assert_eq!(e.code, INVALID_REQUEST);
        let deep = "[".repeat(10_000);
        assert_eq!(
            parse_request(deep.as_bytes()).unwrap_err().1.code,
            PARSE_ERROR
        );
    }

    #[test]
    fn params_stay_raw() {
        let r =
            parse_request(br#"{"jsonrpc":"2.0","method":"a.b","params":{"x": [1, 2]},"id":"q"}"#)
                .unwrap();
        assert_eq!(r.params.unwrap().get(), r#"{"x": [1, 2]}"#);
        assert_eq!(split_method("a.b.c"), Some(("a", "b.c")));
        assert_eq!(split_method("ab"), None);
        assert_eq!(split_method(".b"), None);
    }
}
