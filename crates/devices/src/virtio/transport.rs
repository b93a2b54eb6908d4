//! The transport-independent half of a virtio device (virtio 1.2 §2, §3): feature
//! negotiation, the device status state machine, the queues and their notification, and
//! `DEVICE_NEEDS_RESET` for a driver that breaks the rules. The virtio-mmio ([`super::mmio`])
//! and virtio-pci ([`super::pci`]) transports decode their registers and deliver interrupts
//! their own way, and share this state machine, so a rule is enforced once for both.
//!
//! Interrupts leave through [`Interrupts`]: "queue `i` used buffers" and "the configuration
//! changed" (which includes entering `DEVICE_NEEDS_RESET`). How those become a level on a pin
//! (mmio) or an MSI-X message (pci) is the transport's business.

use super::{
    DeviceState, F_VERSION_1, GuestMemory, Queue, QueueState, StateError, VirtioDevice, device_name,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

// Device status bits (virtio 1.2 §2.1).
pub const S_ACKNOWLEDGE: u32 = 1;
pub const S_DRIVER: u32 = 2;
pub const S_DRIVER_OK: u32 = 4;
pub const S_FEATURES_OK: u32 = 8;
pub const S_NEEDS_RESET: u32 = 0x40;
pub const S_FAILED: u32 = 0x80;

/// Every status bit a device can have.
const S_ALL: u32 =
    S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK | S_FEATURES_OK | S_NEEDS_RESET | S_FAILED;

/// The transport-independent state of one virtio device in a snapshot (both transports
/// save this; each adds its own registers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueState>,
    pub device: DeviceState,
}

/// Where a transport's interrupts go.
pub trait Interrupts {
    /// Queue `index` placed buffers in its used ring and the driver wants to hear of it.
    fn queue(&mut self, index: u32);
    /// The device configuration changed (or the device needs a reset).
    fn config(&mut self);
}

/// Features, status, queues and the device behind one transport.
pub struct VirtioCore {
    device: Box<dyn VirtioDevice>,
    mem: Arc<dyn GuestMemory>,
    queues: Vec<Queue>,
    status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    driver_features: u64,
    pub queue_sel: u32,
    /// Bumped whenever the host changes the device's configuration, so a driver reading a
    /// multi-field configuration sees that it changed under it.
    pub config_generation: u32,
}

