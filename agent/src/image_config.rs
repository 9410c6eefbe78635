//! The image's configuration as the image builder stored it
//! (`/kiln/config.json`), merged with the host's per-boot overrides.

use std::path::Path;

use kiln_protocol::Workload;
use serde::Deserialize;

pub const CONFIG_PATH: &str = "/kiln/config.json";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}")]
    Read(String, #[source] std::io::Error),
    #[error("invalid image config {0}: {1}")]
    Parse(String, String),
    #[error("nothing to run: the image has no Entrypoint or Cmd and none was given")]
    NoCommand,
}

/// The OCI image config fields the agent uses (Docker's capitalised names).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ImageConfig {
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    #[serde(rename = "User", default)]
    pub user: Option<String>,
}

/// The file kiln's image builder writes (`kiln_image::image::AgentConfig`):
/// lower-case names, empty meaning unset.
#[derive(Deserialize)]
struct Built {
    /// The image's identity; required, so other shapes do not match.
    #[allow(dead_code)]
    image: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    working_dir: String,
    #[serde(default)]
    user: String,
}

impl From<Built> for ImageConfig {
    fn from(b: Built) -> Self {
        let some_vec = |v: Vec<String>| (!v.is_empty()).then_some(v);
        let some_str = |s: String| (!s.is_empty()).then_some(s);
        ImageConfig {
            entrypoint: some_vec(b.entrypoint),
            cmd: some_vec(b.cmd),
            env: some_vec(b.env),
            working_dir: some_str(b.working_dir),
            user: some_str(b.user),
        }
    }
}

/// The builder's file, an OCI image config with a `config` key, or the
/// bare config object (tried in that order).
#[derive(Deserialize)]
#[serde(untagged)]
enum Stored {
    Built(Built),
    Wrapped { config: ImageConfig },
    Bare(ImageConfig),
}

impl ImageConfig {
    /// Reads the stored config; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(ConfigError::Read(path.display().to_string(), e)),
        };
        Self::parse(&text).map_err(|e| ConfigError::Parse(path.display().to_string(), e))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        match serde_json::from_str::<Stored>(text).map_err(|e| e.to_string())? {
            Stored::Built(b) => Ok(b.into()),
            Stored::Wrapped { config } | Stored::Bare(config) => Ok(config),
        }
    }
}

/// What will actually run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: String,
    pub user: Option<String>,
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Docker's rules: a given argv replaces Cmd (Entrypoint stays); env
/// overrides are applied by key; PATH and HOME get defaults.
pub fn resolve(image: &ImageConfig, w: &Workload) -> Result<Resolved, ConfigError> {
    let entrypoint = image.entrypoint.clone().unwrap_or_default();
    // `[""]` is how some tools write "no entrypoint".
    let mut argv = if entrypoint == [""] {
        Vec::new()
    } else {
        entrypoint
    };
    if w.argv.is_empty() {
        argv.extend(image.cmd.clone().unwrap_or_default());
    } else {
        argv.extend(w.argv.iter().cloned());
    }
    if argv.is_empty() || argv[0].is_empty() {
        return Err(ConfigError::NoCommand);
    }
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |kv: &str| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if k.is_empty() {
            return;
        }
        match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(e) => e.1 = v.to_string(),
            None => env.push((k.to_string(), v.to_string())),
        }
    };
    for kv in image.env.iter().flatten() {
        set(kv);
    }
    for kv in &w.env {
        set(kv);
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    let working_dir = w
        .working_dir
        .clone()
        .or_else(|| image.working_dir.clone())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "/".into());
    let user = w
        .user
        .clone()
        .or_else(|| image.user.clone())
        .filter(|u| !u.is_empty());
    Ok(Resolved {
        argv,
        env,
        working_dir,
        user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_rules_for_argv_env_cwd_user() {
        let image = ImageConfig::parse(
            r#"{"Entrypoint":["/bin/app"],"Cmd":["--serve"],"Env":["PATH=/x","A=1"],"WorkingDir":"/srv","User":"app"}"#,
        )
        .unwrap();
        let r = resolve(&image, &Workload::default()).unwrap();
        assert_eq!(r.argv, ["/bin/app", "--serve"]);
        assert_eq!(r.working_dir, "/srv");
        assert_eq!(r.user.as_deref(), Some("app"));
        let w = Workload {
            argv: vec!["--once".into()],
            env: vec!["A=2".into(), "B=3".into()],
            working_dir: Some("/tmp".into()),
            user: Some("0".into()),
            interactive: false,
        };
        let r = resolve(&image, &w).unwrap();
        assert_eq!(r.argv, ["/bin/app", "--once"]);
        assert_eq!(
            r.env,
            [
                ("PATH".into(), "/x".into()),
                ("A".into(), "2".into()),
                ("B".into(), "3".into())
            ]
        );
        assert_eq!(
            (r.working_dir.as_str(), r.user.as_deref()),
            ("/tmp", Some("0"))
        );
    }

    #[test]
    fn wrapped_config_defaults_and_nothing_to_run() {
        let image = ImageConfig::parse(r#"{"config":{"Cmd":["sh"]}}"#).unwrap();
        // As kiln's image builder writes it.
        let built = ImageConfig::parse(
            r#"{"image":"sha256:ab","entrypoint":[],"cmd":["/bin/sh","-c","x"],"env":["PATH=/bin"],"working_dir":"","user":"","image_init":null}"#,
        )
        .unwrap();
        assert_eq!(
            built,
            ImageConfig {
                entrypoint: None,
                cmd: Some(vec!["/bin/sh".into(), "-c".into(), "x".into()]),
                env: Some(vec!["PATH=/bin".into()]),
                working_dir: None,
                user: None,
            }
        );
        let r = resolve(&image, &Workload::default()).unwrap();
        assert_eq!(r.argv, ["sh"]);
        assert!(r.env.iter().any(|(k, v)| k == "PATH" && v.contains("/bin")));
        assert_eq!(r.working_dir, "/");
        assert!(matches!(
            resolve(&ImageConfig::default(), &Workload::default()),
            Err(ConfigError::NoCommand)
        ));
        assert!(ImageConfig::parse("[1,2]").is_err());
        let dir = std::env::temp_dir().join("kiln-agent-no-such-config.json");
        assert_eq!(ImageConfig::load(&dir).unwrap(), ImageConfig::default());
    }
}

#[cfg(test)]
mod builder_contract {
    use super::*;
    use kiln_image::digest::Digest;
    use kiln_image::image::{AgentConfig, RunConfig};

    /// The agent reads exactly what kiln's image builder writes.
    #[test]
    fn reads_the_builders_config_file() {
        let run = RunConfig {
            entrypoint: Some(vec!["/bin/app".into()]),
            cmd: Some(vec!["--serve".into()]),
            env: Some(vec!["A=1".into()]),
            working_dir: Some("/srv".into()),
            user: Some("app".into()),
        };
        let written = serde_json::to_string(&AgentConfig::new(Digest::of(b"x"), &run)).unwrap();
        let read = ImageConfig::parse(&written).unwrap();
        assert_eq!(
            read,
            ImageConfig {
                entrypoint: run.entrypoint.clone(),
                cmd: run.cmd.clone(),
                env: run.env.clone(),
                working_dir: run.working_dir.clone(),
                user: run.user.clone(),
            }
        );
        let bare =
            serde_json::to_string(&AgentConfig::new(Digest::of(b"x"), &RunConfig::default()))
                .unwrap();
        assert_eq!(ImageConfig::parse(&bare).unwrap(), ImageConfig::default());
    }
}
