//! The dirty-page log: one bit per 4 KiB page of guest RAM, set when the page may have been
//! written since the last harvest. Diff snapshots write only those pages; live migration
//! copies them round after round.
//!
//! # Cost
//! The log does not exist until [`MachineHandle::enable_dirty_log`]: until then each writer
//! pays one atomic load (is there a log?), and harts pay it only when they fill a write TLB
//! entry, never per store. Once on, harts still mark a page when they fill a *write* TLB entry
//! for it, not on every store: a harvest clears the bitmap and makes every hart drop its write
//! entries, so the next store to any page misses, refills and marks it again.
//!
//! # Who marks
//! - harts: a write TLB fill (stores, FPU stores, AMOs and SC reach RAM only through write
//!   entries or the slow path that fills them), and the page walker's A/D updates of a PTE;
//! - everyone else writes through [`GuestRam`]'s `write`, `write_bytes` and `discard` (device
//!   DMA, the balloon's discards, which count as writes of zero pages, the SBI console, the
//!   loaders), which mark after writing.
//!
//! # Ordering on a running machine
//! A harvest first swaps the bitmap out, then asks every hart to drop its write entries and
//! waits until each running hart has done so. Every write entry a hart holds was filled (and
//! its page marked) after its previous drop, so after the previous harvest's swap: its page is
//! in the bitmap being harvested or in the new one. A store through an old entry between the
//! swap and the drop lands on a page of the harvested set, and the hart's acknowledgement
//! (a SeqCst read-modify-write after the store) orders it before anything the harvester
//! copies afterwards. Other writers write, then mark with release ordering; the harvest swaps
//! with acquire ordering, so a page found marked is copied with that write in it, and a mark
//! that misses this harvest is in the next one. So: copy a harvest's pages only after
//! [`MachineHandle::harvest_dirty`] returns, and never hold a device's lock while harvesting a
//! running machine (a hart may be waiting for that lock before it can acknowledge). On a
//! paused machine nothing runs, and a parked hart drops its entries before its next
//! instruction, so a harvest returns at once.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::machine::MachineHandle;
use crate::shared::{HSM_STARTED, REQ_DROP_WRITES, lock};

/// The log of one machine's RAM.
pub(crate) struct DirtyLog {
    pages: u64,
    /// Allocated when first enabled, never freed: one bit per page.
    bits: OnceLock<Box<[AtomicU64]>>,
}

impl DirtyLog {
    pub fn new(pages: u64) -> Self {
        Self {
            pages,
            bits: OnceLock::new(),
        }
    }

    /// Turns the log on; true if it was off.
    pub fn enable(&self) -> bool {
        let mut fresh = false;
        self.bits.get_or_init(|| {
            fresh = true;
            (0..self.pages.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect()
        });
        fresh
    }

    pub fn enabled(&self) -> bool {
        self.bits.get().is_some()
    }

    /// Marks page `page` (RAM offset / 4 KiB) if the log is on; ignores pages past RAM.
    #[inline]
    pub fn mark(&self, page: u64) {
        if let Some(bits) = self.bits.get()
            && page < self.pages
            && let Some(w) = bits.get((page / 64) as usize)
        {
            // Unconditional RMW, release: a harvest that sees the bit sees the write before
            // it (a plain load-then-skip would not order a second write behind the first).
            w.fetch_or(1 << (page % 64), Ordering::Release);
        }
    }

    /// Marks every page that `[off, off+len)` (RAM offsets) touches.
    pub fn mark_range(&self, off: u64, len: u64) {
        if len == 0 || !self.enabled() {
            return;
        }
        let last = (off + len - 1) / crate::PAGE_SIZE;
        for page in off / crate::PAGE_SIZE..=last {
            self.mark(page);
        }
    }

    /// Swaps the bitmap out for an empty one; `None` while the log is off.
    fn take(&self) -> Option<DirtyBitmap> {
        let bits = self.bits.get()?;
        Some(DirtyBitmap {
            words: bits.iter().map(|w| w.swap(0, Ordering::Acquire)).collect(),
            pages: self.pages,
        })
    }

    /// Marks again every page of `b` (a harvest whose pages could not be saved).
    fn merge(&self, b: &DirtyBitmap) {
        if let Some(bits) = self.bits.get() {
            for (w, &v) in bits.iter().zip(&b.words) {
                if v != 0 {
                    w.fetch_or(v, Ordering::Release);
                }
            }
        }
    }
}

/// Pages harvested from the dirty log: page `n` is RAM offset `n * 4096`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyBitmap {
    /// Pages of RAM the bitmap covers.
    pub fn ram_pages(&self) -> u64 {
        self.pages
    }

