//! `openapi.yaml` and the router agree: the same routes, the same methods,
//! the same auth, and each documented route answers on a live server.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::*;
use kiln_bridge::api::{routes, Access};

const HTTP_METHODS: &[&str] = &["get", "put", "post", "delete", "patch", "head", "options"];

/// (METHOD, path, public) from the document's `paths:` section. The file is
/// our own, indented two spaces per level, so its lines are enough.
fn documented() -> BTreeSet<(String, String, bool)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"))
        .expect("openapi.yaml");
    let mut out = BTreeSet::new();
    let mut in_paths = false;
    let mut path: Option<String> = None;
    let mut method: Option<String> = None;
    let mut public = false;
    let mut flush = |path: &Option<String>, method: &mut Option<String>, public: bool| {
        if let (Some(p), Some(m)) = (path, method.take()) {
            out.insert((m, p.clone(), public));
        }
    };
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let key = line.trim().trim_end_matches(':');
        if indent == 0 && !line.trim().is_empty() {
            flush(&path, &mut method, public);
            in_paths = line == "paths:";
            path = None;
            continue;
        }
        if !in_paths {
            continue;
        }
        if indent == 2 && key.starts_with('/') {
            flush(&path, &mut method, public);
            path = Some(key.to_string());
        } else if indent == 4 && HTTP_METHODS.contains(&key) {
            flush(&path, &mut method, public);
            method = Some(key.to_uppercase());
            public = false;
        } else if indent == 6 && line.trim() == "security: []" {
            public = true;
        }
    }
    flush(&path, &mut method, public);
    out
}

#[test]
fn the_document_lists_exactly_the_routers_routes() {
    let served: BTreeSet<(String, String, bool)> = routes()
        .into_iter()
        .map(|(m, p, a)| (m.to_string(), p.to_string(), a == Access::Public))
        .collect();
    let documented = documented();
    assert_eq!(documented.len(), 8, "{documented:?}");
    assert_eq!(served, documented);
}

#[test]
fn every_documented_route_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(SimBackend::new(
        "sim",
        &["home"],
        false,
        World::new(2, 1024),
    ));
    let server = TestServer::start(dir.path(), vec![backend]);
    for (method, path, public) in documented() {
        let url = server.url(&path.replace("{id}", "nonexistent"));
        let body = (method == "POST").then_some("{}");
        let (status, _) = raw(&method, &url, None, body);
        if public {
            assert_eq!(status, 200, "{method} {path}");
        } else {
            assert_eq!(status, 401, "{method} {path} without a token");
            let (status, text) = raw(&method, &url, Some(TOKEN), body);
            // Served: never 405, and a 404 only for the unknown grant id.
            assert_ne!(status, 405, "{method} {path}");
            if status == 404 {
                assert!(
                    path.contains("{id}") && text.contains("nonexistent"),
                    "{method} {path}"
                );
            }
        }
    }
}
