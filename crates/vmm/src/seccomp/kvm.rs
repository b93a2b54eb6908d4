//! The KVM ioctl requests each thread kind may make, by exact request number (as Firecracker
//! lists them), not by KVM's type byte: a thread a guest takes over cannot reach KVM
//! requests the monitor never makes (creating VMs or devices, guest debugging, encryption
//! ops, MSR filters, ...) nor, on the guest-facing threads, the ones only setup and
//! snapshots make.
//!
//! Numbers are built the way the kernel's `_IO`/`_IOR`/`_IOW`/`_IOWR` build them, from
//! kvm-bindings' struct sizes and the directions kvm-ioctls uses (which are the kernel's, odd
//! ones included: `KVM_SET_IRQCHIP` is `_IOR`, `KVM_GET_DIRTY_LOG` is `_IOW`).
//!
//! Who makes what (crates/hypervisor owns every call; the threads are the monitor's):
//! - the main thread builds the VM (and on `--on-reboot restart` rebuilds it after its filter
//!   is in, starting vCPU and device threads that then carry its filter too); restoring a
//!   snapshot or an incoming migration happens before its filter, so the `KVM_SET_*` of
//!   saved state (irqchip, PIT, clock, XSAVE, MP state, ...) are allowed to no thread;
//! - vCPU threads run the guest, read and write registers (and inject exceptions) to
//!   complete instructions KVM's emulator gives up on, and serve the guest's device accesses: serial and ACPI interrupt
//!   lines, MSI-X routes and their irqfds, ioeventfds following BAR moves;
//! - api threads save state for snapshots and migration (the vCPUs parked), switch dirty
//!   logging on and read the log, and press the ACPI power button (`shutdown`);
//! - console threads raise the serial interrupt on input;
//! - device workers signal interrupts through irqfds (eventfd writes) and make no KVM
//!   ioctl; nor does the signal thread.

use super::Kind;
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_fpu, kvm_ioeventfd,
    kvm_irq_level, kvm_irq_routing, kvm_irqchip, kvm_irqfd, kvm_lapic_state, kvm_mp_state,
    kvm_msr_list, kvm_msrs, kvm_pit_config, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use std::mem::size_of;

/// KVM's ioctl type byte.
const KVMIO: u64 = 0xae;

const WRITE: u64 = 1;
const READ: u64 = 2;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
const fn io(nr: u64) -> u64 {
    ioc(0, nr, 0)
}
const fn ior<T>(nr: u64) -> u64 {
    ioc(READ, nr, size_of::<T>())
}
const fn iow<T>(nr: u64) -> u64 {
    ioc(WRITE, nr, size_of::<T>())
}
const fn iowr<T>(nr: u64) -> u64 {
    ioc(READ | WRITE, nr, size_of::<T>())
}

