//! The executor: instruction fetch through the decode cache and one dispatch per instruction.

use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering, fence};

use crate::counters::Ev;
use crate::csr::*;
use crate::decode::{Insn, Op, XZERO_SINK, decode, is_32bit};
use crate::hart::{Hart, PRV_M, PRV_S, PRV_U, Trap, cause};
use crate::memory::{self, RAM_BASE};
use crate::mmu::{READ, WRITE};

impl Hart {
    /// Executes up to `budget` instructions, stopping early when `break_slice` is set.
    ///
    /// The pc lives in a local between instructions (`self.pc` is written before each one, for
    /// traps and the few instructions that read it) so the next fetch does not wait on a
    /// store-to-load round trip through memory.
    pub(crate) fn execute_slice(&mut self, budget: u32) {
        self.break_slice = false;
        let mut n = 0u32;
        let mut pc = self.pc;
        while n < budget && !self.break_slice {
            n += 1;
            self.pc = pc;
            if pc & !0xfff != self.icache.fetch_vpage
                && let Err(t) = self.refill_fetch(pc)
            {
                self.raise(t);
                pc = self.pc;
                continue;
            }
            let slot = self.icache.fetch_slot;
            let idx = ((pc >> 1) & 2047) as usize;
            let insn = self.icache.get(slot, idx);
            // Undecoded, Illegal and CrossPage share one rarely taken test and an out-of-line
            // path, so the hot loop keeps the cached instruction in registers.
            let r = if insn.op as u8 <= Op::CrossPage as u8 {
                self.exec_uncached(insn, pc, slot, idx)
            } else {
                self.exec(insn, pc)
            };
            match r {
                Ok(next) => pc = next,
                Err(t) => {
                    self.raise(t);
                    pc = self.pc;
                }
            }
        }
        self.pc = pc;
        self.instret += n as u64;
    }

    /// Decodes (and caches) an instruction seen as `Undecoded`, or fetches one straddling
    /// the page end, then executes it.
    #[inline(never)]
    fn exec_uncached(&mut self, insn: Insn, pc: u64, slot: usize, idx: usize) -> Result<u64, Trap> {
        let mut insn = insn;
        if insn.op == Op::Undecoded {
            insn = self.decode_at(pc, slot, idx);
        }
        if insn.op == Op::CrossPage {
            insn = self.fetch_cross(pc)?;
        }
        self.exec_outlined(insn, pc)
    }

    #[inline(never)]
    fn exec_outlined(&mut self, insn: Insn, pc: u64) -> Result<u64, Trap> {
        self.exec(insn, pc)
    }

    fn refill_fetch(&mut self, pc: u64) -> Result<(), Trap> {
        self.counters.bump(Ev::FetchRefills);
        let (pa, host) = self.translate_fetch(pc)?;
        let page = ((pa - RAM_BASE) >> 12) as usize;
        let slot = self.icache.slot_for(page, &self.shared.code_pages);
        self.icache.fetch_vpage = pc & !0xfff;
        self.icache.fetch_slot = slot;
        self.icache.fetch_pa = pa;
        self.icache.fetch_host = host;
        Ok(())
    }

    /// Reads `size` instruction bytes at offset `off` of the current fetch page.
    fn fetch_bytes(&self, off: u64, size: u64) -> u64 {
        // SAFETY: fetch_host is the host address of a whole RAM page (set by refill_fetch from
        // a checked translation) and off + size <= 4096 at every call site.
        unsafe { memory::load((self.icache.fetch_host + off as usize) as *mut u8, size) }
    }

    #[inline(never)]
    fn decode_at(&mut self, pc: u64, slot: usize, idx: usize) -> Insn {
        let off = pc & 0xfff;
        let low = self.fetch_bytes(off, 2) as u16;
        let insn = if is_32bit(low) {
            if off == 0xffe {
                Insn {
                    op: Op::CrossPage,
                    ..Insn::default()
                }
            } else {
                decode(self.fetch_bytes(off, 4) as u32)
            }
        } else {
            decode(low as u32)
        };
        self.icache.set(slot, idx, insn);
        insn
    }

