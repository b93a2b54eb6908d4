//! Address decoding: maps guest address ranges (port I/O or MMIO) to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the range the device was inserted
/// at; `data.len()` is the access width (1, 2, 4 or 8).
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} is empty or wraps the address space")]
    BadRange { base: u64, len: u64 },
    #[error("device range {base:#x}+{len:#x} overlaps the device at {other:#x}+{other_len:#x}")]
    Overlap {
        base: u64,
        len: u64,
        other: u64,
        other_len: u64,
    },
}

#[derive(Default, Clone)]
pub struct Bus {
    // Keyed by base address; values are (length, device).
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::BadRange { base, len });
        };
        // Only the nearest range below and the first range at or above can overlap.
        let below = self.ranges.range(..base).next_back();
        let above = self.ranges.range(base..).next();
        for (&other, &(other_len, _)) in below.into_iter().chain(above) {
            if other < end && base < other + other_len {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other,
                    other_len,
                });
            }
        }
        self.ranges.insert(base, (len, dev));
        Ok(())
    }

    /// Finds the device whose range holds the whole access `[addr, addr+size)`.
    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // An access straddling the end of a range reaches no device.
        (offset.checked_add(size as u64)? <= *len).then_some((offset, dev))
    }

    /// Returns false when no device decodes the address; the caller decides what an unclaimed
    /// access does (x86 reads all-ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device whose previous user panicked is still a consistent state machine (every register
/// write is applied whole), so a poisoned lock is taken over rather than propagated.
pub fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    fn echo() -> SharedDevice {
        Arc::new(Mutex::new(Echo(Vec::new())))
    }

    #[test]
    fn decodes_offsets_and_refuses_straddles() {
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, echo()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(!bus.read(0x400, &mut b));
        assert!(!bus.read(0x3f7, &mut b));
        let mut w = [0u8; 4];
        assert!(!bus.read(0x3fe, &mut w), "access straddling the range end");
        assert!(bus.write(0x3f8, &[1]));
    }

    #[test]
    fn refuses_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, echo()).unwrap();
        assert!(matches!(
            bus.insert(0x10f, 1, echo()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0xf8, 9, echo()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x0, 0, echo()),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, echo()),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(0x110, 1, echo()).unwrap();
        bus.insert(0xf0, 0x10, echo()).unwrap();
    }

    #[test]
    fn huge_addresses_do_not_overflow() {
        let mut bus = Bus::new();
        bus.insert(u64::MAX - 7, 7, echo()).unwrap();
        let mut b = [0u8; 8];
        assert!(!bus.read(u64::MAX - 1, &mut b));
        assert!(
            !bus.read(u64::MAX, &mut b[..1]),
            "the range ends just below u64::MAX"
        );
        assert!(bus.read(u64::MAX - 1, &mut b[..1]));
    }
}
