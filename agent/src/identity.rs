//! Makes this VM itself: the host's entropy into the kernel's pool (then a
//! reseed, so the generator's output changes at once), the host's wall
//! clock and a hostname. After a snapshot restore every clone starts from
//! the template's random state and clock; without this they would all
//! draw the same "random" bytes.

use std::fs::File;
use std::os::fd::AsRawFd;

use kiln_protocol::{Identity, MAX_ENTROPY_BYTES};

/// `_IOW('R', 0x03, int[2])`: add bytes to the input pool and credit them.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the generator from the input pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot open /dev/urandom")]
    Open(#[source] std::io::Error),
    #[error("the kernel refused the host's entropy")]
    AddEntropy(#[source] std::io::Error),
    #[error("the kernel refused to reseed its generator")]
    Reseed(#[source] std::io::Error),
    #[error("cannot set the clock")]
    Clock(#[source] std::io::Error),
    #[error("cannot set the hostname")]
    Hostname(#[source] std::io::Error),
}

/// Applies every part of `id` that is present; the first failure ends it.
pub fn apply(id: &Identity) -> Result<(), IdentityError> {
    if !id.entropy.is_empty() {
        add_entropy(&id.entropy[..id.entropy.len().min(MAX_ENTROPY_BYTES)])?;
    }
    if let Some(ms) = id.unix_time_ms {
        set_clock(ms)?;
    }
    if let Some(name) = &id.hostname {
        // SAFETY: pointer and length of a live byte slice.
        if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
            return Err(IdentityError::Hostname(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// `struct rand_pool_info` followed by its buffer.
#[repr(C)]
struct PoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; MAX_ENTROPY_BYTES],
}

fn add_entropy(bytes: &[u8]) -> Result<(), IdentityError> {
    let dev = File::options()
        .write(true)
        .open("/dev/urandom")
        .map_err(IdentityError::Open)?;
    let mut info = PoolInfo {
        entropy_count: (bytes.len() * 8) as libc::c_int,
        buf_size: bytes.len() as libc::c_int,
        buf: [0; MAX_ENTROPY_BYTES],
    };
    info.buf[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: `info` is a rand_pool_info whose buffer holds buf_size bytes.
    if unsafe { libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY as _, &info) } != 0 {
        return Err(IdentityError::AddEntropy(std::io::Error::last_os_error()));
    }
    // SAFETY: an argument-less ioctl on an open /dev/urandom.
    if unsafe { libc::ioctl(dev.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(IdentityError::Reseed(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn set_clock(unix_ms: u64) -> Result<(), IdentityError> {
    let ts = libc::timespec {
        tv_sec: (unix_ms / 1000) as libc::time_t,
        tv_nsec: ((unix_ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads only `ts`.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(IdentityError::Clock(std::io::Error::last_os_error()));
    }
    Ok(())
}
