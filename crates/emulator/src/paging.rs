//! Linear-to-guest-physical translation by walking the guest's own page tables, with the
//! permission checks the hardware would make (present, write, user, NX, SMEP, SMAP) and the
//! accessed/dirty updates it would perform. Supports no paging, 32-bit (with PSE), PAE, 4-level
//! and 5-level (CR4.LA57) paging.
//!
//! The walk reads the tables from guest memory at the time of the exit, as the CPU's own walk
//! would (the TLB may hold older entries; the guest must flush after changing a mapping, so a
//! fresh walk is never less correct than the CPU).

use crate::cpu::{CpuState, bits};
use crate::error::{Exception, Stop};
use crate::mem::GuestPhysMemory;

const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;
const PTE_XD: u64 = 1 << 63;
/// Physical address bits 12..=51 of an entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

const PFEC_P: u32 = 1 << 0;
const PFEC_W: u32 = 1 << 1;
const PFEC_U: u32 = 1 << 2;
const PFEC_RSVD: u32 = 1 << 3;
const PFEC_ID: u32 = 1 << 4;

/// How many times a walk is restarted when another vCPU changes an entry under it while the
/// accessed/dirty bits are being set; after that the translation is used without the update.
const MAX_AD_RETRIES: usize = 16;

pub(crate) const PAGE_SIZE: u64 = 4096;

/// The kind of access being translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AccessKind {
    Read,
    Write,
    Fetch,
}

/// The control state a walk depends on, captured once per instruction.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Paging {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cpl: u8,
    pub rflags: u64,
}

/// One entry seen during a walk: where it lives, its value and its width in bytes.
#[derive(Clone, Copy)]
struct Seen {
    gpa: u64,
    value: u64,
    wide: bool,
}

impl Paging {
    pub fn capture(cpu: &dyn CpuState) -> Self {
        Paging {
            cr0: cpu.cr0(),
            cr3: cpu.cr3(),
            cr4: cpu.cr4(),
            efer: cpu.efer(),
            cpl: cpu.cpl(),
            rflags: cpu.rflags(),
        }
    }

    fn long_mode(&self) -> bool {
        self.efer & bits::EFER_LMA != 0
    }

    /// Linear addresses are 32-bit outside long mode (and in compatibility mode the segment
    /// arithmetic already truncates), so the translation masks them accordingly.
    fn linear_mask(&self) -> u64 {
        if self.long_mode() {
            u64::MAX
        } else {
            0xffff_ffff
        }
    }

    /// Translates the byte at `linear` for an access of `kind`.
    pub fn translate(
        &self,
        mem: &mut dyn GuestPhysMemory,
        linear: u64,
        kind: AccessKind,
    ) -> Result<u64, Stop> {
        let linear = linear & self.linear_mask();
        if self.cr0 & bits::CR0_PG == 0 {
            return Ok(linear);
        }
        for _ in 0..MAX_AD_RETRIES {
            let (gpa, path, n) = self.walk(mem, linear, kind)?;
            if self.set_accessed_dirty(mem, &path[..n], kind)? {
                return Ok(gpa);
            }
        }
        // Entries kept changing under us; the permission checks passed on the last walk.
        let (gpa, _, _) = self.walk(mem, linear, kind)?;
        Ok(gpa)
    }

