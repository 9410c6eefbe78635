//! Making a bare kernel a usable system, and ending it.

use std::ffi::CString;
use std::io::Write;

/// Writes a line to the serial console (the agent's own stderr as PID 1).
pub fn console(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "kiln-agent: {line}");
}

pub(crate) fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

/// mount(2), creating the target first. An empty `fstype` or `data` is
/// passed as NULL (as a move or a bind mount needs).
pub fn try_mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> std::io::Result<()> {
    std::fs::create_dir_all(target)?;
    let (s, t, f, d) = (cstr(source), cstr(target), cstr(fstype), cstr(data));
    let fstype_ptr = if fstype.is_empty() {
        std::ptr::null()
    } else {
        f.as_ptr()
    };
    let data_ptr = if data.is_empty() {
        std::ptr::null()
    } else {
        d.as_ptr().cast()
    };
    // SAFETY: NUL-terminated strings that outlive the call.
    if unsafe { libc::mount(s.as_ptr(), t.as_ptr(), fstype_ptr, flags, data_ptr) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// mount(2), creating the target; already-mounted is fine, any other
/// failure is said on the console and left for what needs it to find.
pub fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) {
    if let Err(e) = try_mount(source, target, fstype, flags, data) {
        if e.raw_os_error() != Some(libc::EBUSY) {
            console(&format!("mount {fstype} on {target}: {e}"));
        }
    }
}

/// The pseudo-filesystems every program expects.
pub fn mount_pseudo_filesystems() {
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", "/proc", "proc", nosuid_nodev_noexec, "");
    mount("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, "");
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "gid=5,mode=620,ptmxmode=666",
    );
    mount(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    );
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    );
    mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    );
    mount(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nosuid_nodev_noexec,
        "",
    );
    // Programs look for /dev/ptmx and the standard fd links.
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    let _ = std::os::unix::fs::symlink("/proc/self/fd", "/dev/fd");
}

pub fn set_hostname(name: &str) {
    // SAFETY: pointer and length of a live byte slice.
    unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
}

/// Brings up the loopback interface.
pub fn loopback_up() {
    // SAFETY: a datagram socket for the SIOC*IFFLAGS ioctls; ifreq is plain data.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        }
        libc::close(fd);
    }
}

/// Mixes bytes from the virtio-rng device into the kernel's pool.
pub fn seed_entropy() -> bool {
    use std::io::Read;
    let mut buf = [0u8; 64];
    let ok = std::fs::File::open("/dev/hwrng")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok();
    if ok {
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/urandom")
            .and_then(|mut f| f.write_all(&buf));
    }
    ok
}

/// Ends the VM: with `reboot=k` the VMM sees the reset and exits 0.
pub fn power_off() -> ! {
    // SAFETY: sync and reboot(2) as PID 1.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // reboot only returns on failure; PID 1 must not exit.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Whether the kernel command line has `param` as one of its words.
pub fn kernel_cmdline_has(param: &str) -> bool {
    std::fs::read_to_string("/proc/cmdline").is_ok_and(|c| c.split_whitespace().any(|w| w == param))
}

/// Milliseconds since boot on the clock /proc/uptime shows (CLOCK_BOOTTIME);
/// readable before /proc is mounted. (A process's start time in
/// /proc/self/stat is no use for PID 1: it is when the kernel created the
/// init thread, early in boot, long before it exec'd `/init`.)
pub fn boot_clock_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only to `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec.max(0) as u64) * 1000 + (ts.tv_nsec.max(0) as u64) / 1_000_000
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_boot_clock_is_uptime() {
        let uptime = || -> f64 {
            std::fs::read_to_string("/proc/uptime")
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let before = (uptime() * 1000.0) as u64;
        let clock = super::boot_clock_ms();
        let after = (uptime() * 1000.0) as u64;
        // /proc/uptime has 10 ms resolution.
        assert!(
            before <= clock + 10 && clock <= after + 10,
            "{before} {clock} {after}"
        );
    }
}
