//! Which grant directories have outlived their keep time. Only a grant
//! whose shim wrote its final state (`ended`) qualifies, judged by when it
//! ended; a directory with no state at all (a provision that stopped before
//! the shim wrote one) is judged by its own age.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use super::shim::{self, Phase};

/// Directories under `grants` of grants that ended before `cutoff`.
pub fn expired(grants: &Path, cutoff: DateTime<Utc>) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(grants) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|dir| dir.is_dir() && ended_before(dir, cutoff))
        .collect()
}

fn ended_before(dir: &Path, cutoff: DateTime<Utc>) -> bool {
    match shim::read_state(dir) {
        Ok(Some(state)) => state.phase == Phase::Ended && state.updated_at < cutoff,
        // Never touch a directory whose state cannot be read.
        Err(_) => false,
        Ok(None) => std::fs::metadata(dir)
            .and_then(|m| m.modified())
            .is_ok_and(|t| DateTime::<Utc>::from(t) < cutoff),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shim::State;

    fn grant_dir(root: &Path, name: &str, phase: Phase, age: chrono::Duration) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let state = State {
            phase,
            updated_at: Utc::now() - age,
            ..State::booting(1)
        };
        std::fs::write(
            dir.join(shim::STATE_FILE),
            serde_json::to_vec(&state).unwrap(),
        )
        .unwrap();
        dir
    }

    #[test]
    fn only_grants_that_ended_long_enough_ago_expire() {
        let root = tempfile::tempdir().unwrap();
        let week = chrono::Duration::days(7);
        let old_ended = grant_dir(root.path(), "old", Phase::Ended, week * 2);
        grant_dir(
            root.path(),
            "recent",
            Phase::Ended,
            chrono::Duration::hours(1),
        );
        // A VM that runs for weeks is never pruned, however old its state.
        grant_dir(root.path(), "long-running", Phase::Running, week * 2);
        let unreadable = grant_dir(root.path(), "garbled", Phase::Ended, week * 2);
        std::fs::write(unreadable.join(shim::STATE_FILE), b"{").unwrap();
        // No state yet, and new: a provision in progress.
        std::fs::create_dir_all(root.path().join("starting")).unwrap();
        std::fs::write(root.path().join("stray-file"), b"").unwrap();

        let cutoff = Utc::now() - week;
        assert_eq!(expired(root.path(), cutoff), vec![old_ended]);
        // With nothing kept, the stateless directory goes too.
        let mut all = expired(root.path(), Utc::now() + chrono::Duration::seconds(1));
        all.sort();
        assert_eq!(
            all,
            vec![
                root.path().join("old"),
                root.path().join("recent"),
                root.path().join("starting")
            ]
        );
        assert!(expired(&root.path().join("missing"), cutoff).is_empty());
    }
}
