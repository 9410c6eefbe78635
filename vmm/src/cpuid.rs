//! CPUID for each vCPU: KVM's supported set, normalised for the VM's
//! topology, with the host profile's masks applied.

use kvm_bindings::kvm_cpuid_entry2;

use crate::host::HostProfile;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

const ECX_CX16: u32 = 1 << 13;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;

/// Rewrites `entries` (from KVM_GET_SUPPORTED_CPUID) for vCPU `index` of `count`.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8, profile: &HostProfile) {
    let apic_id = u32::from(index);
    let count = u32::from(count.max(1));
    // Bits needed to number `count` cores in the x2APIC id.
    let core_shift = 32 - (count - 1).leading_zeros();
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (count.min(255) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if profile.mask_cx16 {
                    e.ecx &= !ECX_CX16;
                }
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // Cores per package - 1 in EAX[31:26]; each cache is private.
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                match e.index {
                    // SMT level: one thread per core.
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    // Core level: all vCPUs are cores of one package.
                    1 => {
                        e.eax = core_shift;
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            LEAF_KVM_SIGNATURE => {
                e.eax = LEAF_KVM_FEATURES;
                e.ebx = u32::from_le_bytes(*b"KVMK");
                e.ecx = u32::from_le_bytes(*b"VMKV");
                e.edx = u32::from_le_bytes(*b"M\0\0\0");
            }
            LEAF_KVM_FEATURES if profile.mask_pv_hypercalls => {
                e.eax &=
                    !(KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::Virtualization;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(LEAF_FEATURES, 0),
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_TOPOLOGY, 1),
            entry(LEAF_TOPOLOGY, 2),
            entry(LEAF_KVM_SIGNATURE, 0),
            entry(LEAF_KVM_FEATURES, 0),
        ]
    }

    #[test]
    fn pvm_masks_cx16_and_pv_hypercalls() {
        let mut e = sample();
        normalize(
            &mut e,
            1,
            2,
            &HostProfile::for_virtualization(Virtualization::Pvm),
        );
        assert_eq!(e[0].ecx & ECX_CX16, 0);
        assert_eq!(e[0].ecx & ECX_HYPERVISOR, ECX_HYPERVISOR);
        assert_eq!(e[0].ebx >> 24, 1, "APIC id");
        assert_eq!((e[0].ebx >> 16) & 0xff, 2, "logical count");
        let pv = e[5].eax;
        assert_eq!(pv & KVM_FEATURE_PV_UNHALT, 0);
        assert_eq!(pv & KVM_FEATURE_PV_SEND_IPI, 0);
        assert_eq!(pv & KVM_FEATURE_PV_SCHED_YIELD, 0);
        assert_eq!(pv & 1, 1, "kvm-clock stays");
    }

    #[test]
    fn hardware_profile_keeps_features() {
        let mut e = sample();
        normalize(
            &mut e,
            0,
            1,
            &HostProfile::for_virtualization(Virtualization::Vmx),
        );
        assert_eq!(e[0].ecx & ECX_CX16, ECX_CX16);
        assert_eq!(e[5].eax, 0xffff_ffff);
        assert_eq!(e[0].edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_describes_one_package() {
        let mut e = sample();
        normalize(
            &mut e,
            3,
            4,
            &HostProfile::for_virtualization(Virtualization::Vmx),
        );
        assert_eq!((e[1].ebx, e[1].edx), (1, 3));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx), (2, 4, (2 << 8) | 1));
        assert_eq!((e[3].eax, e[3].ebx, e[3].ecx), (0, 0, 2));
        assert_eq!(&e[4].ebx.to_le_bytes(), b"KVMK");
    }
}
