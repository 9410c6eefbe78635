//! What the fake Compute API knows: zones, machine types, instances and
//! zone operations, and the faults a test asked for. Plain logic behind
//! one lock, without HTTP, so the lifecycle rules read in one place:
//!
//! - an operation is PENDING when the insert or delete returns it, then
//!   RUNNING, then DONE on successive gets (`zoneOperations.wait` makes it DONE at once);
//! - an insert whose zone or machine type has a fault creates nothing,
//!   and its operation ends DONE with the fault in `error.errors[]`;
//! - an instance reads PROVISIONING, STAGING, then RUNNING on successive
//!   reads; a delete makes it STOPPING, then TERMINATED, then gone (gone
//!   at the latest when the delete operation is DONE);
//! - a new instance may be hidden from the first N reads (eventual
//!   consistency), which count only when it would have been returned.

use std::collections::{BTreeMap, HashMap, VecDeque};

use chrono::{DateTime, FixedOffset, Offset, SecondsFormat, Utc};
use serde_json::{json, Map, Value};

use super::filter;

/// The host part of every `selfLink` and resource URL, as Google writes
/// them; never contacted.
const LINK_BASE: &str = "https://www.googleapis.com/compute/v1";

/// A failure inside a DONE insert operation, as GCE reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpFault {
    /// `ZONE_RESOURCE_POOL_EXHAUSTED`: no capacity in the zone.
    Capacity,
    /// `ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS`, its newer spelling.
    CapacityWithDetails,
    /// `QUOTA_EXCEEDED`: a regional quota (CPUS).
    Quota,
}

impl OpFault {
    fn code(self) -> &'static str {
        match self {
            OpFault::Capacity => "ZONE_RESOURCE_POOL_EXHAUSTED",
            OpFault::CapacityWithDetails => "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
            OpFault::Quota => "QUOTA_EXCEEDED",
        }
    }

    fn http(self) -> (u16, &'static str) {
        match self {
            OpFault::Capacity | OpFault::CapacityWithDetails => (503, "SERVICE UNAVAILABLE"),
            OpFault::Quota => (403, "FORBIDDEN"),
        }
    }

    fn message(self, project: &str, zone: &str, region: &str) -> String {
        match self {
            OpFault::Capacity | OpFault::CapacityWithDetails => format!(
                "The zone 'projects/{project}/zones/{zone}' does not have enough resources \
                 available to fulfill the request.  Try a different zone, or try again later."
            ),
            OpFault::Quota => {
                format!("Quota 'CPUS' exceeded.  Limit: 24.0 in region {region}.")
            }
        }
    }
}

/// An error answered instead of a resource: HTTP status, Google's
/// `status` word, the `errors[].reason`, and the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, message: impl Into<String>) -> ApiError {
        let (status, reason) = match code {
            400 => ("INVALID_ARGUMENT", "invalid"),
            401 => ("UNAUTHENTICATED", "authError"),
            403 => ("PERMISSION_DENIED", "forbidden"),
            404 => ("NOT_FOUND", "notFound"),
            409 => ("ALREADY_EXISTS", "alreadyExists"),
            429 => ("RESOURCE_EXHAUSTED", "rateLimitExceeded"),
            503 => ("UNAVAILABLE", "backendError"),
            _ => ("INTERNAL", "backendError"),
        };
        ApiError {
            code,
            status,
            reason,
            message: message.into(),
        }
    }

    fn not_found(what: &str) -> ApiError {
        ApiError::new(404, format!("The resource '{what}' was not found"))
    }

    fn invalid(field: &str, value: &str, why: &str) -> ApiError {
        ApiError::new(
            400,
            format!("Invalid value for field '{field}': '{value}'. {why}"),
        )
    }

    /// The body Google sends with an error.
    pub fn body(&self) -> Value {
        json!({"error": {
            "code": self.code,
            "message": self.message,
            "errors": [{"message": self.message, "domain": "global", "reason": self.reason}],
            "status": self.status,
        }})
    }
}

/// A zone and the private range its instances' addresses come from.
#[derive(Clone, Debug)]
pub struct ZoneDef {
    pub name: String,
    pub up: bool,
    /// `a.b.c.d/len`.
    pub cidr: String,
}

/// A machine type every zone offers.
#[derive(Clone, Debug)]
pub struct MachineTypeDef {
    pub name: String,
    pub cpus: u32,
    pub memory_mb: u32,
    pub arm: bool,
    pub shared_cpu: bool,
}

impl MachineTypeDef {
    fn new(name: &str, cpus: u32, memory_mb: u32) -> MachineTypeDef {
        MachineTypeDef {
            name: name.into(),
            cpus,
            memory_mb,
            arm: name.starts_with("t2a-") || name.starts_with("c4a-"),
            shared_cpu: matches!(name, "e2-micro" | "e2-small" | "e2-medium"),
        }
    }
}

/// The fake's starting world.
#[derive(Clone, Debug)]
pub struct Config {
    pub project: String,
    /// Region name → its zones.
    pub regions: BTreeMap<String, Vec<ZoneDef>>,
    pub machine_types: Vec<MachineTypeDef>,
}

impl Default for Config {
    fn default() -> Config {
        let mut regions = BTreeMap::new();
        let mut n = 0;
        for (region, suffixes) in [
            ("europe-west4", &["a", "b", "c"][..]),
            ("us-central1", &["a", "b", "c", "f"][..]),
        ] {
            let zones = suffixes
                .iter()
                .map(|s| {
                    n += 1;
                    ZoneDef {
                        name: format!("{region}-{s}"),
                        up: true,
                        cidr: format!("10.{}.0.0/20", 127 + n),
                    }
                })
                .collect();
            regions.insert(region.to_string(), zones);
        }
        let machine_types = [
            ("e2-medium", 2, 4096),
            ("e2-standard-4", 4, 16384),
            ("n1-standard-4", 4, 15360),
            ("n2-standard-8", 8, 32768),
            ("n2d-standard-8", 8, 32768),
            ("c2-standard-8", 8, 32768),
            ("c3-standard-4", 4, 16384),
            ("c3-standard-8", 8, 32768),
            ("t2a-standard-4", 4, 16384),
        ]
        .into_iter()
        .map(|(n, c, m)| MachineTypeDef::new(n, c, m))
        .collect();
        Config {
            project: "kiln-test".into(),
            regions,
            machine_types,
        }
    }
}

