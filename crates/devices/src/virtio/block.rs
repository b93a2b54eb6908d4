//! virtio-blk over a raw image file or a copy-on-write overlay on a read-only base image
//! ([`disk`](super::disk)) (virtio 1.2 §5.2): IN, OUT, FLUSH, GET_ID, DISCARD and
//! WRITE_ZEROES, one request queue, served synchronously on the notifying thread.
//!
//! Every request is checked against the disk size before any byte moves: a request that
//! reaches past the end fails with IOERR and reads or writes nothing. The status byte is the
//! last byte of the chain and is written last. The image is locked (`flock`) so that two
//! monitors cannot write one disk: exclusively when writable, shared when read-only (an
//! overlay's base always shared).
//!
//! An optional [`Throttle`] limits bytes/s and requests/s: a request the buckets refuse stays
//! in the ring and the device's refill thread serves the queue again when tokens are back.

use super::cow::Overlay;
use super::disk::{Disk, open_locked, size_of};
use super::queue::{Chain, Cursor, Queue, QueueError};
use super::rate_limit::{LimitSet, Limits, RefillTimer, Throttle};
use super::{DeviceState, GuestMemory, ID_BLOCK, StateError, VirtioDevice};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const SECTOR: u64 = 512;
/// Longest serial GET_ID returns (virtio 1.2 §5.2.6).
pub const SERIAL_LEN: usize = 20;
const QUEUE_SIZE: u16 = 256;
/// Data buffers per request: the header and status take two of the queue's descriptors.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
const SIZE_MAX: u32 = 1 << 20;
/// Largest DISCARD / WRITE_ZEROES range (4 GiB) and segments per request.
const MAX_ZERO_SECTORS: u32 = 1 << 23;
const MAX_ZERO_SEGS: u32 = 1;
/// Bounce buffer between the file and guest memory.
const CHUNK: usize = 256 << 10;

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const WZ_UNMAP: u32 = 1;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}; check the path and its permissions")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "disk image {path} is in use by another process (it holds a lock on the file); stop that VM or use another image"
    )]
    Locked { path: PathBuf },
    #[error("cannot find the size of disk image {path}: {source}")]
    Size {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk serial {serial:?} is {len} bytes; the limit is {SERIAL_LEN}: shorten it")]
    Serial { serial: String, len: usize },
    #[error(
        "disk {path} is not a usable vme overlay: {why}; give the overlay made for this VM \
         (or drop base= to use a raw image)"
    )]
    Overlay { path: PathBuf, why: String },
    #[error(
        "base image {base} is not the one overlay {path} was made from: {why}; give the \
         overlay's own base image"
    )]
    Base {
        path: PathBuf,
        base: PathBuf,
        why: String,
    },
}

/// A disk in a snapshot. Requests are served synchronously under the transport's lock, so
/// none is ever in flight when a snapshot is taken: what the guest sees of the disk is its
/// size and whether it may write. The image's contents are not saved: restore with the
/// image as it was at the snapshot (or a copy of it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub capacity: u64,
    pub readonly: bool,
}

/// A virtio block device backed by a raw image or an overlay.
pub struct Block {
    disk: Disk,
    capacity: u64,
    readonly: bool,
    serial: Vec<u8>,
    config: [u8; 60],
    buf: Vec<u8>,
    throttle: Option<Throttle>,
    /// Always there, so limits can be set while the VM runs; armed only when limited.
    timer: Arc<RefillTimer>,
}

impl Block {
    /// Opens and locks `path`; the disk has the file's size, rounded down to whole sectors.
    pub fn open(path: &Path, readonly: bool, serial: &str) -> Result<Block, BlockError> {
        Block::open_disk(path, None, readonly, serial)
    }

