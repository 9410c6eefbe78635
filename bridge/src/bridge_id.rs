//! This bridge's identity: a random id made once and kept in the state
//! directory. Cloud instances are tagged with it, so that two bridges on
//! one cloud account never reap each other's instances.

use std::io::Write;
use std::path::{Path, PathBuf};

const FILE: &str = "bridge-id";

#[derive(Debug, thiserror::Error)]
pub enum BridgeIdError {
    #[error("cannot read {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    #[error("cannot write {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
    #[error("{} does not hold a bridge id (32 lowercase hex digits)", .0.display())]
    Malformed(PathBuf),
}

/// The id in `state_dir`, made there first if it has none.
pub fn load_or_create(state_dir: &Path) -> Result<String, BridgeIdError> {
    let path = state_dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            // Lowercase hex fits every cloud's tag and label rules.
            if id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                Ok(id.to_string())
            } else {
                Err(BridgeIdError::Malformed(path))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().simple().to_string();
            // Written whole or not at all: a torn id would orphan every
            // instance tagged with the real one.
            let tmp = state_dir.join(format!("{FILE}.tmp"));
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(format!("{id}\n").as_bytes())?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)
            };
            write().map_err(|e| BridgeIdError::Write(path.clone(), e))?;
            Ok(id)
        }
        Err(e) => Err(BridgeIdError::Read(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        assert_eq!(first.len(), 32);
        assert_eq!(load_or_create(dir.path()).unwrap(), first);
        std::fs::write(dir.path().join(FILE), "NOT-AN-ID").unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(BridgeIdError::Malformed(_))
        ));
    }
}
