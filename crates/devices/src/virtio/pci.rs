//! The virtio 1.2 PCI transport, modern only (§4.1): vendor 0x1af4, device 0x1040 + type,
//! revision 1. One 32 KiB memory BAR (BAR 0) holds every structure:
//!
//! | offset | what |
//! |---|---|
//! | 0x0000 | common configuration (§4.1.4.3) |
//! | 0x1000 | ISR status (read clears) |
//! | 0x2000 | device-specific configuration |
//! | 0x3000 | notifications: queue i at 0x3000 + 4 i (`notify_off_multiplier` 4) |
//! | 0x4000 | MSI-X table (one vector for configuration changes, one per queue) |
//! | 0x6000 | MSI-X pending bit array |
//!
//! Each queue's notify address is its own, so the machine can place an ioeventfd there
//! ([`NotifyWatcher`] hears where BAR 0 is): the value written is not looked at. The
//! rules a driver must follow (features, status, queue setup) are [`VirtioCore`]'s, shared
//! with virtio-mmio. Interrupts go through MSI-X only; INTx is not emulated (interrupt pin
//! 0), so a driver that does not enable MSI-X must poll.

use super::transport::{CoreState, Interrupts, S_DRIVER_OK, VirtioCore};
use super::{GuestMemory, StateError, VirtioDevice};
use crate::pci::config::Ids;
use crate::pci::msix::{self, MsiSink, Msix, MsixState};
use crate::pci::{BarWatcher, ConfigSpace, PciFunction};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub const VENDOR: u16 = 0x1af4;
pub const DEVICE_BASE: u16 = 0x1040;
pub const BAR_SIZE: u32 = 0x8000;
pub const COMMON: u64 = 0x0000;
pub const ISR: u64 = 0x1000;
pub const DEVICE_CONFIG: u64 = 0x2000;
pub const NOTIFY: u64 = 0x3000;
pub const NOTIFY_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE: u64 = 0x4000;
pub const MSIX_PBA: u64 = 0x6000;
/// Bytes of each structure the capabilities announce.
const COMMON_LEN: u32 = 0x38;
const ISR_LEN: u32 = 4;
const DEVICE_CONFIG_LEN: u32 = 0x1000;
/// "No vector" for `msix_config` and `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;

/// `cfg_type` of the vendor capabilities (§4.1.4).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
const CAP_VENDOR: u8 = 0x09;

// Common configuration fields (§4.1.4.3): offset.
const C_DEVICE_FEATURE_SELECT: u64 = 0x00;
const C_DEVICE_FEATURE: u64 = 0x04;
const C_DRIVER_FEATURE_SELECT: u64 = 0x08;
const C_DRIVER_FEATURE: u64 = 0x0c;
const C_MSIX_CONFIG: u64 = 0x10;
const C_NUM_QUEUES: u64 = 0x12;
const C_DEVICE_STATUS: u64 = 0x14;
const C_CONFIG_GENERATION: u64 = 0x15;
const C_QUEUE_SELECT: u64 = 0x16;
const C_QUEUE_SIZE: u64 = 0x18;
const C_QUEUE_MSIX_VECTOR: u64 = 0x1a;
const C_QUEUE_ENABLE: u64 = 0x1c;
const C_QUEUE_NOTIFY_OFF: u64 = 0x1e;
const C_QUEUE_DESC: u64 = 0x20;
const C_QUEUE_DRIVER: u64 = 0x28;
const C_QUEUE_DEVICE: u64 = 0x30;

/// The width of the common configuration field at `offset`, for a whole-field access; the
/// 64-bit queue addresses also take dword halves.
fn common_field(offset: u64, len: usize) -> bool {
    let width = match offset {
        C_DEVICE_STATUS | C_CONFIG_GENERATION => 1,
        C_MSIX_CONFIG | C_NUM_QUEUES | C_QUEUE_SELECT..=C_QUEUE_NOTIFY_OFF => 2,
        C_QUEUE_DESC..=0x37 => {
            return offset % 4 == 0 && (len == 4 || (len == 8 && offset % 8 == 0));
        }
        _ if offset < C_MSIX_CONFIG => 4,
        _ => return false,
    };
    len == width && offset % width as u64 == 0
}

/// Told where the notify area is whenever the guest moves BAR 0.
pub type NotifyWatcher = Box<dyn BarWatcher>;

