//! Pure translations between kiln's cloud model and GCE's: names and
//! labels checked against GCE's rules, the `requestId` derived from a
//! token, instance status to [`CloudState`], and which machine types run
//! KVM or TDX. No I/O, so every rule is unit-tested here.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use google_cloud_compute_v1::model::{self, instance::Status};
use sha2::{Digest, Sha256};

use crate::backends::cloud::api::{CloudInstance, CloudState, MachineType, Placement};

/// Instance name and label key rule: a lowercase letter first, then
/// lowercase letters, digits and `-` (label keys also `_`), at most 63.
fn gce_word(s: &str, underscore: bool, must_start_letter: bool) -> bool {
    let b = s.as_bytes();
    b.len() <= 63
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || (underscore && *c == b'_')
        })
        && (!must_start_letter || b.first().is_some_and(u8::is_ascii_lowercase))
}

/// Whether `name` is a valid GCE instance name (RFC 1035 label).
pub(crate) fn valid_instance_name(name: &str) -> bool {
    gce_word(name, false, true) && !name.ends_with('-')
}

/// The labels for `tags`, or the first tag GCE would refuse. kiln's tags
/// are already lowercase (grant and bridge ids), so nothing is rewritten:
/// a rewritten label could no longer be found by its tag.
pub(crate) fn labels(tags: &BTreeMap<String, String>) -> Result<HashMap<String, String>, String> {
    if tags.len() > 64 {
        return Err(format!("{} tags; GCE allows 64 labels", tags.len()));
    }
    for (k, v) in tags {
        if !gce_word(k, true, true) {
            return Err(format!(
                "tag key {k:?} is not a GCE label key (lowercase letter first, then \
                 lowercase letters, digits, - or _, at most 63)"
            ));
        }
        if !gce_word(v, true, false) {
            return Err(format!(
                "tag {k}={v:?}: not a GCE label value (lowercase letters, digits, - or _, \
                 at most 63)"
            ));
        }
    }
    Ok(tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// The aggregatedList filter selecting instances that carry every tag
/// (label values checked by [`labels`], so they need no escaping).
pub(crate) fn label_filter(tags: &BTreeMap<String, String>) -> String {
    tags.iter()
        .map(|(k, v)| format!("(labels.{k} = \"{v}\")"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// GCE's `requestId` must be a UUID (not the zero one), while kiln's
/// token is any string: the UUID is the first 16 bytes of the token's
/// SHA-256 with the version-4 and RFC 4122 variant bits set, so every
/// retry of one create sends the same id and distinct tokens (almost
/// surely) differ.
pub(crate) fn request_id(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid::Uuid::from_bytes(b).hyphenated().to_string()
}

/// The last path segment of a GCE resource URL (`.../zones/us-central1-a`
/// → `us-central1-a`); a bare name is its own.
pub(crate) fn last_segment(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

/// The region of a zone: its name less the last `-x`.
pub(crate) fn region_of(zone: &str) -> &str {
    zone.rsplit_once('-').map_or(zone, |(r, _)| r)
}

/// GCE status → kiln's state. GCE's TERMINATED is a stopped instance
/// (it can be started again); a deleted one is simply gone.
pub(crate) fn state(status: Option<&Status>) -> CloudState {
    match status {
        Some(Status::Provisioning | Status::Staging | Status::Pending) => CloudState::Pending,
        Some(Status::Running) => CloudState::Running,
        Some(
            Status::Stopping
            | Status::Suspending
            | Status::PendingStop
            | Status::Deprovisioning
            | Status::Repairing,
        ) => CloudState::Stopping,
        Some(Status::Stopped | Status::Suspended | Status::Terminated) => CloudState::Stopped,
        // A status newer than this client: not serving yet, and the
        // caller's readiness timeout decides.
        _ => CloudState::Pending,
    }
}

/// The instance as kiln describes it; `None` without a name or zone.
pub(crate) fn instance(i: &model::Instance) -> Option<CloudInstance> {
    let name = i.name.clone()?;
    let zone = last_segment(i.zone.as_deref()?).to_string();
    let machine_type = i
        .machine_type
        .as_deref()
        .map(last_segment)
        .unwrap_or_default()
        .to_string();
    let nic = i.network_interfaces.first();
    let private_ip = nic
        .and_then(|n| n.network_ip.as_deref())
        .and_then(|ip| ip.parse::<IpAddr>().ok());
    let public_ip = nic
        .into_iter()
        .flat_map(|n| &n.access_configs)
        .find_map(|ac| {
            ac.nat_ip
                .as_deref()
                .and_then(|ip| ip.parse::<IpAddr>().ok())
        });
    let launched_at = i
        .creation_timestamp
        .as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc));
    Some(CloudInstance {
        id: name,
        placement: Placement {
            region: region_of(&zone).to_string(),
            zone,
            machine_type,
        },
        state: state(i.status.as_ref()),
        public_ip,
        private_ip,
        tags: i
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        launched_at,
        state_reason: i.status_message.clone().filter(|m| !m.is_empty()),
    })
}

/// Machine families GCE runs as Intel TDX confidential VMs.
const TDX_FAMILIES: &[&str] = &["c3"];

/// A machine type as kiln describes it; `None` without a name.
pub(crate) fn machine_type(m: &model::MachineType) -> Option<MachineType> {
    let name = m.name.clone()?;
    let family = name.split('-').next().unwrap_or_default();
    let arm = matches!(
        m.architecture,
        Some(model::machine_type::Architecture::Arm64)
    );
    Some(MachineType {
        vcpus: m
            .guest_cpus
            .and_then(|c| u32::try_from(c).ok())
            .unwrap_or(0),
        ram_mib: m.memory_mb.and_then(|c| u64::try_from(c).ok()).unwrap_or(0),
        kvm: !arm && crate::config::runs_kvm(crate::config::Cloud::Gcp, &name),
        tdx: !arm && TDX_FAMILIES.contains(&family),
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_stable_v4_uuids() {
        let a = request_id("grant-0123abcd-create");
        assert_eq!(a, request_id("grant-0123abcd-create"));
        assert_ne!(a, request_id("grant-0123abcd-create2"));
        let u = uuid::Uuid::parse_str(&a).unwrap();
        assert_eq!(u.get_version_num(), 4);
        assert_eq!(u.get_variant(), uuid::Variant::RFC4122);
        assert!(!u.is_nil());
        assert_ne!(request_id(""), uuid::Uuid::nil().to_string());
    }

    #[test]
    fn labels_follow_gce_rules() {
        let ok: BTreeMap<String, String> = [
            ("kiln-bridge".to_string(), "b-0a1b".to_string()),
            ("kiln-grant".to_string(), "0123abcd".to_string()),
            ("empty".to_string(), String::new()),
        ]
        .into();
        assert_eq!(labels(&ok).unwrap().len(), 3);
        for (k, v) in [
            ("Kiln", "x"),
            ("1kiln", "x"),
            ("kiln", "X"),
            ("kiln", "a.b"),
            ("", "x"),
        ] {
            let t = [(k.to_string(), v.to_string())].into();
            assert!(labels(&t).is_err(), "{k}={v}");
        }
        let long = [("k".to_string(), "a".repeat(64))].into();
        assert!(labels(&long).is_err());
        assert_eq!(
            label_filter(&ok),
            "(labels.empty = \"\") (labels.kiln-bridge = \"b-0a1b\") (labels.kiln-grant = \"0123abcd\")"
        );
    }

    #[test]
    fn instance_names_follow_gce_rules() {
        assert!(valid_instance_name("kiln-0123abcd"));
        for bad in ["", "Kiln", "0kiln", "kiln-", "kiln_a", &"k".repeat(64)] {
            assert!(!valid_instance_name(bad), "{bad}");
        }
    }

    #[test]
    fn terminated_on_gce_is_stopped() {
        assert_eq!(state(Some(&Status::Provisioning)), CloudState::Pending);
        assert_eq!(state(Some(&Status::Staging)), CloudState::Pending);
        assert_eq!(state(Some(&Status::Running)), CloudState::Running);
        assert_eq!(state(Some(&Status::Stopping)), CloudState::Stopping);
        assert_eq!(state(Some(&Status::Suspending)), CloudState::Stopping);
        assert_eq!(state(Some(&Status::Terminated)), CloudState::Stopped);
        assert_eq!(state(Some(&Status::Suspended)), CloudState::Stopped);
        assert_eq!(state(None), CloudState::Pending);
    }

    #[test]
    fn zones_and_urls() {
        assert_eq!(region_of("us-central1-a"), "us-central1");
        assert_eq!(region_of("europe-west4-c"), "europe-west4");
        assert_eq!(
            last_segment("https://x/compute/v1/projects/p/zones/us-central1-a"),
            "us-central1-a"
        );
        assert_eq!(last_segment("n2-standard-8"), "n2-standard-8");
    }

    #[test]
    fn kvm_on_intel_families_tdx_on_c3() {
        let mt = |name: &str, arm: bool| {
            let mut m = model::MachineType::new()
                .set_name(name)
                .set_guest_cpus(4)
                .set_memory_mb(16384);
            if arm {
                m = m.set_architecture(model::machine_type::Architecture::Arm64);
            }
            machine_type(&m).unwrap()
        };
        let c3 = mt("c3-standard-4", false);
        assert!(c3.kvm && c3.tdx);
        assert_eq!((c3.vcpus, c3.ram_mib), (4, 16384));
        assert!(mt("n2-standard-8", false).kvm);
        assert!(mt("n1-standard-4", false).kvm);
        assert!(!mt("n2-standard-8", false).tdx);
        for no in [
            "e2-standard-4",
            "n2d-standard-8",
            "c3d-standard-4",
            "t2d-standard-1",
        ] {
            assert!(!mt(no, false).kvm, "{no}");
        }
        assert!(!mt("c4a-standard-4", true).kvm);
    }
}
