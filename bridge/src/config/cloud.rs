//! `kind = "aws"` and `kind = "gcp"`: cloud overflow. One section type for
//! both clouds (the keys mean the same), with the few keys only one cloud
//! has checked per kind.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

/// The most concurrent instances one backend may be allowed.
const MAX_INSTANCES: u32 = 10_000;

/// Which cloud a [`CloudSection`] is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cloud {
    Aws,
    Gcp,
}

impl Cloud {
    pub fn word(self) -> &'static str {
        match self {
            Cloud::Aws => "aws",
            Cloud::Gcp => "gcp",
        }
    }
}

/// One cloud backend.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudSection {
    pub name: String,
    /// The region label grants ask for (defaults to kilnd's `region`):
    /// a grant overflows here from the owned backends of the same label.
    #[serde(default)]
    pub region: Option<String>,
    /// The cloud's regions, in the order they are tried.
    pub regions: Vec<String>,
    /// Zones to use (`eu-central-1a`, `europe-west4-b`); every zone of
    /// each region when unset.
    #[serde(default)]
    pub zones: Vec<String>,
    /// Instance (machine) types grants may get, in the order tried; a
    /// grant gets the first that fits it. Each must run KVM (AWS `.metal`;
    /// GCE types with nested virtualization).
    pub machine_types: Vec<String>,
    /// The most instances of this backend running at once.
    pub max_instances: u32,
    /// The boot image: an AMI id, or a GCE image URL.
    #[serde(default)]
    pub image: Option<String>,
    /// The boot image per region, where it differs (AMI ids are
    /// regional): `region = "ami-…"`, over `image`.
    #[serde(default)]
    pub images: BTreeMap<String, String>,
    /// Where instances fetch the kiln bundle (`kiln fleet bundle`); no
    /// credential in it.
    pub bundle_url: String,
    /// The bundle's SHA-256 (hex): an instance refuses any other.
    pub bundle_sha256: String,
    /// The port requesters SSH to on the instance (default 2222; 22 is
    /// the instance's own sshd).
    #[serde(default)]
    pub ssh_port: Option<u16>,
    /// Which address requesters connect to: `public` (default) or
    /// `private` (the bridge and requesters share the cloud network).
    #[serde(default)]
    pub connect: Option<String>,
    /// How long an instance may take from create to its VM answering SSH
    /// before it is terminated and the next zone tried (default 600).
    #[serde(default)]
    pub ready_timeout_secs: Option<u64>,
    /// How often the bridge lists its instances (status sync, orphan
    /// reaper; default 30).
    #[serde(default)]
    pub sync_secs: Option<u64>,
    /// The most create requests per minute (default 30).
    #[serde(default)]
    pub creates_per_minute: Option<u32>,
    /// The API endpoint, instead of the cloud's own (an emulator, a
    /// private endpoint).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// AWS: a profile of the shared config files; the standard credential
    /// chain when unset.
    #[serde(default)]
    pub profile: Option<String>,
    /// AWS: the subnet to launch into, per zone (`zone = "subnet-…"`); the
    /// zone's default subnet when its zone is not listed.
    #[serde(default)]
    pub subnets: BTreeMap<String, String>,
    /// AWS: security groups for the instances (they must let requesters
    /// reach `ssh_port`); the VPC's default group when unset.
    #[serde(default)]
    pub security_group_ids: Vec<String>,
    /// GCP: the project instances are created in.
    #[serde(default)]
    pub project: Option<String>,
    /// GCP: a service-account key file; the metadata server (or the
    /// application-default chain) when unset.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
}

/// Where requesters reach an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectVia {
    Public,
    Private,
}

impl CloudSection {
    /// The boot image of `region`.
    pub fn image_for(&self, region: &str) -> Option<&str> {
        self.images
            .get(region)
            .or(self.image.as_ref())
            .map(String::as_str)
            .filter(|i| !i.trim().is_empty())
    }

    pub fn connect_via(&self) -> ConnectVia {
        match self.connect.as_deref() {
            Some("private") => ConnectVia::Private,
            _ => ConnectVia::Public,
        }
    }

