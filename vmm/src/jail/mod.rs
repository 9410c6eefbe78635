//! The jail every kiln-vmm enters before it builds its VM (on by default).
//!
//! Started as root, kiln-vmm forks into a new PID namespace: the child
//! becomes the VMM, in its own mount and (empty) network namespaces, with a
//! root (`pivot_root`) that holds only the files its VM uses, mounted at the
//! same paths they have on the host (so the configuration needs no
//! rewriting), read-only where the VM only reads. The child runs as an
//! unprivileged uid/gid picked per VM from a range, with `no_new_privs`,
//! no other file descriptors, an empty environment and rlimits. The parent
//! stays on the host side as a small supervisor: it forwards stop signals,
//! reports the child's exit status as its own, and releases the uid.
//!
//! The VM's sockets directory (the parent of the vsock socket) is handed to
//! the jail's uid: the VMM creates its socket there and reaches the host's
//! listeners beside it, while root on the host still reaches everything.

pub mod cgroup;
pub mod held;
mod mounts;
mod supervisor;
mod uid;

use std::path::{Path, PathBuf};

use crate::config::{SerialOutput, VmConfig};

pub use supervisor::Role;
pub use uid::{UidLease, UidRange, DEFAULT_UID_RANGE, UID_LOCK_DIR};

