//! Test infrastructure: a simulated backend and a real kilnd API server on
//! 127.0.0.1 with an ephemeral port.
#![allow(dead_code)] // Each test file uses a different part.

pub mod sim_backend;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_bridge::api::{self, AppState};
use kiln_bridge::backend::Backend;
use kiln_bridge::client::Client;
use kiln_bridge::fleet::Fleet;
use kiln_bridge::grant::GrantRequest;
use kiln_bridge::manager::{GrantManager, ManagerSettings};
use kiln_bridge::store::Store;

#[allow(unused_imports)] // Not every test file uses the simulator.
pub use sim_backend::{SimBackend, World};

pub const TOKEN: &str = "test-token-0123456789";
pub const SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICYZWTaQeBZlanOWStbbTRqPk9TgC0LC/UyC2dMm+FFc test@kiln";

/// kilnd's library parts serving HTTP on its own runtime. Dropping it is
/// like `kill -9`: supervision stops, instances are left as they are.
pub struct TestServer {
    pub base: String,
    manager: Option<Arc<GrantManager>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TestServer {
    pub fn start(state_dir: &Path, backends: Vec<Arc<dyn Backend>>) -> TestServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (manager, addr) = runtime.block_on(async {
            let store = Arc::new(Store::open(state_dir).expect("store"));
            let fleet = Arc::new(Fleet::new(backends).expect("fleet"));
            let settings = ManagerSettings {
                stop_wait: Duration::from_secs(10),
                final_usage_wait: Duration::from_secs(5),
                retry_delay: Duration::from_millis(50),
                terminate_attempts: 3,
                usage_interval: Duration::from_millis(200),
                // Simulated backends fetch nothing, so nothing is resolved.
                tag_ttl: None,
                insecure_registries: Vec::new(),
            };
            let manager = GrantManager::open(store, fleet, settings).expect("manager");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let state = AppState {
                manager: Arc::clone(&manager),
                tokens: api::Tokens::single(TOKEN),
            };
            tokio::spawn(api::serve(listener, state, std::future::pending()));
            (manager, addr)
        });
        TestServer {
            base: format!("http://{addr}"),
            manager: Some(manager),
            runtime: Some(runtime),
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.base, TOKEN)
    }

    pub fn manager(&self) -> &Arc<GrantManager> {
        self.manager.as_ref().expect("running")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(m) = self.manager.take() {
            m.shutdown();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// A valid request for `region`, running until `valid_to` an hour ahead.
pub fn request(region: &str, vcpus: u32, ram_mib: u64) -> GrantRequest {
    GrantRequest {
        image: "docker.io/library/alpine:3.20".into(),
        vcpus: Some(vcpus),
        ram_mib,
        region: region.into(),
        ssh_keys: vec![SSH_KEY.into()],
        valid_to: chrono::Utc::now() + chrono::Duration::hours(1),
        ..Default::default()
    }
}

/// Polls `check` until it returns Some, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A raw request with ureq, for what the typed client cannot send.
pub fn raw(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
    let mut req = ureq::request(method, url);
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let result = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    match result {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("transport error: {e}"),
    }
}
