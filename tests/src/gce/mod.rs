//! A fake Google Compute Engine API on a loopback port, for the GCP
//! backend's tests. Google ships no Compute emulator; this one serves the
//! few calls kiln makes (instances insert/get/delete/list/aggregatedList,
//! zoneOperations get/wait, machineTypes, zones, regions) at Compute v1's
//! URLs, and holds itself to Google's published discovery document
//! (`tests/data/gce-compute-v1-subset.json`): unknown query parameters and
//! unknown body fields are refused with Google-shaped errors, and every
//! answer is checked against its schema before it is sent.
//!
//! Its addresses are never contacted: private ones come from per-zone
//! ranges in 10.0.0.0/8 (by default), external ones from TEST-NET-3.
//!
//! ```no_run
//! let gce = kiln_tests::gce::FakeGce::start();
//! // point a client at gce.endpoint(), project gce.project()
//! gce.fail_zone("us-central1-a", kiln_tests::gce::OpFault::Capacity);
//! assert_eq!(gce.count("compute.instances.insert"), 0);
//! ```

mod discovery;
mod filter;
mod server;
mod world;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

pub use discovery::{discovery, Discovery};
pub use world::{Config, MachineTypeDef, OpFault, RequestRecord, ZoneDef};

use world::World;

/// A running fake; stopped on drop.
pub struct FakeGce {
    addr: SocketAddr,
    project: String,
    world: server::Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeGce {
    /// Starts the fake with the default world: project `kiln-test`,
    /// regions us-central1 (zones a, b, c, f) and europe-west4 (a, b, c),
    /// a handful of machine types in every zone.
    pub fn start() -> FakeGce {
        FakeGce::start_with(Config::default())
    }

    /// Starts the fake with a world of the test's choosing.
    pub fn start_with(config: Config) -> FakeGce {
        let project = config.project.clone();
        let world: server::Shared = Arc::new(Mutex::new(World::new(config)));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("bound address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = axum::Router::new()
            .fallback(server::handle)
            .with_state(world.clone());
        // Its own thread and runtime, so sync and async tests alike can
        // hold one, and dropping it never needs the caller's runtime.
        let thread = std::thread::Builder::new()
            .name("fake-gce".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("fake GCE runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    tokio::select! {
                        _ = axum::serve(listener, app) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime ends open connections too (a client's
                // idle keep-alive would hold up a graceful shutdown).
                drop(rt);
            })
            .expect("spawn the fake GCE thread");
        FakeGce {
            addr,
            project,
            world,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, the root a client's endpoint is set to.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn project(&self) -> &str {
        &self.project
    }

    fn world(&self) -> MutexGuard<'_, World> {
        // A panic while holding the lock is already a failed test.
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts into `zone` from now on end with `fault` in their DONE
    /// operation, creating nothing.
    pub fn fail_zone(&self, zone: &str, fault: OpFault) {
        self.world().set_fault(zone, Some(fault));
    }

    /// Likewise for every insert of machine type `machine_type`.
    pub fn fail_machine_type(&self, machine_type: &str, fault: OpFault) {
        self.world().set_fault(machine_type, Some(fault));
    }

    /// Removes every operation and HTTP fault.
    pub fn clear_faults(&self) {
        self.world().clear_faults();
    }

    /// The next `count` calls of `method` (a discovery id such as
    /// `compute.instances.insert`) answer HTTP `code` (401, 403, 429, 5xx)
    /// with Google's error body.
    pub fn fail_requests(&self, method: &str, code: u16, count: usize) {
        self.world().push_http_faults(method, code, count);
    }

    /// Instances inserted from now on are missing from the first `reads`
    /// gets or lists that would have returned them.
    pub fn hide_new_instances_for(&self, reads: u32) {
        self.world().set_hidden_reads(reads);
    }

    /// At most `n` items per list page (`None`: the client's maxResults).
    pub fn set_page_size(&self, n: Option<usize>) {
        self.world().set_page_size(n);
    }

    /// Marks a zone UP or DOWN in zones.list.
    pub fn set_zone_up(&self, zone: &str, up: bool) {
        self.world().set_zone_up(zone, up);
    }

    /// The private range (`a.b.c.d/len`) new instances of `zone` get
    /// addresses from; panics on an unknown zone or a bad range.
    pub fn set_zone_cidr(&self, zone: &str, cidr: &str) {
        assert!(
            self.world().set_zone_cidr(zone, cidr),
            "zone {zone} or range {cidr} unusable"
        );
    }

    /// Sets an instance's status as a host event would (`TERMINATED`
    /// after a preemption); false if there is no such instance.
    pub fn force_status(&self, zone: &str, name: &str, status: &str) -> bool {
        self.world().force_status(zone, name, status)
    }

    /// Every instance (zone, name) the fake holds, hidden ones included.
    pub fn instance_names(&self) -> Vec<(String, String)> {
        self.world().instance_names()
    }

    /// A handle on the fake's instances for another thread (the tests'
    /// instance stand-ins); its reads are not reads of the API.
    pub fn view(&self) -> GceView {
        GceView {
            world: Arc::clone(&self.world),
        }
    }

    /// An instance's status without counting as a read.
    pub fn instance_status(&self, zone: &str, name: &str) -> Option<&'static str> {
        self.world().instance_status(zone, name)
    }

    /// The insert body an instance was created from, as the client sent
    /// it; not a read.
    pub fn inserted_body(&self, zone: &str, name: &str) -> Option<serde_json::Value> {
        self.world().inserted_body(zone, name)
    }

    /// How many instances inserts have created.
    pub fn created(&self) -> usize {
        self.world().created()
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.world().log.clone()
    }

    /// How many requests of `method` (discovery id) were answered.
    pub fn count(&self, method: &str) -> usize {
        self.world()
            .log
            .iter()
            .filter(|r| r.method == method)
            .count()
    }

    /// Answers of the fake that broke their own schema (each was sent as
    /// a 500); a test asserts this is empty.
    pub fn schema_violations(&self) -> Vec<String> {
        self.world().violations.clone()
    }
}

impl Drop for FakeGce {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a test's other threads may see of the fake's instances, without
/// counting as API reads.
#[derive(Clone)]
pub struct GceView {
    world: server::Shared,
}

impl GceView {
    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every instance as (zone, name).
    pub fn instance_names(&self) -> Vec<(String, String)> {
        self.world().instance_names()
    }

    pub fn instance_status(&self, zone: &str, name: &str) -> Option<&'static str> {
        self.world().instance_status(zone, name)
    }

    pub fn instance_ip(&self, zone: &str, name: &str) -> Option<String> {
        self.world().instance_ip(zone, name)
    }

    pub fn inserted_body(&self, zone: &str, name: &str) -> Option<serde_json::Value> {
        self.world().inserted_body(zone, name)
    }
}

/// The fake's instances of one bridge (its `kiln-bridge` label), for the
/// instance stand-ins.
pub struct GceInstances {
    view: GceView,
    bridge_id: String,
}

impl GceInstances {
    pub fn new(gce: &FakeGce, bridge_id: &str) -> GceInstances {
        GceInstances {
            view: gce.view(),
            bridge_id: bridge_id.to_string(),
        }
    }
}

impl crate::stand_in::Launches for GceInstances {
    fn launched(&self) -> Vec<crate::stand_in::Launched> {
        use crate::stand_in::{LaunchState, Launched};
        self.view
            .instance_names()
            .into_iter()
            .filter_map(|(zone, name)| {
                let body = self.view.inserted_body(&zone, &name)?;
                let bridge = body["labels"]["kiln-bridge"].as_str()?;
                if bridge != self.bridge_id {
                    return None;
                }
                let state = match self.view.instance_status(&zone, &name)? {
                    "RUNNING" => LaunchState::Running,
                    "PROVISIONING" | "STAGING" => LaunchState::Pending,
                    _ => LaunchState::Over,
                };
                Some(Launched {
                    region: zone.rsplit_once('-').map(|(r, _)| r.to_string())?,
                    private_ip: self.view.instance_ip(&zone, &name)?,
                    id: name,
                    zone,
                    state,
                })
            })
            .collect()
    }

    fn user_data(&self, l: &crate::stand_in::Launched) -> String {
        self.view
            .inserted_body(&l.zone, &l.id)
            .and_then(|body| {
                body["metadata"]["items"]
                    .as_array()?
                    .iter()
                    .find(|i| i["key"] == "startup-script")?["value"]
                    .as_str()
                    .map(str::to_string)
            })
            .unwrap_or_default()
    }
}

/// A fake whose zones' addresses are in the tests' own range
/// (198.18.100.0/24 upwards): the instance stand-ins put them in
/// namespaces.
pub fn start_for_stand_ins() -> FakeGce {
    let mut config = Config::default();
    for (i, zone) in config.regions.values_mut().flatten().enumerate() {
        zone.cidr = format!("198.18.{}.0/24", 100 + i);
    }
    FakeGce::start_with(config)
}

/// A `gcp` backend table named `gcp` on the fake, of `machine_type`, with
/// `extra` keys.
pub fn backend_table(gce: &FakeGce, regions: &[&str], machine_type: &str, extra: &str) -> String {
    format!(
        "[[backend]]\nkind = \"gcp\"\nname = \"gcp\"\nmachine_types = [\"{machine_type}\"]\n\
         image = \"projects/debian-cloud/global/images/family/debian-12\"\n\
         project = \"{project}\"\nendpoint_url = \"{endpoint}\"\n{common}",
        project = gce.project(),
        endpoint = gce.endpoint(),
        common = crate::stand_in::backend_keys(regions, extra),
    )
}