/// One request the fake answered, for tests to count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// The discovery method id (`compute.instances.insert`), or `unknown`.
    pub method: String,
    pub verb: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub status: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Status {
    Provisioning,
    Staging,
    Running,
    Stopping,
    Terminated,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Provisioning => "PROVISIONING",
            Status::Staging => "STAGING",
            Status::Running => "RUNNING",
            Status::Stopping => "STOPPING",
            Status::Terminated => "TERMINATED",
        }
    }

    fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "PROVISIONING" => Status::Provisioning,
            "STAGING" => Status::Staging,
            "RUNNING" => Status::Running,
            "STOPPING" => Status::Stopping,
            "TERMINATED" => Status::Terminated,
            _ => return None,
        })
    }
}

struct Instance {
    id: u64,
    zone: String,
    name: String,
    /// The insert body as sent (checked against the schema).
    body: Value,
    machine_type: String,
    status: Status,
    deleting: bool,
    created: DateTime<FixedOffset>,
    started: Option<DateTime<FixedOffset>>,
    hidden_reads: u32,
    network_ip: String,
    /// One per access config of the first interface.
    nat_ips: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpStatus {
    Pending,
    Running,
    Done,
}

struct Operation {
    id: u64,
    name: String,
    zone: String,
    kind: &'static str,
    target: String,
    target_id: u64,
    status: OpStatus,
    fault: Option<OpFault>,
    inserted: DateTime<FixedOffset>,
    started: Option<DateTime<FixedOffset>>,
    ended: Option<DateTime<FixedOffset>>,
}

/// The knobs a test turns.
#[derive(Default)]
struct Knobs {
    /// Zone or machine-type name → the fault its inserts end with.
    faults: HashMap<String, OpFault>,
    /// Reads a new instance is hidden from.
    hidden_reads: u32,
    /// Method id → HTTP errors to answer its next calls with.
    http_faults: HashMap<String, VecDeque<u16>>,
    /// Most items a list page holds (besides the client's maxResults).
    page_size: Option<usize>,
}

/// Everything the fake knows.
pub struct World {
    pub(crate) config: Config,
    next_id: u64,
    next_nat: u32,
    next_host: HashMap<String, u32>,
    instances: BTreeMap<(String, String), Instance>,
    operations: BTreeMap<String, Operation>,
    request_ids: HashMap<String, String>,
    knobs: Knobs,
    pub(crate) log: Vec<RequestRecord>,
    pub(crate) violations: Vec<String>,
    created: usize,
}

fn now() -> DateTime<FixedOffset> {
    // Google writes Pacific time with its offset; clients must parse it.
    let pacific = FixedOffset::west_opt(8 * 3600).unwrap_or_else(|| Utc.fix());
    Utc::now().with_timezone(&pacific)
}

fn stamp(t: &DateTime<FixedOffset>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, false)
}

/// GCE names: a lowercase letter, then lowercase letters, digits or
/// dashes, not ending in a dash, at most 63.
fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[b.len() - 1] != b'-'
}

/// A label key (like a name, `_` allowed) or value (may be empty or
/// start with a digit).
fn valid_label(s: &str, key: bool) -> bool {
    let ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_';
    s.len() <= 63
        && s.as_bytes().iter().all(ok)
        && (!key || s.as_bytes().first().is_some_and(u8::is_ascii_lowercase))
}

/// `requestId` must be a UUID other than the zero one.
fn valid_request_id(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    groups.len() == 5
        && groups
            .iter()
            .zip(lens)
            .all(|(g, n)| g.len() == n && g.bytes().all(|c| c.is_ascii_hexdigit()))
        && s.bytes().any(|c| c.is_ascii_hexdigit() && c != b'0')
}

fn last_segment(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

fn parse_cidr(cidr: &str) -> Option<(u32, u32)> {
    let (ip, len) = cidr.split_once('/')?;
    let ip: std::net::Ipv4Addr = ip.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    if !(8..=30).contains(&len) {
        return None;
    }
    let size = 1u32 << (32 - len);
    Some((u32::from(ip) & !(size - 1), size))
}

/// One page of `items`, by the client's `maxResults`/`pageToken` and the
/// page-size knob; the token is the next offset.
fn page<T>(
    items: Vec<T>,
    max: Option<&str>,
    token: Option<&str>,
    knob: Option<usize>,
) -> Result<(Vec<T>, Option<String>), ApiError> {
    let max = match max {
        None => 500,
        Some(m) => match m.parse::<usize>() {
            Ok(0) => 500,
            Ok(m) => m.min(500),
            Err(_) => return Err(ApiError::invalid("maxResults", m, "Must be a number.")),
        },
    };
    let size = knob.map_or(max, |k| k.min(max));
    let start = match token {
        None | Some("") => 0,
        Some(t) => t
            .parse::<usize>()
            .map_err(|_| ApiError::invalid("pageToken", t, "Invalid page token."))?,
    };
    let total = items.len();
    let end = (start + size).min(total);
    let next = (end < total).then(|| end.to_string());
    Ok((items.into_iter().skip(start).take(size).collect(), next))
}

/// What list calls share: filter, maxResults, pageToken.
pub struct ListArgs<'a> {
    pub filter: Option<&'a str>,
    pub max_results: Option<&'a str>,
    pub page_token: Option<&'a str>,
    pub order_by: Option<&'a str>,
}

