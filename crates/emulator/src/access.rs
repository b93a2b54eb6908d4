//! Operand access for one instruction: registers by their iced name (with the architectural
//! width rules), and memory operands through segmentation (bases, limits, canonical checks) and
//! the guest's page tables.

use iced_x86::{Instruction, OpKind, Register};

use crate::cpu::{CpuState, Gpr, Mode, Seg, bits};
use crate::error::{Exception, Stop};
use crate::mem::GuestPhysMemory;
use crate::paging::{AccessKind, Paging, Pieces};

/// Everything an instruction handler works on.
pub(crate) struct Ctx<'a> {
    pub cpu: &'a mut dyn CpuState,
    pub mem: &'a mut dyn GuestPhysMemory,
    pub mode: Mode,
    pub paging: Paging,
}

/// Maps an iced general-purpose register to (64-bit register, width in bytes, is AH/CH/DH/BH).
fn gpr_of(r: Register) -> Option<(Gpr, usize, bool)> {
    if !r.is_gpr() {
        return None;
    }
    let full = r.full_register();
    let gpr = Gpr::from_number(full.number())?;
    let high = matches!(r, Register::AH | Register::CH | Register::DH | Register::BH);
    Some((gpr, r.size(), high))
}

fn mask(size: usize) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

fn seg_of(r: Register) -> Seg {
    match r {
        Register::ES => Seg::Es,
        Register::CS => Seg::Cs,
        Register::SS => Seg::Ss,
        Register::FS => Seg::Fs,
        Register::GS => Seg::Gs,
        _ => Seg::Ds,
    }
}

/// Whether `addr` is canonical for the current linear-address width (48 or 57 bits).
pub(crate) fn is_canonical(addr: u64, la57: bool) -> bool {
    let bits = if la57 { 57 } else { 48 };
    let shift = 64 - bits;
    (((addr << shift) as i64) >> shift) as u64 == addr
}

