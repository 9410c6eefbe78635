//! What runs on a cloud instance: the user data that turns a fresh
//! instance of the operator's image into the host of one grant. It fetches
//! the pinned kiln bundle (`kiln fleet bundle`), checks its SHA-256,
//! installs it, and runs the grant with `kiln host provision`, exactly as
//! an owned host would, its VM serving the host key the bridge made for
//! the grant; then it watches the grant and powers the instance off once
//! the grant has ended.
//!
//! [`script`] is the POSIX sh script (a GCE `startup-script`);
//! [`cloud_config`] wraps it as `#cloud-config` for cloud-init (EC2 user
//! data).
//!
//! Invariants:
//! - Every value from outside is checked here and reaches the script as
//!   one single-quoted shell assignment at its top; the script's body
//!   (`bootstrap.sh`) is fixed text that only reads those variables.
//! - The only secret in the user data is the grant's SSH host key; the
//!   requester's public keys go in the grant, to the VM. The bundle URL may
//!   carry no credential (no user info, no query string).
//! - A bundle whose SHA-256 differs is refused before anything is
//!   installed.
//! - Rendered with `power_off: false`, the script holds no command that
//!   powers anything off.

use base64::Engine;

use crate::bundle::LAYOUT;
use crate::grant::Grant;
use crate::host_key::{HostKey, HostKeyError};

use crate::backends::ssh::install::toml_string;
pub use crate::backends::ssh::install::{DEFAULT_KILN_HOME, DEFAULT_PREFIX};
use crate::backends::ssh::remote::shell_quote;

/// The script's fixed body; it reads the variables [`script`] sets.
const BODY: &str = include_str!("bootstrap.sh");
/// What cloud-init writes the script to (root's alone: it holds the host
/// key).
pub const SCRIPT_PATH: &str = "/var/lib/kiln-bootstrap/bootstrap.sh";
/// The most user data EC2 takes, in bytes.
pub const MAX_EC2_USER_DATA: usize = 16 * 1024;
/// The most a GCE metadata value (the startup-script) holds, in bytes.
pub const MAX_GCE_STARTUP_SCRIPT: usize = 256 * 1024;

