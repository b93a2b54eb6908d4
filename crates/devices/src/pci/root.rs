//! Bus 0 and how the guest reaches it: the host bridge, the type-1 configuration ports, the
//! ECAM window, the BAR window and the allocator that places BARs in it at boot.

use super::config::{ConfigSpace, Ids};
use super::{CONFIG_SPACE_SIZE, PciFunction};
use crate::bus::BusDevice;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// Devices on bus 0 (device numbers 0..31; function 0 only).
pub const SLOTS: usize = 32;
/// First port of the type-1 mechanism: CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at 0xCFC..0xCFF.
pub const CONFIG_IO_PORT: u16 = 0xcf8;
pub const CONFIG_IO_LEN: u64 = 8;
/// ECAM bytes per bus: 32 devices x 8 functions x 4 KiB.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// CONFIG_ADDRESS: configuration access enabled.
const ADDRESS_ENABLE: u32 = 1 << 31;

pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("PCI bus 0 is full: it has {SLOTS} device numbers, one taken by the host bridge")]
    Full,
    #[error("the PCI BAR window has no room for a BAR of {size:#x} bytes: use fewer PCI devices")]
    NoRoom { size: u64 },
}

fn lock(f: &SharedFunction) -> MutexGuard<'_, dyn PciFunction + 'static> {
    // Every access applies whole, so a panicked holder leaves a consistent function.
    f.lock().unwrap_or_else(|p| p.into_inner())
}

/// The host bridge: identity only. Vendor/device 8086:0d57 is what Cloud Hypervisor and
/// Firecracker present for the same purpose; Linux only looks at the class (host bridge).
pub struct HostBridge(ConfigSpace);

impl HostBridge {
    pub fn new() -> Self {
        HostBridge(ConfigSpace::new(Ids {
            vendor: 0x8086,
            device: 0x0d57,
            revision: 0,
            class: 0x06_00_00,
            subsystem_vendor: 0,
            subsystem: 0,
        }))
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciFunction for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.0.read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.0.write(offset, data);
    }
    fn bar_ranges(&self) -> Vec<(usize, u64, u64)> {
        Vec::new()
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// Bus 0's functions by device number. Fixed once the machine is built.
pub struct PciBus {
    slots: Vec<Option<SharedFunction>>,
    /// Device 0, also in `slots`, kept typed for snapshots.
    bridge: Arc<Mutex<HostBridge>>,
    /// Where each function's BARs decode, (device, BAR, base, size) in device order,
    /// refreshed after every configuration write to that device. Decoding an access looks
    /// here, so it waits for no function's lock but the target's (a device thread may hold
    /// another function's lock for a long request).
    decoded: RwLock<Vec<(usize, usize, u64, u64)>>,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus with the host bridge at device 0.
    pub fn new() -> Self {
        let mut slots: Vec<Option<SharedFunction>> = vec![None; SLOTS];
        let bridge = Arc::new(Mutex::new(HostBridge::new()));
        slots[0] = Some(bridge.clone());
        PciBus {
            slots,
            bridge,
            decoded: RwLock::new(Vec::new()),
        }
    }

    /// The host bridge's configuration space, for a snapshot.
    pub fn bridge_state(&self) -> Vec<u8> {
        self.bridge
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .state()
    }

    /// Takes a snapshot's host bridge configuration space (see [`ConfigSpace::restore`]).
    pub fn restore_bridge(&self, regs: &[u8]) -> Result<(), String> {
        self.bridge
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .restore(regs)
    }

    /// Re-reads where every function's BARs decode (after restoring their configuration).
    pub fn refresh_all(&self) {
        for slot in 0..self.slots.len() {
            self.refresh(slot);
        }
    }

    /// Puts `f` at the next free device number and returns that number.
    pub fn add(&mut self, f: SharedFunction) -> Result<u8, PciError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::Full)?;
        self.slots[slot] = Some(f);
        self.refresh(slot);
        Ok(slot as u8)
    }

    fn function(&self, bus: u32, device: u32, function: u32) -> Option<&SharedFunction> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get(device as usize)?.as_ref()
    }

    /// A configuration read; a missing function reads all-ones (vendor 0xffff: "nobody").
    fn config_read(&self, bus: u32, device: u32, function: u32, reg: usize, data: &mut [u8]) {
        match self.function(bus, device, function) {
            Some(f) if reg + data.len() <= CONFIG_SPACE_SIZE => lock(f).config_read(reg, data),
            _ => data.fill(0xff),
        }
    }

    fn config_write(&self, bus: u32, device: u32, function: u32, reg: usize, data: &[u8]) {
        if let Some(f) = self.function(bus, device, function) {
            if reg + data.len() <= CONFIG_SPACE_SIZE {
                lock(f).config_write(reg, data);
                self.refresh(device as usize);
            }
        }
    }

    /// Re-reads where device `slot`'s BARs decode.
    fn refresh(&self, slot: usize) {
        let Some(f) = self.slots.get(slot).and_then(Option::as_ref) else {
            return;
        };
        let ranges = lock(f).bar_ranges();
        let mut decoded = self.decoded.write().unwrap_or_else(|p| p.into_inner());
        decoded.retain(|&(s, ..)| s != slot);
        decoded.extend(
            ranges
                .into_iter()
                .map(|(bar, base, size)| (slot, bar, base, size)),
        );
        decoded.sort_by_key(|&(s, bar, ..)| (s, bar));
    }

    /// The function whose BAR holds `[addr, addr+len)`, the lowest device number first.
    fn decode(&self, addr: u64, len: u64) -> Option<(&SharedFunction, usize, u64)> {
        let decoded = self.decoded.read().unwrap_or_else(|p| p.into_inner());
        decoded.iter().find_map(|&(slot, bar, base, size)| {
            let off = addr.checked_sub(base)?;
            if off.checked_add(len)? > size {
                return None;
            }
            Some((self.slots.get(slot)?.as_ref()?, bar, off))
        })
    }
}