    /// Pages marked.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn contains(&self, page: u64) -> bool {
        self.words
            .get((page / 64) as usize)
            .is_some_and(|w| w >> (page % 64) & 1 != 0)
    }

    /// The marked pages as runs `(first page, count)`, in ascending order.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (i, &w) in self.words.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let page = i as u64 * 64 + u64::from(w.trailing_zeros());
                w &= w - 1;
                match runs.last_mut() {
                    Some((first, n)) if *first + *n == page => *n += 1,
                    _ => runs.push((page, 1)),
                }
            }
        }
        runs
    }
}

/// How often a harvest looks whether every running hart has dropped its write entries.
const ACK_POLL: Duration = Duration::from_micros(50);

impl MachineHandle {
    /// Turns the dirty-page log on (it stays on). Pages written while this runs may be
    /// missing from the log: treat all of RAM as dirty once after enabling (a full snapshot,
    /// a first migration round). Returns at once if the log is already on.
    pub fn enable_dirty_log(&self) {
        if self.shared.ram.dirty.enable() {
            self.drop_write_entries();
        }
    }

    pub fn dirty_log_enabled(&self) -> bool {
        self.shared.ram.dirty.enabled()
    }

    /// The pages written since the log was enabled or last harvested, and a fresh log;
    /// `None` while the log is off. On a running machine it waits until every hart has
    /// dropped its write TLB entries (a few thousand instructions at most); see the module
    /// documentation for what may be copied when.
    pub fn harvest_dirty(&self) -> Option<DirtyBitmap> {
        let taken = self.shared.ram.dirty.take()?;
        self.drop_write_entries();
        Some(taken)
    }

    /// Puts a harvest's pages back into the log, for a harvest whose pages were not saved
    /// after all (a failed diff snapshot, a failed migration round): the next harvest
    /// returns them again.
    pub fn remark_dirty(&self, b: &DirtyBitmap) {
        self.shared.ram.dirty.merge(b);
    }

    /// Makes every hart drop its write TLB entries before its next store, through the
    /// request mechanism of remote fences; waits for running harts to do it. A hart parked
    /// by a pause, or not yet started, handles the request before its next instruction.
    fn drop_write_entries(&self) {
        let s = &self.shared;
        for l in &s.links {
            l.requests.fetch_or(REQ_DROP_WRITES, Ordering::SeqCst);
        }
        s.kick_all();
        loop {
            {
                let c = lock(&s.control);
                // A hart parks only after serving its requests, so once all are parked (or
                // none runs, or they are stopping) nothing stores through an old entry.
                if c.stop || c.running == 0 || (c.paused && c.parked == c.running) {
                    return;
                }
            }
            // Harts stopped by SBI HSM flush their whole TLB when they start again.
            let pending = s.links.iter().any(|l| {
                l.hsm.load(Ordering::SeqCst) == HSM_STARTED
                    && l.requests.load(Ordering::SeqCst) & REQ_DROP_WRITES != 0
            });
            if !pending {
                return;
            }
            std::thread::sleep(ACK_POLL);
        }
    }
}

#[cfg(test)]
#[path = "dirty_tests.rs"]
mod tests;