impl Ctx<'_> {
    /// Reads a general-purpose register operand, zero-extended to 64 bits.
    pub fn read_reg(&self, r: Register) -> u64 {
        match gpr_of(r) {
            Some((g, _, true)) => (self.cpu.gpr(g) >> 8) & 0xff,
            Some((g, size, false)) => self.cpu.gpr(g) & mask(size),
            // Handlers only pass GPRs (the dispatcher matched the instruction form).
            None => 0,
        }
    }

    /// Writes a general-purpose register operand: 32-bit writes zero the upper half, 8- and
    /// 16-bit writes merge.
    pub fn write_reg(&mut self, r: Register, v: u64) {
        let Some((g, size, high)) = gpr_of(r) else {
            return;
        };
        let old = self.cpu.gpr(g);
        let new = match (size, high) {
            (1, true) => (old & !0xff00) | ((v & 0xff) << 8),
            (8, _) => v,
            (4, _) => v & 0xffff_ffff,
            (s, _) => (old & !mask(s)) | (v & mask(s)),
        };
        self.cpu.set_gpr(g, new);
    }

    /// The effective address (offset within the segment) of the instruction's memory operand,
    /// truncated to the address size.
    fn effective_address(&self, insn: &Instruction) -> u64 {
        let base = insn.memory_base();
        let index = insn.memory_index();
        let addr_size = if base != Register::None {
            base.size()
        } else if index != Register::None {
            index.size()
        } else {
            match insn.memory_displ_size() {
                2 => 2,
                4 => 4,
                8 => 8,
                _ => match self.mode {
                    Mode::Long64 => 8,
                    _ => 4,
                },
            }
        };
        let mut ea = insn.memory_displacement64();
        // For RIP/EIP-relative operands iced already folded the next RIP into the displacement.
        if base != Register::None && !insn.is_ip_rel_memory_operand() {
            ea = ea.wrapping_add(self.read_reg(base));
        }
        if index != Register::None {
            let scale = u64::from(insn.memory_index_scale());
            ea = ea.wrapping_add(self.read_reg(index).wrapping_mul(scale));
        }
        ea & mask(addr_size)
    }

    /// Linear address of the memory operand for an access of `size` bytes, after the
    /// segmentation checks the CPU makes (#GP(0), or #SS(0) for stack-segment accesses).
    pub fn linear(&self, insn: &Instruction, size: usize, kind: AccessKind) -> Result<u64, Stop> {
        let seg = seg_of(insn.memory_segment());
        let fault = || {
            Stop::Exception(if seg == Seg::Ss {
                Exception::ss0()
            } else {
                Exception::gp0()
            })
        };
        let ea = self.effective_address(insn);
        let last_off = (size as u64).saturating_sub(1);
        if self.mode == Mode::Long64 {
            let base = match seg {
                Seg::Fs | Seg::Gs => self.cpu.segment(seg).base,
                _ => 0,
            };
            let lin = base.wrapping_add(ea);
            let la57 = self.paging.cr4 & bits::CR4_LA57 != 0;
            if !is_canonical(lin, la57) || !is_canonical(lin.wrapping_add(last_off), la57) {
                return Err(fault());
            }
            return Ok(lin);
        }
        let s = self.cpu.segment(seg);
        if self.mode == Mode::Protected {
            if s.unusable || !s.present {
                return Err(fault());
            }
            let code = s.type_ & 8 != 0;
            let writable = !code && s.type_ & 2 != 0;
            let readable = !code || s.type_ & 2 != 0;
            if (kind == AccessKind::Write && !writable) || !readable {
                return Err(fault());
            }
        }
        let end = ea.checked_add(last_off).ok_or_else(fault)?;
        let expand_down = s.s && s.type_ & 8 == 0 && s.type_ & 4 != 0;
        if self.mode == Mode::Protected && expand_down {
            let top = if s.db { 0xffff_ffff } else { 0xffff };
            if ea <= u64::from(s.limit) || end > top {
                return Err(fault());
            }
        } else if end > u64::from(s.limit) {
            return Err(fault());
        }
        Ok(s.base.wrapping_add(ea) & 0xffff_ffff)
    }

    /// Reads `buf.len()` bytes of the memory operand.
    pub fn read_mem(&mut self, insn: &Instruction, buf: &mut [u8]) -> Result<(), Stop> {
        let lin = self.linear(insn, buf.len(), AccessKind::Read)?;
        self.paging.read(self.mem, lin, buf, AccessKind::Read)
    }

    /// Writes `buf` to the memory operand.
    pub fn write_mem(&mut self, insn: &Instruction, buf: &[u8]) -> Result<(), Stop> {
        let lin = self.linear(insn, buf.len(), AccessKind::Write)?;
        self.paging.write(self.mem, lin, buf)
    }

    /// Translates the memory operand for a write of `size` bytes without accessing it.
    pub fn translate_for_write(&mut self, insn: &Instruction, size: usize) -> Result<Pieces, Stop> {
        let lin = self.linear(insn, size, AccessKind::Write)?;
        self.paging
            .translate_range(self.mem, lin, size, AccessKind::Write)
    }

    /// Reads operand `op` (a GPR or memory) of `size` bytes, zero-extended.
    pub fn read_rm(&mut self, insn: &Instruction, op: u32, size: usize) -> Result<u64, Stop> {
        if insn.op_kind(op) == OpKind::Memory {
            let mut b = [0u8; 8];
            let n = size.min(8);
            self.read_mem(insn, &mut b[..n])?;
            Ok(u64::from_le_bytes(b))
        } else {
            Ok(self.read_reg(insn.op_register(op)) & mask(size))
        }
    }

    /// Replaces the status flags selected by `affected` with `values`.
    pub fn set_status_flags(&mut self, affected: u64, values: u64) {
        let f = self.cpu.rflags();
        self.cpu.set_rflags((f & !affected) | (values & affected));
    }
}
