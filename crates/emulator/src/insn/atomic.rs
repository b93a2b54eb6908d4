//! `cmpxchg8b` and `cmpxchg16b`: compare EDX:EAX (RDX:RAX) with memory; if equal set ZF and
//! store ECX:EBX (RCX:RBX), else clear ZF and load memory into EDX:EAX (RDX:RAX).
//!
//! Other vCPUs run while we complete the instruction, so the compare-and-store goes through
//! the memory trait's atomic compare-exchange (Linux's SLUB `cmpxchg_double` depends on it).
//! The only non-atomic path is a misaligned `cmpxchg8b` (legal, a split lock on hardware),
//! which no mainstream guest issues: it is done as read-compare-write.

use iced_x86::Instruction;

use super::Outcome;
use crate::access::Ctx;
use crate::cpu::Gpr;
use crate::cpu::bits::RFLAGS_ZF;
use crate::error::{Exception, Stop};
use crate::paging::AccessKind;

fn not_ram(gpa: u64, len: usize, source: crate::MemError) -> Stop {
    Stop::NotRam {
        what: "atomic compare-exchange",
        gpa,
        len,
        source,
    }
}

pub(crate) fn cmpxchg8b(ctx: &mut Ctx<'_>, insn: &Instruction) -> Result<Outcome, Stop> {
    let lo32 = |v: u64| v & 0xffff_ffff;
    let expected = lo32(ctx.cpu.gpr(Gpr::Rdx)) << 32 | lo32(ctx.cpu.gpr(Gpr::Rax));
    let new = lo32(ctx.cpu.gpr(Gpr::Rcx)) << 32 | lo32(ctx.cpu.gpr(Gpr::Rbx));
    // The CPU always performs a write cycle (writing back the old value on failure), so the
    // operand must be writable either way.
    let pieces = ctx.translate_for_write(insn, 8)?;
    let found = match pieces.second {
        None if pieces.first.0 % 8 == 0 => ctx
            .mem
            .compare_exchange_u64(pieces.first.0, expected, new)
            .map_err(|e| not_ram(pieces.first.0, 8, e))?,
        _ => {
            let mut b = [0u8; 8];
            ctx.read_mem(insn, &mut b)?;
            let cur = u64::from_le_bytes(b);
            if cur == expected {
                ctx.write_mem(insn, &new.to_le_bytes())?;
            }
            cur
        }
    };
    if found == expected {
        ctx.set_status_flags(RFLAGS_ZF, RFLAGS_ZF);
    } else {
        ctx.set_status_flags(RFLAGS_ZF, 0);
        // 32-bit register writes: upper halves are cleared, as on hardware in 64-bit mode.
        ctx.cpu.set_gpr(Gpr::Rax, found & 0xffff_ffff);
        ctx.cpu.set_gpr(Gpr::Rdx, found >> 32);
    }
    Ok(Outcome::Done)
}

pub(crate) fn cmpxchg16b(ctx: &mut Ctx<'_>, insn: &Instruction) -> Result<Outcome, Stop> {
    let lin = ctx.linear(insn, 16, AccessKind::Write)?;
    if lin % 16 != 0 {
        return Err(Exception::gp0().into());
    }
    let expected = u128::from(ctx.cpu.gpr(Gpr::Rdx)) << 64 | u128::from(ctx.cpu.gpr(Gpr::Rax));
    let new = u128::from(ctx.cpu.gpr(Gpr::Rcx)) << 64 | u128::from(ctx.cpu.gpr(Gpr::Rbx));
    // 16-aligned, so the operand never crosses a page.
    let gpa = ctx.paging.translate(ctx.mem, lin, AccessKind::Write)?;
    let found = ctx
        .mem
        .compare_exchange_u128(gpa, expected, new)
        .map_err(|e| not_ram(gpa, 16, e))?;
    if found == expected {
        ctx.set_status_flags(RFLAGS_ZF, RFLAGS_ZF);
    } else {
        ctx.set_status_flags(RFLAGS_ZF, 0);
        ctx.cpu.set_gpr(Gpr::Rax, found as u64);
        ctx.cpu.set_gpr(Gpr::Rdx, (found >> 64) as u64);
    }
    Ok(Outcome::Done)
}