impl ListArgs<'_> {
    fn terms(&self) -> Result<Vec<filter::Term>, ApiError> {
        if self.order_by.is_some_and(|o| !o.is_empty()) {
            return Err(ApiError::new(
                400,
                "Invalid value for field 'orderBy': the fake does not sort.",
            ));
        }
        filter::parse(self.filter.unwrap_or("")).map_err(|why| {
            ApiError::new(
                400,
                format!(
                    "Invalid value for field 'filter': '{}'. {why}",
                    self.filter.unwrap_or("")
                ),
            )
        })
    }
}

impl World {
    pub fn new(config: Config) -> World {
        World {
            config,
            next_id: 0,
            next_nat: 0,
            next_host: HashMap::new(),
            instances: BTreeMap::new(),
            operations: BTreeMap::new(),
            request_ids: HashMap::new(),
            knobs: Knobs::default(),
            log: Vec::new(),
            violations: Vec::new(),
            created: 0,
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        // Google ids are large unsigned numbers, written as strings.
        4_000_000_000_000_000_000 + self.next_id * 7919
    }

    fn project(&self) -> &str {
        &self.config.project
    }

    fn link(&self, rest: &str) -> String {
        format!("{LINK_BASE}/projects/{}/{rest}", self.project())
    }

    fn zone(&self, zone: &str) -> Option<(&str, &ZoneDef)> {
        self.config.regions.iter().find_map(|(r, zones)| {
            zones
                .iter()
                .find(|z| z.name == zone)
                .map(|z| (r.as_str(), z))
        })
    }

    fn need_zone(&self, zone: &str) -> Result<String, ApiError> {
        match self.zone(zone) {
            Some((region, _)) => Ok(region.to_string()),
            None => Err(ApiError::not_found(&format!(
                "projects/{}/zones/{zone}",
                self.project()
            ))),
        }
    }

    pub fn need_project(&self, project: &str) -> Result<(), ApiError> {
        if project == self.project() {
            Ok(())
        } else {
            Err(ApiError::not_found(&format!("projects/{project}")))
        }
    }

    // ---- knobs ----

    pub fn set_fault(&mut self, scope: &str, fault: Option<OpFault>) {
        match fault {
            Some(f) => self.knobs.faults.insert(scope.to_string(), f),
            None => self.knobs.faults.remove(scope),
        };
    }

    pub fn clear_faults(&mut self) {
        self.knobs.faults.clear();
        self.knobs.http_faults.clear();
    }

    pub fn set_hidden_reads(&mut self, n: u32) {
        self.knobs.hidden_reads = n;
    }

    pub fn set_page_size(&mut self, n: Option<usize>) {
        self.knobs.page_size = n.map(|n| n.max(1));
    }

    pub fn push_http_faults(&mut self, method: &str, code: u16, count: usize) {
        let q = self
            .knobs
            .http_faults
            .entry(method.to_string())
            .or_default();
        q.extend(std::iter::repeat_n(code, count));
    }

    /// The HTTP error the next call of `method` is to get, if a test
    /// asked for one.
    pub fn take_http_fault(&mut self, method: &str) -> Option<ApiError> {
        let code = self.knobs.http_faults.get_mut(method)?.pop_front()?;
        Some(ApiError::new(
            code,
            match code {
                401 => "Request is missing required authentication credential.",
                403 => "Required 'compute.instances.create' permission",
                429 => "Rate Limit Exceeded",
                _ => "Internal error. Please try again.",
            },
        ))
    }

    pub fn set_zone_up(&mut self, zone: &str, up: bool) {
        for z in self.config.regions.values_mut().flatten() {
            if z.name == zone {
                z.up = up;
            }
        }
    }

    pub fn set_zone_cidr(&mut self, zone: &str, cidr: &str) -> bool {
        if parse_cidr(cidr).is_none() {
            return false;
        }
        for z in self.config.regions.values_mut().flatten() {
            if z.name == zone {
                z.cidr = cidr.to_string();
                return true;
            }
        }
        false
    }

    /// Every instance, by (zone, name), as the fake holds them, however
    /// hidden.
    pub fn instance_names(&self) -> Vec<(String, String)> {
        self.instances.keys().cloned().collect()
    }

    /// An instance's private address (its first interface's).
    pub fn instance_ip(&self, zone: &str, name: &str) -> Option<String> {
        self.instances
            .get(&(zone.to_string(), name.to_string()))
            .map(|i| i.network_ip.clone())
    }

    pub fn instance_status(&self, zone: &str, name: &str) -> Option<&'static str> {
        self.instances
            .get(&(zone.to_string(), name.to_string()))
            .map(|i| i.status.word())
    }

    /// Sets an instance's status, as GCE would after a host event
    /// (`TERMINATED` after a preemption, say). False if unknown.
    pub fn force_status(&mut self, zone: &str, name: &str, status: &str) -> bool {
        let Some(s) = Status::parse(status) else {
            return false;
        };
        match self
            .instances
            .get_mut(&(zone.to_string(), name.to_string()))
        {
            Some(i) => {
                i.status = s;
                true
            }
            None => false,
        }
    }

    /// The insert body an instance was created from, as the client sent
    /// it (without counting as a read).
    pub fn inserted_body(&self, zone: &str, name: &str) -> Option<Value> {
        self.instances
            .get(&(zone.to_string(), name.to_string()))
            .map(|i| i.body.clone())
    }

    /// Instances created (not inserts answered).
    pub fn created(&self) -> usize {
        self.created
    }

    // ---- instances ----

