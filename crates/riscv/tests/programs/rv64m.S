# RV64M: multiplication high parts and division edge cases (by zero, overflow).
.include "common.inc"
START
main:
    TEST 1
    li a0, -3
    li a1, 7
    mul a2, a0, a1
    CHECK a2, -21
    mulw a2, a0, a1
    CHECK a2, -21
    li a0, 0x8000000000000000
    li a1, 2
    mulh a2, a0, a1
    CHECK a2, -1
    mulhu a2, a0, a1
    CHECK a2, 1
    li a0, -1
    mulhsu a2, a0, a1
    CHECK a2, -1
    mulhu a2, a0, a0
    CHECK a2, 0xfffffffffffffffe
    TEST 2
    li a0, -7
    li a1, 2
    div a2, a0, a1
    CHECK a2, -3
    rem a2, a0, a1
    CHECK a2, -1
    divu a2, a0, a1
    CHECK a2, 0x7ffffffffffffffc
    remu a2, a0, a1
    CHECK a2, 1
    TEST 3
    div a2, a0, zero
    CHECK a2, -1
    divu a2, a0, zero
    CHECK a2, -1
    rem a2, a0, zero
    CHECK a2, -7
    remu a2, a0, zero
    CHECK a2, -7
    li a0, 0x8000000000000000
    li a1, -1
    div a2, a0, a1
    CHECK a2, 0x8000000000000000
    rem a2, a0, a1
    CHECK a2, 0
    TEST 4
    li a0, 0x80000000
    li a1, -1
    divw a2, a0, a1
    CHECK a2, 0xffffffff80000000
    remw a2, a0, a1
    CHECK a2, 0
    divuw a2, a0, zero
    CHECK a2, -1
    remuw a2, a0, zero
    CHECK a2, 0xffffffff80000000
    li a0, 100
    li a1, 7
    divuw a2, a0, a1
    CHECK a2, 14
    remw a2, a0, a1
    CHECK a2, 2
    j pass
