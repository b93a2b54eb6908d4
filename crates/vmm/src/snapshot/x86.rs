//! Snapshots of the x86_64 machine: its sections written from a paused VM, and read back
//! for a restore.
//!
//! | section | what |
//! |---|---|
//! | `config` | the machine file |
//! | `machine` | vCPU count |
//! | `vm` | in-kernel PIC master and slave, IOAPIC, PIT, kvmclock's base if KVM has one |
//! | `vcpu.N` | CPUID, registers, special registers, XSAVE and XCRs (or the legacy FPU), debug registers, local APIC, MSRs, multiprocessing state, pending events, TSC frequency |
//! | `serial`, `rtc`, `acpi` | the UART with unread input, CMOS index and bytes, pending GED events |
//! | `pci` | the host bridge's configuration space |
//! | `virtio.N` | each virtio-pci function: configuration space, MSI-X table and pending bits, ISR, vector assignments, the virtio core |
//!
//! The header's CPU model is the CPU template and the host's CPU vendor
//! ("pvm GenuineIntel"); a snapshot of another is refused. The i8042 has no state (it only
//! resets the machine). GSI routes, irqfds and ioeventfds are not saved: restoring the
//! MSI-X tables and BARs rebuilds them.

use super::Restore;
use super::diff::{open_memory, write_member};
use super::format::{FormatError, StateWriter};
use super::lineage::{Chain, History};
use crate::control::Snapshotter;
use crate::x86::dirty::DirtyPages;
use crate::x86::pci::PciDevices;
use crate::x86::ram;
use crate::x86::vcpu::{SharedVcpu, lock as lock_vcpu};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;
use vm_memory::GuestMemoryMmap;
use vme_api::MachineSpec;
use vme_api::control::SnapshotInfo;
use vme_devices::acpi::{AcpiDevice, AcpiState};
use vme_devices::rtc::{Rtc, RtcState};
use vme_devices::serial::{Serial, SerialState};
use vme_hypervisor::{VcpuState, Vm, VmState};

pub const ARCH: &str = "x86_64";

/// The `machine` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct MachineSection {
    vcpus: u32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn text(e: FormatError) -> String {
    e.to_string()
}

/// The header's CPU model: the template and the CPU vendor.
pub fn cpu_model(template: vme_arch::CpuTemplate, supported: &vme_hypervisor::CpuId) -> String {
    format!(
        "{} {}",
        template.name(),
        vme_arch::cpuid::vendor(supported.as_slice())
    )
}

/// The legacy devices a snapshot saves.
pub struct LegacyDevices {
    pub serial: Arc<Mutex<Serial>>,
    pub rtc: Arc<Mutex<Rtc>>,
    pub acpi: Arc<Mutex<AcpiDevice>>,
}

/// Writes snapshots of one running x86_64 VM.
pub struct X86Snapshotter {
    /// The spec as the VM was started, paths made absolute.
    pub spec: MachineSpec,
    pub cpu: String,
    /// The MSRs KVM reports as saved.
    pub msrs: Vec<u32>,
    pub vm: Weak<Vm>,
    pub vcpus: Vec<Weak<Mutex<vme_hypervisor::Vcpu>>>,
    pub legacy: LegacyDevices,
    pub pci: PciDevices,
    /// The chain the next diff snapshot extends.
    pub history: Mutex<History>,
    /// What the monitor itself writes to RAM; KVM logs the vCPUs' writes.
    pub dirty: Arc<DirtyPages>,
}

impl Snapshotter for X86Snapshotter {
    fn snapshot(&self, dir: &Path) -> Result<SnapshotInfo, String> {
        self.write(dir, false)
    }

    fn snapshot_diff(&self, dir: &Path) -> Result<SnapshotInfo, String> {
        self.write(dir, true)
    }

    fn migrate(
        &self,
        p: &crate::migrate::send::Params,
        pause: &dyn Fn() -> Result<(), String>,
    ) -> Result<vme_api::control::MigrationInfo, crate::migrate::send::Failure> {
        let src = crate::migrate::x86::X86Source::new(self)?;
        crate::migrate::send::migrate(&src, p, pause)
    }
}

impl X86Snapshotter {
    /// A full snapshot, or with `diff` one of the pages written since the previous one.
    fn write(&self, dir: &Path, diff: bool) -> Result<SnapshotInfo, String> {
        let started = Instant::now();
        let mut history = lock(&self.history);
        let parent = match diff {
            true => Some(history.diff_parent(dir)?),
            false => None,
        };
        self.with_sections(|w, vm, mem| {
            // The log (re)starts here, with the vCPUs parked and every device held: the
            // pages written from now on are the next diff's. A failed snapshot puts them back.
            let dirty = self.harvest_dirty(vm)?;
            let size = self.spec.memory.bytes();
            let read = |off: u64, buf: &mut [u8]| ram::read_at(mem, off, buf);
            let written = write_member(
                dir,
                w,
                size,
                dirty.clone(),
                parent,
                &mut history,
                read,
                started,
            );
            if written.is_err() {
                self.dirty.remark(&dirty);
            }
            written
        })
    }

    /// The pages written since the previous harvest (KVM's log and the monitor's), as
    /// memory-file page runs; the first call switches both logs on.
    pub fn harvest_dirty(&self, vm: &Vm) -> Result<Vec<(u64, u64)>, String> {
        if !self.dirty.is_on() {
            vm.enable_dirty_log()
                .map_err(|e| format!("cannot start KVM's dirty-page log: {e}"))?;
            self.dirty.enable();
        }
        let kvm_log = vm
            .take_dirty_log()
            .map_err(|e| format!("cannot read KVM's dirty-page log: {e}"))?;
        Ok(self.dirty.harvest(&kvm_log))
    }

