//! Address translation (Sv39/Sv48), the software TLB, and the load/store paths.
//!
//! The TLB is direct-mapped, 256 entries per (context, access kind). A context is the
//! effective privilege with its SUM setting (U, S, S+SUM, untranslated), so the frequent
//! privilege switches and SUM toggles of a kernel need no flush. ASIDs are not tagged: satp
//! writes flush everything. Entries for RAM pages carry the host address of the page, so a
//! hit costs a compare and an atomic access. A/D bits are set by the walker (atomically,
//! with a compare-and-swap on the PTE); write entries are only cached once D is set.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::counters::Ev;
use crate::csr::*;
use crate::hart::{Hart, PRV_M, PRV_S, PRV_U, Trap, cause};
use crate::memory::{self, RAM_BASE};
use crate::shared::CODE_FLAG;

const TLB_SIZE: usize = 256;
/// Entries allocated: 4 contexts x 3 kinds, rounded up to a power of two so that masked
/// indexes need no bounds check.
const TLB_ALLOC: usize = 16 * TLB_SIZE;
const CTX_UNTRANSLATED: usize = 3;
/// Access kinds (TLB sub-arrays).
pub(crate) const READ: usize = 0;
pub(crate) const WRITE: usize = 1;
pub(crate) const EXEC: usize = 2;

#[derive(Clone, Copy)]
pub(crate) struct TlbEntry {
    /// Virtual page number, or u64::MAX when empty.
    tag: u64,
    /// Host address of the page start (0 for MMIO pages, which are never cached).
    host: usize,
    /// Physical page address.
    pa: u64,
}

const EMPTY: TlbEntry = TlbEntry {
    tag: u64::MAX,
    host: 0,
    pa: 0,
};

pub(crate) struct Tlb {
    entries: Box<[TlbEntry; TLB_ALLOC]>,
    /// Base index of the current data context's READ and WRITE arrays.
    read_base: usize,
    write_base: usize,
}

impl Tlb {
    pub fn new() -> Self {
        Self {
            entries: Box::new([EMPTY; TLB_ALLOC]),
            read_base: base(CTX_UNTRANSLATED, READ),
            write_base: base(CTX_UNTRANSLATED, WRITE),
        }
    }
}

fn base(ctx: usize, kind: usize) -> usize {
    (ctx * 3 + kind) * TLB_SIZE
}

/// Index of `vpn` in the sub-array starting at `base`.
#[inline(always)]
fn slot(base: usize, vpn: u64) -> usize {
    (base + (vpn as usize & (TLB_SIZE - 1))) & (TLB_ALLOC - 1)
}

fn fault(kind: usize, page: bool, va: u64) -> Trap {
    let c = match (kind, page) {
        (READ, true) => cause::LOAD_PAGE,
        (WRITE, true) => cause::STORE_PAGE,
        (_, true) => cause::FETCH_PAGE,
        (READ, false) => cause::LOAD_ACCESS,
        (WRITE, false) => cause::STORE_ACCESS,
        _ => cause::FETCH_ACCESS,
    };
    Trap::new(c, va)
}

const PTE_V: u64 = 1;
const PTE_R: u64 = 2;
const PTE_W: u64 = 4;
const PTE_X: u64 = 8;
const PTE_U: u64 = 16;
const PTE_A: u64 = 64;
const PTE_D: u64 = 128;

impl Hart {
    /// Effective privilege of data accesses (MPRV applies MPP in M-mode).
    fn data_prv(&self) -> u8 {
        if self.prv == PRV_M && self.csr.mstatus & MSTATUS_MPRV != 0 {
            ((self.csr.mstatus >> 11) & 3) as u8
        } else {
            self.prv
        }
    }

    fn ctx_of(&self, prv: u8) -> usize {
        if prv == PRV_M || self.csr.satp >> 60 == SATP_MODE_BARE {
            CTX_UNTRANSLATED
        } else if prv == PRV_U {
            0
        } else if self.csr.mstatus & MSTATUS_SUM != 0 {
            2
        } else {
            1
        }
    }