    /// [`Block::open`], or with `base`: `path` is an overlay on the read-only image `base`
    /// and the disk has the overlay's virtual size.
    pub fn open_disk(
        path: &Path,
        base: Option<&Path>,
        readonly: bool,
        serial: &str,
    ) -> Result<Block, BlockError> {
        if serial.len() > SERIAL_LEN {
            return Err(BlockError::Serial {
                serial: serial.into(),
                len: serial.len(),
            });
        }
        let (disk, capacity) = match base {
            Some(base) => {
                let o = Overlay::open(path, base, readonly)?;
                let capacity = o.capacity();
                (Disk::Overlay(Box::new(o)), capacity)
            }
            None => {
                let file = open_locked(path, readonly)?;
                let size = size_of(&file, path)?;
                if size % SECTOR != 0 {
                    log::warn!(
                        "disk image {} is {size} bytes, not a whole number of sectors: the last {} bytes are not visible to the guest",
                        path.display(),
                        size % SECTOR
                    );
                }
                (Disk::Raw(file), size / SECTOR * SECTOR)
            }
        };
        let mut config = [0u8; 60];
        config[0..8].copy_from_slice(&(capacity / SECTOR).to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        config[36..40].copy_from_slice(&MAX_ZERO_SECTORS.to_le_bytes());
        config[40..44].copy_from_slice(&MAX_ZERO_SEGS.to_le_bytes());
        config[44..48].copy_from_slice(&1u32.to_le_bytes());
        config[48..52].copy_from_slice(&MAX_ZERO_SECTORS.to_le_bytes());
        config[52..56].copy_from_slice(&MAX_ZERO_SEGS.to_le_bytes());
        config[56] = 1; // write_zeroes_may_unmap: holes read as zeroes
        Ok(Block {
            disk,
            capacity,
            readonly,
            serial: serial.as_bytes().to_vec(),
            config,
            buf: Vec::new(),
            throttle: None,
            timer: RefillTimer::new(),
        })
    }

    /// Limits the disk's bytes/s and requests/s (nothing when `limits` limit nothing), also
    /// while it runs ([`Throttle::update`]). The machine starts the
    /// [`refill_timer`](VirtioDevice::refill_timer)'s thread.
    pub fn set_limits(&mut self, limits: Limits) {
        Throttle::update(&mut self.throttle, limits, 0, &self.timer);
    }

    #[cfg(test)]
    pub(crate) fn throttle_mut(&mut self) -> Option<&mut Throttle> {
        self.throttle.as_mut()
    }

    /// Disk size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// `[offset, offset+len)` of a request at `sector`, if it lies inside the disk.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let off = sector.checked_mul(SECTOR)?;
        (off.checked_add(len)? <= self.capacity && len % SECTOR == 0).then_some(off)
    }

    /// Serves one chain; returns the bytes written into the guest's buffers.
    fn handle(&mut self, chain: &Chain, mem: &dyn GuestMemory) -> Result<u32, QueueError> {
        let malformed = |why| QueueError::Malformed {
            head: chain.head,
            why,
        };
        let status_desc = chain
            .writable
            .iter()
            .rev()
            .find(|d| d.len > 0)
            .ok_or(malformed("no device-writable byte for the status"))?;
        let status_addr = status_desc.addr + u64::from(status_desc.len) - 1;
        let mut header = [0u8; 16];
        let mut input = Cursor::new(&chain.readable);
        if input.read_to(mem, &mut header)? < header.len() {
            return Err(malformed("the request header is shorter than 16 bytes"));
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let mut output = Cursor::new(&chain.writable);
        output.truncate_end(1);
        // Data in the wrong direction (a read into device-readable buffers, a write from
        // device-writable ones) is an error, not a silently empty transfer.
        let (status, written) = match kind {
            T_IN if input.remaining() != 0 => (S_IOERR, 0),
            T_IN => self.read(sector, &mut output, mem)?,
            T_OUT if output.remaining() != 0 => (S_IOERR, 0),
            T_OUT => (self.write(sector, &mut input, mem)?, 0),
            T_FLUSH => (status_of(self.disk.flush()), 0),
            T_GET_ID => {
                let mut id = [0u8; SERIAL_LEN];
                id[..self.serial.len()].copy_from_slice(&self.serial);
                (S_OK, output.write_from(mem, &id)? as u32)
            }
            T_DISCARD | T_WRITE_ZEROES => (self.zero(kind, &mut input, mem)?, 0),
            _ => (S_UNSUPP, 0),
        };
        mem.write(status_addr, &[status])?;
        Ok(written.saturating_add(1))
    }

    fn read(
        &mut self,
        sector: u64,
        out: &mut Cursor,
        mem: &dyn GuestMemory,
    ) -> Result<(u8, u32), QueueError> {
        let len = out.remaining();
        let Some(mut off) = self.range(sector, len) else {
            return Ok((S_IOERR, 0));
        };
        self.buf.resize(CHUNK, 0);
        while let Some((addr, n)) = out.take(CHUNK as u64) {
            let piece = &mut self.buf[..n as usize];
            if self.disk.read_at(piece, off).is_err() {
                return Ok((S_IOERR, 0));
            }
            mem.write(addr, piece)?;
            off += n;
        }
        // The used length is a u32; a longer chain (possible only with huge RAM) saturates.
        Ok((S_OK, u32::try_from(len).unwrap_or(u32::MAX)))
    }

    fn write(
        &mut self,
        sector: u64,
        input: &mut Cursor,
        mem: &dyn GuestMemory,
    ) -> Result<u8, QueueError> {
        if self.readonly {
            return Ok(S_IOERR);
        }
        let Some(mut off) = self.range(sector, input.remaining()) else {
            return Ok(S_IOERR);
        };
        self.buf.resize(CHUNK, 0);
        while let Some((addr, n)) = input.take(CHUNK as u64) {
            let piece = &mut self.buf[..n as usize];
            mem.read(addr, piece)?;
            if self.disk.write_at(piece, off).is_err() {
                return Ok(S_IOERR);
            }
            off += n;
        }
        Ok(S_OK)
    }

    /// DISCARD and WRITE_ZEROES: punch holes (which read back as zeroes), see [`Disk::zero`].
    fn zero(
        &mut self,
        kind: u32,
        input: &mut Cursor,
        mem: &dyn GuestMemory,
    ) -> Result<u8, QueueError> {
        if self.readonly {
            return Ok(S_UNSUPP);
        }
        let n = input.remaining();
        if n == 0 || n % 16 != 0 || n / 16 > u64::from(MAX_ZERO_SEGS) {
            return Ok(S_UNSUPP);
        }
        let mut seg = [0u8; 16];
        input.read_to(mem, &mut seg)?;
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        let allowed = if kind == T_WRITE_ZEROES { WZ_UNMAP } else { 0 };
        if flags & !allowed != 0 || sectors > MAX_ZERO_SECTORS {
            return Ok(S_UNSUPP);
        }
        let len = u64::from(sectors) * SECTOR;
        let Some(off) = self.range(sector, len) else {
            return Ok(S_IOERR);
        };
        if len == 0 {
            return Ok(S_OK);
        }
        Ok(status_of(self.disk.zero(off, len, kind == T_DISCARD)))
    }
}

fn status_of(r: std::io::Result<()>) -> u8 {
    if r.is_ok() { S_OK } else { S_IOERR }
}

impl VirtioDevice for Block {
    fn device_id(&self) -> u32 {
        ID_BLOCK
    }

