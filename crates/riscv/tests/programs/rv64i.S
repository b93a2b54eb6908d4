# RV64I and RV64C: arithmetic, logic, shifts, compares, branches, jumps, loads/stores,
# W-forms. Assembled for rv64gc, so the assembler emits compressed forms where it can.
.include "common.inc"
START
main:
    TEST 1
    li a0, 5
    li a1, -3
    add a2, a0, a1
    CHECK a2, 2
    sub a2, a1, a0
    CHECK a2, -8
    addi a2, a0, -10
    CHECK a2, -5
    TEST 2
    li a0, 0xff00ff00ff00ff00
    li a1, 0x0ff00ff00ff00ff0
    and a2, a0, a1
    CHECK a2, 0x0f000f000f000f00
    or a2, a0, a1
    CHECK a2, 0xfff0fff0fff0fff0
    xor a2, a0, a1
    CHECK a2, 0xf0f0f0f0f0f0f0f0
    xori a2, a0, -1
    CHECK a2, 0x00ff00ff00ff00ff
    andi a2, a0, 0x7f0
    CHECK a2, 0x700
    ori a2, zero, 0x123
    CHECK a2, 0x123
    TEST 3
    li a0, -16
    srai a2, a0, 2
    CHECK a2, -4
    srli a2, a0, 60
    CHECK a2, 15
    slli a2, a0, 60
    CHECK a2, 0
    li a1, 65
    sll a2, a0, a1
    CHECK a2, -32
    srl a2, a0, a1
    CHECK a2, 0x7ffffffffffffff8
    sra a2, a0, a1
    CHECK a2, -8
    TEST 4
    li a0, -1
    li a1, 1
    slt a2, a0, a1
    CHECK a2, 1
    sltu a2, a0, a1
    CHECK a2, 0
    slti a2, a0, 0
    CHECK a2, 1
    sltiu a2, a1, -1
    CHECK a2, 1
    TEST 5
    lui a0, 0x80000
    CHECK a0, 0xffffffff80000000
5:  auipc a0, 0
    la a1, 5b
    sub a2, a1, a0
    CHECK a2, 0
    TEST 6
    li a0, 0x7fffffff
    addiw a2, a0, 1
    CHECK a2, 0xffffffff80000000
    addw a2, a0, a0
    CHECK a2, -2
    subw a2, zero, a0
    CHECK a2, 0xffffffff80000001
    slliw a2, a0, 1
    CHECK a2, -2
    srliw a2, a2, 1
    CHECK a2, 0x7fffffff
    li a1, 0x80000000
    sraiw a2, a1, 4
    CHECK a2, 0xfffffffff8000000
    li a3, 36
    sllw a2, a0, a3
    CHECK a2, 0xfffffffffffffff0
    srlw a2, a1, a3
    CHECK a2, 0x08000000
    sraw a2, a1, a3
    CHECK a2, 0xfffffffff8000000
    TEST 7
    li a0, 1
    li a1, 2
    beq a0, a1, fail
    bne a0, a0, fail
    blt a1, a0, fail
    bge a0, a1, fail
    li a2, -1
    bltu a2, a0, fail
    bgeu a0, a2, fail
    blt a2, a0, 1f
    j fail
1:  bgeu a2, a0, 1f
    j fail
1:  TEST 8
    jal ra, 2f
1:  j 3f
2:  la t0, 1b
    bne ra, t0, fail
    addi t1, ra, 1    # jalr clears bit 0 of the target
    jalr zero, 0(t1)
    j fail
3:  la t0, 4f
    jalr a5, t0
    j fail
4:  TEST 9
    la s0, data
    li a0, 0x8877665544332211
    sd a0, 0(s0)
    lb a1, 7(s0)
    CHECK a1, 0xffffffffffffff88
    lbu a1, 7(s0)
    CHECK a1, 0x88
    lh a1, 6(s0)
    CHECK a1, 0xffffffffffff8877
    lhu a1, 6(s0)
    CHECK a1, 0x8877
    lw a1, 4(s0)
    CHECK a1, 0xffffffff88776655
    lwu a1, 4(s0)
    CHECK a1, 0x88776655
    ld a1, 0(s0)
    CHECK a1, 0x8877665544332211
    sb zero, 0(s0)
    sh zero, 2(s0)
    sw zero, 4(s0)
    ld a1, 0(s0)
    CHECK a1, 0x2200
    sd zero, 8(s0)
    TEST 10
    # Writes to x0 are discarded.
    li zero, 5
    addi zero, zero, 1
    bnez zero, fail
    TEST 11
    # Compressed forms (explicit) including c.addi16sp / c.addi4spn / c.lwsp / c.sdsp.
    mv t0, sp
    la sp, stack_top
    c.addi16sp sp, -64
    c.addi4spn a0, sp, 16
    sub a1, sp, a0
    CHECK a1, -16
    li a2, 0x1234
    c.sdsp a2, 8(sp)
    c.ldsp a3, 8(sp)
    CHECK a3, 0x1234
    c.swsp a2, 4(sp)
    c.lwsp a3, 4(sp)
    CHECK a3, 0x1234
    c.li a4, -7
    CHECK a4, -7
    c.lui a4, 0x1f
    CHECK a4, 0x1f000
    c.srli a4, 12
    CHECK a4, 0x1f
    c.srai a4, 1
    CHECK a4, 0xf
    c.andi a4, 6
    CHECK a4, 6
    c.slli a4, 3
    CHECK a4, 48
    li a5, 3
    c.sub a4, a5
    CHECK a4, 45
    c.addw a4, a5
    CHECK a4, 48
    c.subw a4, a5
    CHECK a4, 45
    c.addiw a4, -30
    addi a4, a4, -16
    CHECK a4, -1
    c.or a4, a5
    c.xor a4, a5
    CHECK a4, -4
    c.and a4, a5
    CHECK a4, 0
    c.beqz a4, 1f
    j fail
1:  c.bnez a5, 1f
    j fail
1:  c.mv a4, a5
    c.add a4, a5
    CHECK a4, 6
    mv sp, t0
    TEST 12
    # fence, fence.i and a store into code followed by fence.i executes the new code.
    fence
    fence rw, rw
    fence.i
    la a0, patch
    li a1, 0x00100513     # addi a0, zero, 1
    sw a1, 0(a0)
    fence.i
    jal patch
    CHECK a0, 1
    j pass

    .option push
    .option norvc
patch:
    addi a0, zero, 2
    ret
    .option pop

    .data
    .align 4
data:   .zero 32
stack:  .zero 256
stack_top:
