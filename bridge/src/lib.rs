//! kiln-bridge: drives micro-VMs for grants. It starts `kiln-vmm`
//! processes and talks to their agents; it must not talk to KVM itself.
//! Grants, the Backend trait and the Fleet router are still to come (issue 6).

pub mod machine;
