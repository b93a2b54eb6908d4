//! The file side of virtio-blk: where a disk's bytes live. A raw image (the guest's sector
//! `s` is the file's byte `512 s`), or a copy-on-write overlay on a read-only base image
//! ([`cow`](super::cow)). [`Block`](super::block::Block) checks every request against the
//! disk's size before it calls in here; the overlay checks again.

use super::block::BlockError;
use super::cow::Overlay;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Zero-filled buffer for WRITE_ZEROES where holes cannot be punched.
const ZERO_CHUNK: usize = 256 << 10;

pub enum Disk {
    Raw(File),
    Overlay(Box<Overlay>),
}

/// Opens `path` for reading (and writing unless `readonly`) and locks it (`flock`): shared
/// when read-only, exclusive when writable, so two monitors never write one file and no
/// one writes a file another monitor reads as a base.
pub(crate) fn open_locked(path: &Path, readonly: bool) -> Result<File, BlockError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(path)
        .map_err(|source| BlockError::Open {
            path: path.into(),
            source,
        })?;
    let how = if readonly {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on a descriptor we own; it touches no memory.
    if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } != 0 {
        return Err(BlockError::Locked { path: path.into() });
    }
    Ok(file)
}

/// The size of an open file or block device (whose metadata length is 0: seek instead).
pub(crate) fn size_of(mut file: &File, path: &Path) -> Result<u64, BlockError> {
    file.seek(SeekFrom::End(0))
        .map_err(|source| BlockError::Size {
            path: path.into(),
            source,
        })
}

/// Punches a hole (which reads back as zeroes) at `[off, off+len)` of `file`.
pub(crate) fn punch(file: &File, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a descriptor we own; it touches no memory of ours.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Writes `len` zero bytes at `off`.
pub(crate) fn write_zeroes(file: &File, off: u64, len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK as u64) as usize;
        file.write_all_at(&zeroes[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}

impl Disk {
    pub fn read_at(&mut self, buf: &mut [u8], off: u64) -> io::Result<()> {
        match self {
            Disk::Raw(f) => f.read_exact_at(buf, off),
            Disk::Overlay(o) => o.read_at(buf, off),
        }
    }

    pub fn write_at(&mut self, data: &[u8], off: u64) -> io::Result<()> {
        match self {
            Disk::Raw(f) => f.write_all_at(data, off),
            Disk::Overlay(o) => o.write_at(data, off),
        }
    }

    /// Makes every completed write durable (virtio FLUSH).
    pub fn flush(&mut self) -> io::Result<()> {
        match self {
            Disk::Raw(f) => f.sync_data(),
            Disk::Overlay(o) => o.flush(),
        }
    }

    /// DISCARD (`discard`: a hint, may do nothing) or WRITE_ZEROES (reads back as zeroes).
    pub fn zero(&mut self, off: u64, len: u64, discard: bool) -> io::Result<()> {
        match self {
            Disk::Raw(f) => match punch(f, off, len) {
                Ok(()) => Ok(()),
                // A file system without holes just keeps the data.
                Err(_) if discard => Ok(()),
                Err(_) => write_zeroes(f, off, len),
            },
            Disk::Overlay(o) => o.zero(off, len, discard),
        }
    }

    /// The VM has ended: an overlay records its new clusters (durably, as on FLUSH). A raw
    /// image has nothing to record; its unflushed writes are in the host's page cache.
    pub fn finish(&mut self) -> io::Result<()> {
        match self {
            Disk::Raw(_) => Ok(()),
            Disk::Overlay(o) => o.flush(),
        }
    }

    /// For a snapshot: what the guest wrote becomes visible to whoever opens the files next
    /// (an overlay's new clusters are recorded), without changing the device's state.
    pub fn persist(&self) -> io::Result<()> {
        match self {
            Disk::Raw(_) => Ok(()),
            Disk::Overlay(o) => o.persist(),
        }
    }
}
