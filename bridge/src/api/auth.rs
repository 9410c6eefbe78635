//! Bearer-token check for the `/v1` routes. Each configured token has a
//! name; a request let through carries it as an [`Actor`] extension, so
//! what it changes is recorded under that name.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::AppState;
use crate::config::NamedToken;

/// The name of the token a request presented.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor(pub Arc<str>);

/// The tokens kilnd accepts, kept as digests: comparing fixed-size digests
/// in constant time reveals neither a token's content nor its length.
#[derive(Clone)]
pub struct Tokens(Arc<[(Arc<str>, [u8; 32])]>);

impl Tokens {
    pub fn new(tokens: &[NamedToken]) -> Tokens {
        Tokens(
            tokens
                .iter()
                .map(|t| (Arc::from(t.name.as_str()), digest(&t.secret)))
                .collect(),
        )
    }

    /// One token named `default` (the single-token form).
    pub fn single(secret: &str) -> Tokens {
        Tokens::new(&[NamedToken {
            name: crate::config::DEFAULT_TOKEN_NAME.to_string(),
            secret: secret.to_string(),
        }])
    }

    /// The name of the token equal to `presented`. Every token is compared
    /// in full, whichever matches, so timing tells nothing about which one
    /// (or how much of one) a guess got right.
    fn find(&self, presented: &str) -> Option<Actor> {
        let d = digest(presented);
        let mut found = None;
        for (name, want) in self.0.iter() {
            if same_secret(&d, want) {
                found = Some(name);
            }
        }
        found.map(|n| Actor(Arc::clone(n)))
    }
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Lets the request through only with `Authorization: Bearer <token>`.
/// A refused request never reaches a handler, so it changes nothing.
pub async fn require_token(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let actor = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .and_then(|t| state.tokens.find(t));
    match actor {
        Some(actor) => {
            request.extensions_mut().insert(actor);
            next.run(request).await
        }
        None => ApiError::unauthorized().into_response(),
    }
}

/// The token of a `Bearer` credential. The scheme is case-insensitive
/// (RFC 9110, 11.1), so `bearer` and `BEARER` are the same scheme.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares without stopping at the first difference.
fn same_secret(a: &[u8; 32], b: &[u8; 32]) -> bool {
    // black_box keeps the optimiser from turning the fold into an early exit.
    std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_is_case_insensitive() {
        for v in ["Bearer t0k", "bearer t0k", "BEARER  t0k ", "bEaReR t0k"] {
            assert_eq!(bearer_token(v), Some("t0k"), "{v}");
        }
        for v in ["Basic t0k", "Bearert0k", "t0k", ""] {
            assert_eq!(bearer_token(v), None, "{v}");
        }
    }

    #[test]
    fn a_token_is_known_by_its_name_only_when_equal() {
        let named = |name: &str, secret: &str| NamedToken {
            name: name.into(),
            secret: secret.into(),
        };
        let tokens = Tokens::new(&[named("ci", "abc"), named("alice", "xyz")]);
        assert_eq!(tokens.find("abc"), Some(Actor("ci".into())));
        assert_eq!(tokens.find("xyz"), Some(Actor("alice".into())));
        for wrong in ["abd", "abcd", "ab", "", "XYZ"] {
            assert_eq!(tokens.find(wrong), None, "{wrong}");
        }
        assert_eq!(
            Tokens::single("s").find("s"),
            Some(Actor(crate::config::DEFAULT_TOKEN_NAME.into()))
        );
    }
}
