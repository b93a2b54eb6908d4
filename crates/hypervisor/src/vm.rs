//! One KVM virtual machine: its memory slots, in-kernel interrupt controllers and vCPUs.

use crate::{HypervisorError, Result, Vcpu, ioctl};
use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::{
    Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};
use vmm_sys_util::eventfd::EventFd;

/// Where KVM puts the three pages it needs for real-mode TSS emulation on Intel, and the
/// identity-map page: inside the 32-bit MMIO hole, just below the BIOS area at 4 GiB - 16 MiB
/// … 4 GiB, where no RAM and no device lives.
pub const TSS_ADDRESS: u64 = 0xfffb_d000;
pub const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

pub struct Vm {
    fd: VmFd,
    /// Kept so the mappings KVM was given live as long as the VM.
    memory: Option<GuestMemoryMmap>,
}

impl Vm {
    pub(crate) fn new(fd: VmFd) -> Self {
        Vm { fd, memory: None }
    }

    /// Registers every region of `memory` as one KVM memory slot. Call once.
    pub fn set_memory(&mut self, memory: &GuestMemoryMmap) -> Result<()> {
        if self.memory.is_some() {
            return Err(HypervisorError::Memory {
                addr: 0,
                len: 0,
                why: "guest memory is already registered for this VM".into(),
            });
        }
        for (slot, region) in memory.iter().enumerate() {
            let addr = region.start_addr().raw_value();
            let len = region.len();
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| HypervisorError::Memory {
                    addr,
                    len,
                    why: e.to_string(),
                })?;
            let slot = u32::try_from(slot).map_err(|_| HypervisorError::Memory {
                addr,
                len,
                why: "too many memory regions".into(),
            })?;
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: addr,
                memory_size: len,
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live mapping owned by `memory`; a clone of `memory`
            // (sharing the same mappings) is stored in `self` below, so the mapping outlives
            // the VM's use of it.
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        self.memory = Some(memory.clone());
        Ok(())
    }

    /// Creates the in-kernel PIC + IOAPIC + local APICs and the PIT, and gives KVM the
    /// addresses it needs for its private pages. Call before creating vCPUs.
    pub fn create_platform_devices(&self) -> Result<()> {
        self.fd
            .set_tss_address(TSS_ADDRESS as usize)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        self.fd
            .set_identity_map_address(IDENTITY_MAP_ADDRESS)
            .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        self.fd
            .create_irq_chip()
            .map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            // A speaker port that reads as zero: no guest code depends on the speaker.
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))
    }

    /// Drives interrupt line `gsi` of the in-kernel irqchip.
    pub fn set_irq_line(&self, gsi: u32, level: bool) -> Result<()> {
        self.fd
            .set_irq_line(gsi, level)
            .map_err(ioctl("KVM_IRQ_LINE"))
    }

    /// Makes a write to `fd` raise `gsi` in the kernel, without a trip through the monitor.
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd.register_irqfd(fd, gsi).map_err(ioctl("KVM_IRQFD"))
    }

    pub fn create_vcpu(&self, id: u32) -> Result<Vcpu> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(ioctl("KVM_CREATE_VCPU"))?;
        Vcpu::new(id, fd, self.fd.run_size())
    }

    pub fn memory(&self) -> Option<&GuestMemoryMmap> {
        self.memory.as_ref()
    }
}