    pub fn insert(
        &mut self,
        zone: &str,
        request_id: Option<&str>,
        body: Value,
    ) -> Result<Value, ApiError> {
        self.need_zone(zone)?;
        if let Some(r) = request_id {
            if !valid_request_id(r) {
                return Err(ApiError::invalid(
                    "requestId",
                    r,
                    "The request ID must be a valid UUID with the exception that zero UUID \
                     is not supported (00000000-0000-0000-0000-000000000000).",
                ));
            }
            if let Some(op) = self.request_ids.get(r) {
                // The same request again: its operation, nothing new.
                let op = op.clone();
                return self.render_op(&op);
            }
        }
        let name = body["name"].as_str().unwrap_or_default().to_string();
        if !valid_name(&name) {
            return Err(ApiError::invalid(
                "resource.name",
                &name,
                "Must be a match of regex '(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'",
            ));
        }
        let mt_url = body["machineType"].as_str().unwrap_or_default();
        let machine_type = last_segment(mt_url).to_string();
        if !self
            .config
            .machine_types
            .iter()
            .any(|m| m.name == machine_type)
        {
            return Err(ApiError::invalid(
                "resource.machineType",
                mt_url,
                &format!(
                    "Machine type with name '{machine_type}' does not exist in zone '{zone}'."
                ),
            ));
        }
        if let Some(labels) = body.get("labels").and_then(Value::as_object) {
            for (k, v) in labels {
                let v = v.as_str().unwrap_or_default();
                if !valid_label(k, true) || !valid_label(v, false) {
                    return Err(ApiError::invalid(
                        "labels",
                        &format!("{k}={v}"),
                        "Label keys and values may only contain lowercase letters, digits, \
                         '-' and '_', at most 63 characters; keys start with a letter.",
                    ));
                }
            }
        }
        let disks = body["disks"].as_array().cloned().unwrap_or_default();
        let boot = disks.iter().any(|d| {
            d["boot"].as_bool() == Some(true)
                && (d["initializeParams"]["sourceImage"].is_string() || d["source"].is_string())
        });
        if !boot {
            return Err(ApiError::invalid(
                "resource.disks",
                "",
                "Boot disk must be specified.",
            ));
        }
        let key = (zone.to_string(), name.clone());
        if self.instances.contains_key(&key) {
            return Err(ApiError::new(
                409,
                format!(
                    "The resource 'projects/{}/zones/{zone}/instances/{name}' already exists",
                    self.project()
                ),
            ));
        }
        let fault = self
            .knobs
            .faults
            .get(zone)
            .or_else(|| self.knobs.faults.get(&machine_type))
            .copied();
        let target_id = self.id();
        if fault.is_none() {
            let network_ip = self.next_address(zone)?;
            let nat_count = body["networkInterfaces"][0]["accessConfigs"]
                .as_array()
                .map_or(0, Vec::len);
            let nat_ips = (0..nat_count).map(|_| self.next_nat_ip()).collect();
            let instance = Instance {
                id: target_id,
                zone: zone.to_string(),
                name: name.clone(),
                body,
                machine_type,
                status: Status::Provisioning,
                deleting: false,
                created: now(),
                started: None,
                hidden_reads: self.knobs.hidden_reads,
                network_ip,
                nat_ips,
            };
            self.instances.insert(key, instance);
            self.created += 1;
        }
        let op = self.new_op(zone, "insert", &name, target_id, fault);
        if let Some(r) = request_id {
            self.request_ids.insert(r.to_string(), op.clone());
        }
        self.render_op(&op)
    }

    fn next_address(&mut self, zone: &str) -> Result<String, ApiError> {
        let cidr = self
            .zone(zone)
            .map(|(_, z)| z.cidr.clone())
            .unwrap_or_default();
        let Some((base, size)) = parse_cidr(&cidr) else {
            return Err(ApiError::new(
                500,
                format!("zone {zone} has no usable range"),
            ));
        };
        let n = self.next_host.entry(zone.to_string()).or_insert(1);
        *n += 1;
        // .0 is the network, .1 the gateway, the last the broadcast.
        if *n >= size - 1 {
            return Err(ApiError::new(
                503,
                format!("IP space of zone {zone} is exhausted"),
            ));
        }
        Ok(std::net::Ipv4Addr::from(base + *n).to_string())
    }

    fn next_nat_ip(&mut self) -> String {
        // TEST-NET-3 (RFC 5737): documentation addresses, never routed.
        self.next_nat = (self.next_nat % 253) + 1;
        format!("203.0.113.{}", self.next_nat)
    }

    pub fn get(&mut self, zone: &str, name: &str) -> Result<Value, ApiError> {
        self.need_zone(zone)?;
        let key = (zone.to_string(), name.to_string());
        let missing = || {
            ApiError::not_found(&format!(
                "projects/{}/zones/{zone}/instances/{name}",
                self.config.project
            ))
        };
        let Some(i) = self.instances.get_mut(&key) else {
            return Err(missing());
        };
        if i.hidden_reads > 0 {
            i.hidden_reads -= 1;
            return Err(missing());
        }
        let out = self.render_instance(&key);
        self.advance_instance(&key);
        Ok(out)
    }

    pub fn delete(
        &mut self,
        zone: &str,
        name: &str,
        request_id: Option<&str>,
    ) -> Result<Value, ApiError> {
        self.need_zone(zone)?;
        if let Some(r) = request_id {
            if !valid_request_id(r) {
                return Err(ApiError::invalid("requestId", r, "Must be a UUID."));
            }
            if let Some(op) = self.request_ids.get(r) {
                let op = op.clone();
                return self.render_op(&op);
            }
        }
        let key = (zone.to_string(), name.to_string());
        let Some(i) = self.instances.get_mut(&key) else {
            return Err(ApiError::not_found(&format!(
                "projects/{}/zones/{zone}/instances/{name}",
                self.config.project
            )));
        };
        i.deleting = true;
        if i.status < Status::Stopping {
            i.status = Status::Stopping;
        }
        let id = i.id;
        let op = self.new_op(zone, "delete", name, id, None);
        if let Some(r) = request_id {
            self.request_ids.insert(r.to_string(), op.clone());
        }
        self.render_op(&op)
    }

