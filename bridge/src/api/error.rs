//! Errors as the API returns them: a 4xx/5xx status and
//! `{ "error": "...", "field": "..." }`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::error_chain;
use crate::grant::GrantError;
use crate::manager::{ManagerError, SubmitError};
use crate::store::StoreError;

/// The JSON body of every error response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                error: error.into(),
                field: None,
            },
        }
    }

    fn with_field(mut self, field: Option<&str>) -> Self {
        self.body.field = field.map(str::to_string);
        self
    }

    pub fn unauthorized() -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "Missing or wrong bearer token")
    }

    pub fn not_found() -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "Not found")
    }

    /// A failure that is kilnd's, not the caller's: logged in full,
    /// reported briefly.
    fn internal(e: &dyn std::error::Error) -> Self {
        tracing::error!(error = %error_chain(e), "request failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal error")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let unauthorized = self.status == StatusCode::UNAUTHORIZED;
        let mut response = (self.status, Json(self.body)).into_response();
        if unauthorized {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Gives every error response kilnd's JSON body, including those axum
/// makes on its own (405 for a known path with another method, 413 for a
/// body over the limit): a client reads every error the same way. A plain
/// text body becomes the message.
pub async fn json_bodies(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Such bodies are a line of text at most; a longer one is not kept.
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = match text.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(line) => line.to_string(),
        None => status.canonical_reason().unwrap_or("Error").to_string(),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    let fresh = (
        status,
        Json(ErrorBody {
            error: message,
            field: None,
        }),
    )
        .into_response();
    let (fresh_parts, body) = fresh.into_parts();
    // Keep what the original said besides its body (Allow on a 405).
    parts.headers.extend(fresh_parts.headers);
    Response::from_parts(parts, body)
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match &e {
            SubmitError::Invalid(GrantError::MalformedJson(_) | GrantError::NotAnObject) => {
                ApiError::new(StatusCode::BAD_REQUEST, error_chain(&e))
            }
            SubmitError::Invalid(g) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, error_chain(&e))
                    .with_field(g.field())
            }
            SubmitError::IdInUse(_) => {
                ApiError::new(StatusCode::CONFLICT, error_chain(&e)).with_field(Some("request_id"))
            }
            SubmitError::Tag(_) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, error_chain(&e))
                .with_field(Some("image")),
            SubmitError::Store(_) => ApiError::internal(&e),
        }
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> Self {
        match &e {
            ManagerError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, error_chain(&e)),
            ManagerError::Store(_) => ApiError::internal(&e),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::internal(&e)
    }
}