    /// Recomputes the data context after a change of privilege, MPRV/MPP, SUM or satp.
    pub(crate) fn update_data_ctx(&mut self) {
        let ctx = self.ctx_of(self.data_prv());
        self.tlb.read_base = base(ctx, READ);
        self.tlb.write_base = base(ctx, WRITE);
    }

    pub(crate) fn flush_tlb(&mut self) {
        self.counters.bump(Ev::TlbFlushAll);
        self.tlb.entries.fill(EMPTY);
        self.icache.forget_fetch();
        self.update_data_ctx();
    }

    /// Drops every write entry (a dirty-log harvest): the next store to each page misses,
    /// refills and marks the page again.
    pub(crate) fn drop_write_entries(&mut self) {
        for ctx in 0..4 {
            let b = base(ctx, WRITE);
            self.tlb.entries[b..b + TLB_SIZE].fill(EMPTY);
        }
    }

    /// sfence.vma for one virtual address.
    pub(crate) fn flush_tlb_page(&mut self, va: u64) {
        self.counters.bump(Ev::TlbFlushPage);
        let vpn = va >> 12;
        for b in 0..12 {
            let e = &mut self.tlb.entries[slot(b * TLB_SIZE, vpn)];
            if e.tag == vpn {
                *e = EMPTY;
            }
        }
        self.icache.forget_fetch();
    }

    /// Translates `va` for an access of `kind` at privilege `prv`, walking the page table.
    pub(crate) fn translate(&mut self, va: u64, kind: usize, prv: u8) -> Result<u64, Trap> {
        let satp = self.csr.satp;
        let mode = satp >> 60;
        if prv == PRV_M || mode == SATP_MODE_BARE {
            return Ok(va);
        }
        self.counters.bump(if kind == EXEC {
            Ev::WalksFetch
        } else {
            Ev::Walks
        });
        let levels: u32 = if mode == SATP_MODE_SV48 { 4 } else { 3 };
        let va_bits = 12 + 9 * levels;
        // The address must be sign-extended from its top translated bit.
        let top = (va as i64) >> (va_bits - 1);
        if top != 0 && top != -1 {
            return Err(fault(kind, true, va));
        }
        let mstatus = self.csr.mstatus;
        'walk: loop {
            let mut table = (satp & ((1 << 44) - 1)) << 12;
            for level in (0..levels).rev() {
                let vpn_i = (va >> (12 + 9 * level)) & 0x1ff;
                let pte_addr = table + vpn_i * 8;
                let Some(host) = self.shared.ram.host_ptr(pte_addr, 8) else {
                    return Err(fault(kind, false, va));
                };
                // SAFETY: `host` points at 8 aligned bytes inside guest RAM (checked above;
                // table and index are multiples of 8).
                let pte_atomic = unsafe { AtomicU64::from_ptr(host.cast()) };
                let pte = pte_atomic.load(Ordering::Acquire);
                if pte & PTE_V == 0 || (pte & PTE_R == 0 && pte & PTE_W != 0) || pte >> 54 != 0 {
                    return Err(fault(kind, true, va));
                }
                let ppn = (pte >> 10) & ((1 << 44) - 1);
                if pte & (PTE_R | PTE_X) == 0 {
                    if level == 0 {
                        return Err(fault(kind, true, va));
                    }
                    table = ppn << 12;
                    continue;
                }
                // Leaf: permissions.
                if prv == PRV_U && pte & PTE_U == 0 {
                    return Err(fault(kind, true, va));
                }
                if prv == PRV_S && pte & PTE_U != 0 && (kind == EXEC || mstatus & MSTATUS_SUM == 0)
                {
                    return Err(fault(kind, true, va));
                }
                let ok = match kind {
                    READ => pte & PTE_R != 0 || (mstatus & MSTATUS_MXR != 0 && pte & PTE_X != 0),
                    WRITE => pte & PTE_W != 0,
                    _ => pte & PTE_X != 0,
                };
                if !ok {
                    return Err(fault(kind, true, va));
                }
                let low_mask = (1u64 << (9 * level)) - 1;
                if ppn & low_mask != 0 {
                    return Err(fault(kind, true, va)); // misaligned superpage
                }
                let need = PTE_A | if kind == WRITE { PTE_D } else { 0 };
                if pte & need != need {
                    if pte_atomic
                        .compare_exchange(pte, pte | need, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                    {
                        continue 'walk; // the PTE changed under us: walk again
                    }
                    self.shared.ram.mark_dirty(pte_addr);
                }
                let page = (ppn & !low_mask) | ((va >> 12) & low_mask);
                return Ok((page << 12) | (va & 0xfff));
            }
            return Err(fault(kind, true, va));
        }
    }

