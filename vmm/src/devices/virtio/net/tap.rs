//! The host side of virtio-net: a TAP device opened with a virtio-net
//! header on every frame (`IFF_VNET_HDR`), or any other descriptor that
//! carries one frame per read and write (a `SOCK_SEQPACKET` socket in
//! tests). Reads and writes never block: the descriptor is non-blocking.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::VNET_HDR_LEN;

/// The TAP offloads (`TUN_F_*`) kiln asks for, most first.
const OFFLOAD_CANDIDATES: [u32; 2] = [
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6,
    libc::TUN_F_CSUM,
];
/// `IFNAMSIZ` less the NUL.
pub const MAX_NAME_LEN: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?} must be 1-{MAX_NAME_LEN} bytes, without '/', ':', whitespace or NUL")]
    Name(String),
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    #[error("cannot attach to TAP {name}")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set TAP {name}'s virtio-net header size")]
    HeaderSize {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Checks a TAP name as the kernel would take it.
pub fn check_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace() || b == b':');
    if ok {
        Ok(())
    } else {
        Err(TapError::Name(name.to_string()))
    }
}

/// A frame-carrying descriptor: a TAP, or a stand-in for one.
pub struct Tap {
    fd: OwnedFd,
    name: String,
    /// The `TUN_F_*` offloads the descriptor accepts.
    supported: u32,
    /// The offloads in force.
    current: u32,
    is_tap: bool,
}

impl Tap {
    /// Attaches to the TAP `name` (created if missing and allowed), with a
    /// 12-byte virtio-net header on every frame, and finds which offloads
    /// it accepts; none is in force until the guest's driver accepts them.
    pub fn open(name: &str) -> Result<Self, TapError> {
        check_name(name)?;
        // SAFETY: a NUL-terminated path; the result is checked.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(TapError::OpenTun(io::Error::last_os_error()));
        }
        // SAFETY: `raw` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(TapError::HeaderSize {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let mut tap = Tap {
            fd,
            name: name.to_string(),
            supported: 0,
            current: u32::MAX,
            is_tap: true,
        };
        tap.supported = OFFLOAD_CANDIDATES
            .into_iter()
            .find(|&f| tap.ioctl_offload(f).is_ok())
            .unwrap_or(0);
        // Plain frames with full checksums until the guest accepts more.
        tap.set_offload(0).map_err(|source| TapError::Attach {
            name: name.to_string(),
            source,
        })?;
        Ok(tap)
    }

    /// A stand-in for a TAP: `fd` carries one frame (header first) per
    /// read and write and should be non-blocking; `supported` are the
    /// offloads to offer, recorded but not applied.
    pub fn from_fd(fd: OwnedFd, supported: u32) -> Self {
        Tap {
            fd,
            name: String::new(),
            supported,
            current: 0,
            is_tap: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `TUN_F_*` offloads this TAP accepts.
    pub fn supported_offloads(&self) -> u32 {
        self.supported
    }

    /// The `TUN_F_*` offloads in force.
    pub fn current_offloads(&self) -> u32 {
        self.current
    }

    /// Tells the TAP which offloaded frames it may hand us.
    pub fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        if self.current == flags {
            return Ok(());
        }
        if self.is_tap {
            self.ioctl_offload(flags)?;
        }
        self.current = flags;
        Ok(())
    }

    fn ioctl_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Reads one frame; WouldBlock when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `buf.len()` bytes of writes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: `frame` is valid for `frame.len()` bytes of reads.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "a:b",
            "x\0",
            "sixteen-bytes-xx",
        ] {
            assert!(matches!(check_name(bad), Err(TapError::Name(_))), "{bad:?}");
        }
        for good in ["tap0", "kiln-tap-15byte"] {
            check_name(good).unwrap();
        }
    }
}
