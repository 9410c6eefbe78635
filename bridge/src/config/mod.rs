//! kilnd's boot configuration (TOML): plain data and its checks. Unknown
//! keys are errors, and every error names the key at fault. Each backend
//! kind's `[[backend]]` section is in [`backend`]; `backends` builds from
//! these types and this module knows nothing of it.

mod backend;
mod cloud;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use backend::{port_range, BackendSection, LocalSection, SshHostSection, SshSection};
pub use cloud::{runs_kvm, zone_in_region, Cloud, CloudSection, ConnectVia};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// One line (TOML's own message spans several, with a snippet); the
    /// line at fault is quoted, so the key is named.
    #[error("Invalid configuration at line {line} ({text}): {message}")]
    Parse {
        line: usize,
        text: String,
        message: String,
    },
    #[error("Invalid configuration key {key}: {problem}")]
    Invalid { key: String, problem: String },
    #[error("In {0}")]
    InFile(PathBuf, #[source] Box<ConfigError>),
}

impl ConfigError {
    fn invalid(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the HTTP API listens.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Holds the state database.
    pub state_dir: PathBuf,
    /// A file whose content (trimmed) is the API's bearer token, named
    /// `default` in events (the first form; `[[token]]` tables name theirs).
    #[serde(default)]
    pub auth_token_file: Option<PathBuf>,
    /// Named bearer tokens (`[[token]]` tables); events record which acted.
    #[serde(default, rename = "token")]
    pub tokens: Vec<TokenConfig>,
    /// The API's TLS certificate and key; required on a non-loopback
    /// `listen` unless `insecure_http` is set.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Serve plain HTTP on a non-loopback address (tokens travel in clear).
    #[serde(default)]
    pub insecure_http: bool,
    /// The region label of this host.
    pub region: String,
    /// How long a tag's digest, resolved when a grant is submitted, is
    /// reused for later grants (default 30).
    #[serde(default)]
    pub image_tag_ttl_secs: Option<u64>,
    /// Registries reached over plain HTTP, `host` or `host:port` (as
    /// Docker's `insecure-registries`); loopback registries always are.
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// Deprecated: set `reserve_vcpus`, `reserve_ram_mib` and `overcommit`
    /// in each `kind = "local"` section instead. Each key set here is the
    /// default of local sections that do not set it; [`Config::parse`]
    /// has already copied it there.
    #[serde(default)]
    pub capacity: Option<CapacityConfig>,
    /// Backends in order of preference (`[[backend]]` tables).
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendSection>,
}

/// The deprecated top-level `[capacity]` table: defaults for the same
/// keys of every local section, which is where they now belong (clouds
/// and other hosts have no use for them).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityConfig {
    #[serde(default)]
    pub reserve_vcpus: Option<u32>,
    #[serde(default)]
    pub reserve_ram_mib: Option<u64>,
    /// vCPUs per host CPU; at least 1.
    #[serde(default)]
    pub overcommit: Option<f64>,
}

/// One named bearer token, read from its own file so that the secret
/// stays out of the configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub name: String,
    pub token_file: PathBuf,
}

/// PEM files for the API's TLS.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// A bearer token and the name events record for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedToken {
    pub name: String,
    pub secret: String,
}