    /// Translates and caches the page in the TLB when it is RAM.
    fn translate_fill(&mut self, va: u64, kind: usize, prv: u8) -> Result<u64, Trap> {
        let pa = self.translate(va, kind, prv)?;
        let page = pa & !0xfff;
        if let Some(host) = self.shared.ram.host_ptr(page, 4096) {
            if kind == WRITE {
                // Before the entry exists: stores through it are covered (see `dirty`).
                self.shared.ram.mark_dirty(page);
            }
            let b = base(self.ctx_of(prv), kind);
            let vpn = va >> 12;
            self.tlb.entries[slot(b, vpn)] = TlbEntry {
                tag: vpn,
                host: host as usize,
                pa: page,
            };
        }
        Ok(pa)
    }

    /// Loads `size` bytes at virtual `va` (zero-extended).
    #[inline(always)]
    pub(crate) fn load(&mut self, va: u64, size: u64) -> Result<u64, Trap> {
        let vpn = va >> 12;
        let off = va & 0xfff;
        let e = self.tlb.entries[slot(self.tlb.read_base, vpn)];
        if e.tag == vpn && off + size <= 4096 {
            // SAFETY: cached entries only exist for whole RAM pages, and off+size <= 4096.
            return Ok(unsafe { memory::load((e.host + off as usize) as *mut u8, size) });
        }
        self.load_slow(va, size)
    }

    #[inline(never)]
    fn load_slow(&mut self, va: u64, size: u64) -> Result<u64, Trap> {
        self.counters.bump(Ev::LoadSlow);
        if (va & 0xfff) + size > 4096 {
            // Misaligned across a page: byte by byte so each page faults with its own address.
            let mut v = 0;
            for i in 0..size {
                v |= self.load(va.wrapping_add(i), 1)? << (8 * i);
            }
            return Ok(v);
        }
        let prv = self.data_prv();
        let pa = self.translate_fill(va, READ, prv)?;
        if let Some(v) = self.shared.ram.read(pa, size) {
            return Ok(v);
        }
        if pa & (size - 1) == 0
            && let Some(v) = self.bus.read(pa, size)
        {
            self.counters.bump(Ev::MmioReads);
            return Ok(v);
        }
        Err(fault(READ, false, va))
    }

    /// Stores the low `size` bytes of `v` at virtual `va`.
    #[inline(always)]
    pub(crate) fn store(&mut self, va: u64, size: u64, v: u64) -> Result<(), Trap> {
        let vpn = va >> 12;
        let off = va & 0xfff;
        let e = self.tlb.entries[slot(self.tlb.write_base, vpn)];
        if e.tag == vpn && off + size <= 4096 {
            // SAFETY: cached entries only exist for whole RAM pages, and off+size <= 4096.
            unsafe { memory::store((e.host + off as usize) as *mut u8, size, v) };
            self.note_write(e.pa);
            return Ok(());
        }
        self.store_slow(va, size, v)
    }

