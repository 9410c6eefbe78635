//! What a micro-VM is made of: plain data, validated once, then passed down.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::devices::virtio::block::{Disk, DiskError, ID_BYTES};
use crate::devices::virtio::net::{self, TapError};
use crate::rate_limiter::{RateLimiterConfig, RateLimiterError};
use crate::seccomp::SeccompMode;

/// Most vCPUs a kiln micro-VM may have.
pub const MAX_VCPUS: u8 = 32;
/// Smallest guest memory that boots the kiln kernel with an initramfs.
pub const MIN_MEM_MIB: u64 = 32;
/// Guest CID used for the vsock device unless configured.
pub const DEFAULT_GUEST_CID: u64 = 3;
/// Most virtio-blk drives: the IOAPIC pins left after the other devices.
pub const MAX_DRIVES: usize = 16;
/// Lowest CID a guest may have: 0 is the hypervisor, 1 local, 2 the host.
pub const MIN_GUEST_CID: u64 = 3;
/// Highest CID a guest may have: CIDs are 32 bits and u32::MAX is
/// VMADDR_CID_ANY.
pub const MAX_GUEST_CID: u64 = CID_ANY - 1;
/// VMADDR_CID_ANY.
const CID_ANY: u64 = u32::MAX as u64;

/// Where a configuration is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u8),
    #[error("memory must be at least {MIN_MEM_MIB} MiB, got {0} MiB")]
    MemoryTooSmall(u64),
    #[error("memory of {requested} MiB exceeds this host's {available} MiB")]
    MemoryTooLarge { requested: u64, available: u64 },
    #[error("guest CID must be between {MIN_GUEST_CID} and {MAX_GUEST_CID} (0-2 are reserved, {CID_ANY} is VMADDR_CID_ANY), got {0}")]
    GuestCid(u64),
    #[error("no kernel given and none installed at {0} (run scripts/setup.sh or pass --kernel)")]
    NoDefaultKernel(PathBuf),
    #[error("cannot read config file {path}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("at most {MAX_DRIVES} drives, got {0}")]
    TooManyDrives(usize),
    #[error("drive id {0:?} must be at most 20 ASCII bytes")]
    DriveId(String),
    #[error(transparent)]
    Drive(#[from] DiskError),
    #[error(transparent)]
    NetTap(#[from] TapError),
    #[error("invalid MAC address {0:?} (six hex pairs like 02:00:00:00:00:01, not multicast)")]
    Mac(String),
    #[error(transparent)]
    RateLimiter(#[from] RateLimiterError),
}

/// Where the serial console's output goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SerialOutput {
    /// Discarded (markers are still detected for metrics).
    #[default]
    None,
    /// The VMM's standard output; standard input feeds the guest.
    Stdio,
    /// Appended to a file.
    File(PathBuf),
}

/// The vsock device: guest CID and the host Unix socket that fronts it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    #[serde(default = "default_guest_cid")]
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

fn default_guest_cid() -> u64 {
    DEFAULT_GUEST_CID
}

/// The virtio-net card: the host TAP it is attached to, and its MAC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// An existing TAP's name (or one the VMM may create).
    pub tap: String,
    /// `aa:bb:cc:dd:ee:ff`; the guest picks a random one unless set.
    #[serde(default)]
    pub mac: Option<String>,
    /// Limits on what reaches the guest: bytes (after the virtio-net
    /// header) and frames.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on what the guest sends.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

impl NetConfig {
    /// The MAC as bytes, checked.
    pub fn mac_bytes(&self) -> Result<Option<[u8; 6]>, ConfigError> {
        match &self.mac {
            None => Ok(None),
            Some(m) => net::parse_mac(m)
                .map(Some)
                .ok_or_else(|| ConfigError::Mac(m.clone())),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        net::tap::check_name(&self.tap)?;
        self.mac_bytes()?;
        for limiter in [&self.rx_rate_limiter, &self.tx_rate_limiter]
            .into_iter()
            .flatten()
        {
            limiter.validate()?;
        }
        Ok(())
    }
}

/// A virtio-blk drive: a regular file or block device whose size is a
/// multiple of 512 bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Serial the guest reads (`/sys/block/vdX/serial`); `kiln-vdX` unless set.
    #[serde(default)]
    pub id: Option<String>,
}

impl DriveConfig {
    /// The id the guest sees for the drive at `index` (0 is /dev/vda).
    pub fn id_or_default(&self, index: usize) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("kiln-vd{}", drive_letters(index)))
    }

    /// Checks the id, and the file by opening it as the VM will.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(id) = &self.id {
            if id.len() > ID_BYTES || !id.is_ascii() {
                return Err(ConfigError::DriveId(id.clone()));
            }
        }
        Disk::open(&self.path, self.read_only)?;
        Ok(())
    }
}