    fn features(&self) -> u64 {
        let base = F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
        if self.readonly {
            base | F_RO
        } else {
            base | F_DISCARD | F_WRITE_ZEROES
        }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        copy_config(&self.config, offset, data);
    }

    fn refill_timer(&self) -> Option<Arc<RefillTimer>> {
        Some(self.timer.clone())
    }

    fn update_limits(&mut self, limits: &LimitSet) -> bool {
        match limits {
            LimitSet::Disk(l) => {
                self.set_limits(*l);
                true
            }
            LimitSet::Net { .. } => false,
        }
    }

    fn shutdown(&mut self) {
        if let Err(e) = self.disk.finish() {
            log::error!("cannot record the overlay disk's last writes at the VM's end: {e}");
        }
    }

    fn save_state(&self) -> DeviceState {
        // What the guest wrote must be in the files a restore opens.
        if let Err(e) = self.disk.persist() {
            log::error!("snapshot: cannot record what the guest wrote to its overlay disk: {e}");
        }
        DeviceState::Block(BlockState {
            capacity: self.capacity,
            readonly: self.readonly,
        })
    }

    fn restore_state(&mut self, state: &DeviceState, _: &[u16]) -> Result<(), StateError> {
        let DeviceState::Block(s) = state else {
            return Err(StateError("the saved state is not a disk's".into()));
        };
        if s.capacity != self.capacity {
            return Err(StateError(format!(
                "the guest knows this disk as {} bytes, but the image now is {} bytes: \
                 restore with the image the VM had when the snapshot was taken",
                s.capacity, self.capacity
            )));
        }
        if s.readonly != self.readonly {
            return Err(StateError(format!(
                "the disk was {} in the snapshot: restore it {}",
                if s.readonly { "read-only" } else { "writable" },
                if s.readonly {
                    "with readonly=on"
                } else {
                    "without readonly=on"
                }
            )));
        }
        Ok(())
    }

    fn process(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &dyn GuestMemory,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        while let Some(chain) = queue.pop(mem)? {
            if let Some(t) = &mut self.throttle {
                // The data bytes, near enough: everything but the 16-byte header and status.
                let total = chain.readable_len().saturating_add(chain.writable_len());
                if !t.admit(total.saturating_sub(17)) {
                    // Left in the ring; the refill thread serves it when tokens are back.
                    queue.undo_pop(1);
                    break;
                }
            }
            let len = self.handle(&chain, mem)?;
            queue.add_used(mem, chain.head, len)?;
            used = true;
        }
        Ok(used)
    }
}

/// Copies config bytes at `offset` into `data`; bytes past the end read as zero.
pub(crate) fn copy_config(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
#[path = "block_tests.rs"]
mod tests;
