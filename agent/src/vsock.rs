//! AF_VSOCK stream sockets as std Files.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

pub const HOST_CID: u32 = 2;

fn socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// Connects to (cid, port).
pub fn connect(cid: u32, port: u32) -> std::io::Result<File> {
    use std::os::fd::AsRawFd;
    let s = socket()?;
    let a = addr(cid, port);
    // SAFETY: a valid sockaddr_vm of ADDR_LEN bytes.
    if unsafe {
        libc::connect(
            s.as_raw_fd(),
            (&a as *const libc::sockaddr_vm).cast(),
            ADDR_LEN,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(File::from(s))
}

/// A listening socket on `port` for any CID.
pub fn listen(port: u32) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let s = socket()?;
    let a = addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: a valid sockaddr_vm; our own fd.
    unsafe {
        if libc::bind(
            s.as_raw_fd(),
            (&a as *const libc::sockaddr_vm).cast(),
            ADDR_LEN,
        ) != 0
            || libc::listen(s.as_raw_fd(), 16) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(s)
}

/// Accepts one connection.
pub fn accept(listener: &OwnedFd) -> std::io::Result<File> {
    use std::os::fd::AsRawFd;
    // SAFETY: accept on our listening socket; no peer address wanted.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}
