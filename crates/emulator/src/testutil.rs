//! Test fixtures: guest RAM in a `Vec`, a vCPU register file, and a page-table builder for
//! every paging mode the completer walks.

use std::cell::Cell;

use crate::cpu::{CpuState, Gpr, Seg, Segment, bits};
use crate::mem::{GuestPhysMemory, MemError};

/// Guest RAM at guest-physical 0..len; counts every request that fell outside it.
pub(crate) struct TestMem {
    pub bytes: Vec<u8>,
    pub out_of_range: Cell<u64>,
}

impl TestMem {
    pub fn new(len: usize) -> Self {
        TestMem {
            bytes: vec![0; len],
            out_of_range: Cell::new(0),
        }
    }

    fn range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, MemError> {
        let start = usize::try_from(gpa).ok();
        let r = start.and_then(|s| s.checked_add(len).map(|e| s..e));
        match r {
            Some(r) if r.end <= self.bytes.len() => Ok(r),
            _ => {
                self.out_of_range.set(self.out_of_range.get() + 1);
                Err(MemError::NotRam { gpa, len })
            }
        }
    }

    pub fn put(&mut self, gpa: u64, data: &[u8]) {
        let s = gpa as usize;
        self.bytes[s..s + data.len()].copy_from_slice(data);
    }

    pub fn u64_at(&self, gpa: u64) -> u64 {
        let s = gpa as usize;
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.bytes[s..s + 8]);
        u64::from_le_bytes(b)
    }

    pub fn put_u64(&mut self, gpa: u64, v: u64) {
        self.put(gpa, &v.to_le_bytes());
    }
}

impl GuestPhysMemory for TestMem {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let r = self.range(gpa, buf.len())?;
        buf.copy_from_slice(&self.bytes[r]);
        Ok(())
    }

    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        let r = self.range(gpa, buf.len())?;
        self.bytes[r].copy_from_slice(buf);
        Ok(())
    }

    fn compare_exchange_u64(&mut self, gpa: u64, expected: u64, new: u64) -> Result<u64, MemError> {
        if gpa % 8 != 0 {
            return Err(MemError::Unaligned { gpa, len: 8 });
        }
        let r = self.range(gpa, 8)?;
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.bytes[r.clone()]);
        let cur = u64::from_le_bytes(b);
        if cur == expected {
            self.bytes[r].copy_from_slice(&new.to_le_bytes());
        }
        Ok(cur)
    }

    fn compare_exchange_u128(
        &mut self,
        gpa: u64,
        expected: u128,
        new: u128,
    ) -> Result<u128, MemError> {
        if gpa % 16 != 0 {
            return Err(MemError::Unaligned { gpa, len: 16 });
        }
        let r = self.range(gpa, 16)?;
        let mut b = [0u8; 16];
        b.copy_from_slice(&self.bytes[r.clone()]);
        let cur = u128::from_le_bytes(b);
        if cur == expected {
            self.bytes[r].copy_from_slice(&new.to_le_bytes());
        }
        Ok(cur)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct TestCpu {
    pub gprs: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cpl: u8,
    pub segs: [Segment; 6],
}

fn seg_index(s: Seg) -> usize {
    s as usize
}

/// A present, writable, accessed data segment with base 0 and a 4 GiB limit.
pub(crate) fn flat_data(db: bool) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x18,
        type_: 3,
        s: true,
        dpl: 0,
        present: true,
        db,
        long: false,
        g: true,
        unusable: false,
    }
}

impl TestCpu {
    /// 64-bit mode, 4-level paging with NX, WP, CPL 0.
    pub fn long64(cr3: u64) -> Self {
        let mut cs = flat_data(false);
        cs.type_ = 0xb;
        cs.long = true;
        cs.selector = 0x10;
        let mut segs = [flat_data(true); 6];
        segs[seg_index(Seg::Cs)] = cs;
        TestCpu {
            gprs: [0; 16],
            rip: 0,
            rflags: 0x2,
            cr0: bits::CR0_PE | bits::CR0_PG | bits::CR0_WP | 0x10,
            cr3,
            cr4: bits::CR4_PAE,
            efer: (1 << 8) | bits::EFER_LMA | bits::EFER_NXE,
            cpl: 0,
            segs,
        }
    }

    /// 32-bit protected mode with flat segments; paging enabled if `cr3` is given.
    pub fn prot32(paging: Option<(u64, u64)>) -> Self {
        let mut cs = flat_data(true);
        cs.type_ = 0xb;
        cs.selector = 0x08;
        let mut segs = [flat_data(true); 6];
        segs[seg_index(Seg::Cs)] = cs;
        let (cr0, cr3, cr4) = match paging {
            Some((cr3, cr4)) => (bits::CR0_PE | bits::CR0_PG | bits::CR0_WP, cr3, cr4),
            None => (bits::CR0_PE, 0, 0),
        };
        TestCpu {
            gprs: [0; 16],
            rip: 0,
            rflags: 0x2,
            cr0,
            cr3,
            cr4,
            efer: 0,
            cpl: 0,
            segs,
        }
    }

    /// Real mode: 64 KiB segments with base = selector * 16.
    pub fn real() -> Self {
        let seg = Segment {
            base: 0,
            limit: 0xffff,
            selector: 0,
            type_: 3,
            s: true,
            dpl: 0,
            present: true,
            db: false,
            long: false,
            g: false,
            unusable: false,
        };
        TestCpu {
            gprs: [0; 16],
            rip: 0,
            rflags: 0x2,
            cr0: 0x10,
            cr3: 0,
            cr4: 0,
            efer: 0,
            cpl: 0,
            segs: [seg; 6],
        }
    }