/// The queue a notify-area offset belongs to.
pub fn notify_queue(offset: u64) -> Option<u32> {
    let rel = offset.checked_sub(NOTIFY)?;
    (rel % u64::from(NOTIFY_MULTIPLIER) == 0 && rel < MSIX_TABLE - NOTIFY)
        .then(|| (rel / u64::from(NOTIFY_MULTIPLIER)) as u32)
}

/// The guest address of queue `queue`'s notification, with BAR 0 at `bar`.
pub fn notify_addr(bar: u64, queue: u32) -> u64 {
    bar + NOTIFY + u64::from(queue) * u64::from(NOTIFY_MULTIPLIER)
}

/// A virtio-pci function in a snapshot: the shared core, the configuration space (BAR 0's
/// address, command register, MSI-X enable and mask, the PCI_CFG window), the MSI-X table
/// and pending bits, the ISR and the vector assignments.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciState {
    pub core: CoreState,
    pub config: Vec<u8>,
    pub msix: MsixState,
    pub isr: u8,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
}

/// The interrupt side: ISR status and MSI-X vector assignments.
struct Irq {
    msix: Msix,
    isr: u8,
    config_vector: u16,
    queue_vectors: Vec<u16>,
}

impl Irq {
    fn raise(&mut self, vector: u16) {
        if self.msix.enabled() && vector != NO_VECTOR {
            self.msix.signal(vector);
        }
    }

    /// A vector number the guest asks for: kept if the table has it, else "no vector" (the
    /// driver reads it back and sees the refusal, §4.1.5.1.2).
    fn checked(&self, v: u16) -> u16 {
        if v < self.msix.vectors() {
            v
        } else {
            NO_VECTOR
        }
    }
}

impl Interrupts for Irq {
    fn queue(&mut self, index: u32) {
        self.isr |= 1;
        let v = self
            .queue_vectors
            .get(index as usize)
            .copied()
            .unwrap_or(NO_VECTOR);
        self.raise(v);
    }
    fn config(&mut self) {
        self.isr |= 2;
        self.raise(self.config_vector);
    }
}

pub struct PciTransport {
    core: VirtioCore,
    config: ConfigSpace,
    msix_cap: usize,
    /// The VIRTIO_PCI_CAP_PCI_CFG capability: BAR 0 through configuration space.
    cfg_cap: usize,
    irq: Irq,
    /// BAR 0's decoded address as the watcher last heard it.
    bar: Option<u64>,
    watcher: Option<NotifyWatcher>,
}