    /// Builds the state sections of the paused VM (a full snapshot's, less its lineage)
    /// with every device held, and runs `f` on them, the VM and its RAM before letting the
    /// devices go: a device thread that woke before the pause (a frame arriving) finishes
    /// its request and can neither raise an interrupt nor write RAM until `f` is done.
    pub fn with_sections<R>(
        &self,
        f: impl FnOnce(StateWriter, &Vm, &GuestMemoryMmap) -> Result<R, String>,
    ) -> Result<R, String> {
        let gone = "the VM has stopped: there is nothing to save";
        let vm = self.vm.upgrade().ok_or(gone)?;
        let vcpus: Vec<SharedVcpu> = self
            .vcpus
            .iter()
            .map(|v| v.upgrade().ok_or(gone))
            .collect::<Result<_, _>>()?;
        let mem = vm.memory().ok_or(gone)?.clone();
        // The vCPUs are parked and hold none of their locks.
        let serial = lock(&self.legacy.serial);
        let rtc = lock(&self.legacy.rtc);
        let acpi = lock(&self.legacy.acpi);
        let transports: Vec<_> = self.pci.transports.iter().map(|t| lock(t)).collect();
        let mut w = StateWriter::new(ARCH, &self.cpu, self.spec.memory.bytes());
        w.add("config", &self.spec.to_toml()).map_err(text)?;
        let m = MachineSection {
            vcpus: vcpus.len() as u32,
        };
        w.add("machine", &m).map_err(text)?;
        let vm_state = vm
            .save_state()
            .map_err(|e| format!("cannot save the interrupt controllers: {e}"))?;
        w.add("vm", &vm_state).map_err(text)?;
        for (i, v) in vcpus.iter().enumerate() {
            let st = lock_vcpu(v)
                .save_state(&self.msrs)
                .map_err(|e| format!("cannot save vCPU {i}: {e}"))?;
            w.add(&format!("vcpu.{i}"), &st).map_err(text)?;
        }
        w.add("serial", &serial.state()).map_err(text)?;
        w.add("rtc", &rtc.state()).map_err(text)?;
        w.add("acpi", &acpi.state()).map_err(text)?;
        w.add("pci", &self.pci.bus.bridge_state()).map_err(text)?;
        for (i, t) in transports.iter().enumerate() {
            w.add(&format!("virtio.{i}"), &t.state()).map_err(text)?;
        }
        f(w, &vm, &mem)
    }
}

/// The RAM of a snapshot being restored: its memory file mapped privately, and for a diff
/// each diff's pages of `chain` over it, oldest first. Nothing is read: pages load when the
/// guest first touches them.
pub fn guest_ram(r: &Restore, chain: &Chain, bytes: u64) -> Result<GuestMemoryMmap, String> {
    let base = match chain.diffs.is_empty() {
        true => r.memory_file()?,
        false => open_memory(&chain.base, bytes)?,
    };
    let at = |dir: &Path, e: String| format!("snapshot memory file in {}: {e}", dir.display());
    let mem = ram::from_file(&base, bytes).map_err(|e| at(&chain.base, e))?;
    for layer in &chain.diffs {
        let file = open_memory(&layer.dir, bytes)?;
        ram::map_file_pages(&mem, &file, &layer.runs).map_err(|e| at(&layer.dir, e))?;
    }
    Ok(mem)
}

/// Refuses a snapshot taken with another CPU template or on another CPU vendor.
pub fn check_cpu(r: &Restore, cpu: &str) -> Result<(), String> {
    let h = &r.file.header;
    if h.arch != ARCH {
        return Err(format!(
            "snapshot {} is of an {} VM, not an {ARCH} one",
            r.dir.display(),
            h.arch
        ));
    }
    if h.cpu != cpu {
        return Err(format!(
            "snapshot {} was taken with CPU model {:?} (CPU template, CPU vendor), but this \
             host gives the VM {cpu:?}: its guest may rely on CPU features this one does not \
             show; restore it on a host of the same CPU vendor, with the same CPU template \
             (the machine file's cpu_template, which `auto` picks by host kind)",
            r.dir.display(),
            h.cpu
        ));
    }
    Ok(())
}

/// The `vm` section, with the vCPU count checked against `spec`.
pub fn vm_state(r: &Restore, spec: &MachineSpec) -> Result<VmState, String> {
    let f = &r.file;
    let m: MachineSection = f.section("machine").map_err(text)?;
    if m.vcpus != spec.vcpus {
        return Err(f
            .invalid(
                "machine",
                format!(
                    "{} vCPUs, but the machine file says {}",
                    m.vcpus, spec.vcpus
                ),
            )
            .to_string());
    }
    f.section("vm").map_err(text)
}

pub fn vcpu_state(r: &Restore, id: u32) -> Result<VcpuState, String> {
    r.file.section(&format!("vcpu.{id}")).map_err(text)
}

pub fn serial_state(r: &Restore) -> Result<SerialState, String> {
    r.file.section("serial").map_err(text)
}

pub fn rtc_state(r: &Restore) -> Result<RtcState, String> {
    r.file.section("rtc").map_err(text)
}

pub fn acpi_state(r: &Restore) -> Result<AcpiState, String> {
    r.file.section("acpi").map_err(text)
}

pub fn bridge_state(r: &Restore) -> Result<Vec<u8>, String> {
    r.file.section("pci").map_err(text)
}
