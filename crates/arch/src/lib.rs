//! x86_64 platform setup: kernel loaders (bzImage, ELF/PVH), boot parameters, the e820 map,
//! CPU templates (the CPUID/MSR set a guest sees) and ACPI tables. It computes what goes into
//! guest memory and registers; it does not run vCPUs or emulate devices.

pub mod acpi;
pub mod cpuid;
pub mod layout;
pub mod loader;
pub mod regs;

pub use cpuid::{CpuTemplate, build_cpuid};
pub use loader::{BootProtocol, KernelBoot, load_kernel};

/// What went wrong preparing a guest; each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("not a Linux kernel: expected a bzImage or an ELF vmlinux with a PVH note ({0})")]
    NotAKernel(String),
    #[error("cannot read the kernel: {0}")]
    KernelRead(std::io::Error),
    #[error("cannot read the initrd: {0}")]
    InitrdRead(std::io::Error),
    #[error(
        "the initrd is {size} bytes but only {available} bytes of guest memory are free for it \
         below the kernel's initrd limit: give the VM more memory or use a smaller initrd"
    )]
    InitrdTooLarge { size: u64, available: u64 },
    #[error("{0}")]
    Cmdline(String),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("{0}")]
    CpuTemplate(String),
    #[error("ACPI tables: {0}")]
    Acpi(String),
}