    /// A read moves an instance one step along its lifecycle.
    fn advance_instance(&mut self, key: &(String, String)) {
        let Some(i) = self.instances.get_mut(key) else {
            return;
        };
        i.status = match i.status {
            Status::Provisioning => Status::Staging,
            Status::Staging => {
                i.started = Some(now());
                Status::Running
            }
            Status::Stopping if i.deleting => Status::Terminated,
            Status::Terminated if i.deleting => {
                self.instances.remove(key);
                return;
            }
            other => other,
        };
    }

    /// The instances of `zones` that pass `args`' filter, each counted as
    /// a read; hidden ones use up one hidden read instead.
    fn read_many(&mut self, zones: &[String], terms: &[filter::Term]) -> Vec<(String, Value)> {
        let keys: Vec<(String, String)> = self
            .instances
            .keys()
            .filter(|(z, _)| zones.contains(z))
            .cloned()
            .collect();
        let mut out = Vec::new();
        for key in keys {
            let v = self.render_instance(&key);
            if !filter::matches(terms, &v) {
                continue;
            }
            if let Some(i) = self.instances.get_mut(&key) {
                if i.hidden_reads > 0 {
                    i.hidden_reads -= 1;
                    continue;
                }
            }
            self.advance_instance(&key);
            out.push((key.0, v));
        }
        out
    }

    pub fn list(&mut self, zone: &str, args: &ListArgs) -> Result<Value, ApiError> {
        self.need_zone(zone)?;
        let terms = args.terms()?;
        let all = self.read_many(&[zone.to_string()], &terms);
        let (items, next) = page(
            all.into_iter().map(|(_, v)| v).collect(),
            args.max_results,
            args.page_token,
            self.knobs.page_size,
        )?;
        let mut out = json!({
            "kind": "compute#instanceList",
            "id": format!("projects/{}/zones/{zone}/instances", self.project()),
            "items": items,
            "selfLink": self.link(&format!("zones/{zone}/instances")),
        });
        if let Some(n) = next {
            out["nextPageToken"] = json!(n);
        }
        Ok(out)
    }

    pub fn aggregated_list(&mut self, args: &ListArgs) -> Result<Value, ApiError> {
        let terms = args.terms()?;
        let zones: Vec<String> = self
            .config
            .regions
            .values()
            .flatten()
            .map(|z| z.name.clone())
            .collect();
        let all = self.read_many(&zones, &terms);
        let (items, next) = page(all, args.max_results, args.page_token, self.knobs.page_size)?;
        let mut scoped: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for (zone, v) in items {
            scoped.entry(zone).or_default().push(v);
        }
        let mut map = Map::new();
        for zone in &zones {
            let scope = format!("zones/{zone}");
            let entry = match scoped.remove(zone) {
                Some(list) => json!({"instances": list}),
                None => json!({"warning": {
                    "code": "NO_RESULTS_ON_PAGE",
                    "message": format!("There are no results for scope '{scope}' on this page."),
                    "data": [{"key": "scope", "value": scope}],
                }}),
            };
            map.insert(scope, entry);
        }
        let mut out = json!({
            "kind": "compute#instanceAggregatedList",
            "id": format!("projects/{}/aggregated/instances", self.project()),
            "items": map,
            "selfLink": self.link("aggregated/instances"),
        });
        if let Some(n) = next {
            out["nextPageToken"] = json!(n);
        }
        Ok(out)
    }

