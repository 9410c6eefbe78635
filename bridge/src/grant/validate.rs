//! Turns an untrusted request body into a [`Grant`], or an error naming the
//! field at fault.
//!
//! The body is taken apart field by field (rather than deserialised in one
//! go) so that every problem, including a wrong JSON type, names its field.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::{Grant, TdxPolicy};

const FIELDS: &[&str] = &[
    "request_id",
    "image",
    "vcpus",
    "cpu_millicores",
    "ram_mib",
    "region",
    "tdx",
    "ssh_keys",
    "valid_to",
    "command",
    "env",
    "publish",
];

const MAX_ID_LEN: usize = 64;
const MAX_IMAGE_LEN: usize = 512;
const MAX_SSH_KEYS: usize = 32;
/// The most guest ports one grant may publish: each is a host listener
/// and a thread in the grant's supervisor.
pub const MAX_PUBLISHED_PORTS: usize = 16;

/// Why a grant request was refused.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("Malformed JSON body")]
    MalformedJson(#[source] serde_json::Error),
    #[error("Body must be a JSON object")]
    NotAnObject,
    #[error("Invalid field {field}")]
    Field {
        field: String,
        #[source]
        problem: FieldProblem,
    },
}

impl GrantError {
    /// The field at fault, when there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            GrantError::Field { field, .. } => Some(field),
            _ => None,
        }
    }

    pub(crate) fn field_problem(field: impl Into<String>, problem: FieldProblem) -> Self {
        GrantError::Field {
            field: field.into(),
            problem,
        }
    }
}

/// What is wrong with one field.
#[derive(Debug, thiserror::Error)]
pub enum FieldProblem {
    #[error("unknown field")]
    Unknown,
    #[error("required")]
    Missing,
    #[error("wrong type, expected {0}")]
    WrongType(&'static str),
    #[error("must be greater than zero")]
    Zero,
    #[error("must not be empty")]
    Empty,
    #[error("too long (at most {0})")]
    TooLong(usize),
    #[error("may only contain letters, digits, '.', '_' and '-', starting with a letter or digit")]
    BadId,
    #[error("must not contain whitespace or control characters")]
    BadChars,
    #[error("give vcpus or cpu_millicores, not both")]
    Both,
    #[error("not a region any backend serves")]
    UnknownRegion,
    #[error("not an RFC 3339 time")]
    BadTime(#[source] chrono::ParseError),
    #[error("is not in the future")]
    NotInFuture,
    /// The parser's own words, each said once (its error layers repeat
    /// one another).
    #[error("not an OpenSSH public key: {0}")]
    BadSshKey(String),
    #[error("not an image reference")]
    BadImage(#[source] kiln_image::reference::ReferenceError),
    #[error("environment names must be non-empty and contain no '=' or NUL")]
    BadEnvName,
    #[error("no backend offers it")]
    NotOffered,
    #[error("larger than any backend in the region")]
    TooLarge,
    #[error("not a TCP port (1-65535)")]
    BadPort,
    #[error("given twice")]
    Duplicate,
}

/// What validation needs to know beyond the body itself.
#[derive(Clone, Debug)]
pub struct ValidationContext {
    /// Regions some backend serves.
    pub regions: BTreeSet<String>,
    pub now: DateTime<Utc>,
}

impl Grant {
    /// Validates a request body. Every refusal names the field at fault,
    /// except a body that is not a JSON object at all.
    pub fn from_json(body: &[u8], ctx: &ValidationContext) -> Result<Grant, GrantError> {
        let value: Value = serde_json::from_slice(body).map_err(GrantError::MalformedJson)?;
        let Value::Object(mut map) = value else {
            return Err(GrantError::NotAnObject);
        };
        if let Some(unknown) = map.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(GrantError::field_problem(
                shown_key(unknown),
                FieldProblem::Unknown,
            ));
        }

        let id = match take::<String>(&mut map, "request_id", "a string")? {
            Some(id) => check_id(id)?,
            None => format!("g-{}", uuid::Uuid::new_v4().simple()),
        };
        let image = check_image(require(take(&mut map, "image", "a string")?, "image")?)?;
        let (vcpus, cpu_millicores) = cpus(&mut map)?;
        let ram_mib: u64 = require(take(&mut map, "ram_mib", "a positive integer")?, "ram_mib")?;
        if ram_mib == 0 {
            return Err(GrantError::field_problem("ram_mib", FieldProblem::Zero));
        }
        let region: String = require(take(&mut map, "region", "a string")?, "region")?;
        if !ctx.regions.contains(&region) {
            return Err(GrantError::field_problem(
                "region",
                FieldProblem::UnknownRegion,
            ));
        }
        let tdx = take::<TdxPolicy>(&mut map, "tdx", "\"required\", \"preferred\" or \"no\"")?
            .unwrap_or_default();
        let ssh_keys = ssh_keys(require(
            take(&mut map, "ssh_keys", "an array of strings")?,
            "ssh_keys",
        )?)?;
        let valid_to = valid_to(
            require(
                take(&mut map, "valid_to", "an RFC 3339 string")?,
                "valid_to",
            )?,
            ctx.now,
        )?;
        let command = take::<Vec<String>>(&mut map, "command", "an array of strings")?
            .map(check_command)
            .transpose()?;
        let env = take::<BTreeMap<String, String>>(&mut map, "env", "an object of strings")?
            .map(check_env)
            .transpose()?
            .unwrap_or_default();
        let publish = take::<Vec<Value>>(&mut map, "publish", "an array of ports")?
            .map(check_publish)
            .transpose()?
            .unwrap_or_default();

        Ok(Grant {
            id,
            image,
            vcpus,
            cpu_millicores,
            ram_mib,
            region,
            tdx,
            ssh_keys,
            valid_to,
            command,
            env,
            publish,
            submitted_at: ctx.now,
        })
    }
}

/// Removes and parses one field; JSON `null` counts as absent.
fn take<T: DeserializeOwned>(
    map: &mut Map<String, Value>,
    field: &'static str,
    expected: &'static str,
) -> Result<Option<T>, GrantError> {
    match map.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v)
            .map(Some)
            .map_err(|_| GrantError::field_problem(field, FieldProblem::WrongType(expected))),
    }
}

