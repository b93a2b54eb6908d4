//! Virtual devices shared by both machine kinds: 16550 serial, i8042 reset, CMOS RTC, virtio
//! (blk, net, rng over the virtio-mmio or virtio-pci transport), PCI bus 0 with MSI-X
//! ([`pci`]), and the host tap backend of virtio-net ([`net`]). Devices are small state machines: their effects leave through traits (interrupt
//! lines, VM events, output sinks), so they test without KVM. The threads devices own are
//! virtio-net's receive worker, because frames arrive when no vCPU touches the device, and
//! a rate-limited device's refill thread, which resumes a throttled queue when tokens are
//! back (`virtio::rate_limit`).
//!
//! Every register access a guest makes reaches a device through a [`bus::Bus`], which maps
//! address ranges to devices and refuses overlaps; a device sees only offsets inside its own
//! range.

pub mod acpi;
pub mod bus;
pub mod i8042;
pub mod net;
pub mod pci;
pub mod rtc;
pub mod serial;
pub mod virtio;

/// An interrupt line into the guest's interrupt controller (IOAPIC/PIC GSI on x86, a PLIC
/// source on riscv64).
pub trait IrqLine: Send + Sync {
    fn set_level(&self, high: bool);
    /// Edge-style notification for devices whose condition is an event, not a level.
    fn pulse(&self) {
        self.set_level(true);
        self.set_level(false);
    }
}

/// Machine-wide events a device can cause.
pub trait VmEvents: Send + Sync {
    /// The guest asked for power off (ACPI S5, SBI system reset).
    fn power_off(&self);
    /// The guest asked for a reset (i8042 pulse, ACPI reset register, SBI reboot).
    fn reboot(&self);
}