/// The name of the token in `auth_token_file`.
pub const DEFAULT_TOKEN_NAME: &str = "default";

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7878))
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
        Config::parse(&text).map_err(|e| ConfigError::InFile(path.to_path_buf(), Box::new(e)))
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| parse_error(text, &e))?;
        // Checked before it is copied, so that its errors name its own key.
        if let Some(defaults) = &config.capacity {
            backend::check_overcommit("capacity.overcommit", defaults.overcommit)?;
            for b in &mut config.backends {
                b.apply_capacity_defaults(defaults);
            }
        }
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.region.trim().is_empty() {
            return Err(ConfigError::invalid("region", "must not be empty"));
        }
        if !self.listen.ip().is_loopback() && self.tls.is_none() && !self.insecure_http {
            return Err(ConfigError::invalid(
                "listen",
                format!(
                    "{} is not a loopback address: set [tls] cert and key, or insecure_http = true",
                    self.listen.ip()
                ),
            ));
        }
        if self.auth_token_file.is_none() && self.tokens.is_empty() {
            return Err(ConfigError::invalid(
                "auth_token_file",
                "missing: set it or add a [[token]] table",
            ));
        }
        let mut token_names = std::collections::BTreeSet::new();
        if self.auth_token_file.is_some() {
            token_names.insert(DEFAULT_TOKEN_NAME);
        }
        for (i, t) in self.tokens.iter().enumerate() {
            if !valid_token_name(&t.name) {
                return Err(ConfigError::invalid(
                    format!("token[{i}].name"),
                    "must be 1 to 64 letters, digits, '-', '_' or '.'",
                ));
            }
            if !token_names.insert(&t.name) {
                return Err(ConfigError::invalid(
                    format!("token[{i}].name"),
                    format!("{} is used by an earlier token", t.name),
                ));
            }
        }
        for (i, r) in self.insecure_registries.iter().enumerate() {
            if r.is_empty()
                || r.contains("://")
                || r.contains('/')
                || r.contains(char::is_whitespace)
            {
                return Err(ConfigError::invalid(
                    format!("insecure_registries[{i}]"),
                    "must be host or host:port",
                ));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        let (mut homes, mut local_index): (Vec<PathBuf>, Vec<usize>) = (Vec::new(), Vec::new());
        for (i, b) in self.backends.iter().enumerate() {
            if !names.insert(b.name()) {
                return Err(ConfigError::invalid(
                    format!("backend[{i}].name"),
                    format!("{} is used by an earlier backend", b.name()),
                ));
            }
            if b.region().is_some_and(|r| r.trim().is_empty()) {
                return Err(ConfigError::invalid(
                    format!("backend[{i}].region"),
                    "must not be empty",
                ));
            }
            b.check(&format!("backend[{i}]"))?;
            // A home is one machine's ledger (its grants and claims): two
            // backends counting it would each count the other's grants.
            if let BackendSection::Local(local) = b {
                let home = local
                    .kiln_home
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("/var/lib/kiln"));
                if let Some(j) = homes.iter().position(|h| *h == home) {
                    return Err(ConfigError::invalid(
                        format!("backend[{i}].kiln_home"),
                        format!(
                            "{} is also backend[{}]'s: each local backend needs its own",
                            home.display(),
                            local_index[j]
                        ),
                    ));
                }
                homes.push(home);
                local_index.push(i);
            }
        }
        Ok(())
    }

    /// Every bearer token with its name: `auth_token_file`'s first, then
    /// the `[[token]]` tables'. Two names sharing one secret are refused,
    /// since events could not tell them apart.
    pub fn read_tokens(&self) -> Result<Vec<NamedToken>, ConfigError> {
        let mut tokens = Vec::new();
        if let Some(path) = &self.auth_token_file {
            tokens.push(NamedToken {
                name: DEFAULT_TOKEN_NAME.to_string(),
                secret: read_secret("auth_token_file", path)?,
            });
        }
        for (i, t) in self.tokens.iter().enumerate() {
            let key = format!("token[{i}].token_file");
            let secret = read_secret(&key, &t.token_file)?;
            if tokens.iter().any(|o: &NamedToken| o.secret == secret) {
                return Err(ConfigError::invalid(
                    key,
                    "holds the same token as an earlier one",
                ));
            }
            tokens.push(NamedToken {
                name: t.name.clone(),
                secret,
            });
        }
        Ok(tokens)
    }
}

/// A token file's content, trimmed; `key` names the setting in errors.
fn read_secret(key: &str, path: &Path) -> Result<String, ConfigError> {
    let raw = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::invalid(key, format!("cannot read {}: {e}", path.display())))?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(ConfigError::invalid(key, "the file is empty"));
    }
    Ok(token.to_string())
}

