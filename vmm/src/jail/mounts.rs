//! The jail's filesystem: a tmpfs root holding bind mounts of exactly the
//! paths the VM uses (at their host paths), `/dev/kvm`, a `/proc` of the
//! jail's own PID namespace, and the KVM module names that host detection
//! looks for; then `pivot_root` into it.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{Access, Exposed, JailError};

const KVM_DEVICE: &str = "/dev/kvm";
/// The modules `host::detect_virtualization` checks for.
const KVM_MODULES: [&str; 3] = ["kvm_pvm", "kvm_intel", "kvm_amd"];

/// On the host, before the fork: hands what the VMM writes to its uid.
/// `in_use` says whether another jailed VM runs as a uid: a sockets
/// directory it owns is that VM's, and taking it over would lock it out.
pub(super) fn prepare_host_side(
    exposed: &[Exposed],
    uid: u32,
    in_use: &dyn Fn(u32) -> bool,
) -> Result<(), JailError> {
    for e in exposed {
        let prep = |what| {
            let path = e.path.clone();
            move |source| JailError::Prepare { what, path, source }
        };
        match &e.access {
            Access::ReadOnly => {}
            Access::ReadWrite => chown(&e.path, uid).map_err(prep("a writable drive"))?,
            Access::Output => {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&e.path)
                    .map_err(prep("an output file"))?;
                chown(&e.path, uid).map_err(prep("an output file"))?;
            }
            Access::Sockets { socket } => {
                let owner = std::fs::metadata(&e.path)
                    .map_err(prep("the sockets directory"))?
                    .uid();
                if owner != uid && in_use(owner) {
                    return Err(JailError::SocketsDirInUse(e.path.clone()));
                }
                chown(&e.path, uid).map_err(prep("the sockets directory"))?;
                // The host's listeners for guest-initiated connections.
                let prefix = format!("{socket}_");
                let entries = std::fs::read_dir(&e.path).map_err(prep("the sockets directory"))?;
                for entry in entries.flatten() {
                    if entry.file_name().as_bytes().starts_with(prefix.as_bytes()) {
                        chown(&entry.path(), uid).map_err(prep("a host listener"))?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// In the child, in its new mount namespace: builds the root at `root` and
/// pivots into it. The host's filesystem is out of reach afterwards.
pub(super) fn enter_root(root: &Path, exposed: &[Exposed], uid: u32) -> Result<(), JailError> {
    // Nothing mounted here may propagate back to the host.
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE)
        .map_err(JailError::sys("make the mount namespace private"))?;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
    )
    .map_err(JailError::sys("mount the jail's tmpfs"))?;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let prep = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| JailError::Prepare { what, path, source }
    };

    // Directories first, so files inside one mount over the same file.
    let mut ordered: Vec<&Exposed> = exposed.iter().filter(|e| !e.held_from_host()).collect();
    ordered.sort_by_key(|e| !matches!(e.access, Access::Sockets { .. }));
    for e in ordered {
        let target = inside(&e.inside);
        let is_dir = matches!(e.access, Access::Sockets { .. });
        make_mount_point(&target, is_dir).map_err(prep("a jail mount point", &target))?;
        bind(&e.path, &target, e.access == Access::ReadOnly)
            .map_err(prep("a bind mount", &e.path))?;
    }

    let kvm =
        std::fs::metadata(KVM_DEVICE).map_err(prep("the KVM device", Path::new(KVM_DEVICE)))?;
    let dev = inside(Path::new("/dev"));
    std::fs::create_dir_all(&dev).map_err(prep("the jail's /dev", &dev))?;
    let node = dev.join("kvm");
    mknod_char(&node, kvm.rdev()).map_err(prep("the jail's /dev/kvm", &node))?;
    chown(&node, uid).map_err(prep("the jail's /dev/kvm", &node))?;

    for m in KVM_MODULES {
        let host = Path::new("/sys/module").join(m);
        if host.exists() {
            let d = inside(&host);
            std::fs::create_dir_all(&d).map_err(prep("a module marker", &d))?;
        }
    }
    let proc_dir = inside(Path::new("/proc"));
    std::fs::create_dir_all(&proc_dir).map_err(prep("the jail's /proc", &proc_dir))?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    )
    .map_err(JailError::sys("mount the jail's /proc"))?;

    pivot(root)?;
    // The tmpfs itself holds only mount points and /dev/kvm: read-only.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
    )
    .map_err(JailError::sys("make the jail's root read-only"))
}

/// `pivot_root(root, root)`, then the old root (stacked beneath) detached.
fn pivot(root: &Path) -> Result<(), JailError> {
    std::env::set_current_dir(root).map_err(JailError::sys("enter the jail's root"))?;
    let dot = c".";
    // SAFETY: pivot_root with valid C strings; no memory is shared.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    if rc != 0 {
        return Err(JailError::last_os("pivot_root into the jail"));
    }
    // SAFETY: as above.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(JailError::last_os("detach the host's root"));
    }
    std::env::set_current_dir("/").map_err(JailError::sys("enter the jail's root"))
}

fn make_mount_point(target: &Path, is_dir: bool) -> std::io::Result<()> {
    if target.symlink_metadata().is_ok() {
        return Ok(());
    }
    if is_dir {
        return std::fs::create_dir_all(target);
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::File::create(target).map(drop)
}

fn bind(source: &Path, target: &Path, read_only: bool) -> std::io::Result<()> {
    let base = libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount_raw(Some(source), target, None, base)?;
    if read_only {
        // A bind mount takes MS_RDONLY only on a remount.
        mount_raw(
            None,
            target,
            None,
            base | libc::MS_REMOUNT | libc::MS_RDONLY,
        )?;
    } else {
        mount_raw(None, target, None, base | libc::MS_REMOUNT)?;
    }
    Ok(())
}

fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
) -> std::io::Result<()> {
    let source = source.map(PathBuf::from);
    mount_raw(source.as_deref(), target, fstype, flags)
}

fn mount_raw(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
) -> std::io::Result<()> {
    let source = source.map(cstr).transpose()?;
    let target = cstr(target)?;
    let fstype = fstype
        .map(|f| CString::new(f).map_err(std::io::Error::other))
        .transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: valid C strings or nulls; mount(2) copies what it keeps.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn mknod_char(path: &Path, rdev: u64) -> std::io::Result<()> {
    let c = cstr(path)?;
    // SAFETY: a valid C string; mknod(2) has no memory effects.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, rdev as libc::dev_t) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        Ok(())
    } else {
        Err(e)
    }
}

fn chown(path: &Path, uid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
}

fn cstr(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other)
}