fn require<T>(v: Option<T>, field: &'static str) -> Result<T, GrantError> {
    v.ok_or_else(|| GrantError::field_problem(field, FieldProblem::Missing))
}

fn check_id(id: String) -> Result<String, GrantError> {
    let problem = if id.is_empty() {
        Some(FieldProblem::Empty)
    } else if id.len() > MAX_ID_LEN {
        Some(FieldProblem::TooLong(MAX_ID_LEN))
    } else if !id.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        Some(FieldProblem::BadId)
    } else {
        None
    };
    match problem {
        Some(p) => Err(GrantError::field_problem("request_id", p)),
        None => Ok(id),
    }
}

fn check_image(image: String) -> Result<String, GrantError> {
    if image.is_empty() {
        return Err(GrantError::field_problem("image", FieldProblem::Empty));
    }
    if image.len() > MAX_IMAGE_LEN {
        return Err(GrantError::field_problem(
            "image",
            FieldProblem::TooLong(MAX_IMAGE_LEN),
        ));
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(GrantError::field_problem("image", FieldProblem::BadChars));
    }
    // Refused now rather than after the grant was accepted and queued.
    kiln_image::reference::Reference::parse(&image)
        .map_err(|e| GrantError::field_problem("image", FieldProblem::BadImage(e)))?;
    Ok(image)
}

/// vCPUs, from either `vcpus` or `cpu_millicores` (rounded up to whole CPUs).
fn cpus(map: &mut Map<String, Value>) -> Result<(u32, Option<u32>), GrantError> {
    let vcpus = take::<u32>(map, "vcpus", "a positive integer")?;
    let millicores = take::<u32>(map, "cpu_millicores", "a positive integer")?;
    match (vcpus, millicores) {
        (Some(_), Some(_)) => Err(GrantError::field_problem(
            "cpu_millicores",
            FieldProblem::Both,
        )),
        (None, None) => Err(GrantError::field_problem("vcpus", FieldProblem::Missing)),
        (Some(0), None) => Err(GrantError::field_problem("vcpus", FieldProblem::Zero)),
        (None, Some(0)) => Err(GrantError::field_problem(
            "cpu_millicores",
            FieldProblem::Zero,
        )),
        (Some(v), None) => Ok((v, None)),
        (None, Some(m)) => Ok((m.div_ceil(1000), Some(m))),
    }
}

