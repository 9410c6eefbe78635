//! PID 1 of the virtio-blk boot test: a static program that reads both
//! drives, tries to write the read-only one, writes and syncs the writable
//! one, reports each step and what sysfs says on the serial console, then
//! reboots. Built with `crt-static`; see `kiln_tests::static_guest_binary`.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

/// Where the guest writes on /dev/vdb, and how much (tests/tests/vmm_blk.rs
/// checks the same bytes in the host file).
const WRITE_OFFSET: u64 = 8192;
const WRITE_LEN: usize = 4096;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn mount(source: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| CString::new(s).unwrap_or_default();
    let (s, t, f) = (c(source), c(target), c(fstype));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        say(&format!(
            "mount {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
}

/// FNV-1a, 64 bits: the host computes the same over its file.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn read_all(dev: &str) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::new();
    std::fs::File::open(dev)?.read_to_end(&mut data)?;
    Ok(data)
}

fn report_read(name: &str) {
    match read_all(&format!("/dev/{name}")) {
        Ok(data) => say(&format!(
            "{name} bytes={} fnv={:016x}",
            data.len(),
            fnv1a(&data)
        )),
        Err(e) => say(&format!("{name} read-error {e}")),
    }
}

fn sysfs(name: &str, attr: &str) {
    match std::fs::read_to_string(format!("/sys/block/{name}/{attr}")) {
        Ok(v) => say(&format!("{name} {attr}={}", v.trim())),
        Err(e) => say(&format!("{name} {attr}-error {e}")),
    }
}

fn errno(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EROFS) => "EROFS".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::EIO) => "EIO".into(),
        _ => e.to_string(),
    }
}

fn try_write(dev: &str, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(dev)?;
    f.write_all_at(data, offset)?;
    f.sync_all()
}

fn reboot() -> ! {
    // SAFETY: reboot(2) as PID 1; with reboot=k the VMM sees the reset.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // Only reached if reboot failed; PID 1 must not exit.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

fn main() {
    mount("proc", "/proc", "proc");
    mount("devtmpfs", "/dev", "devtmpfs");
    mount("sysfs", "/sys", "sysfs");
    say("KILN_READY");
    report_read("vda");
    report_read("vdb");
    for name in ["vda", "vdb"] {
        sysfs(name, "ro");
        sysfs(name, "serial");
    }
    match try_write("/dev/vda", 0, &[0u8; 512]) {
        Ok(()) => say("vda write ok"),
        Err(e) => say(&format!("vda write refused {}", errno(&e))),
    }
    let block: Vec<u8> = (0..WRITE_LEN).map(|i| (i * 7 % 256) as u8).collect();
    match try_write("/dev/vdb", WRITE_OFFSET, &block) {
        Ok(()) => say(&format!("vdb write ok fnv={:016x}", fnv1a(&block))),
        Err(e) => say(&format!("vdb write error {e}")),
    }
    say("KILN_TEST_DONE");
    reboot();
}
