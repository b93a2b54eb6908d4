//! Instruction-level tests against an in-memory guest with real page tables.

mod fuzz;
mod insns;
mod modes;
mod paging;

use crate::testutil::{NX, P, PageTables, PtKind, RW, TestCpu, TestMem, US};
use crate::{Completer, Completion, EmulationError, Gpr, bits};

/// Kernel-style code address: two executable pages.
pub(crate) const CODE_LIN: u64 = 0xffff_ffff_8100_0000;
pub(crate) const CODE_GPA: u64 = 0x10000;
/// Four writable, non-executable data pages.
pub(crate) const DATA_LIN: u64 = 0xffff_8880_0000_0000;
pub(crate) const DATA_GPA: u64 = 0x20000;
/// A read-only supervisor data page.
pub(crate) const RO_LIN: u64 = 0xffff_8880_0001_0000;
pub(crate) const RO_GPA: u64 = 0x30000;
/// A user data page (RW, US).
pub(crate) const USER_LIN: u64 = 0x40_0000;
pub(crate) const USER_GPA: u64 = 0x40000;
/// A mapping whose physical page lies beyond guest RAM.
pub(crate) const HOLE_LIN: u64 = 0xffff_8880_0002_0000;
pub(crate) const HOLE_GPA: u64 = 0x1000_0000;
/// Page tables live here, outside every mapping, so no guest access can change them except
/// through accessed/dirty bits.
pub(crate) const PT_AT: u64 = 0x100000;
pub(crate) const MEM_SIZE: usize = 0x200000;

pub(crate) struct Env {
    pub cpu: TestCpu,
    pub mem: TestMem,
    pub pt: PageTables,
    pub completer: Completer,
}

impl Env {
    pub fn long(kind: PtKind) -> Self {
        let mut mem = TestMem::new(MEM_SIZE);
        let mut pt = PageTables::new(&mut mem, kind, PT_AT);
        for i in 0..2 {
            pt.map(&mut mem, CODE_LIN + i * 0x1000, CODE_GPA + i * 0x1000, P);
        }
        for i in 0..4 {
            pt.map(
                &mut mem,
                DATA_LIN + i * 0x1000,
                DATA_GPA + i * 0x1000,
                P | RW | NX,
            );
        }
        pt.map(&mut mem, RO_LIN, RO_GPA, P | NX);
        pt.map(&mut mem, USER_LIN, USER_GPA, P | RW | US | NX);
        pt.map(&mut mem, HOLE_LIN, HOLE_GPA, P | RW | NX);
        let mut cpu = TestCpu::long64(pt.root);
        if kind == PtKind::Long5 {
            cpu.cr4 |= bits::CR4_LA57;
        }
        cpu.rip = CODE_LIN;
        Env {
            cpu,
            mem,
            pt,
            completer: Completer::new(),
        }
    }

    pub fn long4() -> Self {
        Self::long(PtKind::Long4)
    }

    /// Places `code` at the current RIP (inside the code pages) and completes it.
    pub fn run(&mut self, code: &[u8]) -> Result<Completion, EmulationError> {
        let off = self.cpu.rip.wrapping_sub(CODE_LIN);
        if off < 0x2000 {
            let end = (off as usize + code.len()).min(0x2000);
            let n = end - off as usize;
            self.mem.put(CODE_GPA + off, &code[..n]);
        }
        self.completer.complete(&mut self.cpu, &mut self.mem, None)
    }

    pub fn reg(&self, r: Gpr) -> u64 {
        self.cpu.gprs[r as usize]
    }

    pub fn set(&mut self, r: Gpr, v: u64) {
        self.cpu.gprs[r as usize] = v;
    }

    pub fn flags(&self) -> u64 {
        self.cpu.rflags
    }
}

pub(crate) fn pf(cr2: u64, code: u32) -> Completion {
    Completion::Inject {
        vector: crate::vector::PF,
        error_code: Some(code),
        cr2: Some(cr2),
    }
}

pub(crate) fn exc(vector: u8, error_code: Option<u32>) -> Completion {
    Completion::Inject {
        vector,
        error_code,
        cr2: None,
    }
}
