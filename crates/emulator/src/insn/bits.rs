//! Bit-manipulation instructions: `popcnt`, `lzcnt`, `tzcnt`, `movbe`, `crc32`.

use iced_x86::{Code, Instruction, OpKind};

use super::Outcome;
use crate::access::Ctx;
use crate::cpu::bits::{RFLAGS_CF, RFLAGS_STATUS, RFLAGS_ZF};
use crate::error::Stop;

fn dest_size(insn: &Instruction) -> usize {
    insn.op_register(0).size()
}

/// `popcnt r, r/m`: ZF = (source == 0); CF, OF, SF, AF, PF cleared.
pub(crate) fn popcnt(ctx: &mut Ctx<'_>, insn: &Instruction) -> Result<Outcome, Stop> {
    let size = dest_size(insn);
    let src = ctx.read_rm(insn, 1, size)?;
    ctx.write_reg(insn.op_register(0), u64::from(src.count_ones()));
    let zf = if src == 0 { RFLAGS_ZF } else { 0 };
    ctx.set_status_flags(RFLAGS_STATUS, zf);
    Ok(Outcome::Done)
}

/// Flags of `lzcnt`/`tzcnt`: CF = (source == 0), ZF = (result == 0); OF, SF, AF, PF are
/// architecturally undefined and left unchanged.
fn count_flags(ctx: &mut Ctx<'_>, src: u64, result: u64) {
    let mut f = 0;
    if src == 0 {
        f |= RFLAGS_CF;
    }
    if result == 0 {
        f |= RFLAGS_ZF;
    }
    ctx.set_status_flags(RFLAGS_CF | RFLAGS_ZF, f);
}

/// `lzcnt r, r/m`: leading zero bits in the operand's width (the width if the source is 0).
pub(crate) fn lzcnt(ctx: &mut Ctx<'_>, insn: &Instruction) -> Result<Outcome, Stop> {
    let size = dest_size(insn);
    let src = ctx.read_rm(insn, 1, size)?;
    let width = (size * 8) as u64;
    // `src` is zero-extended to 64 bits; discount the extension.
    let result = u64::from(src.leading_zeros()).saturating_sub(64 - width);
    ctx.write_reg(insn.op_register(0), result);
    count_flags(ctx, src, result);
    Ok(Outcome::Done)
}

/// `tzcnt r, r/m`: trailing zero bits (the operand width if the source is 0).
pub(crate) fn tzcnt(ctx: &mut Ctx<'_>, insn: &Instruction) -> Result<Outcome, Stop> {
    let size = dest_size(insn);
    let src = ctx.read_rm(insn, 1, size)?;
    let width = (size * 8) as u64;
    let result = if src == 0 {
        width
    } else {
        u64::from(src.trailing_zeros())
    };
    ctx.write_reg(insn.op_register(0), result);
    count_flags(ctx, src, result);
    Ok(Outcome::Done)
}

fn swap(v: u64, size: usize) -> u64 {
    match size {
        2 => u64::from((v as u16).swap_bytes()),
        4 => u64::from((v as u32).swap_bytes()),
        _ => v.swap_bytes(),
    }
}

/// `movbe`: a load or store with the bytes reversed; no flags.
pub(crate) fn movbe(ctx: &mut Ctx<'_>, insn: &Instruction) -> Result<Outcome, Stop> {
    if insn.op_kind(0) == OpKind::Memory {
        let reg = insn.op_register(1);
        let size = reg.size();
        let v = swap(ctx.read_reg(reg), size);
        ctx.write_mem(insn, &v.to_le_bytes()[..size])?;
    } else {
        let reg = insn.op_register(0);
        let size = reg.size();
        let v = ctx.read_rm(insn, 1, size)?;
        ctx.write_reg(reg, swap(v, size));
    }
    Ok(Outcome::Done)
}

/// One byte of CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) as the SSE4.2 `crc32`
/// instruction computes it: no initial or final inversion.
fn crc32c_byte(mut crc: u32, byte: u8) -> u32 {
    crc ^= u32::from(byte);
    for _ in 0..8 {
        crc = if crc & 1 != 0 {
            (crc >> 1) ^ 0x82F6_3B78
        } else {
            crc >> 1
        };
    }
    crc
}

/// `crc32 r32/r64, r/m8/16/32/64`: accumulates the source's bytes (little-endian order) into
/// the low 32 bits of the destination; the result is zero-extended. No flags.
pub(crate) fn crc32(ctx: &mut Ctx<'_>, insn: &Instruction) -> Result<Outcome, Stop> {
    let src_size = match insn.code() {
        Code::Crc32_r32_rm8 | Code::Crc32_r64_rm8 => 1,
        Code::Crc32_r32_rm16 => 2,
        Code::Crc32_r32_rm32 => 4,
        _ => 8,
    };
    let dest = insn.op_register(0);
    let mut crc = ctx.read_reg(dest) as u32;
    let src = ctx.read_rm(insn, 1, src_size)?;
    for b in &src.to_le_bytes()[..src_size] {
        crc = crc32c_byte(crc, *b);
    }
    ctx.write_reg(dest, u64::from(crc));
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::crc32c_byte;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // CRC-32C("123456789") with the conventional pre/post inversion is 0xE3069283.
        let crc = b"123456789"
            .iter()
            .fold(0xffff_ffffu32, |c, b| crc32c_byte(c, *b));
        assert_eq!(!crc, 0xE306_9283);
    }
}
