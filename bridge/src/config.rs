//! kilnd's boot configuration (TOML). Unknown keys are errors, and every
//! error names the key at fault.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::backends::BackendSection;

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

/// A century: longer than anyone keeps an ended grant's directory.
const MAX_KEEP_ENDED_DAYS: u32 = 36_500;

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
    /// A file whose content (trimmed) is the API's bearer token.
    pub auth_token_file: PathBuf,
    /// The region label of this host.
    pub region: String,
    /// How long a tag's digest, resolved when a grant is submitted, is
    /// reused for later grants (default 30).
    #[serde(default)]
    pub image_tag_ttl_secs: Option<u64>,
    #[serde(default)]
    pub capacity: CapacityConfig,
    /// Backends in order of preference (`[[backend]]` tables).
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendSection>,
}

/// What of this host is kept back from grants.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityConfig {
    #[serde(default)]
    pub reserve_vcpus: u32,
    #[serde(default)]
    pub reserve_ram_mib: u64,
    /// vCPUs per host CPU; at least 1.
    #[serde(default)]
    pub overcommit: Option<f64>,
}

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
        let config: Config = toml::from_str(text).map_err(|e| parse_error(text, &e))?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.region.trim().is_empty() {
            return Err(ConfigError::invalid("region", "must not be empty"));
        }
        if let Some(r) = self.capacity.overcommit {
            if !r.is_finite() || r < 1.0 {
                return Err(ConfigError::invalid(
                    "capacity.overcommit",
                    "must be a number of at least 1",
                ));
            }
        }
        let mut names = std::collections::BTreeSet::new();
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
            let BackendSection::Local(local) = b;
            if local.vcpus == Some(0) {
                return Err(ConfigError::invalid(
                    format!("backend[{i}].vcpus"),
                    "must be greater than zero",
                ));
            }
            if local.ram_mib == Some(0) {
                return Err(ConfigError::invalid(
                    format!("backend[{i}].ram_mib"),
                    "must be greater than zero",
                ));
            }
            if let Some(word) = &local.rootfs {
                if crate::backends::local::build::Rootfs::parse(word).is_none() {
                    return Err(ConfigError::invalid(
                        format!("backend[{i}].rootfs"),
                        format!(
                            "must be {}, not {word:?}",
                            crate::backends::local::build::Rootfs::WORDS
                        ),
                    ));
                }
            }
            // Far more would put the pruning cutoff before any date.
            if local
                .keep_ended_days
                .is_some_and(|d| d > MAX_KEEP_ENDED_DAYS)
            {
                return Err(ConfigError::invalid(
                    format!("backend[{i}].keep_ended_days"),
                    format!("must be at most {MAX_KEEP_ENDED_DAYS}"),
                ));
            }
        }
        Ok(())
    }

    /// The bearer token, read from `auth_token_file`.
    pub fn read_token(&self) -> Result<String, ConfigError> {
        let raw = std::fs::read_to_string(&self.auth_token_file).map_err(|e| {
            ConfigError::invalid(
                "auth_token_file",
                format!("cannot read {}: {e}", self.auth_token_file.display()),
            )
        })?;
        let token = raw.trim();
        if token.is_empty() {
            return Err(ConfigError::invalid("auth_token_file", "the file is empty"));
        }
        Ok(token.to_string())
    }
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
        assert_eq!(c.capacity.reserve_vcpus, 0);
        assert!(c.backends.is_empty());
    }

    #[test]
    fn backends_keep_their_order_and_sections() {
        let c = Config::parse(&format!(
            "{BASE}\n[capacity]\nreserve_vcpus = 1\nreserve_ram_mib = 512\novercommit = 2.0\n\
             [[backend]]\nkind = \"local\"\nname = \"a\"\nvcpus = 4\n\
             [[backend]]\nkind = \"local\"\nname = \"b\"\n"
        ))
        .unwrap();
        let names: Vec<&str> = c.backends.iter().map(|b| b.name()).collect();
        assert_eq!(names, ["a", "b"]);
        let crate::backends::BackendSection::Local(a) = &c.backends[0];
        assert_eq!(a.rootfs, None, "auto unless set");
        for (word, want) in [
            ("auto", crate::backends::local::build::Rootfs::Auto),
            (
                "initramfs",
                crate::backends::local::build::Rootfs::Initramfs,
            ),
            ("block", crate::backends::local::build::Rootfs::Block),
        ] {
            let c = Config::parse(&format!(
                "{BASE}[[backend]]\nkind = \"local\"\nrootfs = \"{word}\"\n"
            ))
            .unwrap();
            let crate::backends::BackendSection::Local(l) = &c.backends[0];
            assert_eq!(l.rootfs.as_deref(), Some(word));
            assert_eq!(
                crate::backends::local::build::Rootfs::parse(word),
                Some(want)
            );
        }
        assert_eq!(c.capacity.overcommit, Some(2.0));
    }

    #[test]
    fn errors_name_the_key() {
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
            (format!("{BASE}[[backend]]\nkind = \"aws\"\n"), "aws"),
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
        let c = Config::parse(include_str!("../kilnd.example.toml")).unwrap();
        assert_eq!(c.region, "home-lab");
        assert_eq!(c.backends.len(), 1);
        assert_eq!(c.backends[0].name(), "local");
    }

    #[test]
    fn the_token_file_must_exist_and_hold_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let text = BASE.replace("/tmp/kiln/token", path.to_str().unwrap());
        let c = Config::parse(&text).unwrap();
        assert!(crate::error_chain(&c.read_token().unwrap_err()).contains("auth_token_file"));
        std::fs::write(&path, "  \n").unwrap();
        assert!(crate::error_chain(&c.read_token().unwrap_err()).contains("auth_token_file"));
        std::fs::write(&path, "s3cret\n").unwrap();
        assert_eq!(c.read_token().unwrap(), "s3cret");
    }
}