impl PciTransport {
    /// A transport for `device`, with one MSI-X vector per queue plus one for configuration
    /// changes, and BAR 0 at `bar` (memory decoding off until the guest enables it).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Arc<dyn GuestMemory>,
        sink: Arc<dyn MsiSink>,
        bar: u32,
    ) -> Self {
        let id = device.device_id();
        let class = match id {
            super::ID_NET => 0x02_00_00,
            super::ID_BLOCK => 0x01_80_00,
            _ => 0xff_00_00,
        };
        let core = VirtioCore::new(device, mem);
        let queues = core.num_queues();
        let mut config = ConfigSpace::new(Ids {
            vendor: VENDOR,
            device: DEVICE_BASE + id as u16,
            revision: 1,
            class,
            subsystem_vendor: VENDOR,
            subsystem: id as u16,
        });
        config.add_mem32_bar(0, BAR_SIZE);
        config.set_bar(0, bar);
        // The table has room for 512 vectors between its offset and the PBA's.
        let room = ((MSIX_PBA - MSIX_TABLE) / msix::ENTRY_SIZE) as usize;
        let vectors = (queues + 1).min(room) as u16;
        let msix = Msix::new(vectors, sink);
        let (body, wmask) = msix.capability(0, MSIX_TABLE as u32, MSIX_PBA as u32);
        let msix_cap = config.add_capability(msix::CAP_ID, &body, &wmask);
        for (kind, offset, len) in [
            (CAP_COMMON, COMMON, COMMON_LEN),
            (CAP_ISR, ISR, ISR_LEN),
            (CAP_DEVICE, DEVICE_CONFIG, DEVICE_CONFIG_LEN),
        ] {
            config.add_capability(CAP_VENDOR, &vendor_cap(kind, offset as u32, len, 14), &[]);
        }
        let notify_len = (queues as u32).max(1) * NOTIFY_MULTIPLIER;
        let mut notify = vendor_cap(CAP_NOTIFY, NOTIFY as u32, notify_len, 18).to_vec();
        notify.extend_from_slice(&NOTIFY_MULTIPLIER.to_le_bytes());
        config.add_capability(CAP_VENDOR, &notify, &[]);
        // VIRTIO_PCI_CAP_PCI_CFG: bar, offset, length and the data window are the driver's.
        let mut window = vendor_cap(CAP_PCI_CFG, 0, 0, 18).to_vec();
        window.extend_from_slice(&[0; 4]);
        let mut wmask = [0u8; 18];
        wmask[2] = 0xff;
        wmask[6..18].fill(0xff);
        let cfg_cap = config.add_capability(CAP_VENDOR, &window, &wmask);
        PciTransport {
            core,
            config,
            msix_cap,
            cfg_cap,
            irq: Irq {
                msix,
                isr: 0,
                config_vector: NO_VECTOR,
                queue_vectors: vec![NO_VECTOR; queues],
            },
            bar: None,
            watcher: None,
        }
    }

    /// Who places fast paths at the notify addresses; told at once where BAR 0 decodes.
    pub fn set_watcher(&mut self, mut watcher: NotifyWatcher) {
        watcher.bar_moved(0, self.bar);
        self.watcher = Some(watcher);
    }

    pub fn num_queues(&self) -> usize {
        self.core.num_queues()
    }

    /// The device status (for tests and diagnostics).
    pub fn status(&self) -> u32 {
        self.core.status()
    }

    /// Serves queue `index` as if the driver had notified it (see [`VirtioCore::kick`]).
    pub fn kick(&mut self, index: u32) -> bool {
        self.core.kick(index, &mut self.irq)
    }

    /// The host changed the device's configuration (see
    /// [`super::transport::VirtioCore::config_changed`]).
    pub fn config_changed(&mut self) {
        self.core.config_changed(&mut self.irq);
    }

    /// Changes the device's rate limits while it runs (see [`VirtioDevice::update_limits`]).
    pub fn update_limits(&mut self, limits: &super::rate_limit::LimitSet) -> bool {
        self.core.device_mut().update_limits(limits)
    }

    /// The VM has ended: [`VirtioDevice::shutdown`](super::VirtioDevice::shutdown).
    pub fn shutdown(&mut self) {
        self.core.shutdown();
    }

    /// The state for a snapshot (the caller holds the transport, so no request is half
    /// done).
    pub fn state(&self) -> PciState {
        PciState {
            core: self.core.state(),
            config: self.config.state(),
            msix: self.irq.msix.state(),
            isr: self.irq.isr,
            config_vector: self.irq.config_vector,
            queue_vectors: self.irq.queue_vectors.clone(),
        }
    }

    /// Takes a snapshot's state into this freshly made transport: the configuration space
    /// (only bits a guest can write may differ), the MSI-X vectors (their routes are
    /// rebuilt through the sink), the core (see [`VirtioCore::restore`]), and BAR 0's
    /// address, which the watcher hears (so notifications get their fast path again). On
    /// error the transport must be dropped.
    pub fn restore(&mut self, s: &PciState) -> Result<(), StateError> {
        let vectors = self.irq.msix.vectors();
        let vector_ok = |v: u16| v == NO_VECTOR || v < vectors;
        if s.queue_vectors.len() != self.irq.queue_vectors.len() {
            return Err(StateError(format!(
                "{} queue vectors saved, the device has {} queues",
                s.queue_vectors.len(),
                self.irq.queue_vectors.len()
            )));
        }
        if let Some(v) = std::iter::once(&s.config_vector)
            .chain(&s.queue_vectors)
            .find(|&&v| !vector_ok(v))
        {
            return Err(StateError(format!(
                "MSI-X vector {v} is assigned, but the function has {vectors}"
            )));
        }
        if s.isr & !3 != 0 {
            return Err(StateError(format!(
                "ISR status {:#x} has bits that do not exist",
                s.isr
            )));
        }
        self.config.restore(&s.config).map_err(StateError)?;
        self.irq.isr = s.isr;
        self.irq.config_vector = s.config_vector;
        self.irq.queue_vectors.clone_from(&s.queue_vectors);
        self.core.restore(&s.core)?;
        let ctrl = self.config.u16_at(self.msix_cap + 2);
        self.irq.msix.restore(&s.msix, ctrl).map_err(StateError)?;
        self.bar = self.config.bar_addr(0);
        if let Some(w) = &mut self.watcher {
            w.bar_moved(0, self.bar);
        }
        Ok(())
    }

    /// Serves every ready queue once, for a restored device (see
    /// [`VirtioCore::ready_queues`]).
    pub fn kick_ready_queues(&mut self) {
        for q in self.core.ready_queues() {
            self.core.kick(q, &mut self.irq);
        }
    }

    fn reset(&mut self) {
        self.core.reset();
        self.irq.isr = 0;
        self.irq.config_vector = NO_VECTOR;
        self.irq.queue_vectors.fill(NO_VECTOR);
    }

    fn queue_vector(&mut self) -> Option<&mut u16> {
        self.irq.queue_vectors.get_mut(self.core.queue_sel as usize)
    }

    fn common_read(&mut self, offset: u64, len: usize) -> u64 {
        if !common_field(offset, len) {
            return 0;
        }
        let core = &self.core;
        let q = core.selected();
        let half = |v: u64| if offset % 8 == 0 { v } else { v >> 32 };
        match offset {
            C_DEVICE_FEATURE_SELECT => u64::from(core.device_features_sel),
            C_DEVICE_FEATURE => u64::from(core.device_features_word()),
            C_DRIVER_FEATURE_SELECT => u64::from(core.driver_features_sel),
            C_DRIVER_FEATURE => u64::from(core.driver_features_word()),
            C_MSIX_CONFIG => u64::from(self.irq.config_vector),
            C_NUM_QUEUES => core.num_queues() as u64,
            C_DEVICE_STATUS => u64::from(core.status() as u8),
            C_CONFIG_GENERATION => u64::from(core.config_generation as u8),
            C_QUEUE_SELECT => u64::from(core.queue_sel as u16),
            C_QUEUE_SIZE => q.map_or(0, |q| u64::from(q.size)),
            C_QUEUE_MSIX_VECTOR => u64::from(
                self.irq
                    .queue_vectors
                    .get(core.queue_sel as usize)
                    .copied()
                    .unwrap_or(NO_VECTOR),
            ),
            C_QUEUE_ENABLE => q.map_or(0, |q| u64::from(q.ready)),
            C_QUEUE_NOTIFY_OFF => q.map_or(0, |_| u64::from(core.queue_sel)),
            o if (C_QUEUE_DESC..C_QUEUE_DRIVER).contains(&o) => q.map_or(0, |q| half(q.desc_addr)),
            o if (C_QUEUE_DRIVER..C_QUEUE_DEVICE).contains(&o) => {
                q.map_or(0, |q| half(q.avail_addr))
            }
            o if (C_QUEUE_DEVICE..C_QUEUE_DEVICE + 8).contains(&o) => {
                q.map_or(0, |q| half(q.used_addr))
            }
            _ => 0,
        }
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        if !common_field(offset, data.len()) {
            return;
        }
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        let v32 = v as u32;
        // A 64-bit field written whole or as one of its dword halves.
        let set = |old: u64| match (data.len(), offset % 8) {
            (8, _) => v,
            (_, 0) => (old & !0xffff_ffff) | (v & 0xffff_ffff),
            _ => (old & 0xffff_ffff) | (v << 32),
        };
        match offset {
            C_DEVICE_FEATURE_SELECT => self.core.device_features_sel = v32,
            C_DRIVER_FEATURE_SELECT => self.core.driver_features_sel = v32,
            C_DRIVER_FEATURE => self.core.set_driver_features_word(v32),
            C_MSIX_CONFIG => self.irq.config_vector = self.irq.checked(v as u16),
            C_DEVICE_STATUS if v == 0 => self.reset(),
            C_DEVICE_STATUS => self.core.set_status(v32, &mut self.irq),
            C_QUEUE_SELECT => self.core.queue_sel = v32,
            C_QUEUE_SIZE => self.core.configure_queue(|q| q.size = v as u16),
            // Like the queue's other registers: fixed once the device runs.
            C_QUEUE_MSIX_VECTOR if self.core.status() & S_DRIVER_OK == 0 => {
                let checked = self.irq.checked(v as u16);
                if let Some(slot) = self.queue_vector() {
                    *slot = checked;
                }
            }
            C_QUEUE_ENABLE => self.core.queue_ready(v32 & 1, &mut self.irq),
            o if (C_QUEUE_DESC..C_QUEUE_DRIVER).contains(&o) => self
                .core
                .configure_queue(|q| q.desc_addr = set(q.desc_addr)),
            o if (C_QUEUE_DRIVER..C_QUEUE_DEVICE).contains(&o) => self
                .core
                .configure_queue(|q| q.avail_addr = set(q.avail_addr)),
            o if (C_QUEUE_DEVICE..C_QUEUE_DEVICE + 8).contains(&o) => self
                .core
                .configure_queue(|q| q.used_addr = set(q.used_addr)),
            // Read-only: device_feature, num_queues, config_generation, queue_notify_off.
            _ => {}
        }
    }

    /// Re-reads what configuration writes may have changed: MSI-X enable/mask, BAR 0.
    fn pci_config_written(&mut self) {
        let ctrl = self.config.u16_at(self.msix_cap + 2);
        self.irq.msix.set_control(ctrl);
        let bar = self.config.bar_addr(0);
        if bar != self.bar {
            self.bar = bar;
            if let Some(w) = &mut self.watcher {
                w.bar_moved(0, bar);
            }
        }
    }
}

