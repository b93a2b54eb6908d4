//! The x86_64 machine on KVM: builds the VM from a [`MachineSpec`] (memory with the PCI hole,
//! in-kernel irqchip and PIT, vCPUs with their CPU template, kernel and initrd, legacy
//! devices, virtio disks/nets/rng on PCI bus 0 with MSI-X) and runs one thread per vCPU until
//! the VM ends. The PCI windows are in `vme_arch::layout`; Linux finds the host bridge in the
//! DSDT and ECAM in the MCFG (`vme_arch::acpi`).

mod boot;
pub mod dirty;
mod emu;
pub(crate) mod pci;
pub(crate) mod ram;
pub(crate) mod vcpu;

use crate::control::{ControlHook, ExitReason, RunContext};
use crate::snapshot::Restore;
use crate::snapshot::lineage::{History, read_chain};
use crate::snapshot::x86::{self as snap, LegacyDevices, X86Snapshotter};
use crate::virtio;
use boot::{ACPI_PORT, GED_GSI};
use dirty::DirtyPages;
use ram::Ram;
use std::sync::{Arc, Mutex};
use vcpu::{SharedVcpu, VcpuReport, VcpuThread};
use vm_memory::GuestMemoryMmap;
use vme_api::MachineSpec;
use vme_api::control::RunState;
use vme_arch::{CpuTemplate, layout};
use vme_devices::bus::{Bus, SharedDevice};
use vme_devices::{IrqLine, acpi, i8042, rtc, serial};
use vme_hypervisor::{CpuId, Kicker, Kvm, Vcpu, Vm};

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

