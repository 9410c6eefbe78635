//! The VM-wide state KVM keeps: the PIT, the interrupt controllers (PIC
//! master and slave, IOAPIC) and the KVM clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum MachineStateError {
    #[error("cannot read the {what}")]
    Get {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot restore the {what}")]
    Set {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

#[derive(Clone, Serialize, Deserialize)]
pub struct MachineState {
    pub pit: kvm_pit_state2,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub clock: kvm_clock_data,
}

fn chip(vm: &VmFd, id: u32, what: &'static str) -> Result<kvm_irqchip, MachineStateError> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c)
        .map_err(|source| MachineStateError::Get { what, source })?;
    Ok(c)
}

impl MachineState {
    pub fn save(vm: &VmFd) -> Result<Self, MachineStateError> {
        let get = |what| move |source| MachineStateError::Get { what, source };
        Ok(MachineState {
            pit: vm.get_pit2().map_err(get("PIT"))?,
            pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER, "PIC master")?,
            pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE, "PIC slave")?,
            ioapic: chip(vm, KVM_IRQCHIP_IOAPIC, "IOAPIC")?,
            clock: vm.get_clock().map_err(get("KVM clock"))?,
        })
    }

    /// Restores the state; the clock last, once every vCPU is restored.
    pub fn restore(&self, vm: &VmFd) -> Result<(), MachineStateError> {
        let set = |what| move |source| MachineStateError::Set { what, source };
        vm.set_pit2(&self.pit).map_err(set("PIT"))?;
        vm.set_irqchip(&self.pic_master)
            .map_err(set("PIC master"))?;
        vm.set_irqchip(&self.pic_slave).map_err(set("PIC slave"))?;
        vm.set_irqchip(&self.ioapic).map_err(set("IOAPIC"))?;
        // KVM_SET_CLOCK takes only the clock value; the flags KVM_GET_CLOCK
        // reported (TSC stable, realtime) are refused on the way back.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(set("KVM clock"))?;
        Ok(())
    }
}
