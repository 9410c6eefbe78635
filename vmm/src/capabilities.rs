//! What this host can offer micro-VMs: `kiln-vmm --capabilities --json`.

use kvm_ioctls::{Cap, Kvm};
use serde::Serialize;

use crate::config::MAX_VCPUS;
use crate::host::{detect_virtualization, Virtualization};

/// KVM_CAP_VM_TYPES (not in kvm-ioctls' Cap enum).
const KVM_CAP_VM_TYPES: u64 = kvm_bindings::KVM_CAP_VM_TYPES as u64;

#[derive(Clone, Debug, Serialize)]
pub struct HostCapabilities {
    /// /dev/kvm opened.
    pub kvm: bool,
    /// Why /dev/kvm could not be used, when it could not.
    pub kvm_error: Option<String>,
    pub kvm_api_version: Option<i32>,
    pub virtualization: Virtualization,
    /// Most vCPUs kiln-vmm gives one VM on this host.
    pub max_vcpus: usize,
    /// KVM VM types offered (KVM_CAP_VM_TYPES bit numbers).
    pub vm_types: Vec<u32>,
    /// Intel TDX guests can be created (KVM_X86_TDX_VM offered).
    pub tdx: bool,
    pub hugepages_2m_total: u64,
    pub hugepages_2m_free: u64,
    pub host_cpus: usize,
    pub host_memory_mib: Option<u64>,
}

pub fn probe() -> HostCapabilities {
    let virtualization = detect_virtualization(std::path::Path::new("/"));
    let read_num = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let hp = "/sys/kernel/mm/hugepages/hugepages-2048kB";
    let mut caps = HostCapabilities {
        kvm: false,
        kvm_error: None,
        kvm_api_version: None,
        virtualization,
        max_vcpus: 0,
        vm_types: Vec::new(),
        tdx: false,
        hugepages_2m_total: read_num(&format!("{hp}/nr_hugepages")),
        hugepages_2m_free: read_num(&format!("{hp}/free_hugepages")),
        host_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        host_memory_mib: crate::config::host_memory_mib(),
    };
    match Kvm::new() {
        Ok(kvm) => {
            caps.kvm = true;
            caps.kvm_api_version = Some(kvm.get_api_version());
            let kvm_max = kvm
                .get_max_vcpus()
                .max(kvm.check_extension_int(Cap::MaxVcpus) as usize);
            caps.max_vcpus = kvm_max.min(usize::from(MAX_VCPUS));
            let types = kvm.check_extension_raw(KVM_CAP_VM_TYPES);
            caps.vm_types = (0..32)
                .filter(|b| types > 0 && types & (1 << b) != 0)
                .collect();
            caps.tdx = caps.vm_types.contains(&kvm_bindings::KVM_X86_TDX_VM);
        }
        Err(e) => caps.kvm_error = Some(crate::vm::describe_kvm_open_error(&e)),
    }
    caps
}
