//! `$KILN_HOME/claims/<id>.json`: the room a provision in progress holds,
//! and which process holds it. A claim counts while that process lives, or
//! while the VM it started does (the provision was cut short after the
//! shim started); otherwise it is stale and the next count removes it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backends::local::find_shim;
use crate::backends::local::process::Process;
use crate::capacity::Resources;

const CLAIMS_DIR: &str = "claims";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    pub resources: Resources,
    /// The `kiln host provision` that wrote it.
    pub by: Option<Process>,
}

impl Claim {
    /// A claim by this process.
    pub fn new(resources: Resources) -> Claim {
        Claim {
            resources,
            by: Process::of(std::process::id()),
        }
    }

    pub fn read(home: &Path, id: &str) -> Option<Claim> {
        let bytes = std::fs::read(path(home, id)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn write(&self, home: &Path, id: &str) -> std::io::Result<()> {
        let path = path(home, id);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(self)?)?;
        std::fs::rename(&tmp, &path)
    }

    /// Whether it still holds room: its provision runs, or the VM it
    /// started in `grant_dir` does.
    pub fn live(&self, grant_dir: &Path) -> bool {
        self.by.is_some_and(|p| p.alive()) || find_shim(grant_dir).is_some_and(|s| s.alive())
    }
}

pub fn path(home: &Path, id: &str) -> PathBuf {
    home.join(CLAIMS_DIR).join(format!("{id}.json"))
}

/// Removes the claim of `id`; a missing one is fine.
pub fn remove(home: &Path, id: &str) {
    let _ = std::fs::remove_file(path(home, id));
}

/// The grant ids with a claim.
pub fn ids(home: &Path) -> Vec<String> {
    std::fs::read_dir(home.join(CLAIMS_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .map(str::to_string)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_lives_as_long_as_its_process() {
        let home = tempfile::tempdir().unwrap();
        let mine = Claim::new(Resources::new(1, 256));
        mine.write(home.path(), "g1").unwrap();
        assert_eq!(Claim::read(home.path(), "g1"), Some(mine.clone()));
        assert!(mine.live(&home.path().join("grants/g1")));
        assert_eq!(ids(home.path()), ["g1"]);
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = Process::of(child.id());
        child.wait().unwrap();
        let stale = Claim { by: gone, ..mine };
        assert!(!stale.live(&home.path().join("grants/g1")));
        remove(home.path(), "g1");
        remove(home.path(), "g1");
        assert!(ids(home.path()).is_empty());
    }
}
