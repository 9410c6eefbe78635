//! One cgroup per jailed VMM, sized from the VM: `cpu.max` from its CPU
//! millicores, `memory.max` from its guest RAM plus the VMM's overhead and
//! a margin, `pids.max` from its threads. Removed when the VM ends.
//!
//! cgroup v2 where the host's unified hierarchy has the cpu, memory and
//! pids controllers: a `kiln` subtree under its root (the controllers
//! enabled on the way; no systemd needed). On a host whose controllers are
//! still on cgroup v1 hierarchies, the same limits in a `kiln` subtree of
//! this process's own cgroup in each (which also works when the VMM runs
//! in a delegated cgroup).

use std::path::{Path, PathBuf};

use super::JailError;

/// cgroup v2's default CPU period, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;
/// The VMM's own memory on top of guest RAM: its measured RSS beyond guest
/// memory is ~5 MiB (metrics' `vmm_overhead_kib`); the rest is room for
/// KVM's accounted kernel memory and the page cache of the VM's files.
const VMM_OVERHEAD_MIB: u64 = 64;
/// Threads beyond one per vCPU: main/event loop, a few of std's and room
/// for devices that get threads of their own.
const EXTRA_PIDS: u64 = 16;
/// Where cgroup hierarchies are mounted on every distribution kiln targets.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// What one VM may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// CPU time per period in microseconds (`cpu.max`'s quota).
    pub cpu_quota_us: u64,
    pub memory_bytes: u64,
    pub pids: u64,
}

impl Limits {
    /// Limits for a VM of `vcpus` and `mem_mib`, held to `millicores` of CPU.
    pub fn for_vm(vcpus: u8, mem_mib: u64, millicores: u32) -> Limits {
        let mem = mem_mib + VMM_OVERHEAD_MIB + mem_mib / 16;
        Limits {
            cpu_quota_us: u64::from(millicores) * CPU_PERIOD_US / 1000,
            memory_bytes: mem << 20,
            pids: u64::from(vcpus) + EXTRA_PIDS,
        }
    }

    /// `cpu.max` as cgroup v2 writes it.
    pub fn cpu_max(&self) -> String {
        format!("{} {CPU_PERIOD_US}", self.cpu_quota_us)
    }
}

/// A VM's cgroup: one directory on v2, one per controller on v1.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    /// Creates the cgroup `name` with `limits`.
    pub fn create(name: &str, limits: &Limits) -> Result<Cgroup, JailError> {
        let root = Path::new(CGROUP_ROOT);
        if let Some(unified) = unified_with_controllers(root) {
            return create_v2(&unified, name, limits);
        }
        create_v1(root, name, limits)
    }

    /// Moves process `pid` into the cgroup.
    pub fn add(&self, pid: i32) -> Result<(), JailError> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The cgroup's directories (one on v2; cpu, memory, pids on v1).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Removes the cgroup once its processes are gone (a reaped child can
    /// take a moment to leave it).
    pub fn remove(&self) {
        for d in &self.dirs {
            for _ in 0..50 {
                match std::fs::remove_dir(d) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    _ => break,
                }
            }
        }
    }
}

/// The cgroup v2 mount (`/sys/fs/cgroup` or a hybrid host's
/// `/sys/fs/cgroup/unified`) if it offers cpu, memory and pids.
fn unified_with_controllers(root: &Path) -> Option<PathBuf> {
    [root.to_path_buf(), root.join("unified")]
        .into_iter()
        .find(|dir| {
            let have = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
            CONTROLLERS
                .iter()
                .all(|c| have.split_whitespace().any(|h| h == *c))
        })
}

fn create_v2(root: &Path, name: &str, limits: &Limits) -> Result<Cgroup, JailError> {
    let enable = "+cpu +memory +pids";
    let kiln = root.join("kiln");
    write(&root.join("cgroup.subtree_control"), enable)?;
    mkdir(&kiln)?;
    write(&kiln.join("cgroup.subtree_control"), enable)?;
    let dir = kiln.join(name);
    mkdir(&dir)?;
    let cg = Cgroup {
        dirs: vec![dir.clone()],
    };
    write(&dir.join("cpu.max"), &limits.cpu_max())?;
    write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
    write(&dir.join("pids.max"), &limits.pids.to_string())?;
    Ok(cg)
}

fn create_v1(root: &Path, name: &str, limits: &Limits) -> Result<Cgroup, JailError> {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(JailError::sys("read this process's cgroups"))?;
    let mut cg = Cgroup { dirs: Vec::new() };
    for controller in CONTROLLERS {
        let Some(own_path) = v1_path(&own, controller) else {
            return Err(JailError::NoCgroupController(controller));
        };
        let kiln = root
            .join(controller)
            .join(own_path.trim_start_matches('/'))
            .join("kiln");
        mkdir(&kiln)?;
        let dir = kiln.join(name);
        mkdir(&dir)?;
        cg.dirs.push(dir.clone());
        match controller {
            "cpu" => {
                write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(
                    &dir.join("cpu.cfs_quota_us"),
                    &limits.cpu_quota_us.to_string(),
                )?;
            }
            "memory" => write(
                &dir.join("memory.limit_in_bytes"),
                &limits.memory_bytes.to_string(),
            )?,
            _ => write(&dir.join("pids.max"), &limits.pids.to_string())?,
        }
    }
    Ok(cg)
}

/// This process's cgroup in the v1 hierarchy of `controller`, from
/// `/proc/self/cgroup` (`ID:controller[,controller]:path`).
fn v1_path<'a>(proc_cgroup: &'a str, controller: &str) -> Option<&'a str> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
        list.split(',').any(|c| c == controller).then_some(path)
    })
}

fn mkdir(dir: &Path) -> Result<(), JailError> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(JailError::Prepare {
            what: "a cgroup",
            path: dir.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn write(file: &Path, value: &str) -> Result<(), JailError> {
    std::fs::write(file, value).map_err(|source| JailError::Prepare {
        what: "a cgroup setting",
        path: file.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_vm() {
        let l = Limits::for_vm(2, 512, 1500);
        assert_eq!(l.cpu_max(), "150000 100000");
        assert_eq!(l.memory_bytes, (512 + 64 + 32) << 20);
        assert_eq!(l.pids, 18);
    }

    #[test]
    fn v1_paths_come_from_proc_self_cgroup() {
        let text = "9:name=systemd:/\n4:memory:/a/b\n2:cpu,cpuacct:/c\n0::/\n";
        assert_eq!(v1_path(text, "memory"), Some("/a/b"));
        assert_eq!(v1_path(text, "cpu"), Some("/c"));
        assert_eq!(v1_path(text, "pids"), None);
    }
}