    /// Walks the tables; returns the physical address and the entries visited (root first).
    fn walk(
        &self,
        mem: &mut dyn GuestPhysMemory,
        linear: u64,
        kind: AccessKind,
    ) -> Result<(u64, [Seen; 5], usize), Stop> {
        let mut path = [Seen {
            gpa: 0,
            value: 0,
            wide: true,
        }; 5];
        let mut n = 0;
        let nxe = self.efer & bits::EFER_NXE != 0;
        let user = self.cpl == 3;
        let pfec_base = {
            let mut c = 0;
            if kind == AccessKind::Write {
                c |= PFEC_W;
            }
            if user {
                c |= PFEC_U;
            }
            if kind == AccessKind::Fetch && (nxe || self.cr4 & bits::CR4_SMEP != 0) {
                c |= PFEC_ID;
            }
            c
        };
        let not_present = || Stop::Exception(Exception::pf(linear, pfec_base));
        let reserved = || Stop::Exception(Exception::pf(linear, pfec_base | PFEC_P | PFEC_RSVD));

        // (table base, level count, bits per level, entry width) per paging mode.
        let (mut table, levels, wide) = if self.long_mode() {
            let levels = if self.cr4 & bits::CR4_LA57 != 0 { 5 } else { 4 };
            (self.cr3 & ADDR_MASK, levels, true)
        } else if self.cr4 & bits::CR4_PAE != 0 {
            // The CPU caches the four PDPTEs at CR3 load; reading them now is the best we can
            // do without KVM's copy, and equals it unless the guest changed them without
            // reloading CR3 (which it must not rely on).
            let pdpte_gpa = (self.cr3 & 0xffff_ffe0) + ((linear >> 30) & 3) * 8;
            let pdpte = read_entry(mem, pdpte_gpa, true)?;
            if pdpte & PTE_P == 0 {
                return Err(not_present());
            }
            if pdpte & (PTE_RW | PTE_US | PTE_XD | 0x1e0) != 0 {
                return Err(reserved());
            }
            (pdpte & ADDR_MASK, 2, true)
        } else {
            (self.cr3 & 0xffff_f000, 2, false)
        };

        let mut user_ok = true;
        let mut write_ok = true;
        let mut exec_ok = true;
        let mut level = levels;
        let (bits_per_level, entry_size): (u32, u64) = if wide { (9, 8) } else { (10, 4) };
        let (leaf, page_bits) = loop {
            let shift = 12 + bits_per_level * (level - 1);
            let index = (linear >> shift) & ((1 << bits_per_level) - 1);
            let gpa = table + index * entry_size;
            let e = read_entry(mem, gpa, wide)?;
            if e & PTE_P == 0 {
                return Err(not_present());
            }
            if wide && !nxe && e & PTE_XD != 0 {
                return Err(reserved());
            }
            path[n] = Seen {
                gpa,
                value: e,
                wide,
            };
            n += 1;
            user_ok &= e & PTE_US != 0;
            write_ok &= e & PTE_RW != 0;
            exec_ok &= !(nxe && e & PTE_XD != 0);
            let large_allowed = if wide {
                level == 2 || (level == 3 && self.long_mode())
            } else {
                level == 2 && self.cr4 & bits::CR4_PSE != 0
            };
            if level == 1 || (e & PTE_PS != 0 && large_allowed) {
                break (e, shift);
            }
            if e & PTE_PS != 0 && wide && level > 3 {
                return Err(reserved());
            }
            table = if wide { e & ADDR_MASK } else { e & 0xffff_f000 };
            level -= 1;
        };

        let protection = || Stop::Exception(Exception::pf(linear, pfec_base | PFEC_P));
        if user && !user_ok {
            return Err(protection());
        }
        match kind {
            AccessKind::Write => {
                if !write_ok && (user || self.cr0 & bits::CR0_WP != 0) {
                    return Err(protection());
                }
            }
            AccessKind::Fetch => {
                if !exec_ok || (!user && user_ok && self.cr4 & bits::CR4_SMEP != 0) {
                    return Err(protection());
                }
            }
            AccessKind::Read => {}
        }
        if kind != AccessKind::Fetch
            && !user
            && user_ok
            && self.cr4 & bits::CR4_SMAP != 0
            && self.rflags & bits::RFLAGS_AC == 0
        {
            return Err(protection());
        }

        let offset_mask = (1u64 << page_bits) - 1;
        let base = if !wide && page_bits == 22 {
            // PSE-36: bits 13..=20 of a 4 MiB PDE hold physical bits 32..=39.
            (leaf & 0xffc0_0000) | ((leaf >> 13) & 0xff) << 32
        } else if wide {
            leaf & ADDR_MASK & !offset_mask
        } else {
            leaf & 0xffff_f000
        };
        Ok((base | (linear & offset_mask), path, n))
    }