fn ssh_keys(keys: Vec<String>) -> Result<Vec<String>, GrantError> {
    if keys.is_empty() {
        return Err(GrantError::field_problem("ssh_keys", FieldProblem::Empty));
    }
    if keys.len() > MAX_SSH_KEYS {
        return Err(GrantError::field_problem(
            "ssh_keys",
            FieldProblem::TooLong(MAX_SSH_KEYS),
        ));
    }
    keys.iter()
        .enumerate()
        .map(|(i, key)| {
            let field = format!("ssh_keys[{i}]");
            let bad = |e: ssh_key::Error| {
                GrantError::field_problem(
                    &field,
                    // The parser quotes what it read, newlines included.
                    FieldProblem::BadSshKey(crate::error_chain(&e).escape_debug().to_string()),
                )
            };
            ssh_key::PublicKey::from_openssh(key.trim())
                .map_err(bad)?
                .to_openssh()
                .map_err(bad)
        })
        .collect()
}

fn valid_to(raw: String, now: DateTime<Utc>) -> Result<DateTime<Utc>, GrantError> {
    let t = DateTime::parse_from_rfc3339(&raw)
        .map_err(|e| GrantError::field_problem("valid_to", FieldProblem::BadTime(e)))?
        .with_timezone(&Utc);
    if t <= now {
        return Err(GrantError::field_problem(
            "valid_to",
            FieldProblem::NotInFuture,
        ));
    }
    Ok(t)
}

fn check_command(argv: Vec<String>) -> Result<Vec<String>, GrantError> {
    match argv.first() {
        None => Err(GrantError::field_problem("command", FieldProblem::Empty)),
        Some(first) if first.is_empty() => {
            Err(GrantError::field_problem("command[0]", FieldProblem::Empty))
        }
        Some(_) => Ok(argv),
    }
}

fn check_env(env: BTreeMap<String, String>) -> Result<BTreeMap<String, String>, GrantError> {
    match env.keys().find(|k| !kiln_protocol::valid_env_name(k)) {
        Some(bad) => Err(GrantError::field_problem(
            format!("env.{bad}"),
            FieldProblem::BadEnvName,
        )),
        None => Ok(env),
    }
}

/// Guest TCP ports, each 1-65535 and given once. Port 22 is the
/// workload's like any other: the agent's SSH server listens on vsock, not
/// on the guest's TCP port 22.
fn check_publish(ports: Vec<Value>) -> Result<Vec<u16>, GrantError> {
    if ports.len() > MAX_PUBLISHED_PORTS {
        return Err(GrantError::field_problem(
            "publish",
            FieldProblem::TooLong(MAX_PUBLISHED_PORTS),
        ));
    }
    let mut seen = Vec::with_capacity(ports.len());
    for (i, v) in ports.iter().enumerate() {
        let port = v
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0)
            .ok_or_else(|| {
                GrantError::field_problem(format!("publish[{i}]"), FieldProblem::BadPort)
            })?;
        if seen.contains(&port) {
            return Err(GrantError::field_problem(
                format!("publish[{i}]"),
                FieldProblem::Duplicate,
            ));
        }
        seen.push(port);
    }
    Ok(seen)
}

