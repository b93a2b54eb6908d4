//! F and D extensions on host f32/f64.
//!
//! Arithmetic is done by the host in round-to-nearest-even. Other rounding modes are derived
//! from the sign of the exact rounding error (error-free transformations: TwoSum for add,
//! fma residuals for mul/div/sqrt), moving the nearest result one ulp when needed. Single
//! precision is computed in double and rounded once more, which is exact for +,-,*,/,sqrt
//! (53 >= 2*24+2). Flags NV/DZ/OF/UF/NX follow from the same information. Limits: fused
//! multiply-add always rounds to nearest and reports NX only for the single-precision
//! narrowing step; RMM ties are rounded like RNE.

use crate::csr::MSTATUS_FS;
use crate::decode::{Insn, Op};
use crate::hart::{Hart, Trap};

const NV: u64 = 16;
const DZ: u64 = 8;
const OF: u64 = 4;
const UF: u64 = 2;
const NX: u64 = 1;

const CANON32: u32 = 0x7fc0_0000;
const CANON64: u64 = 0x7ff8_0000_0000_0000;
const BOX: u64 = 0xffff_ffff_0000_0000;

const RTZ: u64 = 1;
const RDN: u64 = 2;
const RUP: u64 = 3;

fn snan32(x: u32) -> bool {
    x & 0x7f80_0000 == 0x7f80_0000 && x & 0x007f_ffff != 0 && x & 0x0040_0000 == 0
}
fn snan64(x: u64) -> bool {
    x & 0x7ff0_0000_0000_0000 == 0x7ff0_0000_0000_0000
        && x & 0x000f_ffff_ffff_ffff != 0
        && x & (1 << 51) == 0
}

fn next_up64(x: f64) -> f64 {
    if x.is_nan() || x == f64::INFINITY {
        x
    } else if x == 0.0 {
        f64::from_bits(1)
    } else if x > 0.0 {
        f64::from_bits(x.to_bits() + 1)
    } else {
        f64::from_bits(x.to_bits() - 1)
    }
}
fn next_up32(x: f32) -> f32 {
    if x.is_nan() || x == f32::INFINITY {
        x
    } else if x == 0.0 {
        f32::from_bits(1)
    } else if x > 0.0 {
        f32::from_bits(x.to_bits() + 1)
    } else {
        f32::from_bits(x.to_bits() - 1)
    }
}

fn sign(e: f64) -> i32 {
    if e > 0.0 {
        1
    } else if e < 0.0 {
        -1
    } else {
        0
    }
}

/// Rounds `d` (an f64 with exact-error sign `e`) to the target format under `rm`.
/// `inf_exact`: an infinite `d` is exact (infinite operand or division by zero).
/// Returns the result (as f64, exactly representable in the target) and flags.
fn round(d: f64, e: i32, single: bool, rm: u64, inf_exact: bool) -> (f64, u64) {
    if d.is_nan() {
        return (d, 0);
    }
    let (r, e) = if single {
        let r = d as f32;
        if r.is_infinite() && !d.is_infinite() {
            (r as f64, 0) // overflow in the narrowing; handled below
        } else if r as f64 != d {
            (r as f64, sign(d - r as f64))
        } else {
            (d, e)
        }
    } else {
        (d, e)
    };
    let max = if single { f32::MAX as f64 } else { f64::MAX };
    if r.is_infinite() && !inf_exact {
        let pos = r > 0.0;
        let v = match rm {
            RTZ => max,
            RDN if pos => max,
            RUP if !pos => max,
            _ => f64::INFINITY,
        };
        return (if pos { v } else { -v }, OF | NX);
    }
    if e == 0 {
        return (r, 0);
    }
    let up = |x: f64| {
        if single {
            next_up32(x as f32) as f64
        } else {
            next_up64(x)
        }
    };
    let down = |x: f64| -up(-x);
    let r = match rm {
        RTZ if e > 0 && r < 0.0 => up(r),
        RTZ if e < 0 && r > 0.0 => down(r),
        RDN if e < 0 => down(r),
        RUP if e > 0 => up(r),
        _ => r,
    };
    let min_normal = if single {
        f32::MIN_POSITIVE as f64
    } else {
        f64::MIN_POSITIVE
    };
    let mut flags = NX;
    if r.abs() < min_normal {
        flags |= UF;
    }
    if r.is_infinite() {
        flags |= OF;
    }
    (r, flags)
}