impl PciTransport {
    /// For an access to the PCI_CFG capability's data window: the BAR 0 offset and length
    /// the driver selected (§4.1.4.9: length 1, 2 or 4, offset aligned to it, inside BAR 0
    /// and no longer than the access). Anything else is a plain configuration access.
    fn cfg_window(&self, offset: usize, len: usize) -> Option<(u64, usize)> {
        if offset != self.cfg_cap + 16 {
            return None;
        }
        let bar = self.config.u16_at(self.cfg_cap + 4) as u8;
        let off = u64::from(self.config.u32_at(self.cfg_cap + 8));
        let n = self.config.u32_at(self.cfg_cap + 12) as usize;
        (bar == 0
            && matches!(n, 1 | 2 | 4)
            && n <= len
            && off % n as u64 == 0
            && off + n as u64 <= u64::from(BAR_SIZE))
        .then_some((off, n))
    }
}

/// A `virtio_pci_cap` after ID and next pointer: cap_len, cfg_type, bar 0, id 0, padding,
/// offset and length.
fn vendor_cap(kind: u8, offset: u32, len: u32, cap_len: u8) -> [u8; 14] {
    let mut c = [0u8; 14];
    c[0] = cap_len + 2;
    c[1] = kind;
    c[6..10].copy_from_slice(&offset.to_le_bytes());
    c[10..14].copy_from_slice(&len.to_le_bytes());
    c
}

