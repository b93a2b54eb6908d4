//! Guest RAM of the x86_64 machine: the regions around the PCI hole (`layout::ram_regions`),
//! fresh and anonymous for a boot or mapped privately from a snapshot's memory file for a
//! restore (pages load on first touch), and RAM as the virtio devices see it, every access
//! checked.
//!
//! The memory file holds the regions back to back in address order: offset 0 is guest
//! address 0, and the RAM above 4 GiB follows the RAM below the hole.

use super::dirty::DirtyPages;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};
use vme_arch::layout;
use vme_devices::virtio::{DiscardError, GuestMemory, MemError};

/// Fresh, zeroed guest RAM of `size` bytes.
pub fn anonymous(size: u64) -> Result<GuestMemoryMmap, String> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| e.to_string())
}

/// Guest RAM of `size` bytes mapped privately from `file` (a snapshot's memory file, which
/// must be exactly `size` bytes long): nothing is read until the guest touches a page, and
/// the guest's writes never reach the file.
pub fn from_file(file: &File, size: u64) -> Result<GuestMemoryMmap, String> {
    let file_len = file
        .metadata()
        .map_err(|e| format!("cannot read its size: {e}"))?
        .len();
    if file_len != size {
        return Err(format!(
            "it is {file_len} bytes long, but the machine has {size} bytes of RAM: the file \
             is truncated or belongs to another snapshot"
        ));
    }
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, len) in layout::ram_regions(size) {
        let copy = file
            .try_clone()
            .map_err(|e| format!("cannot reopen it: {e}"))?;
        let region = MmapRegionBuilder::new(len as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::new(copy, offset))
            .build()
            .map_err(|e| format!("cannot map it: {e}"))?;
        let region = GuestRegionMmap::new(region, GuestAddress(start))
            .ok_or("a RAM region does not fit the guest's address space")?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| format!("cannot map it: {e}"))
}

/// Maps the pages `runs` (`(first page, pages)` of the memory file, regions back to back)
/// of `file` (a diff snapshot's memory file, RAM's length) privately over `mem`, which a
/// restore has just mapped and no vCPU runs in yet. Like the base mapping, nothing is read
/// until the guest touches a page.
pub fn map_file_pages(
    mem: &GuestMemoryMmap,
    file: &File,
    runs: &[(u64, u64)],
) -> Result<(), String> {
    const PAGE: u64 = 4096;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    for &(first, n) in runs {
        let (lo, hi) = (
            first.saturating_mul(PAGE),
            first.saturating_add(n).saturating_mul(PAGE),
        );
        if hi > total || lo >= hi {
            return Err(format!("page run {first}+{n} lies outside RAM"));
        }
        let mut base = 0u64;
        for region in mem.iter() {
            let (from, to) = (lo.max(base), hi.min(base + region.len()));
            if from < to {
                let host = region
                    .get_host_address(vm_memory::MemoryRegionAddress(from - base))
                    .map_err(|e| format!("page run {first}+{n}: {e}"))?;
                // SAFETY: `host..host+(to-from)` lies inside one region's mapping (clipped to
                // it above) and is page-aligned (page-multiple offsets in a page-aligned
                // region). MAP_FIXED replaces exactly those pages with a private mapping of
                // the file at the same offset; no vCPU or device uses RAM yet, and every
                // pointer into RAM stays valid.
                let r = unsafe {
                    libc::mmap(
                        host.cast(),
                        (to - from) as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_NORESERVE | libc::MAP_FIXED,
                        file.as_raw_fd(),
                        from as libc::off_t,
                    )
                };
                if r == libc::MAP_FAILED {
                    return Err(format!(
                        "cannot map page run {first}+{n}: {}",
                        std::io::Error::last_os_error()
                    ));
                }
            }
            base += region.len();
        }
    }
    Ok(())
}

/// Copies `buf.len()` bytes of RAM at memory-file offset `offset` (regions back to back).
pub fn read_at(mem: &GuestMemoryMmap, offset: u64, buf: &mut [u8]) -> Result<(), String> {
    let (mut off, mut done) = (offset, 0usize);
    let mut base = 0u64;
    for region in mem.iter() {
        let len = region.len();
        while done < buf.len() && off >= base && off < base + len {
            let n = ((base + len - off) as usize).min(buf.len() - done);
            let gpa = region.start_addr().0 + (off - base);
            mem.read_slice(&mut buf[done..done + n], GuestAddress(gpa))
                .map_err(|e| format!("cannot read guest memory at {gpa:#x}: {e}"))?;
            done += n;
            off += n as u64;
        }
        base += len;
    }
    if done != buf.len() {
        return Err(format!(
            "memory file offset {offset:#x}+{:#x} is past the end of RAM",
            buf.len()
        ));
    }
    Ok(())
}

