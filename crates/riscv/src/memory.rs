//! Guest physical memory: one zeroed host allocation shared by every hart thread, plus the
//! MMIO bus that routes every other physical address to a device or to an access fault.
//!
//! Every access to RAM goes through host atomics (relaxed, naturally aligned): harts run on
//! separate threads and the guest may race on any byte, so plain loads/stores would be data
//! races in Rust's memory model. On x86_64 relaxed atomic loads/stores compile to plain moves,
//! so this costs nothing on the fast path.

use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering};

use crate::Error;
use crate::dirty::DirtyLog;

/// Guest physical address of the first byte of RAM (as on QEMU `virt`).
pub const RAM_BASE: u64 = 0x8000_0000;
/// Guest page size (also the granule of RAM sizes).
pub const PAGE_SIZE: u64 = 4096;

/// Guest RAM. The allocation lives as long as the `GuestRam`; all accessors bounds-check.
pub struct GuestRam {
    ptr: NonNull<u8>,
    len: usize,
    /// Mapped privately from a file (a snapshot's memory): discarded pages must be replaced
    /// by anonymous ones, or they would read back the file's bytes.
    file_backed: bool,
    /// Pages written since the last harvest (off until first enabled).
    pub(crate) dirty: DirtyLog,
}

// SAFETY: the memory is only ever accessed through atomic operations (or through `&mut self`),
// so sharing the pointer between threads cannot create data races.
unsafe impl Send for GuestRam {}
// SAFETY: as above: all shared access is atomic.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Maps `bytes` of zeroed RAM. An anonymous private mapping is backed lazily: host memory
    /// follows what the guest touches, not what it was given (an aligned heap allocation would
    /// be zeroed with a memset that touches every page up front).
    pub fn new(bytes: u64) -> Result<Self, Error> {
        let len = Self::check_size(bytes)?;
        // SAFETY: a fresh anonymous mapping with no address hint; it aliases nothing.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(Error::RamAlloc { bytes });
        }
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or(Error::RamAlloc { bytes })?;
        Ok(Self {
            ptr,
            len,
            file_backed: false,
            dirty: DirtyLog::new(bytes / PAGE_SIZE),
        })
    }

    fn check_size(bytes: u64) -> Result<usize, Error> {
        if bytes == 0 || bytes % (2 << 20) != 0 || bytes > (1 << 40) {
            return Err(Error::Config(format!(
                "memory size {bytes} bytes is not a non-zero multiple of 2 MiB below 1 TiB; \
                 choose e.g. 256 MiB"
            )));
        }
        usize::try_from(bytes).map_err(|_| Error::RamAlloc { bytes })
    }

    /// Maps `bytes` of RAM privately from `file` (a snapshot's memory file), which must be
    /// exactly that long. Pages are read from the file when first touched and copied on the
    /// first write, so this takes the same time whatever the size, and the file is never
    /// written. The file must not be truncated or changed while the machine runs: a page
    /// not yet touched would read the new bytes, or fault the monitor past a truncation.
    pub fn from_file(file: &std::fs::File, bytes: u64) -> Result<Self, Error> {
        let len = Self::check_size(bytes)?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::MemoryFile(format!("cannot read its size: {e}")))?
            .len();
        if file_len != bytes {
            return Err(Error::MemoryFile(format!(
                "it is {file_len} bytes long, but the machine has {bytes} bytes of RAM: \
                 the file is truncated or belongs to another snapshot"
            )));
        }
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh private mapping of a descriptor we hold, with no address hint; it
        // aliases nothing, and MAP_PRIVATE means our writes never reach the file.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(Error::MemoryFile(format!(
                "cannot map it: {}",
                std::io::Error::last_os_error()
            )));
        }
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or(Error::RamAlloc { bytes })?;
        Ok(Self {
            ptr,
            len,
            file_backed: true,
            dirty: DirtyLog::new(bytes / PAGE_SIZE),
        })
    }

    /// Maps runs of pages of `file` (a diff snapshot's memory file: RAM's length, its pages
    /// at their RAM offsets) privately over this RAM, replacing what was there: `runs` are
    /// `(first page, pages)` in [`PAGE_SIZE`] units, ascending and disjoint. Lazy like
    /// [`GuestRam::from_file`]: nothing is read now, and the file is never written. Each run
    /// is one host mapping, so callers bound their number (the host allows ~65000 per
    /// process). Consumes the RAM so that a failure drops it: a failed fixed mapping may
    /// leave a hole in the range, which must never be run.
    pub fn with_file_pages(
        mut self,
        file: &std::fs::File,
        runs: &[(u64, u64)],
    ) -> Result<Self, Error> {
        let pages = self.len as u64 / PAGE_SIZE;
        let file_len = file
            .metadata()
            .map_err(|e| Error::MemoryFile(format!("cannot read its size: {e}")))?
            .len();
        if file_len != self.len as u64 {
            return Err(Error::MemoryFile(format!(
                "it is {file_len} bytes long, but the machine has {} bytes of RAM: the file \
                 is truncated or belongs to another snapshot",
                self.len
            )));
        }
        let mut next = 0u64;
        for &(first, n) in runs {
            let end = first.checked_add(n).filter(|&e| n > 0 && e <= pages);
            let Some(end) = end.filter(|_| first >= next) else {
                return Err(Error::MemoryFile(format!(
                    "page run {first}+{n} is empty, overlaps the run before it, or lies \
                     outside the {pages} pages of RAM"
                )));
            };
            next = end;
        }
        use std::os::fd::AsRawFd;
        for &(first, n) in runs {
            let (off, len) = ((first * PAGE_SIZE) as usize, (n * PAGE_SIZE) as usize);
            // SAFETY: every run was checked above to satisfy 0 < n and first + n <= pages, so
            // `off + len <= self.len`: `[ptr + off, ptr + off + len)` lies exactly inside
            // the RAM mapping this GuestRam made and owns, and nothing else is replaced.
            // `ptr` is page-aligned (mmap returned it) and `off` a multiple of PAGE_SIZE, so
            // the address is a valid MAP_FIXED target. We hold `self` by value: no hart,
            // device or reference uses this RAM yet. MAP_PRIVATE means guest writes never
            // reach the file; its length was checked, so every mapped page exists in it.
            let r = unsafe {
                libc::mmap(
                    self.ptr.as_ptr().add(off).cast(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    off as libc::off_t,
                )
            };
            if r == libc::MAP_FAILED {
                return Err(Error::MemoryFile(format!(
                    "cannot map its pages {first}+{n}: {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
        // Discarding must now replace pages, not drop them back to a file's bytes.
        self.file_backed = true;
        Ok(self)
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.len as u64
    }

    /// Host pointer of guest physical `pa` if `[pa, pa+size)` lies entirely in RAM.
    #[inline(always)]
    pub(crate) fn host_ptr(&self, pa: u64, size: u64) -> Option<*mut u8> {
        let off = pa.wrapping_sub(RAM_BASE);
        if off < self.len as u64 && size <= self.len as u64 - off {
            // SAFETY: `off + size <= len`, so the result stays inside the allocation.
            Some(unsafe { self.ptr.as_ptr().add(off as usize) })
        } else {
            None
        }
    }

    /// True if the whole range is RAM.
    pub fn contains(&self, pa: u64, size: u64) -> bool {
        self.host_ptr(pa, size).is_some()
    }

    /// Reads `size` (1, 2, 4, 8) bytes at `pa`, little-endian. `None` if outside RAM.
    pub fn read(&self, pa: u64, size: u64) -> Option<u64> {
        let p = self.host_ptr(pa, size)?;
        // SAFETY: `p..p+size` is inside the allocation (checked by host_ptr).
        Some(unsafe { load(p, size) })
    }

    /// Writes the low `size` (1, 2, 4, 8) bytes of `val` at `pa`. `false` if outside RAM.
    pub fn write(&self, pa: u64, size: u64, val: u64) -> bool {
        match self.host_ptr(pa, size) {
            Some(p) => {
                // SAFETY: `p..p+size` is inside the allocation.
                unsafe { store(p, size, val) };
                self.dirty.mark_range(pa - RAM_BASE, size);
                true
            }
            None => false,
        }
    }

    /// Copies guest memory into `buf`. Fails if any byte is outside RAM.
    pub fn read_bytes(&self, pa: u64, buf: &mut [u8]) -> Result<(), Error> {
        let p = self.host_ptr(pa, buf.len() as u64).ok_or(Error::OutOfRam {
            addr: pa,
            len: buf.len() as u64,
        })?;
        // Byte atomics up to the first 8-byte boundary, then whole words (8 times fewer
        // operations for disk I/O and snapshots), then the tail in bytes.
        let head = p.align_offset(8).min(buf.len());
        let mid = head + (buf.len() - head) / 8 * 8;
        for i in (0..head).chain(mid..buf.len()) {
            // SAFETY: `p + i` is inside the checked range; byte atomics need no alignment.
            buf[i] = unsafe { AtomicU8::from_ptr(p.add(i)) }.load(Ordering::Relaxed);
        }
        for (k, out) in buf[head..mid].chunks_exact_mut(8).enumerate() {
            // SAFETY: `p + head + 8k` is 8-byte aligned and its 8 bytes lie inside the
            // checked range.
            let w =
                unsafe { AtomicU64::from_ptr(p.add(head + 8 * k).cast()) }.load(Ordering::Relaxed);
            out.copy_from_slice(&w.to_ne_bytes());
        }
        Ok(())
    }

    /// Copies `data` into guest memory. Fails if any byte is outside RAM.
    pub fn write_bytes(&self, pa: u64, data: &[u8]) -> Result<(), Error> {
        let p = self
            .host_ptr(pa, data.len() as u64)
            .ok_or(Error::OutOfRam {
                addr: pa,
                len: data.len() as u64,
            })?;
        let head = p.align_offset(8).min(data.len());
        let mid = head + (data.len() - head) / 8 * 8;
        for i in (0..head).chain(mid..data.len()) {
            // SAFETY: `p + i` is inside the checked range; byte atomics need no alignment.
            unsafe { AtomicU8::from_ptr(p.add(i)) }.store(data[i], Ordering::Relaxed);
        }
        for (k, w) in data[head..mid].chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            // SAFETY: `p + head + 8k` is 8-byte aligned and its 8 bytes lie inside the
            // checked range.
            unsafe { AtomicU64::from_ptr(p.add(head + 8 * k).cast()) }
                .store(u64::from_ne_bytes(b), Ordering::Relaxed);
        }
        // After the write: a harvest that sees the mark sees the data (see `dirty`).
        self.dirty.mark_range(pa - RAM_BASE, data.len() as u64);
        Ok(())
    }

    /// Marks the page holding RAM address `pa` in the dirty log (harts: write TLB fills,
    /// A/D updates).
    #[inline]
    pub(crate) fn mark_dirty(&self, pa: u64) {
        self.dirty.mark(pa.wrapping_sub(RAM_BASE) / PAGE_SIZE);
    }
}

impl GuestRam {
    /// Gives the host pages behind `[pa, pa+len)` back (whole [`PAGE_SIZE`] pages inside
    /// RAM): they read as zero afterwards and are backed again on the next touch, by a
    /// hart or a device. Harts racing on the range see either old bytes or zeros, as if
    /// another hart had cleared it; host pointers into RAM stay valid.
    pub fn discard(&self, pa: u64, len: u64) -> Result<(), Error> {
        let out = Error::OutOfRam { addr: pa, len };
        if pa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(Error::Config(format!(
                "cannot discard guest range {pa:#x}+{len:#x}: not whole {PAGE_SIZE}-byte pages"
            )));
        }
        let p = self.host_ptr(pa, len).ok_or(out)?;
        if len == 0 {
            return Ok(());
        }
        if self.file_backed {
            // SAFETY: `p..p+len` lies inside our own mapping (checked by host_ptr) and is
            // page-aligned. MAP_FIXED replaces exactly those pages with fresh zero-fill ones
            // at the same address in one step (under the kernel's mmap lock, so a racing
            // hart sees old or new pages, never a hole): no pointer into RAM dangles.
            let r = unsafe {
                libc::mmap(
                    p.cast(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if r == libc::MAP_FAILED {
                return Err(Error::Discard(std::io::Error::last_os_error().to_string()));
            }
            self.dirty.mark_range(pa - RAM_BASE, len);
            return Ok(());
        }
        // SAFETY: `p..p+len` lies inside our private anonymous mapping (checked by host_ptr)
        // and is page-aligned (the mapping is, and `pa - RAM_BASE` is a multiple of the
        // page size). MADV_DONTNEED only replaces its pages with zero-fill-on-demand ones:
        // the mapping stays, so no reference or pointer into it becomes dangling, and all
        // accesses to guest RAM are atomics that may observe any value.
        let r = unsafe { libc::madvise(p.cast(), len as usize, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(Error::Discard(std::io::Error::last_os_error().to_string()));
        }
        // Discarded pages now read as zero: for the log, a write of zero pages.
        self.dirty.mark_range(pa - RAM_BASE, len);
        Ok(())
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are the mapping made in `new`, unmapped only here; no reference
        // into guest RAM outlives the `GuestRam` that owns it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Loads `size` bytes at `p` (little-endian host). Misaligned accesses go byte by byte.
///
/// # Safety
/// `p..p+size` must lie in guest RAM.
#[inline(always)]
pub(crate) unsafe fn load(p: *mut u8, size: u64) -> u64 {
    if (p as usize) & (size as usize - 1) != 0 {
        let mut v = 0u64;
        for i in 0..size as usize {
            // SAFETY: within the caller's range.
            let b = unsafe { AtomicU8::from_ptr(p.add(i)) }.load(Ordering::Relaxed);
            v |= (b as u64) << (8 * i);
        }
        return v;
    }
    // SAFETY: aligned and inside RAM per the caller's contract.
    unsafe {
        match size {
            1 => AtomicU8::from_ptr(p).load(Ordering::Relaxed) as u64,
            2 => AtomicU16::from_ptr(p.cast()).load(Ordering::Relaxed) as u64,
            4 => AtomicU32::from_ptr(p.cast()).load(Ordering::Relaxed) as u64,
            _ => AtomicU64::from_ptr(p.cast()).load(Ordering::Relaxed),
        }
    }
}

/// Stores the low `size` bytes of `v` at `p`. Misaligned accesses go byte by byte.
///
/// # Safety
/// `p..p+size` must lie in guest RAM.
#[inline(always)]
pub(crate) unsafe fn store(p: *mut u8, size: u64, v: u64) {
    if (p as usize) & (size as usize - 1) != 0 {
        for i in 0..size as usize {
            // SAFETY: within the caller's range.
            unsafe { AtomicU8::from_ptr(p.add(i)) }.store((v >> (8 * i)) as u8, Ordering::Relaxed);
        }
        return;
    }
    // SAFETY: aligned and inside RAM per the caller's contract.
    unsafe {
        match size {
            1 => AtomicU8::from_ptr(p).store(v as u8, Ordering::Relaxed),
            2 => AtomicU16::from_ptr(p.cast()).store(v as u16, Ordering::Relaxed),
            4 => AtomicU32::from_ptr(p.cast()).store(v as u32, Ordering::Relaxed),
            _ => AtomicU64::from_ptr(p.cast()).store(v, Ordering::Relaxed),
        }
    }
}

/// A memory-mapped device. Devices are external to the machine (serial, virtio) or internal
/// (CLINT, PLIC); either way they only see offsets inside their own window.
pub trait MmioDevice: Send + Sync {
    /// `offset` is relative to the device base; `data.len()` is 1, 2, 4 or 8.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// `offset` is relative to the device base; `data.len()` is 1, 2, 4 or 8.
    fn write(&self, offset: u64, data: &[u8]);
}

#[derive(Clone)]
struct Region {
    base: u64,
    size: u64,
    dev: Arc<dyn MmioDevice>,
}

/// The MMIO bus: non-overlapping device windows, fixed once the machine runs.
#[derive(Clone, Default)]
pub struct Bus {
    regions: Vec<Region>,
}

impl Bus {
    /// Adds a device window; fails if it is empty, wraps, overlaps RAM or another window.
    pub fn add(
        &mut self,
        base: u64,
        size: u64,
        dev: Arc<dyn MmioDevice>,
        ram_size: u64,
    ) -> Result<(), Error> {
        let end = base
            .checked_add(size)
            .filter(|_| size > 0)
            .ok_or(Error::MmioRange { base, size })?;
        if base < RAM_BASE + ram_size && end > RAM_BASE {
            return Err(Error::MmioRange { base, size });
        }
        if self
            .regions
            .iter()
            .any(|r| base < r.base + r.size && end > r.base)
        {
            return Err(Error::MmioRange { base, size });
        }
        self.regions.push(Region { base, size, dev });
        self.regions.sort_by_key(|r| r.base);
        Ok(())
    }

    fn find(&self, pa: u64, len: u64) -> Option<&Region> {
        self.regions
            .iter()
            .find(|r| pa >= r.base && pa - r.base < r.size && len <= r.size - (pa - r.base))
    }

    /// Reads `len` bytes at `pa`; `None` (access fault) if no device covers the whole access.
    pub fn read(&self, pa: u64, len: u64) -> Option<u64> {
        let r = self.find(pa, len)?;
        let mut buf = [0u8; 8];
        r.dev.read(pa - r.base, &mut buf[..len as usize]);
        Some(u64::from_le_bytes(buf))
    }

    /// Writes `len` bytes at `pa`; `false` (access fault) if no device covers the access.
    pub fn write(&self, pa: u64, len: u64, val: u64) -> bool {
        match self.find(pa, len) {
            Some(r) => {
                r.dev.write(pa - r.base, &val.to_le_bytes()[..len as usize]);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn ram_bounds_are_enforced() {
        let ram = GuestRam::new(2 << 20).unwrap();
        assert!(ram.write(RAM_BASE, 8, 0x1122_3344_5566_7788));
        assert_eq!(ram.read(RAM_BASE, 4), Some(0x5566_7788));
        assert_eq!(ram.read(RAM_BASE + 1, 2), Some(0x6677));
        let last = RAM_BASE + (2 << 20) - 8;
        assert!(ram.write(last, 8, 1));
        assert!(
            !ram.write(last + 1, 8, 1),
            "access straddling the end of RAM must fail"
        );
        assert_eq!(ram.read(RAM_BASE - 1, 1), None);
        assert_eq!(ram.read(u64::MAX, 1), None);
        assert_eq!(ram.read(0, 8), None);
        assert!(ram.read_bytes(last, &mut [0u8; 9]).is_err());
    }

    #[test]
    fn discarded_pages_read_as_zero_and_can_be_used_again() {
        let ram = GuestRam::new(2 << 20).unwrap();
        for k in 0..3 {
            assert!(ram.write(RAM_BASE + k * PAGE_SIZE, 8, 0xdead_beef));
        }
        ram.discard(RAM_BASE + PAGE_SIZE, PAGE_SIZE).unwrap();
        assert_eq!(ram.read(RAM_BASE, 8), Some(0xdead_beef));
        assert_eq!(ram.read(RAM_BASE + PAGE_SIZE, 8), Some(0));
        assert_eq!(ram.read(RAM_BASE + 2 * PAGE_SIZE, 8), Some(0xdead_beef));
        assert!(ram.write(RAM_BASE + PAGE_SIZE, 8, 7));
        assert_eq!(ram.read(RAM_BASE + PAGE_SIZE, 8), Some(7));
        // Partial pages, outside RAM, straddling its end: refused, nothing freed.
        assert!(ram.discard(RAM_BASE + 1, PAGE_SIZE).is_err());
        assert!(ram.discard(RAM_BASE, 100).is_err());
        assert!(ram.discard(RAM_BASE - PAGE_SIZE, PAGE_SIZE).is_err());
        assert!(
            ram.discard(RAM_BASE + (2 << 20) - PAGE_SIZE, 2 * PAGE_SIZE)
                .is_err()
        );
        assert!(ram.discard(u64::MAX - PAGE_SIZE + 1, PAGE_SIZE).is_err());
        assert_eq!(ram.read(RAM_BASE, 8), Some(0xdead_beef));
        ram.discard(RAM_BASE, 2 << 20).unwrap();
        assert_eq!(ram.read(RAM_BASE, 8), Some(0));
    }

    #[test]
    fn bulk_copies_match_byte_accesses_at_every_alignment() {
        let ram = GuestRam::new(2 << 20).unwrap();
        let data: Vec<u8> = (0..100u8)
            .map(|b| b.wrapping_mul(7).wrapping_add(1))
            .collect();
        for start in 0..9u64 {
            for len in [0usize, 1, 7, 8, 9, 31, 100] {
                let pa = RAM_BASE + 4096 * start + start;
                ram.write_bytes(pa, &data[..len]).unwrap();
                for (i, &b) in data[..len].iter().enumerate() {
                    assert_eq!(ram.read(pa + i as u64, 1), Some(u64::from(b)));
                }
                let mut back = vec![0u8; len];
                ram.read_bytes(pa, &mut back).unwrap();
                assert_eq!(back, &data[..len], "start {start} len {len}");
            }
        }
    }

    #[test]
    fn file_backed_ram_reads_the_file_lazily_and_never_writes_it() {
        let path = std::env::temp_dir().join(format!("vme-ram-file-{}", std::process::id()));
        let size = 2u64 << 20;
        {
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(size).unwrap();
            use std::os::unix::fs::FileExt;
            f.write_all_at(&[0xab; 8], PAGE_SIZE).unwrap();
        }
        let f = std::fs::File::open(&path).unwrap();
        let ram = GuestRam::from_file(&f, size).unwrap();
        assert_eq!(
            ram.read(RAM_BASE + PAGE_SIZE, 8),
            Some(0xabab_abab_abab_abab)
        );
        assert_eq!(ram.read(RAM_BASE, 8), Some(0), "holes read as zero");
        assert!(ram.write(RAM_BASE + PAGE_SIZE, 8, 5));
        assert_eq!(ram.read(RAM_BASE + PAGE_SIZE, 8), Some(5));
        // A discarded page reads as zero, not as the file's bytes.
        ram.discard(RAM_BASE + PAGE_SIZE, PAGE_SIZE).unwrap();
        assert_eq!(ram.read(RAM_BASE + PAGE_SIZE, 8), Some(0));
        assert!(ram.write(RAM_BASE + PAGE_SIZE, 8, 9));
        assert_eq!(ram.read(RAM_BASE + PAGE_SIZE, 8), Some(9));
        drop(ram);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(
            &on_disk[PAGE_SIZE as usize..][..8],
            &[0xab; 8],
            "file unchanged"
        );
        // A file of the wrong size is refused with the reason.
        let err = GuestRam::from_file(&f, 4 << 20).err().unwrap().to_string();
        assert!(err.contains("truncated"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn ram_size_is_validated() {
        assert!(GuestRam::new(0).is_err());
        assert!(GuestRam::new(4096).is_err());
    }

    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);
    impl MmioDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn bus_routes_and_rejects() {
        let mut bus = Bus::default();
        let dev = Arc::new(Recorder(Mutex::new(Vec::new())));
        bus.add(0x1000_0000, 0x100, dev.clone(), 2 << 20).unwrap();
        assert!(bus.add(0x1000_0080, 0x100, dev.clone(), 2 << 20).is_err());
        assert!(bus.add(RAM_BASE, 0x100, dev.clone(), 2 << 20).is_err());
        assert!(bus.add(u64::MAX - 1, 0x100, dev.clone(), 2 << 20).is_err());
        assert_eq!(bus.read(0x1000_0005, 1), Some(5));
        assert!(bus.write(0x1000_0004, 4, 0xaabbccdd));
        assert_eq!(dev.0.lock().unwrap()[0], (4, vec![0xdd, 0xcc, 0xbb, 0xaa]));
        assert_eq!(bus.read(0x1000_00fe, 4), None, "straddling the window end");
        assert_eq!(bus.read(0x2000_0000, 4), None);
    }
}
