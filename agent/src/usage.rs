//! Usage as the guest kernel reports it in /proc.

use std::sync::Mutex;

use kiln_protocol::Usage;

/// USER_HZ: /proc/stat counts in 1/100 s on x86 Linux.
const TICKS_PER_SEC: u64 = 100;

/// CPU (user, system) milliseconds from /proc/stat's `cpu` line.
pub fn cpu_ms(stat: &str) -> (u64, u64) {
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    // user + nice, system + irq + softirq
    let user = get(0) + get(1);
    let system = get(2) + get(5) + get(6);
    (user * 1000 / TICKS_PER_SEC, system * 1000 / TICKS_PER_SEC)
}

/// Used memory in KiB: MemTotal - MemAvailable.
pub fn mem_used_kib(meminfo: &str) -> u64 {
    let field = |name: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field("MemTotal:").saturating_sub(field("MemAvailable:"))
}

/// (rx, tx) bytes over all interfaces but loopback, from /proc/net/dev.
pub fn net_bytes(netdev: &str) -> (u64, u64) {
    netdev
        .lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| name.trim() != "lo")
        .map(|(_, rest)| {
            let f: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            (
                f.first().copied().unwrap_or(0),
                f.get(8).copied().unwrap_or(0),
            )
        })
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// (read, written) bytes of whole disks (vd*), from /proc/diskstats.
pub fn disk_bytes(diskstats: &str) -> (u64, u64) {
    diskstats
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| {
            f.len() >= 10
                && f[2].starts_with("vd")
                && !f[2].chars().last().is_some_and(|c| c.is_ascii_digit())
        })
        .map(|f| {
            let sectors = |i: usize| f[i].parse::<u64>().unwrap_or(0) * 512;
            (sectors(5), sectors(9))
        })
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// Number of processes (numeric entries of /proc).
pub fn process_count() -> u64 {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .count() as u64
        })
        .unwrap_or(0)
}

/// The cumulative counters as they were when counting started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counters {
    cpu_user_ms: u64,
    cpu_system_ms: u64,
    net_rx_bytes: u64,
    net_tx_bytes: u64,
    disk_read_bytes: u64,
    disk_write_bytes: u64,
}

/// Set by [`count_from_now`]; none: count from boot.
static BASELINE: Mutex<Option<Counters>> = Mutex::new(None);

/// Makes every later sample count CPU time, network and disk bytes from
/// now: a VM restored from a snapshot reports its own use, not the boot
/// its template made.
pub fn count_from_now() {
    let now = counters();
    if let Ok(mut base) = BASELINE.lock() {
        *base = Some(now);
    }
}

fn counters() -> Counters {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let (cpu_user_ms, cpu_system_ms) = cpu_ms(&read("/proc/stat"));
    let (net_rx_bytes, net_tx_bytes) = net_bytes(&read("/proc/net/dev"));
    let (disk_read_bytes, disk_write_bytes) = disk_bytes(&read("/proc/diskstats"));
    Counters {
        cpu_user_ms,
        cpu_system_ms,
        net_rx_bytes,
        net_tx_bytes,
        disk_read_bytes,
        disk_write_bytes,
    }
}

impl Counters {
    fn since(self, base: Counters) -> Counters {
        Counters {
            cpu_user_ms: self.cpu_user_ms.saturating_sub(base.cpu_user_ms),
            cpu_system_ms: self.cpu_system_ms.saturating_sub(base.cpu_system_ms),
            net_rx_bytes: self.net_rx_bytes.saturating_sub(base.net_rx_bytes),
            net_tx_bytes: self.net_tx_bytes.saturating_sub(base.net_tx_bytes),
            disk_read_bytes: self.disk_read_bytes.saturating_sub(base.disk_read_bytes),
            disk_write_bytes: self.disk_write_bytes.saturating_sub(base.disk_write_bytes),
        }
    }
}

/// Samples the guest; `peak` carries the highest memory seen so far.
pub fn sample(peak: &mut u64, workload: &str) -> Usage {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let base = BASELINE.lock().ok().and_then(|b| *b).unwrap_or_default();
    let c = counters().since(base);
    let mem_used_kib = mem_used_kib(&read("/proc/meminfo"));
    *peak = (*peak).max(mem_used_kib);
    let uptime_ms = read("/proc/uptime")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |s| (s * 1000.0) as u64);
    Usage {
        uptime_ms,
        cpu_user_ms: c.cpu_user_ms,
        cpu_system_ms: c.cpu_system_ms,
        mem_used_kib,
        mem_peak_kib: *peak,
        net_rx_bytes: c.net_rx_bytes,
        net_tx_bytes: c.net_tx_bytes,
        disk_read_bytes: c.disk_read_bytes,
        disk_write_bytes: c.disk_write_bytes,
        processes: process_count(),
        workload: workload.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_since_a_baseline_never_go_below_zero() {
        let base = Counters {
            cpu_user_ms: 100,
            cpu_system_ms: 50,
            disk_read_bytes: 10,
            ..Counters::default()
        };
        let now = Counters {
            cpu_user_ms: 130,
            cpu_system_ms: 40,
            disk_read_bytes: 15,
            net_tx_bytes: 7,
            ..Counters::default()
        };
        let d = now.since(base);
        assert_eq!((d.cpu_user_ms, d.cpu_system_ms), (30, 0));
        assert_eq!((d.disk_read_bytes, d.net_tx_bytes), (5, 7));
    }

    #[test]
    fn parses_proc_formats() {
        assert_eq!(
            cpu_ms("cpu  150 50 30 1000 0 5 5 0 0 0\ncpu0 1 2 3\n"),
            (2000, 400)
        );
        assert_eq!(
            mem_used_kib("MemTotal:  1000 kB\nMemFree: 10 kB\nMemAvailable:  600 kB\n"),
            400
        );
        let netdev = "Inter-|   Receive\n face |bytes packets\n    lo: 500 5 0 0 0 0 0 0 500 5 0 0 0 0 0 0\n  eth0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n";
        assert_eq!(net_bytes(netdev), (1000, 2000));
        let disks = " 254 0 vda 10 0 8 0 4 0 16 0 0 0 0\n 254 1 vda1 10 0 8 0 4 0 16 0 0 0 0\n";
        assert_eq!(disk_bytes(disks), (8 * 512, 16 * 512));
        assert_eq!(cpu_ms(""), (0, 0));
    }

    #[test]
    fn sampling_this_host_gives_plausible_numbers() {
        let mut peak = 0;
        let u = sample(&mut peak, "running");
        assert!(u.uptime_ms > 0 && u.processes > 0 && u.mem_used_kib > 0);
        assert_eq!(peak, u.mem_used_kib);
    }
}
