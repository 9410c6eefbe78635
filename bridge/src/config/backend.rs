//! `[[backend]]` tables: one section type per backend kind, each with the
//! checks of its own keys. Plain data; `backends` builds from it.

use std::path::PathBuf;

use kiln_image::root::Rootfs;
use serde::Deserialize;

use super::cloud::{Cloud, CloudSection};
use super::{CapacityConfig, ConfigError};

/// 1 TiB: more than any disk should give one grant's output.
const MAX_OUTPUT_CAP_KIB: u64 = 1 << 30;
/// Room for the truncation marker and some output.
const MIN_OUTPUT_CAP_KIB: u64 = 4;

/// A century: longer than anyone keeps an ended grant's directory.
const MAX_KEEP_ENDED_DAYS: u32 = 36_500;

/// One `[[backend]]` table; `kind` picks the variant.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BackendSection {
    /// This host, booting micro-VMs with kiln-vmm.
    Local(LocalSection),
    /// Other owned hosts, over SSH.
    Ssh(SshSection),
    /// AWS EC2 instances, for overflow.
    Aws(CloudSection),
    /// GCP Compute instances, for overflow.
    Gcp(CloudSection),
}

impl BackendSection {
    /// The backend's name (unique in the fleet).
    pub fn name(&self) -> &str {
        match self {
            BackendSection::Local(s) => s.name.as_deref().unwrap_or("local"),
            BackendSection::Ssh(s) => &s.name,
            BackendSection::Aws(s) | BackendSection::Gcp(s) => &s.name,
        }
    }

    /// Its own region label, when it sets one.
    pub fn region(&self) -> Option<&str> {
        match self {
            BackendSection::Local(s) => s.region.as_deref(),
            BackendSection::Ssh(s) => s.region.as_deref(),
            BackendSection::Aws(s) | BackendSection::Gcp(s) => s.region.as_deref(),
        }
    }

    /// Checks the kind's own keys; `prefix` is the table's place in the
    /// file (`backend[0]`), so that errors name the key in full.
    pub(super) fn check(&self, prefix: &str) -> Result<(), ConfigError> {
        match self {
            BackendSection::Local(s) => s.check(prefix),
            BackendSection::Ssh(s) => s.check(prefix),
            BackendSection::Aws(s) => s.check(Cloud::Aws, prefix),
            BackendSection::Gcp(s) => s.check(Cloud::Gcp, prefix),
        }
    }

    /// Fills the keys a local section leaves unset from the deprecated
    /// top-level `[capacity]` table.
    pub(super) fn apply_capacity_defaults(&mut self, defaults: &CapacityConfig) {
        match self {
            BackendSection::Local(s) => {
                s.reserve_vcpus = s.reserve_vcpus.or(defaults.reserve_vcpus);
                s.reserve_ram_mib = s.reserve_ram_mib.or(defaults.reserve_ram_mib);
                s.overcommit = s.overcommit.or(defaults.overcommit);
            }
            // Other hosts keep their own reserve (their `host.toml`);
            // a cloud instance is the grant's alone.
            BackendSection::Ssh(_) | BackendSection::Aws(_) | BackendSection::Gcp(_) => {}
        }
    }
}

/// `kind = "local"`. The local backend's author extends this as it needs.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSection {
    /// Defaults to `local`.
    #[serde(default)]
    pub name: Option<String>,
    /// The region label its grants run in; defaults to kilnd's `region`
    /// (two local backends, each with its own `kiln_home`, can split one
    /// host between two labels).
    #[serde(default)]
    pub region: Option<String>,
    /// vCPUs to offer; defaults to the host's CPUs.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Memory to offer; defaults to the host's memory.
    #[serde(default)]
    pub ram_mib: Option<u64>,
    /// vCPUs of `vcpus` kept back from grants (default 0).
    #[serde(default)]
    pub reserve_vcpus: Option<u32>,
    /// MiB of `ram_mib` kept back from grants (default 0).
    #[serde(default)]
    pub reserve_ram_mib: Option<u64>,
    /// vCPUs offered per host CPU, at least 1 (default 1); memory is never
    /// overcommitted.
    #[serde(default)]
    pub overcommit: Option<f64>,
    /// `$KILN_HOME` (images, VM directories); defaults to `/var/lib/kiln`.
    #[serde(default)]
    pub kiln_home: Option<PathBuf>,
    /// Days an ended grant's directory (state, output, logs) is kept;
    /// defaults to 7.
    #[serde(default)]
    pub keep_ended_days: Option<u32>,
    /// The root filesystem of its grants' images: `auto` (by the image's
    /// size, the default), `initramfs` or `block`. A string checked by
    /// the config, since serde's own error for a bad word here would name
    /// the `[[backend]]` table but not the key.
    #[serde(default)]
    pub rootfs: Option<String>,
    /// The most bytes of a grant's `output.log`, in KiB (default 65536,
    /// 64 MiB; at least 4); the log then ends with a marker and later
    /// output is dropped.
    #[serde(default)]
    pub output_cap_kib: Option<u64>,
    /// Restore grants' VMs from a snapshot of their image's ready VM,
    /// saved by the first grant of that image (and VM shape) that boots;
    /// default true. Off: every grant boots.
    #[serde(default)]
    pub warm_start: Option<bool>,
    /// The address requesters reach its VMs on: the SSH and published
    /// ports listen there. Defaults to 127.0.0.1 (this host only).
    #[serde(default)]
    pub address: Option<String>,
    /// The host ports those listen on, `FIRST-LAST` (what a firewall
    /// opens); any free port by default.
    #[serde(default)]
    pub ports: Option<String>,
}

