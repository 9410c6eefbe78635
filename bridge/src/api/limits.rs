//! Limits on a request's headers and declared body size, answered with
//! kiln's JSON error body. hyper enforces its own header limits while it
//! parses (with a bare 431); kilnd sets those far higher, so that these
//! are the ones a client meets.

use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// The most header fields a request may carry (hyper's own default).
pub const MAX_HEADERS: usize = 100;
/// The most bytes of header fields a request may carry.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Where hyper itself stops parsing.
pub const HYPER_MAX_HEADERS: usize = 10 * MAX_HEADERS;
pub const HYPER_MAX_HEADER_BYTES: usize = 10 * MAX_HEADER_BYTES;

/// Refuses a request whose headers exceed the limits, before any handler.
pub async fn headers(request: Request, next: Next) -> Response {
    let h = request.headers();
    // Name, value, ": " and CRLF, as on the wire.
    let bytes: usize = h.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    if h.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "Request headers too large (at most {MAX_HEADERS} fields, {MAX_HEADER_BYTES} bytes)"
            ),
        )
        .into_response();
    }
    next.run(request).await
}

/// The most bytes of a request body over the limit that are read (and
/// dropped) before the 413 is sent. A client still writing its body when
/// the server closes would get a reset instead of the answer, as closing a
/// socket with unread bytes resets it; beyond this the server closes anyway.
pub const MAX_DRAINED_BODY: u64 = 1024 * 1024;
/// How long a client may take to send the body that is drained.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Refuses a request whose declared body (Content-Length) is over
/// `max_body` bytes, before any handler, reading up to
/// [`MAX_DRAINED_BODY`] of it first so the client reads the 413. A body
/// without a declared length is held to the same limit where a handler
/// reads it.
pub async fn declared_body(max_body: usize, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(len) if len > max_body as u64 => {
            if len <= MAX_DRAINED_BODY {
                drain(request.into_body()).await;
            }
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Request body too large (at most {max_body} bytes)"),
            )
            .into_response()
        }
        _ => next.run(request).await,
    }
}

/// Reads `body` to its end and drops it, a frame at a time.
async fn drain(mut body: Body) {
    use http_body_util::BodyExt;
    let read = async { while let Some(Ok(_)) = body.frame().await {} };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, read).await;
}