    /// Sets accessed bits on the path and the dirty bit on the leaf for writes, atomically.
    /// Returns `false` if an entry changed under us (the caller walks again).
    fn set_accessed_dirty(
        &self,
        mem: &mut dyn GuestPhysMemory,
        path: &[Seen],
        kind: AccessKind,
    ) -> Result<bool, Stop> {
        for (i, s) in path.iter().enumerate() {
            let mut want = s.value | PTE_A;
            if i + 1 == path.len() && kind == AccessKind::Write {
                want |= PTE_D;
            }
            if want == s.value {
                continue;
            }
            if !update_entry(mem, s, want)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

fn not_ram(what: &'static str, gpa: u64, len: usize, source: crate::MemError) -> Stop {
    Stop::NotRam {
        what,
        gpa,
        len,
        source,
    }
}

fn read_entry(mem: &mut dyn GuestPhysMemory, gpa: u64, wide: bool) -> Result<u64, Stop> {
    if wide {
        let mut b = [0u8; 8];
        mem.read(gpa, &mut b)
            .map_err(|e| not_ram("page-table walk", gpa, 8, e))?;
        Ok(u64::from_le_bytes(b))
    } else {
        let mut b = [0u8; 4];
        mem.read(gpa, &mut b)
            .map_err(|e| not_ram("page-table walk", gpa, 4, e))?;
        Ok(u64::from(u32::from_le_bytes(b)))
    }
}

/// Compare-exchanges one entry from `s.value` to `want`; 4-byte entries go through the
/// 8-byte aligned word that contains them (same page, since tables are page-aligned).
fn update_entry(mem: &mut dyn GuestPhysMemory, s: &Seen, want: u64) -> Result<bool, Stop> {
    if s.wide {
        let found = mem
            .compare_exchange_u64(s.gpa, s.value, want)
            .map_err(|e| not_ram("page-table update", s.gpa, 8, e))?;
        return Ok(found == s.value);
    }
    let word = s.gpa & !7;
    let shift = (s.gpa & 4) * 8;
    let mut b = [0u8; 8];
    mem.read(word, &mut b)
        .map_err(|e| not_ram("page-table update", word, 8, e))?;
    let cur = u64::from_le_bytes(b);
    if (cur >> shift) & 0xffff_ffff != s.value {
        return Ok(false);
    }
    let new = (cur & !(0xffff_ffffu64 << shift)) | (want << shift);
    let found = mem
        .compare_exchange_u64(word, cur, new)
        .map_err(|e| not_ram("page-table update", word, 8, e))?;
    Ok(found == cur)
}

/// A linear range split at page boundaries into at most two guest-physical pieces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pieces {
    pub first: (u64, usize),
    pub second: Option<(u64, usize)>,
}

impl Paging {
    /// Translates `len` (1..=4096) bytes at `linear`, checking both pages before any access so
    /// that a fault on the second page leaves memory untouched.
    pub fn translate_range(
        &self,
        mem: &mut dyn GuestPhysMemory,
        linear: u64,
        len: usize,
        kind: AccessKind,
    ) -> Result<Pieces, Stop> {
        let in_page = (PAGE_SIZE - (linear & (PAGE_SIZE - 1))) as usize;
        let first_len = len.min(in_page);
        let first = (self.translate(mem, linear, kind)?, first_len);
        let second = if first_len < len {
            let next = linear.wrapping_add(first_len as u64);
            Some((self.translate(mem, next, kind)?, len - first_len))
        } else {
            None
        };
        Ok(Pieces { first, second })
    }

    pub fn read(
        &self,
        mem: &mut dyn GuestPhysMemory,
        linear: u64,
        buf: &mut [u8],
        kind: AccessKind,
    ) -> Result<(), Stop> {
        let p = self.translate_range(mem, linear, buf.len(), kind)?;
        let what = if kind == AccessKind::Fetch {
            "instruction fetch"
        } else {
            "memory read"
        };
        let (a, b) = buf.split_at_mut(p.first.1);
        mem.read(p.first.0, a)
            .map_err(|e| not_ram(what, p.first.0, a.len(), e))?;
        if let Some((gpa, _)) = p.second {
            mem.read(gpa, b)
                .map_err(|e| not_ram(what, gpa, b.len(), e))?;
        }
        Ok(())
    }

    pub fn write(
        &self,
        mem: &mut dyn GuestPhysMemory,
        linear: u64,
        buf: &[u8],
    ) -> Result<(), Stop> {
        let p = self.translate_range(mem, linear, buf.len(), AccessKind::Write)?;
        let (a, b) = buf.split_at(p.first.1);
        mem.write(p.first.0, a)
            .map_err(|e| not_ram("memory write", p.first.0, a.len(), e))?;
        if let Some((gpa, _)) = p.second {
            mem.write(gpa, b)
                .map_err(|e| not_ram("memory write", gpa, b.len(), e))?;
        }
        Ok(())
    }
}
