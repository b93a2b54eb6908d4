//! Split virtqueues (virtio 1.2 §2.7): descriptor table, available ring, used ring.
//!
//! The guest owns all three areas and may change them at any time from another CPU, so every
//! value is read once, validated, and copied into a [`Chain`] before the device acts on it.
//! Indirect descriptors and `VIRTIO_F_EVENT_IDX` are not offered; the driver's
//! `VIRTQ_AVAIL_F_NO_INTERRUPT` hint is honoured.

use super::{GuestMemory, MemError, StateError};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{Ordering, fence};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const DESC_SIZE: u64 = 16;

/// A queue the guest broke; the device must enter DEVICE_NEEDS_RESET.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("queue size {size} is not a power of two from 1 to {max}; the driver must reset")]
    BadSize { size: u16, max: u16 },
    #[error("{what} area at {addr:#x} is not {align}-byte aligned; the driver must reset")]
    Misaligned {
        what: &'static str,
        addr: u64,
        align: u64,
    },
    #[error("{what} area {addr:#x}+{len:#x} is outside guest RAM; the driver must reset")]
    AreaOutsideRam {
        what: &'static str,
        addr: u64,
        len: u64,
    },
    #[error(
        "available index moved from {last} to {now}, more than the queue size {size}: the ring is corrupt"
    )]
    AvailJump { last: u16, now: u16, size: u16 },
    #[error("descriptor index {index} is out of range for queue size {size}")]
    BadIndex { index: u16, size: u16 },
    #[error("descriptor chain from head {head} is longer than the queue size {size} (a loop?)")]
    ChainTooLong { head: u16, size: u16 },
    #[error("descriptor {index} is indirect, but indirect descriptors were not negotiated")]
    Indirect { index: u16 },
    #[error("descriptor {index}: buffer {addr:#x}+{len:#x} is outside guest RAM")]
    BufferOutsideRam { index: u16, addr: u64, len: u32 },
    #[error("descriptor {index} is device-readable but follows a device-writable one")]
    ReadAfterWrite { index: u16 },
    #[error("request in chain {head} is malformed: {why}")]
    Malformed { head: u16, why: &'static str },
    #[error("the queue is not ready; the driver must set it up before notifying")]
    NotReady,
    #[error("ring access failed: {0}")]
    Mem(#[from] MemError),
}

/// One validated buffer of a chain: `[addr, addr+len)` lies in guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
}

/// A validated descriptor chain, copied out of the guest's table: device-readable buffers
/// first, then device-writable ones (as virtio requires).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<Desc>,
    pub writable: Vec<Desc>,
}

impl Chain {
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|d| u64::from(d.len)).sum()
    }
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|d| u64::from(d.len)).sum()
    }
}

/// Walks a list of buffers as one byte stream.
pub struct Cursor<'a> {
    descs: &'a [Desc],
    idx: usize,
    off: u64,
    limit: u64,
}

impl<'a> Cursor<'a> {
    pub fn new(descs: &'a [Desc]) -> Self {
        let limit = descs.iter().map(|d| u64::from(d.len)).sum();
        Cursor {
            descs,
            idx: 0,
            off: 0,
            limit,
        }
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> u64 {
        self.limit
    }

    /// Stops the stream `n` bytes before its end (to keep a trailing status byte apart).
    pub fn truncate_end(&mut self, n: u64) {
        self.limit = self.limit.saturating_sub(n);
    }

    /// The next piece of at most `max` bytes as (guest address, length).
    pub fn take(&mut self, max: u64) -> Option<(u64, u64)> {
        while self.limit > 0 && max > 0 {
            let d = self.descs.get(self.idx)?;
            let left = u64::from(d.len) - self.off;
            if left == 0 {
                self.idx += 1;
                self.off = 0;
                continue;
            }
            let n = left.min(max).min(self.limit);
            let addr = d.addr + self.off;
            self.off += n;
            self.limit -= n;
            return Some((addr, n));
        }
        None
    }

    /// Fills as much of `buf` as the stream holds; returns the bytes copied.
    pub fn read_to(&mut self, mem: &dyn GuestMemory, buf: &mut [u8]) -> Result<usize, MemError> {
        let mut done = 0;
        while let Some((addr, n)) = self.take((buf.len() - done) as u64) {
            mem.read(addr, &mut buf[done..done + n as usize])?;
            done += n as usize;
        }
        Ok(done)
    }

    /// Copies as much of `data` as fits; returns the bytes copied.
    pub fn write_from(&mut self, mem: &dyn GuestMemory, data: &[u8]) -> Result<usize, MemError> {
        let mut done = 0;
        while let Some((addr, n)) = self.take((data.len() - done) as u64) {
            mem.write(addr, &data[done..done + n as usize])?;
            done += n as usize;
        }
        Ok(done)
    }
}

/// A queue in a snapshot: what the driver configured and where the device is in the rings.
/// (The maximum size is the device's, not saved.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub size: u16,
    pub ready: bool,
    pub desc_addr: u64,
    pub avail_addr: u64,
    pub used_addr: u64,
    /// Chains taken from the available ring and returned to the used ring so far (mod 2^16).
    pub next_avail: u16,
    pub next_used: u16,
}

/// One split virtqueue as the transport configures it and a device consumes it.
#[derive(Debug, Clone)]
pub struct Queue {
    max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_addr: u64,
    pub avail_addr: u64,
    pub used_addr: u64,
    next_avail: u16,
    next_used: u16,
}

impl Queue {
    pub fn new(max_size: u16) -> Self {
        Queue {
            max_size,
            size: max_size,
            ready: false,
            desc_addr: 0,
            avail_addr: 0,
            used_addr: 0,
            next_avail: 0,
            next_used: 0,
        }
    }

    pub fn max_size(&self) -> u16 {
        self.max_size
    }

