//! A copy-on-write overlay on a read-only base image (the format: `vme_api::overlay`,
//! `docs/overlay.md`). Cluster `i` of the disk is read from the overlay's data area when its
//! bit is set, else from the base (zeroes past the base's end). A write to a clear cluster
//! copies the rest of that cluster from the base, writes the whole cluster into the data
//! area and sets the bit — in memory only.
//!
//! Crash consistency: the bitmap on disk never claims a cluster whose data is not durable.
//! New bits reach the file only in [`Overlay::flush`] (virtio FLUSH) and
//! [`Overlay::persist`] (snapshots, drop): fdatasync the data, write the changed bitmap
//! pages, fdatasync again. A crash before that loses the writes since the last FLUSH —
//! those clusters read from the base again — which is what a guest that did not flush may
//! see of any disk with a write cache. Bits are only ever set, so a torn bitmap page holds
//! old and new bits, each of them true.

use super::block::BlockError;
use super::disk::{open_locked, punch, size_of, write_zeroes};
use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vme_api::overlay::{BITMAP_PAGE, HEADER_SIZE, Header, base_sample};

pub struct Overlay {
    file: File,
    base: File,
    h: Header,
    /// Every bit the guest's writes have set, durable or not.
    bitmap: Vec<u8>,
    /// Bitmap pages (by index) with bits not yet written to the file.
    dirty: BTreeSet<u64>,
    /// One cluster, for copy-on-write.
    buf: Vec<u8>,
}

impl Overlay {
    /// Opens the overlay at `path` on `base`, locking both (the base shared, read-only), and
    /// checks that the header is sound and that `base` is the file it was made from.
    pub fn open(path: &Path, base: &Path, readonly: bool) -> Result<Overlay, BlockError> {
        let bad = |why: String| BlockError::Overlay {
            path: path.into(),
            why,
        };
        let file = open_locked(path, readonly)?;
        let len = size_of(&file, path)?;
        let mut raw = vec![0u8; HEADER_SIZE.min(len) as usize];
        file.read_exact_at(&mut raw, 0)
            .map_err(|e| bad(format!("cannot read its header: {e}")))?;
        let h = Header::decode(&raw, len).map_err(bad)?;
        let base_file = open_locked(base, true)?;
        let base_len = size_of(&base_file, base)?;
        let mismatch = |why: String| BlockError::Base {
            path: path.into(),
            base: base.into(),
            why,
        };
        if base_len != h.base_size {
            return Err(mismatch(format!(
                "the base is {base_len} bytes, the overlay was made from one of {} bytes",
                h.base_size
            )));
        }
        let sample = base_sample(base_len, |buf, off| base_file.read_exact_at(buf, off))
            .map_err(|e| mismatch(format!("cannot read the base: {e}")))?;
        if sample != h.base_sample {
            return Err(mismatch(
                "its contents differ from the image the overlay was made from".into(),
            ));
        }
        // At most 32 MiB + a page ([`Header::decode`] checked), and inside the file.
        let mut bitmap = vec![0u8; h.bitmap_len as usize];
        file.read_exact_at(&mut bitmap, h.bitmap_offset)
            .map_err(|e| bad(format!("cannot read its bitmap: {e}")))?;
        Ok(Overlay {
            file,
            base: base_file,
            buf: vec![0u8; h.cluster_size() as usize],
            h,
            bitmap,
            dirty: BTreeSet::new(),
        })
    }

    /// The disk's size in bytes (whole sectors).
    pub fn capacity(&self) -> u64 {
        self.h.virtual_size
    }

    fn allocated(&self, c: u64) -> bool {
        self.bitmap[(c / 8) as usize] & (1 << (c % 8)) != 0
    }

    fn set(&mut self, c: u64) {
        if !self.allocated(c) {
            self.bitmap[(c / 8) as usize] |= 1 << (c % 8);
            self.dirty.insert(c / 8 / BITMAP_PAGE);
        }
    }

    /// Bytes of cluster `c` (the last one may be short).
    fn cluster_len(&self, c: u64) -> u64 {
        let start = c << self.h.cluster_bits;
        self.h.cluster_size().min(self.h.virtual_size - start)
    }

