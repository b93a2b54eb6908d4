# RV64A: LR/SC (success, failure without reservation, failure after an intervening
# change), every AMO in W and D forms, sign extension of W results.
.include "common.inc"
START
main:
    la s0, word
    TEST 1
    li a0, 5
    sd a0, 0(s0)
    lr.d a1, (s0)
    CHECK a1, 5
    li a2, 9
    sc.d a3, a2, (s0)
    CHECK a3, 0
    ld a1, 0(s0)
    CHECK a1, 9
    TEST 2
    # SC without a reservation fails and does not write.
    sc.d a3, a0, (s0)
    CHECK a3, 1
    ld a1, 0(s0)
    CHECK a1, 9
    TEST 3
    # The value changed between LR and SC: fails.
    lr.w a1, (s0)
    li a2, 77
    sw a2, 0(s0)
    sc.w a3, a0, (s0)
    CHECK a3, 1
    lw a1, 0(s0)
    CHECK a1, 77
    TEST 4
    li a0, 0xfffffff0
    sw a0, 0(s0)
    li a1, 1
    amoadd.w a2, a1, (s0)
    CHECK a2, 0xfffffffffffffff0
    lwu a2, 0(s0)
    CHECK a2, 0xfffffff1
    amoswap.w a2, zero, (s0)
    CHECK a2, 0xfffffffffffffff1
    li a1, 6
    amoor.w a2, a1, (s0)
    amoand.w a2, a1, (s0)
    CHECK a2, 6
    li a1, 3
    amoxor.w a2, a1, (s0)
    lw a2, 0(s0)
    CHECK a2, 5
    li a1, -1
    amomin.w a2, a1, (s0)
    lw a2, 0(s0)
    CHECK a2, -1
    li a1, 4
    amomax.w a2, a1, (s0)
    lw a2, 0(s0)
    CHECK a2, 4
    li a1, -1
    amominu.w a2, a1, (s0)
    lw a2, 0(s0)
    CHECK a2, 4
    amomaxu.w a2, a1, (s0)
    lw a2, 0(s0)
    CHECK a2, -1
    TEST 5
    li a0, 10
    sd a0, 0(s0)
    li a1, -20
    amoadd.d a2, a1, (s0)
    CHECK a2, 10
    amomin.d a2, a0, (s0)
    ld a2, 0(s0)
    CHECK a2, -10
    amomaxu.d a2, a0, (s0)
    ld a2, 0(s0)
    CHECK a2, -10
    amominu.d a2, a0, (s0)
    ld a2, 0(s0)
    CHECK a2, 10
    amomax.d a2, a1, (s0)
    ld a2, 0(s0)
    CHECK a2, 10
    amoswap.d.aqrl a2, a1, (s0)
    CHECK a2, 10
    amoxor.d a2, a1, (s0)
    amoor.d a2, a0, (s0)
    amoand.d a2, a0, (s0)
    ld a2, 0(s0)
    CHECK a2, 10
    j pass
    .data
    .align 3
word: .dword 0
