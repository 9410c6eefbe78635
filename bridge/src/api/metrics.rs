//! `GET /metrics` in the Prometheus text format, computed from the store and
//! the fleet at scrape time (no counters to lose on restart).

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::fleet::ProviderCard;
use crate::state::GrantState;

/// Upper bounds of the boot-time histogram, in seconds.
const BOOT_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

pub fn render(counts: &BTreeMap<GrantState, u64>, boot_ms: &[u64], card: &ProviderCard) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_all(&mut out, counts, boot_ms, card);
    out
}

fn write_all(
    out: &mut String,
    counts: &BTreeMap<GrantState, u64>,
    boot_ms: &[u64],
    card: &ProviderCard,
) -> std::fmt::Result {
    writeln!(out, "# HELP kiln_grants Grants by state.")?;
    writeln!(out, "# TYPE kiln_grants gauge")?;
    for state in GrantState::ALL {
        let n = counts.get(&state).copied().unwrap_or(0);
        writeln!(out, "kiln_grants{{state=\"{state}\"}} {n}")?;
    }

    let running = [GrantState::Running, GrantState::Terminating]
        .iter()
        .map(|s| counts.get(s).copied().unwrap_or(0))
        .sum::<u64>();
    writeln!(
        out,
        "# HELP kiln_vms_running Instances up, including those being stopped."
    )?;
    writeln!(out, "# TYPE kiln_vms_running gauge")?;
    writeln!(out, "kiln_vms_running {running}")?;

    writeln!(
        out,
        "# HELP kiln_boot_seconds Time from the start of provisioning to a running instance."
    )?;
    writeln!(out, "# TYPE kiln_boot_seconds histogram")?;
    let secs: Vec<f64> = boot_ms.iter().map(|ms| *ms as f64 / 1000.0).collect();
    for le in BOOT_BUCKETS {
        let n = secs.iter().filter(|s| **s <= *le).count();
        writeln!(out, "kiln_boot_seconds_bucket{{le=\"{le}\"}} {n}")?;
    }
    writeln!(
        out,
        "kiln_boot_seconds_bucket{{le=\"+Inf\"}} {}",
        secs.len()
    )?;
    writeln!(out, "kiln_boot_seconds_sum {}", secs.iter().sum::<f64>())?;
    writeln!(out, "kiln_boot_seconds_count {}", secs.len())?;

    writeln!(
        out,
        "# HELP kiln_capacity_vcpus vCPUs grants may use, and use now, per backend."
    )?;
    writeln!(out, "# TYPE kiln_capacity_vcpus gauge")?;
    for b in &card.backends {
        let c = &b.capabilities.capacity;
        writeln!(
            out,
            "kiln_capacity_vcpus{{backend=\"{}\",kind=\"usable\"}} {}",
            escape(&b.name),
            c.usable.vcpus
        )?;
        writeln!(
            out,
            "kiln_capacity_vcpus{{backend=\"{}\",kind=\"used\"}} {}",
            escape(&b.name),
            c.used.vcpus
        )?;
    }
    writeln!(
        out,
        "# HELP kiln_capacity_ram_mib Memory (MiB) grants may use, and use now, per backend."
    )?;
    writeln!(out, "# TYPE kiln_capacity_ram_mib gauge")?;
    for b in &card.backends {
        let c = &b.capabilities.capacity;
        writeln!(
            out,
            "kiln_capacity_ram_mib{{backend=\"{}\",kind=\"usable\"}} {}",
            escape(&b.name),
            c.usable.ram_mib
        )?;
        writeln!(
            out,
            "kiln_capacity_ram_mib{{backend=\"{}\",kind=\"used\"}} {}",
            escape(&b.name),
            c.used.ram_mib
        )?;
    }
    Ok(())
}

/// Label values escape backslash, quote and newline.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendCapabilities;
    use crate::capacity::{CapacitySnapshot, Resources};
    use crate::fleet::BackendCard;

    #[test]
    fn renders_states_histogram_and_capacity() {
        let counts = BTreeMap::from([(GrantState::Running, 2), (GrantState::Terminating, 1)]);
        let capacity = CapacitySnapshot {
            usable: Resources::new(8, 4096),
            used: Resources::new(3, 1024),
        };
        let card = ProviderCard {
            regions: Default::default(),
            tdx: false,
            capacity,
            backends: vec![BackendCard {
                name: "a\"b".into(),
                capabilities: BackendCapabilities {
                    capacity,
                    ..Default::default()
                },
            }],
        };
        let text = render(&counts, &[50, 300, 4000], &card);
        assert!(text.contains("kiln_grants{state=\"running\"} 2\n"));
        assert!(text.contains("kiln_grants{state=\"failed\"} 0\n"));
        assert!(text.contains("kiln_vms_running 3\n"));
        assert!(text.contains("kiln_boot_seconds_bucket{le=\"0.1\"} 1\n"));
        assert!(text.contains("kiln_boot_seconds_bucket{le=\"0.5\"} 2\n"));
        assert!(text.contains("kiln_boot_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("kiln_boot_seconds_sum 4.35\n"));
        assert!(text.contains("kiln_capacity_vcpus{backend=\"a\\\"b\",kind=\"used\"} 3\n"));
        assert!(text.contains("kiln_capacity_ram_mib{backend=\"a\\\"b\",kind=\"usable\"} 4096\n"));
    }
}