/// Float to integer conversion with RISC-V saturation rules.
fn to_int(x: f64, nan: bool, rm: u64, signed: bool, wide: bool) -> (u64, u64) {
    let (min, max): (f64, f64) = match (signed, wide) {
        (true, false) => (-2147483648.0, 2147483647.0),
        (false, false) => (0.0, 4294967295.0),
        (true, true) => (-9223372036854775808.0, 9223372036854775807.0),
        (false, true) => (0.0, 18446744073709551615.0),
    };
    let sat_max = match (signed, wide) {
        (true, false) => i32::MAX as i64 as u64,
        (false, false) => u32::MAX as i32 as i64 as u64,
        (true, true) => i64::MAX as u64,
        (false, true) => u64::MAX,
    };
    let sat_min = match (signed, wide) {
        (true, false) => i32::MIN as i64 as u64,
        (true, true) => i64::MIN as u64,
        _ => 0,
    };
    if nan {
        return (sat_max, NV);
    }
    let r = match rm {
        RTZ => x.trunc(),
        RDN => x.floor(),
        RUP => x.ceil(),
        4 => x.round(),
        _ => x.round_ties_even(),
    };
    // `max` of the 64-bit cases rounds up to 2^63 / 2^64 in f64, hence `>=`.
    let too_big = if wide { r >= max } else { r > max };
    if too_big {
        return (sat_max, NV);
    }
    if r < min {
        return (sat_min, NV);
    }
    let flags = if r != x { NX } else { 0 };
    let v = match (signed, wide) {
        (true, false) => r as i32 as i64 as u64,
        (false, false) => r as u32 as i32 as i64 as u64,
        (true, true) => r as i64 as u64,
        (false, true) => r as u64,
    };
    (v, flags)
}

/// Integer to float conversion (v fits in 65 bits) with rounding and NX.
fn from_int(v: i128, single: bool, rm: u64) -> (f64, u64) {
    if single {
        let r = v as f32;
        let e = (v - r as i128).signum() as i32;
        let (r2, f) = round_adjust32(r, e, rm);
        (r2 as f64, f)
    } else {
        let r = v as f64;
        let e = (v - r as i128).signum() as i32;
        round(r, e, false, rm, false)
    }
}

fn round_adjust32(r: f32, e: i32, rm: u64) -> (f32, u64) {
    if e == 0 {
        return (r, 0);
    }
    let r = match rm {
        RTZ if e > 0 && r < 0.0 => next_up32(r),
        RTZ if e < 0 && r > 0.0 => -next_up32(-r),
        RDN if e < 0 => -next_up32(-r),
        RUP if e > 0 => next_up32(r),
        _ => r,
    };
    (r, NX)
}

fn classify(neg: bool, inf: bool, zero: bool, sub: bool, nan: bool, snan: bool) -> u64 {
    let bit = match (nan, inf, zero, sub) {
        (true, ..) => {
            if snan {
                8
            } else {
                9
            }
        }
        (_, true, ..) => {
            if neg {
                0
            } else {
                7
            }
        }
        (_, _, true, _) => {
            if neg {
                3
            } else {
                4
            }
        }
        (_, _, _, true) => {
            if neg {
                2
            } else {
                5
            }
        }
        _ => {
            if neg {
                1
            } else {
                6
            }
        }
    };
    1 << bit
}

impl Hart {
    /// Single-precision value of f-register `r`; improperly NaN-boxed values read as the
    /// canonical NaN.
    fn fs(&self, r: u8) -> u32 {
        let v = self.f[(r & 31) as usize];
        if v >> 32 == 0xffff_ffff {
            v as u32
        } else {
            CANON32
        }
    }

    fn fd(&self, r: u8) -> u64 {
        self.f[(r & 31) as usize]
    }