/// Token names go into events and logs: short, and nothing to escape.
fn valid_token_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A TOML error as one line: where, the line itself, and TOML's message
/// without its snippet.
fn parse_error(text: &str, e: &toml::de::Error) -> ConfigError {
    const QUOTED: usize = 80;
    let at = e.span().map_or(0, |s| s.start).min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let content = text.lines().nth(line - 1).unwrap_or("").trim();
    let mut quoted: String = content.chars().take(QUOTED).collect();
    if content.chars().count() > QUOTED {
        quoted.push('…');
    }
    let message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    ConfigError::Parse {
        line,
        text: format!("`{quoted}`"),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_image::root::Rootfs;

    const BASE: &str = r#"
state_dir = "/tmp/kiln"
auth_token_file = "/tmp/kiln/token"
region = "home"
"#;

    fn error_of(text: &str) -> String {
        match Config::parse(text) {
            Err(e) => crate::error_chain(&e),
            Ok(c) => panic!("accepted {c:?}"),
        }
    }

    #[test]
    fn a_minimal_config_gets_defaults() {
        let c = Config::parse(BASE).unwrap();
        assert_eq!(c.listen, default_listen());
        assert!(c.capacity.is_none());
        assert!(c.backends.is_empty());
    }

    #[test]
    fn backends_keep_their_order_and_sections() {
        let c = Config::parse(&format!(
            "{BASE}[[backend]]\nkind = \"local\"\nname = \"a\"\nvcpus = 4\n\
             reserve_vcpus = 1\nreserve_ram_mib = 512\novercommit = 2.0\n\
             [[backend]]\nkind = \"local\"\nname = \"b\"\nkiln_home = \"/srv/b\"\n"
        ))
        .unwrap();
        let names: Vec<&str> = c.backends.iter().map(|b| b.name()).collect();
        assert_eq!(names, ["a", "b"]);
        let BackendSection::Local(a) = &c.backends[0] else {
            panic!("not local")
        };
        assert_eq!(a.rootfs, None, "auto unless set");
        assert_eq!(
            (a.reserve_vcpus, a.reserve_ram_mib, a.overcommit),
            (Some(1), Some(512), Some(2.0))
        );
        let BackendSection::Local(b) = &c.backends[1] else {
            panic!("not local")
        };
        assert_eq!(
            (b.reserve_vcpus, b.reserve_ram_mib, b.overcommit),
            (None, None, None)
        );
        for (word, want) in [
            ("auto", Rootfs::Auto),
            ("initramfs", Rootfs::Initramfs),
            ("block", Rootfs::Block),
        ] {
            let c = Config::parse(&format!(
                "{BASE}[[backend]]\nkind = \"local\"\nrootfs = \"{word}\"\n"
            ))
            .unwrap();
            let BackendSection::Local(l) = &c.backends[0] else {
                panic!("not local")
            };
            assert_eq!(l.rootfs.as_deref(), Some(word));
            assert_eq!(Rootfs::parse(word), Some(want));
        }
    }

    #[test]
    fn a_top_level_capacity_table_is_the_default_of_local_sections() {
        let c = Config::parse(&format!(
            "{BASE}[capacity]\nreserve_vcpus = 1\nreserve_ram_mib = 512\novercommit = 2.0\n\
             [[backend]]\nkind = \"local\"\nname = \"a\"\n\
             [[backend]]\nkind = \"local\"\nname = \"b\"\nkiln_home = \"/srv/b\"\nreserve_vcpus = 0\novercommit = 1.5\n"
        ))
        .unwrap();
        let BackendSection::Local(a) = &c.backends[0] else {
            panic!("not local")
        };
        assert_eq!(
            (a.reserve_vcpus, a.reserve_ram_mib, a.overcommit),
            (Some(1), Some(512), Some(2.0))
        );
        // A section's own keys win, one key at a time.
        let BackendSection::Local(b) = &c.backends[1] else {
            panic!("not local")
        };
        assert_eq!(
            (b.reserve_vcpus, b.reserve_ram_mib, b.overcommit),
            (Some(0), Some(512), Some(1.5))
        );
        // Part of a table sets only its own keys.
        let c = Config::parse(&format!(
            "{BASE}[capacity]\nreserve_ram_mib = 256\n[[backend]]\nkind = \"local\"\n"
        ))
        .unwrap();
        let BackendSection::Local(l) = &c.backends[0] else {
            panic!("not local")
        };
        assert_eq!(
            (l.reserve_vcpus, l.reserve_ram_mib, l.overcommit),
            (None, Some(256), None)
        );
    }

    #[test]
    fn errors_name_the_key() {
        const CLOUD: &str = "[[backend]]\nkind = \"aws\"\nname = \"c\"\nregions = [\"eu-central-1\"]\n\
                             machine_types = [\"c5.metal\"]\nmax_instances = 2\nimage = \"ami-1\"\n\
                             bundle_url = \"https://b.example/k.tgz\"\n\
                             bundle_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n";
        let cases = [
            (format!("{BASE}listen_addr = \"x\"\n"), "listen_addr"),
            (BASE.replace("region = \"home\"", ""), "region"),
            (BASE.replace("\"home\"", "\"\""), "region"),
            (format!("{BASE}listen = \"not an address\"\n"), "listen"),
            (
                format!("{BASE}[capacity]\nreserve_cpu = 1\n"),
                "reserve_cpu",
            ),
            (
                format!("{BASE}[capacity]\nreserve_vcpus = -1\n"),
                "reserve_vcpus",
            ),
            (
                format!("{BASE}[capacity]\novercommit = 0.5\n"),
                "capacity.overcommit",
            ),
            (
                format!("{BASE}[[backend]]\nkind = \"local\"\novercommit = 0.5\n"),
                "backend[0].overcommit",
            ),
            (
                format!("{BASE}[[backend]]\nkind = \"local\"\novercommit = nan\n"),
                "backend[0].overcommit",
            ),
            (
                format!("{BASE}[[backend]]\nkind = \"local\"\nreserve_ram = 1\n"),
                "reserve_ram",
            ),
            (format!("{BASE}[[backend]]\nkind = \"azure\"\n"), "azure"),
            (format!("{BASE}{CLOUD}zones = [\"us-east-1a\"]\n"), "backend[0].zones"),
            (format!("{BASE}{CLOUD}max_instances = 0\n").replace("max_instances = 2\n", ""), "backend[0].max_instances"),
            (format!("{BASE}{CLOUD}").replace("https://b.example", "https://u:p@b.example"), "backend[0].bundle_url"),
            (format!("{BASE}{CLOUD}").replace(&"0".repeat(64), "abc"), "backend[0].bundle_sha256"),
            (format!("{BASE}{CLOUD}").replace("image = \"ami-1\"\n", ""), "backend[0].image"),
            (format!("{BASE}{CLOUD}project = \"p\"\n"), "backend[0].project"),
            (
                format!("{BASE}{CLOUD}")
                    .replace("\"aws\"", "\"gcp\"")
                    .replace("c5.metal", "n2-standard-8"),
                "backend[0].project",
            ),
            (format!("{BASE}{CLOUD}connect = \"sideways\"\n"), "backend[0].connect"),
            (format!("{BASE}{CLOUD}").replace("c5.metal", "c5.xlarge"), "backend[0].machine_types"),
            (format!("{BASE}[[backend]]\nname = \"x\"\n"), "kind"),
            (
                format!("{BASE}[[backend]]\nkind = \"local\"\nkernal = \"/k\"\n"),
                "kernal",
            ),
            (
                format!("{BASE}[[backend]]\nkind = \"local\"\n[[backend]]\nkind = \"local\"\n"),
                "backend[1].name",
            ),
            (
                format!("{BASE}[[backend]]\nkind = \"local\"\nregion = \" \"\n"),
                "backend[0].region",
            ),
            (
                format!("{BASE}[[backend]]\nkind = \"local\"\nvcpus = 0\n"),
                "backend[0].vcpus",
            ),
            (
                format!("{BASE}[[backend]]\nkind = \"local\"\nkeep_ended_days = 4294967295\n"),
                "backend[0].keep_ended_days",
            ),
            (
                format!("{BASE}[[backend]]\nkind = \"local\"\n[[backend]]\nkind = \"local\"\nname = \"b\"\nram_mib = 0\n"),
                "backend[1].ram_mib",
            ),
            (
                format!("{BASE}[[backend]]\nkind = \"local\"\nrootfs = \"squashfs\"\n"),
                "backend[0].rootfs",
            ),
            (
                format!("{BASE}[[backend]]\nkind = \"local\"\noutput_cap_kib = 0\n"),
                "backend[0].output_cap_kib",
            ),
            (
                BASE.replace("auth_token_file = \"/tmp/kiln/token\"", ""),
                "auth_token_file",
            ),
            (
                format!("{BASE}[[token]]\nname = \"a b\"\ntoken_file = \"/t\"\n"),
                "token[0].name",
            ),
            (
                format!("{BASE}[[token]]\nname = \"default\"\ntoken_file = \"/t\"\n"),
                "token[0].name",
            ),
            (format!("{BASE}[[token]]\nname = \"x\"\n"), "token_file"),
            (format!("{BASE}[tls]\ncert = \"/c\"\n"), "key"),
        ];
        for (text, key) in cases {
            let e = error_of(&text);
            assert!(e.contains(key), "{key} not in: {e}");
        }
    }

    #[test]
    fn every_error_is_one_line_without_debug_output() {
        let cases = [
            format!("{BASE}listen = \"127.0.0.1:1\"\n[capacity\n"),
            format!("{BASE}region = \"again\"\n"),
            format!("{BASE}colour = \"blue\"\n"),
            format!("{BASE}[[backend]]\nkind = \"local\"\nvcpus = 0\n"),
            format!("{BASE}[[backend]]\nkind = \"local\"\nrootfs = \"fast\"\n"),
        ];
        for text in cases {
            let e = error_of(&text);
            assert_eq!(e.lines().count(), 1, "not one line: {e}");
            assert!(!e.contains('{') && !e.contains("Resources"), "{e}");
        }
        let e = error_of(&format!("{BASE}x = [\n"));
        assert!(e.contains("line 5 (`x = [`)"), "{e}");
    }

    #[test]
    fn the_example_config_parses() {
        let c = Config::parse(include_str!("../../kilnd.example.toml")).unwrap();
        assert_eq!(c.region, "home-lab");
        assert_eq!(c.backends.len(), 1);
        assert_eq!(c.backends[0].name(), "local");
        assert!(c.capacity.is_none(), "the example shows the current keys");
        let BackendSection::Local(l) = &c.backends[0] else {
            panic!("not local")
        };
        assert_eq!(
            (l.reserve_vcpus, l.reserve_ram_mib, l.overcommit),
            (Some(1), Some(1024), Some(1.0))
        );
    }

    #[test]
    fn the_token_file_must_exist_and_hold_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let text = BASE.replace("/tmp/kiln/token", path.to_str().unwrap());
        let c = Config::parse(&text).unwrap();
        assert!(crate::error_chain(&c.read_tokens().unwrap_err()).contains("auth_token_file"));
        std::fs::write(&path, "  \n").unwrap();
        assert!(crate::error_chain(&c.read_tokens().unwrap_err()).contains("auth_token_file"));
        std::fs::write(&path, "s3cret\n").unwrap();
        assert_eq!(
            c.read_tokens().unwrap(),
            [NamedToken {
                name: DEFAULT_TOKEN_NAME.into(),
                secret: "s3cret".into()
            }]
        );
    }

    #[test]
    fn named_tokens_join_the_old_single_token() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, secret: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, secret).unwrap();
            p.display().to_string()
        };
        let text = format!(
            "{}[[token]]\nname = \"ci\"\ntoken_file = \"{}\"\n\
             [[token]]\nname = \"alice\"\ntoken_file = \"{}\"\n",
            BASE.replace("/tmp/kiln/token", &file("default", "d\n")),
            file("ci", "c1\n"),
            file("alice", "a1")
        );
        let names: Vec<(String, String)> = Config::parse(&text)
            .unwrap()
            .read_tokens()
            .unwrap()
            .into_iter()
            .map(|t| (t.name, t.secret))
            .collect();
        assert_eq!(
            names,
            [("default", "d"), ("ci", "c1"), ("alice", "a1")].map(|(n, s)| (n.into(), s.into()))
        );
        // Only [[token]] tables, no auth_token_file: the new form alone.
        let only = format!(
            "state_dir = \"/tmp/k\"\nregion = \"r\"\n[[token]]\nname = \"ci\"\ntoken_file = \"{}\"\n",
            file("ci2", "c2")
        );
        assert_eq!(
            Config::parse(&only).unwrap().read_tokens().unwrap().len(),
            1
        );
        // The same secret under two names cannot be told apart in events.
        let twice = format!(
            "{}[[token]]\nname = \"ci\"\ntoken_file = \"{}\"\n",
            BASE.replace("/tmp/kiln/token", &file("d2", "same")),
            file("c3", "same\n")
        );
        let e = crate::error_chain(&Config::parse(&twice).unwrap().read_tokens().unwrap_err());
        assert!(e.contains("token[0].token_file"), "{e}");
    }

    #[test]
    fn a_non_loopback_listen_needs_tls_or_an_explicit_insecure_http() {
        for addr in ["0.0.0.0:7878", "10.1.2.3:7878", "[::]:7878"] {
            let e = error_of(&format!("{BASE}listen = \"{addr}\"\n"));
            assert!(
                e.contains("listen") && e.contains("not a loopback address"),
                "{e}"
            );
            assert_eq!(e.lines().count(), 1, "{e}");
            Config::parse(&format!(
                "{BASE}listen = \"{addr}\"\ninsecure_http = true\n"
            ))
            .unwrap();
            let c = Config::parse(&format!(
                "{BASE}listen = \"{addr}\"\n[tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n"
            ))
            .unwrap();
            assert!(c.tls.is_some());
        }
        for addr in ["127.0.0.2:7878", "[::1]:7878"] {
            Config::parse(&format!("{BASE}listen = \"{addr}\"\n")).unwrap();
        }
    }
}
