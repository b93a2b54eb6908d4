//! The riscv64 machine kind: the software interpreter (`vme-riscv`) with the same serial
//! device, control and console as x86_64.

use crate::control::{ControlHook, ExitReason, RunContext};
use crate::snapshot::Restore;
use crate::snapshot::lineage::{History, read_chain};
use crate::snapshot::riscv::{self as snap, RiscvSnapshotter};
use crate::virtio;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use vme_api::MachineSpec;
use vme_api::control::RunState;
use vme_devices::IrqLine;
use vme_devices::bus::BusDevice;
use vme_devices::serial::Serial;
use vme_devices::virtio::mmio::{MMIO_SIZE, MmioTransport};
use vme_devices::virtio::{DiscardError, GuestMemory, MemError};
use vme_riscv::{
    GuestRam, MAX_VIRTIO_SLOTS, Machine, MachineConfig, MachineHandle, MmioDevice, UART_BASE,
    UART_IRQ, VIRTIO_BASE, VIRTIO_STRIDE,
};

/// The UART's MMIO window (8 byte registers, as on QEMU's `virt`).
const UART_SIZE: u64 = 0x100;

/// A PLIC source as the shared devices see an interrupt line.
struct PlicLine(vme_riscv::IrqLine);

impl IrqLine for PlicLine {
    fn set_level(&self, high: bool) {
        self.0.set_level(high);
    }
    fn pulse(&self) {
        self.0.pulse();
    }
}

/// A device of the backend-neutral device layer, placed on the riscv machine's MMIO bus.
struct Window<T: BusDevice>(Arc<Mutex<T>>);

impl<T: BusDevice> MmioDevice for Window<T> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read(offset, data);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(offset, data);
    }
}

/// Guest RAM as the virtio devices see it. The machine owns its RAM and the devices are
/// built before it is shared, so the link is made afterwards and is weak: devices on the
/// machine's bus must not keep the machine alive (a restart would leak its RAM).
#[derive(Default)]
struct MachineRam(OnceLock<Weak<Machine>>);

impl MachineRam {
    fn with<R>(
        &self,
        addr: u64,
        len: u64,
        f: impl FnOnce(&GuestRam) -> Option<R>,
    ) -> Result<R, MemError> {
        let machine = self.0.get().and_then(Weak::upgrade);
        machine
            .and_then(|m| f(m.ram()))
            .ok_or(MemError { addr, len })
    }
}

