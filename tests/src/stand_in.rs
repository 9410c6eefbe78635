//! Stand-ins for the instances a test's cloud (moto, the fake GCE) says
//! it launched: each running one gets a network namespace holding its
//! private address, where a stock sshd answers on [`SSH_PORT`] with the
//! host key from its user data, as the real instance's VM would. The
//! addresses are the tests' own (198.18.0.0/15), inside namespaces the
//! test made.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::netns::NetNs;
use crate::sshd::Sshd;

/// An instance as a cloud lists it.
#[derive(Clone, Debug)]
pub struct Launched {
    pub id: String,
    pub region: String,
    pub zone: String,
    pub private_ip: String,
    pub state: LaunchState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaunchState {
    Pending,
    Running,
    /// Stopped, terminated or deleted.
    Over,
}

/// A cloud's view of what one bridge launched.
pub trait Launches: Send + 'static {
    fn launched(&self) -> Vec<Launched>;
    /// The instance's user data (cloud-config or startup script).
    fn user_data(&self, instance: &Launched) -> String;
}

/// The instances' port for requesters, as the tests configure it.
pub const SSH_PORT: u16 = 2222;

struct Served {
    _sshd: Sshd,
    _ns: NetNs,
    /// When its sshd first listened.
    answered_at: std::time::Instant,
}

