//! A type-0 configuration header with its write mask: identity registers, the command
//! register, 32-bit memory BARs (sized the standard way: the guest writes all-ones and reads
//! back the size mask, because only the address bits above the size are writable) and a
//! capability list.

/// Configuration header registers (PCI Local Bus 3.0 §6.1).
pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION: usize = 0x08;
pub const CLASS_PROG_IF: usize = 0x09;
pub const CACHE_LINE: usize = 0x0c;
pub const LATENCY: usize = 0x0d;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAPABILITIES: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;

pub const BARS: usize = 6;
/// Command register: memory space decoding.
pub const CMD_MEMORY: u16 = 1 << 1;
/// The command bits a guest may set: I/O and memory decoding, bus mastering, INTx disable
/// (nothing else has an effect here).
const CMD_WRITABLE: u16 = 0x0001 | 0x0002 | 0x0004 | 0x0400;
/// Status register: a capability list is present.
const STATUS_CAP_LIST: u16 = 1 << 4;
/// The conventional header and capabilities; ECAM's extended space past it reads as zero.
const SIZE: usize = 256;
/// Capabilities start right after the type-0 header.
const FIRST_CAP: usize = 0x40;

pub struct ConfigSpace {
    regs: [u8; SIZE],
    wmask: [u8; SIZE],
    bar_sizes: [u64; BARS],
    /// Where the next capability goes, and the pointer that must point at it.
    next_cap: usize,
    last_next_ptr: usize,
}

/// Identity of a function.
#[derive(Clone, Copy, Debug)]
pub struct Ids {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Base class, sub-class and programming interface (e.g. 0x060000: host bridge).
    pub class: u32,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

impl ConfigSpace {
    pub fn new(ids: Ids) -> Self {
        let mut c = ConfigSpace {
            regs: [0; SIZE],
            wmask: [0; SIZE],
            bar_sizes: [0; BARS],
            next_cap: FIRST_CAP,
            last_next_ptr: CAPABILITIES,
        };
        c.set16(VENDOR_ID, ids.vendor);
        c.set16(DEVICE_ID, ids.device);
        c.regs[REVISION] = ids.revision;
        c.regs[CLASS_PROG_IF..CLASS_PROG_IF + 3].copy_from_slice(&ids.class.to_le_bytes()[..3]);
        c.regs[HEADER_TYPE] = 0; // type 0, single function
        c.set16(SUBSYSTEM_VENDOR, ids.subsystem_vendor);
        c.set16(SUBSYSTEM_ID, ids.subsystem);
        c.wmask[COMMAND..COMMAND + 2].copy_from_slice(&CMD_WRITABLE.to_le_bytes());
        c.wmask[CACHE_LINE] = 0xff;
        c.wmask[LATENCY] = 0xff;
        c.wmask[INTERRUPT_LINE] = 0xff;
        c
    }

    fn set16(&mut self, at: usize, v: u16) {
        self.regs[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    pub fn u16_at(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.regs[at], self.regs[at + 1]])
    }

    pub fn u32_at(&self, at: usize) -> u32 {
        let mut b = [0; 4];
        b.copy_from_slice(&self.regs[at..at + 4]);
        u32::from_le_bytes(b)
    }

    /// Declares BAR `index` as 32-bit, non-prefetchable memory of `size` bytes (a power of
    /// two, at least 4 KiB so a BAR never shares a page with another function's).
    pub fn add_mem32_bar(&mut self, index: usize, size: u32) {
        assert!(
            index < BARS && size.is_power_of_two() && size >= 0x1000,
            "BAR {index} of {size:#x} bytes"
        );
        self.bar_sizes[index] = u64::from(size);
        let at = BAR0 + 4 * index;
        // Type bits 0 (memory, 32-bit, not prefetchable) are read-only zeros.
        self.wmask[at..at + 4].copy_from_slice(&(!(size - 1)).to_le_bytes());
    }

