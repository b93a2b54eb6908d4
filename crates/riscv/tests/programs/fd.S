# F and D: arithmetic, FMA, conversions, NaN-boxing, canonical NaNs, sign injection,
# min/max, compares, classify, fflags and rounding modes (static and dynamic frm), and the
# FS field (off = illegal, writes make it dirty).
.include "common.inc"
.macro FLAGS_IS v
    csrrw t5, fflags, zero
    CHECK t5, \v
.endm
START
main:
    TEST 1
    # FPU off: an F instruction is illegal, with the instruction bits in mtval.
    li t0, 0x6000
    csrc mstatus, t0
    EXPECT_TRAP
    .option push
    .option norvc
bad_fp:
    fadd.d f0, f1, f2
    .option pop
1:  CHECK s10, 2
    la t0, bad_fp
    lwu t1, 0(t0)
    bne s11, t1, fail
    li t0, 0x2000
    csrs mstatus, t0       # FS = initial
    TEST 2
    li a0, 3
    fcvt.d.l f1, a0
    li a0, 4
    fcvt.d.l f2, a0
    fadd.d f3, f1, f2
    fcvt.l.d a1, f3
    CHECK a1, 7
    csrr t0, mstatus
    srli t1, t0, 13
    andi t1, t1, 3
    CHECK t1, 3            # dirty
    bgez t0, fail          # SD set
    fmul.d f3, f1, f2
    fsub.d f3, f3, f1
    fdiv.d f3, f3, f1      # (12-3)/3 = 3
    fcvt.l.d a1, f3
    CHECK a1, 3
    FLAGS_IS 0
    fsqrt.d f4, f2
    fcvt.w.d a1, f4
    CHECK a1, 2
    fmadd.d f5, f1, f2, f1  # 3*4+3
    fcvt.w.d a1, f5
    CHECK a1, 15
    fnmsub.d f5, f1, f2, f1 # -(3*4)+3
    fcvt.w.d a1, f5
    CHECK a1, -9
    fmsub.d f5, f1, f2, f1  # 12-3
    fcvt.w.d a1, f5
    CHECK a1, 9
    fnmadd.d f5, f1, f2, f1 # -12-3
    fcvt.w.d a1, f5
    CHECK a1, -15
    TEST 3
    # Division by zero and invalid operations.
    fmv.d.x f6, zero
    fdiv.d f7, f1, f6
    FLAGS_IS 8             # DZ
    fclass.d a1, f7
    CHECK a1, 0x80         # +inf
    fdiv.d f7, f6, f6
    FLAGS_IS 16            # NV
    fmv.x.d a1, f7
    CHECK a1, 0x7ff8000000000000   # canonical NaN
    fsqrt.d f7, f5         # sqrt(-15)
    FLAGS_IS 16
    TEST 4
    # Inexact and rounding modes: 1/3.
    li a0, 1
    fcvt.d.l f1, a0
    li a0, 3
    fcvt.d.l f2, a0
    fdiv.d f3, f1, f2
    FLAGS_IS 1
    fdiv.d f4, f1, f2, rup
    fdiv.d f5, f1, f2, rdn
    flt.d a1, f5, f4
    CHECK a1, 1
    feq.d a1, f3, f5       # RNE of 1/3 rounds down
    CHECK a1, 1
    li t0, 3
    csrw frm, t0           # dynamic RUP
    fdiv.d f6, f1, f2
    feq.d a1, f6, f4
    CHECK a1, 1
    csrw frm, zero
    # Conversions with static rounding.
    li a0, 0x4004000000000000   # 2.5
    fmv.d.x f1, a0
    fcvt.l.d a1, f1, rne
    CHECK a1, 2
    fcvt.l.d a1, f1, rmm
    CHECK a1, 3
    fcvt.l.d a1, f1, rdn
    CHECK a1, 2
    fcvt.l.d a1, f1, rup
    CHECK a1, 3
    fneg.d f1, f1
    fcvt.l.d a1, f1, rtz
    CHECK a1, -2
    FLAGS_IS 1
    fcvt.lu.d a1, f1, rtz
    CHECK a1, 0
    FLAGS_IS 16
    TEST 5
    # Single precision and NaN-boxing.
    li a0, 0x40400000      # 3.0f
    fmv.w.x f1, a0
    fmv.x.d a1, f1
    CHECK a1, 0xffffffff40400000
    li a0, 0x3f800000      # 1.0f
    fmv.w.x f2, a0
    fadd.s f3, f1, f2
    fmv.x.w a1, f3
    CHECK a1, 0x40800000
    # An improperly boxed single reads as the canonical NaN.
    li a0, 0x0000000040400000
    fmv.d.x f4, a0
    fadd.s f5, f4, f2
    fmv.x.w a1, f5
    CHECK a1, 0x7fc00000
    fclass.s a1, f4
    CHECK a1, 0x200        # quiet NaN
    # fmv.x.w sign-extends.
    li a0, 0xbf800000
    fmv.w.x f6, a0
    fmv.x.w a1, f6
    CHECK a1, 0xffffffffbf800000
    fcvt.d.s f7, f6
    fcvt.l.d a1, f7
    CHECK a1, -1
    fcvt.s.d f8, f7
    feq.s a1, f8, f6
    CHECK a1, 1
    li a0, 16777217
    fcvt.s.l f8, a0
    FLAGS_IS 1
    fcvt.l.s a1, f8
    CHECK a1, 16777216
    fcvt.wu.s a1, f6
    CHECK a1, 0
    FLAGS_IS 16
    TEST 6
    # Sign injection, min/max with signed zeros and NaNs, compares.
    fsgnjn.s f9, f2, f2
    fmv.x.w a1, f9
    CHECK a1, 0xffffffffbf800000
    fsgnjx.d f9, f7, f7
    fmv.x.d a1, f9
    CHECK a1, 0x3ff0000000000000
    fmv.d.x f10, zero
    fneg.d f11, f10
    fmin.d f12, f10, f11
    fmv.x.d a1, f12
    CHECK a1, 0x8000000000000000
    fmax.d f12, f11, f10
    fmv.x.d a1, f12
    CHECK a1, 0
    li a0, 0x7ff0000000000001  # signaling NaN
    fmv.d.x f13, a0
    fmin.d f12, f13, f9
    FLAGS_IS 16
    feq.d a1, f12, f9
    CHECK a1, 1
    feq.d a1, f13, f13
    CHECK a1, 0
    FLAGS_IS 16
    li a0, 0x7ff8000000000000
    fmv.d.x f13, a0
    feq.d a1, f13, f13
    FLAGS_IS 0
    flt.d a1, f13, f9
    CHECK a1, 0
    FLAGS_IS 16
    fle.d a1, f10, f11     # 0 <= -0
    CHECK a1, 1
    TEST 7
    # Loads/stores of F registers, overflow flags.
    la s0, fdata
    fld f1, 0(s0)
    fmul.d f2, f1, f1
    FLAGS_IS 5             # OF | NX
    fsd f2, 8(s0)
    ld a1, 8(s0)
    CHECK a1, 0x7ff0000000000000
    flw f3, 16(s0)
    fmv.x.d a1, f3
    CHECK a1, 0xffffffff3f800000
    fsw f3, 20(s0)
    lwu a1, 20(s0)
    CHECK a1, 0x3f800000
    # fcsr layout: frm in 7:5, flags in 4:0
    li a0, 0x45
    fscsr a0
    frrm a1
    CHECK a1, 2
    frflags a1
    CHECK a1, 5
    # Reserved rounding mode in frm: dynamic-rm instructions are illegal.
    li a0, 5
    fsrm a0
    EXPECT_TRAP
    fadd.d f0, f1, f1
1:  CHECK s10, 2
    j pass
    .data
    .align 3
fdata:
    .dword 0x7fe0000000000000
    .dword 0
    .word 0x3f800000
    .word 0