impl PciFunction for PciTransport {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if let Some((off, len)) = self.cfg_window(offset, data.len()) {
            let mut buf = [0u8; 4];
            self.bar_read(0, off, &mut buf[..len]);
            data.fill(0);
            data[..len].copy_from_slice(&buf[..len]);
            return;
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        if let Some((off, len)) = self.cfg_window(offset, data.len()) {
            self.bar_write(0, off, &data[..len]);
            return;
        }
        // Read-only bits stay (ConfigSpace's write mask); a BAR only takes addresses its size
        // aligns.
        self.config.write(offset, data);
        self.pci_config_written();
    }

    fn bar_ranges(&self) -> Vec<(usize, u64, u64)> {
        self.config.bar_ranges()
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        match offset {
            o if o < ISR => {
                let v = self.common_read(o, data.len());
                data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
            }
            ISR => {
                // Reading clears it (and would lower INTx, which we do not have); an empty
                // access reads nothing and clears nothing.
                if let Some(b) = data.first_mut() {
                    *b = std::mem::take(&mut self.irq.isr);
                }
            }
            o if (DEVICE_CONFIG..DEVICE_CONFIG + u64::from(DEVICE_CONFIG_LEN)).contains(&o) => {
                self.core.device().read_config(o - DEVICE_CONFIG, data);
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                self.irq.msix.table_read(o - MSIX_TABLE, data);
            }
            o if o >= MSIX_PBA => self.irq.msix.pba_read(o - MSIX_PBA, data),
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < ISR => self.common_write(o, data),
            o if (DEVICE_CONFIG..DEVICE_CONFIG + u64::from(DEVICE_CONFIG_LEN)).contains(&o) => {
                self.core.device_mut().write_config(o - DEVICE_CONFIG, data);
            }
            o if (NOTIFY..MSIX_TABLE).contains(&o) => {
                if let Some(q) = notify_queue(o) {
                    self.core.notify(q, &mut self.irq);
                }
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                self.irq.msix.table_write(o - MSIX_TABLE, data);
            }
            // ISR and the PBA are read-only.
            _ => {}
        }
    }
}

#[cfg(test)]
#[path = "pci_tests.rs"]
mod tests;