    /// Places BAR `index` at `addr` (the firmware's assignment; the guest may move it).
    pub fn set_bar(&mut self, index: usize, addr: u32) {
        let at = BAR0 + 4 * index;
        let v = addr & self.u32_at_mask(at);
        self.regs[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn u32_at_mask(&self, at: usize) -> u32 {
        let mut b = [0; 4];
        b.copy_from_slice(&self.wmask[at..at + 4]);
        u32::from_le_bytes(b)
    }

    pub fn memory_enabled(&self) -> bool {
        self.u16_at(COMMAND) & CMD_MEMORY != 0
    }

    /// Where BAR `index` decodes, if it is implemented and memory decoding is on.
    pub fn bar_addr(&self, index: usize) -> Option<u64> {
        let size = *self.bar_sizes.get(index)?;
        if size == 0 || !self.memory_enabled() {
            return None;
        }
        Some(u64::from(self.u32_at(BAR0 + 4 * index)) & !(size - 1))
    }

    pub fn bar_size(&self, index: usize) -> u64 {
        self.bar_sizes.get(index).copied().unwrap_or(0)
    }

    /// The BARs that decode now: (index, base, size), lowest index first.
    pub fn bar_ranges(&self) -> Vec<(usize, u64, u64)> {
        (0..BARS)
            .filter_map(|i| Some((i, self.bar_addr(i)?, self.bar_sizes[i])))
            .collect()
    }

    /// Appends a capability with ID `id`; `body` follows the ID and next-pointer bytes and
    /// `wmask` (same length, or empty for read-only) says which of its bits the guest may
    /// write. Returns the capability's offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], wmask: &[u8]) -> usize {
        let at = self.next_cap;
        let len = 2 + body.len();
        assert!(
            at + len <= SIZE && (wmask.is_empty() || wmask.len() == body.len()),
            "capability {id:#x} of {len} bytes does not fit"
        );
        self.regs[at] = id;
        self.regs[at + 1] = 0;
        self.regs[at + 2..at + len].copy_from_slice(body);
        if !wmask.is_empty() {
            self.wmask[at + 2..at + len].copy_from_slice(wmask);
        }
        self.regs[self.last_next_ptr] = at as u8;
        self.last_next_ptr = at + 1;
        let status = self.u16_at(STATUS) | STATUS_CAP_LIST;
        self.set16(STATUS, status);
        // Capabilities are dword-aligned.
        self.next_cap = (at + len + 3) & !3;
        at
    }

    /// Reads any bytes of the space; past the conventional 256 bytes everything is zero.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i)
                .and_then(|o| self.regs.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// The conventional space's bytes, for a snapshot.
    pub fn state(&self) -> Vec<u8> {
        self.regs.to_vec()
    }

    /// Takes a snapshot's bytes into this freshly made space. Only the bits a guest can
    /// write may differ from what the space holds now; anything else means the snapshot
    /// holds another function (or an edited one), and is refused.
    pub fn restore(&mut self, regs: &[u8]) -> Result<(), String> {
        if regs.len() != SIZE {
            return Err(format!(
                "{} bytes of configuration space saved, a function has {SIZE}",
                regs.len()
            ));
        }
        let fixed = (0..SIZE).find(|&o| (regs[o] ^ self.regs[o]) & !self.wmask[o] != 0);
        if let Some(o) = fixed {
            return Err(format!(
                "configuration byte {o:#x} is {:#04x} but reads {:#04x} on this function, and \
                 a guest cannot change it: the snapshot holds another device here",
                regs[o], self.regs[o]
            ));
        }
        self.regs.copy_from_slice(regs);
        Ok(())
    }

    /// Writes any bytes of the space; only the bits of the write mask change.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|&o| o < SIZE) else {
                return;
            };
            let m = self.wmask[o];
            self.regs[o] = (self.regs[o] & !m) | (b & m);
        }
    }
}
