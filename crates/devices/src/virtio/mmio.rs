//! The virtio-mmio transport, version 2 (modern only; virtio 1.2 §4.2.2).
//!
//! Registers are 32 bits wide and must be accessed as such; other widths read as zero and
//! writes are ignored. The configuration space at 0x100 takes any width. A driver that breaks
//! the rules in a way the device cannot serve (a queue that fails validation, a corrupt ring,
//! DRIVER_OK without FEATURES_OK) puts the device into `DEVICE_NEEDS_RESET`: it stops serving
//! queues until the driver resets it, and other devices are unaffected.

use super::transport::{CoreState, Interrupts, VirtioCore};
pub use super::transport::{
    S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FAILED, S_FEATURES_OK, S_NEEDS_RESET,
};
use super::{GuestMemory, StateError, VirtioDevice};
use crate::IrqLine;
use crate::bus::BusDevice;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Size of one transport's MMIO window.
pub const MMIO_SIZE: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// "VME" in little-endian ASCII.
const VENDOR: u32 = 0x0045_4d56;

/// Interrupt status bits.
pub const INT_USED: u32 = 1;
pub const INT_CONFIG: u32 = 2;

// Register offsets.
const R_MAGIC: u64 = 0x000;
const R_VERSION: u64 = 0x004;
const R_DEVICE_ID: u64 = 0x008;
const R_VENDOR_ID: u64 = 0x00c;
const R_DEVICE_FEATURES: u64 = 0x010;
const R_DEVICE_FEATURES_SEL: u64 = 0x014;
const R_DRIVER_FEATURES: u64 = 0x020;
const R_DRIVER_FEATURES_SEL: u64 = 0x024;
const R_QUEUE_SEL: u64 = 0x030;
const R_QUEUE_NUM_MAX: u64 = 0x034;
const R_QUEUE_NUM: u64 = 0x038;
const R_QUEUE_READY: u64 = 0x044;
const R_QUEUE_NOTIFY: u64 = 0x050;
const R_INTERRUPT_STATUS: u64 = 0x060;
const R_INTERRUPT_ACK: u64 = 0x064;
const R_STATUS: u64 = 0x070;
const R_QUEUE_DESC_LOW: u64 = 0x080;
const R_QUEUE_DESC_HIGH: u64 = 0x084;
const R_QUEUE_DRIVER_LOW: u64 = 0x090;
const R_QUEUE_DRIVER_HIGH: u64 = 0x094;
const R_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const R_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const R_SHM_LEN_LOW: u64 = 0x0b0;
const R_SHM_BASE_HIGH: u64 = 0x0bc;
const R_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

/// A virtio-mmio device in a snapshot: the shared core and the interrupt status register.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub core: CoreState,
    pub interrupt_status: u32,
}

pub struct MmioTransport {
    core: VirtioCore,
    irq: Line,
}

/// The transport's one interrupt line and the interrupt status register that holds it up.
struct Line {
    line: Arc<dyn IrqLine>,
    status: u32,
}

impl Line {
    fn set(&mut self, status: u32) {
        self.status = status;
        self.line.set_level(status != 0);
    }
}

