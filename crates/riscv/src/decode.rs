//! Instruction decoding: 32-bit and compressed encodings both become one compact `Insn`,
//! so the executor has a single dispatch and the decode cost is paid once per cached slot.

/// Operation of a decoded instruction. `Undecoded` is 0 so zeroed cache pages read as empty.
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Op {
    #[default]
    Undecoded = 0,
    /// Raw bits (in `imm`) are not a valid instruction.
    Illegal,
    /// A 32-bit instruction straddling a page end: re-fetched every time, never cached.
    CrossPage,
    Lui,
    Auipc,
    Jal,
    Jalr,
    Beq,
    Bne,
    Blt,
    Bge,
    Bltu,
    Bgeu,
    Lb,
    Lh,
    Lw,
    Ld,
    Lbu,
    Lhu,
    Lwu,
    Sb,
    Sh,
    Sw,
    Sd,
    Addi,
    Slti,
    Sltiu,
    Xori,
    Ori,
    Andi,
    Slli,
    Srli,
    Srai,
    Add,
    Sub,
    Sll,
    Slt,
    Sltu,
    Xor,
    Srl,
    Sra,
    Or,
    And,
    Addiw,
    Slliw,
    Srliw,
    Sraiw,
    Addw,
    Subw,
    Sllw,
    Srlw,
    Sraw,
    Fence,
    FenceI,
    Ecall,
    Ebreak,
    Mret,
    Sret,
    Wfi,
    SfenceVma,
    Csrrw,
    Csrrs,
    Csrrc,
    Csrrwi,
    Csrrsi,
    Csrrci,
    Mul,
    Mulh,
    Mulhsu,
    Mulhu,
    Div,
    Divu,
    Rem,
    Remu,
    Mulw,
    Divw,
    Divuw,
    Remw,
    Remuw,
    LrW,
    ScW,
    AmoSwapW,
    AmoAddW,
    AmoXorW,
    AmoAndW,
    AmoOrW,
    AmoMinW,
    AmoMaxW,
    AmoMinuW,
    AmoMaxuW,
    LrD,
    ScD,
    AmoSwapD,
    AmoAddD,
    AmoXorD,
    AmoAndD,
    AmoOrD,
    AmoMinD,
    AmoMaxD,
    AmoMinuD,
    AmoMaxuD,
    Flw,
    Fsw,
    Fld,
    Fsd,
    FmaddS,
    FmsubS,
    FnmsubS,
    FnmaddS,
    FaddS,
    FsubS,
    FmulS,
    FdivS,
    FsqrtS,
    FsgnjS,
    FsgnjnS,
    FsgnjxS,
    FminS,
    FmaxS,
    FcvtWS,
    FcvtWuS,
    FcvtLS,
    FcvtLuS,
    FmvXW,
    FeqS,
    FltS,
    FleS,
    FclassS,
    FcvtSW,
    FcvtSWu,
    FcvtSL,
    FcvtSLu,
    FmvWX,
    FmaddD,
    FmsubD,
    FnmsubD,
    FnmaddD,
    FaddD,
    FsubD,
    FmulD,
    FdivD,
    FsqrtD,
    FsgnjD,
    FsgnjnD,
    FsgnjxD,
    FminD,
    FmaxD,
    FcvtWD,
    FcvtWuD,
    FcvtLD,
    FcvtLuD,
    FmvXD,
    FeqD,
    FltD,
    FleD,
    FclassD,
    FcvtDW,
    FcvtDWu,
    FcvtDL,
    FcvtDLu,
    FmvDX,
    FcvtSD,
    FcvtDS,
}

/// A decoded instruction, 8 bytes so decoded pages stay cache-friendly. Integer destinations
/// equal to x0 are redirected to the scratch register 32 at decode time so the executor never
/// has to special-case x0. Bit 7 of `rd` marks a compressed (2-byte) instruction; register
/// indexes are always used masked with 63.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Insn {
    pub op: Op,
    pub rd: u8,
    pub rs1: u8,
    pub rs2: u8,
    /// Immediate, CSR number, the raw bits for `Illegal`, or for floating-point arithmetic
    /// rs3 (bits 4:0) and the rounding mode field (bits 10:8).
    pub imm: i32,
}

const COMPRESSED: u8 = 0x80;