/// The guest's letters for the drive at `index`: a..z, then aa, ab, ...
fn drive_letters(index: usize) -> String {
    let letter = |i: usize| char::from(b'a' + (i % 26) as u8);
    if index < 26 {
        letter(index).to_string()
    } else {
        format!("{}{}", letter(index / 26 - 1), letter(index))
    }
}

/// One micro-VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Uncompressed ELF `vmlinux` (PVH or 64-bit entry) or a bzImage.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Base kernel command line; device entries and host workarounds are appended.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u64,
    /// Back guest memory with 2 MiB huge pages.
    #[serde(default)]
    pub hugepages: bool,
    #[serde(default)]
    pub serial: SerialOutput,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Add a virtio-rng device.
    #[serde(default = "default_true")]
    pub rng: bool,
    /// virtio-blk drives, in guest order: the first is /dev/vda.
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// A virtio-net card on a host TAP.
    #[serde(default)]
    pub net: Option<NetConfig>,
    /// A line on the serial console that marks the guest ready (for metrics).
    #[serde(default = "default_ready_marker")]
    pub ready_marker: String,
    /// A line on the serial console by which the guest's init announces a
    /// fatal error; the VM's stop is then reported as an init failure.
    #[serde(default = "default_init_failed_marker")]
    pub init_failed_marker: String,
    /// Stop the VM when the guest shows no activity for this long; 0 disables.
    #[serde(default = "default_watchdog_secs")]
    pub watchdog_secs: u64,
    /// Request an Intel TDX guest.
    #[serde(default)]
    pub tdx: bool,
    /// The per-thread seccomp filters: what a system call without a rule does.
    #[serde(default)]
    pub seccomp: SeccompMode,
}

pub fn default_cmdline() -> String {
    "console=ttyS0 reboot=k panic=-1 quiet".to_string()
}
fn default_vcpus() -> u8 {
    1
}
fn default_mem_mib() -> u64 {
    256
}
fn default_true() -> bool {
    true
}
pub fn default_ready_marker() -> String {
    kiln_protocol::console::READY_MARKER.to_string()
}
pub fn default_init_failed_marker() -> String {
    kiln_protocol::console::AGENT_FATAL_MARKER.to_string()
}
fn default_watchdog_secs() -> u64 {
    120
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: PathBuf) -> Self {
        VmConfig {
            kernel,
            initrd: None,
            cmdline: default_cmdline(),
            vcpus: default_vcpus(),
            mem_mib: default_mem_mib(),
            hugepages: false,
            serial: SerialOutput::None,
            vsock: None,
            rng: true,
            drives: Vec::new(),
            net: None,
            ready_marker: default_ready_marker(),
            init_failed_marker: default_init_failed_marker(),
            watchdog_secs: default_watchdog_secs(),
            tdx: false,
            seccomp: SeccompMode::default(),
        }
    }

    /// Reads a JSON configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Checks sizes against the limits and this host's memory.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.mem_mib < MIN_MEM_MIB {
            return Err(ConfigError::MemoryTooSmall(self.mem_mib));
        }
        if let Some(available) = host_memory_mib() {
            if self.mem_mib > available {
                return Err(ConfigError::MemoryTooLarge {
                    requested: self.mem_mib,
                    available,
                });
            }
        }
        if let Some(v) = &self.vsock {
            check_guest_cid(v.guest_cid)?;
        }
        if self.drives.len() > MAX_DRIVES {
            return Err(ConfigError::TooManyDrives(self.drives.len()));
        }
        for d in &self.drives {
            d.validate()?;
        }
        if let Some(n) = &self.net {
            n.validate()?;
        }
        Ok(())
    }
}

/// Refuses the CIDs no guest may have.
pub fn check_guest_cid(cid: u64) -> Result<(), ConfigError> {
    if (MIN_GUEST_CID..=MAX_GUEST_CID).contains(&cid) {
        Ok(())
    } else {
        Err(ConfigError::GuestCid(cid))
    }
}

/// `$KILN_HOME`, or `/var/lib/kiln`.
pub fn kiln_home() -> PathBuf {
    std::env::var_os("KILN_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/kiln"))
}

/// The kernel `scripts/setup.sh` installs: `$KILN_HOME/kernel/vmlinux`.
pub fn default_kernel_path() -> PathBuf {
    kiln_home().join("kernel").join("vmlinux")
}

