//! One KVM virtual machine: its memory slots, in-kernel interrupt controllers and vCPUs.

use crate::{HypervisorError, Result, StateCaps, Vcpu, ioctl};
use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
    KvmIrqRouting, kvm_irq_routing_entry, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use vm_memory::{
    Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};
use vmm_sys_util::eventfd::EventFd;

/// Where KVM puts the three pages it needs for real-mode TSS emulation on Intel, and the
/// identity-map page: inside the 32-bit MMIO hole, just below the BIOS area at 4 GiB - 16 MiB
/// … 4 GiB, where no RAM and no device lives.
pub const TSS_ADDRESS: u64 = 0xfffb_d000;
pub const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// GSIs 0..23 are the in-kernel PIC/IOAPIC pins; MSI routes use the GSIs above them.
pub const FIRST_MSI_GSI: u32 = 24;
/// KVM's limit on routing entries (`KVM_MAX_IRQ_ROUTES`), pins included.
pub const MAX_GSI: u32 = 4095;

/// KVM's in-kernel irqchips as routing entries name them.
const IRQCHIP_PIC_MASTER: u32 = 0;
const IRQCHIP_PIC_SLAVE: u32 = 1;
const IRQCHIP_IOAPIC: u32 = 2;

/// An MSI message a GSI delivers: the address the device writes and the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiRoute {
    pub address: u64,
    pub data: u32,
}

pub struct Vm {
    fd: VmFd,
    /// Kept so the mappings KVM was given live as long as the VM.
    memory: Option<GuestMemoryMmap>,
    /// The MSI routes by GSI; `KVM_SET_GSI_ROUTING` replaces the whole table, so every
    /// change sends all of them (with the irqchip pins).
    msi_routes: Mutex<BTreeMap<u32, MsiRoute>>,
    caps: StateCaps,
}

impl Vm {
    pub(crate) fn new(fd: VmFd, caps: StateCaps) -> Self {
        Vm {
            fd,
            memory: None,
            msi_routes: Mutex::new(BTreeMap::new()),
            caps,
        }
    }

    pub(crate) fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub(crate) fn caps(&self) -> StateCaps {
        self.caps
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
        self.register_slots(memory, 0)?;
        self.memory = Some(memory.clone());
        Ok(())
    }

    /// Registers (or re-registers, with new `flags`) every region of `memory` as one KVM
    /// memory slot, numbered in order.
    fn register_slots(&self, memory: &GuestMemoryMmap, flags: u32) -> Result<()> {
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
                flags,
                guest_phys_addr: addr,
                memory_size: len,
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live mapping owned by `memory`, and a clone of
            // `memory` (sharing the same mappings) is or is about to be stored in `self`, so
            // the mapping outlives the VM's use of it. Re-registering a slot with the same
            // range only changes its flags.
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// Turns KVM's log of the pages vCPUs write on for every memory slot (for diff snapshots
    /// and migration). From here on each first write to a page after a
    /// [`Vm::take_dirty_log`] costs the guest a fault. Writes by this process (devices,
    /// emulated instructions) are not in it: the caller logs those itself.
    pub fn enable_dirty_log(&self) -> Result<()> {
        let memory = self.memory.as_ref().ok_or(HypervisorError::Memory {
            addr: 0,
            len: 0,
            why: "guest memory is not registered yet".into(),
        })?;
        self.register_slots(memory, KVM_MEM_LOG_DIRTY_PAGES)
    }

    /// The pages vCPUs wrote since logging began or since the last call, one bitmap per
    /// slot (bit `i` of word `i / 64` is the slot's page `i`); KVM clears them.
    pub fn take_dirty_log(&self) -> Result<Vec<Vec<u64>>> {
        let memory = self.memory.as_ref().ok_or(HypervisorError::Memory {
            addr: 0,
            len: 0,
            why: "guest memory is not registered yet".into(),
        })?;
        memory
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                self.fd
                    .get_dirty_log(slot as u32, region.len() as usize)
                    .map_err(ioctl("KVM_GET_DIRTY_LOG"))
            })
            .collect()
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

    /// Makes GSI `gsi` (at least [`FIRST_MSI_GSI`]) deliver `route`, or nothing (`None`).
    /// The legacy pins keep KVM's default routing: GSI 0..15 on both the PIC and the IOAPIC,
    /// 16..23 on the IOAPIC.
    pub fn set_msi_route(&self, gsi: u32, route: Option<MsiRoute>) -> Result<()> {
        if !(FIRST_MSI_GSI..=MAX_GSI).contains(&gsi) {
            return Err(HypervisorError::BadGsi { gsi });
        }
        let mut routes = self.routes();
        let old = match route {
            Some(r) => routes.insert(gsi, r),
            None => routes.remove(&gsi),
        };
        if old == route {
            return Ok(());
        }
        let result = self.push_routes(&routes);
        if result.is_err() {
            // Keep our table what KVM has.
            match old {
                Some(r) => routes.insert(gsi, r),
                None => routes.remove(&gsi),
            };
        }
        result
    }

    fn routes(&self) -> MutexGuard<'_, BTreeMap<u32, MsiRoute>> {
        // Every critical section leaves the map whole.
        self.msi_routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push_routes(&self, routes: &BTreeMap<u32, MsiRoute>) -> Result<()> {
        let mut entries = Vec::with_capacity(40 + routes.len());
        for gsi in 0..FIRST_MSI_GSI {
            let mut chip = |irqchip, pin| {
                let mut e = kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_IRQCHIP,
                    ..Default::default()
                };
                e.u.irqchip.irqchip = irqchip;
                e.u.irqchip.pin = pin;
                entries.push(e);
            };
            if gsi < 8 {
                chip(IRQCHIP_PIC_MASTER, gsi);
            } else if gsi < 16 {
                chip(IRQCHIP_PIC_SLAVE, gsi - 8);
            }
            chip(IRQCHIP_IOAPIC, gsi);
        }
        for (&gsi, r) in routes {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = r.address as u32;
            e.u.msi.address_hi = (r.address >> 32) as u32;
            e.u.msi.data = r.data;
            entries.push(e);
        }
        let table =
            KvmIrqRouting::from_entries(&entries).map_err(|_| HypervisorError::TooManyRoutes {
                count: entries.len(),
            })?;
        self.fd
            .set_gsi_routing(&table)
            .map_err(ioctl("KVM_SET_GSI_ROUTING"))
    }

    /// Makes a guest write of any width to `addr` signal `fd` inside the kernel instead of
    /// exiting to the monitor.
    pub fn register_ioevent(&self, fd: &EventFd, addr: u64) -> Result<()> {
        self.fd
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(ioctl("KVM_IOEVENTFD"))
    }

    pub fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> Result<()> {
        self.fd
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(ioctl("KVM_IOEVENTFD (deassign)"))
    }

    pub fn create_vcpu(&self, id: u32) -> Result<Vcpu> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(ioctl("KVM_CREATE_VCPU"))?;
        Vcpu::new(id, fd, self.fd.run_size(), self.caps)
    }

    pub fn memory(&self) -> Option<&GuestMemoryMmap> {
        self.memory.as_ref()
    }
}