    /// A 32-bit instruction whose upper half is on the next page: fetched and decoded each time.
    fn fetch_cross(&mut self, pc: u64) -> Result<Insn, Trap> {
        let low = self.fetch_bytes(0xffe, 2);
        let (_, host) = self.translate_fetch(pc.wrapping_add(2))?;
        // SAFETY: `host` is the host address of a whole RAM page returned by translate_fetch.
        let high = unsafe { memory::load(host as *mut u8, 2) };
        Ok(decode((low | (high << 16)) as u32))
    }

    /// The raw bits of the current instruction, for the tval of an illegal-instruction trap.
    pub(crate) fn insn_bits(&mut self, i: &Insn) -> u64 {
        if i.op == Op::Illegal {
            return i.imm as u32 as u64;
        }
        let off = self.pc & 0xfff;
        if i.len() == 2 {
            self.fetch_bytes(off, 2)
        } else if off == 0xffe {
            let low = self.fetch_bytes(off, 2);
            match self.translate_fetch(self.pc.wrapping_add(2)) {
                // SAFETY: host address of a whole RAM page from translate_fetch.
                Ok((_, host)) => low | (unsafe { memory::load(host as *mut u8, 2) } << 16),
                Err(_) => low,
            }
        } else {
            self.fetch_bytes(off, 4)
        }
    }

    pub(crate) fn illegal(&mut self, i: &Insn) -> Trap {
        Trap::illegal(self.insn_bits(i))
    }