impl Insn {
    /// Instruction length in bytes (2 or 4).
    #[inline(always)]
    pub fn len(&self) -> u64 {
        if self.rd & COMPRESSED != 0 { 2 } else { 4 }
    }
    /// Third source register of fused multiply-adds.
    pub fn rs3(&self) -> u8 {
        (self.imm & 31) as u8
    }
    /// Rounding-mode field of floating-point arithmetic (7 = dynamic).
    pub fn rm(&self) -> u8 {
        ((self.imm >> 8) & 7) as u8
    }
}

/// Register index used as the sink for writes to x0.
pub const XZERO_SINK: u8 = 32;

fn illegal(raw: u32, len: u8) -> Insn {
    Insn {
        op: Op::Illegal,
        rd: if len == 2 { COMPRESSED } else { 0 },
        imm: raw as i32,
        ..Insn::default()
    }
}

fn bits(v: u32, hi: u32, lo: u32) -> u32 {
    (v >> lo) & ((1u32 << (hi - lo + 1)) - 1)
}

fn sext(v: u32, bits: u32) -> i32 {
    let s = 32 - bits;
    ((v << s) as i32) >> s
}

/// True if `op` writes integer register `rd`.
fn writes_xreg(op: Op) -> bool {
    use Op::*;
    !matches!(
        op,
        Undecoded
            | Illegal
            | CrossPage
            | Beq
            | Bne
            | Blt
            | Bge
            | Bltu
            | Bgeu
            | Sb
            | Sh
            | Sw
            | Sd
            | Fence
            | FenceI
            | Ecall
            | Ebreak
            | Mret
            | Sret
            | Wfi
            | SfenceVma
            | Flw
            | Fsw
            | Fld
            | Fsd
            | FmaddS
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
            | FcvtSW
            | FcvtSWu
            | FcvtSL
            | FcvtSLu
            | FmvWX
            | FmaddD
            | FmsubD
            | FnmsubD
            | FnmaddD
            | FaddD
            | FsubD
            | FmulD
            | FdivD
            | FsqrtD
            | FsgnjD
            | FsgnjnD
            | FsgnjxD
            | FminD
            | FmaxD
            | FcvtDW
            | FcvtDWu
            | FcvtDL
            | FcvtDLu
            | FmvDX
            | FcvtSD
            | FcvtDS
    )
}

fn finish(mut i: Insn) -> Insn {
    if i.rd & !COMPRESSED == 0 && writes_xreg(i.op) {
        i.rd |= XZERO_SINK;
    }
    i
}

/// Decodes one instruction. `raw` holds 32 bits; only the low 16 are used when they encode a
/// compressed instruction.
pub fn decode(raw: u32) -> Insn {
    if raw & 3 != 3 {
        finish(decode_c(raw as u16))
    } else {
        finish(decode32(raw))
    }
}

/// True if the low 16 bits start a 32-bit instruction.
pub fn is_32bit(low: u16) -> bool {
    low & 3 == 3
}

