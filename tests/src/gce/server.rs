//! The HTTP side of the fake: one handler that matches a request to a
//! documented method, refuses what Google would refuse (an unknown query
//! parameter, a body field the schema lacks), asks [`World`], checks the
//! answer against the method's response schema, and logs the call.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::discovery::{discovery, Route};
use super::world::{ApiError, ListArgs, RequestRecord, World};

pub(crate) type Shared = Arc<Mutex<World>>;

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

fn json_response(code: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [("content-type", "application/json; charset=UTF-8")],
        body.to_string(),
    )
        .into_response()
}

pub(crate) async fn handle(
    State(world): State<Shared>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let query = parse_query(uri.query().unwrap_or(""));
    let route = discovery().route(method.as_str(), uri.path());
    let Ok(mut w) = world.lock() else {
        return json_response(500, &ApiError::new(500, "fake state poisoned").body());
    };
    let (id, result) = match route {
        None => (
            "unknown".to_string(),
            Err(ApiError::new(
                404,
                format!("The requested URL {} was not found.", uri.path()),
            )),
        ),
        Some(route) => {
            let id = route.id.clone();
            let result = answer(&mut w, &route, &query, &body);
            (id, result)
        }
    };
    let (code, out) = match result {
        Ok(v) => {
            let schema = discovery().response_schema(&id).unwrap_or("");
            let bad = discovery().violations(schema, &v);
            if bad.is_empty() {
                (200, v)
            } else {
                // The fake's own bug: loud, and on record for the tests.
                let msg = format!("{id} response is outside {schema}: {}", bad.join("; "));
                w.violations.push(msg.clone());
                (500, ApiError::new(500, msg).body())
            }
        }
        Err(e) => (e.code, e.body()),
    };
    w.log.push(RequestRecord {
        method: id,
        verb: method.to_string(),
        path: uri.path().to_string(),
        query,
        status: code,
    });
    drop(w);
    json_response(code, &out)
}

fn answer(
    w: &mut World,
    route: &Route,
    query: &[(String, String)],
    body: &[u8],
) -> Result<Value, ApiError> {
    let d = discovery();
    let p = |k: &str| route.params.get(k).map(String::as_str).unwrap_or("");
    let q = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    w.need_project(p("project"))?;
    if let Some(k) = d.unknown_query_parameter(&route.id, query) {
        return Err(ApiError::new(
            400,
            format!(
                "Invalid JSON payload received. Unknown name \"{k}\": Cannot bind query \
                 parameter. Field '{k}' could not be found in request message."
            ),
        ));
    }
    for alt in ["$alt", "alt"] {
        if let Some(v) = q(alt) {
            if v != "json" {
                return Err(ApiError::new(
                    400,
                    format!("Invalid value for field '{alt}': '{v}'. The fake speaks json only."),
                ));
            }
        }
    }
    if let Some(e) = w.take_http_fault(&route.id) {
        return Err(e);
    }
    let request = match d.request_schema(&route.id) {
        None => Value::Null,
        Some(schema) => {
            let v: Value = serde_json::from_slice(body)
                .map_err(|e| ApiError::new(400, format!("Invalid JSON payload received. {e}")))?;
            if let Some(first) = d.violations(schema, &v).into_iter().next() {
                return Err(ApiError::new(
                    400,
                    format!("Invalid JSON payload received. {first} at '{schema}'."),
                ));
            }
            v
        }
    };
    let list = ListArgs {
        filter: q("filter"),
        max_results: q("maxResults"),
        page_token: q("pageToken"),
        order_by: q("orderBy"),
    };
    match route.id.as_str() {
        "compute.instances.insert" => w.insert(p("zone"), q("requestId"), request),
        "compute.instances.get" => w.get(p("zone"), p("instance")),
        "compute.instances.delete" => w.delete(p("zone"), p("instance"), q("requestId")),
        "compute.instances.list" => w.list(p("zone"), &list),
        "compute.instances.aggregatedList" => w.aggregated_list(&list),
        "compute.zoneOperations.get" => w.get_op(p("zone"), p("operation")),
        "compute.zoneOperations.wait" => w.wait_op(p("zone"), p("operation")),
        "compute.machineTypes.list" => w.machine_types(p("zone"), &list),
        "compute.zones.list" => w.zones(&list),
        "compute.zones.get" => w.zone_get(p("zone")),
        "compute.regions.list" => w.regions(&list),
        "compute.regions.get" => w.region_get(p("region")),
        other => Err(ApiError::new(501, format!("{other} is not served"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_queries_as_clients_encode_them() {
        let q = parse_query("filter=labels.kiln-bridge+%3D+%22b%22&%24alt=json&flag&x=%zz");
        assert_eq!(q[0], ("filter".into(), "labels.kiln-bridge = \"b\"".into()));
        assert_eq!(q[1], ("$alt".into(), "json".into()));
        assert_eq!(q[2], ("flag".into(), String::new()));
        assert_eq!(q[3], ("x".into(), "%zz".into()));
        assert_eq!(decode("%4"), "%4");
    }
}
