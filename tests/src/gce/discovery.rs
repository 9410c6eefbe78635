//! The vendored subset of Google's Compute v1 discovery document
//! (`tests/data/gce-compute-v1-subset.json`, written by
//! `scripts/gce-discovery-extract.py`): the fake's route table, the query
//! parameters each method takes, and the schemas request and response
//! bodies are checked against. The fake serves nothing the document does
//! not describe.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde_json::Value;

const SUBSET: &str = include_str!("../../data/gce-compute-v1-subset.json");

/// Query parameters Google accepts on every call that the document does
/// not list: the `$`-prefixed system-parameter spellings the client
/// libraries send, and the API version the Rust client pins.
const SYSTEM_PARAMETERS: &[&str] = &["$alt", "$apiVersion", "$fields", "$prettyPrint"];

/// The parsed document.
pub struct Discovery {
    doc: Value,
}

/// One call the document describes, as a request matched it.
#[derive(Clone, Debug)]
pub struct Route {
    /// `compute.instances.insert`, …
    pub id: String,
    /// Path parameters by name (`project`, `zone`, `instance`, …).
    pub params: BTreeMap<String, String>,
}

/// The document, parsed once.
pub fn discovery() -> &'static Discovery {
    static DOC: OnceLock<Discovery> = OnceLock::new();
    DOC.get_or_init(|| Discovery {
        // The file is vendored and checked by the tests: a parse failure is
        // a broken checkout, not an input error.
        doc: serde_json::from_str(SUBSET).expect("tests/data/gce-compute-v1-subset.json is JSON"),
    })
}

impl Discovery {
    /// `compute/v1/`: the prefix of every method path.
    pub fn service_path(&self) -> &str {
        self.doc["servicePath"].as_str().unwrap_or("compute/v1/")
    }

    /// The discovery revision the extract came from.
    pub fn revision(&self) -> &str {
        self.doc["revision"].as_str().unwrap_or("")
    }

    /// Ids of the methods the fake serves.
    pub fn method_ids(&self) -> Vec<String> {
        self.methods().keys().cloned().collect()
    }

    fn methods(&self) -> &serde_json::Map<String, Value> {
        static EMPTY: OnceLock<serde_json::Map<String, Value>> = OnceLock::new();
        self.doc["methods"]
            .as_object()
            .unwrap_or_else(|| EMPTY.get_or_init(serde_json::Map::new))
    }

    fn method(&self, id: &str) -> &Value {
        &self.doc["methods"][id]
    }

    /// The method a request names, by HTTP verb and URL path (with the
    /// leading `/`), and its path parameters.
    pub fn route(&self, verb: &str, path: &str) -> Option<Route> {
        let rest = path.strip_prefix('/')?.strip_prefix(self.service_path())?;
        let got: Vec<&str> = rest.split('/').collect();
        for (id, m) in self.methods() {
            if m["httpMethod"].as_str() != Some(verb) {
                continue;
            }
            let Some(template) = m["path"].as_str() else {
                continue;
            };
            let want: Vec<&str> = template.split('/').collect();
            if want.len() != got.len() {
                continue;
            }
            let mut params = BTreeMap::new();
            let fits = want.iter().zip(&got).all(|(w, g)| {
                match w.strip_prefix('{').and_then(|w| w.strip_suffix('}')) {
                    Some(name) if !g.is_empty() => {
                        params.insert(name.to_string(), (*g).to_string());
                        true
                    }
                    Some(_) => false,
                    None => w == g,
                }
            });
            if fits {
                return Some(Route {
                    id: id.clone(),
                    params,
                });
            }
        }
        None
    }