/// The type-1 configuration mechanism at ports 0xCF8..0xCFF.
pub struct ConfigIo {
    bus: Arc<PciBus>,
    address: u32,
}

impl ConfigIo {
    pub fn new(bus: Arc<PciBus>) -> Self {
        ConfigIo { bus, address: 0 }
    }

    /// (bus, device, function, register) CONFIG_ADDRESS selects, if enabled; `byte` is the
    /// data port byte (0..3) the access starts at.
    fn target(&self, byte: u64) -> Option<(u32, u32, u32, usize)> {
        let a = self.address;
        (a & ADDRESS_ENABLE != 0).then_some((
            (a >> 16) & 0xff,
            (a >> 11) & 0x1f,
            (a >> 8) & 7,
            (a & 0xfc) as usize + byte as usize,
        ))
    }
}

impl BusDevice for ConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            // CONFIG_ADDRESS is a dword register; narrower reads see nothing.
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match self.target(offset - 4) {
                Some((b, d, f, reg)) => self.bus.config_read(b, d, f, reg, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 => {
                if let Ok(b) = <[u8; 4]>::try_from(data) {
                    // Reserved bits 30:24 and 1:0 read as zero.
                    self.address = u32::from_le_bytes(b) & 0x80ff_fffc;
                }
            }
            4..=7 => {
                if let Some((b, d, f, reg)) = self.target(offset - 4) {
                    self.bus.config_write(b, d, f, reg, data);
                }
            }
            _ => {}
        }
    }
}

/// The ECAM window of bus 0 (1 MiB: device << 15 | function << 12 | register).
pub struct Ecam(Arc<PciBus>);

impl Ecam {
    pub fn new(bus: Arc<PciBus>) -> Self {
        Ecam(bus)
    }

    /// (device, function, register) of an access that stays inside one function's space
    /// and has a configuration width (1, 2 or 4 bytes).
    fn target(offset: u64, len: usize) -> Option<(u32, u32, usize)> {
        let reg = (offset & 0xfff) as usize;
        (matches!(len, 1 | 2 | 4) && offset < ECAM_BUS_SIZE && reg + len <= CONFIG_SPACE_SIZE)
            .then_some(((offset >> 15) as u32 & 0x1f, (offset >> 12) as u32 & 7, reg))
    }
}

impl BusDevice for Ecam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::target(offset, data.len()) {
            Some((d, f, reg)) => self.0.config_read(0, d, f, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((d, f, reg)) = Self::target(offset, data.len()) {
            self.0.config_write(0, d, f, reg, data);
        }
    }
}

/// The 32-bit window memory BARs are decoded in. An address no BAR decodes reads all-ones.
pub struct BarWindow {
    bus: Arc<PciBus>,
    base: u64,
}

impl BarWindow {
    pub fn new(bus: Arc<PciBus>, base: u64) -> Self {
        BarWindow { bus, base }
    }
}

impl BusDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let addr = self.base + offset;
        match self.bus.decode(addr, data.len() as u64) {
            Some((f, bar, off)) => lock(f).bar_read(bar, off, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let addr = self.base + offset;
        if let Some((f, bar, off)) = self.bus.decode(addr, data.len() as u64) {
            lock(f).bar_write(bar, off, data);
        }
    }
}

/// Hands out naturally aligned BAR addresses from `[base, end)` at boot (the firmware's job;
/// the guest keeps them since they lie inside the host bridge's window).
pub struct BarAllocator {
    next: u64,
    end: u64,
}

impl BarAllocator {
    pub fn new(base: u64, size: u64) -> Self {
        BarAllocator {
            next: base,
            end: base.saturating_add(size),
        }
    }

    /// The next free address for a BAR of `size` bytes (a power of two).
    pub fn allocate(&mut self, size: u64) -> Result<u64, PciError> {
        let addr = self
            .next
            .checked_next_multiple_of(size.max(1))
            .filter(|a| a.checked_add(size).is_some_and(|e| e <= self.end))
            .ok_or(PciError::NoRoom { size })?;
        self.next = addr + size;
        Ok(addr)
    }
}