type Req = (u64, &'static str);

// On the /dev/kvm fd.
const GET_API_VERSION: Req = (io(0x00), "KVM_GET_API_VERSION");
const CREATE_VM: Req = (io(0x01), "KVM_CREATE_VM");
const GET_MSR_INDEX_LIST: Req = (iowr::<kvm_msr_list>(0x02), "KVM_GET_MSR_INDEX_LIST");
const CHECK_EXTENSION: Req = (io(0x03), "KVM_CHECK_EXTENSION");
const GET_VCPU_MMAP_SIZE: Req = (io(0x04), "KVM_GET_VCPU_MMAP_SIZE");
const GET_SUPPORTED_CPUID: Req = (iowr::<kvm_cpuid2>(0x05), "KVM_GET_SUPPORTED_CPUID");

// On the VM fd.
const CREATE_VCPU: Req = (io(0x41), "KVM_CREATE_VCPU");
const GET_DIRTY_LOG: Req = (iow::<kvm_dirty_log>(0x42), "KVM_GET_DIRTY_LOG");
const SET_USER_MEMORY_REGION: Req = (
    iow::<kvm_userspace_memory_region>(0x46),
    "KVM_SET_USER_MEMORY_REGION",
);
const SET_TSS_ADDR: Req = (io(0x47), "KVM_SET_TSS_ADDR");
const SET_IDENTITY_MAP_ADDR: Req = (iow::<u64>(0x48), "KVM_SET_IDENTITY_MAP_ADDR");
const CREATE_IRQCHIP: Req = (io(0x60), "KVM_CREATE_IRQCHIP");
const IRQ_LINE: Req = (iow::<kvm_irq_level>(0x61), "KVM_IRQ_LINE");
const GET_IRQCHIP: Req = (iowr::<kvm_irqchip>(0x62), "KVM_GET_IRQCHIP");
const SET_IRQCHIP: Req = (ior::<kvm_irqchip>(0x63), "KVM_SET_IRQCHIP");
const SET_GSI_ROUTING: Req = (iow::<kvm_irq_routing>(0x6a), "KVM_SET_GSI_ROUTING");
const IRQFD: Req = (iow::<kvm_irqfd>(0x76), "KVM_IRQFD");
const CREATE_PIT2: Req = (iow::<kvm_pit_config>(0x77), "KVM_CREATE_PIT2");
const IOEVENTFD: Req = (iow::<kvm_ioeventfd>(0x79), "KVM_IOEVENTFD");
const SET_CLOCK: Req = (iow::<kvm_clock_data>(0x7b), "KVM_SET_CLOCK");
const GET_CLOCK: Req = (ior::<kvm_clock_data>(0x7c), "KVM_GET_CLOCK");
const GET_PIT2: Req = (ior::<kvm_pit_state2>(0x9f), "KVM_GET_PIT2");
const SET_PIT2: Req = (iow::<kvm_pit_state2>(0xa0), "KVM_SET_PIT2");

// On vCPU fds.
const RUN: Req = (io(0x80), "KVM_RUN");
const GET_REGS: Req = (ior::<kvm_regs>(0x81), "KVM_GET_REGS");
const SET_REGS: Req = (iow::<kvm_regs>(0x82), "KVM_SET_REGS");
const GET_SREGS: Req = (ior::<kvm_sregs>(0x83), "KVM_GET_SREGS");
const SET_SREGS: Req = (iow::<kvm_sregs>(0x84), "KVM_SET_SREGS");
const GET_MSRS: Req = (iowr::<kvm_msrs>(0x88), "KVM_GET_MSRS");
const SET_MSRS: Req = (iow::<kvm_msrs>(0x89), "KVM_SET_MSRS");
const GET_FPU: Req = (ior::<kvm_fpu>(0x8c), "KVM_GET_FPU");
const SET_FPU: Req = (iow::<kvm_fpu>(0x8d), "KVM_SET_FPU");
const GET_LAPIC: Req = (ior::<kvm_lapic_state>(0x8e), "KVM_GET_LAPIC");
const SET_LAPIC: Req = (iow::<kvm_lapic_state>(0x8f), "KVM_SET_LAPIC");
const SET_CPUID2: Req = (iow::<kvm_cpuid2>(0x90), "KVM_SET_CPUID2");
const GET_CPUID2: Req = (iowr::<kvm_cpuid2>(0x91), "KVM_GET_CPUID2");
const GET_MP_STATE: Req = (ior::<kvm_mp_state>(0x98), "KVM_GET_MP_STATE");
const SET_MP_STATE: Req = (iow::<kvm_mp_state>(0x99), "KVM_SET_MP_STATE");
const GET_VCPU_EVENTS: Req = (ior::<kvm_vcpu_events>(0x9f), "KVM_GET_VCPU_EVENTS");
const SET_VCPU_EVENTS: Req = (iow::<kvm_vcpu_events>(0xa0), "KVM_SET_VCPU_EVENTS");
const GET_DEBUGREGS: Req = (ior::<kvm_debugregs>(0xa1), "KVM_GET_DEBUGREGS");
const SET_DEBUGREGS: Req = (iow::<kvm_debugregs>(0xa2), "KVM_SET_DEBUGREGS");
const SET_TSC_KHZ: Req = (io(0xa2), "KVM_SET_TSC_KHZ");
const GET_TSC_KHZ: Req = (io(0xa3), "KVM_GET_TSC_KHZ");
const GET_XSAVE: Req = (ior::<kvm_xsave>(0xa4), "KVM_GET_XSAVE");
const SET_XSAVE: Req = (iow::<kvm_xsave>(0xa5), "KVM_SET_XSAVE");
const GET_XCRS: Req = (ior::<kvm_xcrs>(0xa6), "KVM_GET_XCRS");
const SET_XCRS: Req = (iow::<kvm_xcrs>(0xa7), "KVM_SET_XCRS");

/// Opening KVM and creating the VM, its platform devices and vCPUs (`Kvm::open`,
/// `create_vm`, `Vm::set_memory`, `create_platform_devices`, `create_vcpu`).
const BUILD: &[Req] = &[
    GET_API_VERSION,
    CHECK_EXTENSION,
    GET_SUPPORTED_CPUID,
    GET_MSR_INDEX_LIST,
    CREATE_VM,
    GET_VCPU_MMAP_SIZE,
    SET_USER_MEMORY_REGION,
    SET_TSS_ADDR,
    SET_IDENTITY_MAP_ADDR,
    CREATE_IRQCHIP,
    CREATE_PIT2,
    CREATE_VCPU,
];

/// A booting vCPU's first state (x86/boot.rs: CPU template, FPU, LAPIC LINTs, registers,
/// MSRs, the TSC frequency for PVM's command line).
const BOOT: &[Req] = &[
    SET_CPUID2,
    SET_FPU,
    GET_LAPIC,
    SET_LAPIC,
    GET_SREGS,
    SET_SREGS,
    SET_REGS,
    SET_MSRS,
    GET_TSC_KHZ,
];

/// Running a vCPU: `KVM_RUN` (also to finish a pending exit before parking), registers to
/// complete instructions the monitor emulates and to report a crash, pending events to
/// inject an exception (the #BP of an `int3` PVM's emulator gives up on).
const RUNNING: &[Req] = &[
    RUN,
    GET_REGS,
    SET_REGS,
    GET_SREGS,
    SET_SREGS,
    GET_VCPU_EVENTS,
    SET_VCPU_EVENTS,
];

/// The guest's device accesses, served on vCPU threads: interrupt lines (serial, ACPI),
/// MSI-X routes and their irqfds, queue ioeventfds at the BAR the guest chose.
const GUEST_IO: &[Req] = &[IRQ_LINE, IRQFD, SET_GSI_ROUTING, IOEVENTFD];

/// Saving a paused VM (snapshots, migration): irqchip, PIT, clock, every vCPU's state, and
/// the dirty-page log (switched on by re-registering the memory slots).
const SAVE: &[Req] = &[
    GET_IRQCHIP,
    GET_PIT2,
    GET_CLOCK,
    SET_USER_MEMORY_REGION,
    GET_DIRTY_LOG,
    GET_CPUID2,
    GET_REGS,
    GET_SREGS,
    GET_FPU,
    GET_XSAVE,
    GET_XCRS,
    GET_DEBUGREGS,
    GET_LAPIC,
    GET_MSRS,
    GET_MP_STATE,
    GET_VCPU_EVENTS,
    GET_TSC_KHZ,
];

/// Restoring saved state into a fresh VM: done before the main thread's filter, so allowed
/// to no thread. Listed to name them in the docs.
pub(super) const RESTORE_ONLY: &[Req] = &[
    SET_IRQCHIP,
    SET_PIT2,
    SET_CLOCK,
    SET_TSC_KHZ,
    SET_XSAVE,
    SET_XCRS,
    SET_DEBUGREGS,
    SET_MP_STATE,
];

/// The KVM requests `kind` may make, without duplicates, in a stable order.
pub(super) fn requests(kind: Kind) -> Vec<Req> {
    let groups: &[&[Req]] = match kind {
        // The main thread's filter also binds the vCPU and device threads a restart starts.
        Kind::Main => &[BUILD, BOOT, RUNNING, GUEST_IO],
        Kind::Vcpu => &[RUNNING, GUEST_IO],
        Kind::Api => &[SAVE, &[IRQ_LINE]],
        Kind::Console => &[&[IRQ_LINE]],
        Kind::Device | Kind::Signals => &[],
    };
    let mut v: Vec<Req> = Vec::new();
    for r in groups.iter().flat_map(|g| g.iter()) {
        if !v.iter().any(|(n, _)| *n == r.0) {
            v.push(*r);
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values the kernel headers give (as Firecracker's filters and strace print them).
    #[test]
    fn request_numbers_are_the_kernels() {
        let known: &[(Req, u64)] = &[
            (RUN, 0xae80),
            (CREATE_VM, 0xae01),
            (GET_REGS, 0x8090_ae81),
            (SET_REGS, 0x4090_ae82),
            (GET_SREGS, 0x8138_ae83),
            (SET_SREGS, 0x4138_ae84),
            (GET_MSRS, 0xc008_ae88),
            (SET_MSRS, 0x4008_ae89),
            (GET_LAPIC, 0x8400_ae8e),
            (SET_CPUID2, 0x4008_ae90),
            (SET_USER_MEMORY_REGION, 0x4020_ae46),
            (IRQ_LINE, 0x4008_ae61),
            (IRQFD, 0x4020_ae76),
            (IOEVENTFD, 0x4040_ae79),
            (SET_GSI_ROUTING, 0x4008_ae6a),
            (GET_XSAVE, 0x9000_aea4),
            (GET_IRQCHIP, 0xc208_ae62),
            (SET_IRQCHIP, 0x8208_ae63),
            (GET_DIRTY_LOG, 0x4010_ae42),
            (GET_VCPU_EVENTS, 0x8040_ae9f),
            (GET_PIT2, 0x8070_ae9f),
        ];
        for ((nr, name), want) in known {
            assert_eq!(*nr, *want, "{name}: {nr:#x}, the kernel's is {want:#x}");
        }
    }

    #[test]
    fn every_named_request_is_distinct() {
        let mut all: Vec<Req> = Kind::ALL.iter().flat_map(|k| requests(*k)).collect();
        all.extend(RESTORE_ONLY);
        for (nr, name) in &all {
            for (nr2, name2) in &all {
                assert!(
                    nr != nr2 || name == name2,
                    "{name} and {name2} share {nr:#x}"
                );
            }
        }
    }

    /// The docs say no thread may make these: keep it true.
    #[test]
    fn restore_only_requests_are_allowed_to_no_kind() {
        for kind in Kind::ALL {
            let reqs = requests(kind);
            for r in RESTORE_ONLY {
                assert!(!reqs.contains(r), "{kind} may make {}", r.1);
            }
        }
    }

    #[test]
    fn guest_facing_threads_get_no_setup_requests() {
        for kind in [Kind::Vcpu, Kind::Device, Kind::Console, Kind::Signals] {
            let reqs = requests(kind);
            for r in [CREATE_VM, CREATE_VCPU, SET_USER_MEMORY_REGION, SET_CPUID2] {
                assert!(!reqs.contains(&r), "{kind} may make {}", r.1);
            }
        }
        // Whatever a vCPU thread may do, the main thread (whose filter a restart's vCPU
        // threads carry too) must allow.
        let main = requests(Kind::Main);
        for r in requests(Kind::Vcpu) {
            assert!(main.contains(&r), "main lacks {}", r.1);
        }
    }
}
