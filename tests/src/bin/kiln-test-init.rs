//! PID 1 of the VMM's boot test: a static program that exercises the
//! guest side of every device, reports each step on the serial console,
//! then reboots. Built with `crt-static`; see `kiln_tests::guest_init`.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};

use kiln_protocol::console::{KERNEL_PANIC_PREFIX, READY_MARKER};

const HOST_CID: u32 = 2;
const GUEST_CONNECT_PORT: u32 = 1234;
const GUEST_LISTEN_PORT: u32 = 5000;

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

fn nproc() -> usize {
    // SAFETY: a zeroed cpu_set_t is valid and sized for the call.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return 0;
        }
        libc::CPU_COUNT(&set) as usize
    }
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; zero is a valid starting value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn vsock_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn connect_host(port: u32) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let sock = vsock_socket()?;
    let addr = vsock_addr(HOST_CID, port);
    // SAFETY: addr is a valid sockaddr_vm of the given size.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(std::fs::File::from(sock))
}

fn listen_accept_one(port: u32) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let sock = vsock_socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: addr is a valid sockaddr_vm; fds are ours.
    unsafe {
        if libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        ) != 0
            || libc::listen(sock.as_raw_fd(), 1) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    say(&format!("vsock-listening {port}"));
    // SAFETY: accept on our listening socket, peer address not wanted.
    let fd = unsafe { libc::accept(sock.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn read_line(stream: &mut std::fs::File) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while stream.read(&mut b)? == 1 {
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn guest_connect() -> std::io::Result<String> {
    let mut s = connect_host(GUEST_CONNECT_PORT)?;
    s.write_all(b"hello from guest\n")?;
    let reply = read_line(&mut s)?;
    s.write_all(format!("{reply}\n").as_bytes())?;
    Ok(reply)
}

fn host_connect() -> std::io::Result<String> {
    let mut s = listen_accept_one(GUEST_LISTEN_PORT)?;
    let line = read_line(&mut s)?;
    s.write_all(format!("echo:{line}\n").as_bytes())?;
    Ok(line)
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

/// The first init argument (after `--` on the kernel command line), read
/// from /proc/cmdline so it does not depend on how argv reached us.
fn mode() -> String {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut words = cmdline.split_whitespace().skip_while(|w| *w != "--");
    words.nth(1).unwrap_or_default().to_string()
}

/// Counts on the console, with what a snapshot must keep beside the count
/// (a file in tmpfs) and whether the host answers on vsock (a fresh
/// connection each time, so it works again after a restore's reset).
fn count_forever() -> ! {
    mount("tmpfs", "/tmp", "tmpfs");
    if let Err(e) = std::fs::write("/tmp/kept", "before-snapshot") {
        say(&format!("tmpfs write error {e}"));
    }
    say(READY_MARKER);
    let mut count = 0u64;
    loop {
        count += 1;
        let kept = std::fs::read_to_string("/tmp/kept").unwrap_or_else(|_| "missing".into());
        let vsock = connect_host(GUEST_CONNECT_PORT)
            .and_then(|mut s| {
                s.write_all(format!("count={count}\n").as_bytes())?;
                read_line(&mut s)
            })
            .unwrap_or_else(|_| "down".into());
        say(&format!("count={count} file={kept} vsock={vsock}"));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn main() {
    mount("proc", "/proc", "proc");
    let mode = mode();
    // `-- bench`: the boot benchmark only wants the marker, then the VM gone.
    if mode == "bench" {
        say(READY_MARKER);
        reboot();
    }
    mount("devtmpfs", "/dev", "devtmpfs");
    // `-- snap`: the snapshot test's workload, counting until stopped.
    if mode == "snap" {
        count_forever();
    }
    say(READY_MARKER);
    say(&format!("nproc={}", nproc()));

    let mut rnd = [0u8; 16];
    match std::fs::File::open("/dev/hwrng").and_then(|mut f| f.read_exact(&mut rnd)) {
        Ok(()) => say(&format!(
            "hwrng={}",
            rnd.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )),
        Err(e) => say(&format!("hwrng-error {e}")),
    }

    match guest_connect() {
        Ok(reply) => say(&format!("vsock-guest-connect ok reply={reply}")),
        Err(e) => say(&format!("vsock-guest-connect error {e}")),
    }
    match host_connect() {
        Ok(line) => say(&format!("vsock-host-connect ok line={line}")),
        Err(e) => say(&format!("vsock-host-connect error {e}")),
    }

    // A program can print the kernel's panic text; that must not make the
    // VMM report a panic (only the kernel's port write does).
    say(&format!(
        "{KERNEL_PANIC_PREFIX}: printed by a guest program"
    ));
    say("KILN_TEST_DONE");
    reboot();
}