/// Guest RAM as the virtio devices see it. Every access is checked against the RAM regions
/// (the PCI hole and anything past the end are not RAM), so a hostile address is an error.
pub struct Ram {
    pub mem: GuestMemoryMmap,
    /// Logs what the devices write, for diff snapshots.
    pub dirty: Arc<DirtyPages>,
}

impl Ram {
    pub fn new(mem: GuestMemoryMmap, dirty: Arc<DirtyPages>) -> Ram {
        Ram { mem, dirty }
    }

    fn err(addr: u64, len: u64) -> MemError {
        MemError { addr, len }
    }
}

impl GuestMemory for Ram {
    fn check(&self, addr: u64, len: u64) -> Result<(), MemError> {
        let ok = addr.checked_add(len).is_some()
            && usize::try_from(len).is_ok_and(|n| self.mem.check_range(GuestAddress(addr), n));
        ok.then_some(()).ok_or(Self::err(addr, len))
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let len = buf.len() as u64;
        self.check(addr, len)?;
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| Self::err(addr, len))
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemError> {
        let len = data.len() as u64;
        self.check(addr, len)?;
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| Self::err(addr, len))
    }
    // Single atomic accesses: ring indices race with the guest's vCPUs.
    fn load_u16(&self, addr: u64) -> Result<u16, MemError> {
        self.mem
            .load(GuestAddress(addr), Ordering::Acquire)
            .map_err(|_| Self::err(addr, 2))
    }
    fn store_u16(&self, addr: u64, val: u16) -> Result<(), MemError> {
        self.mem
            .store(val, GuestAddress(addr), Ordering::Release)
            .map_err(|_| Self::err(addr, 2))
    }
    /// Region by region (a range may only span regions that touch in guest-physical space,
    /// since it must be RAM throughout).
    fn discard(&self, addr: u64, len: u64) -> Result<(), DiscardError> {
        DiscardError::check_pages(addr, len)?;
        self.check(addr, len)?;
        // The pages become zeros: a diff must hold them.
        self.dirty.mark(addr, len);
        let (mut at, end) = (addr, addr + len);
        while at < end {
            let (region, offset) = self
                .mem
                .to_region_addr(GuestAddress(at))
                .ok_or(Self::err(at, end - at))?;
            let n = (region.len() - offset.0).min(end - at);
            let host = region
                .get_host_address(offset)
                .map_err(|_| Self::err(at, n))?;
            if region.file_offset().is_some() {
                // A restored VM's RAM is a private mapping of its snapshot: dropping pages
                // would bring back the file's bytes, so they are replaced instead.
                replace_with_zero_pages(host, n).map_err(|source| DiscardError::Host {
                    addr: at,
                    len: n,
                    source,
                })?;
                at += n;
                continue;
            }
            // SAFETY: `host..host+n` lies inside one region's mapping (`n` is capped at the
            // region's end), which vm-memory created as private anonymous memory, and is
            // page-aligned (regions start on page boundaries and `at` is page-aligned).
            // MADV_DONTNEED swaps its pages for zero-fill-on-demand ones without unmapping:
            // every pointer into it stays valid, KVM's MMU notifier drops the guest's
            // mappings of those pages, and vCPUs racing on the range see old bytes or zeros.
            let r = unsafe { libc::madvise(host.cast(), n as usize, libc::MADV_DONTNEED) };
            if r != 0 {
                return Err(DiscardError::Host {
                    addr: at,
                    len: n,
                    source: std::io::Error::last_os_error(),
                });
            }
            at += n;
        }
        Ok(())
    }
}

