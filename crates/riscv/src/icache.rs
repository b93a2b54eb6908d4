//! Decoded-instruction cache: 2-way set-associative slots of whole physical pages (one
//! `Insn` per 2-byte offset), filled lazily. Validity is tied to a per-page write generation shared by
//! all harts (see `Shared::code_pages`), so stores into code pages invalidate decodes on
//! every hart, while fence.i / satp / sfence.vma simply drop the local state.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::decode::Insn;
use crate::shared::CODE_FLAG;

const SLOTS: usize = 1024;
const SETS: usize = SLOTS / 2;
pub(crate) const PER_PAGE: usize = 2048;

pub(crate) struct ICache {
    /// Page index (in RAM pages) held by each slot, or usize::MAX.
    tags: Vec<usize>,
    /// Write generation of the page when the slot was filled.
    gens: Vec<u32>,
    /// Per set: the way used most recently (the other one is replaced on a miss).
    mru: Vec<u8>,
    insns: Vec<Insn>,
    /// Virtual page of the current fetch slot (u64::MAX = none) and its slot.
    pub fetch_vpage: u64,
    pub fetch_slot: usize,
    /// Physical base of the current fetch page.
    pub fetch_pa: u64,
    /// Host address of the current fetch page.
    pub fetch_host: usize,
    /// Slots (re)filled, for the debug counters.
    pub fills: u64,
}

impl ICache {
    pub fn new() -> Self {
        Self {
            tags: vec![usize::MAX; SLOTS],
            gens: vec![0; SLOTS],
            mru: vec![0; SETS],
            insns: vec![Insn::default(); SLOTS * PER_PAGE],
            fetch_vpage: u64::MAX,
            fetch_slot: 0,
            fetch_pa: 0,
            fetch_host: 0,
            fills: 0,
        }
    }

    pub fn forget_fetch(&mut self) {
        self.fetch_vpage = u64::MAX;
    }

    pub fn flush(&mut self) {
        self.tags.fill(usize::MAX);
        self.forget_fetch();
    }

    /// Slot holding RAM page `page`, (re)filling it if needed; registers the page as code.
    pub fn slot_for(&mut self, page: usize, code_pages: &[AtomicU32]) -> usize {
        // Hash the page number so kernel and user pages spread over the sets.
        let set = (page ^ (page >> 9)) & (SETS - 1);
        let (w0, w1) = (2 * set, 2 * set + 1);
        let s = if self.tags[w0] == page {
            w0
        } else if self.tags[w1] == page || self.mru[set] == 0 {
            // A hit in way 1, or a miss replacing the least recently used way 1.
            w1
        } else {
            w0
        };
        self.mru[set] = (s & 1) as u8;
        if self.tags[s] != page {
            self.fills += 1;
            self.insns[s * PER_PAGE..(s + 1) * PER_PAGE].fill(Insn::default());
            self.tags[s] = page;
            // Instruction bytes are read only after the flag is set, so any later store
            // bumps the generation and is seen by `revalidate`.
            let old = code_pages
                .get(page)
                .map_or(0, |f| f.fetch_or(CODE_FLAG, Ordering::AcqRel));
            self.gens[s] = old & !CODE_FLAG;
        }
        s
    }

    #[inline(always)]
    pub fn get(&self, slot: usize, idx: usize) -> Insn {
        let i = (slot & (SLOTS - 1)) * PER_PAGE + (idx & (PER_PAGE - 1));
        // SAFETY: i < SLOTS * PER_PAGE == insns.len() by the two masks (both powers of two).
        unsafe { *self.insns.get_unchecked(i) }
    }

    pub fn set(&mut self, slot: usize, idx: usize, i: Insn) {
        self.insns[slot * PER_PAGE + (idx & (PER_PAGE - 1))] = i;
    }

    /// Drops slots whose page was written since it was decoded.
    pub fn revalidate(&mut self, code_pages: &[AtomicU32]) {
        for s in 0..SLOTS {
            let page = self.tags[s];
            if page == usize::MAX {
                continue;
            }
            let cur = code_pages
                .get(page)
                .map_or(0, |f| f.load(Ordering::Acquire));
            if cur & !CODE_FLAG != self.gens[s] {
                self.tags[s] = usize::MAX;
                if self.fetch_slot == s {
                    self.forget_fetch();
                }
            }
        }
    }
}
