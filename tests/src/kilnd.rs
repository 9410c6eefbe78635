//! A real kilnd for end-to-end tests and benchmarks: the built binary on
//! 127.0.0.1 with one local backend in a scratch `$KILN_HOME`, restartable
//! on the same state, and whatever VMs it left stopped when dropped. It
//! resolves image tags afresh for every grant (no reuse), so a test that
//! pushes a tag again sees the new digest at once.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::Utc;
use kiln_bridge::client::Client;
use kiln_bridge::grant::{GrantRequest, TdxPolicy};
use kiln_bridge::view::GrantView;

use crate::images::busybox_layout;
use crate::openssh::{keygen, Client as Ssh};
use crate::registry::Registry;
use crate::{agent, bin, kernel, processes_mentioning, wait_for};

/// What a requester brings: an image in a registry and an SSH key pair.
pub struct Requester {
    /// Serves the image for as long as this lives.
    pub registry: Registry,
    /// `127.0.0.1:PORT/kiln/busybox:1`.
    pub image: String,
    /// The private key's path (the public one is beside it, `.pub`).
    pub key: PathBuf,
    /// `ssh-ed25519 AAAA...`.
    pub public_key: String,
}

impl Requester {
    /// A busybox image pushed to a fresh loopback registry, and a new key
    /// pair, with scratch files under `work`.
    pub fn new(work: &Path) -> Requester {
        Requester::on(work, "127.0.0.1")
    }

    /// As [`Requester::new`], the registry listening on `ip` (an address
    /// of the calling thread's network namespace).
    pub fn on(work: &Path, ip: &str) -> Requester {
        let registry = Registry::start_on(ip);
        registry.push(
            &busybox_layout(&work.join("image")),
            "1",
            "kiln/busybox",
            "",
        );
        let image = format!("{}/kiln/busybox:1", registry.addr);
        let key = keygen(work, "requester");
        let public_key = std::fs::read_to_string(key.with_extension("pub"))
            .expect("public key")
            .trim()
            .to_string();
        Requester {
            registry,
            image,
            key,
            public_key,
        }
    }
}

/// The manifest digest `image` (`HOST:PORT/NAME:TAG`) names now, as the
/// registry says.
pub fn digest_of(image: &str) -> String {
    let out = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"])
        .arg(format!("docker://{image}"))
        .output()
        .expect("skopeo");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The bearer token every harness kilnd accepts.
pub const TOKEN: &str = "kiln-test-token";
/// Generous: VMs boot slowly where KVM emulates the guest kernel.
pub const BOOT: Duration = Duration::from_secs(900);

/// A kilnd with one local backend, restartable on the same state.
pub struct Kilnd {
    dir: PathBuf,
    config: PathBuf,
    pub url: String,
    child: Option<Child>,
    /// Set in kilnd's environment at every start.
    env: Vec<(String, String)>,
}

impl Kilnd {
    pub fn new(dir: &Path, vcpus: u32, ram_mib: u64) -> Kilnd {
        Kilnd::with_backend(dir, vcpus, ram_mib, "")
    }

    /// As [`Kilnd::new`], with `extra` (TOML lines) added to the local
    /// backend's table.
    pub fn with_backend(dir: &Path, vcpus: u32, ram_mib: u64, extra: &str) -> Kilnd {
        let home = dir.join("home");
        Kilnd::with_backends(
            dir,
            &format!(
                "[[backend]]\nkind = \"local\"\nvcpus = {vcpus}\n\
                 ram_mib = {ram_mib}\nkiln_home = \"{}\"\n{extra}\n",
                home.display()
            ),
        )
    }

    /// A kilnd whose `[[backend]]` tables are `backends` (TOML), in the
    /// region `home`.
    pub fn with_backends(dir: &Path, backends: &str) -> Kilnd {
        Kilnd::with_backends_env(dir, backends, &[])
    }

    /// As [`Kilnd::with_backends`], with `env` set for kilnd (cloud
    /// credentials).
    pub fn with_backends_env(dir: &Path, backends: &str, env: &[(&str, &str)]) -> Kilnd {
        let home = dir.join("home");
        std::fs::create_dir_all(home.join("kernel")).unwrap();
        std::fs::create_dir_all(home.join("bin")).unwrap();
        std::os::unix::fs::symlink(kernel(), home.join("kernel/vmlinux")).unwrap();
        std::os::unix::fs::symlink(agent(), home.join("bin/kiln-agent")).unwrap();
        std::fs::write(dir.join("token"), TOKEN).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("kilnd.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\nauth_token_file = \"{}\"\n\
                 region = \"home\"\nimage_tag_ttl_secs = 0\n{backends}",
                dir.join("state").display(),
                dir.join("token").display(),
            ),
        )
        .unwrap();
        let mut k = Kilnd {
            dir: dir.to_path_buf(),
            config,
            url: format!("http://127.0.0.1:{port}"),
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        k.start();
        k
    }

    pub fn home(&self) -> PathBuf {
        self.dir.join("home")
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("kilnd.log"))
            .unwrap();
        let child = Command::new(bin("kilnd"))
            .arg("--config")
            .arg(&self.config)
            .env("KILN_VMM", bin("kiln-vmm"))
            .env("KILN_SHIM", bin("kiln-shim"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn kilnd");
        self.child = Some(child);
        let client = self.client();
        assert!(
            wait_for(Duration::from_secs(30), || client.capabilities().ok()).is_some(),
            "kilnd did not come up; log:\n{}",
            self.log()
        );
    }

    /// `kill -9`, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.url, TOKEN)
    }

    /// The `kiln` command line, pointed at this kilnd.
    pub fn kiln(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("kiln"))
            .args(args)
            .env("KILN_BRIDGE_URL", &self.url)
            .env("KILN_BRIDGE_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .output()
            .expect("run kiln")
    }

    /// `kiln` on this kilnd's `$KILN_HOME`, as its operator would run it
    /// (`kiln image build`, `kiln image ls`).
    pub fn kiln_local(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("kiln"))
            .args(args)
            .env("KILN_HOME", self.home())
            .env("KILN_VMM", bin("kiln-vmm"))
            .stdin(Stdio::null())
            .output()
            .expect("run kiln")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kilnd.log")).unwrap_or_default()
    }

    /// Polls the grant until `done` holds.
    pub fn wait_grant(
        &self,
        id: &str,
        limit: Duration,
        done: impl Fn(&GrantView) -> bool,
    ) -> GrantView {
        let client = self.client();
        wait_for(limit, || client.show(id).ok().filter(|g| done(g))).unwrap_or_else(|| {
            panic!(
                "grant {id}: {:?}\nkilnd log:\n{}",
                client.show(id).map(|g| (g.state, g.reason)),
                self.log()
            )
        })
    }
}