    pub(super) fn check(&self, cloud: Cloud, prefix: &str) -> Result<(), ConfigError> {
        let key = |name: &str| format!("{prefix}.{name}");
        let listed = |name: &str, items: &[String], required: bool| {
            if required && items.is_empty() {
                return Err(ConfigError::invalid(key(name), "must list at least one"));
            }
            let mut seen = std::collections::BTreeSet::new();
            for item in items {
                if item.trim().is_empty() || item.contains(char::is_whitespace) {
                    return Err(ConfigError::invalid(
                        key(name),
                        format!("{item:?} is not a name"),
                    ));
                }
                if !seen.insert(item) {
                    return Err(ConfigError::invalid(
                        key(name),
                        format!("{item} is listed twice"),
                    ));
                }
            }
            Ok(())
        };
        listed("regions", &self.regions, true)?;
        listed("zones", &self.zones, false)?;
        listed("machine_types", &self.machine_types, true)?;
        if let Some(t) = self.machine_types.iter().find(|t| !runs_kvm(cloud, t)) {
            return Err(ConfigError::invalid(
                key("machine_types"),
                match cloud {
                    Cloud::Aws => format!("{t} cannot run KVM: EC2 needs a .metal type"),
                    Cloud::Gcp => format!(
                        "{t} cannot run KVM: GCE allows nested virtualization on Intel \
                         families only ({})",
                        GCE_NESTED_VIRT_FAMILIES.join(", ")
                    ),
                },
            ));
        }
        if let Some(z) = self
            .zones
            .iter()
            .find(|z| !self.regions.iter().any(|r| zone_in_region(z, r)))
        {
            return Err(ConfigError::invalid(
                key("zones"),
                format!("{z} is in none of the backend's regions"),
            ));
        }
        if !(1..=MAX_INSTANCES).contains(&self.max_instances) {
            return Err(ConfigError::invalid(
                key("max_instances"),
                format!("must be 1 to {MAX_INSTANCES}"),
            ));
        }
        if self.image.as_deref().is_some_and(|i| i.trim().is_empty()) {
            return Err(ConfigError::invalid(key("image"), "must not be empty"));
        }
        if let Some(r) = self.images.keys().find(|r| !self.regions.contains(r)) {
            return Err(ConfigError::invalid(
                key("images"),
                format!("{r} is not one of the backend's regions"),
            ));
        }
        if let Some(r) = self.regions.iter().find(|r| self.image_for(r).is_none()) {
            return Err(ConfigError::invalid(
                key("image"),
                format!("missing: no image for region {r} (set image, or images.{r})"),
            ));
        }
        check_bundle_url(&self.bundle_url)
            .map_err(|p| ConfigError::invalid(key("bundle_url"), p))?;
        if self.bundle_sha256.len() != 64
            || !self.bundle_sha256.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(ConfigError::invalid(
                key("bundle_sha256"),
                "must be 64 hex digits",
            ));
        }
        if self.ssh_port == Some(0) {
            return Err(ConfigError::invalid(key("ssh_port"), "must not be 0"));
        }
        if self
            .connect
            .as_deref()
            .is_some_and(|c| c != "public" && c != "private")
        {
            return Err(ConfigError::invalid(
                key("connect"),
                "must be public or private",
            ));
        }
        for (name, value) in [
            ("ready_timeout_secs", self.ready_timeout_secs),
            ("sync_secs", self.sync_secs),
            ("creates_per_minute", self.creates_per_minute.map(u64::from)),
        ] {
            if value == Some(0) {
                return Err(ConfigError::invalid(key(name), "must be greater than zero"));
            }
        }
        if let Some(url) = &self.endpoint_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::invalid(
                    key("endpoint_url"),
                    "must be an http:// or https:// URL",
                ));
            }
        }
        if let Some(z) = self
            .subnets
            .keys()
            .find(|z| !self.regions.iter().any(|r| zone_in_region(z, r)))
        {
            return Err(ConfigError::invalid(
                key("subnets"),
                format!("{z} is in none of the backend's regions"),
            ));
        }
        match cloud {
            Cloud::Aws => {
                for (name, set) in [
                    ("project", self.project.is_some()),
                    ("credentials_file", self.credentials_file.is_some()),
                ] {
                    if set {
                        return Err(ConfigError::invalid(key(name), "is a gcp key"));
                    }
                }
            }
            Cloud::Gcp => {
                for (name, set) in [
                    ("profile", self.profile.is_some()),
                    ("subnets", !self.subnets.is_empty()),
                    ("security_group_ids", !self.security_group_ids.is_empty()),
                ] {
                    if set {
                        return Err(ConfigError::invalid(key(name), "is an aws key"));
                    }
                }
                if self.project.as_deref().is_none_or(|p| p.trim().is_empty()) {
                    return Err(ConfigError::invalid(
                        key("project"),
                        "missing: a gcp backend needs its project",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Machine families whose VMs allow nested virtualization: GCE offers it
/// on Intel-based families only, so not on E2 (shared-core, mixed CPUs),
/// AMD (`…d` families, T2D), or Arm (T2A, C4A).
const GCE_NESTED_VIRT_FAMILIES: &[&str] = &[
    "n1", "n2", "n4", "c2", "c3", "c4", "m1", "m2", "m3", "h3", "z3",
];

/// Whether KVM runs on instances of `machine_type`: EC2 has no nested
/// virtualization, so only bare metal (`c5.metal`, `m7i.metal-24xl`);
/// GCE by family.
pub fn runs_kvm(cloud: Cloud, machine_type: &str) -> bool {
    match cloud {
        Cloud::Aws => machine_type
            .split_once('.')
            .is_some_and(|(_, size)| size == "metal" || size.starts_with("metal-")),
        Cloud::Gcp => machine_type
            .split_once('-')
            .is_some_and(|(family, _)| GCE_NESTED_VIRT_FAMILIES.contains(&family)),
    }
}

/// Whether zone `zone` is in region `region` (`eu-central-1a` in
/// `eu-central-1`, `europe-west4-b` in `europe-west4`).
pub fn zone_in_region(zone: &str, region: &str) -> bool {
    zone.strip_prefix(region).is_some_and(|rest| {
        let rest = rest.strip_prefix('-').unwrap_or(rest);
        !rest.is_empty() && rest.chars().all(|c| c.is_ascii_lowercase())
    })
}

/// The bundle is fetched by the instance with no credential: http(s), and
/// no user:password in it.
fn check_bundle_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("must be an http:// or https:// URL")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err("has no host".into());
    }
    if authority.contains('@') {
        return Err("must carry no credential".into());
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_types_that_run_kvm_are_accepted() {
        for t in ["c5.metal", "m7i.metal-24xl"] {
            assert!(runs_kvm(Cloud::Aws, t), "{t}");
        }
        for t in ["c5.xlarge", "metal", "c5.metalx"] {
            assert!(!runs_kvm(Cloud::Aws, t), "{t}");
        }
        for t in ["n2-standard-8", "c3-standard-4"] {
            assert!(runs_kvm(Cloud::Gcp, t), "{t}");
        }
        for t in ["e2-medium", "n2d-standard-8", "t2a-standard-4", "n2"] {
            assert!(!runs_kvm(Cloud::Gcp, t), "{t}");
        }
    }

    #[test]
    fn zones_belong_to_their_region() {
        assert!(zone_in_region("eu-central-1a", "eu-central-1"));
        assert!(zone_in_region("europe-west4-b", "europe-west4"));
        assert!(!zone_in_region("eu-central-1a", "eu-central-2"));
        assert!(!zone_in_region("eu-central-1", "eu-central-1"));
        assert!(!zone_in_region("eu-central-12a", "eu-central-1"));
    }

    #[test]
    fn bundle_urls_carry_no_credential() {
        assert!(check_bundle_url("https://example.test/kiln.tar.gz").is_ok());
        assert!(check_bundle_url("http://127.0.0.1:8000/b").is_ok());
        for bad in [
            "ftp://x/b",
            "https://user:pw@example.test/b",
            "https:///b",
            "https://x/a b",
        ] {
            assert!(check_bundle_url(bad).is_err(), "{bad}");
        }
    }
}
