//! Test harness: guest RAM as a vector at a non-zero base, counting every access the device
//! attempted outside it, and a driver-side helper that lays out rings and posts chains.

use super::{DiscardError, GuestMemory, MemError, Queue};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

pub const BASE: u64 = 0x4000_0000;
pub const SIZE: u64 = 1 << 20;

pub struct TestMemory {
    bytes: Mutex<Vec<u8>>,
    /// Reads/writes the device attempted outside RAM (the harness refused them).
    pub refused: AtomicUsize,
    /// Ranges given back with `discard`, in call order.
    pub discarded: Mutex<Vec<(u64, u64)>>,
}

impl Default for TestMemory {
    fn default() -> Self {
        TestMemory::new()
    }
}

impl TestMemory {
    pub fn new() -> Self {
        TestMemory {
            bytes: Mutex::new(vec![0; SIZE as usize]),
            refused: AtomicUsize::new(0),
            discarded: Mutex::new(Vec::new()),
        }
    }

    fn range(&self, addr: u64, len: u64) -> Result<std::ops::Range<usize>, MemError> {
        let err = MemError { addr, len };
        let off = addr.checked_sub(BASE).ok_or(err)?;
        let end = off.checked_add(len).ok_or(err)?;
        if end > SIZE {
            return Err(err);
        }
        Ok(off as usize..end as usize)
    }

    fn refuse<T>(&self, r: Result<T, MemError>) -> Result<T, MemError> {
        if r.is_err() {
            self.refused.fetch_add(1, Ordering::SeqCst);
        }
        r
    }

    pub fn put(&self, addr: u64, data: &[u8]) {
        self.write(addr, data).unwrap();
    }
    pub fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.read(addr, &mut v).unwrap();
        v
    }
}

impl GuestMemory for TestMemory {
    fn check(&self, addr: u64, len: u64) -> Result<(), MemError> {
        self.range(addr, len).map(|_| ())
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let r = self.refuse(self.range(addr, buf.len() as u64))?;
        buf.copy_from_slice(&self.bytes.lock().unwrap()[r]);
        Ok(())
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemError> {
        let r = self.refuse(self.range(addr, data.len() as u64))?;
        self.bytes.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }
    fn load_u16(&self, addr: u64) -> Result<u16, MemError> {
        let mut b = [0u8; 2];
        self.read(addr, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    fn store_u16(&self, addr: u64, val: u16) -> Result<(), MemError> {
        self.write(addr, &val.to_le_bytes())
    }
    /// Zeroes the range, as MADV_DONTNEED on private anonymous memory would.
    fn discard(&self, addr: u64, len: u64) -> Result<(), DiscardError> {
        DiscardError::check_pages(addr, len)?;
        let r = self.refuse(self.range(addr, len))?;
        self.bytes.lock().unwrap()[r].fill(0);
        self.discarded.lock().unwrap().push((addr, len));
        Ok(())
    }
}

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// The driver's side of one queue in [`TestMemory`]: rings at fixed places, data above them.
pub struct Driver {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    avail_idx: u16,
    next_desc: u16,
}

impl Driver {
    pub fn new(size: u16) -> Self {
        Driver::at(size, BASE)
    }

    /// A driver whose rings start at `base` (a device with several queues needs one each).
    pub fn at(size: u16, base: u64) -> Self {
        Driver {
            size,
            desc: base,
            avail: base + 0x4000,
            used: base + 0x6000,
            avail_idx: 0,
            next_desc: 0,
        }
    }

    /// A ready queue pointing at this driver's rings.
    pub fn queue(&self, max: u16) -> Queue {
        let mut q = Queue::new(max);
        q.size = self.size;
        q.desc_addr = self.desc;
        q.avail_addr = self.avail;
        q.used_addr = self.used;
        q.ready = true;
        q
    }

    pub fn set_desc(&self, mem: &TestMemory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.put(self.desc + 16 * u64::from(i), &d);
    }

    /// Publishes `head` in the available ring.
    pub fn publish(&mut self, mem: &TestMemory, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.put(self.avail + 4 + 2 * slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.put(self.avail + 2, &self.avail_idx.to_le_bytes());
    }

    /// Writes a chain of (addr, len, device-writable) buffers into free descriptors and
    /// publishes it; returns its head.
    pub fn post(&mut self, mem: &TestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, w)) in bufs.iter().enumerate() {
            let i = (head + k as u16) % self.size;
            let last = k + 1 == bufs.len();
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.set_desc(mem, i, addr, len, flags, (i + 1) % self.size);
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.publish(mem, head);
        head
    }

    pub fn used_idx(&self, mem: &TestMemory) -> u16 {
        mem.load_u16(self.used + 2).unwrap()
    }

    /// (id, len) of used element `i`.
    pub fn used_elem(&self, mem: &TestMemory, i: u16) -> (u32, u32) {
        let b = mem.get(self.used + 4 + 8 * u64::from(i % self.size), 8);
        (
            u32::from_le_bytes(b[0..4].try_into().unwrap()),
            u32::from_le_bytes(b[4..8].try_into().unwrap()),
        )
    }
}