impl Interrupts for Line {
    fn queue(&mut self, _index: u32) {
        self.set(self.status | INT_USED);
    }
    fn config(&mut self) {
        self.set(self.status | INT_CONFIG);
    }
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Arc<dyn GuestMemory>,
        irq: Arc<dyn IrqLine>,
    ) -> Self {
        MmioTransport {
            core: VirtioCore::new(device, mem),
            irq: Line {
                line: irq,
                status: 0,
            },
        }
    }

    /// The device status register (for tests and diagnostics).
    pub fn status(&self) -> u32 {
        self.core.status()
    }

    /// Serves queue `index` as if the driver had notified it (see [`VirtioCore::kick`]).
    pub fn kick(&mut self, index: u32) -> bool {
        self.core.kick(index, &mut self.irq)
    }

    /// See [`VirtioCore::config_changed`].
    pub fn config_changed(&mut self) {
        self.core.config_changed(&mut self.irq);
    }

    /// The state for a snapshot.
    /// The VM has ended: [`VirtioDevice::shutdown`](super::VirtioDevice::shutdown).
    pub fn shutdown(&mut self) {
        self.core.shutdown();
    }

    pub fn state(&self) -> MmioState {
        MmioState {
            core: self.core.state(),
            interrupt_status: self.irq.status,
        }
    }

    /// Takes a snapshot's state (see [`VirtioCore::restore`]) and drives the interrupt
    /// line as the status register says.
    pub fn restore(&mut self, s: &MmioState) -> Result<(), StateError> {
        if s.interrupt_status & !(INT_USED | INT_CONFIG) != 0 {
            return Err(StateError(format!(
                "interrupt status {:#x} has bits that do not exist",
                s.interrupt_status
            )));
        }
        self.core.restore(&s.core)?;
        self.irq.set(s.interrupt_status);
        Ok(())
    }

    /// Serves every ready queue once, for a restored device (see
    /// [`VirtioCore::ready_queues`]).
    pub fn kick_ready_queues(&mut self) {
        for q in self.core.ready_queues() {
            self.core.kick(q, &mut self.irq);
        }
    }

    /// Changes the device's rate limits while it runs (see [`VirtioDevice::update_limits`]).
    pub fn update_limits(&mut self, limits: &super::rate_limit::LimitSet) -> bool {
        self.core.device_mut().update_limits(limits)
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let core = &self.core;
        let q = core.selected();
        match offset {
            R_MAGIC => MAGIC,
            R_VERSION => VERSION,
            R_DEVICE_ID => core.device().device_id(),
            R_VENDOR_ID => VENDOR,
            R_DEVICE_FEATURES => core.device_features_word(),
            R_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            R_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            R_INTERRUPT_STATUS => self.irq.status,
            R_STATUS => core.status(),
            // No shared memory regions: length and base read as all ones (§4.2.2.1).
            R_SHM_LEN_LOW..=R_SHM_BASE_HIGH => u32::MAX,
            R_CONFIG_GENERATION => self.core.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(v);
        let hi = |old: u64| (old & 0xffff_ffff) | (u64::from(v) << 32);
        let core = &mut self.core;
        match offset {
            R_DEVICE_FEATURES_SEL => core.device_features_sel = v,
            R_DRIVER_FEATURES => core.set_driver_features_word(v),
            R_DRIVER_FEATURES_SEL => core.driver_features_sel = v,
            R_QUEUE_SEL => core.queue_sel = v,
            R_QUEUE_NUM => core.configure_queue(|q| q.size = v.min(0xffff) as u16),
            R_QUEUE_DESC_LOW => core.configure_queue(|q| q.desc_addr = lo(q.desc_addr)),
            R_QUEUE_DESC_HIGH => core.configure_queue(|q| q.desc_addr = hi(q.desc_addr)),
            R_QUEUE_DRIVER_LOW => core.configure_queue(|q| q.avail_addr = lo(q.avail_addr)),
            R_QUEUE_DRIVER_HIGH => core.configure_queue(|q| q.avail_addr = hi(q.avail_addr)),
            R_QUEUE_DEVICE_LOW => core.configure_queue(|q| q.used_addr = lo(q.used_addr)),
            R_QUEUE_DEVICE_HIGH => core.configure_queue(|q| q.used_addr = hi(q.used_addr)),
            R_QUEUE_READY => core.queue_ready(v, &mut self.irq),
            R_QUEUE_NOTIFY => core.notify(v, &mut self.irq),
            R_INTERRUPT_ACK => self.irq.set(self.irq.status & !v),
            R_STATUS if v == 0 => {
                core.reset();
                self.irq.set(0);
            }
            R_STATUS => core.set_status(v, &mut self.irq),
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG {
            self.core.device().read_config(offset - CONFIG, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            self.core.device_mut().write_config(offset - CONFIG, data);
        } else if let Ok(b) = <[u8; 4]>::try_from(data) {
            if offset % 4 == 0 {
                self.write_reg(offset, u32::from_le_bytes(b));
            }
        }
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