/// Replaces `len` bytes of a private file mapping at `host` with fresh zero-fill pages.
fn replace_with_zero_pages(host: *mut u8, len: u64) -> std::io::Result<()> {
    // SAFETY: `host..host+len` lies inside one region's mapping (the caller capped `len` at
    // the region's end) and is page-aligned. MAP_FIXED replaces exactly those pages with
    // anonymous zero pages at the same address in one step, under the kernel's mmap lock:
    // every pointer into RAM stays valid, KVM's MMU notifier drops the guest's mappings of
    // the old pages, and vCPUs racing on the range see old bytes or zeros, never a hole.
    let r = unsafe {
        libc::mmap(
            host.cast(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if r == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RAM at [0, 1 MiB) and [4 GiB, 4 GiB + 1 MiB): a hole between, as with the PCI hole.
    fn ram() -> Ram {
        let mib = 1 << 20;
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), mib),
            (GuestAddress(layout::MMIO_HOLE_END), mib),
        ])
        .unwrap();
        let dirty = Arc::new(DirtyPages::new(&mem));
        Ram::new(mem, dirty)
    }

    #[test]
    fn device_accesses_stay_inside_guest_ram() {
        let ram = ram();
        let mut buf = [0u8; 8];
        ram.write(0x1000, b"virtio!!").unwrap();
        ram.read(0x1000, &mut buf).unwrap();
        assert_eq!(&buf, b"virtio!!");
        // Straddling the end of a region, inside the hole, past the end, wrapping around.
        assert!(ram.read((1 << 20) - 4, &mut buf).is_err());
        assert!(ram.write(layout::MMIO_HOLE_START, &buf).is_err());
        assert!(
            ram.read(layout::MMIO_HOLE_END + (1 << 20), &mut buf)
                .is_err()
        );
        assert!(ram.check(u64::MAX - 3, 8).is_err());
        assert!(ram.check(0, u64::MAX).is_err());
        assert!(ram.check(layout::MMIO_HOLE_END, 1 << 20).is_ok());
        ram.store_u16(0x2000, 0xbeef).unwrap();
        assert_eq!(ram.load_u16(0x2000), Ok(0xbeef));
        assert!(ram.load_u16((1 << 20) - 1).is_err());
        assert!(ram.store_u16(layout::MMIO_HOLE_START, 1).is_err());
    }

    #[test]
    fn discard_zeroes_whole_pages_of_ram_only() {
        let ram = ram();
        let hi = layout::MMIO_HOLE_END;
        for at in [0x1000, 0x2000, 0x3000, hi, hi + 0x1000] {
            ram.write(at, b"resident").unwrap();
        }
        ram.discard(0x2000, 0x1000).unwrap();
        ram.discard(hi, 0x1000).unwrap();
        let mut buf = [0u8; 8];
        for (at, want) in [
            (0x1000, b"resident"),
            (0x2000, &[0u8; 8]),
            (0x3000, b"resident"),
            (hi, &[0u8; 8]),
            (hi + 0x1000, b"resident"),
        ] {
            ram.read(at, &mut buf).unwrap();
            assert_eq!(&buf, want, "at {at:#x}");
        }
        // Partial pages, the hole, straddling a region's end, wrapping: refused.
        assert!(ram.discard(0x1001, 0x1000).is_err());
        assert!(ram.discard(0x1000, 0x800).is_err());
        assert!(ram.discard(layout::MMIO_HOLE_START, 0x1000).is_err());
        assert!(ram.discard((1 << 20) - 0x1000, 0x2000).is_err());
        assert!(ram.discard(u64::MAX - 0xfff, 0x1000).is_err());
        ram.read(0x1000, &mut buf).unwrap();
        assert_eq!(&buf, b"resident");
    }

    /// A memory file for 3 GiB + 2 MiB of RAM (sparse): RAM above the hole starts at
    /// offset 3 GiB.
    #[test]
    fn a_memory_file_maps_around_the_hole_privately_and_reads_back_in_order() {
        use std::os::unix::fs::FileExt;
        let dir = std::env::temp_dir().join(format!("vme-x86ram-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        let size = layout::MMIO_HOLE_START + (2 << 20);
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(b"low!", 0x1000).unwrap();
        f.write_all_at(b"high", layout::MMIO_HOLE_START + 0x2000)
            .unwrap();
        let f = File::open(&path).unwrap();
        let mem = from_file(&f, size).unwrap();
        let ram = Ram::new(mem.clone(), Arc::new(DirtyPages::new(&mem)));
        let mut b = [0u8; 4];
        ram.read(0x1000, &mut b).unwrap();
        assert_eq!(&b, b"low!");
        ram.read(layout::MMIO_HOLE_END + 0x2000, &mut b).unwrap();
        assert_eq!(&b, b"high");
        read_at(&mem, layout::MMIO_HOLE_START + 0x2000, &mut b).unwrap();
        assert_eq!(&b, b"high", "file offsets follow the regions");
        // Across the end of the low region, in one read.
        let mut two = [0u8; 8];
        ram.write(layout::MMIO_HOLE_START - 4, b"ABCD").unwrap();
        ram.write(layout::MMIO_HOLE_END, b"EFGH").unwrap();
        read_at(&mem, layout::MMIO_HOLE_START - 4, &mut two).unwrap();
        assert_eq!(&two, b"ABCDEFGH");
        assert!(read_at(&mem, size - 2, &mut b).is_err(), "past the end");
        // The guest writes its copy, never the file; discarded pages read as zeros.
        ram.write(0x1000, b"new!").unwrap();
        let mut on_disk = [0u8; 4];
        f.read_exact_at(&mut on_disk, 0x1000).unwrap();
        assert_eq!(&on_disk, b"low!");
        ram.discard(layout::MMIO_HOLE_END, 0x4000).unwrap();
        ram.read(layout::MMIO_HOLE_END + 0x2000, &mut b).unwrap();
        assert_eq!(b, [0; 4], "not the file's bytes");
        ram.write(layout::MMIO_HOLE_END + 0x2000, b"back").unwrap();
        ram.read(layout::MMIO_HOLE_END + 0x2000, &mut b).unwrap();
        assert_eq!(&b, b"back");
        // A file of another length belongs to another snapshot.
        let e = from_file(&f, size + 4096).unwrap_err();
        assert!(e.contains("belongs to another snapshot"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