/// Total RAM of this host in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        VmConfig::new("/k".into()).validate().unwrap();
    }

    #[test]
    fn bad_sizes_are_named() {
        let mut c = VmConfig::new("/k".into());
        c.vcpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Vcpus(0))));
        c.vcpus = 33;
        assert!(matches!(c.validate(), Err(ConfigError::Vcpus(33))));
        c.vcpus = 1;
        c.mem_mib = 8;
        assert!(matches!(c.validate(), Err(ConfigError::MemoryTooSmall(8))));
        c.mem_mib = 1 << 40;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
    }

    #[test]
    fn reserved_and_oversized_cids_are_refused() {
        let mut c = VmConfig::new("/k".into());
        for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 32, u64::MAX] {
            c.vsock = Some(VsockConfig {
                guest_cid: cid,
                uds_path: "/s".into(),
            });
            assert!(
                matches!(c.validate(), Err(ConfigError::GuestCid(got)) if got == cid),
                "{cid}"
            );
        }
        for cid in [3, u64::from(u32::MAX) - 1] {
            c.vsock = Some(VsockConfig {
                guest_cid: cid,
                uds_path: "/s".into(),
            });
            c.validate().unwrap();
        }
    }

    #[test]
    fn json_rejects_unknown_fields() {
        let err = serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","vcpu":2}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let ok: VmConfig =
            serde_json::from_str(r#"{"kernel":"/k","vcpus":2,"serial":{"file":"/tmp/s"}}"#)
                .unwrap();
        assert_eq!(ok.vcpus, 2);
        assert_eq!(ok.serial, SerialOutput::File("/tmp/s".into()));
    }

    #[test]
    fn net_is_checked() {
        let mut c: VmConfig = serde_json::from_str(
            r#"{"kernel":"/k","net":{"tap":"tap0","mac":"02:00:00:00:00:07"}}"#,
        )
        .unwrap();
        c.validate().unwrap();
        let net = c.net.clone().unwrap();
        assert_eq!(net.mac_bytes().unwrap(), Some([2, 0, 0, 0, 0, 7]));
        c.net = Some(NetConfig {
            mac: Some("02:00:00:00:00".into()),
            ..net.clone()
        });
        assert!(matches!(c.validate(), Err(ConfigError::Mac(_))));
        c.net = Some(NetConfig {
            tap: "a/b".into(),
            ..net.clone()
        });
        assert!(matches!(c.validate(), Err(ConfigError::NetTap(_))));
        let limited: NetConfig = serde_json::from_str(
            r#"{"tap":"t","tx_rate_limiter":{"bandwidth":{"size":1000,"one_time_burst":5000,"refill_time":100},"ops":{"size":10,"refill_time":1000}}}"#,
        )
        .unwrap();
        limited.validate().unwrap();
        let empty: NetConfig = serde_json::from_str(
            r#"{"tap":"t","rx_rate_limiter":{"bandwidth":{"size":0,"refill_time":100}}}"#,
        )
        .unwrap();
        assert!(matches!(empty.validate(), Err(ConfigError::RateLimiter(_))));
        let err = serde_json::from_str::<NetConfig>(r#"{"tap":"t","ip":"1"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn drives_are_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.img");
        std::fs::write(&img, vec![0u8; 1024]).unwrap();
        let json = format!(
            r#"{{"kernel":"/k","drives":[{{"path":"{}","read_only":true}}]}}"#,
            img.display()
        );
        let mut c: VmConfig = serde_json::from_str(&json).unwrap();
        c.validate().unwrap();
        assert_eq!(c.drives[0].id_or_default(0), "kiln-vda");
        assert_eq!(c.drives[0].id_or_default(27), "kiln-vdab");

        c.drives[0].id = Some("x".repeat(21));
        assert!(matches!(c.validate(), Err(ConfigError::DriveId(_))));
        c.drives[0].id = Some("disk-é".into());
        assert!(matches!(c.validate(), Err(ConfigError::DriveId(_))));
        c.drives[0].id = Some("y".repeat(20));
        c.validate().unwrap();

        std::fs::write(&img, vec![0u8; 1000]).unwrap();
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("not a multiple of 512"), "{err}");
        c.drives[0].path = dir.path().join("missing.img");
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Drive(DiskError::Open { .. }))
        ));
        c.drives = vec![c.drives[0].clone(); MAX_DRIVES + 1];
        assert!(matches!(c.validate(), Err(ConfigError::TooManyDrives(17))));

        let err = serde_json::from_str::<DriveConfig>(r#"{"path":"/x","ro":true}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}
