//! Fuzz entry point for the grant validator: a plain function over
//! arbitrary bytes that panics only on a broken invariant. `tests/fuzz`
//! drives it coverage-guided (cargo fuzz, nightly); `cargo test` replays
//! the committed corpus through it.

use std::collections::BTreeSet;

use chrono::{TimeZone, Utc};

use super::{Grant, ValidationContext};

/// A `POST /v1/grants` body: refused with a one-line error, or a grant
/// that survives the store's round trip unchanged.
pub fn grant_json(data: &[u8]) {
    let ctx = ValidationContext {
        regions: BTreeSet::from(["home".to_string(), "eu-1".to_string()]),
        // Fixed, so that a crash replays the same way.
        now: Utc
            .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
            .single()
            .unwrap_or_default(),
    };
    match Grant::from_json(data, &ctx) {
        Err(e) => {
            let text = crate::error_chain(&e);
            assert!(!text.contains('\n'), "error spans lines: {text:?}");
        }
        Ok(grant) => {
            let stored = serde_json::to_string(&grant).expect("a valid grant serialises");
            let back: Grant = serde_json::from_str(&stored).expect("a stored grant reads back");
            assert_eq!(back, grant);
        }
    }
}
