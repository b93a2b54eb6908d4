//! The pages of the x86_64 machine's RAM written since the last snapshot, for diff
//! snapshots. KVM logs what the vCPUs write (`Vm::enable_dirty_log`); this process logs
//! what it writes itself — virtio devices, balloon discards, instructions the monitor
//! completes for KVM — since KVM never sees those. Pages are numbered as in the memory
//! file: the RAM regions back to back, so page 0 is guest address 0 and the RAM above 4 GiB
//! follows the RAM below the PCI hole.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const PAGE: u64 = 4096;

pub struct DirtyPages {
    on: AtomicBool,
    /// One bit per memory-file page.
    bits: Vec<AtomicU64>,
    /// Per RAM region, in order: its guest address, its first memory-file page, its pages.
    regions: Vec<(u64, u64, u64)>,
}

impl DirtyPages {
    pub fn new(mem: &GuestMemoryMmap) -> DirtyPages {
        let mut regions = Vec::new();
        let mut first = 0;
        for r in mem.iter() {
            let pages = r.len() / PAGE;
            regions.push((r.start_addr().0, first, pages));
            first += pages;
        }
        DirtyPages {
            on: AtomicBool::new(false),
            bits: (0..first.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            regions,
        }
    }

    /// Starts logging this process's writes (KVM's log is turned on beside it).
    pub fn enable(&self) {
        self.on.store(true, Ordering::SeqCst);
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Logs a write of `len` bytes at guest address `gpa`; the parts outside RAM are
    /// ignored (the write itself was refused there).
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 || !self.is_on() {
            return;
        }
        let end = gpa.saturating_add(len);
        for &(start, first, pages) in &self.regions {
            let region_end = start + pages * PAGE;
            let (lo, hi) = (gpa.max(start), end.min(region_end));
            if lo >= hi {
                continue;
            }
            let from = first + (lo - start) / PAGE;
            let to = first + (hi - 1 - start) / PAGE;
            for page in from..=to {
                self.set(page);
            }
        }
    }

    fn set(&self, page: u64) {
        if let Some(w) = self.bits.get((page / 64) as usize) {
            w.fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
    }

    /// The pages written since the last harvest, as ascending, disjoint `(first page,
    /// pages)` runs: this process's log (cleared) joined with KVM's bitmaps, one per slot
    /// in region order (`Vm::take_dirty_log`).
    pub fn harvest(&self, kvm: &[Vec<u64>]) -> Vec<(u64, u64)> {
        for (slot, words) in kvm.iter().enumerate() {
            let Some(&(_, first, pages)) = self.regions.get(slot) else {
                break;
            };
            for (i, &w) in words.iter().enumerate() {
                let mut w = w;
                while w != 0 {
                    let bit = u64::from(w.trailing_zeros());
                    w &= w - 1;
                    let page = i as u64 * 64 + bit;
                    if page < pages {
                        self.set(first + page);
                    }
                }
            }
        }
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (i, w) in self.bits.iter().enumerate() {
            let mut w = w.swap(0, Ordering::Relaxed);
            while w != 0 {
                let page = i as u64 * 64 + u64::from(w.trailing_zeros());
                w &= w - 1;
                match runs.last_mut() {
                    Some((f, n)) if *f + *n == page => *n += 1,
                    _ => runs.push((page, 1)),
                }
            }
        }
        runs
    }

    /// Puts back runs a failed snapshot harvested, so the next diff still holds them.
    pub fn remark(&self, runs: &[(u64, u64)]) {
        for &(first, n) in runs {
            for page in first..first + n {
                self.set(page);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn split_ram() -> GuestMemoryMmap {
        // 64 KiB below a hole, 64 KiB above it.
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x100000), 0x10000),
        ])
        .unwrap()
    }

    #[test]
    fn nothing_is_logged_until_enabled() {
        let d = DirtyPages::new(&split_ram());
        d.mark(0, 4096);
        assert!(d.harvest(&[]).is_empty());
    }

    #[test]
    fn writes_become_memory_file_pages_and_harvest_clears_them() {
        let d = DirtyPages::new(&split_ram());
        d.enable();
        d.mark(0xfff, 2); // straddles pages 0 and 1
        d.mark(0x100000, 1); // first page above the hole: file page 16
        d.mark(0x20000, 4096); // in the hole: ignored
        d.mark(u64::MAX - 1, 10); // past everything: ignored, no overflow
        assert_eq!(d.harvest(&[]), vec![(0, 2), (16, 1)]);
        assert!(d.harvest(&[]).is_empty());
    }

    #[test]
    fn kvm_bitmaps_join_the_log_per_slot() {
        let d = DirtyPages::new(&split_ram());
        d.enable();
        d.mark(0x2000, 1);
        // Slot 0 page 3, slot 1 pages 0 and 15; a bit past a slot's end is ignored.
        let kvm = vec![vec![0b1000], vec![1 | (1 << 15) | (1 << 40)]];
        assert_eq!(d.harvest(&kvm), vec![(2, 2), (16, 1), (31, 1)]);
        d.remark(&[(5, 3)]);
        assert_eq!(d.harvest(&[]), vec![(5, 3)]);
    }
}
