# Interrupts: CLINT timer and software interrupts, direct and vectored mtvec, PLIC external
# interrupts (claim/complete/threshold; the test harness drives source 5 high), delegation of
# S interrupts to stvec, S software interrupts, Sstc stimecmp, and priority order.
.include "common.inc"
.equ MSIP0, CLINT
.equ MTIMECMP0, CLINT + 0x4000
.equ MTIME, CLINT + 0xbff8
.equ MIE_BIT, 8
START
main:
    li s0, MTIMECMP0
    li s1, MTIME
    li t0, -1
    sd t0, 0(s0)
    TEST 1
    # Machine timer, direct mode: wake from WFI into the handler.
    ld t1, 0(s1)
    addi t1, t1, 500        # 50 us at 10 MHz
    sd t1, 0(s0)
    li t0, 1 << 7
    csrw mie, t0
    EXPECT_TRAP
    csrsi mstatus, MIE_BIT
2:  wfi
    j 2b
1:  CHECK s10, 0x8000000000000007
    # Time moved past the deadline.
    ld t2, 0(s1)
    bltu t2, t1, fail
    li t0, -1
    sd t0, 0(s0)
    csrr t0, mip
    andi t0, t0, 1 << 7
    CHECK t0, 0
    TEST 2
    # Software interrupt through msip, vectored mode: cause 3 enters at base + 12.
    la t0, vectors
    ori t0, t0, 1
    csrw mtvec, t0
    li s7, 0
    li t0, 1 << 3
    csrw mie, t0
    li t1, MSIP0
    li t0, 1
    EXPECT_TRAP
    sw t0, 0(t1)
    csrsi mstatus, MIE_BIT
2:  j 2b
1:  CHECK s10, 0x8000000000000003
    CHECK s7, 3
    lw t0, 0(t1)
    CHECK t0, 1
    sw zero, 0(t1)
    la t0, trap
    csrw mtvec, t0
    TEST 3
    # Priority: with MSIP and MTIP pending, MSIP is taken first.
    li t1, MSIP0
    li t0, 1
    sw t0, 0(t1)
    sd zero, 0(s0)
    li t0, (1 << 3) | (1 << 7)
    csrw mie, t0
    EXPECT_TRAP
    csrsi mstatus, MIE_BIT
2:  j 2b
1:  CHECK s10, 0x8000000000000003
    sw zero, 0(t1)
    EXPECT_TRAP
    csrsi mstatus, MIE_BIT
2:  j 2b
1:  CHECK s10, 0x8000000000000007
    li t0, -1
    sd t0, 0(s0)
    TEST 4
    # PLIC: source 5 is high (driven by the harness); priority 1, enabled for context 0.
    li s2, PLIC
    li t0, 1
    sw t0, 20(s2)            # priority[5]
    li t1, PLIC + 0x1000
    lw t0, 0(t1)
    andi t0, t0, 1 << 5
    CHECK t0, 1 << 5         # pending
    li t1, PLIC + 0x2000
    li t0, 1 << 5
    sw t0, 0(t1)             # enable for context 0 (hart 0 M)
    li t1, 1 << 11
    csrw mie, t1
    EXPECT_TRAP
    csrsi mstatus, MIE_BIT
2:  wfi
    j 2b
1:  CHECK s10, 0x800000000000000b
    li s3, PLIC + 0x200000
    lw t0, 4(s3)             # claim
    CHECK t0, 5
    lw t0, 4(s3)
    CHECK t0, 0              # nothing else
    csrr t0, mip
    srli t0, t0, 11
    andi t0, t0, 1
    CHECK t0, 0
    li t0, 5
    sw t0, 4(s3)             # complete: still high, pending again
    csrr t0, mip
    srli t0, t0, 11
    andi t0, t0, 1
    CHECK t0, 1
    li t0, 1
    sw t0, 0(s3)             # threshold 1 masks priority 1
    csrr t0, mip
    srli t0, t0, 11
    andi t0, t0, 1
    CHECK t0, 0
    csrw mie, zero
    TEST 5
    # Delegated supervisor timer interrupt (STIP set by M software) goes to stvec.
    li t0, (1 << 5) | (1 << 1) | (1 << 9)
    csrw mideleg, t0
    csrr t1, mideleg
    bne t0, t1, fail
    la t0, s_handler
    csrw stvec, t0
    li t0, 1 << 5
    csrw mie, t0
    csrs mip, t0
    EXPECT_TRAP
    ENTER_S s_wait
1:  CHECK s10, 9             # S handler reported by ecall
    CHECK a3, 0x8000000000000005
    li t0, 1 << 5
    csrc mip, t0
    TEST 6
    # S software interrupt raised by S itself through sip.
    li t0, 1 << 1
    csrw mie, t0
    EXPECT_TRAP
    ENTER_S s_ssip
1:  CHECK s10, 9
    CHECK a3, 0x8000000000000001
    TEST 7
    # Sstc: S writes stimecmp; STIP follows time >= stimecmp.
    li t0, 1 << 63
    csrw menvcfg, t0
    li t0, 2
    csrw mcounteren, t0
    li t0, 1 << 5
    csrw mie, t0
    EXPECT_TRAP
    ENTER_S s_sstc
1:  CHECK s10, 9
    CHECK a3, 0x8000000000000005
    # Writing mip.STIP has no effect with Sstc on.
    li t0, -1
    csrw stimecmp, t0
    li t0, 1 << 5
    csrs mip, t0
    csrr t0, mip
    andi t0, t0, 1 << 5
    CHECK t0, 0
    j pass

s_wait:
    csrsi sstatus, 2
1:  wfi
    j 1b
s_ssip:
    csrsi sstatus, 2
    csrsi sip, 2
1:  j 1b
s_sstc:
    rdtime t0
    addi t0, t0, 300
    csrw stimecmp, t0
    csrsi sstatus, 2
1:  wfi
    j 1b
    .align 2
s_handler:
    csrr a3, scause
    csrci sip, 2
    ecall

    .align 6
    .option push
    .option norvc
vectors:
    j trap
    j trap
    j trap
    j vec3
    j trap
    j trap
    j trap
    j trap
    j trap
    j trap
    j trap
    j trap
    .option pop
vec3:
    li s7, 3
    j trap