    /// Executes `i` at `pc` (== `self.pc`); returns the next pc.
    #[inline(always)]
    fn exec(&mut self, i: Insn, pc: u64) -> Result<u64, Trap> {
        macro_rules! x {
            ($r:expr) => {
                self.x[($r & 63) as usize]
            };
        }
        let next = pc.wrapping_add(i.len());
        let imm = i.imm as i64 as u64;
        let a = x!(i.rs1);
        let b = x!(i.rs2);
        macro_rules! branch {
            ($cond:expr) => {{
                return Ok(if $cond { pc.wrapping_add(imm) } else { next });
            }};
        }
        macro_rules! w {
            ($v:expr) => {
                ($v) as i32 as i64 as u64
            };
        }
        match i.op {
            Op::Lui => x!(i.rd) = imm,
            Op::Auipc => x!(i.rd) = pc.wrapping_add(imm),
            Op::Jal => {
                x!(i.rd) = next;
                return Ok(pc.wrapping_add(imm));
            }
            Op::Jalr => {
                let t = a.wrapping_add(imm) & !1;
                x!(i.rd) = next;
                return Ok(t);
            }
            Op::Beq => branch!(a == b),
            Op::Bne => branch!(a != b),
            Op::Blt => branch!((a as i64) < (b as i64)),
            Op::Bge => branch!((a as i64) >= (b as i64)),
            Op::Bltu => branch!(a < b),
            Op::Bgeu => branch!(a >= b),
            Op::Lb => x!(i.rd) = self.load(a.wrapping_add(imm), 1)? as i8 as i64 as u64,
            Op::Lh => x!(i.rd) = self.load(a.wrapping_add(imm), 2)? as i16 as i64 as u64,
            Op::Lw => x!(i.rd) = self.load(a.wrapping_add(imm), 4)? as i32 as i64 as u64,
            Op::Ld => x!(i.rd) = self.load(a.wrapping_add(imm), 8)?,
            Op::Lbu => x!(i.rd) = self.load(a.wrapping_add(imm), 1)?,
            Op::Lhu => x!(i.rd) = self.load(a.wrapping_add(imm), 2)?,
            Op::Lwu => x!(i.rd) = self.load(a.wrapping_add(imm), 4)?,
            Op::Sb => self.store(a.wrapping_add(imm), 1, b)?,
            Op::Sh => self.store(a.wrapping_add(imm), 2, b)?,
            Op::Sw => self.store(a.wrapping_add(imm), 4, b)?,
            Op::Sd => self.store(a.wrapping_add(imm), 8, b)?,
            Op::Addi => x!(i.rd) = a.wrapping_add(imm),
            Op::Slti => x!(i.rd) = ((a as i64) < (imm as i64)) as u64,
            Op::Sltiu => x!(i.rd) = (a < imm) as u64,
            Op::Xori => x!(i.rd) = a ^ imm,
            Op::Ori => x!(i.rd) = a | imm,
            Op::Andi => x!(i.rd) = a & imm,
            Op::Slli => x!(i.rd) = a << (imm & 63),
            Op::Srli => x!(i.rd) = a >> (imm & 63),
            Op::Srai => x!(i.rd) = ((a as i64) >> (imm & 63)) as u64,
            Op::Add => x!(i.rd) = a.wrapping_add(b),
            Op::Sub => x!(i.rd) = a.wrapping_sub(b),
            Op::Sll => x!(i.rd) = a << (b & 63),
            Op::Slt => x!(i.rd) = ((a as i64) < (b as i64)) as u64,
            Op::Sltu => x!(i.rd) = (a < b) as u64,
            Op::Xor => x!(i.rd) = a ^ b,
            Op::Srl => x!(i.rd) = a >> (b & 63),
            Op::Sra => x!(i.rd) = ((a as i64) >> (b & 63)) as u64,
            Op::Or => x!(i.rd) = a | b,
            Op::And => x!(i.rd) = a & b,
            Op::Addiw => x!(i.rd) = w!(a.wrapping_add(imm)),
            Op::Slliw => x!(i.rd) = w!((a as u32) << (imm & 31)),
            Op::Srliw => x!(i.rd) = w!((a as u32) >> (imm & 31)),
            Op::Sraiw => x!(i.rd) = w!((a as i32) >> (imm & 31)),
            Op::Addw => x!(i.rd) = w!(a.wrapping_add(b)),
            Op::Subw => x!(i.rd) = w!(a.wrapping_sub(b)),
            Op::Sllw => x!(i.rd) = w!((a as u32) << (b & 31)),
            Op::Srlw => x!(i.rd) = w!((a as u32) >> (b & 31)),
            Op::Sraw => x!(i.rd) = w!((a as i32) >> (b & 31)),
            Op::Mul => x!(i.rd) = a.wrapping_mul(b),
            Op::Mulh => x!(i.rd) = ((a as i64 as i128 * b as i64 as i128) >> 64) as u64,
            Op::Mulhsu => x!(i.rd) = ((a as i64 as i128 * b as i128) >> 64) as u64,
            Op::Mulhu => x!(i.rd) = ((a as u128 * b as u128) >> 64) as u64,
            Op::Div => x!(i.rd) = div(a as i64, b as i64) as u64,
            Op::Divu => x!(i.rd) = a.checked_div(b).unwrap_or(u64::MAX),
            Op::Rem => x!(i.rd) = rem(a as i64, b as i64) as u64,
            Op::Remu => x!(i.rd) = if b == 0 { a } else { a % b },
            Op::Mulw => x!(i.rd) = w!((a as i32).wrapping_mul(b as i32)),
            Op::Divw => x!(i.rd) = w!(div32(a as i32, b as i32)),
            Op::Divuw => x!(i.rd) = w!((a as u32).checked_div(b as u32).unwrap_or(u32::MAX)),
            Op::Remw => x!(i.rd) = w!(rem32(a as i32, b as i32)),
            Op::Remuw => {
                x!(i.rd) = w!(if b as u32 == 0 {
                    a as u32
                } else {
                    a as u32 % b as u32
                })
            }
            Op::Fence => {
                // x86 is TSO: only store->load ordering (pred W, succ R) needs a real fence;
                // the others just must not be reordered by the compiler.
                if imm & 0x10 != 0 && imm & 0x2 != 0 {
                    fence(Ordering::SeqCst);
                } else {
                    fence(Ordering::AcqRel);
                }
            }
            Op::FenceI => {
                self.counters.bump(Ev::IcacheFlushes);
                self.icache.flush();
                self.break_slice = true;
            }
            Op::Ecall => {
                if self.prv == PRV_S && self.shared.firmware.load(Ordering::Relaxed) {
                    self.sbi_call();
                    self.break_slice = true;
                    return Ok(next);
                }
                let c = match self.prv {
                    PRV_U => cause::ECALL_U,
                    PRV_S => cause::ECALL_S,
                    _ => cause::ECALL_M,
                };
                return Err(Trap::new(c, 0));
            }
            Op::Ebreak => return Err(Trap::new(cause::BREAKPOINT, pc)),
            Op::Mret => {
                if self.prv != PRV_M {
                    return Err(self.illegal(&i));
                }
                return self.mret().map(|()| self.pc);
            }
            Op::Sret => {
                let bits = self.insn_bits(&i);
                return self.sret(bits).map(|()| self.pc);
            }
            Op::Wfi => {
                if self.prv == PRV_U || (self.prv == PRV_S && self.csr.mstatus & MSTATUS_TW != 0) {
                    return Err(self.illegal(&i));
                }
                self.wfi = true;
                self.break_slice = true;
            }
            Op::SfenceVma => {
                if self.prv == PRV_U || (self.prv == PRV_S && self.csr.mstatus & MSTATUS_TVM != 0) {
                    return Err(self.illegal(&i));
                }
                if i.rs1 == 0 {
                    self.flush_tlb();
                } else {
                    self.flush_tlb_page(a);
                }
            }
            Op::Csrrw | Op::Csrrs | Op::Csrrc | Op::Csrrwi | Op::Csrrsi | Op::Csrrci => {
                self.exec_csr(&i)?;
            }
            Op::LrW | Op::LrD => {
                let size = if i.op == Op::LrW { 4 } else { 8 };
                let (p, pa) = self.atomic_host(a, size, READ)?;
                // SAFETY: `p` is naturally aligned and inside guest RAM (atomic_host checked).
                let v = unsafe {
                    if size == 4 {
                        AtomicU32::from_ptr(p.cast()).load(Ordering::SeqCst) as u64
                    } else {
                        AtomicU64::from_ptr(p.cast()).load(Ordering::SeqCst)
                    }
                };
                self.resv_addr = pa;
                self.resv_val = v;
                x!(i.rd) = if size == 4 { v as i32 as i64 as u64 } else { v };
            }
            Op::ScW | Op::ScD => {
                let size = if i.op == Op::ScW { 4 } else { 8 };
                let (p, pa) = self.atomic_host(a, size, WRITE)?;
                let ok = self.resv_addr == pa && {
                    // SAFETY: `p` is naturally aligned and inside guest RAM.
                    unsafe {
                        if size == 4 {
                            AtomicU32::from_ptr(p.cast())
                                .compare_exchange(
                                    self.resv_val as u32,
                                    b as u32,
                                    Ordering::SeqCst,
                                    Ordering::SeqCst,
                                )
                                .is_ok()
                        } else {
                            AtomicU64::from_ptr(p.cast())
                                .compare_exchange(
                                    self.resv_val,
                                    b,
                                    Ordering::SeqCst,
                                    Ordering::SeqCst,
                                )
                                .is_ok()
                        }
                    }
                };
                self.resv_addr = u64::MAX;
                if ok {
                    self.note_write(pa & !0xfff);
                }
                x!(i.rd) = !ok as u64;
            }
            Op::AmoSwapW
            | Op::AmoAddW
            | Op::AmoXorW
            | Op::AmoAndW
            | Op::AmoOrW
            | Op::AmoMinW
            | Op::AmoMaxW
            | Op::AmoMinuW
            | Op::AmoMaxuW => {
                let (p, pa) = self.atomic_host(a, 4, WRITE)?;
                // SAFETY: `p` is 4-aligned and inside guest RAM.
                let (u, s) =
                    unsafe { (AtomicU32::from_ptr(p.cast()), AtomicI32::from_ptr(p.cast())) };
                let o = Ordering::SeqCst;
                let old = match i.op {
                    Op::AmoSwapW => u.swap(b as u32, o),
                    Op::AmoAddW => u.fetch_add(b as u32, o),
                    Op::AmoXorW => u.fetch_xor(b as u32, o),
                    Op::AmoAndW => u.fetch_and(b as u32, o),
                    Op::AmoOrW => u.fetch_or(b as u32, o),
                    Op::AmoMinW => s.fetch_min(b as i32, o) as u32,
                    Op::AmoMaxW => s.fetch_max(b as i32, o) as u32,
                    Op::AmoMinuW => u.fetch_min(b as u32, o),
                    _ => u.fetch_max(b as u32, o),
                };
                self.note_write(pa & !0xfff);
                x!(i.rd) = old as i32 as i64 as u64;
            }
            Op::AmoSwapD
            | Op::AmoAddD
            | Op::AmoXorD
            | Op::AmoAndD
            | Op::AmoOrD
            | Op::AmoMinD
            | Op::AmoMaxD
            | Op::AmoMinuD
            | Op::AmoMaxuD => {
                let (p, pa) = self.atomic_host(a, 8, WRITE)?;
                // SAFETY: `p` is 8-aligned and inside guest RAM.
                let (u, s) =
                    unsafe { (AtomicU64::from_ptr(p.cast()), AtomicI64::from_ptr(p.cast())) };
                let o = Ordering::SeqCst;
                let old = match i.op {
                    Op::AmoSwapD => u.swap(b, o),
                    Op::AmoAddD => u.fetch_add(b, o),
                    Op::AmoXorD => u.fetch_xor(b, o),
                    Op::AmoAndD => u.fetch_and(b, o),
                    Op::AmoOrD => u.fetch_or(b, o),
                    Op::AmoMinD => s.fetch_min(b as i64, o) as u64,
                    Op::AmoMaxD => s.fetch_max(b as i64, o) as u64,
                    Op::AmoMinuD => u.fetch_min(b, o),
                    _ => u.fetch_max(b, o),
                };
                self.note_write(pa & !0xfff);
                x!(i.rd) = old;
            }
            Op::Undecoded | Op::CrossPage | Op::Illegal => return Err(self.illegal(&i)),
            _ => return self.exec_fp(&i, a).map(|()| self.pc),
        }
        Ok(next)
    }

