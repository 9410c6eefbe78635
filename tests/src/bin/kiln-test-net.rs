//! PID 1 of the virtio-net boot test: a static program that brings eth0 up
//! as 10.77.0.2/24, reports its MAC, connects to the host's listener at
//! 10.77.0.1:7777, sends a pattern, reads the host's answer and pattern,
//! reports each step on the serial console, then reboots. Built with
//! `crt-static`; see `kiln_tests::static_guest_binary`.

use std::ffi::CString;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Bytes each side sends (tests/tests/vmm_net.rs sends and checks the same).
const PAYLOAD: usize = 64 * 1024;

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

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `struct ifreq` for `name` with an IPv4 address in its union.
fn ifreq(name: &str, addr: Option<[u8; 4]>) -> [u8; 40] {
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    if let Some(a) = addr {
        req[16..18].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        req[20..24].copy_from_slice(&a);
    }
    req
}

fn ioctl(sock: i32, request: libc::c_ulong, req: &mut [u8; 40], what: &str) -> bool {
    // SAFETY: every request used here reads or writes one `struct ifreq`.
    if unsafe { libc::ioctl(sock, request, req.as_mut_ptr()) } != 0 {
        say(&format!(
            "net {what} failed: {}",
            std::io::Error::last_os_error()
        ));
        return false;
    }
    true
}

/// eth0 up as 10.77.0.2/24.
fn configure() -> bool {
    // SAFETY: a plain socket call; the descriptor is closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if sock < 0 {
        say("net socket failed");
        return false;
    }
    let ok = ioctl(
        sock,
        libc::SIOCSIFADDR,
        &mut ifreq("eth0", Some([10, 77, 0, 2])),
        "address",
    ) && ioctl(
        sock,
        libc::SIOCSIFNETMASK,
        &mut ifreq("eth0", Some([255, 255, 255, 0])),
        "netmask",
    ) && {
        let mut req = ifreq("eth0", None);
        ioctl(sock, libc::SIOCGIFFLAGS, &mut req, "get flags") && {
            let flags = i16::from_ne_bytes([req[16], req[17]]) | libc::IFF_UP as i16;
            req[16..18].copy_from_slice(&flags.to_ne_bytes());
            ioctl(sock, libc::SIOCSIFFLAGS, &mut req, "up")
        }
    };
    // SAFETY: `sock` is this function's.
    unsafe { libc::close(sock) };
    ok
}

fn exchange() -> std::io::Result<()> {
    let host: SocketAddr = ([10, 77, 0, 1], 7777).into();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut stream = loop {
        match TcpStream::connect_timeout(&host, Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                say(&format!("net connect retry: {e}"));
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    };
    say("net connected");
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let ours: Vec<u8> = (0..PAYLOAD).map(|i| (i * 7 % 251) as u8).collect();
    stream.write_all(&ours)?;
    stream.shutdown(Shutdown::Write)?;
    say(&format!(
        "net sent bytes={PAYLOAD} fnv={:016x}",
        fnv1a(&ours)
    ));
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    // The host's line, then its pattern.
    let Some(nl) = answer.iter().position(|b| *b == b'\n') else {
        say("net no answer line");
        return Ok(());
    };
    say(&format!(
        "net host said {}",
        String::from_utf8_lossy(&answer[..nl])
    ));
    let theirs = &answer[nl + 1..];
    say(&format!(
        "net got bytes={} fnv={:016x}",
        theirs.len(),
        fnv1a(theirs)
    ));
    Ok(())
}

fn reboot() -> ! {
    // SAFETY: reboot(2) as PID 1; with reboot=k the VMM sees the reset.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // Only reached if reboot failed; PID 1 must not exit.
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn main() {
    mount("proc", "/proc", "proc");
    mount("devtmpfs", "/dev", "devtmpfs");
    mount("sysfs", "/sys", "sysfs");
    say("KILN_READY");
    match std::fs::read_to_string("/sys/class/net/eth0/address") {
        Ok(mac) => say(&format!("eth0 address={}", mac.trim())),
        Err(e) => say(&format!("eth0 missing: {e}")),
    }
    if configure() {
        say("eth0 up");
        if let Err(e) = exchange() {
            say(&format!("net error {e}"));
        }
    }
    say("KILN_TEST_DONE");
    reboot();
}