impl LocalSection {
    fn check(&self, prefix: &str) -> Result<(), ConfigError> {
        let key = |name: &str| format!("{prefix}.{name}");
        if self.vcpus == Some(0) {
            return Err(ConfigError::invalid(
                key("vcpus"),
                "must be greater than zero",
            ));
        }
        if self
            .output_cap_kib
            .is_some_and(|k| !(MIN_OUTPUT_CAP_KIB..=MAX_OUTPUT_CAP_KIB).contains(&k))
        {
            return Err(ConfigError::invalid(
                key("output_cap_kib"),
                format!("must be {MIN_OUTPUT_CAP_KIB} to {MAX_OUTPUT_CAP_KIB}"),
            ));
        }
        if self.ram_mib == Some(0) {
            return Err(ConfigError::invalid(
                key("ram_mib"),
                "must be greater than zero",
            ));
        }
        check_overcommit(&key("overcommit"), self.overcommit)?;
        if let Some(word) = &self.rootfs {
            if Rootfs::parse(word).is_none() {
                return Err(ConfigError::invalid(
                    key("rootfs"),
                    format!("must be {}, not {word:?}", Rootfs::WORDS),
                ));
            }
        }
        if self
            .address
            .as_deref()
            .is_some_and(|a| a.parse::<std::net::IpAddr>().is_err())
        {
            return Err(ConfigError::invalid(
                key("address"),
                "must be an IP address of this host",
            ));
        }
        if self
            .ports
            .as_deref()
            .is_some_and(|p| port_range(p).is_none())
        {
            return Err(ConfigError::invalid(
                key("ports"),
                "must be FIRST-LAST, two ports with FIRST <= LAST",
            ));
        }
        // Far more would put the pruning cutoff before any date.
        if self
            .keep_ended_days
            .is_some_and(|d| d > MAX_KEEP_ENDED_DAYS)
        {
            return Err(ConfigError::invalid(
                key("keep_ended_days"),
                format!("must be at most {MAX_KEEP_ENDED_DAYS}"),
            ));
        }
        Ok(())
    }
}

/// `FIRST-LAST` as two ports, FIRST <= LAST, neither 0.
pub fn port_range(text: &str) -> Option<(u16, u16)> {
    let (first, last) = text.split_once('-')?;
    let first: u16 = first.trim().parse().ok()?;
    let last: u16 = last.trim().parse().ok()?;
    (first > 0 && first <= last).then_some((first, last))
}

/// An overcommit ratio, when set, is a number of at least 1.
pub(super) fn check_overcommit(key: &str, ratio: Option<f64>) -> Result<(), ConfigError> {
    match ratio {
        Some(r) if !r.is_finite() || r < 1.0 => {
            Err(ConfigError::invalid(key, "must be a number of at least 1"))
        }
        _ => Ok(()),
    }
}

/// `kind = "ssh"`: owned hosts reached over SSH, each running kiln.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshSection {
    pub name: String,
    /// The region label of its grants; defaults to kilnd's `region`.
    #[serde(default)]
    pub region: Option<String>,
    /// The hosts, in the order grants fill them (`[[backend.host]]`).
    #[serde(rename = "host")]
    pub hosts: Vec<SshHostSection>,
}

/// One `[[backend.host]]` of an `ssh` backend.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshHostSection {
    /// `host` or `host:port` (22 by default; IPv6 in brackets).
    pub address: String,
    /// Defaults to root.
    #[serde(default)]
    pub user: Option<String>,
    /// The bridge's private key for that host (OpenSSH ed25519).
    pub identity_file: PathBuf,
    /// The host's SSH key, pinned (`ssh-ed25519 AAAA...`): any other is
    /// refused.
    pub host_key: String,
    /// `kiln` on that host, when not on its PATH.
    #[serde(default)]
    pub kiln: Option<String>,
    /// Its `KILN_HOME`, when not the default.
    #[serde(default)]
    pub kiln_home: Option<String>,
}

impl SshSection {
    /// Each host named, pinned, and listed once.
    fn check(&self, prefix: &str) -> Result<(), ConfigError> {
        if self.hosts.is_empty() {
            return Err(ConfigError::invalid(
                format!("{prefix}.host"),
                "an ssh backend needs at least one [[backend.host]]",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (j, h) in self.hosts.iter().enumerate() {
            let key = |k: &str| format!("{prefix}.host[{j}].{k}");
            if h.address.trim().is_empty() || h.address.chars().any(char::is_whitespace) {
                return Err(ConfigError::invalid(
                    key("address"),
                    "must be host or host:port",
                ));
            }
            if !seen.insert(h.address.as_str()) {
                return Err(ConfigError::invalid(
                    key("address"),
                    format!("{} is listed twice", h.address),
                ));
            }
            if let Err(e) = ssh_key::PublicKey::from_openssh(h.host_key.trim()) {
                return Err(ConfigError::invalid(
                    key("host_key"),
                    format!("host {}: not an OpenSSH public key ({e})", h.address),
                ));
            }
            if h.user.as_deref().is_some_and(str::is_empty) {
                return Err(ConfigError::invalid(key("user"), "must not be empty"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_are_two_ordered_ports() {
        assert_eq!(port_range("20000-20999"), Some((20000, 20999)));
        assert_eq!(port_range(" 22 - 22 "), Some((22, 22)));
        for bad in ["", "20000", "2-1", "0-10", "1-65536", "a-b", "1-2-3"] {
            assert_eq!(port_range(bad), None, "{bad}");
        }
    }
}