    fn set_fs(&mut self, r: u8, v: u32) {
        self.f[(r & 31) as usize] = BOX | v as u64;
        self.fs_dirty();
    }

    fn set_fd(&mut self, r: u8, v: u64) {
        self.f[(r & 31) as usize] = v;
        self.fs_dirty();
    }

    fn set_x(&mut self, r: u8, v: u64) {
        self.x[(r & 63) as usize] = v;
    }

    /// Executes a floating-point instruction; `a` is x[rs1].
    pub(crate) fn exec_fp(&mut self, i: &Insn, a: u64) -> Result<(), Trap> {
        use Op::*;
        if self.csr.mstatus & MSTATUS_FS == 0 {
            return Err(self.illegal(i));
        }
        let rm = if i.rm() == 7 {
            (self.csr.fcsr >> 5) & 7
        } else {
            i.rm() as u64
        };
        let uses_rm = !matches!(
            i.op,
            Flw | Fsw
                | Fld
                | Fsd
                | FsgnjS
                | FsgnjnS
                | FsgnjxS
                | FminS
                | FmaxS
                | FmvXW
                | FeqS
                | FltS
                | FleS
                | FclassS
                | FmvWX
                | FsgnjD
                | FsgnjnD
                | FsgnjxD
                | FminD
                | FmaxD
                | FmvXD
                | FeqD
                | FltD
                | FleD
                | FclassD
                | FmvDX
        );
        if uses_rm && rm >= 5 {
            return Err(self.illegal(i));
        }
        let imm = i.imm as i64 as u64;
        let mut flags = 0u64;
        let single = matches!(
            i.op,
            FmaddS
                | FmsubS
                | FnmsubS
                | FnmaddS
                | FaddS
                | FsubS
                | FmulS
                | FdivS
                | FsqrtS
                | FsgnjS
                | FsgnjnS
                | FsgnjxS
                | FminS
                | FmaxS
                | FcvtWS
                | FcvtWuS
                | FcvtLS
                | FcvtLuS
                | FmvXW
                | FeqS
                | FltS
                | FleS
                | FclassS
        );
        // Operands as f64 (exact for singles), with NaN information from the raw bits.
        let (x1, x2, x3, sn1, sn2, sn3) = if single {
            let (p, q, r) = (self.fs(i.rs1), self.fs(i.rs2), self.fs(i.rs3()));
            (
                f32::from_bits(p) as f64,
                f32::from_bits(q) as f64,
                f32::from_bits(r) as f64,
                snan32(p),
                snan32(q),
                snan32(r),
            )
        } else {
            let (p, q, r) = (self.fd(i.rs1), self.fd(i.rs2), self.fd(i.rs3()));
            (
                f64::from_bits(p),
                f64::from_bits(q),
                f64::from_bits(r),
                snan64(p),
                snan64(q),
                snan64(r),
            )
        };
        let write_float = |h: &mut Hart, v: f64, flags: &mut u64, single: bool| {
            if single {
                let bits = if v.is_nan() {
                    CANON32
                } else {
                    (v as f32).to_bits()
                };
                h.set_fs(i.rd, bits);
            } else {
                let bits = if v.is_nan() { CANON64 } else { v.to_bits() };
                h.set_fd(i.rd, bits);
            }
            let _ = flags;
        };
        match i.op {
            Flw => {
                let v = self.load(a.wrapping_add(imm), 4)?;
                self.set_fs(i.rd, v as u32);
            }
            Fld => {
                let v = self.load(a.wrapping_add(imm), 8)?;
                self.set_fd(i.rd, v);
            }
            Fsw => self.store(a.wrapping_add(imm), 4, self.f[(i.rs2 & 31) as usize])?,
            Fsd => self.store(a.wrapping_add(imm), 8, self.f[(i.rs2 & 31) as usize])?,
            FaddS | FsubS | FaddD | FsubD => {
                let b = if matches!(i.op, FsubS | FsubD) {
                    -x2
                } else {
                    x2
                };
                let s = x1 + b;
                let bb = s - x1;
                let err = (x1 - (s - bb)) + (b - bb);
                let e = if s.is_finite() { sign(err) } else { 0 };
                if s.is_nan() {
                    if sn1 || sn2 || !(x1.is_nan() || x2.is_nan()) {
                        flags |= NV;
                    }
                } else if s == 0.0
                    && e == 0
                    && rm == RDN
                    && (x1.is_sign_negative() || b.is_sign_negative() || x1 != 0.0)
                {
                    // Exact zero sums are -0 when rounding down (unless both are +0).
                    write_float(self, -0.0, &mut flags, single);
                    return self.fp_done(i, flags);
                }
                let (v, f) = round(s, e, single, rm, x1.is_infinite() || x2.is_infinite());
                flags |= f;
                write_float(self, v, &mut flags, single);
            }
            FmulS | FmulD => {
                let p = x1 * x2;
                if p.is_nan() && (sn1 || sn2 || !(x1.is_nan() || x2.is_nan())) {
                    flags |= NV;
                }
                let e = if p.is_finite() {
                    sign(x1.mul_add(x2, -p))
                } else {
                    0
                };
                let (v, f) = round(p, e, single, rm, x1.is_infinite() || x2.is_infinite());
                flags |= f;
                write_float(self, v, &mut flags, single);
            }
            FdivS | FdivD => {
                let q = x1 / x2;
                if q.is_nan() {
                    if sn1 || sn2 || !(x1.is_nan() || x2.is_nan()) {
                        flags |= NV;
                    }
                } else if x2 == 0.0 && x1.is_finite() && x1 != 0.0 {
                    flags |= DZ;
                }
                let e = if q.is_finite() && q != 0.0 || (q == 0.0 && x1 != 0.0 && x1.is_finite()) {
                    sign((-q).mul_add(x2, x1)) * if x2 < 0.0 { -1 } else { 1 }
                } else {
                    0
                };
                let (v, f) = round(q, e, single, rm, x1.is_infinite() || x2 == 0.0);
                flags |= f;
                write_float(self, v, &mut flags, single);
            }
            FsqrtS | FsqrtD => {
                let s = x1.sqrt();
                if s.is_nan() && (sn1 || !x1.is_nan()) {
                    flags |= NV;
                }
                let e = if s.is_finite() {
                    sign((-s).mul_add(s, x1))
                } else {
                    0
                };
                let (v, f) = round(s, e, single, rm, true);
                flags |= f;
                write_float(self, v, &mut flags, single);
            }
            FmaddS | FmsubS | FnmsubS | FnmaddS | FmaddD | FmsubD | FnmsubD | FnmaddD => {
                let (neg_prod, neg_add) = match i.op {
                    FmaddS | FmaddD => (false, false),
                    FmsubS | FmsubD => (false, true),
                    FnmsubS | FnmsubD => (true, false),
                    _ => (true, true),
                };
                let m1 = if neg_prod { -x1 } else { x1 };
                let c = if neg_add { -x3 } else { x3 };
                let r = m1.mul_add(x2, c);
                let inf_times_zero =
                    (x1.is_infinite() && x2 == 0.0) || (x1 == 0.0 && x2.is_infinite());
                if sn1
                    || sn2
                    || sn3
                    || inf_times_zero
                    || (r.is_nan() && !(x1.is_nan() || x2.is_nan() || x3.is_nan()))
                {
                    flags |= NV;
                }
                let inf_exact = x1.is_infinite() || x2.is_infinite() || x3.is_infinite();
                let (v, f) = round(r, 0, single, rm, inf_exact);
                flags |= f;
                write_float(
                    self,
                    if flags & NV != 0 && inf_times_zero {
                        f64::NAN
                    } else {
                        v
                    },
                    &mut flags,
                    single,
                );
            }
            FsgnjS | FsgnjnS | FsgnjxS => {
                let (p, q) = (self.fs(i.rs1), self.fs(i.rs2));
                let s = match i.op {
                    FsgnjS => q & 0x8000_0000,
                    FsgnjnS => !q & 0x8000_0000,
                    _ => (p ^ q) & 0x8000_0000,
                };
                self.set_fs(i.rd, (p & 0x7fff_ffff) | s);
            }
            FsgnjD | FsgnjnD | FsgnjxD => {
                let (p, q) = (self.fd(i.rs1), self.fd(i.rs2));
                let m = 1u64 << 63;
                let s = match i.op {
                    FsgnjD => q & m,
                    FsgnjnD => !q & m,
                    _ => (p ^ q) & m,
                };
                self.set_fd(i.rd, (p & !m) | s);
            }
            FminS | FmaxS | FminD | FmaxD => {
                if sn1 || sn2 {
                    flags |= NV;
                }
                let max = matches!(i.op, FmaxS | FmaxD);
                let v = match (x1.is_nan(), x2.is_nan()) {
                    (true, true) => f64::NAN,
                    (true, false) => x2,
                    (false, true) => x1,
                    _ if x1 == x2 => {
                        // ±0: min prefers -0, max prefers +0.
                        if (x1.is_sign_negative() || x2.is_sign_negative()) != max {
                            -x1.abs()
                        } else {
                            x1.abs()
                        }
                    }
                    _ => {
                        if (x1 < x2) != max {
                            x1
                        } else {
                            x2
                        }
                    }
                };
                write_float(self, v, &mut flags, single);
            }
            FeqS | FeqD | FltS | FltD | FleS | FleD => {
                let any_nan = x1.is_nan() || x2.is_nan();
                let quiet = matches!(i.op, FeqS | FeqD);
                if (quiet && (sn1 || sn2)) || (!quiet && any_nan) {
                    flags |= NV;
                }
                let r = match i.op {
                    FeqS | FeqD => x1 == x2,
                    FltS | FltD => x1 < x2,
                    _ => x1 <= x2,
                };
                self.set_x(i.rd, r as u64);
            }
            FclassS => {
                let p = self.fs(i.rs1);
                let e = (p >> 23) & 0xff;
                let f = p & 0x7f_ffff;
                let c = classify(
                    p >> 31 != 0,
                    e == 0xff && f == 0,
                    e == 0 && f == 0,
                    e == 0 && f != 0,
                    e == 0xff && f != 0,
                    snan32(p),
                );
                self.set_x(i.rd, c);
            }
            FclassD => {
                let p = self.fd(i.rs1);
                let e = (p >> 52) & 0x7ff;
                let f = p & 0xf_ffff_ffff_ffff;
                let c = classify(
                    p >> 63 != 0,
                    e == 0x7ff && f == 0,
                    e == 0 && f == 0,
                    e == 0 && f != 0,
                    e == 0x7ff && f != 0,
                    snan64(p),
                );
                self.set_x(i.rd, c);
            }
            FcvtWS | FcvtWuS | FcvtLS | FcvtLuS | FcvtWD | FcvtWuD | FcvtLD | FcvtLuD => {
                let signed = matches!(i.op, FcvtWS | FcvtLS | FcvtWD | FcvtLD);
                let wide = matches!(i.op, FcvtLS | FcvtLuS | FcvtLD | FcvtLuD);
                let (v, f) = to_int(x1, x1.is_nan(), rm, signed, wide);
                flags |= f;
                self.set_x(i.rd, v);
            }
            FcvtSW | FcvtSWu | FcvtSL | FcvtSLu | FcvtDW | FcvtDWu | FcvtDL | FcvtDLu => {
                let v: i128 = match i.op {
                    FcvtSW | FcvtDW => a as i32 as i128,
                    FcvtSWu | FcvtDWu => a as u32 as i128,
                    FcvtSL | FcvtDL => a as i64 as i128,
                    _ => a as i128,
                };
                let to_single = matches!(i.op, FcvtSW | FcvtSWu | FcvtSL | FcvtSLu);
                let (r, f) = from_int(v, to_single, rm);
                flags |= f;
                write_float(self, r, &mut flags, to_single);
            }
            FcvtSD => {
                let p = self.fd(i.rs1);
                let d = f64::from_bits(p);
                if snan64(p) {
                    flags |= NV;
                }
                let (v, f) = round(d, 0, true, rm, d.is_infinite());
                flags |= f;
                write_float(self, v, &mut flags, true);
            }
            FcvtDS => {
                let p = self.fs(i.rs1);
                if snan32(p) {
                    flags |= NV;
                }
                write_float(self, f32::from_bits(p) as f64, &mut flags, false);
            }
            FmvXW => {
                let v = self.f[(i.rs1 & 31) as usize] as u32 as i32 as i64 as u64;
                self.set_x(i.rd, v);
            }
            FmvXD => {
                let v = self.f[(i.rs1 & 31) as usize];
                self.set_x(i.rd, v);
            }
            FmvWX => self.set_fs(i.rd, a as u32),
            FmvDX => self.set_fd(i.rd, a),
            _ => return Err(self.illegal(i)),
        }
        self.fp_done(i, flags)
    }