fn decode32(raw: u32) -> Insn {
    use Op::*;
    let rd = bits(raw, 11, 7) as u8;
    let rs1 = bits(raw, 19, 15) as u8;
    let rs2 = bits(raw, 24, 20) as u8;
    let rs3 = bits(raw, 31, 27) as u8;
    let f3 = bits(raw, 14, 12);
    let f7 = bits(raw, 31, 25);
    let imm_i = (raw as i32) >> 20;
    let imm_s = ((raw as i32) >> 25 << 5) | bits(raw, 11, 7) as i32;
    let imm_b = sext(
        (bits(raw, 31, 31) << 12)
            | (bits(raw, 7, 7) << 11)
            | (bits(raw, 30, 25) << 5)
            | (bits(raw, 11, 8) << 1),
        13,
    );
    let imm_u = (raw & 0xffff_f000) as i32;
    let imm_j = sext(
        (bits(raw, 31, 31) << 20)
            | (bits(raw, 19, 12) << 12)
            | (bits(raw, 20, 20) << 11)
            | (bits(raw, 30, 21) << 1),
        21,
    );
    let mk = |op: Op, imm: i32| Insn {
        op,
        rd,
        rs1,
        rs2,
        imm,
    };
    let fp_imm = (rs3 as i32) | ((f3 as i32) << 8);
    let bad = illegal(raw, 4);
    match raw & 0x7f {
        0x37 => mk(Lui, imm_u),
        0x17 => mk(Auipc, imm_u),
        0x6f => mk(Jal, imm_j),
        0x67 if f3 == 0 => mk(Jalr, imm_i),
        0x63 => match f3 {
            0 => mk(Beq, imm_b),
            1 => mk(Bne, imm_b),
            4 => mk(Blt, imm_b),
            5 => mk(Bge, imm_b),
            6 => mk(Bltu, imm_b),
            7 => mk(Bgeu, imm_b),
            _ => bad,
        },
        0x03 => match f3 {
            0 => mk(Lb, imm_i),
            1 => mk(Lh, imm_i),
            2 => mk(Lw, imm_i),
            3 => mk(Ld, imm_i),
            4 => mk(Lbu, imm_i),
            5 => mk(Lhu, imm_i),
            6 => mk(Lwu, imm_i),
            _ => bad,
        },
        0x23 => match f3 {
            0 => mk(Sb, imm_s),
            1 => mk(Sh, imm_s),
            2 => mk(Sw, imm_s),
            3 => mk(Sd, imm_s),
            _ => bad,
        },
        0x13 => {
            let sh = bits(raw, 25, 20) as i32;
            match f3 {
                0 => mk(Addi, imm_i),
                2 => mk(Slti, imm_i),
                3 => mk(Sltiu, imm_i),
                4 => mk(Xori, imm_i),
                6 => mk(Ori, imm_i),
                7 => mk(Andi, imm_i),
                1 if bits(raw, 31, 26) == 0 => mk(Slli, sh),
                5 if bits(raw, 31, 26) == 0 => mk(Srli, sh),
                5 if bits(raw, 31, 26) == 0x10 => mk(Srai, sh),
                _ => bad,
            }
        }
        0x1b => {
            let sh = rs2 as i32;
            match (f3, f7) {
                (0, _) => mk(Addiw, imm_i),
                (1, 0) => mk(Slliw, sh),
                (5, 0) => mk(Srliw, sh),
                (5, 0x20) => mk(Sraiw, sh),
                _ => bad,
            }
        }
        0x33 => match (f7, f3) {
            (0, 0) => mk(Add, 0),
            (0x20, 0) => mk(Sub, 0),
            (0, 1) => mk(Sll, 0),
            (0, 2) => mk(Slt, 0),
            (0, 3) => mk(Sltu, 0),
            (0, 4) => mk(Xor, 0),
            (0, 5) => mk(Srl, 0),
            (0x20, 5) => mk(Sra, 0),
            (0, 6) => mk(Or, 0),
            (0, 7) => mk(And, 0),
            (1, 0) => mk(Mul, 0),
            (1, 1) => mk(Mulh, 0),
            (1, 2) => mk(Mulhsu, 0),
            (1, 3) => mk(Mulhu, 0),
            (1, 4) => mk(Div, 0),
            (1, 5) => mk(Divu, 0),
            (1, 6) => mk(Rem, 0),
            (1, 7) => mk(Remu, 0),
            _ => bad,
        },
        0x3b => match (f7, f3) {
            (0, 0) => mk(Addw, 0),
            (0x20, 0) => mk(Subw, 0),
            (0, 1) => mk(Sllw, 0),
            (0, 5) => mk(Srlw, 0),
            (0x20, 5) => mk(Sraw, 0),
            (1, 0) => mk(Mulw, 0),
            (1, 4) => mk(Divw, 0),
            (1, 5) => mk(Divuw, 0),
            (1, 6) => mk(Remw, 0),
            (1, 7) => mk(Remuw, 0),
            _ => bad,
        },
        0x0f => match f3 {
            0 => mk(Fence, 0),
            1 => mk(FenceI, 0),
            _ => bad,
        },
        0x73 => {
            let csr = bits(raw, 31, 20) as i32;
            match f3 {
                0 => match raw {
                    0x0000_0073 => mk(Ecall, 0),
                    0x0010_0073 => mk(Ebreak, 0),
                    0x3020_0073 => mk(Mret, 0),
                    0x1020_0073 => mk(Sret, 0),
                    0x1050_0073 => mk(Wfi, 0),
                    _ if f7 == 0x09 && rd == 0 => mk(SfenceVma, 0),
                    _ => bad,
                },
                1 => mk(Csrrw, csr),
                2 => mk(Csrrs, csr),
                3 => mk(Csrrc, csr),
                5 => mk(Csrrwi, csr),
                6 => mk(Csrrsi, csr),
                7 => mk(Csrrci, csr),
                _ => bad,
            }
        }
        0x2f => {
            let f5 = bits(raw, 31, 27);
            let aqrl = bits(raw, 26, 25) as u8;
            let op = match (f3, f5) {
                (2, 0x02) if rs2 == 0 => LrW,
                (2, 0x03) => ScW,
                (2, 0x01) => AmoSwapW,
                (2, 0x00) => AmoAddW,
                (2, 0x04) => AmoXorW,
                (2, 0x0c) => AmoAndW,
                (2, 0x08) => AmoOrW,
                (2, 0x10) => AmoMinW,
                (2, 0x14) => AmoMaxW,
                (2, 0x18) => AmoMinuW,
                (2, 0x1c) => AmoMaxuW,
                (3, 0x02) if rs2 == 0 => LrD,
                (3, 0x03) => ScD,
                (3, 0x01) => AmoSwapD,
                (3, 0x00) => AmoAddD,
                (3, 0x04) => AmoXorD,
                (3, 0x0c) => AmoAndD,
                (3, 0x08) => AmoOrD,
                (3, 0x10) => AmoMinD,
                (3, 0x14) => AmoMaxD,
                (3, 0x18) => AmoMinuD,
                (3, 0x1c) => AmoMaxuD,
                _ => return bad,
            };
            let _ = aqrl; // every AMO is sequentially consistent on the host
            mk(op, 0)
        }
        0x07 => match f3 {
            2 => mk(Flw, imm_i),
            3 => mk(Fld, imm_i),
            _ => bad,
        },
        0x27 => match f3 {
            2 => mk(Fsw, imm_s),
            3 => mk(Fsd, imm_s),
            _ => bad,
        },
        0x43 | 0x47 | 0x4b | 0x4f => {
            let d = match bits(raw, 26, 25) {
                0 => false,
                1 => true,
                _ => return bad,
            };
            let op = match (raw & 0x7f, d) {
                (0x43, false) => FmaddS,
                (0x47, false) => FmsubS,
                (0x4b, false) => FnmsubS,
                (0x4f, false) => FnmaddS,
                (0x43, true) => FmaddD,
                (0x47, true) => FmsubD,
                (0x4b, true) => FnmsubD,
                _ => FnmaddD,
            };
            if f3 == 5 || f3 == 6 {
                return bad;
            }
            mk(op, fp_imm)
        }
        0x53 => decode_fp(raw, mk, f3, f7, rs2).unwrap_or(bad),
        _ => bad,
    }
}

