//! The riscv64 machine kind: the software interpreter (`vme-riscv`) with the same serial
//! device, control and console as x86_64.

use crate::control::{ControlHook, ExitReason, RunContext};
use std::sync::{Arc, Mutex};
use vme_api::MachineSpec;
use vme_api::control::RunState;
use vme_devices::IrqLine;
use vme_devices::bus::BusDevice;
use vme_devices::serial::Serial;
use vme_riscv::{Machine, MachineConfig, MachineHandle, MmioDevice, UART_BASE, UART_IRQ};

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

/// The shared serial device on the machine's MMIO bus.
struct SerialWindow(Arc<Mutex<Serial>>);

impl MmioDevice for SerialWindow {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).read(offset, data);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(offset, data);
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

pub fn run(spec: &MachineSpec, ctx: &RunContext) -> Result<ExitReason, String> {
    let harts = spec.vcpus as usize;
    if harts > vme_riscv::MAX_HARTS {
        return Err(format!(
            "{harts} vCPUs requested, but the riscv64 machine allows at most {}: lower --vcpus",
            vme_riscv::MAX_HARTS
        ));
    }
    let mut machine = Machine::new(MachineConfig {
        harts,
        memory_bytes: spec.memory.bytes(),
        cmdline: spec.cmdline.clone(),
        ..MachineConfig::default()
    })
    .map_err(|e| e.to_string())?;
    let kernel = read_file("kernel", &spec.kernel)?;
    machine.load_kernel(&kernel).map_err(|e| format!("{}: {e}", spec.kernel.display()))?;
    if let Some(path) = &spec.initrd {
        let initrd = read_file("initrd", path)?;
        machine.load_initrd(&initrd).map_err(|e| format!("{}: {e}", path.display()))?;
    }

    let irq = machine.irq_line(UART_IRQ).map_err(|e| e.to_string())?;
    let output = ctx.console_output().map_err(|e| e.to_string())?;
    let serial = Arc::new(Mutex::new(Serial::new(Arc::new(PlicLine(irq)), output)));
    machine
        .add_mmio_device(UART_BASE, UART_SIZE, Arc::new(SerialWindow(serial.clone())))
        .map_err(|e| e.to_string())?;
    ctx.attach_console_input(serial);

    let handle = machine.handle();
    ctx.control.add_hook(Arc::new(Follow(handle.clone())));
    let counter = handle.clone();
    ctx.control
        .set_instruction_counter(Box::new(move || counter.stats().retired.iter().sum()));
    // A stop requested before the hook existed (SIGTERM during setup) must still stop us.
    if ctx.control.should_stop() {
        handle.stop();
    }

    let ended = machine.run().map_err(|e| e.to_string())?;
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
