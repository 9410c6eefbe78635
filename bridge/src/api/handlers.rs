//! One function per route.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::auth::Actor;
use super::error::ApiError;
use super::AppState;
use crate::fleet::ProviderCard;
use crate::view::{GrantView, UsageView};

/// The body of `GET /v1/grants`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GrantList {
    pub grants: Vec<GrantView>,
}

pub async fn submit(
    State(state): State<AppState>,
    Extension(Actor(by)): Extension<Actor>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let submitted = state.manager.submit_by(&body, Some(&by)).await?;
    // 202: the grant is stored; provisioning goes on in the background.
    let status = if submitted.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let location = format!("/v1/grants/{}", submitted.record.grant.id);
    Ok((
        status,
        [(header::LOCATION, location)],
        Json(GrantView::from(submitted.record)),
    )
        .into_response())
}

pub async fn list(State(state): State<AppState>) -> Result<Json<GrantList>, ApiError> {
    let grants = state
        .manager
        .list()?
        .into_iter()
        .map(GrantView::from)
        .collect();
    Ok(Json(GrantList { grants }))
}

pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<GrantView>, ApiError> {
    Ok(Json(state.manager.get(&id)?.into()))
}

pub async fn usage(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<UsageView>, ApiError> {
    Ok(Json(state.manager.usage(&id).await?))
}

/// 200 once the grant has ended, 202 if it is still stopping.
pub async fn terminate(
    State(state): State<AppState>,
    Extension(Actor(by)): Extension<Actor>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let record = state.manager.terminate_by(&id, Some(&by)).await?;
    let status = if record.state.is_final() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(GrantView::from(record))).into_response())
}

pub async fn capabilities(State(state): State<AppState>) -> Json<ProviderCard> {
    Json(state.manager.fleet().capabilities())
}

pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let store = state.manager.store();
    let counts = store.counts_by_state()?;
    let boot = store.provision_times_ms()?;
    let text = super::metrics::render(&counts, &boot, &state.manager.fleet().capabilities());
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

pub async fn not_found() -> ApiError {
    ApiError::not_found()
}
