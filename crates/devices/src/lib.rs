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

/// A function the embedding monitor runs at the start of each of this crate's device worker threads,
/// before any guest-influenced work, with the thread's kind ("device"): the monitor confines
/// the thread there (its seccomp filter). Set once; later calls are ignored.
static THREAD_START_HOOK: std::sync::OnceLock<fn(&'static str)> = std::sync::OnceLock::new();

pub fn set_thread_start_hook(hook: fn(&'static str)) {
    let _ = THREAD_START_HOOK.set(hook);
}

pub(crate) fn thread_started() {
    if let Some(hook) = THREAD_START_HOOK.get() {
        hook("device");
    }
}
