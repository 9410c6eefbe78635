//! One unprivileged uid (and the gid of the same number) per jailed VMM,
//! from a range, held by an flock(2) on a lock file for the VMM's life: a
//! VMM that dies, however, releases it.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::JailError;

/// Where the lock files of uids in use live: shared by every kiln-vmm on
/// the host, gone at reboot with the VMs.
pub const UID_LOCK_DIR: &str = "/run/kiln/jail-uids";
/// The uids jailed VMMs run as unless configured: far above any login
/// user's, below the 2^31 that some tools treat as negative.
pub const DEFAULT_UID_RANGE: &str = "900000-965535";

/// `first..=last` of the uids jailed VMMs may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl std::str::FromStr for UidRange {
    type Err = JailError;

    /// `FIRST-LAST`: both above 0 (root) and below 2^31.
    fn from_str(s: &str) -> Result<Self, JailError> {
        let bad = || JailError::UidRange(s.to_string());
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let first: u32 = a.trim().parse().map_err(|_| bad())?;
        let last: u32 = b.trim().parse().map_err(|_| bad())?;
        if first == 0 || first > last || last >= 1 << 31 {
            return Err(bad());
        }
        Ok(UidRange { first, last })
    }
}

/// A uid this process holds until it drops the lease (or exits).
#[derive(Debug)]
pub struct UidLease {
    uid: u32,
    _lock: std::fs::File,
}

impl UidLease {
    /// The first uid of `range` whose lock no other process holds.
    pub fn acquire(range: &UidRange, lock_dir: &Path) -> Result<UidLease, JailError> {
        let lock_err = |path: PathBuf| move |source| JailError::UidLock { path, source };
        std::fs::create_dir_all(lock_dir).map_err(lock_err(lock_dir.to_path_buf()))?;
        for uid in range.first..=range.last {
            let path = lock_dir.join(uid.to_string());
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(lock_err(path.clone()))?;
            // SAFETY: flock on a descriptor this function owns.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(UidLease { uid, _lock: file });
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(lock_err(path)(e));
            }
        }
        Err(JailError::NoFreeUid(*range))
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }
}

/// Whether `uid` of `range` is leased, now, by a process (this one
/// included, through another lease).
pub fn in_use(range: &UidRange, lock_dir: &Path, uid: u32) -> bool {
    if !(range.first..=range.last).contains(&uid) {
        return false;
    }
    let Ok(file) = std::fs::File::open(lock_dir.join(uid.to_string())) else {
        return false;
    };
    // SAFETY: flock on a descriptor this function owns; released on drop.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_bad_ones_are_refused() {
        let r: UidRange = DEFAULT_UID_RANGE.parse().unwrap();
        assert_eq!((r.first, r.last), (900000, 965535));
        for bad in ["", "5", "0-10", "10-5", "a-b", "1-2147483648"] {
            assert!(bad.parse::<UidRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_leased_uid_is_in_use_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let range: UidRange = "910000-910001".parse().unwrap();
        let lease = UidLease::acquire(&range, dir.path()).unwrap();
        assert!(in_use(&range, dir.path(), lease.uid()));
        assert!(!in_use(&range, dir.path(), 910001));
        assert!(!in_use(&range, dir.path(), 5));
        let uid = lease.uid();
        drop(lease);
        assert!(!in_use(&range, dir.path(), uid));
    }

    #[test]
    fn each_lease_gets_its_own_uid_and_a_dropped_one_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let range = UidRange {
            first: 900100,
            last: 900101,
        };
        let a = UidLease::acquire(&range, dir.path()).unwrap();
        let b = UidLease::acquire(&range, dir.path()).unwrap();
        assert_eq!((a.uid(), b.uid()), (900100, 900101));
        assert!(matches!(
            UidLease::acquire(&range, dir.path()),
            Err(JailError::NoFreeUid(_))
        ));
        drop(a);
        assert_eq!(UidLease::acquire(&range, dir.path()).unwrap().uid(), 900100);
    }
}
