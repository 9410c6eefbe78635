//! What a jailed kiln-vmm looks like from the host, read from /proc: its
//! uid, namespaces, root and cgroup limits.

use std::path::{Path, PathBuf};

/// The jailed VMM under the kiln-vmm supervisor `supervisor` (its only
/// child), once it is there.
pub fn jailed_child(supervisor: u32) -> Option<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

/// The first kiln-vmm among the descendants of `pid` (kiln run, a shim).
pub fn vmm_under(pid: u32) -> Option<u32> {
    let mut queue = vec![pid];
    while let Some(p) = queue.pop() {
        let tasks = std::fs::read_dir(format!("/proc/{p}/task")).ok()?;
        for t in tasks.flatten() {
            let path = t.path().join("children");
            let text = std::fs::read_to_string(path).unwrap_or_default();
            for c in text
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
            {
                let comm = std::fs::read_to_string(format!("/proc/{c}/comm")).unwrap_or_default();
                if comm.trim() == "kiln-vmm" {
                    return Some(c);
                }
                queue.push(c);
            }
        }
    }
    None
}

/// The real uid of `pid`.
pub fn uid(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap_or(0)
}

/// `/proc/PID/ns/NAME` (e.g. `mnt:[4026531832]`).
pub fn namespace(pid: &str, name: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{name}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Every file (not directory) under `/proc/PID/root`, as paths inside it,
/// leaving out `/proc`.
pub fn root_files(pid: u32) -> Vec<PathBuf> {
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut files = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let inside = Path::new("/").join(path.strip_prefix(&root).unwrap_or(&path));
            if inside == Path::new("/proc") {
                continue;
            }
            match e.file_type() {
                Ok(t) if t.is_dir() => dirs.push(path),
                _ => files.push(inside),
            }
        }
    }
    files.sort();
    files
}

/// The VMM's cgroup limits: (cpu quota and period in µs, memory limit in bytes).
pub fn cgroup_limits(pid: u32) -> (String, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let read = |p: PathBuf| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let in_hierarchy = |controller: &str| {
        text.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
            list.split(',').any(|c| c == controller).then(|| {
                PathBuf::from("/sys/fs/cgroup")
                    .join(controller)
                    .join(&path[1..])
            })
        })
    };
    match (in_hierarchy("cpu"), in_hierarchy("memory")) {
        (Some(cpu), Some(mem)) => (
            format!(
                "{} {}",
                read(cpu.join("cpu.cfs_quota_us")),
                read(cpu.join("cpu.cfs_period_us"))
            ),
            read(mem.join("memory.limit_in_bytes")).parse().unwrap_or(0),
        ),
        _ => {
            // cgroup v2: one line, `0::/path`.
            let path = text
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .unwrap_or("/");
            let dir = PathBuf::from("/sys/fs/cgroup").join(&path[1..]);
            (
                read(dir.join("cpu.max")),
                read(dir.join("memory.max")).parse().unwrap_or(0),
            )
        }
    }
}

/// The cgroup's CPU throttling count (`nr_throttled` in its cpu.stat).
pub fn nr_throttled(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let dir = text
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
            match list {
                "" => Some(PathBuf::from("/sys/fs/cgroup").join(&path[1..])),
                l if l.split(',').any(|c| c == "cpu") => {
                    Some(PathBuf::from("/sys/fs/cgroup/cpu").join(&path[1..]))
                }
                _ => None,
            }
        })
        .unwrap_or_default();
    let stat = std::fs::read_to_string(dir.join("cpu.stat")).unwrap_or_default();
    stat.lines()
        .find_map(|l| l.strip_prefix("nr_throttled "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Asserts what every jailed VMM shows: an unprivileged uid, mount, PID
/// and network namespaces of its own, and a root holding only `files`
/// (besides `/dev/kvm` and the KVM module markers).
pub fn assert_jailed(vmm: u32, files: &[PathBuf]) {
    let uid = uid(vmm);
    assert!(uid >= 900000, "the VMM runs as uid {uid}");
    for ns in ["mnt", "pid", "net"] {
        assert_ne!(
            namespace(&vmm.to_string(), ns),
            namespace("self", ns),
            "{ns} namespace shared with the host"
        );
    }
    let seen = root_files(vmm);
    for f in &seen {
        let allowed = f == Path::new("/dev/kvm")
            || f.starts_with("/sys/module")
            || files.iter().any(|want| f == want || f.starts_with(want));
        assert!(allowed, "{} visible in the jail: {seen:?}", f.display());
    }
    assert!(seen.iter().any(|f| f == Path::new("/dev/kvm")), "{seen:?}");
}