    #[inline(never)]
    fn store_slow(&mut self, va: u64, size: u64, v: u64) -> Result<(), Trap> {
        self.counters.bump(Ev::StoreSlow);
        if (va & 0xfff) + size > 4096 {
            // Check both translations first so a page fault leaves memory unchanged (an
            // access fault on the second page may leave the first part written).
            let prv = self.data_prv();
            self.translate(va, WRITE, prv)?;
            self.translate(va.wrapping_add(size - 1), WRITE, prv)?;
            for i in 0..size {
                self.store(va.wrapping_add(i), 1, v >> (8 * i))?;
            }
            return Ok(());
        }
        let prv = self.data_prv();
        let pa = self.translate_fill(va, WRITE, prv)?;
        if self.shared.ram.write(pa, size, v) {
            self.note_write(pa & !0xfff);
            return Ok(());
        }
        if pa & (size - 1) == 0 && self.bus.write(pa, size, v) {
            self.counters.bump(Ev::MmioWrites);
            return Ok(());
        }
        Err(fault(WRITE, false, va))
    }

    /// Invalidates decoded instructions of the RAM page at `pa` if any hart holds some.
    #[inline(always)]
    pub(crate) fn note_write(&mut self, pa: u64) {
        let idx = ((pa - RAM_BASE) >> 12) as usize;
        if let Some(flag) = self.shared.code_pages.get(idx)
            && flag.load(Ordering::Relaxed) & CODE_FLAG != 0
        {
            self.code_page_written(idx);
        }
    }

    #[inline(never)]
    fn code_page_written(&mut self, idx: usize) {
        self.counters.bump(Ev::CodePageWrites);
        let flag = &self.shared.code_pages[idx];
        let cur = flag.load(Ordering::Acquire);
        if cur & CODE_FLAG != 0
            && flag
                .compare_exchange(
                    cur,
                    (cur.wrapping_add(1)) & !CODE_FLAG,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            self.shared.code_epoch.fetch_add(1, Ordering::Release);
        }
        self.break_slice = true;
    }

    /// Host address for an atomic access (AMO, LR, SC): must be naturally aligned RAM.
    pub(crate) fn atomic_host(
        &mut self,
        va: u64,
        size: u64,
        kind: usize,
    ) -> Result<(*mut u8, u64), Trap> {
        if va & (size - 1) != 0 {
            let c = if kind == READ {
                cause::MISALIGNED_LOAD
            } else {
                cause::MISALIGNED_STORE
            };
            return Err(Trap::new(c, va));
        }
        // Aligned and at most 8 bytes: the access lies in one page, so a TLB hit suffices.
        let b = if kind == READ {
            self.tlb.read_base
        } else {
            self.tlb.write_base
        };
        let vpn = va >> 12;
        let e = self.tlb.entries[slot(b, vpn)];
        let off = va & 0xfff;
        if e.tag == vpn {
            return Ok(((e.host + off as usize) as *mut u8, e.pa | off));
        }
        let prv = self.data_prv();
        let pa = self.translate_fill(va, kind, prv)?;
        match self.shared.ram.host_ptr(pa, size) {
            Some(p) => Ok((p, pa)),
            None => Err(fault(kind, false, va)),
        }
    }

