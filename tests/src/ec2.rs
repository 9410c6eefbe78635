//! The AWS tests' cloud: moto's EC2 server on loopback, a fault-injecting
//! HTTP proxy in front of it (moto cannot fail the way EC2 does), and
//! stand-ins for the instances it "launches": a network namespace holding
//! the instance's private address, where a stock sshd answers with the
//! host key the bridge put in the instance's user data.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::stand_in::{LaunchState, Launched, Launches};
use crate::{wait_for, workspace_root};

/// Where the tests' instances live: each zone's subnet is 198.18.Z.0/24
/// (the benchmarking range, never routed anywhere), so a stand-in's
/// address can never shadow a real one.
pub const VPC_CIDR: &str = "198.18.0.0/16";
/// The region every test uses, and a second for region failover.
pub const REGION: &str = "eu-central-1";
pub const REGION_2: &str = "eu-west-1";
/// A bare-metal type moto knows (KVM runs on it).
pub const METAL: &str = "c5.metal";

/// The venv with moto's server, installed (once, cached) by the project's
/// own script.
fn moto_venv() -> PathBuf {
    let out = Command::new(workspace_root().join("scripts/moto-venv.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/moto-venv.sh");
    assert!(out.status.success(), "scripts/moto-venv.sh failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// moto's server on 127.0.0.1, with AMI and instance-type validation on.
pub struct Moto {
    pub port: u16,
    child: Child,
}

impl Moto {
    pub fn start(dir: &Path) -> Moto {
        let venv = moto_venv();
        let port = crate::sshd::free_port();
        let log = std::fs::File::create(dir.join("moto.log")).expect("moto.log");
        let child = Command::new(venv.join("bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("MOTO_ENABLE_AMI_VALIDATION", "1")
            .env("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn moto_server");
        let moto = Moto { port, child };
        let up = wait_for(Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        assert!(up.is_some(), "moto did not listen on {port}");
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One EC2 Query API call in `region`, straight to moto (which checks
    /// no signature); the XML answer.
    pub fn call(&self, region: &str, params: &[(&str, &str)]) -> String {
        call(self.port, region, params)
    }

    /// An AMI moto accepts in `region`.
    pub fn ami(&self, region: &str) -> String {
        let xml = self.call(
            region,
            &[("Action", "DescribeImages"), ("Owner.1", "amazon")],
        );
        first(&xml, "imageId").expect("moto lists AMIs")
    }

    /// A VPC of [`VPC_CIDR`] in `region` with one subnet per zone
    /// (198.18.Z.0/24, Z counting from `first_octet`): zone → subnet id.
    pub fn subnets(&self, region: &str, first_octet: u8) -> BTreeMap<String, String> {
        let vpc = first(
            &self.call(region, &[("Action", "CreateVpc"), ("CidrBlock", VPC_CIDR)]),
            "vpcId",
        )
        .expect("CreateVpc");
        let zones = all(
            &self.call(region, &[("Action", "DescribeAvailabilityZones")]),
            "zoneName",
        );
        zones
            .into_iter()
            .enumerate()
            .map(|(i, zone)| {
                let cidr = format!("198.18.{}.0/24", first_octet as usize + i);
                let xml = self.call(
                    region,
                    &[
                        ("Action", "CreateSubnet"),
                        ("VpcId", &vpc),
                        ("CidrBlock", &cidr),
                        ("AvailabilityZone", &zone),
                    ],
                );
                (zone, first(&xml, "subnetId").expect("CreateSubnet"))
            })
            .collect()
    }

    /// Every instance of `region` tagged `key=value`.
    pub fn instances(&self, region: &str, key: &str, value: &str) -> Vec<Ec2Instance> {
        let name = format!("tag:{key}");
        let xml = self.call(
            region,
            &[
                ("Action", "DescribeInstances"),
                ("Filter.1.Name", &name),
                ("Filter.1.Value.1", value),
            ],
        );
        instances_in(&xml)
    }

    /// Launches an instance as someone else would (for the reaper).
    pub fn run_tagged(&self, region: &str, subnet: &str, tags: &[(&str, &str)]) -> String {
        let ami = self.ami(region);
        let mut params: Vec<(String, String)> = vec![
            ("Action".into(), "RunInstances".into()),
            ("ImageId".into(), ami),
            ("InstanceType".into(), METAL.into()),
            ("MinCount".into(), "1".into()),
            ("MaxCount".into(), "1".into()),
            ("SubnetId".into(), subnet.into()),
            ("TagSpecification.1.ResourceType".into(), "instance".into()),
        ];
        for (i, (k, v)) in tags.iter().enumerate() {
            params.push((
                format!("TagSpecification.1.Tag.{}.Key", i + 1),
                k.to_string(),
            ));
            params.push((
                format!("TagSpecification.1.Tag.{}.Value", i + 1),
                v.to_string(),
            ));
        }
        let refs: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        first(&self.call(region, &refs), "instanceId").expect("RunInstances")
    }

    /// An instance's user data, decoded.
    pub fn user_data(&self, region: &str, id: &str) -> String {
        user_data(self.port, region, id)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An instance as DescribeInstances shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ec2Instance {
    pub id: String,
    pub state: String,
    pub zone: String,
    pub private_ip: String,
    pub tags: BTreeMap<String, String>,
}

fn instances_in(xml: &str) -> Vec<Ec2Instance> {
    xml.split("<instancesSet>")
        .skip(1)
        .flat_map(top_items)
        .map(|item| {
            // Tags of nested parts (network interfaces) are empty sets in
            // moto; the instance's own are the non-empty one.
            let tags = item
                .split("<tagSet>")
                .skip(1)
                .flat_map(|set| {
                    let set = set.split("</tagSet>").next().unwrap_or_default();
                    all(set, "key").into_iter().zip(all(set, "value"))
                })
                .collect();
            Ec2Instance {
                id: first(&item, "instanceId").unwrap_or_default(),
                state: item
                    .split("<instanceState>")
                    .nth(1)
                    .and_then(|s| first(s, "name"))
                    .unwrap_or_default(),
                zone: first(&item, "availabilityZone").unwrap_or_default(),
                private_ip: first(&item, "privateIpAddress").unwrap_or_default(),
                tags,
            }
        })
        .collect()
}

/// The `<item>` elements at the top of `xml` (up to the end of their
/// enclosing set), nested items kept inside.
fn top_items(xml: &str) -> Vec<String> {
    let mut items = Vec::new();
    let (mut depth, mut start, mut i) = (0usize, 0usize, 0usize);
    while i < xml.len() {
        let rest = &xml[i..];
        if rest.starts_with("<item>") {
            if depth == 0 {
                start = i + "<item>".len();
            }
            depth += 1;
            i += "<item>".len();
        } else if rest.starts_with("</item>") {
            depth = depth.saturating_sub(1);
            if depth == 0 {
                items.push(xml[start..i].to_string());
            }
            i += "</item>".len();
        } else if depth == 0 && rest.starts_with("</") {
            // The end of the enclosing set.
            break;
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    items
}

/// `<tag>TEXT</tag>`'s first TEXT.
pub fn first(xml: &str, tag: &str) -> Option<String> {
    all(xml, tag).into_iter().next()
}

fn all(xml: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    xml.split(&open)
        .skip(1)
        .filter_map(|rest| rest.split(&close).next().map(str::to_string))
        .collect()
}

fn call(port: u16, region: &str, params: &[(&str, &str)]) -> String {
    let mut body = String::from("Version=2016-11-15");
    for (k, v) in params {
        body.push('&');
        body.push_str(&urlencode(k));
        body.push('=');
        body.push_str(&urlencode(v));
    }
    // moto takes the region from the credential scope.
    let auth = format!(
        "AWS4-HMAC-SHA256 Credential=test/20260101/{region}/ec2/aws4_request, \
         SignedHeaders=host, Signature=0"
    );
    let request = format!(
        "POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {auth}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to moto");
    s.write_all(request.as_bytes()).expect("send to moto");
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).expect("read moto's answer");
    let text = String::from_utf8_lossy(&answer).into_owned();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(text)
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn urldecode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes() {
        let Some(v) = ALPHABET.iter().position(|a| *a == c) else {
            continue;
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// What the proxy does to a matching request.
#[derive(Clone, Debug)]
pub enum Effect {
    /// Answers with EC2's error XML, never reaching moto.
    Error { status: u16, code: String },
    /// Forwards it (moto acts), then closes the connection unanswered.
    DropAnswer,
}

/// A fault for requests of one action, optionally one zone or type only.
#[derive(Clone, Debug)]
pub struct Fault {
    pub action: String,
    pub zone: Option<String>,
    /// Matches the region of the request's credential scope.
    pub region: Option<String>,
    /// How many more requests it hits (then it is spent).
    pub times: u32,
    pub effect: Effect,
}

impl Fault {
    /// `code` for every `action` in `zone`.
    pub fn error(action: &str, status: u16, code: &str) -> Fault {
        Fault {
            action: action.into(),
            zone: None,
            region: None,
            times: u32::MAX,
            effect: Effect::Error {
                status,
                code: code.into(),
            },
        }
    }

    pub fn in_zone(mut self, zone: &str) -> Fault {
        self.zone = Some(zone.into());
        self
    }

    pub fn in_region(mut self, region: &str) -> Fault {
        self.region = Some(region.into());
        self
    }

    pub fn times(mut self, n: u32) -> Fault {
        self.times = n;
        self
    }
}

/// A request the proxy saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub action: String,
    pub region: String,
    pub zone: Option<String>,
    /// The fault's code, or `dropped`, when one hit it.
    pub fault: Option<String>,
    /// When the proxy read it.
    pub at: std::time::Instant,
}

struct ProxyShared {
    upstream: u16,
    faults: Mutex<Vec<Fault>>,
    seen: Mutex<Vec<Seen>>,
}

/// An HTTP proxy on 127.0.0.1 in front of moto that fails chosen requests
/// the way EC2 does.
pub struct FaultProxy {
    pub port: u16,
    shared: Arc<ProxyShared>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    pub fn start(moto: &Moto) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(ProxyShared {
            upstream: moto.port,
            faults: Mutex::new(Vec::new()),
            seen: Mutex::new(Vec::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (Arc::clone(&shared), Arc::clone(&stop));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let s = Arc::clone(&s);
                std::thread::spawn(move || serve(&s, conn));
            }
        });
        FaultProxy { port, shared, stop }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn add(&self, fault: Fault) {
        self.shared.faults.lock().unwrap().push(fault);
    }

    pub fn clear(&self) {
        self.shared.faults.lock().unwrap().clear();
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// The requests of one action, in order.
    pub fn seen_of(&self, action: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.action == action)
            .collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// One request per connection: the SDK reconnects after `Connection:
/// close`.
fn serve(shared: &ProxyShared, mut conn: TcpStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let Some((head, body)) = read_request(&mut conn) else {
        return;
    };
    let params: BTreeMap<String, String> = String::from_utf8_lossy(&body)
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (urldecode(k), urldecode(v)))
        .collect();
    let action = params.get("Action").cloned().unwrap_or_default();
    let zone = params.get("Placement.AvailabilityZone").cloned();
    let region = head
        .split("Credential=")
        .nth(1)
        .and_then(|c| c.split('/').nth(2))
        .unwrap_or_default()
        .to_string();
    let effect = {
        let mut faults = shared.faults.lock().unwrap();
        let hit = faults.iter_mut().find(|f| {
            f.times > 0
                && f.action == action
                && f.zone.as_ref().is_none_or(|z| Some(z) == zone.as_ref())
                && f.region.as_ref().is_none_or(|r| *r == region)
        });
        hit.map(|f| {
            f.times -= 1;
            f.effect.clone()
        })
    };
    let fault = match &effect {
        Some(Effect::Error { code, .. }) => Some(code.clone()),
        Some(Effect::DropAnswer) => Some("dropped".to_string()),
        None => None,
    };
    shared.seen.lock().unwrap().push(Seen {
        action: action.clone(),
        region,
        zone,
        fault,
        at: std::time::Instant::now(),
    });
    match effect {
        Some(Effect::Error { status, code }) => {
            let xml = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error>\
                 <Code>{code}</Code><Message>injected by the test proxy</Message></Error>\
                 </Errors><RequestID>00000000-0000-0000-0000-000000000000</RequestID></Response>"
            );
            let answer = format!(
                "HTTP/1.1 {status} Fault\r\nContent-Type: text/xml;charset=UTF-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{xml}",
                xml.len()
            );
            let _ = conn.write_all(answer.as_bytes());
        }
        Some(Effect::DropAnswer) => {
            let _ = forward(shared.upstream, &head, &body);
            // Closed with nothing said: the caller cannot know it worked.
        }
        None => {
            if let Some(answer) = forward(shared.upstream, &head, &body) {
                let _ = conn.write_all(&answer);
            }
        }
    }
}

/// The request's head (with `Connection: close`) and body.
fn read_request(conn: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let head: String = head
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:") && !l.is_empty())
        .map(|l| format!("{l}\r\n"))
        .collect::<String>()
        + "Connection: close\r\n\r\n";
    Some((head, body))
}

fn forward(upstream: u16, head: &str, body: &[u8]) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", upstream)).ok()?;
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).ok()?;
    Some(answer)
}

/// moto's instances of one bridge, as the stand-ins see them.
pub struct MotoInstances {
    port: u16,
    regions: Vec<String>,
    bridge_id: String,
}

impl MotoInstances {
    pub fn new(moto: &Moto, regions: &[&str], bridge_id: &str) -> MotoInstances {
        MotoInstances {
            port: moto.port,
            regions: regions.iter().map(|r| r.to_string()).collect(),
            bridge_id: bridge_id.to_string(),
        }
    }
}

impl Launches for MotoInstances {
    fn launched(&self) -> Vec<Launched> {
        let mut out = Vec::new();
        for region in &self.regions {
            let xml = call(
                self.port,
                region,
                &[
                    ("Action", "DescribeInstances"),
                    ("Filter.1.Name", "tag:kiln-bridge"),
                    ("Filter.1.Value.1", &self.bridge_id),
                ],
            );
            out.extend(instances_in(&xml).into_iter().map(|i| Launched {
                state: match i.state.as_str() {
                    "running" => LaunchState::Running,
                    "pending" => LaunchState::Pending,
                    _ => LaunchState::Over,
                },
                id: i.id,
                zone: i.zone,
                private_ip: i.private_ip,
                region: region.clone(),
            }));
        }
        out
    }

    fn user_data(&self, l: &Launched) -> String {
        user_data(self.port, &l.region, &l.id)
    }
}

/// An instance's user data, decoded (DescribeInstanceAttribute).
fn user_data(port: u16, region: &str, id: &str) -> String {
    let xml = call(
        port,
        region,
        &[
            ("Action", "DescribeInstanceAttribute"),
            ("InstanceId", id),
            ("Attribute", "userData"),
        ],
    );
    let b64 = xml
        .split("<userData>")
        .nth(1)
        .and_then(|rest| first(rest, "value"))
        .unwrap_or_default();
    String::from_utf8_lossy(&base64_decode(&b64)).into_owned()
}

/// kilnd's environment for an aws backend on moto: static credentials,
/// and never the instance metadata service or the operator's files.
pub const KILND_ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_CONFIG_FILE", "/dev/null"),
    ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
    ("RUST_LOG", "info,kiln_bridge=debug"),
];

/// An `aws` backend table named `aws` calling `endpoint` (moto, or the
/// proxy in front of it), with a VPC of the tests' subnets in each region
/// (the first region's zones 198.18.1-3, the second's 198.18.11-13) and
/// `extra` keys.
pub fn backend_table(moto: &Moto, endpoint: &str, regions: &[&str], extra: &str) -> String {
    let mut subnets = String::new();
    for (i, region) in regions.iter().enumerate() {
        for (zone, subnet) in moto.subnets(region, 1 + 10 * i as u8) {
            subnets.push_str(&format!("\"{zone}\" = \"{subnet}\"\n"));
        }
    }
    format!(
        "[[backend]]\nkind = \"aws\"\nname = \"aws\"\nmachine_types = [\"{METAL}\"]\n\
         image = \"{ami}\"\nendpoint_url = \"{endpoint}\"\n{common}[backend.subnets]\n{subnets}",
        ami = moto.ami(regions[0]),
        common = crate::stand_in::backend_keys(regions, extra),
    )
}