/// A key the client made up, fit for a one-line error: control characters
/// and quotes escaped, at most 64 characters kept.
fn shown_key(key: &str) -> String {
    const SHOWN: usize = 64;
    let mut shown: String = key
        .chars()
        .take(SHOWN)
        .flat_map(char::escape_debug)
        .collect();
    if key.chars().count() > SHOWN {
        shown.push('…');
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn refusals_stay_one_line_whatever_the_keys_hold() {
        // Found by the grant_json fuzz target: a key holding a newline made
        // the refusal span two lines.
        for key in ["comm\nd", "a\r\u{1b}[2Jb", &"k".repeat(10_000)] {
            let body = with(key, json!(1));
            let e = Grant::from_json(&body, &ctx()).unwrap_err();
            let text = crate::error_chain(&e);
            assert!(!text.contains(['\n', '\r', '\u{1b}']), "{text:?}");
            assert!(text.len() < 200, "{text}");
            assert!(matches!(
                e,
                GrantError::Field {
                    problem: FieldProblem::Unknown,
                    ..
                }
            ));
        }
        let e = Grant::from_json(&with("colour", json!(1)), &ctx()).unwrap_err();
        assert_eq!(e.field(), Some("colour"));
        // Also found by it: the SSH key parser quotes a label with its newline.
        let body = with("ssh_keys", json!([
            "ssh-ed25519 AAAAC3NzClZaD1I1NTE5AAAAICYZWTaQeBZlanOWStbbTRqPk9TgC0LC/UyC2dMm+FFc t@kiln"
        ]));
        let text = crate::error_chain(&Grant::from_json(&body, &ctx()).unwrap_err());
        assert!(
            text.contains("ssh_keys[0]") && !text.contains('\n'),
            "{text:?}"
        );
    }

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICYZWTaQeBZlanOWStbbTRqPk9TgC0LC/UyC2dMm+FFc test@kiln";

    fn ctx() -> ValidationContext {
        ValidationContext {
            regions: ["home".to_string()].into(),
            now: "2030-01-01T00:00:00Z".parse().unwrap(),
        }
    }

    fn good() -> Value {
        json!({
            "image": "docker.io/library/alpine:3.20",
            "vcpus": 2,
            "ram_mib": 512,
            "region": "home",
            "ssh_keys": [KEY],
            "valid_to": "2030-01-01T01:00:00Z",
        })
    }

    fn with(field: &str, v: Value) -> Vec<u8> {
        let mut body = good();
        body[field] = v;
        serde_json::to_vec(&body).unwrap()
    }

    fn field_of(body: &[u8]) -> String {
        match Grant::from_json(body, &ctx()) {
            Err(e) => e.field().unwrap_or("<none>").to_string(),
            Ok(g) => panic!("accepted {g:?}"),
        }
    }

    #[test]
    fn a_good_request_is_accepted_with_a_generated_id() {
        let g = Grant::from_json(&serde_json::to_vec(&good()).unwrap(), &ctx()).unwrap();
        assert!(g.id.starts_with("g-") && g.id.len() > 10);
        assert_eq!((g.vcpus, g.ram_mib, g.tdx), (2, 512, TdxPolicy::No));
        assert_eq!(g.ssh_keys, vec![KEY.to_string()]);
        let again = Grant::from_json(&serde_json::to_vec(&good()).unwrap(), &ctx()).unwrap();
        assert_ne!(g.id, again.id);
    }

    #[test]
    fn a_bad_ssh_key_is_explained_once() {
        for key in [
            "ssh-ed25519 not-a-key",
            "ssh-ed25519 QUJD",
            "ssh-ed25519 AAAA!!!garbage!!!",
        ] {
            let body = with("ssh_keys", json!([key]));
            let e = Grant::from_json(&body, &ctx()).unwrap_err();
            let text = crate::error_chain(&e);
            assert!(text.starts_with("Invalid field ssh_keys[0]: "), "{text}");
            // The key parser's layers each repeat the one below.
            let parts: Vec<&str> = text.split(": ").collect();
            for (i, p) in parts.iter().enumerate() {
                assert!(!parts[..i].contains(p), "{p:?} said twice: {text}");
            }
        }
    }

    #[test]
    fn millicores_round_up_to_whole_vcpus() {
        let mut body = good();
        body.as_object_mut().unwrap().remove("vcpus");
        body["cpu_millicores"] = json!(1001);
        let g = Grant::from_json(&serde_json::to_vec(&body).unwrap(), &ctx()).unwrap();
        assert_eq!((g.vcpus, g.cpu_millicores), (2, Some(1001)));
        body["cpu_millicores"] = json!(250);
        let g = Grant::from_json(&serde_json::to_vec(&body).unwrap(), &ctx()).unwrap();
        assert_eq!(g.vcpus, 1);
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (with("bogus", json!(1)), "bogus"),
            (with("request_id", json!("has space")), "request_id"),
            (with("request_id", json!("")), "request_id"),
            (with("image", json!("")), "image"),
            (with("image", json!(7)), "image"),
            (
                with("image", json!("127.0.0.1:5055/../../etc/passwd")),
                "image",
            ),
            (with("image", json!("alpine:bad:tag!")), "image"),
            (with("vcpus", json!(0)), "vcpus"),
            (with("vcpus", json!(-1)), "vcpus"),
            (with("vcpus", json!(1.5)), "vcpus"),
            (with("cpu_millicores", json!(500)), "cpu_millicores"),
            (with("ram_mib", json!(0)), "ram_mib"),
            (with("ram_mib", json!(-512)), "ram_mib"),
            (with("region", json!("mars")), "region"),
            (with("tdx", json!("maybe")), "tdx"),
            (with("ssh_keys", json!([])), "ssh_keys"),
            (
                with("ssh_keys", json!([KEY, "ssh-ed25519 notbase64"])),
                "ssh_keys[1]",
            ),
            (with("valid_to", json!("tomorrow")), "valid_to"),
            (with("valid_to", json!("2029-12-31T23:59:59Z")), "valid_to"),
            (with("command", json!([])), "command"),
            (with("env", json!({"A=B": "c"})), "env.A=B"),
            (with("env", json!({"A": 1})), "env"),
            (with("publish", json!(8000)), "publish"),
            (with("publish", json!([8000, 0])), "publish[1]"),
            (with("publish", json!([65536])), "publish[0]"),
            (with("publish", json!([-80])), "publish[0]"),
            (with("publish", json!([80.5])), "publish[0]"),
            (with("publish", json!(["80"])), "publish[0]"),
            (with("publish", json!([8000, 8080, 8000])), "publish[2]"),
            (
                with("publish", json!((1..=17).collect::<Vec<u16>>())),
                "publish",
            ),
        ];
        for (body, field) in cases {
            assert_eq!(field_of(&body), field, "{}", String::from_utf8_lossy(&body));
        }
        let mut missing = good();
        for f in [
            "image", "ram_mib", "region", "ssh_keys", "valid_to", "vcpus",
        ] {
            let mut body = missing.clone();
            body.as_object_mut().unwrap().remove(f);
            assert_eq!(field_of(&serde_json::to_vec(&body).unwrap()), f);
        }
        missing["vcpus"] = Value::Null;
        assert_eq!(field_of(&serde_json::to_vec(&missing).unwrap()), "vcpus");
    }

    #[test]
    fn published_ports_are_kept_in_order_and_refused_with_their_index() {
        let g = Grant::from_json(&with("publish", json!([8080, 22, 1, 65535])), &ctx()).unwrap();
        // 22 too: the agent's SSH server is on vsock, the guest's TCP 22 is free.
        assert_eq!(g.publish, [8080, 22, 1, 65535]);
        let most: Vec<u16> = (1..=MAX_PUBLISHED_PORTS as u16).collect();
        let g = Grant::from_json(&with("publish", json!(most)), &ctx()).unwrap();
        assert_eq!(g.publish, most);
        for empty in [json!([]), Value::Null] {
            let g = Grant::from_json(&with("publish", empty), &ctx()).unwrap();
            assert!(g.publish.is_empty());
        }
        let e = Grant::from_json(&with("publish", json!([8000, 8000])), &ctx()).unwrap_err();
        assert_eq!(
            crate::error_chain(&e),
            "Invalid field publish[1]: given twice"
        );
        let e = Grant::from_json(&with("publish", json!([70000])), &ctx()).unwrap_err();
        assert_eq!(
            crate::error_chain(&e),
            "Invalid field publish[0]: not a TCP port (1-65535)"
        );
        let e = Grant::from_json(&with("publish", json!(vec![1; 17])), &ctx()).unwrap_err();
        assert_eq!(
            crate::error_chain(&e),
            "Invalid field publish: too long (at most 16)"
        );
        // A stored grant without the field (before ports could be
        // published) still reads, and one with none stores none.
        let none = Grant::from_json(&serde_json::to_vec(&good()).unwrap(), &ctx()).unwrap();
        let mut stored = serde_json::to_value(&none).unwrap();
        assert!(stored.get("publish").is_none(), "{stored}");
        stored["publish"] = json!([8000]);
        let back: Grant = serde_json::from_value(stored).unwrap();
        assert_eq!(back.publish, [8000]);
    }

    #[test]
    fn bodies_that_are_not_objects_are_refused_without_a_field() {
        for body in [&b"{not json"[..], b"[1,2]", b"", b"null"] {
            let e = Grant::from_json(body, &ctx()).unwrap_err();
            assert!(e.field().is_none(), "{e}");
        }
    }

    #[test]
    fn the_wire_request_type_validates_to_the_same_grant() {
        let req = super::super::GrantRequest {
            request_id: Some("job-1".into()),
            image: "alpine".into(),
            cpu_millicores: Some(2500),
            ram_mib: 256,
            region: "home".into(),
            tdx: TdxPolicy::Preferred,
            ssh_keys: vec![KEY.into()],
            valid_to: "2030-01-02T00:00:00Z".parse().unwrap(),
            command: Some(vec!["sh".into(), "-c".into(), "true".into()]),
            env: [("A".to_string(), "b".to_string())].into(),
            publish: vec![8000, 8080],
            ..Default::default()
        };
        let g = Grant::from_json(&serde_json::to_vec(&req).unwrap(), &ctx()).unwrap();
        assert_eq!(g.id, "job-1");
        assert_eq!((g.vcpus, g.tdx), (3, TdxPolicy::Preferred));
        assert_eq!(g.valid_to, req.valid_to);
        assert_eq!(g.workload().env, vec!["A=b".to_string()]);
        assert_eq!(g.workload().argv.len(), 3);
        assert_eq!(g.publish, [8000, 8080]);
    }
}
