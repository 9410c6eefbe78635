//! Limits on a request's headers, answered with kiln's JSON error body.
//! hyper enforces its own limits while it parses (with a bare 431); kilnd
//! sets those far higher, so that these are the ones a client meets.

use axum::extract::Request;
use axum::http::StatusCode;
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
