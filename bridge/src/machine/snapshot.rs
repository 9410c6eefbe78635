//! Snapshots of a ready VM through kiln-vmm's control socket, and the
//! files a later VM restores from.
//!
//! A snapshot is taken while the agent waits for its `start`, before
//! anything of a workload or a grant is in the guest, so that every VM
//! restored from it starts as a fresh boot would, and the agent then takes
//! the identity its `start` carries (entropy, clock, hostname).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A snapshot's two files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotFiles {
    pub state: PathBuf,
    pub mem: PathBuf,
}

impl SnapshotFiles {
    /// The files of the snapshot kept in `dir`.
    pub fn in_dir(dir: &Path) -> SnapshotFiles {
        SnapshotFiles {
            state: dir.join("state"),
            mem: dir.join("mem"),
        }
    }

    /// Whether both files are there.
    pub fn exist(&self) -> bool {
        self.state.is_file() && self.mem.is_file()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the VM has no control socket")]
    NoControlSocket,
    #[error("cannot talk to kiln-vmm's control socket")]
    Socket(#[source] std::io::Error),
    #[error("kiln-vmm refused to {op}: {reason}")]
    Refused { op: &'static str, reason: String },
    #[error("cannot store the snapshot in {}", path.display())]
    Store {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How long one request may take; a snapshot writes guest memory.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// One client connection to a VMM's control socket.
pub(super) struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    pub fn connect(path: &Path) -> Result<ControlClient, SnapshotError> {
        let stream = UnixStream::connect(path).map_err(SnapshotError::Socket)?;
        stream
            .set_read_timeout(Some(REQUEST_TIMEOUT))
            .map_err(SnapshotError::Socket)?;
        let writer = stream.try_clone().map_err(SnapshotError::Socket)?;
        Ok(ControlClient {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends `request` (`op` names it in errors) and checks the answer.
    pub fn call(
        &mut self,
        op: &'static str,
        request: &serde_json::Value,
    ) -> Result<(), SnapshotError> {
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(SnapshotError::Socket)?;
        let mut answer = String::new();
        self.reader
            .read_line(&mut answer)
            .map_err(SnapshotError::Socket)?;
        let value: serde_json::Value =
            serde_json::from_str(&answer).map_err(|e| SnapshotError::Refused {
                op,
                reason: format!("unreadable answer: {e}"),
            })?;
        if value.get("ok").and_then(|v| v.as_bool()) == Some(true) {
            return Ok(());
        }
        let reason = value
            .get("error")
            .and_then(|v| v.as_str())
            .unwrap_or("no reason given")
            .to_string();
        Err(SnapshotError::Refused { op, reason })
    }
}

/// Pauses the VM, has it write `files`, and resumes it (also when the
/// snapshot failed).
pub(super) fn take(control: &Path, files: &SnapshotFiles) -> Result<(), SnapshotError> {
    let mut client = ControlClient::connect(control)?;
    client.call("pause", &serde_json::json!({"op": "pause"}))?;
    let saved = client.call(
        "snapshot",
        &serde_json::json!({"op": "snapshot", "state": files.state, "mem": files.mem}),
    );
    let resumed = client.call("resume", &serde_json::json!({"op": "resume"}));
    saved.and(resumed)
}

/// Moves a snapshot written in a VM's directory (by the jail's uid) to
/// `dest`, a directory that must not exist yet, as this process's own
/// files. Another process that stored the same snapshot first wins: then
/// this one's files are dropped and `dest` is left as it is.
pub(super) fn store(written: &SnapshotFiles, dest: &Path) -> Result<SnapshotFiles, SnapshotError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SnapshotError::Store { path, source }
    };
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(err(parent))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(err(&tmp))?;
    let moved = (|| {
        let into = SnapshotFiles::in_dir(&tmp);
        // SAFETY: getuid/getgid have no side effects.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        for (from, to) in [(&written.state, &into.state), (&written.mem, &into.mem)] {
            std::fs::rename(from, to).map_err(err(from))?;
            std::os::unix::fs::chown(to, Some(uid), Some(gid)).map_err(err(to))?;
            let mut perm = std::fs::metadata(to).map_err(err(to))?.permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o600);
            std::fs::set_permissions(to, perm).map_err(err(to))?;
        }
        match std::fs::rename(&tmp, dest) {
            Ok(()) => Ok(()),
            // Someone else's is there already (ENOTEMPTY/EEXIST).
            Err(_) if SnapshotFiles::in_dir(dest).exist() => {
                let _ = std::fs::remove_dir_all(&tmp);
                Ok(())
            }
            Err(e) => Err(err(dest)(e)),
        }
    })();
    if moved.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    moved.map(|()| SnapshotFiles::in_dir(dest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(dir: &Path) -> SnapshotFiles {
        let files = SnapshotFiles {
            state: dir.join("snap.state"),
            mem: dir.join("snap.mem"),
        };
        std::fs::write(&files.state, b"state").unwrap();
        std::fs::write(&files.mem, b"mem").unwrap();
        files
    }

    #[test]
    fn a_stored_snapshot_moves_into_its_directory_and_a_second_one_loses() {
        let vm = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let dest = cache.path().join("snapshots/abc");
        let stored = store(&written(vm.path()), &dest).unwrap();
        assert_eq!(stored, SnapshotFiles::in_dir(&dest));
        assert!(stored.exist());
        assert_eq!(std::fs::read(&stored.state).unwrap(), b"state");
        assert!(!vm.path().join("snap.state").exists());

        // A second run stored the same snapshot meanwhile: the first stays.
        std::fs::write(vm.path().join("other"), b"").unwrap();
        let again = written(vm.path());
        std::fs::write(&again.state, b"second").unwrap();
        store(&again, &dest).unwrap();
        assert_eq!(std::fs::read(&stored.state).unwrap(), b"state");
        let left: Vec<_> = std::fs::read_dir(cache.path().join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["abc"]);
    }

    #[test]
    fn a_refused_request_names_the_operation_and_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut lines = BufReader::new(s.try_clone().unwrap()).lines();
            let mut w = s;
            let first = lines.next().unwrap().unwrap();
            assert_eq!(first, r#"{"op":"pause"}"#);
            w.write_all(b"{\"ok\":true}\n").unwrap();
            let _ = lines.next();
            w.write_all(b"{\"ok\":false,\"error\":\"disk full\"}\n")
                .unwrap();
            let third = lines.next().unwrap().unwrap();
            assert_eq!(third, r#"{"op":"resume"}"#);
            w.write_all(b"{\"ok\":true}\n").unwrap();
        });
        let files = SnapshotFiles::in_dir(dir.path());
        let e = take(&path, &files).unwrap_err();
        assert_eq!(e.to_string(), "kiln-vmm refused to snapshot: disk full");
        server.join().unwrap();
    }
}