fn decode_fp(raw: u32, mk: impl Fn(Op, i32) -> Insn, f3: u32, f7: u32, rs2: u8) -> Option<Insn> {
    use Op::*;
    // Ops that take a rounding mode reject the reserved encodings 5 and 6 statically; 7
    // (dynamic) is checked against frm at execution time.
    let rm_ok = f3 != 5 && f3 != 6;
    let op = match f7 {
        0x00 if rm_ok => FaddS,
        0x04 if rm_ok => FsubS,
        0x08 if rm_ok => FmulS,
        0x0c if rm_ok => FdivS,
        0x2c if rs2 == 0 && rm_ok => FsqrtS,
        0x10 => match f3 {
            0 => FsgnjS,
            1 => FsgnjnS,
            2 => FsgnjxS,
            _ => return None,
        },
        0x14 => match f3 {
            0 => FminS,
            1 => FmaxS,
            _ => return None,
        },
        0x60 if rm_ok => match rs2 {
            0 => FcvtWS,
            1 => FcvtWuS,
            2 => FcvtLS,
            3 => FcvtLuS,
            _ => return None,
        },
        0x70 if rs2 == 0 => match f3 {
            0 => FmvXW,
            1 => FclassS,
            _ => return None,
        },
        0x50 => match f3 {
            2 => FeqS,
            1 => FltS,
            0 => FleS,
            _ => return None,
        },
        0x68 if rm_ok => match rs2 {
            0 => FcvtSW,
            1 => FcvtSWu,
            2 => FcvtSL,
            3 => FcvtSLu,
            _ => return None,
        },
        0x78 if rs2 == 0 && f3 == 0 => FmvWX,
        0x01 if rm_ok => FaddD,
        0x05 if rm_ok => FsubD,
        0x09 if rm_ok => FmulD,
        0x0d if rm_ok => FdivD,
        0x2d if rs2 == 0 && rm_ok => FsqrtD,
        0x11 => match f3 {
            0 => FsgnjD,
            1 => FsgnjnD,
            2 => FsgnjxD,
            _ => return None,
        },
        0x15 => match f3 {
            0 => FminD,
            1 => FmaxD,
            _ => return None,
        },
        0x61 if rm_ok => match rs2 {
            0 => FcvtWD,
            1 => FcvtWuD,
            2 => FcvtLD,
            3 => FcvtLuD,
            _ => return None,
        },
        0x71 if rs2 == 0 => match f3 {
            0 => FmvXD,
            1 => FclassD,
            _ => return None,
        },
        0x51 => match f3 {
            2 => FeqD,
            1 => FltD,
            0 => FleD,
            _ => return None,
        },
        0x69 if rm_ok => match rs2 {
            0 => FcvtDW,
            1 => FcvtDWu,
            2 => FcvtDL,
            3 => FcvtDLu,
            _ => return None,
        },
        0x79 if rs2 == 0 && f3 == 0 => FmvDX,
        0x20 if rs2 == 1 && rm_ok => FcvtSD,
        0x21 if rs2 == 0 && rm_ok => FcvtDS,
        _ => return None,
    };
    let _ = raw;
    Some(mk(op, (f3 as i32) << 8))
}

