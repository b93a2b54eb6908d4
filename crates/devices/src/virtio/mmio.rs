//! The virtio-mmio transport, version 2 (modern only; virtio 1.2 §4.2.2).
//!
//! Registers are 32 bits wide and must be accessed as such; other widths read as zero and
//! writes are ignored. The configuration space at 0x100 takes any width. A driver that breaks
//! the rules in a way the device cannot serve (a queue that fails validation, a corrupt ring,
//! DRIVER_OK without FEATURES_OK) puts the device into `DEVICE_NEEDS_RESET`: it stops serving
//! queues until the driver resets it, and other devices are unaffected.

use super::{F_VERSION_1, GuestMemory, Queue, VirtioDevice};
use crate::IrqLine;
use crate::bus::BusDevice;
use std::sync::Arc;

/// Size of one transport's MMIO window.
pub const MMIO_SIZE: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// "VME" in little-endian ASCII.
const VENDOR: u32 = 0x0045_4d56;

// Device status bits (virtio 1.2 §2.1).
pub const S_ACKNOWLEDGE: u32 = 1;
pub const S_DRIVER: u32 = 2;
pub const S_DRIVER_OK: u32 = 4;
pub const S_FEATURES_OK: u32 = 8;
pub const S_NEEDS_RESET: u32 = 0x40;
pub const S_FAILED: u32 = 0x80;

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

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<dyn GuestMemory>,
    irq: Arc<dyn IrqLine>,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    /// Bumped whenever the device's configuration changes, so a driver reading a
    /// multi-field configuration sees that it changed under it.
    config_generation: u32,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Arc<dyn GuestMemory>,
        irq: Arc<dyn IrqLine>,
    ) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&m| Queue::new(m))
            .collect();
        MmioTransport {
            device,
            mem,
            irq,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
        }
    }

    /// The device status register (for tests and diagnostics).
    pub fn status(&self) -> u32 {
        self.status
    }

    fn offered(&self) -> u64 {
        self.device.features() | F_VERSION_1
    }

    fn reset(&mut self) {
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queues.iter_mut().for_each(Queue::reset);
        self.device.reset();
        self.set_interrupt(0);
    }

    fn set_interrupt(&mut self, status: u32) {
        self.interrupt_status = status;
        self.irq.set_level(status != 0);
    }

    /// The driver broke the rules: stop serving queues until it resets the device.
    fn needs_reset(&mut self, why: &dyn std::fmt::Display) {
        if self.status & S_NEEDS_RESET == 0 {
            log::warn!(
                "virtio device {} needs reset: {why}",
                self.device.device_id()
            );
        }
        self.status |= S_NEEDS_RESET;
        if self.status & S_DRIVER_OK != 0 {
            self.set_interrupt(self.interrupt_status | INT_CONFIG);
        }
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A queue register the driver may write only while the queue is not ready.
    fn configure_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if self.status & S_DRIVER_OK != 0 {
            // Queues are fixed once the device runs.
            return;
        }
        if let Some(q) = self.selected().filter(|q| !q.ready) {
            f(q);
        }
    }

    fn set_status(&mut self, val: u32) {
        if val == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = val | (old & S_NEEDS_RESET);
        if new & old != old {
            self.needs_reset(&format_args!(
                "the driver cleared status bits ({old:#x} -> {val:#x}) without a reset"
            ));
            return;
        }
        if new & S_FEATURES_OK != 0 && old & S_FEATURES_OK == 0 {
            let unknown = self.driver_features & !self.offered();
            if unknown != 0 || self.driver_features & F_VERSION_1 == 0 {
                // Refused: FEATURES_OK stays clear and the driver sees it on read-back.
                log::warn!(
                    "virtio device {}: refusing driver features {:#x} (unknown {unknown:#x}, VERSION_1 required)",
                    self.device.device_id(),
                    self.driver_features
                );
                new &= !S_FEATURES_OK;
            }
        }
        if new & S_DRIVER_OK != 0 && old & S_DRIVER_OK == 0 {
            if new & S_FEATURES_OK == 0 {
                self.status = new;
                self.needs_reset(&"DRIVER_OK without FEATURES_OK");
                return;
            }
            self.device.activate(self.driver_features);
        }
        self.status = new;
    }

    fn notify(&mut self, index: u32) {
        if self.status & S_DRIVER_OK == 0 || self.status & S_NEEDS_RESET != 0 {
            return;
        }
        let Some(queue) = self.queues.get_mut(index as usize) else {
            return;
        };
        if !queue.ready {
            return;
        }
        let mem = &*self.mem;
        let result = self
            .device
            .process(index as usize, queue, mem)
            .and_then(|used| Ok(used && queue.wants_interrupt(mem)?));
        match result {
            Ok(true) => self.set_interrupt(self.interrupt_status | INT_USED),
            Ok(false) => {}
            Err(e) => self.needs_reset(&format_args!("queue {index}: {e}")),
        }
    }

    /// The host changed the device's configuration (a balloon's new target): tells a running
    /// driver with the configuration-change interrupt. A driver that is not running yet reads
    /// the configuration when it starts.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & S_DRIVER_OK != 0 {
            self.set_interrupt(self.interrupt_status | INT_CONFIG);
        }
    }

    /// Serves queue `index` as if the driver had notified it, for devices with an event
    /// source of their own (frames arriving for a net device). Returns false when the device
    /// cannot serve the queue (not running, needing reset, queue not ready), so the caller
    /// stops waiting on its source until the driver sets the device up again.
    pub fn kick(&mut self, index: u32) -> bool {
        self.notify(index);
        self.status & S_DRIVER_OK != 0
            && self.status & S_NEEDS_RESET == 0
            && self.queues.get(index as usize).is_some_and(|q| q.ready)
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            R_MAGIC => MAGIC,
            R_VERSION => VERSION,
            R_DEVICE_ID => self.device.device_id(),
            R_VENDOR_ID => VENDOR,
            R_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered() as u32,
                1 => (self.offered() >> 32) as u32,
                _ => 0,
            },
            R_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            R_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            R_INTERRUPT_STATUS => self.interrupt_status,
            R_STATUS => self.status,
            // No shared memory regions: length and base read as all ones (§4.2.2.1).
            R_SHM_LEN_LOW..=R_SHM_BASE_HIGH => u32::MAX,
            R_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(v);
        let hi = |old: u64| (old & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            R_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            // Features are fixed once FEATURES_OK is set.
            R_DRIVER_FEATURES if self.status & S_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => self.driver_features = lo(self.driver_features),
                    1 => self.driver_features = hi(self.driver_features),
                    _ => {}
                }
            }
            R_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            R_QUEUE_SEL => self.queue_sel = v,
            R_QUEUE_NUM => self.configure_queue(|q| q.size = v.min(0xffff) as u16),
            R_QUEUE_DESC_LOW => self.configure_queue(|q| q.desc_addr = lo(q.desc_addr)),
            R_QUEUE_DESC_HIGH => self.configure_queue(|q| q.desc_addr = hi(q.desc_addr)),
            R_QUEUE_DRIVER_LOW => self.configure_queue(|q| q.avail_addr = lo(q.avail_addr)),
            R_QUEUE_DRIVER_HIGH => self.configure_queue(|q| q.avail_addr = hi(q.avail_addr)),
            R_QUEUE_DEVICE_LOW => self.configure_queue(|q| q.used_addr = lo(q.used_addr)),
            R_QUEUE_DEVICE_HIGH => self.configure_queue(|q| q.used_addr = hi(q.used_addr)),
            R_QUEUE_READY => self.queue_ready(v),
            R_QUEUE_NOTIFY => self.notify(v),
            R_INTERRUPT_ACK => self.set_interrupt(self.interrupt_status & !v),
            R_STATUS => self.set_status(v),
            _ => {}
        }
    }

    fn queue_ready(&mut self, v: u32) {
        let mem = self.mem.clone();
        let sel = self.queue_sel;
        let Some(q) = self.queues.get_mut(sel as usize) else {
            return;
        };
        if v == 0 {
            // Disabling a queue forgets its position, as a reset of that queue would.
            q.reset();
            return;
        }
        if q.ready || self.status & S_FEATURES_OK == 0 {
            return;
        }
        match q.validate(&*mem) {
            Ok(()) => q.ready = true,
            Err(e) => self.needs_reset(&format_args!("queue {sel}: {e}")),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG {
            self.device.read_config(offset - CONFIG, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            self.device.write_config(offset - CONFIG, data);
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