impl GuestMemory for MachineRam {
    fn check(&self, addr: u64, len: u64) -> Result<(), MemError> {
        self.with(addr, len, |ram| ram.contains(addr, len).then_some(()))
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.with(addr, buf.len() as u64, |ram| ram.read_bytes(addr, buf).ok())
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemError> {
        self.with(addr, data.len() as u64, |ram| {
            ram.write_bytes(addr, data).ok()
        })
    }
    // GuestRam's sized accesses are single host atomics when aligned, so they cannot tear.
    fn load_u16(&self, addr: u64) -> Result<u16, MemError> {
        self.with(addr, 2, |ram| ram.read(addr, 2).map(|v| v as u16))
    }
    fn store_u16(&self, addr: u64, val: u16) -> Result<(), MemError> {
        self.with(addr, 2, |ram| {
            ram.write(addr, 2, u64::from(val)).then_some(())
        })
    }
    fn discard(&self, addr: u64, len: u64) -> Result<(), DiscardError> {
        DiscardError::check_pages(addr, len)?;
        self.check(addr, len)?;
        self.with(addr, len, |ram| Some(ram.discard(addr, len)))?
            .map_err(|e| DiscardError::Host {
                addr,
                len,
                source: std::io::Error::other(e.to_string()),
            })
    }
}

/// Makes the harts follow the VM's run state.
struct Follow(MachineHandle);

impl ControlHook for Follow {
    fn state_changed(&self, state: RunState) {
        match state {
            RunState::Paused => self.0.pause(),
            RunState::Running => self.0.resume(),
            RunState::Stopping => self.0.stop(),
        }
    }
}

fn read_file(what: &str, path: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// A machine with the spec's kernel and initrd loaded, ready to boot.
fn boot(cfg: MachineConfig, spec: &MachineSpec) -> Result<Machine, String> {
    let mut machine = Machine::new(cfg).map_err(|e| e.to_string())?;
    let kernel = read_file("kernel", &spec.kernel)?;
    machine
        .load_kernel(&kernel)
        .map_err(|e| format!("{}: {e}", spec.kernel.display()))?;
    if let Some(path) = &spec.initrd {
        let initrd = read_file("initrd", path)?;
        machine
            .load_initrd(&initrd)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(machine)
}

/// Builds the machine of `spec` and runs it: booted from its kernel, or continuing from the
/// snapshot `restore`.
pub fn run(
    spec: &MachineSpec,
    ctx: &RunContext,
    restore: Option<&Restore>,
) -> Result<ExitReason, String> {
    let harts = spec.vcpus as usize;
    if harts > vme_riscv::MAX_HARTS {
        return Err(format!(
            "{harts} vCPUs requested, but the riscv64 machine allows at most {}: lower --vcpus",
            vme_riscv::MAX_HARTS
        ));
    }
    let slots = virtio::devices(spec, MAX_VIRTIO_SLOTS, "riscv64")?;
    let cfg = MachineConfig {
        harts,
        memory_bytes: spec.memory.bytes(),
        cmdline: spec.cmdline.clone(),
        virtio_mmio_slots: slots.len(),
        ..MachineConfig::default()
    };
    // The chain the VM's next diff snapshot extends: the restored snapshot's.
    let mut history = History::default();
    let mut machine = match restore {
        None => boot(cfg, spec)?,
        Some(r) => {
            let state = snap::machine_state(r, spec)?;
            let chain = read_chain(&r.dir, &r.file)?;
            let ram = snap::guest_ram(r, &chain, cfg.memory_bytes)?;
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
            let mut m = Machine::with_ram(cfg, ram).map_err(|e| e.to_string())?;
            m.restore_state(&state)
                .map_err(|e| format!("snapshot {}: {e}", r.dir.display()))?;
            if history.unknown.is_none() {
                // Before the harts run: every page they write from here on is logged.
                m.handle().enable_dirty_log();
            }
            m
        }
    };

    let irq: Arc<dyn IrqLine> = Arc::new(PlicLine(
        machine.irq_line(UART_IRQ).map_err(|e| e.to_string())?,
    ));
    let output = ctx.console_output().map_err(|e| e.to_string())?;
    let serial = match restore {
        None => Serial::new(irq, output),
        Some(r) => Serial::from_state(&snap::serial_state(r)?, irq, output)
            .map_err(|e| r.file.invalid("serial", e).to_string())?,
    };
    let serial = Arc::new(Mutex::new(serial));
    machine
        .add_mmio_device(UART_BASE, UART_SIZE, Arc::new(Window(serial.clone())))
        .map_err(|e| e.to_string())?;
    ctx.attach_console_input(serial.clone());

    let ram = Arc::new(MachineRam::default());
    let mut transports = Vec::new();
    // Dropped (stopped and joined) when this function returns, before the devices go.
    let mut workers = virtio::Workers::default();
    for (slot, device) in slots.into_iter().enumerate() {
        // Slot i is described in the device tree at this address with PLIC source 1 + i.
        let base = VIRTIO_BASE + slot as u64 * VIRTIO_STRIDE;
        let irq = machine
            .irq_line(1 + slot as u32)
            .map_err(|e| e.to_string())?;
        let transport = workers.wire(slot, device, |device| {
            MmioTransport::new(device, ram.clone(), Arc::new(PlicLine(irq)))
        })?;
        machine
            .add_mmio_device(base, MMIO_SIZE, Arc::new(Window(transport.clone())))
            .map_err(|e| e.to_string())?;
        transports.push(transport);
    }
    workers.follow_run_state(ctx);
    let machine = Arc::new(machine);
    // Set once, here, on a fresh cell: it cannot already hold a value.
    let _ = ram.0.set(Arc::downgrade(&machine));

    if let Some(r) = restore {
        // Queues check their rings against RAM, so this waits for the machine's RAM link.
        let states = snap::virtio_states(r, spec)?;
        let names = crate::snapshot::slot_names(spec);
        for ((t, st), name) in transports.iter().zip(&states).zip(&names) {
            let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
            t.restore(st)
                .map_err(|e| format!("snapshot {}: {name}: {e}", r.dir.display()))?;
        }
        for t in &transports {
            t.lock()
                .unwrap_or_else(|p| p.into_inner())
                .kick_ready_queues();
        }
        log::info!(
            "restored snapshot {} in {:.2} ms; the VM continues",
            r.dir.display(),
            r.started.elapsed().as_secs_f64() * 1000.0
        );
    }

    let handle = machine.handle();
    let ending = transports.clone();
    ctx.control.set_snapshotter(Arc::new(RiscvSnapshotter {
        spec: crate::snapshot::absolute_spec(spec),
        machine: Arc::downgrade(&machine),
        handle: handle.clone(),
        serial,
        transports,
        history: Mutex::new(history),
    }));
    ctx.control.add_hook(Arc::new(Follow(handle.clone())));
    let counter = handle.clone();
    ctx.control
        .set_instruction_counter(Box::new(move || counter.stats().retired.iter().sum()));
    // A stop requested before the hook existed (SIGTERM during setup) must still stop us.
    if ctx.control.should_stop() {
        handle.stop();
    }

    // An incoming migration runs the machine only once the sender has committed.
    if let Some(r) = restore {
        if r.pass_gate()? {
            // Paused at the sender, so paused here: the harts park before their first
            // instruction.
            ctx.control.pause()?;
        }
    }
    // The main thread's filter before the harts start (they inherit it, then add their own).
    crate::seccomp::enter(crate::seccomp::Kind::Main);
    let ended = machine.run().map_err(|e| e.to_string());
    // No frame may reach a machine that has stopped running.
    drop(workers);
    for t in &ending {
        t.lock().unwrap_or_else(|p| p.into_inner()).shutdown();
    }
    let ended = ended?;
    log::debug!("riscv64 machine ended: {ended:?}");
    let events: &dyn vme_devices::VmEvents = &*ctx.control;
    match ended {
        vme_riscv::ExitReason::PowerOff => events.power_off(),
        vme_riscv::ExitReason::Reboot => events.reboot(),
        vme_riscv::ExitReason::Stopped => ctx.control.request_exit(ExitReason::Stopped),
        vme_riscv::ExitReason::Fault(why) => ctx.control.request_exit(ExitReason::Crash(why)),
    }
    // The first reason wins: a stop requested over the socket stays a stop.
    Ok(ctx.control.wait_for_exit())
}