fn decode_c(raw: u16) -> Insn {
    use Op::*;
    let r = raw as u32;
    let bad = illegal(r, 2);
    if raw == 0 {
        return bad;
    }
    let f3 = bits(r, 15, 13);
    let rd = bits(r, 11, 7) as u8;
    let rs2 = bits(r, 6, 2) as u8;
    let rdp = (bits(r, 4, 2) + 8) as u8; // rd'/rs2'
    let rs1p = (bits(r, 9, 7) + 8) as u8; // rs1'
    let c = |op: Op, rd: u8, rs1: u8, rs2: u8, imm: i32| Insn {
        op,
        rd: rd | COMPRESSED,
        rs1,
        rs2,
        imm,
    };
    // Offsets of the load/store forms.
    let uimm_w = (bits(r, 12, 10) << 3) | (bits(r, 6, 6) << 2) | (bits(r, 5, 5) << 6);
    let uimm_d = (bits(r, 12, 10) << 3) | (bits(r, 6, 5) << 6);
    let ci_imm = sext((bits(r, 12, 12) << 5) | bits(r, 6, 2), 6);
    match (r & 3, f3) {
        (0, 0) => {
            let nz = (bits(r, 12, 11) << 4)
                | (bits(r, 10, 7) << 6)
                | (bits(r, 6, 6) << 2)
                | (bits(r, 5, 5) << 3);
            if nz == 0 {
                bad
            } else {
                c(Addi, rdp, 2, 0, nz as i32)
            }
        }
        (0, 1) => c(Fld, rdp, rs1p, 0, uimm_d as i32),
        (0, 2) => c(Lw, rdp, rs1p, 0, uimm_w as i32),
        (0, 3) => c(Ld, rdp, rs1p, 0, uimm_d as i32),
        (0, 5) => c(Fsd, 0, rs1p, rdp, uimm_d as i32),
        (0, 6) => c(Sw, 0, rs1p, rdp, uimm_w as i32),
        (0, 7) => c(Sd, 0, rs1p, rdp, uimm_d as i32),
        (1, 0) => c(Addi, rd, rd, 0, ci_imm),
        (1, 1) => {
            if rd == 0 {
                bad
            } else {
                c(Addiw, rd, rd, 0, ci_imm)
            }
        }
        (1, 2) => c(Addi, rd, 0, 0, ci_imm),
        (1, 3) => {
            if rd == 2 {
                let imm = sext(
                    (bits(r, 12, 12) << 9)
                        | (bits(r, 6, 6) << 4)
                        | (bits(r, 5, 5) << 6)
                        | (bits(r, 4, 3) << 7)
                        | (bits(r, 2, 2) << 5),
                    10,
                );
                if imm == 0 { bad } else { c(Addi, 2, 2, 0, imm) }
            } else {
                let imm = sext((bits(r, 12, 12) << 17) | (bits(r, 6, 2) << 12), 18);
                if imm == 0 { bad } else { c(Lui, rd, 0, 0, imm) }
            }
        }
        (1, 4) => {
            let sh = ((bits(r, 12, 12) << 5) | bits(r, 6, 2)) as i32;
            match bits(r, 11, 10) {
                0 => c(Srli, rs1p, rs1p, 0, sh),
                1 => c(Srai, rs1p, rs1p, 0, sh),
                2 => c(Andi, rs1p, rs1p, 0, ci_imm),
                _ => match (bits(r, 12, 12), bits(r, 6, 5)) {
                    (0, 0) => c(Sub, rs1p, rs1p, rdp, 0),
                    (0, 1) => c(Xor, rs1p, rs1p, rdp, 0),
                    (0, 2) => c(Or, rs1p, rs1p, rdp, 0),
                    (0, 3) => c(And, rs1p, rs1p, rdp, 0),
                    (1, 0) => c(Subw, rs1p, rs1p, rdp, 0),
                    (1, 1) => c(Addw, rs1p, rs1p, rdp, 0),
                    _ => bad,
                },
            }
        }
        (1, 5) => {
            let imm = sext(
                (bits(r, 12, 12) << 11)
                    | (bits(r, 11, 11) << 4)
                    | (bits(r, 10, 9) << 8)
                    | (bits(r, 8, 8) << 10)
                    | (bits(r, 7, 7) << 6)
                    | (bits(r, 6, 6) << 7)
                    | (bits(r, 5, 3) << 1)
                    | (bits(r, 2, 2) << 5),
                12,
            );
            c(Jal, 0, 0, 0, imm)
        }
        (1, 6) | (1, 7) => {
            let imm = sext(
                (bits(r, 12, 12) << 8)
                    | (bits(r, 11, 10) << 3)
                    | (bits(r, 6, 5) << 6)
                    | (bits(r, 4, 3) << 1)
                    | (bits(r, 2, 2) << 5),
                9,
            );
            c(if f3 == 6 { Beq } else { Bne }, 0, rs1p, 0, imm)
        }
        (2, 0) => {
            let sh = ((bits(r, 12, 12) << 5) | bits(r, 6, 2)) as i32;
            c(Slli, rd, rd, 0, sh)
        }
        (2, 1) => c(
            Fld,
            rd,
            2,
            0,
            ((bits(r, 12, 12) << 5) | (bits(r, 6, 5) << 3) | (bits(r, 4, 2) << 6)) as i32,
        ),
        (2, 2) => {
            if rd == 0 {
                bad
            } else {
                c(
                    Lw,
                    rd,
                    2,
                    0,
                    ((bits(r, 12, 12) << 5) | (bits(r, 6, 4) << 2) | (bits(r, 3, 2) << 6)) as i32,
                )
            }
        }
        (2, 3) => {
            if rd == 0 {
                bad
            } else {
                c(
                    Ld,
                    rd,
                    2,
                    0,
                    ((bits(r, 12, 12) << 5) | (bits(r, 6, 5) << 3) | (bits(r, 4, 2) << 6)) as i32,
                )
            }
        }
        (2, 4) => match (bits(r, 12, 12), rd, rs2) {
            (0, 0, _) => bad,
            (0, _, 0) => c(Jalr, 0, rd, 0, 0),
            (0, _, _) => c(Add, rd, 0, rs2, 0),
            (1, 0, 0) => c(Ebreak, 0, 0, 0, 0),
            (1, _, 0) => c(Jalr, 1, rd, 0, 0),
            _ => c(Add, rd, rd, rs2, 0),
        },
        (2, 5) => c(
            Fsd,
            0,
            2,
            rs2,
            ((bits(r, 12, 10) << 3) | (bits(r, 9, 7) << 6)) as i32,
        ),
        (2, 6) => c(
            Sw,
            0,
            2,
            rs2,
            ((bits(r, 12, 9) << 2) | (bits(r, 8, 7) << 6)) as i32,
        ),
        (2, 7) => c(
            Sd,
            0,
            2,
            rs2,
            ((bits(r, 12, 10) << 3) | (bits(r, 9, 7) << 6)) as i32,
        ),
        _ => bad,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insn_is_compact() {
        assert_eq!(std::mem::size_of::<Insn>(), 8);
    }

    #[test]
    fn decodes_base_forms() {
        // addi a0, a1, -1
        let i = decode(0xfff5_8513);
        assert_eq!(
            (i.op, i.rd & 63, i.rs1, i.imm, i.len()),
            (Op::Addi, 10, 11, -1, 4)
        );
        // sd ra, 8(sp)
        let i = decode(0x0011_3423);
        assert_eq!((i.op, i.rs1, i.rs2, i.imm), (Op::Sd, 2, 1, 8));
        // beq a0, a1, -4
        let i = decode(0xfeb5_0ee3);
        assert_eq!((i.op, i.imm), (Op::Beq, -4));
        // jal ra, 2048
        let i = decode(0x0010_00ef);
        assert_eq!((i.op, i.rd & 63, i.imm), (Op::Jal, 1, 2048));
        // csrrw x0, mscratch, a0: rd=x0 goes to the sink
        let i = decode(0x3405_1073);
        assert_eq!((i.op, i.rd & 63, i.imm), (Op::Csrrw, XZERO_SINK, 0x340));
        // fadd.d fa0, fa1, fa2, rne keeps rd=f0-style indexes unchanged
        let i = decode(0x02c5_8053);
        assert_eq!(
            (i.op, i.rd & 63, i.rs1, i.rs2, i.rm()),
            (Op::FaddD, 0, 11, 12, 0)
        );
        // amoadd.w.aqrl a0, a1, (a2)
        let i = decode(0x06b6_252f);
        assert_eq!((i.op, i.rd & 63, i.rs1, i.rs2), (Op::AmoAddW, 10, 12, 11));
    }

    #[test]
    fn decodes_compressed_forms() {
        // c.addi sp, -16  (0x1141)
        let i = decode(0x1141);
        assert_eq!(
            (i.op, i.rd & 63, i.rs1, i.imm, i.len()),
            (Op::Addi, 2, 2, -16, 2)
        );
        // c.sdsp ra, 8(sp) (0xe406)
        let i = decode(0xe406);
        assert_eq!((i.op, i.rs1, i.rs2, i.imm), (Op::Sd, 2, 1, 8));
        // c.ldsp ra, 8(sp) (0x60a2)
        let i = decode(0x60a2);
        assert_eq!((i.op, i.rd & 63, i.rs1, i.imm), (Op::Ld, 1, 2, 8));
        // c.jr ra (0x8082)
        let i = decode(0x8082);
        assert_eq!((i.op, i.rd & 63, i.rs1), (Op::Jalr, XZERO_SINK, 1));
        // c.mv a0, a1 (0x852e)
        let i = decode(0x852e);
        assert_eq!((i.op, i.rd & 63, i.rs1, i.rs2), (Op::Add, 10, 0, 11));
        // c.lui a0, 0x1 (0x6505)
        let i = decode(0x6505);
        assert_eq!((i.op, i.rd & 63, i.imm), (Op::Lui, 10, 0x1000));
        // c.beqz a0, +8 (0xc501)
        let i = decode(0xc501);
        assert_eq!((i.op, i.rs1, i.rs2, i.imm), (Op::Beq, 10, 0, 8));
        // c.j -2 (0xbffd)
        let i = decode(0xbffd);
        assert_eq!((i.op, i.imm), (Op::Jal, -2));
        // c.addi4spn a0, sp, 16 (0x0808)
        let i = decode(0x0808);
        assert_eq!((i.op, i.rd & 63, i.rs1, i.imm), (Op::Addi, 10, 2, 16));
        // c.ebreak
        assert_eq!(decode(0x9002).op, Op::Ebreak);
        // all-zero is illegal
        assert_eq!(decode(0).op, Op::Illegal);
    }

    #[test]
    fn rejects_reserved_encodings() {
        assert_eq!(decode(0xffff_ffff).op, Op::Illegal);
        // fadd.s with reserved rm=5
        assert_eq!(decode(0x0000_5053).op, Op::Illegal);
        // c.lui with imm 0
        assert_eq!(decode(0x6501).op, Op::Illegal);
        assert_eq!(decode(0xffff_ffff).imm as u32, 0xffff_ffff);
    }
}