/// Builds the VM and runs it until it ends: booted from the spec's kernel, or continuing
/// from the snapshot `restore`. Returns why it ended.
pub fn run(
    spec: &MachineSpec,
    ctx: &RunContext,
    restore: Option<&Restore>,
) -> Result<ExitReason, X86Error> {
    let kvm = Kvm::open()?;
    let template = CpuTemplate::resolve(&spec.cpu_template, kvm.is_pvm())?;
    let supported = kvm.supported_cpuid()?;
    let cpu = snap::cpu_model(template, &supported);
    if let Some(r) = restore {
        snap::check_cpu(r, &cpu).map_err(X86Error::Setup)?;
    }
    let max = kvm.max_vcpus().min(255);
    if spec.vcpus as usize > max {
        return Err(X86Error::Setup(format!(
            "{} vCPUs requested but this host allows {max}: lower --vcpus",
            spec.vcpus
        )));
    }
    let mem_size = spec.memory.bytes();
    // The chain the VM's next diff snapshot extends: the restored snapshot's.
    let mut history = History::default();
    let mem = match restore {
        None => ram::anonymous(mem_size).map_err(|why| X86Error::Memory {
            bytes: mem_size,
            why,
        })?,
        Some(r) => {
            let chain = read_chain(&r.dir, &r.file).map_err(X86Error::Setup)?;
            let mem = snap::guest_ram(r, &chain, mem_size).map_err(X86Error::Setup)?;
            if !chain.diffs.is_empty() {
                log::info!(
                    "{} is a diff snapshot: {} diffs ({} runs of pages) mapped over {}",
                    r.dir.display(),
                    chain.diffs.len(),
                    chain.diffs.iter().map(|l| l.runs.len()).sum::<usize>(),
                    chain.base.display()
                );
            }
            history = chain.history;
            mem
        }
    };
    let mut vm = kvm.create_vm()?;
    vm.set_memory(&mem)?;
    let dirty = Arc::new(DirtyPages::new(&mem));
    if restore.is_some() && history.unknown.is_none() {
        // Before the vCPUs run: every page written from here on is the next diff's.
        vm.enable_dirty_log()?;
        dirty.enable();
    }
    vm.create_platform_devices()?;
    let vm = Arc::new(vm);
    let slots =
        virtio::devices(spec, layout::PCI_DEVICE_SLOTS, "x86_64").map_err(X86Error::Setup)?;
    let vcpus = (0..spec.vcpus)
        .map(|id| vm.create_vcpu(id))
        .collect::<Result<Vec<_>, _>>()?;
    match restore {
        None => boot::prepare(&mem, spec, template, &supported, kvm.is_pvm(), &vcpus)?,
        Some(r) => restore_cpus(r, spec, &vm, &vcpus, template, &supported)?,
    }

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
    let invalid = |r: &Restore, section: &str, e: String| {
        X86Error::Setup(r.file.invalid(section, e).to_string())
    };
    let serial = match restore {
        None => serial::Serial::new(irq(SERIAL_GSI), out),
        Some(r) => {
            let st = snap::serial_state(r).map_err(X86Error::Setup)?;
            serial::Serial::from_state(&st, irq(SERIAL_GSI), out)
                .map_err(|e| invalid(r, "serial", e.to_string()))?
        }
    };
    let serial = Arc::new(Mutex::new(serial));
    let mut rtc = rtc::Rtc::new();
    let mut acpi_dev = acpi::AcpiDevice::new(control.clone(), irq(GED_GSI));
    if let Some(r) = restore {
        let st = snap::rtc_state(r).map_err(X86Error::Setup)?;
        rtc.restore(&st).map_err(|e| invalid(r, "rtc", e))?;
        let st = snap::acpi_state(r).map_err(X86Error::Setup)?;
        acpi_dev.restore(&st).map_err(|e| invalid(r, "acpi", e))?;
        if let Some(id) = &r.clone {
            // Linux's vmgenid driver reads the new ID on the notification and reseeds its
            // random generator at once, before the agent is reached.
            vme_arch::acpi::write_generation_id(&mem, &id.generation)?;
            acpi_dev.notify_generation();
        }
    }
    let (rtc, acpi_dev) = (Arc::new(Mutex::new(rtc)), Arc::new(Mutex::new(acpi_dev)));
    let (i8042_data, i8042_cmd) = i8042::i8042(control.clone());
    let mut pio = Bus::new();
    let devices: Vec<(u16, u64, SharedDevice)> = vec![
        (SERIAL_PORT, 8, serial.clone()),
        (i8042::DATA_PORT, 1, Arc::new(Mutex::new(i8042_data))),
        (i8042::COMMAND_PORT, 1, Arc::new(Mutex::new(i8042_cmd))),
        (rtc::INDEX_PORT, 2, rtc.clone()),
        (ACPI_PORT, acpi::LEN, acpi_dev.clone()),
    ];
    for (port, len, dev) in devices {
        pio.insert(u64::from(port), len, dev)
            .map_err(|e| X86Error::Setup(format!("device layout: {e}")))?;
    }
    let mut mmio = Bus::new();
    let ram = Arc::new(Ram::new(mem.clone(), dirty.clone()));
    // Stopped and joined when this function returns, after the vCPUs.
    let mut workers = virtio::Workers::default();
    let pci = pci::attach(&vm, &ram, slots, &mut workers, &mut pio, &mut mmio)
        .map_err(X86Error::Setup)?;
    if let Some(r) = restore {
        restore_pci(r, spec, &pci)?;
    }
    workers.follow_run_state(ctx);
    ctx.attach_console_input(serial.clone());
    let button = acpi_dev.clone();
    control.set_power_button(Box::new(move || {
        button
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .press_power_button();
    }));

    let vcpus: Vec<SharedVcpu> = vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect();
    let ending = pci.transports.clone();
    control.set_snapshotter(Arc::new(X86Snapshotter {
        spec: crate::snapshot::absolute_spec(spec),
        cpu,
        msrs: kvm.msr_index_list()?,
        vm: Arc::downgrade(&vm),
        vcpus: vcpus.iter().map(Arc::downgrade).collect(),
        legacy: LegacyDevices {
            serial,
            rtc,
            acpi: acpi_dev,
        },
        pci,
        history: Mutex::new(history),
        dirty: dirty.clone(),
    }));
    if let Some(r) = restore {
        log::info!(
            "restored snapshot {} in {:.2} ms; the VM continues",
            r.dir.display(),
            r.started.elapsed().as_secs_f64() * 1000.0
        );
    }
    // An incoming migration runs the vCPUs only once the sender has committed.
    if let Some(r) = restore {
        if r.pass_gate().map_err(X86Error::Setup)? {
            // Paused at the sender, so paused here: the vCPUs park before they run.
            ctx.control.pause().map_err(X86Error::Setup)?;
        }
    }
    let reports = run_vcpus(&vcpus, &pio, &mmio, (&mem, &dirty), ctx)?;
    // No frame may reach a VM that has stopped running.
    drop(workers);
    for t in &ending {
        t.lock().unwrap_or_else(|p| p.into_inner()).shutdown();
    }
    log_measurements(&reports);
    Ok(ctx.control.wait_for_exit())
}

