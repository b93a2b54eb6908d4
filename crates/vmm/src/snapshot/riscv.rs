//! Snapshots of the riscv64 machine: its sections (`config`, `machine`, `hart.N`, `clint`,
//! `plic`, `serial`, `virtio.N`) written from a paused machine, and read back for a
//! restore.

use super::diff::{open_memory, write_member};
use super::format::StateWriter;
use super::lineage::{Chain, History};
use super::{Restore, check_machine};
use crate::control::Snapshotter;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use vme_api::MachineSpec;
use vme_api::control::SnapshotInfo;
use vme_devices::serial::{Serial, SerialState};
use vme_devices::virtio::mmio::{MmioState, MmioTransport};
use vme_riscv::{GuestRam, ISA, Machine, MachineHandle, MachineState, RAM_BASE};

pub const ARCH: &str = "riscv64";

/// How long a snapshot waits for harts that are still on their way to park.
pub const PARK_WAIT: Duration = Duration::from_secs(10);

/// The `machine` section: what is neither a hart nor an interrupt controller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct MachineSection {
    harts: u32,
    timebase_hz: u64,
    /// SBI served by the monitor.
    firmware: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes snapshots of one running riscv64 machine.
pub struct RiscvSnapshotter {
    /// The spec as the VM was started, paths made absolute.
    pub spec: MachineSpec,
    pub machine: Weak<Machine>,
    pub handle: MachineHandle,
    pub serial: Arc<Mutex<Serial>>,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// The chain the next diff snapshot extends.
    pub history: Mutex<History>,
}

impl Snapshotter for RiscvSnapshotter {
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
        let src = crate::migrate::send::RiscvSource::new(self)?;
        crate::migrate::send::migrate(&src, p, pause)
    }
}

impl RiscvSnapshotter {
    /// A full snapshot, or with `diff` one of the pages written since the previous one.
    fn write(&self, dir: &Path, diff: bool) -> Result<SnapshotInfo, String> {
        let started = Instant::now();
        let machine = self
            .machine
            .upgrade()
            .ok_or("the machine has stopped: there is nothing to save")?;
        let mut history = lock(&self.history);
        let parent = match diff {
            true => Some(history.diff_parent(dir)?),
            false => None,
        };
        // Harts first, before any device lock: a hart still on its way to park may need one.
        // An interrupt a device raises after this is raised again by its restored device
        // (virtio levels and the UART follow their saved registers).
        let st = self
            .handle
            .save_state(PARK_WAIT)
            .map_err(|e| format!("cannot save the machine's state: {e}"))?;
        // Every device is held until RAM is saved, so a device thread that woke before the
        // pause (a frame arriving) cannot move a queue or write RAM between the two.
        let serial = lock(&self.serial);
        let transports: Vec<_> = self.transports.iter().map(|t| lock(t)).collect();
        let w = self.sections(&st, &serial, &transports)?;
        // The log (re)starts here, with the harts parked and every device held: the pages
        // written from now on are the next diff's. A failed snapshot puts them back.
        self.handle.enable_dirty_log();
        let dirty = self
            .handle
            .harvest_dirty()
            .ok_or("the dirty-page log is off after enabling it (interpreter bug)")?;
        let ram = machine.ram();
        let read = |off: u64, buf: &mut [u8]| {
            ram.read_bytes(RAM_BASE + off, buf)
                .map_err(|e| format!("cannot read guest memory: {e}"))
        };
        let size = ram.size();
        let written = write_member(
            dir,
            w,
            size,
            dirty.runs(),
            parent,
            &mut history,
            read,
            started,
        );
        if written.is_err() {
            self.handle.remark_dirty(&dirty);
        }
        written
    }
}

impl RiscvSnapshotter {
    /// The sections of a paused machine's state `st` with its devices held: what a full
    /// snapshot's state file holds, less its lineage (also what a migration sends).
    pub fn sections(
        &self,
        st: &MachineState,
        serial: &Serial,
        transports: &[MutexGuard<'_, MmioTransport>],
    ) -> Result<StateWriter, String> {
        let mut w = StateWriter::new(ARCH, &st.isa, st.memory_bytes);
        let e = |e: super::format::FormatError| e.to_string();
        w.add("config", &self.spec.to_toml()).map_err(e)?;
        let m = MachineSection {
            harts: st.harts.len() as u32,
            timebase_hz: st.timebase_hz,
            firmware: st.firmware,
        };
        w.add("machine", &m).map_err(e)?;
        for (i, h) in st.harts.iter().enumerate() {
            w.add(&format!("hart.{i}"), h).map_err(e)?;
        }
        w.add("clint", &st.clint).map_err(e)?;
        w.add("plic", &st.plic).map_err(e)?;
        w.add("serial", &serial.state()).map_err(e)?;
        for (i, t) in transports.iter().enumerate() {
            w.add(&format!("virtio.{i}"), &t.state()).map_err(e)?;
        }
        Ok(w)
    }
}

/// The RAM of a snapshot being restored: its memory file mapped privately, and for a diff
/// each diff's pages of `chain` over it, oldest first. Nothing is read: pages load when the
/// guest first touches them.
pub fn guest_ram(r: &Restore, chain: &Chain, bytes: u64) -> Result<GuestRam, String> {
    let at = |dir: &Path, e: vme_riscv::Error| format!("{}: {e}", dir.display());
    let base = match chain.diffs.is_empty() {
        true => r.memory_file()?,
        false => open_memory(&chain.base, bytes)?,
    };
    let mut ram = GuestRam::from_file(&base, bytes).map_err(|e| at(&chain.base, e))?;
    for layer in &chain.diffs {
        let file = open_memory(&layer.dir, bytes)?;
        ram = ram
            .with_file_pages(&file, &layer.runs)
            .map_err(|e| at(&layer.dir, e))?;
    }
    Ok(ram)
}

/// The machine's state in a snapshot being restored, checked against `spec`.
pub fn machine_state(r: &Restore, spec: &MachineSpec) -> Result<MachineState, String> {
    let f = &r.file;
    check_machine(f, ARCH, ISA)?;
    let e = |e: super::format::FormatError| e.to_string();
    let m: MachineSection = f.section("machine").map_err(e)?;
    if m.harts != spec.vcpus {
        return Err(f
            .invalid(
                "machine",
                format!(
                    "{} harts, but the machine file says {} vCPUs",
                    m.harts, spec.vcpus
                ),
            )
            .to_string());
    }
    let harts = (0..m.harts)
        .map(|i| f.section(&format!("hart.{i}")).map_err(e))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(MachineState {
        isa: f.header.cpu.clone(),
        timebase_hz: m.timebase_hz,
        memory_bytes: f.header.memory_bytes,
        firmware: m.firmware,
        harts,
        clint: f.section("clint").map_err(e)?,
        plic: f.section("plic").map_err(e)?,
    })
}

pub fn serial_state(r: &Restore) -> Result<SerialState, String> {
    r.file.section("serial").map_err(|e| e.to_string())
}

/// The saved state of every virtio slot of `spec` (see [`super::virtio_states`]).
pub fn virtio_states(r: &Restore, spec: &MachineSpec) -> Result<Vec<MmioState>, String> {
    super::virtio_states(r, spec)
}