    fn exec_csr(&mut self, i: &Insn) -> Result<(), Trap> {
        let csr = (i.imm & 0xfff) as u16;
        let src = match i.op {
            Op::Csrrw | Op::Csrrs | Op::Csrrc => self.x[(i.rs1 & 63) as usize],
            _ => i.rs1 as u64,
        };
        let Ok(old) = self.csr_read(csr) else {
            return Err(self.illegal(i));
        };
        let new = match i.op {
            Op::Csrrw | Op::Csrrwi => Some(src),
            Op::Csrrs | Op::Csrrsi => (i.rs1 != 0).then_some(old | src),
            _ => (i.rs1 != 0).then_some(old & !src),
        };
        if let Some(v) = new
            && self.csr_write(csr, v).is_err()
        {
            return Err(self.illegal(i));
        }
        if i.rd & 63 != XZERO_SINK {
            self.x[(i.rd & 63) as usize] = old;
        }
        Ok(())
    }
}

fn div(a: i64, b: i64) -> i64 {
    if b == 0 { -1 } else { a.wrapping_div(b) }
}
fn rem(a: i64, b: i64) -> i64 {
    if b == 0 { a } else { a.wrapping_rem(b) }
}
fn div32(a: i32, b: i32) -> i32 {
    if b == 0 { -1 } else { a.wrapping_div(b) }
}
fn rem32(a: i32, b: i32) -> i32 {
    if b == 0 { a } else { a.wrapping_rem(b) }
}