    fn check(&self, off: u64, len: usize) -> io::Result<()> {
        match off.checked_add(len as u64) {
            Some(end) if end <= self.h.virtual_size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "request outside the disk",
            )),
        }
    }

    /// Reads the base at `off`; bytes past its end read as zeroes.
    fn read_base(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let n = self.h.base_size.saturating_sub(off).min(buf.len() as u64) as usize;
        self.base.read_exact_at(&mut buf[..n], off)?;
        buf[n..].fill(0);
        Ok(())
    }

    /// The clusters from `pos` on, within `len` bytes, that are allocated (or not) like the
    /// first: how many bytes that run covers.
    fn run(&self, pos: u64, len: u64, allocated: bool) -> u64 {
        let cs = self.h.cluster_size();
        let mut n = (cs - pos % cs).min(len);
        while n < len && self.allocated((pos + n) >> self.h.cluster_bits) == allocated {
            n += cs.min(len - n);
        }
        n
    }

    pub fn read_at(&mut self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.check(off, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            let pos = off + done as u64;
            let alloc = self.allocated(pos >> self.h.cluster_bits);
            let n = self.run(pos, (buf.len() - done) as u64, alloc) as usize;
            let piece = &mut buf[done..done + n];
            if alloc {
                self.file.read_exact_at(piece, self.h.data_offset + pos)?;
            } else {
                self.read_base(piece, pos)?;
            }
            done += n;
        }
        Ok(())
    }

    /// Whether `[pos, pos+len)` covers cluster `c` whole.
    fn covers(&self, c: u64, pos: u64, len: u64) -> bool {
        let start = c << self.h.cluster_bits;
        pos <= start && pos + len >= start + self.cluster_len(c)
    }

    pub fn write_at(&mut self, data: &[u8], off: u64) -> io::Result<()> {
        self.check(off, data.len())?;
        let bits = self.h.cluster_bits;
        let mut done = 0;
        while done < data.len() {
            let pos = off + done as u64;
            let rest = (data.len() - done) as u64;
            let c = pos >> bits;
            if !self.allocated(c) && !self.covers(c, pos, rest) {
                let n = self.copy_on_write(c, &data[done..], pos)?;
                done += n;
                continue;
            }
            // A run of clusters that are allocated or written whole: one write.
            let cs = self.h.cluster_size();
            let mut n = (cs - pos % cs).min(rest);
            while n < rest {
                let next = (pos + n) >> bits;
                if !self.allocated(next) && !self.covers(next, pos + n, rest - n) {
                    break;
                }
                n += cs.min(rest - n);
            }
            let piece = &data[done..done + n as usize];
            self.file.write_all_at(piece, self.h.data_offset + pos)?;
            for c in c..=(pos + n - 1) >> bits {
                self.set(c);
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Writes the part of `data` that falls in clear cluster `c` (starting at `pos`), with the
    /// rest of the cluster from the base; returns the bytes of `data` used.
    fn copy_on_write(&mut self, c: u64, data: &[u8], pos: u64) -> io::Result<usize> {
        let start = c << self.h.cluster_bits;
        let clen = self.cluster_len(c) as usize;
        let mut buf = std::mem::take(&mut self.buf);
        let result = (|| {
            self.read_base(&mut buf[..clen], start)?;
            let at = (pos - start) as usize;
            let n = (clen - at).min(data.len());
            buf[at..at + n].copy_from_slice(&data[..n]);
            self.file
                .write_all_at(&buf[..clen], self.h.data_offset + start)?;
            Ok(n)
        })();
        self.buf = buf;
        if result.is_ok() {
            self.set(c);
        }
        result
    }

    /// WRITE_ZEROES: clusters covered whole become holes in the data area and are marked
    /// allocated (no base read, no space used); the partial ones at the edges are written
    /// with zeroes through copy-on-write. DISCARD: a hint; only clusters covered whole that
    /// are already allocated give their space back (they then read as zeroes).
    pub fn zero(&mut self, off: u64, len: u64, discard: bool) -> io::Result<()> {
        let len_usize = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        self.check(off, len_usize)?;
        let bits = self.h.cluster_bits;
        let mut pos = off;
        let end = off + len;
        let mut extend_to = 0;
        while pos < end {
            let c = pos >> bits;
            let cstart = c << bits;
            let cend = cstart + self.cluster_len(c);
            let n = cend.min(end) - pos;
            if self.covers(c, pos, end - pos) {
                if !discard || self.allocated(c) {
                    let at = self.h.data_offset + cstart;
                    if punch(&self.file, at, cend - cstart).is_err() {
                        if discard {
                            pos += n;
                            continue;
                        }
                        write_zeroes(&self.file, at, cend - cstart)?;
                    }
                    extend_to = extend_to.max(at + cend - cstart);
                    self.set(c);
                }
            } else if !discard {
                let zeroes = vec![0u8; n as usize];
                self.write_at(&zeroes, pos)?;
            }
            pos += n;
        }
        // A hole punched past the end of the file leaves the file short: an allocated
        // cluster must be readable, so the file reaches at least its end.
        if extend_to > self.file.metadata()?.len() {
            self.file.set_len(extend_to)?;
        }
        Ok(())
    }

    /// Writes the bitmap pages with new bits after the data they describe is durable.
    pub fn persist(&self) -> io::Result<()> {
        self.file.sync_data()?;
        if self.dirty.is_empty() {
            return Ok(());
        }
        for &page in &self.dirty {
            let at = (page * BITMAP_PAGE) as usize;
            let bytes = &self.bitmap[at..at + BITMAP_PAGE as usize];
            self.file
                .write_all_at(bytes, self.h.bitmap_offset + at as u64)?;
        }
        self.file.sync_data()
    }

    /// virtio FLUSH: everything written so far is durable, and recorded.
    pub fn flush(&mut self) -> io::Result<()> {
        self.persist()?;
        self.dirty.clear();
        Ok(())
    }
}

impl Drop for Overlay {
    /// A monitor that ends cleanly records what its guest wrote even without a last FLUSH.
    fn drop(&mut self) {
        if !self.dirty.is_empty() {
            if let Err(e) = self.flush() {
                log::error!("cannot record the overlay's written clusters: {e}");
            }
        }
    }
}

/// Makes `dest` an empty overlay on `base` as `thin_clone` does without reflinks (whatever
/// the file system), without its fsyncs: for tests and the fuzz harness.
#[cfg(any(test, feature = "fuzzing"))]
pub fn new_overlay_file(base: &Path, dest: &Path) -> io::Result<()> {
    let b = File::open(base)?;
    let size = b.metadata()?.len();
    let sample = base_sample(size, |buf, off| b.read_exact_at(buf, off))?;
    let h = Header::new(size, [1; 32], sample);
    let f = File::create(dest)?;
    f.set_len(0)?;
    f.write_all_at(&h.encode(), 0)?;
    f.set_len(h.data_offset)
}

#[cfg(test)]
#[path = "cow_tests.rs"]
mod tests;