    pub fn state(&self) -> QueueState {
        QueueState {
            size: self.size,
            ready: self.ready,
            desc_addr: self.desc_addr,
            avail_addr: self.avail_addr,
            used_addr: self.used_addr,
            next_avail: self.next_avail,
            next_used: self.next_used,
        }
    }

    /// This queue with a snapshot's state, checked as the driver's own setup is: a ready
    /// queue's size and rings must pass [`Self::validate`] against `mem` (the restored
    /// RAM), and the device cannot hold more chains than the queue has; a queue not ready
    /// has not moved.
    pub fn restored(&self, s: &QueueState, mem: &dyn GuestMemory) -> Result<Queue, StateError> {
        let q = Queue {
            max_size: self.max_size,
            size: s.size,
            ready: s.ready,
            desc_addr: s.desc_addr,
            avail_addr: s.avail_addr,
            used_addr: s.used_addr,
            next_avail: s.next_avail,
            next_used: s.next_used,
        };
        if q.ready {
            q.validate(mem).map_err(|e| StateError(e.to_string()))?;
            let held = q.next_avail.wrapping_sub(q.next_used);
            if held > q.size {
                return Err(StateError(format!(
                    "the device holds {held} chains of a queue of {}",
                    q.size
                )));
            }
        } else if q.next_avail != 0 || q.next_used != 0 {
            return Err(StateError(
                "a queue that is not ready has ring positions".into(),
            ));
        }
        Ok(q)
    }

    /// Back to the state after device reset.
    pub fn reset(&mut self) {
        *self = Queue::new(self.max_size);
    }

    /// Checks the size and the three areas before the queue may become ready.
    pub fn validate(&self, mem: &dyn GuestMemory) -> Result<(), QueueError> {
        let size = self.size;
        if size == 0 || size > self.max_size || !size.is_power_of_two() {
            return Err(QueueError::BadSize {
                size,
                max: self.max_size,
            });
        }
        let n = u64::from(size);
        for (what, addr, align, len) in [
            ("descriptor table", self.desc_addr, 16, DESC_SIZE * n),
            ("available ring", self.avail_addr, 2, 6 + 2 * n),
            ("used ring", self.used_addr, 4, 6 + 8 * n),
        ] {
            if addr % align != 0 {
                return Err(QueueError::Misaligned { what, addr, align });
            }
            if mem.check(addr, len).is_err() {
                return Err(QueueError::AreaOutsideRam { what, addr, len });
            }
        }
        Ok(())
    }

    /// The next available chain, validated and copied; `None` when the ring is empty.
    pub fn pop(&mut self, mem: &dyn GuestMemory) -> Result<Option<Chain>, QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        let now = mem.load_u16(self.avail_addr + 2)?;
        if now == self.next_avail {
            return Ok(None);
        }
        if now.wrapping_sub(self.next_avail) > self.size {
            return Err(QueueError::AvailJump {
                last: self.next_avail,
                now,
                size: self.size,
            });
        }
        // The ring entry and descriptors were written before the index: read them after it.
        fence(Ordering::Acquire);
        let slot = u64::from(self.next_avail % self.size);
        let head = mem.load_u16(self.avail_addr + 4 + 2 * slot)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        self.walk(mem, head).map(Some)
    }

    /// Puts the last `n` popped chains back, to be popped again later (a device that took
    /// buffers for a frame and found too few). The guest may have rewritten them meanwhile;
    /// they are validated again when popped.
    pub fn undo_pop(&mut self, n: u16) {
        self.next_avail = self.next_avail.wrapping_sub(n);
    }

    fn walk(&self, mem: &dyn GuestMemory, head: u16) -> Result<Chain, QueueError> {
        let size = self.size;
        let mut chain = Chain {
            head,
            ..Chain::default()
        };
        let mut index = head;
        for _ in 0..size {
            if index >= size {
                return Err(QueueError::BadIndex { index, size });
            }
            let mut raw = [0u8; DESC_SIZE as usize];
            mem.read(self.desc_addr + DESC_SIZE * u64::from(index), &mut raw)?;
            let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            let next = u16::from_le_bytes([raw[14], raw[15]]);
            if flags & DESC_F_INDIRECT != 0 {
                return Err(QueueError::Indirect { index });
            }
            if mem.check(addr, u64::from(len)).is_err() {
                return Err(QueueError::BufferOutsideRam { index, addr, len });
            }
            let d = Desc { addr, len };
            if flags & DESC_F_WRITE != 0 {
                chain.writable.push(d);
            } else if chain.writable.is_empty() {
                chain.readable.push(d);
            } else {
                return Err(QueueError::ReadAfterWrite { index });
            }
            if flags & DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            index = next;
        }
        Err(QueueError::ChainTooLong { head, size })
    }

    /// Returns chain `head` to the driver with `len` bytes written into its buffers.
    pub fn add_used(
        &mut self,
        mem: &dyn GuestMemory,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        let slot = u64::from(self.next_used % self.size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write(self.used_addr + 4 + 8 * slot, &elem)?;
        // The element must be visible before the index that publishes it.
        fence(Ordering::Release);
        self.next_used = self.next_used.wrapping_add(1);
        mem.store_u16(self.used_addr + 2, self.next_used)?;
        Ok(())
    }

    /// Whether the driver wants an interrupt for used buffers (`VIRTQ_AVAIL_F_NO_INTERRUPT`).
    pub fn wants_interrupt(&self, mem: &dyn GuestMemory) -> Result<bool, QueueError> {
        // The used index store must be ordered before the flags load (virtio 1.2 §2.7.7.2).
        fence(Ordering::SeqCst);
        Ok(mem.load_u16(self.avail_addr)? & AVAIL_F_NO_INTERRUPT == 0)
    }
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
