//! kilnd's HTTP/JSON API (axum). Routes live in one table so the router and
//! the OpenAPI document can be checked against each other.

mod auth;
pub mod error;
mod handlers;
mod limits;
pub mod tls;

pub use handlers::GrantList;
mod metrics;

use std::future::Future;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::Method;
use axum::routing::{delete, get, post, MethodRouter};
use axum::{middleware, Router};

use crate::manager::GrantManager;

pub use auth::{Actor, Tokens};
pub use error::{ApiError, ErrorBody};

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub manager: Arc<GrantManager>,
    /// The bearer tokens `/v1` routes accept.
    pub tokens: Tokens,
}

/// Whether a route needs the bearer token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Public,
    Token,
}

fn route_table() -> Vec<(Method, &'static str, Access, MethodRouter<AppState>)> {
    use handlers::*;
    vec![
        (Method::POST, "/v1/grants", Access::Token, post(submit)),
        (Method::GET, "/v1/grants", Access::Token, get(list)),
        (Method::GET, "/v1/grants/{id}", Access::Token, get(show)),
        (
            Method::DELETE,
            "/v1/grants/{id}",
            Access::Token,
            delete(terminate),
        ),
        (
            Method::GET,
            "/v1/grants/{id}/usage",
            Access::Token,
            get(usage),
        ),
        (
            Method::GET,
            "/v1/capabilities",
            Access::Token,
            get(capabilities),
        ),
        (Method::GET, "/healthz", Access::Public, get(healthz)),
        (Method::GET, "/metrics", Access::Public, get(metrics)),
    ]
}

/// Every route the router serves: method, path (axum syntax, which is also
/// OpenAPI's) and whether it needs the token.
pub fn routes() -> Vec<(Method, &'static str, Access)> {
    route_table()
        .into_iter()
        .map(|(m, p, a, _)| (m, p, a))
        .collect()
}

pub fn router(state: AppState) -> Router {
    let mut public = Router::new();
    let mut protected = Router::new();
    for (_, path, access, handler) in route_table() {
        match access {
            Access::Public => public = public.route(path, handler),
            Access::Token => protected = protected.route(path, handler),
        }
    }
    let protected = protected.route_layer(middleware::from_fn_with_state(
        state.clone(),
        auth::require_token,
    ));
    public
        .merge(protected)
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(|r, n| {
            limits::declared_body(MAX_BODY, r, n)
        }))
        .layer(middleware::from_fn(limits::headers))
        .layer(middleware::map_response(error::json_bodies))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` completes, then lets the
/// requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_tls(listener, state, None, shutdown).await
}

/// As [`serve`], over TLS when `tls` is given.
///
/// HTTP/1 is served with hyper directly rather than `axum::serve`, so that
/// hyper's own header limits sit far above kiln's: a request over kiln's
/// limits gets a 431 with the JSON error body from [`limits`]; only one
/// beyond hyper's (ten times as large) gets hyper's bare 431.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    state: AppState,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, or the peer gave up before the
                    // accept: neither ends the server.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Taken before the handshake, so shutdown waits for it too.
        let watcher = graceful.watcher();
        let app = app.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let Some(tls) = tls else {
                return serve_connection(stream, app, watcher).await;
            };
            // A client that never finishes its handshake holds nothing long.
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(stream, app, watcher).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// How long a client has to complete its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One HTTP/1 connection, plain or TLS, until it ends or shutdown closes it.
async fn serve_connection<I>(io: I, app: Router, watcher: hyper_util::server::graceful::Watcher)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .max_headers(limits::HYPER_MAX_HEADERS)
        .max_buf_size(limits::HYPER_MAX_HEADER_BYTES)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
