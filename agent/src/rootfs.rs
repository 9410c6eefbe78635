//! The block-device root. With `kiln.root=vda` on the kernel command line
//! the initramfs holds only the agent and `/kiln`; the image is an erofs
//! filesystem on `/dev/vda`. The agent mounts it read-only, puts an
//! overlay on it whose writable half is a tmpfs (or, with
//! `kiln.scratch=vdb`, an ext4 scratch disk), moves its pseudo-filesystems
//! into the overlay, frees the initramfs and switches root into it the way
//! `switch_root` does (move the new root onto `/`, then chroot).

use crate::system::{self, cstr};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

pub const ROOT_PARAM: &str = "kiln.root=";
pub const SCRATCH_PARAM: &str = "kiln.scratch=";

/// Mount points in the initramfs; hidden (not removed) once root moves.
const LOWER: &str = "/.kiln/lower";
const RW: &str = "/.kiln/rw";
const NEW_ROOT: &str = "/.kiln/root";
/// Carried from the initramfs into the new root.
const CONFIG: &str = "kiln/config.json";
/// Mounts the agent made that move with the root (children go along).
const MOVED: [&str; 4] = ["/dev", "/proc", "/sys", "/run"];
/// Drivers probe before init runs, so this is only a safety margin.
const DEVICE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("device {0} did not appear")]
    NoDevice(String),
    #[error("device name {0:?} is not a plain name like vda")]
    BadName(String),
    #[error("cannot mount {what} on {target}")]
    Mount {
        what: String,
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot {0}")]
    Step(&'static str, #[source] io::Error),
}

/// What the kernel command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The root device's name under /dev (`vda`).
    pub root: String,
    /// A scratch disk for the overlay's writable half.
    pub scratch: Option<String>,
}

/// The block root the command line names, if any.
pub fn requested(cmdline: &str) -> Option<Request> {
    let find = |p: &str| {
        cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix(p))
            .map(str::to_string)
    };
    Some(Request {
        root: find(ROOT_PARAM)?,
        scratch: find(SCRATCH_PARAM),
    })
}

fn device(name: &str, wait: Duration) -> Result<String, RootError> {
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !plain {
        return Err(RootError::BadName(name.to_string()));
    }
    let path = format!("/dev/{name}");
    let since = Instant::now();
    while !Path::new(&path).exists() {
        if since.elapsed() >= wait {
            return Err(RootError::NoDevice(path));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(path)
}

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), RootError> {
    system::try_mount(source, target, fstype, flags, data).map_err(|e| RootError::Mount {
        what: format!(
            "{source} ({})",
            if fstype.is_empty() { "move" } else { fstype }
        ),
        target: target.to_string(),
        source: e,
    })
}

/// Mounts the root image and its overlay, then makes the overlay `/`.
pub fn switch(req: &Request) -> Result<(), RootError> {
    let root = device(&req.root, DEVICE_WAIT)?;
    mount(&root, LOWER, "erofs", libc::MS_RDONLY, "")?;
    match &req.scratch {
        Some(name) => mount(&device(name, DEVICE_WAIT)?, RW, "ext4", 0, "")?,
        None => mount("tmpfs", RW, "tmpfs", 0, "mode=0755")?,
    }
    for d in ["upper", "work"] {
        std::fs::create_dir_all(format!("{RW}/{d}"))
            .map_err(|e| RootError::Step("make the overlay's directories", e))?;
    }
    mount(
        "overlay",
        NEW_ROOT,
        "overlay",
        0,
        &format!("lowerdir={LOWER},upperdir={RW}/upper,workdir={RW}/work"),
    )?;
    let config = format!("{NEW_ROOT}/{CONFIG}");
    if let Some(dir) = Path::new(&config).parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| RootError::Step("make /kiln in the new root", e))?;
    }
    std::fs::copy(format!("/{CONFIG}"), &config)
        .map_err(|e| RootError::Step("copy the run config into the new root", e))?;
    // /tmp lives in the overlay (on the scratch disk when there is one),
    // not in a second tmpfs.
    // SAFETY: a NUL-terminated path.
    unsafe { libc::umount2(cstr("/tmp").as_ptr(), libc::MNT_DETACH) };
    let tmp = format!("{NEW_ROOT}/tmp");
    if !Path::new(&tmp).is_dir() {
        std::fs::create_dir_all(&tmp)
            .and_then(|_| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)))
            .map_err(|e| RootError::Step("make /tmp", e))?;
    }
    for m in MOVED {
        mount(m, &format!("{NEW_ROOT}{m}"), "", libc::MS_MOVE, "")?;
    }
    std::env::set_current_dir(NEW_ROOT).map_err(|e| RootError::Step("enter the new root", e))?;
    free_initramfs();
    mount(".", "/", "", libc::MS_MOVE, "")?;
    // SAFETY: NUL-terminated paths.
    if unsafe { libc::chroot(cstr(".").as_ptr()) } != 0 {
        return Err(RootError::Step("chroot into the new root", last_error()));
    }
    std::env::set_current_dir("/").map_err(|e| RootError::Step("enter the new root", e))?;
    Ok(())
}

/// Deletes the initramfs's files (RAM the guest would otherwise keep),
/// staying on its filesystem: mounts below are skipped.
fn free_initramfs() {
    let Ok(dev) = std::fs::symlink_metadata("/").map(|m| m.dev()) else {
        return;
    };
    remove_below(Path::new("/"), dev);
}

fn remove_below(dir: &Path, dev: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            remove_below(&path, dev);
            // Fails for directories holding a mount point: they stay.
            let _ = std::fs::remove_dir(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The error and its causes on one line.
pub fn describe(e: &RootError) -> String {
    let mut line = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        line.push_str(&format!(": {s}"));
        source = s.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_root_and_scratch_from_the_command_line() {
        assert_eq!(requested("console=ttyS0 quiet"), None);
        assert_eq!(
            requested("quiet kiln.root=vda"),
            Some(Request {
                root: "vda".into(),
                scratch: None
            })
        );
        assert_eq!(
            requested("kiln.scratch=vdb kiln.root=vda panic=-1"),
            Some(Request {
                root: "vda".into(),
                scratch: Some("vdb".into())
            })
        );
    }

    #[test]
    fn device_names_cannot_point_elsewhere() {
        for bad in ["", "../vda", "vda/x", "VDA"] {
            assert!(
                matches!(device(bad, Duration::ZERO), Err(RootError::BadName(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            device("kilnnosuchdisk9", Duration::ZERO),
            Err(RootError::NoDevice(_))
        ));
    }
}
