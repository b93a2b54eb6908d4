//! A safe layer over KVM: the VM, its vCPUs, guest memory slots, the in-kernel irqchip, IRQ
//! lines, MSI routes, irqfds and ioeventfds, and CPUID. It owns every KVM ioctl the monitor makes; it knows nothing of boot
//! protocols, devices or guests' operating systems.

mod kick;
mod kvm;
mod state;
mod vcpu;
mod vm;

pub use kick::Kicker;
pub use kvm::Kvm;
pub use state::{
    FpuRegs, FpuState, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE, StateCaps, VcpuState, VmState,
};
pub use vcpu::{INTERNAL_ERROR_EMULATION, Vcpu, VcpuExit};
pub use vm::{FIRST_MSI_GSI, MAX_GSI, MsiRoute, Vm};

pub use kvm_bindings::{
    CpuId, kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs,
    kvm_vcpu_events,
};

/// What went wrong talking to KVM. Each message says what the user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error(
        "{path} does not exist: load the KVM module for this CPU (`modprobe kvm_intel` or \
         `modprobe kvm_amd`) and make sure VT-x/AMD-V is enabled in the firmware"
    )]
    NoKvm { path: String },
    #[error("permission denied opening {path}: run as root or add your user to group kvm")]
    KvmAccess { path: String },
    #[error("cannot open {path}: {source}")]
    KvmOpen {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "KVM API version {found} is not the supported version 12: this host kernel is not usable"
    )]
    ApiVersion { found: i32 },
    #[error("KVM lacks {what}: this host kernel is too old or built without it")]
    MissingCapability { what: &'static str },
    #[error("{op} failed: {source}")]
    Ioctl {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted {accepted} of {requested} MSRs; MSR {first_rejected:#x} was refused")]
    MsrRejected {
        accepted: usize,
        requested: usize,
        first_rejected: u32,
    },
    #[error("guest memory region at {addr:#x} ({len:#x} bytes) cannot be registered: {why}")]
    Memory { addr: u64, len: u64, why: String },
    #[error("{what} data of {got} bytes does not fit the pending access of {want} bytes")]
    InDataSize {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("no {what} is pending on this vCPU: its last exit was something else")]
    NothingPending { what: &'static str },
    #[error("GSI {gsi} cannot carry an MSI route: MSI GSIs are {FIRST_MSI_GSI}..={MAX_GSI}")]
    BadGsi { gsi: u32 },
    #[error("{count} interrupt routes are more than KVM takes: use fewer PCI devices")]
    TooManyRoutes { count: usize },
    #[error("snapshot state of {what} cannot be used: {why}")]
    BadState { what: &'static str, why: String },
    #[error(
        "the snapshot's guest TSC runs at {saved} kHz, this host's at {here} kHz, and this \
         host's KVM cannot scale it (no KVM_CAP_TSC_CONTROL): restore on a host with the same \
         TSC frequency"
    )]
    TscFrequency { saved: u32, here: u32 },
    #[error("cannot set up the vCPU kick signal: {0}")]
    Signal(std::io::Error),
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// Wraps a kvm-ioctls error with the name of the operation.
pub(crate) fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HypervisorError {
    move |source| HypervisorError::Ioctl { op, source }
}
