//! A fresh boot of the x86_64 machine: boot structures, ACPI tables and the kernel in RAM,
//! each vCPU's CPUID from its template, the boot processor at the kernel's entry (the
//! application processors wait in the in-kernel LAPIC for INIT/SIPI).

use super::X86Error;
use std::fs::File;
use vm_memory::GuestMemoryMmap;
use vme_api::MachineSpec;
use vme_arch::{CpuTemplate, regs};
use vme_hypervisor::{CpuId, Vcpu};

/// What the `pvm` template adds to the kernel command line. PVM hosts do not intercept
/// `cpuid` (the guest sees the host's leaves whatever KVM_SET_CPUID2 says; see the
/// hypervisor crate's tests), so features PVM's emulator cannot complete are hidden from
/// Linux here instead: rdtscp, lfence-rdtsc (3:18), cx16, popcnt, rdrand, fsgsbase, invpcid,
/// rdseed, smap, xsave (154; Linux 6.1 no longer knows `noxsave`), PKU and PCID (the set
/// measured in PVM.md).
///
/// `nopv`: KVM hypercalls (`vmcall`) never complete on PVM (measured: a 2-vCPU guest spins
/// at the PV send-IPI hypercall; ptp_kvm spins the same way), and only `nopv` keeps Linux
/// from making them. It also drops kvmclock, so the TSC frequency is given (`tsc_early_khz`,
/// from KVM) and the TSC trusted: with no PIT, HPET or PM timer that calibrates in time
/// here, Linux would otherwise mark it unstable and fall back to jiffies.
pub fn pvm_cmdline(tsc_khz: u32) -> String {
    format!(
        "clearcpuid=59,114,141,151,154,158,288,298,306,308 nopku nopcid \
         nopv tsc_early_khz={tsc_khz} tsc=reliable"
    )
}

/// Ports of the ACPI register block (see `vme_devices::acpi`).
pub const ACPI_PORT: u16 = 0x600;
/// GSI of the ACPI GED (power button): level-triggered, like the SCI it stands in for.
pub const GED_GSI: u32 = 9;

fn open(what: &'static str, path: &std::path::Path) -> Result<File, X86Error> {
    File::open(path).map_err(|source| X86Error::Open {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// Writes what the kernel finds in RAM and sets every vCPU up to boot it.
pub fn prepare(
    mem: &GuestMemoryMmap,
    spec: &MachineSpec,
    template: CpuTemplate,
    supported: &CpuId,
    is_pvm: bool,
    vcpus: &[Vcpu],
) -> Result<(), X86Error> {
    let mem_size = spec.memory.bytes();
    regs::write_boot_structures(mem)?;
    let rsdp = vme_arch::acpi::write_tables(mem, spec.vcpus, ACPI_PORT, GED_GSI)?;
    // Every VM starts with its own generation ID; a clone gets another (and is told).
    let mut generation = [0u8; 16];
    crate::snapshot::clone::random(&mut generation, "the VM generation ID")
        .map_err(X86Error::Setup)?;
    vme_arch::acpi::write_generation_id(mem, &generation)?;
    let mut kernel = open("kernel", &spec.kernel)?;
    let mut initrd = match &spec.initrd {
        Some(p) => Some(open("initrd", p)?),
        None => None,
    };
    let cmdline = if template == CpuTemplate::Pvm && !spec.cmdline.contains("clearcpuid") {
        format!("{} {}", spec.cmdline, pvm_cmdline(vcpus[0].tsc_khz()?))
    } else {
        spec.cmdline.clone()
    };
    let boot = vme_arch::load_kernel(
        mem,
        mem_size,
        &mut kernel,
        initrd.as_mut(),
        &cmdline,
        Some(rsdp),
    )?;
    log::info!(
        "x86_64: {} vCPU(s), {} MiB, CPU template {template:?}{}, entry {:#x} ({:?}), cmdline {cmdline:?}",
        spec.vcpus,
        mem_size >> 20,
        if is_pvm { " (PVM host)" } else { "" },
        boot.entry,
        boot.protocol
    );
    for vcpu in vcpus {
        let id = vcpu.id();
        vcpu.set_cpuid2(&vme_arch::build_cpuid(supported, template, id, spec.vcpus)?)?;
        set_boot_msrs(vcpu)?;
        vcpu.set_fpu(&regs::boot_fpu())?;
        let mut lapic = vcpu.lapic()?;
        regs::configure_lapic(&mut lapic);
        vcpu.set_lapic(&lapic)?;
        if id == 0 {
            // Application processors wait in the in-kernel LAPIC for INIT/SIPI.
            let mut sregs = vcpu.sregs()?;
            regs::boot_sregs(&boot, &mut sregs);
            vcpu.set_sregs(&sregs)?;
            vcpu.set_regs(&regs::boot_regs(&boot))?;
        }
    }
    Ok(())
}

/// Sets the boot MSRs; one this host refuses (PVM lacks some, e.g. MTRRs) is logged and
/// skipped rather than failing the boot: none of them is needed for Linux to start.
fn set_boot_msrs(vcpu: &Vcpu) -> Result<(), X86Error> {
    let mut msrs = regs::boot_msrs();
    while !msrs.is_empty() {
        match vcpu.set_msrs(&msrs) {
            Ok(()) => return Ok(()),
            Err(vme_hypervisor::HypervisorError::MsrRejected { first_rejected, .. }) => {
                log::debug!(
                    "vCPU {}: host refuses MSR {first_rejected:#x}; skipped",
                    vcpu.id()
                );
                msrs.retain(|m| m.0 != first_rejected);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
