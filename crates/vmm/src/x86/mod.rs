//! The x86_64 machine on KVM: builds the VM from a [`MachineSpec`] (memory with the PCI hole,
//! in-kernel irqchip and PIT, vCPUs with their CPU template, kernel and initrd, legacy
//! devices, virtio disks/nets/rng on PCI bus 0 with MSI-X) and runs one thread per vCPU until
//! the VM ends. The PCI windows are in `vme_arch::layout`; Linux finds the host bridge in the
//! DSDT and ECAM in the MCFG (`vme_arch::acpi`).

mod emu;
mod pci;
mod vcpu;

use crate::control::{ControlHook, ExitReason, RunContext};
use crate::virtio;
use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use vcpu::{VcpuReport, VcpuThread};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vme_api::MachineSpec;
use vme_api::control::RunState;
use vme_arch::{CpuTemplate, layout, regs};
use vme_devices::bus::{Bus, SharedDevice};
use vme_devices::virtio::{DiscardError, GuestMemory, MemError};
use vme_devices::{IrqLine, acpi, i8042, rtc, serial};
use vme_hypervisor::{Kicker, Kvm, Vm};

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
const SERIAL_PORT: u16 = 0x3f8;
const SERIAL_GSI: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum X86Error {
    #[error("{0}")]
    Hypervisor(#[from] vme_hypervisor::HypervisorError),
    #[error("{0}")]
    Arch(#[from] vme_arch::ArchError),
    #[error("cannot open {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("cannot allocate {bytes} bytes of guest memory: {why}")]
    Memory { bytes: u64, why: String },
    #[error("{0}")]
    Setup(String),
}

/// An interrupt line into KVM's in-kernel irqchip.
struct GsiLine {
    vm: Arc<Vm>,
    gsi: u32,
}

impl IrqLine for GsiLine {
    fn set_level(&self, high: bool) {
        if let Err(e) = self.vm.set_irq_line(self.gsi, high) {
            log::warn!("cannot drive GSI {}: {e}", self.gsi);
        }
    }
}

/// Guest RAM as the virtio devices see it. Every access is checked against the RAM regions
/// (the PCI hole and anything past the end are not RAM), so a hostile address is an error.
struct Ram(GuestMemoryMmap);

impl Ram {
    fn err(addr: u64, len: u64) -> MemError {
        MemError { addr, len }
    }
}

impl GuestMemory for Ram {
    fn check(&self, addr: u64, len: u64) -> Result<(), MemError> {
        let ok = addr.checked_add(len).is_some()
            && usize::try_from(len).is_ok_and(|n| self.0.check_range(GuestAddress(addr), n));
        ok.then_some(()).ok_or(Self::err(addr, len))
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let len = buf.len() as u64;
        self.check(addr, len)?;
        self.0
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| Self::err(addr, len))
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemError> {
        let len = data.len() as u64;
        self.check(addr, len)?;
        self.0
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| Self::err(addr, len))
    }
    // Single atomic accesses: ring indices race with the guest's vCPUs.
    fn load_u16(&self, addr: u64) -> Result<u16, MemError> {
        self.0
            .load(GuestAddress(addr), Ordering::Acquire)
            .map_err(|_| Self::err(addr, 2))
    }
    fn store_u16(&self, addr: u64, val: u16) -> Result<(), MemError> {
        self.0
            .store(val, GuestAddress(addr), Ordering::Release)
            .map_err(|_| Self::err(addr, 2))
    }
    /// Region by region (a range may only span regions that touch in guest-physical space,
    /// since it must be RAM throughout).
    fn discard(&self, addr: u64, len: u64) -> Result<(), DiscardError> {
        use vm_memory::GuestMemoryRegion;
        DiscardError::check_pages(addr, len)?;
        self.check(addr, len)?;
        let (mut at, end) = (addr, addr + len);
        while at < end {
            let (region, offset) = self
                .0
                .to_region_addr(GuestAddress(at))
                .ok_or(Self::err(at, end - at))?;
            let n = (region.len() - offset.0).min(end - at);
            let host = region
                .get_host_address(offset)
                .map_err(|_| Self::err(at, n))?;
            // SAFETY: `host..host+n` lies inside one region's mapping (`n` is capped at the
            // region's end), which vm-memory created as private anonymous memory, and is
            // page-aligned (regions start on page boundaries and `at` is page-aligned).
            // MADV_DONTNEED swaps its pages for zero-fill-on-demand ones without unmapping:
            // every pointer into it stays valid, KVM's MMU notifier drops the guest's
            // mappings of those pages, and vCPUs racing on the range see old bytes or zeros.
            let r = unsafe { libc::madvise(host.cast(), n as usize, libc::MADV_DONTNEED) };
            if r != 0 {
                return Err(DiscardError::Host {
                    addr: at,
                    len: n,
                    source: std::io::Error::last_os_error(),
                });
            }
            at += n;
        }
        Ok(())
    }
}

/// Kicks every vCPU out of KVM_RUN when the VM is paused or stopped.
struct KickAll(Vec<Kicker>);

impl ControlHook for KickAll {
    fn state_changed(&self, state: RunState) {
        if state != RunState::Running {
            for k in &self.0 {
                k.kick();
            }
        }
    }
}

fn open(what: &'static str, path: &std::path::Path) -> Result<File, X86Error> {
    File::open(path).map_err(|source| X86Error::Open {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// Builds and runs the VM; returns why it ended.
pub fn run(spec: &MachineSpec, ctx: &RunContext) -> Result<ExitReason, X86Error> {
    let kvm = Kvm::open()?;
    let template = CpuTemplate::resolve(&spec.cpu_template, kvm.is_pvm())?;
    let max = kvm.max_vcpus();
    if spec.vcpus as usize > max.min(255) {
        return Err(X86Error::Setup(format!(
            "{} vCPUs requested but this host allows {}: lower --vcpus",
            spec.vcpus,
            max.min(255)
        )));
    }
    let mem_size = spec.memory.bytes();
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(mem_size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| X86Error::Memory {
        bytes: mem_size,
        why: e.to_string(),
    })?;
    let mut vm = kvm.create_vm()?;
    vm.set_memory(&mem)?;
    vm.create_platform_devices()?;
    let vm = Arc::new(vm);

    regs::write_boot_structures(&mem)?;
    let slots =
        virtio::devices(spec, layout::PCI_DEVICE_SLOTS, "x86_64").map_err(X86Error::Setup)?;
    let rsdp = vme_arch::acpi::write_tables(&mem, spec.vcpus, ACPI_PORT, GED_GSI)?;
    let mut kernel = open("kernel", &spec.kernel)?;
    let mut initrd = match &spec.initrd {
        Some(p) => Some(open("initrd", p)?),
        None => None,
    };
    let vcpus = (0..spec.vcpus)
        .map(|id| vm.create_vcpu(id))
        .collect::<Result<Vec<_>, _>>()?;
    let cmdline = if template == CpuTemplate::Pvm && !spec.cmdline.contains("clearcpuid") {
        format!("{} {}", spec.cmdline, pvm_cmdline(vcpus[0].tsc_khz()?))
    } else {
        spec.cmdline.clone()
    };
    let boot = vme_arch::load_kernel(
        &mem,
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
        if kvm.is_pvm() { " (PVM host)" } else { "" },
        boot.entry,
        boot.protocol
    );

    // Devices: the guest reaches each only through the port or MMIO bus, offsets checked by
    // the bus.
    let control = ctx.control.clone();
    let irq = |gsi| -> Arc<dyn IrqLine> {
        Arc::new(GsiLine {
            vm: vm.clone(),
            gsi,
        })
    };
    let out = ctx
        .console_output()
        .map_err(|e| X86Error::Setup(format!("cannot open the serial output: {e}")))?;
    let serial = Arc::new(Mutex::new(serial::Serial::new(irq(SERIAL_GSI), out)));
    let (i8042_data, i8042_cmd) = i8042::i8042(control.clone());
    let acpi_dev = Arc::new(Mutex::new(acpi::AcpiDevice::new(
        control.clone(),
        irq(GED_GSI),
    )));
    let mut pio = Bus::new();
    let devices: Vec<(u16, u64, SharedDevice)> = vec![
        (SERIAL_PORT, 8, serial.clone()),
        (i8042::DATA_PORT, 1, Arc::new(Mutex::new(i8042_data))),
        (i8042::COMMAND_PORT, 1, Arc::new(Mutex::new(i8042_cmd))),
        (rtc::INDEX_PORT, 2, Arc::new(Mutex::new(rtc::Rtc::new()))),
        (ACPI_PORT, acpi::LEN, acpi_dev.clone()),
    ];
    for (port, len, dev) in devices {
        pio.insert(u64::from(port), len, dev)
            .map_err(|e| X86Error::Setup(format!("device layout: {e}")))?;
    }
    let mut mmio = Bus::new();
    let ram = Arc::new(Ram(mem.clone()));
    // Stopped and joined when this function returns, after the vCPUs.
    let mut workers = virtio::Workers::default();
    pci::attach(&vm, &ram, slots, &mut workers, &mut pio, &mut mmio).map_err(X86Error::Setup)?;
    workers.follow_run_state(ctx);
    ctx.attach_console_input(serial);
    control.set_power_button(Box::new(move || {
        acpi_dev
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .press_power_button();
    }));

    let supported = kvm.supported_cpuid()?;
    let mut threads = Vec::new();
    let mut kickers = Vec::new();
    for vcpu in vcpus {
        let id = vcpu.id();
        vcpu.set_cpuid2(&vme_arch::build_cpuid(
            &supported, template, id, spec.vcpus,
        )?)?;
        set_boot_msrs(&vcpu)?;
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
        kickers.push(vcpu.kicker());
        threads.push(VcpuThread {
            vcpu,
            pio: pio.clone(),
            mmio: mmio.clone(),
            mem: mem.clone(),
            control: control.clone(),
        });
    }
    control.set_parkers(u64::from(spec.vcpus));
    control.add_hook(Arc::new(KickAll(kickers)));

    let mut handles = Vec::new();
    for t in threads {
        let id = t.vcpu.id();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || t.run())
            .map_err(|e| X86Error::Setup(format!("cannot start vCPU thread {id}: {e}")))?;
        handles.push(handle);
    }
    let reason = control.wait_for_exit();
    let reports: Vec<VcpuReport> = handles.into_iter().filter_map(|h| h.join().ok()).collect();
    // No frame may reach a VM that has stopped running.
    drop(workers);
    log_measurements(&reports);
    Ok(reason)
}

/// Sets the boot MSRs; one this host refuses (PVM lacks some, e.g. MTRRs) is logged and
/// skipped rather than failing the boot: none of them is needed for Linux to start.
fn set_boot_msrs(vcpu: &vme_hypervisor::Vcpu) -> Result<(), X86Error> {
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

fn log_measurements(reports: &[VcpuReport]) {
    for r in reports {
        let top: Vec<String> = {
            let mut v: Vec<_> = r.completer.stats().iter().collect();
            v.sort_by_key(|e| std::cmp::Reverse(e.1));
            v.into_iter()
                .take(8)
                .map(|(m, n)| format!("{m}={n}"))
                .collect()
        };
        log::info!(
            "vCPU {}: {} exits ({} port I/O, {} MMIO, {} completed by the monitor: {})",
            r.id,
            r.exits,
            r.io_exits,
            r.mmio_exits,
            r.completions,
            top.join(" ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RAM at [0, 1 MiB) and [4 GiB, 4 GiB + 1 MiB): a hole between, as with the PCI hole.
    fn ram() -> Ram {
        let mib = 1 << 20;
        Ram(GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), mib),
            (GuestAddress(layout::MMIO_HOLE_END), mib),
        ])
        .unwrap())
    }

    #[test]
    fn device_accesses_stay_inside_guest_ram() {
        let ram = ram();
        let mut buf = [0u8; 8];
        ram.write(0x1000, b"virtio!!").unwrap();
        ram.read(0x1000, &mut buf).unwrap();
        assert_eq!(&buf, b"virtio!!");
        // Straddling the end of a region, inside the hole, past the end, wrapping around.
        assert!(ram.read((1 << 20) - 4, &mut buf).is_err());
        assert!(ram.write(layout::MMIO_HOLE_START, &buf).is_err());
        assert!(
            ram.read(layout::MMIO_HOLE_END + (1 << 20), &mut buf)
                .is_err()
        );
        assert!(ram.check(u64::MAX - 3, 8).is_err());
        assert!(ram.check(0, u64::MAX).is_err());
        assert!(ram.check(layout::MMIO_HOLE_END, 1 << 20).is_ok());
        ram.store_u16(0x2000, 0xbeef).unwrap();
        assert_eq!(ram.load_u16(0x2000), Ok(0xbeef));
        assert!(ram.load_u16((1 << 20) - 1).is_err());
        assert!(ram.store_u16(layout::MMIO_HOLE_START, 1).is_err());
    }

    #[test]
    fn discard_zeroes_whole_pages_of_ram_only() {
        let ram = ram();
        let hi = layout::MMIO_HOLE_END;
        for at in [0x1000, 0x2000, 0x3000, hi, hi + 0x1000] {
            ram.write(at, b"resident").unwrap();
        }
        ram.discard(0x2000, 0x1000).unwrap();
        ram.discard(hi, 0x1000).unwrap();
        let mut buf = [0u8; 8];
        for (at, want) in [
            (0x1000, b"resident"),
            (0x2000, &[0u8; 8]),
            (0x3000, b"resident"),
            (hi, &[0u8; 8]),
            (hi + 0x1000, b"resident"),
        ] {
            ram.read(at, &mut buf).unwrap();
            assert_eq!(&buf, want, "at {at:#x}");
        }
        // Partial pages, the hole, straddling a region's end, wrapping: refused.
        assert!(ram.discard(0x1001, 0x1000).is_err());
        assert!(ram.discard(0x1000, 0x800).is_err());
        assert!(ram.discard(layout::MMIO_HOLE_START, 0x1000).is_err());
        assert!(ram.discard((1 << 20) - 0x1000, 0x2000).is_err());
        assert!(ram.discard(u64::MAX - 0xfff, 0x1000).is_err());
        ram.read(0x1000, &mut buf).unwrap();
        assert_eq!(&buf, b"resident");
    }
}