    fn fp_done(&mut self, i: &Insn, flags: u64) -> Result<(), Trap> {
        if flags != 0 {
            self.csr.fcsr |= flags;
            self.fs_dirty();
        }
        self.pc = self.pc.wrapping_add(i.len());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directed_rounding_of_sums() {
        // 1 + 2^-60 is inexact: RUP moves up one ulp, RDN/RTZ stay, RNE stays.
        let a = 1.0f64;
        let b = 2f64.powi(-60);
        let s = a + b;
        let bb = s - a;
        let e = sign((a - (s - bb)) + (b - bb));
        assert_eq!(e, 1);
        assert_eq!(round(s, e, false, RUP, false), (next_up64(1.0), NX));
        assert_eq!(round(s, e, false, RDN, false), (1.0, NX));
        assert_eq!(round(s, e, false, RTZ, false), (1.0, NX));
        assert_eq!(round(s, e, false, 0, false), (1.0, NX));
    }

    #[test]
    fn overflow_and_underflow_flags() {
        assert_eq!(
            round(f64::INFINITY, 0, false, 0, false),
            (f64::INFINITY, OF | NX)
        );
        assert_eq!(
            round(f64::INFINITY, 0, false, RTZ, false),
            (f64::MAX, OF | NX)
        );
        assert_eq!(round(f64::INFINITY, 0, false, 0, true), (f64::INFINITY, 0));
        // 1e39 does not fit in f32.
        assert_eq!(round(1e39, 0, true, 0, false), (f64::INFINITY, OF | NX));
        assert_eq!(
            round(-1e39, 0, true, RTZ, false),
            (-(f32::MAX as f64), OF | NX)
        );
        // A tiny inexact single result underflows.
        let (v, f) = round(1e-46, 0, true, 0, false);
        assert_eq!(f, NX | UF);
        assert!(v == 0.0);
    }

    #[test]
    fn float_to_int_saturates() {
        assert_eq!(to_int(3.7, false, RTZ, true, false), (3, NX));
        assert_eq!(to_int(-3.5, false, 0, true, false), (-4i64 as u64, NX));
        assert_eq!(to_int(2.5, false, 0, true, false), (2, NX));
        assert_eq!(to_int(2.5, false, 4, true, false), (3, NX));
        assert_eq!(to_int(1e10, false, 0, true, false), (i32::MAX as u64, NV));
        assert_eq!(to_int(-1.0, false, 0, false, false), (0, NV));
        assert_eq!(to_int(0.0, true, 0, true, true), (i64::MAX as u64, NV));
        assert_eq!(
            to_int(4294967295.0, false, 0, false, false),
            (u64::MAX, 0),
            "wu sign-extends"
        );
        assert_eq!(
            to_int(1.8446744073709552e19, false, 0, false, true),
            (u64::MAX, NV)
        );
        assert_eq!(to_int(-0.3, false, RTZ, false, true), (0, NX));
    }

    #[test]
    fn int_to_float_rounding() {
        let v = (1i128 << 53) + 1;
        assert_eq!(from_int(v, false, 0), ((1u64 << 53) as f64, NX));
        assert_eq!(from_int(v, false, RUP), (((1u64 << 53) + 2) as f64, NX));
        assert_eq!(from_int(16_777_217, true, 0), (16_777_216.0, NX));
        assert_eq!(from_int(16_777_217, true, RUP), (16_777_218.0, NX));
        assert_eq!(from_int(7, true, 0), (7.0, 0));
    }
}