    /// The first query parameter `method` does not take, if any.
    pub fn unknown_query_parameter<'a>(
        &self,
        method: &str,
        query: &'a [(String, String)],
    ) -> Option<&'a str> {
        let own = &self.method(method)["parameters"];
        let standard = &self.doc["parameters"];
        query.iter().map(|(k, _)| k.as_str()).find(|k| {
            let known = SYSTEM_PARAMETERS.contains(k)
                || standard.get(*k).is_some()
                || own
                    .get(*k)
                    .is_some_and(|p| p["location"].as_str() == Some("query"));
            !known
        })
    }

    /// The schema a method's request body must follow.
    pub fn request_schema(&self, method: &str) -> Option<&str> {
        self.method(method)["request"]["$ref"].as_str()
    }

    /// The schema a method's response follows.
    pub fn response_schema(&self, method: &str) -> Option<&str> {
        self.method(method)["response"]["$ref"].as_str()
    }

    /// Whether the document has a schema of that name.
    pub fn has_schema(&self, name: &str) -> bool {
        self.doc["schemas"].get(name).is_some()
    }

    /// Everything in `value` that schema `name` does not allow: unknown
    /// fields, wrong JSON types, values outside an enum. Each entry names
    /// where (`disks[0].initializeParams.foo`) and what.
    pub fn violations(&self, name: &str, value: &Value) -> Vec<String> {
        let mut found = Vec::new();
        self.check(&serde_json::json!({ "$ref": name }), value, "", &mut found);
        found
    }

    fn check(&self, schema: &Value, value: &Value, at: &str, found: &mut Vec<String>) {
        if let Some(name) = schema["$ref"].as_str() {
            match self.doc["schemas"].get(name) {
                Some(s) => self.check(s, value, at, found),
                None => found.push(format!("{at}: schema {name} is not in the extract")),
            }
            return;
        }
        let here = if at.is_empty() { "(top)" } else { at };
        match schema["type"].as_str() {
            Some("object") => {
                let Some(fields) = value.as_object() else {
                    found.push(format!("{here}: expected an object, got {value}"));
                    return;
                };
                for (k, v) in fields {
                    let path = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    if let Some(s) = schema["properties"].get(k) {
                        self.check(s, v, &path, found);
                    } else if let Some(s) = schema.get("additionalProperties") {
                        self.check(s, v, &path, found);
                    } else {
                        found.push(format!("{path}: unknown name {k:?}"));
                    }
                }
            }
            Some("array") => {
                let Some(items) = value.as_array() else {
                    found.push(format!("{here}: expected an array, got {value}"));
                    return;
                };
                for (i, v) in items.iter().enumerate() {
                    self.check(&schema["items"], v, &format!("{at}[{i}]"), found);
                }
            }
            Some("string") => match value.as_str() {
                None => found.push(format!("{here}: expected a string, got {value}")),
                Some(s) => {
                    if let Some(allowed) = schema["enum"].as_array() {
                        if !allowed.iter().any(|a| a.as_str() == Some(s)) {
                            found.push(format!("{here}: {s:?} is not one of its enum values"));
                        }
                    }
                    let integral = matches!(
                        schema["format"].as_str(),
                        Some("int64" | "uint64" | "int32" | "uint32")
                    );
                    if integral && s.parse::<i128>().is_err() {
                        found.push(format!("{here}: {s:?} is not an integer string"));
                    }
                }
            },
            Some("integer") if !(value.is_i64() || value.is_u64()) => {
                found.push(format!("{here}: expected an integer, got {value}"));
            }
            Some("number") if !value.is_number() => {
                found.push(format!("{here}: expected a number, got {value}"));
            }
            Some("boolean") if !value.is_boolean() => {
                found.push(format!("{here}: expected a boolean, got {value}"));
            }
            // A scalar of the right type, `any`, or a schema without a
            // type: nothing to add.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_extract_has_every_served_method_and_schema() {
        let d = discovery();
        for id in [
            "compute.instances.insert",
            "compute.instances.get",
            "compute.instances.delete",
            "compute.instances.list",
            "compute.instances.aggregatedList",
            "compute.zoneOperations.get",
            "compute.zoneOperations.wait",
            "compute.machineTypes.list",
            "compute.zones.list",
            "compute.regions.list",
            "compute.regions.get",
        ] {
            assert!(d.method_ids().iter().any(|m| m == id), "{id} missing");
            let resp = d.response_schema(id).unwrap();
            assert!(d.has_schema(resp), "{id}: {resp} missing");
        }
        assert_eq!(
            d.request_schema("compute.instances.insert"),
            Some("Instance")
        );
        assert!(!d.revision().is_empty());
    }

    #[test]
    fn routes_follow_the_documented_paths() {
        let d = discovery();
        let r = d
            .route("POST", "/compute/v1/projects/p/zones/z-a/instances")
            .unwrap();
        assert_eq!(r.id, "compute.instances.insert");
        assert_eq!(r.params["zone"], "z-a");
        let r = d
            .route("GET", "/compute/v1/projects/p/zones/z-a/operations/op-1")
            .unwrap();
        assert_eq!(r.id, "compute.zoneOperations.get");
        assert_eq!(r.params["operation"], "op-1");
        let r = d
            .route("GET", "/compute/v1/projects/p/aggregated/instances")
            .unwrap();
        assert_eq!(r.id, "compute.instances.aggregatedList");
        assert!(d
            .route("PUT", "/compute/v1/projects/p/zones/z/instances")
            .is_none());
        assert!(d
            .route("GET", "/compute/v1/projects/p/zones//instances")
            .is_none());
        assert!(d.route("GET", "/compute/beta/projects/p/zones").is_none());
    }

    #[test]
    fn query_parameters_are_the_documented_ones() {
        let d = discovery();
        let q = |k: &str| vec![(k.to_string(), "x".to_string())];
        for ok in [
            "requestId",
            "$alt",
            "$apiVersion",
            "alt",
            "fields",
            "prettyPrint",
        ] {
            assert_eq!(
                d.unknown_query_parameter("compute.instances.insert", &q(ok)),
                None,
                "{ok}"
            );
        }
        assert_eq!(
            d.unknown_query_parameter("compute.instances.insert", &q("filter")),
            Some("filter")
        );
        assert_eq!(
            d.unknown_query_parameter("compute.instances.aggregatedList", &q("filter")),
            None
        );
        // A path parameter is not a query parameter.
        assert_eq!(
            d.unknown_query_parameter("compute.instances.get", &q("zone")),
            Some("zone")
        );
    }

    #[test]
    fn violations_name_unknown_fields_types_and_enums() {
        let d = discovery();
        let ok = json!({
            "name": "a",
            "labels": {"kiln-bridge": "b"},
            "disks": [{"boot": true, "initializeParams": {"sourceImage": "x", "diskSizeGb": "10"}}],
            "metadata": {"items": [{"key": "startup-script", "value": "#!/bin/sh"}]},
            "advancedMachineFeatures": {"enableNestedVirtualization": true},
        });
        assert_eq!(d.violations("Instance", &ok), Vec::<String>::new());
        let bad = json!({
            "name": 3,
            "flavour": "x",
            "status": "SLEEPING",
            "disks": [{"initializeParams": {"diskSizeGb": "ten", "colour": 1}}],
        });
        let v = d.violations("Instance", &bad);
        assert!(
            v.iter().any(|e| e.starts_with("name: expected a string")),
            "{v:?}"
        );
        assert!(
            v.iter().any(|e| e.contains("flavour: unknown name")),
            "{v:?}"
        );
        assert!(v.iter().any(|e| e.contains("SLEEPING")), "{v:?}");
        assert!(
            v.iter()
                .any(|e| e.starts_with("disks[0].initializeParams.colour")),
            "{v:?}"
        );
        assert!(v.iter().any(|e| e.contains("\"ten\"")), "{v:?}");
    }
}
