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

/// Either the bare config object or an OCI image config with a `config` key.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stored {
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