    pub fn seg_mut(&mut self, s: Seg) -> &mut Segment {
        &mut self.segs[seg_index(s)]
    }
}

impl CpuState for TestCpu {
    fn vcpu_index(&self) -> u32 {
        0
    }
    fn gpr(&self, r: Gpr) -> u64 {
        self.gprs[r as usize]
    }
    fn set_gpr(&mut self, r: Gpr, v: u64) {
        self.gprs[r as usize] = v;
    }
    fn rip(&self) -> u64 {
        self.rip
    }
    fn set_rip(&mut self, v: u64) {
        self.rip = v;
    }
    fn rflags(&self) -> u64 {
        self.rflags
    }
    fn set_rflags(&mut self, v: u64) {
        self.rflags = v;
    }
    fn cr0(&self) -> u64 {
        self.cr0
    }
    fn cr3(&self) -> u64 {
        self.cr3
    }
    fn cr4(&self) -> u64 {
        self.cr4
    }
    fn efer(&self) -> u64 {
        self.efer
    }
    fn cpl(&self) -> u8 {
        self.cpl
    }
    fn segment(&self, s: Seg) -> Segment {
        self.segs[seg_index(s)]
    }
}

pub(crate) const P: u64 = 1;
pub(crate) const RW: u64 = 2;
pub(crate) const US: u64 = 4;
pub(crate) const A: u64 = 1 << 5;
pub(crate) const D: u64 = 1 << 6;
pub(crate) const PS: u64 = 1 << 7;
pub(crate) const NX: u64 = 1 << 63;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PtKind {
    Long4,
    Long5,
    Pae,
    Legacy32,
}

/// Builds page tables in a [`TestMem`], allocating table pages upward from `next`.
pub(crate) struct PageTables {
    pub kind: PtKind,
    pub root: u64,
    next: u64,
}

impl PageTables {
    pub fn new(mem: &mut TestMem, kind: PtKind, alloc_at: u64) -> Self {
        let mut pt = PageTables {
            kind,
            root: 0,
            next: alloc_at,
        };
        pt.root = pt.alloc(mem);
        pt
    }

    fn alloc(&mut self, mem: &mut TestMem) -> u64 {
        let p = self.next;
        self.next += 0x1000;
        mem.put(p, &[0u8; 0x1000]);
        p
    }

    fn entry_width(&self) -> u64 {
        if self.kind == PtKind::Legacy32 { 4 } else { 8 }
    }

    fn read(&self, mem: &TestMem, gpa: u64) -> u64 {
        let v = mem.u64_at(gpa);
        if self.entry_width() == 4 {
            v & 0xffff_ffff
        } else {
            v
        }
    }

    fn write(&self, mem: &mut TestMem, gpa: u64, v: u64) {
        if self.entry_width() == 4 {
            mem.put(gpa, &(v as u32).to_le_bytes());
        } else {
            mem.put_u64(gpa, v);
        }
    }

    /// (shift, index bits) per level, root first.
    fn levels(&self) -> Vec<(u32, u32)> {
        match self.kind {
            PtKind::Long5 => vec![(48, 9), (39, 9), (30, 9), (21, 9), (12, 9)],
            PtKind::Long4 => vec![(39, 9), (30, 9), (21, 9), (12, 9)],
            PtKind::Pae => vec![(30, 2), (21, 9), (12, 9)],
            PtKind::Legacy32 => vec![(22, 10), (12, 10)],
        }
    }

    /// Maps the 4 KiB page at `linear` to `gpa` with leaf `flags`; intermediate entries
    /// allow everything (P|RW|US) so the leaf decides.
    pub fn map(&mut self, mem: &mut TestMem, linear: u64, gpa: u64, flags: u64) {
        self.map_at_depth(mem, linear, gpa, flags, 0);
    }

    /// Maps a large page: `skip` levels above the 4 KiB level (1 = 2 MiB or 4 MiB, 2 = 1 GiB);
    /// `flags` should include PS.
    pub fn map_at_depth(
        &mut self,
        mem: &mut TestMem,
        linear: u64,
        gpa: u64,
        flags: u64,
        skip: usize,
    ) {
        let mut levels = self.levels();
        levels.truncate(levels.len() - skip);
        let mut table = self.root;
        for (i, (shift, nbits)) in levels.iter().enumerate() {
            let idx = (linear >> shift) & ((1 << nbits) - 1);
            let at = table + idx * self.entry_width();
            if i + 1 == levels.len() {
                self.write(mem, at, gpa | flags);
                return;
            }
            let e = self.read(mem, at);
            if e & P != 0 {
                table = e & 0x000f_ffff_ffff_f000;
            } else {
                let t = self.alloc(mem);
                // PAE PDPTEs have no RW/US bits (reserved there).
                let f = if self.kind == PtKind::Pae && i == 0 {
                    P
                } else {
                    P | RW | US
                };
                self.write(mem, at, t | f);
                table = t;
            }
        }
    }

    /// The address of the leaf entry for `linear` (after [`PageTables::map`]).
    pub fn leaf(&self, mem: &TestMem, linear: u64) -> u64 {
        let levels = self.levels();
        let mut table = self.root;
        for (i, (shift, nbits)) in levels.iter().enumerate() {
            let at = table + ((linear >> shift) & ((1 << nbits) - 1)) * self.entry_width();
            if i + 1 == levels.len() {
                return at;
            }
            table = self.read(mem, at) & 0x000f_ffff_ffff_f000;
        }
        0
    }

    pub fn leaf_value(&self, mem: &TestMem, linear: u64) -> u64 {
        self.read(mem, self.leaf(mem, linear))
    }
}