/// Everything the user data of one grant's instance needs.
#[derive(Clone, Copy, Debug)]
pub struct Bootstrap<'a> {
    /// Where the bundle is: `http://` or `https://`, no credentials.
    pub bundle_url: &'a str,
    /// The bundle's SHA-256, 64 hex digits, as `kiln fleet bundle` printed.
    pub bundle_sha256: &'a str,
    pub grant: &'a Grant,
    /// Made by the bridge for this grant: the requester pins it before
    /// the first connection.
    pub host_key: &'a HostKey,
    /// The instance port requesters reach the VM's SSH on (the firewall
    /// rule's).
    pub ssh_port: u16,
    /// The instance's `KILN_HOME`.
    pub kiln_home: &'a str,
    /// Where the bundle's binaries go.
    pub prefix: &'a str,
    /// Registries the instance may pull the grant's image from over plain
    /// HTTP (`host:port`), as kilnd's `insecure_registries`.
    pub insecure_registries: &'a [String],
    /// Power the instance off once the grant has ended (what a cloud
    /// wants: a stopped instance costs nothing more). False leaves no such
    /// command in the script at all.
    pub power_off: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("bundle URL {0:?} must be http:// or https:// with a host, and carry no user info, query, fragment, space or quote")]
    Url(String),
    #[error("bundle SHA-256 {0:?} must be 64 hex digits")]
    Sha256(String),
    #[error("{what} {path:?} must be an absolute path of letters, digits and / . _ - +")]
    Path { what: &'static str, path: String },
    #[error("the SSH port must be 1 to 65535")]
    Port,
    #[error("grant id {0:?} must be 1 to 64 letters, digits, '-' or '_'")]
    GrantId(String),
    #[error("grant {0} publishes ports; a cloud instance serves SSH only, for now")]
    Published(String),
    #[error("insecure registry {0:?} must be HOST:PORT")]
    Registry(String),
    #[error("cannot encode the grant")]
    Grant(#[source] serde_json::Error),
    #[error("cannot encode the host key")]
    HostKey(#[source] HostKeyError),
    #[error("the {what} is {bytes} bytes; the most it may be is {max}")]
    TooLarge {
        what: &'static str,
        bytes: usize,
        max: usize,
    },
}

/// The bootstrap as a POSIX sh script: what GCE runs as its
/// `startup-script`. Environment, for tests and operators: set
/// `KILN_BOOTSTRAP_POWEROFF=0` to leave the instance running when the
/// grant ends, `KILN_BOOTSTRAP_POLL` for the seconds between looks at the
/// grant (default 15).
pub fn script(b: &Bootstrap) -> Result<String, BootstrapError> {
    let mut out = format!(
        "#!/bin/sh\n# kiln bootstrap of grant {}: fetch and check the pinned kiln bundle, run the grant's VM.\n",
        b.grant.id
    );
    for (name, value) in assignments(b)? {
        out.push_str(&format!("{name}={}\n", shell_quote(&value)));
    }
    out.push_str(if b.power_off {
        POWER_OFF_ON
    } else {
        POWER_OFF_NEVER
    });
    out.push_str(BODY);
    if out.len() > MAX_GCE_STARTUP_SCRIPT {
        return Err(BootstrapError::TooLarge {
            what: "bootstrap script",
            bytes: out.len(),
            max: MAX_GCE_STARTUP_SCRIPT,
        });
    }
    Ok(out)
}

/// The bootstrap as `#cloud-config` (EC2 user data): cloud-init writes
/// [`script`] to [`SCRIPT_PATH`] and starts it as a systemd unit of its
/// own, so that the grant's life is not cloud-init's final stage.
pub fn cloud_config(b: &Bootstrap) -> Result<String, BootstrapError> {
    let script = script(b)?;
    let encoded = base64::engine::general_purpose::STANDARD.encode(script.as_bytes());
    let unit = format!("kiln-bootstrap-{}", b.grant.id);
    let out = format!(
        "#cloud-config\n\
         # kiln bootstrap of grant {id}.\n\
         write_files:\n\
         \x20 - path: {SCRIPT_PATH}\n\
         \x20   owner: root:root\n\
         \x20   permissions: '0700'\n\
         \x20   encoding: b64\n\
         \x20   content: {encoded}\n\
         runcmd:\n\
         \x20 - [systemd-run, --unit={unit}, --collect, /bin/sh, {SCRIPT_PATH}]\n",
        id = b.grant.id,
    );
    if out.len() > MAX_EC2_USER_DATA {
        return Err(BootstrapError::TooLarge {
            what: "cloud-config",
            bytes: out.len(),
            max: MAX_EC2_USER_DATA,
        });
    }
    Ok(out)
}

const POWER_OFF_ON: &str = "end_instance() {
\tif [ \"$POWER_OFF\" = 1 ]; then
\t\tsay \"powering the instance off\"
\t\tpoweroff || shutdown -h now
\tfi
}
";

/// Rendered with `power_off: false`: nothing to call.
const POWER_OFF_NEVER: &str = "end_instance() { :; }
";

/// The script's variables, checked, in the order it sets them.
fn assignments(b: &Bootstrap) -> Result<Vec<(&'static str, String)>, BootstrapError> {
    check_url(b.bundle_url)?;
    if b.bundle_sha256.len() != 64 || !b.bundle_sha256.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(BootstrapError::Sha256(b.bundle_sha256.to_string()));
    }
    check_path("kiln_home", b.kiln_home)?;
    check_path("prefix", b.prefix)?;
    if b.ssh_port == 0 {
        return Err(BootstrapError::Port);
    }
    let grant = b.grant;
    if !crate::host::id_is_plain(&grant.id) {
        return Err(BootstrapError::GrantId(grant.id.clone()));
    }
    // The shim picks published ports' host ports, which the bridge could
    // not learn from the instance.
    if !grant.publish.is_empty() {
        return Err(BootstrapError::Published(grant.id.clone()));
    }
    for r in b.insecure_registries {
        check_registry(r)?;
    }
    let grant_json = serde_json::to_string(grant).map_err(BootstrapError::Grant)?;
    let host_key = b
        .host_key
        .private_openssh()
        .map_err(BootstrapError::HostKey)?;
    let files: Vec<String> = LAYOUT.iter().map(|e| e.in_bundle()).collect();
    Ok(vec![
        ("GRANT_ID", grant.id.clone()),
        ("BUNDLE_URL", b.bundle_url.to_string()),
        ("BUNDLE_SHA256", b.bundle_sha256.to_ascii_lowercase()),
        ("BUNDLE_FILES", files.join(" ")),
        ("PREFIX", b.prefix.trim_end_matches('/').to_string()),
        ("KILN_HOME", b.kiln_home.trim_end_matches('/').to_string()),
        ("HOST_TOML", host_toml(b)),
        ("GRANT_JSON", grant_json),
        ("HOST_KEY", host_key.trim_end().to_string()),
        ("POWER_OFF", if b.power_off { "1" } else { "0" }.to_string()),
    ])
}

/// The instance's `host.toml`: its VMs listen on every address of the
/// instance (a cloud's public address is often not on any interface of
/// it), on the grant's port only.
fn host_toml(b: &Bootstrap) -> String {
    let registries: Vec<String> = b
        .insecure_registries
        .iter()
        .map(|r| toml_string(r))
        .collect();
    format!(
        "# Written by kiln's cloud bootstrap for grant {}.\n\
         address = \"0.0.0.0\"\n\
         ports = \"{port}-{port}\"\n\
         insecure_registries = [{}]\n",
        b.grant.id,
        registries.join(", "),
        port = b.ssh_port,
    )
}

fn check_url(url: &str) -> Result<(), BootstrapError> {
    let bad = || BootstrapError::Url(url.to_string());
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(bad)?;
    let authority = rest.split('/').next().unwrap_or("");
    let plain = url
        .bytes()
        .all(|c| c.is_ascii_graphic() && !b"\"'`\\<>{}|^?#".contains(&c));
    if authority.is_empty() || authority.contains('@') || !plain {
        return Err(bad());
    }
    Ok(())
}

fn check_path(what: &'static str, path: &str) -> Result<(), BootstrapError> {
    let ok = path.starts_with('/')
        && path
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"/._-+".contains(&c))
        && !path.split('/').any(|part| part == "..");
    if ok {
        Ok(())
    } else {
        Err(BootstrapError::Path {
            what,
            path: path.to_string(),
        })
    }
}