/// Why a VMM could not be jailed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("the jail needs root (run as root, or pass --no-jail)")]
    NotRoot,
    #[error("no free uid in the jail range {0}")]
    NoFreeUid(UidRange),
    #[error("invalid jail uid range {0:?} (FIRST-LAST, unprivileged, at most 2^31)")]
    UidRange(String),
    #[error("cannot lock a jail uid in {path}")]
    UidLock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot prepare {what} {path}")]
    Prepare {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is the sockets directory of another jailed VM: give each VM a directory of its own for its vsock socket")]
    SocketsDirInUse(PathBuf),
    #[error("no cgroup hierarchy with the {0} controller")]
    NoCgroupController(&'static str),
    #[error("cannot {what}")]
    Sys {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tap(#[from] crate::devices::virtio::net::TapError),
}

impl JailError {
    fn sys(what: &'static str) -> impl FnOnce(std::io::Error) -> JailError {
        move |source| JailError::Sys { what, source }
    }
    fn last_os(what: &'static str) -> JailError {
        JailError::Sys {
            what,
            source: std::io::Error::last_os_error(),
        }
    }
}

/// How to jail one VMM.
#[derive(Clone, Debug)]
pub struct JailConfig {
    /// Where the jail's root is mounted (a fresh empty directory is made
    /// there; a tmpfs on it holds the mount points).
    pub root: PathBuf,
    pub uids: UidRange,
    /// Where the uid lock files live (one per uid in use on this host).
    pub lock_dir: PathBuf,
    /// What the VM's cgroup allows.
    pub limits: cgroup::Limits,
}

/// A host path the jailed VMM uses, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Exposed {
    pub path: PathBuf,
    /// Where the jail shows it: the same path, but for files reached
    /// through another process's `/proc/PID/fd` (an unlinked scratch
    /// disk), which the jail's own /proc does not have.
    pub inside: PathBuf,
    pub access: Access,
}

impl Exposed {
    /// A file reached through another process's `/proc/PID/fd`: the jail
    /// holds it open (see [`held`]) instead of mounting it.
    pub(crate) fn held_from_host(&self) -> bool {
        self.path.starts_with("/proc") && !matches!(self.access, Access::Sockets { .. })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// A file the VMM only reads.
    ReadOnly,
    /// A file the VMM writes (a read-write drive, a log): owned by the jail uid.
    ReadWrite,
    /// A file the VMM creates (serial log, metrics): made, empty, if missing.
    Output,
    /// The sockets directory: owned by the jail uid, with the host's
    /// listeners for `socket` (`<socket>_<port>`) in it.
    Sockets { socket: String },
}

/// What `config` makes the VMM touch, with absolute paths; `metrics` is
/// where it writes its metrics. Paths that do not exist are left out: the
/// VMM then reports them missing itself, as it does unjailed.
pub(crate) fn exposed_paths(config: &VmConfig, metrics: Option<&Path>) -> Vec<Exposed> {
    let mut out = Vec::new();
    let sockets = config
        .vsock
        .as_ref()
        .and_then(|v| Some((v.uds_path.parent()?, v.uds_path.file_name()?)))
        .and_then(|(dir, name)| {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            let real = dir.canonicalize().ok()?;
            Some((real, dir.to_path_buf(), name.to_string_lossy().into_owned()))
        });
    if let Some((dir, given, socket)) = &sockets {
        out.push(Exposed {
            path: dir.clone(),
            inside: given.clone(),
            access: Access::Sockets {
                socket: socket.clone(),
            },
        });
    }
    let mut file = |path: &Path, access: Access| {
        if path.starts_with("/proc") && path.exists() {
            let n = out.iter().filter(|e| e.path.starts_with("/proc")).count();
            let inside = PathBuf::from(format!("{PROC_FILES_DIR}/{n}"));
            out.push(Exposed {
                path: path.to_path_buf(),
                inside,
                access,
            });
        } else if let Ok(p) = path.canonicalize() {
            // At the path the VMM opens; a symlink on the way is the host's.
            out.push(Exposed {
                inside: path.to_path_buf(),
                path: p,
                access,
            });
        }
    };
    file(&config.kernel, Access::ReadOnly);
    if let Some(i) = &config.initrd {
        file(i, Access::ReadOnly);
    }
    for d in &config.drives {
        let access = if d.read_only {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        file(&d.path, access);
    }
    let outputs = [
        match &config.serial {
            SerialOutput::File(p) => Some(p.as_path()),
            _ => None,
        },
        metrics,
    ];
    for p in outputs.into_iter().flatten() {
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let (Ok(dir), Some(name)) = (dir.canonicalize(), p.file_name()) else {
            continue;
        };
        // In the sockets directory the VMM creates it itself, as unjailed.
        if sockets.as_ref().is_some_and(|(s, _, _)| *s == dir) {
            continue;
        }
        out.push(Exposed {
            path: dir.join(name),
            inside: p.to_path_buf(),
            access: Access::Output,
        });
    }
    out
}

/// Where files reached through `/proc/PID/fd` appear in the jail.
const PROC_FILES_DIR: &str = "/run/kiln-fd";

/// Points the drives reached through `/proc/PID/fd` at their place in the jail.
fn rewrite_drives(config: &mut VmConfig, exposed: &[Exposed]) {
    for d in &mut config.drives {
        if let Some(e) = exposed.iter().find(|e| e.path == d.path) {
            d.path = e.inside.clone();
        }
    }
}

/// `path` against the working directory, when relative (and the working
/// directory is known).
pub fn absolute(path: &Path) -> PathBuf {
    match std::env::current_dir() {
        Ok(cwd) if path.is_relative() => cwd.join(path),
        _ => path.to_path_buf(),
    }
}

/// Makes every path the jailed VMM uses absolute, so that the same
/// configuration works inside the jail, where the working directory is `/`.
pub fn absolute_paths(config: &mut VmConfig, metrics: &mut Option<PathBuf>) {
    let abs = |p: &mut PathBuf| *p = absolute(p);
    abs(&mut config.kernel);
    if let Some(i) = config.initrd.as_mut() {
        abs(i);
    }
    for d in &mut config.drives {
        abs(&mut d.path);
    }
    if let Some(v) = config.vsock.as_mut() {
        abs(&mut v.uds_path);
    }
    if let SerialOutput::File(p) = &mut config.serial {
        abs(p);
    }
    if let Some(m) = metrics.as_mut() {
        abs(m);
    }
}

/// Jails this process: returns [`Role::Vmm`] in the jailed child, which
/// goes on to build the VM, and [`Role::Supervisor`] with the exit status
/// in the parent once the child has ended. Call it while the process has a
/// single thread, with the stop signals blocked.
///
/// `also_read` are further files the VM only reads (a restore's memory
/// file); with `writes_snapshots` the VMM may write a file as large as
/// guest memory (a snapshot, into its sockets directory).
pub fn enter(
    jail: &JailConfig,
    config: &mut VmConfig,
    metrics: Option<&Path>,
    also_read: &[PathBuf],
    writes_snapshots: bool,
) -> Result<Role, JailError> {
    // SAFETY: geteuid has no side effects.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::NotRoot);
    }
    let lease = UidLease::acquire(&jail.uids, &jail.lock_dir)?;
    // Named by the uid: unique while the lease is held.
    let cgroup = cgroup::Cgroup::create(&format!("vm-{}", lease.uid()), &jail.limits)?;
    let mut exposed = exposed_paths(config, metrics);
    for path in also_read {
        let real = path.canonicalize().map_err(|source| JailError::Prepare {
            what: "a file the VM reads",
            path: path.clone(),
            source,
        })?;
        exposed.push(Exposed {
            path: real,
            inside: path.clone(),
            access: Access::ReadOnly,
        });
    }
    let mut rlimit_fsize = file_size_limit(config);
    if writes_snapshots {
        rlimit_fsize = rlimit_fsize.max(config.mem_mib << 20);
    }
    mounts::prepare_host_side(&exposed, lease.uid(), &|owner| {
        uid::in_use(&jail.uids, &jail.lock_dir, owner)
    })?;
    std::fs::create_dir_all(&jail.root).map_err(|source| JailError::Prepare {
        what: "the jail root",
        path: jail.root.clone(),
        source,
    })?;
    let plan = supervisor::ChildPlan {
        root: jail.root.clone(),
        exposed,
        uid: lease.uid(),
        rlimit_fsize,
        cgroup,
        tap: config.net.as_ref().map(|n| n.tap.clone()),
    };
    let role = supervisor::fork_jailed(&plan, lease);
    match &role {
        // Only a mount point in the child's namespace: gone with it.
        Ok(Role::Supervisor(_)) | Err(_) => {
            let _ = std::fs::remove_dir(&jail.root);
            plan.cgroup.remove();
        }
        Ok(Role::Vmm) => rewrite_drives(config, &plan.exposed),
    }
    role
}

/// Open files the VMM may hold: its devices, vCPUs, event fds and the
/// guest's vsock connections.
const RLIMIT_NOFILE: u64 = 4096;
/// Smallest file-size limit: logs and metrics.
const MIN_FSIZE: u64 = 1 << 30;

/// The largest file the VMM may write: its biggest writable drive, or
/// [`MIN_FSIZE`] for its logs.
fn file_size_limit(config: &VmConfig) -> u64 {
    config
        .drives
        .iter()
        .filter(|d| !d.read_only)
        .filter_map(|d| std::fs::metadata(&d.path).ok())
        .map(|m| m.len())
        .fold(MIN_FSIZE, u64::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DriveConfig, VsockConfig};

    #[test]
    fn exposed_paths_cover_the_vm_files_and_skip_what_the_sockets_dir_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().canonicalize().unwrap();
        let vmdir = dir.join("vm");
        std::fs::create_dir(&vmdir).unwrap();
        for f in ["vmlinux", "initrd", "root.img", "scratch.img"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        let mut c = VmConfig::new(dir.join("vmlinux"));
        c.initrd = Some(dir.join("initrd"));
        c.drives = vec![
            DriveConfig {
                path: dir.join("root.img"),
                read_only: true,
                id: None,
            },
            DriveConfig {
                path: dir.join("scratch.img"),
                read_only: false,
                id: None,
            },
        ];
        c.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: vmdir.join("vsock.sock"),
        });
        c.serial = SerialOutput::File(vmdir.join("serial.log"));
        let metrics = dir.join("metrics.json");
        let got = exposed_paths(&c, Some(&metrics));
        let got_inside: Vec<_> = got.iter().filter(|e| e.inside != e.path).collect();
        assert!(got_inside.is_empty(), "{got_inside:?}");
        let want = [
            (vmdir.clone(), "sockets"),
            (dir.join("vmlinux"), "ro"),
            (dir.join("initrd"), "ro"),
            (dir.join("root.img"), "ro"),
            (dir.join("scratch.img"), "rw"),
            (metrics, "out"),
        ];
        let got: Vec<(PathBuf, &str)> = got
            .into_iter()
            .map(|e| {
                let kind = match e.access {
                    Access::ReadOnly => "ro",
                    Access::ReadWrite => "rw",
                    Access::Output => "out",
                    Access::Sockets { .. } => "sockets",
                };
                (e.path, kind)
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_file_reached_through_a_symlink_shows_at_the_path_the_vmm_opens() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().canonicalize().unwrap();
        std::fs::write(dir.join("vmlinux-6.12"), b"k").unwrap();
        std::os::unix::fs::symlink(dir.join("vmlinux-6.12"), dir.join("vmlinux")).unwrap();
        let exposed = exposed_paths(&VmConfig::new(dir.join("vmlinux")), None);
        assert_eq!(exposed[0].path, dir.join("vmlinux-6.12"));
        assert_eq!(exposed[0].inside, dir.join("vmlinux"));
    }

    #[test]
    fn a_drive_held_open_by_another_process_gets_a_place_of_its_own() {
        let tmp = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(tmp.path().join("disk")).unwrap();
        use std::os::fd::AsRawFd;
        let proc_path = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
        let mut c = VmConfig::new(tmp.path().join("missing-vmlinux"));
        c.drives.push(DriveConfig {
            path: proc_path.clone(),
            read_only: false,
            id: None,
        });
        let exposed = exposed_paths(&c, None);
        assert_eq!(
            exposed.len(),
            1,
            "a missing kernel is left to the VMM to report"
        );
        assert_eq!(exposed[0].path, proc_path);
        assert_eq!(exposed[0].inside, PathBuf::from("/run/kiln-fd/0"));
        rewrite_drives(&mut c, &exposed);
        assert_eq!(c.drives[0].path, PathBuf::from("/run/kiln-fd/0"));
    }

    #[test]
    fn the_file_size_limit_fits_the_biggest_writable_drive() {
        let tmp = tempfile::tempdir().unwrap();
        let big = tmp.path().join("big.img");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(3 << 30).unwrap();
        let mut c = VmConfig::new(tmp.path().join("vmlinux"));
        assert_eq!(file_size_limit(&c), MIN_FSIZE);
        c.drives.push(DriveConfig {
            path: big,
            read_only: false,
            id: None,
        });
        assert_eq!(file_size_limit(&c), 3 << 30);
    }
}