impl Drop for Kilnd {
    fn drop(&mut self) {
        self.kill();
        // Whatever VMs a failed test left: stop their shims.
        for p in processes_mentioning(&self.home().to_string_lossy()) {
            if let Some(pid) = p.split(':').next().and_then(|s| s.parse::<i32>().ok()) {
                // SAFETY: kill(2) on a process this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

pub fn request(id: &str, image: &str, key: &str, valid_for: Duration, cmd: &str) -> GrantRequest {
    GrantRequest {
        request_id: Some(id.to_string()),
        image: image.to_string(),
        vcpus: Some(1),
        cpu_millicores: None,
        ram_mib: 256,
        region: "home".to_string(),
        tdx: TdxPolicy::No,
        ssh_keys: vec![key.to_string()],
        valid_to: Utc::now() + chrono::Duration::from_std(valid_for).unwrap(),
        command: Some(vec!["sh".into(), "-c".into(), cmd.into()]),
        env: Default::default(),
        publish: Vec::new(),
    }
}

/// The stock ssh client, pinned to the grant's host key.
pub fn ssh_to(grant: &GrantView, key: &Path, dir: &Path) -> Ssh {
    let host = grant.connection.as_ref().map(|c| c.host.clone());
    assert_eq!(host.as_deref(), Some("127.0.0.1"));
    ssh_to_host(grant, key, dir)
}

/// As [`ssh_to`], wherever the grant's connection says.
pub fn ssh_to_host(grant: &GrantView, key: &Path, dir: &Path) -> Ssh {
    let c = grant
        .connection
        .as_ref()
        .expect("a running grant has a connection");
    assert!(c.host_key.starts_with("ssh-ed25519 "), "{c:?}");
    assert!(c.host_key_fingerprint.starts_with("SHA256:"), "{c:?}");
    let known = dir.join(format!("known_hosts-{}", grant.grant.id));
    std::fs::write(
        &known,
        format!("[{}]:{} {}\n", c.host, c.ssh_port, c.host_key),
    )
    .unwrap();
    Ssh::new(key, c.ssh_port, &c.user)
        .at(&c.host)
        .pinned(&known)
}
