//! Figures written when a VM ends (`--metrics PATH`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::devices::virtio::block::BlockCounters;
use crate::devices::virtio::net::NetCounters;

#[derive(Clone, Debug, Serialize)]
pub struct Metrics {
    pub exit_reason: String,
    pub exit_code: i32,
    pub host_profile: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// VMM start (process start for the binary) to the first KVM_RUN.
    pub time_to_first_kvm_run_ms: Option<f64>,
    pub first_serial_output_ms: Option<f64>,
    /// To the first time the readiness marker appeared on the console.
    pub ready_marker_ms: Option<f64>,
    pub total_ms: f64,
    /// vCPU exits handled in userspace, by reason.
    pub vm_exits: BTreeMap<String, u64>,
    pub vmm_user_cpu_ms: f64,
    pub vmm_system_cpu_ms: f64,
    pub peak_rss_kib: u64,
    pub rss_kib: u64,
    /// Guest memory resident in the VMM process (Rss of its guest mappings,
    /// plus their huge pages with `--hugepages`).
    pub guest_resident_kib: u64,
    /// RSS minus guest memory touched: what the VMM itself costs.
    pub vmm_overhead_kib: u64,
    /// virtio-blk drives, in guest order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<DriveMetrics>,
    /// The virtio-net card, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net: Option<NetMetrics>,
}

/// What the virtio-net card carried.
#[derive(Clone, Debug, Serialize)]
pub struct NetMetrics {
    pub tap: String,
    #[serde(flatten)]
    pub counters: NetCounters,
}

/// What one virtio-blk drive served.
#[derive(Clone, Debug, Serialize)]
pub struct DriveMetrics {
    pub path: PathBuf,
    pub read_only: bool,
    #[serde(flatten)]
    pub counters: BlockCounters,
}

pub fn ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64() * 1000.0)
}

/// (user, system) CPU time of this process.
pub fn cpu_times() -> (Duration, Duration) {
    // SAFETY: getrusage fills the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// (VmRSS, VmHWM) of this process in KiB.
pub fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

impl Metrics {
    pub fn write_to(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, json + "\n")
    }
}
