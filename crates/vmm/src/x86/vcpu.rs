//! One vCPU thread: run, route port I/O and MMIO to the buses, complete what KVM's emulator
//! gave up on, follow pause/stop, and turn fatal exits into a VM exit reason.

use super::dirty::DirtyPages;
use super::emu::{GuestRam, KvmCpu};
use crate::control::{ExitReason, VmControl};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use vm_memory::GuestMemoryMmap;
use vme_devices::bus::Bus;
use vme_emulator::{Completer, Completion};
use vme_hypervisor::{INTERNAL_ERROR_EMULATION, Vcpu, VcpuExit};

/// KVM_SYSTEM_EVENT_* kinds.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;

/// A vCPU shared by its thread, which holds it while it runs the guest, and the snapshot
/// writer, which takes it while the VM is paused (the thread never holds it while parked).
pub type SharedVcpu = Arc<Mutex<Vcpu>>;

pub fn lock(v: &SharedVcpu) -> MutexGuard<'_, Vcpu> {
    // Every critical section leaves the vCPU usable: KVM holds its state.
    v.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct VcpuThread {
    pub vcpu: SharedVcpu,
    pub pio: Bus,
    pub mmio: Bus,
    pub mem: GuestMemoryMmap,
    /// Where instructions the monitor completes log their writes.
    pub dirty: Arc<DirtyPages>,
    pub control: Arc<VmControl>,
}

/// What the thread did, for the measurements the monitor logs at the end.
#[derive(Debug, Default)]
pub struct VcpuReport {
    pub id: u32,
    pub exits: u64,
    pub io_exits: u64,
    pub mmio_exits: u64,
    pub completions: u64,
    pub completer: Completer,
}

impl VcpuThread {
    pub fn run(self) -> VcpuReport {
        let id = lock(&self.vcpu).id();
        let mut report = VcpuReport {
            id,
            ..Default::default()
        };
        let mut unclaimed = HashSet::new();
        loop {
            if self.control.should_stop() {
                log::info!("vCPU {id}: stopped at {}", place(&lock(&self.vcpu)));
                break;
            }
            if self.control.pause_requested() {
                // KVM finishes an `in` or MMIO read on the next entry: finish it now, so a
                // snapshot of the paused vCPU holds the state between two instructions.
                if let Err(e) = lock(&self.vcpu).finish_pending_exit() {
                    self.crash(format!("vCPU {id}: {e}"));
                    break;
                }
                self.control.wait_while_paused();
                continue;
            }
            let mut guard = lock(&self.vcpu);
            let vcpu = &mut *guard;
            let exit = match vcpu.run() {
                Ok(exit) => exit,
                Err(e) => {
                    self.crash(format!("vCPU {id}: {e}"));
                    break;
                }
            };
            report.exits += 1;
            log::trace!("vCPU {id}: exit {exit:x?}");
            self.control.exits.fetch_add(1, Ordering::Relaxed);
            let outcome = match exit {
                VcpuExit::Interrupted => Ok(()),
                VcpuExit::IoIn { port, size, count } => {
                    report.io_exits += 1;
                    self.io_in(vcpu, port, size, count, &mut unclaimed)
                }
                VcpuExit::IoOut { port, size, data } => {
                    report.io_exits += 1;
                    for chunk in data.chunks(usize::from(size.max(1))) {
                        if !self.pio.write(u64::from(port), chunk)
                            && unclaimed.insert((0, u64::from(port)))
                        {
                            log::debug!("vCPU {id}: write to unclaimed port {port:#x} ignored");
                        }
                    }
                    Ok(())
                }
                VcpuExit::MmioRead { addr, len } => {
                    report.mmio_exits += 1;
                    let mut buf = [0xffu8; 8];
                    let buf = &mut buf[..usize::from(len)];
                    if !self.mmio.read(addr, buf) {
                        buf.fill(0xff);
                        if unclaimed.insert((1, addr)) {
                            log::debug!(
                                "vCPU {id}: read of unclaimed MMIO {addr:#x} returns all-ones"
                            );
                        }
                    }
                    vcpu.complete_mmio_read(buf)
                        .map_err(|e| format!("vCPU {id}: {e}"))
                }
                VcpuExit::MmioWrite { addr, len, data } => {
                    report.mmio_exits += 1;
                    if !self.mmio.write(addr, &data[..usize::from(len)])
                        && unclaimed.insert((1, addr))
                    {
                        log::debug!("vCPU {id}: write to unclaimed MMIO {addr:#x} ignored");
                    }
                    Ok(())
                }
                VcpuExit::InternalError { suberror, .. }
                    if suberror == INTERNAL_ERROR_EMULATION =>
                {
                    report.completions += 1;
                    self.complete(vcpu, &mut report.completer)
                }
                VcpuExit::InternalError { suberror, data } => Err(format!(
                    "vCPU {id}: KVM internal error {suberror} (data {data:x?}) at {}",
                    place(vcpu)
                )),
                VcpuExit::Shutdown => Err(format!(
                    "vCPU {id}: triple fault (the guest hit an exception it could not handle) at {}",
                    place(vcpu)
                )),
                VcpuExit::FailEntry { reason, cpu } => Err(format!(
                    "vCPU {id}: the host refused to enter the guest (hardware reason {reason:#x}, host CPU {cpu}) at {}",
                    place(vcpu)
                )),
                VcpuExit::Hlt => Err(format!(
                    "vCPU {id}: halted with no way to wake (HLT exit) at {}",
                    place(vcpu)
                )),
                VcpuExit::SystemEvent { kind, .. } => {
                    match kind {
                        SYSTEM_EVENT_SHUTDOWN => self.control.request_exit(ExitReason::PowerOff),
                        SYSTEM_EVENT_RESET => self.control.request_exit(ExitReason::Reboot),
                        other => {
                            self.crash(format!("vCPU {id}: guest system event {other} (crash)"));
                        }
                    }
                    Ok(())
                }
                other => Err(format!(
                    "vCPU {id}: unexpected exit {other:?} at {}",
                    place(vcpu)
                )),
            };
            if let Err(why) = outcome {
                self.crash(why);
                break;
            }
        }
        report
    }