fn check_registry(r: &str) -> Result<(), BootstrapError> {
    let ok = r.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && host
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b".-[]:".contains(&c))
            && port.parse::<u16>().is_ok_and(|p| p > 0)
    });
    if ok {
        Ok(())
    } else {
        Err(BootstrapError::Registry(r.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::process::Command;

    use chrono::Utc;

    use crate::grant::TdxPolicy;

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    /// What a hostile requester might put in the grant's strings.
    const HOSTILE: &[&str] = &[
        "'; touch /tmp/kiln-pwned; echo '",
        "$(touch /tmp/kiln-pwned)",
        "`touch /tmp/kiln-pwned`",
        "\"$HOME\" \\ \\\\ '\\''",
        "line\nbreak\r\n\ttab EOF\n'EOF'\nEOF",
        "${IFS}*?[a]~!&|;<>",
        "ünïcödé ☃ \u{1}\u{7f}",
    ];

    fn grant() -> Grant {
        let mut env = BTreeMap::new();
        for (i, h) in HOSTILE.iter().enumerate() {
            env.insert(format!("K{i}"), h.to_string());
        }
        Grant {
            id: "g-1_A".into(),
            image: "registry.example:5000/app:1".into(),
            vcpus: 1,
            cpu_millicores: None,
            ram_mib: 256,
            region: "cloud".into(),
            tdx: TdxPolicy::No,
            ssh_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ3n requester".into()],
            valid_to: Utc::now(),
            command: Some(HOSTILE.iter().map(|s| s.to_string()).collect()),
            env,
            publish: Vec::new(),
            submitted_at: Utc::now(),
        }
    }

    fn bootstrap<'a>(
        grant: &'a Grant,
        key: &'a HostKey,
        registries: &'a [String],
    ) -> Bootstrap<'a> {
        Bootstrap {
            bundle_url: "https://bundles.example/kiln/kiln-bundle-0.1.0.tar.gz",
            bundle_sha256: SHA,
            grant,
            host_key: key,
            ssh_port: 2222,
            kiln_home: DEFAULT_KILN_HOME,
            prefix: DEFAULT_PREFIX,
            insecure_registries: registries,
            power_off: true,
        }
    }

    /// Runs `sh -c` on `text`, answering its standard output.
    fn sh(text: &str) -> String {
        let out = Command::new("sh").arg("-c").arg(text).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn hostile_strings_reach_the_script_as_they_are() {
        let (g, key) = (grant(), HostKey::generate().unwrap());
        let registries = vec!["10.0.0.1:5000".to_string()];
        let b = bootstrap(&g, &key, &registries);
        let vars = assignments(&b).unwrap();
        let text = script(&b).unwrap();
        // Only the assignments run (values span lines: cut where the body
        // starts), then print each variable, NUL-separated.
        let head = &text[..text.find("end_instance()").unwrap()];
        let print: Vec<String> = vars
            .iter()
            .map(|(name, _)| format!("printf '%s\\0' \"${name}\""))
            .collect();
        let got = sh(&format!("{head}\n{}", print.join("\n")));
        let got: Vec<&str> = got.split('\0').collect();
        for ((name, want), got) in vars.iter().zip(&got) {
            assert_eq!(want, got, "{name}");
        }
        let back: Grant = serde_json::from_str(got[7]).unwrap();
        assert_eq!(back, g);
        assert_eq!(
            HostKey::from_openssh(got[8]).unwrap().fingerprint(),
            key.fingerprint()
        );
        assert!(!std::path::Path::new("/tmp/kiln-pwned").exists());
    }

    #[test]
    fn the_script_parses_and_holds_no_secret_but_the_host_key() {
        let (g, key) = (grant(), HostKey::generate().unwrap());
        let b = bootstrap(&g, &key, &[]);
        let text = script(&b).unwrap();
        assert!(text.starts_with("#!/bin/sh\n"));
        // dash, as the instance's /bin/sh would be, parses all of it.
        let out = Command::new("sh")
            .arg("-n")
            .arg("-c")
            .arg(&text)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(text.matches("OPENSSH PRIVATE KEY-----").count(), 2);
        assert!(text.contains(&g.ssh_keys[0]));
        assert!(text.contains("poweroff"));
    }

    #[test]
    fn rendered_not_to_power_off_it_cannot() {
        let (g, key) = (grant(), HostKey::generate().unwrap());
        let mut b = bootstrap(&g, &key, &[]);
        b.power_off = false;
        let text = script(&b).unwrap();
        for word in [
            "poweroff",
            "shutdown",
            "halt",
            "reboot",
            "systemctl",
            "init 0",
        ] {
            assert!(!text.contains(word), "{word}");
        }
        assert!(text.contains("POWER_OFF=0\n"));
    }

    #[test]
    fn the_cloud_config_writes_the_script_and_starts_it() {
        let (g, key) = (grant(), HostKey::generate().unwrap());
        let b = bootstrap(&g, &key, &[]);
        let text = cloud_config(&b).unwrap();
        assert!(text.starts_with("#cloud-config\n"), "{text}");
        let encoded = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("content: "))
            .unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(String::from_utf8(decoded).unwrap(), script(&b).unwrap());
        assert!(text.contains(&format!(
            "  - [systemd-run, --unit=kiln-bootstrap-g-1_A, --collect, /bin/sh, {SCRIPT_PATH}]\n"
        )));
        assert!(text.contains("permissions: '0700'"));
        // Within EC2's limit, with room for a grant's keys and command.
        assert!(text.len() < MAX_EC2_USER_DATA / 2, "{}", text.len());
    }

    #[test]
    fn the_host_file_is_what_kiln_host_reads() {
        let (g, key) = (grant(), HostKey::generate().unwrap());
        let registries = vec!["10.0.0.1:5000".to_string(), "[fd00::1]:80".to_string()];
        let b = bootstrap(&g, &key, &registries);
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join(crate::host::HOST_FILE), host_toml(&b)).unwrap();
        let host = crate::host::Host::open(home.path()).unwrap();
        assert_eq!(host.info().unwrap().address, "0.0.0.0");
        let v: toml::Value = toml::from_str(&host_toml(&b)).unwrap();
        assert_eq!(v["ports"].as_str(), Some("2222-2222"));
        assert_eq!(v["insecure_registries"][1].as_str(), Some("[fd00::1]:80"));
    }

    #[test]
    fn bad_inputs_are_refused_naming_what() {
        let (g, key) = (grant(), HostKey::generate().unwrap());
        let base = bootstrap(&g, &key, &[]);
        for url in [
            "ftp://x/b.tar.gz",
            "file:///etc/passwd",
            "https://user:pw@host/b",
            "https://host/b?X-Amz-Signature=abc",
            "https:///b",
            "http://host/a b",
            "http://host/a'b",
            "https://host/b#frag",
            "HTTPS://host/b",
        ] {
            let b = Bootstrap {
                bundle_url: url,
                ..base
            };
            assert!(matches!(script(&b), Err(BootstrapError::Url(_))), "{url}");
        }
        for sha in [
            "",
            "00",
            &"g".repeat(64),
            &"0".repeat(65),
            &format!("{}'", &SHA[1..]),
        ] {
            let b = Bootstrap {
                bundle_sha256: sha,
                ..base
            };
            assert!(
                matches!(script(&b), Err(BootstrapError::Sha256(_))),
                "{sha}"
            );
        }
        for path in ["relative", "/a/../b", "/a b", "/a'$(x)", ""] {
            let b = Bootstrap {
                kiln_home: path,
                ..base
            };
            let e = script(&b).unwrap_err().to_string();
            assert!(e.starts_with("kiln_home"), "{e}");
            let b = Bootstrap {
                prefix: path,
                ..base
            };
            assert!(matches!(script(&b), Err(BootstrapError::Path { .. })));
        }
        let b = Bootstrap {
            ssh_port: 0,
            ..base
        };
        assert!(matches!(script(&b), Err(BootstrapError::Port)));
        let registries = vec!["host:5000\"]\naddress = \"1.2.3.4".to_string()];
        let b = Bootstrap {
            insecure_registries: &registries,
            ..base
        };
        assert!(matches!(script(&b), Err(BootstrapError::Registry(_))));
        let mut bad = g.clone();
        bad.id = "../x".into();
        let b = Bootstrap {
            grant: &bad,
            ..base
        };
        assert!(matches!(script(&b), Err(BootstrapError::GrantId(_))));
        let mut published = g.clone();
        published.publish = vec![8000];
        let b = Bootstrap {
            grant: &published,
            ..base
        };
        assert!(matches!(script(&b), Err(BootstrapError::Published(_))));
        let mut huge = g.clone();
        huge.env.insert("BIG".into(), "x".repeat(MAX_EC2_USER_DATA));
        let b = Bootstrap {
            grant: &huge,
            ..base
        };
        let e = cloud_config(&b).unwrap_err().to_string();
        assert!(e.contains("cloud-config") && e.contains("16384"), "{e}");
        script(&b).unwrap();
    }
}