/// Stands in for the instances moto launches with a bridge's tag: each
/// running one gets a network namespace with its private address, where a
/// stock sshd answers on [`SSH_PORT`] with the host key from its user data
/// (what the real instance's VM would offer). Zones can be told to never
/// answer.
pub struct StandIns {
    stop: Arc<AtomicBool>,
    mute_zones: Arc<Mutex<BTreeSet<String>>>,
    served: Arc<Mutex<BTreeMap<String, Served>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StandIns {
    /// Watches what `cloud` launched.
    pub fn start(cloud: impl Launches, dir: &Path) -> StandIns {
        let stop = Arc::new(AtomicBool::new(false));
        let mute_zones = Arc::new(Mutex::new(BTreeSet::new()));
        let served: Arc<Mutex<BTreeMap<String, Served>>> = Arc::new(Mutex::new(BTreeMap::new()));
        let (st, mz, sv) = (
            Arc::clone(&stop),
            Arc::clone(&mute_zones),
            Arc::clone(&served),
        );
        let dir = dir.to_path_buf();
        let thread = std::thread::spawn(move || {
            let mut n = 0u32;
            let mut strays = BTreeSet::new();
            while !st.load(Ordering::SeqCst) {
                let launched = cloud.launched();
                // Deleted outright (GCE forgets them): their stand-ins go.
                sv.lock()
                    .unwrap()
                    .retain(|id, _| launched.iter().any(|l| l.id == *id));
                for i in launched {
                    if i.state == LaunchState::Over {
                        // Gone: so is its stand-in.
                        sv.lock().unwrap().remove(&i.id);
                        continue;
                    }
                    let known = sv.lock().unwrap().contains_key(&i.id);
                    if known
                        || strays.contains(&i.id)
                        || i.state != LaunchState::Running
                        || mz.lock().unwrap().contains(&i.zone)
                    {
                        continue;
                    }
                    let user_data = cloud.user_data(&i);
                    // Not launched by a bridge (no host key in its user
                    // data: a test's stray instance): it never answers.
                    let Some(key) = host_key_in(&user_data) else {
                        strays.insert(i.id.clone());
                        continue;
                    };
                    n += 1;
                    let served = serve_instance(&dir, n, &i, &key);
                    sv.lock().unwrap().insert(i.id.clone(), served);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        StandIns {
            stop,
            mute_zones,
            served,
            thread: Some(thread),
        }
    }

    /// Instances in `zone` never answer (their VM never comes up).
    pub fn mute(&self, zone: &str) {
        self.mute_zones.lock().unwrap().insert(zone.to_string());
    }

    /// When instance `id`'s stand-in first answered, while it still does.
    pub fn answered_at(&self, id: &str) -> Option<std::time::Instant> {
        self.served.lock().unwrap().get(id).map(|s| s.answered_at)
    }
}

impl Drop for StandIns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.served.lock().unwrap().clear();
    }
}

/// The host key in an instance's user data: the one OpenSSH private key
/// block in it, wherever the bootstrap put it.
pub fn host_key_in(user_data: &str) -> Option<String> {
    // cloud-config carries the script base64-encoded (`encoding: b64`).
    if user_data.starts_with("#cloud-config") {
        let decoded: String = user_data
            .lines()
            .filter_map(|l| l.trim().strip_prefix("content: "))
            .map(|b64| String::from_utf8_lossy(&crate::ec2::base64_decode(b64)).into_owned())
            .collect();
        if let Some(key) = host_key_in(&decoded) {
            return Some(key);
        }
    }
    const BEGIN: &str = "-----BEGIN OPENSSH PRIVATE KEY-----";
    const END: &str = "-----END OPENSSH PRIVATE KEY-----";
    let start = user_data.find(BEGIN)?;
    let end = user_data[start..].find(END)? + start + END.len();
    let lines: Vec<&str> = user_data[start..end].lines().map(str::trim).collect();
    Some(lines.join("\n") + "\n")
}

fn serve_instance(dir: &Path, n: u32, i: &Launched, key: &str) -> Served {
    let sshd_dir = dir.join(format!("instance-{n}"));
    std::fs::create_dir_all(&sshd_dir).unwrap();
    let key_path = sshd_dir.join("host_key");
    std::fs::write(&key_path, key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ns = NetNs::new(&format!("i{n}"));
    // The root side has its own link-local address; the instance's
    // address exists only inside its namespace.
    let host_side = format!("kiln-i{n}-{}", std::process::id() % 10_000);
    let root_ip = format!("169.254.77.{}", n % 250 + 1);
    crate::netns::ip(&[
        "link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
    ]);
    crate::netns::ip(&["addr", "add", &format!("{root_ip}/32"), "dev", &host_side]);
    crate::netns::ip(&["link", "set", &host_side, "up"]);
    crate::netns::ip(&[
        "route",
        "add",
        &format!("{}/32", i.private_ip),
        "dev",
        &host_side,
        "src",
        &root_ip,
    ]);
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/32", i.private_ip),
        "dev",
        "eth0",
    ]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&["route", "add", &format!("{root_ip}/32"), "dev", "eth0"]);
    let ip = i.private_ip.clone();
    let sshd = ns.run(move || Sshd::start_at(&sshd_dir, &ip, SSH_PORT));
    Served {
        _sshd: sshd,
        _ns: ns,
        answered_at: std::time::Instant::now(),
    }
}

/// `ssh-ed25519 AAAA…` of an OpenSSH private key, as `ssh-keygen -y`
/// derives it.
pub fn public_key_of(private: &str, dir: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("probe-key");
    std::fs::write(&path, private).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = std::process::Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "ssh-keygen -y");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The keys a test's cloud backend table shares whatever the cloud: its
/// regions, a bundle no instance fetches (the stand-ins serve instead),
/// the stand-ins' port and private addresses, a fast sync; then `extra`,
/// with a ready timeout and at most 3 instances unless `extra` sets them.
pub fn backend_keys(regions: &[&str], extra: &str) -> String {
    let regions = regions
        .iter()
        .map(|r| format!("\"{r}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let ready = if extra.contains("ready_timeout_secs") {
        ""
    } else {
        "ready_timeout_secs = 20\n"
    };
    let max = if extra.contains("max_instances") {
        ""
    } else {
        "max_instances = 3\n"
    };
    format!(
        "regions = [{regions}]\n{max}\
         bundle_url = \"http://127.0.0.1:9/kiln-bundle.tar.gz\"\n\
         bundle_sha256 = \"{sha}\"\nssh_port = {SSH_PORT}\nconnect = \"private\"\n\
         sync_secs = 1\n{ready}{extra}\n",
        sha = "0".repeat(64),
    )
}