/// Sets the snapshot's state into the VM's irqchip and PIT and into each vCPU, after
/// checking that this host shows the guest every CPU feature it was shown.
fn restore_cpus(
    r: &Restore,
    spec: &MachineSpec,
    vm: &Vm,
    vcpus: &[Vcpu],
    template: CpuTemplate,
    supported: &CpuId,
) -> Result<(), X86Error> {
    let setup = X86Error::Setup;
    let at = |what: String, e: &dyn std::fmt::Display| {
        X86Error::Setup(format!("snapshot {}: {what}: {e}", r.dir.display()))
    };
    let vm_state = snap::vm_state(r, spec).map_err(setup)?;
    vm.restore_state(&vm_state)
        .map_err(|e| at("the interrupt controllers".into(), &e))?;
    for vcpu in vcpus {
        let id = vcpu.id();
        let st = snap::vcpu_state(r, id).map_err(setup)?;
        let saved = st
            .cpuid_entries()
            .map_err(|e| at(format!("vCPU {id}"), &e))?;
        // What KVM reports once this host's template is set: the template itself, or on
        // PVM hosts (which do not virtualize CPUID) the host's own CPUID, which is then
        // what the guest sees.
        vcpu.set_cpuid2(&vme_arch::build_cpuid(supported, template, id, spec.vcpus)?)?;
        let here = vcpu.cpuid()?;
        let missing = vme_arch::cpuid::missing_features(&saved, here.as_slice());
        if !missing.is_empty() {
            return Err(X86Error::Setup(format!(
                "snapshot {}: its guest was shown CPU features this host lacks ({}): restore \
                 it on a host with the same CPU model",
                r.dir.display(),
                missing.join(", ")
            )));
        }
        let lost = vcpu
            .restore_state(&st)
            .map_err(|e| at(format!("vCPU {id}"), &e))?;
        if !lost.is_empty() {
            let list: Vec<String> = lost.iter().map(|(i, v)| format!("{i:#x}={v:#x}")).collect();
            return Err(X86Error::Setup(format!(
                "snapshot {}: this host's KVM refuses vCPU {id}'s MSRs {}: restore it on a \
                 host like the one that took it",
                r.dir.display(),
                list.join(", ")
            )));
        }
    }
    Ok(())
}

/// Sets the snapshot's PCI state: the host bridge, then each function (its MSI-X routes,
/// irqfds and ioeventfds come back with it), then serves what the guest queued.
fn restore_pci(r: &Restore, spec: &MachineSpec, pci: &pci::PciDevices) -> Result<(), X86Error> {
    let bridge = snap::bridge_state(r).map_err(X86Error::Setup)?;
    pci.bus
        .restore_bridge(&bridge)
        .map_err(|e| X86Error::Setup(r.file.invalid("pci", e).to_string()))?;
    let states: Vec<vme_devices::virtio::pci::PciState> =
        crate::snapshot::virtio_states(r, spec).map_err(X86Error::Setup)?;
    let names = crate::snapshot::slot_names(spec);
    for ((t, st), name) in pci.transports.iter().zip(&states).zip(&names) {
        t.lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore(st)
            .map_err(|e| X86Error::Setup(format!("snapshot {}: {name}: {e}", r.dir.display())))?;
    }
    pci.bus.refresh_all();
    for t in &pci.transports {
        t.lock()
            .unwrap_or_else(|p| p.into_inner())
            .kick_ready_queues();
    }
    Ok(())
}

/// Runs one thread per vCPU until the VM ends; returns what each did.
fn run_vcpus(
    vcpus: &[SharedVcpu],
    pio: &Bus,
    mmio: &Bus,
    (mem, dirty): (&GuestMemoryMmap, &Arc<DirtyPages>),
    ctx: &RunContext,
) -> Result<Vec<VcpuReport>, X86Error> {
    let control = &ctx.control;
    let kickers: Vec<Kicker> = vcpus.iter().map(|v| vcpu::lock(v).kicker()).collect();
    control.set_parkers(vcpus.len() as u64);
    control.add_hook(Arc::new(KickAll(kickers)));
    let mut handles = Vec::new();
    for (id, v) in vcpus.iter().enumerate() {
        let t = VcpuThread {
            vcpu: v.clone(),
            pio: pio.clone(),
            mmio: mmio.clone(),
            mem: mem.clone(),
            dirty: dirty.clone(),
            control: control.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::Kind::Vcpu);
                t.run()
            })
            .map_err(|e| X86Error::Setup(format!("cannot start vCPU thread {id}: {e}")))?;
        handles.push(handle);
    }
    // The main thread's filter last: the vCPU threads are started, and it only waits now.
    crate::seccomp::enter(crate::seccomp::Kind::Main);
    control.wait_for_exit();
    Ok(handles.into_iter().filter_map(|h| h.join().ok()).collect())
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
