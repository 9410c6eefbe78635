//! `kiln run --disk SIZE`: a sparse file formatted as ext4 on the host,
//! attached read-write as the guest's second disk (`/dev/vdb`), where the
//! block root's overlay keeps everything the workload writes. The file is
//! unlinked as soon as it is formatted; kiln-vmm opens it through this
//! process's open descriptor, so the space goes back when the VM ends,
//! however it ends.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Tells the agent to put the overlay's writable half on `/dev/vdb`.
pub const KERNEL_ARG: &str = "kiln.scratch=vdb";
/// ext4 needs room for its own metadata.
const MIN_SIZE: u64 = 16 << 20;

pub struct Disk {
    file: File,
}

impl Disk {
    pub fn create(dir: &Path, size: u64) -> Result<Disk> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix("disk-")
            .tempfile_in(dir)
            .with_context(|| format!("cannot create a scratch disk in {}", dir.display()))?;
        let (file, path) = tmp.into_parts();
        file.set_len(size).context("cannot size the scratch disk")?;
        // No journal: the disk lives exactly as long as the VM.
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-O", "^has_journal"])
            .args(["-E", "lazy_itable_init=1"])
            .arg(&*path)
            .stdin(Stdio::null())
            .output()
            .context("cannot run mkfs.ext4 (install e2fsprogs)")?;
        if !out.status.success() {
            bail!(
                "mkfs.ext4 failed on the scratch disk: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // Unlinked now; the open descriptor keeps it until we are done.
        drop(path);
        Ok(Disk { file })
    }

    /// A path kiln-vmm can open while this process holds the disk.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.file.as_raw_fd()
        ))
    }
}

/// `1G`, `512M`, `64k`, or plain bytes (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 1G or 512M)"))?;
    let shift = match unit
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(format!("unknown unit in {s:?} (use K, M, G or T)")),
    };
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes < MIN_SIZE {
        return Err(format!("{s:?}: a scratch disk needs at least 16M"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("16777216").unwrap(), 16 << 20);
        for bad in ["", "G", "1X", "1M", "-1G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_disk_is_ext4_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::create(dir.path(), 32 << 20).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut magic = [0u8; 2];
        use std::io::{Read, Seek, SeekFrom};
        let mut f = File::open(disk.path()).unwrap();
        f.seek(SeekFrom::Start(1024 + 56)).unwrap();
        f.read_exact(&mut magic).unwrap();
        assert_eq!(magic, [0x53, 0xef]);
    }
}