    fn io_in(
        &self,
        vcpu: &mut Vcpu,
        port: u16,
        size: u8,
        count: u32,
        unclaimed: &mut HashSet<(u8, u64)>,
    ) -> Result<(), String> {
        let size = usize::from(size.max(1));
        // KVM bounds `count` by its one-page I/O buffer; refuse anything larger regardless.
        let total = size
            .checked_mul(count as usize)
            .filter(|&n| n <= 4096)
            .ok_or_else(|| format!("vCPU {}: port read of {count} x {size} bytes", vcpu.id()))?;
        let mut buf = vec![0xffu8; total];
        for chunk in buf.chunks_mut(size) {
            if !self.pio.read(u64::from(port), chunk) {
                chunk.fill(0xff);
                if unclaimed.insert((0, u64::from(port))) {
                    log::debug!(
                        "vCPU {}: read of unclaimed port {port:#x} returns all-ones",
                        vcpu.id()
                    );
                }
            }
        }
        vcpu.complete_io_in(&buf)
            .map_err(|e| format!("vCPU {}: {e}", vcpu.id()))
    }

    /// Completes the instruction KVM gave up on, then resumes the guest.
    fn complete(&self, vcpu: &mut Vcpu, completer: &mut Completer) -> Result<(), String> {
        let id = vcpu.id();
        let regs = vcpu.regs().map_err(|e| format!("vCPU {id}: {e}"))?;
        let sregs = vcpu.sregs().map_err(|e| format!("vCPU {id}: {e}"))?;
        let mut cpu = KvmCpu { id, regs, sregs };
        let mut ram = GuestRam(&self.mem, &self.dirty);
        let done = completer
            .complete(&mut cpu, &mut ram, None)
            .map_err(|e| e.to_string())?;
        self.control
            .emulated_instructions
            .fetch_add(1, Ordering::Relaxed);
        vcpu.set_regs(&cpu.regs)
            .map_err(|e| format!("vCPU {id}: {e}"))?;
        if let Completion::Inject {
            vector,
            error_code,
            cr2,
        } = done
        {
            if let Some(cr2) = cr2 {
                let mut sregs = cpu.sregs;
                sregs.cr2 = cr2;
                vcpu.set_sregs(&sregs)
                    .map_err(|e| format!("vCPU {id}: {e}"))?;
            }
            vcpu.inject_exception(vector, error_code)
                .map_err(|e| format!("vCPU {id}: injecting vector {vector}: {e}"))?;
        }
        Ok(())
    }

    fn crash(&self, why: String) {
        // main prints the one line a crash gets on stderr; here it only joins the debug trail.
        log::debug!("{why}");
        self.control.request_exit(ExitReason::Crash(why));
    }
}

/// "RIP 0x… (CS 0x…)" of a vCPU, for error messages.
fn place(vcpu: &Vcpu) -> String {
    let rip = vcpu.regs().map(|r| r.rip).unwrap_or(u64::MAX);
    let cs = vcpu.sregs().map(|s| s.cs.selector).unwrap_or(u16::MAX);
    format!("RIP {rip:#x} (CS {cs:#x})")
}