impl VirtioCore {
    pub fn new(device: Box<dyn VirtioDevice>, mem: Arc<dyn GuestMemory>) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&m| Queue::new(m))
            .collect();
        VirtioCore {
            device,
            mem,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
        }
    }

    /// The host changed the device's configuration (a balloon's new target): a running
    /// driver hears it through the configuration-change interrupt; one that is not running
    /// yet reads the configuration when it starts.
    pub fn config_changed(&mut self, irq: &mut dyn Interrupts) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & S_DRIVER_OK != 0 {
            irq.config();
        }
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        &*self.device
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        &mut *self.device
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The queue `queue_sel` selects, if it exists.
    pub fn selected(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// Whether the device serves its queues (DRIVER_OK, not broken).
    pub fn running(&self) -> bool {
        self.status & S_DRIVER_OK != 0 && self.status & S_NEEDS_RESET == 0
    }

    pub fn offered(&self) -> u64 {
        self.device.features() | F_VERSION_1
    }

    /// The 32 offered feature bits `device_features_sel` selects.
    pub fn device_features_word(&self) -> u32 {
        match self.device_features_sel {
            0 => self.offered() as u32,
            1 => (self.offered() >> 32) as u32,
            _ => 0,
        }
    }

    /// The 32 accepted feature bits `driver_features_sel` selects.
    pub fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver writes the 32 feature bits `driver_features_sel` selects; features are
    /// fixed once FEATURES_OK is set.
    pub fn set_driver_features_word(&mut self, v: u32) {
        if self.status & S_FEATURES_OK != 0 {
            return;
        }
        let f = self.driver_features;
        match self.driver_features_sel {
            0 => self.driver_features = (f & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = (f & 0xffff_ffff) | (u64::from(v) << 32),
            _ => {}
        }
    }

    /// Status 0: forgets everything negotiated. The transport resets its own registers.
    pub fn reset(&mut self) {
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queues.iter_mut().for_each(Queue::reset);
        self.device.reset();
    }

    /// The VM has ended: [`VirtioDevice::shutdown`].
    pub fn shutdown(&mut self) {
        self.device.shutdown();
    }

    /// The driver broke the rules: stop serving queues until it resets the device.
    pub fn needs_reset(&mut self, why: &dyn std::fmt::Display, irq: &mut dyn Interrupts) {
        if self.status & S_NEEDS_RESET == 0 {
            log::warn!(
                "virtio device {} needs reset: {why}",
                self.device.device_id()
            );
        }
        self.status |= S_NEEDS_RESET;
        if self.status & S_DRIVER_OK != 0 {
            irq.config();
        }
    }

    /// A queue register the driver may write only while the queue is not ready and the
    /// device not running (queues are fixed once it runs).
    pub fn configure_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if self.status & S_DRIVER_OK != 0 {
            return;
        }
        if let Some(q) = self
            .queues
            .get_mut(self.queue_sel as usize)
            .filter(|q| !q.ready)
        {
            f(q);
        }
    }

    /// A status write other than 0 (the transport handles 0 as a reset of itself and this).
    pub fn set_status(&mut self, val: u32, irq: &mut dyn Interrupts) {
        let old = self.status;
        let mut new = val | (old & S_NEEDS_RESET);
        if new & old != old {
            self.needs_reset(
                &format_args!(
                    "the driver cleared status bits ({old:#x} -> {val:#x}) without a reset"
                ),
                irq,
            );
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
                self.needs_reset(&"DRIVER_OK without FEATURES_OK", irq);
                return;
            }
            self.device.activate(self.driver_features);
        }
        self.status = new;
    }

    /// The driver enables (1) or disables (0) the selected queue. Enabling validates the
    /// queue's size and rings against guest RAM.
    pub fn queue_ready(&mut self, v: u32, irq: &mut dyn Interrupts) {
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
        match q.validate(&*self.mem) {
            Ok(()) => q.ready = true,
            Err(e) => self.needs_reset(&format_args!("queue {sel}: {e}"), irq),
        }
    }

    /// The state for a snapshot (the caller holds the transport, so no request is half done).
    pub fn state(&self) -> CoreState {
        CoreState {
            device_type: self.device.device_id(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(Queue::state).collect(),
            device: self.device.save_state(),
        }
    }

    /// Takes a snapshot's state into this freshly made device (status 0), checked as if
    /// the driver had set it up step by step: the same device type and queue count, only
    /// status bits that exist in an order the state machine allows, features the device
    /// offers, queues that validate against the restored RAM. A running driver's device is
    /// activated with its features, then given its own state. On error the transport must
    /// be dropped.
    pub fn restore(&mut self, s: &CoreState) -> Result<(), StateError> {
        let here = self.device.device_id();
        if s.device_type != here {
            return Err(StateError(format!(
                "the snapshot has a {} device here, this VM a {}",
                device_name(s.device_type),
                device_name(here)
            )));
        }
        if s.queues.len() != self.queues.len() {
            return Err(StateError(format!(
                "{} queues saved, the device has {}",
                s.queues.len(),
                self.queues.len()
            )));
        }
        let st = s.status;
        let accepted = st & S_FEATURES_OK != 0;
        if st & !S_ALL != 0 || (st & S_DRIVER_OK != 0 && !accepted && st & S_NEEDS_RESET == 0) {
            return Err(StateError(format!(
                "device status {st:#x} cannot be reached"
            )));
        }
        let unknown = s.driver_features & !self.offered();
        if accepted && (unknown != 0 || s.driver_features & F_VERSION_1 == 0) {
            return Err(StateError(format!(
                "the guest's driver uses features {:#x} that the device does not offer now                  (it offers {:#x}): give the device the settings it had (e.g. the same                  readonly=)",
                unknown,
                self.offered()
            )));
        }
        let queues = self
            .queues
            .iter()
            .zip(&s.queues)
            .enumerate()
            .map(|(i, (q, qs))| {
                q.restored(qs, &*self.mem)
                    .map_err(|e| StateError(format!("queue {i}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.queues = queues;
        self.status = st;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.config_generation = s.config_generation;
        if st & S_DRIVER_OK != 0 && accepted {
            self.device.activate(self.driver_features);
        }
        let sizes: Vec<u16> = self.queues.iter().map(|q| q.size).collect();
        self.device.restore_state(&s.device, &sizes)
    }

    /// Indexes of the queues a restored device should look at once: the guest may have
    /// made chains available that nobody served before the snapshot (a throttled disk).
    pub fn ready_queues(&self) -> Vec<u32> {
        if !self.running() {
            return Vec::new();
        }
        (0..self.queues.len() as u32)
            .filter(|&i| self.queues[i as usize].ready)
            .collect()
    }

    /// The driver notified queue `index`: serve its available chains.
    pub fn notify(&mut self, index: u32, irq: &mut dyn Interrupts) {
        if !self.running() {
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
            Ok(true) => irq.queue(index),
            Ok(false) => {}
            Err(e) => self.needs_reset(&format_args!("queue {index}: {e}"), irq),
        }
    }

    /// Serves queue `index` as if the driver had notified it, for devices with an event
    /// source of their own. Returns false when the device cannot serve the queue (not
    /// running, needing reset, queue not ready), so the caller stops waiting on its source
    /// until the driver sets the device up again.
    pub fn kick(&mut self, index: u32, irq: &mut dyn Interrupts) -> bool {
        self.notify(index, irq);
        self.running() && self.queues.get(index as usize).is_some_and(|q| q.ready)
    }
}