    /// Physical address of the instruction page containing `pc`, translated for execution.
    pub(crate) fn translate_fetch(&mut self, pc: u64) -> Result<(u64, usize), Trap> {
        let vpn = pc >> 12;
        let ctx = self.ctx_of(self.prv);
        let i = slot(base(ctx, EXEC), vpn);
        let e = self.tlb.entries[i];
        if e.tag == vpn {
            return Ok((e.pa, e.host));
        }
        let pa = self.translate(pc, EXEC, self.prv)?;
        let page = pa & !0xfff;
        match self.shared.ram.host_ptr(page, 4096) {
            Some(host) => {
                self.tlb.entries[i] = TlbEntry {
                    tag: vpn,
                    host: host as usize,
                    pa: page,
                };
                Ok((page, host as usize))
            }
            None => Err(Trap::new(cause::FETCH_ACCESS, pc)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hart::tests_support::hart;

    /// Builds an Sv39 table mapping `va` -> `pa` with `flags` at `level` (0 = 4 KiB).
    fn map(h: &Hart, root: u64, va: u64, pa: u64, flags: u64, level: u32) {
        let ram = &h.shared.ram;
        let mut table = root;
        for l in (level + 1..3).rev() {
            let idx = (va >> (12 + 9 * l)) & 0x1ff;
            let pte_addr = table + idx * 8;
            let pte = ram.read(pte_addr, 8).unwrap();
            if pte & PTE_V == 0 {
                let next = root + 0x1000 * (3 - l as u64);
                assert!(ram.write(pte_addr, 8, (next >> 12) << 10 | PTE_V));
                table = next;
            } else {
                table = (pte >> 10) << 12;
            }
        }
        let idx = (va >> (12 + 9 * level)) & 0x1ff;
        assert!(ram.write(table + idx * 8, 8, (pa >> 12) << 10 | flags | PTE_V));
    }

    fn sv39(h: &mut Hart, root: u64) {
        h.csr.satp = (SATP_MODE_SV39 << 60) | (root >> 12);
        h.flush_tlb();
    }

    const ROOT: u64 = RAM_BASE + 0x10_0000;

    #[test]
    fn sv39_translation_and_ad_bits() {
        let mut h = hart();
        sv39(&mut h, ROOT);
        h.set_prv(PRV_S);
        let va = 0xffff_ffc0_0000_3000u64;
        map(&h, ROOT, va, RAM_BASE + 0x5000, PTE_R | PTE_W, 0);
        h.store(va + 8, 8, 0xdead).unwrap();
        assert_eq!(h.shared.ram.read(RAM_BASE + 0x5008, 8), Some(0xdead));
        assert_eq!(h.load(va + 8, 8), Ok(0xdead));
        // A and D were set by the walker.
        let l0 = h.translate(va, READ, PRV_S).unwrap();
        assert_eq!(l0, RAM_BASE + 0x5000);
        // Not canonical -> page fault with the address in tval.
        assert_eq!(
            h.load(0x0000_0040_0000_0000, 8),
            Err(Trap::new(cause::LOAD_PAGE, 0x0000_0040_0000_0000))
        );
        // Unmapped -> page faults of the right kind.
        assert_eq!(
            h.load(va + 0x1000, 4),
            Err(Trap::new(cause::LOAD_PAGE, va + 0x1000))
        );
        assert_eq!(
            h.store(va + 0x1004, 4, 0),
            Err(Trap::new(cause::STORE_PAGE, va + 0x1004))
        );
        assert_eq!(
            h.translate_fetch(va).err(),
            Some(Trap::new(cause::FETCH_PAGE, va))
        );
    }

    #[test]
    fn permission_checks_user_sum_mxr() {
        let mut h = hart();
        sv39(&mut h, ROOT);
        let uva = 0x4000u64;
        map(&h, ROOT, uva, RAM_BASE + 0x6000, PTE_R | PTE_U, 0);
        let xva = 0x8000u64;
        map(&h, ROOT, xva, RAM_BASE + 0x7000, PTE_X, 0);
        h.set_prv(PRV_U);
        assert!(h.load(uva, 8).is_ok());
        assert_eq!(h.store(uva, 8, 1), Err(Trap::new(cause::STORE_PAGE, uva)));
        h.set_prv(PRV_S);
        assert_eq!(
            h.load(uva, 8),
            Err(Trap::new(cause::LOAD_PAGE, uva)),
            "S without SUM"
        );
        h.csr_write(num::SSTATUS, MSTATUS_SUM).unwrap();
        assert!(h.load(uva, 8).is_ok(), "S with SUM");
        assert_eq!(
            h.load(xva, 8),
            Err(Trap::new(cause::LOAD_PAGE, xva)),
            "execute-only"
        );
        h.csr_write(num::SSTATUS, MSTATUS_SUM | MSTATUS_MXR)
            .unwrap();
        assert!(h.load(xva, 8).is_ok(), "MXR makes X readable");
        // M-mode with MPRV and MPP=S translates data accesses.
        h.set_prv(PRV_M);
        h.csr.mstatus = (h.csr.mstatus & !MSTATUS_MPP) | (1 << 11) | MSTATUS_MPRV;
        h.update_data_ctx();
        assert!(h.load(uva, 8).is_ok());
        assert_eq!(h.load(0x9000, 8), Err(Trap::new(cause::LOAD_PAGE, 0x9000)));
        h.csr.mstatus &= !MSTATUS_MPRV;
        h.update_data_ctx();
        assert_eq!(
            h.load(0x9000, 8),
            Err(Trap::new(cause::LOAD_ACCESS, 0x9000)),
            "physical, not RAM"
        );
    }

    #[test]
    fn superpages_and_sv48() {
        let mut h = hart();
        sv39(&mut h, ROOT);
        h.set_prv(PRV_S);
        // 2 MiB megapage.
        let va = 0x4020_0000u64;
        map(&h, ROOT, va, RAM_BASE + 0x20_0000, PTE_R | PTE_W, 1);
        h.store((va + 0x1_2345) & !7, 8, 7).unwrap();
        assert_eq!(h.shared.ram.read(RAM_BASE + 0x21_2340, 8), Some(7));
        // Misaligned megapage -> page fault.
        map(&h, ROOT, 0x4040_0000, RAM_BASE + 0x1000, PTE_R, 1);
        assert_eq!(
            h.load(0x4040_0000, 8),
            Err(Trap::new(cause::LOAD_PAGE, 0x4040_0000))
        );
        // Sv48: a 4-level walk; with an empty root everything faults.
        let root48 = RAM_BASE + 0x40_0000;
        h.csr.satp = (SATP_MODE_SV48 << 60) | (root48 >> 12);
        h.flush_tlb();
        assert_eq!(h.load(0x1000, 8), Err(Trap::new(cause::LOAD_PAGE, 0x1000)));
        // Map through 4 levels by hand: L3 -> L2 -> L1 -> L0.
        let ram = &h.shared.ram;
        let (l2, l1, l0) = (root48 + 0x1000, root48 + 0x2000, root48 + 0x3000);
        let va = 0x0000_4000_0000_1000u64;
        assert!(ram.write(
            root48 + ((va >> 39) & 0x1ff) * 8,
            8,
            (l2 >> 12) << 10 | PTE_V
        ));
        assert!(ram.write(l2 + ((va >> 30) & 0x1ff) * 8, 8, (l1 >> 12) << 10 | PTE_V));
        assert!(ram.write(l1 + ((va >> 21) & 0x1ff) * 8, 8, (l0 >> 12) << 10 | PTE_V));
        assert!(ram.write(
            l0 + ((va >> 12) & 0x1ff) * 8,
            8,
            ((RAM_BASE + 0x9000) >> 12) << 10 | PTE_V | PTE_R
        ));
        assert!(h.shared.ram.write(RAM_BASE + 0x9010, 8, 42));
        assert_eq!(h.load(va + 0x10, 8), Ok(42));
    }

    #[test]
    fn misaligned_and_out_of_ram_accesses() {
        let mut h = hart();
        // Misaligned accesses are performed (documented choice), also across pages.
        h.store(RAM_BASE + 0xffd, 8, 0x0102_0304_0506_0708).unwrap();
        assert_eq!(h.load(RAM_BASE + 0xffd, 8), Ok(0x0102_0304_0506_0708));
        assert_eq!(h.load(RAM_BASE + 0xfff, 2), Ok(0x0506));
        // Beyond RAM and outside any device: access fault, never host memory.
        let end = RAM_BASE + h.shared.ram.size();
        assert_eq!(h.load(end, 1), Err(Trap::new(cause::LOAD_ACCESS, end)));
        assert_eq!(
            h.store(end - 4, 8, 0),
            Err(Trap::new(cause::STORE_ACCESS, end))
        );
        assert_eq!(
            h.load(u64::MAX - 3, 8),
            Err(Trap::new(cause::LOAD_ACCESS, u64::MAX - 3))
        );
        // Atomics must be aligned.
        assert_eq!(
            h.atomic_host(RAM_BASE + 4, 8, WRITE).err(),
            Some(Trap::new(cause::MISALIGNED_STORE, RAM_BASE + 4))
        );
        assert_eq!(
            h.atomic_host(RAM_BASE + 2, 4, READ).err(),
            Some(Trap::new(cause::MISALIGNED_LOAD, RAM_BASE + 2))
        );
    }
}
