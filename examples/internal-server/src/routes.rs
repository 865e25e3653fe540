//! The answers. GET and POST on any path get `{"message": "success"}`; `GET /bytes/N` streams
//! N zero bytes (for throughput measurements) and `POST /echo` returns the request body.
//! Request bodies are read up to [`MAX_BODY_BYTES`]; more gets 413.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body, Frame, SizeHint};
use hyper::{header, Method, Request, Response, StatusCode};

/// The demo's answer.
pub const SUCCESS: &str = r#"{"message": "success"}"#;
/// Largest request body read.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Largest `/bytes/N`.
pub const MAX_STREAM_BYTES: u64 = 16 * 1024 * 1024 * 1024;
/// Size of the frames `/bytes/N` sends.
const CHUNK: usize = 64 * 1024;
static ZEROS: [u8; CHUNK] = [0; CHUNK];

/// A response body: a buffer, or a stream of zeros.
pub type ResponseBody = Either<Full<Bytes>, Zeros>;

/// Answers one request.
pub async fn handle<B>(req: Request<B>) -> Response<ResponseBody>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    tracing::debug!(%method, %path, version = ?req.version(), "request");
    match (&method, path.as_str()) {
        (&Method::GET, p) if p.starts_with("/bytes/") => match p["/bytes/".len()..].parse() {
            Ok(n) if n <= MAX_STREAM_BYTES => zeros(n),
            _ => error(
                StatusCode::BAD_REQUEST,
                &format!("/bytes/N takes N from 0 to {MAX_STREAM_BYTES}"),
            ),
        },
        (&Method::POST, "/echo") => {
            let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
            match read_body(req).await {
                Ok(body) => {
                    let mut resp = Response::new(Either::Left(Full::new(body)));
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        content_type.unwrap_or(header::HeaderValue::from_static(
                            "application/octet-stream",
                        )),
                    );
                    resp
                }
                Err(resp) => resp,
            }
        }
        (&Method::GET | &Method::POST, _) => match read_body(req).await {
            Ok(_) => json(StatusCode::OK, SUCCESS.to_string()),
            Err(resp) => resp,
        },
        _ => {
            let mut resp = error(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST");
            resp.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET, POST"));
            resp
        }
    }
}

/// Reads the body up to [`MAX_BODY_BYTES`]; the error is the response to send instead.
async fn read_body<B>(req: Request<B>) -> Result<Bytes, Response<ResponseBody>>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body over {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => {
            tracing::debug!(error = %e, "reading the request body failed");
            Err(error(StatusCode::BAD_REQUEST, "request body not readable"))
        }
    }
}

fn json(status: StatusCode, body: String) -> Response<ResponseBody> {
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, message: &str) -> Response<ResponseBody> {
    let body = format!(r#"{{"error": {}}}"#, json_string(message));
    json(status, body)
}

/// `s` as a JSON string literal. Messages here are plain ASCII; quote the two characters that
/// would break out.
fn json_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn zeros(n: u64) -> Response<ResponseBody> {
    let mut resp = Response::new(Either::Right(Zeros { remaining: n }));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

/// A body of `remaining` zero bytes, sent from one static buffer without allocating.
pub struct Zeros {
    remaining: u64,
}

impl Body for Zeros {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(CHUNK as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&ZEROS[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn call(method: Method, path: &str, body: Vec<u8>) -> (StatusCode, Bytes) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = handle(req).await;
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }

    #[tokio::test]
    async fn get_and_post_anywhere_succeed() {
        for (method, path) in [(Method::GET, "/"), (Method::POST, "/jsonrpc")] {
            let (status, body) = call(method, path, b"{}".to_vec()).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, SUCCESS.as_bytes());
        }
    }

    #[tokio::test]
    async fn bodies_are_bounded() {
        let (status, _) = call(Method::POST, "/", vec![0; MAX_BODY_BYTES + 1]).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        let (status, _) = call(Method::POST, "/echo", vec![0; MAX_BODY_BYTES + 1]).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn echo_returns_the_body() {
        let (status, body) = call(Method::POST, "/echo", b"hello".to_vec()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, &b"hello"[..]);
    }

    #[tokio::test]
    async fn bytes_streams_zeros() {
        for n in [0, 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17] {
            let (status, body) = call(Method::GET, &format!("/bytes/{n}"), vec![]).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body.len(), n);
            assert!(body.iter().all(|b| *b == 0));
        }
        let too_many = format!("/bytes/{}", MAX_STREAM_BYTES + 1);
        assert_eq!(
            call(Method::GET, &too_many, vec![]).await.0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            call(Method::GET, "/bytes/x", vec![]).await.0,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn zeros_announce_their_length() {
        let z = Zeros {
            remaining: MAX_STREAM_BYTES,
        };
        assert_eq!(z.size_hint().exact(), Some(MAX_STREAM_BYTES));
    }

    #[tokio::test]
    async fn other_methods_are_refused() {
        let (status, _) = call(Method::DELETE, "/", vec![]).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    }
}