    fn render_instance(&self, key: &(String, String)) -> Value {
        let Some(i) = self.instances.get(key) else {
            return Value::Null;
        };
        let zone = &i.zone;
        let region = self.zone(zone).map(|(r, _)| r).unwrap_or_default();
        let mut v = i.body.clone();
        let Some(o) = v.as_object_mut() else {
            return Value::Null;
        };
        let mt = self
            .config
            .machine_types
            .iter()
            .find(|m| m.name == i.machine_type);
        let fingerprint = format!("{:012x}", i.id % 0xffff_ffff_ffff);
        o.insert("kind".into(), json!("compute#instance"));
        o.insert("id".into(), json!(i.id.to_string()));
        o.insert("name".into(), json!(i.name));
        o.insert("creationTimestamp".into(), json!(stamp(&i.created)));
        o.insert("zone".into(), json!(self.link(&format!("zones/{zone}"))));
        o.insert(
            "machineType".into(),
            json!(self.link(&format!("zones/{zone}/machineTypes/{}", i.machine_type))),
        );
        o.insert("status".into(), json!(i.status.word()));
        o.insert(
            "selfLink".into(),
            json!(self.link(&format!("zones/{zone}/instances/{}", i.name))),
        );
        o.insert(
            "cpuPlatform".into(),
            json!(match mt {
                Some(m) if m.arm => "Ampere Altra",
                Some(m) if m.name.starts_with("n2d-") => "AMD Milan",
                Some(m) if m.name.starts_with("c3-") => "Intel Sapphire Rapids",
                _ => "Intel Cascade Lake",
            }),
        );
        o.insert("fingerprint".into(), json!(fingerprint));
        o.insert("labelFingerprint".into(), json!(fingerprint));
        o.insert("startRestricted".into(), json!(false));
        o.entry("deletionProtection").or_insert(json!(false));
        o.entry("canIpForward").or_insert(json!(false));
        o.entry("labels").or_insert(json!({}));
        if let Some(t) = &i.started {
            o.insert("lastStartTimestamp".into(), json!(stamp(t)));
        }
        let mut metadata = o.remove("metadata").unwrap_or_else(|| json!({}));
        metadata["kind"] = json!("compute#metadata");
        metadata["fingerprint"] = json!(fingerprint);
        o.insert("metadata".into(), metadata);
        o.entry("scheduling").or_insert(json!({
            "onHostMaintenance": "MIGRATE",
            "automaticRestart": true,
            "preemptible": false,
            "provisioningModel": "STANDARD",
        }));
        let disks: Vec<Value> = o
            .get("disks")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(n, d)| {
                let device = d["deviceName"]
                    .as_str()
                    .map_or_else(|| format!("persistent-disk-{n}"), str::to_string);
                let disk_name = if n == 0 {
                    i.name.clone()
                } else {
                    format!("{}-{n}", i.name)
                };
                let size = d["initializeParams"]["diskSizeGb"]
                    .as_str()
                    .unwrap_or("10")
                    .to_string();
                json!({
                    "kind": "compute#attachedDisk",
                    "type": "PERSISTENT",
                    "mode": "READ_WRITE",
                    "source": self.link(&format!("zones/{zone}/disks/{disk_name}")),
                    "deviceName": device,
                    "index": n,
                    "boot": d["boot"].as_bool().unwrap_or(false),
                    "autoDelete": d["autoDelete"].as_bool().unwrap_or(false),
                    "interface": "SCSI",
                    "diskSizeGb": size,
                })
            })
            .collect();
        o.insert("disks".into(), json!(disks));
        let nics: Vec<Value> = o
            .get("networkInterfaces")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_else(|| vec![json!({})])
            .into_iter()
            .enumerate()
            .map(|(n, mut nic)| {
                let network = nic["network"].as_str().unwrap_or("global/networks/default");
                let network = format!("global/networks/{}", last_segment(network));
                nic["kind"] = json!("compute#networkInterface");
                nic["name"] = json!(format!("nic{n}"));
                nic["network"] = json!(self.link(&network));
                nic["subnetwork"] =
                    json!(self.link(&format!("regions/{region}/subnetworks/default")));
                nic["fingerprint"] = json!(fingerprint);
                nic["stackType"] = json!("IPV4_ONLY");
                if n == 0 {
                    nic["networkIP"] = json!(i.network_ip);
                    if let Some(acs) = nic["accessConfigs"].as_array_mut() {
                        for (k, ac) in acs.iter_mut().enumerate() {
                            ac["kind"] = json!("compute#accessConfig");
                            if ac.get("type").is_none() {
                                ac["type"] = json!("ONE_TO_ONE_NAT");
                            }
                            if ac.get("name").is_none() {
                                ac["name"] = json!("External NAT");
                            }
                            if ac.get("networkTier").is_none() {
                                ac["networkTier"] = json!("PREMIUM");
                            }
                            // Addresses are released once the instance stops.
                            let live = i.status < Status::Stopping;
                            match i.nat_ips.get(k) {
                                Some(ip) if live => ac["natIP"] = json!(ip),
                                _ => {
                                    if let Some(m) = ac.as_object_mut() {
                                        m.remove("natIP");
                                    }
                                }
                            }
                        }
                    }
                }
                nic
            })
            .collect();
        o.insert("networkInterfaces".into(), json!(nics));
        v
    }

    // ---- operations ----

    fn new_op(
        &mut self,
        zone: &str,
        kind: &'static str,
        target: &str,
        target_id: u64,
        fault: Option<OpFault>,
    ) -> String {
        let id = self.id();
        let t = now();
        // Google's shape: operation-<epoch ms>-<hex>-<hex>-<hex>.
        let name = format!(
            "operation-{}-{:013x}-{:08x}-{:08x}",
            t.timestamp_millis(),
            id & 0x1f_ffff_ffff_ffff,
            id as u32,
            target_id as u32
        );
        self.operations.insert(
            name.clone(),
            Operation {
                id,
                name: name.clone(),
                zone: zone.to_string(),
                kind,
                target: target.to_string(),
                target_id,
                status: OpStatus::Pending,
                fault,
                inserted: t,
                started: None,
                ended: None,
            },
        );
        name
    }

    fn op_done(&mut self, name: &str) {
        let Some(op) = self.operations.get_mut(name) else {
            return;
        };
        if op.status == OpStatus::Done {
            return;
        }
        let t = now();
        op.started.get_or_insert(t);
        op.ended = Some(t);
        op.status = OpStatus::Done;
        if op.kind == "delete" {
            let key = (op.zone.clone(), op.target.clone());
            self.instances.remove(&key);
        }
    }

    fn need_op(&self, zone: &str, name: &str) -> Result<(), ApiError> {
        match self.operations.get(name) {
            Some(op) if op.zone == zone => Ok(()),
            _ => Err(ApiError::not_found(&format!(
                "projects/{}/zones/{zone}/operations/{name}",
                self.project()
            ))),
        }
    }

    /// `zoneOperations.get`: the operation one step further than last
    /// answered (the insert or delete answered PENDING).
    pub fn get_op(&mut self, zone: &str, name: &str) -> Result<Value, ApiError> {
        self.need_zone(zone)?;
        self.need_op(zone, name)?;
        let status = self.operations.get(name).map(|o| o.status);
        match status {
            Some(OpStatus::Pending) => {
                if let Some(op) = self.operations.get_mut(name) {
                    op.status = OpStatus::Running;
                    op.started = Some(now());
                }
            }
            Some(OpStatus::Running) => self.op_done(name),
            _ => {}
        }
        self.render_op(name)
    }

    /// `zoneOperations.wait`: DONE at once.
    pub fn wait_op(&mut self, zone: &str, name: &str) -> Result<Value, ApiError> {
        self.need_zone(zone)?;
        self.need_op(zone, name)?;
        self.op_done(name);
        self.render_op(name)
    }

    fn render_op(&self, name: &str) -> Result<Value, ApiError> {
        let Some(op) = self.operations.get(name) else {
            return Err(ApiError::new(500, format!("operation {name} vanished")));
        };
        let zone = &op.zone;
        let region = self.zone(zone).map(|(r, _)| r).unwrap_or_default();
        let mut v = json!({
            "kind": "compute#operation",
            "id": op.id.to_string(),
            "name": op.name,
            "zone": self.link(&format!("zones/{zone}")),
            "operationType": op.kind,
            "targetLink": self.link(&format!("zones/{zone}/instances/{}", op.target)),
            "targetId": op.target_id.to_string(),
            "status": match op.status {
                OpStatus::Pending => "PENDING",
                OpStatus::Running => "RUNNING",
                OpStatus::Done => "DONE",
            },
            "user": "kiln-test@kiln-test.iam.gserviceaccount.com",
            "progress": match op.status {
                OpStatus::Pending => 0,
                OpStatus::Running => 50,
                OpStatus::Done => 100,
            },
            "insertTime": stamp(&op.inserted),
            "selfLink": self.link(&format!("zones/{zone}/operations/{}", op.name)),
        });
        if let Some(t) = &op.started {
            v["startTime"] = json!(stamp(t));
        }
        if let Some(t) = &op.ended {
            v["endTime"] = json!(stamp(t));
        }
        if let (OpStatus::Done, Some(f)) = (op.status, op.fault) {
            let (code, words) = f.http();
            v["error"] = json!({"errors": [{
                "code": f.code(),
                "message": f.message(self.project(), zone, region),
            }]});
            v["httpErrorStatusCode"] = json!(code);
            v["httpErrorMessage"] = json!(words);
        }
        Ok(v)
    }

    // ---- catalogue ----

    pub fn machine_types(&self, zone: &str, args: &ListArgs) -> Result<Value, ApiError> {
        self.need_zone(zone)?;
        let terms = args.terms()?;
        let items: Vec<Value> = self
            .config
            .machine_types
            .iter()
            .enumerate()
            .map(|(n, m)| {
                json!({
                    "kind": "compute#machineType",
                    "id": (1_000_000 + n as u64).to_string(),
                    "creationTimestamp": "2015-01-16T09:25:43.314-08:00",
                    "name": m.name,
                    "description": format!("{} vCPUs, {} GB RAM", m.cpus, m.memory_mb / 1024),
                    "guestCpus": m.cpus,
                    "memoryMb": m.memory_mb,
                    "imageSpaceGb": 0,
                    "maximumPersistentDisks": 128,
                    "maximumPersistentDisksSizeGb": "263168",
                    // The zone's name here, not its URL (as Google writes it).
                    "zone": zone,
                    "selfLink": self.link(&format!("zones/{zone}/machineTypes/{}", m.name)),
                    "isSharedCpu": m.shared_cpu,
                    "architecture": if m.arm { "ARM64" } else { "X86_64" },
                })
            })
            .filter(|v| filter::matches(&terms, v))
            .collect();
        let (items, next) = page(
            items,
            args.max_results,
            args.page_token,
            self.knobs.page_size,
        )?;
        let mut out = json!({
            "kind": "compute#machineTypeList",
            "id": format!("projects/{}/zones/{zone}/machineTypes", self.project()),
            "items": items,
            "selfLink": self.link(&format!("zones/{zone}/machineTypes")),
        });
        if let Some(n) = next {
            out["nextPageToken"] = json!(n);
        }
        Ok(out)
    }

    fn render_zone(&self, region: &str, z: &ZoneDef, n: usize) -> Value {
        json!({
            "kind": "compute#zone",
            "id": (2000 + n).to_string(),
            "creationTimestamp": "1969-12-31T16:00:00.000-08:00",
            "name": z.name,
            "description": z.name,
            "status": if z.up { "UP" } else { "DOWN" },
            "region": self.link(&format!("regions/{region}")),
            "selfLink": self.link(&format!("zones/{}", z.name)),
            "availableCpuPlatforms": ["Intel Sapphire Rapids", "Intel Cascade Lake", "AMD Milan"],
            "supportsPzs": false,
        })
    }

    fn all_zones(&self) -> Vec<Value> {
        let mut n = 0;
        let mut out = Vec::new();
        for (region, zones) in &self.config.regions {
            for z in zones {
                n += 1;
                out.push(self.render_zone(region, z, n));
            }
        }
        out
    }

    pub fn zones(&self, args: &ListArgs) -> Result<Value, ApiError> {
        let terms = args.terms()?;
        let items: Vec<Value> = self
            .all_zones()
            .into_iter()
            .filter(|v| filter::matches(&terms, v))
            .collect();
        let (items, next) = page(
            items,
            args.max_results,
            args.page_token,
            self.knobs.page_size,
        )?;
        let mut out = json!({
            "kind": "compute#zoneList",
            "id": format!("projects/{}/zones", self.project()),
            "items": items,
            "selfLink": self.link("zones"),
        });
        if let Some(n) = next {
            out["nextPageToken"] = json!(n);
        }
        Ok(out)
    }

    pub fn zone_get(&self, zone: &str) -> Result<Value, ApiError> {
        self.need_zone(zone)?;
        Ok(self
            .all_zones()
            .into_iter()
            .find(|v| v["name"] == zone)
            .unwrap_or(Value::Null))
    }

    fn render_region(&self, region: &str, n: usize) -> Value {
        let zones: Vec<String> = self
            .config
            .regions
            .get(region)
            .into_iter()
            .flatten()
            .map(|z| self.link(&format!("zones/{}", z.name)))
            .collect();
        json!({
            "kind": "compute#region",
            "id": (1000 + n).to_string(),
            "creationTimestamp": "1969-12-31T16:00:00.000-08:00",
            "name": region,
            "description": region,
            "status": "UP",
            "zones": zones,
            "selfLink": self.link(&format!("regions/{region}")),
            "supportsPzs": false,
        })
    }

    pub fn regions(&self, args: &ListArgs) -> Result<Value, ApiError> {
        let terms = args.terms()?;
        let items: Vec<Value> = self
            .config
            .regions
            .keys()
            .enumerate()
            .map(|(n, r)| self.render_region(r, n))
            .filter(|v| filter::matches(&terms, v))
            .collect();
        let (items, next) = page(
            items,
            args.max_results,
            args.page_token,
            self.knobs.page_size,
        )?;
        let mut out = json!({
            "kind": "compute#regionList",
            "id": format!("projects/{}/regions", self.project()),
            "items": items,
            "selfLink": self.link("regions"),
        });
        if let Some(n) = next {
            out["nextPageToken"] = json!(n);
        }
        Ok(out)
    }

    pub fn region_get(&self, region: &str) -> Result<Value, ApiError> {
        match self.config.regions.keys().position(|r| r == region) {
            Some(n) => Ok(self.render_region(region, n)),
            None => Err(ApiError::not_found(&format!(
                "projects/{}/regions/{region}",
                self.project()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(name: &str) -> Value {
        json!({
            "name": name,
            "machineType": "zones/us-central1-a/machineTypes/n2-standard-8",
            "disks": [{"boot": true, "autoDelete": true,
                       "initializeParams": {"sourceImage": "projects/debian-cloud/global/images/family/debian-12"}}],
            "networkInterfaces": [{"accessConfigs": [{"type": "ONE_TO_ONE_NAT"}]}],
            "labels": {"kiln-bridge": "b1"},
        })
    }

    const Z: &str = "us-central1-a";
    const RID: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";

    fn no_list() -> ListArgs<'static> {
        ListArgs {
            filter: None,
            max_results: None,
            page_token: None,
            order_by: None,
        }
    }

    #[test]
    fn names_labels_and_request_ids_follow_gce_rules() {
        assert!(valid_name("kiln-1a"));
        assert!(!valid_name("1kiln") && !valid_name("kiln-") && !valid_name("Kiln"));
        assert!(!valid_name(&"a".repeat(64)));
        assert!(valid_label("kiln-bridge", true) && valid_label("", false));
        assert!(!valid_label("", true) && !valid_label("Ab", false));
        assert!(valid_request_id(RID));
        assert!(!valid_request_id("00000000-0000-0000-0000-000000000000"));
        assert!(!valid_request_id("token-1"));
    }

    #[test]
    fn addresses_come_from_the_zone_range() {
        let mut w = World::new(Config::default());
        assert!(w.set_zone_cidr(Z, "172.16.4.0/30"));
        w.insert(Z, None, body("a")).unwrap();
        assert_eq!(
            w.instances[&(Z.into(), "a".into())].network_ip,
            "172.16.4.2"
        );
        // A /30 has one usable host after the gateway.
        assert_eq!(w.insert(Z, None, body("b")).unwrap_err().code, 503);
        assert!(!w.set_zone_cidr(Z, "nonsense"));
    }

    #[test]
    fn a_deleted_instance_goes_stopping_terminated_gone() {
        let mut w = World::new(Config::default());
        w.insert(Z, None, body("a")).unwrap();
        let op = w.delete(Z, "a", None).unwrap();
        assert_eq!(op["status"], "PENDING");
        assert_eq!(w.get(Z, "a").unwrap()["status"], "STOPPING");
        let t = w.get(Z, "a").unwrap();
        assert_eq!(t["status"], "TERMINATED");
        assert!(t["networkInterfaces"][0]["accessConfigs"][0]
            .get("natIP")
            .is_none());
        assert_eq!(w.get(Z, "a").unwrap_err().code, 404);
    }

    #[test]
    fn the_delete_operation_done_removes_the_instance() {
        let mut w = World::new(Config::default());
        w.insert(Z, None, body("a")).unwrap();
        let op = w.delete(Z, "a", None).unwrap();
        let name = op["name"].as_str().unwrap();
        assert_eq!(w.wait_op(Z, name).unwrap()["status"], "DONE");
        assert!(w.instance_names().is_empty());
        assert_eq!(w.get(Z, "a").unwrap_err().code, 404);
    }

    #[test]
    fn hidden_reads_count_only_matching_reads() {
        let mut w = World::new(Config::default());
        w.set_hidden_reads(1);
        w.insert(Z, None, body("a")).unwrap();
        let other = ListArgs {
            filter: Some("labels.kiln-bridge = other"),
            ..no_list()
        };
        assert_eq!(w.list(Z, &other).unwrap()["items"], json!([]));
        assert_eq!(w.list(Z, &no_list()).unwrap()["items"], json!([]));
        assert_eq!(w.list(Z, &no_list()).unwrap()["items"][0]["name"], "a");
    }

    #[test]
    fn duplicate_request_ids_answer_the_same_operation() {
        let mut w = World::new(Config::default());
        let a = w.insert(Z, Some(RID), body("a")).unwrap();
        let b = w.insert(Z, Some(RID), body("a")).unwrap();
        assert_eq!(a["name"], b["name"]);
        assert_eq!(w.created(), 1);
        // A faulted insert is remembered too.
        w.set_fault("us-central1-b", Some(OpFault::Quota));
        let rid2 = "7c9e6679-7425-40de-944b-e07fc1f90ae8";
        let f1 = w.insert("us-central1-b", Some(rid2), body("b")).unwrap();
        w.set_fault("us-central1-b", None);
        let f2 = w.insert("us-central1-b", Some(rid2), body("b")).unwrap();
        assert_eq!(f1["name"], f2["name"]);
        assert_eq!(w.created(), 1);
    }

    #[test]
    fn pages_follow_tokens() {
        let (p, next) = page(vec![1, 2, 3], Some("2"), None, None).unwrap();
        assert_eq!((p, next.as_deref()), (vec![1, 2], Some("2")));
        let (p, next) = page(vec![1, 2, 3], Some("2"), Some("2"), None).unwrap();
        assert_eq!((p, next), (vec![3], None));
        let (p, _) = page(vec![1, 2, 3], None, None, Some(1)).unwrap();
        assert_eq!(p, vec![1]);
        assert!(page(vec![1], None, Some("x"), None).is_err());
    }
}
